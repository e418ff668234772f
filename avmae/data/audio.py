"""Waveform windows and the Kaldi fbank of CAV-MAE / AST / AudioMAE.

``read_audio(path, start, seconds, sample_rate)`` returns ``(N,)`` float32 mono samples of
``[start, start + seconds)``: the first channel, resampled to ``sample_rate``, zeros where the
window leaves the file. A video's own audio track is read with PyAV; wav/flac/ogg files with
soundfile. A file without an audio stream raises ``NoAudioError``.

``place_windows`` decides where the windows of a clip sit (``AudioConfig.window`` inside /
centred); ``wrap_starts``, ``linspace_starts`` and ``loop_windows`` are ``window: wrap``, the
windows of DMVR's samplers that AV-MAE reads through (docs/recipes.md, "The audio window").

``fbank(waveform, audio_cfg)`` is the ``(target_length, num_mel_bins)`` model input: the
features of YuanGongND/cav-mae src/dataloader.py (torchaudio's Kaldi fbank, 128 mel bins, 10 ms
hop, Hanning window, no dither, waveform mean removed) normalised by the configured ``(x - norm_mean) / norm_std``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import soundfile
import torch
import torchaudio

from avmae.config import AudioConfig

SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif"}
# Seconds of extra source samples read on each side of a window, so the resampling filter sees
# real neighbours instead of an edge (torchaudio's default filter is 6 zero crossings wide, far
# below 0.05 s at any common rate).
_RESAMPLE_MARGIN = 0.05


class AudioDecodeError(RuntimeError):
    """An audio file or track could not be read. The message names the file."""


class NoAudioError(AudioDecodeError):
    """The file has no audio stream (a video-only clip). The message names the file."""


def read_audio(path: str | Path, start: float, seconds: float, sample_rate: int) -> torch.Tensor:
    """``(round(seconds * sample_rate),)`` float32 samples of ``[start, start + seconds)``.

    Time 0 is the start of the file's timeline (for a video, the time of its first frame).
    """
    path = Path(path)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        source, source_rate, source_start = _read_soundfile(path, start, seconds)
    else:
        source, source_rate, source_start = _read_av(path, start, seconds)
    return cut_window(source, source_rate, source_start, start, seconds, sample_rate)


def audio_duration(path: str | Path) -> float:
    """Seconds of audio in ``path`` (its audio stream's stated duration for a video)."""
    path = Path(path)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            info = soundfile.info(str(path))
        except (soundfile.LibsndfileError, RuntimeError, OSError) as err:
            raise AudioDecodeError(f"{path}: cannot read audio: {err}") from err
        return info.frames / info.samplerate
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise NoAudioError(f"{path}: the file has no audio stream")
            stream = container.streams.audio[0]
            if stream.duration:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else 0.0
    except (av.FFmpegError, OSError) as err:
        raise AudioDecodeError(f"{path}: cannot open the file: {err}") from err


def place_windows(
    centres: list[float], seconds: float, duration: float | None, placement: str
) -> tuple[list[float], float]:
    """Start times of audio windows centred on ``centres``, and the seconds each one reads.

    ``placement`` (``AudioConfig.window``):
    - ``"centred"``: ``[c - seconds / 2, c + seconds / 2)`` whatever the file; ``read_audio``
      fills what lies outside the file with zero samples. ``duration`` is not used.
    - ``"inside"``: each window shifted by the least amount that puts it inside
      ``[0, duration)``; when the file is shorter than the window, every window is the whole
      file (start 0, ``duration`` seconds), and ``kaldi_fbank`` appends zero frames after the
      real ones up to the target length.
    """
    if placement == "centred":
        return [c - seconds / 2 for c in centres], seconds
    if placement != "inside":
        raise ValueError(f"audio window placement must be 'inside' or 'centred', got {placement!r}")
    if duration is None or duration <= 0:
        raise ValueError(f"placing a window inside a file needs its duration, got {duration}")
    if duration <= seconds:
        return [0.0 for _ in centres], duration
    latest = duration - seconds
    return [min(max(c - seconds / 2, 0.0), latest) for c in centres], seconds


def _frames(seconds: float, hop: float) -> int:
    """Spectrogram frames of ``seconds`` at one frame every ``hop`` seconds."""
    return int(round(seconds / hop))


def wrap_starts(clip_starts: list[float], video_duration: float, duration: float, hop: float) -> list[float]:
    """Training starts of ``audio.window: wrap``: each window starts where its video clip starts.

    DMVR's ``sample_sequence`` (google-deepmind/dmvr ``dmvr/processors.py``) samples the frames
    first and keeps their offset as a proportion of the video's length in a state shared with the
    spectrogram, whose window then starts at ``round(proportion x its own length)`` frames. Here:
    ``round(clip_start / video_duration x F) x hop`` seconds, ``F`` the audio's frames of ``hop``
    seconds, taken modulo the audio's ``duration``. ``loop_windows`` reads them.
    """
    if video_duration <= 0 or duration <= 0:
        raise ValueError(f"wrapping windows needs positive durations, got video {video_duration}, audio {duration}")
    frames = _frames(duration, hop)
    return [(round(start / video_duration * frames) % max(frames, 1)) * hop for start in clip_starts]


def linspace_starts(num_views: int, duration: float, seconds: float, hop: float) -> list[float]:
    """Evaluation starts of ``audio.window: wrap``, one per temporal view, independent of the video.

    DMVR's ``sample_linspace_sequence`` (several views): ``num_views`` offsets from 0 to
    ``max(0, F - W)`` frames, ``tf.linspace`` in float32 cast to int (truncated); one view:
    ``sample_sequence`` without randomness, the centred ``max(0, (F - W) // 2)``. ``F`` is the
    audio's frames and ``W`` the window's, of ``hop`` seconds; a window past the end wraps
    (``loop_windows``). VGGSound (10 s, 8 s window, 4 views): 0, 66, 133, 200 frames.
    """
    frames, window = _frames(duration, hop), _frames(seconds, hop)
    latest = max(0, frames - window)
    if num_views == 1:
        return [(latest // 2) * hop]
    # tf.linspace: start + k * ((stop - start) / (num - 1)) in float32, the last one exactly stop
    step = np.float32(latest) / np.float32(num_views - 1)
    offsets = (np.arange(num_views, dtype=np.float32) * step).astype(np.int64)
    offsets[-1] = latest
    return [int(offset) * hop for offset in offsets]


def loop_windows(track: torch.Tensor, starts: list[float], seconds: float, rate: int) -> list[torch.Tensor]:
    """``(round(seconds * rate),)`` windows of the looped ``track`` (the whole file's samples).

    A window that runs past the end continues from the file's start, and a file shorter than the
    window repeats as often as needed: DMVR's ``sample_or_pad_sequence_indices`` with
    ``repeat_sequence=True`` tiles the spectrogram frames the same way. Ours tiles samples, so the
    one or two fbank frames that straddle a seam mix the end and the start of the file.
    """
    if track.ndim != 1 or track.numel() == 0:
        raise ValueError(f"looping needs a non-empty (N,) track, got shape {tuple(track.shape)}")
    length = int(round(seconds * rate))
    steps = torch.arange(length)
    return [track[(int(round(start * rate)) + steps) % track.numel()] for start in starts]


def _source_span(start: float, seconds: float) -> tuple[float, float]:
    return start - _RESAMPLE_MARGIN, start + seconds + _RESAMPLE_MARGIN


def _read_soundfile(path: Path, start: float, seconds: float) -> tuple[np.ndarray, int, float]:
    """First-channel samples around the window, the file's rate, and the time of sample 0."""
    try:
        info = soundfile.info(str(path))
        lo, hi = _source_span(start, seconds)
        first = min(max(0, math.floor(lo * info.samplerate)), info.frames)
        last = min(max(first, math.ceil(hi * info.samplerate)), info.frames)
        data, rate = soundfile.read(
            str(path), start=first, stop=last, dtype="float32", always_2d=True
        )
    except (soundfile.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioDecodeError(f"{path}: cannot read audio: {err}") from err
    if data.shape[1] == 0:
        raise NoAudioError(f"{path}: the audio file has no channels")
    return data[:, 0], rate, first / rate


def _read_av(path: Path, start: float, seconds: float) -> tuple[np.ndarray, int, float]:
    """First-channel samples of the audio track around the window, its rate, and the time of
    the first returned sample."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise AudioDecodeError(f"{path}: cannot open the file: {err}") from err
    with container:
        if not container.streams.audio:
            raise NoAudioError(f"{path}: the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            raise AudioDecodeError(f"{path}: the audio stream has no sample rate")
        lo, hi = _source_span(start, seconds)
        try:
            # long files (EPIC): seek to a keyframe before the window instead of decoding from 0
            seek = lo > 1.0
            if seek:
                container.seek(int((lo - 1.0) * av.time_base))
            source, first = _decode_span(container, stream, rate, lo, hi)
            if seek and (first is None or first > lo):  # the seek overshot: decode from the start
                container.seek(0)
                source, first = _decode_span(container, stream, rate, lo, hi)
        except (av.FFmpegError, OSError) as err:
            raise AudioDecodeError(f"{path}: the audio track is damaged: {err}") from err
    return source, rate, lo


def _decode_span(container, stream, rate: int, lo: float, hi: float) -> tuple[np.ndarray, float | None]:
    """Channel 0 between ``lo`` and ``hi`` seconds, each decoded frame placed at its own timestamp
    (zeros where no frame falls), and the time of the first decoded frame."""
    length = math.ceil((hi - lo) * rate)
    source = np.zeros(length, np.float32)
    first = None
    for frame in container.decode(stream):
        if frame.time is None or frame.time + frame.samples / rate <= lo:
            continue
        if frame.time >= hi:
            break
        first = frame.time if first is None else first
        samples = _first_channel(frame)
        offset = int(round((frame.time - lo) * rate))
        begin, end = max(offset, 0), min(offset + samples.size, length)
        if end > begin:
            source[begin:end] = samples[begin - offset : end - offset]
    return source, first


_INT_SCALE = {"s16": 2.0**15, "s16p": 2.0**15, "s32": 2.0**31, "s32p": 2.0**31, "s64": 2.0**63, "s64p": 2.0**63}


def _first_channel(frame: av.AudioFrame) -> np.ndarray:
    """Float32 samples of the frame's first channel, whatever its sample format."""
    data = frame.to_ndarray()
    name = frame.format.name
    channel = data[0] if frame.format.is_planar else data[0, :: len(frame.layout.channels)]
    if name in ("u8", "u8p"):
        return (channel.astype(np.float32) - 128.0) / 128.0
    if name in _INT_SCALE:
        return (channel / _INT_SCALE[name]).astype(np.float32)
    return channel.astype(np.float32, copy=False)


def cut_window(
    source: np.ndarray, source_rate: int, source_start: float, start: float, seconds: float, sample_rate: int
) -> torch.Tensor:
    """Cut ``[start, start + seconds)`` out of ``source`` (sample 0 at ``source_start`` seconds),
    zero-padding outside it, and resample from ``source_rate`` to ``sample_rate``."""
    length = int(round(seconds * sample_rate))
    margin = 0.0 if source_rate == sample_rate else _RESAMPLE_MARGIN
    # the window plus margin on the source's sample grid
    first = int(round((start - margin - source_start) * source_rate))
    count = int(round((seconds + 2 * margin) * source_rate))
    padded = np.zeros(count, np.float32)
    lo, hi = max(first, 0), min(first + count, source.size)
    if hi > lo:
        padded[lo - first : hi - first] = source[lo:hi]
    wave = torch.from_numpy(padded)
    if source_rate != sample_rate:
        wave = torchaudio.functional.resample(wave, int(source_rate), int(sample_rate))
        skip = int(round(margin * sample_rate))
        wave = wave[skip : skip + length]
    if wave.numel() < length:  # rounding of the margin can leave one sample short
        wave = torch.nn.functional.pad(wave, (0, length - wave.numel()))
    return wave[:length].contiguous()


def kaldi_fbank(waveform: torch.Tensor, audio_cfg: AudioConfig) -> torch.Tensor:
    """Unnormalised log-mel fbank ``(target_length, num_mel_bins)`` of a ``(N,)`` waveform.

    As CAV-MAE / AST / AudioMAE compute it: mean-subtracted waveform, torchaudio's Kaldi fbank
    with their arguments, zero frames appended (a waveform shorter than the window) or frames
    cut to ``audio_cfg.target_length``. One clip of ``kaldi_fbank_batch``.
    """
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform (N,), got shape {tuple(waveform.shape)}")
    return kaldi_fbank_batch(waveform[None], torch.tensor([waveform.numel()]), audio_cfg)[0]


def kaldi_fbank_batch(waves: torch.Tensor, lengths: torch.Tensor, audio_cfg: AudioConfig) -> torch.Tensor:
    """``kaldi_fbank`` of a batch ``(B, N)`` of waveforms, of which row ``b`` holds
    ``lengths[b]`` real samples (zeros after them), on the waves' device: ``(B, target_length, F)``.

    Written with torch's own ops because torchaudio's Kaldi fbank takes one waveform at a time;
    it computes what ``torchaudio.compliance.kaldi.fbank`` does with CAV-MAE's arguments
    (snip_edges framing, per-frame DC removal, 0.97 pre-emphasis, symmetric Hann window, zero
    padding to a power of two, power spectrum, its mel banks, log floored at float epsilon), the
    same ops in the same order, frame by frame (tests/test_audio.py checks it against torchaudio).
    A row's frames past its real samples become the zero frames ``kaldi_fbank`` appends.
    """
    if waves.ndim != 2:
        raise ValueError(f"expected waveforms (B, N), got shape {tuple(waves.shape)}")
    waves, lengths = waves.float(), lengths.to(waves.device)
    rate = audio_cfg.sample_rate
    shift = int(rate * audio_cfg.frame_shift_ms * 0.001)  # torchaudio's rounding (MILLISECONDS_TO_SECONDS)
    size = int(rate * audio_cfg.frame_length_ms * 0.001)
    padded = 1 << (size - 1).bit_length()
    real = torch.arange(waves.shape[1], device=waves.device) < lengths[:, None]
    if bool((lengths == waves.shape[1]).all()):
        waves = waves - waves.mean(1, keepdim=True)
    else:
        waves = waves - (waves * real).sum(1, keepdim=True) / lengths.clamp(min=1)[:, None]
    target = audio_cfg.target_length
    if waves.shape[1] < size:
        return waves.new_zeros(waves.shape[0], target, audio_cfg.num_mel_bins)
    frames = waves.unfold(1, size, shift)  # (B, m, size), m = 1 + (N - size) // shift
    frames = frames - frames.mean(-1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[..., :1], frames[..., :-1]], -1)
    frames = frames * torch.hann_window(size, periodic=False, device=waves.device, dtype=waves.dtype)
    frames = torch.nn.functional.pad(frames, (0, padded - size))
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _mel_banks(audio_cfg.num_mel_bins, padded, float(rate), spectrum.device, spectrum.dtype)
    features = torch.matmul(spectrum, banks.T)
    features = torch.max(features, torch.tensor(torch.finfo(torch.float).eps, device=waves.device)).log()
    valid = torch.where(lengths >= size, 1 + (lengths - size) // shift, 0)  # frames of real samples
    features = features.masked_fill(torch.arange(features.shape[1], device=waves.device)[None, :, None] >= valid[:, None, None], 0.0)
    missing = target - features.shape[1]
    if missing > 0:
        features = torch.nn.functional.pad(features, (0, 0, 0, missing))
    return features[:, :target]


@functools.lru_cache(maxsize=16)
def _mel_banks(num_mel_bins: int, padded: int, rate: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torchaudio's Kaldi mel banks with CAV-MAE's arguments, a zero Nyquist column appended:
    ``(num_mel_bins, padded // 2 + 1)``, made once per geometry, device and dtype (every batch
    and every worker clip would otherwise rebuild them, and copy them to the device)."""
    banks, _ = torchaudio.compliance.kaldi.get_mel_banks(num_mel_bins, padded, rate, 20.0, 0.0, 100.0, -500.0, 1.0)
    return torch.nn.functional.pad(banks.to(device=device, dtype=dtype), (0, 1))


def normalize_fbank(features: torch.Tensor, audio_cfg: AudioConfig) -> torch.Tensor:
    """``(x - norm_mean) / norm_std`` with the configured dataset statistics."""
    return (features - audio_cfg.norm_mean) / audio_cfg.norm_std


def fbank(waveform: torch.Tensor, audio_cfg: AudioConfig) -> torch.Tensor:
    """Normalised model input ``(target_length, num_mel_bins)`` of a ``(N,)`` waveform."""
    return normalize_fbank(kaldi_fbank(waveform, audio_cfg), audio_cfg)


@dataclass
class FbankStats:
    """Mean and std of fbank values over a set of files, and the files that could not be read."""

    mean: float
    std: float
    clips: int
    frames: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def fbank_stats(paths: Iterable[str | Path], audio_cfg: AudioConfig) -> FbankStats:
    """Statistics of ``kaldi_fbank`` over the first ``audio_cfg.seconds`` of each file.

    Only the frames computed from real samples count: the zero padding that fills a short
    file up to ``target_length`` would bias the mean towards 0. Unreadable files and files
    without audio are skipped and listed in ``skipped``.
    """
    total = total_sq = 0.0
    frames = clips = 0
    skipped: list[tuple[Path, str]] = []
    frame_shift = int(round(audio_cfg.sample_rate * audio_cfg.frame_shift_ms / 1000.0))
    frame_length = int(round(audio_cfg.sample_rate * audio_cfg.frame_length_ms / 1000.0))
    for path in paths:
        path = Path(path)
        try:
            wave = read_audio(path, 0.0, audio_cfg.seconds, audio_cfg.sample_rate)
        except AudioDecodeError as err:
            skipped.append((path, str(err)))
            continue
        if not bool(torch.any(wave != 0)):
            skipped.append((path, f"{path}: the audio is silent"))
            continue
        features = kaldi_fbank(wave, audio_cfg).double()
        # frames of real samples (Kaldi snip_edges: 1 + (N - length) // shift)
        real = min(int(audio_duration(path) * audio_cfg.sample_rate), wave.numel())
        valid = 1 + max(real - frame_length, 0) // frame_shift
        features = features[: min(valid, features.shape[0])]
        total += float(features.sum())
        total_sq += float((features**2).sum())
        frames += features.numel() // features.shape[1]
        clips += 1
    if clips == 0:
        raise ValueError(f"no readable audio in any of the {len(skipped)} files; first: {skipped[:1]}")
    count = frames * audio_cfg.num_mel_bins
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    return FbankStats(mean, std, clips, frames, skipped)
