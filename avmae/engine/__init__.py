"""Training under Accelerate/DeepSpeed: one loop (``loop``), its recipes (``pretrain``,
``finetune``, and ``evaluate_finetuned`` for a finetuned folder), optimiser and schedule,
checkpoints, faults."""

from avmae.engine.checkpoint import TrainerState, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from avmae.engine.faults import NonFiniteLossError
from avmae.engine.logs import read_scalars
from avmae.engine.finetune import evaluate_finetuned, finetune
from avmae.engine.loop import Trainer, TrainingInterrupted
from avmae.engine.pretrain import pretrain

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "TrainerState",
    "TrainingInterrupted",
    "evaluate_finetuned",
    "finetune",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "pretrain",
    "read_scalars",
    "save_checkpoint",
]
