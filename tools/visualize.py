"""Picture of masked reconstruction for one clip: input, masked input, reconstruction and target,
for a few frames and for the spectrogram.

    python tools/visualize.py CHECKPOINT CLIP [--out FILE.png] [--seed S]

CHECKPOINT is a pretraining checkpoint (``step_XXXXXXXX/``) or a ``--part model`` export folder;
CLIP a video file with an audio track. The clip is read at the model's own geometry (its centred
evaluation window); ``--seed`` draws the mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avmae.cli import run_tool
from avmae.visualize import visualize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="step_XXXXXXXX/ checkpoint or model export folder")
    parser.add_argument("clip", help="video file (mp4 with audio)")
    parser.add_argument("--out", default=None, help="PNG to write (default: CHECKPOINT/reconstruction_CLIP.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask")
    args = parser.parse_args(argv)
    out = args.out or Path(args.checkpoint) / f"reconstruction_{Path(args.clip).stem}.png"
    path, stats = visualize(args.checkpoint, args.clip, out, args.seed)
    for modality, s in stats.items():
        print(f"{modality}: {s['mask_ratio']:.0%} of patches masked, masked-patch MSE {s['mse']:.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
