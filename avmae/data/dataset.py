"""``AVDataset``: decoded, aligned and transformed audio-video clips of a manifest.

Items are the dicts of docs/architecture.md. Training gives one randomly sampled clip per
record (two independently sampled and augmented views with ``augment.two_views``); evaluation
gives ``data.test_clips x data.test_crops`` items per record, evenly spaced clips x spatial crops,
that share ``index`` and differ in ``view``.

Repeated sampling. With ``data.clips_per_video = K > 1`` a training item decodes its file once
and returns ``K`` clips, each with its own start, speed and augmentation (and second view, with
``augment.two_views``): ``video (K, C, T, H, W)``, ``audio (K, 1, T_a, F)`` and ``clips = K``.
``avmae.data.collate.collate_clips`` flattens them into a batch of ``batch_size x K`` clips. The
frames of all clips come from one reader (one decord ``get_batch`` over the union of their frame
times); overlapping audio windows are cut from one read of their union. Evaluation ignores
``clips_per_video``: its clips are ``data.test_clips x data.test_crops``.

Randomness. Each item draws from its own ``torch.Generator`` seeded from
``(train.seed, epoch, index, view, attempt)``, so an item is the same whatever the number of
workers, and a resumed run that calls ``set_epoch`` reproduces it.

Bad data. Records whose media files are missing are dropped when the dataset is built, with one
log line and the list written to ``data.missing_list``. A clip that fails to decode in
``__getitem__`` (damaged, too short, no audio track under ``audio.no_audio: skip``) is logged
once per file and process, and replaced by another record chosen by the item's generator; the
item's ``failures`` counts the bad clips skipped to make it. Once more than
``data.max_decode_failures`` of the records have failed, ``TooManyDecodeFailures`` stops the run.
Under ``audio.no_audio: silence`` a video without audio gets the fbank of a silent waveform and
``no_audio = 1``.

Mixup in the dataset (``augment.mixup_domain: waveform``, CAV-MAE's; ``avmae.augment.mixup``). A
training item is, with probability ``augment.mixup_prob``, mixed with a random other record
(``mix_index``; -1 when not mixed) with ``mix_lambda ~ Beta(alpha, alpha)``: the waveforms before
the waveform augmentations and the fbank, the normalised frames, and the targets. Every training
item then carries normalised float frames and float target vectors, mixed or not, so that they
batch together; a partner that fails to decode is counted as a bad clip and another is drawn.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from avmae import augment
from avmae.augment import rng
from avmae.augment.mixup import draw_lambda, mix_waveforms, waveform_mixup_alpha
from avmae.augment.transforms import normalize_video
from avmae.config import AugmentConfig, Config, DataConfig
from avmae.data.audio import (
    AudioDecodeError,
    NoAudioError,
    audio_duration,
    fbank,
    linspace_starts,
    loop_windows,
    place_windows,
    read_audio,
    wrap_starts,
)
from avmae.data.device import draw_for_device, use_device_transforms
from avmae.data.manifests import ClipRecord, Manifest, is_present
from avmae.augment.transforms import crop_positions, eval_video_transform
from avmae.data.video import (
    DecordReader,
    VideoDecodeError,
    VideoReader,
    check_duration,
    clip_span,
    clip_starts,
    frame_times,
    open_video,
)

log = logging.getLogger(__name__)

# Replacement draws for one item before giving up: reaching it means most records are bad,
# which max_decode_failures normally reports first.
MAX_ATTEMPTS = 20


class TooManyDecodeFailures(RuntimeError):
    """More than ``data.max_decode_failures`` of a dataset's clips could not be decoded."""


def item_seed(seed: int, epoch: int, index: int, view: int, attempt: int = 0) -> int:
    """A 64-bit seed that depends on every argument (numpy's SeedSequence hashing)."""
    entropy = [seed, epoch, index, view, attempt]
    if min(entropy) < 0:
        raise ValueError(f"seed components must be non-negative, got {entropy}")
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def missing_list_path(cfg: Config, split: str) -> Path:
    """``data.missing_list`` (``{split}`` is filled in), default ``<train.output_dir>/missing_<split>.txt``."""
    template = cfg.data.missing_list or str(Path(cfg.train.output_dir) / "missing_{split}.txt")
    return Path(template.format(split=split))


class AVDataset(Dataset):
    """Audio-video clips of ``manifest``; see the module docstring.

    Args:
        manifest: the split's records and classes.
        data_cfg: clip geometry (``video``, ``audio``), multi-view counts, failure policy.
        augment_cfg: temporal sampling (``random_start``, ``speed_range``) and ``two_views``.
        train: random clips (``data_cfg.clips_per_video`` of them per item) and ``transforms``;
            otherwise multi-view evaluation clips.
        transforms: an ``avmae.augment.AVTransforms`` for training; unused in evaluation, which
            applies ``avmae.augment.transforms.eval_video_transform`` and no audio change.
        seed: base of every item's generator.
        missing_list: where the ids and paths of records with missing files are written.
        split: name used in log lines.
    """

    def __init__(
        self,
        manifest: Manifest,
        data_cfg: DataConfig,
        augment_cfg: AugmentConfig,
        train: bool,
        transforms=None,
        seed: int = 0,
        missing_list: Path | None = None,
        split: str = "",
    ):
        if train and transforms is None:
            raise ValueError("a training dataset needs transforms (avmae.augment.build_transforms)")
        self.data_cfg = data_cfg
        self.augment_cfg = augment_cfg
        self.train = train
        self.transforms = transforms
        self.seed = seed
        self.split = split
        self.classes = manifest.classes
        self.multi_label = manifest.multi_label
        # records with their media files; those without, left out (listed in missing_list)
        self.records, self.missing = self._present_records(manifest, missing_list)
        self.crops = crop_positions(data_cfg.test_crops)
        self.views = 1 if train else data_cfg.test_clips * len(self.crops)
        self.two_views = train and augment_cfg.two_views
        self.clips_per_video = data_cfg.clips_per_video if train else 1
        self.mixup_alpha = waveform_mixup_alpha(augment_cfg) if train else 0.0  # see the module docstring
        # workers only decode and crop; the device does the rest (avmae.data.device). Waveform
        # mixup needs the transformed frames and the fbank of the mixed waveform in the worker.
        self.device_transforms = train and use_device_transforms(data_cfg) and not self.mixup_alpha
        if train and data_cfg.device_transforms and self.mixup_alpha:
            raise ValueError("data.device_transforms: true cannot be combined with augment.mixup_domain: waveform "
                             "(the workers mix the waveforms before the fbank); set data.device_transforms: false")
        # shared with DataLoader workers, so set_epoch reaches persistent workers and the failure
        # limit counts the bad clips of all workers together
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._failures = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._bad: set[int] = set()  # records this process failed to decode
        self._silent: set[int] = set()  # records this process fed silence for

    def _present_records(
        self, manifest: Manifest, missing_list: Path | None
    ) -> tuple[list[ClipRecord], list[ClipRecord]]:
        present, missing = [], []
        for record in manifest.records:
            (present if is_present(record) else missing).append(record)
        where = ""
        if missing_list is not None:
            _write_missing(missing_list, missing)
            where = f"; list in {missing_list}"
        level = logging.WARNING if missing else logging.INFO
        log.log(
            level,
            "%s %s: %d of %d records have missing media files and are excluded%s",
            manifest.source, self.split, len(missing), len(manifest.records), where,
        )
        if not present:
            raise FileNotFoundError(
                f"{manifest.source}: none of the {len(manifest.records)} records has its media files "
                f"(first missing: {missing[0].video if missing else None}); check data.root and data.video_template"
            )
        return present, missing

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def failures(self) -> int:
        """Distinct clips that failed to decode so far, over all worker processes."""
        return int(self._failures[0])

    def __len__(self) -> int:
        return len(self.records) * self.views

    def generator(self, index: int, view: int, attempt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index, view, attempt))

    def __getitem__(self, item: int) -> dict:
        index, view = divmod(item, self.views)
        record_index, failures = index, 0
        for attempt in range(MAX_ATTEMPTS):
            if record_index not in self._bad:
                try:
                    sample = self._load(record_index, view, self.generator(index, view, attempt))
                    sample.update(index=record_index, view=view, failures=failures)
                    return sample
                except (VideoDecodeError, AudioDecodeError) as err:
                    self._mark_bad(record_index, err)
            failures += 1
            # the next draw of this item's generator sequence, identical in every worker
            replacement = self.generator(index, view, attempt + 1)
            record_index = int(torch.randint(len(self.records), (), generator=replacement))
        raise TooManyDecodeFailures(
            f"{self.split}: item {item} found no decodable clip in {MAX_ATTEMPTS} tries "
            f"({self.failures} of {len(self.records)} clips failed)"
        )

    def load(self, record_index: int, view: int = 0) -> dict:
        """View ``view`` of record ``record_index`` as ``__getitem__`` makes it, except that a clip
        that fails to decode raises (``VideoDecodeError`` / ``AudioDecodeError``) instead of being
        replaced: feature extraction lists a bad file rather than embedding another one."""
        sample = self._load(record_index, view, self.generator(record_index, view))
        sample.update(index=record_index, view=view, failures=0)
        return sample

    def _mark_bad(self, record_index: int, err: Exception) -> None:
        self._bad.add(record_index)
        self._failures += 1
        log.warning("skipping %s: %s", self.records[record_index].id, err)
        limit = self.data_cfg.max_decode_failures * len(self.records)
        if self.failures > limit:
            raise TooManyDecodeFailures(
                f"{self.split}: {self.failures} of {len(self.records)} clips failed to decode, more than "
                f"data.max_decode_failures={self.data_cfg.max_decode_failures:g}; last: {err}"
            ) from err

    # -----------------------------------------------------------------------------------------

    def _clip_start(self, duration: float, span: float, segment, view: int, generator: torch.Generator) -> float:
        if self.train:
            random = self.augment_cfg.enabled and self.augment_cfg.random_start
            return clip_starts(duration, span, generator=generator if random else None, segment=segment)[0]
        clip = view // len(self.crops)
        return clip_starts(duration, span, num_clips=self.data_cfg.test_clips, segment=segment)[clip]

    def _load(self, record_index: int, view: int, generator: torch.Generator, partner: bool = False) -> dict:
        """Decode and transform one record: frames, audio window(s), targets. ``partner``: the
        record a training item is mixed with, returned as ``{"videos", "waves", "targets"}``: its
        transformed clips and their waveforms before the waveform augmentations."""
        record = self.records[record_index]
        video_cfg, audio_cfg = self.data_cfg.video, self.data_cfg.audio
        segment = (record.start, record.end) if record.start is not None else None
        views = 2 if self.two_views else 1
        with self._open_video(record_index) as reader:
            clips = []  # (start, span, speed); view v of clip k at k * views + v
            for _ in range(self.clips_per_video * views):
                speed = augment.sample_speed(self.augment_cfg, generator) if self.train else 1.0
                span = clip_span(video_cfg.num_frames, video_cfg.frame_rate, speed)
                check_duration(reader, span, video_cfg.min_duration_fraction, segment)
                start = self._clip_start(reader.duration, span, segment, view, generator)
                clips.append((start, span, speed))
            times = [frame_times(start, video_cfg.num_frames, video_cfg.frame_rate, speed) for start, _, speed in clips]
            frames = _read_clips(reader, times)
            video_duration = reader.duration
        spans = [(start, span) for start, span, _ in clips]
        waves, silent = self._audio_windows(record_index, spans, video_duration, view)
        mix = self._mixup_draw(view, generator) if self.mixup_alpha and not partner else None

        outputs = []  # per clip: video, audio (and the draws for the device)
        for k, (clip_frames, wave) in enumerate(zip(frames, waves)):
            clip_frames = rearrange(clip_frames, "t h w c -> t c h w")
            if self.train and self.device_transforms:
                outputs.append(draw_for_device(self.transforms, clip_frames, wave, generator, self.data_cfg))
            elif self.train:
                video = self.transforms.video(clip_frames, generator)
                if partner:
                    outputs.append({"video": video, "audio": wave})
                    continue
                if self.mixup_alpha:
                    video, wave = self._mix_clip(video, wave, mix, k)
                wave = self.transforms.waveform(wave, generator)
                outputs.append({"video": video, "audio": self.transforms.fbank(fbank(wave, audio_cfg), generator)[None]})
            else:
                video = eval_video_transform(clip_frames, video_cfg, self.crops[view % len(self.crops)])
                outputs.append({"video": video, "audio": fbank(wave, audio_cfg)[None]})

        if partner:
            return {"videos": [clip["video"] for clip in outputs], "waves": [clip["audio"] for clip in outputs],
                    "targets": self._targets(record)}  # fmt: skip
        sample = {"id": record.id, "targets": self._targets(record), "no_audio": int(silent)}
        if self.mixup_alpha:
            sample.update(self._mix_targets(sample["targets"], mix))
        for v, suffix in enumerate(["", "2"][:views]):
            for key in outputs[v]:
                mine = [clip[key] for clip in outputs[v::views]]
                sample[key + suffix] = mine[0] if self.clips_per_video == 1 else torch.stack(mine)
        if self.clips_per_video > 1:
            sample["clips"] = self.clips_per_video
        return sample

    def _mixup_draw(self, view: int, generator: torch.Generator) -> tuple[float, int, dict] | None:
        """Whether this item is mixed (``augment.mixup_prob``); if so ``(lam, partner index,
        partner clips)``, the partner drawn uniformly among the records not known to be bad."""
        if not rng.coin(generator, self.augment_cfg.mixup_prob):
            return None
        lam = draw_lambda(self.mixup_alpha, generator)
        for _ in range(MAX_ATTEMPTS):
            index = int(torch.randint(len(self.records), (), generator=generator))
            if index in self._bad:
                continue
            try:
                return lam, index, self._load(index, view, generator, partner=True)
            except (VideoDecodeError, AudioDecodeError) as err:
                self._mark_bad(index, err)
        raise TooManyDecodeFailures(f"{self.split}: no decodable mixup partner in {MAX_ATTEMPTS} draws")

    def _mix_clip(self, video: torch.Tensor, wave: torch.Tensor, mix, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ``k``'s normalised frames and waveform, mixed with the partner's clip ``k`` when
        ``mix`` is drawn (CAV-MAE mixes its normalised images with the waveforms' ``lam``)."""
        video_cfg = self.data_cfg.video
        video = normalize_video(video, video_cfg.mean, video_cfg.std)
        if mix is None:
            return video, wave
        lam, _, partner = mix
        other = normalize_video(partner["videos"][k], video_cfg.mean, video_cfg.std)
        return lam * video + (1.0 - lam) * other, mix_waveforms(wave, partner["waves"][k], lam)

    def _mix_targets(self, targets: dict[str, torch.Tensor], mix) -> dict:
        """Float target vectors ``{head: (K,)}``, mixed as the clips (``lam y + (1 - lam) y_partner``),
        and ``mix_index`` / ``mix_lambda`` (-1 / 1.0 when not mixed)."""

        def vector(head: str, target: torch.Tensor) -> torch.Tensor:
            if target.is_floating_point():
                return target
            return torch.nn.functional.one_hot(target, len(self.classes[head])).float()

        soft = {head: vector(head, t) for head, t in targets.items()}
        if mix is None:
            return {"targets": soft, "mix_index": -1, "mix_lambda": 1.0}
        lam, index, partner = mix
        soft = {h: lam * t + (1.0 - lam) * vector(h, partner["targets"][h]) for h, t in soft.items()}
        return {"targets": soft, "mix_index": index, "mix_lambda": lam}

    def _audio_windows(
        self, record_index: int, clips: list[tuple[float, float]], video_duration: float, view: int
    ) -> tuple[list[torch.Tensor], bool]:
        """The waveform of each clip's audio window, and whether they are the silence fed for a file
        without audio (``audio.no_audio: silence``).

        ``clips``: ``(start, span)`` of each video clip in seconds. ``audio.window`` inside /
        centred places a window around each clip's centre (``avmae.data.audio.place_windows``); a
        file shorter than an ``inside`` window gives its whole, shorter waveform (the fbank appends
        zero frames). ``wrap`` starts each training window where its clip starts and evaluation
        view ``view``'s at its temporal view's offset over the audio, looping the whole file
        (``wrap_starts``, ``linspace_starts``, ``loop_windows``).
        """
        record = self.records[record_index]
        audio_cfg = self.data_cfg.audio
        rate, seconds = audio_cfg.sample_rate, audio_cfg.seconds
        try:
            if audio_cfg.window == "wrap":
                return self._wrapped_windows(record_index, clips, video_duration, view), False
            duration = self._audio_duration(record_index) if audio_cfg.window == "inside" else None
            centres = [start + span / 2 for start, span in clips]
            starts, length = place_windows(centres, seconds, duration, audio_cfg.window)
            return self._read_windows(record_index, starts, length, rate), False
        except NoAudioError as err:
            if self.data_cfg.audio.no_audio == "skip":
                raise
            if record_index not in self._silent:
                self._silent.add(record_index)
                log.warning("feeding silence for %s (audio.no_audio=silence): %s", record.id, err)
            return [torch.zeros(int(round(seconds * rate))) for _ in clips], True

    def _wrapped_windows(
        self, record_index: int, clips: list[tuple[float, float]], video_duration: float, view: int
    ) -> list[torch.Tensor]:
        """``audio.window: wrap``: the windows cut from the looped whole file."""
        record = self.records[record_index]
        if record.start is not None:
            raise ValueError(
                f"{record.video}: audio.window=wrap loops whole files; segment record {record.id} "
                "needs audio.window=inside or centred"
            )
        audio_cfg = self.data_cfg.audio
        rate, seconds, hop = audio_cfg.sample_rate, audio_cfg.seconds, audio_cfg.frame_shift_ms / 1000.0
        duration = self._audio_duration(record_index)
        if self.train:
            starts = wrap_starts([start for start, _ in clips], video_duration, duration, hop)
        else:
            starts = [linspace_starts(self.data_cfg.test_clips, duration, seconds, hop)[view // len(self.crops)]]
        track = self._read_windows(record_index, [0.0], duration, rate)[0]
        return loop_windows(track, starts, seconds, rate)

    # The reads of a record's media; a dataset over another store of the same clips
    # (avmae.data.shards.ShardDataset) overrides them and keeps everything else.

    def _open_video(self, record_index: int) -> VideoReader:
        return open_video(self.records[record_index].video, self.data_cfg.video.decoder)

    def _read_windows(self, record_index: int, starts: list[float], seconds: float, rate: int) -> list[torch.Tensor]:
        record = self.records[record_index]
        return _read_windows(record.audio or record.video, starts, seconds, rate)

    def _audio_duration(self, record_index: int) -> float:
        """Seconds of the record's audio, which ``audio.window`` inside / wrap place the windows in."""
        record = self.records[record_index]
        path = record.audio or record.video
        duration = audio_duration(path)
        if duration <= 0:
            raise AudioDecodeError(
                f"{path}: the audio states no duration, so audio.window=inside or wrap cannot place the "
                "window (audio.window=centred does not need it)"
            )
        return duration

    def _targets(self, record: ClipRecord) -> dict[str, torch.Tensor]:
        targets = {}
        for head, value in record.targets.items():
            if self.multi_label:
                multi_hot = torch.zeros(len(self.classes[head]))
                multi_hot[list(value)] = 1.0
                targets[head] = multi_hot
            else:
                targets[head] = torch.tensor(value, dtype=torch.long)
        return targets


def _read_clips(reader: VideoReader, times: list[np.ndarray]) -> list[torch.Tensor]:
    """The ``(T, H, W, C)`` frames of each clip's ``times`` from one open reader.

    decord's ``get_batch`` decodes sorted frame indices in one forward pass, seeking only across
    gaps, so all clips are read in one call over the union of their times. PyAV's reader decodes
    everything from the first to the last wanted frame, which for clips far apart in a long file
    is more than reading each clip on its own, so it gets one call per clip.
    """
    if len(times) == 1 or not isinstance(reader, DecordReader):
        return [reader.frames_at(t) for t in times]
    frames = reader.frames_at(np.concatenate(times))
    return list(frames.split([len(t) for t in times]))


def _read_windows(path: Path, starts: list[float], seconds: float, rate: int) -> list[torch.Tensor]:
    """``(round(seconds * rate),)`` waveforms of ``[start, start + seconds)`` for each of ``starts``.

    Overlapping windows (the clips of one file under a 10 s window) are cut from one read of
    their union, each within half a sample of its exact start; a window that overlaps no other
    is read on its own, so windows far apart in a long file never read what lies between them.
    """
    length = int(round(seconds * rate))
    waves: list[torch.Tensor | None] = [None] * len(starts)
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    groups = [[order[0]]]
    for i in order[1:]:
        if starts[i] < starts[groups[-1][-1]] + seconds:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        first = starts[group[0]]
        offsets = [int(round((starts[i] - first) * rate)) for i in group]
        union = read_audio(path, first, seconds if len(group) == 1 else (offsets[-1] + length) / rate, rate)
        for i, offset in zip(group, offsets):
            # a copy: waveform augmentations may work in place on overlapping windows
            waves[i] = union[offset : offset + length].clone() if len(group) > 1 else union
    return waves


def _write_missing(path: Path, missing: list[ClipRecord]) -> None:
    """One ``id<TAB>video<TAB>audio`` line per record, written atomically (ranks may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with open(partial, "w") as f:
        for record in missing:
            f.write(f"{record.id}\t{record.video}\t{record.audio or ''}\n")
    os.replace(partial, path)
