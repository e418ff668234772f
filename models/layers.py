"""Tokenizers, patchify functions and the transformer stack shared by the encoder and decoders.

Token orders (docs/architecture.md, "Shapes"):
- video ``(B, C, T, H, W)`` -> ``(B, T' * H' * W', D)`` in (t, h, w) order, ``T' = T / tubelet``;
- audio ``(B, 1, T_a, F)`` -> ``(B, T' * F', D)`` in time-major order, ``T' = T_a / patch``.
``patchify_*`` cut the raw input into exactly these tokens, which are the MAE targets.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

MODALITIES = ("video", "audio")

# LayerNorm with the eps of MAE, AudioMAE, VideoMAE, timm's ViT and scenic (1e-6); a model's
# eps is `model.norm_eps` (PyTorch's default 1e-5 for CAV-MAE), passed as `norm_layer(dim, eps=...)`.
NORM_EPS = 1e-6
norm_layer = partial(nn.LayerNorm, eps=NORM_EPS)


def video_grid(shape: tuple[int, ...], patch_size: int, tubelet: int) -> tuple[int, int, int]:
    """Token grid ``(T', H', W')`` of a video input of shape ``(B, C, T, H, W)``."""
    if len(shape) != 5:
        raise ValueError(f"video input must be (B, C, T, H, W), got shape {tuple(shape)}")
    _, _, frames, height, width = shape
    if frames % tubelet or height % patch_size or width % patch_size:
        raise ValueError(
            f"video input of shape {tuple(shape)} does not tile into tubelets of "
            f"{tubelet}x{patch_size}x{patch_size} (frames, height, width must be divisible)"
        )
    return frames // tubelet, height // patch_size, width // patch_size


def audio_grid(shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """Token grid ``(T', F')`` of an audio input of shape ``(B, 1, T_a, F)``."""
    if len(shape) != 4 or shape[1] != 1:
        raise ValueError(f"audio input must be (B, 1, T_a, F), got shape {tuple(shape)}")
    _, _, frames, bins = shape
    if frames % patch_size or bins % patch_size:
        raise ValueError(
            f"audio input of shape {tuple(shape)} does not tile into {patch_size}x{patch_size} "
            f"patches (time frames and mel bins must be divisible by {patch_size})"
        )
    return frames // patch_size, bins // patch_size


def patchify_video(video: torch.Tensor, patch_size: int, tubelet: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, N_v, tubelet * p * p * C)``, tokens in (t, h, w) order."""
    video_grid(video.shape, patch_size, tubelet)
    return rearrange(
        video, "b c (t u) (h p) (w q) -> b (t h w) (u p q c)", u=tubelet, p=patch_size, q=patch_size
    )


def unpatchify_video(
    patches: torch.Tensor, grid: tuple[int, int, int], patch_size: int, tubelet: int, channels: int = 3
) -> torch.Tensor:
    """Inverse of ``patchify_video``: ``(B, N_v, u * p * p * C)`` -> ``(B, C, T, H, W)``."""
    t, h, w = grid
    return rearrange(
        patches, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)",
        t=t, h=h, w=w, u=tubelet, p=patch_size, q=patch_size, c=channels,
    )


def patchify_audio(audio: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, 1, T_a, F)`` -> ``(B, N_a, p * p)``, tokens in time-major order."""
    audio_grid(audio.shape, patch_size)
    return rearrange(audio, "b c (t p) (f q) -> b (t f) (p q c)", p=patch_size, q=patch_size)


def unpatchify_audio(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of ``patchify_audio``: ``(B, N_a, p * p)`` -> ``(B, 1, T_a, F)``."""
    t, f = grid
    return rearrange(
        patches, "b (t f) (p q c) -> b c (t p) (f q)", t=t, f=f, p=patch_size, q=patch_size, c=1
    )


class VideoPatchEmbed(nn.Module):
    """Tubelet embedding: a Conv3d with kernel = stride = ``(tubelet, patch, patch)``."""

    def __init__(self, embed_dim: int, patch_size: int = 16, tubelet: int = 2, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.tubelet = tubelet
        self.in_chans = in_chans
        self.patch_dim = in_chans * tubelet * patch_size * patch_size
        kernel = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return video_grid(shape, self.patch_size, self.tubelet)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> ``(B, T' * H' * W', D)``."""
        self.grid(video.shape)
        return rearrange(self.proj(video), "b d t h w -> b (t h w) d")


class AudioPatchEmbed(nn.Module):
    """Square patches over the ``(T_a, F)`` fbank image (timm's PatchEmbed, any input size)."""

    def __init__(self, embed_dim: int, patch_size: int = 16) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_dim = patch_size * patch_size
        # img_size=None: no fixed geometry, so any audio length that tiles into patches works.
        self.embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=1, embed_dim=embed_dim)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return audio_grid(shape, self.patch_size)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T_a, F)`` -> ``(B, T' * F', D)``; row-major flattening = time-major tokens."""
        self.grid(audio.shape)
        return self.embed(audio)


def make_blocks(
    count: int, dim: int, num_heads: int, mlp_ratio: float, drop_path: list[float] | None = None,
    norm_eps: float = NORM_EPS,
) -> nn.ModuleList:
    """``count`` timm ViT blocks (pre-norm, qkv bias as in MAE, LayerNorms of eps ``norm_eps``),
    attention through SDPA."""
    drop_path = drop_path or [0.0] * count
    blocks = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=partial(nn.LayerNorm, eps=norm_eps))
        for rate in drop_path[:count]
    )
    # timm reads TIMM_FUSED_ATTN at construction; this model always wants
    # torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels).
    for block in blocks:
        block.attn.fused_attn = True
    return blocks


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """Apply a stack of blocks to ``(B, N, D)``; optionally re-computing activations in backward."""
    if grad_checkpointing and torch.is_grad_enabled() and len(blocks):
        return checkpoint_seq(blocks, x)
    for block in blocks:
        x = block(x)
    return x


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears (and patch projections seen as linears)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
