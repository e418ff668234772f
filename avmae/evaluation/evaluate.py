"""Multi-view evaluation: predict, gather from all processes, drop padded duplicates, average views.

An evaluation dataset yields ``test_clips x test_crops`` items per record, each carrying the
record's ``index`` and its ``view`` number. A distributed sampler pads the last batches with
repeated items so that every process sees the same number; after gathering, rows are keyed by
``(index, view)``, repeats are dropped, and the remaining views of each record are averaged
(softmax for single-label tasks, sigmoid for multi-label ones).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from avmae.config import modality_set

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


def model_inputs(batch: dict, modalities: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The keyword inputs of a classifier for ``audio``, ``video`` or ``audiovisual`` (cast to
    ``dtype`` when given: DeepSpeed's bf16/fp16 weights)."""
    return {name: batch[name] if dtype is None else batch[name].to(dtype) for name in modality_set(modalities)}


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, accelerator, modalities: str, multi_label: bool, dtype: torch.dtype | None = None
) -> dict:
    """Per-view probabilities of every item, gathered from all processes (padding included).

    ``loader`` must be prepared by ``accelerator`` (or be a per-process shard). Returns, on every
    process, CPU tensors: ``index`` ``(N,)``, ``view`` ``(N,)``, ``scores`` head -> ``(N, K)``
    and ``targets`` head -> ``(N,)`` / ``(N, K)``, where N counts padded repeats.
    """
    model.eval()
    chunks: dict[str, list] = {"index": [], "view": [], "scores": [], "targets": []}
    for batch in loader:
        logits = model(**model_inputs(batch, modalities, dtype))
        probs = {h: (l.float().sigmoid() if multi_label else l.float().softmax(dim=-1)) for h, l in logits.items()}
        # Batches may differ in size across processes at the tail: pad, gather, then cut.
        local = {"index": batch["index"], "view": batch["view"], "scores": probs, "targets": batch["targets"]}
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
) -> tuple[dict, dict]:
    """Multi-view metrics of ``model`` on ``loader``.

    Args:
        dtype: the inputs' dtype, when it is not the loader's (DeepSpeed's bf16/fp16 weights).
        num_records: records of the dataset. A clip that cannot be decoded is replaced by another
            record's clip, whose repeat is dropped here, so the bad record gets no prediction:
            the shortfall is reported, never filled in.

    Returns:
        ``(metrics, aggregated)``: metrics per head (see ``classification_metrics``) plus
        ``records_scored``, ``records_unscored``, ``records_with_fewer_views``,
        ``views_per_record`` and ``duplicates_dropped``; and the output of ``aggregate_views``.
    """
    raw = predict(model, loader, accelerator, modalities, multi_label, dtype)
    agg = aggregate_views(raw["index"], raw["view"], raw["scores"], raw["targets"])
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
