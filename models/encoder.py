"""The audiovisual ViT encoder and its fusion variants (the AV-MAE design space).

A forward pass has two stages:
1. the *modality stage* runs each modality's tokens on its own:
   ``late`` and ``mid`` through per-modality blocks (``modality_blocks.video/audio``), ``shared``
   through the one shared stack (``blocks``), ``early`` not at all;
2. the *joint stage* runs ``blocks`` over the concatenation of all modalities' tokens
   (``early``: all ``depth`` blocks; ``mid``: the top ``fusion_layers`` blocks), then applies
   each modality's final LayerNorm.

``stack_norms=True`` (mid fusion) builds the encoder as AV-MAE's ``separate_encoders_and_concat``
does, from complete encoders: each modality's stack ends in its own LayerNorm before the joint
blocks, and the joint stack ends in one LayerNorm shared by the modalities (instead of one final
LayerNorm per modality after the joint blocks).

``isolate=True`` runs the joint stage per modality instead of over the concatenation: no token
attends across modalities. CAV-MAE does this for its contrastive branch, whose audio and video
embeddings would otherwise already have seen each other.

The encoder only ever processes the tokens it is given: the pretraining module hands it the
visible tokens, ``forward_features`` all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from avmae.config import FUSIONS

from .layers import (
    MODALITIES,
    AudioPatchEmbed,
    VideoPatchEmbed,
    init_weights,
    make_blocks,
    norm_layer,
    run_blocks,
)
from .pos_embed import SinCosPosEmbed



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
        pos_embed: ``grid`` (separable sin-cos of the token grid) or ``1d`` (sin-cos of the token
            sequence, AV-MAE's ``sinusoidal_1d``); see ``pos_embed.py``.
        stack_norms: mid fusion only; see the module docstring.
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
    ) -> None:
        super().__init__()
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
        self.fusion = fusion
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.grad_checkpointing = False

        tokenizers = {"video": VideoPatchEmbed(embed_dim, patch_size, tubelet), "audio": AudioPatchEmbed(embed_dim, patch_size)}
        grids = {"video": video_grid, "audio": audio_grid}
        self.patch_embed = nn.ModuleDict({m: tokenizers[m] for m in self.modalities})
        self.pos_embed = nn.ModuleDict({m: SinCosPosEmbed(m, embed_dim, grids[m], pos_embed) for m in self.modalities})
        self.modality_embed = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, embed_dim)) for m in self.modalities})
            if modality_embed
            else None
        )

        num_joint = {"early": depth, "mid": fusion_layers, "late": 0, "shared": depth}[fusion]
        num_modality = {"early": 0, "mid": depth - fusion_layers, "late": depth, "shared": 0}[fusion]
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # as torch.linspace
        self.modality_blocks = nn.ModuleDict(
            {m: make_blocks(num_modality, embed_dim, num_heads, mlp_ratio, rates) for m in self.modalities}
            if num_modality
            else {}
        )
        self.blocks = make_blocks(num_joint, embed_dim, num_heads, mlp_ratio, rates[num_modality:])
        self.stack_norms = stack_norms
        if stack_norms:
            self.stack_norm = nn.ModuleDict({m: norm_layer(embed_dim) for m in self.modalities})
            self.norm = norm_layer(embed_dim)
        else:
            self.norm = nn.ModuleDict({m: norm_layer(embed_dim) for m in self.modalities})

        self.apply(init_weights)
        if self.modality_embed is not None:
            for param in self.modality_embed.values():
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
        """Per-modality blocks (late/mid), or the shared stack run per modality (shared)."""
        if self.fusion == "shared":
            return {m: run_blocks(self.blocks, x, self.grad_checkpointing) for m, x in tokens.items()}
        if self.modality_blocks:
            out = {m: run_blocks(self.modality_blocks[m], x, self.grad_checkpointing) for m, x in tokens.items()}
            return {m: self.stack_norm[m](x) for m, x in out.items()} if self.stack_norms else out
        return dict(tokens)

    def forward_joint_stage(self, tokens: dict[str, torch.Tensor], isolate: bool = False) -> dict[str, torch.Tensor]:
        """Joint blocks over the concatenated tokens (early/mid), then the final norms."""
        if self.cross_modal:
            if isolate or len(tokens) == 1:
                tokens = {m: run_blocks(self.blocks, x, self.grad_checkpointing) for m, x in tokens.items()}
            else:
                names = list(tokens)
                joint = run_blocks(self.blocks, torch.cat([tokens[m] for m in names], dim=1), self.grad_checkpointing)
                tokens = dict(zip(names, joint.split([tokens[m].shape[1] for m in names], dim=1)))
        return {m: (self.norm(x) if self.stack_norms else self.norm[m](x)) for m, x in tokens.items()}

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
        return {name for name, _ in self.named_parameters() if name.startswith("modality_embed.")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict:
        """timm's layer grouping: embeddings, then blocks by depth (per-modality blocks of the
        same index share a group), then the final norms with the last block."""
        p = prefix.replace(".", r"\.")
        return dict(
            stem=rf"^{p}(?:patch_embed|pos_embed|modality_embed)",
            modality_blocks=[(rf"^{p}modality_blocks\.\w+\.(\d+)", None), (rf"^{p}stack_norm\.", (99998,))],
            blocks=[(rf"^{p}blocks\.(\d+)", None), (rf"^{p}norm\.", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
