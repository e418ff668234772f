"""``prepare_shards`` (``tools/prepare_data.py``): every clip of a split decoded once and written as
litdata chunks that ``avmae.data.shards`` reads, to a folder or an ``s3://`` URL, by one machine
or several. An offline tool, apart from the training path. Layout and the multi-machine scheme
(each machine a fixed set of shards, a marker per finished shard, one merge) in docs/data.md.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg  # libjpeg-turbo, straight to and from numpy arrays
import torch

from avmae.augment.transforms import resize_short_side
from avmae.config import Config, DataConfig
from avmae.data.audio import AudioDecodeError, NoAudioError, audio_duration, read_audio
from avmae.data.manifests import ClipRecord, is_present, read_manifest
from avmae.data.shards import FORMAT_VERSION, META_FILE, PCM_SCALE, RECORDS_FILE, SAMPLE_RATE, needed_frame_rate
from avmae.data.storage import Location
from avmae.data.video import VideoDecodeError, open_video

log = logging.getLogger(__name__)

REPORT_FILE = "report.txt"  # missing and undecodable source files, one per line
SETTINGS_FILE = "settings.json"  # what every machine and rerun writing the folder must share
DEFAULT_SHARD_SIZE = 64  # clips per shard: one litdata chunk each (about 60 MB at 360p->256, 10 s)
DEFAULT_JPEG_QUALITY = 90
_FRAME_BATCH = 64  # source frames decoded and resized at a time while preparing


def _marker(shard: int) -> str:
    return f"shard-{shard:05d}.json"


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


@contextlib.contextmanager
def _one_process():
    """litdata's writer takes its rank and world size from variables a cluster launcher may set
    (``WORLD_SIZE``, ``GLOBAL_RANK``, ...); here every writer is one process on its own."""
    names = ("WORLD_SIZE", "GLOBAL_RANK", "NNODES", "DATA_OPTIMIZER_GLOBAL_RANK", "DATA_OPTIMIZER_NUM_WORKERS",
             "DATA_OPTIMIZER_NUM_NODES")  # fmt: skip
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _write_shard(job: tuple) -> dict:
    """Encode shard ``shard`` (its records), store its chunk, then its marker (written last: a
    shard is finished when its marker exists); returns the marker."""
    location, shard, records, shard_size, data_cfg, needed_fps, pad, quality = job
    from litdata.streaming.writer import BinaryWriter

    staging = location.staging(f"shard-{shard}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the processes give the parallelism
    entries, bad, missing, index = [], [], [], None
    try:
        with _one_process():
            # one chunk per shard, numbered by the shard; the chunk size is a setting litdata checks
            # to be equal in every index
            writer = BinaryWriter(str(staging), chunk_size=shard_size + 1, chunk_index=shard)
            for record in records:
                if not is_present(record):
                    missing.append({"id": record.id, "path": str(record.video)})
                    continue
                try:
                    sample = encode_record(record, data_cfg, needed_fps, pad, quality)
                except (VideoDecodeError, AudioDecodeError) as err:
                    bad.append({"id": record.id, "path": str(record.video), "error": str(err)})
                    continue
                writer.add_item(len(entries), sample)
                entries.append(_record_entry(record, json.loads(sample["info"])))
            if entries:
                writer.done()
        if entries:
            (index_file,) = staging.glob("*.index.json")
            index = json.loads(index_file.read_text())
            for chunk in index["chunks"]:
                location.put(chunk["filename"], staging / chunk["filename"])
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    marker = {"shard": shard, "index": index, "records": entries, "bad": bad, "missing": missing}
    location.write(_marker(shard), json.dumps(marker).encode())
    return marker


def _records_digest(records: list[ClipRecord]) -> str:
    """What fixes the shard plan and the records file: ids, segments and targets in order (not
    the paths, which may differ between machines)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.start, r.end, r.targets], sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _plan(cfg: Config, split: str, shard_size: int, quality: int):
    """The manifest of ``split``, its shards (consecutive runs of ``shard_size`` records, missing
    files included, so that every machine derives the same shards from the manifest alone) and
    the settings every machine and rerun must share."""
    manifest = read_manifest(cfg.data, split)
    shards = [manifest.records[i : i + shard_size] for i in range(0, len(manifest.records), shard_size)]
    slowest = min(1.0, cfg.augment.speed_range[0])
    fastest = max(1.0, cfg.augment.speed_range[1])
    settings = {"version": FORMAT_VERSION, "split": split, "short_side": cfg.data.video.resize,
                "frame_rate": cfg.data.video.frame_rate, "speed_range": [slowest, fastest],
                "needed_frame_rate": needed_frame_rate(cfg.data.video, cfg.augment), "jpeg_quality": quality,
                "sample_rate": SAMPLE_RATE, "shard_size": shard_size, "num_records": len(manifest.records),
                "num_shards": len(shards), "records_sha256": _records_digest(manifest.records)}  # fmt: skip
    return manifest, shards, settings


def _check_same_settings(location: Location, settings: dict) -> None:
    """A rerun (or another machine) writing with other settings would mix two kinds of shard."""
    try:
        old = json.loads(location.read(SETTINGS_FILE))
    except FileNotFoundError:
        location.write(SETTINGS_FILE, (json.dumps(settings, indent=2) + "\n").encode())
        return
    if old != settings:
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        raise FileExistsError(f"{location}: shards of other settings are there ({changed}); choose another folder")


def _finished(location: Location) -> set[int]:
    """The shards whose marker exists."""
    return {int(n[len("shard-") : -len(".json")]) for n in location.names("shard-") if n.endswith(".json")}


def _read_markers(location: Location, shards: list[int]) -> list[dict]:
    with ThreadPoolExecutor(16) as pool:  # an object store answers many small reads at once
        return list(pool.map(lambda s: json.loads(location.read(_marker(s))), shards))


def _report(markers: list[dict]) -> str:
    """The report lines of these shards: missing files, then undecodable ones, in shard order."""
    lines = [f"missing\t{m['id']}\t{m['path']}\n" for marker in markers for m in marker["missing"]]
    lines += [f"undecodable\t{b['id']}\t{b['path']}\t{b['error']}\n" for marker in markers for b in marker["bad"]]
    return "".join(lines)


def _counts(markers: list[dict]) -> dict:
    return {"num_samples": sum(len(m["records"]) for m in markers),
            "num_missing": sum(len(m["missing"]) for m in markers),
            "num_undecodable": sum(len(m["bad"]) for m in markers)}  # fmt: skip


def part_report_file(num_machines: int, machine_rank: int) -> str:
    return f"report-part-{machine_rank}-of-{num_machines}.txt"


def prepare_part(
    cfg: Config,
    split: str,
    out: str | Path,
    num_machines: int = 1,
    machine_rank: int = 0,
    num_workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    quality: int = DEFAULT_JPEG_QUALITY,
    progress: bool = True,
) -> dict:
    """Write this machine's shards of ``split`` to ``out`` (a folder or an ``s3://`` URL).

    Machine ``machine_rank`` of ``num_machines`` takes shards ``machine_rank``,
    ``machine_rank + num_machines``, ... Shards whose marker exists are kept, so a rerun resumes
    (with any machine count). With more than one machine, the part's missing and undecodable
    files are listed in ``report-part-<rank>-of-<n>.txt``. Returns the part's counts.
    """
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine rank {machine_rank} is not in [0, {num_machines})")
    from tqdm import tqdm

    location = Location(out)
    manifest, shards, settings = _plan(cfg, split, shard_size, quality)
    _check_same_settings(location, settings)
    needed_fps = settings["needed_frame_rate"]
    # a whole audio window: audio.window=inside may shift a window to start up to one window before its clip
    pad = cfg.data.video.num_frames * settings["speed_range"][1] / cfg.data.video.frame_rate + cfg.data.audio.seconds
    mine = list(range(machine_rank, len(shards), num_machines))
    finished = _finished(location)
    todo = [s for s in mine if s not in finished]
    if todo:  # the folder changes: it is complete again once merged
        location.delete(META_FILE)
    jobs = [(location, s, shards[s], shard_size, cfg.data, needed_fps, pad, quality) for s in todo]
    part_records = sum(len(shards[s]) for s in mine)
    bar = tqdm(total=part_records, initial=part_records - sum(len(shards[s]) for s in todo), unit="clip",
               disable=not progress, desc=f"prepare {split} {machine_rank + 1}/{num_machines}", smoothing=0.1)  # fmt: skip
    markers = {}
    workers = max(1, min(num_workers, len(jobs)))
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for marker in pool.map(_write_shard, jobs) if pool else map(_write_shard, jobs):
            markers[marker["shard"]] = marker
            bar.update(len(shards[marker["shard"]]))
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    _check_same_settings(location, settings)  # again: machines starting together both find none
    earlier = [s for s in mine if s not in markers]
    markers.update(zip(earlier, _read_markers(location, earlier)))
    part = [markers[s] for s in mine]
    if num_machines > 1:
        location.write(part_report_file(num_machines, machine_rank), _report(part).encode())
    summary = {"machine_rank": machine_rank, "num_machines": num_machines, "num_shards": len(mine),
               "num_written_now": len(todo), "num_records": part_records, **_counts(part)}  # fmt: skip
    log.info("%s %s part %d/%d: %s", manifest.source, split, machine_rank + 1, num_machines, summary)
    return summary


def unfinished_shards(out: str | Path) -> list[int]:
    """The shards of the folder ``out`` without a marker yet."""
    location = Location(out)
    num_shards = json.loads(location.read(SETTINGS_FILE))["num_shards"]
    return sorted(set(range(num_shards)) - _finished(location))


def merge_shards(cfg: Config, split: str, out: str | Path) -> dict:
    """Join the finished shards of every machine into one dataset: one litdata index over all
    chunks in shard order, the records file, the merged report, then ``meta.json``. Any machine
    may run it once every shard is finished (the last machine to finish does); it rewrites the
    same files when run again. Returns ``meta.json``'s content."""
    from litdata.streaming.writer import BinaryWriter

    location = Location(out)
    settings = json.loads(location.read(SETTINGS_FILE))
    manifest = read_manifest(cfg.data, split)
    if _records_digest(manifest.records) != settings["records_sha256"]:
        raise ValueError(f"{location}: prepared from another manifest than {manifest.source} ({split})")
    unfinished = unfinished_shards(out)
    if unfinished:
        raise FileNotFoundError(f"{location}: {len(unfinished)} of {settings['num_shards']} shards are not finished "
                           f"(shards {unfinished[:10]}{' ...' if len(unfinished) > 10 else ''}); "
                           "run every machine's part to its end first")  # fmt: skip
    markers = _read_markers(location, list(range(settings["num_shards"])))
    written = [m for m in markers if m["index"]]
    order = []
    if written:
        with tempfile.TemporaryDirectory() as tmp, _one_process():
            for marker in written:  # litdata's merge joins "<n>.index.json" files in natural order
                Path(tmp, f"{marker['shard']}.index.json").write_text(json.dumps(marker["index"]))
            BinaryWriter(tmp, chunk_size=settings["shard_size"] + 1).merge(num_workers=len(written))
            index = Path(tmp, "index.json").read_bytes()
        order = [c["filename"] for c in json.loads(index)["chunks"]]
        expected = [c["filename"] for m in written for c in m["index"]["chunks"]]
        if order != expected:
            raise RuntimeError(f"{location}: the merged index lists chunks {order[:4]}..., the markers {expected[:4]}...")
        location.write("index.json", index)
    else:
        location.delete("index.json")  # no chunk: an earlier index would point at none
    entries = [e for m in markers for e in m["records"]]
    location.write(RECORDS_FILE, gzip.compress("".join(json.dumps(e) + "\n" for e in entries).encode(), mtime=0))
    location.write(REPORT_FILE, _report(markers).encode())
    meta = settings | {"source": str(manifest.source), "classes": manifest.classes, "multi_label": manifest.multi_label,
                       **_counts(markers)}  # fmt: skip
    location.write(META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    location.clear_staging()
    if meta["num_missing"] or meta["num_undecodable"]:
        log.warning("%s %s: skipped %d missing and %d undecodable files; list in %s", manifest.source, split,
                    meta["num_missing"], meta["num_undecodable"], location.path(REPORT_FILE))  # fmt: skip
    return meta


def prepare_shards(
    cfg: Config,
    split: str,
    out: str | Path,
    num_workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    quality: int = DEFAULT_JPEG_QUALITY,
    progress: bool = True,
    num_machines: int = 1,
    machine_rank: int = 0,
) -> dict | None:
    """``prepare_part``, then ``merge_shards`` when every shard is finished (this machine was the
    last). Returns ``meta.json``'s content, or None while other machines' shards are unfinished."""
    prepare_part(cfg, split, out, num_machines, machine_rank, num_workers, shard_size, quality, progress)
    if unfinished_shards(out):
        log.info("%s: this machine's part is done; the last machine to finish merges", out)
        return None
    return merge_shards(cfg, split, out)
