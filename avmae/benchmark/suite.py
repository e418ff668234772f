"""Every GPU measurement in one command, within a time budget: ``tools/benchmark.py gpu-suite``.

The suite is a list of ``Step``s, each one ``tools/benchmark.py`` command writing one JSON
record into the output folder (nothing is appended to docs/benchmarks.md: the rows are collected
in ``suite.md`` for review). Each step runs in its own process with its own time limit, so a
compiler that hangs or a variant that runs out of memory costs that step only; a step stopped
at its limit keeps the rows it had finished. Before anything runs, the plan is printed: the steps
whose limits fit in the budget together, in order of priority, and those left out (``skipped``).
``suite.json`` records, per step, the command, status (ok | error | timeout | skipped), seconds
and the record's path; the command exits non-zero unless every step is ok.

Full settings (``FULL``, for one H100/H200, about 8 minutes): the fair reference rows (ViT-B,
mid fusion: avmae, the reference under bf16 autocast with TF32, the fp32 reference), profiles of
the avmae and reference steps, the levers at the AV-MAE ViT-B geometry in one run (masked-only
loss before/after, compiled, CUDA graphs), the batch to the device (float32 vs uint8), a batch
sweep (64 / 128 / 256), ViT-L in AV-MAE's released AudioSet recipe, CAV-MAE's released recipe, the
engine on synthetic input and, when ``--engine-data`` names a training set (e.g. shards prepared
by ``tools/prepare_data.py``: ``data.format=shards data.root=DIR data.train=train``), the engine
fed by it with 16 workers; last, max-autotune,
whose autotuning takes minutes. ``TINY`` runs the same steps on the micro model in seconds on a
CPU (compiled variants left out), which is what the test suite does.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .report import format_row, header_lines, record_rows

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "benchmark.py"

# CAV-MAE's released AudioSet pretraining recipe (YuanGongND/cav-mae, compared setting by setting
# in docs/recipes.md): one RGB frame of 224 px -> 196 tokens, a 1024 x 128 fbank -> 512 tokens,
# 11 modality layers + 1 joint layer with per-modality norms, a joint 8 x 512 decoder with 16
# heads, masks 0.75/0.75, InfoNCE weight 0.01, tau 0.05.
CAVMAE_CONFIG = "configs/pretrain/cavmae_audioset.yaml"
VITB_AVMAE = "configs/pretrain/avmae_vggsound_vitb.yaml"  # AV-MAE's released VGGSound recipe, ViT-B
VITL_AVMAE = "configs/pretrain/avmae_audioset_vitl.yaml"  # AV-MAE's released AudioSet recipe, ViT-L
VITB_MID = "configs/pretrain/ours_vitb_audioset2m.yaml"  # mid fusion, separate decoders: what the reference implements


@dataclass
class Settings:
    """The sizes of one suite run."""

    steps: int
    warmup: int
    rounds: int
    profile_steps: int
    batches: tuple[int, ...]  # the sweep; the first is the configs' own batch
    engine_steps: int
    engine_log_every: int
    compiled: bool  # include compiled variants
    common: tuple[str, ...] = ()  # overrides for every step (TINY: the micro model)
    config: str | None = None  # one config for every step (TINY), else each step's own
    cavmae: tuple[str, ...] = ()  # with ``config``: the CAV-MAE objective on it
    threads: int | None = None
    gemm_size: int = 2048  # the measured-GEMM yardstick (unused where a data sheet applies)


FULL = Settings(steps=10, warmup=3, rounds=2, profile_steps=3, batches=(64, 128, 256), engine_steps=30,
                engine_log_every=10, compiled=True)  # fmt: skip
TINY = Settings(steps=1, warmup=1, rounds=1, profile_steps=1, batches=(2, 4), engine_steps=4, engine_log_every=2,
                compiled=False, common=("data.batch_size=2", "train.mixed_precision=bf16"),
                config="configs/pretrain/demo.yaml", threads=1, gemm_size=256,
                cavmae=("model.decoder=joint", "model.contrastive=infonce", "model.contrastive_pairs=modalities",
                        "model.contrastive_weight=0.01"))  # fmt: skip


@dataclass
class Step:
    name: str
    argv: list[str]  # tools/benchmark.py arguments
    timeout_s: float
    launch: bool = False  # under `accelerate launch --num_processes 1` (the engine)
    status: str = "pending"
    seconds: float = 0.0
    record: str | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)


def suite_steps(settings: Settings, out_dir: Path, engine_data: list[str] | None = None) -> list[Step]:
    """The steps of a run, in order of priority."""
    s = settings

    def config(default: str) -> str:
        return s.config or default

    def train_step(name, cfg, variants, *overrides, timeout=120.0, steps=None) -> Step:
        argv = ["train-step", "--config", config(cfg), "--variants", *variants, "--steps", str(steps or s.steps),
                "--warmup", str(s.warmup), "--rounds", str(s.rounds), "--gemm-size", str(s.gemm_size)]  # fmt: skip
        return Step(name, argv + _threads(s) + _out(out_dir, name) + [*s.common, *overrides], timeout)

    compiled = ["compiled", "compiled_cudagraphs"] if s.compiled else []
    steps = [
        train_step("fair_reference", VITB_MID, ["avmae", "reference_bf16", "reference_fp32"]),
        Step("profile_avmae", ["profile", "--config", config(VITB_AVMAE), "--variant", "avmae", "--steps",
                               str(s.profile_steps)] + _threads(s) + _out(out_dir, "profile_avmae") + list(s.common), 90),
        Step("profile_reference", ["profile", "--config", config(VITB_MID), "--variant", "reference_bf16", "--steps",
                                   str(s.profile_steps)] + _threads(s) + _out(out_dir, "profile_reference")
             + list(s.common), 90),
        train_step("levers", VITB_AVMAE, ["avmae", "avmae_full_loss", *compiled], timeout=300.0),
        Step("input_copy", ["input-copy", "--config", config(VITB_AVMAE)] + _out(out_dir, "input_copy")
             + list(s.common), 60),
    ]  # fmt: skip
    for batch in s.batches[1:]:
        steps.append(train_step(f"batch_{batch}", VITB_AVMAE, ["avmae"], f"data.batch_size={batch}", timeout=90.0,
                                steps=max(1, s.steps // 2)))  # fmt: skip
    steps.append(train_step("vitl", VITL_AVMAE, ["avmae", *compiled[:1]], timeout=240.0))
    cavmae = [*s.cavmae] if s.config else []
    steps.append(train_step("cavmae_shaped", CAVMAE_CONFIG, ["avmae", *compiled[:1]], *cavmae, timeout=180.0))
    engine = ["engine", "--config", config(VITB_AVMAE)]
    run = [f"train.max_steps={s.engine_steps}", f"train.log_every={s.engine_log_every}",
           f"train.output_dir={out_dir / 'engine_run'}"]  # fmt: skip
    steps.append(Step("engine_synthetic", engine + ["--data-source", "device"] + _out(out_dir, "engine_synthetic")
                      + [*s.common, *run], 150, launch=True))  # fmt: skip
    if engine_data:
        steps.append(Step("engine_loader", engine + ["--data-source", "dataset"] + _out(out_dir, "engine_loader")
                          + [*s.common, *run, "data.num_workers=16", *engine_data], 240, launch=True))  # fmt: skip
    if s.compiled:
        steps.append(train_step("max_autotune", VITB_AVMAE, ["compiled_max_autotune"], timeout=420.0))
    return steps


def _out(out_dir: Path, name: str) -> list[str]:
    return ["--out", str(out_dir / f"{name}.json"), "--no-docs"]


def _threads(s: Settings) -> list[str]:
    return ["--threads", str(s.threads)] if s.threads else []


def command_of(step: Step) -> list[str]:
    if step.launch:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(TOOL), *step.argv]  # fmt: skip
    return [sys.executable, str(TOOL), *step.argv]


def plan_suite(steps: list[Step], budget_s: float | None) -> list[Step]:
    """The steps whose time limits fit in ``budget_s`` together, taken in order of priority (a later,
    shorter step may still fit); the others are marked ``skipped`` now, before anything runs, so
    that no limit can outlast the budget. ``None``: every step (the budget is the sum of the
    limits). Prints the plan."""
    used, planned = 0.0, []
    for step in steps:
        if budget_s is None or used + step.timeout_s <= budget_s:
            used += step.timeout_s
            planned.append(step)
        else:
            step.status = "skipped"
            step.message = f"budget: its {step.timeout_s:.0f} s limit does not fit in the {budget_s - used:.0f} s left"
    total = f"{budget_s:.0f} s budget" if budget_s is not None else "no budget given"
    print(f"[suite] plan ({total}): {len(planned)} of {len(steps)} steps, limits adding up to {used:.0f} s", flush=True)
    for step in steps:
        print(f"[suite]   {step.name:<20} {step.timeout_s:>5.0f} s  {'run' if step in planned else step.message}",
              flush=True)  # fmt: skip
    return planned


def run_suite(
    steps: list[Step],
    out_dir: Path,
    budget_s: float | None,
    in_process: Callable[[list[str]], int] | None = None,
) -> dict:
    """Run the steps of ``plan_suite(steps, budget_s)`` in order; write ``suite.json`` and ``suite.md``.
    A step that times out keeps the record it wrote so far (train-step writes one after each
    timed round).

    ``in_process``: call this (``tools/benchmark.py``'s ``main``) instead of starting processes
    (the tests; no timeouts then)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_suite(steps, budget_s)
    start = time.monotonic()
    for step in planned:
        began = time.monotonic()
        print(f"[suite] {step.name}: {shlex.join(command_of(step))}", flush=True)
        try:
            if in_process is not None:
                code = in_process(step.argv)
                step.status = "ok" if code == 0 else "error"
            else:
                done = subprocess.run(command_of(step), cwd=REPO, timeout=step.timeout_s,
                                      capture_output=True, text=True)  # fmt: skip
                (out_dir / f"{step.name}.log").write_text(done.stdout + done.stderr)
                step.status = "ok" if done.returncode == 0 else "error"
                if done.returncode:
                    step.message = (done.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired as err:
            step.status, step.message = "timeout", f"stopped at its {step.timeout_s:.0f} s limit"
            output = [o.decode() if isinstance(o, bytes) else o for o in (err.stdout, err.stderr) if o]
            (out_dir / f"{step.name}.log").write_text("".join(output))
        except (Exception, SystemExit) as err:  # in-process failures are recorded like a failed process
            step.status, step.message = "error", f"{type(err).__name__}: {err}"
        step.seconds = time.monotonic() - began
        record = out_dir / f"{step.name}.json"
        step.record = str(record) if record.is_file() else None
        print(f"[suite] {step.name}: {step.status} in {step.seconds:.0f} s {step.message}", flush=True)
    summary = {
        "budget_s": budget_s if budget_s is not None else sum(s.timeout_s for s in planned),
        "total_s": time.monotonic() - start,
        "steps": [asdict(s) | {"command": shlex.join(command_of(s))} for s in steps],
    }
    (out_dir / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "suite.md").write_text(suite_markdown(steps))
    return summary


def suite_markdown(steps: list[Step]) -> str:
    """The rows of every record, one table per step, and the steps that did not finish."""
    lines = ["# Benchmark suite", ""]
    for step in steps:
        lines.append(f"## {step.name}: {step.status} ({step.seconds:.0f} s) {step.message}".rstrip())
        if step.record:
            record = json.loads(Path(step.record).read_text())
            command = record.get("command", shlex.join(["python", "tools/benchmark.py", *step.argv]))
            lines += ["", *header_lines(record["kind"]), *(format_row(r) for r in record_rows(record, command))]
        lines.append("")
    return "\n".join(lines)
