"""Export a pretraining checkpoint to a self-contained safetensors + config.json folder.

    python tools/export.py CHECKPOINT_DIR OUT_DIR [--part model|encoder|audio|video]

CHECKPOINT_DIR is a ``step_XXXXXXXX/`` folder of a pretraining run (``model.safetensors`` and
``config.yaml``). OUT_DIR receives ``model.safetensors`` (weights only) and ``config.json``; an
``audio`` export also receives ``timm_vit.safetensors``, a stock timm VisionTransformer.
Reload with ``avmae.from_pretrained(OUT_DIR)``.
"""

from __future__ import annotations

import argparse
import json
import sys

from avmae.cli import run_tool
from avmae.formats import EXPORT_CONFIG, PARTS, export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="pretraining checkpoint directory (step_XXXXXXXX/)")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--part", default="model", choices=PARTS, help="what to export (default: model)")
    args = parser.parse_args(argv)

    out = export(args.checkpoint, args.out_dir, args.part)
    description = json.loads((out / EXPORT_CONFIG).read_text())
    arch = description["architecture"]
    print(
        f"exported {args.part} ({arch['size']}, {arch['fusion']} fusion, modalities {'+'.join(arch['modalities'])}) "
        f"to {out}" + (" with a timm audio ViT" if "timm" in description else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
