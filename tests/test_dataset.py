"""AVDataset on real mp4 files: batches through worker processes, bad clips of every kind,
determinism, multi-view evaluation, audio-video time alignment; and the weighted sampler."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from avmae.config import load_config
from avmae.data.audio import fbank, read_audio
from avmae.data.collate import collate_clips
from avmae.data import build_dataset
from avmae.data.dataset import AVDataset, TooManyDecodeFailures, _read_clips, _read_windows
from avmae.data.manifests import ClipRecord, Manifest, read_manifest
from avmae.data.sampler import DistributedWeightedSampler, balanced_weights
from avmae.augment.transforms import eval_video_transform, normalize_video
from avmae.data.video import open_video

# tiny clips: 4 frames at 4 fps (1 s of the 2.5 s synthetic clips), 48 px crops, 1.28 s of audio
TINY = [
    "data.video.num_frames=4", "data.video.frame_rate=4", "data.video.resize=56", "data.video.size=48",
    "data.audio.seconds=1.28", "data.test_clips=2", "data.max_decode_failures=0.5",
]


def tiny_config(root: Path, tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.root={root}", f"train.output_dir={tmp_path / 'run'}", *TINY, *overrides])


def bad_kinds(root: Path, split_ids: set[str]) -> dict[str, str]:
    with open(root / "bad_clips.csv") as f:
        return {row["id"]: row["kind"] for row in csv.DictReader(f) if row["id"] in split_ids}


def split_ids(root: Path, split: str) -> set[str]:
    with open(root / f"{split}.csv") as f:
        return {row["id"] for row in csv.DictReader(f)}


class PlainTransforms:
    """Training transforms without augmentation, so a test can read pixels and sounds back."""

    def __init__(self, video_cfg):
        self.video_cfg = video_cfg

    def video(self, frames, generator):
        return eval_video_transform(frames, self.video_cfg)

    def waveform(self, wave, generator):
        return wave

    def fbank(self, features, generator):
        return features


def model_video(item: dict, cfg) -> torch.Tensor:
    """An item's uint8 video as the model sees it (normalised, as the engine does on the device)."""
    return normalize_video(item["video"], cfg.data.video.mean, cfg.data.video.std)


def test_dataloader_with_two_workers_over_the_synthetic_dataset(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path, "data.batch_size=4")
    ids = split_ids(synthetic_root, "train")
    bad = bad_kinds(synthetic_root, ids)
    assert sorted(bad.values()) == ["missing", "short", "silent", "truncated", "video_only"]
    dataset = build_dataset(cfg, "train", train=True)
    # the missing file is excluded when the dataset is built, and listed
    assert len(dataset) == len(ids) - 1
    missing_list = (tmp_path / "run" / "missing_train.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in missing_list] == [i for i, k in bad.items() if k == "missing"]

    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    seen, failures, batches = [], 0, 0
    for batch in loader:
        b = batch["video"].shape[0]
        assert batch["video"].shape == (b, 3, 4, 48, 48) and batch["video"].dtype == torch.uint8
        assert batch["audio"].shape == (b, 1, 128, 128) and batch["audio"].dtype == torch.float32
        assert batch["targets"]["label"].dtype == torch.long and batch["targets"]["label"].shape == (b,)
        assert torch.isfinite(batch["video"]).all() and torch.isfinite(batch["audio"]).all()
        seen += batch["id"]
        failures += int(batch["failures"].sum())
        assert int(batch["no_audio"].sum()) == 0
        batches += 1
    assert batches == math.ceil(len(dataset) / 4)
    # video-only (policy skip), short and truncated clips were replaced by decodable ones
    undecodable = {i for i, k in bad.items() if k in ("video_only", "short", "truncated")}
    assert failures >= len(undecodable) and not undecodable & set(seen)
    assert {i for i, k in bad.items() if k == "silent"} <= set(seen)  # silent audio is valid audio


def test_items_do_not_depend_on_workers_and_follow_the_epoch(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path, "augment.two_views=true")
    dataset = build_dataset(cfg, "train", train=True)
    subset = torch.utils.data.Subset(dataset, range(6))

    def collect(loader) -> dict:
        batches = list(loader)
        return {key: torch.cat([b[key] for b in batches]) for key in ("video", "audio", "video2", "audio2")}

    def in_process() -> dict:
        return collect(DataLoader(subset, batch_size=3, num_workers=0))

    # persistent workers, as the engine uses them: set_epoch must reach the running workers
    workers = DataLoader(subset, batch_size=3, num_workers=2, persistent_workers=True)
    single, double = in_process(), collect(workers)
    for key in single:
        assert torch.equal(single[key], double[key]), key
    assert not torch.equal(single["video"], single["video2"])  # two independent views
    dataset.set_epoch(1)
    later = collect(workers)
    assert not torch.equal(later["video"], single["video"])
    assert torch.equal(later["audio2"], in_process()["audio2"])
    dataset.set_epoch(0)
    assert torch.equal(in_process()["video"], single["video"])  # resuming epoch 0 reproduces it


def test_video_only_clips_under_both_policies(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path, "data.audio.no_audio=silence")
    val_bad = bad_kinds(synthetic_root, split_ids(synthetic_root, "val"))
    assert list(val_bad.values()) == ["video_only"]
    (video_only,) = val_bad
    dataset = build_dataset(cfg, "val", train=False)
    items = [dataset[i] for i in range(len(dataset))]
    silent = [it for it in items if it["id"] == video_only]
    assert len(silent) == 2 and all(it["no_audio"] == 1 and it["failures"] == 0 for it in silent)
    silence = fbank(torch.zeros(int(1.28 * 16000)), cfg.data.audio)
    assert torch.equal(silent[0]["audio"][0], silence)
    assert sum(it["no_audio"] for it in items) == 2

    skip = build_dataset(tiny_config(synthetic_root, tmp_path), "val", train=False)
    bad_index = next(i for i, r in enumerate(skip.records) if r.id == video_only)
    replaced = skip[bad_index * skip.views + 1]
    assert replaced["failures"] >= 1 and replaced["id"] != video_only and replaced["view"] == 1
    assert replaced["index"] != bad_index and skip.records[replaced["index"]].id == replaced["id"]
    assert skip.failures == 1  # distinct bad clips, over all processes


def test_too_many_failures_stop_the_run(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path, "data.max_decode_failures=0.0")
    dataset = build_dataset(cfg, "train", train=True)
    truncated = next(i for i, r in enumerate(dataset.records) if bad_kinds(synthetic_root, {r.id}).get(r.id) == "truncated")
    with pytest.raises(TooManyDecodeFailures) as stopped:
        dataset[truncated]
    message = str(stopped.value)
    assert f"1 of {len(dataset.records)} clips failed" in message and dataset.records[truncated].video.name in message


def test_short_clip_is_replaced_and_named_in_the_log(synthetic_root, tmp_path, caplog):
    dataset = build_dataset(tiny_config(synthetic_root, tmp_path), "train", train=True)
    short = next(i for i, r in enumerate(dataset.records) if bad_kinds(synthetic_root, {r.id}).get(r.id) == "short")
    with caplog.at_level("WARNING"):
        item = dataset[short]
        dataset[short]
    assert item["failures"] >= 1 and item["index"] != short
    logged = [r.getMessage() for r in caplog.records if "shorter than" in r.getMessage()]
    assert len(logged) == 1 and dataset.records[short].video.name in logged[0]  # once per file


def test_multi_view_evaluation(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path, "data.test_crops=3")
    dataset = build_dataset(cfg, "test", train=False)
    manifest = read_manifest(cfg.data, "test")
    assert dataset.views == 6 and len(dataset) == 6 * len(dataset.records)
    good = next(i for i, r in enumerate(dataset.records) if not bad_kinds(synthetic_root, {r.id}))
    views = [dataset[good * 6 + v] for v in range(6)]
    assert [v["view"] for v in views] == list(range(6)) and {v["index"] for v in views} == {good}
    assert all(v["targets"]["label"] == manifest.records[good].targets["label"] for v in views)
    # views 0-2: first clip, three crops; views 3-5: second clip. Same clip, same audio.
    assert torch.equal(views[0]["audio"], views[2]["audio"]) and not torch.equal(views[0]["audio"], views[3]["audio"])
    assert not torch.equal(views[0]["video"], views[1]["video"])
    again = dataset[good * 6 + 4]
    assert torch.equal(again["video"], views[4]["video"])  # evaluation is deterministic


def test_audio_and_video_are_aligned_in_time(make_clip, tmp_path):
    """A flash and a click at the same instant land at the same place in the video clip and in
    the audio window, whatever the random clip start."""
    fps, rate, event = 25, 16000, 1.52
    frames = np.full((75, 32, 32, 3), 20, np.uint8)
    first = int(round(event * fps))
    frames[first : first + 4] = 235  # bright from 1.52 s to 1.68 s
    audio = np.zeros(3 * rate, np.float32)
    audio[int(event * rate) : int(event * rate) + 160] = 0.8  # 10 ms click at 1.52 s
    path = make_clip("flash.mp4", frames, fps, audio, rate)

    cfg = load_config(None, [
        "data.video.num_frames=8", "data.video.frame_rate=8", "data.video.resize=32", "data.video.size=32",
        "data.audio.seconds=1.28", "data.test_clips=1", "data.audio.window=centred",
    ])
    manifest = Manifest([ClipRecord("flash", path, targets={"label": 0})], {"label": ["x"]}, source=tmp_path / "m.csv")
    span, window = 1.0, 1.28
    offsets = []
    train = AVDataset(manifest, cfg.data, cfg.augment, train=True, transforms=PlainTransforms(cfg.data.video))
    evaluation = AVDataset(manifest, cfg.data, cfg.augment, train=False)
    for dataset, epochs in ((train, range(10)), (evaluation, [0])):
        for epoch in epochs:
            dataset.set_epoch(epoch)
            item = dataset[0]
            brightness = model_video(item, cfg).mean(dim=(0, 2, 3))
            bright = torch.nonzero(brightness > brightness.min() + 1.0).flatten()
            if bright.numel() == 0:
                continue  # the flash fell outside this clip
            # the flash starts within one sampled frame (1/8 s) before the first bright frame,
            # so flash_in_clip overestimates it by up to 0.125 s
            flash_in_clip = bright[0].item() / 8
            # loudest fbank frame (frame k starts at k / 100 s), ignoring the 2 frames of padding
            energy = item["audio"][0, :126].sum(dim=1)
            click_in_window = torch.argmax(energy).item() / 100
            # clip centre == window centre, so the offsets from the two centres agree
            offsets.append((click_in_window - window / 2) - (flash_in_clip - span / 2))
    assert len(offsets) >= 6
    assert all(-0.125 - 0.02 <= o <= 0.02 for o in offsets), offsets
    # the evaluation clip is centred on the file: frames at 1.0 .. 1.875 s, flash at frame 5
    evaluation.set_epoch(0)
    brightness = model_video(evaluation[0], cfg).mean(dim=(0, 2, 3))
    assert torch.argmax(brightness).item() == 5


def test_segments_of_a_long_video(make_clip, tmp_path):
    """EPIC-style records: clips stay inside their segment, audio follows the clip."""
    fps = 10
    levels = (np.arange(60) * 4).astype(np.uint8)  # frame i (shown from i / 10 s) has level 4 i
    frames = np.broadcast_to(levels[:, None, None, None], (60, 32, 32, 3)).copy()
    audio = np.zeros(6 * 16000, np.float32)
    audio[int(3.5 * 16000) : int(3.5 * 16000) + 160] = 0.8  # a click at 3.5 s
    path = make_clip("long.mp4", frames, fps, audio)
    cfg = load_config(None, [*TINY, "data.video.resize=32", "data.video.size=32", "data.audio.window=centred"])
    records = [ClipRecord("seg", path, targets={"label": 0}, start=3.0, end=4.5),
               ClipRecord("tiny", path, targets={"label": 0}, start=5.0, end=5.2)]
    manifest = Manifest(records, {"label": ["x"]}, source=tmp_path / "m.csv")
    mean, std = cfg.data.video.mean[0], cfg.data.video.std[0]

    def times(item) -> np.ndarray:
        level = (model_video(item, cfg)[0].mean(dim=(1, 2)) * std + mean) * 255
        return np.round(level.numpy() / 4) / fps

    train = AVDataset(manifest, cfg.data, cfg.augment, train=True, transforms=PlainTransforms(cfg.data.video))
    for epoch in range(4):
        train.set_epoch(epoch)
        clip = times(train[0])
        assert clip[0] >= 3.0 - 0.1 and clip[-1] <= 4.25 + 1e-6, clip  # starts in [3.0, 3.5]
        assert clip[1:] - clip[:-1] == pytest.approx([0.25] * 3, abs=0.11)
    # playback speed 2 doubles the stride: a 2 s clip, longer than the segment, centred on it
    fast = load_config(None, [*TINY, "data.video.resize=32", "data.video.size=32", "augment.speed_range=[2.0,2.0]"])
    train = AVDataset(manifest, fast.data, fast.augment, train=True, transforms=PlainTransforms(cfg.data.video))
    assert times(train[0]).tolist() == pytest.approx([2.7, 3.2, 3.7, 4.2])
    evaluation = AVDataset(manifest, cfg.data, cfg.augment, train=False)
    assert times(evaluation[0]).tolist() == pytest.approx([3.0, 3.2, 3.5, 3.7])  # first of 2 clips: start 3.0
    assert times(evaluation[1]).tolist() == pytest.approx([3.5, 3.7, 4.0, 4.2])  # second: start 3.5
    # clip 0 is centred on 3.5 s, so is its audio window: the click sits in the middle
    energy = evaluation[0]["audio"][0, :126].sum(dim=1)
    assert abs(torch.argmax(energy).item() - 64) <= 2
    # a segment shorter than the clip gets the clip centred on it: 4.6 .. 5.6 s
    assert times(evaluation[2])[0] == pytest.approx(4.6)


# ---------------------------------------------------------------------------------------------
# sampler


def multi_label_manifest() -> Manifest:
    labels = [[0], [0], [0, 1], [2], [0], [1]]
    records = [ClipRecord(str(i), Path(f"{i}.mp4"), targets={"label": l}) for i, l in enumerate(labels)]
    return Manifest(records, {"label": ["a", "b", "c"]}, multi_label=True)


def test_balanced_weights_follow_the_audioset_rule():
    weights = balanced_weights(multi_label_manifest())
    counts = {0: 4, 1: 2, 2: 1}
    class_weight = {c: 1000.0 / (n + 0.01) for c, n in counts.items()}
    expected = [class_weight[0], class_weight[0], class_weight[0] + class_weight[1], class_weight[2], class_weight[0], class_weight[1]]
    assert weights.tolist() == pytest.approx(expected)
    single = Manifest([ClipRecord("x", None, targets={"label": 1}), ClipRecord("y", None, targets={"label": 1})], {"label": ["a", "b"]})
    assert balanced_weights(single).tolist() == pytest.approx([1000 / 2.01] * 2)


def test_weighted_sampler_shards_one_draw_across_ranks():
    weights = balanced_weights(multi_label_manifest())
    ranks = [DistributedWeightedSampler(weights, num_samples=3000, num_replicas=2, rank=r, seed=7) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert all(len(s) == 3000 == len(sampler) for s, sampler in zip(shares, ranks))
    draw = ranks[0].global_draw()
    assert torch.equal(draw, ranks[1].global_draw())  # every rank computes the same global draw
    # disjoint positions of the draw, together exactly the draw
    assert shares[0] == draw[0::2].tolist() and shares[1] == draw[1::2].tolist()
    interleaved = [i for pair in zip(*shares) for i in pair]
    assert interleaved == draw.tolist()
    # frequencies follow the weights
    frequency = Counter(shares[0] + shares[1])
    probability = weights / weights.sum()
    for index in range(len(weights)):
        assert frequency[index] / 6000 == pytest.approx(float(probability[index]), abs=0.02)
    for sampler in ranks:
        sampler.set_epoch(1)
    assert list(ranks[0]) != shares[0]
    assert DistributedWeightedSampler(weights).num_replicas == 1  # no process group: one process
    with pytest.raises(ValueError, match="rank 2"):
        DistributedWeightedSampler(weights, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-negative"):
        DistributedWeightedSampler(torch.tensor([1.0, -1.0]))


def test_several_clips_per_video_share_one_decode_and_flatten_into_the_batch(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path, "data.clips_per_video=3", "augment.two_views=true")
    dataset = build_dataset(cfg, "train", train=True)
    good = [i for i, r in enumerate(dataset.records) if not bad_kinds(synthetic_root, {r.id})][:2]
    item = dataset[good[0]]
    assert item["clips"] == 3 and item["id"] == dataset.records[good[0]].id
    assert item["video"].shape == item["video2"].shape == (3, 3, 4, 48, 48)
    assert item["audio"].shape == item["audio2"].shape == (3, 1, 128, 128)
    # each clip has its own start and augmentation
    assert not torch.equal(item["video"][0], item["video"][1]) and not torch.equal(item["audio"][0], item["audio"][2])

    batch = collate_clips([dataset[i] for i in good])
    assert batch["video"].shape == (6, 3, 4, 48, 48) and batch["audio2"].shape == (6, 1, 128, 128)
    assert torch.equal(batch["video"][3], dataset[good[1]]["video"][0])  # item 1's clips follow item 0's
    assert batch["id"] == [dataset.records[i].id for i in good for _ in range(3)]
    assert batch["targets"]["label"].tolist() == [dataset.records[i].targets["label"] for i in good for _ in range(3)]
    assert batch["failures"].shape == (2,)  # bad files count once per item
    assert "clips" not in batch

    single = collate_clips([build_dataset(tiny_config(synthetic_root, tmp_path), "train", train=True)[good[0]]])
    assert single["video"].shape == (1, 3, 4, 48, 48)  # one clip per item: the default collate
    with pytest.raises(ValueError, match="at least 1"):
        tiny_config(synthetic_root, tmp_path, "data.clips_per_video=0")


def test_clips_read_together_equal_clips_read_apart(make_clip, tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (50, 64, 96, 3), dtype=np.uint8)  # decord needs >= 80 px wide
    audio = rng.uniform(-0.5, 0.5, 2 * 16000).astype(np.float32)
    path = make_clip("noise.mp4", frames, 25.0, audio)
    times = [np.array([0.1, 0.5, 0.9]), np.array([0.3, 0.7, 1.1]), np.array([1.5, 1.7, 1.9])]
    with open_video(path, "decord") as reader:
        together = _read_clips(reader, times)
        apart = [reader.frames_at(t) for t in times]
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
    # two overlapping windows cut from one read, one far window read alone
    starts = [0.2, 0.0, 1.2]
    waves = _read_windows(path, starts, 0.5, 16000)
    for wave, start in zip(waves, starts):
        assert torch.equal(wave, read_audio(path, start, 0.5, 16000))
