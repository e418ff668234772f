"""Augmentations: per-clip video and audio transforms for the DataLoader workers, batch mixup.

``build_transforms(cfg, train)`` gives the three callables the dataset applies to one decoded
clip (see docs/augmentations.md for where they run and why); ``mix_batch`` mixes a finetuning
batch on the device. All randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from avmae.config import AugmentConfig, Config, VideoConfig
from avmae.augment.transforms import eval_video_transform

from . import rng
from .audio import FbankAugment, WaveformAugment, fill_value
from .mixup import mix_batch, mixup_alpha
from .strength import apply_strength
from .video import VideoAugment

__all__ = [
    "AVTransforms", "build_transforms", "apply_strength", "sample_speed", "mix_batch", "mixup_alpha",
    "VideoAugment", "WaveformAugment", "FbankAugment",
]


def identity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The evaluation audio transform."""
    return x


def _eval_video(frames: torch.Tensor, generator: torch.Generator, video_cfg: VideoConfig) -> torch.Tensor:
    return eval_video_transform(frames, video_cfg)


@dataclass(frozen=True)
class AVTransforms:
    """The per-clip transforms, each ``f(x, generator)``:

    - ``video``: uint8 ``(T, C, H, W)`` -> uint8 ``(C, T, size, size)`` (normalised on the device);
    - ``waveform``: float32 ``(N,)`` -> ``(N,)``, before the fbank;
    - ``fbank``: normalised float32 ``(T_a, F)`` -> ``(T_a, F)``.

    Picklable (no closures), so DataLoader workers can receive them under any start method.
    """

    video: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    waveform: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    fbank: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def build_transforms(cfg: Config, train: bool) -> AVTransforms:
    """Training transforms from ``cfg.augment`` (strength applied), or the evaluation transform and
    identities when ``train`` is False or ``augment.enabled`` is false."""
    if not (train and cfg.augment.enabled):
        return AVTransforms(partial(_eval_video, video_cfg=cfg.data.video), identity, identity)
    aug = apply_strength(cfg.augment)
    fbank = FbankAugment(aug, fill_value(aug, cfg.data.audio))
    return AVTransforms(VideoAugment(aug, cfg.data.video), WaveformAugment(aug), fbank)


def sample_speed(aug: AugmentConfig, generator: torch.Generator) -> float:
    """Playback-speed factor for the frame stride, log-uniform in the strength-scaled
    ``speed_range`` (1.0 when augmentation is disabled or the range is (1, 1))."""
    if not aug.enabled:
        return 1.0
    low, high = apply_strength(aug).speed_range
    return rng.log_uniform(generator, low, high)
