"""The common form every source checkpoint is read into (``Source``, one ``Branch`` per modality),
and the bookkeeping that accounts for every key of the file (``SourceKeys``). docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avmae.formats import read_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ConversionError(ValueError):
    """A source checkpoint that does not fit the converter: the message names every key."""


def read_source(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a source checkpoint, read by ``avmae.formats.read_state_dict``: safetensors,
    or ``torch.load(weights_only=True)`` that may also build the ``argparse.Namespace`` the source
    codebases' training checkpoints store (no arbitrary code); ``model`` / ``state_dict`` /
    ``module`` wrappers opened, ``module.`` prefixes removed."""
    try:
        state = read_state_dict(path, allowed_globals=(argparse.Namespace,), wrappers=("model", "state_dict", "module"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint not found: {path}") from err
    except ValueError as err:
        raise ConversionError(str(err)) from err
    if not state:
        raise ConversionError(f"{path}: expected a mapping of parameter names to tensors")
    return state


class SourceKeys:
    """The source state dict, with bookkeeping: every key is taken, dropped with a reason, or
    reported; ``finish`` raises one error naming all missing, mis-shaped and unexpected keys."""

    def __init__(self, state: dict[str, torch.Tensor], origin: str) -> None:
        self.state = state
        self.origin = origin
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shape: list[str] = []
        self.dropped: dict[str, str] = {}

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.state:
            self.missing.append(key)
            return torch.zeros(shape or ())
        value = self.state[key]
        self.used.add(key)
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.bad_shape.append(f"{key}: {tuple(value.shape)}, expected {tuple(shape)}")
        return value.float()

    def drop(self, pattern: str, reason: str) -> None:
        """Drop every not yet used key matching ``pattern`` (a regex), recording ``reason``."""
        regex = re.compile(pattern)
        names = sorted(k for k in self.state if regex.match(k) and k not in self.used)
        if names:
            self.dropped[pattern] = f"{reason} ({len(names)} tensors)"
            self.used.update(names)

    def finish(self) -> None:
        unexpected = sorted(set(self.state) - self.used)
        problems = []
        if self.missing:
            problems.append(f"missing keys: {', '.join(self.missing)}")
        if self.bad_shape:
            problems.append(f"mis-shaped keys: {'; '.join(self.bad_shape)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        if problems:
            raise ConversionError(f"{self.origin}: " + " | ".join(problems))


@dataclass
class Branch:
    """One modality of a source network, in avmae's token order.

    ``patch_weight``: Conv3d ``(D, 3, u, p, p)`` for video, Conv2d ``(D, 1, p, p)`` over the
    time-first fbank for audio. ``pos``: ``(1, N, D)`` for ``grid``. ``cls``: ``(1, 1, D)`` with its
    positional embedding folded in, or None. ``blocks``: timm ``Block`` state dicts, all layers this
    modality passes (CAV-MAE: the joint layer with this modality's norms). ``norm``: the final norm.
    """

    patch_weight: torch.Tensor
    patch_bias: torch.Tensor
    pos: torch.Tensor
    grid: tuple[int, ...]
    blocks: list[dict[str, torch.Tensor]]
    norm: dict[str, torch.Tensor] | None
    cls: torch.Tensor | None = None
    modality_embed: torch.Tensor | None = None


@dataclass
class Source:
    kind: str  # one of SOURCES
    finetuned: bool
    embed_dim: int
    branches: dict[str, Branch]
    # CAV-MAE: the joint layers with their joint-sequence norms, and the joint final norm
    joint_blocks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    joint_norm: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None  # "norm.weight", "norm.bias", "linear.weight", "linear.bias"
    notes: dict = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(next(iter(self.branches.values())).blocks)


BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)


def block_shapes(dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,),
    }


def count_blocks(keys: SourceKeys, prefix: str) -> int:
    regex = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for k in keys.state if (m := regex.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        raise ConversionError(f"{keys.origin}: blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def mlp_width(keys: SourceKeys, prefix: str) -> int:
    weight = keys.state.get(f"{prefix}0.mlp.fc1.weight")
    if weight is None:
        raise ConversionError(f"{keys.origin}: no {prefix}0.mlp.fc1.weight to read the MLP width from")
    return weight.shape[0]


def timm_blocks(keys: SourceKeys, prefix: str, count: int, dim: int, videomae: bool = False) -> list[dict]:
    """``count`` timm-layout blocks under ``prefix`` (VideoMAE: ``q_bias``/``v_bias`` -> ``qkv.bias``
    with a zero key bias, which is what its attention computes)."""
    hidden = mlp_width(keys, prefix)
    shapes = block_shapes(dim, hidden)
    blocks = []
    for i in range(count):
        block = {}
        for name in BLOCK_KEYS:
            if videomae and name == "attn.qkv.bias":
                q = keys.take(f"{prefix}{i}.attn.q_bias", (dim,))
                v = keys.take(f"{prefix}{i}.attn.v_bias", (dim,))
                block[name] = torch.cat([q, torch.zeros_like(q), v])
                continue
            block[name] = keys.take(f"{prefix}{i}.{name}", shapes[name])
        if videomae and (keys.has(f"{prefix}{i}.gamma_1") or keys.has(f"{prefix}{i}.gamma_2")):
            raise ConversionError(
                f"{keys.origin}: {prefix}{i}.gamma_1/gamma_2 (layer scale, init_values > 0) are not supported"
            )
        blocks.append(block)
    return blocks


def take_norm(keys: SourceKeys, prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {"weight": keys.take(f"{prefix}.weight", (dim,)), "bias": keys.take(f"{prefix}.bias", (dim,))}


def take_head(keys: SourceKeys, norm_prefix: str, linear_prefix: str, dim: int) -> dict[str, torch.Tensor]:
    num_classes = keys.state[f"{linear_prefix}.weight"].shape[0]
    norm = take_norm(keys, norm_prefix, dim)
    return {
        "norm.weight": norm["weight"], "norm.bias": norm["bias"],
        "linear.weight": keys.take(f"{linear_prefix}.weight", (num_classes, dim)),
        "linear.bias": keys.take(f"{linear_prefix}.bias", (num_classes,)),
    }
