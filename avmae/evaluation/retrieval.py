"""Audio-visual retrieval: rank each clip's true partner among all clips of the other modality.

The protocol of CAV-MAE (YuanGongND/cav-mae ``src/retrieval.py``): every clip's audio and video
are embedded separately (each modality's tokens mean-pooled), the similarity is the cosine,
and a query's rank is the position of its own clip's other modality among all clips sorted by
similarity. Reported per direction (audio->video: audio queries, video gallery; video->audio the
reverse): R@1, R@5, R@10 (percent of queries whose partner ranks within k), the median and the
mean rank (1 = best).

Ties: a candidate whose similarity equals the partner's counts as ranked before it, so the rank
is the number of candidates at least as similar as the partner (its own pair included). An
encoder that maps every clip to one vector thus ranks every partner last, never first. (CAV-MAE's
``compute_metrics`` finds the partner's value in the sorted row with ``np.where``, which counts a
tied row once per tied position; on real-valued features ties are rare and both rules agree.)

The similarity matrix is computed on the features' device in blocks of query rows, so memory is
``block x N`` rather than ``N x N`` and no Python loop runs over clips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = {"audio->video": ("audio", "video"), "video->audio": ("video", "audio")}
RECALL_AT = (1, 5, 10)


@torch.no_grad()
def retrieval_ranks(queries: torch.Tensor, gallery: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The 1-based rank of ``gallery[i]`` for ``queries[i]`` by cosine similarity, ties pessimistic.

    Args:
        queries: ``(N, D)`` query embeddings; gallery: ``(N, D')`` embeddings of the same N clips
            in the same order (``D' = D``).
        block: query rows per similarity block.

    Returns:
        ``(N,)`` int64 ranks in ``[1, N]``, on the CPU.
    """
    if queries.ndim != 2 or queries.shape != gallery.shape:
        raise ValueError(f"queries and gallery must be (N, D) of one shape, got {tuple(queries.shape)}, {tuple(gallery.shape)}")
    q = F.normalize(queries.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1).to(q.device)
    ranks = []
    for start in range(0, q.shape[0], block):
        sim = q[start : start + block] @ g.T  # (b, N)
        rows = torch.arange(sim.shape[0], device=sim.device)
        partner = sim[rows, rows + start]  # the same matmul's value, so a tie is an exact tie
        ranks.append((sim >= partner[:, None]).sum(dim=1).cpu())
    return torch.cat(ranks)


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 (percent), median rank (the mean of the two middle ranks for an even count, as
    ``numpy.median``) and mean rank of ``(N,)`` 1-based ranks."""
    ranks = ranks.double()
    metrics = {f"R@{k}": 100.0 * float((ranks <= k).double().mean()) for k in RECALL_AT}
    metrics["median_rank"] = float(torch.quantile(ranks, 0.5))
    metrics["mean_rank"] = float(ranks.mean())
    return metrics


def retrieval_metrics(features: dict[str, torch.Tensor], block: int = 1024) -> dict[str, dict[str, float]]:
    """Both directions' ``rank_metrics`` from ``{"audio": (N, D), "video": (N, D)}`` embeddings of
    the same N clips; plus ``clips`` (N) and ``chance``: what a random ranking scores, R@k
    ``100 k / N`` and median rank ``(N + 1) / 2`` (the expectation of both)."""
    n = features["audio"].shape[0]
    if n == 0:
        raise ValueError("retrieval needs at least one clip")
    result = {}
    for name, (query, gallery) in DIRECTIONS.items():
        result[name] = rank_metrics(retrieval_ranks(features[query], features[gallery], block))
    result["clips"] = n
    result["chance"] = {f"R@{k}": 100.0 * min(k, n) / n for k in RECALL_AT}
    result["chance"]["median_rank"] = (n + 1) / 2
    return result


def format_retrieval(metrics: dict, title: str = "retrieval") -> str:
    """One row per direction: R@1/5/10 (%), median and mean rank."""
    columns = [f"R@{k}" for k in RECALL_AT] + ["median_rank", "mean_rank"]
    lines = [f"{title} ({metrics['clips']} clips; chance R@1 {metrics['chance']['R@1']:.2f} %)"]
    lines.append(f"{'direction':<14} " + " ".join(f"{c:>11}" for c in columns))
    for name in DIRECTIONS:
        lines.append(f"{name:<14} " + " ".join(f"{metrics[name][c]:>11.2f}" for c in columns))
    return "\n".join(lines)
