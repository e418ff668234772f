"""Typed configuration: one dataclass tree, loaded from YAML, overridden from the command line.

A run's configuration is ``Config``. ``load_config(path, overrides)`` merges, in order, the
dataclass defaults, the YAML file (and the files it lists under ``defaults:``, relative to it),
and ``key.sub=value`` overrides; ``base=cfg`` starts from a saved config instead of the defaults
(an export's, say). Unknown keys and ill-typed values are errors, never ignored.
``save_config`` writes the resolved tree as YAML; every checkpoint carries one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf


# The valid choices of the model's design space, listed here once; models/ imports them.
FUSIONS = ("early", "late", "shared", "mid")
DECODERS = ("separate", "shared", "joint", "same")
VIDEO_MASKINGS = ("random", "tube")
AUDIO_MASKINGS = ("random", "time", "freq", "time_freq")
POS_EMBEDS = ("grid", "1d", "2d")
PATCH_LOSSES = ("mean", "sum")
JOINT_NORMS = ("shared", "per_modality")
SPEC_AUGMENT_FILLS = ("mean", "raw_zero")  # augment.spec_augment_fill
MIXUP_DOMAINS = ("inputs", "waveform")  # augment.mixup_domain
POOLS = ("modalities", "tokens")  # finetune.pool
HEAD_INITS = ("trunc_normal", "xavier")  # finetune.head_init
FINETUNE_FUSIONS = ("pool", "bottleneck")  # finetune.fusion
MULTI_LABEL_LOSSES = ("mean", "sum")  # finetune.multi_label_loss
EVAL_AGGREGATES = ("probs", "logits")  # finetune.eval_aggregate
FINAL_NORM_GROUPS = ("last_block", "head")  # finetune.final_norm_group
MBT_FINAL_NORMS = ("pretrained", "init")  # finetune.mbt_final_norm
# finetune.modalities -> the modalities the classifier, the probe and the inputs use, in the
# encoder's order (video first)
MODALITY_SETS = {"audio": ("audio",), "video": ("video",), "audiovisual": ("video", "audio")}


def modality_set(modalities: str) -> tuple[str, ...]:
    """The modalities of a ``finetune.modalities`` value: ``audiovisual`` -> ``("video", "audio")``."""
    if modalities not in MODALITY_SETS:
        raise ValueError(f"modalities={modalities!r} is not one of {', '.join(MODALITY_SETS)}")
    return MODALITY_SETS[modalities]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class VideoConfig:
    """How frames are sampled and shaped. Times are in seconds, never in frame indices."""

    num_frames: int = 16
    # Sampled frames per second: the stride between sampled frames is 1 / frame_rate seconds,
    # so files at 25, 29.97 and 30 fps cover the same span.
    frame_rate: float = 8.0
    resize: int = 256  # short side before the crop
    size: int = 224  # square crop fed to the model
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    decoder: str = "decord"  # decord | pyav
    # A file shorter than this fraction of the clip span is an error; a longer one that is still
    # shorter than the span repeats its last frame for the times past its end.
    min_duration_fraction: float = 0.5

    def __post_init__(self) -> None:
        _check_choice("video.decoder", self.decoder, ("decord", "pyav"))

    @property
    def seconds(self) -> float:
        return self.num_frames / self.frame_rate


@dataclass
class AudioConfig:
    """The audio window and its Kaldi fbank; (x - norm_mean) / norm_std.

    The fbank call (waveform mean removed; torchaudio's Kaldi fbank, 25 ms Hanning window, 10 ms
    shift, 128 mel bins, no dither; zero frames appended up to ``target_length``) is CAV-MAE's,
    AST's and AudioMAE's (YuanGongND/cav-mae src/dataloader.py, facebookresearch/AudioMAE
    dataset.py). What differs from each of them is where the window sits: see ``window``.
    AV-MAE (google-research/scenic, projects/av_mae) computes its own log-mel spectrogram with
    its own statistics; this toolkit feeds the Kaldi fbank to its AV-MAE recipes too.
    """

    sample_rate: int = 16000
    seconds: float = 10.24  # audio window length
    # Where the window sits relative to the video clip:
    # - "inside": centred on the clip's centre, then shifted to lie inside the file (never past
    #   either end); a file shorter than the window is read whole and its fbank padded with zero
    #   frames after the real ones (CAV-MAE / AudioMAE). For 10 s clips this is the whole clip.
    # - "centred": always centred on the clip's centre, zero samples where it leaves the file;
    #   keeps sound and picture aligned, right for long videos (EPIC-KITCHENS) whose clips are
    #   short segments far from the file's ends.
    # - "wrap": AV-MAE's DMVR sampling. In training the window starts where the video clip starts
    #   (at the same proportion of the file); in evaluation temporal view k starts at the k-th of
    #   data.test_clips evenly spaced offsets over the audio, whatever the video clip. A window that
    #   runs past the end continues from the file's start, a file shorter than the window loops
    #   (avmae/data/audio.py wrap_starts, linspace_starts, loop_windows). Whole files only.
    window: str = "inside"
    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    norm_mean: float = -5.081  # CAV-MAE's AudioSet statistics; AST uses -4.2677393
    norm_std: float = 4.4849  # CAV-MAE; AST uses 2 x 4.5689974 = 9.1379948
    # A clip whose video has no audio stream: "skip" drops it (counted), "silence" feeds
    # the fbank of a silent waveform (counted as well).
    no_audio: str = "skip"

    def __post_init__(self) -> None:
        _check_choice("audio.no_audio", self.no_audio, ("skip", "silence"))
        _check_choice("audio.window", self.window, ("inside", "centred", "wrap"))

    @property
    def target_length(self) -> int:
        """Number of fbank frames of one window, e.g. 1024 for 10.24 s at a 10 ms shift."""
        return int(round(self.seconds * 1000.0 / self.frame_shift_ms))


@dataclass
class DataConfig:
    """Which dataset, where its media live, and how it is loaded."""

    format: str = "synthetic"  # synthetic | vggsound | audioset | epic | ave | cavmae | shards
    root: str = "data/synthetic"  # media folder; relative paths in manifests resolve against it
    # format shards (docs/data.md): root is a folder or an s3:// URL holding one shard folder per
    # split, named by train/val/test; shards read from an object store are cached in shard_cache
    # (None: the streaming library's default cache folder).
    shard_cache: Optional[str] = None
    train: str = "train.csv"  # manifest files, relative to root unless absolute
    val: str = "val.csv"
    test: str = "test.csv"
    label_file: Optional[str] = None  # class list (EPIC: verb classes); see avmae.data.manifests
    noun_label_file: Optional[str] = None  # EPIC: the noun classes csv
    # Media file of a record, relative to root, from the manifest's fields; None = the format's
    # default (vggsound "{ytid}_{start:06d}.mp4", audioset "{ytid}.mp4",
    # epic "{participant_id}/videos/{video_id}.MP4", ave "{video_id}.mp4").
    video_template: Optional[str] = None
    audio_root: Optional[str] = None  # separate wav/flac files, when audio is not in the mp4
    audio_template: str = "{stem}.wav"  # file under audio_root; {stem} is the video's file stem
    # Where the list of missing media files is written; None = <train.output_dir>/missing_<split>.txt
    missing_list: Optional[str] = None
    batch_size: int = 8  # items per process and micro-batch; a training item holds clips_per_video clips
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True
    # Training: clips drawn from one decoded video (repeated sampling), each with its own start,
    # speed and augmentation; a micro-batch holds batch_size x clips_per_video clips, and the lr
    # scaling and clips/s count them. Evaluation ignores it (test_clips x test_crops).
    clips_per_video: int = 1
    test_clips: int = 4  # multi-view evaluation: temporal clips
    test_crops: int = 1  # multi-view evaluation: spatial crops (1 or 3)
    balanced_sampling: bool = False  # AudioSet-style weighted sampling
    # Clips one epoch of balanced sampling draws (with replacement); 0 = as many as the training
    # records. Steps per epoch, train.epochs and train.warmup_epochs count in these epochs.
    balanced_epoch_size: int = 0
    max_decode_failures: float = 0.05  # fraction of bad clips at which a run stops
    # Training clips: true = workers only decode and crop; fbank, SpecAugment and the video
    # augmentations after the crop run batched on the device in the training step
    # (avmae.data.device); false = all in the workers; None = true where a GPU is present.
    device_transforms: Optional[bool] = None
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def __post_init__(self) -> None:
        _check_choice(
            "data.format", self.format, ("synthetic", "vggsound", "audioset", "epic", "ave", "cavmae", "shards")
        )
        if self.clips_per_video < 1:
            raise ValueError(f"data.clips_per_video={self.clips_per_video} must be at least 1")
        if self.balanced_epoch_size < 0 or (self.balanced_epoch_size and not self.balanced_sampling):
            raise ValueError(
                f"data.balanced_epoch_size={self.balanced_epoch_size}: a positive size needs "
                "data.balanced_sampling=true (0 = one epoch is as many clips as records)"
            )


@dataclass
class AugmentConfig:
    """Augmentations (docs/augmentations.md): the spatiotemporal transforms of arXiv 2110.07082 and
    the audio recipe. Values are those of strength 1; `strength` scales every probability and
    magnitude (0 = off, i.e. the evaluation transform; 2 = stronger) by the rule in
    `avmae.augment.apply_strength`."""

    enabled: bool = True
    strength: float = 1.0
    two_views: bool = False  # return two independently augmented views of each clip
    # sampling-based temporal augmentation, done by the dataset before decoding
    random_start: bool = True
    speed_range: tuple[float, float] = (1.0, 1.0)  # playback-speed factor range for the stride
    # lossy spatiotemporal transforms, one parameter draw per clip (temporal coherency kept)
    crop: float = 1.0  # probability of a random resized crop instead of the evaluation crop
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the frame
    crop_ratio: tuple[float, float] = (0.75, 1.3333)  # aspect ratio w / h, drawn log-uniformly
    hflip: float = 0.5  # at most 0.5: flipping every clip adds no variety
    color_jitter: float = 0.8  # probability
    color_jitter_magnitude: float = 0.4  # brightness, contrast, saturation +- this; hue +- 1/4 of it
    grayscale: float = 0.2
    blur: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output crop
    downup: float = 0.0  # probability of spatial down-up sampling
    downup_factor: float = 4.0  # largest down-sampling factor
    frame_rate_reduction: float = 0.0  # probability of keeping every k-th frame, repeated k times
    frame_rate_factor: int = 4  # largest k
    tube_cutout: float = 0.0  # probability of erasing one box in every frame
    cutout_scale: tuple[float, float] = (0.02, 0.25)  # area fraction of the box
    # coherency-breaking controls (ablation only)
    per_frame: bool = False  # draw the spatial parameters per frame
    frame_shuffle: float = 0.0
    time_reversal: float = 0.0  # at most 0.5, as hflip
    # audio: waveform before the fbank, SpecAugment on the fbank (avmae/augment/audio.py)
    gain_db: float = 0.0  # +- range of random gain
    noise: float = 0.0  # probability of additive Gaussian noise
    noise_level: float = 0.1  # largest noise RMS relative to the clip's RMS
    time_roll: float = 0.0  # largest circular shift, as a fraction of the window (1 = anywhere)
    freq_mask: int = 0  # SpecAugment widths in bins / frames; 0 disables
    time_mask: int = 0
    num_freq_masks: int = 2
    num_time_masks: int = 2
    # What a SpecAugment mask leaves in its cells: "mean" the dataset mean (0 in the normalised
    # fbank, SpecAugment's choice); "raw_zero" a raw log-mel value of 0, i.e. (0 - norm_mean) /
    # norm_std, as CAV-MAE and AST mask the fbank before normalising it (YuanGongND/cav-mae
    # src/dataloader.py).
    spec_augment_fill: str = "mean"
    mixup: float = 0.0  # finetuning only: alpha of Beta(alpha, alpha); 0 disables
    mixup_per_modality: bool = False  # one lam per modality (AV-MAE's mixmod); avmae/augment/mixup.py
    # Where mixup mixes (avmae/augment/mixup.py): "inputs" the model inputs of every batch on the
    # device, each clip with the batch flipped (timm); "waveform" each training clip in the dataset,
    # with probability mixup_prob, with a random other clip: waveforms before the fbank, normalised
    # frames and targets (CAV-MAE, YuanGongND/cav-mae src/dataloader.py)
    mixup_domain: str = "inputs"
    mixup_prob: float = 1.0  # mixup_domain waveform: the probability that a clip is mixed

    def __post_init__(self) -> None:
        _check_choice("augment.spec_augment_fill", self.spec_augment_fill, SPEC_AUGMENT_FILLS)
        _check_choice("augment.mixup_domain", self.mixup_domain, MIXUP_DOMAINS)
        if not 0.0 <= self.mixup_prob <= 1.0:
            raise ValueError(f"augment.mixup_prob={self.mixup_prob} is not a probability in [0, 1]")
        if self.mixup_domain == "inputs" and self.mixup_prob != 1.0:
            raise ValueError("augment.mixup_prob applies to mixup_domain=waveform; the batch mixup mixes every batch")
        if self.mixup_domain == "waveform" and self.mixup_per_modality:
            raise ValueError("augment.mixup_per_modality needs mixup_domain=inputs (one lam per modality of a batch)")
        probabilities = (
            "crop", "hflip", "color_jitter", "grayscale", "blur", "downup", "frame_rate_reduction",
            "tube_cutout", "frame_shuffle", "time_reversal", "noise",
        )
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name}={getattr(self, name)} is not a probability in [0, 1]")
        for name in ("hflip", "time_reversal"):
            if getattr(self, name) > 0.5:
                raise ValueError(
                    f"augment.{name}={getattr(self, name)}: at most 0.5 (flipping every clip adds no variety)"
                )
        ranges = {
            "speed_range": (1e-3, None), "crop_scale": (1e-3, 1.0), "crop_ratio": (1e-3, None),
            "blur_sigma": (0.0, None), "cutout_scale": (0.0, 1.0),
        }
        for name, (low, high) in ranges.items():
            lo, hi = getattr(self, name)
            if not (low <= lo <= hi and (high is None or hi <= high)):
                raise ValueError(
                    f"augment.{name}={[lo, hi]} must be an ordered range within [{low}, {high or 'inf'}]"
                )
        for name in ("strength", "gain_db", "noise_level", "time_roll", "freq_mask", "time_mask",
                     "num_freq_masks", "num_time_masks", "mixup", "color_jitter_magnitude"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name}={getattr(self, name)} must not be negative")
        if self.downup_factor < 1.0 or self.frame_rate_factor < 1:
            raise ValueError("augment.downup_factor and augment.frame_rate_factor must be >= 1")


@dataclass
class ModelConfig:
    """Architecture and pretraining objectives. Input geometry comes from DataConfig."""

    size: str = "tiny"  # registry name: micro | tiny | small | base | large
    patch_size: int = 16  # spatial patch of video, and the square patch of the fbank image
    tubelet: int = 2  # frames per video token
    fusion: str = "mid"  # early | late | shared | mid
    fusion_layers: int = 1  # joint layers at the top of a mid-fusion encoder
    decoder: str = "separate"  # separate | shared | joint | same (models/decoder.py)
    decoder_width: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 8
    reconstruction: str = "joint"  # joint | inpaint | both
    modality_embed: bool = True
    # sin-cos positions of encoder and decoder (models/pos_embed.py): grid (separable over the
    # token grid) | 1d (over the token sequence, AV-MAE's sinusoidal_1d) | 2d (MAE's 2-D code over
    # all channels of one image: a single video frame, the fbank as frequency x time; CAV-MAE)
    pos_embed: str = "grid"
    # mid fusion built from complete encoders (AV-MAE's separate_encoders_and_concat): a LayerNorm
    # closes each modality's stack, one shared LayerNorm the joint stack (models/encoder.py)
    stack_norms: bool = False
    drop_path: float = 0.0
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    # masking
    mask_ratio_video: float = 0.9
    mask_ratio_audio: float = 0.7
    video_masking: str = "random"  # random | tube
    audio_masking: str = "random"  # random | time | freq | time_freq
    norm_pix_loss: bool = True
    # a masked patch's squared errors: mean (MAE; AV-MAE's normalise_by_output_dimension) | sum
    patch_loss: str = "mean"
    # MAE loss on the masked patches only (gathered first, targets in fp32 at that size); false
    # builds the full-size target, equal in value, kept to measure the difference.
    mae_loss_masked_only: bool = True
    loss_weight_video: float = 0.5
    loss_weight_audio: float = 0.5
    mae_weight: float = 1.0  # 0 turns the reconstruction branch off
    # contrastive branch
    contrastive: str = "none"  # none | infonce | simsiam | mocov3
    contrastive_weight: float = 0.01
    contrastive_pairs: str = "modalities"  # modalities (audio vs video) | views (two augmented views)
    contrastive_masked: bool = True  # run the contrastive branch on the masked (visible) tokens
    temperature: float = 0.05
    learn_temperature: bool = False
    # InfoNCE over modality pairs: both directions averaged, or only video -> audio (each video
    # picks its audio: CAV-MAE's default, src/models/cav_mae.py bidirect_contrast=False)
    contrastive_symmetric: bool = True
    # InfoNCE negatives: "global" = every other clip of the global batch (all processes);
    # "replica" = only the other clips of its replica: consecutive groups of
    # contrastive_replica_size clips of the global batch in rank order (0 = each process's own
    # batch), as CAV-MAE computes its loss inside each nn.DataParallel replica
    # (src/models/cav_mae.py forward_contrastive, src/traintest_cavmae.py). The loss is the mean
    # over groups of each group's mean.
    contrastive_negatives: str = "global"
    contrastive_replica_size: int = 0
    proj_dim: int = 256  # SimSiam / MoCo v3 projector output
    proj_hidden_dim: int = 2048  # SimSiam / MoCo v3 projector hidden width
    pred_dim: int = 1024  # SimSiam / MoCo v3 predictor hidden width
    momentum: float = 0.99  # MoCo v3 start value, raised to 1 by a cosine schedule
    # layouts of other MAE codebases, whose checkpoints convert onto them (docs/checkpoints.md)
    learned_pos_embed: bool = False  # a stored (learned) positional table per modality instead of fixed sine-cosine
    pos_grid_video: tuple[int, int, int] = (0, 0, 0)  # learned table's (T', H', W'); 0s = the configured grid
    pos_grid_audio: tuple[int, int] = (0, 0)  # learned table's (T', F'); 0s = the configured grid
    cls_token: bool = False  # a learned class token per modality (MAE, AudioMAE)
    joint_norms: str = "shared"  # shared | per_modality (CAV-MAE's joint layer)
    final_norm: bool = True  # False: no LayerNorm after the last block (finetuned MAE-family models)
    # eps of every LayerNorm of encoder, decoder and classifier heads: 1e-6 is MAE's, AudioMAE's,
    # VideoMAE's and scenic's; CAV-MAE builds nn.LayerNorm with PyTorch's default, 1e-5
    norm_eps: float = 1e-6
    # An export folder (e.g. tools/convert.py output) whose encoder weights start a pretraining
    # run (CAV-MAE starts from ImageNet MAE); empty = random initialisation. Read by the
    # pretraining engine at a fresh start only.
    init_from: str = ""

    def __post_init__(self) -> None:
        _check_choice("model.fusion", self.fusion, FUSIONS)
        _check_choice("model.decoder", self.decoder, DECODERS)
        _check_choice("model.pos_embed", self.pos_embed, POS_EMBEDS)
        _check_choice("model.patch_loss", self.patch_loss, PATCH_LOSSES)
        _check_choice("model.reconstruction", self.reconstruction, ("joint", "inpaint", "both"))
        _check_choice("model.video_masking", self.video_masking, VIDEO_MASKINGS)
        _check_choice("model.audio_masking", self.audio_masking, AUDIO_MASKINGS)
        _check_choice("model.contrastive", self.contrastive, ("none", "infonce", "simsiam", "mocov3"))
        _check_choice("model.contrastive_pairs", self.contrastive_pairs, ("modalities", "views"))
        _check_choice("model.contrastive_negatives", self.contrastive_negatives, ("global", "replica"))
        if self.contrastive_replica_size < 0:
            raise ValueError(f"model.contrastive_replica_size={self.contrastive_replica_size} must not be negative")
        if self.contrastive_replica_size and self.contrastive_negatives != "replica":
            raise ValueError(
                "model.contrastive_replica_size applies only with model.contrastive_negatives=replica, "
                f"got contrastive_negatives={self.contrastive_negatives!r}"
            )
        _check_choice("model.joint_norms", self.joint_norms, JOINT_NORMS)
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps={self.norm_eps} must be positive")


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging of one run."""

    output_dir: str = "runs/pretrain"
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # optimiser steps; 0 means epochs x steps per epoch
    base_lr: float = 1.5e-4  # lr = base_lr x effective batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0  # linear warmup, stepped per update; fractions allowed
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd (SGD with momentum, no Nesterov)
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    momentum: float = 0.9  # sgd
    clip_grad: float = 0.0  # 0 disables
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    # torch.compile of the training step: null = on where a GPU is present (off on the CPU and
    # under DeepSpeed); a compiler failure falls back to the eager model with a message
    # (avmae/engine/compile.py). compile_mode: default | max-autotune | max-autotune-no-cudagraphs
    # | reduce-overhead (CUDA graphs).
    compile: Optional[bool] = None
    compile_mode: str = "default"
    log_every: int = 10  # optimiser steps between logs (and NaN checks)
    # Where stderr is not a terminal (a scheduler's log file, nohup, CI), one plain progress line
    # instead of the bar, at the first log step after this many optimiser steps or seconds since
    # the previous line (avmae/engine/progress.py)
    progress_every: int = 100
    progress_seconds: float = 300.0
    checkpoint_every: int = 500  # optimiser steps
    # A NaN or inf loss: stop (raise, naming the update); skip (discard that update, counted: one
    # host-device sync per update to decide before the optimiser steps); rollback (restore the last
    # checkpoint and go on from it, discarding the update that went bad; checked every log_every
    # updates). More than max_nonfinite such updates stop the run. docs/pretraining.md, "Stopping".
    on_nonfinite: str = "stop"
    max_nonfinite: int = 3
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0 keeps all
    resume: str = "auto"  # auto | none | a checkpoint directory

    def __post_init__(self) -> None:
        if self.mixed_precision == "False":  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        _check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _check_choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _check_choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip", "rollback"))


@dataclass
class FinetuneConfig:
    """Downstream training and evaluation from an exported model."""

    # Optimisation (lr, epochs, warmup, weight decay, output_dir) is `train.*`; drop path is
    # `model.drop_path`; mixup and SpecAugment are `augment.*`. Single- or multi-label comes from
    # the dataset's manifest.
    pretrained: str = ""  # an export folder (model.safetensors + config.json); empty = random init
    modalities: str = "audiovisual"  # audio | video | audiovisual
    # Take the fbank settings, normalisation statistics and pixel mean/std of the pretrained
    # export instead of this config's (a model must be fed as it was trained).
    inherit_preprocessing: bool = True
    layer_decay: float = 0.75  # lr of layer i = lr x layer_decay^(depth - i); 1 disables
    # The layer-decay group of the encoder's final norm: "last_block" (timm's ViT group_matcher)
    # or "head", lr scale 1 as the heads (google-research/scenic
    # scenic/projects/av_mae/optimizer_utils.py gives encoder_norm the top layer id, as
    # facebookresearch/mae util/lr_decay.py its fc_norm)
    final_norm_group: str = "last_block"
    label_smoothing: float = 0.1
    # Smooth multi-label targets too, as single-label ones: y (1 - s) + s / K (AV-MAE's AudioSet
    # finetuning); False leaves multi-hot targets unsmoothed.
    smooth_multi_label: bool = False
    # The sigmoid cross-entropy of a multi-label head: "mean" over clips and classes (PyTorch's
    # default; CAV-MAE, YuanGongND/cav-mae src/traintest_ft.py BCEWithLogitsLoss) or "sum" over
    # the classes, then the mean over clips (AV-MAE: google-research/scenic
    # scenic/model_lib/base_models/model_utils.py weighted_sigmoid_cross_entropy), K times larger.
    multi_label_loss: str = "mean"
    # pool: mean-pooled tokens of the encoder as pretrained (AVClassifier); bottleneck: MBT, one
    # stack per modality exchanging through bottleneck tokens from layer fusion_layer on
    # (models/classifier.py, MBTClassifier)
    fusion: str = "pool"
    fusion_layer: int = 8
    bottlenecks: int = 4
    test_with_bottlenecks: bool = True
    # MBT's final norms: "pretrained" loads the export's final norm(s) (each stack's own, or the
    # joint one copied into each); "init" leaves them at LayerNorm's initialisation (ones, zeros), as
    # google-research/scenic scenic/projects/av_mae/mbt.py initialise_from_separate_encoders does
    # with encoder_norm when starting from a separate_encoders pretraining
    mbt_final_norm: str = "pretrained"
    # The pooled classifier's (fusion: pool) clip embedding: "modalities" averages each modality's
    # mean token; "tokens" averages all tokens (CAV-MAE's finetuning model, src/models/cav_mae.py CAVMAEFT)
    pool: str = "modalities"
    # Learn the positional tables while finetuning: a fixed sine-cosine code becomes a parameter
    # started from that code (CAV-MAE: YuanGongND/cav-mae src/models/cav_mae.py CAVMAEFT,
    # tr_pos=True); stored tables (model.learned_pos_embed) are learned either way.
    learn_pos_embed: bool = False
    # The pooled classifier's (fusion: pool) Linear: trunc_normal (std 2e-5, zero bias:
    # facebookresearch/mae main_finetune.py) | xavier (xavier-uniform, zero bias: CAV-MAE's
    # CAVMAEFT._init_weights). MBT's heads (fusion: bottleneck) start at zero.
    head_init: str = "trunc_normal"
    # Head name -> number of classes; empty means "as many as the dataset's label list".
    heads: dict[str, int] = field(default_factory=dict)
    eval_every: int = 1  # epochs between validation passes; 0 = only after the last epoch
    eval_split: str = "val"  # split scored during finetuning: val | test
    # What multi-view evaluation averages over a record's views: "probs" (softmax / sigmoid of
    # each view) or "logits" (then one softmax / sigmoid of the mean: AV-MAE, google-research/scenic
    # scenic/projects/av_mae/train_utils.py test_step_multimodal)
    eval_aggregate: str = "probs"
    # Linear probe: L2 weight sweep of the L-BFGS classifier, selected on the validation split.
    probe_weight_decays: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    probe_max_iter: int = 200
    # > 0: choose the weight decay on this fraction of the training records instead of the val
    # split (datasets without a validation split: VGGSound's "val" is its test set).
    probe_holdout: float = 0.0
    probe_raw_video_grid: tuple[int, int, int] = (2, 4, 4)  # (t, h, w) pooling of raw pixels
    probe_raw_audio_grid: tuple[int, int] = (8, 8)  # (time, freq) pooling of the raw fbank

    def __post_init__(self) -> None:
        _check_choice("finetune.modalities", self.modalities, tuple(MODALITY_SETS))
        _check_choice("finetune.pool", self.pool, POOLS)
        _check_choice("finetune.eval_split", self.eval_split, ("val", "test"))
        _check_choice("finetune.eval_aggregate", self.eval_aggregate, EVAL_AGGREGATES)
        _check_choice("finetune.final_norm_group", self.final_norm_group, FINAL_NORM_GROUPS)
        _check_choice("finetune.mbt_final_norm", self.mbt_final_norm, MBT_FINAL_NORMS)
        _check_choice("finetune.fusion", self.fusion, FINETUNE_FUSIONS)
        _check_choice("finetune.head_init", self.head_init, HEAD_INITS)
        if self.fusion == "bottleneck" and self.head_init != "trunc_normal":
            raise ValueError("finetune.head_init applies to fusion=pool; MBT's heads (fusion=bottleneck) start at zero")
        _check_choice("finetune.multi_label_loss", self.multi_label_loss, MULTI_LABEL_LOSSES)
        if self.fusion == "bottleneck" and self.pool != "modalities":
            # MBT pools each stack's tokens itself (models/classifier.py, MBTClassifier)
            raise ValueError(f"finetune.pool={self.pool} applies to finetune.fusion=pool; the bottleneck classifier "
                             "pools each modality's stack itself (leave finetune.pool at modalities)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Read one YAML file, merging the files it names under `defaults:` before it."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: circular 'defaults:' include")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    merged = OmegaConf.create()
    for base in raw.pop("defaults", []) or []:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Defaults (or `base`) <- YAML file <- `a.b=value` overrides, validated against the dataclasses."""
    schema = OmegaConf.structured(Config if base is None else base)
    try:
        if path is not None:
            schema = OmegaConf.merge(schema, _read_yaml(Path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"overrides must look like key.sub=value, got {bad}")
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(schema)
    except Exception as err:  # OmegaConf's errors do not name the file
        where = f" (from {path})" if path else ""
        raise ValueError(f"invalid configuration{where}: {err}") from err


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML and JSON."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_from_dict(data: dict) -> Config:
    """Inverse of `config_to_dict`, validated the same way as a YAML file."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` re-exported, so callers derive variants without mutating."""
    return dataclasses.replace(cfg, **changes)
