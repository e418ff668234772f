"""The strength rule: one number, ``augment.strength``, that scales every augmentation.

``apply_strength(aug)`` returns the configuration actually applied, with the strength folded in
(and set to 1): 0 is no augmentation at all, 1 the configured values, 2 twice every probability
and magnitude. The rule per kind of field is in docs/augmentations.md, "The strength rule".
"""

from __future__ import annotations

import dataclasses
import math

from avmae.config import AugmentConfig

# Natural bounds that scaling must not cross.
_MIN_CROP_AREA = 0.02
_MAX_CUTOUT_AREA = 0.9
_MAX_HUE = 0.5

_PROBABILITIES = ("crop", "color_jitter", "grayscale", "blur", "downup", "frame_rate_reduction",
                  "tube_cutout", "frame_shuffle", "noise")
_COIN_FLIPS = ("hflip", "time_reversal")


def _scale_range(values: tuple[float, float], s: float, low: float, high: float) -> tuple[float, float]:
    return (min(max(values[0] * s, low), high), min(max(values[1] * s, low), high))


def _towards_one(value: float, s: float) -> float:
    return 1.0 + (value - 1.0) * s


def _widen_log(values: tuple[float, float], s: float) -> tuple[float, float]:
    return (values[0] ** s, values[1] ** s)


def apply_strength(aug: AugmentConfig) -> AugmentConfig:
    """The effective augmentation config for ``aug.strength`` (returned with strength 1)."""
    s = aug.strength
    changes: dict = {name: min(1.0, getattr(aug, name) * s) for name in _PROBABILITIES}
    changes.update({name: min(0.5, getattr(aug, name) * s) for name in _COIN_FLIPS})
    lo, hi = aug.crop_scale
    changes.update(
        strength=1.0,
        speed_range=_widen_log(aug.speed_range, s),
        crop_scale=(max(_MIN_CROP_AREA, min(1.0, _towards_one(lo, s))),
                    max(_MIN_CROP_AREA, min(1.0, _towards_one(hi, s)))),
        crop_ratio=_widen_log(aug.crop_ratio, s),
        # hue is a quarter of the magnitude and cannot exceed half a turn
        color_jitter_magnitude=min(aug.color_jitter_magnitude * s, 4 * _MAX_HUE),
        blur_sigma=_scale_range(aug.blur_sigma, s, 0.0, math.inf),
        downup_factor=_towards_one(aug.downup_factor, s),
        frame_rate_factor=max(1, round(_towards_one(aug.frame_rate_factor, s))),
        cutout_scale=_scale_range(aug.cutout_scale, s, 0.0, _MAX_CUTOUT_AREA),
        gain_db=aug.gain_db * s,
        noise_level=aug.noise_level * s,
        time_roll=min(1.0, aug.time_roll * s),
        freq_mask=round(aug.freq_mask * s),
        time_mask=round(aug.time_mask * s),
        mixup=aug.mixup * s,
    )
    return dataclasses.replace(aug, **changes)
