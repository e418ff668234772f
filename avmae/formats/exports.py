"""Export folders: ``model.safetensors`` + ``config.json``, written from a training checkpoint
(``export``) or a filled module (``write_export``), read back by ``from_pretrained``; an ``audio``
export also holds the branch as a stock timm ViT. The layout is in docs/checkpoints.md.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from avmae.config import Config, config_from_dict, config_to_dict, replace
from avmae.formats.weights import TRAINER_STATE_FILE, WEIGHTS_FILE, read_checkpoint, write_safetensors
from avmae.models import build_encoder, build_pretrain_model, get_size, load_pretrained, num_tokens

log = logging.getLogger(__name__)

EXPORT_CONFIG = "config.json"
TIMM_WEIGHTS = "timm_vit.safetensors"
FORMAT_VERSION = 1
PARTS = ("model", "encoder", "audio", "video")
# The model fields that define the encoder's weights; the rest of `model` is pretraining-only
# (masking, losses) or a finetuning choice (drop path).
ARCHITECTURE_FIELDS = (
    "size", "patch_size", "tubelet", "fusion", "fusion_layers", "modality_embed", "pos_embed", "stack_norms",
    "learned_pos_embed", "pos_grid_video", "pos_grid_audio", "cls_token", "joint_norms", "final_norm", "norm_eps",
)
# Preprocessing a model was trained on and must be fed with, whatever the clip geometry.
AUDIO_PREPROCESSING = ("sample_rate", "num_mel_bins", "frame_shift_ms", "frame_length_ms", "norm_mean", "norm_std")
VIDEO_PREPROCESSING = ("mean", "std")


# ---------------------------------------------------------------------------------------------
# building and filling the parts


def build_part(cfg: Config, part: str) -> nn.Module:
    """An untrained module of ``part`` for ``cfg``'s architecture and input geometry."""
    if part == "model":
        return build_pretrain_model(cfg)
    if part == "encoder":
        return build_encoder(cfg)
    if part in ("audio", "video"):
        return build_encoder(cfg, (part,))
    raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")


def load_part(module: nn.Module, state_dict: dict[str, torch.Tensor], part: str) -> None:
    """Fill ``module`` from a pretraining (or encoder) state dict; every needed key must be there."""
    if part == "model":
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model of its own config: missing {missing}, unexpected {unexpected}"
            )
    else:
        report = load_pretrained(module, state_dict)
        if report.missing:
            raise ValueError(f"checkpoint lacks encoder weights: {report.missing}")


def _input_description(cfg: Config) -> dict:
    video, audio, model = cfg.data.video, cfg.data.audio, cfg.model
    return {
        "video": {
            "num_frames": video.num_frames,
            "frame_rate": video.frame_rate,
            "size": video.size,
            "resize": video.resize,
            "mean": list(video.mean),
            "std": list(video.std),
            "patch_size": model.patch_size,
            "tubelet": model.tubelet,
            "layout": "(B, C, T, H, W)",
        },
        "audio": {
            "sample_rate": audio.sample_rate,
            "seconds": audio.seconds,
            "target_length": audio.target_length,
            "num_mel_bins": audio.num_mel_bins,
            "frame_shift_ms": audio.frame_shift_ms,
            "frame_length_ms": audio.frame_length_ms,
            "norm_mean": audio.norm_mean,
            "norm_std": audio.norm_std,
            "patch_size": model.patch_size,
            "layout": "(B, 1, T_a, F)",
            # torchaudio.compliance.kaldi.fbank arguments (after subtracting the waveform mean),
            # then (x - norm_mean) / norm_std, zero-padded or cut to target_length frames
            "fbank": {
                "htk_compat": True,
                "sample_frequency": audio.sample_rate,
                "use_energy": False,
                "window_type": "hanning",
                "num_mel_bins": audio.num_mel_bins,
                "dither": 0.0,
                "frame_shift": audio.frame_shift_ms,
                "frame_length": audio.frame_length_ms,
            },
        },
        "tokens": num_tokens(cfg),
    }


def _architecture(cfg: Config, module: nn.Module) -> dict:
    size = get_size(cfg.model.size)
    encoder = module.encoder if hasattr(module, "encoder") else module
    return {
        **{name: getattr(cfg.model, name) for name in ARCHITECTURE_FIELDS},
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "num_heads": size.num_heads,
        "mlp_ratio": size.mlp_ratio,
        "modalities": list(encoder.modalities),
    }


def export(checkpoint: str | Path, out_dir: str | Path, part: str = "model") -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for ``part`` of a checkpoint.

    For ``part="audio"`` also ``out_dir/timm_vit.safetensors`` and ``config.json["timm"]``.
    Returns ``out_dir``.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    state_dict, cfg = read_checkpoint(checkpoint)
    module = build_part(cfg, part)
    load_part(module, state_dict, part)
    return write_export(module, cfg, part, out_dir, _source(Path(checkpoint)))


def write_export(
    module: nn.Module, cfg: Config, part: str, out_dir: str | Path, source: dict, extra: dict | None = None
) -> Path:
    """Write the export folder of a filled ``module`` (``part`` of ``cfg``'s architecture);
    ``source`` says where the weights came from, ``extra`` adds top-level entries to config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write_safetensors(weights, out_dir / WEIGHTS_FILE, metadata={"format": "pt", "avmae_part": part})
    description = {
        "format": "avmae",
        "format_version": FORMAT_VERSION,
        "part": part,
        "architecture": _architecture(cfg, module),
        "input": _input_description(cfg),
        "source": source,
        **(extra or {}),
        "config": config_to_dict(cfg),
    }
    if part == "audio":
        vit, kwargs = timm_audio_vit(module)
        timm_weights = {k: v.contiguous() for k, v in vit.state_dict().items()}
        write_safetensors(timm_weights, out_dir / TIMM_WEIGHTS, metadata={"format": "pt"})
        description["timm"] = {
            "class": "timm.models.vision_transformer.VisionTransformer",
            "kwargs": kwargs,
            "norm_eps": module.norm_eps,  # of every LayerNorm: VisionTransformer(**kwargs, norm_layer=partial(LayerNorm, eps=...))
            "weights": TIMM_WEIGHTS,
        }
    with open(out_dir / EXPORT_CONFIG, "w") as f:
        json.dump(description, f, indent=2)
    return out_dir


def _source(checkpoint: Path) -> dict:
    """The checkpoint's name and training step (no absolute paths: exports are shared)."""
    source = {"checkpoint": checkpoint.resolve().name}
    state_file = checkpoint / TRAINER_STATE_FILE
    if state_file.is_file():
        source["step"] = json.loads(state_file.read_text()).get("step")
    return source


# ---------------------------------------------------------------------------------------------
# loading an export


def read_export(path: str | Path) -> dict:
    """The parsed ``config.json`` of an export folder, checked for format and part."""
    path = Path(path)
    config_file = path / EXPORT_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not an avmae export (no {EXPORT_CONFIG})")
    with open(config_file) as f:
        try:
            description = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON: {err}") from err
    if description.get("format") != "avmae" or description.get("part") not in PARTS:
        raise ValueError(f"{config_file}: not an avmae export config (format/part missing)")
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_file}: format_version {description['format_version']} is newer than this avmae")
    return description


def export_config(path: str | Path) -> Config:
    """The pretraining config stored in an export folder."""
    config_file = Path(path) / EXPORT_CONFIG
    try:
        return config_from_dict(read_export(path)["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{config_file}: no usable 'config' entry: {err}") from err


def from_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exported module from its folder alone, in eval mode.

    Returns an ``AVMAE`` (part ``model``) or an ``AVEncoder`` (``encoder``, ``audio``, ``video``),
    built for the geometry it was pretrained at; its positional embeddings adapt to other frame
    counts and audio lengths on the fly.
    """
    path = Path(path)
    description = read_export(path)
    cfg = export_config(path)
    module = build_part(cfg, description["part"])
    state_dict = load_file(str(path / WEIGHTS_FILE), device=str(map_location))
    module.load_state_dict(state_dict, strict=True)
    return module.to(map_location).eval()


def pretrained_encoder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an export folder, for ``avmae.models.load_pretrained``."""
    read_export(path)
    return load_file(str(Path(path) / WEIGHTS_FILE))


def apply_pretrained(cfg: Config, path: str | Path, inherit_preprocessing: bool = True) -> Config:
    """``cfg`` with the export's architecture (``ARCHITECTURE_FIELDS``) and, when
    ``inherit_preprocessing``, its fbank settings, normalisation statistics and pixel mean/std.

    Clip geometry (frames, frame rate, crop size, audio seconds) stays ``cfg``'s own: the
    positional embeddings are recomputed for it.
    """
    source = export_config(path)
    changes = {}
    for name in ARCHITECTURE_FIELDS:
        ours, theirs = getattr(cfg.model, name), getattr(source.model, name)
        if ours != theirs:
            changes[f"model.{name}"] = theirs
    model = _replace(cfg.model, {k.split(".", 1)[1]: v for k, v in changes.items()})
    audio, video = cfg.data.audio, cfg.data.video
    if inherit_preprocessing:
        theirs_audio, theirs_video = source.data.audio, source.data.video
        audio_changes = {
            n: getattr(theirs_audio, n) for n in AUDIO_PREPROCESSING if getattr(audio, n) != getattr(theirs_audio, n)
        }
        video_changes = {
            n: tuple(getattr(theirs_video, n))
            for n in VIDEO_PREPROCESSING
            if tuple(getattr(video, n)) != tuple(getattr(theirs_video, n))
        }
        audio, video = _replace(audio, audio_changes), _replace(video, video_changes)
        changes.update({f"data.audio.{k}": v for k, v in audio_changes.items()})
        changes.update({f"data.video.{k}": v for k, v in video_changes.items()})
    if changes:
        log.info("taken from the pretrained export %s: %s", path, changes)
    data = _replace(cfg.data, {"audio": audio, "video": video})
    return _replace(cfg, {"model": model, "data": data})


def _replace(obj, changes: dict):
    return replace(obj, **changes) if changes else obj


# ---------------------------------------------------------------------------------------------
# the audio branch as a stock timm ViT


def audio_block_stack(encoder: nn.Module) -> list[nn.Module]:
    """The blocks an audio-only forward pass runs, in order (per-modality, then joint/shared)."""
    blocks = []
    if encoder.fusion in ("late", "mid"):
        blocks += list(encoder.modality_blocks["audio"])
    if encoder.fusion in ("early", "mid", "shared"):
        blocks += list(encoder.blocks)
    return blocks


def timm_audio_vit(encoder: nn.Module, audio_grid: tuple[int, int] | None = None) -> tuple[nn.Module, dict]:
    """The audio branch of ``encoder`` as ``timm.models.vision_transformer.VisionTransformer``.

    The timm model takes the normalised fbank ``(B, 1, T_a, F)`` as a one-channel image;
    ``forward_features`` returns the same ``(B, N_a, D)`` tokens as
    ``encoder.forward_features(audio=...)["audio"]`` and ``forward_head(pre_logits=True)`` their
    mean. The fixed sine-cosine embedding of the grid plus the audio modality embedding become
    its (learnable-shaped) ``pos_embed``, so the timm model fits exactly one audio length,
    ``audio_grid`` (default: the encoder's configured grid).

    Every fusion type qualifies: run on audio alone, audio tokens only pass plain ViT blocks.

    Returns ``(model, kwargs)``: the filled model (eval mode) and its JSON-serialisable
    constructor arguments.
    """
    if "audio" not in encoder.modalities:
        raise ValueError(f"the encoder has no audio branch (modalities {encoder.modalities})")
    if encoder.stack_norms:
        raise ValueError(
            "the encoder has a LayerNorm between its audio and joint blocks (model.stack_norms), "
            "which a plain timm Vision Transformer does not have"
        )
    patch_embed = encoder.patch_embed["audio"]
    grid = tuple(audio_grid or encoder.pos_embed["audio"].grid)
    blocks = audio_block_stack(encoder)
    first = blocks[0]
    kwargs = {
        "img_size": [grid[0] * patch_embed.patch_size, grid[1] * patch_embed.patch_size],
        "patch_size": patch_embed.patch_size,
        "in_chans": 1,
        "num_classes": 0,
        "global_pool": "avg",
        "class_token": encoder.cls_token is not None,
        "fc_norm": False,  # the encoder's final norm is on tokens, before pooling
        "final_norm": isinstance(encoder.norm["audio"], nn.LayerNorm),
        "embed_dim": encoder.embed_dim,
        "depth": len(blocks),
        "num_heads": first.attn.num_heads,
        "mlp_ratio": first.mlp.fc1.out_features / encoder.embed_dim,
        "qkv_bias": first.attn.qkv.bias is not None,
    }
    # timm's ViT takes its LayerNorm as a class, not JSON: its eps is recorded next to the kwargs
    vit = VisionTransformer(**kwargs, norm_layer=partial(nn.LayerNorm, eps=encoder.norm_eps))

    pos = encoder.pos_embed["audio"](grid).detach()
    if encoder.modality_embed is not None:
        pos = pos + encoder.modality_embed["audio"].detach()
    state = {
        "pos_embed": pos,
        "patch_embed.proj.weight": patch_embed.embed.proj.weight,
        "patch_embed.proj.bias": patch_embed.embed.proj.bias,
    }
    if kwargs["final_norm"]:
        state.update({"norm.weight": encoder.norm["audio"].weight, "norm.bias": encoder.norm["audio"].bias})
    if encoder.cls_token is not None:  # its position is folded into the token: a zero row in timm's table
        state["cls_token"] = encoder.cls_token["audio"]
        state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    for i, block in enumerate(blocks):
        weights = block.state_dict()
        if hasattr(block, "modality_norm1"):  # a joint layer with per-modality norms: audio alone uses its own
            weights = {k: v for k, v in weights.items() if not k.startswith(("modality_norm1.", "modality_norm2."))}
            for n in ("1", "2"):
                norm = getattr(block, f"modality_norm{n}")["audio"]
                weights.update({f"norm{n}.weight": norm.weight, f"norm{n}.bias": norm.bias})
        state.update({f"blocks.{i}.{k}": v for k, v in weights.items()})
    vit.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return vit.eval(), kwargs


def load_timm_audio_vit(path: str | Path) -> nn.Module:
    """The stock timm ViT of an ``audio`` export folder (``timm_vit.safetensors``), in eval mode."""
    description = read_export(path)
    if "timm" not in description:
        raise ValueError(f"{path}: export of part {description['part']!r} has no timm audio model")
    norm_eps = description["timm"].get("norm_eps", 1e-6)  # an export without it: timm's own
    vit = VisionTransformer(**description["timm"]["kwargs"], norm_layer=partial(nn.LayerNorm, eps=norm_eps))
    vit.load_state_dict(load_file(str(Path(path) / description["timm"]["weights"])), strict=True)
    return vit.eval()
