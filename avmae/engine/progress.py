"""What a run shows while it trains: a bar for a person at a terminal, plain lines for a log file.

A progress bar redraws itself on every step; written to a file (a job scheduler, ``nohup``, CI)
each redraw stays, and a long run's log becomes mostly bar. So where stderr is not a terminal
the bar is replaced by one line now and then::

    pretrain step 120/1200 (10%) | loss 0.5123 | lr 1.20e-04 | 85.3 clips/s | data wait 12% | ETA 0:12:34

A line is written at a logging step (``train.log_every``, where the loss is already reduced
across processes) once ``train.progress_every`` steps or ``train.progress_seconds`` seconds have
passed since the previous line, and at the last step. docs/pretraining.md, "Logs".
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_line(name: str, step: int, total: int, logs: dict[str, float], eta_s: float | None) -> str:
    """One line of a run's state (see the module doc)."""
    parts = [
        f"{name} step {step}/{total} ({100 * step / max(total, 1):.0f}%)",
        f"loss {logs.get('loss', float('nan')):.4f}",
        f"lr {logs['lr']:.2e}",
        f"{logs['clips_per_s']:.1f} clips/s",
        f"data wait {100 * logs['data_wait_share']:.0f}%",
        f"ETA {_eta(eta_s) if eta_s is not None else '?'}",
    ]
    return " | ".join(parts)


class Progress:
    """The bar on a terminal, plain lines elsewhere; silent when ``enabled`` is false (other ranks).

    ``update(step)`` after every optimiser update, ``log(step, logs)`` at every logging step with
    the reduced logs (``loss``, ``lr``, ``clips_per_s``, ``data_wait_share``). Use as a context
    manager.
    """

    def __init__(
        self,
        name: str,
        total: int,
        initial: int,
        enabled: bool,
        every_steps: int,
        every_seconds: float,
        stream: TextIO | None = None,
    ) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True, file=self.stream)
        self.start_step, self.start_time = initial, time.perf_counter()
        self.last_step, self.last_time = initial, self.start_time

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def restart(self, step: int) -> None:
        """The run went back to ``step`` (a rollback): the bar and the rate follow it."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        self.start_step, self.start_time = step, time.perf_counter()
        self.last_step, self.last_time = step, self.start_time

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{logs['lr']:.2e}", refresh=False)
            return
        now = time.perf_counter()
        due = (
            step >= self.total
            or step - self.last_step >= self.every_steps
            or now - self.last_time >= self.every_seconds
        )
        if not due:
            return
        done = step - self.start_step
        eta = (self.total - step) * (now - self.start_time) / done if done > 0 else None
        print(progress_line(self.name, step, self.total, logs, eta), file=self.stream, flush=True)
        self.last_step, self.last_time = step, now
