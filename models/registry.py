"""Named ViT sizes: the only place widths, depths and head counts are written down.

The standard sizes follow timm's ViT (``vit_tiny`` ... ``vit_large``); ``micro`` is small enough
to train a few steps on a CPU in seconds (tests, smoke runs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


SIZES: dict[str, ViTSize] = {
    "micro": ViTSize(embed_dim=128, depth=4, num_heads=4),
    "tiny": ViTSize(embed_dim=192, depth=12, num_heads=3),
    "small": ViTSize(embed_dim=384, depth=12, num_heads=6),
    "base": ViTSize(embed_dim=768, depth=12, num_heads=12),
    "large": ViTSize(embed_dim=1024, depth=24, num_heads=16),
}


def get_size(name: str) -> ViTSize:
    if name not in SIZES:
        raise ValueError(f"model.size={name!r} is not one of {', '.join(SIZES)}")
    return SIZES[name]
