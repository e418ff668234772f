"""Linear probe of frozen features: a pretrained encoder, a random encoder, raw inputs.

    python tools/linear_probe.py --config configs/probe/synthetic.yaml [--sources pretrained,random,raw] [key.sub=value ...]

``pretrained`` probes the encoder of ``finetune.pretrained`` (an export folder); ``random`` a
randomly initialised encoder of the same architecture; ``raw`` average-pooled pixels and fbank.
By default every source that can run does (``pretrained`` only when ``finetune.pretrained`` is
set), on features of ``finetune.modalities`` extracted in one pass over the clips; a linear
classifier is fitted on each with a weight-decay sweep chosen on the validation split. The table
is printed and the results go to ``train.output_dir/linear_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.engine.finetune import prepare_config
from avmae.evaluation.probe import SOURCES, format_probe_results, run_linear_probes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/probe/")
    parser.add_argument("--sources", default=None, help=f"comma-separated, among {','.join(SOURCES)}")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    cfg = prepare_config(load_config(args.config, args.overrides))

    pretrained = None
    if cfg.finetune.pretrained:
        from avmae.formats import from_pretrained

        pretrained = from_pretrained(cfg.finetune.pretrained)
    if args.sources:
        sources = tuple(args.sources.split(","))
    else:
        sources = SOURCES if pretrained is not None else ("random", "raw")
    results = run_linear_probes(cfg, pretrained, sources)

    print(format_probe_results(results))
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "linear_probe.json", "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
