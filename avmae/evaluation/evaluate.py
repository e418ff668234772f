"""Multi-view evaluation: predict, gather from all processes, drop padded duplicates, average views.

An evaluation dataset yields ``test_clips x test_crops`` items per record, each carrying the
record's ``index`` and its ``view`` number. A distributed sampler pads the last batches with
repeated items so that every process sees the same number; after gathering, rows are keyed by
``(index, view)``, repeats are dropped, and the remaining views of each record are averaged:
their probabilities (softmax for single-label tasks, sigmoid for multi-label ones), or their
logits before one softmax / sigmoid (``finetune.eval_aggregate``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from avmae.config import VideoConfig, modality_set
from avmae.data.device import normalize_inputs

from .metrics import classification_metrics


def aggregate_views(
    index: torch.Tensor,
    view: torch.Tensor,
    scores: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
) -> dict:
    """Drop repeated ``(index, view)`` rows, then average the views of each record.

    Args:
        index: ``(N,)`` record index of each row.
        view: ``(N,)`` view number of each row.
        scores: head -> ``(N, K)`` per-view probabilities.
        targets: head -> ``(N,)`` class indices or ``(N, K)`` multi-hot; equal across a record's views.

    Returns:
        dict with ``index`` ``(M,)`` sorted unique records, ``scores`` head -> ``(M, K)`` view
        averages, ``targets`` head -> ``(M,)`` or ``(M, K)``, ``views`` ``(M,)`` views per record
        and ``duplicates`` (rows dropped).
    """
    index, view = index.long(), view.long()
    if index.shape != view.shape or index.ndim != 1:
        raise ValueError(f"index and view must be (N,) of one shape, got {tuple(index.shape)}, {tuple(view.shape)}")
    rows = torch.arange(index.numel())
    key = index * (int(view.max()) + 1) + view
    unique_keys, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((unique_keys.numel(),), index.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # first row of each (index, view)

    records, per_row = torch.unique(index[first], return_inverse=True)
    views = torch.zeros(records.numel(), dtype=torch.long).index_add_(0, per_row, torch.ones_like(per_row))
    averaged = {}
    for head, s in scores.items():
        summed = torch.zeros(records.numel(), s.shape[1], dtype=torch.float64)
        summed.index_add_(0, per_row, s[first].double())
        averaged[head] = (summed / views[:, None]).float()
    record_first = torch.full((records.numel(),), index.numel(), dtype=torch.long)
    record_first = record_first.scatter_reduce(0, per_row, first, reduce="amin")
    return {
        "index": records,
        "scores": averaged,
        "targets": {head: t[record_first] for head, t in targets.items()},
        "views": views,
        "duplicates": index.numel() - first.numel(),
    }


def model_inputs(
    batch: dict, modalities: str, dtype: torch.dtype | None = None, video_cfg: VideoConfig | None = None
) -> dict[str, torch.Tensor]:
    """The keyword inputs of a classifier for ``audio``, ``video`` or ``audiovisual``: uint8 video
    normalised by ``video_cfg`` (``data.video``) where it lies (``avmae.data.device``), then cast
    to ``dtype`` when given (DeepSpeed's bf16/fp16 weights)."""
    inputs = {name: batch[name] for name in modality_set(modalities)}
    if "video" in inputs and not inputs["video"].is_floating_point():
        if video_cfg is None:
            raise ValueError("uint8 video needs data.video (its mean and std) to become a model input")
        inputs = normalize_inputs(inputs, video_cfg)
    return inputs if dtype is None else {name: x.to(dtype) for name, x in inputs.items()}


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """float32 sigmoid (multi-label) or softmax (single-label) of ``(N, K)`` logits."""
    return logits.float().sigmoid() if multi_label else logits.float().softmax(dim=-1)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable,
    accelerator,
    modalities: str,
    multi_label: bool,
    dtype: torch.dtype | None = None,
    video_cfg: VideoConfig | None = None,
    aggregate: str = "probs",
) -> dict:
    """Per-view probabilities (``aggregate="logits"``: float32 logits) of every item, gathered from
    all processes (padding included).

    ``loader`` must be prepared by ``accelerator`` (or be a per-process shard). Returns, on every
    process, CPU tensors: ``index`` ``(N,)``, ``view`` ``(N,)``, ``scores`` head -> ``(N, K)``
    and ``targets`` head -> ``(N,)`` / ``(N, K)``, where N counts padded repeats.
    """
    model.eval()
    chunks: dict[str, list] = {"index": [], "view": [], "scores": [], "targets": []}
    for batch in loader:
        logits = model(**model_inputs(batch, modalities, dtype, video_cfg))
        if aggregate == "logits":
            scores = {h: l.float() for h, l in logits.items()}
        else:
            scores = {h: probabilities(l, multi_label) for h, l in logits.items()}
        # Batches may differ in size across processes at the tail: pad, gather, then cut.
        local = {"index": batch["index"], "view": batch["view"], "scores": scores, "targets": batch["targets"]}
        sizes = accelerator.gather(torch.tensor([batch["index"].shape[0]], device=accelerator.device)).tolist()
        padded = accelerator.pad_across_processes(local, dim=0)
        gathered = accelerator.gather(padded)
        width = max(sizes)
        keep = torch.cat([torch.arange(r * width, r * width + n) for r, n in enumerate(sizes)])
        for name in chunks:
            chunks[name].append(_select(gathered[name], keep))
    if not chunks["index"]:
        raise ValueError("the evaluation loader yielded no batch")
    return {
        "index": torch.cat(chunks["index"]),
        "view": torch.cat(chunks["view"]),
        "scores": {h: torch.cat([c[h] for c in chunks["scores"]]) for h in chunks["scores"][0]},
        "targets": {h: torch.cat([c[h] for c in chunks["targets"]]) for h in chunks["targets"][0]},
    }


def _select(value, keep: torch.Tensor):
    if isinstance(value, dict):
        return {k: _select(v, keep) for k, v in value.items()}
    return value.cpu()[keep]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    accelerator,
    modalities: str,
    multi_label: bool,
    num_records: int | None = None,
    dtype: torch.dtype | None = None,
    video_cfg: VideoConfig | None = None,
    aggregate: str = "probs",
) -> tuple[dict, dict]:
    """Multi-view metrics of ``model`` on ``loader``.

    Args:
        aggregate: ``finetune.eval_aggregate``: average the views' probabilities (``"probs"``), or
            their logits and then take the probabilities of the mean (``"logits"``).
        dtype: the inputs' dtype, when it is not the loader's (DeepSpeed's bf16/fp16 weights).
        video_cfg: ``data.video``, whose mean and std normalise uint8 video on the device.
        num_records: records of the dataset. A clip that cannot be decoded is replaced by another
            record's clip, whose repeat is dropped here, so the bad record gets no prediction:
            the shortfall is reported, never filled in.

    Returns:
        ``(metrics, aggregated)``: metrics per head (see ``classification_metrics``) plus
        ``records_scored``, ``records_unscored``, ``records_with_fewer_views``,
        ``views_per_record`` and ``duplicates_dropped``; and the output of ``aggregate_views``
        (its ``scores`` probabilities either way).
    """
    if aggregate not in ("probs", "logits"):
        raise ValueError(f"aggregate must be probs or logits, got {aggregate!r}")
    raw = predict(model, loader, accelerator, modalities, multi_label, dtype, video_cfg, aggregate)
    agg = aggregate_views(raw["index"], raw["view"], raw["scores"], raw["targets"])
    if aggregate == "logits":
        agg["scores"] = {h: probabilities(s, multi_label) for h, s in agg["scores"].items()}
    views = agg["views"]
    metrics = classification_metrics(agg["scores"], agg["targets"], multi_label)
    metrics["records_scored"] = int(agg["index"].numel())
    if num_records is not None:
        metrics["records_unscored"] = num_records - int(agg["index"].numel())
    metrics["views_per_record"] = int(views.max())
    metrics["records_with_fewer_views"] = int((views < views.max()).sum())
    metrics["duplicates_dropped"] = int(agg["duplicates"])
    return metrics, agg


def summary(metrics: dict) -> dict[str, float]:
    """The headline numbers of ``metrics`` as ``"head/metric" -> value`` (no per-class lists)."""
    flat = {}
    for head, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            if isinstance(value, float):
                flat[f"{head}/{name}"] = value
    return flat


def format_table(metrics: dict, title: str = "evaluation") -> str:
    """A readable table of the headline numbers: one row per head, one column per metric."""
    heads = [h for h, v in metrics.items() if isinstance(v, dict)]
    columns: list[str] = []
    for h in heads:
        columns += [c for c, v in metrics[h].items() if isinstance(v, float) and c not in columns]
    width = max([len(h) for h in heads] + [4])
    lines = [title, f"{'head':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
    for h in heads:
        cells = [metrics[h].get(c) for c in columns]
        lines.append(f"{h:<{width}}  " + "  ".join(f"{c:8.2f}" if c is not None else f"{'-':>8}" for c in cells))
    extras = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    lines.append("  ".join(f"{k}={v}" for k, v in extras.items()))
    for h in heads:
        excluded = metrics[h].get("excluded_classes")
        if excluded:
            lines.append(f"{h}: {len(excluded)} classes without a positive excluded from mAP")
    return "\n".join(lines)


def write_results(out_dir: str | Path, metrics: dict, class_names: dict[str, list[str]] | None = None) -> Path:
    """Write ``metrics.json`` (headline numbers and excluded classes) and, for multi-label heads,
    ``per_class_ap_<head>.csv`` (``index,name,ap``; empty AP for excluded classes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compact = {}
    for head, values in metrics.items():
        if isinstance(values, dict) and "per_class_ap" in values:
            names = (class_names or {}).get(head) or [str(i) for i in range(len(values["per_class_ap"]))]
            with open(out_dir / f"per_class_ap_{head}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["index", "name", "ap"])
                for i, ap in enumerate(values["per_class_ap"]):
                    writer.writerow([i, names[i], "" if math.isnan(ap) else f"{ap:.6f}"])
            values = {k: v for k, v in values.items() if k != "per_class_ap"}
        compact[head] = values
    path = out_dir / "metrics.json"
    with open(path, "w") as f:
        json.dump(compact, f, indent=2, allow_nan=True)
    return path
