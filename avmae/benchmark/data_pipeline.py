"""Data-pipeline throughput: training clips per second of one worker, per video decoder.

It times the training path itself, ``build_dataset(cfg, "train", train=True)`` items in this
process on ``threads`` torch threads, as one DataLoader worker runs them: raw mp4s per decoder,
the same clips as prepared shards (``shards``), and shards with ``data.device_transforms``
(``shards-device``, whose batched device work is timed apart). It reports clips per wall second
and per CPU-second, the ms per stage, and the stored forms of the frames (``measure_stored_forms``).
The clips are 640x360 H.264 + AAC files from the synthetic generator, each drawn ``height``
pixels square and widened with mirrored copies of itself so every column holds native detail.
What each figure means, and the results: docs/benchmarks.md, "Data pipeline".
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence
from unittest import mock

import av
import numpy as np
import torch

from avmae.augment import AVTransforms
from avmae.augment.transforms import resize_short_side
from avmae.config import Config, replace
from avmae.data import AVDataset, build_dataset
from avmae.data import dataset as dataset_module
from avmae.data.collate import collate_clips
from avmae.data.device import apply_device_transforms
from avmae.data.synthetic import DEFAULT_NUISANCE, VIDEO_CRF, class_specs, render_clip, write_av_file
from avmae.data.shard_writer import encode_frame, frame_step, prepare_shards
from avmae.data.shards import decode_frame, needed_frame_rate
from avmae.data.video import DECODERS, open_video

from .machine import environment, finish, synchronize
from .train_step import split_rounds

# Targets: 30 clips/s per CPU core on 360p H.264; on prepared shards 40 clips/s per core and 6x
# the raw-mp4 path (decord) of the same run.
TARGET_CLIPS_PER_CPU_S = 30.0
TARGET_SHARDS_CLIPS_PER_CPU_S = 40.0
TARGET_SHARDS_SPEEDUP = 6.0
SHARDS = "shards"
SHARDS_DEVICE = "shards-device"  # the shards with data.device_transforms: the worker only decodes and crops
# Targets with device transforms: the worker at 150 clips/s per core and 2x the shard worker of the same run.
TARGET_DEVICE_CLIPS_PER_CPU_S = 150.0
TARGET_DEVICE_SPEEDUP = 2.0
STAGES = ("video_decode", "audio_decode", "fbank", "augment", "other")
# The functions of avmae.data.dataset and the dataset methods wrapped to time each stage (the
# transforms are wrapped too).
_TIMED_FUNCTIONS = {"_read_clips": "video_decode", "fbank": "fbank"}
_TIMED_METHODS = {"_open_video": "video_decode", "_read_windows": "audio_decode"}
# Warm-up items are drawn in an epoch the timed items never reach, so none of them repeats.
_WARMUP_EPOCH = 1_000_000
SPEC_FILE = "clips.json"


# ---------------------------------------------------------------------------------------------
# The clips


def clips_spec(
    num_clips: int = 16,
    duration: float = 10.0,
    fps: Sequence[float] = (25.0, 30.0),
    width: int = 640,
    height: int = 360,
    seed: int = 0,
) -> dict:
    """The arguments that determine the benchmark clips (clip ``i`` runs at ``fps[i % len(fps)]``)."""
    if num_clips < 1 or duration <= 0 or not fps or min(fps) <= 0:
        raise ValueError(f"need num_clips >= 1, duration > 0 and positive fps, got {num_clips}, {duration}, {fps}")
    if width % 2 or height % 2 or height < 16 or width < 16:
        raise ValueError(f"H.264 yuv420p needs even frame sizes of at least 16, got {width}x{height}")
    return {"num_clips": num_clips, "duration": float(duration), "fps": [float(f) for f in fps],
            "width": width, "height": height, "seed": seed, "nuisance": DEFAULT_NUISANCE}  # fmt: skip


def default_clips_dir(spec: dict, root: str | Path = "data/benchmark") -> Path:
    """``root/h264_<W>x<H>_<duration>s_<N>clips``: clips of other settings get another folder."""
    return Path(root) / f"h264_{spec['width']}x{spec['height']}_{spec['duration']:g}s_{spec['num_clips']}clips"


def widen(frames: np.ndarray, width: int) -> np.ndarray:
    """``(T, H, W0, C)`` -> ``(T, H, width, C)``: the frames followed by mirrored copies of
    themselves (alternately flipped, so there are no seams), cut at ``width``."""
    copies = math.ceil(width / frames.shape[2])
    return np.concatenate([frames[:, :, ::-1] if k % 2 else frames for k in range(copies)], axis=2)[:, :, :width]


def video_stream_stats(path: Path) -> dict:
    """Bits per second of the video stream of ``path`` (its packets' bytes over its duration) and
    its keyframes: a frame decodes from the keyframe before it, so their spacing sets the cost
    of reaching a clip inside the file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        seconds = float(stream.duration * stream.time_base) if stream.duration else container.duration / av.time_base
    return {"bit_rate": 8.0 * sum(p.size for p in packets) / seconds, "keyframes": sum(p.is_keyframe for p in packets)}


def _write_clips(out_dir: Path, spec: dict) -> None:
    num_classes = min(spec["num_clips"], 8)
    specs = class_specs(num_classes)
    rows, stats = [], []
    (out_dir / "clips").mkdir(parents=True)
    for i in range(spec["num_clips"]):
        fps = spec["fps"][i % len(spec["fps"])]
        rng = np.random.default_rng([spec["seed"], i])
        clip = render_clip(specs[i % num_classes], rng, spec["duration"], fps, spec["height"], nuisance=spec["nuisance"])
        frames = widen(clip.frames, spec["width"])
        path = write_av_file(out_dir / "clips" / f"clip_{i:03d}.mp4", frames, fps, clip.audio)
        rows.append(f"clip_{i:03d},clips/{path.name},{i % num_classes}\n")
        stats.append(video_stream_stats(path))
    (out_dir / "train.csv").write_text("id,video,label\n" + "".join(rows))
    (out_dir / "classes.txt").write_text("".join(f"{s.name}\n" for s in specs))
    info = spec | {
        "codec": f"H.264 (libx264 crf {VIDEO_CRF}, preset fast) + AAC",
        "video_bit_rate_mean": float(np.mean([s["bit_rate"] for s in stats])),
        "keyframes_per_clip_mean": float(np.mean([s["keyframes"] for s in stats])),
    }
    (out_dir / SPEC_FILE).write_text(json.dumps(info, indent=2) + "\n")


def write_benchmark_clips(out_dir: str | Path, spec: dict) -> dict:
    """Write the clips of ``spec`` (``clips_spec``) to ``out_dir`` unless it already holds them.

    Layout: ``clips/clip_<i>.mp4``, ``train.csv`` and ``classes.txt`` (the synthetic format of
    ``avmae.data.manifests``) and ``clips.json`` (the spec, the codec and the mean video bit
    rate), which is returned. The folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    info_path = out_dir / SPEC_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in spec} != spec:
            raise FileExistsError(
                f"{out_dir}: holds benchmark clips of other settings ({info_path}); choose another folder"
            )
        return info
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty and holds no {SPEC_FILE}; choose another folder")
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_clips(partial, spec)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return json.loads(info_path.read_text())


# ---------------------------------------------------------------------------------------------
# The measurement


def benchmark_shards(cfg: Config, clips_dir: str | Path) -> tuple[Path, dict]:
    """The benchmark clips prepared as shards for ``cfg``'s geometry (written on first use, into
    ``clips_dir/shards_<short side>px_<frame rate>fps``), and the timing of that preparation."""
    clips_dir = Path(clips_dir)
    needed = needed_frame_rate(cfg.data.video, cfg.augment)
    root = clips_dir / f"shards_{cfg.data.video.resize}px_{needed:g}fps"
    timing_path = root / "prepare.json"
    if not timing_path.is_file():
        source = replace(cfg, data=replace(cfg.data, format="synthetic", root=str(clips_dir), train="train.csv",
                                           label_file=None, video_template=None, audio_root=None))  # fmt: skip
        wall, cpu = time.perf_counter(), time.process_time()
        meta = prepare_shards(source, "train", root / "train", num_workers=1, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        chunk_bytes = sum(p.stat().st_size for p in (root / "train").glob("chunk-*.bin"))
        timing = {"clips": meta["num_samples"], "wall_s": wall, "cpu_s": cpu, "clips_per_s": meta["num_samples"] / wall,
                  "clips_per_cpu_s": meta["num_samples"] / cpu, "bytes": chunk_bytes,
                  "bytes_per_clip": chunk_bytes / meta["num_samples"], "settings": {k: meta[k] for k in
                  ("short_side", "needed_frame_rate", "jpeg_quality", "sample_rate", "shard_size")},
                  "command": "one process (tools/prepare_data.py --num-workers 1)"}  # fmt: skip
        timing_path.write_text(json.dumps(timing, indent=2) + "\n")
    return root, json.loads(timing_path.read_text())


def benchmark_dataset(cfg: Config, clips_dir: str | Path, decoder: str, clips_per_video: int) -> AVDataset:
    """The training dataset of ``cfg`` (geometry, augmentation, seed) over the benchmark clips;
    ``decoder = "shards"``: over the clips prepared as shards (``benchmark_shards``)."""
    clips_dir = Path(clips_dir)
    if decoder in (SHARDS, SHARDS_DEVICE):
        root, _ = benchmark_shards(cfg, clips_dir)
        data = replace(cfg.data, format=SHARDS, root=str(root), train="train", clips_per_video=clips_per_video,
                       device_transforms=decoder == SHARDS_DEVICE)  # fmt: skip
        return build_dataset(replace(cfg, data=data), "train", train=True)
    data = replace(cfg.data, device_transforms=False)
    data = replace(
        data, format="synthetic", root=str(clips_dir), train="train.csv", label_file=None,
        video_template=None, audio_root=None, missing_list=str(clips_dir / "missing_{split}.txt"),
        clips_per_video=clips_per_video, video=replace(cfg.data.video, decoder=decoder),
    )  # fmt: skip
    return build_dataset(replace(cfg, data=data), "train", train=True)


class StageTimes:
    """Seconds spent in each stage (``STAGES``), summed over calls of the wrapped functions."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def timed_stages(dataset: AVDataset) -> Iterator[StageTimes]:
    """Time the stages of ``dataset.__getitem__`` inside the block (docs/benchmarks.md, "Data pipeline")."""
    times = StageTimes()
    transforms = dataset.transforms
    with contextlib.ExitStack() as stack:
        for name, stage in _TIMED_FUNCTIONS.items():
            wrapped = times.wrap(stage, getattr(dataset_module, name))
            stack.enter_context(mock.patch.object(dataset_module, name, wrapped))
        for name, stage in _TIMED_METHODS.items():
            stack.enter_context(mock.patch.object(dataset, name, times.wrap(stage, getattr(dataset, name))))
        if dataset.device_transforms:  # the draws, the crop and the waveform augmentation
            wrapped = times.wrap("augment", dataset_module.draw_for_device)
            stack.enter_context(mock.patch.object(dataset_module, "draw_for_device", wrapped))
        else:
            dataset.transforms = AVTransforms(
                *(times.wrap("augment", f) for f in (transforms.video, transforms.waveform, transforms.fbank))
            )
        try:
            yield times
        finally:
            dataset.transforms = transforms


def _item(dataset: AVDataset, n: int) -> dict:
    """The ``n``-th item of an endless pass: index ``n mod len``, one epoch per pass."""
    dataset.set_epoch(n // len(dataset))
    return dataset[n % len(dataset)]


def _setting_result(decoder: str, k: int, parts: list[dict]) -> dict:
    items, clips = sum(p["items"] for p in parts), sum(p["clips"] for p in parts)
    wall, cpu = sum(p["wall_s"] for p in parts), sum(p["cpu_s"] for p in parts)
    stages = {s: sum(p["stages"][s] for p in parts) for s in STAGES[:-1]}
    stages["other"] = max(0.0, wall - sum(stages.values()))
    return {
        "decoder": decoder,
        "clips_per_video": k,
        "items": items,
        "clips": clips,
        "failures": sum(p["failures"] for p in parts),
        "wall_s": wall,
        "cpu_s": cpu,
        "clips_per_s": clips / wall,
        "clips_per_cpu_s": clips / cpu,
        "cpu_per_wall": cpu / wall,  # > 1: the decoder used more threads; < 1: the process waited
        "round_clips_per_s": [p["clips"] / p["wall_s"] for p in parts],
        "stage_ms_per_clip": {s: 1000.0 * t / clips for s, t in stages.items()},
        "meets_target": clips / cpu >= {SHARDS: TARGET_SHARDS_CLIPS_PER_CPU_S, SHARDS_DEVICE: TARGET_DEVICE_CLIPS_PER_CPU_S}.get(
            decoder, TARGET_CLIPS_PER_CPU_S),
    }


def measure_device_transforms(dataset: AVDataset, batch_size: int, rounds: int = 3) -> dict:
    """ms per clip of ``apply_device_transforms`` on one collated batch of ``dataset``'s raw
    items (``data.device_transforms``): on the CPU (this process's threads), and on CUDA when
    available (the batch copied there first, the time synchronised). The best of ``rounds``."""
    batch = collate_clips([_item(dataset, _WARMUP_EPOCH * len(dataset) + n) for n in range(batch_size)])
    clips = int(batch["video"].shape[0])
    data_cfg = dataset.data_cfg
    result = {"batch_clips": clips}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        times = []
        for _ in range(rounds + 1):  # the first round warms up
            synchronize(torch.device(device))
            start = time.perf_counter()
            apply_device_transforms(moved, data_cfg)
            synchronize(torch.device(device))
            times.append(time.perf_counter() - start)
        result["device_ms_per_clip" + ("" if device == "cpu" else "_cuda")] = 1000.0 * min(times[1:]) / clips
    return result


def measure_data_pipeline(
    cfg: Config,
    clips_dir: str | Path,
    decoders: Sequence[str] = ("decord", "pyav"),
    clips_per_video: Sequence[int] = (1,),
    items: int = 32,
    warmup: int = 2,
    rounds: int = 2,
    threads: int = 1,
) -> dict:
    """Clips/s of one in-process worker for every decoder x ``clips_per_video`` (docs/benchmarks.md).

    The settings are built and warmed up with ``warmup`` items each, then ``items`` timed items
    each run in ``rounds`` rounds that alternate the settings, reversing their order every round,
    so a change of load on a shared machine falls on all of them alike. An item of
    ``clips_per_video = K`` holds K clips; rates count clips.

    Returns a JSON-ready record: environment, the clips (``clips.json``), the clip geometry and,
    per setting, ``clips_per_s``, ``clips_per_cpu_s``, ``stage_ms_per_clip`` and ``meets_target``.
    """
    unknown = [d for d in decoders if d not in DECODERS and d not in (SHARDS, SHARDS_DEVICE)]
    if unknown or not decoders:
        raise ValueError(f"decoders must be some of {', '.join([*DECODERS, SHARDS, SHARDS_DEVICE])}, got {list(decoders)}")
    if not clips_per_video or min(clips_per_video) < 1:
        raise ValueError(f"clips_per_video values must be >= 1, got {list(clips_per_video)}")
    if warmup < 0 or threads < 1:
        raise ValueError(f"need warmup >= 0 and threads >= 1, got warmup={warmup}, threads={threads}")
    if not 1 <= rounds <= items:
        raise ValueError(f"need 1 <= rounds <= items, got items={items}, rounds={rounds}")
    clips_dir = Path(clips_dir)
    info_path = clips_dir / SPEC_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{clips_dir}: no {SPEC_FILE}; write the clips with write_benchmark_clips first")
    per_round = split_rounds(items, rounds)
    settings = [(d, k) for d in dict.fromkeys(decoders) for k in dict.fromkeys(clips_per_video)]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = environment(torch.device("cpu"), threads)
        datasets = {s: benchmark_dataset(cfg, clips_dir, *s) for s in settings}
        for dataset in datasets.values():
            for n in range(warmup):
                _item(dataset, _WARMUP_EPOCH * len(dataset) + n)
        parts: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
        done = dict.fromkeys(settings, 0)
        for r, count in enumerate(per_round):
            for setting in settings if r % 2 == 0 else reversed(settings):
                dataset, clips, failures = datasets[setting], 0, 0
                with timed_stages(dataset) as times:
                    wall, cpu = time.perf_counter(), time.process_time()
                    for n in range(done[setting], done[setting] + count):
                        sample = _item(dataset, n)
                        clips += sample.get("clips", 1)
                        failures += sample["failures"]
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                done[setting] += count
                parts[setting].append({"items": count, "clips": clips, "failures": failures,
                                       "wall_s": wall, "cpu_s": cpu, "stages": dict(times.seconds)})  # fmt: skip
        device_costs = {s: measure_device_transforms(datasets[s], cfg.data.batch_size) for s in settings
                        if s[0] == SHARDS_DEVICE}  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)

    video, audio = cfg.data.video, cfg.data.audio
    results = [_setting_result(d, k, parts[(d, k)]) for d, k in settings]
    by_setting = {(r["decoder"], r["clips_per_video"]): r for r in results}
    # the shard readers' speedup over every other decoder, and its target against one of them
    speedup_targets = {SHARDS: ("decord", TARGET_SHARDS_SPEEDUP), SHARDS_DEVICE: (SHARDS, TARGET_DEVICE_SPEEDUP)}
    for r in results:
        if r["decoder"] == SHARDS_DEVICE:
            r.update(device_costs[(SHARDS_DEVICE, r["clips_per_video"])])
        if r["decoder"] in speedup_targets:
            baseline, target = speedup_targets[r["decoder"]]
            r["speedup"] = {d: r["clips_per_cpu_s"] / by_setting[(d, k)]["clips_per_cpu_s"]
                            for d, k in by_setting if d != r["decoder"] and k == r["clips_per_video"]}  # fmt: skip
            if baseline in r["speedup"]:
                r["meets_target"] = r["meets_target"] and r["speedup"][baseline] >= target
    extra = {}
    if SHARDS in decoders or SHARDS_DEVICE in decoders:
        extra = {"prepare": benchmark_shards(cfg, clips_dir)[1], "target_shards_clips_per_cpu_s":
                 TARGET_SHARDS_CLIPS_PER_CPU_S, "target_shards_speedup_vs_decord": TARGET_SHARDS_SPEEDUP}  # fmt: skip
    return {
        "kind": "data_pipeline",
        **finish(env),
        "clips": json.loads(info_path.read_text()),
        "geometry": {
            "num_frames": video.num_frames, "frame_rate": video.frame_rate, "resize": video.resize,
            "size": video.size, "audio_seconds": audio.seconds, "num_mel_bins": audio.num_mel_bins,
        },  # fmt: skip
        "warmup_items": warmup,
        "timed_items": items,
        "rounds": rounds,
        "target_clips_per_cpu_s": TARGET_CLIPS_PER_CPU_S,
        "stages": "video_decode: open_video + _read_clips; audio_decode: _read_windows; fbank; "
        "augment: the video, waveform and fbank training transforms; other: the rest of __getitem__",
        "settings": results,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Stored forms of the frames


def _stored_frames(cfg: Config, path: Path) -> tuple[np.ndarray, float]:
    """``(T, H, W, 3)`` frames of ``path`` as the shards keep them (every ``step``-th frame, short
    side ``video.resize``) and their rate."""
    with open_video(path) as reader:
        step = frame_step(reader.fps, needed_frame_rate(cfg.data.video, cfg.augment))
        indices = np.arange(0, reader.num_frames, step)
        frames = reader.frames_at(indices / reader.fps).permute(0, 3, 1, 2)
        fps = reader.fps / step
    return resize_short_side(frames, cfg.data.video.resize).permute(0, 2, 3, 1).contiguous().numpy(), fps


def _encode_jpeg(frames: np.ndarray, quality: int) -> list[bytes]:
    return [encode_frame(f, quality) for f in frames]


def _decode_jpeg(jpegs: list[bytes], first: int, count: int) -> np.ndarray:
    return np.stack([decode_frame(j) for j in jpegs[first : first + count]])


def _encode_h264(frames: np.ndarray, fps: float, gop: int, crf: int) -> bytes:
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # yuv420p: even sizes
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "fast", "g": str(gop), "keyint_min": str(gop), "bf": "0",
                          "sc_threshold": "0"}  # fmt: skip
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _decode_h264(data: bytes, first: int, count: int) -> np.ndarray:
    """Frames ``first .. first + count - 1``: seek to the keyframe before ``first``, decode forward."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1
        rate = float(stream.average_rate)
        container.seek(int(first / rate / stream.time_base), stream=stream, backward=True)
        frames = []
        for frame in container.decode(stream):
            index = int(round(frame.time * rate))
            if index >= first:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= first + count - 1:
                break
    return np.stack(frames)


def measure_stored_forms(
    cfg: Config,
    clips_dir: str | Path,
    gops: Sequence[int] = (4, 16),
    jpeg_quality: int = 90,
    crf: int = 18,
    clips: int = 4,
    reads: int = 8,
    seed: int = 0,
) -> dict:
    """CPU ms to read the ``video.num_frames`` stored frames of one training clip (speed 1, random
    start), and bytes per second of video, for JPEG frames and for H.264 re-encoded with keyframes
    every ``gop`` frames (no B-frames), on ``clips`` benchmark clips prepared as the shards keep
    them. One thread; decoding only (no augmentation)."""
    clips_dir = Path(clips_dir)
    paths = sorted((clips_dir / "clips").glob("*.mp4"))[:clips]
    rng = np.random.default_rng(seed)
    forms = {"jpeg": [], **{f"h264_gop{g}": [] for g in gops}}
    sizes = dict.fromkeys(forms, 0.0)
    seconds = 0.0
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path in paths:
            frames, fps = _stored_frames(cfg, path)
            seconds += len(frames) / fps
            stored = {"jpeg": _encode_jpeg(frames, jpeg_quality)}
            stored |= {f"h264_gop{g}": _encode_h264(frames, fps, g, crf) for g in gops}
            sizes["jpeg"] += sum(len(j) for j in stored["jpeg"])
            for g in gops:
                sizes[f"h264_gop{g}"] += len(stored[f"h264_gop{g}"])
            count = min(cfg.data.video.num_frames, len(frames))
            starts = rng.integers(0, len(frames) - count + 1, size=reads)
            for form, data in stored.items():
                decode = _decode_jpeg if form == "jpeg" else _decode_h264
                decode(data, 0, count)  # warm-up
                cpu = time.process_time()
                for start in starts:
                    out = decode(data, int(start), count)
                    assert out.shape[0] == count, (form, out.shape)
                forms[form].append((time.process_time() - cpu) / reads)
    finally:
        torch.set_num_threads(previous)
    return {
        "kind": "stored_forms",
        "clips": len(paths),
        "reads_per_clip": reads,
        "frames_per_read": cfg.data.video.num_frames,
        "short_side": cfg.data.video.resize,
        "jpeg_quality": jpeg_quality,
        "h264_crf": crf,
        "ms_per_clip_read": {form: 1000.0 * float(np.mean(t)) for form, t in forms.items()},
        "bytes_per_video_second": {form: size / seconds for form, size in sizes.items()},
    }
