"""The synthetic dataset: real mp4 files, exact rates, determinism, bad clips, splits, synchrony."""

from __future__ import annotations

import colorsys
import csv
import json
import runpy
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from avmae.data.synthetic import (
    BAD_KINDS,
    LINKED_PITCH_HZ,
    SHORT_SECONDS,
    class_specs,
    generate_dataset,
    render_clip,
    split_by_class,
    write_av_file,
)

REPO = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def decode(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """All frames ``(T, H, W, 3)`` uint8 and the audio ``(N,)`` float32 (None without a stream)."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return frames, None
        audio = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    return frames, audio


def bad_clips(root: Path) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for row in read_rows(root / "bad_clips.csv"):
        kinds.setdefault(row["kind"], []).append(row["id"])
    return kinds


def good_clip(root: Path) -> Path:
    bad = {row["id"] for row in read_rows(root / "bad_clips.csv")}
    rows = [r for split in ("train", "val", "test") for r in read_rows(root / f"{split}.csv")]
    return root / next(r["video"] for r in rows if r["id"] not in bad)


# --- write_av_file ----------------------------------------------------------------------------


@pytest.mark.parametrize("fps, rate", [(25.0, Fraction(25)), (29.97, Fraction(30000, 1001))])
def test_write_av_file_rate_duration_and_timing(make_clip, fps, rate):
    """The declared rate is exact, frame i is at i / fps, and a click written at sample n decodes there."""
    num_frames, sample_rate = 30, 16000
    # A square moving over a colour ramp: smooth content a lossy codec keeps close.
    frames = np.zeros((num_frames, 32, 48, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 255, 48, dtype=np.uint8)
    frames[..., 2] = 90
    for i in range(num_frames):
        frames[i, 8:20, i : i + 12] = (240, 240, 40)
    seconds = num_frames / float(rate)
    audio = np.zeros(int(seconds * sample_rate), np.float32)
    click = int(0.5 * sample_rate)
    audio[click : click + 32] = 0.8
    path = make_clip("clip.mp4", frames, fps, audio, sample_rate)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == rate
        assert (stream.width, stream.height) == (48, 32)
        times = [float(f.time) for f in container.decode(video=0)]
    assert len(times) == num_frames
    np.testing.assert_allclose(times, np.arange(num_frames) / float(rate), atol=1e-3)
    with av.open(str(path)) as container:
        assert container.duration / av.time_base == pytest.approx(seconds, abs=0.05)

    decoded, sound = decode(path)
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # lossy, but the picture survives
    onset = np.flatnonzero(np.abs(sound) > 0.3)[0]
    assert abs(onset - click) <= 16  # within 1 ms: the encoder's priming samples are trimmed


def test_write_av_file_rejects_bad_input(tmp_path):
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="odd.mp4.*even"):
        write_av_file(tmp_path / "odd.mp4", np.zeros((4, 31, 32, 3), np.uint8), 25.0)
    with pytest.raises(ValueError, match="float.mp4.*uint8"):
        write_av_file(tmp_path / "float.mp4", frames.astype(np.float32), 25.0)
    with pytest.raises(ValueError, match="loud.mp4.*exceeds"):
        write_av_file(tmp_path / "loud.mp4", frames, 25.0, np.full(1600, 1.5, np.float32))
    with pytest.raises(ValueError, match="stereo.mp4.*mono"):
        write_av_file(tmp_path / "stereo.mp4", frames, 25.0, np.zeros((2, 1600), np.float32))


# --- streams, as other tools see them ---------------------------------------------------------


def ffprobe_streams(path: Path) -> list[tuple[str, str]]:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,codec_name", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    return sorted((s["codec_type"], s["codec_name"]) for s in json.loads(result.stdout)["streams"])


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not on PATH")
def test_ffprobe_sees_h264_and_aac(synthetic_root):
    assert ffprobe_streams(good_clip(synthetic_root)) == [("audio", "aac"), ("video", "h264")]
    video_only = synthetic_root / "clips" / f"{bad_clips(synthetic_root)['video_only'][0]}.mp4"
    assert ffprobe_streams(video_only) == [("video", "h264")]


# --- the dataset ------------------------------------------------------------------------------


def test_manifests_classes_and_stratified_splits(synthetic_root, synthetic_settings):
    classes = (synthetic_root / "classes.txt").read_text().splitlines()
    assert classes == [spec.name for spec in class_specs(synthetic_settings["num_classes"])]
    assert classes[0] == "bounce_click"

    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        with open(synthetic_root / f"{split}.csv", newline="") as f:
            assert f.readline().strip() == "id,video,label"
        rows = read_rows(synthetic_root / f"{split}.csv")
        for row in rows:
            assert row["id"] not in seen, f"{row['id']} is in {seen.get(row['id'])} and {split}"
            seen[row["id"]] = split
            assert row["video"] == f"clips/{row['id']}.mp4"
        counts = np.bincount([int(r["label"]) for r in rows], minlength=len(classes))
        # 6 clips per class: 4 / 1 / 1 in every class.
        assert counts.tolist() == [4 if split == "train" else 1] * len(classes), split
    assert len(seen) == synthetic_settings["num_clips"]

    metadata = [json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()]
    assert {m["id"]: m["split"] for m in metadata} == seen
    assert all(m["class"] == classes[m["label"]] for m in metadata)


def test_split_by_class_is_70_15_15_in_every_class():
    labels = np.random.default_rng(1).permutation(np.arange(803) % 8)
    splits = np.array(split_by_class(labels, np.random.default_rng(2)))
    for label in range(8):
        members = splits[labels == label]
        for name, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
            assert abs(np.mean(members == name) - share) < 0.02, (label, name)


def test_every_bad_kind_behaves_as_described(synthetic_root, synthetic_settings):
    kinds = bad_clips(synthetic_root)
    assert set(kinds) == set(BAD_KINDS)
    train_ids = {r["id"] for r in read_rows(synthetic_root / "train.csv")}
    assert all(set(ids) & train_ids for ids in kinds.values()), "the training loader must meet every kind"
    clip = {kind: synthetic_root / "clips" / f"{ids[0]}.mp4" for kind, ids in kinds.items()}

    frames, audio = decode(clip["video_only"])
    assert audio is None and len(frames) == round(synthetic_settings["duration"] * synthetic_settings["fps"])

    frames, audio = decode(clip["silent"])
    assert audio is not None
    assert audio.size >= synthetic_settings["duration"] * synthetic_settings["sample_rate"]
    assert np.abs(audio).max() == 0.0

    frames, audio = decode(clip["short"])
    assert len(frames) == round(SHORT_SECONDS * synthetic_settings["fps"])
    assert audio.size < 0.6 * synthetic_settings["sample_rate"]

    assert clip["truncated"].stat().st_size > 1000  # real bytes, yet undecodable
    with pytest.raises(av.error.FFmpegError):
        decode(clip["truncated"])
    decord = pytest.importorskip("decord")
    with pytest.raises(RuntimeError):  # decord raises a plain RuntimeError here, not DECORDError
        decord.VideoReader(str(clip["truncated"]))

    assert not clip["missing"].exists()

    _, audio = decode(good_clip(synthetic_root))
    assert np.abs(audio).max() > 0.05


def test_same_seed_same_bytes_any_workers_other_seed_other_content(
    synthetic_root, synthetic_settings, tmp_path
):
    """Two processes write byte-identical files to the single-process fixture; seed 1 differs."""
    again = tmp_path / "again"
    summary = generate_dataset(again, workers=2, **synthetic_settings)
    assert summary["workers"] == 2
    names = sorted(p.relative_to(synthetic_root) for p in synthetic_root.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        assert (synthetic_root / name).read_bytes() == (again / name).read_bytes(), name

    first = good_clip(synthetic_root).relative_to(synthetic_root)
    other = tmp_path / "other"
    index = int(first.stem.split("_")[1])
    settings = {**synthetic_settings, "num_clips": index + 1, "bad_fraction": 0.0, "seed": 1}
    generate_dataset(other, **settings, workers=1)
    frames_seed0, audio_seed0 = decode(synthetic_root / first)
    frames_seed1, audio_seed1 = decode(other / first)
    assert np.abs(frames_seed0.astype(int) - frames_seed1).mean() > 10
    size = min(audio_seed0.size, audio_seed1.size)
    assert np.abs(audio_seed0[:size] - audio_seed1[:size]).max() > 0.01


def test_generate_refuses_to_overwrite_without_asking(tmp_path):
    small = dict(num_clips=2, num_classes=2, seed=0, duration=1.0, size=32, workers=1)
    generate_dataset(tmp_path, **small)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_dataset(tmp_path, **small)
    generate_dataset(tmp_path, **small, overwrite=True)


def test_cli_writes_and_summarises(tmp_path, capsys):
    tool = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"))
    argv = ["--out", str(tmp_path), "--num-clips", "8", "--num-classes", "2", "--seed", "3",
            "--duration", "1.0", "--fps", "29.97", "--size", "32", "--bad-fraction", "0.1", "--workers", "1"]
    summary = tool["main"](argv)
    printed = capsys.readouterr().out
    assert "wrote 8 clips" in printed and "bounce_click" in printed and "truncated 1" in printed
    assert summary["bad"] == {kind: 1 for kind in BAD_KINDS}
    with av.open(str(good_clip(tmp_path))) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)


# --- what a class is --------------------------------------------------------------------------


def test_class_specs_are_unique_pairs_up_to_64():
    specs = class_specs(64)
    assert len({(s.motion, s.sound) for s in specs}) == 64
    assert len({s.name for s in specs}) == 64
    assert all(s.period[1] < 1.0 for s in specs)  # at least two events in a 2 s window
    with pytest.raises(ValueError, match="num_classes"):
        class_specs(65)


def onset_ratio(audio: np.ndarray, sample: int) -> float:
    """RMS in the 5 ms after ``sample`` over the RMS from 10 to 2 ms before it."""
    after = audio[sample : sample + 80]
    before = audio[sample - 160 : sample - 32]
    return float(np.sqrt(np.mean(after**2)) / (np.sqrt(np.mean(before**2)) + 1e-6))


@pytest.mark.parametrize("class_index", range(8))
def test_every_sound_starts_at_the_events_in_the_decoded_file(make_clip, class_index):
    spec = class_specs(8)[class_index]
    clip = render_clip(spec, np.random.default_rng(class_index), duration=2.0, nuisance=0.0)
    _, audio = decode(make_clip("clip.mp4", clip.frames, 25.0, clip.audio))
    # Skip the first AAC frame (64 ms), where the encoder's start-up blurs the signal.
    events = [t for t in clip.events if t > 0.1]
    assert len(events) >= 2
    for t in events:
        assert onset_ratio(audio, int(round(t * 16000))) > 20.0, (spec.name, t)
        # Half a period later nothing starts: the check above can fail.
        between = t + 0.5 * clip.meta["period"]
        if between < 1.95:
            assert onset_ratio(audio, int(round(between * 16000))) < 3.0, (spec.name, between)


def object_track(frames: np.ndarray, colour: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the object's mean row (y grows downwards) and its area, on a plain background.

    Pixels count as the object where they are at least 75 % of the way from the background
    colour to the object's colour, which leaves out its fainter trail.
    """
    frames = frames.astype(np.float32)
    background = np.median(frames.reshape(-1, 3), axis=0)
    towards = np.asarray(colour, np.float32) - background
    opacity = (frames - background) @ towards / (towards @ towards)
    mask = opacity > 0.75
    rows = np.array([np.nonzero(m)[0].mean() for m in mask])
    return rows, mask.sum(axis=(1, 2))


@pytest.mark.parametrize("motion, fps", [("bounce", 25.0), ("pulse", 25.0), ("bounce", 29.97)])
def test_visual_event_and_sound_share_their_instants(make_clip, motion, fps):
    """A bounce is lowest, a pulse largest, at the frame of each event, where its sound starts."""
    spec = next(s for s in class_specs(8) if s.motion == motion)
    clip = render_clip(spec, np.random.default_rng(7), duration=2.5, fps=fps, nuisance=0.0)
    frames, audio = decode(make_clip("clip.mp4", clip.frames, fps, clip.audio))
    rows, area = object_track(frames, clip.meta["colour"])
    signal = rows if motion == "bounce" else area
    checked = 0
    for t in clip.events:
        position = t * fps
        low, high = int(np.floor(position)) - 2, int(np.ceil(position)) + 2
        if low < 0 or high >= len(frames) or t < 0.1:
            continue
        peak = low + int(np.argmax(signal[low : high + 1]))
        assert abs(peak - position) <= 1.0, (motion, t, peak, position)
        assert onset_ratio(audio, int(round(t * 16000))) > 20.0
        checked += 1
    assert checked >= 2


def test_hue_sets_pitch_ties_the_pitch_to_the_decoded_background_and_changes_nothing_else(make_clip):
    """With ``hue_sets_pitch`` a clip's pitch is ``LINKED_PITCH_HZ * 2 ** (2 * hue - 1)`` whatever
    its class, the hue measured here on the decoded frames and the pitch on the decoded sound (a
    whistle: a pure tone); the frames, events and every other draw are those of the unlinked clip."""
    spec = next(s for s in class_specs(8) if s.sound == "whistle")
    for seed in range(4):
        linked = render_clip(spec, np.random.default_rng(seed), duration=2.0, nuisance=0.0, hue_sets_pitch=True)
        free = render_clip(spec, np.random.default_rng(seed), duration=2.0, nuisance=0.0)
        assert np.array_equal(linked.frames, free.frames) and np.array_equal(linked.events, free.events)
        others = ("pitch_hz", "hue_sets_pitch")
        assert {k: v for k, v in linked.meta.items() if k not in others} == {
            k: v for k, v in free.meta.items() if k not in others
        }
        frames, audio = decode(make_clip(f"clip{seed}.mp4", linked.frames, 25.0, linked.audio))
        # at nuisance 0 the background is one colour: the median pixel of the first frame
        red, green, blue = np.median(frames[0].reshape(-1, 3).astype(np.float64), axis=0) / 255.0
        expected = LINKED_PITCH_HZ * 2.0 ** (2.0 * colorsys.rgb_to_hsv(red, green, blue)[0] - 1.0)
        # the whistle's vibrato spreads its power evenly around the pitch: take the centroid
        # of the power within 100 Hz of the strongest bin
        power = np.abs(np.fft.rfft(audio * np.hanning(audio.size))) ** 2
        freqs = np.fft.rfftfreq(audio.size, 1 / 16000)
        near = np.abs(freqs - freqs[np.argmax(power)]) < 100.0
        assert (freqs[near] * power[near]).sum() / power[near].sum() == pytest.approx(expected, rel=0.015)
        # unlinked, the pitch is its own draw, which does not follow the hue
        assert free.meta["pitch_hz"] != pytest.approx(expected, rel=0.03)
