"""Compute the fbank normalisation statistics of a dataset and print them as config lines.

    python tools/compute_norm_stats.py --config CONFIG [--split train] [--max-clips N] [key.sub=value ...]

The statistics are the mean and std of the unnormalised Kaldi fbank (``avmae.data.audio``)
over the first ``data.audio.seconds`` of every clip of the split's manifest (or of
``--max-clips`` clips spread evenly over it). Missing, unreadable and silent files are skipped
and listed on stderr. Paste the printed lines into the dataset's config.
"""

from __future__ import annotations

import argparse
import sys

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.data.audio import fbank_stats
from avmae.data.manifests import read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config naming the dataset (data.*)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--max-clips", type=int, default=0, help="use this many clips spread over the split; 0 = all")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    manifest = read_manifest(cfg.data, args.split)
    records = manifest.records
    if args.max_clips and args.max_clips < len(records):
        step = len(records) / args.max_clips
        records = [records[int(i * step)] for i in range(args.max_clips)]
    paths = [r.audio or r.video for r in records]
    missing = [p for p in paths if not p.is_file()]
    stats = fbank_stats([p for p in paths if p.is_file()], cfg.data.audio)

    for path in missing:
        print(f"skipped: {path}: file not found", file=sys.stderr)
    for _, reason in stats.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(
        f"# fbank statistics of {stats.clips} clips ({stats.frames} frames) of {manifest.source}; "
        f"{len(missing) + len(stats.skipped)} skipped"
    )
    print("data:\n  audio:")
    print(f"    norm_mean: {stats.mean:.7f}")
    print(f"    norm_std: {stats.std:.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
