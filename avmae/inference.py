"""Use a model: embeddings, feature files, retrieval and class predictions from raw videos.

    import avmae
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

``extract_to_file`` writes the embeddings of many clips to one ``.npz`` in resumable chunks;
``run_retrieval`` scores audio<->video retrieval (``avmae.evaluation.retrieval``);
``Classifier`` gives the top-k class names of a finetuned model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from avmae.config import Config, DataConfig, modality_set, replace
from avmae.data.audio import AudioDecodeError
from avmae.data.dataset import AVDataset
from avmae.data.manifests import ClipRecord, Manifest
from avmae.data.video import VideoDecodeError
from avmae.evaluation.evaluate import aggregate_views, model_inputs
from avmae.evaluation.probe import encoder_of, pool_tokens

log = logging.getLogger(__name__)

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


def _as_list(items: list) -> list:
    return items


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
        from avmae.formats import export_config, from_pretrained

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
        other = object.__new__(Embedder)
        other.device, other.encoder, other.modalities = self.device, self.encoder, self.modalities
        other.cfg = replace(self.cfg, data=data)
        return other

    # ---- preprocessing ---------------------------------------------------------------------

    def split_dataset(self, split: str, missing_list: Path | None = None) -> AVDataset:
        """The evaluation dataset of ``split`` of ``cfg.data`` (any manifest format, or shards)."""
        from avmae.data import build_dataset

        data = self.cfg.data if missing_list is None else replace(self.cfg.data, missing_list=str(missing_list))
        return build_dataset(replace(self.cfg, data=data), split, train=False)

    def dataset(self, records: list[ClipRecord], missing_list: Path | None = None) -> AVDataset:
        return file_dataset(self.cfg, records, missing_list)

    def preprocess(self, source: str | Path | bytes) -> dict[str, torch.Tensor]:
        """One file (a path or its bytes) -> ``{"video": (V, C, T, H, W) uint8, "audio": (V, 1, T_a, F)}``."""
        with _as_path(source) as path:
            item = RecordViews(self.dataset([ClipRecord(Path(path).stem, Path(path))]))[0]
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
        index = torch.tensor([it["index"] for it in items]).repeat_interleave(views)
        view = torch.arange(views).repeat(len(items))
        encoded = self.encode(batch, outputs, tokens)
        token_maps = encoded.pop("tokens", None)
        agg = aggregate_views(index, view, encoded, {})
        order = torch.tensor([it["index"] for it in items]).argsort().argsort()  # agg is sorted by index
        out = {"index": torch.tensor([it["index"] for it in items])}
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
        with _as_paths(sources) as paths:
            views = RecordViews(_present(self.dataset(_numbered(paths)), paths))
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


def _numbered(paths: list[Path]) -> list[ClipRecord]:
    return [ClipRecord(str(i), Path(p)) for i, p in enumerate(paths)]


def _present(dataset: AVDataset, paths: list[Path]) -> AVDataset:
    """``dataset``, checked to hold every one of ``paths`` (``AVDataset`` drops missing files)."""
    if len(dataset.records) != len(paths):
        present = {str(r.video) for r in dataset.records}
        raise FileNotFoundError(f"no such file: {next(str(p) for p in paths if str(p) not in present)}")
    return dataset


class _as_path:
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


class _as_paths:
    def __init__(self, sources: list) -> None:
        self.contexts = [_as_path(s) for s in sources]

    def __enter__(self) -> list[Path]:
        return [c.__enter__() for c in self.contexts]

    def __exit__(self, *exc) -> None:
        for c in self.contexts:
            c.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# many clips: features in memory, or a resumable feature file


def iterate_embeddings(
    embedder: Embedder,
    dataset: AVDataset,
    indices: Sequence[int] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    outputs: Sequence[str] | None = None,
    progress: bool = False,
) -> Iterable[tuple[dict | None, list[dict]]]:
    """Per batch of records (consecutive ``batch_size`` of ``indices``): ``(embeddings or None, bad)``
    where ``bad`` lists ``{"index", "id", "path", "error"}`` of the batch's undecodable records.
    Batches are fixed by position, so a batch always holds the same records whatever ran before."""
    views = RecordViews(dataset, indices)
    loader = DataLoader(views, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, total=len(loader), unit="batch", desc="embedding")
    for items in loader:
        good = [it for it in items if "error" not in it]
        bad = [it for it in items if "error" in it]
        for it in bad:
            log.warning("skipping %s (%s): %s", it["id"], it["path"], it["error"])
        yield (embedder.encode_items(good, outputs) if good else None), bad


def embed_dataset(embedder: Embedder, dataset: AVDataset, indices: Sequence[int] | None = None, **kwargs) -> dict:
    """Embeddings of the decodable records of ``dataset``: ``{"index": (M,), "id": [M], name: (M, D),
    "bad": [...]}`` in record order."""
    chunks, bad = [], []
    for emb, batch_bad in iterate_embeddings(embedder, dataset, indices, **kwargs):
        bad += batch_bad
        if emb is not None:
            chunks.append(emb)
    if not chunks:
        raise ValueError(f"no decodable clip among {len(indices) if indices is not None else len(dataset.records)}")
    out = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    out["id"] = [dataset.records[i].id for i in out["index"].tolist()]
    out["bad"] = bad
    return out


def _bad_rows(path: Path) -> list[dict]:
    """Records of a missing-file list (``id<TAB>video<TAB>audio``) as bad rows."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        clip_id, video, audio = (line.split("\t") + ["", ""])[:3]
        rows.append({"id": clip_id, "path": video, "error": f"file not found: {audio or video}"})
    return rows


def bad_list_path(out: Path) -> Path:
    """``emb.npz`` -> ``emb.bad.tsv``."""
    return out.with_name(out.name.removesuffix(".npz") + ".bad.tsv")


def extract_to_file(
    embedder: Embedder,
    out: str | Path,
    records: list[ClipRecord] | None = None,
    split: str | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    outputs: Sequence[str] | None = None,
    progress: bool = True,
    settings: dict | None = None,
) -> dict:
    """Write the embeddings of ``records`` (or of the ``split`` of ``embedder.cfg.data``, see
    ``Embedder.with_data``) to ``out`` (``.npz``).

    The file holds ``id`` (clip ids, unicode), one float32 ``(M, D)`` array per output, and
    ``views``; undecodable and missing files are listed in ``<out>.bad.tsv`` (``id, path,
    error``) and left out. Work goes into ``<out>.parts/`` one batch at a time (each batch's
    file written whole, then renamed); a rerun with the same inputs and settings skips the
    batches already there, and the final file equals that of an uninterrupted run. Returns
    ``{"clips", "bad", "out", "bad_list"}``.
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the output must be a .npz file")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    outputs = tuple(outputs or embedder.outputs)
    if (records is None) == (split is None):
        raise ValueError("give either records or a split")
    if records is not None:
        dataset = embedder.dataset(records, missing_list=parts / "missing.tsv")
    else:
        dataset = embedder.split_dataset(split, missing_list=parts / "missing.tsv")
    missing = _bad_rows(parts / "missing.tsv")
    # batches are positions in this record list: a rerun must see the same list and settings
    ids = hashlib.sha256("\n".join(f"{r.id}\t{r.video}" for r in dataset.records).encode()).hexdigest()
    identity = {"views": embedder.views, "outputs": list(outputs), "batch_size": batch_size, "records": ids, **(settings or {})}
    settings_file = parts / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != json.loads(json.dumps(identity)):
        raise ValueError(
            f"{parts} holds a run with other inputs or settings ({settings_file.read_text().strip()}); "
            f"remove it or rerun with those"
        )
    settings_file.write_text(json.dumps(identity))

    num_batches = -(-len(dataset.records) // batch_size)
    done = {int(p.stem.split("_")[1]) for p in parts.glob("batch_*.npz")}
    todo = [b for b in range(num_batches) if b not in done]
    indices = [i for b in todo for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset.records)))]
    if done:
        print(f"resuming: {len(done)} of {num_batches} batches already in {parts}")
    batches = iterate_embeddings(embedder, dataset, indices, batch_size, num_workers, outputs, progress)
    for (emb, bad), b in zip(batches, todo):
        _save_batch(parts / f"batch_{b:08d}.npz", dataset, emb, bad, outputs)

    ids, arrays, bad = [], {name: [] for name in outputs}, list(missing)
    for b in range(num_batches):
        with np.load(parts / f"batch_{b:08d}.npz", allow_pickle=False) as part:
            ids += part["id"].tolist()
            for name in outputs:
                arrays[name].append(part[name])
            bad += [{"id": i, "path": p, "error": e} for i, p, e in zip(part["bad_id"], part["bad_path"], part["bad_error"])]
    if not ids:
        raise ValueError(f"no decodable clip among {len(dataset.records) + len(missing)} inputs; see {bad_list_path(out)}")
    final = {"id": np.array(ids, dtype=str), **{n: np.concatenate(a) for n, a in arrays.items()}, "views": np.array(embedder.views)}
    partial = out.with_name(f".{out.name}.{os.getpid()}.npz")
    np.savez(partial, **final)
    os.replace(partial, out)
    with open(bad_list_path(out), "w") as f:
        f.write("id\tpath\terror\n")
        for row in bad:
            f.write(f"{row['id']}\t{row['path']}\t{' '.join(str(row['error']).split())}\n")
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()
    return {"clips": len(ids), "bad": len(bad), "out": out, "bad_list": bad_list_path(out)}


def _save_batch(path: Path, dataset: AVDataset, emb: dict | None, bad: list[dict], outputs: Sequence[str]) -> None:
    """One batch's embeddings and bad records, written whole then renamed into place."""
    arrays = {
        "id": np.array([dataset.records[i].id for i in emb["index"].tolist()] if emb else [], dtype=str),
        "bad_id": np.array([b["id"] for b in bad], dtype=str),
        "bad_path": np.array([b["path"] for b in bad], dtype=str),
        "bad_error": np.array([b["error"] for b in bad], dtype=str),
    }
    for name in outputs:
        arrays[name] = emb[name].numpy() if emb else np.zeros((0, 0), dtype=np.float32)
    partial = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# retrieval


def read_subset(path: str | Path) -> set[str]:
    """The clip ids of a CAV-MAE JSON data file (``{"data": [{"video_id": ...}, ...]}``), such as
    its 5-clips-per-class retrieval subsets."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {str(entry["video_id"]) for entry in data["data"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a CAV-MAE data file ({{\"data\": [{{\"video_id\": ...}}]}}): {err}") from err


def _stem(record: ClipRecord) -> str | None:
    return record.video.stem if record.video is not None else None


def run_retrieval(
    embedder: Embedder,
    dataset: AVDataset,
    subset: set[str] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    block: int = 1024,
    progress: bool = False,
) -> dict:
    """Audio->video and video->audio retrieval over the decodable records of ``dataset`` (those
    whose id is in ``subset``, when given): ``avmae.evaluation.retrieval.retrieval_metrics`` of
    the per-modality embeddings, plus ``bad`` (undecodable clips, left out) and ``subset_missing``
    (subset ids with no record)."""
    from avmae.evaluation.retrieval import retrieval_metrics

    if set(embedder.modalities) != {"audio", "video"}:
        raise ValueError(f"retrieval needs an encoder of both modalities, got {embedder.modalities}")
    indices = None
    if subset is not None:
        # a CAV-MAE video_id is the record id (VGGSound, CAV-MAE JSON) or the video file's stem
        # (AudioSet's YTID, whose record id adds the segment start)
        indices = [i for i, r in enumerate(dataset.records) if r.id in subset or _stem(r) in subset]
        if not indices:
            raise ValueError(f"none of the {len(subset)} subset ids is a record of the dataset")
    emb = embed_dataset(
        embedder, dataset, indices, batch_size=batch_size, num_workers=num_workers, outputs=("video", "audio"), progress=progress
    )
    device = embedder.device
    metrics = retrieval_metrics({m: emb[m].to(device) for m in ("audio", "video")}, block)
    metrics["bad"] = [b["id"] for b in emb["bad"]]
    if subset is not None:
        metrics["subset_missing"] = len(subset - {r.id for r in dataset.records} - {_stem(r) for r in dataset.records})
    return metrics


def evaluate_retrieval(
    export_dir: str | Path,
    split: str = "test",
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    subset: str | Path | None = None,
    views: int | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    num_workers: int | None = None,
) -> dict:
    """``run_retrieval`` of an export on ``split`` of a dataset: the data section of ``config``
    (default: the export's own) with ``overrides``, the export's preprocessing, ``views`` clips
    per file (default ``data.test_clips x data.test_crops``), restricted to the ids of a CAV-MAE
    JSON ``subset``. Writes ``retrieval.json`` to ``out_dir`` (default
    ``export_dir/retrieval_<split>``), prints the table, returns the metrics."""
    from avmae.config import config_to_dict, load_config
    from avmae.evaluation.retrieval import format_retrieval

    embedder = load(export_dir, device)
    if config is not None or overrides:
        if config is not None:
            data = load_config(config, overrides).data
        else:  # the export's own data section, overridden
            base = config_to_dict(embedder.cfg)
            data = _with_overrides(base, overrides).data
        embedder = embedder.with_data(data)
    embedder = embedder.with_data(eval_data_config(embedder.cfg.data, views))
    workers = embedder.cfg.data.num_workers if num_workers is None else num_workers
    dataset = embedder.split_dataset(split)
    metrics = run_retrieval(
        embedder, dataset, read_subset(subset) if subset else None, embedder.cfg.data.batch_size, workers, progress=True
    )
    metrics.update(split=split, views=embedder.views, subset=str(subset) if subset else None)
    out_dir = Path(out_dir) if out_dir else Path(export_dir) / f"retrieval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval.json").write_text(json.dumps(metrics, indent=2))
    print(format_retrieval(metrics, f"{split}: audio-visual retrieval, {embedder.views} views"))
    if metrics["bad"]:
        print(f"{len(metrics['bad'])} clips could not be decoded and were left out (listed in {out_dir / 'retrieval.json'})")
    return metrics


def _with_overrides(base: dict, overrides: list[str] | None) -> Config:
    from omegaconf import OmegaConf

    from avmae.config import config_from_dict

    merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(list(overrides or [])))
    return config_from_dict(OmegaConf.to_container(merged))


# ---------------------------------------------------------------------------------------------
# class predictions of a finetuned classifier


class Classifier:
    """A finetuned classifier folder (``model.safetensors`` + ``config.yaml``, see
    ``avmae.formats.load_finetuned``) with its evaluation preprocessing and class names.

    ``predict(files, k)`` averages the per-view softmax (sigmoid for multi-label data) over the
    config's ``data.test_clips x data.test_crops`` views, as ``tools/eval.py`` scores them.
    """

    def __init__(
        self,
        path: str | Path,
        labels: dict[str, str | Path] | None = None,
        device: str | torch.device | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        from avmae.formats import load_finetuned

        self.model, self.cfg = load_finetuned(path, overrides)
        self.device = torch.device(device) if device is not None else default_device()
        self.model.to(self.device)
        self.modalities = self.cfg.finetune.modalities
        self.classes, self.multi_label = class_names(self.cfg, labels)

    @torch.no_grad()
    def scores(self, sources: Sequence[str | Path | bytes], batch_size: int = 8) -> tuple[list[dict], list[str]]:
        """Per decodable file: head -> ``(K,)`` view-averaged probabilities; plus the ids of the
        records (file stems, in order); bad files raise ``ValueError`` naming them."""
        with _as_paths(list(sources)) as paths:
            views = RecordViews(_present(file_dataset(self.cfg, _numbered(paths)), paths))
            results = []
            for i in range(len(views)):
                item = views[i]
                if "error" in item:
                    raise ValueError(item["error"])
                inputs = {m: item[m].to(self.device) for m in modality_set(self.modalities)}
                logits = self.model(**model_inputs(inputs, self.modalities, video_cfg=self.cfg.data.video))
                act = (lambda x: x.float().sigmoid()) if self.multi_label else (lambda x: x.float().softmax(dim=-1))
                results.append({h: act(l).double().mean(dim=0).float().cpu() for h, l in logits.items()})
        return results, [Path(str(s)).name if not isinstance(s, (bytes, bytearray)) else "<bytes>" for s in sources]

    def predict(self, sources: Sequence[str | Path | bytes], k: int = 5) -> list[dict]:
        """Per file: ``{"file", head: [{"class", "index", "score"}, ...k]}``, best first."""
        scores, names = self.scores(sources)
        out = []
        for name, per_head in zip(names, scores):
            row = {"file": name}
            for head, s in per_head.items():
                top = s.topk(min(k, s.numel()))
                row[head] = [
                    {"class": self.classes[head][i], "index": i, "score": float(v)}
                    for v, i in zip(top.values.tolist(), top.indices.tolist())
                ]
            out.append(row)
        return out


def class_names(cfg: Config, labels: dict[str, str | Path] | None = None) -> tuple[dict[str, list[str]], bool]:
    """Class names per head, and whether the heads are multi-label.

    ``labels``: head -> a label file (``avmae.data.manifests.read_class_list``: AudioSet's
    ``class_labels_indices.csv``, VGGSound's, EPIC's verb and noun csvs, one name a line).
    Heads without one take the names of the config's own dataset (its manifest read as
    training read it); failing that, class numbers.
    """
    from avmae.data.manifests import read_class_list, read_manifest

    heads = dict(cfg.finetune.heads)
    names: dict[str, list[str]] = {}
    multi_label = cfg.data.format in ("audioset", "cavmae")
    for head, path in (labels or {}).items():
        if head not in heads:
            raise ValueError(f"no head {head!r} in this classifier (heads {sorted(heads)})")
        names[head] = read_class_list(Path(path))
    if set(names) != set(heads):
        for split in dict.fromkeys((cfg.finetune.eval_split, "test", "val", "train")):
            try:
                manifest = read_manifest(cfg.data, split)
            except (OSError, ValueError) as err:
                log.debug("class names from the %s manifest: %s", split, err)
                continue
            multi_label = manifest.multi_label
            names = {**manifest.classes, **names}
            break
    for head, k in heads.items():
        if head not in names:
            log.warning("no class names for head %s (give a label file); using class numbers", head)
            names[head] = [str(i) for i in range(k)]
        if len(names[head]) != k:
            raise ValueError(f"head {head!r} has {k} classes but its label list has {len(names[head])}")
    return {h: names[h] for h in heads}, multi_label
