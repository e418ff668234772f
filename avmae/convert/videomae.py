"""MCG-NJU/VideoMAE, ``modeling_pretrain.py`` (``encoder.*``: Conv3d tubelet ``patch_embed.proj``,
attention with ``q_bias`` / ``v_bias`` and no key bias, ``norm``; the decoder) and
``modeling_finetune.py`` (no ``encoder.`` prefix, ``fc_norm`` + ``head``). Its fixed 1-D sinusoid
table is not in the checkpoint and is recomputed here. docs/checkpoints.md.
"""

from __future__ import annotations

import math

import torch

from avmae.convert.source import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Branch,
    ConversionError,
    Source,
    SourceKeys,
    count_blocks,
    take_head,
    take_norm,
    timm_blocks,
)

# modeling_finetune.py vit_*_patch16_* and modeling_pretrain.py pretrain_videomae_* build every norm
# as partial(nn.LayerNorm, eps=1e-6)
NORM_EPS = 1e-6
PREPROCESSING = {
    "video.mean": IMAGENET_MEAN, "video.std": IMAGENET_STD,
    "source": "MCG-NJU/VideoMAE run_mae_pretraining.py / datasets.py: 16 frames at a sampling rate "
    "of 4 source frames (Kinetics; 2 for Something-Something), ImageNet mean and std, 224 px",
    "frame_stride": 4,
}


def sinusoid_table(num_tokens: int, dim: int) -> torch.Tensor:
    """The Transformer's 1-D sinusoid code over the flattened token index (as VideoMAE uses it):
    channel ``j`` of position ``n`` is ``sin`` (even ``j``) or ``cos`` (odd ``j``) of
    ``n / 10000 ** (2 * (j // 2) / dim)``. ``(1, num_tokens, dim)``."""
    position = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angle = position / torch.pow(10000.0, exponent)[None]
    table = torch.empty_like(angle)
    table[:, 0::2] = angle[:, 0::2].sin()
    table[:, 1::2] = angle[:, 1::2].cos()
    return table.float()[None]


def read_videomae(keys: SourceKeys, num_frames: int = 16, image_size: int = 224) -> Source:
    """Pretrained (``encoder.*`` + decoder) or finetuned (bare, ``fc_norm`` + ``head``)."""
    prefix = "encoder." if keys.has("encoder.patch_embed.proj.weight") else ""
    if not keys.has(f"{prefix}patch_embed.proj.weight"):
        raise ConversionError(f"{keys.origin}: no (encoder.)patch_embed.proj.weight: not a VideoMAE checkpoint")
    dim, chans, tubelet, patch, _ = keys.state[f"{prefix}patch_embed.proj.weight"].shape
    grid = (num_frames // tubelet, image_size // patch, image_size // patch)
    depth = count_blocks(keys, f"{prefix}blocks.")
    finetuned = keys.has("head.weight") and not prefix
    if keys.has(f"{prefix}pos_embed"):
        pos = keys.take(f"{prefix}pos_embed", (1, math.prod(grid), dim))
        pos_note = "the checkpoint's learned pos_embed"
    else:
        pos = sinusoid_table(math.prod(grid), dim)
        pos_note = "VideoMAE's fixed 1-D sinusoid table over the flattened (t, h, w) token index, recomputed"
    branch = Branch(
        patch_weight=keys.take(f"{prefix}patch_embed.proj.weight", (dim, 3, tubelet, patch, patch)),
        patch_bias=keys.take(f"{prefix}patch_embed.proj.bias", (dim,)),
        pos=pos,
        grid=grid,
        blocks=timm_blocks(keys, f"{prefix}blocks.", depth, dim, videomae=True),
        norm=None if finetuned else take_norm(keys, f"{prefix}norm", dim),
    )
    source = Source(kind="videomae", finetuned=finetuned, embed_dim=dim, branches={"video": branch})
    source.notes["pos_embed"] = pos_note
    if finetuned:
        source.head = take_head(keys, "fc_norm", "head", dim)
    keys.drop(r"^(decoder\.|encoder_to_decoder\.|mask_token$)", "the VideoMAE decoder: avmae's decoders are built differently")
    keys.drop(r"^encoder\.head\.", "the pretraining encoder's empty head")
    return source
