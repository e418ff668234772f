"""The pretraining recipe: the AV-MAE (and/or contrastive) model on unlabeled clips.

`pretrain(cfg)` runs in one process (`python tools/pretrain.py`) or in many
(`accelerate launch tools/pretrain.py`, DDP, DeepSpeed or FSDP). It builds the model and the training
set and hands them to the shared loop (`avmae.engine.loop.Trainer`), which owns accumulation,
the schedule, logging, atomic checkpoints, exact resume, signals and the NaN guard. The model
maps its inputs to a dict with a scalar `loss` and detached `logs`; that call is `_loss` below.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset

from avmae.config import Config
from avmae.data import build_dataset
from avmae.engine.loop import MODEL_INPUTS, Trainer, TrainingInterrupted, build_accelerator, build_in_every_process
from avmae.engine.optim import build_optimizer
from avmae.formats import pretrained_encoder_weights
from avmae.models import build_pretrain_model, load_pretrained

__all__ = ["TrainingInterrupted", "build_accelerator", "pretrain"]


def _model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The model's keyword inputs of a batch (on the device, cast by ``batch_to_device``): `video`,
    `audio` and, with two views, `video2`, `audio2`."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def _loss(model: torch.nn.Module, batch: dict) -> dict:
    """The pretraining model's own output: `loss` and `logs` (`mae_video`, `mae_audio`, `contrastive`)."""
    return model(**_model_inputs(batch))


def pretrain(cfg: Config, model: torch.nn.Module | None = None, dataset: Dataset | None = None) -> Path:
    """Pretrain `model` (default `avmae.models.build_pretrain_model(cfg)`) on `dataset` (default the
    `train` split of `cfg.data`); return the final checkpoint directory.

    The model maps `video`, `audio` (and `video2`, `audio2` when present) to a dict with a scalar
    `loss` and detached scalar `logs`; `after_optimizer_step(progress)` is called when it exists.
    Raises `TrainingInterrupted` after saving when SIGTERM/SIGINT arrives, and
    `NonFiniteLossError` (naming the step) instead of saving when the loss stops being finite.
    On the CPU the run uses fewer torch threads (`avmae.engine.loop.share_cpu_cores`); the
    caller's count is restored when it returns or raises.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, model, dataset)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, model: torch.nn.Module | None, dataset: Dataset | None) -> Path:
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed, device_specific=True)  # masks and drop path differ across ranks
    trainer = Trainer(cfg, accelerator, "pretrain")
    if dataset is None:
        dataset = build_dataset(cfg, "train", train=True)
    if model is None:
        model = build_in_every_process(accelerator, cfg.train.seed, lambda: build_pretrain_model(cfg))
        if cfg.model.init_from and trainer.resume_from is None:  # a resumed run has its own weights
            # e.g. ImageNet MAE converted onto this architecture (tools/convert.py --config), CAV-MAE's
            # start: every encoder weight must come from it; the decoder and heads keep their initialisation
            load_pretrained(model.encoder, pretrained_encoder_weights(cfg.model.init_from))
            accelerator.print(f"encoder initialised from {cfg.model.init_from}")
    trainer.setup(model, dataset, lambda m, lr, fused: build_optimizer(m, cfg.train, lr, fused=fused))
    final = trainer.fit(_loss)
    accelerator.end_training()
    accelerator.print(
        f"\npretraining done: checkpoint {final}\n"
        f"next: python tools/export.py {final} {Path(cfg.train.output_dir) / 'export'}"
    )
    return final
