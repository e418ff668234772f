"""Export to safetensors + config.json, reload from the folder alone, and the timm audio ViT."""

import argparse
import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import avmae
from avmae.config import load_config, save_config
from avmae.formats import (
    TIMM_WEIGHTS,
    export,
    load_timm_audio_vit,
    read_state_dict,
    timm_audio_vit,
)
from avmae.models import build_classifier, build_encoder, build_pretrain_model, load_pretrained

# micro model at a small geometry: 4 frames of 64x64, 0.64 s of audio (64 x 64 fbank)
GEOMETRY = [
    "model.size=micro",
    "data.video.num_frames=4",
    "data.video.size=64",
    "data.audio.seconds=0.64",
    "data.audio.num_mel_bins=64",
]


def _config(*overrides):
    return load_config(overrides=GEOMETRY + list(overrides))


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 64, 64, generator=gen), torch.randn(2, 1, 64, 64, generator=gen)


def _checkpoint(root, cfg, seed=0, weights_name="model.safetensors"):
    """A pretraining checkpoint folder as the engine writes it, from a freshly built model."""
    torch.manual_seed(seed)
    model = build_pretrain_model(cfg)
    step = root / "step_00000100"
    step.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(step / weights_name))
    else:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, step / weights_name)
    save_config(cfg, step / "config.yaml")
    (step / "trainer_state.json").write_text(json.dumps({"step": 100}))
    return step, model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = _config("model.fusion=mid", "model.fusion_layers=1", "model.contrastive=infonce")
    return _checkpoint(tmp_path_factory.mktemp("ckpt"), cfg)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_exported_files_follow_the_umask_as_torch_save_does(checkpoint, tmp_path, umask, mode):
    step, _ = checkpoint
    previous = os.umask(umask)
    try:
        out = export(step, tmp_path / "export", part="audio")
        torch.save({}, tmp_path / "reference.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "reference.pt").stat().st_mode) == mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"config.json": mode, "model.safetensors": mode, "timm_vit.safetensors": mode}


def test_model_export_reloads_bit_identical(checkpoint, tmp_path):
    step, model = checkpoint
    out = export(step, tmp_path / "export", part="model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    description = json.loads((out / "config.json").read_text())
    assert description["part"] == "model"
    assert description["architecture"]["fusion"] == "mid" and description["architecture"]["embed_dim"] == 128
    assert description["input"]["audio"]["target_length"] == 64
    assert description["input"]["audio"]["norm_mean"] == pytest.approx(-5.081)
    assert description["input"]["audio"]["fbank"]["window_type"] == "hanning"
    assert description["input"]["tokens"] == {"video": 2 * 4 * 4, "audio": 4 * 4}
    assert description["source"] == {"checkpoint": "step_00000100", "step": 100}
    assert description["config"]["model"]["contrastive"] == "infonce"

    reloaded = avmae.from_pretrained(out)
    assert type(reloaded) is type(model) and not reloaded.training
    video, audio = _inputs()
    with torch.no_grad():
        a = model(video, audio, generator=torch.Generator().manual_seed(3))
        b = reloaded(video, audio, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"])
    for key in ("pred_video", "pred_audio", "mask_video", "mask_audio"):
        assert torch.equal(a[key], b[key]), key


def test_classifier_logits_from_export_are_bit_identical(checkpoint, tmp_path):
    """A classifier filled from the export equals one filled from the original weights."""
    step, model = checkpoint
    out = export(step, tmp_path / "encoder", part="encoder")
    cfg = _config()
    video, audio = _inputs()
    logits = []
    for source in (model.state_dict(), avmae.from_pretrained(out).state_dict()):
        torch.manual_seed(1)  # same head initialisation
        clf = build_classifier(cfg, {"label": 7})
        report = load_pretrained(clf, source)
        assert all(k.startswith("heads.") for k in report.missing) and report.loaded
        with torch.no_grad():
            logits.append(clf.eval()(video=video, audio=audio)["label"])
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("part", ["encoder", "audio", "video"])
def test_encoder_parts_reload_bit_identical(checkpoint, tmp_path, part):
    step, model = checkpoint
    out = export(step, tmp_path / part, part=part)
    encoder = avmae.from_pretrained(out)
    expected_modalities = ("video", "audio") if part == "encoder" else (part,)
    assert encoder.modalities == expected_modalities
    video, audio = _inputs()
    given = {"video": video, "audio": audio}
    with torch.no_grad():
        ours = encoder.forward_features(**{m: given[m] for m in expected_modalities})
        # a one-modality pass of the original encoder runs the same blocks
        original = model.encoder.forward_features(**{m: given[m] for m in expected_modalities})
    for m in expected_modalities:
        assert torch.equal(ours[m], original[m])
    assert (out / TIMM_WEIGHTS).exists() == (part == "audio")


@pytest.mark.parametrize("fusion", ["late", "mid", "shared", "early"])
def test_timm_audio_vit_matches_our_audio_features(tmp_path, fusion):
    cfg = _config(f"model.fusion={fusion}", "model.fusion_layers=2")
    torch.manual_seed(0)
    encoder = build_encoder(cfg).eval()
    vit, kwargs = timm_audio_vit(encoder)
    assert type(vit).__name__ == "VisionTransformer" and kwargs["depth"] == 4 and kwargs["img_size"] == [64, 64]
    _, audio = _inputs()
    with torch.no_grad():
        ours = encoder.forward_features(audio=audio)["audio"]
        tokens = vit.forward_features(audio)
        pooled = vit.forward_head(tokens, pre_logits=True)
        assert vit.num_prefix_tokens == 0 and tokens.shape == ours.shape == (2, 16, 128)
        torch.testing.assert_close(tokens, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled, ours.mean(dim=1), rtol=1e-5, atol=1e-5)
        assert vit(audio).shape == (2, 128)  # num_classes=0: the pooled embedding


def test_timm_audio_vit_from_an_audio_export(checkpoint, tmp_path):
    step, model = checkpoint
    out = export(step, tmp_path / "audio", part="audio")
    vit = load_timm_audio_vit(out)  # stock timm class + the JSON kwargs + safetensors
    _, audio = _inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(audio), model.encoder.forward_features(audio=audio)["audio"], rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="no timm audio model"):
        load_timm_audio_vit(export(step, tmp_path / "video", part="video"))


def test_export_tool(checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_tool", Path(__file__).resolve().parents[1] / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    step, model = checkpoint
    assert tool.main([str(step), str(tmp_path / "out"), "--part", "audio"]) == 0
    assert "exported audio (micro, mid fusion, modalities audio)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", TIMM_WEIGHTS]
    with pytest.raises(SystemExit):
        tool.main([str(step), str(tmp_path / "out"), "--part", "decoder"])


def test_pt_checkpoint_read_with_weights_only(tmp_path):
    """A `.pt` checkpoint with DDP prefixes loads; one that pickles an object is refused."""
    cfg = _config("model.fusion=late")
    step, model = _checkpoint(tmp_path / "pt", cfg, weights_name="model.pt")
    out = export(step, tmp_path / "export", part="encoder")
    video, audio = _inputs()
    with torch.no_grad():
        assert torch.equal(avmae.from_pretrained(out)(video=video)["video"], model.encoder(video=video)["video"])

    pickled = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "weight": torch.zeros(2)}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(pickled)


def test_bad_inputs_name_the_file(checkpoint, tmp_path):
    step, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="not an avmae export"):
        avmae.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        export(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="part must be one of"):
        export(step, tmp_path / "out", part="decoder")
    # weights of another architecture: a small model's config with the micro weights
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((step / "model.safetensors").read_bytes())
    save_config(_config("model.size=tiny", "model.contrastive=infonce"), wrong / "config.yaml")
    with pytest.raises(ValueError, match="do not fit|does not match"):
        export(wrong, tmp_path / "out", part="encoder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        avmae.from_pretrained(broken)
