"""The evaluation video transform and the small pieces it is made of.

Frames arrive as uint8 ``(T, C, H, W)`` (one clip) and leave as uint8 ``(C, T, H, W)``: a clip
crosses to the device at a quarter of the float32 size, and ``normalize_video`` turns it into
the model's float input normalised by ``data.video.mean/std`` there (``avmae.data.device``).
Evaluation: resize the short side to ``video.resize``, crop ``video.size`` squares (centre, or
left/centre/right along the long side for 3-crop testing). The augmentations in
``avmae.augment`` reuse these functions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from einops import rearrange

from avmae.config import VideoConfig


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(T, C, H, W)`` so that min(H, W) == size, keeping the aspect ratio (antialiased)."""
    return TF.resize(frames, [size], antialias=True)


def crop(frames: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """The ``height x width`` window at (top, left) of ``(T, C, H, W)``, same for every frame."""
    return frames[..., top : top + height, left : left + width]


def spatial_crop(frames: torch.Tensor, size: int, position: int = 1) -> torch.Tensor:
    """A ``size x size`` crop of ``(T, C, H, W)`` along the long side: 0 = left (top),
    1 = centre, 2 = right (bottom); centred along the short side."""
    if position not in (0, 1, 2):
        raise ValueError(f"crop position must be 0, 1 or 2, got {position}")
    height, width = frames.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {height}x{width}")
    top, left = (height - size) // 2, (width - size) // 2
    if position != 1:
        if width >= height:
            left = 0 if position == 0 else width - size
        else:
            top = 0 if position == 0 else height - size
    return crop(frames, top, left, size, size)


def normalize_video(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., C, T, H, W)`` -> float32 in units of the per-channel std, on ``video``'s device.

    ``(x / 255 - mean) / std`` of each clip, as one fused expression ``(x - 255 mean) / (255 std)``
    over the batch (equal to it within float32 rounding). A floating-point ``video`` is taken to be
    normalised already and returned as it is (datasets that build model inputs themselves)."""
    if video.is_floating_point():
        return video
    if video.dtype != torch.uint8:
        raise TypeError(f"video must be uint8 frames or a normalised float tensor, got {video.dtype}")
    shape = (-1, 1, 1, 1)
    scale = 255.0 * torch.tensor(std, dtype=torch.float32)
    offset = 255.0 * torch.tensor(mean, dtype=torch.float32)
    return (video.float() - offset.view(shape).to(video.device)) / scale.view(shape).to(video.device)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8, rounded to nearest (uint8 passes through)."""
    if frames.dtype == torch.uint8:
        return frames
    return frames.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def mean_colour(mean: Sequence[float]) -> torch.Tensor:
    """The dataset's mean colour as uint8 ``(C,)``: what 0 in normalised units rounds to."""
    return to_uint8(torch.tensor(mean, dtype=torch.float32))


def eval_video_transform(frames: torch.Tensor, video_cfg: VideoConfig, position: int = 1) -> torch.Tensor:
    """uint8 ``(T, C, H, W)`` -> uint8 ``(C, T, size, size)``: resize the short side to
    ``video.resize``, crop at ``position`` (see ``spatial_crop``); ``normalize_video`` on the
    device makes it the model's input."""
    frames = resize_short_side(frames, video_cfg.resize)
    frames = spatial_crop(frames, video_cfg.size, position)
    return rearrange(frames, "t c h w -> c t h w").contiguous()


def crop_positions(num_crops: int) -> tuple[int, ...]:
    """Crop positions of an ``num_crops``-crop evaluation: (1,) or (0, 1, 2)."""
    if num_crops == 1:
        return (1,)
    if num_crops == 3:
        return (0, 1, 2)
    raise ValueError(f"data.test_crops must be 1 or 3, got {num_crops}")
