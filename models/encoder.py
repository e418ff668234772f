"""The audiovisual ViT encoder and its fusion variants (the AV-MAE design space).

One ``AVEncoder`` covers early, mid, shared and late fusion: a modality stage of per-modality
(or shared) blocks, then a joint stage over the concatenated tokens, plus the options other MAE
codebases' layouts need so that their checkpoints convert onto it (stored positional tables, a
class token, CAV-MAE's per-modality joint norms, no final norm). docs/architecture.md, "Encoder,
positions, classifiers", says what each option builds.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from avmae.config import FINAL_NORM_GROUPS, FUSIONS, JOINT_NORMS

from .layers import (
    MODALITIES,
    AudioPatchEmbed,
    VideoPatchEmbed,
    init_weights,
    NORM_EPS,
    make_blocks,
    norm_layer,
    run_blocks,
)
from .pos_embed import LearnedPosEmbed, SinCosPosEmbed

class ModalityNormBlock(Block):
    """A timm ViT block with extra LayerNorms per modality (CAV-MAE's joint layer).

    ``forward(x)`` uses ``norm1``/``norm2`` (the joint sequence); ``forward(x, modality)`` the same
    attention and MLP weights behind ``modality_norm1[modality]``/``modality_norm2[modality]``.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, modalities: tuple[str, ...], drop_path: float = 0.0,
        norm_eps: float = NORM_EPS,
    ) -> None:
        norm = partial(norm_layer, eps=norm_eps)
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=norm)
        self.attn.fused_attn = True  # as make_blocks
        self.modality_norm1 = nn.ModuleDict({m: norm(dim) for m in modalities})
        self.modality_norm2 = nn.ModuleDict({m: norm(dim) for m in modalities})

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        if modality is None:
            return super().forward(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.modality_norm1[modality](x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.modality_norm2[modality](x))))


class AVEncoder(nn.Module):
    """Audiovisual ViT encoder.

    Args:
        embed_dim, depth, num_heads, mlp_ratio: transformer size (see ``registry.SIZES``).
        fusion: early | late | shared | mid.
        fusion_layers: joint blocks at the top of a ``mid`` encoder (the rest are per modality).
        patch_size: spatial video patch and square fbank patch.
        tubelet: frames per video token.
        video_grid, audio_grid: token grids of the configured input geometry, ``(T', H', W')``
            and ``(T', F')``; they only pre-compute the positional embeddings.
        modalities: which modalities this encoder has tokenizers and blocks for.
        modality_embed: add a learnable embedding per modality to its tokens.
        drop_path: stochastic depth rate, rising linearly with depth.
        pos_embed: ``grid`` (separable sin-cos of the token grid), ``2d`` (MAE's 2-D sin-cos of one
            image: CAV-MAE's frame and fbank) or ``1d`` (sin-cos of the token sequence, AV-MAE's
            ``sinusoidal_1d``); see ``pos_embed.py``.
        stack_norms: mid fusion only; see docs/architecture.md, "Encoder, positions, classifiers".
        learned_pos: a stored (learned) positional table per modality instead of the fixed code
            (``pos_embed`` is then the code it starts from).
        pos_grids: the grids of the learned tables (default: ``video_grid``/``audio_grid``).
        cls_token: a learned class token per modality (dropped from the outputs).
        joint_norms: ``shared`` or ``per_modality`` LayerNorms in the joint blocks (CAV-MAE).
        final_norm: a LayerNorm after the last block (per modality; one shared with ``stack_norms``).
        norm_eps: the eps of every LayerNorm (``model.norm_eps``).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        fusion: str = "mid",
        fusion_layers: int = 1,
        patch_size: int = 16,
        tubelet: int = 2,
        video_grid: tuple[int, int, int] = (8, 14, 14),
        audio_grid: tuple[int, int] = (64, 8),
        modalities: tuple[str, ...] = MODALITIES,
        modality_embed: bool = True,
        drop_path: float = 0.0,
        pos_embed: str = "grid",
        stack_norms: bool = False,
        learned_pos: bool = False,
        pos_grids: dict[str, tuple[int, ...]] | None = None,
        cls_token: bool = False,
        joint_norms: str = "shared",
        final_norm: bool = True,
        norm_eps: float = NORM_EPS,
    ) -> None:
        super().__init__()
        if joint_norms not in JOINT_NORMS:
            raise ValueError(f"joint_norms must be one of {', '.join(JOINT_NORMS)}, got {joint_norms!r}")
        if stack_norms and joint_norms == "per_modality":
            raise ValueError("stack_norms (AV-MAE's final norms) and joint_norms=per_modality (CAV-MAE's) exclude each other")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if fusion == "mid" and not 0 < fusion_layers < depth:
            raise ValueError(f"mid fusion needs 0 < fusion_layers < depth ({depth}), got {fusion_layers}")
        if stack_norms and fusion != "mid":
            raise ValueError(f"stack_norms applies to mid fusion, not {fusion!r}")
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.embed_dim = embed_dim
        self.depth = depth
        self.norm_eps = norm_eps
        norm = partial(norm_layer, eps=norm_eps)
        self.fusion = fusion
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.grad_checkpointing = False

        tokenizers = {"video": VideoPatchEmbed(embed_dim, patch_size, tubelet), "audio": AudioPatchEmbed(embed_dim, patch_size)}
        grids = {"video": video_grid, "audio": audio_grid}
        self.patch_embed = nn.ModuleDict({m: tokenizers[m] for m in self.modalities})
        if learned_pos:
            grids = {**grids, **{m: tuple(g) for m, g in (pos_grids or {}).items() if g and any(g)}}
            self.pos_embed = nn.ModuleDict({m: LearnedPosEmbed(m, embed_dim, grids[m], pos_embed) for m in self.modalities})
        else:
            self.pos_embed = nn.ModuleDict({m: SinCosPosEmbed(m, embed_dim, grids[m], pos_embed) for m in self.modalities})
        self.cls_token = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, embed_dim)) for m in self.modalities})
            if cls_token
            else None
        )
        self.modality_embed = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, embed_dim)) for m in self.modalities})
            if modality_embed
            else None
        )

        num_joint = {"early": depth, "mid": fusion_layers, "late": 0, "shared": depth}[fusion]
        num_modality = {"early": 0, "mid": depth - fusion_layers, "late": depth, "shared": 0}[fusion]
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # as torch.linspace
        self.modality_blocks = nn.ModuleDict(
            {m: make_blocks(num_modality, embed_dim, num_heads, mlp_ratio, rates, norm_eps) for m in self.modalities}
            if num_modality
            else {}
        )
        self.joint_norms = joint_norms
        if joint_norms == "per_modality" and fusion in ("early", "mid"):
            self.blocks = nn.ModuleList(
                ModalityNormBlock(embed_dim, num_heads, mlp_ratio, self.modalities, rate, norm_eps)
                for rate in rates[num_modality:]
            )
            self.joint_norm = norm(embed_dim) if final_norm else nn.Identity()
        else:
            if joint_norms == "per_modality":
                raise ValueError(f"joint_norms=per_modality needs early or mid fusion, got {fusion!r}")
            self.blocks = make_blocks(num_joint, embed_dim, num_heads, mlp_ratio, rates[num_modality:], norm_eps)
            self.joint_norm = None

        def final() -> nn.Module:  # final_norm=False: no LayerNorm after the last block
            return norm(embed_dim) if final_norm else nn.Identity()

        self.stack_norms = stack_norms
        if stack_norms:
            self.stack_norm = nn.ModuleDict({m: norm(embed_dim) for m in self.modalities})
            self.norm = final()
        else:
            self.norm = nn.ModuleDict({m: final() for m in self.modalities})

        self.apply(init_weights)
        for params in (self.modality_embed, self.cls_token):
            for param in (params or {}).values():
                nn.init.normal_(param, std=0.02)

    @property
    def cross_modal(self) -> bool:
        """Whether tokens of one modality attend to the other's (early and mid fusion)."""
        return self.fusion in ("early", "mid")

    def grid(self, modality: str, x: torch.Tensor) -> tuple[int, ...]:
        return self.patch_embed[modality].grid(x.shape)

    def embed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw inputs -> tokens ``(B, N_m, D)`` with positional (and modality) embeddings."""
        tokens = {}
        for modality, x in inputs.items():
            if modality not in self.patch_embed:
                raise ValueError(f"this encoder has no {modality} tokenizer (built for {self.modalities})")
            t = self.patch_embed[modality](x)
            # the sine-cosine table is a buffer, which DeepSpeed's bf16/fp16 modes leave in fp32
            t = t + self.pos_embed[modality](self.grid(modality, x)).to(t.dtype)
            if self.modality_embed is not None:
                t = t + self.modality_embed[modality]
            tokens[modality] = t
        return tokens

    def forward_modality_stage(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-modality blocks (late/mid), or the shared stack run per modality (shared).
        With ``cls_token`` each modality's class token is prepended first."""
        if self.cls_token is not None:
            tokens = {
                m: torch.cat([self.cls_token[m].expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
                for m, x in tokens.items()
            }
        if self.fusion == "shared":
            return {m: run_blocks(self.blocks, x, self.grad_checkpointing) for m, x in tokens.items()}
        if self.modality_blocks:
            out = {m: run_blocks(self.modality_blocks[m], x, self.grad_checkpointing) for m, x in tokens.items()}
            return {m: self.stack_norm[m](x) for m, x in out.items()} if self.stack_norms else out
        return dict(tokens)

    def _run_joint(self, x: torch.Tensor, modality: str | None) -> torch.Tensor:
        if self.joint_norm is None:
            return run_blocks(self.blocks, x, self.grad_checkpointing)
        for block in self.blocks:  # per-modality norms: the modality is an argument
            x = block(x, modality)
        return x

    def forward_joint_stage(self, tokens: dict[str, torch.Tensor], isolate: bool = False) -> dict[str, torch.Tensor]:
        """Joint blocks over the concatenated tokens (early/mid), then the final norms; class
        tokens (``cls_token``) are dropped from the outputs."""
        normed = None
        if self.cross_modal:
            if isolate or len(tokens) == 1:
                tokens = {m: self._run_joint(x, m) for m, x in tokens.items()}
            else:
                names = list(tokens)
                joint = self._run_joint(torch.cat([tokens[m] for m in names], dim=1), None)
                if self.joint_norm is not None:
                    joint = self.joint_norm(joint)
                tokens = dict(zip(names, joint.split([tokens[m].shape[1] for m in names], dim=1)))
                normed = tokens if self.joint_norm is not None else None
        if normed is None:
            normed = {m: (self.norm(x) if self.stack_norms else self.norm[m](x)) for m, x in tokens.items()}
        if self.cls_token is not None:
            normed = {m: x[:, 1:] for m, x in normed.items()}
        return normed

    def forward_tokens(self, tokens: dict[str, torch.Tensor], isolate: bool = False) -> dict[str, torch.Tensor]:
        """Embedded tokens (all, or the visible subset) -> encoded tokens, same shapes."""
        return self.forward_joint_stage(self.forward_modality_stage(tokens), isolate)

    def forward_features(
        self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Unmasked encoding for downstream use: ``{"video": (B, N_v, D), "audio": (B, N_a, D)}``
        for whichever of ``video (B, C, T, H, W)`` and ``audio (B, 1, T_a, F)`` were given."""
        inputs = {m: x for m, x in (("video", video), ("audio", audio)) if x is not None}
        if not inputs:
            raise ValueError("forward_features needs video, audio or both")
        return self.forward_tokens(self.embed(inputs))

    def forward(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.forward_features(video=video, audio=audio)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {
            name for name, _ in self.named_parameters() if name.startswith(("modality_embed.", "cls_token.", "pos_embed."))
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, prefix: str = "", final_norm: str = "last_block") -> dict:
        """timm's layer grouping: embeddings, then blocks by depth (per-modality blocks of the
        same index share a group), then the final norms with the last block (``final_norm=
        "head"``: left unmatched, so with whatever follows the encoder, e.g. the heads)."""
        if final_norm not in FINAL_NORM_GROUPS:
            raise ValueError(f"final_norm must be one of {', '.join(FINAL_NORM_GROUPS)}, got {final_norm!r}")
        p = prefix.replace(".", r"\.")
        blocks = [(rf"^{p}blocks\.(\d+)", None)]
        if final_norm == "last_block":
            blocks.append((rf"^{p}(?:norm|joint_norm)\.", (99999,)))
        return dict(
            stem=rf"^{p}(?:patch_embed|pos_embed|modality_embed|cls_token)",
            modality_blocks=[(rf"^{p}modality_blocks\.\w+\.(\d+)", None), (rf"^{p}stack_norm\.", (99998,))],
            blocks=blocks,
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
