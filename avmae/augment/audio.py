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


def draw_bands(generator: torch.Generator, length: int, max_width: int, num_masks: int) -> list[tuple[int, int]]:
    """SpecAugment's ``num_masks`` bands ``(start, width)`` along an axis of ``length``, each of
    width uniform in ``[0, max_width]`` (clipped to ``length``)."""
    bands = []
    for _ in range(num_masks):
        width = rng.randint(generator, 0, min(max_width, length))
        bands.append((rng.randint(generator, 0, length - width), width))
    return bands


def mask_bands(specs: torch.Tensor, bands: torch.Tensor, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Set the bands of a batch of fbanks ``(B, T_a, F)`` to ``fill`` (a number, or one per fbank
    ``(B,)``), in place: ``bands (B, M, 3)`` holds rows ``(axis, start, width)`` (axis 0 = time
    frames, 1 = frequency bins; width 0 = no band).

    Batched for the device (``avmae.data.device``); the per-clip ``FbankAugment`` calls it with B = 1.
    """
    if bands.shape[1] == 0:
        return specs
    bands = bands.to(specs.device)
    axis, start, end = bands[..., 0:1], bands[..., 1:2], bands[..., 1:2] + bands[..., 2:3]  # (B, M, 1)
    frames = torch.arange(specs.shape[1], device=specs.device)
    bins = torch.arange(specs.shape[2], device=specs.device)
    in_time = ((axis == 0) & (frames >= start) & (frames < end)).any(1)  # (B, T_a)
    in_freq = ((axis == 1) & (bins >= start) & (bins < end)).any(1)  # (B, F)
    masked = in_time[:, :, None] | in_freq[:, None, :]
    if isinstance(fill, torch.Tensor):
        return specs.copy_(torch.where(masked, fill.to(specs)[:, None, None], specs))
    return specs.masked_fill_(masked, fill)


def mask_along_axis(
    spec: torch.Tensor, generator: torch.Generator, axis: int, max_width: int, num_masks: int, value: float = 0.0
) -> torch.Tensor:
    """SpecAugment: ``num_masks`` bands of width uniform in ``[0, max_width]`` set to ``value``, in place.

    ``spec`` is ``(T_a, F)``; ``axis`` 0 masks time frames, 1 masks frequency bins.
    """
    bands = [(axis, *band) for band in draw_bands(generator, spec.shape[axis], max_width, num_masks)]
    mask_bands(spec[None], torch.tensor(bands, dtype=torch.long).view(1, -1, 3), value)
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
    ``fill`` the value masked cells take (``fill_value``).

    ``draw`` gives the bands as a tensor, so that DataLoader workers can draw them and the device
    zero them for a whole batch (``mask_bands``); ``__call__`` does both for one clip."""

    def __init__(self, aug: AugmentConfig, fill: float = 0.0):
        self.aug = aug
        self.fill = fill

    @property
    def active(self) -> bool:
        return self.aug.freq_mask > 0 or self.aug.time_mask > 0

    def draw(self, generator: torch.Generator, frames: int, bins: int) -> torch.Tensor:
        """``(M, 3)`` rows ``(axis, start, width)`` of an fbank of ``frames x bins``: the frequency
        bands, then the time bands (none when SpecAugment is off)."""
        aug = self.aug
        if not self.active:
            return torch.zeros(0, 3, dtype=torch.long)
        bands = [(1, *b) for b in draw_bands(generator, bins, aug.freq_mask, aug.num_freq_masks)]
        bands += [(0, *b) for b in draw_bands(generator, frames, aug.time_mask, aug.num_time_masks)]
        return torch.tensor(bands, dtype=torch.long).view(-1, 3)

    def __call__(self, fbank: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if fbank.ndim != 2:
            raise ValueError(f"expected an fbank (T_a, F), got shape {tuple(fbank.shape)}")
        if not self.active:
            return fbank
        return mask_bands(fbank.clone()[None], self.draw(generator, *fbank.shape)[None], self.fill)[0]
