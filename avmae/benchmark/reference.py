"""A plain reference implementation of the CAV-MAE-style pretraining model, for benchmarks.

``ReferenceAVMAE`` computes what ``AVMAE`` computes for one configuration (mid fusion, separate
decoders, joint reconstruction, no contrastive head), written the way research code of the
CAV-MAE era is: explicit fp32 ``softmax(q @ k.T / sqrt(d)) @ v`` attention over every token it is
given, patch embeddings as linear layers over patchified inputs, plain AdamW (``plain_adamw``).
It shares the masking, positions, patchify order and loss with ``AVMAE``, and
``avmae_to_reference_state_dict`` maps an ``AVMAE``'s weights onto it, so a ratio between the two
is about implementation only (docs/benchmarks.md, "Training step").
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from avmae.config import Config, TrainConfig
from avmae.models.masking import TokenMask, sample_mask, take_tokens
from avmae.models.losses import masked_mse, normalize_patches

from avmae.models.layers import MODALITIES, audio_grid, init_weights, norm_layer, patchify_audio, patchify_video, video_grid
from avmae.models.pos_embed import audio_sincos, video_sincos
from avmae.models.pretrain import model_grids
from avmae.models.registry import get_size


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q @ k.T / sqrt(d)) @ v`` for ``(B, heads, N, d)`` inputs, materialising the
    ``(B, heads, N, N)`` attention matrix."""
    weights = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return weights.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention; parameter names as timm's (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return self.proj(rearrange(dense_attention(q, k, v), "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _blocks(count: int, dim: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(count))


def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def _positions(dim: int, grids: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``(1, N_m, dim)`` sine-cosine positions of each modality's grid."""
    return {"video": video_sincos(dim, grids["video"])[None], "audio": audio_sincos(dim, grids["audio"])[None]}


class ReferenceEncoder(nn.Module):
    """Per-modality patch embeddings and ``depth - fusion_layers`` per-modality blocks, then
    ``fusion_layers`` joint blocks over the concatenated video and audio tokens."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        fusion_layers: int,
        patch_dims: dict[str, int],
        grids: dict[str, tuple[int, ...]],
        modality_embed: bool,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.ModuleDict({m: nn.Linear(patch_dims[m], embed_dim) for m in MODALITIES})
        for m, pos in _positions(embed_dim, grids).items():
            self.register_buffer(f"pos_{m}", pos, persistent=False)
        self.modality_embed = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, embed_dim)) for m in MODALITIES})
            if modality_embed
            else None
        )
        self.modality_blocks = nn.ModuleDict(
            {m: _blocks(depth - fusion_layers, embed_dim, num_heads, mlp_ratio) for m in MODALITIES}
        )
        self.blocks = _blocks(fusion_layers, embed_dim, num_heads, mlp_ratio)
        self.norm = nn.ModuleDict({m: norm_layer(embed_dim) for m in MODALITIES})

    def forward(self, patches: dict[str, torch.Tensor], masks: dict[str, TokenMask]) -> dict[str, torch.Tensor]:
        """Patches ``(B, N_m, P_m)`` -> encoded visible tokens ``(B, N_keep_m, D)`` per modality."""
        hidden = {}
        for m in MODALITIES:
            x = self.patch_embed[m](patches[m]) + getattr(self, f"pos_{m}")
            if self.modality_embed is not None:
                x = x + self.modality_embed[m]
            hidden[m] = _run(self.modality_blocks[m], take_tokens(x, masks[m].ids_keep))
        joint = _run(self.blocks, torch.cat([hidden["video"], hidden["audio"]], dim=1))
        video, audio = joint.split([hidden["video"].shape[1], hidden["audio"].shape[1]], dim=1)
        return {"video": self.norm["video"](video), "audio": self.norm["audio"](audio)}


class ReferenceDecoder(nn.Module):
    """One MAE decoder per modality over its visible tokens plus mask tokens, in grid order."""

    def __init__(
        self,
        *,
        encoder_dim: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_dims: dict[str, int],
        grids: dict[str, tuple[int, ...]],
        modality_embed: bool,
    ) -> None:
        super().__init__()
        self.embed = nn.ModuleDict({m: nn.Linear(encoder_dim, width) for m in MODALITIES})
        self.blocks = nn.ModuleDict({m: _blocks(depth, width, num_heads, mlp_ratio) for m in MODALITIES})
        self.norm = nn.ModuleDict({m: norm_layer(width) for m in MODALITIES})
        self.pred = nn.ModuleDict({m: nn.Linear(width, patch_dims[m]) for m in MODALITIES})
        self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, width)) for m in MODALITIES})
        self.modality_embed = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, width)) for m in MODALITIES})
            if modality_embed
            else None
        )
        for m, pos in _positions(width, grids).items():
            self.register_buffer(f"pos_{m}", pos, persistent=False)

    def forward(self, latent: dict[str, torch.Tensor], masks: dict[str, TokenMask]) -> dict[str, torch.Tensor]:
        """Encoded visible tokens ``(B, N_keep_m, D)`` -> predicted patches ``(B, N_m, P_m)``."""
        preds = {}
        for m in MODALITIES:
            x = self.embed[m](latent[m])
            batch, num_tokens = masks[m].ids_restore.shape
            fill = self.mask_token[m].expand(batch, num_tokens - x.shape[1], -1)
            x = take_tokens(torch.cat([x, fill], dim=1), masks[m].ids_restore)
            x = x + getattr(self, f"pos_{m}")
            if self.modality_embed is not None:
                x = x + self.modality_embed[m]
            preds[m] = self.pred[m](self.norm[m](_run(self.blocks[m], x)))
        return preds


def check_reference_config(cfg: Config) -> None:
    """Raise ``ValueError`` naming every setting the reference model does not implement."""
    m = cfg.model
    wanted = {
        "fusion": "mid", "decoder": "separate", "reconstruction": "joint", "contrastive": "none",
        "drop_path": 0.0, "grad_checkpointing": False,
        # the recipe options it does not implement either (their defaults are what it computes)
        "pos_embed": "grid", "stack_norms": False, "patch_loss": "mean", "learned_pos_embed": False,
        "cls_token": False, "joint_norms": "shared", "final_norm": True,
    }  # fmt: skip
    problems = [f"model.{k}={getattr(m, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(m, k) != v]
    if m.mae_weight <= 0:
        problems.append(f"model.mae_weight={m.mae_weight} (needs > 0)")
    if problems:
        raise ValueError(
            "the reference model implements CAV-MAE-style mid fusion with separate decoders only; "
            "unsupported: " + ", ".join(problems)
        )


class ReferenceAVMAE(nn.Module):
    """``AVMAE`` of a mid-fusion, separate-decoder config, written plainly (module docstring).

    ``forward(video (B, C, T, H, W), audio (B, 1, T_a, F), generator=None)`` returns ``loss`` and
    ``logs`` (``mae_video``, ``mae_audio``, ``mae``) as ``AVMAE`` does; the same ``generator``
    state gives the same masks.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        check_reference_config(cfg)
        m = cfg.model
        size = get_size(m.size)
        grids = model_grids(cfg)
        self.cfg = m
        self.grids = grids
        patch_dims = {"video": 3 * m.tubelet * m.patch_size**2, "audio": m.patch_size**2}
        self.encoder = ReferenceEncoder(
            embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, mlp_ratio=size.mlp_ratio,
            fusion_layers=m.fusion_layers, patch_dims=patch_dims, grids=grids, modality_embed=m.modality_embed,
        )  # fmt: skip
        self.decoder = ReferenceDecoder(
            encoder_dim=size.embed_dim, width=m.decoder_width, depth=m.decoder_depth, num_heads=m.decoder_heads,
            mlp_ratio=size.mlp_ratio, patch_dims=patch_dims, grids=grids, modality_embed=m.modality_embed,
        )  # fmt: skip
        self.apply(init_weights)
        for param in self.parameters():
            if param.dim() == 3:  # mask tokens and modality embeddings
                nn.init.normal_(param, std=0.02)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        m = self.cfg
        patches = {
            "video": patchify_video(video, m.patch_size, m.tubelet),
            "audio": patchify_audio(audio, m.patch_size),
        }
        grids = {"video": video_grid(video.shape, m.patch_size, m.tubelet), "audio": audio_grid(audio.shape, m.patch_size)}
        if grids != self.grids:
            raise ValueError(f"inputs of token grids {grids} given to a reference model built for {self.grids}")
        # the same calls, in the same order, as AVMAE.sample_masks
        masks = {
            "video": sample_mask(m.video_masking, video.shape[0], grids["video"], m.mask_ratio_video, generator, video.device),
            "audio": sample_mask(m.audio_masking, audio.shape[0], grids["audio"], m.mask_ratio_audio, generator, audio.device),
        }  # fmt: skip
        preds = self.decoder(self.encoder(patches, masks), masks)
        targets = {k: normalize_patches(p) if m.norm_pix_loss else p for k, p in patches.items()}
        mse = {k: masked_mse(preds[k], targets[k], masks[k].mask) for k in MODALITIES}
        mae = m.loss_weight_video * mse["video"] + m.loss_weight_audio * mse["audio"]
        logs = {"mae_video": mse["video"], "mae_audio": mse["audio"], "mae": mae}
        return {"loss": m.mae_weight * mae, "logs": {k: v.detach() for k, v in logs.items()}}

    def no_weight_decay(self) -> set[str]:
        """Mask tokens and modality embeddings, as ``AVMAE`` lists them."""
        return {n for n, p in self.named_parameters() if p.dim() == 3}


def plain_adamw(model: nn.Module, train: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with ``AVMAE``'s two groups (no decay on 1-D parameters and ``no_weight_decay()``),
    one parameter at a time: ``foreach=False``, ``fused=False``."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(train.betas), foreach=False, fused=False)


def avmae_to_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``AVMAE`` state dict (mid fusion, separate decoders) with the reference's names.

    Names already agree except the patch embeddings: the Conv3d/Conv2d kernels become linear
    weights over the patchified input, whose features are ordered ``(u p q c)``.
    """
    converted = {}
    for name, value in state_dict.items():
        if name == "encoder.patch_embed.video.proj.weight":
            converted["encoder.patch_embed.video.weight"] = rearrange(value, "d c u p q -> d (u p q c)")
        elif name == "encoder.patch_embed.video.proj.bias":
            converted["encoder.patch_embed.video.bias"] = value
        elif name == "encoder.patch_embed.audio.embed.proj.weight":
            converted["encoder.patch_embed.audio.weight"] = rearrange(value, "d c p q -> d (p q c)")
        elif name == "encoder.patch_embed.audio.embed.proj.bias":
            converted["encoder.patch_embed.audio.bias"] = value
        else:
            converted[name] = value
    return converted
