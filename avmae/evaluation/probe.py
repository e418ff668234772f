"""Linear probing: a frozen feature extractor, features computed once, a linear classifier on top.

Pretrained, random-init and raw-input features go through one code path and one decoding pass,
so their numbers are comparable; the L-BFGS classifier's weight decay is chosen on the
validation split (or a held-out share of the training records). docs/architecture.md, "Training",
says what each source and setting does.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader

from avmae.config import Config, modality_set
from avmae.data import build_dataset, build_loader
from avmae.models import AVEncoder, build_encoder
from .evaluate import aggregate_views, model_inputs
from .metrics import multilabel_metrics, topk_accuracy

log = logging.getLogger(__name__)


def pool_tokens(tokens: dict[str, torch.Tensor], modalities: str) -> torch.Tensor:
    """Mean over tokens of each modality, concatenated video then audio: ``(B, N, D)`` -> ``(B, D')``."""
    return torch.cat([tokens[name].mean(dim=1) for name in modality_set(modalities)], dim=1)


def pool_raw(
    inputs: dict[str, torch.Tensor], video_grid: tuple[int, int, int], audio_grid: tuple[int, int]
) -> torch.Tensor:
    """Inputs average-pooled to a small grid and flattened, video then audio.

    Args:
        inputs: ``video`` ``(B, C, T, H, W)`` and/or ``audio`` ``(B, 1, T_a, F)``.
        video_grid: ``(t, h, w)`` output grid; audio_grid: ``(t, f)``.

    Returns:
        ``(B, C*t*h*w + t*f)`` for audiovisual inputs.
    """
    parts = []
    if "video" in inputs:
        parts.append(rearrange(F.adaptive_avg_pool3d(inputs["video"], video_grid), "b c t h w -> b (c t h w)"))
    if "audio" in inputs:
        parts.append(rearrange(F.adaptive_avg_pool2d(inputs["audio"], audio_grid), "b c t f -> b (c t f)"))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def extract_features(
    extractors: dict[str, nn.Module | None],
    loader: DataLoader,
    modalities: str,
    cfg: Config,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features of every record of ``loader``'s dataset from each extractor, views averaged; the
    clips are decoded once for all of them.

    Args:
        extractors: name -> an ``AVEncoder`` (``forward_features(video=None, audio=None)``), or
            None for raw pooled inputs.

    Returns:
        name -> ``features`` ``(M, D)`` in record order, and ``targets`` head -> ``(M,)`` or ``(M, K)``.
    """
    for encoder in extractors.values():
        if encoder is not None:
            encoder.eval().to(device)
    index, view, feats, targets = [], [], {name: [] for name in extractors}, []
    for batch in loader:
        on_device = {k: v.to(device) for k, v in batch.items() if k in ("video", "audio")}
        inputs = model_inputs(on_device, modalities, video_cfg=cfg.data.video)  # uint8 video normalised there
        for name, encoder in extractors.items():
            if encoder is None:
                grids = tuple(cfg.finetune.probe_raw_video_grid), tuple(cfg.finetune.probe_raw_audio_grid)
                f = pool_raw(inputs, *grids)
            else:
                f = pool_tokens(encoder.forward_features(**inputs), modalities)
            feats[name].append(f.float().cpu())
        index.append(batch["index"])
        view.append(batch["view"])
        targets.append(batch["targets"])
    if not index:
        raise ValueError("the feature loader yielded no batch")
    agg = aggregate_views(
        torch.cat(index),
        torch.cat(view),
        {name: torch.cat(f) for name, f in feats.items()},
        {h: torch.cat([t[h] for t in targets]) for h in targets[0]},
    )
    return agg["scores"], agg["targets"]


def _score(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> dict[str, float]:
    return multilabel_metrics(logits, targets) if multi_label else topk_accuracy(logits, targets)


def _selection_value(scores: dict[str, float], multi_label: bool) -> float:
    return scores["mAP"] if multi_label else scores["top1"]


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, multi_label: bool, weight_decay: float, max_iter: int
) -> nn.Linear:
    """Full-batch L-BFGS on ``(N, D)`` features: cross-entropy, or BCE for multi-hot ``(N, K)`` targets.

    ``weight_decay`` is the coefficient of ``0.5 * ||W||^2`` (the bias is not decayed).
    """
    torch.manual_seed(0)  # the fit is convex; the seed only fixes the starting point
    linear = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        logits = linear(x)
        if multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, y.float())
        else:
            loss = F.cross_entropy(logits, y.long())
        loss = loss + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


class Standardize(nn.Module):
    """``(x - mean) / std`` with statistics of the training features (constant dims left at 0)."""

    def __init__(self, train_features: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", train_features.mean(dim=0))
        self.register_buffer("std", train_features.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_probe(
    features: dict[str, torch.Tensor],
    targets: dict[str, dict[str, torch.Tensor]],
    num_classes: dict[str, int],
    multi_label: bool,
    weight_decays: list[float],
    max_iter: int = 200,
) -> dict:
    """Fit one linear classifier per head, choosing the weight decay on the ``val`` split.

    Args:
        features: split (``train``, ``val``, optionally ``test``) -> ``(N_split, D)``.
        targets: split -> head -> ``(N_split,)`` class indices or ``(N_split, K)`` multi-hot.
        num_classes: head -> K.

    Returns:
        dict with ``weight_decay`` (head -> chosen value), ``sweep`` (head -> {wd: val score}) and,
        per split, head -> metrics (``topk_accuracy`` or ``multilabel_metrics`` summary).
    """
    norm = Standardize(features["train"])
    x = {split: norm(f) for split, f in features.items()}
    result: dict = {"weight_decay": {}, "sweep": {}, **{split: {} for split in features}}
    for head, k in num_classes.items():
        best, best_wd, sweep = None, None, {}
        for wd in weight_decays:
            linear = fit_linear(x["train"], targets["train"][head], k, multi_label, wd, max_iter)
            with torch.no_grad():
                value = _selection_value(_score(linear(x["val"]), targets["val"][head], multi_label), multi_label)
            sweep[wd] = value
            if best is None or value > sweep[best_wd]:
                best, best_wd = linear, wd
        result["weight_decay"][head], result["sweep"][head] = best_wd, sweep
        with torch.no_grad():
            for split in features:
                scores = _score(best(x[split]), targets[split][head], multi_label)
                result[split][head] = {k: v for k, v in scores.items() if isinstance(v, float)}
    return result


def holdout_split(num: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic ``(train_rows, val_rows)`` of ``range(num)``, ``fraction`` of them held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"finetune.probe_holdout must be in (0, 1), got {fraction}")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(math.floor(num * fraction)))
    return perm[held:], perm[:held]


def encoder_of(module: nn.Module) -> nn.Module:
    """The ``AVEncoder`` of an ``AVEncoder``, ``AVMAE`` or ``AVClassifier`` (what exports hold)."""
    if isinstance(module, AVEncoder):
        return module
    inner = getattr(module, "encoder", None)
    if isinstance(inner, AVEncoder):
        return inner
    raise TypeError(f"expected an AVEncoder or a model holding one, got {type(module).__name__}")


SOURCES = ("pretrained", "random", "raw")


def run_linear_probes(cfg: Config, pretrained: nn.Module | None, sources: tuple[str, ...] = SOURCES) -> list[dict]:
    """Linear probes of ``cfg.finetune.modalities`` features on ``cfg.data``, one per source, on
    features extracted in one pass over the clips.

    Args:
        pretrained: a pretrained encoder (or a model holding one); needed for ``pretrained``.
        sources: ``pretrained`` (its mean-pooled tokens), ``random`` (the same from a randomly
            initialised encoder of ``cfg.model``, seeded by ``train.seed``) and ``raw`` (pooled
            inputs).

    Returns:
        per source, ``train_probe``'s result plus ``source``, ``modalities``, ``dim`` and
        ``records`` per split. Accuracies are percentages.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"probe sources must be among {SOURCES}, got {sources}")
    ft = cfg.finetune
    extractors: dict[str, nn.Module | None] = {}
    for source in sources:
        if source == "pretrained":
            if pretrained is None:
                raise ValueError("the pretrained probe needs a pretrained model (finetune.pretrained)")
            extractors[source] = encoder_of(pretrained)
        elif source == "random":
            torch.manual_seed(cfg.train.seed)
            extractors[source] = build_encoder(cfg, modality_set(ft.modalities))
        else:
            extractors[source] = None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = ("train", "test") if ft.probe_holdout > 0 else ("train", "val", "test")
    features: dict[str, dict[str, torch.Tensor]] = {source: {} for source in sources}
    targets = {}
    for split in splits:
        dataset = build_dataset(cfg, split, train=False)
        split_features, targets[split] = extract_features(
            extractors, build_loader(cfg, dataset, train=False), ft.modalities, cfg, device
        )
        for source in sources:
            features[source][split] = split_features[source]
        classes, multi_label = dataset.classes, dataset.multi_label
    if ft.probe_holdout > 0:
        keep, held = holdout_split(targets["train"][next(iter(classes))].shape[0], ft.probe_holdout, cfg.train.seed)
        for per_split in features.values():
            per_split["val"], per_split["train"] = per_split["train"][held], per_split["train"][keep]
        targets["val"] = {h: t[held] for h, t in targets["train"].items()}
        targets["train"] = {h: t[keep] for h, t in targets["train"].items()}

    num_classes = {head: len(names) for head, names in classes.items()}
    results = []
    for source in sources:
        per_split = features[source]
        result = train_probe(per_split, targets, num_classes, multi_label, list(ft.probe_weight_decays), ft.probe_max_iter)
        result.update(
            source=source,
            modalities=ft.modalities,
            dim=int(per_split["train"].shape[1]),
            records={split: int(f.shape[0]) for split, f in per_split.items()},
        )
        results.append(result)
    return results


def format_probe_results(results: list[dict]) -> str:
    """One row per probe: source, feature size, chosen weight decay, and the selection metric
    (top-1 or mAP) on train / val / test for every head."""
    lines = [f"{'features':<12} {'head':<8} {'dim':>6} {'wd':>8} {'train':>8} {'val':>8} {'test':>8}"]
    for r in results:
        for head, wd in r["weight_decay"].items():
            name = "mAP" if "mAP" in r["train"][head] else "top1"
            cells = [r[split][head][name] for split in ("train", "val", "test")]
            lines.append(
                f"{r['source']:<12} {head:<8} {r['dim']:>6} {wd:>8.0e} " + " ".join(f"{c:8.2f}" for c in cells)
            )
    return "\n".join(lines)
