"""Reading back what a run logged through accelerate's TensorBoard tracker."""

from __future__ import annotations

from pathlib import Path


def read_scalars(run_dir: str | Path, tag: str) -> dict[int, float]:
    """``step -> value`` of scalar ``tag`` (e.g. ``train/loss``) over every event file of
    ``run_dir/tensorboard``; a resumed run's later values overwrite the earlier ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for path in sorted((Path(run_dir) / "tensorboard").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return dict(sorted(values.items()))
