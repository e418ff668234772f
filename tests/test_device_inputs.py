"""uint8 frames to the device, normalised there: the same model input as the float path had.
Training transforms on the device (``data.device_transforms``): the same batches as the workers'.

Before, the dataset normalised each clip to float32 in the worker (``normalize`` of its uint8 or
[0, 1] frames, then the tube cutout set to 0); now it sends uint8 and ``normalize_video`` runs on
the device. Integer frames give identical inputs; frames that went through float colour ops are
rounded to the nearest level once, so they differ by at most half a level.
"""

from __future__ import annotations

import pytest
import torch
import torchaudio
from conftest import decodable_rows, write_manifests
from test_augment import ALL_SPATIAL, AUDIO, config, generator, textured_clip

from avmae.augment import apply_strength
from avmae.augment.transforms import eval_video_transform, resize_short_side, spatial_crop
from avmae.augment.video import VideoAugment, apply_spatial, draw_spatial_params, temporal_order
from avmae.config import load_config
from avmae.data import build_dataset
from avmae.data.audio import kaldi_fbank_batch
from avmae.data.collate import collate_clips
from avmae.data.device import device_inputs, normalize_inputs
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
    moved = batch_to_device({"video": batch, "id": ["a", "b", "c"]}, torch.device("cpu"), config().data)
    torch.testing.assert_close(moved["video"], out["video"])
    assert moved["id"] == ["a", "b", "c"]
    cast = batch_to_device({"video": batch}, torch.device("cpu"), config().data, torch.bfloat16)["video"]
    assert cast.dtype == torch.bfloat16  # normalised first, then cast (DeepSpeed's input dtype)
    torch.testing.assert_close(cast, out["video"].to(torch.bfloat16))


# ---- transforms on the device -----------------------------------------------------------------

DEMO = "configs/pretrain/demo.yaml"
SMALL = ["data.video.num_frames=4", "data.video.frame_rate=8.0", "data.video.resize=40", "data.video.size=32",
         "data.audio.seconds=1.28", "data.audio.no_audio=silence", "data.audio.window=centred"]  # fmt: skip


@pytest.mark.parametrize(
    "variant",
    [[*ALL_SPATIAL, *AUDIO, "augment.frame_shuffle=0.5"],
     [*ALL_SPATIAL, "augment.per_frame=true", "augment.two_views=true", "data.clips_per_video=2"],
     [*AUDIO, "augment.spec_augment_fill=raw_zero"],
     ["augment.enabled=false"]],
    ids=["all_transforms", "per_frame_two_views_two_clips", "raw_zero_fill", "augment_off"],
)  # fmt: skip
def test_device_transforms_give_the_workers_batches(synthetic_root, tmp_path, variant):
    """Real mp4 items through both paths, same items and seeds: the workers' batch (transforms in
    the worker) against the raw batch with its draws, transformed by ``device_inputs``. The draws
    are equal, so the videos are identical and the fbanks equal within float rounding."""
    rows = decodable_rows(synthetic_root)["train"][: 2 if "data.clips_per_video=2" in variant else 4]
    overrides = [*write_manifests(synthetic_root, tmp_path, {"train": rows}), f"train.output_dir={tmp_path}", *SMALL, *variant]
    batches = {}
    for on_device in (False, True):
        cfg = load_config(DEMO, [*overrides, f"data.device_transforms={on_device}"])
        dataset = build_dataset(cfg, "train", train=True)
        dataset.set_epoch(3)
        batch = collate_clips([dataset[i] for i in range(len(rows))])
        assert ("video_params" in batch) == on_device  # the workers sent the crops and the draws
        batches[on_device] = device_inputs(batch, cfg.data)
    worker, device = batches[False], batches[True]
    assert worker.keys() == device.keys(), (sorted(worker), sorted(device))
    views = ["", "2"] if "augment.two_views=true" in variant else [""]
    for suffix in views:
        a, b = worker["video" + suffix], device["video" + suffix]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b), (a - b).abs().max()
        a, b = worker["audio" + suffix], device["audio" + suffix]
        assert a.shape == b.shape == (a.shape[0], 1, 128, 128)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert (a.flatten(1).std(1) > 0.1).all()  # real spectra, not silence
    if len(views) == 2:  # the views were augmented differently
        assert not torch.equal(device["video"], device["video2"])
    if "augment.spec_augment_fill=raw_zero" in variant:  # masked cells hold the normalised raw 0
        audio_cfg = cfg.data.audio
        assert (device["audio"] == (0.0 - audio_cfg.norm_mean) / audio_cfg.norm_std).any()


def test_device_transforms_refuse_waveform_mixup(synthetic_root, tmp_path):
    """Waveform mixup (CAV-MAE's finetuning) mixes in the workers before the fbank: asked for
    together with device transforms, the dataset says which settings clash."""
    rows = decodable_rows(synthetic_root)["train"][:2]
    overrides = [*write_manifests(synthetic_root, tmp_path, {"train": rows}), f"train.output_dir={tmp_path}", *SMALL,
                 "augment.mixup_domain=waveform", "augment.mixup=0.5"]  # fmt: skip
    cfg = load_config(DEMO, [*overrides, "data.device_transforms=false"])
    assert not build_dataset(cfg, "train", train=True).device_transforms
    with pytest.raises(ValueError, match="device_transforms.*mixup_domain"):
        build_dataset(load_config(DEMO, [*overrides, "data.device_transforms=true"]), "train", train=True)


def test_batched_fbank_is_torchaudios_for_each_waveform():
    """``kaldi_fbank_batch`` against torchaudio's Kaldi fbank computed per waveform, with CAV-MAE's
    arguments, for a batch of full and shorter (zero-padded) waveforms: the frames of real
    samples equal, the rest the zero frames CAV-MAE appends."""
    cfg = config(*SMALL).data.audio
    length = int(cfg.seconds * cfg.sample_rate)
    waves = torch.randn(3, length, generator=generator(0)) * torch.tensor([[0.1], [0.5], [0.01]])
    lengths = torch.tensor([length, 12345, 399 + 160 * 7])
    waves[torch.arange(length) >= lengths[:, None]] = 0.0
    batch = kaldi_fbank_batch(waves, lengths, cfg)
    assert batch.shape == (3, cfg.target_length, 128)
    for wave, n, ours in zip(waves, lengths.tolist(), batch):
        real = wave[:n]
        reference = torchaudio.compliance.kaldi.fbank(
            (real - real.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
            window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25,
        )  # fmt: skip
        frames = reference.shape[0]
        assert 0 < frames < cfg.target_length
        torch.testing.assert_close(ours[:frames], reference, atol=1e-4, rtol=1e-5)  # float32 rounding of batched sums
        assert not ours[frames:].any()
