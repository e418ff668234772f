"""Benchmarks: training-step throughput, memory and MFU, and data-pipeline clips/s.

- ``train_step``: ``measure_train_step(cfg, device, variants)``, the avmae model against its
  ``torch.compile`` forms, the levers' before variants and the plain reference model
  (``avmae.benchmark.reference``) under the same autocast with TF32, and in fp32.
- ``data_pipeline``: ``write_benchmark_clips`` (360p H.264 clips from the synthetic generator) and
  ``measure_data_pipeline(cfg, clips_dir, decoders, clips_per_video)``, clips/s of one worker.
- ``engine``: ``measure_engine(cfg)``, the pretraining engine under ``accelerate launch`` (DDP,
  DeepSpeed ZeRO) on a random clip kept on the device.
- ``profile``: ``profile_train_step``, a ``torch.profiler`` breakdown of one variant's step.
- ``input_copy``: ``measure_input_copy``, a batch of frames to the device as float32 and as uint8.
- ``suite``: every GPU measurement in budgeted processes (``tools/benchmark.py gpu-suite``).
- ``machine``: the environment recorded with every measurement, ``PeakMemory``, peak FLOP/s.
- ``report``: ``save_record`` writes the JSON record and appends its rows to docs/benchmarks.md.

``tools/benchmark.py`` runs them from the command line; docs/benchmarks.md holds the results.
"""

from .data_pipeline import (
    TARGET_CLIPS_PER_CPU_S,
    benchmark_dataset,
    clips_spec,
    default_clips_dir,
    measure_data_pipeline,
    write_benchmark_clips,
)
from .engine import DeviceClips, measure_engine
from .machine import PeakMemory, datasheet_peak, environment, measure_gemm_flops, peak_flops
from .report import append_rows, record_rows, save_record, write_json
from .train_step import VARIANTS, default_variants, measure_train_step

__all__ = [
    "DeviceClips",
    "PeakMemory",
    "TARGET_CLIPS_PER_CPU_S",
    "VARIANTS",
    "append_rows",
    "benchmark_dataset",
    "clips_spec",
    "datasheet_peak",
    "default_clips_dir",
    "default_variants",
    "environment",
    "measure_data_pipeline",
    "measure_engine",
    "measure_gemm_flops",
    "measure_train_step",
    "peak_flops",
    "record_rows",
    "save_record",
    "write_benchmark_clips",
    "write_json",
]
