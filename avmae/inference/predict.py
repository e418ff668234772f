"""Class predictions of a finetuned classifier on raw videos (``tools/predict.py``): the top-k
class names per head, the view-averaged probabilities scored as ``tools/eval.py`` scores them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from avmae.config import Config, modality_set
from avmae.data.manifests import read_class_list, read_manifest
from avmae.evaluation.evaluate import model_inputs, probabilities
from avmae.formats import load_finetuned
from avmae.inference.embed import as_paths, default_device, file_views

log = logging.getLogger(__name__)



class Classifier:
    """A finetuned classifier folder (``model.safetensors`` + ``config.yaml``, see
    ``avmae.formats.load_finetuned``) with its evaluation preprocessing and class names.

    ``predict(files, k)`` scores the config's ``data.test_clips x data.test_crops`` views of each
    file as ``tools/eval.py`` does: softmax (sigmoid for multi-label data), with the views'
    probabilities or logits averaged as ``finetune.eval_aggregate`` says.
    """

    def __init__(
        self,
        path: str | Path,
        labels: dict[str, str | Path] | None = None,
        device: str | torch.device | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        self.model, self.cfg = load_finetuned(path, overrides)
        self.device = torch.device(device) if device is not None else default_device()
        self.model.to(self.device)
        self.modalities = self.cfg.finetune.modalities
        self.classes, self.multi_label = class_names(self.cfg, labels)

    @torch.no_grad()
    def scores(self, sources: Sequence[str | Path | bytes]) -> tuple[list[dict], list[str]]:
        """Per decodable file: head -> ``(K,)`` probabilities over its views, aggregated by
        ``finetune.eval_aggregate`` as ``avmae.evaluation.evaluate.evaluate_multiview`` does; plus
        the ids of the records (file stems, in order); bad files raise ``ValueError`` naming them."""
        average_logits = self.cfg.finetune.eval_aggregate == "logits"
        with as_paths(list(sources)) as paths:
            views = file_views(self.cfg, paths)
            results = []
            for i in range(len(views)):
                item = views[i]
                if "error" in item:
                    raise ValueError(item["error"])
                inputs = {m: item[m].to(self.device) for m in modality_set(self.modalities)}
                logits = self.model(**model_inputs(inputs, self.modalities, video_cfg=self.cfg.data.video))
                if average_logits:  # the probabilities of the mean logits
                    per_head = {h: probabilities(l.float().double().mean(dim=0).float(), self.multi_label) for h, l in logits.items()}
                else:  # the mean of the views' probabilities
                    per_head = {h: probabilities(l, self.multi_label).double().mean(dim=0).float() for h, l in logits.items()}
                results.append({h: p.cpu() for h, p in per_head.items()})
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
