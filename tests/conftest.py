"""Shared fixtures: offline hub, and real mp4 files written with the synthetic generator."""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

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
def one_thread():
    """torch on one thread for the test, the caller's thread count put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons, and tests may set torch's thread count: every
    test starts from neither and leaves neither behind."""
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def decodable_rows(root: Path) -> dict[str, list[dict]]:
    """The manifest rows (``id,video,label``) of each split of a generated dataset, its bad clips
    left out (they would stop a short run at ``data.max_decode_failures``)."""
    with open(root / "bad_clips.csv") as f:
        bad = {row["id"] for row in csv.DictReader(f)}
    rows = {}
    for split in ("train", "val", "test"):
        with open(root / f"{split}.csv") as f:
            rows[split] = [r for r in csv.DictReader(f) if r["id"] not in bad]
    return rows


def write_manifests(root: Path, folder: Path, rows: dict[str, list[dict]]) -> list[str]:
    """Write ``rows`` of each split as a manifest in ``folder``; the overrides that point a config
    at them (``data.root`` = ``root``, ``data.<split>`` = the file)."""
    overrides = [f"data.root={root}"]
    for split, split_rows in rows.items():
        path = folder / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "video", "label"])
            writer.writeheader()
            writer.writerows(split_rows)
        overrides.append(f"data.{split}={path}")
    return overrides


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


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto's server mode) on a free port of 127.0.0.1 with an empty
    bucket ``avdata``. The ``AWS_*`` variables point boto3 at it, in this process and in the
    subprocesses a test starts (returned as a dict too)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket="avdata")
    try:
        yield env
    finally:
        server.stop()


def kill_process_tree(pid: int, marker: str) -> list[int]:
    """SIGKILL ``pid`` and every process below it, as a node failure does, and assert that no
    process whose command line contains ``marker`` (the run's output folder) is left.

    Killing the launcher's process group is not enough: torch's launcher starts each worker in a
    session of its own, so the workers would live on, finish the run and race the resumed one.
    Returns the pids killed."""
    import psutil  # accelerate's own dependency

    def doomed() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if marker in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    killed = []
    for _ in range(10):  # a process may start another while we kill: look again until none is left
        for proc in procs:
            try:
                proc.kill()
                killed.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        procs = doomed()
        if not procs:
            break
    left = [(p.pid, p.status()) for p in doomed()]
    assert not left, f"processes of the killed run still alive: {left}"
    assert len(set(killed)) >= 1
    return sorted(set(killed))
