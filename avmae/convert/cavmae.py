"""YuanGongND/cav-mae, ``src/models/cav_mae.py``: ``CAVMAE`` (per-modality stacks ``blocks_a/v``,
the joint ``blocks_u`` with per-stream norms, modality embeddings, the joint decoder) and
``CAVMAEFT`` (the encoder plus ``mlp_head`` = LayerNorm + Linear). Its audio is fed as
``(128, T)``, so tokens are frequency-major; they are reordered to avmae's time-major order.
docs/checkpoints.md.
"""

from __future__ import annotations

import math

from avmae.convert.source import (
    BLOCK_KEYS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Branch,
    ConversionError,
    Source,
    SourceKeys,
    block_shapes,
    count_blocks,
    mlp_width,
    take_head,
    take_norm,
    timm_blocks,
)

# src/models/cav_mae.py: CAVMAE and CAVMAEFT take norm_layer=nn.LayerNorm and mlp_head is
# nn.LayerNorm(embed_dim): PyTorch's default eps in every norm
NORM_EPS = 1e-5
PREPROCESSING = {
    "video.mean": IMAGENET_MEAN, "video.std": IMAGENET_STD,
    "audio.norm_mean": -5.081, "audio.norm_std": 4.4849,
    "source": "YuanGongND/cav-mae src/dataloader.py + egs/*/run_cavmae_*.sh: Kaldi fbank, 128 bins, "
    "1024 frames padded with zero frames, (x - (-5.081)) / 4.4849; one RGB frame of 10 extracted, "
    "224 px, ImageNet mean and std",
}


def read_cavmae(keys: SourceKeys, num_mel_bins: int = 128) -> Source:
    """``CAVMAE`` (pretrained) or ``CAVMAEFT`` (finetuned, ``mlp_head``)."""
    if not keys.has("patch_embed_a.proj.weight") or not keys.has("blocks_u.0.norm1_a.weight"):
        raise ConversionError(f"{keys.origin}: no patch_embed_a / blocks_u.0.norm1_a: not a CAV-MAE checkpoint")
    dim, _, patch, _ = keys.state["patch_embed_a.proj.weight"].shape
    specific, joint = count_blocks(keys, "blocks_a."), count_blocks(keys, "blocks_u.")
    if count_blocks(keys, "blocks_v.") != specific:
        raise ConversionError(f"{keys.origin}: blocks_a and blocks_v differ in depth")
    freq = num_mel_bins // patch
    audio_tokens = keys.state["pos_embed_a"].shape[1]
    video_tokens = keys.state["pos_embed_v"].shape[1]
    side = math.isqrt(video_tokens)
    time = audio_tokens // freq
    hidden = mlp_width(keys, "blocks_u.")
    shapes = block_shapes(dim, hidden)

    # the joint layers: attention/MLP weights shared, norms per stream
    shared, per_modality = [], {"a": [], "v": []}
    for i in range(joint):
        weights = {n: keys.take(f"blocks_u.{i}.{n}", shapes[n]) for n in BLOCK_KEYS if not n.startswith("norm")}
        for tag, stream in (("", shared), ("_a", per_modality["a"]), ("_v", per_modality["v"])):
            norms = {
                f"{n}.{p}": keys.take(f"blocks_u.{i}.{n}{tag}.{p}", (dim,)) for n in ("norm1", "norm2") for p in ("weight", "bias")
            }
            stream.append({**weights, **norms})

    # audio: CAV-MAE feeds the fbank as (128, T): tokens frequency-major, patches (freq, time)
    pos_a = keys.take("pos_embed_a", (1, audio_tokens, dim))
    pos_a = pos_a.reshape(freq, time, dim).transpose(0, 1).reshape(1, audio_tokens, dim)
    audio = Branch(
        patch_weight=keys.take("patch_embed_a.proj.weight", (dim, 1, patch, patch)).transpose(2, 3),
        patch_bias=keys.take("patch_embed_a.proj.bias", (dim,)),
        pos=pos_a,
        grid=(time, freq),
        blocks=timm_blocks(keys, "blocks_a.", specific, dim) + per_modality["a"],
        norm=take_norm(keys, "norm_a", dim),
        modality_embed=keys.take("modality_a", (1, 1, dim)),
    )
    video = Branch(
        patch_weight=keys.take("patch_embed_v.proj.weight", (dim, 3, patch, patch))[:, :, None],
        patch_bias=keys.take("patch_embed_v.proj.bias", (dim,)),
        pos=keys.take("pos_embed_v", (1, video_tokens, dim)),
        grid=(1, side, side),
        blocks=timm_blocks(keys, "blocks_v.", specific, dim) + per_modality["v"],
        norm=take_norm(keys, "norm_v", dim),
        modality_embed=keys.take("modality_v", (1, 1, dim)),
    )
    finetuned = keys.has("mlp_head.1.weight")
    source = Source(
        kind="cavmae", finetuned=finetuned, embed_dim=dim, branches={"video": video, "audio": audio},
        joint_blocks=shared, joint_norm=take_norm(keys, "norm", dim),
    )
    if finetuned:
        source.head = take_head(keys, "mlp_head.0", "mlp_head.1", dim)
    source.notes["audio_tokens"] = "reordered from CAV-MAE's frequency-major to avmae's time-major order"
    keys.drop(
        r"^blocks_[av]\.\d+\.norm[12]_[av]\.",
        "per-modality norms every CAV-MAE block holds; its modality-specific layers never use them",
    )
    keys.drop(
        r"^(decoder_|mask_token$)",
        "the CAV-MAE joint decoder: its fixed positional tables and frequency-major audio patches differ from avmae's decoder",
    )
    return source
