"""Losses that are not networks: masked reconstruction, InfoNCE, SimSiam, MoCo v3.

Cross-process negatives: under ``torch.distributed``, InfoNCE gathers both sides from every
process *with* gradient (``torch.distributed.nn.functional.all_gather``), so each process scores
its own rows against the global batch and the gradient flows back to the process that produced
each embedding; with ``group`` (CAV-MAE's per-replica negatives) a row's negatives are its group's
rows only, gathered only when a group spans processes. MoCo v3 gathers only its keys, which come
from the momentum encoder and carry no gradient. Without an initialised process group the local
batch is the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from avmae.config import PATCH_LOSSES


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` on each process -> ``(world * B, ...)`` in rank order, differentiable."""
    if not _distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` on each process -> ``(world * B, ...)`` in rank order, no gradient."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _local_labels(batch: int, device) -> torch.Tensor:
    """Column of each local row's positive inside the gathered batch."""
    rank = dist.get_rank() if _distributed() else 0
    return torch.arange(batch, device=device) + rank * batch


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch ``(..., P)`` standardised over its own values."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: str = "mean") -> torch.Tensor:
    """Squared error over the masked patches only, averaged over the masked patches.

    pred, target: ``(B, N, P)``; mask: ``(B, N)``, 1 = masked. Each masked patch weighs the same;
    visible patches contribute nothing (not even to the gradient). No masked patch -> 0.
    ``patch``: how a patch's ``P`` squared errors are reduced: ``mean`` (MAE; AV-MAE's
    ``normalise_by_output_dimension``) or ``sum`` (AV-MAE without it).
    """
    if patch not in PATCH_LOSSES:
        raise ValueError(f"patch reduction must be one of {', '.join(PATCH_LOSSES)}, got {patch!r}")
    squared = (pred.float() - target.float()).pow(2)
    per_patch = squared.mean(dim=-1) if patch == "mean" else squared.sum(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def masked_patch_mse(
    pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, num_masked: int, norm_pix: bool,
    patch: str = "mean",
) -> torch.Tensor:
    """``masked_mse(pred, target, mask, patch)`` computed on the masked patches only.

    pred: ``(B, N, P)`` (any float dtype); patches: the raw ``(B, N, P)`` patches; mask ``(B, N)``,
    1 = masked, ``num_masked`` ones in every row (the masking policies keep a fixed count).
    The masked rows of both are gathered first, so the fp32 copy of the prediction and the
    ``norm_pix`` target (``normalize_patches``) are built at ``num_masked`` rows, not ``N``. With
    every row holding the same count, the mean over masked patches is a plain mean; ``patch="sum"``
    multiplies the per-value mean by ``P``, the sum of a patch's squared errors averaged.
    """
    if patch not in PATCH_LOSSES:
        raise ValueError(f"patch reduction must be one of {', '.join(PATCH_LOSSES)}, got {patch!r}")
    if num_masked == 0:
        return pred.sum() * 0.0
    ids = mask.argsort(dim=1, descending=True, stable=True)[:, :num_masked]
    index = ids[:, :, None].expand(-1, -1, pred.shape[-1])
    target = torch.gather(patches, 1, index).float()
    if norm_pix:
        target = normalize_patches(target)
    loss = F.mse_loss(torch.gather(pred, 1, index).float(), target)
    return loss if patch == "mean" else loss * pred.shape[-1]


def info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, symmetric: bool = True, group: int = 0
) -> torch.Tensor:
    """Symmetric InfoNCE between paired embeddings, negatives from every process or from a group.

    a, b: ``(B, D)`` L2-normalised; row i of ``a`` and row i of ``b`` are a positive pair.
    ``logit_scale`` = 1 / temperature. Returns ``(CE(a -> b) + CE(b -> a)) / 2``; with
    ``symmetric=False`` only ``CE(a -> b)`` (each ``a`` picks its ``b``), which is CAV-MAE's
    default (``src/models/cav_mae.py``, ``bidirect_contrast=False``: a softmax over the audios for
    each video).

    ``group``: 0 = every other row of the global batch is a negative. ``G > 0`` = the global batch,
    in rank order, is cut into consecutive groups of ``G`` rows (the last one may be smaller) and a
    row's negatives are the other rows of its group: CAV-MAE computes its loss inside each
    ``nn.DataParallel`` replica. The loss is then the mean over groups of each group's mean (under
    DDP, whose gradient averaging over processes makes the global loss the mean of the local ones).
    """
    rows = a.shape[0]
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    if group and rows % group == 0:  # every group lies inside this process: nothing to gather
        all_a, all_b, first_column = a, b, rank * rows
    else:
        all_a, all_b, first_column = gather_with_grad(a), gather_with_grad(b), 0
    global_rows = _local_labels(rows, a.device)  # each local row's place in the global batch
    labels = global_rows - first_column
    logits = [logit_scale * a @ all_b.t()]  # (B, columns)
    if symmetric:
        logits.append(logit_scale * b @ all_a.t())
    if not group:
        return sum(F.cross_entropy(x, labels) for x in logits) / len(logits)

    row_group = global_rows // group
    column_group = (torch.arange(all_b.shape[0], device=a.device) + first_column) // group
    outside = row_group[:, None] != column_group[None, :]
    per_row = sum(F.cross_entropy(x.masked_fill(outside, float("-inf")), labels, reduction="none") for x in logits)
    # weights that make the mean over processes (DDP averages their gradients) the mean over
    # groups of each group's mean; with equal groups, the mean over this process's rows
    total = world * rows
    size = (total - row_group * group).clamp(max=group)
    weight = world / (math.ceil(total / group) * size * len(logits))
    return (per_row * weight).sum()


def simsiam_loss(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """SimSiam: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``; the stop-gradient is applied here."""
    return -0.5 * (
        F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
        + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
    )


def moco_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss``: queries ``(B, D)`` against all processes' keys ``(B, D)``.

    Keys carry no gradient. Scaled by ``2 * temperature`` as in MoCo v3, so the loss magnitude
    does not depend on the temperature.
    """
    q = F.normalize(q, dim=1)
    k = gather_no_grad(F.normalize(k, dim=1))
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, _local_labels(q.shape[0], q.device)) * (2 * temperature)


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3's momentum schedule: ``base`` at progress 0, rising along a half cosine to 1."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
