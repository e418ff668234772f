"""Audio-visual retrieval of an encoder on raw videos: each decodable clip's per-modality
embeddings (``avmae.inference.embed``) ranked by ``avmae.evaluation.retrieval`` (CAV-MAE's
protocol), optionally on the clips of a CAV-MAE JSON subset; ``tools/eval.py --task retrieval``.
"""

from __future__ import annotations

import json
from pathlib import Path

from avmae.config import load_config
from avmae.data import AVDataset, ClipRecord
from avmae.evaluation.retrieval import format_retrieval, retrieval_metrics
from avmae.inference.embed import Embedder, eval_data_config, load
from avmae.inference.extract import embed_dataset



def read_subset(path: str | Path) -> set[str]:
    """The clip ids of a CAV-MAE JSON data file (``{"data": [{"video_id": ...}, ...]}``), such as
    its 5-clips-per-class retrieval subsets."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {str(entry["video_id"]) for entry in data["data"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a CAV-MAE data file ({{\"data\": [{{\"video_id\": ...}}]}}): {err}") from err


def _stem(record: ClipRecord) -> str | None:
    return record.video.stem if record.video is not None else None


def run_retrieval(
    embedder: Embedder,
    dataset: AVDataset,
    subset: set[str] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    block: int = 1024,
    progress: bool = False,
) -> dict:
    """Audio->video and video->audio retrieval over the decodable records of ``dataset`` (those
    whose id is in ``subset``, when given): ``avmae.evaluation.retrieval.retrieval_metrics`` of
    the per-modality embeddings, plus ``bad`` (undecodable clips, left out) and ``subset_missing``
    (subset ids with no record)."""
    if set(embedder.modalities) != {"audio", "video"}:
        raise ValueError(f"retrieval needs an encoder of both modalities, got {embedder.modalities}")
    indices = None
    if subset is not None:
        # a CAV-MAE video_id is the record id (VGGSound, CAV-MAE JSON) or the video file's stem
        # (AudioSet's YTID, whose record id adds the segment start)
        indices = [i for i, r in enumerate(dataset.records) if r.id in subset or _stem(r) in subset]
        if not indices:
            raise ValueError(f"none of the {len(subset)} subset ids is a record of the dataset")
    emb = embed_dataset(
        embedder, dataset, indices, batch_size=batch_size, num_workers=num_workers, outputs=("video", "audio"), progress=progress
    )
    device = embedder.device
    metrics = retrieval_metrics({m: emb[m].to(device) for m in ("audio", "video")}, block)
    metrics["bad"] = [b["id"] for b in emb["bad"]]
    if subset is not None:
        metrics["subset_missing"] = len(subset - {r.id for r in dataset.records} - {_stem(r) for r in dataset.records})
    return metrics


def evaluate_retrieval(
    export_dir: str | Path,
    split: str = "test",
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    subset: str | Path | None = None,
    views: int | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    num_workers: int | None = None,
) -> dict:
    """``run_retrieval`` of an export on ``split`` of a dataset: the data section of ``config``
    (default: the export's own) with ``overrides``, the export's preprocessing, ``views`` clips
    per file (default ``data.test_clips x data.test_crops``), restricted to the ids of a CAV-MAE
    JSON ``subset``. Writes ``retrieval.json`` to ``out_dir`` (default
    ``export_dir/retrieval_<split>``), prints the table, returns the metrics."""
    embedder = load(export_dir, device)
    if config is not None or overrides:
        # the data section of ``config``, or the export's own, overridden
        data = load_config(config, overrides, base=None if config is not None else embedder.cfg).data
        embedder = embedder.with_data(data)
    embedder = embedder.with_data(eval_data_config(embedder.cfg.data, views))
    workers = embedder.cfg.data.num_workers if num_workers is None else num_workers
    dataset = embedder.split_dataset(split)
    metrics = run_retrieval(
        embedder, dataset, read_subset(subset) if subset else None, embedder.cfg.data.batch_size, workers, progress=True
    )
    metrics.update(split=split, views=embedder.views, subset=str(subset) if subset else None)
    out_dir = Path(out_dir) if out_dir else Path(export_dir) / f"retrieval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval.json").write_text(json.dumps(metrics, indent=2))
    print(format_retrieval(metrics, f"{split}: audio-visual retrieval, {embedder.views} views"))
    if metrics["bad"]:
        print(f"{len(metrics['bad'])} clips could not be decoded and were left out (listed in {out_dir / 'retrieval.json'})")
    return metrics
