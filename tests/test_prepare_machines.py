"""Preparing shards on several machines (tools/prepare_data.py --num-machines/--machine-rank),
each machine simulated by its own process group on 127.0.0.1, all writing one folder or one
prefix of a real S3-compatible server (moto):

- two machines give the dataset of one machine, item for item, and list every bad file in their
  part reports and in the one merged report;
- a machine killed with SIGKILL mid-way (its whole process tree) and restarted writes only the
  shards it had not finished and, finishing last, merges;
- a machine that writes no sample exits non-zero.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import kill_process_tree, write_manifests
from test_engine_launch import DEMO, REPO
from test_shards import TINY, prepare_data

from avmae.data.shard_writer import REPORT_FILE, part_report_file
from avmae.data.shards import META_FILE, ShardStore
from avmae.data.storage import Location


def machine_args(out, rank: int, num_machines: int, root: Path, *extra) -> list[str]:
    """tools/prepare_data.py's arguments for machine ``rank`` of ``num_machines``."""
    return ["--config", DEMO, "--split", "train", "--out", str(out), "--num-machines", str(num_machines),
            "--machine-rank", str(rank), *map(str, extra), f"data.root={root}", *TINY]  # fmt: skip


def start(args: list[str], log: Path) -> subprocess.Popen:
    """One simulated machine: the tool in a process group of its own (killable as a whole)."""
    command = [sys.executable, str(REPO / "tools" / "prepare_data.py"), *args]
    return subprocess.Popen(command, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def one_machine(synthetic_root, tmp_path_factory) -> Path:
    """The train split prepared by one machine (one process), two clips per shard."""
    out = tmp_path_factory.mktemp("one") / "train"
    prepare_data("--config", DEMO, "--out", out, "--shard-size", 2, f"data.root={synthetic_root}", *TINY)
    return out


def assert_same_dataset(location: str, reference: Path, cache: Path, same_shards: bool = True) -> None:
    """Every sample, the records, the report and meta.json of ``location`` equal those of ``reference``."""
    ours, theirs = ShardStore(location, cache_dir=str(cache)), ShardStore(str(reference))
    assert ours.entries == theirs.entries and len(theirs.entries) > 10
    shard_keys = {"shard_size", "num_shards"}
    meta = {k: v for k, v in ours.meta.items() if same_shards or k not in shard_keys}
    assert meta == {k: v for k, v in theirs.meta.items() if same_shards or k not in shard_keys}
    for i in range(len(theirs.entries)):
        a, b = ours[i], theirs[i]
        assert a.keys() == b.keys() and a["id"] == theirs.entries[i]["id"]
        for key in a:
            same = np.array_equal(a[key], b[key]) if isinstance(a[key], np.ndarray) else a[key] == b[key]
            assert same, (i, key)
    assert Location(location).read(REPORT_FILE) == (reference / REPORT_FILE).read_bytes()


@pytest.mark.parametrize("store", ["folder", "s3"])
def test_two_machines_give_the_one_machine_dataset(one_machine, synthetic_root, tmp_path, request, store):
    if store == "s3":
        request.getfixturevalue("s3_server")  # the AWS_* variables reach the machines through the environment
    out = tmp_path / "two" / "train" if store == "folder" else "s3://avdata/two/train"
    machines = [start(machine_args(out, rank, 2, synthetic_root, "--shard-size", 2), tmp_path / f"m{rank}.log")
                for rank in (0, 1)]  # fmt: skip
    for rank, process in enumerate(machines):
        assert process.wait(timeout=300) == 0, (tmp_path / f"m{rank}.log").read_text()[-4000:]
    logs = [(tmp_path / f"m{rank}.log").read_text() for rank in (0, 1)]
    assert any("wrote" in log and "samples to" in log for log in logs), logs  # the last one merged
    assert_same_dataset(str(out), one_machine, tmp_path / "cache")

    # each part lists its own bad files; together they are the merged report
    report = Location(out).read(REPORT_FILE).decode().splitlines()
    parts = [Location(out).read(part_report_file(2, rank)).decode().splitlines() for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(report) and len(report) == 2
    with open(synthetic_root / "bad_clips.csv") as f:
        bad = {row["id"]: row["kind"] for row in csv.DictReader(f)}
    assert sorted(bad[line.split("\t")[1]] for line in report) == ["missing", "truncated"]


def test_killed_machine_restarts_without_redoing_its_finished_shards(one_machine, synthetic_root, tmp_path, capsys):
    out = tmp_path / "train"
    # machine 1 of 2, one clip per shard (its shards are the odd ones), two worker processes
    args = machine_args(out, 1, 2, synthetic_root, "--shard-size", 1, "--num-workers", 2)
    launcher = start(args, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while not list(out.glob("shard-*.json")) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = kill_process_tree(launcher.pid, str(out))  # asserts that no process of the machine is left
    launcher.wait(timeout=60)
    assert len(killed) >= 3, (tmp_path / "first.log").read_text()[-4000:]  # the tool and its two workers

    settings = json.loads((out / "settings.json").read_text())
    own = set(range(1, settings["num_shards"], 2))
    finished = {int(p.stem.split("-")[1]) for p in out.glob("shard-*.json")}
    assert finished and finished < own, (finished, own)  # killed mid-way
    kept = [p for s in finished for p in (out / f"shard-{s:05d}.json", out / f"chunk-0-{s}.bin") if p.exists()]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    assert len(kept) >= len(finished)

    # machine 0 finishes its part; the dataset is not complete while machine 1's part is not
    prepare_data(*machine_args(out, 0, 2, synthetic_root, "--shard-size", 1))
    assert not (out / META_FILE).exists()
    with pytest.raises(FileNotFoundError, match=f"{len(own - finished)} of {settings['num_shards']} shards are not finished"):
        prepare_data(*machine_args(out, 0, 1, synthetic_root, "--merge"))

    # machine 1 restarted: only its unfinished shards are written, and it merges
    capsys.readouterr()
    prepare_data(*args)
    part = json.loads(capsys.readouterr().out.splitlines()[0])
    assert part["num_written_now"] == len(own - finished) and part["num_shards"] == len(own)
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps
    assert not (out / ".staging").exists()
    assert_same_dataset(str(out), one_machine, tmp_path / "cache", same_shards=False)
    print(f"killed after {len(finished)} of its {len(own)} shards")


def test_a_machine_that_writes_no_sample_exits_nonzero(synthetic_root, tmp_path):
    """Machine 0 of 2 over a manifest of two bad files gets one of them: its part holds no
    sample (a wrong data.root on one machine, say), status 1 naming its part report."""
    with open(synthetic_root / "bad_clips.csv") as f:
        bad = {row["id"] for row in csv.DictReader(f) if row["kind"] in ("missing", "truncated")}
    with open(synthetic_root / "train.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["id"] in bad]
    assert len(rows) == 2
    manifest = write_manifests(synthetic_root, tmp_path, {"train": rows})
    out = tmp_path / "shards"
    with pytest.raises(SystemExit, match="no sample written from the 1 records of machine 0's part of train") as exit_:
        prepare_data("--config", DEMO, "--out", out, "--shard-size", 1, "--num-machines", 2, "--machine-rank", 0,
                     *manifest, *TINY)  # fmt: skip
    assert exit_.value.code not in (0, None) and part_report_file(2, 0) in str(exit_.value.code)
    assert (out / part_report_file(2, 0)).read_text().count("\n") == 1 and not (out / META_FILE).exists()


def test_the_writer_uses_only_litdata_public_api():
    """The shard writer touches no private member of anything (litdata's writer included: a minor
    release may rename those), and imports litdata's public names from public modules only."""
    import ast

    tree = ast.parse((REPO / "avmae" / "data" / "shard_writer.py").read_text())
    private = [(n.attr, n.lineno) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")]  # fmt: skip
    assert not private, private
    imports = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("litdata")
               for a in n.names]  # fmt: skip
    assert imports and all(not part.startswith("_") for module, name in imports for part in [*module.split("."), name])
