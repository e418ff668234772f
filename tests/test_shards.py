"""Prepared shards (avmae.data.shards, tools/prepare_data.py) on real synthetic mp4s.

- The tools from a fresh clone: make_synthetic (with bad clips) -> prepare_data (the bad files
  reported, the rest written; a rerun keeps finished shards and rewrites a broken one) ->
  2-process pretraining on the shards, killed with SIGKILL and resumed by the same command, ends
  with the weights of the uninterrupted run (transforms in the workers, and on the device).
- Same meaning on both sources: items read from the shards equal the items read from the mp4s
  (same clip sampling, augmentation draws, normalisation) within the JPEG tolerance.
- An S3-compatible server (moto) on 127.0.0.1: the shards uploaded with boto3 read back through
  the same dataset code equal the local ones.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import kill_process_tree, write_manifests
from test_engine_launch import DEMO, REPO, launch_command, losses, run

from avmae.config import load_config
from avmae.data import Manifest, balanced_weights, build_dataset, read_manifest
from avmae.data.device import normalize_inputs
from avmae.data.shard_writer import REPORT_FILE
from avmae.engine import read_scalars

# The session dataset (conftest.SYNTHETIC, written by the function tools/make_synthetic.py calls)
# has one bad clip of each kind in train: prepare_data reports "missing" and "truncated"; it stores
# "video_only" and "short", which fail at training time under the same policy and counters as
# on the mp4 path.
STEPS = 6
TINY = [
    "data.batch_size=2", "data.num_workers=1", "data.video.num_frames=4", "data.video.frame_rate=4.0",
    "data.video.resize=32", "data.video.size=32", "data.audio.seconds=1.28", "model.decoder_depth=1",
    "model.decoder_width=64", "train.base_lr=0.01", "train.warmup_epochs=0.5", "train.log_every=1",
    "train.checkpoint_every=2", "train.keep_checkpoints=2", "data.max_decode_failures=0.5",
]  # fmt: skip


def prepare_data(*args) -> dict:
    """tools/prepare_data.py's main, in this process (a subprocess would only add start-up time)."""
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory) -> dict:
    """The train shards of the session dataset, written by tools/prepare_data.py (2 processes) for
    the TINY geometry."""
    shards = tmp_path_factory.mktemp("shards")
    source = [f"data.root={synthetic_root}", *TINY]
    prepare_data("--config", DEMO, "--split", "train", "--out", shards / "train", "--shard-size", 4,
                 "--num-workers", 2, *source)  # fmt: skip
    return {"root": synthetic_root, "shards": shards, "source": source,
            "train": ["data.format=shards", f"data.root={shards}", "data.train=train", *TINY]}  # fmt: skip


def test_prepare_reports_bad_files_skips_them_and_resumes(prepared, capsys):
    out = prepared["shards"] / "train"
    with open(prepared["root"] / "bad_clips.csv") as f:
        bad = {row["id"]: row["kind"] for row in csv.DictReader(f)}
    with open(prepared["root"] / "train.csv") as f:
        train_ids = [row["id"] for row in csv.DictReader(f)]
    report = [line.split("\t") for line in (out / REPORT_FILE).read_text().splitlines()]
    reported = {fields[1]: fields[0] for fields in report}
    expected = {i: {"missing": "missing", "truncated": "undecodable"}[bad[i]]
                for i in train_ids if bad.get(i) in ("missing", "truncated")}  # fmt: skip
    assert reported == expected and len(expected) == 2, (report, bad)
    assert all(fields[2].endswith(".mp4") for fields in report)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == len(train_ids) - 2 and meta["num_undecodable"] == 1 and meta["num_missing"] == 1

    # a rerun keeps the finished shards; a shard whose marker is gone is written again
    chunks = sorted(out.glob("chunk-*.bin"))
    stamps = {p: p.stat().st_mtime_ns for p in chunks}
    (out / "shard-00001.json").unlink()
    (out / "chunk-0-1.bin").write_bytes(b"half-written")
    prepare_data("--config", DEMO, "--out", out, "--shard-size", 4, *prepared["source"])
    assert "1 missing and 1 undecodable files listed in" in capsys.readouterr().out
    assert sorted(out.glob("chunk-*.bin")) == chunks
    changed = {p.name for p in chunks if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {"chunk-0-1.bin"}
    assert json.loads((out / "meta.json").read_text())["num_samples"] == meta["num_samples"]
    dataset = build_dataset(load_config(DEMO, prepared["train"]), "train", train=True)
    assert [dataset.store[i]["id"] for i in range(len(dataset))] == [r.id for r in dataset.records]

    # AudioSet-style balanced sampling draws from the shard records' targets, which are the manifest's
    source = read_manifest(load_config(DEMO, prepared["source"]).data, "train")
    kept = [r for r in source.records if r.id in {d.id for d in dataset.records}]
    assert [r.targets for r in kept] == [r.targets for r in dataset.records]
    assert torch.equal(balanced_weights(Manifest(dataset.records, dataset.classes)), balanced_weights(Manifest(kept, source.classes)))


def test_prepare_exits_non_zero_when_the_work_was_not_done(prepared, tmp_path, capsys):
    out = prepared["shards"] / "train"
    # the session split has 2 failed files (one missing, one truncated): a rerun (finished shards kept)
    # allowed 1 writes and reports as before, then exits with status 1
    for limit in ("1", "10%"):
        with pytest.raises(SystemExit, match=r"2 of \d+ files failed, more than --max-failed " + limit) as err:
            prepare_data("--config", DEMO, "--out", out, "--shard-size", 4, "--max-failed", limit, *prepared["source"])
        assert err.value.code != 0
    assert prepare_data("--config", DEMO, "--out", out, "--shard-size", 4, "--max-failed", "2", *prepared["source"])
    assert json.loads((out / "meta.json").read_text())["num_samples"] > 0

    # a manifest of missing files only: nothing written, status 1 naming the report
    rows = [{"id": f"gone{i}", "video": f"gone{i}.mp4", "label": 0} for i in range(2)]
    manifests = write_manifests(tmp_path, tmp_path, {"train": rows})
    (tmp_path / "classes.txt").write_text("a\n")
    with pytest.raises(SystemExit, match="no sample written from the 2 records of train") as err:
        prepare_data("--config", DEMO, "--out", tmp_path / "shards", *manifests, *TINY)
    assert err.value.code != 0 and str(tmp_path / "shards" / REPORT_FILE) in str(err.value.code)


def _pairs(overrides: list[str], root: Path, tmp_path: Path):
    """Shards of the session dataset for ``overrides``, and an mp4 dataset over the same records
    in the same order (the undecodable clip left out of its manifest), so item ``i`` of both has
    the same seed."""
    shards = tmp_path / "shards"
    prepare_data("--config", DEMO, "--out", shards / "train", "--shard-size", 8, f"data.root={root}", *overrides)
    stored = build_dataset(load_config(DEMO, ["data.format=shards", f"data.root={shards}", "data.train=train",
                                              *overrides]), "train", train=True)  # fmt: skip
    with open(root / "train.csv") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    manifest = write_manifests(root, tmp_path, {"train": [rows[r.id] for r in stored.records]})
    mp4 = build_dataset(load_config(DEMO, [*manifest, f"train.output_dir={tmp_path}", *overrides]), "train", train=True)
    assert [r.id for r in mp4.records] == [r.id for r in stored.records]
    return mp4, stored


def _inputs(item: dict, overrides: list[str]) -> dict:
    """An item's video and audio as the model sees them: the uint8 frames normalised by the
    config's data.video (on the device in training, ``avmae.data.device``)."""
    return normalize_inputs({"video": item["video"], "audio": item["audio"]}, load_config(DEMO, overrides).data.video)


@pytest.mark.parametrize("augmented", [False, True], ids=["augment_off", "augment_on"])
def test_shard_items_mean_what_mp4_items_mean(prepared, tmp_path, augmented):
    """Frames kept at the source rate (25 frames/s sampled) and at the source size: the two sources
    then differ only by JPEG and 24-bit audio, and every random draw (start, speed, crop, flip,
    colour, blur, ...) is the same, so augmented items agree too."""
    overrides = ["data.video.num_frames=4", "data.video.frame_rate=25", "data.audio.seconds=1.28",
                 f"augment.enabled={augmented}", "data.audio.no_audio=silence"]  # fmt: skip
    mp4, stored = _pairs(overrides, prepared["root"], tmp_path)
    assert stored.store.meta["short_side"] == 64
    errors = []
    for index in range(0, len(stored), 2):
        a, b = stored[index], mp4[index]
        assert a["id"] == b["id"] and a["failures"] == b["failures"]
        for key, dtype in (("video", torch.uint8), ("audio", torch.float32)):
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype == dtype
        assert torch.equal(a["targets"]["label"], b["targets"]["label"]) and a["no_audio"] == b["no_audio"]
        a, b = _inputs(a, overrides), _inputs(b, overrides)
        errors.append(((a["video"] - b["video"]).abs().mean().item(), (a["audio"] - b["audio"]).abs().mean().item()))
    video_error = max(e[0] for e in errors)
    audio_error = max(e[1] for e in errors)
    print(f"mean absolute differences (video, fbank) per item: {errors}")
    assert video_error < 0.08, errors  # JPEG quality 90 on noisy 64 px frames, in normalised units
    assert audio_error < 0.02, errors
    # the tolerance tells items apart: another clip, or the same clip of another epoch, is far off
    assert (_inputs(stored[0], overrides)["video"] - _inputs(mp4[1], overrides)["video"]).abs().mean() > 5 * video_error
    if augmented:
        stored.set_epoch(1)
        assert (_inputs(stored[0], overrides)["video"] - _inputs(mp4[0], overrides)["video"]).abs().mean() > 5 * video_error


def test_wrap_window_on_shards_equals_mp4(prepared, tmp_path):
    """audio.window=wrap reads the stored whole track: a 2.56 s window over 2.5 s files starts at
    each random clip start and loops, from the shards as from the mp4s."""
    window = ["data.audio.seconds=2.56", "data.audio.window=wrap", "data.audio.no_audio=silence"]
    stored = build_dataset(load_config(DEMO, [*prepared["train"], *window]), "train", train=True)
    with open(prepared["root"] / "train.csv") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    manifest = write_manifests(prepared["root"], tmp_path, {"train": [rows[r.id] for r in stored.records]})
    mp4 = build_dataset(load_config(DEMO, [*manifest, f"train.output_dir={tmp_path}", *TINY, *window]), "train", train=True)
    for index in range(4):
        a, b = stored[index]["audio"], mp4[index]["audio"]
        assert a.shape == b.shape == (1, 256, 128)
        assert (a - b).abs().mean() < 0.02, index
    # the tolerance tells windows apart: another record's window is far off
    assert (stored[0]["audio"] - mp4[1]["audio"]).abs().mean() > 0.1


def test_evaluation_views_in_order(prepared, tmp_path):
    """Multi-view evaluation on shards: every record's test_clips x test_crops views, in order,
    the same clips as from the mp4s."""
    overrides = ["data.video.num_frames=4", "data.video.frame_rate=25", "data.audio.seconds=1.28",
                 "data.test_clips=2", "data.test_crops=3", "data.audio.no_audio=silence"]  # fmt: skip
    out = tmp_path / "shards"
    prepare_data("--config", DEMO, "--split", "val", "--out", out / "val", f"data.root={prepared['root']}", *overrides)
    stored = build_dataset(load_config(DEMO, ["data.format=shards", f"data.root={out}", "data.val=val", *overrides]),
                           "val", train=False)  # fmt: skip
    mp4 = build_dataset(load_config(DEMO, [f"data.root={prepared['root']}", f"train.output_dir={tmp_path}", *overrides]),
                        "val", train=False)  # fmt: skip
    assert [r.id for r in stored.records] == [r.id for r in mp4.records] and len(stored) == 6 * len(stored.records)
    for item in (0, 1, 5, 7):
        a, b = stored[item], mp4[item]
        assert (a["index"], a["view"]) == (b["index"], b["view"]) == divmod(item, 6)
        a, b = _inputs(a, overrides), _inputs(b, overrides)
        assert (a["video"] - b["video"]).abs().mean() < 0.08 and (a["audio"] - b["audio"]).abs().mean() < 0.02


def test_object_store_reads_the_same_items(prepared, tmp_path, s3_server):
    import boto3

    client = boto3.client("s3")
    local = prepared["shards"] / "train"
    for path in local.iterdir():
        if path.is_file():
            client.upload_file(str(path), "avdata", f"synthetic/train/{path.name}")
    cfg = load_config(DEMO, [*prepared["train"], "data.root=s3://avdata/synthetic", f"data.shard_cache={tmp_path / 'cache'}"])
    remote = build_dataset(cfg, "train", train=True)
    reference = build_dataset(load_config(DEMO, prepared["train"]), "train", train=True)
    assert len(remote) == len(reference)
    for index in (0, len(remote) // 2, len(remote) - 1):
        a, b = remote[index], reference[index]
        assert a["id"] == b["id"] and torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    missing = load_config(DEMO, [*prepared["train"], "data.root=s3://avdata/elsewhere"])
    with pytest.raises(FileNotFoundError, match="s3://avdata/elsewhere/train/meta.json"):
        build_dataset(missing, "train", train=True)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server. It relays each request, or answers
    one whose method and path match the next planned fault with that fault: ``503`` (S3's
    SlowDown), ``403`` (InvalidAccessKeyId), ``reset`` (the connection closed with a TCP reset, no
    answer), ``slow`` (the answer held back ``slow_s`` seconds, past the client's read timeout).
    ``sent`` counts the body bytes relayed per object path."""

    def __init__(self, upstream_port: int, slow_s: float = 2.0):
        import collections
        import http.client
        import socket
        import struct
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.faults: list[tuple[str, str, str]] = []  # (method, path substring, fault), taken in order
        self.sent: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _error(self, status: int, code: str) -> None:
                body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>"
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.take(self.command, self.path)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("503", "403"):
                    return self._error(int(fault), {"503": "SlowDown", "403": "InvalidAccessKeyId"}[fault])
                if fault == "slow":
                    time.sleep(slow_s)
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    with proxy.lock:  # counted before the client can see the answer
                        proxy.sent[self.path.split("?")[0]] += len(data)
                    self.wfile.write(data)

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except OSError:  # the client gave up on a slow answer, or we reset the connection
                    self.close_connection = True

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            for i, (m, part, fault) in enumerate(self.faults):
                if m == method and part in path:
                    del self.faults[i]
                    return fault
        return None

    def chunk_bytes(self) -> int:
        return sum(n for path, n in self.sent.items() if "/chunk-" in path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_shards(prepared, s3_server, monkeypatch):
    """The prepared train shards in a bucket of a local S3 server (moto), read through a
    ``FaultProxy``: yields ``(proxy, boto3 client of the server, overrides naming the bucket)``."""
    import boto3

    endpoint = s3_server["AWS_ENDPOINT_URL"]
    client = boto3.client("s3", endpoint_url=endpoint)
    for path in (prepared["shards"] / "train").iterdir():
        if path.is_file():
            client.upload_file(str(path), "avdata", f"synthetic/train/{path.name}")
    proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    from avmae.data import object_store

    # short timeouts and backoff, so that a slow answer and the retries take a second, not minutes
    monkeypatch.setattr(object_store, "POLICY", object_store.RetryPolicy(attempts=4, base_delay_s=0.05,
                                                                          read_timeout_s=0.5, connect_timeout_s=2.0))  # fmt: skip
    try:
        yield proxy, client, [*prepared["train"], "data.root=s3://avdata/synthetic"]
    finally:
        proxy.close()


def _remote(overrides: list[str], cache: Path):
    return build_dataset(load_config(DEMO, [*overrides, f"data.shard_cache={cache}"]), "train", train=True)


def test_object_store_faults_are_retried_counted_and_logged(prepared, s3_shards, tmp_path):
    from avmae.data.object_store import ObjectStoreAccessError, ObjectStoreUnavailable
    from avmae.engine import pretrain

    proxy, client, overrides = s3_shards
    reference = build_dataset(load_config(DEMO, prepared["train"]), "train", train=True)
    # a 503 (SlowDown), a reset connection and an answer slower than the read timeout: retried
    proxy.faults = [("GET", "/chunk-", "503"), ("GET", "/chunk-", "reset"), ("GET", "/chunk-", "slow")]
    remote = _remote(overrides, tmp_path / "cache")
    item, expected = remote[5], reference[5]
    assert torch.equal(item["video"], expected["video"]) and torch.equal(item["audio"], expected["audio"])
    assert proxy.faults == [] and int(remote.store.retries) == 3

    # counted in the run's log: train/store_retries
    proxy.faults = [("GET", "/chunk-", "503"), ("GET", "/chunk-", "reset")]
    out = tmp_path / "run"
    pretrain(load_config(DEMO, [*overrides, f"data.shard_cache={tmp_path / 'cache2'}", "data.num_workers=0",
                                f"train.output_dir={out}", "train.max_steps=2"]))  # fmt: skip
    assert read_scalars(out, "train/store_retries") == {1: 2.0, 2: 2.0}

    # a missing object names its URL; refused credentials say so; a fault that persists is not "missing"
    remote = _remote(overrides, tmp_path / "cache3")
    chunk = remote.store._chunk_url(0)
    proxy.faults = [("GET", "/chunk-", "403")]
    with pytest.raises(ObjectStoreAccessError, match=f"{chunk}: the store refused access \\(InvalidAccessKeyId\\): check the credentials"):
        remote.store[0]
    proxy.faults = [("GET", "/chunk-", "503")] * 4
    with pytest.raises(ObjectStoreUnavailable, match=f"{chunk}: the store kept failing, 4 attempts \\(SlowDown"):
        remote.store[0]
    client.delete_object(Bucket="avdata", Key=chunk[len("s3://avdata/"):])
    with pytest.raises(FileNotFoundError, match=f"{chunk}: no such object in the store \\(NoSuchKey\\)"):
        remote.store[0]
    with pytest.raises(FileNotFoundError, match="s3://avdata/elsewhere/train/meta.json: no such object"):
        build_dataset(load_config(DEMO, [*prepared["train"], "data.root=s3://avdata/elsewhere"]), "train", train=True)


def test_one_random_sample_costs_its_own_bytes_not_its_chunk(prepared, s3_shards, tmp_path):
    """docs/data.md: a sample is read with ranged requests, without downloading its chunk. Counted
    at the server: the bytes of chunk objects sent for one sample are its two offsets (8 bytes) and
    its own bytes, read from the chunk's header here."""
    import random

    proxy, _, overrides = s3_shards
    remote = _remote(overrides, tmp_path / "cache")
    index = random.Random(0).randrange(len(remote.store.entries))
    chunk = remote.store._chunk_url(index)
    remote.store[index]
    data = (prepared["shards"] / "train" / chunk.rsplit("/", 1)[1]).read_bytes()
    ends = [0, *remote.store._chunks[0]]
    position = index - next(e for e in reversed(ends) if e <= index)  # within its chunk
    offsets = np.frombuffer(data[4 : 4 * (position + 3)], np.uint32)
    sample_bytes = int(offsets[position + 1] - offsets[position])
    assert proxy.chunk_bytes() == 8 + sample_bytes
    assert sample_bytes < len(data) / 2  # far from the chunk's size
    assert not any((tmp_path / "cache").rglob("chunk-*.bin"))  # nothing of the chunk stored locally


@pytest.mark.parametrize("device_transforms", [False, True], ids=["worker_transforms", "device_transforms"])
def test_sigkill_and_resume_on_shards_gives_the_uninterrupted_weights(prepared, tmp_path, device_transforms):
    def command(out: Path) -> list[str]:
        return launch_command("cpu_2proc.yaml", REPO / "tools" / "pretrain.py", "--config", DEMO, *prepared["train"],
                              f"train.output_dir={out}", f"train.max_steps={STEPS}",
                              f"data.device_transforms={device_transforms}")  # fmt: skip

    whole = tmp_path / "whole"
    run(command(whole))
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"

    killed = tmp_path / "killed"
    log = open(tmp_path / "first.log", "w")
    launcher = subprocess.Popen(command(killed), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    first_checkpoint = killed / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 240
    while not first_checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first_checkpoint.exists(), (tmp_path / "first.log").read_text()[-4000:]
    # every process (launcher, torch's agent, both workers in their own sessions, their loader
    # workers): no handler runs, the newest finished checkpoint is all there is
    killed_pids = kill_process_tree(launcher.pid, str(killed))
    assert len(killed_pids) >= 3  # the launcher and two training processes at least
    launcher.wait(timeout=60)
    assert not (killed / final).exists()

    resumed = run(command(killed))
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = load_file(whole / final), load_file(killed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(killed) == losses(whole)
    # the two stored bad clips (no audio track; too short) were met, counted and replaced
    skipped = read_scalars(whole, "train/skipped_clips")
    assert sum(skipped.values()) >= 2 and read_scalars(killed, "train/skipped_clips") == skipped


def test_benchmark_times_shards_against_mp4_in_one_run(tmp_path):
    from avmae.benchmark import clips_spec, measure_data_pipeline, write_benchmark_clips
    from avmae.benchmark.data_pipeline import measure_stored_forms

    clips = tmp_path / "clips"
    write_benchmark_clips(clips, clips_spec(num_clips=2, duration=2.5, fps=(25.0, 30.0), width=96, height=64))
    cfg = load_config(DEMO, ["data.batch_size=2"])
    record = measure_data_pipeline(cfg, clips, ("decord", "shards", "shards-device"), (1,), items=2, warmup=1, rounds=1)
    settings = {s["decoder"]: s for s in record["settings"]}
    assert set(settings) == {"decord", "shards", "shards-device"}
    device = settings["shards-device"]  # the worker decodes and crops; the rest is timed as the device's batch work
    assert device["clips"] == 2 and device["device_ms_per_clip"] > 0 and device["batch_clips"] == 2
    assert device["speedup"]["shards"] == pytest.approx(device["clips_per_cpu_s"] / settings["shards"]["clips_per_cpu_s"])
    assert device["stage_ms_per_clip"]["fbank"] == 0 < device["stage_ms_per_clip"]["augment"]
    shards = settings["shards"]
    assert shards["clips"] == 2 and shards["failures"] == 0 and shards["clips_per_cpu_s"] > 0
    assert shards["speedup"]["decord"] == pytest.approx(shards["clips_per_cpu_s"] / settings["decord"]["clips_per_cpu_s"])
    assert min(shards["stage_ms_per_clip"][k] for k in ("video_decode", "audio_decode", "fbank", "augment")) > 0
    prepare = record["prepare"]
    assert prepare["clips"] == 2 and prepare["clips_per_cpu_s"] > 0 and prepare["settings"]["short_side"] == 64
    forms = measure_stored_forms(cfg, clips, gops=(4,), clips=1, reads=2)
    assert set(forms["ms_per_clip_read"]) == {"jpeg", "h264_gop4"} and min(forms["bytes_per_video_second"].values()) > 0
