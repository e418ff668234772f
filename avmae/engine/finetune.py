"""Finetuning: an exported (or randomly initialised) encoder plus classification heads.

The published recipe (AV-MAE, MAE), all through timm and accelerate:

- AdamW with layer-wise lr decay (``finetune.layer_decay``): timm's ``create_optimizer_v2``
  stores an ``lr_scale`` per layer group and timm's cosine scheduler applies it every update;
- batch mixup with one ``lam`` for video and audio, and label smoothing
  (``avmae.augment.mixup``), soft-target cross-entropy, or BCE for multi-label datasets;
- drop path (``model.drop_path``), SpecAugment and spatial augmentations through the training
  dataset's transforms (``augment.*``);
- AudioSet-style balanced sampling across processes (``data.balanced_sampling``);
- multi-view evaluation (``avmae.evaluation.evaluate``) every ``finetune.eval_every`` epochs.

Single- or multi-label comes from the dataset's manifest. The run leaves in ``train.output_dir``:
``model.safetensors`` (the classifier), ``config.yaml`` (with the heads filled in, the input of
``tools/eval.py``), ``metrics.json`` and, for multi-label heads, ``per_class_ap_<head>.csv``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device, set_seed
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from avmae.config import Config, TrainConfig, replace, save_config
from avmae.engine.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from avmae.evaluation.evaluate import build_eval_loader, evaluate, format_table, model_inputs, summary, write_results


def prepare_config(cfg: Config) -> Config:
    """``cfg`` with the pretrained export's architecture and preprocessing, when it names one."""
    if not cfg.finetune.pretrained:
        return cfg
    from avmae.export import apply_pretrained

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
    """``AVClassifier`` of ``cfg``, its encoder filled from ``finetune.pretrained`` when set."""
    from avmae.models import build_classifier, load_pretrained

    model = build_classifier(cfg, heads)
    if cfg.finetune.pretrained:
        from avmae.export import pretrained_encoder_weights, read_export

        part = read_export(cfg.finetune.pretrained)["part"]
        needed = {"audio": {"audio"}, "video": {"video"}, "audiovisual": {"audio", "video"}}[cfg.finetune.modalities]
        if part in ("audio", "video") and needed != {part}:
            raise ValueError(
                f"{cfg.finetune.pretrained} holds only the {part} encoder; set finetune.modalities={part} "
                "or export the encoder of both modalities (--part encoder)"
            )
        report = load_pretrained(model, pretrained_encoder_weights(cfg.finetune.pretrained))
        log(f"pretrained weights from {cfg.finetune.pretrained}: {report}")
    else:
        log("no finetune.pretrained: the encoder starts from random initialisation")
    return model


def build_finetune_optimizer(
    model: nn.Module, train: TrainConfig, lr: float, layer_decay: float
) -> torch.optim.Optimizer:
    """``train.optimizer`` (AdamW or momentum SGD) with timm's layer-wise lr decay (``lr_scale``
    per group, applied by a timm scheduler) and no weight decay on norms, biases and
    ``model.no_weight_decay()``."""
    from avmae.engine.optim import optimizer_arguments

    return create_optimizer_v2(
        model,
        lr=lr,
        layer_decay=layer_decay if layer_decay < 1.0 else None,
        filter_bias_and_bn=True,
        **optimizer_arguments(train),
    )


def classification_loss(
    logits: dict[str, torch.Tensor], soft_targets: dict[str, torch.Tensor], multi_label: bool
) -> torch.Tensor:
    """Mean over heads of soft-target cross-entropy (single-label) or BCE (multi-label).

    Args:
        logits: head -> ``(B, K)``; soft_targets: head -> ``(B, K)`` (mixed, smoothed).
            Either may instead map head -> ``{modality: (B, K)}`` (``MBTClassifier`` in training,
            per-modality mixup): each modality's logits then count as a head of their own.
    """
    if any(isinstance(x, dict) for x in logits.values()):
        return torch.stack([
            classification_loss({h: per[m] for h, per in logits.items()},
                                {h: t[m] if isinstance(t, dict) else t for h, t in soft_targets.items()}, multi_label)
            for m in next(iter(logits.values()))
        ]).mean()
    losses = []
    for head, x in logits.items():
        target = soft_targets[head].to(x.dtype)
        if multi_label:
            losses.append(F.binary_cross_entropy_with_logits(x, target))
        else:
            losses.append(torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean())
    return torch.stack(losses).mean()


def build_balanced_loader(cfg: Config, dataset, accelerator) -> DataLoader:
    """A loader whose ``DistributedWeightedSampler`` already gives each process its own share
    (so it is not prepared, i.e. not sharded again, by accelerate)."""
    from avmae.data.collate import collate_clips
    from avmae.data.manifests import Manifest
    from avmae.data.sampler import DistributedWeightedSampler, balanced_weights

    head = next(iter(dataset.classes))
    present = Manifest(records=dataset.records, classes=dataset.classes, multi_label=dataset.multi_label)
    sampler = DistributedWeightedSampler(
        balanced_weights(present, head),
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=cfg.train.seed,
    )
    data = cfg.data
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_clips,
        num_workers=data.num_workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        persistent_workers=data.num_workers > 0,
        prefetch_factor=data.prefetch_factor if data.num_workers > 0 else None,
    )


def finetune(cfg: Config) -> dict:
    """Finetune and evaluate as configured; returns the final evaluation metrics.

    Runs in one process or under ``accelerate launch`` (DDP); see the module docstring for what
    it writes.
    """
    from avmae.augment.mixup import mix_batch, mixup_alpha
    from avmae.data import build_dataset
    from avmae.engine.optim import build_scheduler, effective_batch_size, scaled_lr, total_steps, warmup_steps
    from avmae.engine.pretrain import build_accelerator, build_train_loader

    cfg = prepare_config(cfg)
    ft, train = cfg.finetune, cfg.train
    accelerator = build_accelerator(cfg)
    set_seed(train.seed)  # the same initial heads whatever the number of processes
    output_dir = Path(train.output_dir)

    train_set = build_dataset(cfg, "train", train=True)
    eval_set = build_dataset(cfg, ft.eval_split, train=False)
    heads = resolve_heads(cfg, train_set.classes)
    multi_label = train_set.multi_label
    cfg = replace(cfg, finetune=replace(ft, heads=heads))  # what tools/eval.py rebuilds
    model = build_model(cfg, heads, log=accelerator.print)

    if cfg.data.balanced_sampling:
        loader = build_balanced_loader(cfg, train_set, accelerator)
    else:
        loader = build_train_loader(cfg, train_set)
    clips_per_update = effective_batch_size(
        cfg.data.batch_size, accelerator.num_processes, train.grad_accum, cfg.data.clips_per_video
    )
    lr = scaled_lr(train, clips_per_update)
    model.to(accelerator.device)
    optimizer = build_finetune_optimizer(model, train, lr, ft.layer_decay)
    eval_loader = build_eval_loader(cfg, eval_set)
    if cfg.data.balanced_sampling:
        model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    else:
        model, optimizer, loader, eval_loader = accelerator.prepare(model, optimizer, loader, eval_loader)

    steps_per_epoch = len(loader) // train.grad_accum
    num_steps = total_steps(train, steps_per_epoch)
    num_epochs = math.ceil(num_steps / steps_per_epoch)
    scheduler = build_scheduler(optimizer, train, num_steps, warmup_steps(train, steps_per_epoch))
    scheduler.step_update(0)
    alpha = mixup_alpha(cfg)
    smoothing = ft.label_smoothing if ft.smooth_multi_label or not multi_label else 0.0
    mix_generator = torch.Generator().manual_seed(train.seed * 1000 + accelerator.process_index)

    accelerator.init_trackers("finetune")
    accelerator.print(
        f"finetuning {ft.modalities} on {cfg.data.format}: heads {heads}, "
        f"{'multi' if multi_label else 'single'}-label; "
        f"{num_steps} steps ({steps_per_epoch} per epoch, {clips_per_update} clips each), peak lr {lr:.3g}, "
        f"layer decay {ft.layer_decay}, mixup alpha {alpha:g}, label smoothing {smoothing:g}"
    )
    set_seed(train.seed, device_specific=True)  # drop path differs across processes
    progress = tqdm(total=num_steps, desc="finetune", unit="step", disable=not accelerator.is_local_main_process)
    step, metrics = 0, {}
    for epoch in range(num_epochs):
        model.train()
        for source in (loader, getattr(loader, "sampler", None), train_set):
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
        for batch in loader:
            batch = send_to_device(batch, accelerator.device)
            inputs = model_inputs(batch, ft.modalities)
            with accelerator.accumulate(model):
                video, audio, soft = mix_batch(
                    inputs.get("video"), inputs.get("audio"), batch["targets"], heads, alpha, smoothing, mix_generator,
                    per_modality=cfg.augment.mixup_per_modality,
                )
                mixed = {k: v for k, v in (("video", video), ("audio", audio)) if v is not None}
                loss = classification_loss(model(**mixed), soft, multi_label)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train.clip_grad > 0:
                    accelerator.clip_grad_norm_(model.parameters(), train.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            scheduler.step_update(step)
            progress.update(1)
            if step % train.log_every == 0 or step == num_steps:
                value = accelerator.reduce(loss.detach(), reduction="mean").item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"finetuning loss is {value} at step {step}")
                accelerator.log({"train/loss": value, "train/lr": optimizer.param_groups[-1]["lr"]}, step=step)
                progress.set_postfix(loss=f"{value:.4f}", refresh=False)
            if step >= num_steps:
                break
        last = step >= num_steps
        if last or (ft.eval_every > 0 and (epoch + 1) % ft.eval_every == 0):
            metrics, _ = evaluate(model, eval_loader, accelerator, ft.modalities, multi_label, len(eval_set.records))
            accelerator.log({f"{ft.eval_split}/{k}": v for k, v in summary(metrics).items()}, step=step)
            accelerator.print(format_table(metrics, f"{ft.eval_split} after epoch {epoch + 1}, step {step}"))
        if last:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_finetuned(accelerator.unwrap_model(model), cfg, output_dir)
        write_results(output_dir, {**metrics, "split": ft.eval_split, "step": step}, eval_set.classes)
    accelerator.end_training()
    return metrics


def save_finetuned(model: nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """``model.safetensors`` and ``config.yaml`` of a finetuned classifier (the input of tools/eval.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "avmae_part": "classifier"})
    save_config(cfg, out_dir / CONFIG_FILE)
    return out_dir


def load_finetuned(path: str | Path, overrides: list[str] | None = None) -> tuple[nn.Module, Config]:
    """A classifier saved by ``finetune`` and its config (``overrides`` applied, e.g. evaluation
    geometry); the weights must fit exactly."""
    from safetensors.torch import load_file

    from avmae.config import load_config
    from avmae.models import build_classifier

    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a finetuned model folder (no {name})")
    cfg = load_config(path / CONFIG_FILE, overrides)
    if not cfg.finetune.heads:
        raise ValueError(f"{path / CONFIG_FILE}: finetune.heads is empty; was it written by finetuning?")
    model = build_classifier(cfg, dict(cfg.finetune.heads))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return model.eval(), cfg

