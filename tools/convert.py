"""Convert a published checkpoint of MAE, AudioMAE, VideoMAE or CAV-MAE into an avmae export folder.

    python tools/convert.py --from mae mae_pretrain_vit_base.pth runs/mae_vitb
    python tools/convert.py --from audiomae finetuned.pth runs/audiomae_as2m          # + classifier/
    python tools/convert.py --from cavmae cav-mae-scale++.pth runs/cavmae --check --source-repo ~/src/cav-mae
    python tools/convert.py --from cavmae /tmp/random.pth runs/cavmae_random --random-weights tiny \
        --check --source-repo ~/src/cav-mae
    python tools/convert.py --from mae mae_pretrain_vit_base.pth runs/mae_in --config configs/pretrain/cavmae_audioset.yaml

OUT receives ``model.safetensors`` and ``config.json`` (the source's architecture, LayerNorm eps,
input geometry and preprocessing, what was dropped and why), which ``avmae.from_pretrained``,
``finetune.pretrained``, ``tools/linear_probe.py`` and ``model.init_from`` accept (the last
example: CAV-MAE's ImageNet-MAE start, converted onto its architecture). A finetuned source also
gets ``OUT/classifier`` (its head and class order kept) for ``tools/eval.py``.

``--check`` compares the converted model's output with the source repository's own model on one
input and exits 1 when max |ours - theirs| / max |theirs| is over ``--tolerance``. It is skipped,
with the reason, only when that code is not there (``--source-repo`` points at a checkout); any
other failure of the source code ends with its traceback. ``--random-weights SIZE`` first writes
SOURCE: the source's own finetuned (``--random-pretrained``: pretraining) model at that avmae size
with random weights, LayerNorms moved away from 1 and 0 (the fourth example: a check without
downloading a checkpoint). Overrides without ``--config`` change the source's own config and keep
the check (``model.norm_eps=1e-6`` on a CAV-MAE checkpoint makes it fail).
See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.convert import (
    DEFAULT_TOLERANCE,
    PARTS,
    SOURCES,
    CheckSkipped,
    check,
    convert,
    random_source_checkpoint,
)
from avmae.models import SIZES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="kind", required=True, choices=SOURCES, help="the source codebase")
    parser.add_argument("source", help="the checkpoint file (.pth, .pt, .bin or .safetensors)")
    parser.add_argument("out_dir", help="output export folder")
    parser.add_argument("--part", choices=PARTS, default=None,
                        help="what to write (default: the source's modalities)")
    parser.add_argument("--config", default=None, help="target avmae YAML config (default: the source's own)")
    parser.add_argument("--num-frames", type=int, default=None, help="another frame count (positions resampled)")
    parser.add_argument("--image-size", type=int, default=None, help="another crop size (positions resampled)")
    parser.add_argument("--audio-seconds", type=float, default=None, help="another audio window (positions resampled)")
    parser.add_argument("--check", action="store_true", help="compare with the source repository's model code")
    parser.add_argument("--source-repo", default=None, help="checkout of the source repository, for --check")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="--check fails past this max |diff| / max |source output| (default %(default)g)")
    parser.add_argument("--random-weights", choices=SIZES, default=None, metavar="SIZE",
                        help="first write SOURCE: the source's own finetuned model of this size, random weights")
    parser.add_argument("--random-pretrained", action="store_true",
                        help="with --random-weights: the source's pretraining model instead")
    parser.add_argument("overrides", nargs="*",
                        help="key.sub=value overrides of --config, else of the source's own config")
    args = parser.parse_intermixed_args(argv)

    if args.random_weights:
        try:
            random_source_checkpoint(args.kind, args.source, args.source_repo, size=args.random_weights,
                                     finetuned=not args.random_pretrained)
        except CheckSkipped as err:
            print(f"cannot build random weights: {err}")
            return 1
        what = "pretraining" if args.random_pretrained else "finetuned"
        print(f"wrote {args.source}: the {args.kind} source's {what} model, size {args.random_weights}, random weights")
    # overrides go onto --config, else onto the source's own config (e.g. model.norm_eps=1e-6:
    # --check must fail)
    config = load_config(args.config, args.overrides) if args.config else None
    try:
        out = convert(args.kind, args.source, args.out_dir, part=args.part, config=config,
                      num_frames=args.num_frames, image_size=args.image_size, audio_seconds=args.audio_seconds,
                      overrides=None if args.config else args.overrides)
    except ValueError as err:  # the one line run_tool prints names the checkpoint
        if args.source in str(err):
            raise
        raise type(err)(f"{args.source}: {err}") from err
    description = json.loads((out / "config.json").read_text())
    arch, conversion = description["architecture"], description["conversion"]
    print(f"converted {args.kind} ({'finetuned' if conversion['finetuned'] else 'pretrained'}) to {out}: "
          f"{description['part']}, size {arch['size']}, {arch['fusion']} fusion, modalities {'+'.join(arch['modalities'])}")
    for pattern, reason in conversion["dropped"].items():
        print(f"  dropped {pattern}: {reason}")
    if conversion["finetuned"]:
        print(f"  classifier for tools/eval.py: {out / 'classifier'}")
    if args.check and args.config:
        print("check skipped: only a conversion onto the source's own architecture (no --config) computes the same function")
    elif args.check:
        try:
            result = check(args.kind, args.source, out, args.source_repo, tolerance=args.tolerance)
        except CheckSkipped as err:
            print(f"check skipped: {err}")
            return 0
        verdict = "passed" if result["passed"] else "FAILED"
        print(f"check against the source model ({result['compared']}): {verdict}, relative difference "
              f"{result['relative_diff']:.3g} (max |diff| {result['max_abs_diff']:.3g} / max |value| "
              f"{result['max_abs_value']:.3g}), tolerance {result['tolerance']:.3g}; LayerNorm eps: source "
              f"{result['source_norm_eps']:g}, converted {result['norm_eps']:g}")
        return 0 if result["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
