"""The whole journey on the embedded synthetic dataset, on a CPU, in about 10 minutes:

    python tools/demo.py [--seed S] [--out runs/demo] [--data data/synthetic] [key.sub=value ...]

1. writes the synthetic audiovisual dataset (real H.264 + AAC mp4s), each clip's pitch set by
   its background's hue (make_synthetic.py --hue-sets-pitch), unless --data holds one;
2. pretrains the micro AV-MAE of configs/pretrain/demo.yaml with CAV-MAE's audio-visual InfoNCE
   added (configs/pretrain/demo_infonce.yaml; overrides apply to it);
3. exports it to safetensors (--out/export);
4. linear-probes the pretrained encoder, a randomly initialised one and the raw inputs on the
   held-out clips (configs/probe/synthetic.yaml);
5. scores audio->video and video->audio retrieval (R@1, R@5) of the pretrained and the
   random-init encoder on the held-out clips;
6. draws a masked reconstruction (--out/reconstruction.png);
and prints one summary table (also in --out/summary.json). Started again with the same --out, a
stopped demo resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from avmae.cli import run_tool
from avmae.demo import format_summary, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="synthetic dataset folder (written if absent)")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of pretraining, masks and the random encoder")
    parser.add_argument("--num-clips", type=int, default=800, help="clips of a newly written dataset")
    parser.add_argument("--num-classes", type=int, default=8, help="classes of a newly written dataset")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of a newly written dataset")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the pretraining config")
    args = parser.parse_intermixed_args(argv)
    summary = run_demo(
        args.data, args.out, args.seed, args.num_clips, args.num_classes, args.data_seed, args.overrides
    )
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
