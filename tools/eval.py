"""Multi-view evaluation of a finetuned classifier.

    python tools/eval.py MODEL_DIR [--split test] [--out DIR] [key.sub=value ...]
    accelerate launch tools/eval.py MODEL_DIR ...

MODEL_DIR is the ``train.output_dir`` of ``tools/finetune.py`` (``model.safetensors`` +
``config.yaml``); overrides change that config, e.g. ``data.root=...`` or ``data.test_clips=4
data.test_crops=3``. Each record is scored on ``test_clips x test_crops`` views whose softmax
(single-label) or sigmoid (multi-label) outputs are averaged; predictions are gathered from all
processes and the sampler's padded repeats dropped. Writes ``metrics.json`` and, for multi-label
data, ``per_class_ap_<head>.csv`` to ``--out`` (default ``MODEL_DIR/eval_<split>``).
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from avmae.cli import run_tool
from avmae.engine.finetune import evaluate_finetuned


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by tools/finetune.py")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--out", default=None, help="output folder (default MODEL_DIR/eval_<split>)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the saved config")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    evaluate_finetuned(args.model_dir, args.split, args.overrides, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
