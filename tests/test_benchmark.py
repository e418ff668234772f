"""Benchmarks: train-step variants of the micro model, the reference model's loss, the data
pipeline on tiny generated clips with both decoders, the markdown rows and the tool."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from avmae.benchmark import (
    append_rows,
    clips_spec,
    default_variants,
    measure_data_pipeline,
    measure_engine,
    measure_train_step,
    record_rows,
    write_benchmark_clips,
)
from avmae.benchmark.report import TABLES, header_lines
from avmae.config import load_config
from avmae.data.video import open_video
from avmae.models import build_pretrain_model
from avmae.benchmark.reference import ReferenceAVMAE, avmae_to_reference_state_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
TINY_CLIPS = dict(num_clips=2, duration=2.5, fps=(25.0, 30.0), width=96, height=64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared machine, threads waiting on each other swamp the timings."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config(DEMO, ["data.batch_size=2"])


@pytest.fixture(scope="module")
def train_record(demo_cfg):
    return measure_train_step(demo_cfg, torch.device("cpu"), ["avmae", "reference_fp32"], warmup=1, steps=2,
                              rounds=2, gemm_size=512)  # fmt: skip


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark") / "clips"
    write_benchmark_clips(root, clips_spec(**TINY_CLIPS))
    return root


@pytest.fixture(scope="module")
def data_record(demo_cfg, clips_dir):
    return measure_data_pipeline(demo_cfg, clips_dir, ("decord", "pyav"), (1, 2), items=2, warmup=1, rounds=1)


def test_train_step_variants(train_record):
    variants = train_record["variants"]
    assert set(variants) == {"avmae", "reference_fp32"}
    for result in variants.values():
        assert "error" not in result
        assert math.isfinite(result["clips_per_s"]) and result["clips_per_s"] > 0
        assert result["timed_steps"] == 2 and len(result["round_clips_per_s"]) == 2
        assert 0 < result["mfu"] <= 1
        assert result["peak_memory_bytes"] >= 0
    ratio = variants["avmae"]["vs_reference"]
    assert math.isfinite(ratio)
    assert ratio == pytest.approx(variants["avmae"]["clips_per_s"] / variants["reference_fp32"]["clips_per_s"])
    flops = train_record["flops_per_clip"]
    # same network, same masks: the same matmuls, and backward costs more than forward
    assert flops["avmae"] == flops["reference_fp32"]
    assert flops["avmae"]["step"] > 2 * flops["avmae"]["forward"] > 0


def test_reference_computes_the_avmae_loss(demo_cfg):
    torch.manual_seed(0)
    model, reference = build_pretrain_model(demo_cfg), ReferenceAVMAE(demo_cfg)
    reference.load_state_dict(avmae_to_reference_state_dict(model.state_dict()))  # strict: every name maps
    video, audio = torch.randn(2, 3, 8, 64, 64), torch.randn(2, 1, 256, 128)
    out = model(video, audio, generator=torch.Generator().manual_seed(1))
    ref = reference(video, audio, generator=torch.Generator().manual_seed(1))
    for key in ("mae_video", "mae_audio"):
        torch.testing.assert_close(ref["logs"][key], out["logs"][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref["loss"], out["loss"], rtol=1e-5, atol=1e-6)
    # other masks, another loss: the match above is not a coincidence of the inputs
    other = reference(video, audio, generator=torch.Generator().manual_seed(2))["loss"]
    assert not torch.allclose(other, out["loss"])


def test_default_variants_follow_the_reference_model(demo_cfg):
    assert default_variants(demo_cfg) == ["avmae", "reference_fp32"]  # demo.yaml trains in fp32
    bf16 = load_config(DEMO, ["train.mixed_precision=bf16"])
    assert default_variants(bf16) == ["avmae", "reference_bf16", "reference_fp32"]
    with pytest.raises(ValueError, match="reference_bf16 variant runs under train.mixed_precision=bf16"):
        measure_train_step(demo_cfg, torch.device("cpu"), ["reference_bf16"])
    late = load_config(REPO / "configs" / "pretrain" / "ours_vitb_vggsound.yaml")
    assert default_variants(late) == ["avmae"]
    with pytest.raises(ValueError, match="model.fusion='late'"):
        measure_train_step(late, torch.device("cpu"), ["reference_fp32"])


def test_benchmark_clips(clips_dir):
    info = json.loads((clips_dir / "clips.json").read_text())
    assert info["video_bit_rate_mean"] > 0 and info["keyframes_per_clip_mean"] >= 1
    for i, fps in enumerate(TINY_CLIPS["fps"]):
        with open_video(clips_dir / "clips" / f"clip_{i:03d}.mp4", "pyav") as reader:
            assert reader.fps == pytest.approx(fps)
            assert tuple(reader.frames_at([0.0]).shape) == (1, 64, 96, 3)
    # the same settings reuse the folder; others refuse it
    stamp = (clips_dir / "clips" / "clip_000.mp4").stat().st_mtime_ns
    assert write_benchmark_clips(clips_dir, clips_spec(**TINY_CLIPS)) == info
    assert (clips_dir / "clips" / "clip_000.mp4").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings"):
        write_benchmark_clips(clips_dir, clips_spec(**TINY_CLIPS | {"num_clips": 3}))


def test_data_pipeline_both_decoders(data_record):
    settings = {(s["decoder"], s["clips_per_video"]): s for s in data_record["settings"]}
    assert set(settings) == {("decord", 1), ("decord", 2), ("pyav", 1), ("pyav", 2)}
    for (_, k), s in settings.items():
        assert s["items"] == 2 and s["clips"] == 2 * k and s["failures"] == 0
        assert math.isfinite(s["clips_per_s"]) and s["clips_per_s"] > 0 and s["clips_per_cpu_s"] > 0
        stages = s["stage_ms_per_clip"]
        assert min(stages[k] for k in ("video_decode", "audio_decode", "fbank", "augment")) > 0
        # the stages split the wall time of the timed items
        assert sum(stages.values()) * s["clips"] / 1000 == pytest.approx(s["wall_s"], rel=1e-6)
    assert data_record["threads"] == 1
    assert data_record["geometry"]["num_frames"] == 8


def _cells(line: str) -> int:
    return len(line.replace("\\|", "").strip().strip("|").split("|"))


def test_rows_go_into_their_table(tmp_path, train_record, data_record):
    train_header, data_header = header_lines("train_step")[0], header_lines("data_pipeline")[0]
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{train_header}\n{header_lines('train_step')[1]}\n\nNotes.\n")
    train_rows = record_rows(train_record, "python tools/benchmark.py train-step --config a|b.yaml")
    append_rows(doc, "train_step", train_rows[:1])
    append_rows(doc, "train_step", train_rows[1:])
    append_rows(doc, "data_pipeline", record_rows(data_record, "python tools/benchmark.py data"))
    lines = doc.read_text().splitlines()

    start = lines.index(train_header)
    body = lines[start + 2 : start + 2 + len(train_rows)]
    assert [line.split(" | ")[5] for line in body] == ["avmae", "reference_fp32"]  # in order, under the header
    assert lines[start + 2 + len(train_rows) :][:2] == ["", "Notes."]
    assert all(_cells(line) == len(TABLES["train_step"][1]) for line in body)
    assert "a\\|b.yaml" in body[0]  # a pipe in the command does not split the cell

    assert "## Data pipeline" in lines  # a file without the table gets it, under its title
    start = lines.index(data_header)
    body = lines[start + 2 :]
    assert len(body) == 4 and all(_cells(line) == len(TABLES["data_pipeline"][1]) for line in body)


def test_engine_throughput_from_its_own_logs(tmp_path):
    cfg = load_config(DEMO, ["data.batch_size=2", "train.max_steps=6", "train.log_every=2",
                             f"train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stale.txt").write_text("from an earlier run")
    record = measure_engine(cfg)
    assert not (tmp_path / "run" / "stale.txt").exists()  # every measurement starts afresh
    assert len(record["window_clips_per_s"]) == 3 and record["clips_per_s"] > 0
    assert record["clips_per_s"] == pytest.approx(sum(record["window_clips_per_s"][1:]) / 2)
    assert record["num_processes"] == 1 and record["zero_stage"] is None and 0 < record["mfu"] <= 1
    assert not (tmp_path / "run" / "checkpoints").exists()  # a measurement leaves no checkpoint behind
    (row,) = record_rows(record, "python tools/benchmark.py engine")
    assert len(row) == len(TABLES["engine"][1]) and row[2] == "1 x NO"
    with pytest.raises(ValueError, match="two windows"):
        measure_engine(load_config(DEMO, ["train.max_steps=3", "train.log_every=2"]))


def test_tool_writes_json_only_with_no_docs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("tool_benchmark", REPO / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "record.json"
    argv = ["train-step", "--config", str(DEMO), "--variants", "avmae", "--steps", "1", "--warmup", "0",
            "--rounds", "1", "--threads", "1", "--out", str(out), "--no-docs", "data.batch_size=2"]  # fmt: skip
    assert tool.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "train_step" and record["variants"]["avmae"]["clips_per_s"] > 0
    assert record["command"].startswith("python tools/benchmark.py train-step --config")
    assert not (tmp_path / "docs").exists()


def test_fair_reference_rows_under_bf16(demo_cfg):
    cfg = load_config(DEMO, ["data.batch_size=2", "train.mixed_precision=bf16"])
    record = measure_train_step(cfg, torch.device("cpu"), ["avmae", "reference_bf16", "reference_fp32"], warmup=1,
                                steps=1, rounds=1, gemm_size=256)  # fmt: skip
    variants = record["variants"]
    assert all("error" not in v for v in variants.values()), variants
    avmae = variants["avmae"]
    # vs_reference is against the fair (same autocast) reference; the fp32 ratio is kept beside it
    assert avmae["vs_reference"] == pytest.approx(avmae["clips_per_s"] / variants["reference_bf16"]["clips_per_s"])
    assert avmae["vs_reference_fp32"] == pytest.approx(avmae["clips_per_s"] / variants["reference_fp32"]["clips_per_s"])
    assert "TF32 allowed" in variants["reference_bf16"]["description"] and "fp32" in variants["reference_fp32"]["description"]
    assert not torch.backends.cuda.matmul.allow_tf32  # the benchmark leaves TF32 as the engine has it


def test_profile_splits_the_step_and_names_the_attention_kernel(demo_cfg):
    from avmae.benchmark.profile import CATEGORIES, categorize, profile_train_step

    record = profile_train_step(demo_cfg, torch.device("cpu"), "avmae", warmup=1, steps=1)
    assert set(record["ms_per_step"]) == set(CATEGORIES)
    assert sum(record["ms_per_step"].values()) == pytest.approx(record["total_ms_per_step"])
    assert sum(record["share"].values()) == pytest.approx(1.0)
    for category in ("matmul", "attention", "elementwise", "optimizer"):
        assert record["ms_per_step"][category] > 0, category
    assert any("scaled_dot_product" in k for k in record["attention_kernels"])  # SDPA ran
    reference = profile_train_step(demo_cfg, torch.device("cpu"), "reference_fp32", warmup=0, steps=1)
    assert list(reference["attention_kernels"]) == ["none (explicit matmul + softmax)"]
    assert categorize("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert categorize("aten::_scaled_dot_product_efficient_attention_backward") == "attention"
    (row,) = record_rows(record, "python tools/benchmark.py profile")
    assert len(row) == len(TABLES["profile"][1])


def test_gpu_suite_plan_and_tiny_run(tmp_path):
    from avmae.benchmark.suite import FULL, TINY, Step, run_suite, suite_steps

    full = {s.name: s for s in suite_steps(FULL, tmp_path, ["data.format=shards", "data.root=/shards"])}
    assert list(full)[:4] == ["fair_reference", "profile_avmae", "profile_reference", "levers"]
    assert {"batch_128", "batch_256", "vitl", "cavmae_shaped", "engine_synthetic", "engine_loader", "max_autotune",
            "input_copy"} <= set(full)  # fmt: skip
    assert {"avmae_full_loss", "compiled", "compiled_cudagraphs"} <= set(full["levers"].argv)
    assert "configs/pretrain/avmae_audioset_vitl.yaml" in full["vitl"].argv
    assert "configs/pretrain/avmae_vggsound_vitb.yaml" in full["levers"].argv
    assert "configs/pretrain/cavmae_audioset.yaml" in full["cavmae_shaped"].argv
    for step in full.values():  # every config the plan names exists
        configs = [step.argv[i + 1] for i, a in enumerate(step.argv) if a == "--config"]
        assert all((REPO / c).is_file() for c in configs), (step.name, configs)
    assert "data.root=/shards" in full["engine_loader"].argv and full["engine_loader"].launch
    assert "engine_loader" not in {s.name for s in suite_steps(FULL, tmp_path)}

    spec = importlib.util.spec_from_file_location("tool_benchmark_suite", REPO / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    steps = [s for s in suite_steps(TINY, tmp_path) if s.name in ("profile_avmae", "input_copy")]
    steps.append(Step("broken", ["profile", "--config", str(tmp_path / "missing.yaml")], 10))
    summary = run_suite(steps, tmp_path, budget_s=600, in_process=tool.main)
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"profile_avmae": "ok", "input_copy": "ok", "broken": "error"}  # one failure stops nothing
    assert json.loads((tmp_path / "profile_avmae.json").read_text())["kind"] == "profile"
    copy = json.loads((tmp_path / "input_copy.json").read_text())
    assert copy["float32_bytes"] == 4 * copy["uint8_bytes"] and "CPU" in copy["note"]
    markdown = (tmp_path / "suite.md").read_text()
    assert "## profile_avmae: ok" in markdown and header_lines("input_copy")[0] in markdown
    skipped = run_suite(suite_steps(TINY, tmp_path / "late")[:1], tmp_path / "late", budget_s=0)
    assert skipped["steps"][0]["status"] == "skipped" and "budget" in skipped["steps"][0]["message"]


def _failing_builds(monkeypatch, failing: set[str]) -> None:
    """Fault injection: building the named variants raises, as a compiler failure would on a GPU."""
    from avmae.benchmark import train_step

    build = train_step.build_variant

    def build_or_fail(cfg, name, device):
        if name in failing:
            raise RuntimeError(f"injected failure of {name}")
        return build(cfg, name, device)

    monkeypatch.setattr(train_step, "build_variant", build_or_fail)


def test_train_step_exits_non_zero_when_every_variant_failed(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("tool_benchmark_fail", REPO / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _failing_builds(monkeypatch, {"avmae", "avmae_full_loss"})
    out = tmp_path / "record.json"
    argv = ["train-step", "--config", str(DEMO), "--variants", "avmae", "avmae_full_loss", "--steps", "1", "--warmup",
            "0", "--rounds", "1", "--threads", "1", "--out", str(out), "--no-docs", "data.batch_size=2"]  # fmt: skip
    assert tool.main(argv) == 1
    assert "every variant failed" in capsys.readouterr().err
    variants = json.loads(out.read_text())["variants"]
    assert variants["avmae"]["error"] == "RuntimeError: injected failure of avmae"


def test_a_failed_fair_reference_is_not_replaced_by_the_fp32_one(monkeypatch):
    _failing_builds(monkeypatch, {"reference_bf16"})
    cfg = load_config(DEMO, ["data.batch_size=2", "train.mixed_precision=bf16"])
    partial = []
    record = measure_train_step(cfg, torch.device("cpu"), ["avmae", "reference_bf16", "reference_fp32"], warmup=0,
                                steps=2, rounds=2, gemm_size=256, on_round=partial.append)  # fmt: skip
    avmae = record["variants"]["avmae"]
    assert avmae["vs_reference_fp32"] == pytest.approx(avmae["clips_per_s"] / record["variants"]["reference_fp32"]["clips_per_s"])
    assert "vs_reference" not in avmae and "reference_bf16 failed" in avmae["reference_note"]
    # after the first of the two rounds the record so far was handed out (a stopped run keeps it)
    (first,) = partial
    assert first["partial"] == "1 of 2 rounds timed" and first["variants"]["avmae"]["timed_steps"] == 1
    assert record_rows(first, "python tools/benchmark.py train-step")


def test_gpu_suite_plan_fits_the_budget_and_is_printed_first(tmp_path, capsys):
    from avmae.benchmark.suite import FULL, TINY, plan_suite, run_suite, suite_steps

    steps = suite_steps(FULL, tmp_path)
    planned = plan_suite(steps, 480)
    assert sum(s.timeout_s for s in planned) <= 480 and planned[0].name == "fair_reference"
    left_out = [s for s in steps if s not in planned]
    assert left_out and all(s.status == "skipped" and "budget" in s.message for s in left_out)
    printed = capsys.readouterr().out
    assert "plan (480 s budget)" in printed and all(s.name in printed for s in steps)
    assert plan_suite(suite_steps(FULL, tmp_path), None) and capsys.readouterr()

    # the tool: a step left out by the budget is work not done
    spec = importlib.util.spec_from_file_location("tool_benchmark_plan", REPO / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "suite"
    argv = ["gpu-suite", "--out", str(out), "--tiny", "--in-process", "--only", "input_copy", "profile_avmae"]
    assert tool.main([*argv, "--budget-s", "100"]) == 1  # profile_avmae (90 s) fits, input_copy (60 s) not
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[suite] plan (100 s budget): 1 of 2 steps") and "not ok: input_copy (skipped)" in lines[-1]
    assert tool.main(argv) == 0
