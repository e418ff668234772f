"""Finetune a pretrained (exported) or randomly initialised encoder on a downstream dataset.

    python tools/finetune.py --config configs/finetune/synthetic.yaml [key.sub=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml tools/finetune.py \
        --config configs/finetune/vggsound.yaml finetune.pretrained=runs/ours_vitb_vggsound/export finetune.modalities=audio

``finetune.pretrained`` is a folder written by ``tools/export.py`` (empty: random init);
``finetune.modalities`` is audio, video or audiovisual. The run writes the classifier
(``model.safetensors`` + ``config.yaml``, the input of ``tools/eval.py``) and ``metrics.json``
of the last evaluation to ``train.output_dir``, and checkpoints every ``train.checkpoint_every``
steps under ``train.output_dir/checkpoints``: the same command resumes from the newest, and
SIGTERM/SIGINT save one before the run exits.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.engine import TrainingInterrupted
from avmae.engine.finetune import finetune


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/finetune/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    try:
        finetune(load_config(args.config, args.overrides))
    except TrainingInterrupted as stopped:
        print(f"{stopped}; run the same command again to resume", file=sys.stderr)
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
