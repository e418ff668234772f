"""Where the audio window of a clip sits in its file (``data.audio.window``), on real files:
a wav shorter than, as long as and longer than the window, and an mp4's own AAC track; ``wrap``
against DMVR's offsets and a hand-built loop of a known waveform."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from avmae.config import load_config
from avmae.data.audio import audio_duration, fbank, kaldi_fbank, normalize_fbank, read_audio
from avmae.data.dataset import AVDataset
from avmae.data.manifests import ClipRecord, Manifest

RATE = 16000
WINDOW = 1.28  # 128 fbank frames
# 4 frames at 4 fps: 1 s video clips; 3 evaluation clips spread over the video
GEOMETRY = [
    "data.video.num_frames=4", "data.video.frame_rate=4", "data.video.resize=32", "data.video.size=32",
    f"data.audio.seconds={WINDOW}", "data.test_clips=3",
]


def test_place_windows_by_hand():
    from avmae.data.audio import place_windows

    # a 10 s file, 4 s windows: centred at 1 s -> [0, 4); at 5 s -> [3, 7); at 9.5 s -> [6, 10)
    assert place_windows([1.0, 5.0, 9.5], 4.0, 10.0, "inside") == ([0.0, 3.0, 6.0], 4.0)
    # a 3 s file is shorter than the window: the whole file, from 0, for every clip
    assert place_windows([0.5, 2.5], 4.0, 3.0, "inside") == ([0.0, 0.0], 3.0)
    # equal length: the whole file
    assert place_windows([1.0, 3.0], 4.0, 4.0, "inside") == ([0.0, 0.0], 4.0)
    # centred ignores the file: windows may start before 0 or end after the file
    assert place_windows([1.0, 9.5], 4.0, None, "centred") == ([-1.0, 7.5], 4.0)
    with pytest.raises(ValueError, match="duration"):
        place_windows([1.0], 4.0, None, "inside")


def _noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(round(seconds * RATE))).astype(np.float32)


def _dataset(make_clip, tmp_path, audio_seconds: float, *overrides: str, in_mp4: bool = False):
    """Evaluation dataset of one 3 s video whose audio (in a wav, or in the mp4) lasts ``audio_seconds``."""
    frames = np.full((30, 32, 32, 3), 90, np.uint8)  # 3 s at 10 fps
    wave = _noise(audio_seconds, seed=int(audio_seconds * 100))
    if in_mp4:
        video, audio = make_clip("clip.mp4", frames, 10.0, wave, RATE), None
    else:
        video, audio = make_clip("clip.mp4", frames, 10.0), tmp_path / "clip.wav"
        soundfile.write(audio, wave, RATE, subtype="FLOAT")
    cfg = load_config(None, [*GEOMETRY, *overrides])
    record = ClipRecord("clip", video, audio=audio, targets={"label": 0})
    manifest = Manifest([record], {"label": ["x"]}, source=tmp_path / "m.csv")
    return AVDataset(manifest, cfg.data, cfg.augment, train=False), cfg, audio or video


def test_longer_file_windows_stay_inside(make_clip, tmp_path):
    """3 s of audio, 1.28 s windows around clips centred at 0.5, 1.5 and 2.5 s: the first is
    shifted to start at 0, the last to end at 3 s, the middle one stays centred."""
    dataset, cfg, path = _dataset(make_clip, tmp_path, 3.0)
    expected_starts = [0.0, 1.5 - WINDOW / 2, 3.0 - WINDOW]
    for view, start in enumerate(expected_starts):
        expected = fbank(read_audio(path, start, WINDOW, RATE), cfg.data.audio)
        assert torch.equal(dataset[view]["audio"][0], expected), view
    # no frame of the first window is made of zero samples (Kaldi's log floor, about -15.9); its
    # 126 frames of 25 ms every 10 ms are all real sound (the last 2 are the usual end padding)
    raw = dataset[0]["audio"][0] * cfg.data.audio.norm_std + cfg.data.audio.norm_mean
    assert raw[:126].mean(dim=1).min() > -8.0


def test_equal_file_is_the_whole_window(make_clip, tmp_path):
    dataset, cfg, path = _dataset(make_clip, tmp_path, WINDOW)
    whole = fbank(torch.from_numpy(soundfile.read(path, dtype="float32")[0]), cfg.data.audio)
    for view in range(3):
        assert torch.equal(dataset[view]["audio"][0], whole), view


def test_shorter_file_is_padded_with_zero_frames(make_clip, tmp_path):
    """0.8 s of audio in a 1.28 s window: the fbank of the whole file (78 real frames), then
    zero frames up to 128, as CAV-MAE / AudioMAE pad -- not frames of zero samples."""
    dataset, cfg, path = _dataset(make_clip, tmp_path, 0.8)
    samples = torch.from_numpy(soundfile.read(path, dtype="float32")[0])
    real = 1 + (samples.numel() - 400) // 160  # Kaldi frames of 25 ms every 10 ms
    assert real == 78
    item = dataset[1]["audio"][0]
    assert torch.equal(item[:real], normalize_fbank(kaldi_fbank(samples, cfg.data.audio), cfg.data.audio)[:real])
    padding = torch.full((128 - real, 128), (0.0 - cfg.data.audio.norm_mean) / cfg.data.audio.norm_std)
    assert torch.equal(item[real:], padding)
    assert torch.equal(dataset[0]["audio"], dataset[2]["audio"])  # every clip sees the whole file


def test_mp4_audio_track_windows_stay_inside(make_clip, tmp_path):
    """The same placement for the AAC track of the mp4 itself (its stated duration)."""
    dataset, cfg, path = _dataset(make_clip, tmp_path, 3.0, in_mp4=True)
    first, last = dataset[0]["audio"][0], dataset[2]["audio"][0]
    assert torch.equal(first, fbank(read_audio(path, 0.0, WINDOW, RATE), cfg.data.audio))
    # the stated duration of an AAC track can exceed its samples by a frame (1024 samples); the
    # last window ends at the stated end
    end = audio_duration(path)
    assert end == pytest.approx(3.0, abs=0.07)
    assert torch.equal(last, fbank(read_audio(path, end - WINDOW, WINDOW, RATE), cfg.data.audio))


def test_centred_window_keeps_the_clip_centre(make_clip, tmp_path):
    """``audio.window=centred`` (long EPIC videos): the window stays centred on the clip even
    where it leaves the file, which is filled with zero samples."""
    dataset, cfg, path = _dataset(make_clip, tmp_path, 3.0, "data.audio.window=centred")
    expected = fbank(read_audio(path, 0.5 - WINDOW / 2, WINDOW, RATE), cfg.data.audio)
    assert torch.equal(dataset[0]["audio"][0], expected)
    first_frames = dataset[0]["audio"][0][:10] * cfg.data.audio.norm_std + cfg.data.audio.norm_mean
    assert first_frames.mean(dim=1).max() < -15.0  # zero samples: Kaldi's log floor


# ---- audio.window=wrap: AV-MAE's DMVR sampling (google-deepmind/dmvr dmvr/processors.py) -------------


def _dmvr_linspace_offsets(num_views: int, frames: int, window: int) -> list[int]:
    """``sample_linspace_sequence``'s offsets by hand: ``tf.linspace(0, max(0, F - W), n)`` in
    float32 (start + k * step, the last one exactly the stop), cast to int (truncated)."""
    latest = max(0, frames - window)
    step = np.float32(latest) / np.float32(num_views - 1)
    return [int(np.float32(k) * step) for k in range(num_views - 1)] + [latest]


def test_wrap_starts_by_hand():
    from avmae.data.audio import linspace_starts, wrap_starts

    # VGGSound evaluation, 4 views of an 8 s window over 10 s (1000 frames of 10 ms): 0, 66, 133, 200
    assert _dmvr_linspace_offsets(4, 1000, 800) == [0, 66, 133, 200]
    assert linspace_starts(4, 10.0, 8.0, 0.01) == pytest.approx([0.0, 0.66, 1.33, 2.0])
    # one view: sample_sequence(random=False), the centred (F - W) // 2
    assert linspace_starts(1, 10.0, 8.0, 0.01) == pytest.approx([1.0])
    # a file shorter than the window: every view at 0 (it loops)
    assert linspace_starts(4, 3.0, 8.0, 0.01) == [0.0] * 4
    # training: the spectrogram offset is round(video offset / video length x spectrogram length);
    # a 10 s VGGSound clip at 25 fps, 16 frames at stride 4: the video offset is drawn from
    # 0 .. 250 - 15 x 4 - 1 = 189 frames (DMVR _get_random_sampling_offset)
    for offset in range(190):
        assert wrap_starts([offset / 25.0], 10.0, 10.0, 0.01) == pytest.approx([round(offset / 250 * 1000) * 0.01])
    wrapped = [o for o in range(190) if round(o / 250 * 1000) + 800 > 1000]
    assert (len(wrapped), len(wrapped) / 190) == (139, pytest.approx(0.7316, abs=1e-4))
    # audio half as long as the video: the same proportion of it
    assert wrap_starts([2.48], 10.0, 5.0, 0.01) == pytest.approx([1.24])


def test_loop_windows_by_hand():
    from avmae.data.audio import loop_windows

    track = torch.arange(10, dtype=torch.float32)
    # 1 sample per second: a 4-sample window at 8 runs past the end and continues from the start;
    # a 23-sample window (longer than the file) repeats it
    windows = loop_windows(track, [0.0, 8.0, 3.0], 4.0, 1)
    assert [w.tolist() for w in windows[:2]] == [[0, 1, 2, 3], [8, 9, 0, 1]]
    long = loop_windows(track, [3.0], 23.0, 1)[0]
    assert long.tolist() == list(range(3, 10)) + list(range(10)) + list(range(6))


def test_wrap_evaluation_views_start_at_dmvr_offsets(make_clip, tmp_path):
    """4 evaluation views of a 1.28 s window over 3 s of audio: 300 and 128 frames, views at
    DMVR's linspace offsets 0, 57, 114, 172 frames, whatever the video clips."""
    dataset, cfg, path = _dataset(make_clip, tmp_path, 3.0, "data.audio.window=wrap", "data.test_clips=4")
    wave = soundfile.read(path, dtype="float32")[0]
    offsets = _dmvr_linspace_offsets(4, 300, 128)
    assert offsets == [0, 57, 114, 172]
    for view, offset in enumerate(offsets):
        start = offset * 160  # 10 ms frames at 16 kHz
        expected = fbank(torch.from_numpy(wave[start : start + 20480].copy()), cfg.data.audio)
        assert torch.equal(dataset[view]["audio"][0], expected), view


def test_wrap_short_file_loops_in_evaluation(make_clip, tmp_path):
    """0.8 s of audio in a 1.28 s window: the file, then its first 0.48 s again (no zero frames)."""
    dataset, cfg, path = _dataset(make_clip, tmp_path, 0.8, "data.audio.window=wrap")
    wave = soundfile.read(path, dtype="float32")[0]
    looped = np.concatenate([wave, wave[: 20480 - wave.size]])
    expected = fbank(torch.from_numpy(looped), cfg.data.audio)
    for view in range(3):
        assert torch.equal(dataset[view]["audio"][0], expected), view


def _training_dataset(make_clip, tmp_path, audio_seconds: float, window: float):
    """A training dataset over one 3 s video with its audio in a wav, clips at the centred start
    (augment disabled): 4 frames at 4 fps, so the clip starts at 1 s."""
    from avmae import augment

    frames = np.full((30, 32, 32, 3), 90, np.uint8)
    wave = _noise(audio_seconds, seed=7)
    video, audio = make_clip("clip.mp4", frames, 10.0), tmp_path / "clip.wav"
    soundfile.write(audio, wave, RATE, subtype="FLOAT")
    cfg = load_config(None, [*GEOMETRY, f"data.audio.seconds={window}", "data.audio.window=wrap", "augment.enabled=false"])
    record = ClipRecord("clip", video, audio=audio, targets={"label": 0})
    manifest = Manifest([record], {"label": ["x"]}, source=tmp_path / "m.csv")
    transforms = augment.build_transforms(cfg, train=True)
    return AVDataset(manifest, cfg.data, cfg.augment, train=True, transforms=transforms), cfg, wave


def test_wrap_training_window_starts_at_the_clip_and_wraps(make_clip, tmp_path):
    """The clip starts at 1 s of 3; the 2.56 s window starts at 1 s of the audio, runs past its
    end at 3 s and continues from 0 for 0.56 s."""
    dataset, cfg, wave = _training_dataset(make_clip, tmp_path, 3.0, 2.56)
    looped = np.concatenate([wave[16000:], wave[: 40960 - 32000]])
    assert torch.equal(dataset[0]["audio"][0], fbank(torch.from_numpy(looped), cfg.data.audio))


def test_wrap_training_short_file_loops_from_the_clip_proportion(make_clip, tmp_path):
    """0.8 s of audio under a 3 s video: the clip at 1 s of 3 starts the window at
    round(1/3 x 80) = 27 frames = 0.27 s of the audio, which then loops."""
    dataset, cfg, wave = _training_dataset(make_clip, tmp_path, 0.8, 1.28)
    looped = np.concatenate([wave[4320:], wave])[:20480]
    assert torch.equal(dataset[0]["audio"][0], fbank(torch.from_numpy(looped), cfg.data.audio))


def test_wrap_rejects_segment_records(make_clip, tmp_path):
    frames = np.full((30, 32, 32, 3), 90, np.uint8)
    video = make_clip("clip.mp4", frames, 10.0, _noise(3.0, seed=1), RATE)
    cfg = load_config(None, [*GEOMETRY, "data.audio.window=wrap"])
    record = ClipRecord("seg", video, targets={"label": 0}, start=0.5, end=2.5)
    dataset = AVDataset(Manifest([record], {"label": ["x"]}, source=tmp_path / "m.csv"), cfg.data, cfg.augment, train=False)
    with pytest.raises(ValueError, match="wrap loops whole files"):
        dataset[0]


@pytest.mark.parametrize("name", [
    "pretrain/avmae_audioset_vitl", "pretrain/avmae_audioset_vitb", "pretrain/avmae_vggsound_vitl",
    "pretrain/avmae_vggsound_vitb", "finetune/avmae_audioset_vitl", "finetune/avmae_vggsound_vitl",
])
def test_avmae_recipes_wrap(name):
    """scenic projects/av_mae reads its spectrogram through DMVR's wrapping samplers."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.data.audio.window == "wrap"
