"""Pretrain an audiovisual model.

    python tools/pretrain.py --config configs/pretrain/demo.yaml [key.sub=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml tools/pretrain.py --config ... [...]

A run resumes from the newest checkpoint in `train.output_dir` (`train.resume=auto`), so the same
command continues a run that was stopped. Exit status: 0 when done; 128 + the signal number
(143 for SIGTERM, 130 for SIGINT) when a signal stopped it after saving a checkpoint; 1 on errors.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.engine import TrainingInterrupted, pretrain


@record  # under a launcher, the error of a failed process is shown in its summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/pretrain/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        pretrain(cfg)
    except TrainingInterrupted as stopped:
        print(f"{stopped}; run the same command again to resume", file=sys.stderr)
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
