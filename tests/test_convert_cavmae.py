"""The CAV-MAE recipe (configs/*/cavmae_*.yaml) against the sizes in YuanGongND/cav-mae
``src/models/cav_mae.py``, its loss as CAV-MAE sums it, and the ImageNet-MAE start through
``model.init_from``.

The expected counts are computed here from the layer sizes (768 wide, 12 heads, MLP 3072; 11
modality-specific layers per modality and 1 joint layer; decoder 8 layers x 512, 16 heads;
16x16 patches of one 224 px RGB frame and of a 1024 x 128 fbank), not read back from the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_convert import save, vit_checkpoint

from safetensors.torch import load_file

from avmae.config import load_config
from avmae.convert import convert
from avmae.engine.pretrain import pretrain
from avmae.models import build_pretrain_model, num_tokens

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = {name: REPO / "configs" / "pretrain" / f"cavmae_{name}.yaml" for name in ("audioset", "vggsound")}
FINETUNE = {name: REPO / "configs" / "finetune" / f"cavmae_{name}.yaml" for name in ("vggsound", "audioset20k")}


def block_params(d: int, hidden: int) -> int:
    """A pre-norm ViT block: 2 LayerNorms, qkv and output projections, a 2-layer MLP (all biased)."""
    return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (hidden * d + hidden) + (d * hidden + d)


@pytest.mark.parametrize("name", ["audioset", "vggsound"])
def test_cavmae_structure_from_layer_sizes(name):
    cfg = load_config(PRETRAIN[name])
    d, hidden, w, p = 768, 3072, 512, 16
    video_tokens, audio_tokens = (224 // p) ** 2, (1024 // p) * (128 // p)
    assert num_tokens(cfg) == {"video": video_tokens, "audio": audio_tokens} == {"video": 196, "audio": 512}

    encoder = (
        (3 * p * p * d + d) + (1 * p * p * d + d)  # patch embeddings of the frame and the fbank
        + 2 * d  # modality_a, modality_v
        + 2 * 11 * block_params(d, hidden)  # blocks_a, blocks_v
        + block_params(d, hidden) + 2 * 2 * 2 * d  # blocks_u with norm1_a/v, norm2_a/v
        + 3 * 2 * d  # norm (joint sequence), norm_a, norm_v
    )  # fmt: skip
    decoder = (
        (d * w + w) + w + 2 * w  # decoder_embed, mask_token, decoder_modality_a/v
        + 8 * block_params(w, 4 * w) + 2 * w  # 8 blocks, decoder_norm
        + (w * p * p + p * p) + (w * 3 * p * p + 3 * p * p)  # decoder_pred_a, decoder_pred_v
    )  # fmt: skip
    with torch.device("meta"):
        model = build_pretrain_model(cfg)
    assert sum(t.numel() for t in model.encoder.parameters()) == encoder
    assert sum(t.numel() for t in model.decoder.parameters()) == decoder
    assert model.decoder.kind == "joint" and len(model.decoder.blocks) == 8 and model.decoder.blocks[0].attn.num_heads == 16
    assert model.contrastive.symmetric is False and cfg.model.contrastive_weight == 0.01
    # both pretraining runs: lr x batch as the run scripts set them
    lr_at_batch = {"audioset": (2e-4, 256), "vggsound": (1e-4, 120)}[name]
    batch = cfg.data.batch_size * 8
    assert cfg.train.base_lr * batch / 256 == pytest.approx(lr_at_batch[0] * batch / lr_at_batch[1], rel=1e-3)


@pytest.mark.parametrize("name", ["vggsound", "audioset20k"])
def test_cavmae_finetune_configs_load(name):
    cfg = load_config(FINETUNE[name])
    assert cfg.model.joint_norms == "per_modality" and cfg.data.video.num_frames == 1
    assert (cfg.augment.freq_mask, cfg.augment.time_mask) == (48, 192)


def _micro(extra: list[str] = ()) -> list[str]:
    return [
        "model.size=micro", "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
        "data.video.size=32", "data.video.resize=32", "data.audio.seconds=0.64", *extra,
    ]  # fmt: skip


def test_cavmae_loss_is_the_sum_of_both_mae_losses_plus_one_way_infonce():
    torch.manual_seed(0)
    cfg = load_config(PRETRAIN["audioset"], _micro())
    model = build_pretrain_model(cfg)
    out = model(torch.randn(4, 3, 1, 32, 32), torch.randn(4, 1, 64, 128), generator=torch.Generator().manual_seed(0))
    logs = out["logs"]
    expected = logs["mae_video"] + logs["mae_audio"] + 0.01 * logs["contrastive"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["mask_video"].sum(1).tolist() == [3] * 4  # 0.75 of 4 tokens
    assert out["mask_audio"].sum(1).tolist() == [24] * 4  # 0.75 of 4 x 8 tokens


class Clips(torch.utils.data.Dataset):
    """Four items shaped like AVDataset's at the micro CAV-MAE geometry (1 frame of 32 px, 64 x 128 fbank)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        return {"video": torch.randn(3, 1, 32, 32, generator=g), "audio": torch.randn(1, 64, 128, generator=g),
                "failures": 0, "index": index}  # fmt: skip


def test_imagenet_mae_start_through_init_from(tmp_path):
    """A MAE image checkpoint converted onto the CAV-MAE architecture (--config) starts pretraining:
    both modality stacks and the joint layer from its blocks, the audio patch kernel summed over
    RGB, as CAV-MAE's src/adapt_vmae_weights.py does."""
    torch.manual_seed(1)
    state = vit_checkpoint(3, (2, 2), finetuned=False)
    cfg = load_config(PRETRAIN["vggsound"], _micro(["model.fusion_layers=1"]))
    out = convert("mae", save(state, tmp_path / "mae.pth"), tmp_path / "init", config=cfg)
    # one pretraining step at lr 0 through the engine, which applies model.init_from at a fresh start
    run = load_config(PRETRAIN["vggsound"], _micro([
        f"model.init_from={out}", f"train.output_dir={tmp_path / 'run'}", "train.base_lr=0.0", "train.max_steps=1",
        "train.mixed_precision='no'", "data.batch_size=2", "data.num_workers=0", "train.log_every=1",
    ]))  # fmt: skip
    checkpoint = pretrain(run, dataset=Clips())
    model = build_pretrain_model(run)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    enc = model.encoder
    assert torch.equal(enc.modality_blocks["audio"][2].mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"])
    assert torch.equal(enc.modality_blocks["video"][0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.blocks[0].attn.proj.weight, state["blocks.3.attn.proj.weight"])
    assert torch.equal(enc.blocks[0].modality_norm1["audio"].weight, state["blocks.3.norm1.weight"])
    assert torch.equal(enc.joint_norm.weight, state["norm.weight"])
    kernel = state["patch_embed.proj.weight"]
    assert torch.allclose(enc.patch_embed["audio"].embed.proj.weight, kernel.sum(1, keepdim=True))
    assert torch.equal(enc.patch_embed["video"].proj.weight[:, :, 0], kernel)
