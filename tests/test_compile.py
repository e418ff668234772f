"""train.compile: on by default only where a GPU is; a compiler failure falls back to eager with a
message; a working compile is verified without changing the step (random state, gradients)."""

from __future__ import annotations

import pytest
import torch
from test_models import tiny_batch, tiny_cfg

from avmae.engine.compile import CompiledStep, compile_enabled, compile_model
from avmae.models import build_pretrain_model


def test_default_compiles_on_a_gpu_only():
    cfg = tiny_cfg()
    assert cfg.train.compile is None
    assert compile_enabled(cfg, "cuda") and not compile_enabled(cfg, "cpu")
    assert not compile_enabled(cfg, "cuda", deepspeed=True)
    assert compile_enabled(tiny_cfg("train.compile=true"), "cpu")
    assert not compile_enabled(tiny_cfg("train.compile=false"), "cuda")
    assert type(compile_model(torch.nn.Linear(2, 2), cfg, "cpu")) is torch.nn.Linear  # off: the model itself
    with pytest.raises(ValueError, match="compile_mode"):
        compile_model(torch.nn.Linear(2, 2), tiny_cfg("train.compile=true", "train.compile_mode=fastest"), "cpu")


def _broken_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found (simulated)")


def test_a_failing_compiler_falls_back_to_eager_with_a_message():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_cfg("train.compile=true"))
    messages = []
    step = compile_model(model, tiny_cfg("train.compile=true"), "cpu", log=messages.append, backend=_broken_backend)
    assert isinstance(step, CompiledStep)
    video, audio = tiny_batch()
    torch.manual_seed(5)
    out = step(video, audio, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    expected = model(video, audio, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out["loss"], expected["loss"]) and not step.is_compiled
    assert any("torch.compile failed, training continues without it" in m and "simulated" in m for m in messages)
    assert all(p.grad is None for p in model.parameters())  # the failed attempt left no gradient behind


def test_a_working_compile_is_verified_without_changing_the_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_cfg("train.compile=true"))
    step = compile_model(model, tiny_cfg("train.compile=true"), "cpu", log=lambda m: None, backend="eager")
    video, audio = tiny_batch()
    torch.manual_seed(5)  # the global generator draws the masks
    generator = torch.Generator().manual_seed(2)  # and a caller's generator is put back too
    out = step(video, audio, generator=generator)
    assert step.is_compiled and all(p.grad is None for p in model.parameters())
    torch.manual_seed(5)
    expected = model(video, audio, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out["loss"], expected["loss"])  # same masks: the check consumed no randomness
