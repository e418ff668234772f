"""Linear probe of frozen features: a pretrained encoder, a random encoder, or raw inputs.

    python tools/linear_probe.py --config configs/probe/synthetic.yaml [--feature encoder|raw|all] [key.sub=value ...]

``--feature encoder`` probes the encoder of ``finetune.pretrained`` (an export folder), or a
randomly initialised encoder when that is empty; ``raw`` probes average-pooled pixels and fbank;
``all`` runs the pretrained encoder (when given), a random encoder and the raw baseline and
prints them side by side. Features of ``finetune.modalities`` are extracted once per split, and
a linear classifier is fitted on them with a weight-decay sweep chosen on the validation split.
Results go to ``train.output_dir/linear_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avmae.config import load_config
from avmae.evaluation.finetune import prepare_config
from avmae.evaluation.probe import format_probe_results, run_linear_probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/probe/")
    parser.add_argument("--feature", default="encoder", choices=("encoder", "raw", "all"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    cfg = prepare_config(load_config(args.config, args.overrides))

    pretrained = None
    if cfg.finetune.pretrained:
        from avmae.export import from_pretrained

        pretrained = from_pretrained(cfg.finetune.pretrained)
    runs = {"encoder": [("encoder", pretrained)], "raw": [("raw", None)]}.get(args.feature)
    if runs is None:  # all
        runs = ([("encoder", pretrained)] if pretrained is not None else []) + [("encoder", None), ("raw", None)]
    results = [run_linear_probe(cfg, encoder, feature) for feature, encoder in runs]

    print(format_probe_results(results))
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "linear_probe.json", "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
