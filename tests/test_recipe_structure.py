"""The recipe configs build the models their sources describe: parameter and token counts are
computed here from the published layer sizes (google-research/scenic,
scenic/projects/av_mae/configs/{audioset,vggsound}/{pretrain,finetune}.py and the models they
name), never read back from the model. Models are built on the meta device (no memory, no init)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from avmae.config import load_config
from avmae.models import MBTClassifier, build_classifier, build_pretrain_model, model_grids
from avmae.models.masking import sample_mask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# published sizes: (width, depth, heads, mlp width)
VIT = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}
DECODER = {"B": (384, 4, 6, 1536), "L": (512, 4, 8, 2048)}
PATCH, TUBELET, CHANNELS = 16, 2, 3
SPEC_FPS, SPEC_BINS = 100, 128


def block(width: int, mlp: int) -> int:
    """One pre-norm transformer block: 2 LayerNorms, qkv + output projection, 2-layer MLP, all with biases."""
    return 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width)


def layer_norm(width: int) -> int:
    return 2 * width


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


VIDEO_PATCH = CHANNELS * TUBELET * PATCH * PATCH  # 1536 values per video token
AUDIO_PATCH = PATCH * PATCH  # 256 values per spectrogram token


def video_tokens(frames: int, size: int = 224) -> int:
    return (frames // TUBELET) * (size // PATCH) ** 2


def audio_tokens(seconds: int) -> int:
    # a VALID 16 x 16 patching of (seconds x 100) frames x 128 bins drops the frames past the last whole patch
    return (seconds * SPEC_FPS // PATCH) * (SPEC_BINS // PATCH)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


PRETRAIN = [
    # config, variant, seconds of spectrogram, joint (fusion) layers or None for separate encoders,
    # mask ratios (video, audio), visible tokens: 1568 x 0.1 = 156.8, 496 x 0.3 = 148.8, 400 x 0.5
    ("avmae_audioset_vitl", "L", 10, 2, (0.9, 0.7), {"video": 156, "audio": 148}),
    ("avmae_audioset_vitb", "B", 10, 2, (0.9, 0.7), {"video": 156, "audio": 148}),
    ("avmae_vggsound_vitl", "L", 8, None, (0.9, 0.5), {"video": 156, "audio": 200}),
    ("avmae_vggsound_vitb", "B", 8, None, (0.9, 0.5), {"video": 156, "audio": 200}),
]


@pytest.mark.parametrize("name,variant,seconds,fusion_layers,ratios,visible", PRETRAIN)
def test_pretraining_model_has_the_published_size(name, variant, seconds, fusion_layers, ratios, visible):
    cfg = load_config(CONFIGS / "pretrain" / f"{name}.yaml")
    width, depth, heads, mlp = VIT[variant]
    dec_width, dec_depth, dec_heads, dec_mlp = DECODER[variant]

    # tokens: 16 frames of 224 px in 2 x 16 x 16 tubelets; the spectrogram in 16 x 16 patches
    tokens = {"video": video_tokens(16), "audio": audio_tokens(seconds)}
    assert tokens == ({"video": 1568, "audio": 496} if seconds == 10 else {"video": 1568, "audio": 400})
    assert {m: math.prod(g) for m, g in model_grids(cfg).items()} == tokens

    # encoder: two tokenizers; per-modality stacks (all layers for separate encoders, the rest
    # below the joint layers otherwise), each closed by a LayerNorm; the joint stack and its norm
    encoder = dense(VIDEO_PATCH, width) + dense(AUDIO_PATCH, width)
    if fusion_layers is None:
        encoder += 2 * (depth * block(width, mlp) + layer_norm(width))
    else:
        encoder += 2 * ((depth - fusion_layers) * block(width, mlp) + layer_norm(width))
        encoder += fusion_layers * block(width, mlp) + layer_norm(width)
    # same_decoder: per-modality projection from the encoder and mask token, one shared stack
    # with its norm, per-modality output projections to the patch values; no modality tokens
    decoder = 2 * (dense(width, dec_width) + dec_width)
    decoder += dec_depth * block(dec_width, dec_mlp) + layer_norm(dec_width)
    decoder += dense(dec_width, VIDEO_PATCH) + dense(dec_width, AUDIO_PATCH)

    with torch.device("meta"):
        model = build_pretrain_model(cfg)
    assert count(model.encoder) == encoder
    assert count(model.decoder) == decoder
    assert count(model) == encoder + decoder
    first = (model.encoder.modality_blocks["video"] or model.encoder.blocks)[0]
    assert first.attn.num_heads == heads and first.mlp.fc1.out_features == mlp
    assert model.decoder.blocks[0].attn.num_heads == dec_heads and model.decoder.blocks[0].mlp.fc1.out_features == dec_mlp
    assert model.encoder.pos_embed["video"].kind == model.decoder.pos_embed["audio"].kind == "1d"

    # visible tokens: floor(N x (1 - ratio)) per modality (scenic keeps N - floor(N x ratio), one
    # more token where N x ratio is not whole; docs/recipes.md)
    assert (cfg.model.mask_ratio_video, cfg.model.mask_ratio_audio) == ratios
    grids = model_grids(cfg)
    for modality, ratio in zip(("video", "audio"), ratios):
        mask = sample_mask("random", 1, grids[modality], ratio, torch.Generator().manual_seed(0), "cpu")
        assert mask.ids_keep.shape[1] == visible[modality]


FINETUNE = [
    # config, variant, spectrogram seconds, MBT fusion layer, classes
    ("avmae_audioset_vitl", "L", 10, 18, 527),
    ("avmae_vggsound_vitl", "L", 8, 16, 309),
]


@pytest.mark.parametrize("name,variant,seconds,fusion_layer,classes", FINETUNE)
def test_mbt_finetuning_model_has_the_published_size(name, variant, seconds, fusion_layer, classes):
    cfg = load_config(CONFIGS / "finetune" / f"{name}.yaml")
    width, depth, heads, mlp = VIT[variant]
    # 32 frames at stride 2 in 2-frame tubelets: 16 x 14 x 14
    tokens = {"video": video_tokens(32), "audio": audio_tokens(seconds)}
    assert tokens["video"] == 3136
    assert {m: math.prod(g) for m, g in model_grids(cfg).items()} == tokens

    # MBT: tokenizers, one full stack per modality, 4 bottleneck tokens, one shared linear head
    # on the mean-pooled tokens of each modality. MBT closes both stacks with one shared
    # LayerNorm; ours keeps one per modality (finetune.mbt_final_norm): + 1 LayerNorm
    mbt = dense(VIDEO_PATCH, width) + dense(AUDIO_PATCH, width)
    mbt += 2 * depth * block(width, mlp) + layer_norm(width)
    mbt += 4 * width + dense(width, classes)
    with torch.device("meta"):
        model = build_classifier(cfg, {"label": classes})
    assert isinstance(model, MBTClassifier)
    assert model.fusion_layer == fusion_layer and model.bottleneck.shape == (1, 4, width)
    assert count(model) == mbt + layer_norm(width)
    assert len(model.encoder.modality_blocks["video"]) == len(model.encoder.modality_blocks["audio"]) == depth
    assert model.encoder.modality_blocks["audio"][0].attn.num_heads == heads


@pytest.mark.parametrize(
    "path", sorted(p for d in ("pretrain", "finetune", "probe", "ablation", "objectives") for p in (CONFIGS / d).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_config_loads(path):
    """Renamed files and new keys: every shipped config still resolves against the typed schema."""
    cfg = load_config(path)
    model_grids(cfg)  # and its geometry tiles into tokens


@pytest.mark.parametrize("value", ["no", "'no'", "bf16"])
def test_mixed_precision_from_the_command_line(value):
    """A bare `no` is YAML 1.1 for false; it still means no mixed precision."""
    cfg = load_config(CONFIGS / "pretrain" / "demo.yaml", [f"train.mixed_precision={value}"])
    assert cfg.train.mixed_precision == value.strip("'")
    with pytest.raises(ValueError, match="train.mixed_precision"):
        load_config(CONFIGS / "pretrain" / "demo.yaml", ["train.mixed_precision=fp8"])
