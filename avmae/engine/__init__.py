"""Pretraining under Accelerate/DeepSpeed: the loop, optimiser and schedule, checkpoints, faults."""

from avmae.engine.checkpoint import TrainerState, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from avmae.engine.faults import NonFiniteLossError
from avmae.engine.logs import read_scalars
from avmae.engine.pretrain import TrainingInterrupted, pretrain

__all__ = [
    "NonFiniteLossError",
    "TrainerState",
    "TrainingInterrupted",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "pretrain",
    "read_scalars",
    "save_checkpoint",
]
