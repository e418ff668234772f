"""``check``: a conversion against the source repository's own model code, on one random input.
The source code is imported and run inside ``source_code`` only, which puts back everything it
changes to make that code run on current timm and NumPy (sys.path, sys.modules, NumPy and timm
attributes). docs/checkpoints.md.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import timm.models.vision_transformer as vt
import torch
from safetensors.torch import load_file
from torch import nn

from avmae.config import load_config
from avmae.convert.source import ConversionError, read_source
from avmae.formats import export_config, from_pretrained, load_finetuned, read_export
from avmae.models import build_classifier, get_size


class CheckSkipped(RuntimeError):
    """The source repository's model code is not importable here (the reason is the message)."""


SOURCE_MODULES = {
    "mae": ("models_mae", "models_vit"),
    "audiomae": ("models_mae", "models_vit"),
    "videomae": ("modeling_pretrain", "modeling_finetune"),
    "cavmae": ("models.cav_mae",),
}


@contextmanager
def source_code(kind: str, repo: str | Path | None):
    """The source repository's model modules, usable inside the block; ``repo`` is its checkout
    (``src/`` for CAV-MAE is found by itself), else they must already be importable.

    The source codebases were written against timm 0.3-0.4, whose ViT ``Block`` took ``qk_scale``
    (always None in their models), NumPy < 1.24, which had ``np.float``, and torch < 2.0, which had
    ``torch._six``. Inside the block a None ``qk_scale`` is accepted and ignored, ``np.float`` is
    ``float`` and ``torch._six.inf`` exists. On leaving, all of that is undone, as are the
    source's own changes to ``timm.models.vision_transformer`` (CAV-MAE's constructors replace its
    ``Block`` and ``PatchEmbed``), ``sys.path``, and the modules imported from the checkout (several
    sources name their module ``models_mae``).
    """
    root = None
    if repo is not None:
        root = Path(repo)
        if kind == "cavmae" and (root / "src").is_dir():
            root = root / "src"
        if not root.is_dir():
            raise CheckSkipped(f"source repository folder not found: {repo}")
    names = SOURCE_MODULES[kind]
    saved_path = list(sys.path)
    saved_modules = {name: sys.modules[name] for name in names if name in sys.modules}
    before = set(sys.modules)
    saved_timm = dict(vars(vt))
    saved_inits = {cls: cls.__init__ for cls in (vt.Block, vt.Attention)}
    added_float = not hasattr(np, "float")
    if root is not None:
        sys.path.insert(0, str(root))
    for name in names:
        sys.modules.pop(name, None)
    if added_float:
        np.float = float  # their util/pos_embed.py builds the sine-cosine tables with it
    if "torch._six" not in sys.modules:  # AudioMAE's util/misc.py imports inf from it
        six = types.ModuleType("torch._six")
        six.inf = math.inf
        sys.modules["torch._six"] = six
    for cls in saved_inits:
        cls.__init__ = _without_qk_scale(cls.__init__)
    try:
        try:
            modules = [importlib.import_module(name) for name in names]
        except Exception as err:
            raise CheckSkipped(f"the {kind} model code is not importable ({type(err).__name__}: {err})") from err
        yield modules
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            from_checkout = root is not None and file is not None and Path(file).resolve().is_relative_to(root.resolve())
            if name in names or name == "torch._six" or from_checkout:
                del sys.modules[name]
        sys.modules.update(saved_modules)
        for cls, init in saved_inits.items():
            cls.__init__ = init
        for attr in set(vars(vt)) - set(saved_timm):
            delattr(vt, attr)
        for attr, value in saved_timm.items():
            if vars(vt).get(attr) is not value:
                setattr(vt, attr, value)
        if added_float:
            del np.float


def _without_qk_scale(original):
    def init(self, *args, qk_scale=None, **kwargs):
        if qk_scale is not None:
            raise ValueError("qk_scale is not supported by this timm")
        original(self, *args, **kwargs)

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
    description = read_export(out_dir)
    cfg = export_config(out_dir)
    encoder = from_pretrained(out_dir)
    state = read_source(checkpoint)
    size = get_size(cfg.model.size)
    dim, depth, heads = size.embed_dim, size.depth, size.num_heads
    norm = partial(nn.LayerNorm, eps=1e-6)
    finetuned = description["conversion"]["finetuned"]
    torch.manual_seed(seed)
    video_size, patch = cfg.data.video.size, cfg.model.patch_size
    frames, bins = cfg.data.audio.target_length, cfg.data.audio.num_mel_bins
    classifier = None
    if finetuned:
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

    with source_code(kind, repo) as modules, torch.no_grad():
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
