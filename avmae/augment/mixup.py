"""Mixup for finetuning: the batch mixup on the device, across both modalities at once, and
CAV-MAE's per-clip waveform mixup that the training dataset runs.

Video and audio share the pairing (and, unless ``per_modality``, the ``lam``), so a mixed clip is
one coherent audio-visual blend. docs/augmentations.md, "Mixup", gives the semantics, the label
smoothing rule and the sources.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from timm.data.mixup import mixup_target

from avmae.config import AugmentConfig, Config

from .strength import apply_strength


def mixup_alpha(cfg: Config) -> float:
    """The Beta parameter of the finetuning loop's batch mixup: ``augment.mixup`` scaled by the
    strength rule; 0 when augmentation is disabled or the dataset mixes (``mixup_domain: waveform``)."""
    return _alpha(cfg.augment, "inputs")


def waveform_mixup_alpha(aug: AugmentConfig) -> float:
    """The Beta parameter of the training dataset's per-clip mixup (0: none)."""
    return _alpha(aug, "waveform")


def _alpha(aug: AugmentConfig, domain: str) -> float:
    if not aug.enabled or aug.mixup_domain != domain:
        return 0.0
    return apply_strength(aug).mixup


def mix_waveforms(wave: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * wave + (1 - lam) * partner`` of ``(N,)`` waveforms, as CAV-MAE's ``_wav2fbank``:
    each with its mean removed, ``partner`` zero-padded or cut to ``wave``'s length, and the
    mixture's mean removed."""
    wave, partner = wave - wave.mean(), partner - partner.mean()
    if partner.numel() < wave.numel():
        partner = torch.nn.functional.pad(partner, (0, wave.numel() - partner.numel()))
    mixed = lam * wave + (1.0 - lam) * partner[: wave.numel()]
    return mixed - mixed.mean()


def draw_lambda(alpha: float, generator: torch.Generator) -> float:
    """``lam ~ Beta(alpha, alpha)`` drawn from ``generator`` (1.0 when ``alpha`` is 0).

    torch's Beta sampler takes no generator, so the draw seeds a NumPy generator from it.
    """
    if alpha <= 0:
        return 1.0
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def soft_targets(
    targets: dict[str, torch.Tensor], num_classes: dict[str, int], lam: float, smoothing: float
) -> dict[str, torch.Tensor]:
    """Mixed, smoothed targets ``{head: (B, K)}`` from ``{head: long (B,)}`` class indices or
    ``{head: float (B, K)}`` multi-hot vectors (smoothing ``y (1 - s) + s / K`` for both)."""
    mixed = {}
    for head, target in targets.items():
        if head not in num_classes:
            raise KeyError(f"no class count for head {head!r}; got {sorted(num_classes)}")
        multi_label = target.is_floating_point()
        if multi_label and (target.ndim != 2 or target.shape[1] != num_classes[head]):
            raise ValueError(f"head {head!r}: multi-hot targets must be (B, {num_classes[head]}), "
                             f"got {tuple(target.shape)}")
        if multi_label:
            # by hand: timm's multi-label rule smooths towards 1/2 (docs/augmentations.md, "Mixup")
            smoothed = target.float() * (1.0 - smoothing) + smoothing / num_classes[head]
            mixed[head] = smoothed * lam + smoothed.flip(0) * (1.0 - lam)
        else:
            mixed[head] = mixup_target(target, num_classes[head], lam, smoothing)
    return mixed


def mix_batch(
    video: Optional[torch.Tensor],
    audio: Optional[torch.Tensor],
    targets: dict[str, torch.Tensor],
    num_classes: dict[str, int],
    alpha: float,
    smoothing: float = 0.0,
    generator: Optional[torch.Generator] = None,
    per_modality: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], dict]:
    """Mix a batch: ``video (B, C, T, H, W)``, ``audio (B, 1, T_a, F)`` (either may be None) and
    their targets with one ``lam`` and one pairing; returns ``(video, audio, {head: (B, K)})``.

    ``alpha`` 0 leaves the inputs untouched and still returns smoothed soft targets, so a
    finetuning loop has one path. ``per_modality`` (with both inputs given): one ``lam`` per
    modality, targets ``{head: {"video": (B, K), "audio": (B, K)}}``. ``generator`` defaults to a fresh unseeded one only for
    interactive use; training passes a seeded generator so resume reproduces the draws.
    """
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    sizes = {x.shape[0] for x in (video, audio, *targets.values()) if x is not None}
    if len(sizes) > 1:
        raise ValueError(f"mix_batch: inputs disagree on the batch size: {sorted(sizes)}")
    if per_modality and video is not None and audio is not None:
        lams = {"video": draw_lambda(alpha, generator), "audio": draw_lambda(alpha, generator)}
        video = torch.lerp(video.flip(0), video, lams["video"]) if lams["video"] < 1.0 else video
        audio = torch.lerp(audio.flip(0), audio, lams["audio"]) if lams["audio"] < 1.0 else audio
        soft = {m: soft_targets(targets, num_classes, lam, smoothing) for m, lam in lams.items()}
        return video, audio, {head: {m: soft[m][head] for m in soft} for head in targets}
    lam = draw_lambda(alpha, generator)
    if lam < 1.0:
        # lerp(partner, x, lam) = lam * x + (1 - lam) * partner
        video = None if video is None else torch.lerp(video.flip(0), video, lam)
        audio = None if audio is None else torch.lerp(audio.flip(0), audio, lam)
    return video, audio, soft_targets(targets, num_classes, lam, smoothing)
