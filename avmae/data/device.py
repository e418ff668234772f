"""Batches on the device: uint8 frames cross, the device normalises them, and with
``data.device_transforms`` it also runs the training transforms that follow the crop.

Datasets deliver video as uint8 ``(B, C, T, H, W)`` (a quarter of the float32 bytes); loaders pin
their batches (``data.pin_memory``) and the copy to the device is ``non_blocking``, so it overlaps
the previous step's work (the training loop's ``avmae.engine.loop.batch_to_device``).
``normalize_inputs`` is the one place where frames become the model's float input
``(x / 255 - mean) / std``: every caller of a model that takes video uses it (pretraining,
finetuning, evaluation, probing, visualisation, the benchmarks).

Device transforms (docs/data.md, "Transforms on the device"). A training item's worker draws
every random parameter from the item's generator, in the order the worker path draws them
(``avmae.data.dataset``), and applies only the crop: ``draw_for_device`` gives the cropped uint8
clip, the waveform after its (cheap, elementwise) augmentation, and the draws
(``DRAW_KEYS``). ``apply_device_transforms`` then runs, on the batch's device, the rest with the
same functions the workers use: ``avmae.augment.video.finish_clip`` per clip (flip, colour,
grayscale, blur, down-up, frame order, cutout), the Kaldi fbank of the whole batch
(``kaldi_fbank_batch``), its normalisation and SpecAugment's bands (``mask_bands``). The draws
being the item's, a resumed run sees the same clips as with worker transforms.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from avmae.augment import AVTransforms
from avmae.augment.audio import FbankAugment, mask_bands
from avmae.augment.transforms import normalize_video
from avmae.augment.video import SpatialParams, VideoAugment, finish_clip, pack_params, unpack_params
from avmae.config import DataConfig, VideoConfig
from avmae.data.audio import kaldi_fbank_batch, normalize_fbank

VIDEO_KEYS = ("video", "video2")
# Per clip, next to the cropped ``video`` and the waveform ``audio``: the post-crop video draws
# (float64 ``(P, 16)``, P = 1 or T with ``augment.per_frame``), the frame order ``(T,)``, the real
# samples of the waveform (shorter files are zero-padded to the window), SpecAugment's bands
# ``(M, 3)`` and the value they are set to. With two views the second view's keys end in "2".
DRAW_KEYS = ("video_params", "video_order", "audio_samples", "audio_bands", "audio_fill")


def use_device_transforms(data_cfg: DataConfig) -> bool:
    """``data.device_transforms``, where ``None`` means: on where a GPU is present."""
    return torch.cuda.is_available() if data_cfg.device_transforms is None else data_cfg.device_transforms


def draw_for_device(
    transforms: AVTransforms, frames: torch.Tensor, wave: torch.Tensor, generator: torch.Generator, data_cfg: DataConfig
) -> dict[str, torch.Tensor]:
    """What a worker does for one training clip under ``data.device_transforms``: all of the
    clip's draws (as ``transforms`` would make them, in the same order), the crop of the uint8
    frames ``(T, C, H, W)`` and the waveform augmentation of ``wave (N,)``."""
    if isinstance(transforms.video, VideoAugment):
        cropped, params, order = transforms.video.crop(frames, generator)
    else:  # augmentation off: the evaluation crop, nothing after it
        cropped = rearrange(transforms.video(frames, generator), "c t h w -> t c h w")
        params, order = [SpatialParams()], torch.arange(frames.shape[0])
    wave = transforms.waveform(wave, generator)
    audio_cfg = data_cfg.audio
    length = int(round(audio_cfg.seconds * audio_cfg.sample_rate))
    if wave.numel() > length:
        raise ValueError(f"a waveform of {wave.numel()} samples is longer than the audio window ({length})")
    if isinstance(transforms.fbank, FbankAugment):
        bands = transforms.fbank.draw(generator, audio_cfg.target_length, audio_cfg.num_mel_bins)
        fill = transforms.fbank.fill
    else:
        bands, fill = torch.zeros(0, 3, dtype=torch.long), 0.0
    return {
        "video": rearrange(cropped, "t c h w -> c t h w").contiguous(),
        "video_params": torch.stack([pack_params(p) for p in params]),
        "video_order": order,
        "audio": torch.nn.functional.pad(wave.float(), (0, length - wave.numel())),
        "audio_samples": torch.tensor(wave.numel()),
        "audio_bands": bands,
        "audio_fill": torch.tensor(fill),
    }


def apply_device_transforms(batch: dict[str, Any], data_cfg: DataConfig) -> dict[str, Any]:
    """A collated batch of ``draw_for_device`` items -> the worker path's batch: uint8 video
    ``(B, C, T, size, size)`` and normalised fbank ``(B, 1, T_a, F)``, computed on the batch's
    device; the draw keys removed. Other batches are returned as they are."""
    if "audio_samples" not in batch:
        return batch
    batch = dict(batch)
    for suffix in ("", "2"):
        if "audio_samples" + suffix not in batch:
            continue
        params, order = batch.pop("video_params" + suffix), batch.pop("video_order" + suffix)
        raw = batch["video" + suffix]
        rows = params.tolist()  # one transfer: the per-clip ops take Python numbers
        batch["video" + suffix] = torch.stack([
            finish_clip(rearrange(raw[b], "c t h w -> t c h w"), [unpack_params(r) for r in rows[b]], order[b], data_cfg.video)
            for b in range(raw.shape[0])
        ])  # fmt: skip
        samples, bands, fill = (batch.pop(f"audio_{key}{suffix}") for key in ("samples", "bands", "fill"))
        specs = normalize_fbank(kaldi_fbank_batch(batch["audio" + suffix], samples, data_cfg.audio), data_cfg.audio)
        batch["audio" + suffix] = mask_bands(specs, bands, fill)[:, None]
    return batch


def normalize_inputs(inputs: dict[str, Any], video_cfg: VideoConfig) -> dict[str, Any]:
    """``inputs`` with each uint8 video (``video``, ``video2``) normalised by ``video_cfg.mean/std``
    on its own device; float videos (already normalised) and other entries unchanged."""
    return {
        key: normalize_video(value, video_cfg.mean, video_cfg.std) if key in VIDEO_KEYS and value is not None else value
        for key, value in inputs.items()
    }


def device_inputs(batch: dict[str, Any], data_cfg: DataConfig) -> dict[str, Any]:
    """A training batch on its device as the model takes it: the device transforms (when the
    items carry draws), then ``normalize_inputs``."""
    return normalize_inputs(apply_device_transforms(batch, data_cfg), data_cfg.video)
