"""Decode a split once into shards that training reads fast, locally or from an object store.

    python tools/prepare_data.py --config CONFIG --split train --out DIR [--num-workers N] [key.sub=value ...]

The config names the dataset (``data.*``, any manifest format) and the geometry the shards must
serve: frames are stored at the short side ``data.video.resize`` and at a rate high enough for
``data.video.frame_rate`` and ``augment.speed_range``. Missing and undecodable files are skipped
and listed in ``DIR/report.txt``. A rerun keeps the finished shards and rewrites the others.
The exit status is 1 when no sample was written, or more files failed than ``--max-failed``
allows.
Train on the result with ``data.format=shards`` (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.data.shard_writer import DEFAULT_JPEG_QUALITY, DEFAULT_SHARD_SIZE, REPORT_FILE, prepare_shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config naming the dataset (data.*) and the geometry")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--out", required=True, help="shard folder of this split")
    parser.add_argument("--num-workers", type=int, default=1, help="processes")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="clips per shard")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY)
    parser.add_argument("--max-failed", default=None, metavar="N|P%",
                        help="missing and undecodable files allowed, as a count or a percentage of the records; "
                        "more exit with status 1 (the shards are still written). Default: no limit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    max_failed = _max_failed(args.max_failed)
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    meta = prepare_shards(cfg, args.split, args.out, args.num_workers, args.shard_size, args.jpeg_quality)
    seconds = time.perf_counter() - start
    print(json.dumps({k: meta[k] for k in ("num_records", "num_samples", "num_missing", "num_undecodable", "num_shards")}))
    print(f"wrote {meta['num_samples']} samples to {args.out} in {seconds:.1f} s; "
          f"{meta['num_missing']} missing and {meta['num_undecodable']} undecodable files listed in "
          f"{args.out}/{REPORT_FILE}")
    failed = meta["num_missing"] + meta["num_undecodable"]
    allowed = max_failed(meta["num_records"]) if max_failed else None
    if meta["num_samples"] == 0:
        raise SystemExit(f"error: no sample written from the {meta['num_records']} records of {args.split}; "
                         f"the reasons are in {args.out}/{REPORT_FILE}")
    if allowed is not None and failed > allowed:
        raise SystemExit(f"error: {failed} of {meta['num_records']} files failed, more than --max-failed "
                         f"{args.max_failed}; the list is in {args.out}/{REPORT_FILE}")
    return meta


def _max_failed(value: str | None):
    """``--max-failed`` as ``records -> allowed failures``: ``N`` or ``P%`` of the records."""
    if value is None:
        return None
    try:
        if value.endswith("%"):
            share = float(value[:-1]) / 100
            return lambda records: int(share * records)
        count = int(value)
    except ValueError:
        raise SystemExit(f"error: --max-failed {value!r}: expected a count (5) or a percentage (1%)") from None
    return lambda records: count


if __name__ == "__main__":
    sys.exit(run_tool(main))
