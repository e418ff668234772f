"""The whole journey on the synthetic dataset: generate, pretrain, export, probe, retrieve, picture.

``run_demo`` is what ``python tools/demo.py`` runs. Every step is the library call a researcher
would make by hand (``avmae.data.synthetic.generate_dataset``, ``avmae.engine.pretrain``,
``avmae.formats.export``, ``avmae.evaluation.probe.run_linear_probes``,
``avmae.inference.run_retrieval``, ``avmae.visualize.visualize``); the recipe is
``configs/pretrain/demo_infonce.yaml`` (``configs/pretrain/demo.yaml`` plus CAV-MAE's InfoNCE
term) and ``configs/probe/synthetic.yaml``; the dataset is written with ``hue_sets_pitch``.
The demo asks two questions, with numbers: does a linear classifier on the pretrained
encoder's features beat the same classifier on a randomly initialised encoder, and on the raw
inputs, on held-out clips? And does
the pretrained encoder find a held-out clip's video from its audio (and back) better than chance
and than the random-init encoder (the recipe's InfoNCE term trains exactly that)?
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from avmae.config import load_config
from avmae.data.synthetic import generate_dataset
from avmae.engine import pretrain, read_scalars
from avmae.engine.finetune import prepare_config
from avmae.evaluation.probe import run_linear_probes
from avmae.formats import export, from_pretrained
from avmae.inference import Embedder, load, run_retrieval
from avmae.models import build_encoder
from avmae.visualize import visualize

# The demo recipe (configs/pretrain/demo.yaml) plus CAV-MAE's audio-visual InfoNCE, so that the
# retrieval step scores an encoder trained to match a clip's audio with its video; the dataset it
# writes ties each clip's pitch to its background's hue, the link that retrieval can learn here.
PRETRAIN_CONFIG = "configs/pretrain/demo_infonce.yaml"
PROBE_CONFIG = "configs/probe/synthetic.yaml"
LOSS_TAGS = ("train/mae", "train/mae_video", "train/mae_audio", "train/contrastive")
SOURCE_NAMES = {"pretrained": "pretrained encoder", "random": "random-init encoder", "raw": "raw inputs"}
RETRIEVAL_SPLIT = "test"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def loss_drop(run_dir: Path) -> dict[str, dict[str, float]]:
    """First and last logged value (each the mean of a logging window) of the pretraining losses."""
    drop = {}
    for tag in LOSS_TAGS:
        values = read_scalars(run_dir, tag)
        if values:
            first, last = values[min(values)], values[max(values)]
            drop[tag.split("/")[1]] = {"first": first, "last": last, "factor": first / max(last, 1e-12)}
    return drop


def run_demo(
    data_root: str | Path = "data/synthetic",
    out_dir: str | Path = "runs/demo",
    seed: int = 0,
    num_clips: int = 800,
    num_classes: int = 8,
    data_seed: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Run the demo and return its summary (also written to ``out_dir/summary.json``).

    The dataset is generated only when ``data_root`` holds none (``data_seed`` fixes its content,
    ``seed`` the pretraining, the random-init encoder and the masks of the picture). A stopped
    run resumes from its newest checkpoint when started again with the same ``out_dir``.
    ``overrides`` (``key.sub=value``) apply to the pretraining config.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    if (data_root / "train.csv").is_file():
        print(f"[1/6] synthetic dataset: using the one in {data_root}")
        seconds["data"] = 0.0
    else:
        print(f"[1/6] synthetic dataset: writing {num_clips} clips of {num_classes} classes to {data_root}")
        _, seconds["data"] = _timed(
            generate_dataset, data_root, num_clips, num_classes, data_seed, hue_sets_pitch=True
        )
    hue_link = has_hue_link(data_root)
    if not hue_link:
        print(
            f"warning: {data_root} was written without --hue-sets-pitch: its audio and video share "
            "nothing this model learns to match, so expect retrieval at chance"
        )

    print(f"[2/6] pretraining ({PRETRAIN_CONFIG})")
    pretrain_dir = out_dir / "pretrain"
    cfg = load_config(
        PRETRAIN_CONFIG, [f"data.root={data_root}", f"train.output_dir={pretrain_dir}", f"train.seed={seed}", *overrides]
    )
    checkpoint, seconds["pretrain"] = _timed(pretrain, cfg)

    print("[3/6] export to safetensors")
    export_dir, seconds["export"] = _timed(export, checkpoint, out_dir / "export", "model")

    print(f"[4/6] linear probes ({PROBE_CONFIG}): pretrained vs random-init encoder vs raw inputs")
    probe_cfg = prepare_config(
        load_config(
            PROBE_CONFIG,
            [
                f"data.root={data_root}",
                f"finetune.pretrained={export_dir}",
                f"train.output_dir={out_dir / 'probe'}",
                f"train.seed={seed}",
            ],
        )
    )
    probes, seconds["probe"] = _timed(run_linear_probes, probe_cfg, from_pretrained(export_dir))

    print(f"[5/6] audio-visual retrieval on the {RETRIEVAL_SPLIT} clips: pretrained vs random-init encoder")
    retrieval, seconds["retrieval"] = _timed(run_demo_retrieval, load(export_dir), probe_cfg)

    print("[6/6] picture of a masked reconstruction")
    with open(data_root / "test.csv", newline="") as f:
        first_test_clip = data_root / next(csv.DictReader(f))["video"]
    (picture, _), seconds["picture"] = _timed(
        visualize, export_dir, first_test_clip, out_dir / "reconstruction.png", seed
    )

    seconds["total"] = time.perf_counter() - started
    summary = {
        "seed": seed,
        "data": {
            "root": str(data_root), "num_clips": num_clips, "num_classes": num_classes,
            "hue_sets_pitch": hue_link,
        },
        "steps": cfg.train.max_steps,
        "checkpoint": str(checkpoint),
        "export": str(export_dir),
        "picture": str(picture),
        "losses": loss_drop(pretrain_dir),
        "probes": {
            p["source"]: {"dim": p["dim"], "records": p["records"], **{s: p[s]["label"]["top1"] for s in ("train", "val", "test")}}
            for p in probes
        },
        "retrieval": retrieval,
        "seconds": seconds,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def has_hue_link(data_root: Path) -> bool:
    """Whether the synthetic dataset in ``data_root`` was written with ``hue_sets_pitch``
    (its ``metadata.jsonl`` rows say so)."""
    with open(data_root / "metadata.jsonl") as f:
        return bool(json.loads(f.readline()).get("hue_sets_pitch", False))


def run_demo_retrieval(pretrained, probe_cfg) -> dict:
    """Retrieval metrics (``avmae.evaluation.retrieval``) of the pretrained encoder and of a
    random-init encoder of the same architecture (seeded by ``train.seed``, as the probe's), on
    the held-out split with the probe's views; one decoding pass per encoder."""
    pretrained = pretrained.with_data(probe_cfg.data)
    torch.manual_seed(probe_cfg.train.seed)
    random_init = Embedder(build_encoder(pretrained.cfg), pretrained.cfg, pretrained.device)
    dataset = pretrained.split_dataset(RETRIEVAL_SPLIT)
    workers = probe_cfg.data.num_workers
    return {
        name: run_retrieval(embedder, dataset, batch_size=probe_cfg.data.batch_size, num_workers=workers)
        for name, embedder in (("pretrained", pretrained), ("random", random_init))
    }


def format_summary(summary: dict) -> str:
    """The demo's summary table: timings, losses, probe accuracies, and where the files are."""
    s, losses, probes = summary["seconds"], summary["losses"], summary["probes"]
    lines = ["", f"avmae demo (seed {summary['seed']})", ""]
    lines.append(f"{'step':<14} {'time':>8}  result")
    data = summary["data"]
    made = f"{s['data']:.0f} s" if s["data"] else "reused"
    lines.append(f"{'data':<14} {made:>8}  {data['root']}")
    loss = losses.get("mae")
    parts = [f"{summary['steps']} steps"]
    if loss:
        parts.append(f"reconstruction loss {loss['first']:.3f} -> {loss['last']:.3f} ({loss['factor']:.1f}x lower)")
    for m in ("video", "audio"):
        if f"mae_{m}" in losses:
            x = losses[f"mae_{m}"]
            parts.append(f"{m} {x['first']:.3f} -> {x['last']:.3f}")
    if "contrastive" in losses:
        x = losses["contrastive"]
        parts.append(f"InfoNCE {x['first']:.3f} -> {x['last']:.3f}")
    lines.append(f"{'pretraining':<14} {s['pretrain']:>6.0f} s  " + "; ".join(parts))
    lines.append(f"{'export':<14} {s['export']:>6.0f} s  {summary['export']}")
    lines.append(f"{'linear probes':<14} {s['probe']:>6.0f} s  {Path(summary['export']).parent / 'probe'}")
    if "retrieval" in s:
        lines.append(f"{'retrieval':<14} {s['retrieval']:>6.0f} s  {RETRIEVAL_SPLIT} split, audio->video and video->audio")
    lines.append(f"{'picture':<14} {s['picture']:>6.0f} s  {summary['picture']}")
    lines.append(f"{'total':<14} {s['total'] / 60:>4.1f} min")
    lines.append("")
    records = next(iter(probes.values()))["records"]
    lines.append(
        f"linear probe, audiovisual features, top-1 % ({records['train']} train / {records['val']} val / "
        f"{records['test']} test clips)"
    )
    lines.append(f"{'features':<22} {'dim':>5} {'train':>7} {'val':>7} {'test':>7}")
    for source, p in probes.items():
        lines.append(f"{SOURCE_NAMES[source]:<22} {p['dim']:>5} {p['train']:>7.1f} {p['val']:>7.1f} {p['test']:>7.1f}")
    if {"pretrained", "random", "raw"} <= set(probes):
        test = {k: v["test"] for k, v in probes.items()}
        lines.append(
            f"pretraining adds {test['pretrained'] - test['random']:+.1f} points over the random-init encoder and "
            f"{test['pretrained'] - test['raw']:+.1f} over the raw inputs on the test split "
            f"(one test clip is {100 / records['test']:.2f} points)"
        )
    if "retrieval" in summary:
        lines += ["", *format_retrieval_rows(summary["retrieval"])]
    lines.append("")
    lines.append(f"next: look at {summary['picture']}, then pretrain on real video, for example")
    lines.append("  accelerate launch --config_file configs/accelerate/ddp.yaml tools/pretrain.py \\")
    lines.append("      --config configs/pretrain/ours_vitb_vggsound.yaml data.root=/path/to/vggsound")
    return "\n".join(lines)


def format_retrieval_rows(retrieval: dict) -> list[str]:
    """R@1 / R@5 (%) and the median rank both ways per encoder, against chance."""
    first = next(iter(retrieval.values()))
    chance = first["chance"]
    keys = ("R@1", "R@5", "median_rank")
    lines = [
        f"audio-visual retrieval ({first['clips']} {RETRIEVAL_SPLIT} clips; chance R@1 {chance['R@1']:.2f} %, "
        f"R@5 {chance['R@5']:.2f} %, median rank {chance['median_rank']:.1f})",
        f"{'encoder':<22} " + " ".join(f"{d} {k.replace('_rank', ''):>4}".rjust(11) for d in ("a->v", "v->a") for k in keys),
    ]
    for source, m in retrieval.items():
        cells = [m[d][k] for d in ("audio->video", "video->audio") for k in keys]
        lines.append(f"{SOURCE_NAMES[source]:<22} " + " ".join(f"{c:>11.1f}" for c in cells))
    return lines
