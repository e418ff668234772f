"""Where measurements go: the full JSON record, and one markdown row per measured setting.

``docs/benchmarks.md`` holds one table per kind of record (``TABLES``). ``append_rows`` finds the
table by its exact header line and adds rows under its last row; a file without that table gets
it appended at the end, under its title. Numbers in the rows are rounded for reading; the JSON
keeps them whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data_pipeline import STAGES

TRAIN_STEP_COLUMNS = (
    "Date", "Device", "Model", "Batch", "Precision", "Variant", "Clips/s", "Step (ms)", "Peak memory (GiB)",
    "MFU", "MFU yardstick", "vs reference", "Load", "Command",
)  # fmt: skip
DATA_PIPELINE_COLUMNS = (
    "Date", "Device", "Clips", "Clip geometry", "Decoder", "Clips/video", "Clips/s (1 worker)", "Clips per CPU-s",
    "Video decode", "Audio decode", "Fbank", "Augment", "Other", "Load", "Command",
)  # fmt: skip
ENGINE_COLUMNS = (
    "Date", "Device", "Launch", "Model", "Batch per process", "Precision", "Clips/s (all processes)", "MFU",
    "MFU yardstick", "Command",
)  # fmt: skip
PROFILE_COLUMNS = (
    "Date", "Device", "Model", "Batch", "Precision", "Variant", "Time base", "Matmul", "Attention", "Elementwise",
    "Optimizer", "Copies", "Other", "Total (ms/step)", "Attention kernel", "Command",
)  # fmt: skip
INPUT_COPY_COLUMNS = (
    "Date", "Device", "Batch", "Video", "float32 MB", "uint8 MB", "float32 pageable, blocking (ms)",
    "uint8 pinned, non_blocking + normalise (ms)", "Note", "Command",
)  # fmt: skip
TABLES = {
    "train_step": ("Training step", TRAIN_STEP_COLUMNS),
    "engine": ("Pretraining engine", ENGINE_COLUMNS),
    "data_pipeline": ("Data pipeline", DATA_PIPELINE_COLUMNS),
    "profile": ("Training-step profile", PROFILE_COLUMNS),
    "input_copy": ("Batch to the device", INPUT_COPY_COLUMNS),
}


def _cell(value) -> str:
    """Markdown-safe table cell: pipes escaped, line breaks joined."""
    return " ".join(str(value).split("\n")).replace("|", "\\|")


def format_row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def header_lines(kind: str) -> list[str]:
    """The header row and the separator row of the table of ``kind``."""
    columns = TABLES[kind][1]
    return [format_row(columns), "|" + "|".join("---" for _ in columns) + "|"]


def _load(record: dict) -> str:
    loads = [x for x in (record.get("load_before"), record.get("load_after")) if x is not None]
    text = " -> ".join(f"{x:.1f}" for x in loads) or "n/a"
    return f"{text} on {record['cores']} cores" + (" (busy)" if record.get("under_load") else "")


def _code(command: str) -> str:
    return f"`{command}`"


def _yardstick(record: dict) -> str:
    source = record["peak_source"]
    what = "data sheet" if "data-sheet" in source else "measured GEMM"
    return f"{record['peak_flops'] / 1e12:.3g} TFLOP/s ({what})"


def train_step_rows(record: dict, command: str) -> list[list[str]]:
    """One row per variant of a ``measure_train_step`` record."""
    rows = []
    for name, result in record["variants"].items():
        if "error" in result:
            numbers = [result["error"], "", "", "", "", ""]
        else:
            ratio = result.get("vs_reference")
            numbers = [
                f"{result['clips_per_s']:.1f}",
                f"{result['step_ms']:.1f}",
                f"{result['peak_memory_bytes'] / 2**30:.2f}",
                f"{100 * result['mfu']:.1f}%",
                _yardstick(record),
                f"{ratio:.2f}x" if ratio else "",
            ]
        rows.append([record["date"], record["device"], record["model_size"], str(record["batch_size"]),
                     record["precision"], name, *numbers, _load(record), _code(command)])  # fmt: skip
    return rows


def _clips(info: dict) -> str:
    fps = "/".join(f"{f:g}" for f in info["fps"])
    return (f"{info['num_clips']} x {info['duration']:g} s {info['width']}x{info['height']} H.264 {fps} fps, "
            f"{info['video_bit_rate_mean'] / 1e6:.2f} Mb/s, "
            f"{info['keyframes_per_clip_mean']:g} keyframes/clip")  # fmt: skip


def _geometry(g: dict) -> str:
    return (f"{g['num_frames']} frames at {g['frame_rate']:g} fps, {g['size']}px crop of {g['resize']}px; "
            f"{g['audio_seconds']:g} s fbank x {g['num_mel_bins']}")  # fmt: skip


def data_pipeline_rows(record: dict, command: str) -> list[list[str]]:
    """One row per decoder x clips-per-video setting of a ``measure_data_pipeline`` record;
    stage columns in ms per clip."""
    rows = []
    for s in record["settings"]:
        stages = [f"{s['stage_ms_per_clip'][k]:.1f}" for k in STAGES]
        rows.append([record["date"], record["device"], _clips(record["clips"]), _geometry(record["geometry"]),
                     s["decoder"], str(s["clips_per_video"]), f"{s['clips_per_s']:.1f}",
                     f"{s['clips_per_cpu_s']:.1f}", *stages, _load(record), _code(command)])  # fmt: skip
    return rows


def engine_rows(record: dict, command: str) -> list[list[str]]:
    """The one row of a ``measure_engine`` record."""
    launch = f"{record['num_processes']} x {record['distributed']}"
    if record["zero_stage"] is not None:
        launch += f" ZeRO-{record['zero_stage']}"
    if record.get("data_source", "device") != "device":
        launch += f", data: {record['data_source']}"
    return [[record["date"], record["device"], launch, record["model_size"], str(record["batch_size"]),
             record["precision"], f"{record['clips_per_s']:.1f}", f"{100 * record['mfu']:.1f}%", _yardstick(record),
             _code(command)]]  # fmt: skip


def profile_rows(record: dict, command: str) -> list[list[str]]:
    """The one row of a ``profile_train_step`` record: ms per step (share) per category."""
    shares = [f"{record['ms_per_step'][c]:.1f} ({100 * record['share'][c]:.0f}%)"
              for c in ("matmul", "attention", "elementwise", "optimizer", "copies", "other")]  # fmt: skip
    kernels = ", ".join(record["attention_kernels"])
    return [[record["date"], record["device"], record["model_size"], str(record["batch_size"]), record["precision"],
             record["variant"], record["time_base"], *shares, f"{record['total_ms_per_step']:.1f}", kernels,
             _code(command)]]  # fmt: skip


def input_copy_rows(record: dict, command: str) -> list[list[str]]:
    return [[record["date"], record["device"], str(record["batch_size"]), "x".join(map(str, record["video_shape"])),
             f"{record['float32_bytes'] / 1e6:.0f}", f"{record['uint8_bytes'] / 1e6:.0f}",
             f"{record['float32_pageable_blocking_ms']:.2f}", f"{record['uint8_pinned_non_blocking_normalise_ms']:.2f}",
             record["note"], _code(command)]]  # fmt: skip


ROWS = {
    "train_step": train_step_rows,
    "data_pipeline": data_pipeline_rows,
    "engine": engine_rows,
    "profile": profile_rows,
    "input_copy": input_copy_rows,
}


def record_rows(record: dict, command: str) -> list[list[str]]:
    """The table rows of ``record`` (either kind)."""
    if record.get("kind") not in ROWS:
        raise ValueError(f"unknown benchmark record kind {record.get('kind')!r}; expected one of {', '.join(ROWS)}")
    return ROWS[record["kind"]](record, command)


def append_rows(path: str | Path, kind: str, rows: list[list[str]]) -> None:
    """Add ``rows`` at the end of the ``kind`` table of the markdown file ``path`` (see module doc)."""
    path = Path(path)
    columns = TABLES[kind][1]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a {kind} row needs {len(columns)} cells ({', '.join(columns)}), got {len(row)}")
    lines = path.read_text().splitlines() if path.exists() else []
    new = [format_row(r) for r in rows]
    header = header_lines(kind)[0]
    if header in lines:
        end = lines.index(header) + 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[end:end] = new
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"## {TABLES[kind][0]}", "", *header_lines(kind), *new]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_json(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def save_record(record: dict, command: str, json_path: str | Path, docs: str | Path | None) -> list[list[str]]:
    """Write ``record`` (with ``command``) to ``json_path`` and, unless ``docs`` is None, append
    its rows to the markdown file ``docs``. Returns the rows."""
    record = record | {"command": command}
    write_json(record, json_path)
    rows = record_rows(record, command)
    if docs is not None:
        append_rows(docs, record["kind"], rows)
    return rows
