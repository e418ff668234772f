"""Shared fixtures: offline hub, and real mp4 files written with the synthetic generator."""

from __future__ import annotations

import os

import numpy as np
import pytest

from avmae.data.synthetic import write_av_file


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
    """Factory writing an mp4 into the test's tmp dir: ``make_clip(name, frames, fps, audio=None, sample_rate=16000) -> Path``.

    ``frames`` is ``(T, H, W, 3)`` uint8, ``audio`` ``(N,)`` float32 in [-1, 1] or None.
    """

    def _make(name: str, frames: np.ndarray, fps: float, audio: np.ndarray | None = None, sample_rate: int = 16000):
        return write_av_file(tmp_path / name, frames, fps, audio, sample_rate)

    return _make
