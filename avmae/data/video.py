"""Video decoding behind a small reader interface, and clip sampling in seconds.

Times follow docs/architecture.md: frame ``i`` of a clip starting at ``s`` seconds is the decoded
frame shown at ``s + i * speed / frame_rate``, so a clip covers the same span of time whatever the
file's frame rate (25, 29.97, 30 fps). The decoded frame shown at time ``t`` is frame
``floor(t * fps)`` of a constant-frame-rate stream whose first frame is shown at 0.

``open_video(path, decoder)`` returns a ``VideoReader`` (decord by default, or PyAV). Another
backend (torchcodec, for example) is one more ``VideoReader`` subclass added to ``DECODERS``.

Short files. A file at least ``min_fraction`` of the clip span long is read with the times
beyond its end mapped to its last frame; a shorter file raises ``ClipTooShortError``, so a clip
is never mostly a repeated frame.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch

# Frame times sit exactly on frame boundaries (0.04 s at 25 fps); the tolerance keeps a time
# computed as 0.12 = 3 * 0.04 from landing on frame 2 by rounding error.
_TIME_EPS = 1e-6


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded. The message names the file."""


class ClipTooShortError(VideoDecodeError):
    """A video file is too short for the clip window (see the module docstring)."""


class VideoReader(abc.ABC):
    """An open video file: frame rate, length, and frames at given times.

    Subclasses set ``path``, ``fps`` and ``num_frames`` in ``__init__`` and implement
    ``_read(indices)``; ``frames_at`` does the time arithmetic for all of them.
    """

    path: Path
    fps: float
    num_frames: int

    @property
    def duration(self) -> float:
        """Seconds covered by the frames, i.e. until the last frame stops being shown."""
        return self.num_frames / self.fps

    def frame_indices(self, times: Sequence[float] | np.ndarray) -> np.ndarray:
        """Index of the frame shown at each time; times past the end map to the last frame."""
        times = np.asarray(times, dtype=np.float64)
        indices = np.floor(times * self.fps + _TIME_EPS).astype(np.int64)
        return np.clip(indices, 0, self.num_frames - 1)

    def frames_at(self, times: Sequence[float] | np.ndarray) -> torch.Tensor:
        """The frames shown at ``times`` (seconds) as uint8 ``(T, H, W, C)``."""
        indices = self.frame_indices(times)
        unique, inverse = np.unique(indices, return_inverse=True)
        frames = self._read(unique)
        if frames.shape[0] != unique.size:
            raise VideoDecodeError(
                f"{self.path}: decoded {frames.shape[0]} of {unique.size} requested frames "
                f"(indices {unique.min()}..{unique.max()} of {self.num_frames}); the file is damaged"
            )
        return torch.from_numpy(np.ascontiguousarray(frames[inverse]))

    @abc.abstractmethod
    def _read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at sorted unique ``indices`` as uint8 ``(K, H, W, C)``."""

    def close(self) -> None:
        """Release the file; the reader is unusable afterwards."""

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecordReader(VideoReader):
    """decord's VideoReader. One decoding thread: decord's thread pool can hang in forked
    DataLoader workers, and the workers already give the parallelism.

    decord 0.6 fails on a few frame widths under 80 pixels (8, 16, 24, 48, 72); such files
    raise ``VideoDecodeError`` and decode with ``data.video.decoder=pyav``.
    """

    def __init__(self, path: str | Path):
        import decord

        self.path = Path(path)
        try:
            self._reader = decord.VideoReader(str(self.path), num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except (decord.DECORDError, RuntimeError) as err:
            raise VideoDecodeError(f"{self.path}: decord cannot open the video: {err}") from err
        _check_stream(self.path, self.num_frames, self.fps)
        self._error = decord.DECORDError

    def _read(self, indices: np.ndarray) -> np.ndarray:
        try:
            return self._reader.get_batch(indices.tolist()).asnumpy()
        except (self._error, RuntimeError) as err:
            raise VideoDecodeError(f"{self.path}: decord failed to decode frames: {err}") from err

    def close(self) -> None:
        self._reader = None


class PyAVReader(VideoReader):
    """PyAV (FFmpeg bundled). Seeks to the keyframe before the first wanted frame, then decodes
    forward, so segments of long videos do not decode from the start."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as err:
            raise VideoDecodeError(f"{self.path}: PyAV cannot open the file: {err}") from err
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(f"{self.path}: no video stream")
        self._stream = self._container.streams.video[0]
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.num_frames = self._stream.frames or _frames_from_duration(self._container, self._stream, self.fps)
        self._start = float(self._stream.start_time * self._stream.time_base) if self._stream.start_time else 0.0
        try:
            _check_stream(self.path, self.num_frames, self.fps)
        except VideoDecodeError:
            self._container.close()
            raise

    def _read(self, indices: np.ndarray) -> np.ndarray:
        wanted = set(indices.tolist())
        last = int(indices[-1])
        first_time = int(indices[0]) / self.fps + self._start
        found: dict[int, np.ndarray] = {}
        try:
            self._container.seek(
                max(0, int(first_time / self._stream.time_base)), stream=self._stream, backward=True
            )
            for frame in self._container.decode(self._stream):
                if frame.time is None:
                    continue
                index = int(round((frame.time - self._start) * self.fps))
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
        except (av.FFmpegError, OSError) as err:
            raise VideoDecodeError(f"{self.path}: PyAV failed to decode frames: {err}") from err
        return np.stack([found[i] for i in sorted(found)]) if found else np.zeros((0, 1, 1, 3), np.uint8)

    def close(self) -> None:
        self._container.close()


def _frames_from_duration(container, stream, fps: float) -> int:
    """Frame count of a stream whose header does not state it (some mkv/webm files)."""
    if stream.duration:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return 0
    return int(round(seconds * fps))


def _check_stream(path: Path, num_frames: int, fps: float) -> None:
    if not fps or not math.isfinite(fps) or fps <= 0:
        raise VideoDecodeError(f"{path}: the video stream has no usable frame rate ({fps})")
    if num_frames <= 0:
        raise VideoDecodeError(f"{path}: the video stream has no frames")


DECODERS: dict[str, type[VideoReader]] = {"decord": DecordReader, "pyav": PyAVReader}


def open_video(path: str | Path, decoder: str = "decord") -> VideoReader:
    """Open ``path`` with the named backend (``data.video.decoder``)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown video decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[decoder](path)


# ---------------------------------------------------------------------------------------------
# Clip sampling in seconds


def clip_span(num_frames: int, frame_rate: float, speed: float = 1.0) -> float:
    """Seconds covered by ``num_frames`` frames sampled every ``speed / frame_rate`` seconds."""
    return num_frames * speed / frame_rate


def frame_times(start: float, num_frames: int, frame_rate: float, speed: float = 1.0) -> np.ndarray:
    """``(T,)`` times of the frames of a clip starting at ``start``: ``start + i * speed / frame_rate``."""
    return start + np.arange(num_frames, dtype=np.float64) * (speed / frame_rate)


def clip_starts(
    duration: float,
    span: float,
    num_clips: int = 1,
    generator: torch.Generator | None = None,
    segment: tuple[float, float] | None = None,
) -> list[float]:
    """Start times of clips of ``span`` seconds in a video of ``duration`` seconds.

    With a ``generator``: one start drawn uniformly (training). Without: ``num_clips`` starts
    evenly spaced from the earliest to the latest possible start, or the centred start when
    ``num_clips`` is 1 (evaluation). ``segment = (start, end)`` restricts the clips to that part of
    the video; a segment shorter than ``span`` gets the clip centred on it, kept inside the file.
    A video shorter than ``span`` gets start 0 (see ``check_duration`` for the limit).
    """
    lo, hi = segment if segment is not None else (0.0, duration)
    if hi - lo >= span:
        first, last = lo, hi - span
    else:
        centred = (lo + hi - span) / 2.0
        first = last = min(max(centred, 0.0), max(duration - span, 0.0))
    if generator is not None:
        return [first + (last - first) * float(torch.rand((), generator=generator))]
    if num_clips == 1:
        return [(first + last) / 2.0]
    return [first + (last - first) * k / (num_clips - 1) for k in range(num_clips)]


def check_duration(
    reader: VideoReader,
    span: float,
    min_fraction: float,
    segment: tuple[float, float] | None = None,
) -> None:
    """Raise ``ClipTooShortError`` when the file cannot give a clip of ``span`` seconds.

    The file must last at least ``min_fraction * span`` seconds, and a segment must start
    inside it (a segment past the end means the annotation and the file disagree).
    """
    if reader.duration < min_fraction * span:
        raise ClipTooShortError(
            f"{reader.path}: {reader.duration:.3f} s of video is shorter than {min_fraction:g} of the "
            f"{span:.3f} s clip window (data.video.min_duration_fraction)"
        )
    if segment is not None and segment[0] >= reader.duration:
        raise ClipTooShortError(
            f"{reader.path}: segment [{segment[0]:.2f}, {segment[1]:.2f}] s starts after the end of "
            f"the {reader.duration:.2f} s video"
        )
