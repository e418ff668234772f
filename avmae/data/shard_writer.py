"""``prepare_shards`` (``tools/prepare_data.py``): every clip of a split decoded once and written as
litdata chunks that ``avmae.data.shards`` reads. An offline tool, apart from the training path.
The layout is in docs/data.md.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg  # libjpeg-turbo, straight to and from numpy arrays
import torch

from avmae.augment.transforms import resize_short_side
from avmae.config import Config, DataConfig
from avmae.data.audio import AudioDecodeError, NoAudioError, audio_duration, read_audio
from avmae.data.manifests import ClipRecord, is_present, read_manifest
from avmae.data.shards import FORMAT_VERSION, META_FILE, PCM_SCALE, RECORDS_FILE, SAMPLE_RATE, needed_frame_rate
from avmae.data.video import VideoDecodeError, open_video

log = logging.getLogger(__name__)

REPORT_FILE = "report.txt"  # missing and undecodable source files, one per line
DEFAULT_SHARD_SIZE = 64  # clips per shard: one litdata chunk each (about 60 MB at 360p->256, 10 s)
DEFAULT_JPEG_QUALITY = 90
_FRAME_BATCH = 64  # source frames decoded and resized at a time while preparing


def _marker(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.json"


def frame_step(source_fps: float, needed_fps: float) -> int:
    """Keep every ``step``-th source frame: the largest step whose rate still reaches ``needed_fps``."""
    return max(1, int(math.floor(source_fps / needed_fps + 1e-6)))



def encode_frame(frame: np.ndarray, quality: int) -> bytes:
    """One ``(H, W, 3)`` uint8 RGB frame as the shards store it: a JPEG with 4:2:0 chroma."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=quality, colorspace="RGB", colorsubsampling="420")


def encode_record(record: ClipRecord, data_cfg: DataConfig, needed_fps: float, pad: float, quality: int) -> dict:
    """Decode ``record`` once into a shard sample: JPEG frames, 16-bit PCM audio and an ``info`` dict.

    A segment record (EPIC) keeps only its segment widened by ``pad`` seconds on each side (the
    longest clip span plus the audio window), so its clips and audio windows read the same
    frames and samples as from the file. Raises ``VideoDecodeError`` / ``AudioDecodeError`` for a
    damaged file; a file without an audio stream is kept with ``has_audio = False``.
    """
    video_cfg = data_cfg.video
    with open_video(record.video, video_cfg.decoder) as reader:
        fps, total = reader.fps, reader.num_frames
        step = frame_step(fps, needed_fps)
        lo, hi = 0.0, reader.duration
        if record.start is not None:
            lo, hi = max(0.0, record.start - pad), min(reader.duration, record.end + pad)
        first = int(math.floor(lo * fps + 1e-6))
        last = min(total - 1, max(first, int(math.ceil(hi * fps)) - 1))
        indices = np.arange(first, last + 1, step)
        jpegs: list[bytes] = []
        for begin in range(0, indices.size, _FRAME_BATCH):
            batch = indices[begin : begin + _FRAME_BATCH]
            frames = reader.frames_at(batch / fps).permute(0, 3, 1, 2)  # (T, C, H, W)
            if min(frames.shape[-2:]) > video_cfg.resize:
                frames = resize_short_side(frames, video_cfg.resize)  # the evaluation transform's resize
            for frame in frames.permute(0, 2, 3, 1).contiguous().numpy():
                jpegs.append(encode_frame(frame, quality))
        height, width = int(frames.shape[-2]), int(frames.shape[-1])
        duration = reader.duration
    offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    audio_path = record.audio or record.video
    audio, has_audio, audio_start, audio_seconds = b"", True, lo, None
    try:
        audio_seconds = audio_duration(audio_path)
        audio_end = hi if record.start is not None else max(hi, audio_seconds)
        wave = read_audio(audio_path, audio_start, audio_end - audio_start, SAMPLE_RATE).numpy()
        audio = np.clip(np.round(wave * PCM_SCALE), -PCM_SCALE, PCM_SCALE - 1).astype("<i2").tobytes()
    except NoAudioError:
        has_audio = False
    info = {
        "fps": fps, "num_frames": total, "first": first, "step": step, "stored_frames": len(jpegs),
        "height": height, "width": width, "audio_start": audio_start, "has_audio": has_audio,
        "audio_duration": audio_seconds, "duration": duration, "source": str(record.video),
    }  # fmt: skip
    return {
        "id": record.id,
        "video": b"".join(jpegs),
        "offsets": offsets,
        "audio": audio,
        "info": json.dumps(info),
    }


def _record_entry(record: ClipRecord, info: dict) -> dict:
    return {"id": record.id, "targets": record.targets, "start": record.start, "end": record.end,
            "source": str(record.video), "duration": info["duration"]}  # fmt: skip


def _write_shard(job: tuple) -> dict:
    """Encode and write shard ``shard`` (its records), then its marker; returns the marker."""
    out, shard, shard_size, records, data_cfg, needed_fps, pad, quality = job
    from litdata.streaming.writer import BinaryWriter

    out = Path(out)
    for stale in [*out.glob(f"chunk-{shard}-*.bin"), out / f"{shard}.index.json"]:
        stale.unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the processes give the parallelism
    # one chunk per shard; the chunk size is a setting litdata checks to be equal in every index
    writer = BinaryWriter(str(out), chunk_size=shard_size + 1)
    writer._rank = shard  # litdata names the chunk and its index file by the writer's rank
    entries, bad = [], []
    for record in records:
        try:
            sample = encode_record(record, data_cfg, needed_fps, pad, quality)
        except (VideoDecodeError, AudioDecodeError) as err:
            bad.append({"id": record.id, "path": str(record.video), "error": str(err)})
            continue
        writer.add_item(len(entries), sample)
        entries.append(_record_entry(record, json.loads(sample["info"])))
    index = None
    if entries:
        writer.done()
        index_file = out / f"{shard}.index.json"
        index = json.loads(index_file.read_text())
        index_file.unlink()  # kept in the marker: litdata's merge consumes the index files it finds
    torch.set_num_threads(threads)
    chunks = [c["filename"] for c in index["chunks"]] if index else []
    marker = {"shard": shard, "chunks": chunks, "index": index, "records": entries, "bad": bad}
    path = _marker(out, shard)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(marker))
    os.replace(partial, path)
    return marker


def prepare_shards(
    cfg: Config,
    split: str,
    out: str | Path,
    num_workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    quality: int = DEFAULT_JPEG_QUALITY,
    progress: bool = True,
) -> dict:
    """Write the shards of ``split`` to ``out`` (module docstring; layout in docs/data.md).

    Shards whose marker ``shard-<n>.json`` exists are kept (a rerun resumes); any other shard is
    (re)written. Missing and undecodable files are skipped and listed in ``report.txt``.
    Returns the summary also stored in ``meta.json``.
    """
    from litdata.streaming.writer import BinaryWriter
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.data, split)
    present = [r for r in manifest.records if is_present(r)]
    missing = [r for r in manifest.records if not is_present(r)]
    needed_fps = needed_frame_rate(cfg.data.video, cfg.augment)
    slowest = min(1.0, cfg.augment.speed_range[0])
    fastest = max(1.0, cfg.augment.speed_range[1])
    # a whole audio window: audio.window=inside may shift a window to start up to one window before its clip
    pad = cfg.data.video.num_frames * fastest / cfg.data.video.frame_rate + cfg.data.audio.seconds
    shards = [present[i : i + shard_size] for i in range(0, len(present), shard_size)]
    settings = {"version": FORMAT_VERSION, "split": split, "source": str(manifest.source),
                "short_side": cfg.data.video.resize, "frame_rate": cfg.data.video.frame_rate,
                "speed_range": [slowest, fastest], "needed_frame_rate": needed_fps,
                "jpeg_quality": quality, "sample_rate": SAMPLE_RATE, "shard_size": shard_size}  # fmt: skip
    _check_same_settings(out, settings)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (out / META_FILE).unlink(missing_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # litdata's writer takes a folder with an index as finished

    markers: dict[int, dict] = {}
    todo = []
    for shard, records in enumerate(shards):
        if _marker(out, shard).is_file():
            markers[shard] = json.loads(_marker(out, shard).read_text())
        else:
            todo.append((str(out), shard, shard_size, records, cfg.data, needed_fps, pad, quality))
    done_records = sum(len(shards[s]) for s in markers)
    bar = tqdm(total=len(present), initial=done_records, unit="clip", disable=not progress,
               desc=f"prepare {split}", smoothing=0.1)  # fmt: skip
    workers = max(1, min(num_workers, len(todo)))
    if workers == 1:
        results = map(_write_shard, todo)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_write_shard, todo)
    try:
        for marker in results:
            markers[marker["shard"]] = marker
            bar.update(len(shards[marker["shard"]]))
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown()

    # one litdata index over all chunks; the records file follows its chunk order
    by_chunk = {c: m for m in markers.values() for c in m["chunks"]}
    order = []
    if by_chunk:
        merge_dir = out / ".merge"
        shutil.rmtree(merge_dir, ignore_errors=True)
        merge_dir.mkdir()
        for shard, marker in markers.items():
            if marker["index"]:
                (merge_dir / f"{shard}.index.json").write_text(json.dumps(marker["index"]))
        BinaryWriter(str(merge_dir), chunk_size=shard_size + 1)._merge_no_wait()
        order = [c["filename"] for c in json.loads((merge_dir / "index.json").read_text())["chunks"]]
        if sorted(order) != sorted(by_chunk):
            raise RuntimeError(f"{out}: the merged index lists {len(order)} chunks, the shard markers {len(by_chunk)}")
        os.replace(merge_dir / "index.json", out / "index.json")
        shutil.rmtree(merge_dir)
    entries = [e for chunk in order for e in by_chunk[chunk]["records"]]
    with gzip.open(out / RECORDS_FILE, "wt") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    bad = [b for s in sorted(markers) for b in markers[s]["bad"]]
    with open(out / REPORT_FILE, "w") as f:
        for record in missing:
            f.write(f"missing\t{record.id}\t{record.video}\n")
        for b in bad:
            f.write(f"undecodable\t{b['id']}\t{b['path']}\t{b['error']}\n")
    meta = settings | {
        "classes": manifest.classes, "multi_label": manifest.multi_label, "num_records": len(manifest.records),
        "num_samples": len(entries), "num_missing": len(missing), "num_undecodable": len(bad), "num_shards": len(shards),
    }  # fmt: skip
    partial = out / f".{META_FILE}.partial"
    partial.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(partial, out / META_FILE)
    if missing or bad:
        log.warning("%s %s: skipped %d missing and %d undecodable files; list in %s",
                    manifest.source, split, len(missing), len(bad), out / REPORT_FILE)  # fmt: skip
    return meta


def _check_same_settings(out: Path, settings: dict) -> None:
    """A rerun into a folder written with other settings would mix two kinds of shard."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise FileExistsError(f"{out}: shards of other settings are there ({changed}); choose another folder")


