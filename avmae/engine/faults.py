"""What stops a run early: a non-finite loss (or, by ``train.on_nonfinite``, what the run does about
it instead), and SIGTERM/SIGINT from a scheduler or a user.

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
    """The loss became NaN or inf; raised instead of saving a checkpoint from the poisoned weights.
    ``why`` says why the run stops rather than skipping or rolling back (``train.on_nonfinite``)."""

    def __init__(self, step: int, last_checkpoint: str | None, why: str = ""):
        self.step = step
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(
            f"loss is NaN or inf at optimiser step {step}; {why + '; ' if why else ''}stopping without saving "
            f"these weights ({where}). Lower train.base_lr, raise train.warmup_epochs, set train.clip_grad, use "
            "bf16 instead of fp16, or see train.on_nonfinite."
        )


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite.

    `update` is asynchronous (no host-device sync), so it can run every step; `check` syncs and is
    called every `log_every` steps and before every checkpoint.
    """

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((1,), -1, dtype=torch.long, device=device)
        self.pending = torch.zeros(1, dtype=torch.bool, device=device)  # for `update_is_bad`

    def update(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(loss.detach().float()) & (self.first_bad_step < 0)
        self.first_bad_step.masked_fill_(newly_bad, step)

    def reset(self) -> None:
        self.first_bad_step.fill_(-1)

    def note(self, loss: torch.Tensor) -> None:
        """Remember whether a micro-batch of the update in progress had a non-finite loss."""
        self.pending |= ~torch.isfinite(loss.detach().float())

    def update_is_bad(self, accelerator: Accelerator) -> bool:
        """Whether any process noted a non-finite loss since the last call (syncs host and device)."""
        bad = bool(accelerator.reduce(self.pending.long(), reduction="sum").item())
        self.pending.zero_()
        return bad

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
