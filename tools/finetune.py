"""Finetune a pretrained (exported) or randomly initialised encoder on a downstream dataset.

    python tools/finetune.py --config configs/finetune/synthetic.yaml [key.sub=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml tools/finetune.py \
        --config configs/finetune/vggsound.yaml finetune.pretrained=runs/ours_vitb_vggsound/export finetune.modalities=audio

``finetune.pretrained`` is a folder written by ``tools/export.py`` (empty: random init);
``finetune.modalities`` is audio, video or audiovisual. The run writes the classifier
(``model.safetensors`` + ``config.yaml``, the input of ``tools/eval.py``) and ``metrics.json``
of the last evaluation to ``train.output_dir``.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from avmae.config import load_config
from avmae.engine.finetune import finetune


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/finetune/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    finetune(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
