"""The files every on-disk format shares: safetensors weights written with the usual file mode,
state dicts read without unpickling code, run configs, and the plain weights of a training
checkpoint folder (docs/checkpoints.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from avmae.config import Config, config_from_dict
from avmae.models.state_dict import unwrap_state_dict

# The files of a training checkpoint that an export reads (the engine writes them; the final
# folder of a finetuning run holds the first two as well).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TRAINER_STATE_FILE = "trainer_state.json"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file``, with the file's mode following the umask as ``torch.save``'s
    and every other file's does (safetensors itself creates it readable by its owner only, which
    hides exports and checkpoints from colleagues on a shared cluster)."""
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return path


def plain_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wrapper prefixes removed (``avmae.models.unwrap_state_dict``); contiguous CPU copies
    (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap_state_dict(state_dict).items()}


def read_state_dict(
    path: str | Path,
    allowed_globals: tuple[type, ...] = (),
    wrappers: tuple[str, ...] = ("model", "state_dict"),
) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth``/``.bin`` file read with
    ``torch.load(weights_only=True)``. ``allowed_globals``: classes the restricted unpickler may
    also build (training checkpoints of other codebases store an ``argparse.Namespace``);
    ``wrappers``: keys under which a state dict is nested, opened as deep as they go; wrapper
    prefixes such as ``module.`` are removed. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            with torch.serialization.safe_globals(list(allowed_globals)):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects beyond tensors are refused, by design
            raise ValueError(
                f"{path}: not loadable with torch.load(weights_only=True): {err}. Re-save only its "
                "state dict (torch.save(ckpt['model'], ...)) or convert it to safetensors."
            ) from err
    else:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors, .pt, .pth, .bin)")
    while isinstance(state, dict):
        inner = next((state[k] for k in wrappers if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a mapping of names to tensors")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    try:
        return unwrap_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def read_config(path: str | Path) -> Config:
    """A run config from ``config.yaml`` (safe YAML) or an export's ``config.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot parse: {err}") from err
    if isinstance(raw, dict) and "config" in raw and "part" in raw:  # an export's config.json
        raw = raw["config"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(raw)
    except Exception as err:
        raise ValueError(f"{path}: not a valid avmae config: {err}") from err


def read_checkpoint(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """Weights and config of a pretraining checkpoint directory (``step_XXXXXXXX/``).

    The directory holds ``model.safetensors`` (or ``model.pt`` / ``model.pth``) and
    ``config.yaml``; nothing else is read.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    candidates = [checkpoint / name for name in (WEIGHTS_FILE, "model.pt", "model.pth")]
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{checkpoint}: no {WEIGHTS_FILE} (or model.pt / model.pth)")
    return read_state_dict(weights), read_config(checkpoint / CONFIG_FILE)
