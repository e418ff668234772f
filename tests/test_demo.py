"""The demo end to end on a small generated dataset, checked against what the demo claims
(README, "What the demo shows"): real H.264 + AAC clips; the pretraining losses it reports are the
run's own logged first and last values; the export it probes is the pretrained model, reloadable
from its folder alone; the three probes see the same held-out clips and their accuracies are
counts of those clips; the summary's "points over" lines are the differences of those numbers.

Three steps on 16 clips of 2 classes cannot show that pretraining helps, so that number is not
asserted; tools/demo.py measures it at full size (README).
"""

import csv
import json
from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file

import avmae
from avmae.demo import format_summary, run_demo
from avmae.engine import read_scalars


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data, out = root / "data", root / "demo"
    overrides = ["train.max_steps=3", "train.log_every=1", "data.num_workers=0", "data.batch_size=4"]
    summary = run_demo(data, out, seed=1, num_clips=16, num_classes=2, data_seed=3, overrides=overrides)
    return data, out, summary


def test_the_dataset_is_real_h264_and_aac(demo):
    data, _, _ = demo
    clips = sorted((data / "clips").glob("*.mp4"))
    assert len(clips) == 16
    with av.open(str(clips[0])) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"


def test_the_demo_writes_its_dataset_with_the_hue_pitch_link(demo):
    data, _, summary = demo
    rows = [json.loads(line) for line in open(data / "metadata.jsonl")]
    assert rows and all(row["hue_sets_pitch"] for row in rows)
    assert summary["data"]["hue_sets_pitch"] is True


def test_the_reported_losses_are_the_runs_own(demo):
    _, out, summary = demo
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).name == "step_00000003"
    for name in ("mae", "mae_video", "mae_audio", "contrastive"):
        logged = read_scalars(out / "pretrain", f"train/{name}")
        assert sorted(logged) == [1, 2, 3]  # one logging window per step here
        reported = summary["losses"][name]
        assert (reported["first"], reported["last"]) == (logged[1], logged[3])
        assert reported["factor"] == pytest.approx(logged[1] / logged[3])


def test_the_probed_export_is_the_pretrained_model(demo):
    _, _, summary = demo
    checkpoint = load_file(Path(summary["checkpoint"]) / "model.safetensors")
    reloaded = avmae.from_pretrained(summary["export"]).state_dict()
    assert reloaded.keys() == checkpoint.keys()
    assert all(torch.equal(reloaded[k], checkpoint[k]) for k in checkpoint)


def test_probes_score_the_same_held_out_clips_in_whole_clips(demo):
    data, _, summary = demo
    probes = summary["probes"]
    assert set(probes) == {"pretrained", "random", "raw"}
    records = probes["pretrained"]["records"]
    clean = {}
    bad = {row["id"] for row in csv.DictReader(open(data / "bad_clips.csv"))} if (data / "bad_clips.csv").is_file() else set()
    for split in ("train", "val", "test"):
        clean[split] = sum(1 for row in csv.DictReader(open(data / f"{split}.csv")) if row["id"] not in bad)
    assert records == clean  # every decodable clip of each split, none twice
    for probe in probes.values():
        assert probe["records"] == records
        for split in ("train", "val", "test"):
            correct = probe[split] * records[split] / 100
            assert correct == pytest.approx(round(correct)), f"{probe[split]} % is not a whole number of clips"
    # the same architecture for the pretrained and the random-init encoder: features of one size
    assert probes["pretrained"]["dim"] == probes["random"]["dim"] != probes["raw"]["dim"]


def test_the_summary_states_its_own_numbers(demo):
    _, _, summary = demo
    table = format_summary(summary)
    test = {k: v["test"] for k, v in summary["probes"].items()}
    records = summary["probes"]["pretrained"]["records"]["test"]
    assert f"pretraining adds {test['pretrained'] - test['random']:+.1f} points over the random-init encoder" in table
    assert f"{test['pretrained'] - test['raw']:+.1f} over the raw inputs" in table
    assert f"one test clip is {100 / records:.2f} points" in table
    loss, infonce = summary["losses"]["mae"], summary["losses"]["contrastive"]
    assert f"reconstruction loss {loss['first']:.3f} -> {loss['last']:.3f}" in table
    assert f"InfoNCE {infonce['first']:.3f} -> {infonce['last']:.3f}" in table
    for line in ("pretrained encoder", "random-init encoder", "raw inputs", summary["picture"], "accelerate launch"):
        assert line in table
    assert Path(summary["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_rows_compare_the_pretrained_and_the_random_encoder(demo):
    data, _, summary = demo
    retrieval = summary["retrieval"]
    assert set(retrieval) == {"pretrained", "random"}
    bad = {row["id"] for row in csv.DictReader(open(data / "bad_clips.csv"))} if (data / "bad_clips.csv").is_file() else set()
    test_clips = sum(1 for row in csv.DictReader(open(data / "test.csv")) if row["id"] not in bad)
    for metrics in retrieval.values():
        assert metrics["clips"] == test_clips and metrics["bad"] == []
        assert metrics["chance"]["R@1"] == pytest.approx(100 / test_clips)
        assert metrics["chance"]["median_rank"] == (test_clips + 1) / 2
        for direction in ("audio->video", "video->audio"):
            for k in ("R@1", "R@5"):
                hits = metrics[direction][k] * test_clips / 100
                assert hits == pytest.approx(round(hits)), "a recall is a whole number of clips"
            assert 1 <= metrics[direction]["median_rank"] <= test_clips
    assert retrieval["pretrained"] != retrieval["random"]  # two encoders, not one scored twice
    lines = format_summary(summary).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("audio-visual retrieval"))
    for name in ("pretrained encoder", "random-init encoder"):
        row = next(line for line in lines[header:] if line.startswith(name))
        source = "pretrained" if name.startswith("pretrained") else "random"
        keys = ("R@1", "R@5", "median_rank")
        expected = [retrieval[source][d][k] for d in ("audio->video", "video->audio") for k in keys]
        assert [float(x) for x in row.split()[2:]] == pytest.approx(expected, abs=0.05)
