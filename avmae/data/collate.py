"""Batching of training items that carry several clips of one video (``data.clips_per_video``).

An ``AVDataset`` training item with ``clips_per_video = K > 1`` holds ``K`` clips decoded from
one open file: ``video (K, C, T, H, W)`` and ``audio (K, 1, T_a, F)`` (and ``video2``/``audio2``
with two views), next to one set of per-record fields and ``clips = K``. ``collate_clips``
flattens them into a batch of ``B x K`` clips, as the model expects:

| key | after ``collate_clips`` |
|---|---|
| ``video``, ``video2`` | ``(B*K, C, T, H, W)``, the ``K`` clips of item 0 first |
| ``audio``, ``audio2`` | ``(B*K, 1, T_a, F)`` |
| ``targets``, ``index``, ``view``, ``no_audio``, ``id`` | repeated per clip: ``B*K`` entries |
| ``failures`` | ``(B,)``: bad files are counted once per item, not once per clip |

Items without ``clips`` (one clip each, evaluation items, any other dataset) get torch's
``default_collate`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch.utils.data import default_collate

from avmae.data.device import DRAW_KEYS

# Tensors with a leading clip dimension in a multi-clip item (with ``data.device_transforms``,
# also each clip's draws for the device, ``avmae.data.device.DRAW_KEYS``).
CLIP_KEYS = ("video", "audio", "video2", "audio2", *(key + suffix for key in DRAW_KEYS for suffix in ("", "2")))
# Per-item counts that must not be multiplied by the number of clips when summed.
ITEM_KEYS = ("failures",)


def collate_clips(items: list[Any]) -> Any:
    """``default_collate``, then the clips of multi-clip items flattened into the batch dimension.

    Args:
        items: dataset items; dicts with ``clips`` must all have the same ``clips``.

    Returns:
        The batch; for multi-clip items, per-clip tensors ``(B*K, ...)`` and per-record fields
        repeated ``K`` times (see the module docstring).
    """
    batch = default_collate(items)
    if not isinstance(batch, dict) or "clips" not in batch:
        return batch
    counts = batch.pop("clips")
    clips = int(counts[0])
    if not torch.all(counts == clips):
        raise ValueError(f"items with different numbers of clips in one batch: {counts.tolist()}")
    for key, value in batch.items():
        if key in CLIP_KEYS:
            batch[key] = rearrange(value, "b k ... -> (b k) ...")
        elif key not in ITEM_KEYS:
            batch[key] = _repeat_per_clip(value, clips)
    return batch


def _repeat_per_clip(value: Any, clips: int) -> Any:
    """Each of the ``B`` entries of a collated field repeated ``clips`` times in place."""
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(clips, dim=0)
    if isinstance(value, dict):
        return {key: _repeat_per_clip(v, clips) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [entry for entry in value for _ in range(clips)]
    raise TypeError(f"cannot repeat a collated {type(value).__name__} per clip")
