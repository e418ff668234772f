"""Top-k classes of video files from a finetuned classifier.

    python tools/predict.py CLASSIFIER clip.mp4 [clip2.mp4 ...] [--top-k 5] [--json]
    python tools/predict.py runs/finetune_as20k clip.mp4 --labels class_labels_indices.csv
    python tools/predict.py runs/finetune_epic P01_01.mp4 --labels verb=EPIC_100_verb_classes.csv \\
        --labels noun=EPIC_100_noun_classes.csv

CLASSIFIER is a folder of tools/finetune.py (or the ``classifier`` folder of tools/convert.py):
``model.safetensors`` + ``config.yaml``. Each file is preprocessed as that config's evaluation
does (``data.test_clips x data.test_crops`` views, softmax, or sigmoid for multi-label AudioSet
data, averaged). Class names come from ``--labels`` (AudioSet's ``class_labels_indices.csv``,
VGGSound's ``stat.csv`` or class list, EPIC's verb/noun csvs, one name a line; ``head=FILE`` for
one head of several), else from the config's own dataset files when they are there, else numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

from avmae.cli import run_tool
from avmae.inference import Classifier


def _labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for value in values:
        head, sep, path = value.partition("=")
        labels.update({head: path} if sep else {"label": value})
    return labels


def format_predictions(predictions: list[dict]) -> str:
    lines = []
    for row in predictions:
        lines.append(row["file"])
        for head, top in row.items():
            if head == "file":
                continue
            for rank, p in enumerate(top, 1):
                lines.append(f"  {head:<6} {rank:>2}. {p['score']:7.4f}  {p['class']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("classifier", help="finetuned classifier folder")
    parser.add_argument("files", nargs="+", help="video files")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--labels", action="append", default=[], help="label file, or head=FILE")
    parser.add_argument("--device", default=None, help="cuda, cpu... (default: the GPU when there is one)")
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="key.sub=value overrides of the classifier's config (e.g. data.test_clips=1)")
    args = parser.parse_args(argv)
    classifier = Classifier(args.classifier, _labels(args.labels), args.device, args.override)
    predictions = classifier.predict(args.files, args.top_k)
    print(json.dumps(predictions, indent=2) if args.json else format_predictions(predictions))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
