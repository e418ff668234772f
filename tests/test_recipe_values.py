"""Every recipe setting docs/recipes.md calls equal, against the value of its source file.

Each table lists, per setting (the row of docs/recipes.md), the value of the released config,
written here from the source file named in the comment, and the function that reads ours from
the recipe YAML. Nothing is read back from our own configs as an expected value: a wrong number
in a config fails here. Behaviour behind a value (1-D positions, stack norms, the patch loss,
layer decay, ...) is computed by hand in tests/test_recipe_options.py and the tests the
docs name next to these.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from avmae.config import Config, load_config
from avmae.engine.optim import build_optimizer, effective_batch_size, scaled_lr
from avmae.models import build_classifier, build_pretrain_model, model_grids

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# The frame rate our configs' frame counts are stated for: a DMVR stride of s frames on 25 fps
# video is 25 / s frames per second (docs/recipes.md, "Frames are sampled in seconds").
VIDEO_FPS = 25.0


@cache
def recipe(path: Path) -> Config:
    return load_config(path)


def launched_processes(path: Path) -> int:
    """Processes of the `accelerate launch --config_file ...` command in a recipe's header."""
    command = re.search(r"--config_file (\S+)", path.read_text())
    assert command, f"{path.name}: no accelerate command in the header"
    return yaml.safe_load((ROOT / command[1]).read_text())["num_processes"]


def global_batch(path: Path, cfg: Config) -> int:
    """Clips per optimiser update when launched as the header says (the engine's count)."""
    return effective_batch_size(cfg.data.batch_size, launched_processes(path), cfg.train.grad_accum)


def peak_lr(path: Path, cfg: Config) -> float:
    """The lr the engine reaches after warmup at that batch (base_lr x batch / 256)."""
    return scaled_lr(cfg.train, global_batch(path, cfg))


def tokens(cfg: Config) -> dict[str, int]:
    return {m: int(torch.tensor(g).prod()) for m, g in model_grids(cfg).items()}


def pixel_map(cfg: Config) -> list[float]:
    """Where the normalisation sends pixel values 0, 0.5 and 1 (per channel, flattened)."""
    v = cfg.data.video
    return [round((x - m) / s, 9) for m, s in zip(v.mean, v.std) for x in (0.0, 0.5, 1.0)]


def case_ids(rows: list[tuple]) -> list[str]:
    """`config-setting` with underscores for spaces, so `pytest -k frame_size` selects a setting."""
    return [f"{name}-{setting.replace(' ', '_')}" for name, setting, *_ in rows]


def same(ours, source) -> bool:
    """Equal, floats to 1e-9 relative (a computed lr, a frame rate), item by item in tuples and lists."""
    if isinstance(source, (tuple, list)):
        return isinstance(ours, (tuple, list)) and len(ours) == len(source) and all(map(same, ours, source))
    if isinstance(source, float) or isinstance(ours, float):
        return not isinstance(ours, (bool, str)) and ours == pytest.approx(source, rel=1e-9, abs=0)
    return type(ours) is type(source) and ours == source


ZERO_CENTRED = [-1.0, 0.0, 1.0] * 3  # DMVR zero_centering: x -> 2x - 1


# ---- AV-MAE pretraining ----------------------------------------------------------------------
# AS-PT: google-research/scenic scenic/projects/av_mae/configs/audioset/pretrain.py
# VS-PT: google-research/scenic scenic/projects/av_mae/configs/vggsound/pretrain.py
# Both: VARIANT = 'L/16x2'; the ViT-B configs take the 'B' entries of the same dicts.

AVMAE_PRETRAIN_SHARED = {
    # AS-PT / VS-PT: batch_size = 512
    "batch": (lambda p, c: global_batch(p, c), 512),
    # num_frames = 16, stride = 4
    "frames": (lambda p, c: (c.data.video.num_frames, c.data.video.frame_rate), (16, VIDEO_FPS / 4)),
    # min_resize_train = 256, crop_size = 224
    "frame size": (lambda p, c: (c.data.video.resize, c.data.video.size), (256, 224)),
    # scenic projects/av_mae/datasets/audiovisual_tfrecord_dataset.py: random_flip = True, a
    # left-right flip with probability 1/2 (dmvr processors.py random_flip_left_right)
    "flip": (lambda p, c: c.augment.hflip, 0.5),
    # no do_color_augment in AS-PT / VS-PT
    "colour augmentation": (lambda p, c: (c.augment.color_jitter, c.augment.grayscale), (0.0, 0.0)),
    # zero_centering = True
    "pixel scale": (lambda p, c: pixel_map(c), ZERO_CENTRED),
    # scenic projects/av_mae/datasets/dataset_utils.py add_spectrogram: dmvr sample_sequence with
    # the frames' state, repeat_sequence = True (the window mode is tested in test_audio_window.py)
    "audio window": (lambda p, c: c.data.audio.window, "wrap"),
    # patches.size = (16, 16, 2), temporal_encoding_config.method = '3d_conv'
    "patches": (lambda p, c: (c.model.patch_size, c.model.tubelet), (16, 2)),
    # positional_embedding = positional_embedding_decoder = 'sinusoidal_1d'
    "positions": (lambda p, c: c.model.pos_embed, "1d"),
    # use_modality_tokens = False (AS-PT; VS-PT leaves the model's default, False)
    "modality tokens": (lambda p, c: c.model.modality_embed, False),
    # decoder_strategy = 'same_decoder'
    "decoder strategy": (lambda p, c: c.model.decoder, "same"),
    # use_inpainting = False (VS-PT: the model's default): each modality reconstructs itself from
    # the joint encoding
    "inpainting": (lambda p, c: c.model.reconstruction, "joint"),
    # masking_strategy = 'random'
    "masking strategy": (lambda p, c: (c.model.video_masking, c.model.audio_masking), ("random", "random")),
    # standardise_per_patch = False
    "targets": (lambda p, c: c.model.norm_pix_loss, False),
    # normalise_by_output_dimension = True: a patch's squared errors averaged over its values
    "loss normalisation": (lambda p, c: c.model.patch_loss, "mean"),
    # modality_weight spectrogram 0.5, rgb 0.5
    "modality weights": (lambda p, c: (c.model.loss_weight_video, c.model.loss_weight_audio), (0.5, 0.5)),
    # stochastic_droplayer_rate = 0, dropout_rate = 0 (no dropout option here)
    "stochastic depth": (lambda p, c: c.model.drop_path, 0.0),
    # optimizer = 'adam', beta1 = 0.9, beta2 = 0.95, explicit_weight_decay = 0.05 (decoupled)
    "optimiser": (lambda p, c: (c.train.optimizer, tuple(c.train.betas), c.train.weight_decay),
                  ("adamw", (0.9, 0.95), 0.05)),
    # warmup_steps = 4 x steps_per_epoch, end_lr = 0 (cosine decay to 0)
    "warmup and end": (lambda p, c: (c.train.warmup_epochs, c.train.min_lr), (4, 0.0)),
    # max_grad_norm not set
    "gradient clipping": (lambda p, c: c.train.clip_grad, 0.0),
}

AVMAE_PRETRAIN = {
    "avmae_audioset_vitl": {
        # AS-PT: encoder_strategy = 'separate_encoders_and_concat', fusion_layers = 2
        "encoder": (lambda p, c: (c.model.fusion, c.model.fusion_layers), ("mid", 2)),
        # vivit_multimodal.py: every stack an encoder with normalise_encoder_output = True
        "encoder norms": (lambda p, c: c.model.stack_norms, True),
        # token_mask_probability_dict = {'spectrogram': 0.7, 'rgb': 0.9}
        "masking": (lambda p, c: (c.model.mask_ratio_video, c.model.mask_ratio_audio), (0.9, 0.7)),
        # VARIANT 'L/16x2': hidden 1024, 16 heads, mlp 4096, 24 layers
        "size": (lambda p, c: c.model.size, "large"),
        # decoder_config L: hidden_size 512, num_layers 4, num_heads 8, mlp_dim 2048
        "decoder": (lambda p, c: (c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads), (512, 4, 8)),
        # base_lr = 3e-4, base_learning_rate = base_lr x batch_size / 256
        "learning rate": (lambda p, c: peak_lr(p, c), 3e-4 * 512 / 256),
        # num_training_epochs = 120
        "epochs": (lambda p, c: c.train.epochs, 120),
        # checkpoint_steps = steps_per_epoch = AUDIOSET_TRAIN_SIZE // batch_size
        "checkpoints": (lambda p, c: c.train.checkpoint_every, 1857210 // 512),
        # num_spec_frames = 10 x spec_shape (100, 128), VALID 16 x 16 patches: 62 x 8
        "spectrogram": (lambda p, c: tokens(c)["audio"], (1000 // 16) * (128 // 16)),
    },
    "avmae_audioset_vitb": {
        "encoder": (lambda p, c: (c.model.fusion, c.model.fusion_layers), ("mid", 2)),
        "encoder norms": (lambda p, c: c.model.stack_norms, True),
        "masking": (lambda p, c: (c.model.mask_ratio_video, c.model.mask_ratio_audio), (0.9, 0.7)),
        # VARIANT 'B/16x2': hidden 768, 12 heads, mlp 3072, 12 layers
        "size": (lambda p, c: c.model.size, "base"),
        # decoder_config B: hidden_size 384, num_layers 4, num_heads 6, mlp_dim 1536
        "decoder": (lambda p, c: (c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads), (384, 4, 6)),
        "learning rate": (lambda p, c: peak_lr(p, c), 3e-4 * 512 / 256),
        "epochs": (lambda p, c: c.train.epochs, 120),
        "checkpoints": (lambda p, c: c.train.checkpoint_every, 1857210 // 512),
        "spectrogram": (lambda p, c: tokens(c)["audio"], (1000 // 16) * (128 // 16)),
    },
    "avmae_vggsound_vitl": {
        # VS-PT: encoder_strategy = 'separate_encoders'
        "encoder": (lambda p, c: c.model.fusion, "late"),
        # VS-PT: token_mask_probability_dict = {'spectrogram': 0.5, 'rgb': 0.9}
        "masking": (lambda p, c: (c.model.mask_ratio_video, c.model.mask_ratio_audio), (0.9, 0.5)),
        "size": (lambda p, c: c.model.size, "large"),
        "decoder": (lambda p, c: (c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads), (512, 4, 8)),
        # VS-PT: base_lr = 1.5e-4, x batch_size / 256
        "learning rate": (lambda p, c: peak_lr(p, c), 1.5e-4 * 512 / 256),
        # VS-PT: num_training_epochs = 400
        "epochs": (lambda p, c: c.train.epochs, 400),
        # VS-PT: checkpoint_steps = VGGSOUND_TRAIN_SIZE // batch_size
        "checkpoints": (lambda p, c: c.train.checkpoint_every, 172427 // 512),
        # VS-PT: num_spec_frames = 8: 800 frames, 50 x 8 patches
        "spectrogram": (lambda p, c: tokens(c)["audio"], (800 // 16) * (128 // 16)),
    },
    "avmae_vggsound_vitb": {
        "encoder": (lambda p, c: c.model.fusion, "late"),
        "masking": (lambda p, c: (c.model.mask_ratio_video, c.model.mask_ratio_audio), (0.9, 0.5)),
        "size": (lambda p, c: c.model.size, "base"),
        "decoder": (lambda p, c: (c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads), (384, 4, 6)),
        "learning rate": (lambda p, c: peak_lr(p, c), 1.5e-4 * 512 / 256),
        "epochs": (lambda p, c: c.train.epochs, 400),
        "checkpoints": (lambda p, c: c.train.checkpoint_every, 172427 // 512),
        "spectrogram": (lambda p, c: tokens(c)["audio"], (800 // 16) * (128 // 16)),
    },
}

PRETRAIN_ROWS = [
    (name, setting, *row)
    for name, own in AVMAE_PRETRAIN.items()
    for setting, row in {**AVMAE_PRETRAIN_SHARED, **own}.items()
]


@pytest.mark.parametrize("name,setting,read,source", PRETRAIN_ROWS, ids=case_ids(PRETRAIN_ROWS))
def test_avmae_pretraining(name, setting, read, source):
    path = CONFIGS / "pretrain" / f"{name}.yaml"
    ours = read(path, recipe(path))
    assert same(ours, source), f"{name} {setting}: ours {ours!r}, source {source!r}"


# ---- AV-MAE MBT finetuning -------------------------------------------------------------------
# AS-FT: google-research/scenic scenic/projects/av_mae/configs/audioset/finetune.py
# VS-FT: google-research/scenic scenic/projects/av_mae/configs/vggsound/finetune.py

AVMAE_FINETUNE_SHARED = {
    # AS-FT / VS-FT: num_frames = 32, stride = 2
    "frames": (lambda p, c: (c.data.video.num_frames, c.data.video.frame_rate), (32, VIDEO_FPS / 2)),
    # AS-FT: min_resize_train = min_resize_test = 256; VS-FT: min_resize = 256; crop_size = 224
    "frame size": (lambda p, c: (c.data.video.resize, c.data.video.size), (256, 224)),
    # the dataset's random_flip = True (audiovisual_tfrecord_dataset.py)
    "flip": (lambda p, c: c.augment.hflip, 0.5),
    # zero_centering = True
    "pixel scale": (lambda p, c: pixel_map(c), ZERO_CENTRED),
    # add_spectrogram: sample_sequence with the frames' state in training, sample_linspace_sequence
    # in evaluation, both wrapping (test_audio_window.py)
    "audio window": (lambda p, c: c.data.audio.window, "wrap"),
    # augmentation_params: prob_color_augment = 0.8, prob_color_drop = 0.1
    "colour": (lambda p, c: (c.augment.color_jitter, c.augment.grayscale), (0.8, 0.1)),
    # hidden_size 1024, num_heads 16, mlp_dim 4096, num_layers 24, patches.size = [16, 16, 2]
    "model": (lambda p, c: (c.model.size, c.model.patch_size, c.model.tubelet), ("large", 16, 2)),
    # modality_fusion = ('rgb', 'spectrogram'), use_bottleneck = True, n_bottlenecks = 4,
    # test_with_bottlenecks = True, share_encoder = False
    "fusion": (lambda p, c: (c.finetune.modalities, c.finetune.fusion, c.finetune.bottlenecks,
                             c.finetune.test_with_bottlenecks), ("audiovisual", "bottleneck", 4, True)),
    # mbt.py: use_modality_tokens not set, False
    "modality tokens": (lambda p, c: c.model.modality_embed, False),
    # mbt.py add_positional_embed: 'sinusoidal_1d'
    "positions": (lambda p, c: c.model.pos_embed, "1d"),
    # stochastic_droplayer_rate = 0.3 (rising with depth: test_stochastic_depth_rises_as_mbts)
    "stochastic depth": (lambda p, c: c.model.drop_path, 0.3),
    # optimizer = 'momentum', momentum = 0.9, layerwise_decay = 0.75, l2_decay_factor = 0
    "optimiser": (lambda p, c: (c.train.optimizer, c.train.momentum, c.finetune.layer_decay, c.train.weight_decay),
                  ("sgd", 0.9, 0.75, 0.0)),
    # max_grad_norm = 1
    "gradient clipping": (lambda p, c: c.train.clip_grad, 1.0),
    # label_smoothing = 0.3
    "label smoothing": (lambda p, c: c.finetune.label_smoothing, 0.3),
    # mixup.alpha = 0.5, mixmod = True
    "mixup": (lambda p, c: (c.augment.mixup, c.augment.mixup_per_modality), (0.5, True)),
    # warmup_steps = 2.5 x steps_per_epoch, cosine_decay to 0
    "warmup and end": (lambda p, c: (c.train.warmup_epochs, c.train.min_lr), (2.5, 0.0)),
    # num_training_epochs = 50
    "epochs": (lambda p, c: c.train.epochs, 50),
    # num_test_clips = 4, no three spatial crops
    "test": (lambda p, c: (c.data.test_clips, c.data.test_crops), (4, 1)),
}

AVMAE_FINETUNE = {
    "avmae_audioset_vitl": {
        # AS-FT: batch_size = 128
        "batch": (lambda p, c: global_batch(p, c), 128),
        # AS-FT: base_learning_rate = 1.6 (not scaled by the batch)
        "learning rate": (lambda p, c: peak_lr(p, c), 1.6),
        # AS-FT: steps_per_epoch = AUDIOSET_TRAIN_SIZE // batch_size, AUDIOSET_TRAIN_SIZE = 508994
        "epoch size": (lambda p, c: c.data.balanced_epoch_size, 508994),
        # AS-FT: fusion_layer = 18
        "fusion layer": (lambda p, c: c.finetune.fusion_layer, 18),
        # AS-FT: label smoothing of the sigmoid targets (mbt_multilabel_classification)
        "smoothed multi-label targets": (lambda p, c: c.finetune.smooth_multi_label, True),
        # AS-FT: spec_augment_params freq_mask_max_bins 36, freq_mask_count 2; time masks none
        # (time_mask_max_ratio = 0, tensorflow/lingvo _TimeMask)
        "SpecAugment": (lambda p, c: (c.augment.freq_mask, c.augment.num_freq_masks, c.augment.num_time_masks),
                        (36, 2, 0)),
        # AS-FT: circular_time_shift = True
        "time shift": (lambda p, c: c.augment.time_roll, 1.0),
        # AS-FT: dataset_configs.log_test_epochs = 1
        "evaluation cadence": (lambda p, c: c.finetune.eval_every, 1),
        # AS-FT: checkpoint_steps = 1000
        "checkpoints": (lambda p, c: c.train.checkpoint_every, 1000),
        # AS-FT: num_spec_frames = 10: 62 x 8 patches
        "spectrogram": (lambda p, c: tokens(c), {"video": 16 * 14 * 14, "audio": (1000 // 16) * (128 // 16)}),
    },
    "avmae_vggsound_vitl": {
        # VS-FT: batch_size = 64
        "batch": (lambda p, c: global_batch(p, c), 64),
        # VS-FT: base_learning_rate = 0.8 (not scaled by the batch)
        "learning rate": (lambda p, c: peak_lr(p, c), 0.8),
        # VS-FT: fusion_layer = 16
        "fusion layer": (lambda p, c: c.finetune.fusion_layer, 16),
        # VS-FT: freq_mask_max_bins 48, freq_mask_count 1; time masks none (time_mask_max_ratio = 0)
        "SpecAugment": (lambda p, c: (c.augment.freq_mask, c.augment.num_freq_masks, c.augment.num_time_masks),
                        (48, 1, 0)),
        # VS-FT: circular_time_shift not set (the dataset's default, False)
        "time shift": (lambda p, c: c.augment.time_roll, 0.0),
        # VS-FT: log_test_epochs = 5, checkpoint_steps = 500
        "evaluation cadence": (lambda p, c: c.finetune.eval_every, 5),
        "checkpoints": (lambda p, c: c.train.checkpoint_every, 500),
        # VS-FT: num_spec_frames = 8: 50 x 8 patches
        "spectrogram": (lambda p, c: tokens(c), {"video": 16 * 14 * 14, "audio": (800 // 16) * (128 // 16)}),
    },
}

FINETUNE_ROWS = [
    (name, setting, *row)
    for name, own in AVMAE_FINETUNE.items()
    for setting, row in {**AVMAE_FINETUNE_SHARED, **own}.items()
]


@pytest.mark.parametrize("name,setting,read,source", FINETUNE_ROWS, ids=case_ids(FINETUNE_ROWS))
def test_avmae_finetuning(name, setting, read, source):
    path = CONFIGS / "finetune" / f"{name}.yaml"
    ours = read(path, recipe(path))
    assert same(ours, source), f"{name} {setting}: ours {ours!r}, source {source!r}"


# The recipes shrunk to a micro model (width 128, depth 4, 8 x 8 patches): every other setting is the recipe's.
MICRO = [
    "model.size=micro", "model.patch_size=8", "data.video.num_frames=4", "data.video.size=32",
    "data.audio.seconds=0.64", "data.audio.num_mel_bins=32", "model.decoder_width=64",
    "model.decoder_depth=1", "model.decoder_heads=4", "finetune.fusion_layer=2",
]


@pytest.mark.parametrize("name", ["avmae_audioset_vitl", "avmae_vggsound_vitl"])
def test_weight_decay_falls_on_kernels_only(name):
    """scenic's AV-MAE trainer applies explicit_weight_decay to the parameters whose name holds
    'kernel' (Dense and Conv weights): not to biases, LayerNorm scales, mask tokens or positions."""
    cfg = load_config(CONFIGS / "pretrain" / f"{name}.yaml", MICRO)
    model = build_pretrain_model(cfg)
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}
    optimizer = build_optimizer(model, cfg.train, lr=1e-3)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == kernels
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}  # AS-PT / VS-PT: 0.05


@pytest.mark.parametrize("name", ["avmae_audioset_vitl", "avmae_vggsound_vitl"])
def test_stochastic_depth_rises_as_mbts(name):
    """scenic projects/av_mae/mbt.py: block i of L drops with probability i / max(L - 1, 1) x
    stochastic_droplayer_rate (0.3 in AS-FT and VS-FT), in every modality's stack."""
    cfg = load_config(CONFIGS / "finetune" / f"{name}.yaml", MICRO)
    model = build_classifier(cfg, {"label": 5})
    for modality, blocks in model.encoder.modality_blocks.items():
        depth = len(blocks)
        source = [i / max(depth - 1, 1) * 0.3 for i in range(depth)]
        ours = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
        assert ours == pytest.approx(source), modality


@pytest.mark.parametrize("name", ["avmae_audioset_vitl", "avmae_vggsound_vitl"])
def test_mbt_output_projection_starts_at_zero_and_is_shared(name):
    """scenic projects/av_mae/mbt.py: classifier 'gap', one output projection for every modality's
    mean-pooled tokens, zero-initialised (kernel_init zeros)."""
    cfg = load_config(CONFIGS / "finetune" / f"{name}.yaml", MICRO)
    model = build_classifier(cfg, {"label": 5})
    head = model.heads["label"]
    assert isinstance(head, nn.Linear) and not head.weight.any() and not head.bias.any()
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(2, 3, 4, 32, 32, generator=g), torch.randn(2, 1, 64, 32, generator=g)
    model.eval()  # no stochastic depth; evaluation averages the modalities' logits
    with torch.no_grad():
        nn.init.normal_(head.weight)
        tokens = model.forward_tokens(video, audio)
        logits = model(video, audio)["label"]
        source = (head(tokens["video"].mean(1)) + head(tokens["audio"].mean(1))) / 2
    torch.testing.assert_close(logits, source)


# ---- CAV-MAE ---------------------------------------------------------------------------------
# YuanGongND/cav-mae: egs/audioset/run_cavmae_pretrain_scale++.sh, egs/vggsound/run_cavmae_pretrain.sh,
# egs/vggsound/run_cavmae_ft.sh, egs/audioset/run_cavmae_ft_bal.sh (target_length=1024,
# dataset_mean=-5.081, dataset_std=4.4849), src/dataloader.py (128 mel bins),
# src/models/cav_mae.py (16 x 16 patches of a 224 x 224 frame and of the 1024 x 128 fbank).

CAVMAE = {
    "audio input": (lambda c: (c.data.audio.target_length, c.data.audio.num_mel_bins,
                               c.data.audio.norm_mean, c.data.audio.norm_std), (1024, 128, -5.081, 4.4849)),
    "tokens": (lambda c: tokens(c), {"video": (224 // 16) ** 2, "audio": (1024 // 16) * (128 // 16)}),
}
CAVMAE_FINETUNE = {
    # cav_mae.py CAVMAEFT.forward, ftmode=multimodal: the mean of all tokens after the joint norm
    "pooling": (lambda c: (c.finetune.pool, c.model.joint_norms), ("tokens", "per_modality")),
    # src/dataloader.py: freqm=48, timem=192 (one torchaudio mask each) on the raw fbank
    "SpecAugment": (lambda c: (c.augment.freq_mask, c.augment.num_freq_masks, c.augment.time_mask,
                               c.augment.num_time_masks, c.augment.spec_augment_fill), (48, 1, 192, 1, "raw_zero")),
    # src/dataloader.py: mixup=0.5 of the samples, lambda ~ Beta(10, 10), waveforms mixed
    "mixup": (lambda c: (c.augment.mixup, c.augment.mixup_prob, c.augment.mixup_domain), (10.0, 0.5, "waveform")),
}
# traintest_cavmae.py runs the model under nn.DataParallel on 4 GPUs (#SBATCH --gres=gpu:4):
# forward_contrastive sees batch / 4 clips; run_cavmae_pretrain_scale++.sh batch_size=256,
# run_cavmae_pretrain.sh batch_size=120
def negatives(c: Config) -> tuple[str, int]:
    return c.model.contrastive_negatives, c.model.contrastive_replica_size


CAVMAE_NEGATIVES = {
    "cavmae_audioset": (negatives, ("replica", 256 // 4)),
    "cavmae_vggsound": (negatives, ("replica", 120 // 4)),
}
CAVMAE_ROWS = [
    (f"pretrain/{n}", s, *r) for n in ("cavmae_audioset", "cavmae_vggsound")
    for s, r in {**CAVMAE, "contrastive negatives": CAVMAE_NEGATIVES[n]}.items()
] + [
    (f"finetune/{n}", s, *r) for n in ("cavmae_vggsound", "cavmae_audioset20k")
    for s, r in {**CAVMAE, **CAVMAE_FINETUNE}.items()
]


@pytest.mark.parametrize("name,setting,read,source", CAVMAE_ROWS, ids=case_ids(CAVMAE_ROWS))
def test_cavmae(name, setting, read, source):
    ours = read(recipe(CONFIGS / f"{name}.yaml"))
    assert same(ours, source), f"{name} {setting}: ours {ours!r}, source {source!r}"
