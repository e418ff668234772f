"""Throughput of the pretraining engine itself, under whatever ``accelerate launch`` set up.

``measure_engine(cfg)`` runs ``avmae.engine.pretrain`` unchanged (accelerate's
preparation, DDP, FSDP or DeepSpeed ZeRO, mixed precision, accumulation, clipping, logging, the final
checkpoint) on ``DeviceClips``: one random clip of the config's geometry (uint8 frames, as
datasets deliver them), made once on the device and repeated, so neither decoding nor
host-to-device copies limit the step. With ``source="dataset"`` it trains on the config's own
training data instead (``build_dataset(cfg, "train")``: mp4 manifests, or any other
``data.format``, with the config's ``data.num_workers`` and pinning), which measured next to the
synthetic run says how much of the step the loader keeps fed. The figure is
the engine's own ``train/clips_per_s`` (all processes), averaged over the logging windows after
the first (which holds the warm-up and DeepSpeed's first steps). MFU divides the counted
forward + backward FLOPs per clip by the data-sheet (or measured GEMM) peak of every process's
device together.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from torch.utils.data import Dataset

from avmae.config import Config, replace

from .machine import environment, finish, peak_flops
from .train_step import count_step_flops, step_precision, synthetic_inputs


class DeviceClips(Dataset):
    """``length`` items holding the same random ``video (C, T, H, W)`` and ``audio (1, T_a, F)``,
    already on ``device`` (so the loader must run in the main process, without pinning)."""

    def __init__(self, cfg: Config, length: int, device: torch.device):
        video, audio = synthetic_inputs(cfg, 1, device)
        self.video, self.audio, self.length = video[0], audio[0], length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"video": self.video, "audio": self.audio, "failures": 0, "index": index}


SOURCES = ("device", "dataset")


def measure_engine(cfg: Config, source: str = "device") -> dict | None:
    """Run ``train.max_steps`` updates of ``pretrain`` on ``DeviceClips`` (``source="device"``)
    or the config's training data (``"dataset"``) into a fresh ``train.output_dir`` (removed
    first; its checkpoints are removed afterwards, its TensorBoard logs kept) and return the record
    on the main process (None on the others). Needs at least two
    logging windows."""
    from avmae.data import build_dataset
    from avmae.engine import pretrain, read_scalars
    from avmae.engine.checkpoint import CHECKPOINTS_DIR

    if source not in SOURCES:
        raise ValueError(f"engine data source must be one of {', '.join(SOURCES)}, got {source!r}")

    train = cfg.train
    if train.max_steps < 2 * train.log_every:
        raise ValueError(f"train.max_steps={train.max_steps} gives fewer than two windows of train.log_every={train.log_every}")
    state = PartialState()
    device = state.device
    output_dir = Path(train.output_dir)
    if state.is_main_process and output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run each time: resume=none refuses old checkpoints
    state.wait_for_everyone()
    data = replace(cfg.data, num_workers=0, pin_memory=False, clips_per_video=1) if source == "device" else cfg.data
    run = replace(
        cfg, data=data, train=replace(train, resume="none", checkpoint_every=train.max_steps, keep_checkpoints=1)
    )
    items = run.data.batch_size * state.num_processes * train.grad_accum * (train.max_steps + 1)
    env = environment(device, torch.get_num_threads())
    dataset = DeviceClips(run, items, device) if source == "device" else build_dataset(run, "train", train=True)
    pretrain(run, dataset=dataset)
    if not state.is_main_process:
        return None

    windows = read_scalars(output_dir, "train/clips_per_s")
    shutil.rmtree(output_dir / CHECKPOINTS_DIR)  # a measurement, not a model: leave no checkpoint behind
    steady = [windows[s] for s in sorted(windows)[1:]]
    clips_per_s = sum(steady) / len(steady)
    flops = count_step_flops(cfg, "avmae")
    peak, peak_source = peak_flops(device, step_precision(cfg) or torch.float32)
    accelerator = AcceleratorState()
    return {
        "kind": "engine",
        **finish(env),
        "data_source": source if source == "device" else f"dataset ({cfg.data.format}, {cfg.data.num_workers} workers)",
        "distributed": accelerator.distributed_type.value,
        "zero_stage": accelerator.deepspeed_plugin.zero_stage if accelerator.deepspeed_plugin else None,
        "num_processes": state.num_processes,
        "model_size": cfg.model.size,
        "batch_size": cfg.data.batch_size,
        "grad_accum": train.grad_accum,
        "precision": train.mixed_precision,
        "steps": train.max_steps,
        "log_every": train.log_every,
        "window_clips_per_s": [windows[s] for s in sorted(windows)],
        "clips_per_s": clips_per_s,
        "flops_per_clip": flops,
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": flops["step"] * clips_per_s / (peak * state.num_processes),
    }

