"""Manifest readers: every dataset format becomes a ``Manifest`` of ``ClipRecord``s.

``read_manifest(data_cfg, split)`` picks the reader of ``data.format`` and the manifest file of
the split (``data.train/val/test``). Manifest and label files resolve against ``data.root``
unless absolute; media paths resolve against ``data.root`` through ``data.video_template``.
Malformed rows raise ``ManifestError`` naming the file and line. Files are only parsed here;
missing media are found (and reported) when the dataset is built.

Formats, their files, and their targets:

- ``synthetic``: csv ``id,video,label`` (video relative to root, integer label) and
  ``classes.txt`` (one name a line; ``data.label_file`` overrides). Head ``label``.
- ``vggsound``: the official headerless csv ``ytid,start_seconds,label,split`` (CRLF, labels with
  commas quoted); one file holds both splits: split ``train`` keeps ``train`` rows, ``val`` and
  ``test`` keep ``test`` rows. Video ``{ytid}_{start:06d}.mp4``. Classes: ``data.label_file``
  (``stat.csv``, ``class_labels_indices_vgg.csv`` or one name a line), else the sorted labels of
  all configured split files. Head ``label``.
- ``audioset``: segment csv ``YTID, start_seconds, end_seconds, "mid,mid"`` with ``#`` comment
  lines, and ``class_labels_indices.csv`` (``data.label_file``, default next to the manifest).
  Multi-label head ``label`` (527 classes). Video ``{ytid}.mp4``: files hold the segment only.
- ``epic``: EPIC-KITCHENS-100 annotation csv; the record is the segment between
  ``start_timestamp`` and ``stop_timestamp`` of ``{participant_id}/videos/{video_id}.MP4``.
  Heads ``verb`` and ``noun`` (the main noun) with classes from ``EPIC_100_verb_classes.csv``
  and ``EPIC_100_noun_classes.csv`` (``data.label_file`` / ``data.noun_label_file``, default
  next to the manifest). A csv without class columns (the test set) gives records without
  targets.
- ``ave``: ``Category&VideoID&Quality&StartTime&EndTime`` lines, with or without the header
  line (``Annotations.txt`` or the split files ``trainSet.txt``...). The record is the event
  segment of ``{video_id}.mp4``. Classes: ``data.label_file`` (``categories.txt``), else the
  sorted categories of all configured split files. Head ``label``.
- ``cavmae``: CAV-MAE json ``{"data": [{video_id, wav, video_path, labels}]}`` and the label csv
  ``index,mid,display_name`` (``data.label_file``, required). ``video_path`` is the mp4 or a
  folder holding ``<video_id>.mp4``; ``wav`` is the audio file (looked up by file name under
  ``data.audio_root`` when that is set). Multi-label head ``label``.

Template fields: vggsound ``ytid, start``; audioset ``ytid, start, end``; epic
``participant_id, video_id, narration_id``; ave ``video_id, category, start, end``. With
``data.audio_root`` set, every record also gets the audio file ``audio_root / audio_template``
(fields ``stem``, the video file's stem, and ``id``, the record id).
"""

from __future__ import annotations

import ast
import csv
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from avmae.config import DataConfig

SPLITS = ("train", "val", "test")

VIDEO_TEMPLATES = {
    "vggsound": "{ytid}_{start:06d}.mp4",
    "audioset": "{ytid}.mp4",
    "epic": "{participant_id}/videos/{video_id}.MP4",
    "ave": "{video_id}.mp4",
}


class ManifestError(ValueError):
    """A manifest or label file is malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class ClipRecord:
    """One clip: media paths, targets (head -> class index or indices) and a segment in seconds."""

    id: str
    video: Path | None
    audio: Path | None = None  # a separate wav/flac; None: the audio track of ``video``
    targets: dict[str, int | list[int]] = field(default_factory=dict)
    start: float | None = None  # segment inside the file; None = the whole file
    end: float | None = None


def is_present(record: ClipRecord) -> bool:
    """Whether the record's media files exist (its video, and its separate audio file if any)."""
    return record.video is not None and record.video.is_file() and (record.audio is None or record.audio.is_file())


@dataclass
class Manifest:
    """The records of one split, the class names of each head, and whether heads are multi-label."""

    records: list[ClipRecord]
    classes: dict[str, list[str]]
    multi_label: bool = False
    source: Path | None = None

    @property
    def num_classes(self) -> dict[str, int]:
        return {head: len(names) for head, names in self.classes.items()}

    def __len__(self) -> int:
        return len(self.records)


def _fail(path: Path, line: int | None, problem: str) -> ManifestError:
    where = f"{path}:{line}" if line is not None else str(path)
    return ManifestError(f"{where}: {problem}")


def resolve(root: str | Path, path: str | Path) -> Path:
    """``path`` itself when absolute, else ``root / path``."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def _open_text(path: Path):
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    # newline="" lets csv handle CRLF and quoted fields; utf-8-sig drops a BOM if one appears
    return open(path, newline="", encoding="utf-8-sig")


def _csv_rows(path: Path, **reader_args) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank csv row."""
    with _open_text(path) as f:
        reader = csv.reader(f, **reader_args)
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    yield reader.line_num, row
        except csv.Error as err:
            raise _fail(path, reader.line_num, f"unreadable csv: {err}") from err


def _int(path: Path, line: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _fail(path, line, f"{what} must be an integer, got {text!r}") from None


def _float(path: Path, line: int, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _fail(path, line, f"{what} must be a number, got {text!r}") from None


def _format(path: Path, line: int, template: str, fields: dict) -> str:
    try:
        return template.format(**fields)
    except (KeyError, ValueError, IndexError) as err:
        raise _fail(
            path, line, f"video template {template!r} does not fit the fields {sorted(fields)}: {err!r}"
        ) from None


# ---------------------------------------------------------------------------------------------
# class lists


def read_class_index_csv(path: Path) -> tuple[list[str], list[str]]:
    """``(mids, display_names)`` of an ``index,mid,display_name`` csv, in index order."""
    rows = list(_csv_rows(path))
    if not rows or [c.strip() for c in rows[0][1]] != ["index", "mid", "display_name"]:
        raise _fail(path, 1, "expected the header index,mid,display_name")
    mids, names = [], []
    for line, row in rows[1:]:
        if len(row) != 3:
            raise _fail(path, line, f"expected 3 fields index,mid,display_name, got {len(row)}")
        if _int(path, line, row[0], "index") != len(mids):
            raise _fail(path, line, f"index {row[0]} out of order (expected {len(mids)})")
        mids.append(row[1].strip())
        names.append(row[2].strip())
    if len(set(mids)) != len(mids):
        raise _fail(path, None, "duplicate mids")
    return mids, names


def read_class_list(path: Path) -> list[str]:
    """Class names in index order from any of the supported label files.

    ``index,mid,display_name`` csv (AudioSet, CAV-MAE): display names. EPIC ``id,key,...`` csv:
    keys. VGGSound ``stat.csv`` (headerless ``label,count,category``): labels. Otherwise one
    name a line (``classes.txt``, AVE ``categories.txt``).
    """
    if path.suffix.lower() != ".csv":
        with _open_text(path) as f:
            names = [line.strip() for line in f.read().splitlines() if line.strip()]
        if not names:
            raise _fail(path, None, "no class names")
        return names
    rows = list(_csv_rows(path))
    if not rows:
        raise _fail(path, None, "no class names")
    header = [c.strip() for c in rows[0][1]]
    if header == ["index", "mid", "display_name"]:
        return read_class_index_csv(path)[1]
    if header[:2] == ["id", "key"]:
        names = []
        for line, row in rows[1:]:
            if _int(path, line, row[0], "id") != len(names):
                raise _fail(path, line, f"class id {row[0]} out of order (expected {len(names)})")
            names.append(row[1].strip())
        return names
    # stat.csv, or a one-column csv
    names = [row[0].strip() for _, row in rows]
    if len(set(names)) != len(names):
        raise _fail(path, None, "duplicate class names")
    return names


def _index_of(classes: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(classes)}


# ---------------------------------------------------------------------------------------------
# synthetic


def read_synthetic(path: Path, root: Path, classes: list[str]) -> Manifest:
    """``id,video,label`` csv; video relative to ``root``, label an index into ``classes``."""
    rows = list(_csv_rows(path))
    if not rows or [c.strip() for c in rows[0][1]] != ["id", "video", "label"]:
        raise _fail(path, 1, "expected the header id,video,label")
    records = []
    for line, row in rows[1:]:
        if len(row) != 3:
            raise _fail(path, line, f"expected 3 fields id,video,label, got {len(row)}")
        label = _int(path, line, row[2], "label")
        if not 0 <= label < len(classes):
            raise _fail(path, line, f"label {label} outside the {len(classes)} classes")
        records.append(ClipRecord(row[0], resolve(root, row[1]), targets={"label": label}))
    return Manifest(records, {"label": classes}, source=path)


# ---------------------------------------------------------------------------------------------
# VGGSound


def _vggsound_rows(path: Path) -> Iterator[tuple[int, str, int, str, str]]:
    """(line, ytid, start, label, split) of the headerless ``ytid,start,label,split`` csv."""
    for line, row in _csv_rows(path):
        if len(row) != 4:
            raise _fail(path, line, f"expected 4 fields ytid,start_seconds,label,split, got {len(row)}: {row}")
        ytid, start, label, split = (c.strip() for c in row)
        if split not in ("train", "test"):
            raise _fail(path, line, f"split must be train or test, got {split!r}")
        yield line, ytid, _int(path, line, start, "start_seconds"), label, split


def vggsound_labels(path: Path) -> set[str]:
    return {label for _, _, _, label, _ in _vggsound_rows(path)}


def read_vggsound(
    path: Path, split: str, root: Path, classes: list[str], video_template: str = VIDEO_TEMPLATES["vggsound"]
) -> Manifest:
    """Rows of ``split`` (``val`` reads the ``test`` rows: VGGSound has no validation split)."""
    wanted = "train" if split == "train" else "test"
    index = _index_of(classes)
    records = []
    for line, ytid, start, label, row_split in _vggsound_rows(path):
        if row_split != wanted:
            continue
        if label not in index:
            raise _fail(path, line, f"label {label!r} is not in the class list")
        fields = {"ytid": ytid, "start": start}
        video = resolve(root, _format(path, line, video_template, fields))
        records.append(ClipRecord(f"{ytid}_{start:06d}", video, targets={"label": index[label]}))
    return Manifest(records, {"label": classes}, source=path)


# ---------------------------------------------------------------------------------------------
# AudioSet


def read_audioset(
    path: Path, root: Path, label_csv: Path, video_template: str = VIDEO_TEMPLATES["audioset"]
) -> Manifest:
    """Google's segment csv; multi-label targets through ``class_labels_indices.csv``."""
    mids, names = read_class_index_csv(label_csv)
    index = _index_of(mids)
    records = []
    # the header line is commented out; ", " separators need skipinitialspace
    for line, row in _csv_rows(path, skipinitialspace=True):
        if row[0].startswith("#"):
            continue
        if len(row) != 4:
            raise _fail(path, line, f"expected 4 fields YTID, start, end, \"labels\", got {len(row)}: {row}")
        ytid, start, end, labels = (c.strip() for c in row)
        start_s = _float(path, line, start, "start_seconds")
        end_s = _float(path, line, end, "end_seconds")
        targets = []
        for mid in labels.split(","):
            if mid.strip() not in index:
                raise _fail(path, line, f"label {mid!r} is not in {label_csv}")
            targets.append(index[mid.strip()])
        fields = {"ytid": ytid, "start": start_s, "end": end_s}
        video = resolve(root, _format(path, line, video_template, fields))
        records.append(ClipRecord(f"{ytid}_{start_s:.3f}", video, targets={"label": sorted(set(targets))}))
    return Manifest(records, {"label": names}, multi_label=True, source=path)


# ---------------------------------------------------------------------------------------------
# EPIC-KITCHENS-100

_TIMESTAMP = re.compile(r"^(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)$")


def parse_timestamp(text: str) -> float:
    """``HH:MM:SS.ff`` -> seconds."""
    match = _TIMESTAMP.match(text.strip())
    if not match:
        raise ValueError(f"timestamp must look like HH:MM:SS.ff, got {text!r}")
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


_EPIC_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp")
_EPIC_LABEL_COLUMNS = ("verb_class", "noun_class", "all_noun_classes")


def read_epic(
    path: Path,
    root: Path,
    verb_classes: list[str],
    noun_classes: list[str],
    video_template: str = VIDEO_TEMPLATES["epic"],
) -> Manifest:
    """EPIC-KITCHENS-100 annotation csv -> one segment record per narration."""
    rows = _csv_rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise _fail(path, None, "empty file") from None
    column = {name.strip(): i for i, name in enumerate(header)}
    absent = [c for c in _EPIC_COLUMNS if c not in column]
    if absent:
        raise _fail(path, 1, f"missing columns {absent}")
    labelled = all(c in column for c in _EPIC_LABEL_COLUMNS)
    records = []
    for line, row in rows:
        if len(row) != len(header):
            raise _fail(path, line, f"expected {len(header)} fields, got {len(row)}")
        value = {name: row[i].strip() for name, i in column.items()}
        try:
            start = parse_timestamp(value["start_timestamp"])
            stop = parse_timestamp(value["stop_timestamp"])
        except ValueError as err:
            raise _fail(path, line, str(err)) from None
        if stop < start:
            raise _fail(path, line, f"stop_timestamp {stop:.2f} s is before start_timestamp {start:.2f} s")
        targets = {}
        if labelled:
            verb = _int(path, line, value["verb_class"], "verb_class")
            noun = _int(path, line, value["noun_class"], "noun_class")
            if not 0 <= verb < len(verb_classes):
                raise _fail(path, line, f"verb_class {verb} outside the {len(verb_classes)} verb classes")
            if not 0 <= noun < len(noun_classes):
                raise _fail(path, line, f"noun_class {noun} outside the {len(noun_classes)} noun classes")
            # all_noun_classes is a Python list literal; the main noun must be one of them
            try:
                all_nouns = ast.literal_eval(value["all_noun_classes"])
            except (ValueError, SyntaxError):
                raise _fail(path, line, f"all_noun_classes is not a list: {value['all_noun_classes']!r}") from None
            if not isinstance(all_nouns, list) or noun not in all_nouns:
                raise _fail(path, line, f"noun_class {noun} is not in all_noun_classes {all_nouns!r}")
            targets = {"verb": verb, "noun": noun}
        fields = {k: value[k] for k in ("participant_id", "video_id", "narration_id")}
        video = resolve(root, _format(path, line, video_template, fields))
        records.append(ClipRecord(value["narration_id"], video, targets=targets, start=start, end=stop))
    return Manifest(records, {"verb": verb_classes, "noun": noun_classes}, source=path)


# ---------------------------------------------------------------------------------------------
# AVE

_AVE_HEADER = ["Category", "VideoID", "Quality", "StartTime", "EndTime"]


def _ave_rows(path: Path) -> Iterator[tuple[int, str, str, int, int]]:
    """(line, category, video_id, start, end); the header line is optional."""
    with _open_text(path) as f:
        lines = f.read().splitlines()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        fields = text.strip().split("&")
        if number == 1 and fields == _AVE_HEADER:
            continue
        if len(fields) != 5:
            raise _fail(path, number, f"expected 5 '&'-separated fields {'&'.join(_AVE_HEADER)}, got {text!r}")
        category, video_id, _, start, end = fields
        start_s, end_s = _int(path, number, start, "StartTime"), _int(path, number, end, "EndTime")
        if end_s < start_s:
            raise _fail(path, number, f"EndTime {end_s} is before StartTime {start_s}")
        yield number, category, video_id, start_s, end_s


def ave_labels(path: Path) -> set[str]:
    return {category for _, category, _, _, _ in _ave_rows(path)}


def read_ave(path: Path, root: Path, classes: list[str], video_template: str = VIDEO_TEMPLATES["ave"]) -> Manifest:
    """AVE annotation or split file -> one event-segment record per line.

    A video can hold several events, so the record id is ``<VideoID>_<StartTime>_<EndTime>``.
    """
    index = _index_of(classes)
    records = []
    for line, category, video_id, start, end in _ave_rows(path):
        if category not in index:
            raise _fail(path, line, f"category {category!r} is not in the class list")
        fields = {"video_id": video_id, "category": category, "start": start, "end": end}
        video = resolve(root, _format(path, line, video_template, fields))
        records.append(
            ClipRecord(
                f"{video_id}_{start}_{end}", video, targets={"label": index[category]}, start=float(start), end=float(end)
            )
        )
    return Manifest(records, {"label": classes}, source=path)


# ---------------------------------------------------------------------------------------------
# CAV-MAE json


def read_cavmae(path: Path, root: Path, label_csv: Path, audio_root: Path | None = None) -> Manifest:
    """CAV-MAE json manifest; multi-hot targets through the ``index,mid,display_name`` csv."""
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(
            path, err.lineno, f"not valid JSON ({err.msg}); CAV-MAE manifests are {{\"data\": [...]}} json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _fail(path, None, 'expected a JSON object {"data": [...]}')
    mids, names = read_class_index_csv(label_csv)
    index = _index_of(mids)
    records = []
    for number, entry in enumerate(data["data"]):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            raise _fail(path, None, f"{where} is not an object")
        absent = [k for k in ("video_id", "wav", "video_path", "labels") if k not in entry]
        if absent:
            raise _fail(path, None, f"{where} ({entry.get('video_id', '?')}) lacks {absent}")
        video_id = str(entry["video_id"])
        targets = []
        for mid in str(entry["labels"]).split(","):
            if mid.strip() not in index:
                raise _fail(path, None, f"{where} ({video_id}): label {mid!r} is not in {label_csv}")
            targets.append(index[mid.strip()])
        video_path = str(entry["video_path"])
        video = resolve(root, video_path)
        if video_path.endswith(("/", "\\")) or video.is_dir() or not video.suffix:
            video = video / f"{video_id}.mp4"
        wav = Path(str(entry["wav"]))
        audio = audio_root / wav.name if audio_root is not None else resolve(root, wav)
        records.append(ClipRecord(video_id, video, audio=audio, targets={"label": sorted(set(targets))}))
    return Manifest(records, {"label": names}, multi_label=True, source=path)


# ---------------------------------------------------------------------------------------------
# dispatch


def manifest_path(data_cfg: DataConfig, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return resolve(data_cfg.root, getattr(data_cfg, split))


def _sorted_labels(data_cfg: DataConfig, labels_of: Callable[[Path], set[str]]) -> list[str]:
    """The sorted labels of every configured split file that exists: one list for all splits."""
    paths = {manifest_path(data_cfg, s) for s in SPLITS}
    labels = set()
    for path in sorted(p for p in paths if p.is_file()):
        labels |= labels_of(path)
    return sorted(labels)


def _label_file(data_cfg: DataConfig, manifest: Path, value: str | None, default_name: str | None) -> Path:
    if value:
        return resolve(data_cfg.root, value)
    if default_name is None:
        raise ManifestError(f"{manifest}: data.format={data_cfg.format} needs data.label_file")
    return manifest.parent / default_name


def _with_audio_files(manifest: Manifest, data_cfg: DataConfig) -> Manifest:
    """Point every record at its separate audio file under ``data.audio_root``."""
    audio_root = Path(data_cfg.audio_root)
    records = []
    for record in manifest.records:
        stem = record.video.stem if record.video is not None else record.id
        fields = {"stem": stem, "id": record.id}
        try:
            name = data_cfg.audio_template.format(**fields)
        except (KeyError, ValueError, IndexError) as err:
            raise ManifestError(
                f"data.audio_template {data_cfg.audio_template!r} needs fields beyond {sorted(fields)}: {err!r}"
            ) from None
        records.append(replace(record, audio=resolve(audio_root, name)))
    return replace(manifest, records=records)


def read_manifest(data_cfg: DataConfig, split: str) -> Manifest:
    """The ``split`` manifest of ``data_cfg.format`` (see the module docstring for the formats)."""
    path = manifest_path(data_cfg, split)
    root = Path(data_cfg.root)
    fmt = data_cfg.format
    template = data_cfg.video_template or VIDEO_TEMPLATES.get(fmt)
    if fmt == "synthetic":
        classes = read_class_list(resolve(root, data_cfg.label_file or "classes.txt"))
        manifest = read_synthetic(path, root, classes)
    elif fmt == "vggsound":
        classes = (
            read_class_list(resolve(root, data_cfg.label_file))
            if data_cfg.label_file
            else _sorted_labels(data_cfg, vggsound_labels)
        )
        manifest = read_vggsound(path, split, root, classes, template)
    elif fmt == "audioset":
        label_csv = _label_file(data_cfg, path, data_cfg.label_file, "class_labels_indices.csv")
        manifest = read_audioset(path, root, label_csv, template)
    elif fmt == "epic":
        verbs = read_class_list(_label_file(data_cfg, path, data_cfg.label_file, "EPIC_100_verb_classes.csv"))
        nouns = read_class_list(_label_file(data_cfg, path, data_cfg.noun_label_file, "EPIC_100_noun_classes.csv"))
        manifest = read_epic(path, root, verbs, nouns, template)
    elif fmt == "ave":
        classes = (
            read_class_list(resolve(root, data_cfg.label_file))
            if data_cfg.label_file
            else _sorted_labels(data_cfg, ave_labels)
        )
        manifest = read_ave(path, root, classes, template)
    elif fmt == "cavmae":
        label_csv = _label_file(data_cfg, path, data_cfg.label_file, None)
        audio_root = Path(data_cfg.audio_root) if data_cfg.audio_root else None
        return read_cavmae(path, root, label_csv, audio_root)
    else:
        raise ValueError(f"unknown data.format {fmt!r}")
    if data_cfg.audio_root:
        manifest = _with_audio_files(manifest, data_cfg)
    return manifest
