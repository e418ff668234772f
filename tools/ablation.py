"""The augmentation ablation (arXiv 2110.07082): pretrain with each augmentation setting, export,
linear-probe, and write one table.

    python tools/ablation.py [CONFIG ...] [--out runs/ablation] [--runs-dir DIR]
                             [--probe-config configs/probe/synthetic.yaml] [key.sub=value ...]

CONFIGs default to every YAML of configs/ablation/ (sampling-only, coherency-keeping and
coherency-breaking augmentation on the demo recipe, at strengths 1 and 2). Each run goes to its
config's train.output_dir (or --runs-dir/<config name>); the random-init and raw-input probes run
once. key.sub=value overrides apply to every pretraining and to the probe config. The table is
printed and written to --out/ablation.md and --out/ablation.json. Started again, an interrupted
ablation continues: finished runs are not retrained, and saved probe results are reused.

The objectives side by side (MAE, MAE + InfoNCE, SimSiam, MoCo v3 on the demo recipe) are the
configs of configs/objectives/, run the same way (docs/ablation.md):

    python tools/ablation.py configs/objectives/*.yaml --out runs/objectives
"""

from __future__ import annotations

import argparse
import sys

from avmae.cli import run_tool
from avmae.ablation import ablation_configs, format_table, run_ablation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablation", help="folder of the table and the per-run results")
    parser.add_argument("--runs-dir", default=None, help="put run NAME in RUNS_DIR/NAME instead of its train.output_dir")
    parser.add_argument("--probe-config", default="configs/probe/synthetic.yaml", help="linear-probe YAML")
    parser.add_argument("args", nargs="*", help="ablation YAML files, then key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    configs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if not configs:
        configs = ablation_configs("configs/ablation")
    result = run_ablation(configs, args.out, args.probe_config, overrides, args.runs_dir)
    print()
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
