"""The demo end to end on a small generated dataset: every step runs and the summary names the
files it wrote and the three probes."""

import json
from pathlib import Path

from avmae.demo import format_summary, run_demo


def test_demo_generates_pretrains_exports_probes_and_draws(tmp_path):
    data, out = tmp_path / "data", tmp_path / "demo"
    overrides = ["train.max_steps=3", "train.log_every=1", "data.num_workers=0", "data.batch_size=4"]
    summary = run_demo(data, out, seed=1, num_clips=16, num_classes=2, data_seed=3, overrides=overrides)

    assert (data / "train.csv").is_file() and len(list((data / "clips").glob("*.mp4"))) == 16
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).name == "step_00000003"
    assert (Path(summary["export"]) / "model.safetensors").is_file()
    picture = Path(summary["picture"])
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["losses"]) == {"loss", "mae_video", "mae_audio"}
    assert set(summary["probes"]) == {"pretrained", "random", "raw"}
    for probe in summary["probes"].values():
        assert all(0.0 <= probe[split] <= 100.0 for split in ("train", "val", "test"))
        assert probe["records"]["test"] > 0
    assert summary["seconds"]["total"] >= summary["seconds"]["pretrain"] > 0

    table = format_summary(summary)
    for line in ("pretrained encoder", "random-init encoder", "raw inputs", str(picture), "accelerate launch"):
        assert line in table
