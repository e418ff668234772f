"""Batches on the device: uint8 frames cross, the device normalises them.

Datasets deliver video as uint8 ``(B, C, T, H, W)`` (a quarter of the float32 bytes); loaders pin
their batches (``data.pin_memory``) and the copy to the device is ``non_blocking``, so it overlaps
the previous step's work (the training loop's ``avmae.engine.loop.batch_to_device``).
``normalize_inputs`` is the one place where frames become the model's float input
``(x / 255 - mean) / std``: every caller of a model that takes video uses it (pretraining,
finetuning, evaluation, probing, visualisation, the benchmarks).
"""

from __future__ import annotations

from typing import Any

from avmae.augment.transforms import normalize_video
from avmae.config import VideoConfig

VIDEO_KEYS = ("video", "video2")


def normalize_inputs(inputs: dict[str, Any], video_cfg: VideoConfig) -> dict[str, Any]:
    """``inputs`` with each uint8 video (``video``, ``video2``) normalised by ``video_cfg.mean/std``
    on its own device; float videos (already normalised) and other entries unchanged."""
    return {
        key: normalize_video(value, video_cfg.mean, video_cfg.std) if key in VIDEO_KEYS and value is not None else value
        for key, value in inputs.items()
    }

