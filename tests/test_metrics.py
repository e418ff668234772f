"""Downstream metrics against scikit-learn and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, top_k_accuracy_score

from avmae.evaluation.metrics import (
    action_accuracy,
    classification_metrics,
    d_prime,
    multilabel_metrics,
    topk_accuracy,
)


def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.15, 0.05, 0.0],  # target 1: top-1
            [0.3, 0.2, 0.1, 0.25, 0.1, 0.05],  # target 3: second -> top-5 only
            [0.6, 0.1, 0.1, 0.1, 0.05, 0.05],  # target 5: last -> wrong at 5
            [0.0, 0.0, 0.9, 0.1, 0.0, 0.0],  # target 2: top-1
        ]
    )
    targets = torch.tensor([1, 3, 5, 2])
    assert topk_accuracy(scores, targets) == {"top1": 50.0, "top5": 75.0}


def test_topk_accuracy_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 12, generator=gen)  # continuous: no ties
    targets = torch.randint(0, 12, (300,), generator=gen)
    ours = topk_accuracy(scores, targets, ks=(1, 3, 5))
    for k in (1, 3, 5):
        ref = 100.0 * top_k_accuracy_score(targets.numpy(), scores.numpy(), k=k, labels=np.arange(12))
        assert ours[f"top{k}"] == pytest.approx(ref)


def test_topk_clamps_k_to_number_of_classes():
    scores = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert topk_accuracy(scores, torch.tensor([0, 0])) == {"top1": 50.0, "top5": 100.0}


def test_action_topk_ranks_verb_noun_pairs_jointly():
    """Hand-computed EPIC action scores (verb probability x noun probability, over all pairs)."""
    verb = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.2, 0.7], [0.9, 0.05, 0.05]])
    noun = torch.tensor([[0.5, 0.45, 0.05], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
    verb_t = torch.tensor([1, 2, 0])
    noun_t = torch.tensor([1, 1, 2])
    # clip 0: pairs (0,0)=.30 (0,1)=.27 (1,0)=.20 (1,1)=.18 -> the target (1,1) ranks 4th, although
    #         verb 1 and noun 1 are each within their own top 2;
    # clip 1: (2,1)=.49 is the best pair -> rank 1;
    # clip 2: (0,0)=.45 (0,1)=.27 (0,2)=.18 -> the target (0,2) ranks 3rd.
    out = action_accuracy(verb, noun, verb_t, noun_t, ks=(1, 2, 3, 4, 5))
    assert out == {
        "top1": pytest.approx(100 / 3), "top2": pytest.approx(100 / 3), "top3": pytest.approx(200 / 3),
        "top4": 100.0, "top5": 100.0,
    }
    # scored a clip at a time: the same
    assert action_accuracy(verb, noun, verb_t, noun_t, ks=(1, 2, 3, 4, 5), chunk=1) == out
    with pytest.raises(ValueError, match="probabilities"):
        action_accuracy(verb.log(), noun, verb_t, noun_t)

    metrics = classification_metrics({"verb": verb, "noun": noun}, {"verb": verb_t, "noun": noun_t}, False)
    assert metrics["verb"]["top1"] == pytest.approx(200 / 3)
    assert metrics["noun"]["top1"] == pytest.approx(100 / 3)
    assert metrics["action"] == {"top1": pytest.approx(100 / 3), "top5": 100.0}


def test_map_equals_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 15)) < 0.2).astype(np.float32)
    targets[0] = 1  # every class has a positive
    scores = rng.random((200, 15)).astype(np.float32)
    out = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    assert out["mAP"] == pytest.approx(100 * average_precision_score(targets, scores, average="macro"))
    assert out["mAUC"] == pytest.approx(roc_auc_score(targets, scores, average="macro"))
    assert out["excluded_classes"] == []
    # Random scores: AUC near 0.5, d-prime near 0.
    assert abs(out["d_prime"]) < 0.3


def test_map_excludes_and_reports_classes_without_positives():
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.5], [0.3, 0.6, 0.1], [0.4, 0.7, 0.9], [0.8, 0.1, 0.2]])
    out = multilabel_metrics(scores, targets)
    # Class 0: ranks 0.9 (+), 0.8 (-), 0.4 (+), 0.3 (-): precisions 1 and 2/3 -> AP 5/6.
    # Class 1: ranks 0.7 (+), 0.6 (+): AP 1.
    assert out["per_class_ap"][0] == pytest.approx(5 / 6)
    assert out["per_class_ap"][1] == pytest.approx(1.0)
    assert math.isnan(out["per_class_ap"][2])
    assert out["excluded_classes"] == [2]
    assert out["mAP"] == pytest.approx(100 * (5 / 6 + 1) / 2)
    # Class 0 AUC: positive/negative pairs (0.9,0.8) (0.9,0.3) (0.4,0.8) (0.4,0.3) -> 3/4.
    assert out["mAUC"] == pytest.approx((0.75 + 1.0) / 2)


def test_d_prime_values():
    assert d_prime(0.5) == pytest.approx(0.0)
    # Phi^-1(0.8413447) = 1, so d' = sqrt(2).
    assert d_prime(0.8413447460685429) == pytest.approx(math.sqrt(2))
    assert d_prime(1.0) == math.inf


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="no class has a positive"):
        multilabel_metrics(np.random.rand(4, 3), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="different heads"):
        classification_metrics({"a": torch.rand(2, 3)}, {"b": torch.tensor([0, 1])}, False)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        topk_accuracy(torch.rand(3), torch.tensor([0, 1, 2]))
