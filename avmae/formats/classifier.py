"""Finetuned classifier folders: ``model.safetensors`` (the whole ``AVClassifier``) and
``config.yaml`` with the heads filled in, the input of ``tools/eval.py`` (docs/checkpoints.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from avmae.config import Config, load_config, save_config
from avmae.formats.weights import CONFIG_FILE, WEIGHTS_FILE, plain_state_dict, write_safetensors
from avmae.models import build_classifier


def save_finetuned(model: nn.Module | dict[str, torch.Tensor], cfg: Config, out_dir: str | Path) -> Path:
    """``model.safetensors`` and ``config.yaml`` of a finetuned classifier (the input of tools/eval.py),
    from the model or its state dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    metadata = {"format": "pt", "avmae_part": "classifier"}
    write_safetensors(plain_state_dict(state_dict), out_dir / WEIGHTS_FILE, metadata)
    save_config(cfg, out_dir / CONFIG_FILE)
    return out_dir


def load_finetuned(path: str | Path, overrides: list[str] | None = None) -> tuple[nn.Module, Config]:
    """A classifier saved by ``finetune`` and its config (``overrides`` applied, e.g. evaluation
    geometry); the weights must fit exactly."""
    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a finetuned model folder (no {name})")
    cfg = load_config(path / CONFIG_FILE, overrides)
    if not cfg.finetune.heads:
        raise ValueError(f"{path / CONFIG_FILE}: finetune.heads is empty; was it written by finetuning?")
    model = build_classifier(cfg, dict(cfg.finetune.heads))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return model.eval(), cfg

