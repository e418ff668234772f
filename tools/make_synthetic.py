"""Write the synthetic audiovisual dataset: real H.264 + AAC mp4 clips, manifests, class list.

    python tools/make_synthetic.py --out data/synthetic --num-clips 800 --num-classes 8 --seed 0

See ``avmae.data.synthetic`` for what a class is and which nuisances vary per clip.
"""

from __future__ import annotations

import argparse
import sys

from avmae.cli import run_tool
from avmae.data.synthetic import BAD_KINDS, DEFAULT_NUISANCE, SPLITS, generate_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--num-clips", type=int, required=True, help="clips listed in the manifests, bad ones included"
    )
    parser.add_argument("--num-classes", type=int, required=True, help="number of classes (1 to 64)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--duration", type=float, default=4.0, help="clip length, seconds")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate; 29.97 is stored as 30000/1001")
    parser.add_argument("--size", type=int, default=64, help="frame width and height, pixels (even)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate, Hz")
    parser.add_argument(
        "--bad-fraction", type=float, default=0.0,
        help=f"fraction of bad clips ({', '.join(BAD_KINDS)}); when > 0, at least one of each",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument(
        "--nuisance", type=float, default=DEFAULT_NUISANCE,
        help=f"strength of the class-independent nuisances: 0 gives clean clips, 1 the strongest "
        f"designed (default {DEFAULT_NUISANCE})",
    )
    parser.add_argument(
        "--hue-sets-pitch", action="store_true",
        help="set each clip's pitch from its background's hue instead of drawing it: a per-clip "
        "audio-visual link that retrieval can learn (the demo's dataset)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    return parser.parse_args(argv)


def format_summary(summary: dict) -> str:
    """The summary of ``generate_dataset`` as a small text table."""
    width = max(len(name) for name in summary["classes"])
    lines = [
        f"wrote {summary['num_clips']} clips to {summary['out_dir']} "
        f"in {summary['seconds']:.1f} s ({summary['workers']} workers)",
        f"{'class':<{width}}  " + "  ".join(f"{split:>5}" for split in SPLITS),
    ]
    for name, counts in summary["per_class"].items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{counts[split]:>5}" for split in SPLITS))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{summary['splits'][split]:>5}" for split in SPLITS))
    lines.append("bad clips: " + ", ".join(f"{kind} {count}" for kind, count in summary["bad"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = generate_dataset(
        args.out,
        num_clips=args.num_clips,
        num_classes=args.num_classes,
        seed=args.seed,
        duration=args.duration,
        fps=args.fps,
        size=args.size,
        sample_rate=args.sample_rate,
        bad_fraction=args.bad_fraction,
        workers=args.workers,
        nuisance=args.nuisance,
        overwrite=args.overwrite,
        hue_sets_pitch=args.hue_sets_pitch,
    )
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_tool(main))
