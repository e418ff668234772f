"""The one DataLoader factory: training (shuffled or balanced, ``drop_last``) and evaluation
(ordered, complete), both configured from ``cfg.data``.

Under accelerate the training loader is prepared (sharded across processes) like any other: the
balanced sampler draws the whole epoch's stream once, seeded by ``(train.seed, epoch)``, and
accelerate gives each process its batches of it, exactly as it does with a shuffled loader. An
evaluation loader is sharded the same way; its padded repeats are dropped by
``avmae.evaluation.evaluate``.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from avmae.config import Config
from avmae.data.collate import collate_clips
from avmae.data.manifests import Manifest
from avmae.data.sampler import DistributedWeightedSampler, balanced_weights


def _ignore_signals_in_worker(worker_id: int) -> None:
    # A scheduler's SIGTERM (torchrun signals the whole process group) or a terminal's Ctrl-C must
    # reach only the training process, which finishes its step and saves; a worker killed by it
    # would take the batch it was decoding down with it. Its own process group keeps it out.
    os.setpgid(0, 0)


def balanced_sampler(dataset: Dataset, seed: int, epoch_size: int = 0) -> DistributedWeightedSampler:
    """AudioSet-style weighted sampling on the dataset's first head (``label``; ``verb`` for
    EPIC-KITCHENS): one draw per epoch of the whole batch stream, the same in every process;
    ``epoch_size`` clips per epoch (``data.balanced_epoch_size``; 0: as many as records)."""
    if not hasattr(dataset, "records"):
        raise ValueError("data.balanced_sampling needs a dataset with records and classes (an AVDataset)")
    manifest = Manifest(records=dataset.records, classes=dataset.classes, multi_label=dataset.multi_label)
    head = next(iter(dataset.classes))
    weights = balanced_weights(manifest, head)
    return DistributedWeightedSampler(weights, num_samples=epoch_size or None, num_replicas=1, rank=0, seed=seed)


def build_loader(cfg: Config, dataset: Dataset, train: bool) -> DataLoader:
    """A DataLoader of ``dataset`` with ``cfg.data``'s batch size, workers and pinning.

    ``train``: shuffled (or balanced when ``data.balanced_sampling``), ``drop_last``, multi-clip
    items flattened by ``collate_clips``, persistent workers; its own generator seeded by
    ``train.seed`` keeps it off the global RNG, which a resumed run restores exactly.
    Otherwise: in order, every item, for a multi-view evaluation.
    """
    data = cfg.data
    workers = data.num_workers
    sampler = None
    if train and data.balanced_sampling:
        sampler = balanced_sampler(dataset, cfg.train.seed, data.balanced_epoch_size)
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        collate_fn=collate_clips,
        num_workers=workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        persistent_workers=train and workers > 0,
        prefetch_factor=data.prefetch_factor if workers > 0 else None,
        worker_init_fn=_ignore_signals_in_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
