"""The pretraining loop: one Accelerate loop for every objective, precision and launcher.

`pretrain(cfg)` runs in one process (`python tools/pretrain.py`) or in many
(`accelerate launch tools/pretrain.py`, DDP or DeepSpeed); what changes between them is decided by
accelerate. The loop reads top to bottom: build, resume, then per micro-batch forward/backward
with accumulation, and per optimiser update the schedule, logging, checkpoints and stop checks.

Exact resume rests on three things: the sampler's order is a function of (seed, epoch)
(accelerate's seedable sampler), the dataset's per-item randomness is a function of
(seed, epoch, index), and accelerate's state holds every process's RNG (masking, drop path).
Each epoch uses `steps_per_epoch x grad_accum` micro-batches, so an accumulation window never
straddles two epochs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from avmae.config import Config, config_to_dict
from avmae.data import DistributedWeightedSampler, Manifest, balanced_weights, build_dataset, collate_clips
from avmae.engine.checkpoint import (
    CHECKPOINTS_DIR,
    TrainerState,
    checkpoint_path,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from avmae.engine.faults import NonFiniteGuard, StopSignal
from avmae.engine.optim import build_optimizer, build_scheduler, effective_batch_size, scaled_lr, total_steps, warmup_steps
from avmae.models import build_pretrain_model

MODEL_INPUTS = ("video", "audio", "video2", "audio2")


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after a checkpoint was saved; rerunning the command resumes."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by signal {signum}; checkpoint saved at {checkpoint}")


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for this machine: DDP over gloo on CPU needs `cpu=True` (else each process trains
    alone), while DeepSpeed on CPU needs `cpu=False` and an explicit gloo process group."""
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    on_cpu = not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and on_cpu else []
    return Accelerator(
        cpu=on_cpu and not deepspeed,
        mixed_precision=cfg.train.mixed_precision,
        # Accumulation windows are aligned with epochs by the loop itself (see the module doc).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        log_with="tensorboard",
        project_dir=cfg.train.output_dir,
        dynamo_backend="inductor" if cfg.train.compile else "no",
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def _ignore_signals_in_worker(worker_id: int) -> None:
    # A scheduler's SIGTERM (torchrun signals the whole process group) or a terminal's Ctrl-C must
    # reach only the training process, which finishes its step and saves; a worker killed by it
    # would take the batch it was decoding down with it. Its own process group keeps it out.
    os.setpgid(0, 0)


def _balanced_sampler(cfg: Config, dataset: Dataset) -> DistributedWeightedSampler:
    """AudioSet-style weighted sampling. One draw per epoch of the whole batch stream, the same
    in every process (seeded by seed + epoch); accelerate then shards its batches like any other."""
    if not hasattr(dataset, "records"):
        raise ValueError("data.balanced_sampling needs a dataset with records and classes (an AVDataset)")
    manifest = Manifest(records=dataset.records, classes=dataset.classes, multi_label=dataset.multi_label)
    return DistributedWeightedSampler(balanced_weights(manifest), num_replicas=1, rank=0, seed=cfg.train.seed)


def build_train_loader(cfg: Config, dataset: Dataset) -> DataLoader:
    """Shuffled (or balanced), `drop_last` loader from `cfg.data`; accelerate shards it across processes."""
    data = cfg.data
    workers = data.num_workers
    sampler = _balanced_sampler(cfg, dataset) if data.balanced_sampling else None
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_clips,
        num_workers=workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=data.prefetch_factor if workers > 0 else None,
        worker_init_fn=_ignore_signals_in_worker if workers > 0 else None,
        # Its own generator keeps the loader off the global RNG, which resume restores exactly.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def _share_cpu_cores(num_workers: int, num_processes: int) -> None:
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
        self.start = time.perf_counter()
        self.updates = 0

    def add(self, output: dict, batch: dict) -> None:
        self.sums["loss"] = self.sums["loss"] + output["loss"].detach().float()
        for name, value in output.get("logs", {}).items():
            self.sums[name] = self.sums[name] + value.detach().float()
        if "failures" in batch:
            self.failures = self.failures + batch["failures"].sum()
        self.micro_batches += 1

    def reduce(self, accelerator: Accelerator, clips_per_update: int) -> dict[str, float]:
        """Means over micro-batches and processes, the summed skipped clips, and throughput."""
        names = sorted(self.sums)
        device = accelerator.device
        values = torch.stack([torch.as_tensor(self.sums[n], device=device).float() for n in names])
        values = torch.cat([values, torch.as_tensor(self.failures, device=device).float().view(1)])
        totals = accelerator.reduce(values, reduction="sum").tolist()
        count = max(self.micro_batches, 1) * accelerator.num_processes
        logs = {name: total / count for name, total in zip(names, totals)}
        logs["skipped_clips"] = totals[-1]
        logs["clips_per_s"] = self.updates * clips_per_update / max(time.perf_counter() - self.start, 1e-9)
        return logs


def _input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed's bf16/fp16 modes hold the weights in that dtype and, unlike autocast, leave the
    inputs to the caller: they must be cast to it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def _model_inputs(batch: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    if dtype is not None:
        inputs = {name: x.to(dtype) if x.is_floating_point() else x for name, x in inputs.items()}
    return inputs


def pretrain(cfg: Config, model: torch.nn.Module | None = None, dataset: Dataset | None = None) -> Path:
    """Pretrain `model` (default `avmae.models.build_pretrain_model(cfg)`) on `dataset` (default the
    `train` split of `cfg.data`); return the final checkpoint directory.

    The model maps `video`, `audio` (and `video2`, `audio2` when present) to a dict with a scalar
    `loss` and detached scalar `logs`; `after_optimizer_step(progress)` is called when it exists.
    Raises `TrainingInterrupted` after saving when SIGTERM/SIGINT arrives, and
    `NonFiniteLossError` (naming the step) instead of saving when the loss stops being finite.
    On the CPU the run uses fewer torch threads (`_share_cpu_cores`); the caller's count is
    restored when it returns or raises.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, model, dataset)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, model: torch.nn.Module | None, dataset: Dataset | None) -> Path:
    train = cfg.train
    accelerator = build_accelerator(cfg)
    set_seed(train.seed, device_specific=True)  # masks and drop path differ across ranks
    if accelerator.device.type == "cpu":
        _share_cpu_cores(cfg.data.num_workers, accelerator.num_processes)
    output_dir = Path(train.output_dir)
    checkpoints = output_dir / CHECKPOINTS_DIR
    resume_from = resolve_resume(train.resume, checkpoints)

    if dataset is None:
        dataset = build_dataset(cfg, "train", train=True)
    if model is None:
        model = build_pretrain_model(cfg)
        if cfg.model.init_from and resume_from is None:  # a resumed run has its own weights
            from avmae.models.pretrain import init_encoder_from

            init_encoder_from(model, cfg.model.init_from)
            accelerator.print(f"encoder initialised from {cfg.model.init_from}")
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # SimSiam's and MoCo v3's projector BatchNorms normalise over the global batch, as in their
        # papers (SyncBatchNorm has no CPU kernels: on gloo they stay per process)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(accelerator.device)  # before the optimiser, so a fused AdamW sees CUDA parameters
    loader = build_train_loader(cfg, dataset)

    clips_per_update = effective_batch_size(
        cfg.data.batch_size, accelerator.num_processes, train.grad_accum, cfg.data.clips_per_video
    )
    lr = scaled_lr(train, clips_per_update)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    input_dtype = _input_dtype(accelerator)
    use_fused = accelerator.device.type == "cuda" and not deepspeed
    optimizer = build_optimizer(model, train, lr, fused=use_fused)
    _configure_deepspeed(accelerator, cfg)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(model)

    steps_per_epoch = len(loader) // train.grad_accum
    num_steps = total_steps(train, steps_per_epoch)
    micro_per_epoch = steps_per_epoch * train.grad_accum
    scheduler = build_scheduler(optimizer, train, num_steps, warmup_steps(train, steps_per_epoch))
    accelerator.register_for_checkpointing(scheduler)

    state = TrainerState(
        num_processes=accelerator.num_processes, batch_size=cfg.data.batch_size, grad_accum=train.grad_accum
    )
    if resume_from is not None:
        saved = load_checkpoint(accelerator, resume_from)
        layout = (saved.num_processes, saved.batch_size, saved.grad_accum)
        if layout != (state.num_processes, state.batch_size, state.grad_accum):
            raise ValueError(
                f"{resume_from} was written with (processes, batch_size, grad_accum) = {layout}, this run has "
                f"{(state.num_processes, state.batch_size, state.grad_accum)}; its position in the epoch would "
                "not carry over. Resume with the same layout, or start a new train.output_dir."
            )
        state = saved
        accelerator.print(f"resuming from {resume_from} (step {state.step}, epoch {state.epoch})")
    scheduler.step_update(state.step)

    accelerator.init_trackers("tensorboard", config=_tracker_config(cfg))
    accelerator.print(
        f"{num_steps} optimiser steps, {steps_per_epoch} per epoch; {clips_per_update} clips per step "
        f"({accelerator.num_processes} processes x {cfg.data.batch_size} videos x {cfg.data.clips_per_video} clips "
        f"x {train.grad_accum} accumulated), "
        f"peak lr {lr:.3g}"
    )
    progress = tqdm(
        total=num_steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True,
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    guard = NonFiniteGuard(accelerator.device)
    window = LogWindow()
    last_saved = resume_from

    def save() -> Path:
        guard.check(accelerator, str(last_saved) if last_saved else None)  # never save poisoned weights
        at = state
        if at.batch_in_epoch >= micro_per_epoch:
            at = dataclasses.replace(at, epoch=at.epoch + 1, batch_in_epoch=0)
        return save_checkpoint(accelerator, model, cfg, at, checkpoints, train.keep_checkpoints)

    model.train()
    stop_signal = 0
    with StopSignal() as stop, progress:
        while state.step < num_steps and not stop_signal:
            if state.batch_in_epoch >= micro_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            loader.set_epoch(state.epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(state.epoch)
            epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader

            for batch in epoch_loader:
                if state.batch_in_epoch >= micro_per_epoch:
                    break  # the last, incomplete accumulation window of the epoch is dropped
                with accelerator.accumulate(model):
                    output = model(**_model_inputs(batch, input_dtype))
                    accelerator.backward(output["loss"])
                    if accelerator.sync_gradients and train.clip_grad > 0 and not deepspeed:
                        accelerator.clip_grad_norm_(model.parameters(), train.clip_grad)  # DeepSpeed clips itself
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batch_in_epoch += 1
                guard.update(output["loss"], state.step + 1)
                window.add(output, batch)
                if not accelerator.sync_gradients:
                    continue

                state.step += 1
                window.updates += 1
                lr_used = optimizer.param_groups[0]["lr"]
                scheduler.step_update(state.step)
                if hasattr(core, "after_optimizer_step"):
                    core.after_optimizer_step(state.step / num_steps)
                progress.update(1)

                if state.step % train.log_every == 0 or state.step == num_steps:
                    guard.check(accelerator, str(last_saved) if last_saved else None)
                    logs = window.reduce(accelerator, clips_per_update)
                    logs["lr"] = lr_used
                    logs["epoch"] = state.epoch + state.batch_in_epoch / micro_per_epoch
                    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", refresh=False)
                    window = LogWindow()

                stop_signal = stop.requested()
                if state.step % train.checkpoint_every == 0 or state.step == num_steps or stop_signal:
                    last_saved = save()
                if state.step >= num_steps or stop_signal:
                    break

    if last_saved != checkpoint_path(checkpoints, state.step):
        last_saved = save()  # resumed from elsewhere with nothing left to do
    accelerator.end_training()
    if stop_signal:
        raise TrainingInterrupted(stop_signal, last_saved)
    accelerator.print(
        f"\npretraining done: checkpoint {last_saved}\n"
        f"next: python tools/export.py {last_saved} {output_dir / 'export'}"
    )
    return last_saved
