"""avmae: self-supervised audiovisual pretraining (joint audio+video MAE, contrastive objectives).

What users call is listed in ``__all__`` and importable from here; each name is imported on first
use, so ``import avmae.config`` (every tool) does not pull in the models. The layout of the
package is in docs/architecture.md.
``avmae.load(folder).embed("clip.mp4")`` embeds a video with the preprocessing it was trained
with (``avmae.inference``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors and type checkers see; at run time ``__getattr__`` imports them
    from avmae.config import Config, load_config
    from avmae.engine import evaluate_finetuned, finetune, pretrain
    from avmae.formats import export, from_pretrained, load_finetuned, load_timm_audio_vit, timm_audio_vit
    from avmae.inference import load

# name -> the module that defines it
_SOURCES = {
    # configs
    "Config": "avmae.config",
    "load_config": "avmae.config",
    # export folders, finetuned classifiers, the timm audio ViT (docs/checkpoints.md)
    "export": "avmae.formats",
    "from_pretrained": "avmae.formats",
    "load_finetuned": "avmae.formats",
    "load_timm_audio_vit": "avmae.formats",
    "timm_audio_vit": "avmae.formats",
    # training and evaluation under accelerate (docs/pretraining.md)
    "pretrain": "avmae.engine",
    "finetune": "avmae.engine",
    "evaluate_finetuned": "avmae.engine",
    # embeddings, retrieval and predictions from a raw video (README, "Use a model")
    "load": "avmae.inference",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(_SOURCES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'avmae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
