"""AudioSet balanced sampling that works across processes.

``balanced_weights(manifest)`` gives each record the AudioSet weight of YuanGongND/cav-mae
``src/gen_weight_file.py``: a class weighs ``1000 / (count + 0.01)`` and a record the sum over
its labels. ``DistributedWeightedSampler`` makes one global draw per epoch, with replacement and
seeded by ``(seed, epoch)`` so that every process computes the same draw, and gives each process
its own disjoint share of it.

Training builds it through ``avmae.data.build_loader`` with one replica (the whole stream) and
lets accelerate shard the batches, as for a shuffled loader; ``num_replicas > 1`` is for loops
that shard without accelerate.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from avmae.data.manifests import Manifest


def balanced_weights(manifest: Manifest, head: str = "label") -> torch.Tensor:
    """``(N,)`` float64 sampling weight of each record (multi- or single-label targets of ``head``).

    Pass the records the dataset can draw (``AVDataset.records``, missing files dropped), so the
    class counts are those of the clips that can be drawn.
    """
    num_classes = len(manifest.classes[head])
    labels = []
    for record in manifest.records:
        value = record.targets[head]
        labels.append(list(value) if isinstance(value, (list, tuple)) else [value])
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for record_labels in labels:
        counts[record_labels] += 1.0
    class_weight = 1000.0 / (counts + 0.01)
    return torch.stack([class_weight[record_labels].sum() for record_labels in labels])


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded over processes.

    Each epoch draws ``num_samples * num_replicas`` indices from ``weights`` with a generator
    seeded by ``seed + epoch``; process ``rank`` takes every ``num_replicas``-th of them starting
    at ``rank``. The shares are disjoint positions of one draw, so together they are a single
    weighted sample, whatever the number of processes.

    The sampler already shards: build the DataLoader of each process with it and do not let a
    launcher shard that DataLoader again.

    Args:
        weights: ``(N,)`` non-negative weights (need not sum to 1).
        num_samples: indices per process and epoch; default ``ceil(N / num_replicas)``.
        num_replicas, rank: default from ``torch.distributed`` when initialised, else 1 and 0.
        seed: base seed, equal in every process.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.ndim != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty 1-D tensor, got shape {tuple(weights.shape)}")
        if (weights < 0).any() or not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        self.weights = weights
        self.num_samples = num_samples or math.ceil(weights.numel() / self.num_replicas)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_draw(self) -> torch.Tensor:
        """The epoch's draw of ``num_samples * num_replicas`` indices, the same in every process."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        return torch.multinomial(self.weights, total, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_draw()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
