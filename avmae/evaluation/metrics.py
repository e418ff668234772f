"""Downstream metrics: top-k accuracy, EPIC action accuracy, AudioSet mAP / AUC / d-prime.

All functions take scores after the evaluation's averaging (softmax or sigmoid probabilities; for
the per-head metrics raw logits would do too, as only their order matters, but EPIC's action
scores multiply verb and noun probabilities) and return plain Python floats, so the results go straight
into ``metrics.json``.

- Single-label (VGGSound, AVE, synthetic): ``topk_accuracy``.
- EPIC-KITCHENS-100: ``action_accuracy``; an action is correct at k when its (verb, noun) pair is
  among the k best of the joint ranking by verb score x noun score (the official scoring).
- Multi-label (AudioSet): ``multilabel_metrics``; per-class average precision with scikit-learn's
  ``average_precision_score`` semantics, classes without a positive excluded and reported.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

TOPK = (1, 5)


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each target is among the k highest scores.

    Args:
        scores: ``(N, K)`` class scores.
        targets: ``(N,)`` class indices.
        k: clamped to K, so top-5 of a 3-class task is always correct.

    Returns:
        ``(N,)`` bool.
    """
    if scores.ndim != 2 or targets.ndim != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected scores (N, K) and targets (N,), got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (N, k)
    return (top == targets.long()[:, None]).any(dim=1)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = TOPK) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` in percent for ``(N, K)`` scores and ``(N,)`` targets."""
    return {f"top{k}": 100.0 * topk_correct(scores, targets, k).float().mean().item() for k in ks}


def action_accuracy(
    verb_scores: torch.Tensor,
    noun_scores: torch.Tensor,
    verb_targets: torch.Tensor,
    noun_targets: torch.Tensor,
    ks: Sequence[int] = TOPK,
    chunk: int = 256,
) -> dict[str, float]:
    """EPIC-KITCHENS-100 action top-k in percent, by the joint verb x noun ranking.

    The score of action (v, n) is ``verb_scores[v] * noun_scores[n]``; a clip is correct at k
    when its (verb, noun) pair is among the k highest-scoring of all ``K_verb x K_noun`` pairs
    (the official EPIC-KITCHENS-100 action scoring, epic-kitchens/C1-Action-Recognition). This
    is stricter than "verb in the top-k verbs and noun in the top-k nouns", which accepts up to
    k^2 pairs; top-1 is the same either way.

    Args:
        verb_scores: ``(N, K_verb)``; noun_scores: ``(N, K_noun)``: probabilities (softmax),
            not logits -- a product of scores ranks pairs only when the scores are non-negative.
        verb_targets, noun_targets: ``(N,)`` class indices.
        chunk: clips scored at a time (the pair scores of all clips at once would need
            ``N x K_verb x K_noun`` floats, 1.1 GB for EPIC's validation set).
    """
    if verb_scores.shape[0] != noun_scores.shape[0]:
        raise ValueError(f"verb and noun scores cover different clips: {tuple(verb_scores.shape)}, {tuple(noun_scores.shape)}")
    if bool((verb_scores < 0).any()) or bool((noun_scores < 0).any()):
        raise ValueError("action scores need non-negative verb and noun scores (probabilities, not logits)")
    num_nouns = noun_scores.shape[1]
    pair_targets = verb_targets.long() * num_nouns + noun_targets.long()
    correct = {k: [] for k in ks}
    for begin in range(0, verb_scores.shape[0], chunk):
        end = begin + chunk
        pairs = (verb_scores[begin:end, :, None].float() * noun_scores[begin:end, None, :].float()).flatten(1)
        for k in ks:
            correct[k].append(topk_correct(pairs, pair_targets[begin:end], k))
    return {f"top{k}": 100.0 * torch.cat(correct[k]).float().mean().item() for k in ks}


def d_prime(auc: float) -> float:
    """Sensitivity index of an ROC AUC: ``sqrt(2) * Phi^-1(auc)`` (AudioSet convention)."""
    if not 0.0 < auc < 1.0:
        return math.inf if auc >= 1.0 else -math.inf
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def multilabel_metrics(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> dict:
    """AudioSet-style metrics of ``(N, K)`` scores against ``(N, K)`` multi-hot targets.

    Returns a dict with:
        ``mAP``: mean per-class average precision (percent) over classes with at least one positive;
        ``mAUC``: mean per-class ROC AUC over classes with both positives and negatives;
        ``d_prime``: ``d_prime(mAUC)``;
        ``per_class_ap``: list of K floats, NaN for excluded classes;
        ``excluded_classes``: indices of classes without a positive (not in mAP);
        ``auc_excluded_classes``: indices of classes lacking positives or negatives (not in mAUC).
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"expected scores and targets of one (N, K) shape, got {scores.shape}, {targets.shape}")
    targets = targets > 0.5  # multi-hot, possibly stored as float

    positives = targets.sum(axis=0)
    per_class_ap = np.full(scores.shape[1], np.nan)
    per_class_auc = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if positives[c] == 0:
            continue  # AP is undefined: excluded and reported rather than counted as 0
        per_class_ap[c] = average_precision_score(targets[:, c], scores[:, c])
        if positives[c] < targets.shape[0]:
            per_class_auc[c] = roc_auc_score(targets[:, c], scores[:, c])

    excluded = np.flatnonzero(np.isnan(per_class_ap)).tolist()
    auc_excluded = np.flatnonzero(np.isnan(per_class_auc)).tolist()
    if len(excluded) == scores.shape[1]:
        raise ValueError("no class has a positive example: mAP is undefined")
    mean_auc = float(np.nanmean(per_class_auc)) if len(auc_excluded) < scores.shape[1] else math.nan
    return {
        "mAP": 100.0 * float(np.nanmean(per_class_ap)),
        "mAUC": mean_auc,
        "d_prime": d_prime(mean_auc) if not math.isnan(mean_auc) else math.nan,
        "per_class_ap": per_class_ap.tolist(),
        "excluded_classes": excluded,
        "auc_excluded_classes": auc_excluded,
    }


def classification_metrics(
    scores: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], multi_label: bool
) -> dict[str, dict]:
    """Metrics of every head, plus ``action`` when the heads are EPIC's ``verb`` and ``noun``.

    Args:
        scores: head -> ``(N, K)``.
        targets: head -> ``(N,)`` class indices, or ``(N, K)`` multi-hot when ``multi_label``.

    Returns:
        head -> metric dict (``topk_accuracy`` or ``multilabel_metrics``).
    """
    missing = set(scores) ^ set(targets)
    if missing:
        raise ValueError(f"scores and targets name different heads: {sorted(missing)}")
    out: dict[str, dict] = {}
    for head in scores:
        if multi_label:
            out[head] = multilabel_metrics(scores[head], targets[head])
        else:
            out[head] = topk_accuracy(scores[head], targets[head])
    if not multi_label and {"verb", "noun"} <= set(scores):
        out["action"] = action_accuracy(scores["verb"], scores["noun"], targets["verb"], targets["noun"])
    return out
