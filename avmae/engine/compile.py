"""``torch.compile`` for the training step, on where it pays and never fatal.

``train.compile`` is ``null`` (the default: compile on a GPU, not on the CPU, where compiling
takes minutes and gains little), ``true`` or ``false``; ``train.compile_mode`` is torch's
``mode`` (``default``, ``max-autotune``, ``max-autotune-no-cudagraphs``, ``reduce-overhead``
= CUDA graphs). Compilation happens lazily, forward at the first call and backward at the first
backward, so a failure (a missing compiler, an unsupported op, a backend bug) would surface in
the middle of the first step. ``CompiledStep`` therefore verifies the compiled forward and
backward once on the first batch, with the random state, gradients and buffers put back
afterwards (the run's trajectory and exact resume are unchanged), and when that raises it says
why and trains on with the uncompiled model.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from avmae.config import Config
from avmae.models.flops import output_scalar

log = logging.getLogger(__name__)

MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def compile_enabled(cfg: Config, device: torch.device | str, deepspeed: bool = False) -> bool:
    """``train.compile``, with ``null`` meaning "on a CUDA device, outside DeepSpeed"."""
    if cfg.train.compile is None:
        return torch.device(device).type == "cuda" and not deepspeed
    return bool(cfg.train.compile)


def describe_failure(err: BaseException) -> str:
    """``Type: first line`` of ``err`` and of its root cause (the compiler's own error)."""

    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"

    root = err
    while (root.__cause__ or getattr(root, "inner_exception", None)) is not None and root is not root.__cause__:
        root = root.__cause__ or root.inner_exception
    return line(err) if root is err else f"{line(err)} ({line(root)})"


class CompiledStep:
    """Calls ``compiled`` after verifying, on the first call, that its forward and backward run;
    on failure prints the reason once and calls ``model`` from then on."""

    def __init__(self, model: nn.Module, compiled: Callable, log: Callable[[str], None] = print) -> None:
        self.model = model
        self.compiled = compiled
        self.log = log
        self.active: Callable | None = None  # decided at the first call
        self.error: str | None = None

    @property
    def is_compiled(self) -> bool:
        return self.active is self.compiled

    def _verify(self, *args, **kwargs) -> None:
        """One compiled forward + backward whose every side effect is undone."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = [d for d in {p.device for p in params} if d.type == "cuda"]
        generators = [(g, g.get_state()) for g in [*args, *kwargs.values()] if isinstance(g, torch.Generator)]
        try:
            with torch.random.fork_rng(devices=devices):
                output_scalar(self.compiled(*args, **kwargs)).backward()
        finally:
            self._restore(params, grads, buffers, generators)

    @staticmethod
    def _restore(params, grads, buffers, generators) -> None:
        for g, state in generators:
            g.set_state(state)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g
            for b, saved in buffers:
                b.copy_(saved)

    def __call__(self, *args, **kwargs):
        if self.active is None:
            try:
                self._verify(*args, **kwargs)
                self.active = self.compiled
            except Exception as err:  # any compiler failure: the eager model is always correct
                self.error = describe_failure(err)
                self.log(
                    f"torch.compile failed, training continues without it (set train.compile=false to skip "
                    f"the attempt): {self.error}"
                )
                log.debug("torch.compile failure", exc_info=True)
                self.active = self.model
        return self.active(*args, **kwargs)


def compile_model(
    model: nn.Module,
    cfg: Config,
    device: torch.device | str,
    deepspeed: bool = False,
    log: Callable[[str], None] = print,
    backend: str | Callable = "inductor",
) -> Callable:
    """``model`` itself when compilation is off, else a ``CompiledStep`` over
    ``torch.compile(model, mode=train.compile_mode, backend=backend)``."""
    if not compile_enabled(cfg, device, deepspeed):
        return model
    if deepspeed:
        log("train.compile: not applied under DeepSpeed (its engine wraps the model); training uncompiled")
        return model
    mode = cfg.train.compile_mode
    if mode not in MODES:
        raise ValueError(f"train.compile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    compiled = torch.compile(model, backend=backend, mode=None if mode == "default" else mode)
    name = getattr(backend, "__name__", backend)
    log(f"train.compile: torch.compile(mode={mode}, backend={name}), verified on the first batch")
    return CompiledStep(model, compiled, log)
