"""Where a training step's time goes: a ``torch.profiler`` breakdown by kind of work.

``profile_train_step(cfg, device, variant)`` builds the variant as ``measure_train_step`` does,
warms it up, then records ``steps`` steps. Every profiled op's *self* time (device time on CUDA,
CPU time on the CPU; self, so a ``linear`` is not counted again in the ``addmm`` it calls) goes to
one category (``CATEGORIES``): ops inside the ``optimizer.step`` range are ``optimizer``;
otherwise the op's name decides (``categorize``). The record lists milliseconds per step and
shares per category, the heaviest ops, and which scaled-dot-product-attention kernels ran
(``aten::_scaled_dot_product_flash_attention``, ``..._efficient_attention``,
``..._cudnn_attention``, the math fallback), or that none did (the reference's explicit matmuls).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from avmae.config import Config

from .machine import environment, finish, synchronize
from .train_step import SPECS, build_variant, check_variants, synthetic_inputs

CATEGORIES = ("matmul", "attention", "elementwise", "optimizer", "copies", "other")
OPTIMIZER_RANGE = "avmae::optimizer_step"
_PATTERNS = (
    ("attention", r"scaled_dot_product|flash|fmha|efficient_attention|cudnn_attention|softmax"),
    ("matmul", r"(^|::)(mm|addmm|bmm|baddbmm|matmul|linear|_?convolution(_backward)?|conv\dd|mkldnn_convolution|"
     r"mkldnn_matmul)$|gemm|cutlass|cublas|xmma|sm\d+_|extern_kernels"),
    ("copies", r"copy|clone|contiguous|\bcat\b|_to_copy|gather|index|scatter|stack|memcpy|memset|pad|\bto\b|"
     r"expand|repeat|permute|transpose|reshape|view|narrow|slice|select|unbind|split|as_strided"),
    ("elementwise", r"add|mul|div|sub|gelu|norm|pow|mean|sum|sqrt|exp|var|neg|fill|zero|where|sigmoid|clamp|"
     r"mse|silu|dropout|abs|lerp|addc|max|min|rand|bernoulli|erf|log|triton_|fused|argsort|sort|ones|arange|"
     r"eq|ne\b|lt|gt|ge|le|bitwise|masked|rsub|reciprocal|native_"),
)  # fmt: skip
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable",
)  # fmt: skip


def categorize(name: str) -> str:
    """The category of an op or kernel named ``name`` (outside the optimizer range)."""
    lowered = name.lower()
    for category, pattern in _PATTERNS:
        if re.search(pattern, lowered):
            return category
    return "other"


def _in_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == OPTIMIZER_RANGE:
            return True
        parent = parent.cpu_parent
    return False


class _AnnotatedOptimizer:
    """Wraps an optimizer so that its ``step`` shows as one profiler range."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        with record_function(OPTIMIZER_RANGE):
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def profile_train_step(cfg: Config, device: torch.device, variant: str = "avmae", warmup: int = 2, steps: int = 3,
                       top: int = 12) -> dict:  # fmt: skip
    """Profile ``steps`` training steps of ``variant`` at ``data.batch_size`` (see the module doc)."""
    check_variants(cfg, [variant])
    env = environment(device, torch.get_num_threads())
    built = build_variant(cfg, variant, device)
    built.optimizer = _AnnotatedOptimizer(built.optimizer)
    video, audio = synthetic_inputs(cfg, cfg.data.batch_size, device)
    for _ in range(warmup):
        built.step(video, audio)
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            built.step(video, audio)
        synchronize(device)

    per_category: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    kernels: Counter = Counter()
    for event in prof.events():
        base = event.name.split("::")[-1]
        if base in ATTENTION_KERNELS:
            kernels[base] += 1
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us <= 0 or event.name == OPTIMIZER_RANGE:
            continue
        category = "optimizer" if _in_optimizer(event) else categorize(event.name)
        per_category[category] += self_us / 1000 / steps
        per_op[f"{event.name} [{category}]"] += self_us / 1000 / steps
    total = sum(per_category.values())
    heaviest = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "kind": "profile",
        **finish(env),
        "variant": variant,
        "description": SPECS[variant].description,
        "model_size": cfg.model.size,
        "batch_size": cfg.data.batch_size,
        "precision": cfg.train.mixed_precision,
        "time_base": "self device (CUDA kernel) time" if cuda else "self CPU time",
        "profiled_steps": steps,
        "ms_per_step": {c: per_category.get(c, 0.0) for c in CATEGORIES},
        "share": {c: per_category.get(c, 0.0) / total if total else 0.0 for c in CATEGORIES},
        "total_ms_per_step": total,
        "top_ops_ms_per_step": dict(heaviest),
        "attention_kernels": dict(kernels) or {"none (explicit matmul + softmax)": 0},
    }
