"""The model and finetuning options the released AV-MAE recipes need, each on a micro model:
1-D sin-cos positions, encoder stack norms, the ``same`` decoder, the patch loss reduction, MBT
bottleneck fusion and its weight loading, momentum SGD with layer decay, per-modality mixup and
multi-label smoothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from avmae.augment import build_transforms
from avmae.augment.mixup import draw_lambda, mix_batch
from avmae.config import load_config
from avmae.engine.finetune import classification_loss
from avmae.engine.optim import build_optimizer
from avmae.models import MBTClassifier, build_classifier, build_pretrain_model, load_pretrained
from avmae.models.losses import masked_mse
from avmae.models.pos_embed import SinCosPosEmbed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# micro ViT (width 128, depth 4), 4 frames of 32 px and 64 x 32 fbank with 8 x 8 patches:
# 32 video and 32 audio tokens
TINY = [
    "model.size=micro", "model.patch_size=8", "data.video.num_frames=4", "data.video.size=32",
    "data.audio.seconds=0.64", "data.audio.num_mel_bins=32", "model.decoder_width=64",
    "model.decoder_depth=1", "model.decoder_heads=4",
]


# tiny models: one torch thread is faster than two competing for a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*overrides: str):
    return load_config(None, TINY + list(overrides))


def batch(seed: int = 0, size: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 4, 32, 32, generator=g), torch.randn(size, 1, 64, 32, generator=g)


def test_1d_positions_are_avmae_sinusoidal_1d():
    """Token n, channel 2k: sin(n w_k), channel 2k + 1: cos(n w_k), w_k = 10000^(-2k/D)."""
    dim, grid = 8, (2, 2, 3)  # 12 tokens in sequence order
    table = SinCosPosEmbed("video", dim, grid, kind="1d")(grid)[0].double().numpy()
    n = np.arange(12)[:, None]
    w = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(table[:, 0::2], np.sin(n * w), atol=1e-6)
    np.testing.assert_allclose(table[:, 1::2], np.cos(n * w), atol=1e-6)
    model = build_pretrain_model(tiny("model.pos_embed=1d"))
    assert model.encoder.pos_embed["audio"].kind == model.decoder.pos_embed["video"].kind == "1d"


def test_stack_norms_close_each_modality_stack_and_share_the_last_norm():
    model = build_pretrain_model(tiny("model.fusion=mid", "model.fusion_layers=1", "model.stack_norms=true"))
    encoder = model.encoder
    assert set(encoder.stack_norm) == {"video", "audio"} and isinstance(encoder.norm, nn.LayerNorm)
    video, audio = batch()
    before = encoder.forward_features(video, audio)
    with torch.no_grad():
        encoder.stack_norm["audio"].bias.add_(1.0)
    after = encoder.forward_features(video, audio)
    # the audio stack's norm feeds the joint block, which both modalities attend in
    assert not torch.allclose(before["audio"], after["audio"]) and not torch.allclose(before["video"], after["video"])
    out = model(video, audio, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert encoder.stack_norm["video"].weight.grad is not None
    with pytest.raises(ValueError, match="mid fusion"):
        build_pretrain_model(tiny("model.fusion=late", "model.stack_norms=true"))


def test_same_decoder_has_per_modality_projections_and_mask_tokens_and_one_stack():
    # separate encoders (AV-MAE's VGGSound recipe), so only the decoder could mix the modalities
    model = build_pretrain_model(tiny("model.fusion=late", "model.decoder=same", "model.modality_embed=false"))
    decoder = model.decoder
    assert set(decoder.embed) == set(decoder.mask_token) == {"video", "audio"}
    assert isinstance(decoder.blocks, nn.ModuleList) and isinstance(decoder.norm, nn.LayerNorm)
    assert decoder.modality_embed is None and model.encoder.modality_embed is None
    # it runs per modality: the audio prediction does not see the video tokens
    video, audio = batch()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same masks twice
    first = model(video, audio, generator=g())
    second = model(torch.randn_like(video), audio, generator=g())
    torch.testing.assert_close(first["pred_audio"], second["pred_audio"])
    assert not torch.allclose(first["pred_video"], second["pred_video"])


def test_patch_loss_sum_is_patch_dimension_times_mean():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.float32)
    mean, total = masked_mse(pred, target, mask, "mean"), masked_mse(pred, target, mask, "sum")
    expected = ((pred - target) ** 2).sum(-1)[mask.bool()].mean()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(total, 12 * mean)


def mbt(*overrides: str, heads=None):
    cfg = tiny("finetune.fusion=bottleneck", "finetune.bottlenecks=4", *overrides)
    return build_classifier(cfg, heads or {"label": 5})


def test_the_pool_setting_is_refused_where_the_bottleneck_classifier_would_ignore_it():
    with pytest.raises(ValueError, match="finetune.pool=tokens applies to finetune.fusion=pool"):
        load_config(None, ["finetune.fusion=bottleneck", "finetune.pool=tokens"])
    assert load_config(None, ["finetune.fusion=pool", "finetune.pool=tokens"]).finetune.pool == "tokens"


def test_mbt_bottlenecks_are_the_only_path_between_modalities():
    video, audio = batch()
    other_video = torch.randn_like(video)
    # fusion from layer 2 of 4: the audio logits depend on the video through the bottlenecks
    model = mbt("finetune.fusion_layer=2")
    assert isinstance(model, MBTClassifier) and model.bottleneck.shape == (1, 4, 128)
    with torch.no_grad():
        for head in model.heads.values():  # zero-initialised heads would hide every difference
            nn.init.normal_(head.weight)
    model.train()
    out = model(video, audio)
    assert set(out["label"]) == {"video", "audio"}
    assert not torch.allclose(out["label"]["audio"], model(other_video, audio)["label"]["audio"])
    model.eval()
    with torch.no_grad():
        logits = model(video, audio)["label"]
        per = {m: model.heads["label"](x.mean(1)) for m, x in model.forward_tokens(video, audio).items()}
    torch.testing.assert_close(logits, (per["video"] + per["audio"]) / 2)  # evaluation: the mean
    # fusion_layer = depth: no exchange at all
    apart = mbt("finetune.fusion_layer=4").train()
    with torch.no_grad():
        nn.init.normal_(apart.heads["label"].weight)
    torch.testing.assert_close(apart(video, audio)["label"]["audio"], apart(other_video, audio)["label"]["audio"])
    # test_with_bottlenecks=false: the stacks run apart in evaluation only
    model.test_with_bottlenecks = False
    model.eval()
    with torch.no_grad():
        a = model.forward_tokens(video, audio)["audio"]
        b = model.forward_tokens(other_video, audio)["audio"]
    torch.testing.assert_close(a, b)


def test_mbt_starts_from_a_mid_fusion_pretraining_with_joint_blocks_copied_into_each_stack():
    pre = build_pretrain_model(tiny("model.fusion=mid", "model.fusion_layers=1", "model.stack_norms=true"))
    model = mbt("model.fusion=mid", "model.fusion_layers=1", "model.stack_norms=true", "finetune.fusion_layer=3")
    report = load_pretrained(model, pre.state_dict())
    assert report.missing == ["bottleneck", "heads.label.bias", "heads.label.weight"]
    joint = pre.encoder.blocks[0].attn.qkv.weight
    for m in ("video", "audio"):
        torch.testing.assert_close(model.encoder.modality_blocks[m][3].attn.qkv.weight, joint)
        torch.testing.assert_close(model.encoder.modality_blocks[m][0].mlp.fc1.weight,
                                   pre.encoder.modality_blocks[m][0].mlp.fc1.weight)
        torch.testing.assert_close(model.encoder.norm[m].weight, pre.encoder.norm.weight)
    assert not any(k.startswith("encoder.stack_norm") for k in report.loaded)


def test_momentum_sgd_with_layer_decay_and_no_weight_decay():
    cfg = tiny("train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=0.0")
    model = mbt("finetune.fusion_layer=2")
    optimizer = build_optimizer(model, cfg.train, lr=1.6, layer_decay=0.75)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and not g["nesterov"] and g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    scales = {p: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scales[named["heads.label.weight"]] == 1.0
    # 4 blocks per stack: block i has lr scale 0.75^(4 - i) relative to the top block + 1
    ratio = scales[named["encoder.modality_blocks.audio.1.attn.qkv.weight"]] / scales[
        named["encoder.modality_blocks.audio.2.attn.qkv.weight"]]
    assert ratio == pytest.approx(0.75)


def test_per_modality_mixup_draws_one_lambda_per_modality():
    video, audio = batch(size=4)
    labels = torch.tensor([0, 1, 2, 3])
    mixed_video, mixed_audio, soft = mix_batch(video, audio, {"label": labels}, {"label": 4}, alpha=0.5,
                                               smoothing=0.0, generator=torch.Generator().manual_seed(5),
                                               per_modality=True)
    draws = torch.Generator().manual_seed(5)
    lam_v, lam_a = draw_lambda(0.5, draws), draw_lambda(0.5, draws)
    assert abs(lam_v - lam_a) > 1e-3
    torch.testing.assert_close(mixed_video, lam_v * video + (1 - lam_v) * video.flip(0))
    torch.testing.assert_close(mixed_audio, lam_a * audio + (1 - lam_a) * audio.flip(0))
    assert soft["label"]["video"][0, 0].item() == pytest.approx(lam_v)
    assert soft["label"]["audio"][0, 0].item() == pytest.approx(lam_a)
    assert soft["label"]["audio"][0, 3].item() == pytest.approx(1 - lam_a)
    # the loss of per-modality logits: the mean of each modality's loss against its own targets
    logits = {"label": {"video": torch.randn(4, 4), "audio": torch.randn(4, 4)}}
    expected = (classification_loss({"label": logits["label"]["video"]}, {"label": soft["label"]["video"]}, False)
                + classification_loss({"label": logits["label"]["audio"]}, {"label": soft["label"]["audio"]}, False)) / 2
    torch.testing.assert_close(classification_loss(logits, soft, False), expected)


def test_multi_label_smoothing_spreads_s_over_the_classes():
    multi_hot = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0]])
    _, _, soft = mix_batch(None, None, {"tags": multi_hot}, {"tags": 5}, alpha=0.0, smoothing=0.3)
    torch.testing.assert_close(soft["tags"], torch.tensor([[0.76, 0.06, 0.06, 0.76, 0.06]]))


def test_avmae_audioset_loss_sums_the_sigmoid_cross_entropy_over_classes():
    """scenic ``weighted_sigmoid_cross_entropy`` (model_lib/base_models/model_utils.py): per clip
    the sum over the K classes of -(t log s(x) + (1 - t) log s(-x)), averaged over clips; MBT
    (projects/av_mae/mbt.py) averages it over the modalities' logits. CAV-MAE's BCE stays a mean."""
    cfg = load_config(CONFIGS / "finetune" / "avmae_audioset_vitl.yaml")
    clips, classes = 3, 527
    g = torch.Generator().manual_seed(0)
    logits = {"label": {m: 3 * torch.randn(clips, classes, generator=g, dtype=torch.float64)
                        for m in ("video", "audio")}}
    targets = {"label": {m: torch.rand(clips, classes, generator=g, dtype=torch.float64) for m in ("video", "audio")}}

    def log_sigmoid(x):
        return -np.log1p(np.exp(-x))

    per_modality = []
    for m in ("video", "audio"):
        x, t = logits["label"][m].numpy(), targets["label"][m].numpy()
        per_clip = -(t * log_sigmoid(x) + (1 - t) * log_sigmoid(-x)).sum(axis=1)
        per_modality.append(per_clip.sum() / clips)
    source = np.mean(per_modality)
    ours = classification_loss(logits, targets, True, cfg.finetune.multi_label_loss)
    assert ours.item() == pytest.approx(source, rel=1e-9)
    cavmae = load_config(CONFIGS / "finetune" / "cavmae_audioset20k.yaml")
    mean = classification_loss(logits, targets, True, cavmae.finetune.multi_label_loss)
    assert mean.item() == pytest.approx(source / classes, rel=1e-9)


# The spec_augment_params of scenic projects/av_mae/configs/{audioset,vggsound}/finetune.py
SPEC_AUGMENT = {
    "avmae_audioset_vitl": dict(freq_mask_max_bins=36, freq_mask_count=2, time_mask_max_frames=48,
                                time_mask_count=4, time_mask_max_ratio=0.0),
    "avmae_vggsound_vitl": dict(freq_mask_max_bins=48, freq_mask_count=1, time_mask_max_frames=48,
                                time_mask_count=4, time_mask_max_ratio=0.0),
}


@pytest.mark.parametrize("name", sorted(SPEC_AUGMENT))
def test_avmae_specaugment_draws_the_masks_lingvo_draws(name):
    """tensorflow/lingvo ``SpectrumAugmenter``: ``_TimeMask`` returns its input when
    ``time_mask_max_frames`` is 0 or ``time_mask_max_ratio`` is not positive; ``_FrequencyMask``
    draws ``freq_mask_count`` bands of fewer than ``freq_mask_max_bins`` bins."""
    source = SPEC_AUGMENT[name]
    time_masks = source["time_mask_count"]
    if source["time_mask_max_frames"] == 0 or source["time_mask_max_ratio"] <= 0:
        time_masks = 0
    cfg = load_config(CONFIGS / "finetune" / f"{name}.yaml")
    fbank_augment = build_transforms(cfg, train=True).fbank
    frames, bins = cfg.data.audio.target_length, cfg.data.audio.num_mel_bins
    fbank = torch.randn(frames, bins, generator=torch.Generator().manual_seed(0)) + 10.0  # no cell equals a fill
    masked_frames, masked_bins = 0, 0
    for seed in range(20):
        masked = fbank_augment(fbank, torch.Generator().manual_seed(seed)) != fbank
        # a frequency band covers every frame: bins masked in all frames are frequency-masked
        whole_bins = masked.all(dim=0)
        assert whole_bins.sum() <= source["freq_mask_count"] * source["freq_mask_max_bins"]
        masked_bins += int(whole_bins.any())
        # the frequency bands cannot cover all bins, so a frame masked across every bin is a time mask
        masked_frames += int(masked.all(dim=1).sum())
        # and no cell is masked outside the frequency bands
        assert torch.equal(masked, whole_bins[None, :].expand_as(masked))
    assert masked_frames == 0 if time_masks == 0 else masked_frames > 0
    assert masked_bins > 0 and source["freq_mask_count"] > 0


@pytest.mark.parametrize("name", ["avmae_audioset_vitl", "avmae_vggsound_vitl"])
def test_avmae_layer_decay_scales_every_parameter_as_scenic(name):
    """scenic projects/av_mae/optimizer_utils.py ``optimizer_with_layerwise_decay``: with L blocks,
    embeddings take layer id 0, ``encoderblock_i`` (of every modality) id i + 1, and every other
    parameter (``encoder_norm``, the bottleneck tokens, the output projection) id L + 1; the lr
    scale of id k is decay^(L + 1 - k). Here on a micro MBT (L = 4) with the recipe's settings."""
    recipe = load_config(CONFIGS / "finetune" / f"{name}.yaml")
    decay = recipe.finetune.layer_decay
    group = f"finetune.final_norm_group={recipe.finetune.final_norm_group}"
    cfg = tiny("train.optimizer=sgd", "train.weight_decay=0.0", group)
    model = mbt("finetune.fusion_layer=2", group)
    depth = len(model.encoder.modality_blocks["video"])

    def source_layer_id(name: str) -> int:
        if name.startswith(("encoder.patch_embed.", "encoder.pos_embed.", "encoder.modality_embed.")):
            return 0
        block = re.match(r"encoder\.modality_blocks\.\w+\.(\d+)\.", name)
        if block:
            return int(block[1]) + 1
        return depth + 1

    optimizer = build_optimizer(model, cfg.train, lr=1.6, layer_decay=decay)
    scale = {p: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)
    for param_name, param in named.items():
        expected = decay ** (depth + 1 - source_layer_id(param_name))
        assert scale[param] == pytest.approx(expected), param_name
    assert scale[named["encoder.norm.audio.weight"]] == 1.0
