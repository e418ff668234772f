"""Prepared shards: every clip decoded once, stored for fast random access, read as the mp4s are.

``prepare_shards(cfg, split, out)`` (``tools/prepare_data.py``) reads the split's manifest of
any format, decodes each record once and writes litdata chunks: the frames resized to the short
side ``data.video.resize`` as JPEG images, kept at a rate high enough for the config's frame rate
and speed range, the audio track as 16 kHz mono 16-bit PCM, and the targets, id, source path and
duration. The layout is in docs/data.md.

``ShardDataset`` is an ``AVDataset`` whose media reads (``_open_video``, ``_read_windows``, ``_audio_duration``)
come from the shards; clip sampling in seconds, fbank, augmentations, targets, per-item seeds and
the bad-clip policy and counters are AVDataset's own. Items are fetched by global sample index
(``litdata.StreamingDataset[i]``), so the samplers of the mp4 path (per-epoch seeded shuffle,
``DistributedWeightedSampler``, multi-view evaluation in order) and exact resume by skipping
consumed batches work unchanged. ``data.root`` is a folder or an ``s3://`` URL; the S3 client
takes its credentials and endpoint from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``); its errors are classified and passing faults
retried by ``avmae.data.object_store``.
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
import torch
import simplejpeg  # libjpeg-turbo, straight to and from numpy arrays

from avmae import augment
from avmae.config import AugmentConfig, Config, DataConfig, VideoConfig
from avmae.augment.transforms import resize_short_side
from avmae.data.audio import AudioDecodeError, NoAudioError, _window, audio_duration, read_audio
from avmae.data.dataset import AVDataset, _is_present
from avmae.data import object_store
from avmae.data.manifests import ClipRecord, Manifest, read_manifest
from avmae.data.video import VideoDecodeError, VideoReader, open_video

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: info holds the audio duration (audio.window: inside)
META_FILE = "meta.json"  # written last: its presence means the folder is complete
RECORDS_FILE = "records.jsonl.gz"  # one line per sample, in global sample-index order
REPORT_FILE = "report.txt"  # missing and undecodable source files, one per line
SAMPLE_RATE = 16000
PCM_SCALE = 32768.0  # audio is stored as 16-bit PCM: sample = round(x * 32768), clipped
DEFAULT_SHARD_SIZE = 64  # clips per shard: one litdata chunk each (about 60 MB at 360p->256, 10 s)
DEFAULT_JPEG_QUALITY = 90
_FRAME_BATCH = 64  # source frames decoded and resized at a time while preparing


def _marker(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.json"


def needed_frame_rate(video_cfg: VideoConfig, augment_cfg: AugmentConfig) -> float:
    """Frames per second a stored clip needs so that no sampled frame is lost: the sampling rate
    divided by the slowest playback speed (evaluation samples at speed 1)."""
    slowest = min(1.0, augment_cfg.speed_range[0]) if augment_cfg.enabled else 1.0
    return video_cfg.frame_rate / slowest


def frame_step(source_fps: float, needed_fps: float) -> int:
    """Keep every ``step``-th source frame: the largest step whose rate still reaches ``needed_fps``."""
    return max(1, int(math.floor(source_fps / needed_fps + 1e-6)))


# ---------------------------------------------------------------------------------------------
# Writing


def encode_frame(frame: np.ndarray, quality: int) -> bytes:
    """One ``(H, W, 3)`` uint8 RGB frame as the shards store it: a JPEG with 4:2:0 chroma."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=quality, colorspace="RGB", colorsubsampling="420")


def decode_frame(data: bytes) -> np.ndarray:
    """A stored frame back to ``(H, W, 3)`` uint8 RGB."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


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
    present = [r for r in manifest.records if _is_present(r)]
    missing = [r for r in manifest.records if not _is_present(r)]
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


# ---------------------------------------------------------------------------------------------
# Reading


def _is_url(root: str) -> bool:
    return "://" in root


def split_location(data_cfg: DataConfig, split: str) -> str:
    """The shard folder or URL of ``split``: ``data.root`` joined with ``data.<split>``."""
    name = getattr(data_cfg, split)
    if _is_url(name) or os.path.isabs(name):
        return name
    return data_cfg.root.rstrip("/") + "/" + name


def _read_small_file(location: str, name: str) -> bytes:
    """A metadata file of a shard folder, local or on an S3-compatible store."""
    if not _is_url(location):
        path = Path(location) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {location} a finished shard folder (tools/prepare_data.py)?")
        return path.read_bytes()
    if not location.startswith("s3://"):
        raise ValueError(f"{location}: shards are read from a folder or an s3:// URL")
    return object_store.get_object_bytes(f"{location.rstrip('/')}/{name}")


class ShardStore:
    """The metadata of one shard folder, and its samples by global index (one litdata
    ``StreamingDataset`` per process, opened on first use so DataLoader workers each open their own)."""

    def __init__(self, location: str, cache_dir: str | None = None):
        self.location = location
        self.cache_dir = cache_dir
        self.meta = json.loads(_read_small_file(location, META_FILE))
        if self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{location}: shard format {self.meta.get('version')}, this reader knows {FORMAT_VERSION}")
        lines = gzip.decompress(_read_small_file(location, RECORDS_FILE)).decode().splitlines()
        self.entries = [json.loads(line) for line in lines]
        self._stream = None
        self._pid = None
        self.retries = object_store.new_counter()  # object-store retries, all workers (train/store_retries)
        self._chunks = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_pid": None}

    def __getitem__(self, index: int) -> dict:
        if not _is_url(self.location):
            return self._open()[index]
        return object_store.call(lambda: self._open()[index], self._chunk_url(index), self.retries)

    def _open(self):
        if self._stream is None or self._pid != os.getpid():
            from litdata import StreamingDataset

            options = {"config": object_store.client_config()} if _is_url(self.location) else {}
            self._stream = StreamingDataset(self.location, cache_dir=self.cache_dir, storage_options=options)
            self._pid = os.getpid()  # len(self._stream) is this rank's share; indexing is global
        return self._stream

    def _chunk_url(self, index: int) -> str:
        """The URL of the chunk holding sample ``index`` (named in errors)."""
        if self._chunks is None:
            chunks = json.loads(_read_small_file(self.location, "index.json"))["chunks"]
            self._chunks = (np.cumsum([c["chunk_size"] for c in chunks]), [c["filename"] for c in chunks])
        ends, names = self._chunks
        return f"{self.location.rstrip('/')}/{names[min(int(np.searchsorted(ends, index, side='right')), len(names) - 1)]}"

    def check(self, data_cfg: DataConfig, augment_cfg: AugmentConfig) -> None:
        """Raise when the config needs more than the shards hold (a larger short side, a higher
        frame rate, another audio rate)."""
        meta, video = self.meta, data_cfg.video
        problems = []
        if video.resize > meta["short_side"]:
            problems.append(f"data.video.resize={video.resize} but frames were stored at short side {meta['short_side']}")
        needed = needed_frame_rate(video, augment_cfg)
        if needed > meta["needed_frame_rate"] + 1e-6:
            problems.append(f"the config samples up to {needed:g} frames/s, the shards keep {meta['needed_frame_rate']:g}")
        if data_cfg.audio.sample_rate != meta["sample_rate"]:
            problems.append(f"data.audio.sample_rate={data_cfg.audio.sample_rate}, the shards hold {meta['sample_rate']} Hz")
        if problems:
            raise ValueError(f"{self.location}: " + "; ".join(problems) + "; prepare the shards with this config")


class ShardVideoReader(VideoReader):
    """The stored frames of one sample, with the source file's frame rate and length, so that
    ``frames_at`` maps times to frames exactly as for the file: a source frame that was not kept
    reads the kept frame before it (at most ``step - 1`` source frames earlier)."""

    def __init__(self, sample: dict, info: dict):
        self.path = Path(f"{info['source']} (shard sample {sample['id']})")
        self.fps, self.num_frames = float(info["fps"]), int(info["num_frames"])
        self._first, self._step, self._stored = info["first"], info["step"], info["stored_frames"]
        self._video = sample["video"]
        self._offsets = sample["offsets"]

    def _read(self, indices: np.ndarray) -> np.ndarray:
        stored = np.clip((indices - self._first) // self._step, 0, self._stored - 1)
        unique, inverse = np.unique(stored, return_inverse=True)
        try:
            frames = [decode_frame(self._video[self._offsets[j] : self._offsets[j + 1]]) for j in unique.tolist()]
        except (OSError, ValueError) as err:
            raise VideoDecodeError(f"{self.path}: a stored frame does not decode: {err}") from err
        return np.stack([frames[i] for i in inverse.tolist()])  # one copy


class ShardDataset(AVDataset):
    """``AVDataset`` over prepared shards; see the module docstring. Its records hold no paths
    (``video`` is None): every media read goes through ``store``."""

    def __init__(self, store: ShardStore, data_cfg: DataConfig, augment_cfg: AugmentConfig, train: bool,
                 transforms=None, seed: int = 0, split: str = ""):  # fmt: skip
        store.check(data_cfg, augment_cfg)
        self.store = store
        records = [
            ClipRecord(id=e["id"], video=None, targets={h: (list(v) if isinstance(v, list) else v) for h, v in e["targets"].items()},
                       start=e["start"], end=e["end"])
            for e in store.entries
        ]  # fmt: skip
        manifest = Manifest(records, store.meta["classes"], store.meta["multi_label"], source=Path(store.location))
        self._last: tuple[int, dict, dict] | None = None
        super().__init__(manifest, data_cfg, augment_cfg, train, transforms, seed, missing_list=None, split=split)

    def _present_records(self, manifest: Manifest, missing_list: Path | None) -> list[ClipRecord]:
        if not manifest.records:
            raise FileNotFoundError(f"{manifest.source}: the shards hold no samples")
        log.info("%s %s: %d samples in shards", manifest.source, self.split, len(manifest.records))
        return manifest.records

    def _sample(self, record_index: int) -> tuple[dict, dict]:
        """The stored sample of a record; ``_load`` asks twice in a row (video, then audio)."""
        if self._last is None or self._last[0] != record_index:
            sample = self.store[record_index]
            if sample["id"] != self.records[record_index].id:
                raise ValueError(f"{self.store.location}: sample {record_index} is {sample['id']}, records say "
                                 f"{self.records[record_index].id}; the folder is inconsistent")  # fmt: skip
            self._last = (record_index, sample, json.loads(sample["info"]))
        return self._last[1], self._last[2]

    def _open_video(self, record_index: int) -> VideoReader:
        return ShardVideoReader(*self._sample(record_index))

    def _read_windows(self, record_index: int, starts: list[float], seconds: float, rate: int) -> list[torch.Tensor]:
        sample, info = self._sample(record_index)
        if not info["has_audio"]:
            raise NoAudioError(f"{info['source']}: the file has no audio stream (shard sample {sample['id']})")
        if len(sample["audio"]) % 2:
            raise AudioDecodeError(f"{info['source']}: the stored audio has an odd byte count (shard sample {sample['id']})")
        track = np.frombuffer(sample["audio"], dtype="<i2").astype(np.float32) / PCM_SCALE
        return [_window(track, SAMPLE_RATE, info["audio_start"], start, seconds, rate) for start in starts]

    def _audio_duration(self, record_index: int) -> float:
        sample, info = self._sample(record_index)
        if not info["has_audio"]:
            raise NoAudioError(f"{info['source']}: the file has no audio stream (shard sample {sample['id']})")
        if not info["audio_duration"] or info["audio_duration"] <= 0:
            raise AudioDecodeError(
                f"{info['source']}: the audio states no duration, so audio.window=inside cannot place the "
                f"window (audio.window=centred does not need it; shard sample {sample['id']})"
            )
        return info["audio_duration"]


def build_shard_dataset(cfg: Config, split: str, train: bool) -> ShardDataset:
    """``build_dataset`` for ``data.format: shards``."""
    store = ShardStore(split_location(cfg.data, split), cfg.data.shard_cache)
    return ShardDataset(
        store,
        cfg.data,
        cfg.augment,
        train=train,
        transforms=augment.build_transforms(cfg, train=True) if train else None,
        seed=cfg.train.seed,
        split=split,
    )
