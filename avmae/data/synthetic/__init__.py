"""The embedded synthetic audiovisual dataset: real H.264 + AAC mp4s whose classes need both sound
and motion (docs/data.md, "Synthetic clips"). ``media`` writes one mp4, ``clips`` draws one clip of
a class, ``generate`` writes a whole dataset (``tools/make_synthetic.py``).
"""

from avmae.data.synthetic.clips import (
    DEFAULT_NUISANCE,
    LINKED_PITCH_HZ,
    MOTIONS,
    SHAPES,
    SOUNDS,
    TRAIL,
    ClassSpec,
    background_hue,
    Clip,
    class_specs,
    event_phase,
    event_times,
    motion_path,
    render_clip,
    shape_coverage,
    sound_wave,
)
from avmae.data.synthetic.generate import BAD_KINDS, SHORT_SECONDS, SPLITS, generate_dataset, split_by_class
from avmae.data.synthetic.media import AUDIO_BIT_RATE, VIDEO_CRF, frame_rate_fraction, write_av_file

__all__ = [
    "AUDIO_BIT_RATE",
    "BAD_KINDS",
    "DEFAULT_NUISANCE",
    "LINKED_PITCH_HZ",
    "MOTIONS",
    "SHAPES",
    "SHORT_SECONDS",
    "SOUNDS",
    "SPLITS",
    "TRAIL",
    "VIDEO_CRF",
    "ClassSpec",
    "background_hue",
    "Clip",
    "class_specs",
    "event_phase",
    "event_times",
    "generate_dataset",
    "motion_path",
    "render_clip",
    "shape_coverage",
    "sound_wave",
    "split_by_class",
    "write_av_file",
    "frame_rate_fraction",
]
