"""MAE decoders over encoded visible tokens, and the two reconstruction objectives.

Weight sharing (``kind``):
- ``separate``: each modality has its own embedding, mask token, blocks and norm;
- ``shared``: one embedding, mask token, block stack and norm, run per modality; the decoder's
  modality embeddings tell the modalities apart;
- ``same``: AV-MAE's ``same_decoder``: each modality has its own embedding (projection from the
  encoder width) and mask token, and one block stack and norm run per modality;
- ``joint``: the shared modules run once over both modalities' tokens concatenated.
The prediction heads (width -> patch dimension) are always per modality.

Objectives:
- ``reconstruct``: modality m's decoder sees m's visible encoded tokens plus mask tokens at m's
  masked positions (and, for ``joint``, the other modality's sequence too) and predicts m's patches;
- ``inpaint``: the decoder of the target modality sees only the *other* modality's visible
  encoded tokens plus mask tokens at every position of the target, and predicts the target.
"""

from __future__ import annotations

import torch
from torch import nn

from avmae.config import DECODERS

from .masking import TokenMask, take_tokens

from .layers import MODALITIES, NORM_EPS, init_weights, make_blocks, norm_layer, run_blocks
from .pos_embed import SinCosPosEmbed



class AVDecoder(nn.Module):
    """Args:
    kind: separate | shared | joint | same.
    encoder_dim: width of the encoded tokens.
    width, depth, num_heads, mlp_ratio: decoder transformer size.
    patch_dims: patch dimension per modality (the prediction targets).
    grids: token grid per modality of the configured geometry (pre-computes positions).
    modality_embed: learnable decoder modality embeddings.
    pos_embed: ``grid``, ``2d`` or ``1d`` sin-cos positions (``pos_embed.SinCosPosEmbed``).
    norm_eps: the eps of every LayerNorm (``model.norm_eps``).
    """

    def __init__(
        self,
        *,
        kind: str,
        encoder_dim: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_dims: dict[str, int],
        grids: dict[str, tuple[int, ...]],
        modality_embed: bool = True,
        pos_embed: str = "grid",
        norm_eps: float = NORM_EPS,
    ) -> None:
        super().__init__()
        if kind not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {kind!r}")
        self.kind = kind
        self.modalities = tuple(m for m in MODALITIES if m in patch_dims)
        self.grad_checkpointing = False

        def one_or_each(make, each=("separate",)):
            return nn.ModuleDict({m: make() for m in self.modalities}) if kind in each else make()

        self.embed = one_or_each(lambda: nn.Linear(encoder_dim, width), each=("separate", "same"))
        self.blocks = one_or_each(lambda: make_blocks(depth, width, num_heads, mlp_ratio, norm_eps=norm_eps))
        self.norm = one_or_each(lambda: norm_layer(width, eps=norm_eps))
        self.pred = nn.ModuleDict({m: nn.Linear(width, patch_dims[m]) for m in self.modalities})
        if kind in ("separate", "same"):
            self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, width)) for m in self.modalities})
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.modality_embed = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, width)) for m in self.modalities})
            if modality_embed
            else None
        )
        self.pos_embed = nn.ModuleDict({m: SinCosPosEmbed(m, width, grids[m], pos_embed) for m in self.modalities})

        self.apply(init_weights)
        for param in self.parameters():
            if param.dim() == 3:  # mask tokens and modality embeddings
                nn.init.normal_(param, std=0.02)

    def _part(self, part: nn.Module, modality: str) -> nn.Module:
        return part[modality] if isinstance(part, nn.ModuleDict) else part

    def _mask_token(self, modality: str) -> torch.Tensor:
        return self.mask_token[modality] if isinstance(self.mask_token, nn.ParameterDict) else self.mask_token

    def _position(self, modality: str, grid: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``(1, N, width)`` positional (plus modality) embedding of every token of ``grid``, in
        ``dtype`` (the sine-cosine buffer stays fp32 under DeepSpeed's bf16/fp16 modes)."""
        pos = self.pos_embed[modality](grid).to(dtype)
        if self.modality_embed is not None:
            pos = pos + self.modality_embed[modality]
        return pos

    def _full_sequence(self, modality: str, latent: torch.Tensor, mask: TokenMask, grid) -> torch.Tensor:
        """Visible encoded tokens + mask tokens, back in grid order: ``(B, N, width)``."""
        x = self._part(self.embed, modality)(latent)
        batch, num_tokens = mask.ids_restore.shape
        fill = self._mask_token(modality).expand(batch, num_tokens - x.shape[1], -1).to(x.dtype)
        x = take_tokens(torch.cat([x, fill], dim=1), mask.ids_restore)
        return x + self._position(modality, grid, x.dtype)

    def _decode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self._part(self.blocks, modality), x, self.grad_checkpointing)
        return self._part(self.norm, modality)(x)

    def reconstruct(
        self,
        latent: dict[str, torch.Tensor],
        masks: dict[str, TokenMask],
        grids: dict[str, tuple[int, ...]],
    ) -> dict[str, torch.Tensor]:
        """Encoded visible tokens ``(B, N_keep_m, D)`` per modality -> predictions ``(B, N_m, P_m)``."""
        seqs = {m: self._full_sequence(m, latent[m], masks[m], grids[m]) for m in latent}
        if self.kind == "joint" and len(seqs) > 1:
            names = list(seqs)
            joint = self._decode(names[0], torch.cat([seqs[m] for m in names], dim=1))
            out = dict(zip(names, joint.split([seqs[m].shape[1] for m in names], dim=1)))
        else:
            out = {m: self._decode(m, x) for m, x in seqs.items()}
        return {m: self.pred[m](x) for m, x in out.items()}

    def inpaint(
        self,
        target: str,
        latent: dict[str, torch.Tensor],
        masks: dict[str, TokenMask],
        grids: dict[str, tuple[int, ...]],
    ) -> torch.Tensor:
        """Predict every patch of ``target`` ``(B, N_t, P_t)`` from the other modality's visible
        encoded tokens alone (the target's own visible tokens are not given to the decoder)."""
        (source,) = [m for m in latent if m != target]
        context = self._part(self.embed, target)(latent[source])
        context = context + take_tokens(self._position(source, grids[source], context.dtype).expand(context.shape[0], -1, -1), masks[source].ids_keep)
        batch, num_target = masks[target].ids_restore.shape
        queries = self._mask_token(target).to(context.dtype) + self._position(target, grids[target], context.dtype)
        x = torch.cat([context, queries.expand(batch, num_target, -1)], dim=1)
        return self.pred[target](self._decode(target, x)[:, -num_target:])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith(("mask_token", "modality_embed."))}
