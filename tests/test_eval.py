"""Multi-view evaluation: padded duplicates dropped, views averaged, results written."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from avmae.config import load_config
from avmae.evaluation.evaluate import aggregate_views, evaluate, format_table, write_results
from avmae.models import build_classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _rows(num_records: int, num_views: int, num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(num_records).repeat_interleave(num_views)
    view = torch.arange(num_views).repeat(num_records)
    scores = torch.rand(index.numel(), num_classes, generator=gen).softmax(-1)
    labels = torch.randint(0, num_classes, (num_records,), generator=gen)
    return index, view, scores, labels


def test_aggregate_views_drops_a_padded_tail_and_averages_views():
    index, view, scores, labels = _rows(num_records=5, num_views=3, num_classes=4)
    # What a 2-process sampler does with 15 items: each process gets 8, the 16th repeats item 0.
    # Interleave the shards the way a gather returns them, to make the order realistic.
    padded = torch.cat([torch.arange(15), torch.tensor([0])])
    order = torch.cat([padded[0::2], padded[1::2]])
    agg = aggregate_views(index[order], view[order], {"cls": scores[order]}, {"cls": labels[index[order]]})

    assert agg["duplicates"] == 1
    assert agg["index"].tolist() == [0, 1, 2, 3, 4]
    assert agg["views"].tolist() == [3, 3, 3, 3, 3]
    expected = scores.view(5, 3, 4).mean(dim=1)
    torch.testing.assert_close(agg["scores"]["cls"], expected)
    assert torch.equal(agg["targets"]["cls"], labels)


def test_counting_the_duplicate_would_change_the_result():
    """The padded row is a real, different-weighted vote: keeping it would bias record 0."""
    index, view, scores, labels = _rows(num_records=3, num_views=2, num_classes=3, seed=1)
    order = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0])  # two repeats of (record 0, view 0)
    agg = aggregate_views(index[order], view[order], {"cls": scores[order]}, {"cls": labels[index[order]]})
    assert agg["duplicates"] == 2
    naive = scores[[0, 1, 0, 0]].mean(dim=0)
    assert not torch.allclose(agg["scores"]["cls"][0], naive)
    torch.testing.assert_close(agg["scores"]["cls"][0], scores[[0, 1]].mean(dim=0))


def test_aggregate_views_multi_label_targets_and_shapes_checked():
    index = torch.tensor([2, 2, 7, 7])
    view = torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([[0.2, 0.9], [0.4, 0.7], [0.6, 0.1], [0.8, 0.3]])
    multi_hot = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    agg = aggregate_views(index, view, {"tags": scores}, {"tags": multi_hot})
    assert agg["index"].tolist() == [2, 7]
    torch.testing.assert_close(agg["scores"]["tags"], torch.tensor([[0.3, 0.8], [0.7, 0.2]]))
    assert agg["targets"]["tags"].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="index and view"):
        aggregate_views(index, view[:3], {"tags": scores}, {"tags": multi_hot})


@pytest.mark.parametrize("name,multi_label", [("avmae_vggsound_vitl", False), ("avmae_audioset_vitl", True)])
def test_avmae_recipes_average_the_views_logits(name, multi_label, one_thread):
    """scenic projects/av_mae/train_utils.py ``test_step_multimodal``: a record's logits summed
    over its views and divided by their number, then scored; here softmax / sigmoid of that mean.
    A micro MBT classifier of the recipe's kind, 2 records x 3 views in 2 batches."""
    recipe = load_config(CONFIGS / "finetune" / f"{name}.yaml")
    cfg = load_config(None, [
        "model.size=micro", "model.patch_size=8", "data.video.num_frames=4", "data.video.size=32",
        "data.audio.seconds=0.64", "data.audio.num_mel_bins=32", "finetune.fusion=bottleneck",
        "finetune.fusion_layer=2",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = build_classifier(cfg, {"label": 5})
    with torch.no_grad():
        nn.init.normal_(model.heads["label"].weight)  # MBT's zero-initialised head scores every view alike
    g = torch.Generator().manual_seed(1)
    video, audio = torch.randn(6, 3, 4, 32, 32, generator=g), torch.randn(6, 1, 64, 32, generator=g)
    index, view = torch.arange(2).repeat_interleave(3), torch.arange(3).repeat(2)
    targets = (torch.rand(6, 5, generator=g) > 0.5).float() if multi_label else torch.tensor([1, 1, 1, 3, 3, 3])
    batches = [
        {"video": video[rows], "audio": audio[rows], "index": index[rows], "view": view[rows],
         "targets": {"label": targets[rows]}}
        for rows in (slice(0, 4), slice(4, 6))
    ]  # fmt: skip
    _, agg = evaluate(model, batches, Accelerator(cpu=True), "audiovisual", multi_label,
                      aggregate=recipe.finetune.eval_aggregate)

    model.eval()
    with torch.no_grad():
        logits = model(video=video, audio=audio)["label"].view(2, 3, 5)
    mean_logits = logits.sum(dim=1) / 3
    score = torch.sigmoid if multi_label else (lambda x: x.softmax(dim=-1))
    torch.testing.assert_close(agg["scores"]["label"], score(mean_logits))
    # the other order, averaging the views' probabilities, gives other scores
    assert not torch.allclose(score(logits).mean(dim=1), score(mean_logits), atol=1e-4)


def test_write_results_and_table(tmp_path):
    metrics = {
        "labels": {
            "mAP": 41.5,
            "mAUC": 0.9,
            "d_prime": 1.81,
            "per_class_ap": [0.5, math.nan, 0.33],
            "excluded_classes": [1],
            "auc_excluded_classes": [1],
        },
        "num_records": 10,
    }
    write_results(tmp_path, metrics, {"labels": ["Speech", "Dog, barking", "Music"]})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["labels"]["mAP"] == 41.5 and "per_class_ap" not in saved["labels"]
    with open(tmp_path / "per_class_ap_labels.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["index", "name", "ap"],
        ["0", "Speech", "0.500000"],
        ["1", "Dog, barking", ""],
        ["2", "Music", "0.330000"],
    ]
    table = format_table(metrics)
    assert "41.50" in table and "1 classes without a positive" in table


def test_linear_probe_classifier_separates_features_and_sweeps_weight_decay():
    from avmae.evaluation.probe import holdout_split, train_probe

    gen = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(4, 16, generator=gen)

    def split(n):
        y = torch.randint(0, 4, (n,), generator=gen)
        return centres[y] + torch.randn(n, 16, generator=gen), y

    feats, targets = {}, {}
    for name, n in (("train", 120), ("val", 40), ("test", 40)):
        feats[name], y = split(n)
        targets[name] = {"cls": y}
    out = train_probe(feats, targets, {"cls": 4}, multi_label=False, weight_decays=[1e-3, 1e3], max_iter=50)
    assert out["test"]["cls"]["top1"] > 90.0
    # A huge L2 weight squashes the logits to ties, so the sweep must prefer the small one.
    assert out["weight_decay"]["cls"] == 1e-3
    assert set(out["sweep"]["cls"]) == {1e-3, 1e3}
    train_rows, val_rows = holdout_split(50, 0.2, seed=0)
    assert len(val_rows) == 10 and len(set(train_rows.tolist()) | set(val_rows.tolist())) == 50
