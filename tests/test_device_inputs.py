"""uint8 frames to the device, normalised there: the same model input as the float path had.

Before, the dataset normalised each clip to float32 in the worker (``normalize`` of its uint8 or
[0, 1] frames, then the tube cutout set to 0); now it sends uint8 and ``normalize_video`` runs on
the device. Integer frames give identical inputs; frames that went through float colour ops are
rounded to the nearest level once, so they differ by at most half a level.
"""

from __future__ import annotations

import torch
from test_augment import ALL_SPATIAL, config, generator, textured_clip

from avmae.augment import apply_strength
from avmae.augment.transforms import eval_video_transform, resize_short_side, spatial_crop
from avmae.augment.video import VideoAugment, apply_spatial, draw_spatial_params, temporal_order
from avmae.data.device import normalize_inputs
from avmae.engine.loop import batch_to_device


def normalize(frames: torch.Tensor, mean, std) -> torch.Tensor:
    """The per-clip float normalisation the dataset ran before: uint8 (or 0-255 float)
    ``(T, C, H, W)`` -> float32 ``(C, T, H, W)``, ``(x / 255 - mean) / std``."""
    video = frames.transpose(0, 1).float().div(255.0)
    return (video - torch.tensor(mean).view(-1, 1, 1, 1)) / torch.tensor(std).view(-1, 1, 1, 1)


def old_training_video(clip: torch.Tensor, aug, video_cfg, seed: int) -> torch.Tensor:
    """The float path as it was: the same draws, normalised in float, cutout set to 0."""
    g = generator(seed)
    num_frames, _, height, width = clip.shape
    params = draw_spatial_params(g, aug, height, width, video_cfg.size)
    frames = apply_spatial(clip, params, video_cfg)
    frames = frames[temporal_order(g, aug, num_frames)]
    video = normalize(frames * 255.0 if frames.is_floating_point() else frames, video_cfg.mean, video_cfg.std)
    if params.cutout_box is not None:
        top, left, h, w = params.cutout_box
        video[..., top : top + h, left : left + w] = 0.0
    return video


def test_evaluation_frames_normalised_on_the_device_equal_the_float_path():
    cfg = config()
    video_cfg, clip = cfg.data.video, textured_clip()
    old = normalize(spatial_crop(resize_short_side(clip, video_cfg.resize), video_cfg.size), video_cfg.mean, video_cfg.std)
    sent = eval_video_transform(clip, video_cfg)
    assert sent.dtype == torch.uint8 and sent.shape == old.shape
    new = normalize_inputs({"video": sent[None]}, video_cfg)["video"][0]
    assert new.dtype == torch.float32
    torch.testing.assert_close(new, old, atol=1e-6, rtol=0)


def test_augmented_frames_normalised_on_the_device_match_the_float_path_within_half_a_level():
    cfg = config(*ALL_SPATIAL)
    aug, video_cfg = apply_strength(cfg.augment), cfg.data.video
    half_level = 0.5 / 255 / min(video_cfg.std)
    clip = textured_clip()
    for seed in range(6):
        sent = VideoAugment(aug, video_cfg)(clip, generator(seed))
        assert sent.dtype == torch.uint8
        new = normalize_inputs({"video": sent}, video_cfg)["video"]
        old = old_training_video(clip, aug, video_cfg, seed)
        assert (new - old).abs().max() <= half_level + 1e-5, seed
        assert (old == 0).any()  # the cutout ran: its mean-colour fill is within half a level of 0


def test_batches_and_second_views_normalise_per_channel_and_floats_pass_through():
    video_cfg = config().data.video
    batch = torch.randint(0, 256, (3, 3, 2, 8, 8), dtype=torch.uint8, generator=generator(0))
    inputs = {"video": batch, "video2": batch.flip(0), "audio": torch.randn(3, 1, 16, 8), "index": torch.arange(3)}
    out = normalize_inputs(inputs, video_cfg)
    for key, frames in (("video", batch), ("video2", batch.flip(0))):
        expected = torch.stack([normalize(c.transpose(0, 1), video_cfg.mean, video_cfg.std) for c in frames])
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=0)
    assert out["audio"] is inputs["audio"] and out["index"] is inputs["index"]
    assert normalize_inputs({"video": out["video"]}, video_cfg)["video"] is out["video"]  # already normalised
    moved = batch_to_device({"video": batch, "id": ["a", "b", "c"]}, torch.device("cpu"), video_cfg)
    torch.testing.assert_close(moved["video"], out["video"])
    assert moved["id"] == ["a", "b", "c"]
    cast = batch_to_device({"video": batch}, torch.device("cpu"), video_cfg, torch.bfloat16)["video"]
    assert cast.dtype == torch.bfloat16  # normalised first, then cast (DeepSpeed's input dtype)
    torch.testing.assert_close(cast, out["video"].to(torch.bfloat16))
