"""``generate_dataset``: a whole synthetic dataset on disk (mp4 clips, manifests, class list,
deliberately bad clips), rendered in parallel processes. docs/data.md.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avmae.data.synthetic.clips import DEFAULT_NUISANCE, ClassSpec, class_specs, render_clip
from avmae.data.synthetic.media import write_av_file

SPLITS = ("train", "val", "test")
BAD_KINDS = ("video_only", "silent", "short", "truncated", "missing")
SHORT_SECONDS = 0.4  # shorter than any clip window the configs sample


@dataclass(frozen=True)
class _ClipJob:
    index: int
    clip_id: str
    label: int
    split: str
    kind: str  # "ok" or one of BAD_KINDS
    spec: ClassSpec
    seed: int
    duration: float
    fps: float
    size: int
    sample_rate: int
    nuisance: float
    hue_sets_pitch: bool


def split_by_class(
    labels: np.ndarray, rng: np.random.Generator, fractions: tuple[float, float] = (0.15, 0.15)
) -> list[str]:
    """About 70/15/15 train/val/test inside every class (val and test get at least one clip of a
    class with three or more)."""
    splits = ["train"] * len(labels)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members)
        n_val = max(int(round(fractions[0] * n)), 1 if n >= 3 else 0)
        n_test = max(int(round(fractions[1] * n)), 1 if n >= 3 else 0)
        for i in members[:n_val]:
            splits[i] = "val"
        for i in members[n_val : n_val + n_test]:
            splits[i] = "test"
    return splits


def _choose_bad(splits: list[str], num_bad: int, rng: np.random.Generator) -> dict[int, str]:
    """Clip index -> bad kind. Kinds cycle through ``BAD_KINDS``; the first round goes to the
    training split, later ones cycle through the splits, so every loader meets every kind."""
    free = {name: list(rng.permutation([i for i, s in enumerate(splits) if s == name])) for name in SPLITS}
    chosen: dict[int, str] = {}
    for n in range(num_bad):
        kind = BAD_KINDS[n % len(BAD_KINDS)]
        preferred = "train" if n < len(BAD_KINDS) else SPLITS[(n // len(BAD_KINDS)) % len(SPLITS)]
        for name in (preferred, *SPLITS):
            if free[name]:
                chosen[int(free[name].pop())] = kind
                break
    return chosen


def _make_clip_file(job: _ClipJob, out_dir: Path) -> dict[str, Any]:
    """Render and write one clip (or, for ``missing``, nothing); returns its metadata row."""
    rng = np.random.default_rng([job.seed, job.index])
    duration = SHORT_SECONDS if job.kind == "short" else job.duration
    clip = render_clip(
        job.spec, rng, duration, job.fps, job.size, job.sample_rate, job.nuisance, job.hue_sets_pitch
    )
    relative = f"clips/{job.clip_id}.mp4"
    path = out_dir / relative
    if job.kind != "missing":
        audio = None if job.kind == "video_only" else clip.audio
        if job.kind == "silent":
            audio = np.zeros_like(clip.audio)
        write_av_file(path, clip.frames, job.fps, audio, job.sample_rate)
        if job.kind == "truncated":
            # Cut inside the media data: the index (moov), written last, is gone, so no
            # decoder can open the file, though it starts as a valid mp4.
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    return {
        "id": job.clip_id,
        "video": relative,
        "label": job.label,
        "split": job.split,
        "kind": job.kind,
        "duration": duration,
        **clip.meta,
    }


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean server process that imported this module once: forking the
    caller could inherit locks held by its threads (torch's, say), and spawning would pay the
    package's imports once per worker."""
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:  # no forkserver on this platform
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload([__name__])
    return context


def _run_job(args: tuple[_ClipJob, Path]) -> dict[str, Any]:
    return _make_clip_file(*args)


def generate_dataset(
    out_dir: str | Path,
    num_clips: int,
    num_classes: int,
    seed: int,
    duration: float = 4.0,
    fps: float = 25.0,
    size: int = 64,
    sample_rate: int = 16000,
    bad_fraction: float = 0.0,
    workers: int | None = None,
    nuisance: float = DEFAULT_NUISANCE,
    overwrite: bool = False,
    hue_sets_pitch: bool = False,
) -> dict[str, Any]:
    """Write a synthetic audiovisual dataset to ``out_dir``.

    Layout: ``clips/<id>.mp4``; ``train.csv``, ``val.csv``, ``test.csv`` (``id,video,label``, video
    relative to ``out_dir``, label the class index); ``classes.txt`` (line ``k`` names class
    ``k``); ``bad_clips.csv`` (``id,video,kind``); ``metadata.jsonl`` (one JSON object per clip:
    split, kind, event instants and the drawn nuisances).

    Labels are balanced and split about 70/15/15 inside every class. ``round(bad_fraction *
    num_clips)`` of the listed clips, but at least one of each kind when ``bad_fraction > 0``,
    are bad: ``video_only`` (no audio stream), ``silent`` (an all-zero audio stream), ``short``
    (0.4 s), ``truncated`` (bytes cut, undecodable) and ``missing`` (listed, never written).

    ``hue_sets_pitch``: each clip's pitch follows its background's hue (``render_clip``), a
    per-clip audio-visual link that retrieval can learn; off, the two are drawn independently.

    Every clip draws from its own generator seeded by ``(seed, index)``, so the content does not
    depend on ``workers``; the same arguments give byte-identical files.

    Returns a summary: counts per split, class and bad kind, and the seconds taken.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    if duration <= SHORT_SECONDS:
        raise ValueError(f"duration must exceed the {SHORT_SECONDS} s of a short clip, got {duration}")
    specs = class_specs(num_classes)
    if (out_dir / "train.csv").exists() or (out_dir / "clips").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already holds a dataset; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(out_dir / "clips", ignore_errors=True)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)

    # Dataset-level draws use a stream apart from the per-clip ones, seeded (seed, index).
    rng = np.random.default_rng([seed, 2**31 - 1])
    labels = rng.permutation(np.arange(num_clips) % num_classes)
    splits = split_by_class(labels, rng)
    num_bad = 0 if bad_fraction == 0 else max(int(round(bad_fraction * num_clips)), len(BAD_KINDS))
    if num_bad > num_clips:
        raise ValueError(f"{num_clips} clips cannot hold one of each of the {len(BAD_KINDS)} bad kinds")
    bad = _choose_bad(splits, num_bad, rng)

    width = max(5, len(str(num_clips - 1)))
    jobs = [
        _ClipJob(
            i, f"clip_{i:0{width}d}", int(labels[i]), splits[i], bad.get(i, "ok"), specs[labels[i]],
            seed, duration, fps, size, sample_rate, nuisance, hue_sets_pitch,
        )
        for i in range(num_clips)
    ]
    workers = min(workers or os.cpu_count() or 1, num_clips)
    if workers <= 1:
        rows = [_make_clip_file(job, out_dir) for job in jobs]
    else:
        with _worker_context().Pool(workers) as pool:
            chunksize = max(1, num_clips // (8 * workers))
            rows = pool.map(_run_job, [(job, out_dir) for job in jobs], chunksize=chunksize)

    _write_outputs(out_dir, rows, specs)
    return _summary(out_dir, rows, specs, time.perf_counter() - started, workers)


def _write_outputs(out_dir: Path, rows: list[dict[str, Any]], specs: list[ClassSpec]) -> None:
    for split in SPLITS:
        with open(out_dir / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "video", "label"])
            writer.writerows([r["id"], r["video"], r["label"]] for r in rows if r["split"] == split)
    with open(out_dir / "bad_clips.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "video", "kind"])
        writer.writerows([r["id"], r["video"], r["kind"]] for r in rows if r["kind"] != "ok")
    (out_dir / "classes.txt").write_text("".join(f"{spec.name}\n" for spec in specs))
    with open(out_dir / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _summary(
    out_dir: Path, rows: list[dict[str, Any]], specs: list[ClassSpec], seconds: float, workers: int
) -> dict[str, Any]:
    return {
        "out_dir": str(out_dir),
        "num_clips": len(rows),
        "classes": [spec.name for spec in specs],
        "splits": {split: sum(r["split"] == split for r in rows) for split in SPLITS},
        "per_class": {
            spec.name: {split: sum(r["label"] == k and r["split"] == split for r in rows) for split in SPLITS}
            for k, spec in enumerate(specs)
        },
        "bad": {kind: sum(r["kind"] == kind for r in rows) for kind in BAD_KINDS},
        "workers": workers,
        "seconds": round(seconds, 2),
    }
