"""Multi-view evaluation of a finetuned classifier, or audio-visual retrieval of an export.

    python tools/eval.py MODEL_DIR [--split test] [--out DIR] [key.sub=value ...]
    accelerate launch tools/eval.py MODEL_DIR ...
    python tools/eval.py EXPORT --task retrieval [--config DATA.yaml] [--subset CAVMAE.json] [--views N] [key.sub=value ...]

MODEL_DIR is the ``train.output_dir`` of ``tools/finetune.py`` (``model.safetensors`` +
``config.yaml``); overrides change that config, e.g. ``data.root=...`` or ``data.test_clips=4
data.test_crops=3``. Each record is scored on ``test_clips x test_crops`` views whose softmax
(single-label) or sigmoid (multi-label) outputs are averaged; predictions are gathered from all
processes and the sampler's padded repeats dropped. Writes ``metrics.json`` and, for multi-label
data, ``per_class_ap_<head>.csv`` to ``--out`` (default ``MODEL_DIR/eval_<split>``).

``--task retrieval`` takes an export folder (tools/export.py, or tools/convert.py --from cavmae):
audio->video and video->audio R@1/5/10, median and mean rank over ``--split`` of the dataset of
``--config`` (default: the export's own data section; overrides apply to it), optionally only the
clips of a CAV-MAE JSON data file (``--subset``, e.g. its 5-clips-per-class retrieval lists), with
the export's preprocessing (avmae.inference.retrieval.evaluate_retrieval, avmae.evaluation.retrieval).
Writes ``retrieval.json`` to ``--out`` (default ``EXPORT/retrieval_<split>``).
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from avmae.cli import run_tool
from avmae.engine.finetune import evaluate_finetuned
from avmae.inference import evaluate_retrieval


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="folder written by tools/finetune.py")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--out", default=None, help="output folder (default MODEL_DIR/eval_<split>)")
    parser.add_argument("--task", default="classification", choices=("classification", "retrieval"))
    parser.add_argument("--config", default=None, help="retrieval: YAML whose data section is the dataset")
    parser.add_argument("--subset", default=None, help="retrieval: CAV-MAE JSON data file of the clips to use")
    parser.add_argument("--views", type=int, default=None, help="retrieval: clips per file, features averaged")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the saved config")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    if args.task == "retrieval":
        evaluate_retrieval(args.model_dir, args.split, args.config, args.overrides, args.subset, args.views, args.out)
        return 0
    if args.config or args.subset or args.views:
        parser.error("--config, --subset and --views are options of --task retrieval")
    evaluate_finetuned(args.model_dir, args.split, args.overrides, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
