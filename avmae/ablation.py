"""The augmentation ablation of arXiv 2110.07082 on one pretraining recipe, and the objectives
side by side.

``run_ablation`` pretrains each config (``configs/ablation/``: one augmentation preset and
strength each; ``configs/objectives/``: one pretraining objective each), exports and
linear-probes its encoder, probes the random-init encoder and the raw inputs once, and returns
one table::

    setting | strength | final reconstruction loss | probe top-1 val / test | pretraining minutes

An interrupted ablation continues where it stopped. docs/ablation.md has the design and results.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


from avmae.config import AugmentConfig, Config, ModelConfig, config_to_dict, load_config

LOSS_TAG = "train/loss"
RUNS_DIR = "runs"  # under the ablation's output folder: one result file per run
BASELINES = ("random", "raw")
BASELINE_NAMES = {"random": "random-init encoder", "raw": "raw inputs (pooled pixels + fbank)"}


def augmentation_setting(aug: AugmentConfig) -> str:
    """Which arm of the ablation ``aug`` belongs to, from what it actually does:
    ``coherency-breaking`` (per-frame parameters, frame shuffle or time reversal),
    ``coherency-keeping`` (any lossy spatial or frame-rate transform, one draw per clip), or
    ``sampling-only`` (random start and playback speed, evaluation crop)."""
    if not aug.enabled or aug.strength == 0:
        return "none"
    if aug.per_frame or aug.frame_shuffle > 0 or aug.time_reversal > 0:
        return "coherency-breaking"
    lossy = ("crop", "hflip", "color_jitter", "grayscale", "blur", "downup", "frame_rate_reduction", "tube_cutout")
    if any(getattr(aug, name) > 0 for name in lossy):
        return "coherency-keeping"
    return "sampling-only"


SETTINGS = ("none", "sampling-only", "coherency-keeping", "coherency-breaking")
CONTRASTIVE_NAMES = {"infonce": "InfoNCE", "simsiam": "SimSiam", "mocov3": "MoCo v3"}


def objective_name(model: ModelConfig) -> str:
    """The pretraining objective of ``model``: ``MAE``, ``MAE + InfoNCE``, ``SimSiam``, ..."""
    parts = ["MAE"] if model.mae_weight > 0 else []
    if model.contrastive != "none":
        parts.append(CONTRASTIVE_NAMES[model.contrastive])
    return " + ".join(parts)


def ablation_configs(folder: str | Path) -> list[Path]:
    """The YAML files of ``folder`` in the table's order: by setting (``SETTINGS``), then strength."""
    def order(path: Path) -> tuple[int, float, str]:
        aug = load_config(path).augment
        return SETTINGS.index(augmentation_setting(aug)), aug.strength, path.name

    configs = sorted(Path(folder).glob("*.yaml"), key=order)
    if not configs:
        raise FileNotFoundError(f"no ablation config (*.yaml) in {folder}")
    return configs


def final_loss(run_dir: str | Path, tag: str = LOSS_TAG) -> tuple[int, float]:
    """``(step, value)`` of the last logged ``tag`` of a run: the mean over its last logging window
    (``train.log_every`` steps), read from the run's TensorBoard events."""
    from avmae.engine import read_scalars

    values = read_scalars(run_dir, tag)
    if not values:
        raise ValueError(f"{Path(run_dir) / 'tensorboard'}: no {tag!r} scalars logged")
    step = max(values)
    return step, values[step]


def _probe_config(probe_config: str | Path, overrides: list[str], export_dir: Path, output_dir: Path) -> Config:
    """The probe config as written (``finetune.pretrained`` = ``export_dir``), before the export's
    architecture and preprocessing are applied to it by ``prepare_config``."""
    more = [f"finetune.pretrained={export_dir}", f"train.output_dir={output_dir}"]
    return load_config(probe_config, [*overrides, *more])


def _top1(result: dict) -> dict[str, float]:
    return {split: result[split]["label"]["top1"] for split in ("train", "val", "test")}


def _cached(path: Path, key: dict) -> dict | None:
    """The saved result at ``path`` when it was made from exactly ``key``."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("key") == json.loads(json.dumps(key)) else None  # tuples come back as lists


def _save(path: Path, row: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=2))
    tmp.replace(path)
    return row


def run_one(
    config: str | Path, out_dir: Path, probe_config: str | Path, overrides: list[str], runs_dir: Path | None = None
) -> dict:
    """Pretrain, export and linear-probe one ablation config; its row of the table.

    Args:
        config: an ablation YAML (the demo recipe + an augmentation preset).
        out_dir: the ablation's output folder; the row is saved as ``out_dir/runs/<stem>.json``.
        probe_config: the linear-probe YAML (``finetune.pretrained`` is set to the export).
        overrides: ``key.sub=value`` applied to the pretraining and the probe config.
        runs_dir: when given, the run is written to ``runs_dir/<stem>`` instead of the config's
            ``train.output_dir``.
    """
    from avmae.engine import latest_checkpoint, pretrain
    from avmae.engine.finetune import prepare_config
    from avmae.evaluation.probe import run_linear_probes
    from avmae.formats import export, from_pretrained

    name = Path(config).stem
    cfg = load_config(config, overrides)
    if runs_dir is not None:
        cfg.train.output_dir = str(Path(runs_dir) / name)
    run_dir = Path(cfg.train.output_dir)
    resumed_from = latest_checkpoint(run_dir / "checkpoints")

    started = time.perf_counter()
    checkpoint = pretrain(cfg)
    pretrain_seconds = time.perf_counter() - started

    export_dir = run_dir / "export"
    probe_cfg = _probe_config(probe_config, overrides, export_dir, run_dir / "probe")
    key = {"checkpoint": str(checkpoint), "probe": config_to_dict(probe_cfg)}
    row_file = out_dir / RUNS_DIR / f"{name}.json"
    saved = _cached(row_file, key)
    if saved is not None:
        print(f"{name}: probe result for {checkpoint.name} already in {row_file}")
        return saved

    export(checkpoint, export_dir, "encoder")
    probe_cfg = prepare_config(probe_cfg)  # the export's architecture and preprocessing
    started = time.perf_counter()
    (probe,) = run_linear_probes(probe_cfg, from_pretrained(export_dir), sources=("pretrained",))
    probe_seconds = time.perf_counter() - started
    step, loss = final_loss(run_dir)
    row = {
        "name": name,
        "config": str(config),
        "setting": augmentation_setting(cfg.augment),
        "objective": objective_name(cfg.model),
        "strength": cfg.augment.strength,
        "steps": step,
        "final_loss": loss,
        "top1": _top1(probe),
        "pretrain_minutes": pretrain_seconds / 60,
        "probe_minutes": probe_seconds / 60,
        "resumed_from": resumed_from.name if resumed_from is not None else None,
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint),
        "export": str(export_dir),
        "probe": probe,
        "key": key,
    }
    return _save(row_file, row)


def run_baselines(export_dir: Path, out_dir: Path, probe_config: str | Path, overrides: list[str]) -> list[dict]:
    """Linear probes of a random-init encoder of the exported architecture and of the raw inputs,
    at the same preprocessing; saved as ``out_dir/runs/baselines.json``."""
    from avmae.engine.finetune import prepare_config
    from avmae.evaluation.probe import run_linear_probes

    probe_cfg = prepare_config(_probe_config(probe_config, overrides, export_dir, out_dir / "baselines"))
    key = config_to_dict(probe_cfg)
    # the baselines depend on the architecture and preprocessing, not on which export gave them
    key["finetune"].pop("pretrained")
    key = {"probe": key}
    row_file = out_dir / RUNS_DIR / "baselines.json"
    saved = _cached(row_file, key)
    if saved is not None:
        print(f"baselines: probe results already in {row_file}")
        return saved["rows"]
    started = time.perf_counter()
    probes = run_linear_probes(probe_cfg, None, sources=BASELINES)
    minutes = (time.perf_counter() - started) / 60
    rows = [
        {"name": p["source"], "setting": BASELINE_NAMES[p["source"]], "top1": _top1(p), "probe_minutes": minutes, "probe": p}
        for p in probes
    ]
    _save(row_file, {"rows": rows, "key": key})
    return rows


def run_ablation(
    configs: list[str | Path],
    out_dir: str | Path,
    probe_config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    runs_dir: str | Path | None = None,
) -> dict:
    """Run every config of the ablation, then the baselines; write ``out_dir/ablation.json`` and
    ``out_dir/ablation.md``, and return the JSON's content (``runs``, ``baselines``, ``records``).

    ``overrides`` apply to every pretraining and to the probe config (so a shrunk dataset or
    geometry is probed as it was pretrained). Each run goes to its config's ``train.output_dir``,
    or to ``runs_dir/<config stem>`` when ``runs_dir`` is given.
    """
    overrides = list(overrides)
    if any(o.split("=", 1)[0].strip() == "train.output_dir" for o in overrides):
        raise ValueError("train.output_dir would put every run in one folder; give a runs folder instead")
    if not configs:
        raise ValueError("no ablation config given")
    names = [Path(c).stem for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"ablation configs need distinct file names, got {names}")
    out_dir = Path(out_dir)
    runs = []
    for i, config in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] {config}")
        runs.append(run_one(config, out_dir, probe_config, overrides, Path(runs_dir) if runs_dir else None))
    print(f"[baselines] random-init encoder and raw inputs ({probe_config})")
    baselines = run_baselines(Path(runs[0]["export"]), out_dir, probe_config, overrides)
    result = {
        "probe_config": str(probe_config),
        "overrides": overrides,
        "records": runs[0]["probe"]["records"],
        "runs": [{k: v for k, v in r.items() if k not in ("probe", "key")} for r in runs],
        "baselines": [{k: v for k, v in b.items() if k != "probe"} for b in baselines],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=2))
    (out_dir / "ablation.md").write_text(format_table(result) + "\n")
    return result


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """The ablation as a markdown table: one row per run, then the baselines."""
    records = result["records"]
    lines = [
        "| objective, augmentation | strength | final loss | val top-1 | test top-1 | pretrain min |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        minutes = _cell(r["pretrain_minutes"], 1) + (" (resumed)" if r["resumed_from"] else "")
        lines.append(
            f"| {r.get('objective', 'MAE')}, {r['setting']} (`{r['name']}`) | {r['strength']:g} | {_cell(r['final_loss'], 3)} | "
            f"{_cell(r['top1']['val'], 1)} | {_cell(r['top1']['test'], 1)} | {minutes} |"
        )
    for b in result["baselines"]:
        lines.append(f"| {b['setting']} | - | - | {_cell(b['top1']['val'], 1)} | {_cell(b['top1']['test'], 1)} | - |")
    lines.append("")
    lines.append(
        f"Linear probe top-1 % on audiovisual features ({records['train']} train / {records['val']} val / "
        f"{records['test']} test clips; one test clip is {100 / records['test']:.2f} points). Final loss: "
        "the training loss (reconstruction, contrastive or both, as weighted in training) averaged over the "
        "last logging window; it is not comparable across objectives."
    )
    return "\n".join(lines)
