"""The AV-MAE model family on tiny inputs: tokens and positions, every fusion x decoder x
reconstruction variant and every contrastive head training a step, loss only on masked patches,
overfitting one batch, the classifier, checked weight loading, layer-decay groups and FLOPs."""

import itertools
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import Attention
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

from avmae.config import load_config
from avmae.models import (
    AVEncoder,
    build_classifier,
    build_pretrain_model,
    count_flops,
    get_size,
    load_pretrained,
    num_tokens,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
)
from avmae.models.pos_embed import audio_sincos, sincos_2d, video_sincos, video_spatial_dim

# 4 frames at 32x32 and 64 fbank frames x 32 mel bins with 8x8 patches (tubelet 2):
# 2 x 4 x 4 = 32 video tokens and 8 x 4 = 32 audio tokens, a micro ViT (width 128, depth 4)
TINY = [
    "model.size=micro",
    "model.patch_size=8",
    "data.video.num_frames=4",
    "data.video.size=32",
    "data.audio.seconds=0.64",
    "data.audio.num_mel_bins=32",
    "model.decoder_width=64",
    "model.decoder_depth=1",
    "model.decoder_heads=4",
    "model.mask_ratio_video=0.75",
    "model.mask_ratio_audio=0.5",
    "model.proj_hidden_dim=64",
    "model.proj_dim=32",
    "model.pred_dim=32",
]
PATCH_DIM = {"video": 3 * 2 * 8 * 8, "audio": 8 * 8}


# tiny models: one torch thread is faster than two competing for a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*overrides: str):
    return load_config(None, TINY + list(overrides))


def tiny_batch(batch: int = 2, seed: int = 0, frames: int = 4, audio_frames: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, 32, 32, generator=g), torch.randn(batch, 1, audio_frames, 32, generator=g)


def train_step(model, video, audio, **kwargs):
    """One AdamW step; returns the output and the names of trainable parameters without gradient."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(video, audio, **kwargs)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    optimizer.step()
    return out, no_grad


# ---- tokens and positions -----------------------------------------------------------------------


def test_registry_sizes_follow_timm_vit():
    assert [(get_size(n).embed_dim, get_size(n).depth, get_size(n).num_heads) for n in ("tiny", "small", "base", "large")] == [
        (192, 12, 3), (384, 12, 6), (768, 12, 12), (1024, 24, 16)
    ]
    assert (get_size("micro").embed_dim, get_size("micro").depth) == (128, 4)
    with pytest.raises(ValueError, match="huge"):
        get_size("huge")


def test_vit_base_geometry_gives_1568_video_and_512_audio_tokens():
    cfg = load_config(None, ["model.size=base"])  # 16 frames at 224, 10.24 s -> 1024 x 128 fbank
    assert (cfg.data.video.num_frames, cfg.data.video.size, cfg.data.audio.target_length) == (16, 224, 1024)
    assert num_tokens(cfg) == {"video": 1568, "audio": 512}
    with torch.device("meta"):  # the real ViT-B, without allocating it
        model = build_pretrain_model(cfg)
        tokens = model.encoder.embed({"video": torch.empty(2, 3, 16, 224, 224), "audio": torch.empty(2, 1, 1024, 128)})
    assert tokens["video"].shape == (2, 1568, 768) and tokens["audio"].shape == (2, 512, 768)


def _mae_1d(dim, pos):
    # facebookresearch/mae util/pos_embed.py, numpy, float64
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(dim, rows, cols):
    grid_h = np.arange(rows, dtype=np.float64)
    grid_w = np.arange(cols, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape([2, 1, rows, cols])
    emb_h = _mae_1d(dim // 2, grid[0])
    emb_w = _mae_1d(dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def test_positional_embeddings_equal_the_mae_sincos_formula():
    assert np.allclose(sincos_2d(64, 14, 14).numpy(), _mae_2d(64, 14, 14), atol=1e-6)
    # audio: the same formula on the time-major (T', F') grid
    assert np.allclose(audio_sincos(128, (64, 8)).numpy(), _mae_2d(128, 64, 8), atol=1e-6)
    # video: temporal 1-D code on the first channels, MAE 2-D spatial code on the rest
    dim, grid = 128, (3, 4, 5)
    pos = video_sincos(dim, grid).reshape(3, 20, dim).numpy()
    spatial = video_spatial_dim(dim)
    for t in range(3):
        assert np.allclose(pos[t, :, :dim - spatial], _mae_1d(dim - spatial, np.array([float(t)])), atol=1e-6)
        assert np.allclose(pos[t, :, dim - spatial:], _mae_2d(spatial, 4, 5), atol=1e-6)


def test_patchify_round_trips_and_matches_token_order():
    model = build_pretrain_model(tiny_cfg())
    video, audio = tiny_batch()
    assert torch.equal(unpatchify_video(patchify_video(video, 8, 2), (2, 4, 4), 8, 2), video)
    assert torch.equal(unpatchify_audio(patchify_audio(audio, 8), (8, 4), 8), audio)
    # the MAE targets line up with the tokens: the patch projection is a linear map of patchify's rows
    conv = model.encoder.patch_embed["video"].proj
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.out_channels, -1)  # (D, u p q c)
    expected = patchify_video(video, 8, 2) @ weight.t() + conv.bias
    assert torch.allclose(model.encoder.patch_embed["video"](video), expected, atol=1e-5)
    proj = model.encoder.patch_embed["audio"].embed.proj
    expected = patchify_audio(audio, 8) @ proj.weight.reshape(proj.out_channels, -1).t() + proj.bias
    assert torch.allclose(model.encoder.patch_embed["audio"](audio), expected, atol=1e-5)


def test_inputs_that_do_not_tile_are_rejected():
    model = build_pretrain_model(tiny_cfg())
    video, audio = tiny_batch()
    with pytest.raises(ValueError, match="tubelets"):
        model(video[:, :, :3], audio)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(video, audio[:, :, :60])
    with pytest.raises(ValueError, match="does not tile"):
        build_pretrain_model(tiny_cfg("data.audio.num_mel_bins=30"))


def test_attention_runs_through_sdpa(monkeypatch):
    model = build_pretrain_model(tiny_cfg("model.contrastive=mocov3"))
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    # mid fusion: 3 blocks per modality + 1 joint, in the encoder and its momentum copy; 2 decoders
    assert len(attentions) == 7 + 2 + 7
    # every attention call of a forward pass goes through torch's fused kernel entry point
    sdpa, counts = torch.nn.functional.scaled_dot_product_attention, {"sdpa": 0, "attention": 0}

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def count_attention(module, inputs, output):
        counts["attention"] += 1

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    hooks = [a.register_forward_hook(count_attention) for a in attentions]
    video, audio = tiny_batch()
    model(video, audio)
    for hook in hooks:
        hook.remove()
    assert counts["attention"] >= 7 + 2  # at least the encoder and both decoders ran
    assert counts["sdpa"] == counts["attention"]


# ---- pretraining variants -----------------------------------------------------------------------

VARIANTS = list(itertools.product(["early", "late", "shared", "mid"], ["separate", "shared", "joint"], ["joint", "inpaint", "both"]))


@pytest.mark.parametrize("fusion,decoder,reconstruction", VARIANTS)
def test_every_mae_variant_trains_a_step(fusion, decoder, reconstruction):
    model = build_pretrain_model(
        tiny_cfg(f"model.fusion={fusion}", "model.fusion_layers=1", f"model.decoder={decoder}", f"model.reconstruction={reconstruction}")
    )
    video, audio = tiny_batch()
    out, no_grad = train_step(model, video, audio)
    assert no_grad == []
    assert torch.isfinite(out["loss"])
    for m, n in (("video", 32), ("audio", 32)):
        assert out[f"pred_{m}"].shape == (2, n, PATCH_DIM[m])
        assert f"target_{m}" not in out  # training scores the masked patches only
        assert out[f"mask_{m}"].shape == (2, n)
    assert (out["mask_video"].sum(1) == 32 - 8).all() and (out["mask_audio"].sum(1) == 16).all()
    expected_logs = {"mae", "mae_video", "mae_audio"} | ({"inpaint_video", "inpaint_audio"} if reconstruction == "both" else set())
    assert set(out["logs"]) == expected_logs
    assert all(not v.requires_grad for v in out["logs"].values())
    mae = 0.5 * out["logs"]["mae_video"] + 0.5 * out["logs"]["mae_audio"]
    if reconstruction == "both":
        mae = 0.5 * (mae + 0.5 * out["logs"]["inpaint_video"] + 0.5 * out["logs"]["inpaint_audio"])
    assert torch.allclose(out["loss"], mae)


@pytest.mark.parametrize(
    "head,pairs,masked",
    list(itertools.product(["infonce", "simsiam", "mocov3"], ["modalities", "views"], ["true", "false"])),
)
def test_every_contrastive_head_trains_a_step(head, pairs, masked):
    model = build_pretrain_model(
        tiny_cfg(f"model.contrastive={head}", f"model.contrastive_pairs={pairs}", f"model.contrastive_masked={masked}",
                 "model.learn_temperature=true", "model.contrastive_weight=0.5")
    )
    video, audio = tiny_batch(batch=4)
    video2, audio2 = tiny_batch(batch=4, seed=1)
    out, no_grad = train_step(model, video, audio, video2=video2, audio2=audio2)
    assert no_grad == []
    assert torch.allclose(out["loss"], out["logs"]["mae"] + 0.5 * out["logs"]["contrastive"])
    if head == "infonce":
        assert model.contrastive.log_logit_scale.grad is not None
        assert out["logs"]["temperature"].item() == pytest.approx(0.05)
    if pairs == "views":
        with pytest.raises(ValueError, match="video2"):
            model(video, audio)


def test_contrastive_only_builds_no_decoder():
    model = build_pretrain_model(tiny_cfg("model.mae_weight=0", "model.contrastive=infonce"))
    assert model.decoder is None
    video, audio = tiny_batch()
    out, no_grad = train_step(model, video, audio)
    assert no_grad == [] and set(out) == {"loss", "logs"} and set(out["logs"]) == {"contrastive", "temperature"}
    with pytest.raises(ValueError, match="nothing to train"):
        build_pretrain_model(tiny_cfg("model.mae_weight=0"))


def test_contrastive_modalities_do_not_see_each_other():
    # mid fusion: the pooled audio embedding of the contrastive branch must not depend on the video
    model = build_pretrain_model(tiny_cfg("model.mae_weight=0", "model.contrastive=infonce", "model.contrastive_masked=false"))
    model.eval()
    video, audio = tiny_batch()
    captured = []
    original = model.contrastive.forward
    model.contrastive.forward = lambda x1, x2, names: captured.append((x1, x2)) or original(x1, x2, names)
    model(video, audio)
    model(video.flip(0), audio)
    assert torch.allclose(captured[0][1], captured[1][1], atol=1e-6)  # audio unchanged
    assert not torch.allclose(captured[0][0], captured[1][0])


def test_contrastive_branch_reuses_the_mae_pass():
    # CAV-MAE-like: per-modality layers run once; the joint layer once jointly, once per modality
    model = build_pretrain_model(tiny_cfg("model.contrastive=infonce", "model.fusion=mid", "model.fusion_layers=1"))
    calls = {"modality": 0, "joint": 0}
    model.encoder.modality_blocks["video"][0].register_forward_hook(lambda *_: calls.__setitem__("modality", calls["modality"] + 1))
    model.encoder.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("joint", calls["joint"] + 1))
    model(*tiny_batch())
    assert calls == {"modality": 1, "joint": 3}


def test_moco_momentum_update_follows_the_cosine_schedule():
    model = build_pretrain_model(tiny_cfg("model.contrastive=mocov3", "model.momentum=0.9", "model.mae_weight=0",
                                          "model.contrastive_pairs=views"))
    head = model.contrastive
    video, audio = tiny_batch(batch=4)
    key_before = [p.detach().clone() for p in head.momentum_encoder.parameters()]
    assert all(torch.equal(k, q) for k, q in zip(key_before, model.encoder.parameters()))
    train_step(model, video, audio, video2=video.flip(-1), audio2=audio)  # moves the encoder only
    assert all(torch.equal(k, p) for k, p in zip(key_before, head.momentum_encoder.parameters()))
    query = [p.detach().clone() for p in model.encoder.parameters()]
    assert any(not torch.equal(k, q) for k, q in zip(key_before, query))

    model.after_optimizer_step(0.5)  # m = 1 - 0.1 * (cos(pi / 2) + 1) / 2 = 0.95
    for k0, q, k in zip(key_before, query, head.momentum_encoder.parameters()):
        assert torch.allclose(k, 0.95 * k0 + 0.05 * q, atol=1e-7)
    projector = dict(head.projector.named_parameters())
    for name, k in head.momentum_projector.named_parameters():
        assert not k.requires_grad and k.shape == projector[name].shape


def test_loss_is_carried_by_masked_patches_only():
    model = build_pretrain_model(tiny_cfg("model.norm_pix_loss=false"))
    video, audio = tiny_batch()
    preds = {}
    for m in ("video", "audio"):
        def keep(module, inputs, output, m=m):
            output.retain_grad()
            preds[m] = output
        model.decoder.pred[m].register_forward_hook(keep)
    out = model(video, audio)
    out["loss"].backward()
    for m in ("video", "audio"):
        grad, mask = preds[m].grad, out[f"mask_{m}"]
        assert (grad[mask == 0] == 0).all()
        assert (grad[mask == 1].abs().sum(-1) > 0).all()
    # raw targets are the patches themselves (built in full for inspection in eval mode)
    assert torch.equal(model.eval()(video, audio)["target_audio"], patchify_audio(audio, 8))


@pytest.mark.parametrize("norm_pix,patch_loss", [(True, "mean"), (False, "mean"), (True, "sum")])
def test_masked_only_loss_equals_the_full_size_formula(norm_pix, patch_loss):
    """model.mae_loss_masked_only gathers the masked patches before the fp32 target; the loss and
    its gradient equal the full-size masked_mse path's, for either model.patch_loss reduction."""
    results = []
    for masked_only in (True, False):
        torch.manual_seed(0)
        model = build_pretrain_model(tiny_cfg(f"model.norm_pix_loss={norm_pix}", f"model.mae_loss_masked_only={masked_only}",
                                              f"model.patch_loss={patch_loss}", "model.reconstruction=both"))
        video, audio = tiny_batch()
        out = model(video, audio, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        results.append((out["loss"].detach(), out["logs"], {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, logs_a, grads_a), (loss_b, logs_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    for name in logs_b:
        torch.testing.assert_close(logs_a[name], logs_b[name], rtol=1e-6, atol=0)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7)


def test_masks_and_loss_are_reproducible_under_a_generator():
    model = build_pretrain_model(tiny_cfg("model.video_masking=tube", "model.audio_masking=time_freq"))
    video, audio = tiny_batch()
    a = model(video, audio, generator=torch.Generator().manual_seed(5))
    b = model(video, audio, generator=torch.Generator().manual_seed(5))
    c = model(video, audio, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["mask_video"], b["mask_video"]) and torch.equal(a["loss"], b["loss"])
    assert not torch.equal(a["mask_video"], c["mask_video"])
    tube = a["mask_video"].reshape(2, 2, 16)  # (B, T', H'W'): one spatial mask for every time step
    assert torch.equal(tube[:, 0], tube[:, 1])


def test_tiny_model_overfits_one_batch():
    # 16x16 patches: 8 video and 8 audio tokens, half of them masked, the same masks every step
    torch.manual_seed(0)
    cfg = tiny_cfg("model.patch_size=16", "model.decoder_width=128", "model.mask_ratio_video=0.5", "model.mask_ratio_audio=0.5")
    model = build_pretrain_model(cfg)
    video, audio = tiny_batch(batch=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        out = model(video, audio, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] / 5, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 50 steps"


# ---- downstream ---------------------------------------------------------------------------------


def test_classifier_heads_and_modalities():
    video, audio = tiny_batch()
    for modalities in ("audio", "video", "audiovisual"):
        model = build_classifier(tiny_cfg(f"finetune.modalities={modalities}"), {"verb": 5, "noun": 7})
        logits = model(video=video, audio=audio)  # a modality the model does not use is ignored
        assert logits["verb"].shape == (2, 5) and logits["noun"].shape == (2, 7)
        logits["verb"].sum().backward()
    with pytest.raises(ValueError, match="missing: video"):
        model(audio=audio)
    assert not any(n.startswith(("modality_blocks.video", "patch_embed.video")) for n, _ in
                   build_classifier(tiny_cfg("finetune.modalities=audio", "model.fusion=late"), {"a": 2}).encoder.named_parameters())


def _pretrained_state(*overrides):
    model = build_pretrain_model(tiny_cfg("model.contrastive=mocov3", *overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights a fresh model cannot have by chance
    return model


def test_load_pretrained_from_safetensors_with_prefixes(tmp_path):
    pretrained = _pretrained_state()
    path = tmp_path / "model.safetensors"
    save_file({f"module._orig_mod.{k}": v.contiguous() for k, v in pretrained.state_dict().items()}, str(path))

    classifier = build_classifier(tiny_cfg(), {"label": 3})
    report = load_pretrained(classifier, load_file(str(path)))
    assert report.missing == ["heads.label.0.bias", "heads.label.0.weight", "heads.label.2.bias", "heads.label.2.weight"]
    assert report.unexpected and all(k.startswith(("decoder.", "contrastive.")) for k in report.unexpected)
    assert any(k.startswith("contrastive.momentum_encoder.") for k in report.unexpected)
    assert "decoder.mask_token.video" in report.unexpected
    assert len(report.loaded) == len(list(classifier.encoder.state_dict()))
    # what finetuning prints: a summary by prefix, not the name of every decoder tensor
    decoders = sum(k.startswith("decoder.") for k in pretrained.state_dict())
    lines = str(report).splitlines()
    assert lines[1] == "newly initialised: heads (4 tensors)"
    contrastive = sum(k.startswith("contrastive.") for k in pretrained.state_dict())
    assert lines[2] == (f"in the checkpoint, not used by this model: contrastive ({contrastive} tensors), "
                        f"decoder ({decoders} tensors)")  # fmt: skip
    assert len(lines) == 3 and "mask_token" not in str(report)
    video, audio = tiny_batch()
    pretrained.eval(), classifier.eval()
    expected = pretrained.encoder.forward_features(video, audio)
    got = classifier.encoder.forward_features(video, audio)
    assert all(torch.allclose(expected[m], got[m], atol=1e-6) for m in expected)

    encoder = build_classifier(tiny_cfg(), {"label": 3}).encoder  # a bare AVEncoder
    report = load_pretrained(encoder, pretrained.state_dict())
    assert report.missing == [] and isinstance(encoder, AVEncoder)
    assert torch.allclose(encoder.forward_features(video, audio)["video"], expected["video"], atol=1e-6)


def test_pretrained_weights_fit_another_frame_count_and_audio_length():
    pretrained = _pretrained_state()
    cfg = tiny_cfg("data.video.num_frames=8", "data.audio.seconds=1.28")  # 64 video, 64 audio tokens
    classifier = build_classifier(cfg, {"label": 3})
    load_pretrained(classifier, pretrained.state_dict())
    video, audio = tiny_batch(frames=8, audio_frames=128)
    features = classifier.encoder.forward_features(video, audio)
    assert features["video"].shape == (2, 64, 128) and features["audio"].shape == (2, 64, 128)
    assert torch.isfinite(classifier(video=video, audio=audio)["label"]).all()
    # the pretraining model itself also takes the new geometry, positions computed on the fly
    assert torch.isfinite(pretrained(video, audio)["loss"])


def test_load_pretrained_reports_and_refuses_what_does_not_fit():
    state = _pretrained_state().state_dict()
    audio_only = build_classifier(tiny_cfg("finetune.modalities=audio"), {"label": 3})
    report = load_pretrained(audio_only, state)  # the unused video tokenizer is reported, not fatal
    assert "encoder.patch_embed.video.proj.weight" in report.unexpected
    assert "encoder.modality_embed.video" in report.unexpected

    classifier = build_classifier(tiny_cfg(), {"label": 3})
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.extra\.weight"):
        load_pretrained(classifier, {**state, "encoder.extra.weight": torch.zeros(1)})
    broken = dict(state)
    del broken["encoder.blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing encoder keys: encoder\.blocks\.0\.attn\.qkv\.weight"):
        load_pretrained(classifier, broken)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(build_classifier(tiny_cfg("model.size=tiny", "model.fusion_layers=1"), {"label": 3}), state)
    with pytest.raises(ValueError, match="modality_blocks"):  # a late-fusion checkpoint into mid fusion
        load_pretrained(classifier, build_pretrain_model(tiny_cfg("model.fusion=late")).state_dict())


def test_layer_decay_groups_cover_every_parameter_in_depth_order():
    classifier = build_classifier(tiny_cfg("model.fusion=mid", "model.fusion_layers=1"), {"verb": 4, "noun": 5})
    layer = group_parameters(classifier, classifier.group_matcher(coarse=False), reverse=True)
    names = [n for n, _ in classifier.named_parameters()]
    assert set(layer) == set(names)
    assert layer["encoder.patch_embed.video.proj.weight"] == layer["encoder.modality_embed.audio"] == 0
    assert layer["encoder.modality_blocks.video.0.attn.qkv.weight"] == layer["encoder.modality_blocks.audio.0.mlp.fc1.bias"] == 1
    assert layer["encoder.modality_blocks.video.2.norm1.weight"] == 3
    assert layer["encoder.blocks.0.attn.proj.weight"] == layer["encoder.norm.audio.weight"] == 4
    assert layer["heads.verb.2.weight"] == layer["heads.noun.0.bias"] == 5
    optimizer = create_optimizer_v2(classifier, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    scales = {round(g["lr_scale"], 6) for g in optimizer.param_groups}
    assert scales == {0.5**k for k in range(6)}
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(classifier.encoder.modality_embed["video"]) not in decayed


def test_no_weight_decay_names_real_parameters():
    model = build_pretrain_model(tiny_cfg("model.contrastive=infonce", "model.learn_temperature=true", "model.decoder=shared"))
    names = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip <= set(names)
    assert {"encoder.modality_embed.video", "decoder.mask_token", "decoder.modality_embed.audio",
            "contrastive.log_logit_scale"} <= skip


# ---- FLOPs --------------------------------------------------------------------------------------


def test_flops_count_matches_the_transformer_formula():
    # shared fusion: every block sees one modality's tokens; 2 FLOPs per multiply-add
    cfg = tiny_cfg("model.fusion=shared")
    encoder = build_pretrain_model(cfg).encoder.eval()
    video, audio = tiny_batch(batch=1)
    d, depth = 128, 4
    per_token_block = 2 * (3 * d * d + d * d + 2 * 4 * d * d)  # qkv, proj, mlp
    expected = 0
    for tokens, patch_dim in ((32, PATCH_DIM["video"]), (32, PATCH_DIM["audio"])):
        expected += 2 * tokens * patch_dim * d  # patch projection
        expected += depth * (tokens * per_token_block + 2 * 2 * tokens * tokens * d)  # + q @ k, attn @ v
    assert count_flops(encoder, video, audio) == expected
    with torch.device("meta"):
        meta_encoder = build_pretrain_model(cfg).encoder
    assert count_flops(meta_encoder, video.to("meta"), audio.to("meta")) == expected


def test_model_info_tool_prints_tokens_params_and_flops(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("model_info", Path(__file__).resolve().parents[1] / "tools" / "model_info.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(TINY) == 0
    text = capsys.readouterr().out
    assert "32 tokens (8 visible, random masking at ratio 0.75)" in text
    assert "32 tokens (16 visible, random masking at ratio 0.5)" in text
    encoder_params = sum(p.numel() for p in build_pretrain_model(tiny_cfg()).encoder.parameters())
    assert re.search(rf"params encoder\s+{encoder_params:,d} ", text)
    assert re.search(r"FLOPs per clip pretrain_step\s+[\d.]+M", text)
