"""Writing one real mp4 (H.264 + AAC) from frames and a waveform, for the synthetic dataset and
the tests. docs/data.md.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

AUDIO_BIT_RATE = 64_000
VIDEO_CRF = 18  # visually lossless at 64x64, so the learnable signal survives the codec


def frame_rate_fraction(fps: float | Fraction) -> Fraction:
    """The exact rate for ``fps``: 29.97 -> 30000/1001 (NTSC rates are 1000/1001 multiples)."""
    if isinstance(fps, Fraction):
        return fps
    for nominal in (24, 30, 48, 60, 120):
        ntsc = Fraction(nominal * 1000, 1001)
        if abs(fps - float(ntsc)) < 5e-3:
            return ntsc
    return Fraction(fps).limit_denominator(1001)


def write_av_file(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> Path:
    """Write an mp4 with an H.264 video stream and, when ``audio`` is given, an AAC audio stream.

    Args:
        path: output file; its parent folder must exist.
        frames: ``(T, H, W, 3)`` uint8 RGB; H and W must be even (yuv420p).
        fps: frame rate; NTSC rates such as 29.97 are stored exactly as 30000/1001.
        audio: ``(N,)`` float32 mono waveform in [-1, 1], or None for a file without audio.
        sample_rate: sample rate of ``audio`` in Hz.

    Encoding is single-threaded with bit-exact muxing, so equal inputs give equal bytes.
    Frame ``i`` is shown at ``i / fps`` and audio sample ``n`` at ``n / sample_rate``.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError(f"{path}: no frames to write")
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even frame sizes, got {height}x{width}")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"{path}: audio must be mono (N,), got shape {audio.shape}")
        if audio.size and np.abs(audio).max() > 1.0:
            raise ValueError(f"{path}: audio exceeds [-1, 1] (peak {np.abs(audio).max():.3f})")

    rate = frame_rate_fraction(fps)
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream(
            "libx264",
            rate=rate,
            # x264's macroblock-tree rate control gives different bytes from run to run for the
            # same frames (measured with PyAV 18); without it, equal frames give equal bytes.
            options={"crf": str(VIDEO_CRF), "preset": "fast", "threads": "1", "x264-params": "mbtree=0"},
        )
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        # Tag the matrix of the rgb -> yuv conversion (BT.601, limited range), so that every
        # decoder converts back the same way.
        video.codec_context.colorspace = Colorspace.SMPTE170M
        video.codec_context.color_range = ColorRange.MPEG
        video.time_base = 1 / rate
        video.codec_context.flags |= av.codec.context.Flags.bitexact
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate, layout="mono")
            sound.bit_rate = AUDIO_BIT_RATE
            sound.time_base = Fraction(1, sample_rate)
            sound.codec_context.flags |= av.codec.context.Flags.bitexact

        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())

        if audio is not None:
            chunk = sound.codec_context.frame_size or 1024
            for start in range(0, audio.size, chunk):
                piece = audio[start : start + chunk]
                frame = av.AudioFrame.from_ndarray(piece[None, :], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path
