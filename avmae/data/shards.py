"""Prepared shards, read as the mp4s are: ``ShardDataset`` is an ``AVDataset`` whose media reads
come from litdata chunks (a folder or an ``s3://`` URL) written by ``avmae.data.shard_writer``;
clip sampling, fbank, augmentations and the bad-clip policy are AVDataset's own, and items are
fetched by global index so samplers and exact resume work unchanged. S3 errors are classified and passing faults retried by
``avmae.data.object_store``. docs/data.md.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import numpy as np
import simplejpeg  # libjpeg-turbo, straight to and from numpy arrays
import torch

from avmae.config import AugmentConfig, DataConfig, VideoConfig
from avmae.data.audio import AudioDecodeError, NoAudioError, cut_window
from avmae.data import object_store
from avmae.data.dataset import AVDataset
from avmae.data.manifests import ClipRecord, Manifest
from avmae.data.storage import Location, is_url
from avmae.data.video import VideoDecodeError, VideoReader

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: info holds the audio duration (audio.window: inside)
META_FILE = "meta.json"  # written last: its presence means the folder is complete
RECORDS_FILE = "records.jsonl.gz"  # one line per sample, in global sample-index order
SAMPLE_RATE = 16000
PCM_SCALE = 32768.0  # audio is stored as 16-bit PCM: sample = round(x * 32768), clipped


def needed_frame_rate(video_cfg: VideoConfig, augment_cfg: AugmentConfig) -> float:
    """Frames per second a stored clip needs so that no sampled frame is lost: the sampling rate
    divided by the slowest playback speed (evaluation samples at speed 1)."""
    slowest = min(1.0, augment_cfg.speed_range[0]) if augment_cfg.enabled else 1.0
    return video_cfg.frame_rate / slowest


# ---------------------------------------------------------------------------------------------
# Stored frames


def decode_frame(data: bytes) -> np.ndarray:
    """A stored frame back to ``(H, W, 3)`` uint8 RGB."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


# ---------------------------------------------------------------------------------------------
# Reading


def split_location(data_cfg: DataConfig, split: str) -> str:
    """The shard folder or URL of ``split``: ``data.root`` joined with ``data.<split>``."""
    name = getattr(data_cfg, split)
    if is_url(name) or os.path.isabs(name):
        return name
    return data_cfg.root.rstrip("/") + "/" + name


def _read_small_file(location: str, name: str) -> bytes:
    """A metadata file of a shard folder, local or on an S3-compatible store."""
    try:
        return Location(location).read(name)
    except FileNotFoundError as err:
        if is_url(location):  # the store's own message names the URL
            raise
        raise FileNotFoundError(f"{err}; is {location} a finished shard folder (tools/prepare_data.py)?") from err


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
        if not is_url(self.location):
            return self._open()[index]
        return object_store.call(lambda: self._open()[index], lambda: self._chunk_url(index), self.retries)

    def _open(self):
        if self._stream is None or self._pid != os.getpid():
            from litdata import StreamingDataset

            options = {"config": object_store.client_config()} if is_url(self.location) else {}
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

    def _present_records(
        self, manifest: Manifest, missing_list: Path | None
    ) -> tuple[list[ClipRecord], list[ClipRecord]]:
        if not manifest.records:
            raise FileNotFoundError(f"{manifest.source}: the shards hold no samples")
        log.info("%s %s: %d samples in shards", manifest.source, self.split, len(manifest.records))
        return manifest.records, []  # preparation kept only the records it could write

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
        return [cut_window(track, SAMPLE_RATE, info["audio_start"], start, seconds, rate) for start in starts]

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
