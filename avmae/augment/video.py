"""Video augmentation: lossy spatiotemporal transforms (arXiv 2110.07082) and their controls.

A clip is uint8 ``(T, C, H, W)``. The coherency-keeping transforms draw ONE set of parameters per
clip and apply it to every frame, so the clip stays a plausible video (objects move smoothly,
colours stay put); with ``per_frame`` the same transforms draw their parameters per frame, which
breaks temporal coherency on purpose (the paper's control). Frame shuffle and time reversal are
the other controls. Order: crop first (later ops touch fewer pixels), flip, colour, grayscale,
blur, down-up sampling, temporal reindexing, back to uint8, tube cutout (the mean colour).
The clip leaves as uint8 ``(C, T, H, W)``; the device normalises it (``normalize_video``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from avmae.config import AugmentConfig, VideoConfig
from avmae.augment.transforms import mean_colour, resize_short_side, spatial_crop, to_uint8

from . import rng

Box = tuple[int, int, int, int]  # top, left, height, width

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(frames: torch.Tensor, hue: float) -> torch.Tensor:
    """Turn the hue of float ``(T, 3, H, W)`` in [0, 1] by ``hue`` turns (in [-0.5, 0.5]).

    A rotation of the chroma plane of YIQ, which keeps luma and greys: one 3x3 matrix per pixel,
    about 9x faster on CPU than torchvision's ``adjust_hue`` (an HSV round trip), which dominated
    the cost of the whole video augmentation.
    """
    cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]])
    matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ
    return torch.einsum("dc,tchw->tdhw", matrix.to(frames), frames).clamp_(0.0, 1.0)


_JITTER_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": rotate_hue,
}
# Aspect-ratio range of the cutout box (as timm's RandomErasing).
_CUTOUT_RATIO = (0.3, 1.0 / 0.3)


@dataclass(frozen=True)
class SpatialParams:
    """One draw of the spatial transforms; identity values mean "not applied"."""

    crop_box: Optional[Box] = None  # in input pixels; None = the evaluation crop
    flip: bool = False
    jitter: tuple[tuple[str, float], ...] = ()  # (op, factor) in the order they are applied
    grayscale: bool = False
    blur_sigma: float = 0.0
    downup_factor: float = 1.0
    cutout_box: Optional[Box] = None  # in output pixels


def random_resized_crop_box(
    generator: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Box:
    """torchvision's RandomResizedCrop box (area fraction ``scale``, aspect ``ratio`` drawn
    log-uniformly, 10 tries, then the largest centred box of a clamped ratio), drawn from
    ``generator`` instead of the global RNG."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(generator, *scale)
        aspect = rng.log_uniform(generator, *ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(generator, 0, height - h), rng.randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def cutout_box(generator: torch.Generator, size: int, scale: tuple[float, float]) -> Box:
    """A box of area fraction ``scale`` of a ``size x size`` image, clipped to the image."""
    target_area = size * size * rng.uniform(generator, *scale)
    aspect = rng.log_uniform(generator, *_CUTOUT_RATIO)
    h = min(size, max(1, round(math.sqrt(target_area / aspect))))
    w = min(size, max(1, round(math.sqrt(target_area * aspect))))
    return rng.randint(generator, 0, size - h), rng.randint(generator, 0, size - w), h, w


def draw_spatial_params(
    generator: torch.Generator, aug: AugmentConfig, height: int, width: int, size: int
) -> SpatialParams:
    """Draw every spatial transform for frames of ``height x width`` cropped to ``size``.

    ``aug`` is an effective config (``apply_strength`` already applied). Each transform always
    consumes its coin; its parameters are drawn only when the coin fires, so the draws of later
    transforms depend on the earlier coins (deterministically, given the generator's seed).
    """
    crop = None
    if rng.coin(generator, aug.crop):
        crop = random_resized_crop_box(generator, height, width, aug.crop_scale, aug.crop_ratio)
    flip = rng.coin(generator, aug.hflip)
    jitter: tuple[tuple[str, float], ...] = ()
    if rng.coin(generator, aug.color_jitter):
        m = aug.color_jitter_magnitude
        factors = {name: rng.uniform(generator, max(0.0, 1.0 - m), 1.0 + m)
                   for name in ("brightness", "contrast", "saturation")}
        factors["hue"] = rng.uniform(generator, -m / 4, m / 4)
        order = torch.randperm(len(_JITTER_OPS), generator=generator).tolist()
        names = list(_JITTER_OPS)
        jitter = tuple((names[i], factors[names[i]]) for i in order)
    grayscale = rng.coin(generator, aug.grayscale)
    blur_sigma = rng.uniform(generator, *aug.blur_sigma) if rng.coin(generator, aug.blur) else 0.0
    downup = rng.uniform(generator, 1.0, aug.downup_factor) if rng.coin(generator, aug.downup) else 1.0
    cutout = cutout_box(generator, size, aug.cutout_scale) if rng.coin(generator, aug.tube_cutout) else None
    return SpatialParams(crop, flip, jitter, grayscale, blur_sigma, downup, cutout)


def _gaussian_blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    # Kernel of +-3 sigma, no larger than reflection padding allows on this image.
    limit = 2 * min(frames.shape[-2:]) - 1
    kernel = min(2 * math.ceil(3 * sigma) + 1, limit if limit % 2 else limit - 1)
    return TF.gaussian_blur(frames, [kernel, kernel], [sigma, sigma])


def _down_up(frames: torch.Tensor, factor: float) -> torch.Tensor:
    """Lose detail as a low-resolution camera would: shrink by ``factor`` and blow back up."""
    height, width = frames.shape[-2:]
    small = [max(1, round(height / factor)), max(1, round(width / factor))]
    frames = TF.resize(frames, small, antialias=True)
    return TF.resize(frames, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=False)


def crop_to_size(frames: torch.Tensor, params: SpatialParams, video_cfg: VideoConfig) -> torch.Tensor:
    """The crop stage, the only op on the full-resolution frames: uint8 ``(T, C, H, W)`` ->
    uint8 ``(T, C, size, size)`` (the random resized crop, or the evaluation crop)."""
    size = video_cfg.size
    if params.crop_box is None:
        return spatial_crop(resize_short_side(frames, video_cfg.resize), size)
    return TF.resized_crop(frames, *params.crop_box, size=[size, size], antialias=True)


def after_crop(frames: torch.Tensor, params: SpatialParams) -> torch.Tensor:
    """Flip, colour, grayscale, blur and down-up sampling of cropped ``(T, C, size, size)`` uint8,
    on whatever device the frames are. The result stays uint8 when none of the float ops
    applies, else it is float in [0, 1], where torchvision's colour ops are several times faster
    than on uint8 and nothing is rounded between ops."""
    if params.flip:
        frames = TF.horizontal_flip(frames)
    if params.jitter or params.grayscale or params.blur_sigma > 0 or params.downup_factor > 1:
        frames = TF.to_dtype(frames, torch.float32, scale=True)
    for name, factor in params.jitter:
        frames = _JITTER_OPS[name](frames, factor)
    if params.grayscale:
        frames = TF.rgb_to_grayscale(frames, num_output_channels=3)
    if params.blur_sigma > 0:
        frames = _gaussian_blur(frames, params.blur_sigma)
    if params.downup_factor > 1:
        frames = _down_up(frames, params.downup_factor).clamp(0.0, 1.0)  # may be a view of its input
    return frames


def apply_spatial(frames: torch.Tensor, params: SpatialParams, video_cfg: VideoConfig) -> torch.Tensor:
    """uint8 ``(T, C, H, W)`` -> ``(T, C, size, size)``, the same ops on every frame: the crop on
    uint8 (``crop_to_size``), then the rest (``after_crop``: uint8, or float in [0, 1])."""
    return after_crop(crop_to_size(frames, params, video_cfg), params)


def to_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8, or float in [0, 1], ``(T, C, H, W)`` -> uint8 ``(C, T, H, W)`` (floats rounded to
    the nearest level: at most half a level, 0.5 / 255, from the float path)."""
    return rearrange(to_uint8(frames), "t c h w -> c t h w").contiguous()


def erase_box(video: torch.Tensor, box: Box, fill: torch.Tensor) -> torch.Tensor:
    """Set ``box`` of uint8 ``(C, T, H, W)`` or ``(C, H, W)`` to the colour ``fill`` ``(C,)``, in place."""
    top, left, h, w = box
    video[..., top : top + h, left : left + w] = fill.view(-1, *([1] * (video.ndim - 1)))
    return video


def temporal_order(generator: torch.Generator, aug: AugmentConfig, num_frames: int) -> torch.Tensor:
    """Frame indices ``(T,)`` after frame-rate reduction, frame shuffle and time reversal.

    Frame-rate reduction keeps every k-th frame and repeats it k times (a choppier but still
    coherent clip); shuffle and reversal break the arrow of time (controls).
    """
    order = torch.arange(num_frames)
    if rng.coin(generator, aug.frame_rate_reduction) and aug.frame_rate_factor >= 2:
        k = rng.randint(generator, 2, aug.frame_rate_factor)
        order = order[torch.div(order, k, rounding_mode="floor") * k]
    if rng.coin(generator, aug.frame_shuffle):
        order = order[torch.randperm(num_frames, generator=generator)]
    if rng.coin(generator, aug.time_reversal):
        order = order.flip(0)
    return order


_JITTER_NAMES = tuple(_JITTER_OPS)


def pack_params(params: SpatialParams) -> torch.Tensor:
    """The post-crop part of ``params`` as float64 ``(16,)`` (exact for Python floats), so that a
    DataLoader worker can hand it to the device with the cropped frames: flip, four
    ``(jitter op, factor)`` pairs in order (op -1 = none), grayscale, blur sigma, down-up factor,
    cutout box (-1 = none)."""
    jitter = [x for name, factor in params.jitter for x in (_JITTER_NAMES.index(name), factor)]
    jitter += [-1.0, 0.0] * (len(_JITTER_NAMES) - len(params.jitter))
    cutout = params.cutout_box if params.cutout_box is not None else (-1, -1, -1, -1)
    row = [float(params.flip), *jitter, float(params.grayscale), params.blur_sigma, params.downup_factor, *cutout]
    return torch.tensor(row, dtype=torch.float64)


def unpack_params(row: torch.Tensor | list[float]) -> SpatialParams:
    """``pack_params``' inverse (without the crop box, which the worker applied)."""
    values = row.tolist() if isinstance(row, torch.Tensor) else row
    jitter = tuple((_JITTER_NAMES[int(op)], factor) for op, factor in zip(values[1:9:2], values[2:9:2]) if op >= 0)
    cutout = tuple(int(v) for v in values[12:16])
    return SpatialParams(None, bool(values[0]), jitter, bool(values[9]), values[10], values[11],
                         cutout if cutout[0] >= 0 else None)  # fmt: skip


def finish_clip(cropped: torch.Tensor, params: list[SpatialParams], order: torch.Tensor, video_cfg: VideoConfig) -> torch.Tensor:
    """Cropped uint8 ``(T, C, size, size)`` -> the augmented uint8 clip ``(C, T, size, size)``:
    ``after_crop`` with one parameter draw (or one per frame), frame order ``order``, back to
    uint8, tube cutout in the mean colour. On the frames' device: DataLoader workers call it
    through ``VideoAugment``, the device through ``avmae.data.device`` (``data.device_transforms``)."""
    if len(params) == 1:
        frames = after_crop(cropped, params[0])
    else:
        # frames that drew no float op stay uint8: bring all to one dtype before stacking
        views = [after_crop(cropped[t : t + 1], p) for t, p in enumerate(params)]
        if any(v.is_floating_point() for v in views):
            views = [TF.to_dtype(v, torch.float32, scale=True) for v in views]
        frames = torch.cat(views)
    video = to_clip(frames[order.to(frames.device)])
    fill = mean_colour(video_cfg.mean).to(video.device)
    for t, p in enumerate(params):
        if p.cutout_box is not None:
            # one box through the whole clip (a tube), or one per frame under `per_frame`
            erase_box(video if len(params) == 1 else video[:, t], p.cutout_box, fill)
    return video


class VideoAugment:
    """Training video transform: uint8 ``(T, C, H, W)`` -> uint8 ``(C, T, size, size)``; the cutout
    fill is the dataset's mean colour (0 once normalised, to within half a level).

    ``crop`` draws every parameter and applies the crop only (what DataLoader workers do under
    ``data.device_transforms``); ``finish_clip`` does the rest; ``__call__`` is both.
    ``aug`` must be an effective config (see ``apply_strength``).
    """

    def __init__(self, aug: AugmentConfig, video_cfg: VideoConfig):
        self.aug = aug
        self.video_cfg = video_cfg

    def crop(self, frames: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[SpatialParams], torch.Tensor]:
        """The cropped uint8 ``(T, C, size, size)``, the parameter draws (one, or one per frame)
        and the frame order ``(T,)``."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        num_frames, _, height, width = frames.shape
        draws = num_frames if self.aug.per_frame else 1
        params = [draw_spatial_params(generator, self.aug, height, width, self.video_cfg.size) for _ in range(draws)]
        if draws == 1:
            cropped = crop_to_size(frames, params[0], self.video_cfg)
        else:
            cropped = torch.cat([crop_to_size(frames[t : t + 1], p, self.video_cfg) for t, p in enumerate(params)])
        return cropped, params, temporal_order(generator, self.aug, num_frames)

    def __call__(self, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return finish_clip(*self.crop(frames, generator), self.video_cfg)
