"""The cost of getting one batch of frames onto the device: as float32 and as uint8.

``measure_input_copy(cfg, device)`` times, for ``data.batch_size`` clips of the config's
geometry: (a) ``float32`` pageable memory, blocking ``.to(device)`` (a batch normalised on the
host); (b) ``uint8`` pinned memory, ``non_blocking`` copy, then ``normalize_video`` on the device
(``avmae.data.device``), as the engine runs. On the CPU there is no copy to make and pinning needs a GPU:
the record says so and times the normalisation alone.
"""

from __future__ import annotations

import time

import torch

from avmae.augment.transforms import normalize_video
from avmae.config import Config
from avmae.models import example_inputs

from .machine import environment, finish, synchronize


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return 1000.0 * (time.perf_counter() - start) / repeats


def measure_input_copy(cfg: Config, device: torch.device, repeats: int = 10) -> dict:
    video_cfg = cfg.data.video
    frames = example_inputs(cfg, cfg.data.batch_size, uint8_video=True)["video"]
    shape = tuple(frames.shape)
    as_float = normalize_video(frames, video_cfg.mean, video_cfg.std)  # a batch normalised on the host
    cuda = device.type == "cuda"
    pinned = frames.pin_memory() if cuda else frames
    env = environment(device, torch.get_num_threads())
    float_ms = _time(lambda: as_float.to(device), repeats, device)
    uint8_ms = _time(
        lambda: normalize_video(pinned.to(device, non_blocking=cuda), video_cfg.mean, video_cfg.std), repeats, device
    )
    return {
        "kind": "input_copy",
        **finish(env),
        "batch_size": cfg.data.batch_size,
        "video_shape": list(shape),
        "float32_bytes": as_float.numel() * 4,
        "uint8_bytes": frames.numel(),
        "float32_pageable_blocking_ms": float_ms,
        "uint8_pinned_non_blocking_normalise_ms": uint8_ms,
        "note": "" if cuda else "CPU: no host-to-device copy exists; the float32 row is a no-op, the uint8 row is the "
        "normalisation alone",
        "repeats": repeats,
    }
