"""The training loop every recipe runs: pretraining and finetuning alike.

A recipe (``avmae.engine.pretrain``, ``avmae.engine.finetune``) builds its model and dataset and
says how a batch becomes a loss; the ``Trainer`` does everything else the same way for both:
processes and sharding through accelerate, the loader, gradient accumulation, clipping, the lr
schedule, ``torch.compile``, atomic checkpoints and exact resume, signals, the non-finite loss
policy, TensorBoard and progress lines. docs/architecture.md, "Training", states the interface;
docs/pretraining.md what each of these does and why resume is exact.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, parse_flag_from_env, send_to_device
from torch import nn
from torch.utils.data import Dataset

from avmae.config import Config, DataConfig, config_to_dict
from avmae.data import build_loader
from avmae.data.device import device_inputs
from avmae.data.object_store import store_retries
from avmae.engine.checkpoint import (
    CHECKPOINTS_DIR,
    TrainerState,
    checkpoint_path,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from avmae.engine.compile import compile_model
from avmae.engine.faults import NonFiniteGuard, NonFiniteLossError, StopSignal
from avmae.engine.progress import Progress
from avmae.engine.optim import build_scheduler, effective_batch_size, scaled_lr, total_steps, warmup_steps

# The tensors of a batch that are model inputs (cast to DeepSpeed's dtype).
MODEL_INPUTS = ("video", "audio", "video2", "audio2")

# (model, batch on the device) -> {"loss": scalar tensor, "logs": {name: detached scalar}}
LossFn = Callable[[nn.Module, dict], dict]
# (model, peak lr, fused) -> optimiser
OptimizerFn = Callable[[nn.Module, float, bool], torch.optim.Optimizer]


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after a checkpoint was saved; rerunning the command resumes."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by signal {signum}; checkpoint saved at {checkpoint}")


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for this machine: DDP over gloo on CPU needs `cpu=True` (else each process trains
    alone), while DeepSpeed and FSDP on CPU need `cpu=False` (with it accelerate falls back to
    DDP) and an explicit gloo process group."""
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    sharded = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or fsdp
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        # what DeepSpeed's own detection would choose, said up front: accelerate imports DeepSpeed
        # wherever it is installed (to unwrap models), and its detection warns on every CPU run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if sharded and on_cpu else []
    accelerator = Accelerator(
        cpu=on_cpu and not sharded,
        mixed_precision=cfg.train.mixed_precision,
        # Accumulation windows are aligned with epochs by the loop itself (see the module doc).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True,
            data_seed=cfg.train.seed,
            # pinned batches (data.pin_memory) cross to the GPU without blocking the host
            non_blocking=cfg.data.pin_memory and torch.cuda.is_available(),
        ),
        log_with="tensorboard",
        project_dir=cfg.train.output_dir,
        dynamo_backend="no",  # the Trainer compiles itself, with a fallback (avmae.engine.compile)
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    if fsdp and accelerator.distributed_type != DistributedType.FSDP and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # accelerate selects FSDP for GPU process groups only; the processes would train alone
        raise RuntimeError(
            "the FSDP launcher needs GPUs (accelerate runs FSDP only on them); on a CPU-only machine use "
            "configs/accelerate/cpu_2proc.yaml (DDP) or zero3.yaml"
        )
    return accelerator


def build_in_every_process(accelerator: Accelerator, seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` giving the same initial weights in every process: DDP and DeepSpeed broadcast
    rank 0's, but FSDP shards each process's own. Rank 0 builds under its current random state
    (seeded from ``seed`` by the recipe, as in a single-process run); the others build from
    ``seed`` too, with their own random state put back afterwards."""
    others = accelerator.process_index > 0
    with torch.random.fork_rng(devices=[], enabled=others):
        if others:
            torch.manual_seed(seed)
        return build()


def share_cpu_cores(num_workers: int, num_processes: int) -> None:
    """Training on the CPU: leave one core to each DataLoader worker, unless OMP_NUM_THREADS says.

    With torch's default of one thread per core competing with the workers, a step of the demo
    model ran about 20x slower on a busy 2-core machine (spinning threads wait for preempted ones)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // num_processes - num_workers))


def _configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """The run's config, not the launcher's file, decides accumulation and clipping."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds_config["gradient_clipping"] = cfg.train.clip_grad


def _tracker_config(cfg: Config) -> dict:
    """Flat `section/key` scalars, as TensorBoard's hparams accept."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        stack = [(section, values)]
        while stack:
            prefix, node = stack.pop()
            for key, value in node.items():
                name = f"{prefix}/{key}"
                if isinstance(value, dict):
                    stack.append((name, value))
                else:
                    flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class LogWindow:
    """Per-step values summed on the device between two logs; `reduce` syncs once per window."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(float)
        self.micro_batches = 0
        self.failures: torch.Tensor | int = 0
        self.data_wait = 0.0  # seconds this process waited for the loader
        self.start = time.perf_counter()
        self.updates = 0

    def count_failures(self, batch: dict) -> None:
        """The clips a micro-batch's loader skipped (counted whether or not its update is kept)."""
        if "failures" in batch:
            self.failures = self.failures + batch["failures"].sum()

    def add(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """One micro-batch of a kept update: its loss and its ``logs`` scalars."""
        self.sums["loss"] = self.sums["loss"] + loss.detach().float()
        for name, value in logs.items():
            self.sums[name] = self.sums[name] + value.detach().float()
        self.micro_batches += 1

    def reduce(self, accelerator: Accelerator, clips_per_update: int) -> dict[str, float]:
        """Means over micro-batches and processes, the summed skipped clips, throughput, and the
        share of the time spent waiting for data (mean over processes)."""
        names = sorted(self.sums)
        device = accelerator.device
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        # (no names when every update of the window was discarded: train.on_nonfinite=skip)
        values = torch.stack([torch.as_tensor(self.sums[n], device=device).float() for n in names] or
                             [torch.zeros((), device=device)])[: len(names)]  # fmt: skip
        extra = torch.stack([torch.as_tensor(self.failures, device=device).float(),
                             torch.tensor(self.data_wait / elapsed, device=device).float()])  # fmt: skip
        totals = accelerator.reduce(torch.cat([values, extra]), reduction="sum").tolist()
        count = max(self.micro_batches, 1) * accelerator.num_processes
        logs = {name: total / count for name, total in zip(names, totals)}
        logs["skipped_clips"] = totals[-2]
        logs["data_wait_share"] = totals[-1] / accelerator.num_processes
        logs["clips_per_s"] = self.updates * clips_per_update / elapsed
        return logs


def timed(batches) -> Iterator[tuple[dict, float]]:
    """``(batch, seconds waited for it)`` for each batch of ``batches``."""
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed's bf16/fp16 modes hold the weights in that dtype and, unlike autocast, leave the
    inputs to the caller: they must be cast to it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def batch_to_device(batch: dict, device: torch.device, data_cfg: DataConfig, dtype: torch.dtype | None = None) -> dict:
    """The one place a training batch meets the device: tensors moved (a no-op for batches that a
    prepared loader already placed; ``non_blocking`` from pinned memory on a GPU), the device
    transforms run there (``data.device_transforms``) and uint8 video normalised by
    ``data_cfg.video`` (``avmae.data.device.device_inputs``), and the model inputs cast to
    ``dtype`` when given."""
    batch = send_to_device(batch, device, non_blocking=torch.device(device).type == "cuda")
    batch = device_inputs(batch, data_cfg)
    if dtype is not None:
        batch = {k: v.to(dtype) if k in MODEL_INPUTS and v.is_floating_point() else v for k, v in batch.items()}
    return batch


@dataclasses.dataclass
class Update:
    """What ``Trainer.fit``'s ``on_update`` hook is told after each optimiser update."""

    step: int  # updates done
    num_steps: int
    epoch: int  # the epoch this update belongs to
    epoch_done: bool  # the update closed its epoch


class Trainer:
    """The shared loop. ``setup`` builds and prepares everything and resumes; ``fit`` trains.

    ::

        accelerator = build_accelerator(cfg)
        trainer = Trainer(cfg, accelerator, "finetune")
        model, eval_loader = trainer.setup(model, dataset, build_optimizer, eval_loader)
        checkpoint = trainer.fit(loss_fn, on_update)
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, name: str) -> None:
        self.cfg, self.accelerator, self.name = cfg, accelerator, name
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoints = self.output_dir / CHECKPOINTS_DIR
        self.resume_from = resolve_resume(cfg.train.resume, self.checkpoints)
        if accelerator.device.type == "cpu":
            share_cpu_cores(cfg.data.num_workers, accelerator.num_processes)

    def setup(self, model: nn.Module, dataset: Dataset, build_optimizer: OptimizerFn, *extras) -> tuple:
        """Loader, optimiser and schedule for ``model`` on ``dataset``, all prepared by accelerate
        together with ``extras`` (e.g. an evaluation loader), then the newest checkpoint restored.

        Returns the prepared model followed by the prepared ``extras``.
        """
        cfg, train, accelerator = self.cfg, self.cfg.train, self.accelerator
        self.dataset = dataset
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            # SimSiam's and MoCo v3's projector BatchNorms normalise over the global batch, as in their
            # papers (SyncBatchNorm has no CPU kernels: on gloo they stay per process)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(accelerator.device)  # before the optimiser, so a fused AdamW sees CUDA parameters
        loader = build_loader(cfg, dataset, train=True)

        self.clips_per_update = effective_batch_size(
            cfg.data.batch_size, accelerator.num_processes, train.grad_accum, cfg.data.clips_per_video
        )
        self.lr = scaled_lr(train, self.clips_per_update)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.input_dtype = input_dtype(accelerator)
        optimizer = build_optimizer(model, self.lr, accelerator.device.type == "cuda" and not self.deepspeed)
        _configure_deepspeed(accelerator, cfg)
        if self.deepspeed and train.on_nonfinite != "stop":
            # DeepSpeed steps its optimiser inside backward: an update cannot be held back
            raise ValueError(f"train.on_nonfinite={train.on_nonfinite} needs an optimiser step the loop can "
                             "withhold, which DeepSpeed does not allow; use stop (DeepSpeed's fp16 skips overflows itself)")
        self.model, self.optimizer, self.loader, *extras = accelerator.prepare(model, optimizer, loader, *extras)
        self.core = accelerator.unwrap_model(self.model)
        # what loss_fn calls: the prepared model, or its compiled step (train.compile)
        self.forward = compile_model(self.model, cfg, accelerator.device, self.deepspeed, log=accelerator.print)

        self.steps_per_epoch = len(self.loader) // train.grad_accum
        self.num_steps = total_steps(train, self.steps_per_epoch)
        self.micro_per_epoch = self.steps_per_epoch * train.grad_accum
        self.scheduler = build_scheduler(
            self.optimizer, train, self.num_steps, warmup_steps(train, self.steps_per_epoch)
        )
        accelerator.register_for_checkpointing(self.scheduler)

        self.state = TrainerState(
            num_processes=accelerator.num_processes, batch_size=cfg.data.batch_size, grad_accum=train.grad_accum
        )
        if self.resume_from is not None:
            self._resume()
        self.scheduler.step_update(self.state.step)
        accelerator.print(
            f"{self.name}: {self.num_steps} optimiser steps, {self.steps_per_epoch} per epoch; "
            f"{self.clips_per_update} clips per step ({accelerator.num_processes} processes x "
            f"{cfg.data.batch_size} videos x {cfg.data.clips_per_video} clips x {train.grad_accum} accumulated), "
            f"peak lr {self.lr:.3g}"
        )
        return (self.model, *extras)

    def _count_nonfinite(self, step: int, last_checkpoint: str | None) -> None:
        """One more update with a non-finite loss; past ``train.max_nonfinite`` the run stops."""
        self.state.nonfinite += 1
        limit = self.cfg.train.max_nonfinite
        if self.state.nonfinite > limit:
            why = f"{self.state.nonfinite} non-finite updates, more than train.max_nonfinite={limit}"
            raise NonFiniteLossError(step, last_checkpoint, why)
        if self.cfg.train.on_nonfinite == "skip":
            self.accelerator.print(
                f"non-finite loss at update {step}: update skipped ({self.state.nonfinite} of train.max_nonfinite={limit})"
            )

    def _load(self, checkpoint: Path) -> None:
        """Model, optimiser, schedule, RNG and ``self.state`` as they were saved in ``checkpoint``."""
        self.state = load_checkpoint(self.accelerator, checkpoint)

    def _resume(self) -> None:
        state, saved = self.state, load_checkpoint(self.accelerator, self.resume_from)
        layout = (saved.num_processes, saved.batch_size, saved.grad_accum)
        if layout != (state.num_processes, state.batch_size, state.grad_accum):
            raise ValueError(
                f"{self.resume_from} was written with (processes, batch_size, grad_accum) = {layout}, this run has "
                f"{(state.num_processes, state.batch_size, state.grad_accum)}; its position in the epoch would "
                "not carry over. Resume with the same layout, or start a new train.output_dir."
            )
        self.state = saved
        self.accelerator.print(f"resuming from {self.resume_from} (step {saved.step}, epoch {saved.epoch})")

    def position(self) -> tuple[int, int, int]:
        """``(process, epoch, micro-batch in epoch)`` of the batch being trained on: a seed for
        randomness a recipe draws itself, the same when a resumed run reaches this batch again."""
        return self.accelerator.process_index, self.state.epoch, self.state.batch_in_epoch

    def lr_now(self) -> float:
        """The largest lr of the parameter groups (layer decay scales the others down)."""
        return max(group["lr"] for group in self.optimizer.param_groups)

    def fit(self, loss_fn: LossFn, on_update: Callable[[Update], None] | None = None) -> Path:
        """Train to ``num_steps`` updates; return the final checkpoint directory.

        ``loss_fn(model, batch)`` is the one place a batch becomes a loss; ``model`` is the prepared
        model, or its compiled step under ``train.compile`` (``avmae.engine.compile``), and the
        batch is on the device with its video normalised (``batch_to_device``). ``on_update`` runs
        after each update, before its checkpoint (a recipe's evaluation goes there, so a resumed
        run never repeats or skips it); the model is back in train mode after it.
        """
        cfg, train, accelerator = self.cfg, self.cfg.train, self.accelerator
        model, optimizer, loader, scheduler, state = self.model, self.optimizer, self.loader, self.scheduler, self.state
        micro_per_epoch, num_steps = self.micro_per_epoch, self.num_steps

        accelerator.init_trackers("tensorboard", config=_tracker_config(cfg))
        progress = Progress(self.name, num_steps, state.step, accelerator.is_local_main_process,
                            train.progress_every, train.progress_seconds)  # fmt: skip
        guard = NonFiniteGuard(accelerator.device)
        window = LogWindow()
        last_saved = self.resume_from
        policy = train.on_nonfinite

        def save() -> Path:
            guard.check(accelerator, str(last_saved) if last_saved else None)  # never save poisoned weights
            at = state
            if at.batch_in_epoch >= micro_per_epoch:
                at = dataclasses.replace(at, epoch=at.epoch + 1, batch_in_epoch=0)
            return save_checkpoint(accelerator, model, cfg, at, self.checkpoints, train.keep_checkpoints)

        def rolled_back() -> bool:
            """on_nonfinite=rollback: a non-finite loss since the last check sends the run back to
            the last checkpoint, with the bad update marked to be discarded when it comes again."""
            nonlocal state, window
            if policy != "rollback":
                return False
            try:
                guard.check(accelerator, str(last_saved) if last_saved else None)
                return False
            except NonFiniteLossError as err:
                if last_saved is None:
                    raise NonFiniteLossError(err.step, None, "no checkpoint to roll back to") from None
                self._count_nonfinite(err.step, str(last_saved))
                counts = state.nonfinite, sorted({*state.discarded_steps, err.step})
                self._load(last_saved)
                state = self.state
                state.nonfinite, state.discarded_steps = counts
                guard.reset()
                window = LogWindow()
                progress.restart(state.step)
                accelerator.print(
                    f"non-finite loss at update {err.step}: back to {last_saved} (step {state.step}), the batches of "
                    f"update {err.step} will be discarded ({state.nonfinite} of train.max_nonfinite={train.max_nonfinite})"
                )
                return True

        model.train()
        stop_signal = 0
        with StopSignal() as stop, progress:
            while state.step < num_steps and not stop_signal:
                if state.batch_in_epoch >= micro_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                loader.set_epoch(state.epoch)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(state.epoch)
                skip = state.batch_in_epoch
                epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
                # (loss, logs) of the micro-batches of the update in progress, kept until the
                # update is known to be kept (train.on_nonfinite=skip decides at its end)
                held: list[tuple[torch.Tensor, dict]] = []

                for batch, waited in timed(epoch_loader):
                    if state.batch_in_epoch >= micro_per_epoch:
                        break  # the last, incomplete accumulation window of the epoch is dropped
                    window.data_wait += waited
                    batch = batch_to_device(batch, accelerator.device, cfg.data, self.input_dtype)
                    # a rolled-back (or resumed) run passes over the update that went bad
                    discard = state.step + 1 in state.discarded_steps
                    with accelerator.accumulate(model):
                        output = loss_fn(self.forward, batch)
                        accelerator.backward(output["loss"])
                        if policy == "skip" and not discard:
                            guard.note(output["loss"])
                            if accelerator.sync_gradients and guard.update_is_bad(accelerator):
                                discard = True
                                self._count_nonfinite(state.step + 1, str(last_saved) if last_saved else None)
                                state.discarded_steps.append(state.step + 1)
                        if not discard:
                            if accelerator.sync_gradients and train.clip_grad > 0 and not self.deepspeed:
                                accelerator.clip_grad_norm_(model.parameters(), train.clip_grad)  # DeepSpeed clips itself
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    state.batch_in_epoch += 1
                    if policy != "skip" and not discard:  # skip decides per update (above)
                        guard.update(output["loss"], state.step + 1)
                    window.count_failures(batch)
                    held.append((output["loss"].detach(), output.get("logs", {})))
                    if not accelerator.sync_gradients:
                        continue

                    state.step += 1
                    window.updates += 1
                    if not discard:
                        for loss, logs in held:
                            window.add(loss, logs)
                    held.clear()
                    lr_used = self.lr_now()
                    scheduler.step_update(state.step)
                    if hasattr(self.core, "after_optimizer_step") and not discard:
                        self.core.after_optimizer_step(state.step / num_steps)
                    progress.update(state.step)

                    if state.step % train.log_every == 0 or state.step == num_steps:
                        if rolled_back():
                            break
                        guard.check(accelerator, str(last_saved) if last_saved else None)
                        logs = window.reduce(accelerator, self.clips_per_update)
                        logs["lr"] = lr_used
                        logs["epoch"] = state.epoch + state.batch_in_epoch / micro_per_epoch
                        logs["nonfinite_updates"] = state.nonfinite
                        retries = store_retries(self.dataset)
                        if retries is not None:  # object-store requests retried so far, all processes and workers
                            logs["store_retries"] = accelerator.reduce(retries.to(accelerator.device), "sum").item()
                        accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                        progress.log(state.step, logs)
                        window = LogWindow()

                    if on_update is not None:
                        epoch_done = state.batch_in_epoch >= micro_per_epoch
                        on_update(Update(state.step, num_steps, state.epoch, epoch_done))
                        model.train()

                    stop_signal = stop.requested()
                    if state.step % train.checkpoint_every == 0 or state.step == num_steps or stop_signal:
                        if rolled_back():
                            break
                        last_saved = save()
                    if state.step >= num_steps or stop_signal:
                        break

        if last_saved != checkpoint_path(self.checkpoints, state.step):
            last_saved = save()  # resumed from elsewhere with nothing left to do
        if stop_signal:
            accelerator.end_training()
            raise TrainingInterrupted(stop_signal, last_saved)
        return last_saved
