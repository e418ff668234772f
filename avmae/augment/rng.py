"""Random draws from an explicit ``torch.Generator``.

Every augmentation draws through these, never from the global RNG, so an item's augmentation
depends only on its generator's seed: reproducible across worker counts and exact on resume.
"""

from __future__ import annotations

import math

import torch


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def log_uniform(generator: torch.Generator, low: float, high: float) -> float:
    """A draw whose logarithm is uniform: ratios r and 1/r are equally likely."""
    return math.exp(uniform(generator, math.log(low), math.log(high)))


def coin(generator: torch.Generator, probability: float) -> bool:
    """True with ``probability``; one draw whatever the probability (0 and 1 included)."""
    return torch.rand((), generator=generator).item() < probability


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]``, both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())
