"""The parity check (avmae.convert.parity, ``tools/convert.py --check``) against stand-in source
checkouts written here, with the released code's conventions:

- ``source_code``: the source repositories' model code runs on current timm, NumPy and torch inside
  the block, and everything changed for it, or by it, is put back on leaving (np.float, torch._six,
  qk_scale, CAV-MAE's replacement of timm's classes). Only a missing checkout or module is skipped.
- ``check``: a model built by the stand-in code (MAE's finetuned and pretraining models, CAV-MAE's
  finetuned one), with random weights (every LayerNorm moved away from 1 and 0), is converted and
  compared with the stand-in's own output. It passes
  with the source's LayerNorm eps and fails, also as the exit status of ``tools/convert.py
  --check``, when the stand-in's eps is not the one the converter writes.

The stand-ins follow the facts of the released files: facebookresearch/mae ``models_vit.py``
(timm's ViT subclassed for global pooling under ``fc_norm``; the ``vit_*`` factories set
``norm_layer=partial(nn.LayerNorm, eps=1e-6)``) and ``models_mae.py`` (``cls_token``, ``pos_embed``
with the class position first, timm blocks, ``norm``; ``forward_encoder`` returning the latent, the
mask and ``ids_restore``; the ``mae_vit_*`` factories set the same norm) and YuanGongND/cav-mae ``src/models/cav_mae.py``
(``CAVMAEFT``: ``blocks_a/v/u`` whose blocks carry ``norm1/2`` plus ``_a``/``_v`` copies, 12 layers
in all, ``norm_a/v``, ``norm``, ``mlp_head`` = LayerNorm + Linear on the mean token, the fbank fed as
``(B, T, 128)`` and transposed; ``norm_layer=nn.LayerNorm``, PyTorch's eps 1e-5).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm.models.vision_transformer as vt

from avmae.convert import CheckSkipped, check, convert, random_source_checkpoint, source_code

REPO = Path(__file__).resolve().parents[1]

MODELS_MAE = '''
"""MAE's pretraining model (its encoder, and the decoder's first layer), and what the released
code does at import and construction time."""
from functools import partial

import numpy as np
import timm.models.vision_transformer as vt
import torch
from torch import nn
from torch._six import inf

import helper_util

FLOAT = np.float


class PatchEmbed(vt.PatchEmbed):
    pass


def build():
    vt.PatchEmbed = PatchEmbed  # CAV-MAE's constructors do this to timm, module-wide
    return vt.Block(dim=8, num_heads=2, qkv_bias=True, qk_scale=None)


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = vt.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            vt.Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))

    def forward_encoder(self, x, mask_ratio):
        """With mask_ratio 0 only: every token kept, in order (ids_restore is the identity)."""
        assert mask_ratio == 0
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        keep = torch.arange(tokens.shape[1] - 1).expand(len(tokens), -1)
        return self.norm(tokens), torch.zeros(keep.shape), keep


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
'''

MODELS_VIT = '''
"""MAE's finetuned ViT: timm's, pooling the mean patch token under fc_norm (global_pool)."""
from functools import partial

import timm.models.vision_transformer as vt
import torch
from torch import nn


class VisionTransformer(vt.VisionTransformer):
    def __init__(self, global_pool=False, **kwargs):
        super().__init__(**kwargs)
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = kwargs["norm_layer"](kwargs["embed_dim"])
            del self.norm

    def forward_features(self, x):
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return self.norm(tokens)[:, 0]


def vit_base_patch16(**kwargs):
    return VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_large_patch16(**kwargs):
    return VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
'''

CAV_MAE = '''
"""CAV-MAE's finetuned model: per-modality stacks, joint layers with a norm pair per stream."""
import timm.models.vision_transformer as vt
import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """timm's pre-norm block plus a norm pair for each stream: '' (joint), '_a', '_v'."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm):
        super().__init__()
        for tag in ("", "_a", "_v"):
            setattr(self, "norm1" + tag, norm_layer(dim))
            setattr(self, "norm2" + tag, norm_layer(dim))
        self.attn = vt.Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.mlp = vt.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, modality=None):
        tag = {None: "", "a": "_a", "v": "_v"}[modality]
        x = x + self.attn(getattr(self, "norm1" + tag)(x))
        return x + self.mlp(getattr(self, "norm2" + tag)(x))


class CAVMAEFT(nn.Module):
    def __init__(self, label_dim, img_size=224, audio_length=1024, patch_size=16, in_chans=3, embed_dim=768,
                 modality_specific_depth=11, num_heads=12, mlp_ratio=4.0, norm_layer=nn.LayerNorm,
                 norm_pix_loss=False, tr_pos=True):
        super().__init__()
        vt.Block, vt.PatchEmbed = Block, PatchEmbed  # as the released constructors do
        self.patch_embed_a = PatchEmbed(img_size, patch_size, 1, embed_dim)
        self.patch_embed_v = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        audio_tokens = (audio_length // patch_size) * (128 // patch_size)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, audio_tokens, embed_dim), requires_grad=tr_pos)
        self.pos_embed_v = nn.Parameter(torch.zeros(1, self.patch_embed_v.num_patches, embed_dim), requires_grad=tr_pos)

        def stack(count):
            return nn.ModuleList(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
                for _ in range(count)
            )

        self.blocks_a, self.blocks_v = stack(modality_specific_depth), stack(modality_specific_depth)
        self.blocks_u = stack(12 - modality_specific_depth)
        self.norm_a, self.norm_v, self.norm = norm_layer(embed_dim), norm_layer(embed_dim), norm_layer(embed_dim)
        self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, label_dim))

    def embed_audio(self, a):
        a = a.unsqueeze(1).transpose(2, 3)  # (B, 1, 128, T): frequency-major tokens
        x = self.patch_embed_a(a) + self.pos_embed_a + self.modality_a
        for block in self.blocks_a:
            x = block(x)
        return x

    def embed_video(self, v):
        x = self.patch_embed_v(v) + self.pos_embed_v + self.modality_v
        for block in self.blocks_v:
            x = block(x)
        return x

    def forward(self, a, v, mode):
        if mode == "multimodal":
            x, stream, norm = torch.cat([self.embed_audio(a), self.embed_video(v)], dim=1), None, self.norm
        elif mode == "audioonly":
            x, stream, norm = self.embed_audio(a), "a", self.norm_a
        else:
            x, stream, norm = self.embed_video(v), "v", self.norm_v
        for block in self.blocks_u:
            x = block(x, stream)
        return self.mlp_head(norm(x).mean(dim=1))
'''

# the stand-in's LayerNorm as released, and another eps that the check must notice
RELEASED = {"mae": "partial(nn.LayerNorm, eps=1e-6)", "cavmae": "norm_layer=nn.LayerNorm,"}
OTHER_EPS = {"mae": "partial(nn.LayerNorm, eps=1e-5)", "cavmae": "norm_layer=partial(nn.LayerNorm, eps=1e-6),"}


def write_checkout(root: Path, kind: str, other_eps: bool = False) -> Path:
    """A stand-in checkout of ``kind``'s repository at ``root``; ``other_eps``: its LayerNorm eps changed."""
    if kind == "mae":
        files = {"models_mae.py": MODELS_MAE, "models_vit.py": MODELS_VIT, "helper_util.py": "HELPER = True\n"}
    else:
        files = {"src/models/__init__.py": "", "src/models/cav_mae.py": "from functools import partial\n" + CAV_MAE}
    for name, text in files.items():
        if other_eps and RELEASED[kind] in text:
            text = text.replace(RELEASED[kind], OTHER_EPS[kind])
            assert OTHER_EPS[kind] in text
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def checkout(tmp_path):
    return write_checkout(tmp_path / "mae", "mae")


def _state():
    return {
        "path": list(sys.path),
        "np.float": hasattr(np, "float"),
        "torch._six": "torch._six" in sys.modules,
        "PatchEmbed": vt.PatchEmbed,
        "Block": vt.Block,
        "Block.__init__": vt.Block.__init__,
        "Attention.__init__": vt.Attention.__init__,
        "source modules": sorted({"models_mae", "models_vit", "helper_util", "models", "models.cav_mae"} & set(sys.modules)),
    }


def test_source_code_runs_inside_and_leaves_nothing_behind(checkout):
    before = _state()
    assert before["np.float"] is False and before["source modules"] == []
    with source_code("mae", checkout) as (models_mae, models_vit):
        assert models_mae.FLOAT is float and models_mae.inf == float("inf") and callable(models_vit.vit_base_patch16)
        block = models_mae.build()  # qk_scale=None accepted
        assert isinstance(block, vt.Block) and vt.PatchEmbed is models_mae.PatchEmbed
        assert sys.path[0] == str(checkout)
    assert _state() == before
    with pytest.raises(TypeError, match="qk_scale"):  # timm's own Block again
        vt.Block(dim=8, num_heads=2, qk_scale=None)


def test_only_missing_source_code_is_skipped_and_nothing_is_left_behind(checkout):
    before = _state()
    (checkout / "models_vit.py").write_text("raise ImportError('needs timm 0.3.2')\n")
    with pytest.raises(ImportError, match="needs timm 0.3.2"):  # the source is there: its error, not a skip
        with source_code("mae", checkout):
            pass
    assert _state() == before
    (checkout / "models_vit.py").write_text("import torchlibrosa\n")
    with pytest.raises(ModuleNotFoundError, match="torchlibrosa"):  # a dependency of the source is missing
        with source_code("mae", checkout):
            pass
    assert _state() == before
    (checkout / "models_vit.py").unlink()
    with pytest.raises(CheckSkipped, match="models_vit"):
        with source_code("mae", checkout):
            pass
    with pytest.raises(CheckSkipped, match="not found"):
        with source_code("mae", checkout / "absent"):
            pass
    with pytest.raises(CheckSkipped, match="models.cav_mae"):  # a folder without CAV-MAE's src/models
        with source_code("cavmae", checkout):
            pass
    assert _state() == before


# CAVMAEFT is 12 layers deep whatever its width: avmae's 12-layer "tiny" size
SIZE = {"mae": "micro", "cavmae": "tiny"}
SOURCE_EPS = {"mae": 1e-6, "cavmae": 1e-5}


@pytest.mark.parametrize("kind,finetuned", [("mae", True), ("mae", False), ("cavmae", True)])
def test_check_passes_with_the_source_eps_and_fails_with_another(kind, finetuned, tmp_path):
    size, source_eps = SIZE[kind], SOURCE_EPS[kind]
    results = {}
    for other_eps in (False, True):
        name = "other" if other_eps else "released"
        repo = write_checkout(tmp_path / name, kind, other_eps)
        before = _state()
        checkpoint = random_source_checkpoint(kind, tmp_path / f"{name}.pth", repo, size=size, finetuned=finetuned)
        out = convert(kind, checkpoint, tmp_path / f"{name}_out")
        assert json.loads((out / "config.json").read_text())["config"]["model"]["norm_eps"] == source_eps
        results[name] = check(kind, checkpoint, out, repo)
        assert _state() == before
    released, other = results["released"], results["other"]
    assert released["compared"].startswith("logits" if finetuned else "encoder tokens")
    assert released["source_norm_eps"] == released["norm_eps"] == source_eps
    assert released["passed"] and released["relative_diff"] <= released["tolerance"] == 1e-5
    assert released["relative_diff"] == pytest.approx(released["max_abs_diff"] / released["max_abs_value"])
    assert other["source_norm_eps"] != other["norm_eps"] == source_eps
    assert not other["passed"] and other["relative_diff"] > 10 * other["tolerance"]


def test_tools_convert_check_exit_status(tmp_path, capsys):
    """The command line, as a separate process: exit 0 within the tolerance, 1 past it."""

    def run(repo: Path, name: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "tools" / "convert.py"), "--from", "mae", str(tmp_path / f"{name}.pth"),
                   str(tmp_path / f"{name}_out"), "--random-weights", "micro", "--check", "--source-repo", str(repo)]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)

    released = run(write_checkout(tmp_path / "released", "mae"), "released")
    assert released.returncode == 0, released.stdout + released.stderr
    assert "passed, relative difference" in released.stdout and "eps: source 1e-06, converted 1e-06" in released.stdout
    other = run(write_checkout(tmp_path / "other", "mae", other_eps=True), "other")
    assert other.returncode == 1, other.stdout + other.stderr
    assert "FAILED" in other.stdout and "eps: source 1e-05, converted 1e-06" in other.stdout
    # the same conversion passes a looser --tolerance; an absent checkout is skipped (exit 0)
    tool = _tool("convert")
    common = ["--from", "mae", str(tmp_path / "other.pth"), str(tmp_path / "again"), "--check"]
    assert tool.main([*common, "--source-repo", str(tmp_path / "other"), "--tolerance", "0.5"]) == 0
    assert "passed" in capsys.readouterr().out
    assert tool.main([*common, "--source-repo", str(tmp_path / "absent")]) == 0
    assert "check skipped: source repository folder not found" in capsys.readouterr().out


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
