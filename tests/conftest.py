"""Shared fixtures: offline hub, and real mp4 files written with the synthetic generator."""

from __future__ import annotations

import os

import numpy as np
import pytest

from avmae.data.synthetic import generate_dataset, write_av_file

# The session dataset: small enough to write in a few seconds, every bad kind present.
SYNTHETIC = dict(
    num_clips=24, num_classes=4, seed=0, duration=2.5, fps=25.0, size=64, sample_rate=16000, bad_fraction=0.25
)


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    """No test may reach a model hub; timm/transformers must fail fast instead of hanging."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if previous is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = previous


@pytest.fixture
def make_clip(tmp_path):
    """Factory writing an mp4 into the test's tmp dir with ``write_av_file``:
    ``make_clip(name, frames, fps, audio=None, sample_rate=16000) -> Path``.

    ``frames`` is ``(T, H, W, 3)`` uint8, ``audio`` ``(N,)`` float32 in [-1, 1] or None.
    """

    def _make(
        name: str, frames: np.ndarray, fps: float, audio: np.ndarray | None = None, sample_rate: int = 16000
    ):
        return write_av_file(tmp_path / name, frames, fps, audio, sample_rate)

    return _make


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small generated dataset (``SYNTHETIC``): ``clips/<id>.mp4``, ``train.csv``, ``val.csv``,
    ``test.csv`` (``id,video,label``), ``classes.txt``, ``bad_clips.csv`` (``id,video,kind``) and
    ``metadata.jsonl``. 24 clips of 4 classes, 2.5 s at 25 fps, 64x64, 16 kHz; 6 bad clips, one of
    each kind in train (``video_only``, ``silent``, ``short``, ``truncated``, ``missing``), one
    more ``video_only`` in val. Returns the folder.
    """
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, workers=1, **SYNTHETIC)
    return root


@pytest.fixture(scope="session")
def synthetic_settings():
    """The arguments ``synthetic_root`` was generated with (a copy)."""
    return dict(SYNTHETIC)
