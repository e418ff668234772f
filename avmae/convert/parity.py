"""``check``: a conversion against the source repository's own model code, on one random input,
as the relative difference ``max |ours - theirs| / max |theirs|`` against a tolerance.
``random_source_checkpoint``: the source's own model with random weights (every LayerNorm moved
away from 1 and 0, so that its eps shows), saved as the source saves it. The source code is
imported and run inside ``source_code`` only, which puts back everything it changes to make that
code run on current timm and NumPy (sys.path, sys.modules, NumPy and timm attributes).
docs/checkpoints.md.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
import types
from contextlib import contextmanager
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
    """The source repository's model code is not here: its folder or its module is missing (the
    reason is the message). Any other failure of the source code is raised as it is."""


# float32 rounding between two implementations of the same network stays well below this
# (docs/checkpoints.md); a LayerNorm eps of 1e-5 instead of 1e-6 does not
DEFAULT_TOLERANCE = 1e-5


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
    packages = {name.rsplit(".", 1)[0] for name in names if "." in name}  # CAV-MAE's ``models``
    saved_path = list(sys.path)
    saved_modules = {name: sys.modules[name] for name in (*names, *packages) if name in sys.modules}
    before = set(sys.modules)
    saved_timm = dict(vars(vt))
    saved_inits = {cls: cls.__init__ for cls in (vt.Block, vt.Attention)}
    added_float = not hasattr(np, "float")
    if root is not None:
        sys.path.insert(0, str(root))
    for name in (*names, *packages):
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
        except ModuleNotFoundError as err:
            if err.name not in (*names, *packages):
                raise  # the source is there but one of its own imports fails: not a skip
            where = f"in {root}" if root is not None else "on sys.path (give --source-repo)"
            raise CheckSkipped(f"the {kind} model code ({', '.join(names)}) is not {where}") from err
        yield modules
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            from_checkout = root is not None and file is not None and Path(file).resolve().is_relative_to(root.resolve())
            if name in names or name in packages or name == "torch._six" or from_checkout:
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


# geometry of ``random_source_checkpoint``'s models: small, and what each reader expects
# (VideoMAE's fixed sine table is read as 16 frames of 224 px)
RANDOM_GEOMETRY = {
    "mae": {"image": 32}, "audiomae": {"audio_frames": 64}, "videomae": {"frames": 16, "image": 224, "tubelet": 2},
    "cavmae": {"image": 32, "audio_frames": 64},
}
NUM_MEL_BINS = 128  # every audio source's fbank
# what forms the tokens before the first LayerNorm (patch kernels, positions, class and modality
# tokens); scaled down in random weights so that the tokens' variance is not far above the eps
EMBEDDING = re.compile(r"^(patch_embed\w*\.|pos_embed|cls_token|modality_)")
EMBEDDING_SCALE = 0.03


class _Built(Exception):
    """Raised by the stand-in class while reading a factory's arguments."""


def source_norm_layer(module: types.ModuleType, class_name: str, factory_prefix: str | None = None):
    """The LayerNorm the source builds ``class_name`` with: what its factory functions (module
    functions named ``factory_prefix*``, e.g. MAE's ``vit_base_patch16``) pass as ``norm_layer``,
    else the class's own default (CAV-MAE builds ``CAVMAEFT`` directly). Read from the source
    code, so that the check never supplies the eps it is meant to check."""
    cls = getattr(module, class_name)
    parameter = inspect.signature(cls).parameters.get("norm_layer")  # MAE's subclass of timm's takes **kwargs
    default = parameter.default if parameter is not None else inspect.Parameter.empty
    factories = [
        f for name, f in vars(module).items()
        if factory_prefix and name.startswith(factory_prefix) and inspect.isfunction(f) and f.__module__ == module.__name__
    ]  # fmt: skip
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("norm_layer", default))
        raise _Built

    setattr(module, class_name, record)
    try:
        for factory in factories:
            try:
                factory()
            except _Built:
                pass
    finally:
        setattr(module, class_name, cls)
    seen = [norm for norm in seen if norm is not inspect.Parameter.empty]
    if not seen and default is inspect.Parameter.empty:
        raise ConversionError(f"{module.__name__}: no {factory_prefix}* factory and no norm_layer default for {class_name}")
    epss = {norm(8).eps for norm in seen} or {default(8).eps}
    if len(epss) > 1:
        raise ConversionError(f"{module.__name__}: its {class_name} factories disagree on the LayerNorm eps: {sorted(epss)}")
    return seen[0] if seen else default


def _source_classifier(kind: str, modules: list, dim: int, depth: int, heads: int, mlp_ratio: float, patch: int,
                       geometry: dict, num_classes: int, fusion_layers: int = 1) -> nn.Module:
    """The finetuned model of the source's code, with the source's own LayerNorm."""
    if kind in ("mae", "audiomae"):
        models_vit = modules[1]
        if kind == "mae":
            extra = dict(img_size=geometry["image"], in_chans=3)
        else:
            extra = dict(img_size=(geometry["audio_frames"], NUM_MEL_BINS), in_chans=1, mask_2d=False)
        return models_vit.VisionTransformer(
            patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            norm_layer=source_norm_layer(models_vit, "VisionTransformer", "vit_"), global_pool=True,
            num_classes=num_classes, **extra,
        )  # fmt: skip
    if kind == "videomae":
        modeling_finetune = modules[1]
        return modeling_finetune.VisionTransformer(
            img_size=geometry["image"], patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=source_norm_layer(modeling_finetune, "VisionTransformer", "vit_"),
            tubelet_size=geometry["tubelet"], num_classes=num_classes, all_frames=geometry["frames"],
        )  # fmt: skip
    (cav_mae,) = modules
    return cav_mae.CAVMAEFT(
        label_dim=num_classes, img_size=geometry["image"], audio_length=geometry["audio_frames"], patch_size=patch,
        embed_dim=dim, modality_specific_depth=depth - fusion_layers, num_heads=heads, mlp_ratio=mlp_ratio,
        norm_layer=source_norm_layer(cav_mae, "CAVMAEFT"),
    )  # fmt: skip


def _source_pretrained(kind: str, modules: list, dim: int, depth: int, heads: int, mlp_ratio: float,
                       patch: int, geometry: dict) -> nn.Module:
    """The pretraining model of the source's code, with the source's own LayerNorm and a small
    decoder (1 layer, 64 wide: the converters drop it)."""
    if kind in ("mae", "audiomae"):
        models_mae = modules[0]
        if kind == "mae":
            extra = dict(img_size=geometry["image"], in_chans=3)
        else:
            extra = dict(img_size=(geometry["audio_frames"], NUM_MEL_BINS), in_chans=1, audio_exp=True)
        return models_mae.MaskedAutoencoderViT(
            patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
            decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=16,
            norm_layer=source_norm_layer(models_mae, "MaskedAutoencoderViT", "mae_vit_"), **extra,
        )  # fmt: skip
    if kind == "videomae":
        modeling_pretrain = modules[0]
        return modeling_pretrain.PretrainVisionTransformer(
            img_size=geometry["image"], patch_size=patch, encoder_embed_dim=dim, encoder_depth=depth,
            encoder_num_heads=heads, encoder_num_classes=0, decoder_num_classes=3 * geometry["tubelet"] * patch * patch,
            decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=16, mlp_ratio=mlp_ratio, qkv_bias=True,
            norm_layer=source_norm_layer(modeling_pretrain, "PretrainVisionTransformer", "pretrain_videomae_"),
            tubelet_size=geometry["tubelet"],
        )  # fmt: skip
    (cav_mae,) = modules
    return cav_mae.CAVMAE(
        img_size=geometry["image"], audio_length=geometry["audio_frames"], patch_size=patch, embed_dim=dim,
        modality_specific_depth=depth - 1, num_heads=heads, decoder_embed_dim=64, decoder_depth=1,
        decoder_num_heads=16, mlp_ratio=mlp_ratio, norm_layer=source_norm_layer(cav_mae, "CAVMAE"), norm_pix_loss=True,
    )  # fmt: skip


def random_source_checkpoint(kind: str, path: str | Path, repo: str | Path | None = None, size: str = "micro",
                             finetuned: bool = True, num_classes: int = 5, seed: int = 0) -> Path:
    """A finetuned (else pretraining) model of the source's own code (``RANDOM_GEOMETRY``, avmae's
    ``size``) with random weights, saved as the source's training code saves it: ``{"model": state_dict}`` for
    MAE, AudioMAE and VideoMAE, a ``DataParallel`` state dict (``module.`` keys) for CAV-MAE.
    Every parameter gets noise; every LayerNorm weight is drawn from U(0.5, 1.5) and its bias from
    N(0, 0.1), and the embedding (``EMBEDDING``) is scaled by ``EMBEDDING_SCALE``, so that a
    LayerNorm eps other than the source's shows in ``check``. CAV-MAE's
    ``CAVMAEFT`` is always 12 layers deep (1 joint): give it a 12-layer size. Plain tensors that
    are not parameters (VideoMAE's sine table) are left as the source builds them."""
    spec = get_size(size)
    torch.manual_seed(seed)
    with source_code(kind, repo) as modules:
        dims = (spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio, 16, RANDOM_GEOMETRY[kind])
        if finetuned:
            model = _source_classifier(kind, modules, *dims, num_classes)
        else:
            model = _source_pretrained(kind, modules, *dims)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                else:
                    for p in module.parameters(recurse=False):
                        p.add_(0.02 * torch.randn_like(p))
            for name, p in model.named_parameters():
                if EMBEDDING.search(name):
                    p.mul_(EMBEDDING_SCALE)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "cavmae":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save({"model": state}, path)
    return path


def check(kind: str, checkpoint: str | Path, out_dir: str | Path, repo: str | Path | None = None, seed: int = 0,
          tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Features (or logits, for a finetuned source) of the converted export against those of the
    source repository's own model with the same checkpoint and the source's own LayerNorm (read
    from its code by ``source_norm_layer``), on one random input.

    Returns ``compared``, ``max_abs_diff``, ``max_abs_value`` (of the source's output),
    ``relative_diff`` = max_abs_diff / max_abs_value, ``tolerance``, ``passed`` (relative_diff <=
    tolerance) and both LayerNorm eps (``source_norm_eps``, the export's ``norm_eps``). Raises
    ``CheckSkipped`` when the source's model code is not there; any other error of the source code
    is raised as it is.
    """
    description = read_export(out_dir)
    cfg = export_config(out_dir)
    encoder = from_pretrained(out_dir)
    state = read_source(checkpoint)
    size = get_size(cfg.model.size)
    dim, depth, heads = size.embed_dim, size.depth, size.num_heads
    finetuned = description["conversion"]["finetuned"]
    torch.manual_seed(seed)
    video_size, patch = cfg.data.video.size, cfg.model.patch_size
    frames, bins = cfg.data.audio.target_length, cfg.data.audio.num_mel_bins
    geometry = {"image": video_size, "frames": cfg.data.video.num_frames, "audio_frames": frames, "tubelet": cfg.model.tubelet}
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
        if finetuned:
            head = state["mlp_head.1.weight"] if kind == "cavmae" else state["head.weight"]
            source_model = _source_classifier(kind, modules, dim, depth, heads, size.mlp_ratio, patch, geometry,
                                              head.shape[0], cfg.model.fusion_layers).eval()  # fmt: skip
            _load_source(source_model, state, kind)
            source_norm = next(m for m in source_model.modules() if isinstance(m, nn.LayerNorm))
        if kind in ("mae", "audiomae"):
            models_mae, models_vit = modules
            if kind == "mae":
                x = torch.randn(1, 3, video_size, video_size)
                ours_in = {"video": x[:, :, None]}
                image = dict(img_size=video_size, in_chans=3)
            else:
                x = torch.randn(1, 1, frames, bins)
                ours_in = {"audio": x}
                image = dict(img_size=(frames, bins), in_chans=1)
            if finetuned:
                theirs = source_model.head(source_model.forward_features(x))
                ours = classifier(**ours_in)["label"]
                compared = "logits"
            else:
                extra = {"audio_exp": True} if kind == "audiomae" else {}
                source_model = models_mae.MaskedAutoencoderViT(
                    patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=size.mlp_ratio,
                    norm_layer=source_norm_layer(models_mae, "MaskedAutoencoderViT", "mae_vit_"), **image, **extra,
                ).eval()
                # the encoder only (AudioMAE's released decoder is a Swin stack of an older timm)
                encoder_only = {k: v for k, v in state.items() if not re.match(r"^(decoder_|mask_token$)", k)}
                _load_source(source_model, encoder_only, kind, allow_missing=r"^(decoder_|mask_token$)")
                source_norm = source_model.norm
                latent, _, ids_restore = source_model.forward_encoder(x, 0.0)[:3]
                theirs = unshuffle(latent, ids_restore)
                ours = encoder.forward_features(**ours_in)[next(iter(ours_in))]
                compared = "encoder tokens"
        elif kind == "videomae":
            modeling_pretrain, modeling_finetune = modules
            x = torch.randn(1, 3, cfg.data.video.num_frames, video_size, video_size)
            if finetuned:
                theirs, ours, compared = source_model(x), classifier(video=x)["label"], "logits"
            else:
                source_model = modeling_pretrain.PretrainVisionTransformerEncoder(
                    img_size=video_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                    mlp_ratio=size.mlp_ratio, qkv_bias=True, tubelet_size=cfg.model.tubelet, num_classes=0,
                    init_values=0.0,
                    norm_layer=source_norm_layer(modeling_pretrain, "PretrainVisionTransformer", "pretrain_videomae_"),
                ).eval()  # fmt: skip
                encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
                _load_source(source_model, encoder_state, kind)
                source_norm = source_model.norm
                mask = torch.zeros(1, source_model.patch_embed.num_patches, dtype=torch.bool)
                theirs, ours, compared = source_model(x, mask), encoder.forward_features(video=x)["video"], "encoder tokens"
        else:  # cavmae
            (cav_mae,) = modules
            a = torch.randn(1, frames, bins)
            v = torch.randn(1, 3, video_size, video_size)
            ours_audio_in = a[:, None]  # (B, 1, T, F): time first, as avmae feeds it
            if finetuned:
                audio_only, video_only = (_one_modality(Path(out_dir) / "classifier", m) for m in ("audio", "video"))
                theirs = torch.cat([source_model(a, v, mode) for mode in ("multimodal", "audioonly", "videoonly")], dim=1)
                ours = torch.cat([
                    classifier(video=v[:, :, None], audio=ours_audio_in)["label"],
                    audio_only(audio=ours_audio_in)["label"], video_only(video=v[:, :, None])["label"],
                ], dim=1)  # fmt: skip
                compared = "logits (multimodal, audio-only and video-only modes)"
            else:
                source_model = cav_mae.CAVMAE(
                    img_size=video_size, audio_length=frames, patch_size=patch, embed_dim=dim,
                    modality_specific_depth=depth - cfg.model.fusion_layers, num_heads=heads, mlp_ratio=size.mlp_ratio,
                    norm_layer=source_norm_layer(cav_mae, "CAVMAE"), norm_pix_loss=True, **decoder_dims(),
                ).eval()  # fmt: skip
                _load_source(source_model, state, kind)
                source_norm = source_model.norm
                their_a, their_v = source_model.forward_feat(a, v)
                # their audio tokens are frequency-major: reorder to avmae's time-major order
                grid_t, grid_f = frames // patch, bins // patch
                their_a = their_a.reshape(1, grid_f, grid_t, -1).transpose(1, 2).reshape(1, grid_t * grid_f, -1)
                ours_a = encoder.forward_features(audio=ours_audio_in)["audio"]
                ours_v = encoder.forward_features(video=v[:, :, None])["video"]
                theirs, ours = torch.cat([their_a, their_v], dim=1), torch.cat([ours_a, ours_v], dim=1)
                compared = "per-modality encoder tokens (forward_feat)"
    if theirs.shape != ours.shape:
        raise ConversionError(f"check: source output {tuple(theirs.shape)} vs converted {tuple(ours.shape)}")
    max_abs_diff = (theirs - ours).abs().max().item()
    max_abs_value = theirs.abs().max().item()
    relative = max_abs_diff / max_abs_value if max_abs_value > 0 else max_abs_diff
    return {
        "compared": compared,
        "max_abs_diff": max_abs_diff,
        "max_abs_value": max_abs_value,
        "relative_diff": relative,
        "tolerance": tolerance,
        "passed": relative <= tolerance,
        "source_norm_eps": source_norm.eps,
        "norm_eps": cfg.model.norm_eps,
    }
