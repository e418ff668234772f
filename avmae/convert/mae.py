"""facebookresearch/mae, ``models_mae.py`` (pretrained: ``cls_token``, ``pos_embed (1, 1 + N, D)``,
``patch_embed.proj`` Conv2d, ``blocks.i`` timm blocks, ``norm``, the decoder ``decoder_*`` /
``mask_token``) and ``models_vit.py`` (finetuned, global pooling: ``fc_norm`` + ``head``).
docs/checkpoints.md.
"""

from __future__ import annotations

import math

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

# models_vit.py vit_* and models_mae.py mae_vit_* build every norm as partial(nn.LayerNorm, eps=1e-6)
NORM_EPS = 1e-6
PREPROCESSING = {
    "video.mean": IMAGENET_MEAN, "video.std": IMAGENET_STD,
    "source": "facebookresearch/mae main_pretrain.py / util/datasets.py: ImageNet mean and std, 224 px crops",
}


def read_mae_layout(keys: SourceKeys, kind: str, modality: str, grid_of, in_chans: int) -> Source:
    """MAE and AudioMAE: ``cls_token``, ``pos_embed (1, 1 + N, D)``, ``patch_embed.proj``,
    ``blocks.i``, then ``norm`` (pretrained) or ``fc_norm`` + ``head`` (finetuned, global pool)."""
    if not keys.has("patch_embed.proj.weight"):
        raise ConversionError(f"{keys.origin}: no patch_embed.proj.weight: not a {kind} checkpoint")
    dim, _, patch, _ = keys.state["patch_embed.proj.weight"].shape
    depth = count_blocks(keys, "blocks.")
    finetuned = keys.has("head.weight")
    num_tokens = keys.state["pos_embed"].shape[1] - 1 if keys.has("pos_embed") else 0
    grid = grid_of(num_tokens)
    pos = keys.take("pos_embed", (1, 1 + math.prod(grid), dim))
    cls = keys.take("cls_token", (1, 1, dim)) + pos[:, :1]
    weight = keys.take("patch_embed.proj.weight", (dim, in_chans, patch, patch))
    if modality == "video":
        weight = weight[:, :, None]  # Conv2d on one frame = Conv3d with a one-frame tubelet
    branch = Branch(
        patch_weight=weight,
        patch_bias=keys.take("patch_embed.proj.bias", (dim,)),
        pos=pos[:, 1:],
        grid=grid,
        blocks=timm_blocks(keys, "blocks.", depth, dim),
        norm=None if finetuned else take_norm(keys, "norm", dim),
        cls=cls,
    )
    source = Source(kind=kind, finetuned=finetuned, embed_dim=dim, branches={modality: branch})
    if finetuned:
        source.head = take_head(keys, "fc_norm", "head", dim)
    keys.drop(r"^(decoder_|mask_token$)", "the MAE decoder: avmae's decoders are built differently; the encoder is converted")
    return source


def read_mae(keys: SourceKeys) -> Source:
    def grid_of(n: int) -> tuple[int, int, int]:
        side = math.isqrt(n)
        if side * side != n:
            raise ConversionError(f"{keys.origin}: pos_embed holds {n} patch tokens, not a square image grid")
        return (1, side, side)

    return read_mae_layout(keys, "mae", "video", grid_of, in_chans=3)
