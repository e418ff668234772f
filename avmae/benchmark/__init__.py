"""Benchmarks: speed, memory and MFU of the training step and the engine, clips/s of the data
pipeline, and the plain reference model they are compared with.

One module per measurement (``train_step``, ``data_pipeline``, ``engine``, ``profile``,
``input_copy``, the budgeted GPU ``suite``), plus ``machine`` (the environment, peak memory, peak
FLOP/s recorded with every measurement) and ``report`` (the JSON record and the rows appended to
docs/benchmarks.md). ``tools/benchmark.py`` runs them; docs/benchmarks.md holds the results.
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
