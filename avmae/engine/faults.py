"""What stops a run early: a non-finite loss, and SIGTERM/SIGINT from a scheduler or a user.

Both are decided by all processes together, so every rank takes the same branch (save, raise,
or go on) and none is left waiting in a collective.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist
from accelerate import Accelerator


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; raised instead of saving a checkpoint from the poisoned weights."""

    def __init__(self, step: int, last_checkpoint: str | None):
        self.step = step
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(
            f"loss is NaN or inf at optimiser step {step}; stopping without saving these weights ({where}). "
            "Lower train.base_lr, raise train.warmup_epochs, set train.clip_grad, or use bf16 instead of fp16."
        )


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite.

    `update` is asynchronous (no host-device sync), so it can run every step; `check` syncs and is
    called every `log_every` steps and before every checkpoint.
    """

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((1,), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(loss.detach().float()) & (self.first_bad_step < 0)
        self.first_bad_step.masked_fill_(newly_bad, step)

    def check(self, accelerator: Accelerator, last_checkpoint: str | None = None) -> None:
        """Raise `NonFiniteLossError` on every process if any process saw a non-finite loss."""
        steps = [s for s in accelerator.gather(self.first_bad_step).tolist() if s >= 0]
        if steps:
            raise NonFiniteLossError(min(steps), last_checkpoint)


class StopSignal:
    """SIGTERM and SIGINT ask the loop to finish its step, save a checkpoint and exit.

    A second signal restores the previous handlers and re-raises it, for a user who does not want
    to wait. `requested()` agrees on the answer across processes with a tiny CPU all-reduce (over
    a gloo group when the main backend is NCCL), so it never waits for the GPU.
    Use as a context manager around the loop.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo")  # every rank must create it
            self._distributed = True
        else:
            self._distributed = False

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received:
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(
            f"received {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> int:
        """The signal number any process received, or 0; the same answer on every process."""
        if not self._distributed:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
