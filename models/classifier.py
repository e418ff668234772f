"""Downstream model: the pretrained encoder plus one classification head per task.

``AVClassifier`` mean-pools each modality's encoded tokens, averages the modalities it uses
(``finetune.modalities``: audio | video | audiovisual), and applies per head a LayerNorm and a
Linear layer (two heads for EPIC-KITCHENS verb / noun).

``load_pretrained`` fills an ``AVClassifier`` or a bare ``AVEncoder`` from a pretraining state
dict and states exactly which keys it did not use or did not find; anything beyond the expected
(new heads missing; decoder, contrastive head and unused-modality keys unexpected) is an error.
Positional embeddings are not in state dicts: they are recomputed for the new geometry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from avmae.config import Config

from .encoder import AVEncoder
from .layers import MODALITIES, norm_layer
from .pretrain import build_encoder

_MODALITY_SETS = {"audio": ("audio",), "video": ("video",), "audiovisual": MODALITIES}


class AVClassifier(nn.Module):
    """Encoder + heads. ``forward(video=None, audio=None) -> {head: logits (B, K)}``.

    Only the modalities the classifier was built for are used; each must be given
    (an input for another modality is ignored, so a full batch can be passed as is).
    """

    def __init__(self, encoder: AVEncoder, heads: dict[str, int], drop_rate: float = 0.0, pool: str = "modalities") -> None:
        super().__init__()
        if pool not in ("modalities", "tokens"):
            raise ValueError(f"pool must be modalities or tokens, got {pool!r}")
        # modalities: each modality's mean token, averaged; tokens: the mean of all tokens
        # (CAV-MAE's CAVMAEFT, src/models/cav_mae.py), so each modality weighs by its token count
        self.pool = pool
        if not heads:
            raise ValueError("a classifier needs at least one head, e.g. {'label': 309}")
        self.encoder = encoder
        self.modalities = encoder.modalities
        dim = encoder.embed_dim
        self.heads = nn.ModuleDict(
            {name: nn.Sequential(norm_layer(dim), nn.Dropout(drop_rate), nn.Linear(dim, k)) for name, k in heads.items()}
        )
        for head in self.heads.values():
            # MAE finetuning: a near-zero head so the first steps do not disturb the encoder
            nn.init.trunc_normal_(head[-1].weight, std=2e-5)
            nn.init.zeros_(head[-1].bias)

    def forward_features(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled clip embedding ``(B, D)``: the mean over modalities of mean-pooled tokens."""
        given = {"video": video, "audio": audio}
        missing = [m for m in self.modalities if given[m] is None]
        if missing:
            raise ValueError(f"this classifier uses {'+'.join(self.modalities)} input; missing: {', '.join(missing)}")
        latent = self.encoder.forward_features(**{m: given[m] for m in self.modalities})
        if self.pool == "tokens":
            return torch.cat([latent[m] for m in self.modalities], dim=1).mean(dim=1)
        return torch.stack([latent[m].mean(dim=1) for m in self.modalities]).mean(dim=0)

    def forward(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pooled = self.forward_features(video=video, audio=audio)
        return {name: head(pooled) for name, head in self.heads.items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm layer groups: encoder embeddings, encoder blocks by depth, heads last (unmatched)."""
        return self.encoder.group_matcher(coarse, prefix="encoder.")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def build_classifier(cfg: Config, heads: dict[str, int]) -> AVClassifier:
    """Encoder of ``cfg.model`` for ``cfg.finetune.modalities`` at the geometry of ``cfg.data``."""
    encoder = build_encoder(cfg, _MODALITY_SETS[cfg.finetune.modalities])
    return AVClassifier(encoder, heads, pool=cfg.finetune.pool)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did. ``loaded`` and ``missing`` name keys of the model,
    ``unexpected`` keys of the checkpoint (after prefix clean-up)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not used

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing (newly initialised): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def _clean_key(key: str) -> str:
    """Drop DataParallel/DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` anywhere."""
    parts = key.split(".")
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


def _unused_modality_pattern(encoder: AVEncoder) -> re.Pattern | None:
    unused = [m for m in MODALITIES if m not in encoder.modalities]
    if not unused:
        return None
    names = "|".join(unused)
    return re.compile(
        rf"^encoder\.(patch_embed|pos_embed|modality_embed|cls_token|modality_blocks|norm"
        rf"|blocks\.\d+\.modality_norm[12])\.({names})(\.|$)"
    )


def load_pretrained(model: AVClassifier | AVEncoder, state_dict: dict[str, torch.Tensor]) -> LoadReport:
    """Load the encoder weights of a pretraining (``AVMAE``), classifier or encoder state dict.

    Raises ``ValueError`` naming the keys when encoder weights are missing, a key is unexpected
    beyond ``decoder.*``, ``contrastive.*`` and the encoder parts of a modality the model does not
    use, or a shape differs. Returns a ``LoadReport``.
    """
    is_encoder = isinstance(model, AVEncoder)
    encoder = model if is_encoder else model.encoder
    source = {_clean_key(k): v for k, v in state_dict.items()}
    # a bare encoder's state dict has no "encoder." prefix
    if not any(k.startswith("encoder.") for k in source):
        source = {f"encoder.{k}": v for k, v in source.items()}
    target = {("encoder." + k if is_encoder else k): v for k, v in model.state_dict().items()}

    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    unused_modality = _unused_modality_pattern(encoder)
    allowed_unexpected = re.compile(r"^(decoder|contrastive)\.")
    bad_missing = [k for k in missing if not k.startswith("heads.")]
    bad_unexpected = [
        k for k in unexpected
        if not allowed_unexpected.match(k) and not (unused_modality and unused_modality.match(k))
    ]
    shape_errors = [
        f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(source) & set(target))
        if source[k].shape != target[k].shape
    ]
    problems = []
    if bad_missing:
        problems.append(f"missing encoder keys: {', '.join(bad_missing)}")
    if bad_unexpected:
        problems.append(f"unexpected keys: {', '.join(bad_unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatches: {'; '.join(shape_errors)}")
    if problems:
        raise ValueError(
            "pretrained weights do not fit this model (different size, fusion or patching?): " + " | ".join(problems)
        )

    strip = len("encoder.") if is_encoder else 0
    usable = {k[strip:]: source[k] for k in target if k in source}
    model.load_state_dict(usable, strict=False)
    return LoadReport(
        loaded=sorted(k[strip:] for k in usable),
        missing=[k[strip:] for k in missing],
        unexpected=unexpected,
    )
