"""A source network (``avmae.convert.source.Source``) onto an avmae encoder: the target config,
the weights (positional tables resampled to the target geometry), and the export folder with,
for a finetuned source, its classifier folder. Every source key is mapped, dropped with the
reason recorded in ``config.json["conversion"]``, or an error. docs/checkpoints.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from avmae.config import Config, config_from_dict, config_to_dict, load_config, replace
from avmae.convert import audiomae, cavmae, mae, videomae
from avmae.convert.source import Branch, ConversionError, Source, SourceKeys, read_source
from avmae.formats import save_finetuned, write_export
from avmae.models import SIZES, build_classifier, build_encoder, model_grids
from avmae.models.pos_embed import RESAMPLE_METHOD, resample_table

# One module per source: its reader read_<kind>, PREPROCESSING and NORM_EPS
_MODULES = {"mae": mae, "audiomae": audiomae, "videomae": videomae, "cavmae": cavmae}
SOURCES = tuple(_MODULES)
PARTS = ("encoder", "audio", "video")  # what a conversion writes: export parts without a decoder
# Preprocessing of each source, with the file that sets it (recorded in config.json).
PREPROCESSING = {kind: module.PREPROCESSING for kind, module in _MODULES.items()}
# LayerNorm eps of each source (each module cites the file that sets it): model.norm_eps
NORM_EPS = {kind: module.NORM_EPS for kind, module in _MODULES.items()}
READERS = {kind: getattr(module, f"read_{kind}") for kind, module in _MODULES.items()}


def read(kind: str, path: str | Path) -> Source:
    """The source network of a checkpoint file; every key is mapped, dropped on purpose, or an error."""
    if kind not in READERS:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {kind!r}")
    keys = SourceKeys(read_source(path), f"{Path(path).name} ({kind})")
    source = READERS[kind](keys)
    keys.finish()
    source.dropped = dict(keys.dropped)
    return source


# ---------------------------------------------------------------------------------------------
# the avmae config a source maps to


def size_name(embed_dim: int, depth: int) -> str:
    for name, size in SIZES.items():
        if size.embed_dim == embed_dim and size.depth == depth:
            return name
    known = ", ".join(f"{n} ({s.embed_dim} wide, {s.depth} deep)" for n, s in SIZES.items())
    raise ConversionError(f"no avmae model size is {embed_dim} wide and {depth} deep (known: {known})")


def default_config(source: Source) -> Config:
    """The avmae config of the source network at its own input geometry, preprocessing and
    LayerNorm eps."""
    cfg = Config()
    model = {
        "size": size_name(source.embed_dim, source.depth),
        "learned_pos_embed": True,
        "cls_token": any(b.cls is not None for b in source.branches.values()),
        "modality_embed": any(b.modality_embed is not None for b in source.branches.values()),
        # finetuned MAE-family models norm the pooled token (fc_norm) instead; CAV-MAE keeps its norms
        "final_norm": not source.finetuned or source.kind == "cavmae",
        "drop_path": 0.0,
        "norm_eps": NORM_EPS[source.kind],
    }
    data: dict = {"video": {}, "audio": {}}
    if "video" in source.branches:
        v = source.branches["video"]
        patch, tubelet = v.patch_weight.shape[-1], v.patch_weight.shape[2]
        model.update(patch_size=patch, tubelet=tubelet, pos_grid_video=list(v.grid))
        data["video"].update(num_frames=v.grid[0] * tubelet, size=v.grid[1] * patch)
    if "audio" in source.branches:
        a = source.branches["audio"]
        patch = a.patch_weight.shape[-1]
        model.update(patch_size=patch, pos_grid_audio=list(a.grid))
        data["audio"].update(seconds=a.grid[0] * patch * cfg.data.audio.frame_shift_ms / 1000.0, num_mel_bins=a.grid[1] * patch)
    if source.kind == "cavmae":
        model.update(fusion="mid", fusion_layers=len(source.joint_blocks), joint_norms="per_modality")
        data["video"].update(num_frames=1)
    else:
        model.update(fusion="late")
    for key, value in PREPROCESSING[source.kind].items():
        if "." in key:
            group, name = key.split(".")
            data[group][name] = list(value) if isinstance(value, tuple) else value
    if source.kind == "videomae":
        data["video"]["frame_rate"] = 30.0 / PREPROCESSING["videomae"]["frame_stride"]
    raw = config_to_dict(cfg)
    raw["model"].update(model)
    for group in ("video", "audio"):
        raw["data"][group].update(data[group])
    return config_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# filling an avmae encoder


def _inflate(weight: torch.Tensor, tubelet: int, notes: dict) -> torch.Tensor:
    """Video patch kernel ``(D, 3, u0, p, p)`` for a tubelet of ``tubelet`` frames: a one-frame
    kernel is repeated over the frames and divided by their number (a still clip embeds as the
    single frame did)."""
    u0 = weight.shape[2]
    if u0 == tubelet:
        return weight
    if u0 != 1:
        raise ConversionError(f"cannot map a {u0}-frame tubelet kernel onto a {tubelet}-frame tubelet")
    notes["video_patch_embed"] = f"one-frame kernel repeated over {tubelet} frames and divided by {tubelet}"
    return weight.repeat(1, 1, tubelet, 1, 1) / tubelet


def _audio_from_video(video: Branch, notes: dict) -> Branch:
    """An audio branch started from an image network, as CAV-MAE starts its audio branch from
    ImageNet MAE (``src/adapt_vmae_weights.py``): the RGB patch kernel summed over channels."""
    if video.patch_weight.shape[2] != 1:
        raise ConversionError("an audio branch can start only from an image network (one-frame patches)")
    notes["audio_from_video"] = "audio branch initialised from the image network: patch kernel summed over RGB"
    return replace(video, patch_weight=video.patch_weight[:, :, 0].sum(dim=1, keepdim=True))


def encoder_state(source: Source, cfg: Config, modalities: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of ``build_encoder(cfg, modalities)`` filled from ``source``, and notes.

    Raises when a key of the encoder cannot be filled (``notes["initialised"]`` lists those left
    at their initial value on purpose: modality embeddings and class tokens a source lacks, and
    audio positions when the source is an image network).
    """
    encoder = build_encoder(cfg, modalities)
    target = encoder.state_dict()
    out: dict[str, torch.Tensor] = {}
    notes: dict = {"initialised": [], "not_used": []}
    m_cfg = cfg.model
    fusion = m_cfg.fusion
    depth = encoder.depth
    num_joint = len(encoder.blocks) if fusion in ("early", "mid") else 0
    num_modality = depth - num_joint if fusion in ("mid", "late") else 0
    if source.depth != depth:
        raise ConversionError(f"the source has {source.depth} layers, the target model.size={m_cfg.size} has {depth}")

    branches = dict(source.branches)
    for m in modalities:
        if m not in branches:
            if m == "audio" and "video" in branches:
                branches["audio"] = _audio_from_video(branches["video"], notes)
            else:
                raise ConversionError(f"the {source.kind} source has no {m} branch to fill the target's")

    for m in modalities:
        b = branches[m]
        if m == "video":
            out["patch_embed.video.proj.weight"] = _inflate(b.patch_weight, m_cfg.tubelet, notes)
            out["patch_embed.video.proj.bias"] = b.patch_bias
        else:
            out["patch_embed.audio.embed.proj.weight"] = b.patch_weight
            out["patch_embed.audio.embed.proj.bias"] = b.patch_bias
        key = f"pos_embed.{m}.table"
        if key in target:
            table_grid = encoder.pos_embed[m].grid
            source_grid = b.grid
            if m == "audio" and notes.get("audio_from_video"):
                notes["initialised"].append(key + " (sine-cosine: the image network has no audio positions)")
            else:
                if tuple(source_grid) != tuple(table_grid):
                    notes.setdefault("pos_embed_resized", {})[m] = {
                        "from": list(source_grid), "to": list(table_grid), "method": RESAMPLE_METHOD[m],
                    }  # fmt: skip
                out[key] = resample_table(b.pos, source_grid, table_grid)
        else:
            notes["not_used"].append(f"{m} positional table (the target uses fixed sine-cosine positions)")
        if f"cls_token.{m}" in target:
            if b.cls is None:
                notes["initialised"].append(f"cls_token.{m}")
            else:
                out[f"cls_token.{m}"] = b.cls
        elif b.cls is not None:
            notes["not_used"].append(f"{m} class token (the target has none)")
        if f"modality_embed.{m}" in target:
            if b.modality_embed is None:
                notes["initialised"].append(f"modality_embed.{m}")
            else:
                out[f"modality_embed.{m}"] = b.modality_embed
        elif b.modality_embed is not None:
            raise ConversionError(f"the source has a {m} modality embedding; the target needs model.modality_embed=true")
        for i in range(num_modality):
            out.update({f"modality_blocks.{m}.{i}.{k}": v for k, v in b.blocks[i].items()})
        for j in range(num_joint):
            block = b.blocks[num_modality + j]
            if m_cfg.joint_norms == "per_modality":
                for n in ("norm1", "norm2"):
                    for p in ("weight", "bias"):
                        out[f"blocks.{j}.modality_{n}.{m}.{p}"] = block[f"{n}.{p}"]
        if fusion == "shared":
            for i in range(depth):
                out.update({f"blocks.{i}.{k}": v for k, v in b.blocks[i].items()})
        if f"norm.{m}.weight" in target:
            if b.norm is None:
                raise ConversionError(
                    f"the finetuned {source.kind} source has no final norm; convert with model.final_norm=false"
                )
            out[f"norm.{m}.weight"], out[f"norm.{m}.bias"] = b.norm["weight"], b.norm["bias"]
        elif b.norm is not None:
            notes["not_used"].append(f"{m} final norm (the target has model.final_norm=false)")

    first = branches[modalities[0]]
    for j in range(num_joint):
        if source.joint_blocks:
            joint = source.joint_blocks[j]
        else:  # a single-modality source: its layer serves the joint sequence as well
            joint = first.blocks[num_modality + j]
        out.update({f"blocks.{j}.{k}": v for k, v in joint.items()})
    if "joint_norm.weight" in target:
        norm = source.joint_norm or first.norm
        if norm is None:
            raise ConversionError("the target's joint final norm has no counterpart in the source")
        out["joint_norm.weight"], out["joint_norm.bias"] = norm["weight"], norm["bias"]

    initialised = {n.split(" ")[0] for n in notes["initialised"]}
    missing = sorted(set(target) - set(out) - initialised)
    extra = sorted(set(out) - set(target))
    shapes = [
        f"{k}: {tuple(out[k].shape)} vs {tuple(target[k].shape)}"
        for k in out
        if k in target and out[k].shape != target[k].shape
    ]
    if missing or extra or shapes:
        raise ConversionError(
            f"the {source.kind} source does not fill the target encoder: "
            + " | ".join(p for p in (
                f"unfilled: {', '.join(missing)}" if missing else "",
                f"no such key: {', '.join(extra)}" if extra else "",
                f"shapes: {'; '.join(shapes)}" if shapes else "",
            ) if p)
        )
    for key in initialised:
        out[key] = target[key]
    return {k: v.contiguous() for k, v in out.items()}, notes


# ---------------------------------------------------------------------------------------------
# the whole conversion


def _with_geometry(cfg: Config, num_frames: int | None, image_size: int | None, audio_seconds: float | None) -> Config:
    video, audio = cfg.data.video, cfg.data.audio
    if num_frames:
        video = replace(video, num_frames=num_frames)
    if image_size:
        video = replace(video, size=image_size, resize=max(video.resize, image_size))
    if audio_seconds:
        audio = replace(audio, seconds=audio_seconds)
    cfg = replace(cfg, data=replace(cfg.data, video=video, audio=audio))
    if cfg.model.learned_pos_embed and (num_frames or image_size or audio_seconds):
        # the stored tables are resampled to the new geometry once, here (config.json says how)
        grids = model_grids(cfg)
        cfg = replace(cfg, model=replace(cfg.model, pos_grid_video=grids["video"], pos_grid_audio=grids["audio"]))
    return cfg


def convert(
    kind: str,
    checkpoint: str | Path,
    out_dir: str | Path,
    part: str | None = None,
    config: Config | None = None,
    num_frames: int | None = None,
    image_size: int | None = None,
    audio_seconds: float | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Convert ``checkpoint`` (a ``kind`` source) into the export folder ``out_dir``.

    ``config``: a target avmae config (e.g. a CAV-MAE pretraining config to start from ImageNet
    MAE); default: the source's own architecture, geometry and preprocessing
    (``default_config``), with ``overrides`` (``key.sub=value``) applied to it. ``num_frames`` / ``image_size`` / ``audio_seconds``: another input
    geometry; stored positional tables are resampled to it (the method lands in config.json).
    ``part``: ``encoder``, ``audio`` or ``video`` (default: the source's modalities).
    A finetuned source also gets ``out_dir/classifier`` (classifier weights + ``config.yaml``),
    which ``tools/eval.py`` runs directly.
    """
    source = read(kind, checkpoint)
    if config is not None:
        if overrides:
            raise ValueError("convert: apply overrides to the config passed in, not alongside it")
        cfg = config
    else:
        cfg = load_config(overrides=overrides, base=default_config(source)) if overrides else default_config(source)
    cfg = _with_geometry(cfg, num_frames, image_size, audio_seconds)
    if part is None:
        part = "encoder" if len(source.branches) > 1 or config is not None else next(iter(source.branches))
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    modalities = ("video", "audio") if part == "encoder" else (part,)
    state, notes = encoder_state(source, cfg, modalities)
    encoder = build_encoder(cfg, modalities)
    encoder.load_state_dict(state, strict=True)

    conversion = {
        "from": kind,
        "checkpoint": Path(checkpoint).name,
        "finetuned": source.finetuned,
        "dropped": source.dropped,
        "preprocessing": PREPROCESSING[kind]["source"],
        **({"frame_stride_source_frames": PREPROCESSING[kind]["frame_stride"]} if "frame_stride" in PREPROCESSING[kind] else {}),
        **source.notes,
        **{k: v for k, v in notes.items() if v},
    }
    if source.head is not None:
        conversion["classes"] = {
            "label": source.head["linear.weight"].shape[0],
            "order": "the source's label index order (e.g. AudioSet class_labels_indices.csv, the "
            "Kinetics class list): give tools/eval.py a label file in that order",
        }
    source_entry = {"checkpoint": Path(checkpoint).name, "converted_from": kind}
    out = write_export(encoder, cfg, part, out_dir, source_entry, {"conversion": conversion})
    if source.head is not None:
        write_classifier(source, cfg, state, modalities, out / "classifier")
    return out


def write_classifier(source: Source, cfg: Config, encoder_weights: dict, modalities: tuple[str, ...], out_dir: Path) -> Path:
    """``out_dir/model.safetensors`` + ``config.yaml``: the finetuned source as an avmae classifier."""
    head = source.head
    num_classes = head["linear.weight"].shape[0]
    finetune_modalities = "audiovisual" if len(modalities) == 2 else modalities[0]
    pool = "tokens" if source.kind == "cavmae" else "modalities"  # CAVMAEFT averages all 708 tokens
    cfg = replace(cfg, finetune=replace(cfg.finetune, heads={"label": num_classes}, modalities=finetune_modalities, pool=pool))
    model = build_classifier(cfg, {"label": num_classes})
    state = {f"encoder.{k}": v for k, v in encoder_weights.items()}
    state.update({
        "heads.label.0.weight": head["norm.weight"], "heads.label.0.bias": head["norm.bias"],
        "heads.label.2.weight": head["linear.weight"], "heads.label.2.bias": head["linear.bias"],
    })
    model.load_state_dict(state, strict=True)
    return save_finetuned(model, cfg, out_dir)
