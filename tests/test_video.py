"""Video reading on real H.264 mp4 files: both backends, time arithmetic, short and damaged files,
and the evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avmae.config import VideoConfig
from avmae.augment.transforms import crop_positions, eval_video_transform, normalize_video, spatial_crop
from avmae.data.video import (
    ClipTooShortError,
    VideoDecodeError,
    check_duration,
    clip_span,
    clip_starts,
    frame_times,
    open_video,
)

DECODERS = ("decord", "pyav")


def counter_frames(num_frames: int, height: int = 32, width: int = 64) -> np.ndarray:
    """Frame i is uniformly grey at level 4 * i (survives H.264 within +-2): a readable frame index."""
    levels = (np.arange(num_frames) * 4).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def decoded_index(frames: torch.Tensor) -> np.ndarray:
    """Frame indices read back from ``counter_frames`` levels."""
    return np.round(frames.float().mean(dim=(1, 2, 3)).numpy() / 4).astype(int)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_shapes_and_frames_at_times(make_clip, decoder):
    path = make_clip("count.mp4", counter_frames(50), fps=25)
    with open_video(path, decoder) as reader:
        assert reader.num_frames == 50
        assert reader.fps == pytest.approx(25.0)
        assert reader.duration == pytest.approx(2.0)
        # frame i is shown during [i / 25, (i + 1) / 25)
        times = [0.0, 0.039, 0.04, 0.5, 1.0, 1.99, 5.0]
        frames = reader.frames_at(times)
        assert frames.dtype == torch.uint8 and frames.shape == (len(times), 32, 64, 3)
        assert decoded_index(frames).tolist() == [0, 0, 1, 12, 25, 49, 49]  # past the end: last frame
        # repeated and unsorted times come back in the asked order
        again = reader.frames_at([1.0, 0.0, 1.0])
        assert decoded_index(again).tolist() == [25, 0, 25]


@pytest.mark.parametrize("decoder", DECODERS)
def test_backends_decode_the_same_pixels(make_clip, decoder):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    path = make_clip("noise.mp4", frames, fps=10)
    times = frame_times(0.35, 6, frame_rate=5.0)
    with open_video(path, decoder) as reader, open_video(path, "decord") as reference:
        assert torch.equal(reader.frames_at(times), reference.frames_at(times))


@pytest.mark.parametrize("decoder", DECODERS)
def test_25_and_29_97_fps_give_the_same_span(make_clip, decoder):
    """A clip defined in seconds covers the same time whatever the frame rate of the file."""
    seconds = 3.0
    spans = {}
    for fps in (25, 29.97):
        count = int(seconds * fps)
        # frame level encodes its time: level 4 * round(10 * t), i.e. 0.1 s resolution
        levels = (np.round(np.arange(count) / fps * 10) * 4).astype(np.uint8)
        frames = np.broadcast_to(levels[:, None, None, None], (count, 16, 32, 3)).copy()
        path = make_clip(f"rate{fps}.mp4", frames, fps=fps)
        with open_video(path, decoder) as reader:
            times = frame_times(0.5, num_frames=8, frame_rate=4.0)  # 0.5 .. 2.25 s
            spans[fps] = decoded_index(reader.frames_at(times)) / 10.0
    wanted = frame_times(0.5, 8, 4.0)
    # the frame shown at t started at most one frame period earlier; levels round to 0.05 s
    assert spans[25] == pytest.approx(wanted, abs=1 / 25 + 0.05)
    assert spans[29.97] == pytest.approx(wanted, abs=1 / 29.97 + 0.05)
    assert clip_span(8, 4.0) == 2.0


def test_clip_starts_train_eval_and_segments():
    generator = torch.Generator().manual_seed(0)
    draws = [clip_starts(10.0, 2.0, generator=generator)[0] for _ in range(200)]
    assert min(draws) >= 0.0 and max(draws) <= 8.0 and np.std(draws) > 1.0
    assert clip_starts(10.0, 2.0) == [4.0]  # eval: centred
    assert clip_starts(10.0, 2.0, num_clips=3) == pytest.approx([0.0, 4.0, 8.0])
    # segment longer than the clip: the clip stays inside it
    inside = [clip_starts(100.0, 2.0, generator=generator, segment=(30.0, 35.0))[0] for _ in range(50)]
    assert min(inside) >= 30.0 and max(inside) <= 33.0
    assert clip_starts(100.0, 2.0, num_clips=2, segment=(30.0, 35.0)) == pytest.approx([30.0, 33.0])
    # segment shorter than the clip: centred on it, kept inside the file
    assert clip_starts(100.0, 2.0, segment=(50.0, 51.0)) == [49.5]
    assert clip_starts(100.0, 2.0, generator=generator, segment=(0.0, 0.0)) == [0.0]
    assert clip_starts(100.0, 2.0, segment=(99.5, 100.0)) == [98.0]
    # speed: the stride grows, so does the span
    assert frame_times(1.0, 3, frame_rate=4.0, speed=2.0).tolist() == [1.0, 1.5, 2.0]


@pytest.mark.parametrize("decoder", DECODERS)
def test_short_file_rule(make_clip, decoder):
    short = make_clip("short.mp4", counter_frames(10), fps=25)  # 0.4 s
    with open_video(short, decoder) as reader:
        with pytest.raises(ClipTooShortError, match="short.mp4"):
            check_duration(reader, span=2.0, min_fraction=0.5)
        check_duration(reader, span=0.6, min_fraction=0.5)  # 0.4 s >= half of 0.6 s: allowed
        times = frame_times(0.0, 6, frame_rate=10.0)  # 0 .. 0.5 s, past the end after 0.4 s
        assert decoded_index(reader.frames_at(times)).tolist() == [0, 2, 5, 7, 9, 9]
        with pytest.raises(ClipTooShortError, match="segment"):
            check_duration(reader, span=0.2, min_fraction=0.5, segment=(3.0, 4.0))


@pytest.mark.parametrize("decoder", DECODERS)
def test_damaged_files_raise_naming_the_file(make_clip, tmp_path, decoder):
    good = make_clip("good.mp4", np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), fps=25)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    for path in (truncated, garbage, tmp_path / "absent.mp4"):
        with pytest.raises(VideoDecodeError, match=path.name):
            with open_video(path, decoder) as reader:
                reader.frames_at(frame_times(0.0, 8, frame_rate=5.0))
    with pytest.raises(ValueError, match="unknown video decoder"):
        open_video(good, "torchcodec-not-installed")


def test_eval_transform_shapes_crops_and_normalisation():
    cfg = VideoConfig(num_frames=4, resize=32, size=24)
    frames = torch.zeros(4, 3, 40, 80, dtype=torch.uint8)
    frames[..., :, :40] = 255  # left half white, right half black
    out = eval_video_transform(frames, cfg)
    assert out.shape == (3, 4, 24, 24) and out.dtype == torch.uint8  # normalised on the device
    # resized to 32 x 64: left crop is white, right crop black, centre straddles the edge
    left, centre, right = (normalize_video(eval_video_transform(frames, cfg, p), cfg.mean, cfg.std) for p in crop_positions(3))
    white = (1.0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    black = -torch.tensor(cfg.mean) / torch.tensor(cfg.std)
    assert torch.allclose(left.mean(dim=(1, 2, 3)), white, atol=1e-4)
    assert torch.allclose(right.mean(dim=(1, 2, 3)), black, atol=1e-4)
    assert (centre[0, 0, 0] > 0).sum() == 12  # half of the 24 columns are white
    # portrait frames crop along the height
    tall = spatial_crop(torch.arange(10 * 4, dtype=torch.uint8).view(1, 1, 10, 4), 4, 2)
    assert tall[0, 0, 0, 0] == 6 * 4
    assert normalize_video(torch.full((3, 2, 1, 1), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3).eq(1).all()
    with pytest.raises(ValueError, match="test_crops"):
        crop_positions(2)
