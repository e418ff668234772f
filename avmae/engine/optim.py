"""Optimiser and learning-rate schedule of a training run, built from `TrainConfig`.

AdamW with MAE's betas (or momentum SGD, `train.optimizer: sgd`) and no weight decay on norms, biases and the names the model lists in
`no_weight_decay()` (positional and modality embeddings), through timm's optimiser factory.
The learning rate follows MAE: `base_lr x effective batch / 256`, linear warmup per iteration,
then a half cosine down to `min_lr`, as a timm scheduler stepped once per optimiser update.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from avmae.config import TrainConfig


def effective_batch_size(batch_size: int, num_processes: int, grad_accum: int, clips_per_video: int = 1) -> int:
    """Clips that contribute to one optimiser update (an item of a batch holds `clips_per_video`)."""
    return batch_size * clips_per_video * num_processes * grad_accum


def scaled_lr(train: TrainConfig, effective_batch: int) -> float:
    """MAE's linear scaling rule: `base_lr x effective batch / 256`."""
    return train.base_lr * effective_batch / 256


def optimizer_arguments(train: TrainConfig) -> dict:
    """timm `create_optimizer_v2` arguments of `train.optimizer`: AdamW with `train.betas`, or SGD
    with `train.momentum` (timm's "momentum", no Nesterov), both with `train.weight_decay`."""
    if train.optimizer == "sgd":
        return {"opt": "momentum", "momentum": train.momentum, "weight_decay": train.weight_decay}
    return {"opt": "adamw", "betas": tuple(train.betas), "weight_decay": train.weight_decay}


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, lr: float, fused: bool = False, layer_decay: float = 1.0
) -> torch.optim.Optimizer:
    """`train.optimizer` (`optimizer_arguments`) over decayed weights and undecayed 1-D params plus
    `model.no_weight_decay()`: the one optimiser factory of pretraining and finetuning.

    `fused` selects torch's fused CUDA kernel; the parameters must already sit on the GPU.
    `layer_decay` < 1 (finetuning) splits the groups further by depth through the model's
    `group_matcher()`: timm stores an `lr_scale` per group, which the timm scheduler applies.
    """
    extra = {"fused": True} if fused else {}
    return create_optimizer_v2(
        model,
        lr=lr,
        filter_bias_and_bn=True,
        layer_decay=layer_decay if layer_decay < 1.0 else None,
        **optimizer_arguments(train),
        **extra,
    )


def warmup_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    return int(round(train.warmup_epochs * steps_per_epoch))


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """Optimiser updates of the whole run: `max_steps` when set, else `epochs x steps_per_epoch`."""
    if steps_per_epoch <= 0:
        raise ValueError(
            "an epoch has no complete optimiser step: the training set per process is smaller than "
            "data.batch_size x train.grad_accum; use more clips, fewer processes or a smaller batch"
        )
    steps = train.max_steps if train.max_steps > 0 else train.epochs * steps_per_epoch
    if steps <= 0:
        raise ValueError(
            f"the run has no optimiser steps (train.max_steps={train.max_steps}, train.epochs={train.epochs}, "
            f"{steps_per_epoch} steps per epoch)"
        )
    return steps


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, num_steps: int, num_warmup: int
) -> CosineLRScheduler:
    """Warmup from 0 to the optimiser's lr over `num_warmup` updates, then cosine to `min_lr` at `num_steps`.

    Call `scheduler.step_update(k)` with `k` completed updates to set the lr of update `k + 1`.
    """
    num_warmup = min(num_warmup, num_steps - 1) if num_steps > 1 else 0
    return CosineLRScheduler(
        optimizer,
        t_initial=max(num_steps - num_warmup, 1),
        lr_min=train.min_lr,
        warmup_t=num_warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,  # the cosine starts after the warmup, as in MAE
        t_in_epochs=False,
    )

