"""Converting published MAE, AudioMAE, VideoMAE and CAV-MAE checkpoints (avmae.convert, tools/convert.py).

The checkpoints are built here, at a reduced width and depth (avmae's ``micro`` size: 128 wide,
4 layers, MLP 512), with each source's key names and shapes as its published model definition
has them:

- facebookresearch/mae ``models_mae.py`` / ``models_vit.py``;
- facebookresearch/AudioMAE ``models_mae.py`` / ``models_vit.py``;
- MCG-NJU/VideoMAE ``modeling_pretrain.py`` / ``modeling_finetune.py``;
- YuanGongND/cav-mae ``src/models/cav_mae.py`` (``CAVMAE``, ``CAVMAEFT``).

MAE and AudioMAE are checked against timm's VisionTransformer loaded through timm's own
checkpoint filter; the CAV-MAE audio branch against a timm ViT fed CAV-MAE's transposed fbank.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import decodable_rows, write_manifests
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

import avmae
from avmae.config import load_config
from avmae.convert import ConversionError, convert, read, sinusoid_table
from avmae.formats import read_export

REPO = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS, HIDDEN = 128, 4, 4, 512  # avmae's "micro" size
FINETUNE = REPO / "configs" / "finetune" / "synthetic.yaml"
GEOMETRY = [
    "data.video.num_frames=4", "data.video.resize=32", "data.video.size=32", "data.audio.seconds=1.28",
    "data.batch_size=2", "data.num_workers=0", "data.test_clips=1",
]  # fmt: skip


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- checkpoints with the source codebases' key names and shapes ------------------------------------


def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape) * scale


def norm(prefix: str, dim: int = DIM) -> dict:
    return {f"{prefix}.weight": 1 + rand(dim), f"{prefix}.bias": rand(dim)}


def timm_block(prefix: str, dim: int = DIM, hidden: int = HIDDEN, videomae: bool = False) -> dict:
    """A timm ViT block (MAE, AudioMAE, CAV-MAE); VideoMAE's has q_bias/v_bias and no qkv bias."""
    block = {
        **norm(f"{prefix}.norm1", dim), f"{prefix}.attn.qkv.weight": rand(3 * dim, dim),
        f"{prefix}.attn.proj.weight": rand(dim, dim), f"{prefix}.attn.proj.bias": rand(dim),
        **norm(f"{prefix}.norm2", dim), f"{prefix}.mlp.fc1.weight": rand(hidden, dim), f"{prefix}.mlp.fc1.bias": rand(hidden),
        f"{prefix}.mlp.fc2.weight": rand(dim, hidden), f"{prefix}.mlp.fc2.bias": rand(dim),
    }  # fmt: skip
    if videomae:
        block.update({f"{prefix}.attn.q_bias": rand(dim), f"{prefix}.attn.v_bias": rand(dim)})
    else:
        block[f"{prefix}.attn.qkv.bias"] = rand(3 * dim)
    return block


def mae_decoder(patch_dim: int, num_tokens: int, width: int = 64) -> dict:
    """models_mae.py's decoder: decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred."""
    state = {"decoder_embed.weight": rand(width, DIM), "decoder_embed.bias": rand(width), "mask_token": rand(1, 1, width),
             "decoder_pos_embed": rand(1, num_tokens + 1, width), **norm("decoder_norm", width),
             "decoder_pred.weight": rand(patch_dim, width), "decoder_pred.bias": rand(patch_dim)}  # fmt: skip
    for i in range(2):
        state.update(timm_block(f"decoder_blocks.{i}", width, 4 * width))
    return state


def vit_checkpoint(in_chans: int, grid: tuple[int, int], finetuned: bool, num_classes: int = 4) -> dict:
    """MAE (in_chans 3, square grid) or AudioMAE (in_chans 1, (time, freq) grid)."""
    n = math.prod(grid)
    state = {"cls_token": rand(1, 1, DIM, scale=0.5), "pos_embed": rand(1, n + 1, DIM, scale=0.5),
             "patch_embed.proj.weight": rand(DIM, in_chans, 16, 16), "patch_embed.proj.bias": rand(DIM)}  # fmt: skip
    for i in range(DEPTH):
        state.update(timm_block(f"blocks.{i}"))
    if finetuned:  # models_vit.py with global_pool: fc_norm and head instead of norm
        state.update({**norm("fc_norm"), "head.weight": rand(num_classes, DIM, scale=0.5), "head.bias": rand(num_classes)})
    else:
        state.update(norm("norm"))
        state.update(mae_decoder(16 * 16 * in_chans, n))
    return state


def videomae_checkpoint(finetuned: bool, num_classes: int = 4) -> dict:
    """modeling_pretrain.py (encoder.* + decoder) or modeling_finetune.py (fc_norm + head)."""
    prefix = "" if finetuned else "encoder."
    state = {f"{prefix}patch_embed.proj.weight": rand(DIM, 3, 2, 16, 16), f"{prefix}patch_embed.proj.bias": rand(DIM)}
    for i in range(DEPTH):
        state.update(timm_block(f"{prefix}blocks.{i}", videomae=True))
    if finetuned:
        state.update({**norm("fc_norm"), "head.weight": rand(num_classes, DIM), "head.bias": rand(num_classes)})
    else:
        state.update({**norm("encoder.norm"), "encoder_to_decoder.weight": rand(64, DIM), "mask_token": rand(1, 1, 64),
                      **timm_block("decoder.blocks.0", 64, 256, videomae=True), **norm("decoder.norm", 64),
                      "decoder.head.weight": rand(1536, 64), "decoder.head.bias": rand(1536)})  # fmt: skip
    return state


def cavmae_checkpoint(finetuned: bool, audio_time: int = 8, image_size: int = 32, num_classes: int = 4) -> dict:
    """src/models/cav_mae.py: CAVMAE (pretrained) or CAVMAEFT (finetuned), 3 + 1 layers, with
    DataParallel's ``module.`` prefix as the released files have it."""
    n_a, n_v = audio_time * 8, (image_size // 16) ** 2
    state = {"patch_embed_a.proj.weight": rand(DIM, 1, 16, 16), "patch_embed_a.proj.bias": rand(DIM),
             "patch_embed_v.proj.weight": rand(DIM, 3, 16, 16), "patch_embed_v.proj.bias": rand(DIM),
             "modality_a": rand(1, 1, DIM), "modality_v": rand(1, 1, DIM),
             "pos_embed_a": rand(1, n_a, DIM, scale=0.5), "pos_embed_v": rand(1, n_v, DIM, scale=0.5),
             **norm("norm_a"), **norm("norm_v"), **norm("norm")}  # fmt: skip
    for stack, count in (("blocks_a", 3), ("blocks_v", 3), ("blocks_u", 1)):
        for i in range(count):
            state.update(timm_block(f"{stack}.{i}"))
            for n in ("norm1_a", "norm1_v", "norm2_a", "norm2_v"):  # every CAV-MAE Block has them
                state.update(norm(f"{stack}.{i}.{n}"))
    if finetuned:
        state.update({**norm("mlp_head.0"), "mlp_head.1.weight": rand(num_classes, DIM, scale=0.5), "mlp_head.1.bias": rand(num_classes)})
    else:
        state.update({"decoder_embed.weight": rand(64, DIM), "decoder_embed.bias": rand(64), "mask_token": rand(1, 1, 64),
                      "decoder_modality_a": rand(1, 1, 64), "decoder_modality_v": rand(1, 1, 64),
                      "decoder_pos_embed_a": rand(1, n_a, 64), "decoder_pos_embed_v": rand(1, n_v, 64),
                      **timm_block("decoder_blocks.0", 64, 256), **norm("decoder_norm", 64),
                      "decoder_pred_a.weight": rand(256, 64), "decoder_pred_a.bias": rand(256),
                      "decoder_pred_v.weight": rand(768, 64), "decoder_pred_v.bias": rand(768)})  # fmt: skip
    return {f"module.{k}": v for k, v in state.items()}


def save(state: dict, path: Path, wrap: str | None = "model") -> Path:
    torch.save({wrap: state} if wrap else state, path)
    return path


def all_keys_accounted(kind: str, path: Path, state: dict) -> None:
    """Every source key is either read by the converter or dropped with a reason."""
    from avmae.convert import READERS, SourceKeys, read_source

    keys = SourceKeys(read_source(path), path.name)
    READERS[kind](keys)
    keys.finish()
    clean = {k.removeprefix("module.") for k in state}
    assert keys.used == clean
    dropped = {k for k in clean if any(re.match(p, k) for p in keys.dropped)}
    assert all(k.startswith(("decoder", "mask_token", "encoder_to_decoder")) or re.match(r"^blocks_[av]\.\d+\.norm[12]_[av]\.", k) for k in dropped)


# ---- parity with timm -------------------------------------------------------------------------------


def test_mae_encoder_matches_timm_and_drops_only_the_decoder(tmp_path):
    torch.manual_seed(0)
    state = vit_checkpoint(3, (2, 2), finetuned=False)
    path = save(state, tmp_path / "mae_pretrain.pth")
    all_keys_accounted("mae", path, state)
    out = convert("mae", path, tmp_path / "out")
    conversion = read_export(out)["conversion"]
    assert list(conversion["dropped"]) == [r"^(decoder_|mask_token$)"] and not conversion["finetuned"]
    encoder = avmae.from_pretrained(out)
    assert encoder.modalities == ("video",) and encoder.cls_token is not None

    # timm's own MAE handling; the released encoder file has no decoder (timm would read a
    # mask_token as a DINOv2 file)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0)
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    vit.load_state_dict(checkpoint_filter_fn({"model": encoder_only}, vit))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = vit.eval().forward_features(x)[:, 1:]
        ours = encoder.forward_features(video=x[:, :, None])["video"]
    assert (theirs - ours).abs().max() < 1e-5


def test_audiomae_finetuned_matches_timm_and_keeps_its_head(tmp_path):
    torch.manual_seed(1)
    state = vit_checkpoint(1, (8, 8), finetuned=True, num_classes=5)
    path = save(state, tmp_path / "audiomae_as2m.pth")
    all_keys_accounted("audiomae", path, state)
    out = convert("audiomae", path, tmp_path / "out")
    description = read_export(out)
    assert description["part"] == "audio" and description["conversion"]["classes"]["label"] == 5
    audio = description["input"]["audio"]
    assert (audio["target_length"], audio["norm_mean"], audio["norm_std"]) == (128, -4.2677393, 2 * 4.5689974)
    assert description["config"]["model"]["final_norm"] is False

    vit = VisionTransformer(img_size=(128, 128), patch_size=16, in_chans=1, embed_dim=DIM, depth=DEPTH,
                            num_heads=HEADS, num_classes=5, global_pool="avg")  # fmt: skip
    vit.load_state_dict(checkpoint_filter_fn({"model": state}, vit))
    from avmae.formats import load_finetuned

    classifier, cfg = load_finetuned(out / "classifier")
    assert cfg.finetune.heads == {"label": 5} and cfg.finetune.modalities == "audio"
    x = torch.randn(2, 1, 128, 128)  # (B, 1, T, F): time first in both
    with torch.no_grad():
        tokens = vit.eval().forward_features(x)
        assert (tokens[:, 1:] - classifier.encoder.forward_features(audio=x)["audio"]).abs().max() < 1e-5
        assert (vit.forward_head(tokens) - classifier(audio=x)["label"]).abs().max() < 1e-5
        # the stock timm audio ViT written next to the export computes the same tokens
        timm_vit = avmae.formats.load_timm_audio_vit(out)
        assert (timm_vit.forward_features(x)[:, 1:] - tokens[:, 1:]).abs().max() < 1e-5


def test_cavmae_audio_branch_reordered_to_time_major(tmp_path):
    """CAV-MAE transposes the fbank to (128, T) and patches it frequency-major; a timm ViT with
    its audio weights fed the transposed input is the reference."""
    torch.manual_seed(2)
    state = cavmae_checkpoint(finetuned=False)
    path = save(state, tmp_path / "cav-mae.pth", wrap=None)
    all_keys_accounted("cavmae", path, state)
    out = convert("cavmae", path, tmp_path / "out")
    encoder = avmae.from_pretrained(out)
    assert encoder.fusion == "mid" and encoder.joint_norms == "per_modality" and len(encoder.blocks) == 1

    s = {k.removeprefix("module."): v for k, v in state.items()}
    vit = VisionTransformer(img_size=(128, 128), patch_size=16, in_chans=1, embed_dim=DIM, depth=DEPTH,
                            num_heads=HEADS, num_classes=0, class_token=False, global_pool="avg", fc_norm=False,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))  # CAV-MAE's nn.LayerNorm  # fmt: skip
    ref = {"pos_embed": s["pos_embed_a"] + s["modality_a"], "patch_embed.proj.weight": s["patch_embed_a.proj.weight"],
           "patch_embed.proj.bias": s["patch_embed_a.proj.bias"], "norm.weight": s["norm_a.weight"], "norm.bias": s["norm_a.bias"]}  # fmt: skip
    for i in range(DEPTH):
        src = f"blocks_a.{i}." if i < 3 else "blocks_u.0."
        for k, v in s.items():
            if k.startswith(src) and not re.search(r"norm[12]_", k):
                ref[f"blocks.{i}.{k[len(src):]}"] = v
        if i == 3:  # the joint layer run on audio alone uses its audio norms
            for n in ("norm1", "norm2"):
                for p in ("weight", "bias"):
                    ref[f"blocks.3.{n}.{p}"] = s[f"blocks_u.0.{n}_a.{p}"]
    vit.load_state_dict(ref)
    fbank = torch.randn(2, 128, 128)  # (B, T, F), as CAV-MAE's dataloader returns it
    with torch.no_grad():
        theirs = vit.eval().forward_features(fbank[:, None].transpose(2, 3))  # (B, F' * T', D): frequency-major
        theirs = theirs.reshape(2, 8, 8, DIM).transpose(1, 2).reshape(2, 64, DIM)
        ours = encoder.forward_features(audio=fbank[:, None])["audio"]
    assert (theirs - ours).abs().max() < 1e-5
    # the audio part alone, and the stock timm ViT written with it
    audio_out = convert("cavmae", path, tmp_path / "audio", part="audio")
    with torch.no_grad():
        timm_tokens = avmae.formats.load_timm_audio_vit(audio_out).forward_features(fbank[:, None])
    assert (timm_tokens - ours).abs().max() < 1e-5
    # the joint sequence ends in the joint norm, a lone modality in its own
    with torch.no_grad():
        joint = encoder.forward_features(video=torch.randn(2, 3, 1, 32, 32), audio=fbank[:, None])
    assert joint["audio"].shape == (2, 64, DIM) and not torch.allclose(joint["audio"], ours)


# ---- round trips, errors, geometry ------------------------------------------------------------------


def test_videomae_roundtrip_with_its_sinusoid_table_and_qv_biases(tmp_path):
    torch.manual_seed(3)
    state = videomae_checkpoint(finetuned=False)
    path = save(state, tmp_path / "videomae.pth")
    all_keys_accounted("videomae", path, state)
    out = convert("videomae", path, tmp_path / "out", num_frames=4, image_size=32)
    encoder = avmae.from_pretrained(out)
    qkv_bias = encoder.modality_blocks["video"][1].attn.qkv.bias
    assert torch.equal(qkv_bias[:DIM], state["encoder.blocks.1.attn.q_bias"]) and not qkv_bias[DIM:2 * DIM].any()
    assert torch.equal(qkv_bias[2 * DIM:], state["encoder.blocks.1.attn.v_bias"])
    description = read_export(out)
    resized = description["conversion"]["pos_embed_resized"]["video"]
    assert resized["from"] == [8, 14, 14] and resized["to"] == [2, 2, 2] and "bicubic" in resized["method"]
    assert description["input"]["video"]["tubelet"] == 2 and description["conversion"]["frame_stride_source_frames"] == 4
    assert encoder.forward_features(video=torch.randn(1, 3, 4, 32, 32))["video"].shape == (1, 8, DIM)
    # the table formula: sin on even channels, cos on odd, of n / 10000^(2 (j // 2) / D)
    table = sinusoid_table(5, 6)[0]
    assert table[3, 2] == pytest.approx(math.sin(3 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[3, 5] == pytest.approx(math.cos(3 / 10000 ** (4 / 6)), abs=1e-6)


class Pickled:
    """An arbitrary object: loading it would run pickle's object construction."""


def test_bad_keys_are_all_named(tmp_path):
    state = vit_checkpoint(3, (2, 2), finetuned=False)
    state["blocks.9.attn.qkv.weight"] = torch.zeros(1)  # unexpected (and makes blocks non-contiguous)
    del state["blocks.9.attn.qkv.weight"]
    state["extra_thing"] = torch.zeros(3)
    del state["blocks.2.mlp.fc2.bias"]
    state["blocks.1.attn.proj.weight"] = torch.zeros(DIM, DIM + 1)
    with pytest.raises(ConversionError) as err:
        read("mae", save(state, tmp_path / "bad.pth"))
    message = str(err.value)
    assert "missing keys: blocks.2.mlp.fc2.bias" in message
    assert "blocks.1.attn.proj.weight: (128, 129), expected (128, 128)" in message
    assert "unexpected keys: extra_thing" in message and "bad.pth" in message
    # a pickled object beyond tensors is refused by torch.load(weights_only=True)
    torch.save({"model": vit_checkpoint(3, (2, 2), finetuned=False), "extra": Pickled()}, tmp_path / "pickle.pth")
    with pytest.raises(ConversionError, match=r"pickle.pth: not loadable with torch.load\(weights_only=True\)"):
        read("mae", tmp_path / "pickle.pth")
    # not a tensor mapping, and not the source it claims to be
    torch.save({"model": {"w": [1, 2]}}, tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="is a list, not a tensor"):
        read("mae", tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="not a CAV-MAE checkpoint"):
        read("cavmae", save(vit_checkpoint(3, (2, 2), finetuned=False), tmp_path / "mae.pth"))


def test_safetensors_source_and_audio_length_resampling(tmp_path):
    state = vit_checkpoint(1, (8, 8), finetuned=False)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "audiomae.safetensors"))
    out = convert("audiomae", tmp_path / "audiomae.safetensors", tmp_path / "out", audio_seconds=2.56)
    description = read_export(out)
    assert description["conversion"]["pos_embed_resized"]["audio"] == {
        "from": [8, 8], "to": [16, 8], "method": description["conversion"]["pos_embed_resized"]["audio"]["method"],
    }
    encoder = avmae.from_pretrained(out)
    assert encoder.pos_embed["audio"].table.shape == (1, 128, DIM)
    assert encoder.forward_features(audio=torch.randn(1, 1, 256, 128))["audio"].shape == (1, 128, DIM)


# ---- the converted models in the tools ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_data(synthetic_root, tmp_path_factory):
    rows = decodable_rows(synthetic_root)
    rows = {split: split_rows[:4] for split, split_rows in rows.items()}  # few clips: decoding dominates
    return write_manifests(synthetic_root, tmp_path_factory.mktemp("convert_manifests"), rows)


SOURCES = {  # source -> (checkpoint, modalities it fills, conversion geometry)
    "mae": (lambda: vit_checkpoint(3, (2, 2), finetuned=False), "video", {}),
    "audiomae": (lambda: vit_checkpoint(1, (8, 8), finetuned=False), "audio", {}),
    "videomae": (lambda: videomae_checkpoint(finetuned=False), "video", {"num_frames": 4, "image_size": 32}),
    "cavmae": (lambda: cavmae_checkpoint(finetuned=False), "audiovisual", {}),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_converted_models_finetune_and_probe(kind, clean_data, tmp_path):
    """Each converted source finetunes a step and is linear-probed on real clips, at the test
    geometry (4 frames of 32 px, 1.28 s): tables resampled on the fly where it differs."""
    from avmae.engine.finetune import finetune, prepare_config
    from avmae.evaluation.probe import run_linear_probes

    torch.manual_seed(4)
    make, modalities, geometry = SOURCES[kind]
    out = convert(kind, save(make(), tmp_path / "source.pth"), tmp_path / "export", **geometry)
    common = clean_data + GEOMETRY + [f"finetune.pretrained={out}", f"finetune.modalities={modalities}"]
    run = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.log_every=1"]
    metrics = finetune(load_config(FINETUNE, common + run))
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.learned_pos_embed and 0.0 <= metrics["label"]["top1"] <= 100.0
    source_input = read_export(out)["input"]
    if modalities != "video":  # the source's fbank normalisation is inherited
        assert saved.data.audio.norm_mean == source_input["audio"]["norm_mean"] != -5.081 or kind == "cavmae"
    if kind == "cavmae":
        assert saved.model.joint_norms == "per_modality" and saved.data.audio.norm_mean == -5.081

    probe = ["finetune.probe_weight_decays=[1.0]", "finetune.probe_max_iter=10"]
    cfg = prepare_config(load_config(FINETUNE, common + probe))
    (result,) = run_linear_probes(cfg, avmae.from_pretrained(out), sources=("pretrained",))
    assert result["dim"] == DIM * (2 if modalities == "audiovisual" else 1)
    assert 0.0 <= result["test"]["label"]["top1"] <= 100.0


def test_tools_convert_then_eval_a_finetuned_source(clean_data, tmp_path, capsys):
    """tools/convert.py on a finetuned AudioMAE file; tools/eval.py runs its classifier as is."""
    state = vit_checkpoint(1, (8, 8), finetuned=True, num_classes=4)
    path = save(state, tmp_path / "audiomae_ft.pth")
    out = tmp_path / "out"
    assert _tool("convert").main(["--from", "audiomae", str(path), str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "check skipped: the audiomae model code (models_mae, models_vit) is not on sys.path" in printed and "classifier" in printed
    assert _tool("eval").main([str(out / "classifier"), *clean_data, *GEOMETRY, "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["records_scored"] > 0


def test_cavmae_finetuned_keeps_its_head_and_pools_all_tokens(tmp_path):
    """CAVMAEFT's mlp_head becomes the classifier head; its multimodal mode averages all tokens
    of the joint sequence, so the converted classifier pools over tokens, not modalities."""
    from avmae.formats import load_finetuned

    torch.manual_seed(5)
    state = cavmae_checkpoint(finetuned=True, num_classes=3)
    path = save(state, tmp_path / "cav-mae-ft.pth", wrap=None)
    all_keys_accounted("cavmae", path, state)
    out = convert("cavmae", path, tmp_path / "out")
    classifier, cfg = load_finetuned(out / "classifier")
    assert cfg.finetune.pool == "tokens" and cfg.finetune.modalities == "audiovisual" and cfg.finetune.heads == {"label": 3}
    assert torch.equal(classifier.heads["label"][2].weight, state["module.mlp_head.1.weight"])
    video, audio = torch.randn(2, 3, 1, 32, 32), torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        tokens = classifier.encoder.forward_features(video=video, audio=audio)
        pooled = torch.cat([tokens["video"], tokens["audio"]], dim=1).mean(dim=1)  # 4 + 64 tokens, equally
        assert torch.allclose(classifier(video=video, audio=audio)["label"], classifier.heads["label"](pooled), atol=1e-6)


# ---- the conversion layouts beside the recipe options ----------------------------------------------


def test_layout_options_beside_the_recipe_options(tmp_path):
    """Converted layouts combine with AV-MAE's options where both have a meaning: CAV-MAE's joint norms
    with the 1-D position code and no final norm; class tokens and stored tables with stack norms.
    The two final-norm layouts exclude each other, and MBT's separate stacks take neither class tokens
    nor per-modality joint norms: clear errors. Prefixes are removed by the one helper, which refuses
    a checkpoint holding a name both wrapped and unwrapped."""
    from avmae.models import build_classifier, build_encoder, example_inputs

    demo = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"
    cfg = load_config(demo, ["model.joint_norms=per_modality", "model.pos_embed=1d", "model.final_norm=false"])
    inputs = example_inputs(cfg, 2)
    encoder = build_encoder(cfg).eval()
    out = encoder.forward_features(video=inputs["video"], audio=inputs["audio"])
    alone = encoder.forward_features(audio=inputs["audio"])["audio"]
    assert out["audio"].shape == alone.shape and not torch.allclose(out["audio"], alone)  # the joint layer mixes

    cfg = load_config(demo, ["model.stack_norms=true", "model.cls_token=true", "model.learned_pos_embed=true"])
    encoder = build_encoder(cfg).eval()
    assert isinstance(encoder.norm, torch.nn.LayerNorm) and set(encoder.stack_norm) == {"video", "audio"}
    out = encoder.forward_features(video=inputs["video"], audio=inputs["audio"])
    assert out["video"].shape[1] == math.prod(encoder.pos_embed["video"].grid)  # class token dropped

    with pytest.raises(ValueError, match="exclude each other"):
        build_encoder(load_config(demo, ["model.stack_norms=true", "model.joint_norms=per_modality"]))
    for option in ("model.cls_token=true", "model.joint_norms=per_modality"):
        with pytest.raises(ValueError, match="bottleneck"):
            build_classifier(load_config(demo, [option, "finetune.fusion=bottleneck"]), {"label": 3})

    state = vit_checkpoint(3, (2, 2), finetuned=False)
    state["module.norm.weight"] = state["norm.weight"]
    with pytest.raises(ConversionError, match=r"twice.pth: state dict holds 'norm.weight' twice"):
        read("mae", save(state, tmp_path / "twice.pth"))


def test_a_known_conversion_error_is_one_line_naming_the_file(tmp_path, capsys):
    """tools/convert.py (through avmae.cli.run_tool): a checkpoint that is not the named kind gives
    one line on stderr with the file and the problem, status 2; --debug gives the traceback."""
    from avmae.cli import run_tool

    source = tmp_path / "not_mae.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, source)
    argv = ["--from", "mae", str(source), str(tmp_path / "out")]
    assert run_tool(_tool("convert").main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {source}: ") and "patch_embed" in err
    with pytest.raises(ConversionError, match=re.escape(str(source))):
        run_tool(_tool("convert").main, [*argv, "--debug"])


def test_tool_overrides_without_config_go_onto_the_sources_own_config(tmp_path):
    """tools/convert.py SOURCE OUT key=value: the override lands on the source's own config (CAV-MAE's
    eps 1e-5 becomes 1e-6 in config.json) and the part stays the source's default (both branches)."""
    torch.manual_seed(2)
    path = save(cavmae_checkpoint(finetuned=False), tmp_path / "cav-mae.pth", wrap=None)
    plain, changed = tmp_path / "plain", tmp_path / "changed"
    assert _tool("convert").main(["--from", "cavmae", str(path), str(plain)]) == 0
    assert _tool("convert").main(["--from", "cavmae", str(path), str(changed), "model.norm_eps=1e-6"]) == 0
    plain_cfg, changed_cfg = (json.loads((d / "config.json").read_text()) for d in (plain, changed))
    assert plain_cfg["config"]["model"]["norm_eps"] == 1e-5
    assert changed_cfg["config"]["model"]["norm_eps"] == 1e-6
    assert plain_cfg["part"] == changed_cfg["part"] == "encoder"
    # a one-branch source keeps its one branch as the part
    mae_path = save(vit_checkpoint(3, (2, 2), finetuned=False), tmp_path / "mae_pretrain.pth")
    assert _tool("convert").main(["--from", "mae", str(mae_path), str(tmp_path / "mae"), "model.norm_eps=1e-5"]) == 0
    mae_cfg = json.loads((tmp_path / "mae" / "config.json").read_text())
    assert mae_cfg["part"] == "video" and mae_cfg["config"]["model"]["norm_eps"] == 1e-5
