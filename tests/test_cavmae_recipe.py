"""The CAV-MAE recipe configs (configs/*/cavmae_*.yaml) against YuanGongND/cav-mae, each check
computing the source's behaviour by hand on a micro model: the positional tables
(``src/models/pos_embed.py``, ``src/models/cav_mae.py``), tables learned in finetuning
(``CAVMAEFT(tr_pos=True)``), the head's xavier initialisation, and LayerNorm eps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avmae.config import load_config
from avmae.engine.optim import build_optimizer
from avmae.models import build_classifier, build_pretrain_model, load_pretrained

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "cavmae_vggsound.yaml"
FINETUNE = REPO / "configs" / "finetune" / "cavmae_vggsound.yaml"
# the recipes on a micro model: width 128, decoder 64; one 64 px frame (4 x 4 tokens) and a
# 64 x 32 fbank (4 time x 2 frequency tokens)
MICRO = [
    "model.size=micro", "data.video.resize=64", "data.video.size=64", "data.audio.seconds=0.64",
    "data.audio.num_mel_bins=32", "model.decoder_width=64", "model.decoder_depth=1", "model.decoder_heads=4",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def micro(path: Path, *overrides: str):
    return load_config(path, MICRO + list(overrides))


def cavmae_2d_sincos(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """YuanGongND/cav-mae src/models/pos_embed.py get_2d_sincos_pos_embed(dim, grid_h, grid_w),
    written out: MAE's formula (facebookresearch/mae util/pos_embed.py), rows = h, cols = w,
    the first half of the channels from the column index, the second from the row index."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)  # (h * w, dim), row-major


def test_cavmae_positions_are_maes_2d_table_over_all_channels():
    model = build_pretrain_model(micro(PRETRAIN))
    for width, pos in ((128, model.encoder.pos_embed), (64, model.decoder.pos_embed)):
        # the frame: 4 x 4 tokens, all channels (cav_mae.py: get_2d_sincos_pos_embed(D, 14, 14))
        video = pos["video"]((1, 4, 4))[0].double().numpy()
        np.testing.assert_allclose(video, cavmae_2d_sincos(width, 4, 4), atol=1e-6)
        # the fbank: cav_mae.py transposes it to (frequency, time) and calls
        # get_2d_sincos_pos_embed(D, 8, T'): frequency rows, time columns; ours is time-major
        audio = pos["audio"]((4, 2))[0].double().numpy()
        expected = cavmae_2d_sincos(width, 2, 4).reshape(2, 4, width).transpose(1, 0, 2).reshape(8, width)
        np.testing.assert_allclose(audio, expected, atol=1e-6)
    with pytest.raises(ValueError, match="single video frame"):
        model.encoder.pos_embed["video"]((2, 4, 4))


def test_cavmae_finetuning_learns_the_positional_tables_from_the_fixed_code():
    pretrained = build_pretrain_model(micro(PRETRAIN)).state_dict()
    assert not any("pos_embed" in k for k in pretrained)  # fixed codes are not stored
    cfg = micro(FINETUNE)
    assert cfg.finetune.learn_pos_embed  # cav_mae.py CAVMAEFT(tr_pos=True)
    model = build_classifier(cfg, {"label": 5})
    report = load_pretrained(model, pretrained)
    # the tables are the only encoder weights the checkpoint lacks
    assert {k for k in report.missing if not k.startswith("heads.")} == {
        "encoder.pos_embed.audio.table", "encoder.pos_embed.video.table"}
    params = dict(model.named_parameters())
    fixed = build_pretrain_model(micro(PRETRAIN)).encoder.pos_embed
    for m, grid in (("video", (1, 4, 4)), ("audio", (4, 2))):
        table = params[f"encoder.pos_embed.{m}.table"]
        assert table.requires_grad
        torch.testing.assert_close(table.detach(), fixed[m](grid))  # starts where pretraining was
    optimizer = build_optimizer(model, cfg.train, lr=1e-3)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(params["encoder.pos_embed.video.table"]) in optimized
    g = torch.Generator().manual_seed(0)
    out = model(video=torch.randn(2, 3, 1, 64, 64, generator=g), audio=torch.randn(2, 1, 64, 32, generator=g))
    out["label"].sum().backward()
    assert params["encoder.pos_embed.audio.table"].grad.abs().sum() > 0
    # avmae's default keeps fixed codes: no positional parameter
    default = build_classifier(micro(FINETUNE, "finetune.learn_pos_embed=false"), {"label": 5})
    assert not any("pos_embed" in name for name, _ in default.named_parameters())


def test_cavmae_head_is_xavier_initialised():
    # cav_mae.py CAVMAEFT._init_weights: xavier_uniform_ on mlp_head's Linear, zero bias;
    # xavier-uniform draws from U(-a, a), a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3)
    torch.manual_seed(0)
    fan_in, fan_out = 128, 309
    head = build_classifier(micro(FINETUNE), {"label": fan_out}).heads["label"][-1]
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    weight = head.weight.detach()
    assert weight.abs().max() <= bound and weight.abs().max() > 0.98 * bound
    assert abs(weight.std().item() / (bound / 3**0.5) - 1) < 0.03
    assert abs(weight.mean().item()) < 0.01 * bound and torch.count_nonzero(head.bias) == 0
    # avmae's default: MAE finetuning's trunc normal, std 2e-5 (facebookresearch/mae main_finetune.py)
    small = build_classifier(micro(FINETUNE, "finetune.head_init=trunc_normal"), {"label": fan_out}).heads["label"][-1]
    assert abs(small.weight.std().item() / 2e-5 - 1) < 0.03


def layer_norm_eps(module: torch.nn.Module) -> set[float]:
    return {m.eps for m in module.modules() if isinstance(m, torch.nn.LayerNorm)}


def test_cavmae_layer_norm_eps_is_pytorchs_default_in_every_norm(tmp_path):
    # cav_mae.py: CAVMAE / CAVMAEFT(norm_layer=nn.LayerNorm), mlp_head = nn.LayerNorm(...): eps 1e-5
    pretrain_cfg, finetune_cfg = micro(PRETRAIN), micro(FINETUNE)
    assert pretrain_cfg.model.norm_eps == finetune_cfg.model.norm_eps == 1e-5
    model = build_pretrain_model(pretrain_cfg)
    classifier = build_classifier(finetune_cfg, {"label": 5})
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules()) > 10
    assert layer_norm_eps(model) == layer_norm_eps(classifier) == {1e-5}
    # avmae's default: MAE's 1e-6 everywhere
    assert layer_norm_eps(build_pretrain_model(load_config(None, MICRO))) == {1e-6}

    # every export's config.json records it, and what is rebuilt from one uses it
    from avmae.config import Config
    from avmae.formats import apply_pretrained, from_pretrained, load_timm_audio_vit, read_export, write_export
    from avmae.models import build_encoder

    model_dir = write_export(model, pretrain_cfg, "model", tmp_path / "model", {"checkpoint": "test"})
    audio_dir = write_export(build_encoder(pretrain_cfg, ("audio",)), pretrain_cfg, "audio", tmp_path / "audio", {})
    for folder in (model_dir, audio_dir):
        description = read_export(folder)
        assert description["architecture"]["norm_eps"] == description["config"]["model"]["norm_eps"] == 1e-5
        assert layer_norm_eps(from_pretrained(folder)) == {1e-5}
    assert read_export(audio_dir)["timm"]["norm_eps"] == 1e-5
    assert layer_norm_eps(load_timm_audio_vit(audio_dir)) == {1e-5}
    # finetuning takes the export's eps over its own config's
    assert apply_pretrained(Config(), model_dir).model.norm_eps == 1e-5


def test_cavmae_mixup_mixes_waveforms_then_computes_the_fbank(make_clip, tmp_path):
    """dataloader.py _wav2fbank: lam * (a - mean a) + (1 - lam) * (b - mean b), its mean removed,
    then the Kaldi fbank, zero frames to target_length, (x - mean) / std; the normalised images
    and the labels mixed with the same lam. Computed here with torchaudio's fbank directly."""
    import torchaudio

    from avmae.augment import build_transforms
    from avmae.augment.transforms import normalize_video
    from avmae.data.audio import audio_duration, read_audio
    from avmae.data.dataset import AVDataset
    from avmae.data.manifests import ClipRecord, Manifest

    rate, seconds = 16000, 2.0
    t = np.arange(int(seconds * rate)) / rate
    records = []
    for i, (hz, grey) in enumerate(((440.0, 40), (1250.0, 200), (3100.0, 120))):
        frames = np.full((50, 32, 32, 3), grey, np.uint8)
        tone = (0.3 * np.sin(2 * np.pi * hz * t) + 0.05 * (i + 1)).astype(np.float32)  # offsets: the means matter
        records.append(ClipRecord(f"c{i}", make_clip(f"c{i}.mp4", frames, 25.0, tone, rate), targets={"label": i}))
    manifest = Manifest(records, {"label": ["a", "b", "c"]}, source=tmp_path / "m.csv")
    # no other augmentation; the audio window (2.56 s) is longer than the files: each is read whole
    quiet = ["data.video.resize=32", "data.video.size=32", "data.audio.seconds=2.56", "augment.random_start=false",
             "augment.time_roll=0", "augment.freq_mask=0", "augment.time_mask=0"]

    def dataset(*overrides):
        cfg = micro(FINETUNE, *quiet, *overrides)
        return cfg, AVDataset(manifest, cfg.data, cfg.augment, train=True, transforms=build_transforms(cfg, True))

    cfg, recipe = dataset()
    assert (cfg.augment.mixup_domain, cfg.augment.mixup_prob, cfg.augment.mixup) == ("waveform", 0.5, 10.0)
    _, always = dataset("augment.mixup_prob=1.0")
    _, plain = dataset("augment.mixup=0")
    audio, video_cfg = cfg.data.audio, cfg.data.video

    def wave(i):
        path = records[i].video
        return read_audio(path, 0.0, audio_duration(path), rate)

    def video(i):
        return normalize_video(plain[i]["video"], video_cfg.mean, video_cfg.std)

    for index in range(3):
        item = always[index]
        lam, j = item["mix_lambda"], item["mix_index"]
        assert 0.0 < lam < 1.0 and 0 <= j < 3
        a, b = wave(index), wave(j)
        a, b = a - a.mean(), b - b.mean()
        b = torch.nn.functional.pad(b, (0, max(a.numel() - b.numel(), 0)))[: a.numel()]
        mix = lam * a + (1 - lam) * b
        mix = mix - mix.mean()
        fbank = torchaudio.compliance.kaldi.fbank(
            mix[None], htk_compat=True, sample_frequency=rate, use_energy=False, window_type="hanning",
            num_mel_bins=audio.num_mel_bins, dither=0.0, frame_shift=10)
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, audio.target_length - fbank.shape[0]))
        # float32 rounding (our fbank removes the mean once more) shows in the log of near-empty
        # bins as up to 5e-4; a mixing-order error is above 0.1 (below)
        torch.testing.assert_close(item["audio"][0], (fbank - audio.norm_mean) / audio.norm_std, atol=1e-3, rtol=1e-4)
        if j != index:  # not the mix of two fbanks: the log-mel is not linear
            fbanks = lam * plain[index]["audio"][0] + (1 - lam) * plain[j]["audio"][0]
            assert (item["audio"][0] - fbanks).abs().max() > 0.1
        torch.testing.assert_close(item["video"], lam * video(index) + (1 - lam) * video(j))
        one_hot = torch.eye(3)
        torch.testing.assert_close(item["targets"]["label"], lam * one_hot[index] + (1 - lam) * one_hot[j])

    # the recipe mixes half the clips (run_cavmae_ft*.sh mixup=0.5); the others keep their clip,
    # as normalised frames and float targets so that both batch together
    items = []
    for epoch in range(4):
        recipe.set_epoch(epoch)
        items += [recipe[i] for i in range(3)]
    unmixed = [item for item in items if item["mix_index"] == -1]
    assert 0 < len(unmixed) < len(items)
    for item in unmixed:
        index = int(item["targets"]["label"].argmax())
        assert item["mix_lambda"] == 1.0 and torch.equal(item["targets"]["label"], torch.eye(3)[index])
        torch.testing.assert_close(item["video"], video(index))
        torch.testing.assert_close(item["audio"], plain[index]["audio"])
