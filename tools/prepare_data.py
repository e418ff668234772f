"""Decode a split once into shards that training reads fast, from a folder or an object store.

    python tools/prepare_data.py --config CONFIG --split train --out DIR_OR_S3_URL [--num-workers N] \\
        [--num-machines M --machine-rank R] [key.sub=value ...]
    python tools/prepare_data.py --config CONFIG --split train --out DIR_OR_S3_URL --merge [key.sub=value ...]

The config names the dataset (``data.*``, any manifest format) and the geometry the shards must
serve: frames are stored at the short side ``data.video.resize`` and at a rate high enough for
``data.video.frame_rate`` and ``augment.speed_range``. Missing and undecodable files are skipped
and listed in ``OUT/report.txt``. A rerun keeps the finished shards and writes the others.

Several machines: run the same command on each with ``--num-machines M --machine-rank R``
(R = 0 .. M-1) and one shared ``--out`` (a shared file system or an ``s3://`` URL). Each writes
its own shards and lists its bad files in ``OUT/report-part-R-of-M.txt``; the last to finish
merges them into one dataset (``--merge`` does it by hand).
The exit status is 1 when no sample was written (by this machine, or in the merged dataset), or
more files failed than ``--max-failed`` allows.
Train on the result with ``data.format=shards`` (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.data.shard_writer import (
    DEFAULT_JPEG_QUALITY, DEFAULT_SHARD_SIZE, REPORT_FILE, merge_shards, part_report_file, prepare_part,
    unfinished_shards,
)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config naming the dataset (data.*) and the geometry")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--out", required=True, help="shard folder or s3://bucket/prefix of this split")
    parser.add_argument("--num-workers", type=int, default=1, help="processes on this machine")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="clips per shard")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY)
    parser.add_argument("--max-failed", default=None, metavar="N|P%",
                        help="missing and undecodable files allowed, as a count or a percentage of the records; "
                        "more exit with status 1 (the shards are still written). Default: no limit")
    parser.add_argument("--num-machines", type=int, default=1, help="machines preparing this split together")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine, 0 .. num-machines - 1")
    parser.add_argument("--merge", action="store_true", help="only merge the finished shards of every machine")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    max_failed = _max_failed(args.max_failed)
    cfg = load_config(args.config, args.overrides)
    out = args.out.rstrip("/")
    start = time.perf_counter()
    part = None
    if not args.merge:
        part = prepare_part(cfg, args.split, out, args.num_machines, args.machine_rank, args.num_workers,
                            args.shard_size, args.jpeg_quality)  # fmt: skip
        print(json.dumps(part))
        unfinished = unfinished_shards(out)
        if unfinished:
            print(f"machine {args.machine_rank} of {args.num_machines}: part done in {time.perf_counter() - start:.1f} s; "
                  f"{len(unfinished)} shards of other machines unfinished, the last machine to finish merges")  # fmt: skip
            _check(part, f"machine {args.machine_rank}'s part of {args.split}",
                   f"{out}/{part_report_file(args.num_machines, args.machine_rank)}", args.max_failed, max_failed)  # fmt: skip
            return part
    meta = merge_shards(cfg, args.split, out)
    print(json.dumps({k: meta[k] for k in ("num_records", "num_samples", "num_missing", "num_undecodable", "num_shards")}))
    print(f"wrote {meta['num_samples']} samples to {out} in {time.perf_counter() - start:.1f} s; "
          f"{meta['num_missing']} missing and {meta['num_undecodable']} undecodable files listed in "
          f"{out}/{REPORT_FILE}")  # fmt: skip
    if part and args.num_machines > 1:  # this machine's own files first: a wrong data.root here, say
        _check(part, f"machine {args.machine_rank}'s part of {args.split}",
               f"{out}/{part_report_file(args.num_machines, args.machine_rank)}", None, None)  # fmt: skip
    _check(meta, args.split, f"{out}/{REPORT_FILE}", args.max_failed, max_failed)
    return meta


def _check(counts: dict, what: str, report: str, limit: str | None, max_failed) -> None:
    """Exit with status 1 when ``counts`` hold no sample, or more failed files than ``--max-failed``."""
    failed = counts["num_missing"] + counts["num_undecodable"]
    if counts["num_records"] and counts["num_samples"] == 0:
        raise SystemExit(f"error: no sample written from the {counts['num_records']} records of {what}; "
                         f"the reasons are in {report}")  # fmt: skip
    if max_failed and failed > max_failed(counts["num_records"]):
        raise SystemExit(f"error: {failed} of {counts['num_records']} files failed, more than --max-failed "
                         f"{limit}; the list is in {report}")  # fmt: skip


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
