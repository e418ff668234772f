"""Downstream model: the pretrained encoder plus one classification head per task.

``AVClassifier`` mean-pools each modality's encoded tokens, averages the modalities it uses
(``finetune.modalities``: audio | video | audiovisual; ``finetune.pool: tokens`` averages all
tokens instead, as CAV-MAE's finetuning model does), and applies per head a LayerNorm and a
Linear layer (two heads for EPIC-KITCHENS verb / noun).

``MBTClassifier`` is AV-MAE's finetuning model, MBT (attention bottlenecks, arXiv 2107.00135;
google-research/scenic ``projects/av_mae/mbt.py``): a separate block stack per modality, and from
layer ``fusion_layer`` on each modality's block also runs over a few shared bottleneck tokens,
whose outputs are averaged over the modalities; each modality's tokens are mean-pooled and
scored by one linear head shared by the modalities. Training returns each modality's logits (one
loss each, against its own mixed targets); evaluation returns their mean.

``load_pretrained`` fills an ``AVClassifier`` or a bare ``AVEncoder`` from a pretraining state
dict and states exactly which keys it did not use or did not find; anything beyond the expected
(new heads missing; decoder, contrastive head and unused-modality keys unexpected) is an error.
Fixed positional embeddings are not in state dicts: they are recomputed for the new geometry
(stored tables, ``model.learned_pos_embed``, load like other weights and are resampled; tables
learned from a checkpoint with fixed codes, ``finetune.learn_pos_embed``, start from that code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from avmae.config import HEAD_INITS, POOLS, Config, modality_set, replace

from .encoder import AVEncoder
from .layers import MODALITIES, norm_layer
from .pretrain import build_encoder
from .state_dict import unwrap_state_dict


class AVClassifier(nn.Module):
    """Encoder + heads. ``forward(video=None, audio=None) -> {head: logits (B, K)}``.

    Only the modalities the classifier was built for are used; each must be given
    (an input for another modality is ignored, so a full batch can be passed as is).
    """

    def __init__(
        self, encoder: AVEncoder, heads: dict[str, int], drop_rate: float = 0.0, pool: str = "modalities",
        final_norm_group: str = "last_block", head_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        # the layer-decay group of the encoder's final norm (``finetune.final_norm_group``)
        self.final_norm_group = final_norm_group
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        # modalities: each modality's mean token, averaged; tokens: the mean of all tokens
        # (CAV-MAE's CAVMAEFT, src/models/cav_mae.py), so each modality weighs by its token count
        self.pool = pool
        if not heads:
            raise ValueError("a classifier needs at least one head, e.g. {'label': 309}")
        self.encoder = encoder
        self.modalities = encoder.modalities
        dim = encoder.embed_dim
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(norm_layer(dim, eps=encoder.norm_eps), nn.Dropout(drop_rate), nn.Linear(dim, k))
                for name, k in heads.items()
            }
        )
        for head in self.heads.values():
            if head_init == "xavier":  # CAV-MAE's CAVMAEFT (src/models/cav_mae.py _init_weights)
                nn.init.xavier_uniform_(head[-1].weight)
            else:  # MAE finetuning: a near-zero head so the first steps do not disturb the encoder
                nn.init.trunc_normal_(head[-1].weight, std=2e-5)
            nn.init.zeros_(head[-1].bias)

    def forward_features(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled clip embedding ``(B, D)``: the mean over modalities of mean-pooled tokens
        (``pool="tokens"``: the mean of all tokens)."""
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
        """timm layer groups: encoder embeddings, encoder blocks by depth, heads last (unmatched);
        the encoder's final norm with the last block or with the heads (``final_norm_group``)."""
        return self.encoder.group_matcher(coarse, prefix="encoder.", final_norm=self.final_norm_group)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


class MBTClassifier(nn.Module):
    """Bottleneck fusion + mean-pooling heads. ``forward(video=None, audio=None)`` ->
    ``{head: logits (B, K)}`` in evaluation, ``{head: {modality: logits (B, K)}}`` in training.

    Args:
        encoder: an ``AVEncoder`` with ``late`` fusion (one block stack per modality).
        heads: head name -> number of classes.
        fusion_layer: index of the first block whose stacks exchange information through the
            bottleneck tokens (0 = from the start; ``depth`` = never).
        num_bottlenecks: bottleneck tokens.
        test_with_bottlenecks: keep the bottlenecks in evaluation (False: the stacks run apart).
        final_norm_group: the layer-decay group of the final norms: ``last_block`` or ``head``.
    """

    def __init__(
        self,
        encoder: AVEncoder,
        heads: dict[str, int],
        fusion_layer: int,
        num_bottlenecks: int = 4,
        test_with_bottlenecks: bool = True,
        final_norm_group: str = "last_block",
    ) -> None:
        super().__init__()
        self.final_norm_group = final_norm_group
        if encoder.fusion != "late":
            raise ValueError(f"MBT needs an encoder with one block stack per modality (late fusion), got {encoder.fusion!r}")
        if not 0 <= fusion_layer <= encoder.depth:
            raise ValueError(f"fusion_layer must be in [0, {encoder.depth}], got {fusion_layer}")
        if not heads:
            raise ValueError("a classifier needs at least one head, e.g. {'label': 309}")
        self.encoder = encoder
        self.modalities = encoder.modalities
        self.fusion_layer = fusion_layer
        self.test_with_bottlenecks = test_with_bottlenecks
        dim = encoder.embed_dim
        self.bottleneck = nn.Parameter(torch.zeros(1, num_bottlenecks, dim))
        nn.init.normal_(self.bottleneck, std=0.02)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, k) for name, k in heads.items()})
        for head in self.heads.values():  # zero-initialised, as MBT's output projection
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward_tokens(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encoded tokens ``{modality: (B, N_m, D)}`` after the final norms (bottlenecks dropped)."""
        given = {"video": video, "audio": audio}
        missing = [m for m in self.modalities if given[m] is None]
        if missing:
            raise ValueError(f"this classifier uses {'+'.join(self.modalities)} input; missing: {', '.join(missing)}")
        tokens = self.encoder.embed({m: given[m] for m in self.modalities})
        fuse = len(tokens) > 1 and (self.training or self.test_with_bottlenecks)
        batch = next(iter(tokens.values())).shape[0]
        bottleneck = self.bottleneck.expand(batch, -1, -1).to(next(iter(tokens.values())).dtype)
        count = bottleneck.shape[1]
        for i in range(self.encoder.depth):
            blocks = {m: self.encoder.modality_blocks[m][i] for m in tokens}
            if not fuse or i < self.fusion_layer:
                tokens = {m: blocks[m](x) for m, x in tokens.items()}
                continue
            outputs = {m: blocks[m](torch.cat([x, bottleneck], dim=1)) for m, x in tokens.items()}
            tokens = {m: out[:, :-count] for m, out in outputs.items()}
            bottleneck = torch.stack([out[:, -count:] for out in outputs.values()]).mean(dim=0)
        return {m: self.encoder.norm[m](x) for m, x in tokens.items()}

    def forward_features(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled clip embedding ``(B, D)``: the mean over modalities of mean-pooled tokens
        (``pool="tokens"``: the mean of all tokens)."""
        latent = self.forward_tokens(video=video, audio=audio)
        return torch.stack([x.mean(dim=1) for x in latent.values()]).mean(dim=0)

    def forward(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> dict:
        pooled = {m: x.mean(dim=1) for m, x in self.forward_tokens(video=video, audio=audio).items()}
        logits = {name: {m: head(x) for m, x in pooled.items()} for name, head in self.heads.items()}
        if self.training:
            return logits
        return {name: torch.stack(list(per.values())).mean(dim=0) for name, per in logits.items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"bottleneck"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm layer groups: as the encoder's; the bottleneck and heads last (unmatched), the
        final norms with them or with the last blocks (``final_norm_group``)."""
        return self.encoder.group_matcher(coarse, prefix="encoder.", final_norm=self.final_norm_group)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError("MBTClassifier runs its blocks one by one and has no gradient checkpointing")


def build_classifier(cfg: Config, heads: dict[str, int]) -> AVClassifier | MBTClassifier:
    """Encoder of ``cfg.model`` for ``cfg.finetune.modalities`` at the geometry of ``cfg.data``;
    ``finetune.fusion: bottleneck`` gives an ``MBTClassifier`` (its encoder has one stack per
    modality whatever ``model.fusion`` says; ``load_pretrained`` copies joint pretrained blocks
    into every stack). ``finetune.learn_pos_embed`` turns fixed positional codes into tables
    (``model.learned_pos_embed``) that start from the same code."""
    ft = cfg.finetune
    if ft.learn_pos_embed and not cfg.model.learned_pos_embed:
        cfg = replace(cfg, model=replace(cfg.model, learned_pos_embed=True, pos_grid_video=(0, 0, 0), pos_grid_audio=(0, 0)))
    if ft.fusion == "bottleneck":
        if cfg.model.cls_token or cfg.model.joint_norms != "shared":
            raise ValueError(
                "finetune.fusion=bottleneck (MBT) needs an encoder without class tokens and with shared joint "
                f"norms; model.cls_token={cfg.model.cls_token}, model.joint_norms={cfg.model.joint_norms!r}"
            )
        separate = replace(cfg, model=replace(cfg.model, fusion="late", stack_norms=False))
        encoder = build_encoder(separate, modality_set(ft.modalities))
        return MBTClassifier(
            encoder, heads, ft.fusion_layer, ft.bottlenecks, ft.test_with_bottlenecks, ft.final_norm_group
        )
    encoder = build_encoder(cfg, modality_set(ft.modalities))
    return AVClassifier(encoder, heads, pool=ft.pool, final_norm_group=ft.final_norm_group, head_init=ft.head_init)


def separate_stacks(state_dict: dict[str, torch.Tensor], modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """An encoder state dict (keys ``encoder.*``) with one block stack per modality, from any fusion.

    Joint block ``j`` (``encoder.blocks.j``, after ``n`` per-modality blocks) is copied into every
    modality's stack as block ``n + j``; a final LayerNorm shared by the modalities becomes each
    modality's; the norms between per-modality and joint blocks (``stack_norm``) are dropped. This
    is how AV-MAE starts MBT from a ``separate_encoders_and_concat`` model (scenic
    ``projects/av_mae/mbt.py``, ``initialise_from_mid_fusion``).
    """
    indices = [int(k.split(".")[3]) for k in state_dict if k.startswith("encoder.modality_blocks.")]
    first_joint = max(indices) + 1 if indices else 0
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("encoder.blocks."):
            rest = ".".join(parts[3:])
            for m in modalities:
                out[f"encoder.modality_blocks.{m}.{first_joint + int(parts[2])}.{rest}"] = value
        elif key.startswith("encoder.norm.") and parts[2] not in MODALITIES:
            for m in modalities:
                out[f"encoder.norm.{m}.{parts[2]}"] = value
        elif not key.startswith("encoder.stack_norm."):
            out[key] = value
    return out


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
            lines.append(f"newly initialised: {_by_prefix(self.missing)}")
        if self.unexpected:
            lines.append(f"in the checkpoint, not used by this model: {_by_prefix(self.unexpected)}")
        return "\n".join(lines)


def _by_prefix(keys: list[str]) -> str:
    """``decoder (60 tensors), contrastive (4 tensors)``: key names grouped by their first part
    (the first two under ``encoder.``), where a list of every name would fill the screen."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        prefix = ".".join(parts[:2] if parts[0] == "encoder" and len(parts) > 2 else parts[:1])
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{prefix} ({count} tensor{'s' if count > 1 else ''})" for prefix, count in groups.items())


def _unused_modality_pattern(encoder: AVEncoder) -> re.Pattern | None:
    unused = [m for m in MODALITIES if m not in encoder.modalities]
    if not unused:
        return None
    names = "|".join(unused)
    return re.compile(
        rf"^encoder\.(patch_embed|pos_embed|modality_embed|cls_token|modality_blocks|norm|stack_norm"
        rf"|blocks\.\d+\.modality_norm[12])\.({names})(\.|$)"
    )


def load_pretrained(
    model: AVClassifier | AVEncoder, state_dict: dict[str, torch.Tensor], keep_init: tuple[str, ...] = ()
) -> LoadReport:
    """Load the encoder weights of a pretraining (``AVMAE``), classifier or encoder state dict.

    Model keys that start with one of ``keep_init`` (e.g. ``"encoder.norm."``) are not loaded:
    they keep their initialisation and are reported as missing.
    Raises ``ValueError`` naming the keys when encoder weights are missing, a key is unexpected
    beyond ``decoder.*``, ``contrastive.*`` and the encoder parts of a modality the model does not
    use, or a shape differs. Returns a ``LoadReport``.
    """
    is_encoder = isinstance(model, AVEncoder)
    encoder = model if is_encoder else model.encoder
    source = unwrap_state_dict(state_dict)
    # a bare encoder's state dict has no "encoder." prefix
    if not any(k.startswith("encoder.") for k in source):
        source = {f"encoder.{k}": v for k, v in source.items()}
    if isinstance(model, MBTClassifier):
        source = separate_stacks(source, MODALITIES)
    target = {("encoder." + k if is_encoder else k): v for k, v in model.state_dict().items()}
    kept = {k for k in target if keep_init and k.startswith(tuple(keep_init))}
    source = {k: v for k, v in source.items() if k not in kept}

    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    unused_modality = _unused_modality_pattern(encoder)
    allowed_unexpected = re.compile(r"^(decoder|contrastive)\.")
    # a checkpoint with fixed positional codes (no stored tables) starts learned tables
    # (finetune.learn_pos_embed) from the same code, which they were built with
    fixed_codes = not any(k.startswith("encoder.pos_embed.") for k in source)
    bad_missing = [
        k for k in missing
        if not k.startswith(("heads.", "bottleneck")) and k not in kept
        and not (fixed_codes and re.match(r"^encoder\.pos_embed\.\w+\.table$", k))
    ]
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
