"""Embeddings of raw videos: an exported encoder with the preprocessing it was trained with.

    model = avmae.load("runs/demo/export")           # an export folder (tools/export.py, tools/convert.py)
    out = model.embed("clip.mp4")                     # {"video": (D,), "audio": (D,), "joint": (2D,)}

The preprocessing is the evaluation path of ``avmae.data`` (``AVDataset`` with ``train=False``)
built from the export's own ``config.json``: the same decoder, frame count and rate, resize and
centre crop, audio window, fbank settings and normalisation the model was pretrained (or, for a
converted checkpoint, published) with. ``views`` evenly spaced clips of a file are embedded and
their pooled features averaged, as the linear probe (``avmae.evaluation.probe``) does.

Embeddings (docs/architecture.md, "Using a model"):

- ``video``, ``audio``: each modality encoded on its own, its tokens mean-pooled (the features
  CAV-MAE's retrieval compares; for a mid/early-fusion encoder the joint layers run on the one
  modality alone);
- ``joint``: both modalities encoded together, each modality's tokens mean-pooled and
  concatenated video then audio (the audiovisual feature of the linear probe);
- ``tokens`` (on request): the token maps of the joint pass, ``{"video": (N_v, D), "audio":
  (N_a, D)}``, averaged over views.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from avmae.config import Config, DataConfig, replace
from avmae.data import AudioDecodeError, AVDataset, ClipRecord, Manifest, VideoDecodeError, build_dataset
from avmae.evaluation.evaluate import aggregate_views, model_inputs
from avmae.evaluation.probe import encoder_of, pool_tokens
from avmae.formats import export_config, from_pretrained

OUTPUTS = ("video", "audio", "joint")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# preprocessing: the dataset's evaluation path


def eval_data_config(data: DataConfig, views: int | None = None, crops: int | None = None) -> DataConfig:
    """``data`` with ``views`` temporal clips and ``crops`` spatial crops per file (None: keep)."""
    changes = {}
    if views is not None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        changes["test_clips"] = views
    if crops is not None:
        changes["test_crops"] = crops
    return replace(data, **changes) if changes else data


def file_records(paths: Sequence[str | Path], root: str | Path | None = None) -> list[ClipRecord]:
    """One record per video file; its id is the path relative to ``root`` without suffix (the
    file's stem without ``root``). Ids must be unique."""
    records, seen = [], {}
    for path in paths:
        path = Path(path)
        clip_id = path.relative_to(root).with_suffix("").as_posix() if root is not None else path.stem
        if clip_id in seen:
            raise ValueError(f"two inputs share the clip id {clip_id!r}: {seen[clip_id]} and {path}")
        seen[clip_id] = path
        records.append(ClipRecord(clip_id, path))
    return records


def folder_videos(folder: str | Path) -> list[Path]:
    """The video files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return files


def file_dataset(cfg: Config, records: list[ClipRecord], missing_list: Path | None = None) -> AVDataset:
    """The evaluation ``AVDataset`` of ``records`` with ``cfg.data``'s preprocessing."""
    manifest = Manifest(records, classes={}, multi_label=False, source=Path("<files>"))
    return AVDataset(manifest, cfg.data, cfg.augment, train=False, seed=cfg.train.seed, missing_list=missing_list)


class RecordViews(Dataset):
    """All evaluation views of each record of ``dataset`` (``indices``: a subset, in order), as
    ``{"index", "id", "video" (V, C, T, H, W) uint8, "audio" (V, 1, T_a, F)}``; a record that
    fails to decode gives ``{"index", "id", "path", "error"}`` instead of being replaced."""

    def __init__(self, dataset: AVDataset, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset.records))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        record = self.dataset.records[index]
        try:
            views = [self.dataset.load(index, v) for v in range(self.dataset.views)]
        except (VideoDecodeError, AudioDecodeError, OSError) as err:
            message = str(err) if str(record.video) in str(err) else f"{record.video}: {err}"
            return {"index": index, "id": record.id, "path": str(record.video), "error": message}
        out = {"index": index, "id": record.id}
        for name in ("video", "audio"):
            out[name] = torch.stack([v[name] for v in views])
        return out


# ---------------------------------------------------------------------------------------------
# the embedding model


class Embedder:
    """An exported encoder with the preprocessing of its config (see the module docstring).

    Args:
        encoder: an ``AVEncoder`` (or a model holding one: ``AVMAE``, ``AVClassifier``).
        cfg: the export's config; ``cfg.data`` is the preprocessing.
        device: where the encoder runs (default: the GPU when there is one).
        views: clips per file whose features are averaged (default ``cfg.data.test_clips``).
    """

    def __init__(self, encoder: nn.Module, cfg: Config, device: str | torch.device | None = None, views: int | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.encoder = encoder_of(encoder).eval().to(self.device)
        self.cfg = replace(cfg, data=eval_data_config(cfg.data, views))
        self.modalities = tuple(m for m in ("video", "audio") if m in self.encoder.modalities)

    @classmethod
    def from_export(cls, path: str | Path, device: str | torch.device | None = None, views: int | None = None) -> "Embedder":
        return cls(from_pretrained(path), export_config(path), device, views)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The embeddings this encoder gives: one per modality, and ``joint`` when it has both."""
        return self.modalities + (("joint",) if len(self.modalities) == 2 else ())

    @property
    def views(self) -> int:
        return self.cfg.data.test_clips * self.cfg.data.test_crops

    def with_data(self, data: DataConfig) -> "Embedder":
        """This model on another dataset: ``data``'s format, location and multi-view counts with
        this model's own preprocessing (``data.video`` and ``data.audio`` of its config)."""
        data = replace(data, video=self.cfg.data.video, audio=self.cfg.data.audio)
        return Embedder(self.encoder, replace(self.cfg, data=data), self.device)

    # ---- preprocessing ---------------------------------------------------------------------

    def split_dataset(self, split: str, missing_list: Path | None = None) -> AVDataset:
        """The evaluation dataset of ``split`` of ``cfg.data`` (any manifest format, or shards)."""
        data = self.cfg.data if missing_list is None else replace(self.cfg.data, missing_list=str(missing_list))
        return build_dataset(replace(self.cfg, data=data), split, train=False)

    def dataset(self, records: list[ClipRecord], missing_list: Path | None = None) -> AVDataset:
        return file_dataset(self.cfg, records, missing_list)

    def preprocess(self, source: str | Path | bytes) -> dict[str, torch.Tensor]:
        """One file (a path or its bytes) -> ``{"video": (V, C, T, H, W) uint8, "audio": (V, 1, T_a, F)}``."""
        with as_path(source) as path:
            item = file_views(self.cfg, [Path(path)])[0]
        if "error" in item:
            raise ValueError(item["error"])
        return {m: item[m] for m in ("video", "audio")}

    # ---- encoding ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, inputs: dict[str, torch.Tensor], outputs: Sequence[str] | None = None, tokens: bool = False) -> dict:
        """Model inputs of a batch -> pooled embeddings ``{name: (B, D)}`` (+ ``tokens``), on the CPU.

        ``inputs``: ``video`` ``(B, C, T, H, W)`` (uint8 as the dataset gives it, or already
        normalised floats) and/or ``audio`` ``(B, 1, T_a, F)`` normalised fbank.
        """
        outputs = tuple(outputs or self.outputs)
        unknown = set(outputs) - set(self.outputs)
        if unknown:
            raise ValueError(f"this encoder gives {self.outputs}, not {sorted(unknown)}")
        on_device = {m: inputs[m].to(self.device) for m in self.modalities if m in inputs}
        missing = [m for m in self.modalities if m in outputs and m not in on_device]
        if missing or ("joint" in outputs and len(on_device) < 2):
            raise ValueError(f"inputs lack {missing or ['video', 'audio']} for the embeddings {outputs}")
        x = model_inputs(on_device, "audiovisual" if len(on_device) == 2 else next(iter(on_device)), video_cfg=self.cfg.data.video)
        out = {}
        for m in self.modalities:
            if m in outputs:
                out[m] = pool_tokens(self.encoder.forward_features(**{m: x[m]}), m).float().cpu()
        if "joint" in outputs or tokens:
            latent = self.encoder.forward_features(**x)
            if "joint" in outputs:
                out["joint"] = pool_tokens(latent, "audiovisual").float().cpu()
            if tokens:
                out["tokens"] = {m: t.float().cpu() for m, t in latent.items()}
        return out

    def encode_items(self, items: list[dict], outputs: Sequence[str] | None = None, tokens: bool = False) -> dict:
        """``RecordViews`` items (errors left out) -> per record embeddings, views averaged as the
        evaluation does (``avmae.evaluation.evaluate.aggregate_views``): ``{"index": (B,), name: (B, D)}``."""
        views = items[0]["video"].shape[0] if "video" in items[0] else items[0]["audio"].shape[0]
        batch = {m: torch.cat([it[m] for it in items]) for m in ("video", "audio") if m in items[0]}
        records = torch.tensor([it["index"] for it in items])
        view = torch.arange(views).repeat(len(items))
        encoded = self.encode(batch, outputs, tokens)
        token_maps = encoded.pop("tokens", None)
        agg = aggregate_views(records.repeat_interleave(views), view, encoded, {})
        order = records.argsort().argsort()  # agg is sorted by index
        out = {"index": records}
        out.update({name: f[order] for name, f in agg["scores"].items()})
        if token_maps is not None:
            out["tokens"] = {
                m: t.double().unflatten(0, (len(items), views)).mean(dim=1).float() for m, t in token_maps.items()
            }
        return out

    def embed(
        self,
        source,
        outputs: Sequence[str] | None = None,
        tokens: bool = False,
        batch_size: int = 8,
    ) -> dict:
        """Embeddings of a file path, a file's bytes, a list of them, or model inputs.

        Args:
            source: a path (``str`` / ``Path``) or the bytes of a video file: returns vectors
                ``(D,)``; a list of paths or bytes: ``(B, D)`` in list order; a dict of model
                inputs (``video (B, C, T, H, W)``, ``audio (B, 1, T_a, F)``, e.g. a DataLoader
                batch): ``(B, D)``, one view per row, no averaging.
            outputs: which of ``video``, ``audio``, ``joint`` (default: all this encoder gives).
            tokens: also return ``tokens``, the token maps of the joint pass.
            batch_size: files encoded together.

        A file that cannot be decoded raises ``ValueError`` naming it (``extract_to_file`` lists
        and skips bad files instead).
        """
        if isinstance(source, dict):
            return self.encode(source, outputs, tokens)
        single = isinstance(source, (str, Path, bytes, bytearray))
        sources = [source] if single else list(source)
        if not sources:
            raise ValueError("nothing to embed")
        results = []
        with as_paths(sources) as paths:
            views = file_views(self.cfg, paths)
            for start in range(0, len(views), batch_size):
                items = [views[i] for i in range(start, min(start + batch_size, len(views)))]
                bad = next((it for it in items if "error" in it), None)
                if bad is not None:
                    raise ValueError(bad["error"])
                results.append(self.encode_items(items, outputs, tokens))
        out = {name: torch.cat([r[name] for r in results]) for name in results[0] if name not in ("index", "tokens")}
        if tokens:
            out["tokens"] = {m: torch.cat([r["tokens"][m] for r in results]) for m in results[0]["tokens"]}
        if single:
            out = {k: ({m: t[0] for m, t in v.items()} if isinstance(v, dict) else v[0]) for k, v in out.items()}
        return out


def load(path: str | Path, device: str | torch.device | None = None, views: int | None = None) -> Embedder:
    """The ``Embedder`` of an export folder: ``avmae.load(path).embed("clip.mp4")``."""
    return Embedder.from_export(path, device, views)


def file_views(cfg: Config, paths: list[Path]) -> RecordViews:
    """The evaluation views of each of ``paths`` in order (records numbered ``0..``), with
    ``cfg.data``'s preprocessing; a missing file raises ``FileNotFoundError`` naming it
    (``AVDataset`` would drop it)."""
    dataset = file_dataset(cfg, [ClipRecord(str(i), Path(p)) for i, p in enumerate(paths)])
    if dataset.missing:
        raise FileNotFoundError(f"no such file: {dataset.missing[0].video}")
    return RecordViews(dataset)


class as_path:
    """A path as is, or bytes written to a temporary ``.mp4`` file removed on exit."""

    def __init__(self, source) -> None:
        self.source, self.tmp = source, None

    def __enter__(self) -> Path:
        if isinstance(self.source, (bytes, bytearray)):
            fd, name = tempfile.mkstemp(suffix=".mp4", prefix="avmae_")
            with os.fdopen(fd, "wb") as f:
                f.write(self.source)
            self.tmp = Path(name)
            return self.tmp
        return Path(self.source)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


class as_paths:
    """``as_path`` of each of ``sources``."""

    def __init__(self, sources: list) -> None:
        self.contexts = [as_path(s) for s in sources]

    def __enter__(self) -> list[Path]:
        return [c.__enter__() for c in self.contexts]

    def __exit__(self, *exc) -> None:
        for c in self.contexts:
            c.__exit__(*exc)


