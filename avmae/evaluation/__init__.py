"""Downstream evaluation: metrics, multi-view evaluation, linear probing (finetuning, which is
training, is a recipe of ``avmae.engine``; so is ``evaluate_finetuned``, which loads its output).

- ``metrics``: top-k, EPIC action accuracy, AudioSet mAP / AUC / d-prime;
- ``evaluate``: per-view predictions gathered from all processes, padded repeats dropped, views
  averaged; ``metrics.json`` and per-class AP files;
- ``probe``: frozen features (pretrained encoder, random encoder or raw inputs) and an L-BFGS
  linear classifier, ``run_linear_probes(cfg, pretrained_or_None, sources)``.
"""

from .metrics import action_accuracy, classification_metrics, multilabel_metrics, topk_accuracy

__all__ = ["action_accuracy", "classification_metrics", "multilabel_metrics", "topk_accuracy"]
