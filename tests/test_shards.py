"""Prepared shards (avmae.data.shards, tools/prepare_data.py) on real synthetic mp4s.

- The tools from a fresh clone: make_synthetic (with bad clips) -> prepare_data (the bad files
  reported, the rest written; a rerun keeps finished shards and rewrites a broken one) ->
  2-process pretraining on the shards, killed with SIGKILL and resumed by the same command, ends
  with the weights of the uninterrupted run.
- Same meaning on both sources: items read from the shards equal the items read from the mp4s
  (same clip sampling, augmentation draws, normalisation) within the JPEG tolerance.
- An S3-compatible server (moto) on 127.0.0.1: the shards uploaded with boto3 read back through
  the same dataset code equal the local ones.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import write_manifests
from test_engine_launch import DEMO, REPO, launch_command, losses, run

from avmae.config import load_config
from avmae.data import Manifest, balanced_weights, build_dataset, read_manifest
from avmae.data.device import normalize_inputs
from avmae.data.shard_writer import REPORT_FILE
from avmae.engine import read_scalars

# The session dataset (conftest.SYNTHETIC, written by the function tools/make_synthetic.py calls)
# has one bad clip of each kind in train: prepare_data reports "missing" and "truncated"; it stores
# "video_only" and "short", which fail at training time under the same policy and counters as
# on the mp4 path.
STEPS = 6
TINY = [
    "data.batch_size=2", "data.num_workers=1", "data.video.num_frames=4", "data.video.frame_rate=4.0",
    "data.video.resize=32", "data.video.size=32", "data.audio.seconds=1.28", "model.decoder_depth=1",
    "model.decoder_width=64", "train.base_lr=0.01", "train.warmup_epochs=0.5", "train.log_every=1",
    "train.checkpoint_every=2", "train.keep_checkpoints=2", "data.max_decode_failures=0.5",
]  # fmt: skip


def prepare_data(*args) -> dict:
    """tools/prepare_data.py's main, in this process (a subprocess would only add start-up time)."""
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory) -> dict:
    """The train shards of the session dataset, written by tools/prepare_data.py (2 processes) for
    the TINY geometry."""
    shards = tmp_path_factory.mktemp("shards")
    source = [f"data.root={synthetic_root}", *TINY]
    prepare_data("--config", DEMO, "--split", "train", "--out", shards / "train", "--shard-size", 4,
                 "--num-workers", 2, *source)  # fmt: skip
    return {"root": synthetic_root, "shards": shards, "source": source,
            "train": ["data.format=shards", f"data.root={shards}", "data.train=train", *TINY]}  # fmt: skip


def test_prepare_reports_bad_files_skips_them_and_resumes(prepared, capsys):
    out = prepared["shards"] / "train"
    with open(prepared["root"] / "bad_clips.csv") as f:
        bad = {row["id"]: row["kind"] for row in csv.DictReader(f)}
    with open(prepared["root"] / "train.csv") as f:
        train_ids = [row["id"] for row in csv.DictReader(f)]
    report = [line.split("\t") for line in (out / REPORT_FILE).read_text().splitlines()]
    reported = {fields[1]: fields[0] for fields in report}
    expected = {i: {"missing": "missing", "truncated": "undecodable"}[bad[i]]
                for i in train_ids if bad.get(i) in ("missing", "truncated")}  # fmt: skip
    assert reported == expected and len(expected) == 2, (report, bad)
    assert all(fields[2].endswith(".mp4") for fields in report)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == len(train_ids) - 2 and meta["num_undecodable"] == 1 and meta["num_missing"] == 1

    # a rerun keeps the finished shards; a shard whose marker is gone is written again
    chunks = sorted(out.glob("chunk-*.bin"))
    stamps = {p: p.stat().st_mtime_ns for p in chunks}
    (out / "shard-00001.json").unlink()
    (out / "chunk-0-1.bin").write_bytes(b"half-written")
    prepare_data("--config", DEMO, "--out", out, "--shard-size", 4, *prepared["source"])
    assert "1 missing and 1 undecodable files listed in" in capsys.readouterr().out
    assert sorted(out.glob("chunk-*.bin")) == chunks
    changed = {p.name for p in chunks if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {"chunk-0-1.bin"}
    assert json.loads((out / "meta.json").read_text())["num_samples"] == meta["num_samples"]
    dataset = build_dataset(load_config(DEMO, prepared["train"]), "train", train=True)
    assert [dataset.store[i]["id"] for i in range(len(dataset))] == [r.id for r in dataset.records]

    # AudioSet-style balanced sampling draws from the shard records' targets, which are the manifest's
    source = read_manifest(load_config(DEMO, prepared["source"]).data, "train")
    kept = [r for r in source.records if r.id in {d.id for d in dataset.records}]
    assert [r.targets for r in kept] == [r.targets for r in dataset.records]
    assert torch.equal(balanced_weights(Manifest(dataset.records, dataset.classes)), balanced_weights(Manifest(kept, source.classes)))


def _pairs(overrides: list[str], root: Path, tmp_path: Path):
    """Shards of the session dataset for ``overrides``, and an mp4 dataset over the same records
    in the same order (the undecodable clip left out of its manifest), so item ``i`` of both has
    the same seed."""
    shards = tmp_path / "shards"
    prepare_data("--config", DEMO, "--out", shards / "train", "--shard-size", 8, f"data.root={root}", *overrides)
    stored = build_dataset(load_config(DEMO, ["data.format=shards", f"data.root={shards}", "data.train=train",
                                              *overrides]), "train", train=True)  # fmt: skip
    with open(root / "train.csv") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    manifest = write_manifests(root, tmp_path, {"train": [rows[r.id] for r in stored.records]})
    mp4 = build_dataset(load_config(DEMO, [*manifest, f"train.output_dir={tmp_path}", *overrides]), "train", train=True)
    assert [r.id for r in mp4.records] == [r.id for r in stored.records]
    return mp4, stored


def _inputs(item: dict, overrides: list[str]) -> dict:
    """An item's video and audio as the model sees them: the uint8 frames normalised by the
    config's data.video (on the device in training, ``avmae.data.device``)."""
    return normalize_inputs({"video": item["video"], "audio": item["audio"]}, load_config(DEMO, overrides).data.video)


@pytest.mark.parametrize("augmented", [False, True], ids=["augment_off", "augment_on"])
def test_shard_items_mean_what_mp4_items_mean(prepared, tmp_path, augmented):
    """Frames kept at the source rate (25 frames/s sampled) and at the source size: the two sources
    then differ only by JPEG and 24-bit audio, and every random draw (start, speed, crop, flip,
    colour, blur, ...) is the same, so augmented items agree too."""
    overrides = ["data.video.num_frames=4", "data.video.frame_rate=25", "data.audio.seconds=1.28",
                 f"augment.enabled={augmented}", "data.audio.no_audio=silence"]  # fmt: skip
    mp4, stored = _pairs(overrides, prepared["root"], tmp_path)
    assert stored.store.meta["short_side"] == 64
    errors = []
    for index in range(0, len(stored), 2):
        a, b = stored[index], mp4[index]
        assert a["id"] == b["id"] and a["failures"] == b["failures"]
        for key, dtype in (("video", torch.uint8), ("audio", torch.float32)):
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype == dtype
        assert torch.equal(a["targets"]["label"], b["targets"]["label"]) and a["no_audio"] == b["no_audio"]
        a, b = _inputs(a, overrides), _inputs(b, overrides)
        errors.append(((a["video"] - b["video"]).abs().mean().item(), (a["audio"] - b["audio"]).abs().mean().item()))
    video_error = max(e[0] for e in errors)
    audio_error = max(e[1] for e in errors)
    print(f"mean absolute differences (video, fbank) per item: {errors}")
    assert video_error < 0.08, errors  # JPEG quality 90 on noisy 64 px frames, in normalised units
    assert audio_error < 0.02, errors
    # the tolerance tells items apart: another clip, or the same clip of another epoch, is far off
    assert (_inputs(stored[0], overrides)["video"] - _inputs(mp4[1], overrides)["video"]).abs().mean() > 5 * video_error
    if augmented:
        stored.set_epoch(1)
        assert (_inputs(stored[0], overrides)["video"] - _inputs(mp4[0], overrides)["video"]).abs().mean() > 5 * video_error


def test_wrap_window_on_shards_equals_mp4(prepared, tmp_path):
    """audio.window=wrap reads the stored whole track: a 2.56 s window over 2.5 s files starts at
    each random clip start and loops, from the shards as from the mp4s."""
    window = ["data.audio.seconds=2.56", "data.audio.window=wrap", "data.audio.no_audio=silence"]
    stored = build_dataset(load_config(DEMO, [*prepared["train"], *window]), "train", train=True)
    with open(prepared["root"] / "train.csv") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    manifest = write_manifests(prepared["root"], tmp_path, {"train": [rows[r.id] for r in stored.records]})
    mp4 = build_dataset(load_config(DEMO, [*manifest, f"train.output_dir={tmp_path}", *TINY, *window]), "train", train=True)
    for index in range(4):
        a, b = stored[index]["audio"], mp4[index]["audio"]
        assert a.shape == b.shape == (1, 256, 128)
        assert (a - b).abs().mean() < 0.02, index
    # the tolerance tells windows apart: another record's window is far off
    assert (stored[0]["audio"] - mp4[1]["audio"]).abs().mean() > 0.1


def test_evaluation_views_in_order(prepared, tmp_path):
    """Multi-view evaluation on shards: every record's test_clips x test_crops views, in order,
    the same clips as from the mp4s."""
    overrides = ["data.video.num_frames=4", "data.video.frame_rate=25", "data.audio.seconds=1.28",
                 "data.test_clips=2", "data.test_crops=3", "data.audio.no_audio=silence"]  # fmt: skip
    out = tmp_path / "shards"
    prepare_data("--config", DEMO, "--split", "val", "--out", out / "val", f"data.root={prepared['root']}", *overrides)
    stored = build_dataset(load_config(DEMO, ["data.format=shards", f"data.root={out}", "data.val=val", *overrides]),
                           "val", train=False)  # fmt: skip
    mp4 = build_dataset(load_config(DEMO, [f"data.root={prepared['root']}", f"train.output_dir={tmp_path}", *overrides]),
                        "val", train=False)  # fmt: skip
    assert [r.id for r in stored.records] == [r.id for r in mp4.records] and len(stored) == 6 * len(stored.records)
    for item in (0, 1, 5, 7):
        a, b = stored[item], mp4[item]
        assert (a["index"], a["view"]) == (b["index"], b["view"]) == divmod(item, 6)
        a, b = _inputs(a, overrides), _inputs(b, overrides)
        assert (a["video"] - b["video"]).abs().mean() < 0.08 and (a["audio"] - b["audio"]).abs().mean() < 0.02


def test_object_store_reads_the_same_items(prepared, tmp_path, s3_server):
    import boto3

    client = boto3.client("s3")
    local = prepared["shards"] / "train"
    for path in local.iterdir():
        if path.is_file():
            client.upload_file(str(path), "avdata", f"synthetic/train/{path.name}")
    cfg = load_config(DEMO, [*prepared["train"], "data.root=s3://avdata/synthetic", f"data.shard_cache={tmp_path / 'cache'}"])
    remote = build_dataset(cfg, "train", train=True)
    reference = build_dataset(load_config(DEMO, prepared["train"]), "train", train=True)
    assert len(remote) == len(reference)
    for index in (0, len(remote) // 2, len(remote) - 1):
        a, b = remote[index], reference[index]
        assert a["id"] == b["id"] and torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    missing = load_config(DEMO, [*prepared["train"], "data.root=s3://avdata/elsewhere"])
    with pytest.raises(FileNotFoundError, match="s3://avdata/elsewhere/train/meta.json"):
        build_dataset(missing, "train", train=True)


def test_sigkill_and_resume_on_shards_gives_the_uninterrupted_weights(prepared, tmp_path):
    def command(out: Path) -> list[str]:
        return launch_command("cpu_2proc.yaml", REPO / "tools" / "pretrain.py", "--config", DEMO, *prepared["train"],
                              f"train.output_dir={out}", f"train.max_steps={STEPS}")  # fmt: skip

    whole = tmp_path / "whole"
    run(command(whole))
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"

    killed = tmp_path / "killed"
    log = open(tmp_path / "first.log", "w")
    launcher = subprocess.Popen(command(killed), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    first_checkpoint = killed / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 240
    while not first_checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first_checkpoint.exists(), (tmp_path / "first.log").read_text()[-4000:]
    os.killpg(launcher.pid, signal.SIGKILL)  # no handler runs: the newest finished checkpoint is all there is
    launcher.wait(timeout=60)
    assert not (killed / final).exists()

    resumed = run(command(killed))
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = load_file(whole / final), load_file(killed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(killed) == losses(whole)
    # the two stored bad clips (no audio track; too short) were met, counted and replaced
    skipped = read_scalars(whole, "train/skipped_clips")
    assert sum(skipped.values()) >= 2 and read_scalars(killed, "train/skipped_clips") == skipped


def test_benchmark_times_shards_against_mp4_in_one_run(tmp_path):
    from avmae.benchmark import clips_spec, measure_data_pipeline, write_benchmark_clips
    from avmae.benchmark.data_pipeline import measure_stored_forms

    clips = tmp_path / "clips"
    write_benchmark_clips(clips, clips_spec(num_clips=2, duration=2.5, fps=(25.0, 30.0), width=96, height=64))
    cfg = load_config(DEMO, ["data.batch_size=2"])
    record = measure_data_pipeline(cfg, clips, ("decord", "shards"), (1,), items=2, warmup=1, rounds=1)
    settings = {s["decoder"]: s for s in record["settings"]}
    assert set(settings) == {"decord", "shards"}
    shards = settings["shards"]
    assert shards["clips"] == 2 and shards["failures"] == 0 and shards["clips_per_cpu_s"] > 0
    assert shards["speedup"]["decord"] == pytest.approx(shards["clips_per_cpu_s"] / settings["decord"]["clips_per_cpu_s"])
    assert min(shards["stage_ms_per_clip"][k] for k in ("video_decode", "audio_decode", "fbank", "augment")) > 0
    prepare = record["prepare"]
    assert prepare["clips"] == 2 and prepare["clips_per_cpu_s"] > 0 and prepare["settings"]["short_side"] == 64
    forms = measure_stored_forms(cfg, clips, gops=(4,), clips=1, reads=2)
    assert set(forms["ms_per_clip_read"]) == {"jpeg", "h264_gop4"} and min(forms["bytes_per_video_second"].values()) > 0
