"""Engine pieces in one process: lr scaling and schedule, no-decay groups, checkpoint atomicity and
keep-last-K, the NaN guard, SIGTERM-then-resume exactness, and the bad-clip limit.

A small stand-in model and in-memory dataset keep these fast; tests/test_engine_launch.py runs
the real model on real mp4 files under `accelerate launch`.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file
from torch import nn

from avmae.config import TrainConfig, load_config
from avmae.data import ClipRecord
from avmae.engine import NonFiniteLossError, TrainingInterrupted, pretrain, read_scalars
from avmae.engine.checkpoint import (
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from avmae.engine.optim import (
    build_optimizer, build_scheduler, effective_batch_size, scaled_lr, total_steps, warmup_steps,
)
from avmae.data import build_loader

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Clips(torch.utils.data.Dataset):
    """Deterministic tensors shaped like AVDataset items (tiny)."""

    def __init__(self, size: int = 24):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        return {
            "video": torch.randn(3, 2, 8, 8, generator=g),
            "audio": torch.randn(1, 16, 8, generator=g),
            "failures": 0,
            "index": index,
        }


class StandIn(nn.Module):
    """Regresses audio from video with a noisy hidden layer (so the global RNG matters), and has
    the kinds of parameters the optimiser groups: a norm, biases, and a listed embedding."""

    def __init__(self, nan_at: int = 0, signal_at: int = 0, signum: int = signal.SIGTERM):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.modality_embed = nn.Parameter(torch.zeros(1, 8))
        self.nan_at, self.signal_at, self.signum, self.calls = nan_at, signal_at, signum, 0

    def no_weight_decay(self) -> set[str]:
        return {"modality_embed"}

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> dict:
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)
        x = video.flatten(2).mean(1)[:, :8] + self.modality_embed
        x = self.norm(self.proj(x + 0.1 * torch.randn_like(x)))
        loss = (x - audio[:, 0, 0]).pow(2).mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "logs": {"mae_audio": loss.detach()}}


def run_config(output_dir, *overrides):
    return load_config(
        None,
        [
            f"train.output_dir={output_dir}",
            "data.batch_size=4",
            "data.num_workers=0",
            "train.log_every=1",
            "train.checkpoint_every=100",
            *overrides,
        ],
    )


def mae_lr(step: int, peak: float, minimum: float, num_steps: int, num_warmup: int) -> float:
    """MAE's `adjust_learning_rate` at iteration `step` (0-based), written out independently."""
    if step < num_warmup:
        return peak * step / num_warmup
    progress = (step - num_warmup) / (num_steps - num_warmup)
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- optimiser and schedule ---------------------------------------------------------------------


def test_lr_scales_with_the_effective_batch():
    train = TrainConfig(base_lr=1.5e-4)
    assert effective_batch_size(64, 8, 1) == 512
    assert scaled_lr(train, 512) == pytest.approx(3e-4)
    assert scaled_lr(train, effective_batch_size(16, 2, 4)) == pytest.approx(1.5e-4 * 128 / 256)
    assert effective_batch_size(16, 2, 4, clips_per_video=3) == 384  # every clip of an item counts


def test_schedule_is_per_iteration_warmup_then_cosine():
    model = StandIn()
    train = TrainConfig(min_lr=1e-6)
    optimizer = build_optimizer(model, train, lr=1e-3)
    scheduler = build_scheduler(optimizer, train, num_steps=100, num_warmup=10)
    seen = []
    for step in range(100):
        scheduler.step_update(step)
        seen.append(optimizer.param_groups[0]["lr"])
        assert all(g["lr"] == seen[-1] for g in optimizer.param_groups)
    expected = [mae_lr(s, 1e-3, 1e-6, 100, 10) for s in range(100)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert seen[0] == 0.0 and seen[10] == pytest.approx(1e-3) and max(seen) == pytest.approx(1e-3)


def test_no_weight_decay_on_norms_biases_and_listed_embeddings():
    model = StandIn()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05, betas=(0.9, 0.95)), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert decay[0.05] == ["proj.weight"]
    assert decay[0.0] == ["modality_embed", "norm.bias", "norm.weight", "proj.bias"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


# ---- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = StandIn()
    accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-3))  # its state is saved too
    model = accelerator.prepare(model)
    cfg = run_config(tmp_path)
    root = tmp_path / "checkpoints"

    for step in (1, 2, 3):
        save_checkpoint(accelerator, model, cfg, TrainerState(step=step, epoch=0, batch_in_epoch=step), root, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    last = latest_checkpoint(root)
    assert sorted(p.name for p in last.iterdir()) == ["config.yaml", "model.safetensors", "state", "trainer_state.json"]
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 3
    weights = load_file(last / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert load_config(last / "config.yaml").train.output_dir == str(tmp_path)

    # a save that dies half-way leaves only a temporary directory, which resume ignores
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("avmae.engine.checkpoint.write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, model, cfg, TrainerState(step=4), root, keep=2)
    assert (root / ".tmp_step_00000004").is_dir()
    assert latest_checkpoint(root).name == "step_00000003"
    assert resolve_resume("auto", root).name == "step_00000003"
    monkeypatch.undo()

    save_checkpoint(accelerator, model, cfg, TrainerState(step=5), root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000005"]


def test_resume_none_refuses_to_mix_with_existing_checkpoints(tmp_path):
    (tmp_path / "step_00000007").mkdir()
    assert resolve_resume("auto", tmp_path).name == "step_00000007"
    with pytest.raises(FileExistsError, match="resume=auto"):
        resolve_resume("none", tmp_path)
    with pytest.raises(FileNotFoundError, match="trainer_state.json|state"):
        resolve_resume(str(tmp_path / "step_00000007"), tmp_path)


# ---- faults and resume ---------------------------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_writes_no_poisoned_checkpoint(tmp_path):
    cfg = run_config(tmp_path, "train.max_steps=8", "train.checkpoint_every=2", "train.log_every=100")
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        pretrain(cfg, model=StandIn(nan_at=3), dataset=Clips())
    assert err.value.step == 3
    assert "step_00000002" in str(err.value)  # points at the last good checkpoint
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    weights = load_file(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("grad_accum, signum", [(1, signal.SIGTERM), (2, signal.SIGINT)])
def test_a_signal_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, grad_accum, signum):
    # 24 clips / batch 4 = 6 micro-batches per epoch: the run crosses epochs, the stop is mid-epoch
    steps = 9 if grad_accum == 1 else 5
    overrides = [f"train.max_steps={steps}", f"train.grad_accum={grad_accum}", "train.warmup_epochs=0.5",
                 "train.base_lr=0.1", "data.num_workers=1"]  # fmt: skip

    torch.manual_seed(0)
    pretrain(run_config(tmp_path / "whole", *overrides), model=StandIn(), dataset=Clips())

    handler_before = signal.getsignal(signum)
    torch.manual_seed(0)
    stop_at = 4 * grad_accum + 1  # the signal arrives during the 5th update
    with pytest.raises(TrainingInterrupted) as stopped:
        pretrain(run_config(tmp_path / "split", *overrides), model=StandIn(signal_at=stop_at, signum=signum), dataset=Clips())
    assert stopped.value.signum == signum
    assert stopped.value.checkpoint.name == "step_00000005"  # the step in flight was finished
    saved = json.loads((stopped.value.checkpoint / "trainer_state.json").read_text())
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (5, *divmod(5 * grad_accum, 6))
    assert signal.getsignal(signum) is handler_before  # handlers restored

    torch.manual_seed(1)  # resume must not depend on the fresh process's RNG
    final = pretrain(run_config(tmp_path / "split", *overrides), model=StandIn(), dataset=Clips())
    assert final.name == f"step_{steps:08d}"

    whole, split = read_scalars(tmp_path / "whole", "train/loss"), read_scalars(tmp_path / "split", "train/loss")
    assert sorted(whole) == list(range(1, steps + 1))
    assert split == whole  # bit-identical on CPU
    a = load_file(tmp_path / "whole" / "checkpoints" / final.name / "model.safetensors")
    b = load_file(final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the logged lr is the scaled, warmed-up cosine schedule of the updates actually made
    peak = 0.1 * 4 * grad_accum / 256
    warmup = round(0.5 * (6 // grad_accum))
    lrs = read_scalars(tmp_path / "whole", "train/lr")
    assert [lrs[s] for s in sorted(lrs)] == pytest.approx([mae_lr(s - 1, peak, 0.0, steps, warmup) for s in sorted(lrs)])


def test_too_many_bad_clips_stop_the_run_with_the_reason(tmp_path, synthetic_root):
    # the synthetic train split holds four undecodable clips out of fifteen present ones
    cfg = load_config(
        CONFIGS / "pretrain" / "demo.yaml",
        [f"data.root={synthetic_root}", f"train.output_dir={tmp_path}", "data.batch_size=4",
         "data.num_workers=1", "train.max_steps=4", "data.max_decode_failures=0.05"],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="max_decode_failures=0.05"):
        pretrain(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_several_clips_per_video_train_on_real_files(tmp_path, synthetic_root, capsys):
    cfg = load_config(
        CONFIGS / "pretrain" / "demo.yaml",
        [f"data.root={synthetic_root}", f"train.output_dir={tmp_path}", "data.batch_size=2", "data.clips_per_video=3",
         "data.num_workers=0", "train.max_steps=2", "train.log_every=1", "data.max_decode_failures=1.0"],
    )  # fmt: skip
    torch.set_num_threads(1)  # the run takes its own count on the CPU and gives this one back
    checkpoint = pretrain(cfg)
    assert torch.get_num_threads() == 1
    assert checkpoint.is_dir() and len(read_scalars(tmp_path, "train/loss")) == 2
    assert "6 clips per step" in capsys.readouterr().out  # 2 items x 3 clips


def test_bf16_mixed_precision_trains(tmp_path):
    cfg = run_config(tmp_path, "train.max_steps=3", "train.mixed_precision=bf16", "train.clip_grad=1.0")
    pretrain(cfg, model=StandIn(), dataset=Clips())
    assert len(read_scalars(tmp_path, "train/loss")) == 3
    assert all(math.isfinite(v) for v in read_scalars(tmp_path, "train/loss").values())


class Labelled(Clips):
    """``Clips`` with records and classes, as balanced sampling needs: 18 common, 6 rare."""

    classes, multi_label = {"label": ["common", "rare"]}, False

    def __init__(self):
        super().__init__(24)
        self.records = [ClipRecord(id=str(i), video=None, targets={"label": 0 if i < 18 else 1}) for i in range(24)]


def test_balanced_sampling_follows_the_epoch_through_the_prepared_loader(tmp_path):
    cfg = run_config(tmp_path, "data.balanced_sampling=true")
    loader = Accelerator(cpu=True).prepare(build_loader(cfg, Labelled(), train=True))

    def epoch_indices(epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [int(i) for batch in loader for i in batch["index"]]

    first = epoch_indices(0)
    assert first == epoch_indices(0) and first != epoch_indices(1)
    # the 6 rare clips weigh as much as the 18 common ones together
    rare = sum(i >= 18 for e in range(6) for i in epoch_indices(e)) / (6 * len(first))
    assert 0.3 < rare < 0.7


def test_balanced_epoch_size_sets_the_steps_per_epoch_and_the_warmup(tmp_path):
    """scenic ``train_lib/train_utils.py`` ``get_num_training_steps``: steps_per_epoch = training
    examples // batch; AV-MAE's finetuning configs warm up for 2.5 x steps_per_epoch
    (projects/av_mae/configs/audioset/finetune.py). An epoch of 33 balanced draws at batch 4."""
    epoch_size, batch, epochs, warmup_epochs = 33, 4, 2, 1.5
    steps_per_epoch = epoch_size // batch  # 8, whatever the 24 records
    num_steps, num_warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch  # 16, 12
    cfg = run_config(
        tmp_path, "data.balanced_sampling=true", f"data.balanced_epoch_size={epoch_size}", f"data.batch_size={batch}",
        f"train.epochs={epochs}", f"train.warmup_epochs={warmup_epochs}", "train.base_lr=0.256",
    )  # fmt: skip
    pretrain(cfg, model=StandIn(), dataset=Labelled())
    epoch, lr = read_scalars(tmp_path, "train/epoch"), read_scalars(tmp_path, "train/lr")
    assert sorted(lr) == list(range(1, num_steps + 1))
    assert epoch[steps_per_epoch] == pytest.approx(1.0) and epoch[num_steps] == pytest.approx(epochs)
    peak = 0.256 * batch / 256
    # update s runs at the lr of s - 1 completed updates: a linear warmup over num_warmup updates
    for s in range(1, int(num_warmup) + 1):
        assert lr[s] == pytest.approx(peak * (s - 1) / num_warmup)
    assert lr[int(num_warmup) + 1] == pytest.approx(peak)

    # the AudioSet recipe: 508994 // 128 steps per epoch across 8 processes of 16 clips
    recipe = load_config(CONFIGS / "finetune" / "avmae_audioset_vitl.yaml", ["data.num_workers=0"])
    loader = prepare_data_loader(
        build_loader(recipe, Labelled(), train=True), num_processes=8, process_index=3, put_on_device=False
    )
    source_steps = 508994 // 128
    assert len(loader) == source_steps == 3976
    assert total_steps(recipe.train, len(loader)) == 50 * source_steps == 198800
    assert warmup_steps(recipe.train, len(loader)) == 2.5 * source_steps == 9940


# ---- logs -----------------------------------------------------------------------------------------


def test_a_log_file_gets_plain_progress_lines_not_bar_redraws(tmp_path):
    """stderr into a file, as under a job scheduler: one line per `progress_every` steps, each with
    the step, loss, lr, clips/s, data wait and ETA, and no bar."""
    import contextlib
    import re

    steps = 120
    cfg = run_config(tmp_path / "run", f"train.max_steps={steps}", "train.log_every=10", "train.progress_every=30",
                     "train.progress_seconds=1000")  # fmt: skip
    log = tmp_path / "stderr.log"
    torch.manual_seed(0)
    with open(log, "w") as stream, contextlib.redirect_stderr(stream):
        pretrain(cfg, model=StandIn(), dataset=Clips())
    text = log.read_text()
    assert "\r" not in text and "step/s" not in text  # no bar, redrawn or not
    line = re.compile(
        r"^pretrain step (\d+)/120 \(\d+%\) \| loss (\S+) \| lr (\S+) \| ([\d.]+) clips/s \| data wait (\d+)% \| ETA (\S+)$"
    )
    found = [m for m in map(line.match, text.splitlines()) if m]
    assert [int(m.group(1)) for m in found] == [30, 60, 90, 120]
    losses = read_scalars(tmp_path / "run", "train/loss")
    for m in found:
        step = int(m.group(1))
        assert float(m.group(2)) == pytest.approx(losses[step], rel=1e-3)
        assert float(m.group(4)) > 0 and 0 <= int(m.group(5)) <= 100
    assert found[-1].group(6) == "0:00:00"
    assert len(text.splitlines()) <= len(found) + 5 and len(text) < 1000  # nothing else of note


# ---- non-finite losses: stop, skip, rollback ------------------------------------------------------


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


NONFINITE = ["train.max_steps=9", "train.base_lr=0.1", "train.warmup_epochs=0.5", "data.num_workers=1",
             "train.keep_checkpoints=0"]  # fmt: skip


def test_skip_discards_the_update_whose_loss_is_not_finite_and_counts_it(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = run_config(tmp_path, *NONFINITE, "train.on_nonfinite=skip", "train.checkpoint_every=1", "train.grad_accum=2")
    pretrain(cfg, model=StandIn(nan_at=9), dataset=Clips())  # the first micro-batch of update 5
    assert _same(_weights(tmp_path, 4), _weights(tmp_path, 5))  # update 5 left every weight as it was
    assert not _same(_weights(tmp_path, 5), _weights(tmp_path, 6))
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path, 9).values())
    state = json.loads((tmp_path / "checkpoints" / "step_00000009" / "trainer_state.json").read_text())
    assert (state["nonfinite"], state["discarded_steps"]) == (1, [5])
    assert read_scalars(tmp_path, "train/nonfinite_updates") == {s: float(s >= 5) for s in range(1, 10)}
    assert all(math.isfinite(v) for v in read_scalars(tmp_path, "train/loss").values())
    assert "non-finite loss at update 5: update skipped (1 of train.max_nonfinite=3)" in capsys.readouterr().out


def test_rollback_restores_the_last_checkpoint_and_goes_on_past_the_bad_update(tmp_path):
    """Rollback, checked every 3 updates: the NaN of update 5 is seen at update 6 (weights already
    poisoned), the run goes back to step 3 and replays, passing over update 5. It ends bit for bit
    where a run that discarded update 5 as it happened ends (the same batches; the same RNG draws)."""
    overrides = [*NONFINITE, "train.log_every=3", "train.checkpoint_every=3"]
    torch.manual_seed(0)
    pretrain(run_config(tmp_path / "skip", *overrides, "train.on_nonfinite=skip"), model=StandIn(nan_at=5),
             dataset=Clips())  # fmt: skip
    torch.manual_seed(0)
    model = StandIn(nan_at=5)
    pretrain(run_config(tmp_path / "rollback", *overrides, "train.on_nonfinite=rollback"), model=model, dataset=Clips())
    assert model.calls == 9 + 3  # updates 4, 5 and 6 ran twice
    assert _same(_weights(tmp_path / "skip", 9), _weights(tmp_path / "rollback", 9))
    assert read_scalars(tmp_path / "rollback", "train/loss") == read_scalars(tmp_path / "skip", "train/loss")
    state = json.loads((tmp_path / "rollback" / "checkpoints" / "step_00000009" / "trainer_state.json").read_text())
    assert (state["nonfinite"], state["discarded_steps"]) == (1, [5])


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_more_non_finite_updates_than_allowed_stop_the_run(tmp_path, policy):
    cfg = run_config(tmp_path, *NONFINITE, f"train.on_nonfinite={policy}", "train.max_nonfinite=0",
                     "train.checkpoint_every=2", "train.log_every=2")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="step 3; 1 non-finite updates, more than train.max_nonfinite=0"):
        pretrain(cfg, model=StandIn(nan_at=3), dataset=Clips())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]


def test_a_cpu_run_without_deepspeed_prints_no_deepspeed_warning(tmp_path):
    """accelerate imports DeepSpeed wherever it is installed; its accelerator detection must not
    warn on every CPU run (a fresh process: this one may have imported DeepSpeed already)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None or torch.cuda.is_available():
        pytest.skip("DeepSpeed not installed, or not a CPU-only machine")
    code = (
        "import torch; from avmae.config import load_config; from avmae.engine.loop import build_accelerator; "
        f"a = build_accelerator(load_config(None, ['train.output_dir={tmp_path}'])); "
        "a.unwrap_model(a.prepare(torch.nn.Linear(2, 2))); import deepspeed; print('unwrapped')"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "unwrapped" in done.stdout, done.stderr[-2000:]
    assert "WARNING" not in done.stdout + done.stderr and "accelerator" not in done.stdout + done.stderr, done.stdout + done.stderr
