"""One synthetic clip: a class pairs a motion pattern of a shape with a sound fired at the same
instants, so that a class is told by the trajectory's form in time, the sound's timbre and rhythm,
and their synchrony; everything else is a per-clip nuisance drawn independently of the class
(docs/data.md). ``render_clip`` draws the frames and the waveform of one clip.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# ---------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------

MOTIONS = ("bounce", "orbit", "zigzag", "pulse", "sweep", "hop", "figure8", "drop")
SOUNDS = ("click", "chirp", "buzz", "bell", "noise", "knock", "pluck", "whistle")

# The first classes, hand-paired. Pitch centres lie within about an octave of each other and
# every clip draws its pitch up to an octave away, so the ranges overlap; event periods are
# well under 1 s so that a 2 s window holds at least two events.
_BASE_CLASSES = (
    # motion, sound, pitch centre (Hz), event period range (s)
    ("bounce", "click", 900.0, (0.40, 0.65)),
    ("orbit", "chirp", 700.0, (0.55, 0.85)),
    ("zigzag", "buzz", 600.0, (0.35, 0.60)),
    ("pulse", "bell", 1000.0, (0.45, 0.75)),
    ("sweep", "noise", 1100.0, (0.40, 0.70)),
    ("hop", "knock", 650.0, (0.50, 0.80)),
    ("figure8", "pluck", 800.0, (0.55, 0.85)),
    ("drop", "whistle", 1200.0, (0.40, 0.65)),
)


@dataclass(frozen=True)
class ClassSpec:
    """One class: a motion pattern whose events each fire one sound."""

    name: str
    motion: str
    sound: str
    pitch_hz: float  # centre of the per-clip pitch range (one octave either side)
    period: tuple[float, float]  # range of the mean time between events, seconds


def class_specs(num_classes: int) -> list[ClassSpec]:
    """The first ``num_classes`` classes; they depend on nothing but their index.

    Beyond the eight hand-paired classes, motions and sounds are re-paired (motion ``m`` with
    sound ``m + shift``), so class ``k`` is a unique (motion, sound) pair for up to 64 classes.
    """
    limit = len(MOTIONS) * len(SOUNDS)
    if not 1 <= num_classes <= limit:
        raise ValueError(f"num_classes must be in [1, {limit}], got {num_classes}")
    specs = []
    for index in range(num_classes):
        shift, m = divmod(index, len(MOTIONS))
        motion, base_sound, pitch, period = _BASE_CLASSES[m]
        sound = SOUNDS[(SOUNDS.index(base_sound) + shift) % len(SOUNDS)]
        # Re-paired classes also move pitch and rate a little (within the overlapping ranges).
        step = (shift % 3) - 1 if shift else 0
        pitch = round(pitch * 2.0 ** (0.25 * step), 1)
        period = (round(period[0] * (1.0 + 0.08 * step), 3), round(period[1] * (1.0 + 0.08 * step), 3))
        specs.append(ClassSpec(f"{motion}_{sound}", motion, sound, pitch, period))
    return specs


# ---------------------------------------------------------------------------------------------
# Events and motion
# ---------------------------------------------------------------------------------------------


def event_times(rng: np.random.Generator, period: float, duration: float, jitter: float = 0.08) -> np.ndarray:
    """Event instants covering ``[-2 period, duration + 2 period]``: a random phase, then
    intervals of ``period`` each jittered by up to ``jitter`` of it."""
    times = [-2.0 * period - rng.uniform(0.0, period)]
    while times[-1] < duration + 2.0 * period:
        times.append(times[-1] + period * (1.0 + rng.uniform(-jitter, jitter)))
    return np.asarray(times)


def event_phase(t: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Phase that is the integer ``k`` at event ``k`` and linear between events."""
    return np.interp(t, events, np.arange(len(events), dtype=np.float64))


def _triangle(x: np.ndarray) -> np.ndarray:
    """Triangle wave with period 1: 0 at integers, 1 at half-integers."""
    return 1.0 - np.abs(2.0 * (x - np.floor(x)) - 1.0)


def motion_path(
    motion: str, phase: np.ndarray, direction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit trajectory of a motion as a function of event phase.

    Returns ``(dx, dy, scale)``, each shaped like ``phase``: offsets in [-0.5, 0.5] of the motion's
    amplitude (y grows downwards) and a size factor. Every integer phase is an event instant,
    the moment the sound starts: the contact of a bounce, the top of an orbit, a wall hit.
    ``direction`` is +1 or -1 and mirrors the motion horizontally.
    """
    u = phase - np.floor(phase)
    zero, one = np.zeros_like(phase), np.ones_like(phase)
    if motion == "bounce":  # parabolic flight, floor contact at each event
        return zero, 0.5 - 4.0 * u * (1.0 - u), one
    if motion == "orbit":  # one turn per event, at the top
        angle = 2.0 * math.pi * phase
        return 0.5 * direction * np.sin(angle), -0.5 * np.cos(angle), one
    if motion == "zigzag":  # up and down once per event (reversal at the bottom) while drifting sideways
        return direction * (_triangle(phase / 4.0) - 0.5), 0.5 - _triangle(phase), one
    if motion == "pulse":  # pops to nearly twice its size at each event, then shrinks back
        return zero, zero, 1.0 + 0.9 * np.exp(-4.0 * u)
    if motion == "sweep":  # constant speed left-right, a wall at each event
        return direction * (_triangle(phase / 2.0) - 0.5), zero, one
    if motion == "hop":  # rests, then a short quick hop that lands at each event
        v = np.clip((u - 0.6) / 0.4, 0.0, 1.0)
        return zero, 0.25 - 2.0 * v * (1.0 - v), one
    if motion == "figure8":  # a figure eight, crossing its centre at each event
        return 0.5 * direction * np.sin(math.pi * phase), 0.35 * np.sin(2.0 * math.pi * phase), one
    if motion == "drop":  # falls with gravity from the top, hits the bottom at each event, reappears on top
        return zero, u**2 - 0.5, one
    raise ValueError(f"unknown motion {motion!r}; known: {', '.join(MOTIONS)}")


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "diamond", "triangle", "ring")

# Strength of the class-independent nuisances (0 = clean clips, 1 = the strongest designed).
# Measured with configs/pretrain/demo.yaml (600 steps) and configs/probe/synthetic.yaml on 800
# clips of 8 classes, audiovisual linear probe val / test accuracy in %:
#   nuisance 0.0: pretrained 88 / 82, random init 75 / 81, raw inputs 60 / 68
#   nuisance 0.3: pretrained 48 / 44 and 55 / 47, random init 41 / 35 and 34 / 33, raw 24 / 28 and
#                 32 / 29 (seeds 0 and 1)
#   nuisance 1.0: pretrained 30 / 28, random init 25 / 28, raw 20 / 21
# 0.3 is the default: the classes are far from solved, and pretraining helps.
DEFAULT_NUISANCE = 0.3
# Pitch at the middle hue of clips written with hue_sets_pitch: 400 Hz at hue 0 to 1600 Hz at hue 1.
LINKED_PITCH_HZ = 800.0
# The moving object's fading trail: (seconds ago, opacity), oldest first, over the last 0.32 s.
TRAIL = tuple((0.04 * k, 0.6 * (1.0 - k / 9.0)) for k in range(8, 0, -1))


def shape_coverage(
    shape: str, x: np.ndarray, y: np.ndarray, radius: np.ndarray, grid: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at ``(x, y)`` per frame.

    ``x``, ``y``, ``radius`` are ``(T,)`` in pixels; ``grid`` is the pixel-centre ``(yy, xx)``
    pair, each ``(H, W)``. Returns ``(T, H, W)`` float32.
    """
    yy, xx = grid
    dx = xx[None] - x.astype(np.float32)[:, None, None]
    dy = yy[None] - y.astype(np.float32)[:, None, None]
    r = radius.astype(np.float32)[:, None, None]
    if shape == "circle":
        distance = np.hypot(dx, dy) - r
    elif shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    elif shape == "diamond":
        distance = (np.abs(dx) + np.abs(dy) - 1.2 * r) / math.sqrt(2.0)
    elif shape == "triangle":  # pointing up, centred on its centroid
        distance = np.maximum(dy - 0.6 * r, (np.abs(dx) * math.sqrt(3.0) - dy - 1.2 * r) / 2.0)
    elif shape == "ring":
        distance = np.abs(np.hypot(dx, dy) - 0.8 * r) - 0.35 * r
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.clip(0.5 - distance, 0.0, 1.0).astype(np.float32)


def _background(
    rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], size: int, nuisance: float
) -> np.ndarray:
    """A static ``(H, W, 3)`` float background: a colour, a gradient and soft blotches.

    The blotches are a random 4 x 4 grid of colours, bilinearly upsampled: texture without
    edges or a direction, which the object's trail could be mistaken for.
    """
    yy, xx = grid
    base = rng.uniform(20.0, 235.0, size=3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5
    image = base + ramp[..., None] * rng.uniform(-60.0, 60.0, size=3) * nuisance
    coarse = rng.uniform(-25.0, 25.0, size=(4, 4, 3)) * nuisance
    # Bilinear weights from the 4 knots to the ``size`` pixels of one axis: (size, 4).
    weights = np.stack([np.interp(np.linspace(0.0, 3.0, size), np.arange(4), np.eye(4)[k]) for k in range(4)], 1)
    return image + np.einsum("yi,xj,ijc->yxc", weights, weights, coarse)


def background_hue(background: np.ndarray) -> float:
    """Hue in [0, 1) of the mean colour of an ``(H, W, 3)`` background in [0, 255]."""
    red, green, blue = np.clip(background.reshape(-1, 3).mean(axis=0), 0.0, 255.0) / 255.0
    return colorsys.rgb_to_hsv(red, green, blue)[0]


def _contrasting_colour(
    rng: np.random.Generator, background: np.ndarray, min_distance: float = 90.0
) -> np.ndarray:
    """A random RGB colour at least ``min_distance`` away from the background's mean colour."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(100):
        colour = rng.uniform(0.0, 255.0, size=3)
        if np.linalg.norm(colour - mean) >= min_distance:
            return colour
    return 255.0 - mean  # unreachable in practice: the complement is always far enough


# ---------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------


def _envelope(t: np.ndarray, attack: float, decay: float) -> np.ndarray:
    """Sharp linear attack then exponential decay, so the onset marks the event instant."""
    return np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0.0) / decay)


def _bandpass_noise(
    rng: np.random.Generator, n: int, low: float, high: float, sample_rate: int
) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum[(freqs < low) | (freqs > high)] = 0.0
    return np.fft.irfft(spectrum, n)


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float, sample_rate: int) -> np.ndarray:
    """Noise with power falling as ``1 / f**exponent``: 0 is white, 2 is brown."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), 20.0)
    return np.fft.irfft(spectrum * freqs ** (-exponent / 2.0), n)


def sound_wave(sound: str, pitch: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One event's sound, peak 1, starting with its onset at sample 0. ``pitch`` is its dominant
    frequency in Hz; timbre, envelope and duration depend on ``sound``. Returns ``(N,)`` float64."""
    nyquist = 0.45 * sample_rate

    def seconds(length: float) -> np.ndarray:
        return np.arange(int(length * sample_rate)) / sample_rate

    if sound == "click":  # a tick: a resonance ringing for a few milliseconds
        t = seconds(0.03)
        wave = np.sin(2.0 * math.pi * pitch * t) * _envelope(t, 0.0005, 0.004)
    elif sound == "chirp":  # rising sweep over 1.3 octaves
        t = seconds(0.09)
        f = pitch * 2.0 ** (1.3 * t / t[-1] - 0.65)
        wave = np.sin(2.0 * math.pi * np.cumsum(f) / sample_rate) * _envelope(t, 0.003, 0.06)
    elif sound == "buzz":  # a square wave: odd harmonics
        t = seconds(0.1)
        harmonics = [k for k in range(1, 40, 2) if k * pitch < nyquist]
        wave = sum(np.sin(2.0 * math.pi * k * pitch * t) / k for k in harmonics)
        wave = wave * _envelope(t, 0.002, 0.04)
    elif sound == "bell":  # inharmonic partials with long decays
        t = seconds(0.3)
        partials = [(1.0, 1.0, 0.12), (2.76, 0.5, 0.08), (5.40, 0.25, 0.05)]
        wave = sum(
            a * np.sin(2.0 * math.pi * r * pitch * t) * _envelope(t, 0.002, d)
            for r, a, d in partials
            if r * pitch < nyquist
        )
    elif sound == "noise":  # a burst of noise, one octave wide around the pitch
        t = seconds(0.07)
        high = min(pitch * math.sqrt(2.0), nyquist)
        wave = _bandpass_noise(rng, t.size, pitch / math.sqrt(2.0), high, sample_rate)
        wave = wave * _envelope(t, 0.002, 0.025)
    elif sound == "knock":  # two short damped hits 45 ms apart
        t = seconds(0.1)
        wave = np.zeros_like(t)
        for start, strength in ((0.0, 1.0), (0.045, 0.7)):
            since = np.maximum(t - start, 0.0)
            hit = np.sin(2.0 * math.pi * pitch * since) * _envelope(since, 0.001, 0.012)
            wave += strength * np.where(t >= start, hit, 0.0)
    elif sound == "pluck":  # harmonic partials, the higher ones dying sooner
        t = seconds(0.25)
        wave = sum(
            np.sin(2.0 * math.pi * k * pitch * t) / k * _envelope(t, 0.001, 0.12 / k)
            for k in range(1, 9)
            if k * pitch < nyquist
        )
    elif sound == "whistle":  # a pure tone with fast vibrato
        t = seconds(0.12)
        f = pitch * (1.0 + 0.04 * np.sin(2.0 * math.pi * 25.0 * t))
        wave = np.sin(2.0 * math.pi * np.cumsum(f) / sample_rate) * _envelope(t, 0.003, 0.08)
    else:
        raise ValueError(f"unknown sound {sound!r}; known: {', '.join(SOUNDS)}")
    return wave / max(np.abs(wave).max(), 1e-9)


def _add_at(track: np.ndarray, wave: np.ndarray, start: int) -> None:
    """Add ``wave`` into ``track`` from sample ``start``, cut at the track's end."""
    if start >= track.size:
        return
    end = min(track.size, start + wave.size)
    track[start:end] += wave[: end - start]


# ---------------------------------------------------------------------------------------------
# One clip
# ---------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """One rendered clip.

    ``frames`` ``(T, H, W, 3)`` uint8, frame ``i`` shown at ``i / fps``; ``audio`` ``(N,)`` float32
    in [-1, 1]; ``events`` the instants (seconds, inside the clip) at which a motion event happens
    and its sound starts; ``meta`` the drawn nuisances, JSON-serialisable.
    """

    frames: np.ndarray
    audio: np.ndarray
    events: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def render_clip(
    spec: ClassSpec,
    rng: np.random.Generator,
    duration: float = 4.0,
    fps: float = 25.0,
    size: int = 64,
    sample_rate: int = 16000,
    nuisance: float = DEFAULT_NUISANCE,
    hue_sets_pitch: bool = False,
) -> Clip:
    """Draw one clip of class ``spec``.

    ``nuisance`` scales every class-independent distraction (texture, distractor shapes and
    sounds, pixel and audio noise, hum); 0 gives a clean clip, 1 the strongest designed.
    ``hue_sets_pitch`` ties one nuisance of each modality together: the pitch is set by the hue
    of the background's mean colour, ``LINKED_PITCH_HZ * 2 ** (2 * hue - 1)`` for every class,
    instead of drawn around the class's centre, so that a clip's audio and video share something
    a small encoder can learn to match (retrieval) and that says nothing of the class. Every
    other draw, and so every frame, stays the same.
    """
    if size % 2 or size < 16:
        raise ValueError(f"size must be even and >= 16, got {size}")
    num_frames = max(1, int(round(duration * fps)))
    num_samples = int(round(duration * sample_rate))
    frame_times = np.arange(num_frames) / float(fps)

    # When things happen: the class's rate, a random phase, jitter on every interval.
    period = rng.uniform(*spec.period)
    events = event_times(rng, period, duration)
    in_clip = events[(events >= 0.0) & (events < duration)]

    # What the picture looks like: all drawn independently of the class.
    grid = tuple(g.astype(np.float32) + 0.5 for g in np.mgrid[0:size, 0:size])
    background = _background(rng, grid, size, nuisance)
    shape = str(rng.choice(SHAPES))
    colour = _contrasting_colour(rng, background)
    radius = rng.uniform(0.08, 0.13) * size
    amplitude = rng.uniform(0.35, 0.55) * size
    direction = float(rng.choice((-1.0, 1.0)))
    # Centre the trajectory near the middle of the frame, up to 12 % of its size away, so that
    # where the object goes says how it moves; kept inside (a pulse grows to 1.9x its radius).
    margin = 0.5 * amplitude + 1.9 * radius
    low, high = min(margin, size / 2), max(size - margin, size / 2)
    centre = np.clip(size / 2 + rng.uniform(-0.12, 0.12, size=2) * size, low, high)

    dx, dy, scale = motion_path(spec.motion, event_phase(frame_times, events), direction)
    x, y = centre[0] + amplitude * dx, centre[1] + amplitude * dy
    video = np.broadcast_to(background.astype(np.float32), (num_frames, size, size, 3)).copy()

    # Distractors wander slowly (well below any class's event rate), under the main object.
    num_distractors = int(rng.integers(0, 3)) if nuisance > 0 else 0
    for _ in range(num_distractors):
        d_colour = _contrasting_colour(rng, background, min_distance=60.0)
        d_radius = np.full(num_frames, rng.uniform(0.04, 0.07) * size)
        d_pos = []
        for _axis in range(2):
            freqs, phases = rng.uniform(0.08, 0.35, size=2), rng.uniform(0.0, 2.0 * math.pi, size=2)
            path = sum(np.sin(2.0 * math.pi * f * frame_times + p) for f, p in zip(freqs, phases)) / 2.0
            d_pos.append(size * (0.5 + 0.35 * path))
        alpha = shape_coverage(str(rng.choice(SHAPES)), d_pos[0], d_pos[1], d_radius, grid)[..., None]
        video += alpha * (d_colour.astype(np.float32) - video)

    # A fading trail of where the object just was, as a long exposure would show: every frame
    # then carries the local shape of the path (an arc, a line, a V), even when frames are
    # sampled a quarter of a second apart. Copies of one colour stacked with opacities a_k
    # leave prod(1 - a_k) of what lies below, so one blend draws them all.
    transparency = 1.0 - shape_coverage(shape, x, y, radius * scale, grid)
    for lag, opacity in TRAIL:
        phase_ago = event_phase(frame_times - lag, events)
        dx_ago, dy_ago, scale_ago = motion_path(spec.motion, phase_ago, direction)
        x_ago, y_ago = centre[0] + amplitude * dx_ago, centre[1] + amplitude * dy_ago
        transparency *= 1.0 - opacity * shape_coverage(shape, x_ago, y_ago, radius * scale_ago, grid)
    video += (1.0 - transparency)[..., None] * (colour.astype(np.float32) - video)
    pixel_noise = rng.uniform(0.0, 6.0) * nuisance
    if pixel_noise > 0:
        # Uniform noise of standard deviation pixel_noise: three times faster to draw than normal.
        uniform = rng.random(size=video.shape, dtype=np.float32) - np.float32(0.5)
        video += np.float32(pixel_noise * math.sqrt(12.0)) * uniform
    frames = np.clip(np.rint(video), 0, 255).astype(np.uint8)

    # The sound: one class sound per event at the same instant, plus class-independent nuisances.
    pitch = spec.pitch_hz * 2.0 ** rng.uniform(-1.0, 1.0)  # drawn in either case: later draws stay
    if hue_sets_pitch:
        pitch = LINKED_PITCH_HZ * 2.0 ** (2.0 * background_hue(background) - 1.0)
    gain = 10.0 ** (rng.uniform(-16.0, -4.0) / 20.0)
    audio = np.zeros(num_samples)
    for t in events[events < duration]:
        start = int(round(t * sample_rate))
        loudness = gain * 10.0 ** (rng.uniform(-2.0, 2.0) / 20.0)
        wave = loudness * sound_wave(spec.sound, pitch, sample_rate, rng)
        if start < 0:  # an event just before the clip whose sound rings into it
            wave, start = wave[-start:], 0
        _add_at(audio, wave, start)
    num_distractor_sounds = int(rng.poisson(0.6 * duration * nuisance))
    for _ in range(num_distractor_sounds):
        wave = sound_wave(str(rng.choice(SOUNDS)), 700.0 * 2.0 ** rng.uniform(-1.5, 1.5), sample_rate, rng)
        loudness = gain * 10.0 ** (rng.uniform(-16.0, -8.0) / 20.0)
        _add_at(audio, loudness * wave, int(rng.integers(0, max(num_samples, 1))))
    if nuisance > 0:
        noise = _coloured_noise(rng, num_samples, rng.uniform(0.0, 2.0), sample_rate)
        noise *= 10.0 ** (rng.uniform(-50.0, -30.0) / 20.0) * nuisance / max(noise.std(), 1e-9)
        audio += noise
        if rng.uniform() < 0.5:  # a steady hum somewhere between 80 Hz and 2 kHz
            frequency = 80.0 * 25.0 ** rng.uniform()
            start_phase = rng.uniform(0.0, 2.0 * math.pi)
            hum = np.sin(2.0 * math.pi * frequency * np.arange(num_samples) / sample_rate + start_phase)
            audio += 10.0 ** (rng.uniform(-40.0, -26.0) / 20.0) * nuisance * math.sqrt(2.0) * hum
    peak = np.abs(audio).max() if audio.size else 0.0
    if peak > 0.95:
        audio *= 0.95 / peak

    meta = {
        "class": spec.name,
        "period": round(float(period), 6),
        "events": [round(float(t), 6) for t in in_clip],
        "shape": shape,
        "colour": [round(float(c), 1) for c in colour],
        "radius": round(float(radius), 3),
        "amplitude": round(float(amplitude), 3),
        "centre": [round(float(c), 3) for c in centre],
        "distractors": num_distractors,
        "pitch_hz": round(float(pitch), 3),
        "hue_sets_pitch": hue_sets_pitch,
        "distractor_sounds": num_distractor_sounds,
    }
    return Clip(frames, audio.astype(np.float32), in_clip, meta)
