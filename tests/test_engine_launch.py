"""Pretraining under `accelerate launch` with 2 CPU processes, on real mp4 files, with the real model.

- DDP: the processes see disjoint samples, their parameters stay identical, checkpoints carry
  config.yaml and model.safetensors.
- A SIGTERM sent to the launcher midway saves a checkpoint; the same command resumes, and its loss
  curve equals the uninterrupted run's exactly (CPU arithmetic is deterministic here).
- Two machines simulated on 127.0.0.1 (two `accelerate launch --num_machines 2 --machine_rank 0/1`
  commands of one process each): the loss curve and the checkpoint of the 2-process run; every
  process of one machine killed midway, then both commands started again, resumes exactly.
- DeepSpeed ZeRO-2 over gloo, where DeepSpeed and transformers are installed.
- ZeRO-3 and FSDP2 (accelerate's): the loss of DDP's first 4 steps within 1e-4, sharded checkpoints,
  full weights in model.safetensors, and a run resumed from step 2 equal to the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import decodable_rows, write_manifests
from safetensors.torch import load_file

from avmae.config import load_config
from avmae.engine import read_scalars

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
STEPS = 8  # 2 processes x batch 2 over 16 clean clips: 4 steps per epoch, so the run crosses one
TINY = [
    "data.batch_size=2", "data.num_workers=1", "data.video.num_frames=4", "data.video.frame_rate=4.0",
    "data.video.resize=32", "data.video.size=32", "data.audio.seconds=1.28", "model.decoder_depth=1",
    "model.decoder_width=64", "train.base_lr=0.01", "train.warmup_epochs=0.5", "train.log_every=1",
    "train.checkpoint_every=2", "train.keep_checkpoints=2",
]  # fmt: skip

# Runs the engine exactly as tools/pretrain.py does, and records per process what it trained on
# ((epoch, index) of every item) and a digest of its parameters at the end.
RECORDING_SCRIPT = textwrap.dedent(
    """
    import hashlib, importlib, json, os, sys
    engine = importlib.import_module("avmae.engine.pretrain")  # the module; the package exports the function
    from avmae.config import load_config

    datasets, models, seen = [], [], []
    build_dataset, build_model, model_inputs = engine.build_dataset, engine.build_pretrain_model, engine._model_inputs

    def recording_dataset(*args, **kwargs):
        datasets.append(build_dataset(*args, **kwargs))
        return datasets[-1]

    def recording_model(cfg):
        models.append(build_model(cfg))
        return models[-1]

    def recording_inputs(batch):
        seen.extend([datasets[0].epoch, int(i)] for i in batch["index"])
        return model_inputs(batch)

    engine.build_dataset, engine.build_pretrain_model, engine._model_inputs = recording_dataset, recording_model, recording_inputs
    cfg = load_config(sys.argv[1], sys.argv[2:])
    final = engine.pretrain(cfg)
    params = dict(models[0].named_parameters())
    digest = hashlib.sha256(b"".join(params[n].detach().float().numpy().tobytes() for n in sorted(params)))
    record = {"seen": seen, "digest": digest.hexdigest(), "params": sorted(params), "final": str(final)}
    with open(os.path.join(cfg.train.output_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(accelerate_config: str, *args: str) -> list[str]:
    """`accelerate launch` of 2 CPU processes on a free port (other suites may run alongside)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / accelerate_config),
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *map(str, args),
    ]  # fmt: skip


def run(command: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    return read_scalars(run_dir, "train/loss")


@pytest.fixture(scope="module")
def clean_data(synthetic_root, tmp_path_factory) -> list[str]:
    """Overrides pointing at 16 decodable clips of the session dataset (its bad clips left out), so
    every item is the record the sampler chose and sharding can be checked by index."""
    rows = [r for split_rows in decodable_rows(synthetic_root).values() for r in split_rows]
    assert len(rows) >= 16, "the session dataset changed; pick another size here"
    return [*write_manifests(synthetic_root, tmp_path_factory.mktemp("clean"), {"train": rows[:16]}), *TINY]


@pytest.fixture(scope="module")
def ddp_run(clean_data, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run, recorded."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "recording_pretrain.py"
    script.write_text(RECORDING_SCRIPT)
    run(launch_command("cpu_2proc.yaml", script, DEMO, *clean_data, f"train.output_dir={out}", f"train.max_steps={STEPS}"))
    return out


def test_two_processes_shard_the_data_and_stay_identical(ddp_run):
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [[tuple(s) for s in r["seen"]] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == STEPS * 2  # batch 2, no accumulation
    for epoch in (0, 1):
        mine = [{i for e, i in s if e == epoch} for s in seen]
        assert len(mine[0]) == len(mine[1]) == 8  # 4 steps x batch 2, no repeats
        assert not mine[0] & mine[1], f"epoch {epoch}: both processes trained on {mine[0] & mine[1]}"
    assert {i for e, i in seen[0] if e == 0} != {i for e, i in seen[0] if e == 1}  # reshuffled
    assert ranks[0]["digest"] == ranks[1]["digest"], "parameters differ across processes"

    checkpoints = sorted(p.name for p in (ddp_run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000006", "step_00000008"]  # keep_checkpoints=2
    final = ddp_run / "checkpoints" / "step_00000008"
    assert ranks[0]["final"] == str(final)
    assert {p.name for p in final.iterdir()} == {"state", "model.safetensors", "config.yaml", "trainer_state.json"}
    cfg = load_config(final / "config.yaml")
    assert (cfg.model.size, cfg.data.video.size, cfg.train.max_steps) == ("micro", 32, STEPS)
    weights = load_file(final / "model.safetensors")
    assert not [k for k in weights if k.startswith(("module.", "_orig_mod."))]
    digest = hashlib.sha256(b"".join(weights[name].float().numpy().tobytes() for name in ranks[0]["params"]))
    assert digest.hexdigest() == ranks[0]["digest"], "model.safetensors is not the trained model"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == STEPS

    curve = losses(ddp_run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert all(v == v for v in curve.values())


def test_sigterm_to_the_launcher_saves_and_the_same_command_resumes_exactly(ddp_run, clean_data, tmp_path):
    command = launch_command("cpu_2proc.yaml", REPO / "tools" / "pretrain.py", "--config", DEMO, *clean_data,
                             f"train.output_dir={tmp_path}", f"train.max_steps={STEPS}")  # fmt: skip
    log = open(tmp_path / "first.log", "w")
    launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    first_checkpoint = tmp_path / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 240
    while not first_checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_checkpoint.exists(), (tmp_path / "first.log").read_text()[-4000:]
    launcher.send_signal(signal.SIGTERM)  # as a cluster scheduler would
    assert launcher.wait(timeout=120) != 0
    output = (tmp_path / "first.log").read_text()
    assert "received SIGTERM: finishing this step and saving a checkpoint" in output

    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*"))
    stopped_at = saved[-1]
    assert 2 < stopped_at < STEPS, f"stopped at step {stopped_at}; the signal was sent after step 2\n{output[-3000:]}"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))

    resumed = run(command)
    assert f"resuming from {tmp_path / 'checkpoints' / f'step_{stopped_at:08d}'}" in resumed.stdout + resumed.stderr
    assert "next: python tools/export.py" in resumed.stdout
    first, whole = losses(tmp_path), losses(ddp_run)
    assert sorted(first) == list(range(1, STEPS + 1))
    assert first == whole, "the interrupted and resumed run diverged from the uninterrupted one"


def machine_command(machine_rank: int, port: int, *args: str) -> list[str]:
    """One machine's `accelerate launch` of a 2-machine run with one process per machine, both on
    127.0.0.1 (configs/accelerate/multi_node.yaml; static rendezvous at rank 0's port)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "multi_node.yaml"),
        "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine_rank),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
        "--dynamo_backend", "no", *map(str, args),
    ]  # fmt: skip


# tools/pretrain.py, except that the process of rank 1 stops in the forward pass of step
# PAUSE_STEP, once: it writes PAUSE_FILE and waits there to be killed, while rank 0 waits for it in
# that step's gradient all-reduce. The same command run again (the file exists) trains through.
PAUSING_SCRIPT = textwrap.dedent(
    """
    import importlib, os, runpy, sys, time
    from pathlib import Path
    engine = importlib.import_module("avmae.engine.pretrain")
    model_inputs, calls, pause = engine._model_inputs, [], Path(os.environ["PAUSE_FILE"])

    def pausing_inputs(batch):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == int(os.environ["PAUSE_STEP"]) and not pause.exists():
            pause.write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        return model_inputs(batch)

    engine._model_inputs = pausing_inputs
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def start_machines(args: list, out: Path, name: str, env: dict) -> list[subprocess.Popen]:
    """Both machines' launchers, each in a session of its own (its process tree, as on a host)."""
    port = free_port()
    machines = []
    for rank in (0, 1):
        log = open(out / f"{name}_machine{rank}.log", "w")
        machines.append(subprocess.Popen(machine_command(rank, port, *args), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO, env=env, start_new_session=True))  # fmt: skip
    return machines


def wait_or_kill(machines: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes of the launchers (None for one still running after ``timeout``, then killed)."""
    deadline = time.monotonic() + timeout
    while any(m.poll() is None for m in machines) and time.monotonic() < deadline:
        time.sleep(0.2)
    codes = [m.poll() for m in machines]
    for m in machines:
        if m.poll() is None:
            os.killpg(m.pid, signal.SIGKILL)
            m.wait()
    return codes


def test_two_machines_train_like_two_processes_and_resume_after_losing_one(ddp_run, clean_data, tmp_path):
    import psutil

    out, pause_step = tmp_path / "run", 5  # checkpoints at steps 2 and 4 are written before the pause
    out.mkdir()
    (tmp_path / "pausing_pretrain.py").write_text(PAUSING_SCRIPT)
    env = dict(os.environ, PAUSE_FILE=str(tmp_path / "paused"), PAUSE_STEP=str(pause_step))
    args = [tmp_path / "pausing_pretrain.py", REPO / "tools" / "pretrain.py", "--config", DEMO, *clean_data,
            f"train.output_dir={out}", f"train.max_steps={STEPS}"]  # fmt: skip
    logs = lambda name: "\n".join((tmp_path / f"{name}_machine{r}.log").read_text()[-3000:] for r in (0, 1))  # noqa: E731
    machines = start_machines(args, tmp_path, "first", env)
    deadline = time.monotonic() + 240
    while not (tmp_path / "paused").exists() and all(m.poll() is None for m in machines) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not (tmp_path / "paused").exists():
        wait_or_kill(machines, 0)
        pytest.fail(f"rank 1 never reached step {pause_step}:\n{logs('first')}")

    # machine 1 goes away mid-step: SIGKILL to every process of its tree (torchrun starts its
    # workers in sessions of their own, so the launcher's process group is not enough), no handler runs
    lost = machines[1]
    tree = [psutil.Process(lost.pid), *psutil.Process(lost.pid).children(recursive=True)]
    assert len(tree) >= 3, f"expected the launcher, the training process and its loader worker: {tree}"
    for process in tree:
        process.send_signal(signal.SIGKILL)
    lost.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left running: {alive}"
    # the surviving machine's process finds its peer gone in the all-reduce and stops on its own
    assert wait_or_kill(machines[:1], 180) not in ([0], [None]), f"machine 0 went on alone:\n{logs('first')}"
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved == ["step_00000002", "step_00000004"], saved
    first, single = losses(out), losses(ddp_run)
    assert sorted(first) == list(range(1, pause_step)), first
    assert {s: single[s] for s in first} == first, "two machines trained unlike two processes on one"

    # both commands again: the run continues from the newest complete checkpoint
    machines = start_machines(args, tmp_path, "again", env)
    assert wait_or_kill(machines, 300) == [0, 0], logs("again")
    assert f"resuming from {out / 'checkpoints' / 'step_00000004'}" in logs("again")
    assert losses(out) == single, "the resumed two-machine run diverged from the 2-process run"
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a, b = load_file(out / final), load_file(ddp_run / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "checkpoint differs from the 2-process run's"


def _deepspeed_skip_reason() -> str | None:
    for module in ("deepspeed", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e .[deepspeed])"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler: DeepSpeed compiles its CPU communication op on first use"
    return None


def test_deepspeed_zero2_on_cpu(clean_data, tmp_path, request):
    reason = _deepspeed_skip_reason()
    if reason:
        print(f"skipping DeepSpeed ZeRO-2: {reason}")
        pytest.skip(reason)
    # DeepSpeed compiles its CPU communication op once; pytest's cache keeps it between runs.
    cache = getattr(request.config, "cache", None)
    extensions = cache.mkdir("torch_extensions") if cache is not None else tmp_path / "torch_extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions))
    script = tmp_path / "recording_pretrain.py"
    script.write_text(RECORDING_SCRIPT)
    # bf16, as real runs use it: DeepSpeed then holds bf16 weights and the engine casts the inputs
    overrides = [*clean_data, f"train.output_dir={tmp_path}", "train.clip_grad=1.0", "train.grad_accum=2",
                 "train.mixed_precision=bf16"]  # fmt: skip
    run(launch_command("zero2.yaml", script, DEMO, *overrides, "train.max_steps=2"), env=env, timeout=400)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "parameters differ across DeepSpeed processes"
    final = tmp_path / "checkpoints" / "step_00000002"
    state = final / "state"
    assert (state / "pytorch_model").is_dir(), sorted(p.name for p in state.iterdir())  # DeepSpeed's own layout
    assert len(list((state / "pytorch_model").glob("*optim_states.pt"))) == 2  # one shard per process
    weights = load_file(final / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())

    resumed = run(launch_command("zero2.yaml", script, DEMO, *overrides, "train.max_steps=3"), env=env)
    assert f"resuming from {final}" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())["step"] == 3
    assert sorted(losses(tmp_path)) == [1, 2, 3]


# ---- sharded data parallelism: ZeRO-3 and FSDP2 against DDP ---------------------------------------

SHARDED_STEPS = 4  # the DDP run's first 4 steps are the yardstick; the checkpoint at 2 is resumed from

# accelerate selects FSDP only for GPU-type process groups (and the engine refuses to run the FSDP
# launcher without one, rather than let the processes train alone). To run accelerate's own FSDP2
# path on the CPU, this launched script presents the gloo CPU group to accelerate as a GPU-type one
# on the "cpu" device; everything after that (fully_shard, sharded checkpoints, the engine) is real.
FSDP_ON_CPU_SCRIPT = textwrap.dedent(
    """
    import os, runpy, sys
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: ("gloo", DistributedType.MULTI_GPU)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def _sharded_run(launcher: str, clean_data, out: Path, ddp_run: Path, state_entry: str, env: dict | None = None):
    """Two launches: 4 steps from scratch (checkpoints at 2 and 4), then, in another folder, the
    same command resumed from the step-2 checkpoint. Returns both loss curves.

    Each process holds only its shard of the parameters, so there is no per-process digest to
    compare (as the DDP test does): the checkpoint's sharded layout (``state_entry``) shows the
    sharding, and model.safetensors must hold the gathered full weights, shaped as DDP's."""
    whole = out / "whole"
    common = [*clean_data, f"train.max_steps={SHARDED_STEPS}", "train.keep_checkpoints=0"]
    command = [REPO / "tools" / "pretrain.py", "--config", DEMO, *common]
    if launcher == "fsdp.yaml":
        (out / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU_SCRIPT)
        command = [out / "fsdp_on_cpu.py", *command]
    run(launch_command(launcher, *command, f"train.output_dir={whole}"), env=env, timeout=400)
    state = whole / "checkpoints" / "step_00000002" / "state"
    assert (state / state_entry).exists(), f"{launcher} did not shard: {sorted(p.name for p in state.iterdir())}"
    weights = load_file(whole / "checkpoints" / f"step_{SHARDED_STEPS:08d}" / "model.safetensors")
    ddp_weights = load_file(ddp_run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert {n: w.shape for n, w in weights.items()} == {n: w.shape for n, w in ddp_weights.items()}
    assert all(torch.isfinite(w).all() for w in weights.values())
    resumed = out / "resumed"
    result = run(launch_command(launcher, *command, f"train.output_dir={resumed}",
                                f"train.resume={whole / 'checkpoints' / 'step_00000002'}"), env=env, timeout=400)  # fmt: skip
    assert "resuming from" in result.stdout + result.stderr
    return losses(whole), losses(resumed)


def _check_against_ddp(name: str, whole: dict, resumed: dict, ddp_run: Path) -> None:
    ddp = losses(ddp_run)
    assert sorted(whole) == list(range(1, SHARDED_STEPS + 1))
    for step in whole:  # same data, same masks, same updates: the sharding changes only rounding
        assert whole[step] == pytest.approx(ddp[step], rel=1e-4), f"{name} step {step}: {whole[step]} vs DDP {ddp[step]}"
    assert sorted(resumed) == [3, 4]
    assert {s: whole[s] for s in (3, 4)} == resumed, f"{name}: the resumed run diverged from the uninterrupted one"


def test_fsdp2_matches_ddp_and_resumes_exactly(ddp_run, clean_data, tmp_path):
    whole, resumed = _sharded_run("fsdp.yaml", clean_data, tmp_path, ddp_run, "pytorch_model_fsdp_0")  # sharded layout
    _check_against_ddp("FSDP2", whole, resumed, ddp_run)


def test_deepspeed_zero3_matches_ddp_and_resumes_exactly(ddp_run, clean_data, tmp_path, request):
    reason = _deepspeed_skip_reason()
    if reason:
        pytest.skip(reason)
    cache = getattr(request.config, "cache", None)
    extensions = cache.mkdir("torch_extensions") if cache is not None else tmp_path / "torch_extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions))
    whole, resumed = _sharded_run("zero3.yaml", clean_data, tmp_path, ddp_run,
                                  "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt", env)
    _check_against_ddp("ZeRO-3", whole, resumed, ddp_run)
