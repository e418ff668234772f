"""Checkpoints of a training run (pretraining or finetuning), written atomically, the last few kept.

Layout (docs/architecture.md, "Checkpoints")::

    output_dir/checkpoints/step_00001234/
        state/               accelerate's save_state: model, optimiser, scaler, RNG of every
                             process, registered objects (the lr scheduler); DeepSpeed shards
        model.safetensors    the consolidated, unwrapped model (what export reads)
        config.yaml          the resolved config of the run
        trainer_state.json   step, epoch and position within the epoch

A checkpoint is written under `.tmp_step_...` and renamed when complete, so a directory named
`step_*` is always whole; an interrupted save leaves only a temporary directory, removed by the
next save. The output directory must be visible to every process (shared storage on several
machines).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from avmae.config import Config, save_config
from avmae.formats import CONFIG_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, plain_state_dict, write_safetensors

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"

_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"


@dataclasses.dataclass
class TrainerState:
    """Where a run stands. `batch_in_epoch` counts the micro-batches of `epoch` each process has
    already consumed; a resumed run skips exactly these."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    # Layout of one micro-batch across processes, to detect a resume under a different layout.
    num_processes: int = 1
    batch_size: int = 0
    grad_accum: int = 1
    # train.on_nonfinite: updates whose loss was not finite so far, and the updates whose batches a
    # resumed or rolled-back run must discard again (steps, 1-based)
    nonfinite: int = 0
    discarded_steps: list[int] = dataclasses.field(default_factory=list)


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    path = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        data = json.loads(path.read_text())
        return TrainerState(**data)
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint: {TRAINER_STATE_FILE} is missing") from None
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: not a valid trainer state: {err}") from err


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """The checkpoint a run continues from: `auto` = the latest under `root` if any, `none` = a fresh
    start (refused when `root` already holds checkpoints, which it would mix with), else a path."""
    if resume == "auto":
        return latest_checkpoint(root)
    if resume == "none":
        existing = latest_checkpoint(root)
        if existing is not None:
            raise FileExistsError(
                f"train.resume=none but {root} already holds checkpoints (latest {existing.name}); "
                "use train.resume=auto to continue, or another train.output_dir"
            )
        return None
    path = Path(resume)
    for needed in (STATE_DIR, TRAINER_STATE_FILE):
        if not (path / needed).exists():
            raise FileNotFoundError(f"train.resume={resume}: {path / needed} does not exist")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    cfg: Config,
    state: TrainerState,
    root: str | Path,
    keep: int,
) -> Path:
    """Write `root/step_{state.step}` on all processes together; keep the newest `keep` (0 = all).

    Every process must call this: DeepSpeed writes its shards from each rank, and ZeRO-3 gathers
    the full weights collectively.
    """
    root = Path(root)
    final = checkpoint_path(root, state.step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / STATE_DIR).mkdir()  # before any rank writes its shards there (FSDP's sharded save)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp / STATE_DIR))
    weights = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the rename
    if accelerator.is_main_process:
        write_safetensors(plain_state_dict(weights), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        save_config(cfg, tmp / CONFIG_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        if final.exists():  # the same step saved again, e.g. by a run that resumed after it
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (0 keeps all), and stale temporaries."""
    root = Path(root)
    complete = list_checkpoints(root)
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> TrainerState:
    """Restore model, optimiser, scaler, RNG and registered objects; return where the run stood."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    accelerator.load_state(str(checkpoint / STATE_DIR))
    return state
