"""Measure training-step throughput or data-pipeline throughput; write the JSON record and append
its rows to docs/benchmarks.md.

    python tools/benchmark.py train-step --config configs/pretrain/demo.yaml
        [--variants avmae reference_bf16 reference_fp32 compiled ...] [--steps N] [--warmup N] [--threads N]
        [--out FILE.json]
        [key.sub=value ...]
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 1 tools/benchmark.py engine
        --config configs/pretrain/ours_vitb_vggsound.yaml [--data-source device|dataset] [key.sub=value ...]
    python tools/benchmark.py data [--config configs/pretrain/ours_vitb_vggsound.yaml]
        [--decoders decord pyav shards shards-device] [--clips-per-video 1 4] [--stored-forms] [--items N] [--out FILE.json]
        [key.sub=value ...]
    python tools/benchmark.py profile --config CONFIG [--variant avmae] [--steps N] [key.sub=value ...]
    python tools/benchmark.py input-copy --config CONFIG [key.sub=value ...]
    python tools/benchmark.py gpu-suite --out DIR [--budget-s S] [--only STEP ...] [--tiny] [--engine-data key=value ...]

train-step runs on CUDA when it is available, else on the CPU, in the config's
train.mixed_precision (bf16 or no). Variants default to avmae, plus the reference rows when the
config is one the reference implements (mid fusion, separate decoders, no contrastive head):
reference_bf16 (same autocast, TF32 allowed) under bf16, and reference_fp32. data times the
training items of the config's dataset settings on one worker and one thread, over 360p H.264
clips it writes once into --clips-dir, and over the same clips prepared as shards. engine runs
the pretraining engine itself (accelerate, DDP, FSDP or DeepSpeed, as launched) for train.max_steps on
a random clip kept on the device, and reports its logged clips/s after the first logging window
(see avmae.benchmark.engine); --data-source dataset feeds it the config's own training data
instead (mp4s, or shards with data.format=shards). profile breaks one variant's step down
by kind of work (avmae.benchmark.profile); input-copy times one batch of frames to the device as
float32 and as uint8. gpu-suite runs every GPU measurement, each in its own process, and writes
the JSON records, suite.json and suite.md into DIR (avmae.benchmark.suite; --tiny: the micro
model, for a CPU check). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch

from avmae.cli import run_tool
from avmae.benchmark import (
    VARIANTS,
    clips_spec,
    default_clips_dir,
    default_variants,
    measure_data_pipeline,
    measure_engine,
    measure_train_step,
    save_record,
    write_benchmark_clips,
    write_json,
)
from avmae.benchmark.engine import SOURCES
from avmae.benchmark.input_copy import measure_input_copy
from avmae.benchmark.profile import profile_train_step
from avmae.benchmark.data_pipeline import SHARDS, SHARDS_DEVICE, measure_stored_forms
from avmae.benchmark.report import format_row, header_lines
from avmae.benchmark.suite import FULL, TINY, run_suite, suite_steps
from avmae.config import load_config
from avmae.data.video import DECODERS


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="JSON record (default runs/benchmark/<kind>-<config>-<time>.json)")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="markdown file the rows are appended to")
    parser.add_argument("--no-docs", dest="docs", action="store_const", const=None, help="do not append rows")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-step", help="training-step clips/s, peak memory and MFU per variant")
    train.add_argument("--config", required=True, help="pretraining YAML")
    train.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    train.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    train.add_argument("--rounds", type=int, default=2, help="timed rounds the steps are split into")
    train.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    train.add_argument("--gemm-size", type=int, default=2048,
                       help="matrix size of the GEMM that measures peak FLOP/s where no data sheet applies")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default torch's: one per core; on a shared machine fewer, "
                       "or the threads wait on each other)")
    _common(train)

    engine = commands.add_parser("engine", help="clips/s and MFU of the pretraining engine under accelerate launch")
    engine.add_argument("--config", required=True, help="pretraining YAML (train.max_steps, train.log_every)")
    engine.add_argument("--data-source", choices=SOURCES, default="device",
                        help="device: one random clip kept on the device; dataset: the config's training data")
    _common(engine)

    prof = commands.add_parser("profile", help="torch.profiler breakdown of one variant's training step")
    prof.add_argument("--config", required=True, help="pretraining YAML")
    prof.add_argument("--variant", choices=list(VARIANTS), default="avmae")
    prof.add_argument("--steps", type=int, default=3, help="profiled steps")
    prof.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    prof.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    prof.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _common(prof)

    copy = commands.add_parser("input-copy", help="one batch of frames to the device: float32 vs uint8")
    copy.add_argument("--config", required=True, help="YAML whose data.batch_size and video geometry are used")
    copy.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    _common(copy)

    suite = commands.add_parser("gpu-suite", help="every GPU measurement, within a time budget, as JSON records")
    suite.add_argument("--out", required=True, help="folder for the records, suite.json and suite.md")
    suite.add_argument("--budget-s", type=float, default=None,
                       help="wall-clock budget: the steps whose limits fit in it, in order, are run and the plan is "
                       "printed first (default: every step, the sum of their limits)")
    suite.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps")
    suite.add_argument("--tiny", action="store_true", help="micro model, a few steps, no compiled variants (CPU check)")
    suite.add_argument("--in-process", action="store_true", help="run the steps in this process (no timeouts)")
    suite.add_argument("--engine-data", nargs="+", default=None, metavar="KEY=VALUE",
                       help="overrides naming the training data the engine_loader step reads (e.g. the shards)")

    data = commands.add_parser("data", help="clips/s of one data-loading worker per video decoder")
    data.add_argument("--config", default="configs/pretrain/ours_vitb_vggsound.yaml",
                      help="YAML whose data and augment settings are timed")
    data.add_argument("--decoders", nargs="+", choices=[*DECODERS, SHARDS, SHARDS_DEVICE], default=[*DECODERS, SHARDS],
                      help="video decoders of the mp4 path, shards (the clips prepared by prepare_data), and "
                      "shards-device (the shards with data.device_transforms: the worker decodes and crops only)")
    data.add_argument("--stored-forms", action="store_true",
                      help="also time reading one clip's frames stored as JPEG vs short-GOP H.264")
    data.add_argument("--clips-per-video", nargs="+", type=int, default=[1], help="data.clips_per_video values")
    data.add_argument("--items", type=int, default=32, help="timed dataset items per setting")
    data.add_argument("--warmup", type=int, default=2, help="untimed items per setting first")
    data.add_argument("--rounds", type=int, default=2, help="timed rounds the items are split into")
    data.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    data.add_argument("--clips-dir", default=None, help="cache folder of the clips (default under data/benchmark)")
    data.add_argument("--num-clips", type=int, default=16)
    data.add_argument("--duration", type=float, default=10.0, help="seconds per clip")
    data.add_argument("--fps", type=float, nargs="+", default=[25.0, 30.0], help="frame rates, used in turn")
    data.add_argument("--width", type=int, default=640)
    data.add_argument("--height", type=int, default=360)
    _common(data)
    return parser


def _device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_train_step(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    variants = args.variants or default_variants(cfg)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"train-step on {device}: {', '.join(variants)}, {cfg.model.size}, batch {cfg.data.batch_size}, "
          f"{cfg.train.mixed_precision}", flush=True)  # fmt: skip
    partial = (lambda record: write_json(record, args.out)) if args.out else None  # kept if the run is stopped
    return measure_train_step(cfg, device, variants, warmup=args.warmup, steps=args.steps, rounds=args.rounds,
                              gemm_size=args.gemm_size, on_round=partial)  # fmt: skip


def run_data(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    spec = clips_spec(args.num_clips, args.duration, args.fps, args.width, args.height)
    clips_dir = Path(args.clips_dir) if args.clips_dir else default_clips_dir(spec)
    print(f"clips in {clips_dir} (written on first use)", flush=True)
    write_benchmark_clips(clips_dir, spec)
    record = measure_data_pipeline(
        cfg, clips_dir, args.decoders, args.clips_per_video,
        items=args.items, warmup=args.warmup, rounds=args.rounds, threads=args.threads,
    )  # fmt: skip
    if args.stored_forms:
        record["stored_forms"] = measure_stored_forms(cfg, clips_dir)
    return record


def run_engine(args: argparse.Namespace) -> dict | None:
    cfg = load_config(args.config, ["train.output_dir=runs/benchmark/engine_run", *args.overrides])
    return measure_engine(cfg, args.data_source)


def run_profile(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    return profile_train_step(cfg, _device(args.device), args.variant, warmup=args.warmup, steps=args.steps)


def run_input_copy(args: argparse.Namespace) -> dict:
    return measure_input_copy(load_config(args.config, args.overrides), _device(args.device))


def run_gpu_suite(args: argparse.Namespace) -> int:
    out = Path(args.out)
    steps = suite_steps(TINY if args.tiny else FULL, out, args.engine_data)
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            raise ValueError(f"--only: no step named {', '.join(sorted(unknown))} (steps: {', '.join(s.name for s in steps)})")
        steps = [s for s in steps if s.name in args.only]
    summary = run_suite(steps, out, args.budget_s, in_process=main if args.in_process else None)
    failed = [f"{s['name']} ({s['status']})" for s in summary["steps"] if s["status"] != "ok"]
    print(f"suite: {len(summary['steps'])} steps in {summary['total_s']:.0f} s; records, suite.json and suite.md in {out}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "gpu-suite":
        return run_gpu_suite(args)
    runs = {"train-step": run_train_step, "data": run_data, "engine": run_engine, "profile": run_profile,
            "input-copy": run_input_copy}  # fmt: skip
    record = runs[args.command](args)
    if record is None:  # not the main process of an accelerate launch
        return 0
    command = shlex.join(["python", "tools/benchmark.py", *argv])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or f"runs/benchmark/{record['kind']}-{Path(args.config).stem}-{stamp}.json"
    rows = save_record(record, command, out, args.docs)
    print("\n".join(header_lines(record["kind"]) + [format_row(r) for r in rows]))
    print(f"record: {out}" + (f"; rows appended to {args.docs}" if args.docs else ""))
    if record["kind"] == "train_step":
        failed = {n: v.get("error", "not timed") for n, v in record["variants"].items() if "clips_per_s" not in v}
        for name, error in failed.items():
            print(f"{name} failed: {error}", file=sys.stderr)
        if len(failed) == len(record["variants"]):
            print("error: every variant failed; nothing was measured", file=sys.stderr)
            return 1
        for name, variant in record["variants"].items():
            if "reference_note" in variant:
                print(f"{name}: {variant['reference_note']}", file=sys.stderr)
                break
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
