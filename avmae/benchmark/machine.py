"""What a measurement ran on, and the machine-level yardsticks it is compared with.

- ``environment``: date, device name, torch version, threads, cores and the 1-minute load average,
  recorded with every measurement (the machine may be shared: a row measured under load says so).
- ``PeakMemory``: memory growth over a block of code. On CUDA the allocator's peak
  (``torch.cuda.max_memory_allocated``) minus what was allocated before; on the CPU the process's
  peak resident set size (Linux ``VmHWM``, the counter ``resource.getrusage`` reports as
  ``ru_maxrss``, reset through ``/proc/self/clear_refs``) minus the resident size before.
- the FLOP/s an MFU is measured against: ``datasheet_peak``, the vendor's dense bf16 figure for
  known GPUs; otherwise ``measure_gemm_flops``, the best FLOP/s of a large matmul measured on the
  same device and threads (there is no CPU figure to trust).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import resource
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s, matched against
# torch.cuda.get_device_name in this order (the first substring found wins).
GPU_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({usable_cores()} cores)"


def environment(device: torch.device, threads: int) -> dict:
    """The fields every record carries; ``load_after``/``under_load`` are set by ``finish``."""
    return {
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": threads,
        "cores": usable_cores(),
        "load_before": load_average(),
    }


def finish(env: dict) -> dict:
    """Record the load after the measurement, and whether either reading exceeded the cores."""
    env["load_after"] = load_average()
    loads = [x for x in (env["load_before"], env["load_after"]) if x is not None]
    env["under_load"] = bool(loads) and max(loads) > env["cores"]
    return env


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer reads finished work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _return_free_memory() -> None:
    """Hand memory freed by earlier work back to the system, so it is not reused unseen."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (growth) and ``peak.what``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.what = ""

    def __enter__(self) -> "PeakMemory":
        _return_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            self.what = "torch.cuda.max_memory_allocated growth"
        else:
            self._before = (_status_kib("VmRSS") or 0) * 1024
            self._resettable = _reset_peak_rss() and _status_kib("VmHWM") is not None
            if self._resettable:
                self.what = "peak RSS growth (VmHWM reset by /proc/self/clear_refs)"
            else:  # the process-lifetime peak: growth only shows when it exceeds every earlier peak
                self._before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.what = "growth of the process-lifetime peak RSS (getrusage ru_maxrss)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._resettable:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self._before)


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of ``(size x size) @ (size x size)`` over ``repeats`` timed products (after
    one untimed), on the current threads: the most this device does with the step's dtype."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str] | None:
    """``(FLOP/s, source)`` of a known GPU in bf16, the yardstick of a GPU MFU; None otherwise."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_BF16_PEAK_FLOPS:
        if key in name:
            return flops, f"{key} dense bf16 data-sheet peak ({flops / 1e12:.0f} TFLOP/s)"
    return None


def measured_peak_source(device: torch.device, dtype: torch.dtype, size: int, flops: float) -> str:
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    return f"measured GEMM peak: best {dtype_name} {size}x{size} matmul on {where} ({flops / 1e9:.1f} GFLOP/s)"


def peak_flops(
    device: torch.device, dtype: torch.dtype, size: int = 2048, measured_before: float | None = None
) -> tuple[float, str]:
    """``(FLOP/s, source)`` an MFU is measured against: the data-sheet peak of a known GPU, else
    the best of ``measured_before`` (a ``measure_gemm_flops`` taken earlier in the run, if any)
    and a GEMM measured now: the machine at its least loaded."""
    datasheet = datasheet_peak(device, dtype)
    if datasheet:
        return datasheet
    flops = max(measured_before or 0.0, measure_gemm_flops(device, dtype, size))
    return flops, measured_peak_source(device, dtype, size, flops)
