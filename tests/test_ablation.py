"""The augmentation ablation: configs compose as intended, and the tool pretrains, exports and
probes every config on real mp4s, writes one table, and does not retrain when started again."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import decodable_rows, write_manifests

from avmae.ablation import ablation_configs, augmentation_setting, run_ablation
from avmae.augment import apply_strength
from avmae.config import load_config, replace

REPO = Path(__file__).resolve().parents[1]
ABLATION = REPO / "configs" / "ablation"
PROBE = REPO / "configs" / "probe" / "synthetic.yaml"
TINY = [
    "data.video.num_frames=4",
    "data.video.resize=32",
    "data.video.size=32",
    "data.audio.seconds=1.28",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.test_clips=1",
    "train.max_steps=2",
    "train.log_every=1",
    "finetune.probe_weight_decays=[0.01,1.0]",
    "finetune.probe_max_iter=30",
]


@pytest.fixture(scope="module")
def clean_data(synthetic_root, tmp_path_factory):
    """Overrides pointing at the decodable clips of the session dataset."""
    return write_manifests(synthetic_root, tmp_path_factory.mktemp("ablation_manifests"), decodable_rows(synthetic_root))


def _ablation_tool():
    """tools/ablation.py as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location("tool_ablation", REPO / "tools" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_put_the_preset_over_the_demo_recipe():
    configs = ablation_configs(ABLATION)
    assert [c.stem for c in configs] == [
        "sampling_only", "spatiotemporal_s1", "spatiotemporal_s2", "coherency_breaking_s1", "coherency_breaking_s2",
    ]  # fmt: skip
    demo = load_config(REPO / "configs" / "pretrain" / "demo.yaml")
    baseline = apply_strength(load_config(configs[0]).augment)
    for path in configs:
        cfg = load_config(path)
        assert cfg.train.output_dir == f"runs/ablation/{path.stem}"
        assert (cfg.model, cfg.data, cfg.train.max_steps) == (demo.model, demo.data, demo.train.max_steps)
        expected = {"sampling": "sampling-only", "spatiotemporal": "coherency-keeping", "coherency": "coherency-breaking"}
        assert augmentation_setting(cfg.augment) == expected[path.stem.split("_")[0]]
        assert cfg.augment.strength == (2.0 if path.stem.endswith("_s2") else 1.0)
        # sampling and audio are the same in every run after the strength rule: only video varies
        applied = apply_strength(cfg.augment)
        assert applied.speed_range == pytest.approx(baseline.speed_range)
        assert (applied.gain_db, applied.noise, applied.noise_level) == pytest.approx((6.0, 0.5, 0.1))
    # demo.yaml crops and flips; the presets, listed after it in defaults, win
    assert demo.augment.crop == 1.0 and demo.augment.hflip == 0.5
    only = load_config(configs[0]).augment
    assert (only.crop, only.hflip, only.color_jitter) == (0.0, 0.0, 0.0)
    assert load_config(ABLATION / "spatiotemporal_s1.yaml").augment.crop_scale == (0.2, 1.0)
    strong = apply_strength(load_config(ABLATION / "spatiotemporal_s2.yaml").augment)
    assert strong.blur == 1.0 and strong.blur_sigma == pytest.approx((0.2, 4.0))


def test_ablation_tool_writes_one_table_and_does_not_retrain(clean_data, tmp_path, monkeypatch):
    main = _ablation_tool().main
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    configs = [str(ABLATION / "sampling_only.yaml"), str(ABLATION / "coherency_breaking_s2.yaml")]
    out, runs = tmp_path / "ablation", tmp_path / "runs"
    argv = [*configs, *clean_data, *TINY, "--out", str(out), "--runs-dir", str(runs), "--probe-config", str(PROBE)]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # pretraining sets its own count; the probe must get this one back
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)

    table = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in table["runs"]] == ["sampling_only", "coherency_breaking_s2"]
    assert [r["setting"] for r in table["runs"]] == ["sampling-only", "coherency-breaking"]
    assert [r["strength"] for r in table["runs"]] == [1.0, 2.0]
    for r in table["runs"]:
        assert r["steps"] == 2 and math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        assert all(0.0 <= r["top1"][split] <= 100.0 for split in ("train", "val", "test"))
        assert r["resumed_from"] is None and r["pretrain_minutes"] > 0
        assert (Path(r["export"]) / "model.safetensors").is_file()
        assert Path(r["run_dir"]) == runs / r["name"]
    assert [b["name"] for b in table["baselines"]] == ["random", "raw"]
    assert all(0.0 <= b["top1"][split] <= 100.0 for b in table["baselines"] for split in ("val", "test"))
    assert table["records"]["test"] > 0
    markdown = (out / "ablation.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 2  # header, runs, baselines
    assert "(`coherency_breaking_s2`) | 2 |" in markdown and "| random-init encoder |" in markdown

    # started again: the final checkpoints are reused as they are, not retrained or rewritten
    files = [p for r in table["runs"] for p in Path(r["checkpoint"]).rglob("*") if p.is_file()]
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    assert main(argv) == 0
    assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes
    assert [sorted(p.name for p in (Path(r["run_dir"]) / "checkpoints").iterdir()) for r in table["runs"]] == [
        [Path(r["checkpoint"]).name] for r in table["runs"]
    ]
    again = json.loads((out / "ablation.json").read_text())
    assert again["runs"] == table["runs"] and again["baselines"] == table["baselines"]


def test_an_output_dir_override_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train.output_dir"):
        run_ablation([ABLATION / "sampling_only.yaml"], tmp_path, PROBE, ["train.output_dir=x"])


OBJECTIVES = REPO / "configs" / "objectives"


def test_objective_arms_change_only_the_objective():
    """configs/objectives/: the demo recipe's data, augmentation and steps in every arm; each arm's
    objective; and each arm's model takes a training step on tiny inputs."""
    from avmae.ablation import objective_name
    from avmae.models import build_pretrain_model

    demo = load_config(REPO / "configs" / "pretrain" / "demo.yaml")
    arms = {p.stem: load_config(p) for p in ablation_configs(OBJECTIVES)}
    names = {stem: objective_name(cfg.model) for stem, cfg in arms.items()}
    assert names == {"mae": "MAE", "mae_infonce": "MAE + InfoNCE", "simsiam": "SimSiam", "mocov3": "MoCo v3"}
    for stem, cfg in arms.items():
        assert cfg.train.output_dir == f"runs/objectives/{stem}"
        assert (cfg.data, cfg.train.max_steps, cfg.train.base_lr, cfg.train.seed) == (
            demo.data, demo.train.max_steps, demo.train.base_lr, demo.train.seed)
        views = stem in ("simsiam", "mocov3")
        assert cfg.augment == (replace(demo.augment, two_views=True) if views else demo.augment)
        assert augmentation_setting(cfg.augment) == "coherency-keeping"
        # the encoder is the demo's in every arm
        assert (cfg.model.size, cfg.model.fusion, cfg.model.fusion_layers) == (demo.model.size, demo.model.fusion, demo.model.fusion_layers)
    assert (arms["mae_infonce"].model.contrastive_weight, arms["mae_infonce"].model.temperature) == (0.01, 0.05)

    torch.manual_seed(0)
    tiny = ["data.video.num_frames=4", "data.video.size=32", "data.audio.seconds=0.64"]
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 64, 128)
    for stem, path in ((p.stem, p) for p in ablation_configs(OBJECTIVES)):
        model = build_pretrain_model(load_config(path, tiny))
        assert (model.decoder is not None) == (stem.startswith("mae"))
        second = {"video2": video.flip(0), "audio2": audio.flip(0)} if stem in ("simsiam", "mocov3") else {}
        out = model(video, audio, **second)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and ("contrastive" in out["logs"]) == (stem != "mae")
