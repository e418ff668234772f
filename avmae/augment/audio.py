"""Audio augmentation: waveform gain, noise and circular roll before the fbank; SpecAugment after.

The waveform is mono float32 ``(N,)``; the fbank is the normalised ``(T_a, F)`` image, in which 0
is the dataset mean. SpecAugment masks fill their cells with ``fill_value`` of
``augment.spec_augment_fill``: 0 (the mean), or the normalised value of a raw 0, which is what
masking the raw fbank before normalising gives (CAV-MAE). SpecAugment is written here rather than
taken from ``torchaudio.transforms.FrequencyMasking/TimeMasking``, which draw from the global RNG.
"""

from __future__ import annotations

import torch

from avmae.config import AudioConfig, AugmentConfig

from . import rng


def random_gain(wave: torch.Tensor, generator: torch.Generator, max_db: float) -> torch.Tensor:
    """Scale by a gain drawn uniformly in ``[-max_db, +max_db]`` dB."""
    gain_db = rng.uniform(generator, -max_db, max_db)
    return wave * (10.0 ** (gain_db / 20.0))


def add_noise(wave: torch.Tensor, generator: torch.Generator, max_level: float) -> torch.Tensor:
    """Add white Gaussian noise whose RMS is a uniform fraction in ``[0, max_level]`` of the clip's
    RMS (a silent clip stays silent: there is no level to be relative to)."""
    level = rng.uniform(generator, 0.0, max_level)
    rms = wave.pow(2).mean().sqrt()
    noise = torch.randn(wave.shape, generator=generator, dtype=wave.dtype)
    return wave + noise * (level * rms)


def circular_roll(wave: torch.Tensor, generator: torch.Generator, max_fraction: float) -> torch.Tensor:
    """Roll along time by up to ``max_fraction`` of the length, either way; the end wraps round.

    This moves sounds relative to the frames, so it breaks audio-visual synchrony: use it where the
    objective does not rely on it (e.g. finetuning, as CAV-MAE does).
    """
    limit = int(max_fraction * wave.shape[-1])
    return torch.roll(wave, rng.randint(generator, -limit, limit), dims=-1)


def fill_value(aug: AugmentConfig, audio_cfg: AudioConfig) -> float:
    """The normalised value a SpecAugment mask writes (``augment.spec_augment_fill``)."""
    if aug.spec_augment_fill == "raw_zero":
        return (0.0 - audio_cfg.norm_mean) / audio_cfg.norm_std
    return 0.0


def mask_along_axis(
    spec: torch.Tensor, generator: torch.Generator, axis: int, max_width: int, num_masks: int, value: float = 0.0
) -> torch.Tensor:
    """SpecAugment: ``num_masks`` bands of width uniform in ``[0, max_width]`` set to ``value``, in place.

    ``spec`` is ``(T_a, F)``; ``axis`` 0 masks time frames, 1 masks frequency bins.
    """
    length = spec.shape[axis]
    for _ in range(num_masks):
        width = rng.randint(generator, 0, min(max_width, length))
        start = rng.randint(generator, 0, length - width)
        spec.narrow(axis, start, width).fill_(value)
    return spec


class WaveformAugment:
    """Training waveform transform ``(N,) -> (N,)``; ``aug`` is an effective config."""

    def __init__(self, aug: AugmentConfig):
        self.aug = aug

    def __call__(self, wave: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform (N,), got shape {tuple(wave.shape)}")
        aug = self.aug
        if aug.time_roll > 0:
            wave = circular_roll(wave, generator, aug.time_roll)
        if aug.gain_db > 0:
            wave = random_gain(wave, generator, aug.gain_db)
        if rng.coin(generator, aug.noise) and aug.noise_level > 0:
            wave = add_noise(wave, generator, aug.noise_level)
        return wave


class FbankAugment:
    """Training fbank transform ``(T_a, F) -> (T_a, F)`` (SpecAugment); ``aug`` is effective,
    ``fill`` the value masked cells take (``fill_value``)."""

    def __init__(self, aug: AugmentConfig, fill: float = 0.0):
        self.aug = aug
        self.fill = fill

    def __call__(self, fbank: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if fbank.ndim != 2:
            raise ValueError(f"expected an fbank (T_a, F), got shape {tuple(fbank.shape)}")
        aug = self.aug
        if aug.freq_mask == 0 and aug.time_mask == 0:
            return fbank
        fbank = fbank.clone()
        mask_along_axis(fbank, generator, 1, aug.freq_mask, aug.num_freq_masks, self.fill)
        mask_along_axis(fbank, generator, 0, aug.time_mask, aug.num_time_masks, self.fill)
        return fbank
