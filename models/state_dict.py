"""Parameter names as the model defines them, whatever wrapped it when the state dict was taken.

DDP and DataParallel put ``module.`` in front of every name; ``torch.compile`` puts
``_orig_mod.`` in front of the compiled module's names, which may be a submodule (so it can sit
anywhere in a name). This is the one place those prefixes are removed.
"""

from __future__ import annotations

import torch


def unwrap_name(name: str) -> str:
    """``name`` without leading ``module.`` and without any ``_orig_mod`` component."""
    parts = name.split(".")
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


def unwrap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every name passed through ``unwrap_name``; two names that become one
    are an error (the state dict mixed wrapped and unwrapped copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        plain = unwrap_name(name)
        if plain in out:
            raise ValueError(f"state dict holds {plain!r} twice (wrapped and unwrapped)")
        out[plain] = tensor
    return out
