"""Print a model's token counts, parameter counts and FLOPs per clip.

    python tools/model_info.py --config configs/pretrain/base.yaml [key.sub=value ...]

FLOPs are counted by torch's FlopCounterMode on the ``meta`` device (nothing is computed, any
size takes seconds): the encoder on all tokens (the downstream forward), the pretraining forward
(masked encoder, decoders, contrastive head) and a pretraining step (forward + backward).
"""

from __future__ import annotations

import argparse
import json
import sys

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.models.flops import describe_model


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    info = describe_model(cfg)
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return 0
    m, v, a = cfg.model, cfg.data.video, cfg.data.audio
    print(f"model {m.size}: fusion={m.fusion}, decoder={m.decoder}, reconstruction={m.reconstruction}, "
          f"contrastive={m.contrastive}")
    print(f"video {v.num_frames} frames at {v.size}x{v.size}: {info['tokens']['video']} tokens "
          f"({info['visible_tokens']['video']} visible, {m.video_masking} masking at ratio {m.mask_ratio_video})")
    print(f"audio {a.target_length}x{a.num_mel_bins} fbank: {info['tokens']['audio']} tokens "
          f"({info['visible_tokens']['audio']} visible, {m.audio_masking} masking at ratio {m.mask_ratio_audio})")
    for name, count in info["params"].items():
        print(f"params {name:<16} {count:>14,d}  ({_human(count)})")
    for name, count in info["flops_per_clip"].items():
        print(f"FLOPs per clip {name:<17} {_human(count)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
