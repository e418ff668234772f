"""Augmentations: temporal coherency, the strength rule, determinism, audio ops and mixup."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from avmae.augment import apply_strength, build_transforms, mix_batch, mixup_alpha, sample_speed
from avmae.augment.audio import add_noise, circular_roll, mask_along_axis, random_gain
from avmae.augment.mixup import draw_lambda
from avmae.augment.video import SpatialParams, apply_spatial, rotate_hue, temporal_order
from avmae.config import load_config
from avmae.augment.transforms import eval_video_transform, mean_colour

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "augment"
GEOMETRY = ["data.video.resize=36", "data.video.size=32"]
# Every lossy spatiotemporal transform switched on, with certainty where a probability allows.
ALL_SPATIAL = [
    "augment.crop=1.0", "augment.hflip=0.5", "augment.color_jitter=1.0", "augment.grayscale=0.5",
    "augment.blur=1.0", "augment.downup=1.0", "augment.tube_cutout=1.0",
]
AUDIO = [
    "augment.gain_db=6", "augment.noise=1.0", "augment.time_roll=0.5",
    "augment.freq_mask=8", "augment.time_mask=16",
]


def config(*overrides: str, preset: str | None = None):
    path = PRESETS / f"{preset}.yaml" if preset else None
    return load_config(path, [*GEOMETRY, *overrides])


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured_clip(num_frames: int = 4, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 (T, 3, H, W): smooth colour gradients plus a bright square, different per frame."""
    g = generator(seed)
    ys = torch.linspace(0, 1, height).view(1, 1, -1, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, 1, -1)
    phase = torch.rand(num_frames, 3, 1, 1, generator=g) * 6.0
    frames = 0.5 + 0.4 * torch.sin(6.0 * xs + 4.0 * ys + phase)
    for t in range(num_frames):
        top, left = 8 + 2 * t, 10 + 3 * t
        frames[t, :, top : top + 12, left : left + 12] = 0.95
    return (frames * 255).round().to(torch.uint8)


def still_clip(num_frames: int = 6) -> torch.Tensor:
    """A clip whose frames are all the same picture."""
    return textured_clip(1).expand(num_frames, -1, -1, -1).contiguous()


def frames_identical(video: torch.Tensor) -> bool:
    """video: (C, T, H, W)."""
    return all(torch.equal(video[:, 0], video[:, t]) for t in range(1, video.shape[1]))


# ---- video: temporal coherency --------------------------------------------------------------


def test_one_draw_per_clip_keeps_a_still_clip_still():
    transforms = build_transforms(config(*ALL_SPATIAL, "augment.frame_rate_reduction=1.0"), train=True)
    reference = eval_video_transform(still_clip(), config().data.video)
    for seed in range(4):
        video = transforms.video(still_clip(), generator(seed))
        assert video.shape == (3, 6, 32, 32) and video.dtype == torch.uint8  # normalised on the device
        assert frames_identical(video)
        assert not torch.equal(video, reference)  # it did augment


def test_per_frame_parameters_break_coherency():
    transforms = build_transforms(config(*ALL_SPATIAL, "augment.per_frame=true"), train=True)
    for seed in range(4):
        video = transforms.video(still_clip(), generator(seed))
        assert video.shape == (3, 6, 32, 32)
        assert not frames_identical(video)


def test_tube_cutout_erases_the_same_box_in_every_frame():
    video = build_transforms(config("augment.crop=0", "augment.tube_cutout=1.0"), train=True).video(
        textured_clip(), generator(3)
    )
    fill = mean_colour(config().data.video.mean).view(3, 1, 1, 1)
    erased = (video == fill).all(dim=0)  # (T, H, W): every channel exactly at the mean colour
    assert erased[0].any()
    assert all(torch.equal(erased[0], erased[t]) for t in range(1, erased.shape[0]))
    rows, cols = erased[0].nonzero(as_tuple=True)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(erased[0].sum()) == int(box)  # one rectangle


def test_hue_rotation_keeps_greys_and_turns_full_circle():
    frames = torch.rand(2, 3, 5, 5, generator=generator(0))
    grey = frames[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(rotate_hue(grey, 0.3), grey, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_hue(frames, 0.0), frames, atol=1e-5, rtol=0)
    assert (rotate_hue(frames, 0.25) - frames).abs().mean() > 0.02


# ---- video: temporal reordering -------------------------------------------------------------


def test_frame_shuffle_permutes_the_frames():
    aug = apply_strength(config("augment.frame_shuffle=1.0").augment)
    orders = [temporal_order(generator(seed), aug, 8) for seed in range(5)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(8))
    assert any(not torch.equal(order, torch.arange(8)) for order in orders)
    # applied to a clip whose frames are told apart by their brightness
    clip = torch.arange(8, dtype=torch.uint8).mul(30).view(8, 1, 1, 1).expand(8, 3, 40, 40).contiguous()
    transforms = build_transforms(config("augment.crop=0", "augment.hflip=0", "augment.color_jitter=0",
                                         "augment.grayscale=0", "augment.frame_shuffle=1.0"), train=True)
    video = transforms.video(clip, generator(1))
    expected = eval_video_transform(clip, config().data.video)
    levels = video[0, :, 0, 0]
    assert sorted(levels.tolist()) == sorted(expected[0, :, 0, 0].tolist())
    assert not torch.equal(levels, expected[0, :, 0, 0])


def test_time_reversal_reverses_or_leaves_alone():
    aug = apply_strength(config("augment.time_reversal=0.5").augment)
    seen = set()
    for seed in range(16):
        order = temporal_order(generator(seed), aug, 6).tolist()
        assert order in (list(range(6)), list(range(5, -1, -1)))
        seen.add(tuple(order))
    assert len(seen) == 2  # both outcomes happen


def test_frame_rate_reduction_repeats_every_kth_frame():
    aug = apply_strength(config("augment.frame_rate_reduction=1.0", "augment.frame_rate_factor=3").augment)
    for seed in range(6):
        order = temporal_order(generator(seed), aug, 9).tolist()
        k = order.count(0)
        assert k in (2, 3)
        assert order == [(t // k) * k for t in range(9)]


# ---- strength -------------------------------------------------------------------------------


def test_strength_zero_is_the_evaluation_transform_exactly():
    cfg = config(*ALL_SPATIAL, *AUDIO, "augment.frame_shuffle=1.0", "augment.strength=0")
    transforms = build_transforms(cfg, train=True)
    clip, wave, fbank = textured_clip(), torch.randn(4000, generator=generator(1)), torch.randn(64, 16)
    assert torch.equal(transforms.video(clip, generator(0)), eval_video_transform(clip, cfg.data.video))
    assert torch.equal(transforms.waveform(wave, generator(0)), wave)
    assert torch.equal(transforms.fbank(fbank, generator(0)), fbank)


def test_larger_strength_changes_more():
    # Moderate probabilities, so that doubling the strength still has room to change more.
    moderate = [
        "augment.crop=0.3", "augment.hflip=0.2", "augment.color_jitter=0.3", "augment.grayscale=0.1",
        "augment.blur=0.3", "augment.downup=0.3", "augment.tube_cutout=0.3",
        "augment.gain_db=3", "augment.noise=0.3", "augment.freq_mask=4", "augment.time_mask=8",
    ]
    clip = textured_clip()
    reference = eval_video_transform(clip, config().data.video)
    wave = torch.randn(4000, generator=generator(2))
    fbank = torch.randn(64, 32, generator=generator(3))
    changes = []  # (video, waveform, fbank) mean absolute change over 8 draws, per strength
    for strength in (0.25, 1.0, 2.0):
        transforms = build_transforms(config(*moderate, f"augment.strength={strength}"), train=True)
        changes.append([
            sum((f(x, generator(seed)).float() - ref.float()).abs().mean().item() for seed in range(8)) / 8
            for f, x, ref in ((transforms.video, clip, reference), (transforms.waveform, wave, wave),
                              (transforms.fbank, fbank, fbank))
        ])
    for weaker, stronger in zip(changes, changes[1:]):
        for a, b in zip(weaker, stronger):
            assert b > 1.2 * a > 0, changes


def test_strength_rule():
    aug = config(preset="coherency_breaking").augment
    double = apply_strength(load_config(PRESETS / "coherency_breaking.yaml", ["augment.strength=2"]).augment)
    assert double.strength == 1.0
    assert double.blur == pytest.approx(min(1.0, 2 * aug.blur))
    assert double.time_reversal == 0.5 and double.hflip == 0.5  # symmetric coins stop at one half
    assert double.frame_shuffle == 1.0
    assert double.blur_sigma == pytest.approx((0.2, 4.0))
    assert double.speed_range == pytest.approx((0.8**2, 1.25**2))
    assert double.crop_scale[0] < aug.crop_scale[0] and double.crop_scale[1] == 1.0
    assert double.frame_rate_factor == 7 and double.downup_factor == pytest.approx(7.0)
    off = apply_strength(load_config(PRESETS / "spatiotemporal.yaml", ["augment.strength=0"]).augment)
    assert off.crop == off.color_jitter == off.noise == off.gain_db == 0
    assert off.speed_range == (1.0, 1.0)


# ---- determinism and evaluation mode --------------------------------------------------------


def test_generator_alone_decides_the_augmentation():
    transforms = build_transforms(config(*ALL_SPATIAL, *AUDIO, "augment.frame_shuffle=0.5"), train=True)
    clip, wave, fbank = textured_clip(6), torch.randn(4000, generator=generator(1)), torch.randn(64, 32)
    torch.manual_seed(123)  # the global RNG must not matter
    a = (transforms.video(clip, generator(7)), transforms.waveform(wave, generator(7)),
         transforms.fbank(fbank, generator(7)))
    torch.manual_seed(456)
    b = (transforms.video(clip, generator(7)), transforms.waveform(wave, generator(7)),
         transforms.fbank(fbank, generator(7)))
    c = (transforms.video(clip, generator(8)), transforms.waveform(wave, generator(8)),
         transforms.fbank(fbank, generator(8)))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    # two views drawn one after the other from one generator differ too
    g = generator(9)
    assert not torch.equal(transforms.video(clip, g), transforms.video(clip, g))


def test_evaluation_transforms_and_pickling():
    evaluation_setups = (
        (config(*ALL_SPATIAL, *AUDIO), False),
        (config(*ALL_SPATIAL, "augment.enabled=false"), True),
    )
    for cfg, train in evaluation_setups:
        transforms = build_transforms(cfg, train)
        clip, wave = textured_clip(), torch.randn(100)
        assert torch.equal(transforms.video(clip, generator(0)), eval_video_transform(clip, cfg.data.video))
        assert transforms.waveform(wave, generator(0)) is wave
    restored = pickle.loads(pickle.dumps(build_transforms(config(*ALL_SPATIAL), train=True)))
    clip = textured_clip()
    original = build_transforms(config(*ALL_SPATIAL), True)
    assert torch.equal(restored.video(clip, generator(4)), original.video(clip, generator(4)))


def test_bad_input_is_refused():
    transforms = build_transforms(config(), train=True)
    with pytest.raises(ValueError, match="uint8"):
        transforms.video(textured_clip().float(), generator(0))
    with pytest.raises(ValueError, match="mono"):
        transforms.waveform(torch.zeros(2, 100), generator(0))
    with pytest.raises(ValueError, match="hflip"):
        config("augment.hflip=0.9")
    with pytest.raises(ValueError, match="crop_scale"):
        config("augment.crop_scale=[0.9,0.2]")


def test_speed_is_drawn_from_the_scaled_range():
    aug = config(preset="sampling_only").augment
    speeds = [sample_speed(aug, generator(seed)) for seed in range(20)]
    assert all(0.8 <= s <= 1.25 for s in speeds) and len(set(speeds)) == 20
    assert sample_speed(config("augment.enabled=false").augment, generator(0)) == 1.0


# ---- audio ----------------------------------------------------------------------------------


def test_gain_scales_by_a_bounded_number_of_decibels():
    wave = torch.randn(1000, generator=generator(0))
    for seed in range(5):
        out = random_gain(wave, generator(seed), 6.0)
        ratio = out / wave
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))
        assert abs(20 * math.log10(ratio[0].item())) <= 6.0 + 1e-4


def test_noise_is_relative_to_the_signal():
    wave = torch.sin(torch.linspace(0, 100, 8000))
    out = add_noise(wave, generator(1), 0.2)
    assert out.shape == wave.shape and not torch.equal(out, wave)
    assert (out - wave).pow(2).mean().sqrt() <= 0.2 * wave.pow(2).mean().sqrt() * 1.1
    assert torch.equal(add_noise(torch.zeros(100), generator(1), 0.2), torch.zeros(100))


def test_roll_is_circular_and_bounded():
    wave = torch.arange(100, dtype=torch.float32)
    for seed in range(5):
        out = circular_roll(wave, generator(seed), 0.3)
        shift = int(out.argmin())  # where sample 0 went
        assert min(shift, 100 - shift) <= 30
        assert torch.equal(out, torch.roll(wave, shift))


def test_specaugment_masks_whole_bands_and_keeps_shape():
    fbank = torch.randn(64, 32, generator=generator(0)) + 10.0  # no zeros before masking
    transforms = build_transforms(config("augment.freq_mask=8", "augment.time_mask=16"), train=True)
    out = transforms.fbank(fbank, generator(5))
    assert out.shape == fbank.shape and not torch.equal(out, fbank)
    zero = out == 0
    masked_bins, masked_frames = zero.all(dim=0), zero.all(dim=1)
    assert torch.equal(zero, masked_bins.view(1, -1) | masked_frames.view(-1, 1))  # bands only
    assert 0 < int(masked_bins.sum()) + int(masked_frames.sum())
    assert int(masked_bins.sum()) <= 2 * 8 and int(masked_frames.sum()) <= 2 * 16
    assert torch.equal(out[~zero], fbank[~zero])
    spec = torch.ones(10, 4)
    mask_along_axis(spec, generator(0), axis=1, max_width=100, num_masks=1)  # width clipped to 4
    assert spec.shape == (10, 4)


def test_cavmae_specaugment_fill_is_a_masked_raw_fbank_normalised():
    # YuanGongND/cav-mae src/dataloader.py: FrequencyMasking / TimeMasking zero cells of the raw
    # fbank, then (fbank - mean) / std; computed here by hand on the cells our transform masked
    cfg = load_config(PRESETS.parent / "finetune" / "cavmae_vggsound.yaml")
    audio = cfg.data.audio
    raw = torch.randn(1024, 128, generator=generator(0)) * 4.0 - 5.0
    normalised = (raw - audio.norm_mean) / audio.norm_std
    out = build_transforms(cfg, train=True).fbank(normalised.clone(), generator(3))
    masked = out != normalised
    assert masked.any(dim=0).sum() > 0 and masked.any(dim=1).sum() > 0  # a frequency and a time band
    expected = raw.clone()
    expected[masked] = 0.0
    expected = (expected - audio.norm_mean) / audio.norm_std
    torch.testing.assert_close(out, expected)
    assert out[masked].unique().tolist() == pytest.approx([(0 + 5.081) / 4.4849])  # 1.13
    # avmae's default keeps the dataset mean (0 after normalising) in masked cells
    default = build_transforms(load_config(None, ["augment.freq_mask=48"]), train=True)
    out = default.fbank(normalised.clone(), generator(3))
    assert (out[out != normalised] == 0).all() and (out == 0).any()


# ---- mixup ----------------------------------------------------------------------------------


def test_mixup_shares_lambda_across_modalities_and_targets():
    g = generator(0)
    video, audio = torch.randn(4, 3, 2, 8, 8, generator=g), torch.randn(4, 1, 16, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    multi_hot = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    mixed_video, mixed_audio, soft = mix_batch(
        video, audio, {"verb": labels, "tags": multi_hot}, {"verb": 5, "tags": 3},
        alpha=0.5, smoothing=0.1, generator=generator(11),
    )
    lam = draw_lambda(0.5, generator(11))
    assert 0.0 < lam < 1.0

    def solve(mixed, x):  # mixed = lam x + (1 - lam) x.flip(0)  =>  lam
        partner = x.flip(0)
        return ((mixed - partner) * (x - partner)).sum() / (x - partner).pow(2).sum()

    assert solve(mixed_video, video).item() == pytest.approx(lam, abs=1e-5)
    assert solve(mixed_audio, audio).item() == pytest.approx(lam, abs=1e-5)
    # single-label: every row a distribution; the true class holds lam of the non-smoothed mass
    verb = soft["verb"]
    assert verb.shape == (4, 5)
    torch.testing.assert_close(verb.sum(1), torch.ones(4))
    assert verb[0, 0].item() == pytest.approx(lam * 0.9 + 0.1 / 5, abs=1e-6)
    assert verb[0, 3].item() == pytest.approx((1 - lam) * 0.9 + 0.1 / 5, abs=1e-6)
    # multi-label: the mass is the lam-mix of the two smoothed label counts, smoothed as single-label
    # targets are, y (1 - s) + s / K
    smoothed = multi_hot * 0.9 + 0.1 / 3
    expected = lam * smoothed.sum(1) + (1 - lam) * smoothed.flip(0).sum(1)
    torch.testing.assert_close(soft["tags"].sum(1), expected)


def test_mixup_off_still_smooths_and_leaves_inputs():
    video = torch.randn(3, 3, 2, 4, 4)
    out_video, out_audio, soft = mix_batch(video, None, {"cls": torch.tensor([1, 0, 2])}, {"cls": 3},
                                           alpha=0.0, smoothing=0.3, generator=generator(0))
    assert out_video is video and out_audio is None
    torch.testing.assert_close(soft["cls"][0], torch.tensor([0.1, 0.8, 0.1]))
    assert mixup_alpha(config(preset="finetune")) == 0.5
    assert mixup_alpha(config("augment.mixup=0.5", "augment.enabled=false")) == 0.0
    with pytest.raises(ValueError, match="batch size"):
        mix_batch(video, torch.randn(2, 1, 8, 8), {}, {}, alpha=0.5)


def test_grayscale_then_a_down_up_too_small_to_resize():
    """Grayscale returns a view repeating one channel; a down-up factor so close to 1 that no
    resize happens hands that view on, and clamping it must not write into it."""
    cfg = load_config(None, ["data.video.size=64", "data.video.resize=64"])
    frames = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    out = apply_spatial(frames, SpatialParams(grayscale=True, downup_factor=1.005), cfg.data.video)
    gray = apply_spatial(frames, SpatialParams(grayscale=True), cfg.data.video)
    assert out.shape == (4, 3, 64, 64) and torch.equal(out, gray)
