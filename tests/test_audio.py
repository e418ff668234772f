"""Audio windows from mp4 tracks and wav/flac files, the reference fbank, and the norm-stats tool."""

from __future__ import annotations

import runpy
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from avmae.config import AudioConfig
from avmae.data.audio import AudioDecodeError, NoAudioError, fbank, fbank_stats, kaldi_fbank, read_audio

RATE = 16000
REPO = Path(__file__).resolve().parents[1]


def click_track(seconds: float, click_at: float, rate: int = RATE) -> np.ndarray:
    """Silence with one 10 ms click of amplitude 0.8 starting at ``click_at`` seconds."""
    wave = np.zeros(int(seconds * rate), np.float32)
    start = int(round(click_at * rate))
    wave[start : start + rate // 100] = 0.8
    return wave


def onset(wave: torch.Tensor, rate: int = RATE) -> float:
    """Time in seconds of the first sample louder than 0.3."""
    return int(torch.nonzero(wave.abs() > 0.3)[0]) / rate


def still_frames(num_frames: int) -> np.ndarray:
    return np.full((num_frames, 32, 32, 3), 128, np.uint8)


def test_fbank_of_a_wav_equals_the_reference(tmp_path):
    """The features of a 16 kHz wav equal torchaudio's Kaldi fbank with the arguments of CAV-MAE,
    AST and AudioMAE, padded or cut to the target length, and the configured normalisation."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * RATE) / RATE
    signal = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size) + 0.02).astype(np.float32)
    path = tmp_path / "tone.wav"
    soundfile.write(path, signal, RATE, subtype="FLOAT")

    wave = read_audio(path, 0.0, 3.0, RATE)
    stored = torch.from_numpy(soundfile.read(path, dtype="float32")[0])
    assert torch.equal(wave, stored)
    reference = torchaudio.compliance.kaldi.fbank(
        (stored - stored.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
    )
    assert reference.shape == (298, 128)
    for seconds, norm_mean, norm_std in ((2.56, -4.2677393, 9.1379948), (4.0, -5.081, 4.4849)):  # cut, padded
        cfg = AudioConfig(seconds=seconds, norm_mean=norm_mean, norm_std=norm_std)
        target = cfg.target_length
        expected = torch.nn.functional.pad(reference, (0, 0, 0, max(0, target - 298)))[:target]
        ours = fbank(wave, cfg)
        assert ours.shape == (target, 128) and ours.dtype == torch.float32
        assert torch.allclose(ours, (expected - norm_mean) / norm_std, atol=1e-5, rtol=0)


def test_window_from_mp4_track_is_aligned_and_zero_padded(make_clip):
    path = make_clip("click.mp4", still_frames(50), fps=25, audio=click_track(2.0, 1.0))
    wave = read_audio(path, 0.5, 1.0, RATE)
    assert wave.shape == (RATE,) and wave.dtype == torch.float32
    assert onset(wave) + 0.5 == pytest.approx(1.0, abs=2e-3)  # AAC smears a click by ~1 ms
    # a window reaching past both ends of the 2 s file: zeros outside, click in place
    wide = read_audio(path, -1.0, 4.0, RATE)
    assert wide.shape == (4 * RATE,)
    assert onset(wide) - 1.0 == pytest.approx(1.0, abs=2e-3)
    assert wide[: RATE].abs().max() == 0 and wide[3 * RATE + 100 :].abs().max() == 0
    # resampled on the way (the model's rate is a config value)
    assert onset(read_audio(path, 0.0, 2.0, 22050), 22050) == pytest.approx(1.0, abs=2e-3)


def test_wav_resampling_and_first_channel(tmp_path):
    rate = 44100
    left = click_track(2.0, 0.75, rate)
    right = click_track(2.0, 1.5, rate)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, np.stack([left, right], axis=1), rate)
    wave = read_audio(path, 0.25, 1.5, RATE)
    assert wave.shape == (int(1.5 * RATE),)
    assert onset(wave) + 0.25 == pytest.approx(0.75, abs=1e-3)  # left channel only
    assert wave[int(1.2 * RATE) :].abs().max() < 0.05  # the right channel's click is not there


def test_video_only_silent_and_damaged_files(make_clip, tmp_path):
    video_only = make_clip("video_only.mp4", still_frames(25), fps=25)
    with pytest.raises(NoAudioError, match="video_only.mp4"):
        read_audio(video_only, 0.0, 1.0, RATE)
    silent = make_clip("silent.mp4", still_frames(25), fps=25, audio=np.zeros(RATE, np.float32))
    wave = read_audio(silent, 0.0, 1.0, RATE)
    assert wave.abs().max() == 0
    features = fbank(wave, AudioConfig(seconds=1.0))
    assert torch.isfinite(features).all() and features.shape == (100, 128)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        read_audio(broken, 0.0, 1.0, RATE)
    with pytest.raises(AudioDecodeError, match="nothing.mp4"):
        read_audio(tmp_path / "nothing.mp4", 0.0, 1.0, RATE)


def test_fbank_stats_and_tool(make_clip, tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = make_clip("a.mp4", still_frames(25), fps=25, audio=(0.1 * rng.standard_normal(RATE)).astype(np.float32)).parent
    soundfile.write(root / "b.wav", (0.3 * rng.standard_normal(RATE // 2)).astype(np.float32), RATE)
    make_clip("c.mp4", still_frames(25), fps=25)  # no audio: skipped
    cfg = AudioConfig(seconds=1.28)
    stats = fbank_stats([root / "a.mp4", root / "b.wav", root / "c.mp4"], cfg)
    # the statistics count only the frames of real samples: 1 s and 0.5 s of audio
    frames_a = kaldi_fbank(read_audio(root / "a.mp4", 0, 1.28, RATE), cfg)[: 1 + (RATE - 400) // 160]
    frames_b = kaldi_fbank(read_audio(root / "b.wav", 0, 1.28, RATE), cfg)[: 1 + (RATE // 2 - 400) // 160]
    both = torch.cat([frames_a, frames_b]).double()
    assert stats.clips == 2 and stats.frames == both.shape[0]
    assert stats.mean == pytest.approx(float(both.mean()), abs=1e-6)
    assert stats.std == pytest.approx(float(both.std(unbiased=False)), abs=1e-6)
    assert [p.name for p, _ in stats.skipped] == ["c.mp4"]

    (root / "train.csv").write_text("id,video,label\na,a.mp4,0\nc,c.mp4,1\ngone,gone.mp4,1\n")
    (root / "classes.txt").write_text("x\ny\n")
    config = tmp_path / "stats.yaml"
    config.write_text(f"data:\n  root: {root}\n  audio:\n    seconds: 1.28\n")
    tool = runpy.run_path(str(REPO / "tools" / "compute_norm_stats.py"))
    assert tool["main"](["--config", str(config)]) == 0
    out, err = capsys.readouterr()
    single = fbank_stats([root / "a.mp4"], cfg)
    assert f"norm_mean: {single.mean:.7f}" in out and f"norm_std: {single.std:.7f}" in out
    assert "c.mp4: the file has no audio stream" in err and "gone.mp4: file not found" in err


def test_long_file_window_and_packed_integer_stereo(make_clip, tmp_path):
    # a 30 s video: the window far into it is read after a seek and lands at the right time
    audio = click_track(30.0, 20.25)
    audio[int(5 * RATE) : int(5 * RATE) + 160] = 0.8
    path = make_clip("long.mp4", still_frames(60), fps=2, audio=audio)
    assert onset(read_audio(path, 19.5, 2.0, RATE)) + 19.5 == pytest.approx(20.25, abs=2e-3)
    assert onset(read_audio(path, 4.0, 2.0, RATE)) + 4.0 == pytest.approx(5.0, abs=2e-3)

    # 16-bit interleaved stereo at 8 kHz in a Matroska file: first channel, scaled, resampled
    rate = 8000
    left, right = click_track(2.0, 0.5, rate), click_track(2.0, 1.0, rate)
    stereo = (np.stack([left, right], axis=1) * 32767).astype(np.int16)
    mka = tmp_path / "stereo.mka"
    with av.open(str(mka), "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="stereo")
        for begin in range(0, stereo.shape[0], 1000):
            frame = av.AudioFrame.from_ndarray(stereo[begin : begin + 1000].reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate, frame.pts = rate, begin
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    wave = read_audio(mka, 0.0, 2.0, RATE)
    assert onset(wave) == pytest.approx(0.5, abs=1e-3)
    assert float(wave[int(0.505 * RATE)]) == pytest.approx(0.8, abs=0.01)  # mid-click, int16 scaled back
    assert wave[int(0.9 * RATE) :].abs().max() < 0.05  # the right channel's click is not there
