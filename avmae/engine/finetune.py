"""Finetuning: an exported (or randomly initialised) encoder plus classification heads.

The recipe of AV-MAE and MAE (layer-wise lr decay, mixup, label smoothing, drop path, balanced
sampling, multi-view evaluation) on the shared loop of ``avmae.engine.loop``; the finetuned
classifier folder is written and read through ``avmae.formats.classifier``, and
``evaluate_finetuned`` scores a finished run's folder (``tools/eval.py``). docs/architecture.md,
"Training", lists the options and what a run leaves; docs/recipes.md compares the configs with
their sources.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn

from avmae.augment.mixup import mix_batch, mixup_alpha
from avmae.config import Config, modality_set, replace
from avmae.data import build_dataset, build_loader
from avmae.engine.loop import Trainer, Update, build_accelerator, build_in_every_process, input_dtype
from avmae.engine.optim import build_optimizer
from avmae.evaluation.evaluate import evaluate, format_table, model_inputs, summary, write_results
from avmae.formats import apply_pretrained, load_finetuned, pretrained_encoder_weights, read_export, save_finetuned
from avmae.models import build_classifier, load_pretrained


def prepare_config(cfg: Config) -> Config:
    """``cfg`` with the pretrained export's architecture and preprocessing, when it names one."""
    if not cfg.finetune.pretrained:
        return cfg
    return apply_pretrained(cfg, cfg.finetune.pretrained, cfg.finetune.inherit_preprocessing)


def resolve_heads(cfg: Config, classes: dict[str, list[str]]) -> dict[str, int]:
    """Head -> number of classes: ``finetune.heads`` where given, else the dataset's class lists."""
    heads = dict(cfg.finetune.heads) or {head: len(names) for head, names in classes.items()}
    for head, k in heads.items():
        if head not in classes:
            raise ValueError(f"finetune.heads names {head!r}, but the dataset's heads are {sorted(classes)}")
        if k < len(classes[head]):
            raise ValueError(f"finetune.heads.{head}={k} is fewer than the dataset's {len(classes[head])} classes")
    return heads


def build_model(cfg: Config, heads: dict[str, int], log=print) -> nn.Module:
    """``AVClassifier`` (or ``MBTClassifier``) of ``cfg``, its encoder filled from
    ``finetune.pretrained`` when set."""
    model = build_classifier(cfg, heads)
    if cfg.finetune.pretrained:
        part = read_export(cfg.finetune.pretrained)["part"]
        if part in ("audio", "video") and modality_set(cfg.finetune.modalities) != (part,):
            raise ValueError(
                f"{cfg.finetune.pretrained} holds only the {part} encoder; set finetune.modalities={part} "
                "or export the encoder of both modalities (--part encoder)"
            )
        ft = cfg.finetune
        # finetune.mbt_final_norm=init: MBT's final norms keep their initialisation
        keep_init = ("encoder.norm.",) if ft.fusion == "bottleneck" and ft.mbt_final_norm == "init" else ()
        report = load_pretrained(model, pretrained_encoder_weights(ft.pretrained), keep_init)
        log(f"pretrained weights from {cfg.finetune.pretrained}: {report}")
    else:
        log("no finetune.pretrained: the encoder starts from random initialisation")
    return model


def classification_loss(
    logits: dict[str, torch.Tensor], soft_targets: dict[str, torch.Tensor], multi_label: bool,
    multi_label_loss: str = "mean",
) -> torch.Tensor:
    """Mean over heads of soft-target cross-entropy (single-label) or BCE (multi-label).

    Args:
        logits: head -> ``(B, K)``; soft_targets: head -> ``(B, K)`` (mixed, smoothed).
            Either may instead map head -> ``{modality: (B, K)}`` (``MBTClassifier`` in training,
            per-modality mixup): each modality's logits then count as a head of their own.
        multi_label_loss: ``finetune.multi_label_loss``: the BCE's mean over clips and classes
            (``"mean"``), or its sum over the K classes averaged over clips (``"sum"``, K times
            larger: AV-MAE's ``weighted_sigmoid_cross_entropy``).
    """
    if any(isinstance(x, dict) for x in logits.values()):
        return torch.stack([
            classification_loss({h: per[m] for h, per in logits.items()},
                                {h: t[m] if isinstance(t, dict) else t for h, t in soft_targets.items()},
                                multi_label, multi_label_loss)
            for m in next(iter(logits.values()))
        ]).mean()
    losses = []
    for head, x in logits.items():
        target = soft_targets[head].to(x.dtype)
        if multi_label and multi_label_loss == "sum":
            losses.append(F.binary_cross_entropy_with_logits(x, target, reduction="none").sum(dim=-1).mean())
        elif multi_label:
            losses.append(F.binary_cross_entropy_with_logits(x, target))
        else:
            losses.append(torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean())
    return torch.stack(losses).mean()


def finetune(cfg: Config) -> dict:
    """Finetune and evaluate as configured; returns the final evaluation metrics.

    Runs in one process or under ``accelerate launch`` (DDP, FSDP or DeepSpeed) through the shared loop
    (``avmae.engine.loop.Trainer``): checkpoints every ``train.checkpoint_every`` steps under
    ``train.output_dir/checkpoints``, exact resume by the same command, SIGTERM/SIGINT save, the
    NaN guard, TensorBoard. What it writes: docs/architecture.md, "Training". On the CPU the run uses
    fewer torch threads (as pretraining does); the caller's count is restored when it returns.
    """
    threads = torch.get_num_threads()
    try:
        return _finetune(cfg)
    finally:
        torch.set_num_threads(threads)


def _finetune(cfg: Config) -> dict:
    cfg = prepare_config(cfg)
    ft, train = cfg.finetune, cfg.train
    accelerator = build_accelerator(cfg)
    # process 0 draws the initial heads from train.seed whatever the number of processes, and
    # the others draw the same (build_in_every_process); drop path differs across processes
    set_seed(train.seed, device_specific=True)
    output_dir = Path(train.output_dir)

    train_set = build_dataset(cfg, "train", train=True)
    eval_set = build_dataset(cfg, ft.eval_split, train=False)
    heads = resolve_heads(cfg, train_set.classes)
    multi_label = train_set.multi_label
    cfg = replace(cfg, finetune=replace(ft, heads=heads))  # what tools/eval.py rebuilds; checkpoints too
    trainer = Trainer(cfg, accelerator, "finetune")
    model = build_in_every_process(accelerator, train.seed, lambda: build_model(cfg, heads, log=accelerator.print))

    def optimizer(model: nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
        return build_optimizer(model, train, lr, fused=fused, layer_decay=ft.layer_decay)

    model, eval_loader = trainer.setup(model, train_set, optimizer, build_loader(cfg, eval_set, train=False))
    alpha = mixup_alpha(cfg)
    smoothing = ft.label_smoothing if ft.smooth_multi_label or not multi_label else 0.0
    accelerator.print(
        f"finetuning {ft.modalities} on {cfg.data.format}: heads {heads}, "
        f"{'multi' if multi_label else 'single'}-label{f' ({ft.multi_label_loss} BCE)' if multi_label else ''}; "
        f"{train.optimizer}, layer decay {ft.layer_decay}, mixup alpha {alpha:g}"
        f"{' per modality' if cfg.augment.mixup_per_modality else ''}, label smoothing {smoothing:g}"
    )

    def loss(model: nn.Module, batch: dict) -> dict:
        # mixup's draw is seeded by the batch's place in the run, so a resumed run redraws it
        generator = torch.Generator().manual_seed(hash((train.seed, *trainer.position())) % 2**63)
        inputs = model_inputs(batch, ft.modalities)
        video, audio, soft = mix_batch(
            inputs.get("video"), inputs.get("audio"), batch["targets"], heads, alpha, smoothing, generator,
            per_modality=cfg.augment.mixup_per_modality,
        )
        mixed = {k: v for k, v in (("video", video), ("audio", audio)) if v is not None}
        return {"loss": classification_loss(model(**mixed), soft, multi_label, ft.multi_label_loss), "logs": {}}

    def run_evaluation(step: int, title: str) -> dict:
        metrics, _ = evaluate(
            model, eval_loader, accelerator, ft.modalities, multi_label, len(eval_set.records), trainer.input_dtype,
            video_cfg=cfg.data.video, aggregate=ft.eval_aggregate,
        )
        accelerator.log({f"{ft.eval_split}/{k}": v for k, v in summary(metrics).items()}, step=step)
        accelerator.print(format_table(metrics, f"{ft.eval_split} {title}, step {step}"))
        return metrics

    def on_update(update: Update) -> None:
        if update.epoch_done and update.step < update.num_steps and ft.eval_every > 0:
            if (update.epoch + 1) % ft.eval_every == 0:
                run_evaluation(update.step, f"after epoch {update.epoch + 1}")

    trainer.fit(loss, on_update)
    step = trainer.state.step
    metrics = run_evaluation(step, "at the end")

    weights = accelerator.get_state_dict(model)  # collective under DeepSpeed ZeRO-3
    if accelerator.is_main_process:
        save_finetuned(weights, cfg, output_dir)
        write_results(output_dir, {**metrics, "split": ft.eval_split, "step": step}, eval_set.classes)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def evaluate_finetuned(
    model_dir: str | Path, split: str = "test", overrides: list[str] | None = None, out_dir: str | Path | None = None
) -> dict:
    """Multi-view evaluation of a finetuned classifier folder (``model.safetensors`` +
    ``config.yaml``) on ``split``, in one process or under ``accelerate launch``.

    ``overrides`` change the saved config (data location, ``data.test_clips``, geometry...).
    Writes ``metrics.json`` (and per-class AP csvs) to ``out_dir`` (default ``model_dir/eval_<split>``)
    on the main process, prints the table, and returns the metrics.
    """
    model, cfg = load_finetuned(model_dir, overrides)
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed)
    dataset = build_dataset(cfg, split, train=False)
    if set(dataset.classes) != set(cfg.finetune.heads):
        raise ValueError(
            f"{model_dir}: heads {sorted(cfg.finetune.heads)} do not match the dataset's {sorted(dataset.classes)}"
        )
    model, loader = accelerator.prepare(model, build_loader(cfg, dataset, train=False))
    modalities, multi_label = cfg.finetune.modalities, dataset.multi_label
    metrics, _ = evaluate(
        model, loader, accelerator, modalities, multi_label, len(dataset.records), input_dtype(accelerator),
        video_cfg=cfg.data.video, aggregate=cfg.finetune.eval_aggregate,
    )
    out_dir = Path(out_dir) if out_dir else Path(model_dir) / f"eval_{split}"
    if accelerator.is_main_process:
        write_results(out_dir, {**metrics, "split": split}, dataset.classes)
    title = f"{split}: {metrics['records_scored']} records x {metrics['views_per_record']} views"
    accelerator.print(format_table(metrics, title))
    accelerator.wait_for_everyone()
    return metrics
