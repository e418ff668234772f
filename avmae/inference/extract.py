"""Embeddings of many clips: in memory (``embed_dataset``), or in one ``.npz`` feature file written
in resumable batches (``extract_to_file``, ``tools/extract.py``). Undecodable clips are counted,
listed and skipped. docs/architecture.md, "Using a model".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from avmae.data import AVDataset, ClipRecord
from avmae.inference.embed import Embedder, RecordViews

log = logging.getLogger(__name__)



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
    loader = DataLoader(views, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list)
    if progress:
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
    missing = [
        {"id": r.id, "path": str(r.video), "error": f"file not found: {r.audio or r.video}"} for r in dataset.missing
    ]
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
    _write_npz(out, final)
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
    _write_npz(path, arrays)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a file aside, then renamed into place: ``path`` is whole or absent."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
