"""Published checkpoints of other MAE codebases -> avmae export folders.

Sources (key names and shapes from each repository's model definition):

- ``mae``: facebookresearch/mae, ``models_mae.py`` (pretrained: ``cls_token``, ``pos_embed``
  ``(1, 1 + N, D)``, ``patch_embed.proj`` Conv2d, ``blocks.i.*`` timm blocks, ``norm``, and in the
  full checkpoints the decoder ``decoder_*``/``mask_token``) and ``models_vit.py`` (finetuned,
  global pooling: ``norm`` replaced by ``fc_norm``, plus ``head``);
- ``audiomae``: facebookresearch/AudioMAE, ``models_mae.py`` / ``models_vit.py``: the same layout
  over the ``(1, 1024, 128)`` fbank image, time first (a ``(64, 8)`` token grid in time-major order);
- ``videomae``: MCG-NJU/VideoMAE, ``modeling_pretrain.py`` (``encoder.*``: Conv3d tubelet
  ``patch_embed.proj``, blocks whose attention holds ``q_bias``/``v_bias`` and no key bias, ``norm``;
  the decoder ``decoder.*``, ``encoder_to_decoder``, ``mask_token``) and ``modeling_finetune.py``
  (no ``encoder.`` prefix, ``fc_norm`` + ``head``). Its fixed 1-D sinusoid table is not in the
  checkpoint and is recomputed here;
- ``cavmae``: YuanGongND/cav-mae, ``src/models/cav_mae.py`` (``CAVMAE``: ``patch_embed_a/v``,
  ``pos_embed_a/v``, ``modality_a/v``, ``blocks_a/v`` (11), ``blocks_u`` (1) with ``norm1/2`` and
  per-modality ``norm1_a/v``, ``norm2_a/v``, final ``norm``, ``norm_a``, ``norm_v``, the joint decoder
  ``decoder_*``; ``CAVMAEFT``: the encoder plus ``mlp_head`` = LayerNorm + Linear). Its audio
  input is transposed to ``(128, T)`` before a Conv2d, so tokens are frequency-major; they are
  reordered to avmae's time-major order (patch kernel transposed, positional table permuted).

Every source key is either mapped, or dropped on purpose with the reason recorded in
``config.json["conversion"]["dropped"]`` (the MAE decoders: avmae's decoders differ), or an error
names it. Missing and mis-shaped keys are errors too.

The converted encoder uses the avmae options that reproduce the source network exactly: a stored
positional table (``model.learned_pos_embed``), class tokens where the source has one (their
positional embedding folded in), CAV-MAE's per-modality joint norms, no final norm for finetuned
sources (their ``fc_norm`` becomes the classifier head's LayerNorm).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from avmae.config import Config, config_from_dict, config_to_dict, replace
from avmae.export import read_state_dict

SOURCES = ("mae", "audiomae", "videomae", "cavmae")
PARTS = ("encoder", "audio", "video")  # what a conversion writes: export parts without a decoder

# Preprocessing of each source, with the file that sets it (recorded in config.json).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESSING = {
    "mae": {
        "video.mean": IMAGENET_MEAN, "video.std": IMAGENET_STD,
        "source": "facebookresearch/mae main_pretrain.py / util/datasets.py: ImageNet mean and std, 224 px crops",
    },
    "audiomae": {
        # dataset.py: (fbank - mean) / (std * 2) with main_finetune_as.py's AudioSet statistics
        "audio.norm_mean": -4.2677393, "audio.norm_std": 2 * 4.5689974,
        "source": "facebookresearch/AudioMAE dataset.py + main_finetune_as.py: Kaldi fbank, 128 bins, "
        "10 ms shift, 1024 frames, (x - (-4.2677393)) / (2 * 4.5689974)",
    },
    "videomae": {
        "video.mean": IMAGENET_MEAN, "video.std": IMAGENET_STD,
        "source": "MCG-NJU/VideoMAE run_mae_pretraining.py / datasets.py: 16 frames at a sampling rate "
        "of 4 source frames (Kinetics; 2 for Something-Something), ImageNet mean and std, 224 px",
        "frame_stride": 4,
    },
    "cavmae": {
        "video.mean": IMAGENET_MEAN, "video.std": IMAGENET_STD,
        "audio.norm_mean": -5.081, "audio.norm_std": 4.4849,
        "source": "YuanGongND/cav-mae src/dataloader.py + egs/*/run_cavmae_*.sh: Kaldi fbank, 128 bins, "
        "1024 frames padded with zero frames, (x - (-5.081)) / 4.4849; one RGB frame of 10 extracted, "
        "224 px, ImageNet mean and std",
    },
}


class ConversionError(ValueError):
    """A source checkpoint that does not fit the converter: the message names every key."""


# ---------------------------------------------------------------------------------------------
# reading a source checkpoint safely


def read_source(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a source checkpoint, read by ``avmae.export.read_state_dict``: safetensors,
    or ``torch.load(weights_only=True)`` that may also build the ``argparse.Namespace`` the source
    codebases' training checkpoints store (no arbitrary code); ``model`` / ``state_dict`` /
    ``module`` wrappers opened, ``module.`` prefixes removed."""
    import argparse

    try:
        state = read_state_dict(path, allowed_globals=(argparse.Namespace,), wrappers=("model", "state_dict", "module"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint not found: {path}") from err
    except ValueError as err:
        raise ConversionError(str(err)) from err
    if not state:
        raise ConversionError(f"{path}: expected a mapping of parameter names to tensors")
    return state


class SourceKeys:
    """The source state dict, with bookkeeping: every key is taken, dropped with a reason, or
    reported; ``finish`` raises one error naming all missing, mis-shaped and unexpected keys."""

    def __init__(self, state: dict[str, torch.Tensor], origin: str) -> None:
        self.state = state
        self.origin = origin
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shape: list[str] = []
        self.dropped: dict[str, str] = {}

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.state:
            self.missing.append(key)
            return torch.zeros(shape or ())
        value = self.state[key]
        self.used.add(key)
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.bad_shape.append(f"{key}: {tuple(value.shape)}, expected {tuple(shape)}")
        return value.float()

    def drop(self, pattern: str, reason: str) -> None:
        """Drop every not yet used key matching ``pattern`` (a regex), recording ``reason``."""
        regex = re.compile(pattern)
        names = sorted(k for k in self.state if regex.match(k) and k not in self.used)
        if names:
            self.dropped[pattern] = f"{reason} ({len(names)} tensors)"
            self.used.update(names)

    def finish(self) -> None:
        unexpected = sorted(set(self.state) - self.used)
        problems = []
        if self.missing:
            problems.append(f"missing keys: {', '.join(self.missing)}")
        if self.bad_shape:
            problems.append(f"mis-shaped keys: {'; '.join(self.bad_shape)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        if problems:
            raise ConversionError(f"{self.origin}: " + " | ".join(problems))


# ---------------------------------------------------------------------------------------------
# a source in one common form


@dataclass
class Branch:
    """One modality of a source network, in avmae's token order.

    ``patch_weight``: Conv3d ``(D, 3, u, p, p)`` for video, Conv2d ``(D, 1, p, p)`` over the
    time-first fbank for audio. ``pos``: ``(1, N, D)`` for ``grid``. ``cls``: ``(1, 1, D)`` with its
    positional embedding folded in, or None. ``blocks``: timm ``Block`` state dicts, all layers this
    modality passes (CAV-MAE: the joint layer with this modality's norms). ``norm``: the final norm.
    """

    patch_weight: torch.Tensor
    patch_bias: torch.Tensor
    pos: torch.Tensor
    grid: tuple[int, ...]
    blocks: list[dict[str, torch.Tensor]]
    norm: dict[str, torch.Tensor] | None
    cls: torch.Tensor | None = None
    modality_embed: torch.Tensor | None = None


@dataclass
class Source:
    kind: str  # one of SOURCES
    finetuned: bool
    embed_dim: int
    branches: dict[str, Branch]
    # CAV-MAE: the joint layers with their joint-sequence norms, and the joint final norm
    joint_blocks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    joint_norm: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None  # "norm.weight", "norm.bias", "linear.weight", "linear.bias"
    notes: dict = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(next(iter(self.branches.values())).blocks)


BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)


def _block_shapes(dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,),
    }


def _count_blocks(keys: SourceKeys, prefix: str) -> int:
    regex = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for k in keys.state if (m := regex.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        raise ConversionError(f"{keys.origin}: blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _hidden(keys: SourceKeys, prefix: str) -> int:
    weight = keys.state.get(f"{prefix}0.mlp.fc1.weight")
    if weight is None:
        raise ConversionError(f"{keys.origin}: no {prefix}0.mlp.fc1.weight to read the MLP width from")
    return weight.shape[0]


def _timm_blocks(keys: SourceKeys, prefix: str, count: int, dim: int, videomae: bool = False) -> list[dict]:
    """``count`` timm-layout blocks under ``prefix`` (VideoMAE: ``q_bias``/``v_bias`` -> ``qkv.bias``
    with a zero key bias, which is what its attention computes)."""
    hidden = _hidden(keys, prefix)
    shapes = _block_shapes(dim, hidden)
    blocks = []
    for i in range(count):
        block = {}
        for name in BLOCK_KEYS:
            if videomae and name == "attn.qkv.bias":
                q = keys.take(f"{prefix}{i}.attn.q_bias", (dim,))
                v = keys.take(f"{prefix}{i}.attn.v_bias", (dim,))
                block[name] = torch.cat([q, torch.zeros_like(q), v])
                continue
            block[name] = keys.take(f"{prefix}{i}.{name}", shapes[name])
        if videomae and (keys.has(f"{prefix}{i}.gamma_1") or keys.has(f"{prefix}{i}.gamma_2")):
            raise ConversionError(
                f"{keys.origin}: {prefix}{i}.gamma_1/gamma_2 (layer scale, init_values > 0) are not supported"
            )
        blocks.append(block)
    return blocks


def _norm(keys: SourceKeys, prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {"weight": keys.take(f"{prefix}.weight", (dim,)), "bias": keys.take(f"{prefix}.bias", (dim,))}


def _head(keys: SourceKeys, norm_prefix: str, linear_prefix: str, dim: int) -> dict[str, torch.Tensor]:
    num_classes = keys.state[f"{linear_prefix}.weight"].shape[0]
    norm = _norm(keys, norm_prefix, dim)
    return {
        "norm.weight": norm["weight"], "norm.bias": norm["bias"],
        "linear.weight": keys.take(f"{linear_prefix}.weight", (num_classes, dim)),
        "linear.bias": keys.take(f"{linear_prefix}.bias", (num_classes,)),
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


# ---------------------------------------------------------------------------------------------
# the four readers


def _vit_like(keys: SourceKeys, kind: str, modality: str, grid_of, in_chans: int) -> Source:
    """MAE and AudioMAE: ``cls_token``, ``pos_embed (1, 1 + N, D)``, ``patch_embed.proj``,
    ``blocks.i``, then ``norm`` (pretrained) or ``fc_norm`` + ``head`` (finetuned, global pool)."""
    if not keys.has("patch_embed.proj.weight"):
        raise ConversionError(f"{keys.origin}: no patch_embed.proj.weight: not a {kind} checkpoint")
    dim, _, patch, _ = keys.state["patch_embed.proj.weight"].shape
    depth = _count_blocks(keys, "blocks.")
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
        blocks=_timm_blocks(keys, "blocks.", depth, dim),
        norm=None if finetuned else _norm(keys, "norm", dim),
        cls=cls,
    )
    source = Source(kind=kind, finetuned=finetuned, embed_dim=dim, branches={modality: branch})
    if finetuned:
        source.head = _head(keys, "fc_norm", "head", dim)
    keys.drop(r"^(decoder_|mask_token$)", "the MAE decoder: avmae's decoders are built differently; the encoder is converted")
    return source


def read_mae(keys: SourceKeys) -> Source:
    def grid_of(n: int) -> tuple[int, int, int]:
        side = math.isqrt(n)
        if side * side != n:
            raise ConversionError(f"{keys.origin}: pos_embed holds {n} patch tokens, not a square image grid")
        return (1, side, side)

    return _vit_like(keys, "mae", "video", grid_of, in_chans=3)


def read_audiomae(keys: SourceKeys, num_mel_bins: int = 128) -> Source:
    def grid_of(n: int) -> tuple[int, int]:
        patch = keys.state["patch_embed.proj.weight"].shape[-1]
        freq = num_mel_bins // patch
        if n % freq:
            raise ConversionError(f"{keys.origin}: pos_embed holds {n} tokens, not a (time, {freq}) grid")
        return (n // freq, freq)

    return _vit_like(keys, "audiomae", "audio", grid_of, in_chans=1)


def read_videomae(keys: SourceKeys, num_frames: int = 16, image_size: int = 224) -> Source:
    """Pretrained (``encoder.*`` + decoder) or finetuned (bare, ``fc_norm`` + ``head``)."""
    prefix = "encoder." if keys.has("encoder.patch_embed.proj.weight") else ""
    if not keys.has(f"{prefix}patch_embed.proj.weight"):
        raise ConversionError(f"{keys.origin}: no (encoder.)patch_embed.proj.weight: not a VideoMAE checkpoint")
    dim, chans, tubelet, patch, _ = keys.state[f"{prefix}patch_embed.proj.weight"].shape
    grid = (num_frames // tubelet, image_size // patch, image_size // patch)
    depth = _count_blocks(keys, f"{prefix}blocks.")
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
        blocks=_timm_blocks(keys, f"{prefix}blocks.", depth, dim, videomae=True),
        norm=None if finetuned else _norm(keys, f"{prefix}norm", dim),
    )
    source = Source(kind="videomae", finetuned=finetuned, embed_dim=dim, branches={"video": branch})
    source.notes["pos_embed"] = pos_note
    if finetuned:
        source.head = _head(keys, "fc_norm", "head", dim)
    keys.drop(r"^(decoder\.|encoder_to_decoder\.|mask_token$)", "the VideoMAE decoder: avmae's decoders are built differently")
    keys.drop(r"^encoder\.head\.", "the pretraining encoder's empty head")
    return source


def read_cavmae(keys: SourceKeys, num_mel_bins: int = 128) -> Source:
    """``CAVMAE`` (pretrained) or ``CAVMAEFT`` (finetuned, ``mlp_head``)."""
    if not keys.has("patch_embed_a.proj.weight") or not keys.has("blocks_u.0.norm1_a.weight"):
        raise ConversionError(f"{keys.origin}: no patch_embed_a / blocks_u.0.norm1_a: not a CAV-MAE checkpoint")
    dim, _, patch, _ = keys.state["patch_embed_a.proj.weight"].shape
    specific, joint = _count_blocks(keys, "blocks_a."), _count_blocks(keys, "blocks_u.")
    if _count_blocks(keys, "blocks_v.") != specific:
        raise ConversionError(f"{keys.origin}: blocks_a and blocks_v differ in depth")
    freq = num_mel_bins // patch
    audio_tokens = keys.state["pos_embed_a"].shape[1]
    video_tokens = keys.state["pos_embed_v"].shape[1]
    side = math.isqrt(video_tokens)
    time = audio_tokens // freq
    hidden = _hidden(keys, "blocks_u.")
    shapes = _block_shapes(dim, hidden)

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
        blocks=_timm_blocks(keys, "blocks_a.", specific, dim) + per_modality["a"],
        norm=_norm(keys, "norm_a", dim),
        modality_embed=keys.take("modality_a", (1, 1, dim)),
    )
    video = Branch(
        patch_weight=keys.take("patch_embed_v.proj.weight", (dim, 3, patch, patch))[:, :, None],
        patch_bias=keys.take("patch_embed_v.proj.bias", (dim,)),
        pos=keys.take("pos_embed_v", (1, video_tokens, dim)),
        grid=(1, side, side),
        blocks=_timm_blocks(keys, "blocks_v.", specific, dim) + per_modality["v"],
        norm=_norm(keys, "norm_v", dim),
        modality_embed=keys.take("modality_v", (1, 1, dim)),
    )
    finetuned = keys.has("mlp_head.1.weight")
    source = Source(
        kind="cavmae", finetuned=finetuned, embed_dim=dim, branches={"video": video, "audio": audio},
        joint_blocks=shared, joint_norm=_norm(keys, "norm", dim),
    )
    if finetuned:
        source.head = _head(keys, "mlp_head.0", "mlp_head.1", dim)
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


READERS = {"mae": read_mae, "audiomae": read_audiomae, "videomae": read_videomae, "cavmae": read_cavmae}


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
    from avmae.models import SIZES

    for name, size in SIZES.items():
        if size.embed_dim == embed_dim and size.depth == depth:
            return name
    known = ", ".join(f"{n} ({s.embed_dim} wide, {s.depth} deep)" for n, s in SIZES.items())
    raise ConversionError(f"no avmae model size is {embed_dim} wide and {depth} deep (known: {known})")


def default_config(source: Source) -> Config:
    """The avmae config of the source network at its own input geometry and preprocessing."""
    cfg = Config()
    model = {
        "size": size_name(source.embed_dim, source.depth),
        "learned_pos_embed": True,
        "cls_token": any(b.cls is not None for b in source.branches.values()),
        "modality_embed": any(b.modality_embed is not None for b in source.branches.values()),
        # finetuned MAE-family models norm the pooled token (fc_norm) instead; CAV-MAE keeps its norms
        "final_norm": not source.finetuned or source.kind == "cavmae",
        "drop_path": 0.0,
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
    return Branch(
        patch_weight=video.patch_weight[:, :, 0].sum(dim=1, keepdim=True),
        patch_bias=video.patch_bias,
        pos=video.pos,
        grid=video.grid,
        blocks=video.blocks,
        norm=video.norm,
        cls=video.cls,
        modality_embed=video.modality_embed,
    )


def encoder_state(source: Source, cfg: Config, modalities: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of ``build_encoder(cfg, modalities)`` filled from ``source``, and notes.

    Raises when a key of the encoder cannot be filled (``notes["initialised"]`` lists those left
    at their initial value on purpose: modality embeddings and class tokens a source lacks, and
    audio positions when the source is an image network).
    """
    from avmae.models import build_encoder
    from avmae.models.pos_embed import RESAMPLE_METHOD, resample_table

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
        from avmae.models import model_grids

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
) -> Path:
    """Convert ``checkpoint`` (a ``kind`` source) into the export folder ``out_dir``.

    ``config``: a target avmae config (e.g. a CAV-MAE pretraining config to start from ImageNet
    MAE); default: the source's own architecture, geometry and preprocessing
    (``default_config``). ``num_frames`` / ``image_size`` / ``audio_seconds``: another input
    geometry; stored positional tables are resampled to it (the method lands in config.json).
    ``part``: ``encoder``, ``audio`` or ``video`` (default: the source's modalities).
    A finetuned source also gets ``out_dir/classifier`` (classifier weights + ``config.yaml``),
    which ``tools/eval.py`` runs directly.
    """
    from avmae.export import write_export
    from avmae.models import build_encoder

    source = read(kind, checkpoint)
    cfg = config if config is not None else default_config(source)
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
    from avmae.engine.finetune import save_finetuned
    from avmae.models import build_classifier

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


# ---------------------------------------------------------------------------------------------
# checking a conversion against the source repository's own model code


class CheckSkipped(RuntimeError):
    """The source repository's model code is not importable here (the reason is the message)."""


SOURCE_MODULES = {
    "mae": ("models_mae", "models_vit"),
    "audiomae": ("models_mae", "models_vit"),
    "videomae": ("modeling_pretrain", "modeling_finetune"),
    "cavmae": ("models.cav_mae",),
}


def _import_source(kind: str, repo: str | Path | None):
    """The source repository's model modules; ``repo`` is its checkout (``src/`` for CAV-MAE is
    found by itself), else they must already be importable."""
    import importlib
    import sys

    # CAV-MAE's constructors replace timm's Block and PatchEmbed module-wide; avmae's model code
    # must have bound timm's own classes before that happens.
    import avmae.models  # noqa: F401

    if repo is not None:
        root = Path(repo)
        if kind == "cavmae" and (root / "src").is_dir():
            root = root / "src"
        if not root.is_dir():
            raise CheckSkipped(f"source repository folder not found: {repo}")
        sys.path.insert(0, str(root))
    for name in SOURCE_MODULES[kind]:  # several sources name their module models_mae
        sys.modules.pop(name, None)
    _source_compat()
    try:
        return [importlib.import_module(name) for name in SOURCE_MODULES[kind]]
    except Exception as err:
        raise CheckSkipped(f"the {kind} model code is not importable ({type(err).__name__}: {err})") from err


def _source_compat() -> None:
    """The source codebases wrote their models against timm 0.3-0.4, whose ViT ``Block`` took ``qk_scale``
    (always None in their models), and NumPy < 1.24, which had ``np.float``; current versions
    have neither. Accept and ignore a None ``qk_scale``; alias ``np.float`` to ``float``."""
    import sys
    import types

    import numpy as np
    import timm.models.vision_transformer as vt

    if not hasattr(np, "float"):
        np.float = float  # their util/pos_embed.py builds the sine-cosine tables with it
    if "torch._six" not in sys.modules:  # removed in torch 2.0; AudioMAE's util/misc.py imports inf from it
        six = types.ModuleType("torch._six")
        six.inf = math.inf
        sys.modules["torch._six"] = six

    for cls in (vt.Block, vt.Attention):
        if getattr(cls.__init__, "_avmae_compat", False):
            continue
        cls.__init__ = _without_qk_scale(cls.__init__)


def _without_qk_scale(original):
    def init(self, *args, qk_scale=None, **kwargs):
        if qk_scale is not None:
            raise ValueError("qk_scale is not supported by this timm")
        original(self, *args, **kwargs)

    init._avmae_compat = True
    return init


def _load_source(model, state: dict, origin: str, allow_missing: str | None = None) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not (allow_missing and re.match(allow_missing, k))]
    if bad_missing or unexpected:
        raise ConversionError(
            f"{origin}: the source model code rejects the checkpoint: missing {bad_missing}, unexpected {unexpected}"
        )


def _one_modality(classifier_dir: Path, modality: str):
    """The audiovisual classifier of ``classifier_dir`` restricted to one modality."""
    from avmae.config import load_config
    from avmae.models import build_classifier

    cfg = load_config(classifier_dir / "config.yaml", [f"finetune.modalities={modality}"])
    model = build_classifier(cfg, dict(cfg.finetune.heads))
    state = load_file(str(classifier_dir / "model.safetensors"))
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    return model.eval()


def check(kind: str, checkpoint: str | Path, out_dir: str | Path, repo: str | Path | None = None, seed: int = 0) -> dict:
    """Features (or logits, for a finetuned source) of the converted export against those of the
    source repository's own model with the same checkpoint, on one random input.

    Returns ``{"compared": ..., "max_abs_diff": ..., "max_abs_value": ...}``; raises
    ``CheckSkipped`` when the source's model code cannot be imported.
    """
    from functools import partial

    from torch import nn

    from avmae.export import export_config, from_pretrained, read_export

    description = read_export(out_dir)
    cfg = export_config(out_dir)
    encoder = from_pretrained(out_dir)
    modules = _import_source(kind, repo)
    state = read_source(checkpoint)
    size = __import__("avmae.models", fromlist=["get_size"]).get_size(cfg.model.size)
    dim, depth, heads = size.embed_dim, size.depth, size.num_heads
    norm = partial(nn.LayerNorm, eps=1e-6)
    finetuned = description["conversion"]["finetuned"]
    torch.manual_seed(seed)
    video_size, patch = cfg.data.video.size, cfg.model.patch_size
    frames, bins = cfg.data.audio.target_length, cfg.data.audio.num_mel_bins
    classifier = None
    if finetuned:
        from avmae.engine.finetune import load_finetuned

        classifier, _ = load_finetuned(Path(out_dir) / "classifier")

    def decoder_dims(prefix: str = "decoder_") -> dict:
        if f"{prefix}embed.weight" not in state:
            return {}
        width = state[f"{prefix}embed.weight"].shape[0]
        count = len({k.split(".")[1] for k in state if k.startswith(f"{prefix}blocks.")})
        return {"decoder_embed_dim": width, "decoder_depth": count, "decoder_num_heads": 16 if width % 16 == 0 else 1}

    def unshuffle(latent, ids_restore):
        tokens = latent[:, 1:]
        return torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, tokens.shape[-1]))

    with torch.no_grad():
        if kind in ("mae", "audiomae"):
            models_mae, models_vit = modules
            if kind == "mae":
                x = torch.randn(1, 3, video_size, video_size)
                ours_in = {"video": x[:, :, None]}
                geometry = dict(img_size=video_size, in_chans=3)
            else:
                x = torch.randn(1, 1, frames, bins)
                ours_in = {"audio": x}
                geometry = dict(img_size=(frames, bins), in_chans=1)
            if finetuned:
                extra = {"mask_2d": False} if kind == "audiomae" else {}
                source_model = models_vit.VisionTransformer(
                    patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=size.mlp_ratio,
                    qkv_bias=True, norm_layer=norm, global_pool=True, num_classes=state["head.weight"].shape[0],
                    **geometry, **extra,
                ).eval()
                _load_source(source_model, state, kind)
                theirs = source_model.head(source_model.forward_features(x))
                ours = classifier(**ours_in)["label"]
                compared = "logits"
            else:
                extra = {"audio_exp": True} if kind == "audiomae" else {}
                source_model = models_mae.MaskedAutoencoderViT(
                    patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=size.mlp_ratio,
                    norm_layer=norm, **geometry, **extra,
                ).eval()
                # the encoder only (AudioMAE's released decoder is a Swin stack of an older timm)
                encoder_only = {k: v for k, v in state.items() if not re.match(r"^(decoder_|mask_token$)", k)}
                _load_source(source_model, encoder_only, kind, allow_missing=r"^(decoder_|mask_token$)")
                latent, _, ids_restore = source_model.forward_encoder(x, 0.0)[:3]
                theirs = unshuffle(latent, ids_restore)
                ours = encoder.forward_features(**ours_in)[next(iter(ours_in))]
                compared = "encoder tokens"
        elif kind == "videomae":
            modeling_pretrain, modeling_finetune = modules
            x = torch.randn(1, 3, cfg.data.video.num_frames, video_size, video_size)
            common = dict(img_size=video_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                          mlp_ratio=size.mlp_ratio, qkv_bias=True, norm_layer=norm, tubelet_size=cfg.model.tubelet)
            if finetuned:
                source_model = modeling_finetune.VisionTransformer(
                    num_classes=state["head.weight"].shape[0], all_frames=cfg.data.video.num_frames, **common
                ).eval()
                _load_source(source_model, state, kind)
                theirs, ours, compared = source_model(x), classifier(video=x)["label"], "logits"
            else:
                common = {k: v for k, v in common.items() if k not in ("embed_dim", "depth", "num_heads")}
                source_model = modeling_pretrain.PretrainVisionTransformerEncoder(
                    embed_dim=dim, depth=depth, num_heads=heads, num_classes=0, init_values=0.0, **common
                ).eval()
                encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
                _load_source(source_model, encoder_state, kind)
                mask = torch.zeros(1, source_model.patch_embed.num_patches, dtype=torch.bool)
                theirs, ours, compared = source_model(x, mask), encoder.forward_features(video=x)["video"], "encoder tokens"
        else:  # cavmae
            (cav_mae,) = modules
            audio_len = frames
            a = torch.randn(1, audio_len, bins)
            v = torch.randn(1, 3, video_size, video_size)
            common = dict(img_size=video_size, audio_length=audio_len, patch_size=patch, embed_dim=dim,
                          modality_specific_depth=depth - cfg.model.fusion_layers, num_heads=heads,
                          mlp_ratio=size.mlp_ratio)
            ours_audio_in = a[:, None]  # (B, 1, T, F): time first, as avmae feeds it
            if finetuned:
                source_model = cav_mae.CAVMAEFT(label_dim=state["mlp_head.1.weight"].shape[0], **common).eval()
                _load_source(source_model, state, kind)
                audio_only, video_only = (_one_modality(Path(out_dir) / "classifier", m) for m in ("audio", "video"))
                theirs = torch.cat([source_model(a, v, mode) for mode in ("multimodal", "audioonly", "videoonly")], dim=1)
                ours = torch.cat([
                    classifier(video=v[:, :, None], audio=ours_audio_in)["label"],
                    audio_only(audio=ours_audio_in)["label"], video_only(video=v[:, :, None])["label"],
                ], dim=1)  # fmt: skip
                compared = "logits (multimodal, audio-only and video-only modes)"
            else:
                source_model = cav_mae.CAVMAE(norm_pix_loss=True, **common, **{
                    k: v for k, v in decoder_dims().items()
                }).eval()
                _load_source(source_model, state, kind)
                their_a, their_v = source_model.forward_feat(a, v)
                # their audio tokens are frequency-major: reorder to avmae's time-major order
                grid_t, grid_f = audio_len // patch, bins // patch
                their_a = their_a.reshape(1, grid_f, grid_t, -1).transpose(1, 2).reshape(1, grid_t * grid_f, -1)
                ours_a = encoder.forward_features(audio=ours_audio_in)["audio"]
                ours_v = encoder.forward_features(video=v[:, :, None])["video"]
                theirs, ours = torch.cat([their_a, their_v], dim=1), torch.cat([ours_a, ours_v], dim=1)
                compared = "per-modality encoder tokens (forward_feat)"
    if theirs.shape != ours.shape:
        raise ConversionError(f"check: source output {tuple(theirs.shape)} vs converted {tuple(ours.shape)}")
    return {
        "compared": compared,
        "max_abs_diff": (theirs - ours).abs().max().item(),
        "max_abs_value": theirs.abs().max().item(),
    }
