"""Using a model on raw videos (avmae.inference, tools/extract.py, tools/predict.py, retrieval):
the API's embedding is the evaluation's feature of the same clip and views, and extract.py
writes the same; retrieval ranks equal ranks worked out by hand; an interrupted extraction
resumes to the same file; bad files are listed and skipped; predict names the class a classifier
trained here learned. Real mp4s from the synthetic generator, a micro model."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import avmae
import avmae.inference as inference
import avmae.inference.extract as extract
from avmae.config import load_config, save_config
from avmae.evaluation.retrieval import rank_metrics, retrieval_metrics, retrieval_ranks
from avmae.formats import export
from avmae.models import build_pretrain_model

from conftest import decodable_rows, write_manifests

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """A script of tools/ as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# micro model at a small geometry: 4 frames at 4 fps of 64x64, 0.64 s of audio (64 x 64 fbank)
GEOMETRY = [
    "model.size=micro",
    "model.fusion=mid",
    "model.fusion_layers=1",
    "data.format=synthetic",
    "data.video.num_frames=4",
    "data.video.frame_rate=4.0",
    "data.video.resize=64",
    "data.video.size=64",
    "data.audio.seconds=0.64",
    "data.audio.num_mel_bins=64",
    "data.test_clips=2",
    "data.num_workers=0",
    "data.batch_size=4",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """A micro model: one torch thread is faster than two on a shared machine."""


@pytest.fixture(scope="module")
def setup(synthetic_root, tmp_path_factory):
    """An export of a (random-init, seeded) micro model whose config points at the synthetic set,
    and the decodable clips of each split."""
    tmp = tmp_path_factory.mktemp("inference")
    rows = decodable_rows(synthetic_root)
    overrides = write_manifests(synthetic_root, tmp, rows)
    cfg = load_config(overrides=GEOMETRY + overrides + [f"train.output_dir={tmp / 'runs'}"])
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    step = tmp / "ckpt" / "step_00000001"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    save_config(cfg, step / "config.yaml")
    out = export(step, tmp / "export", "model")
    return {"export": out, "cfg": cfg, "rows": rows, "root": synthetic_root, "tmp": tmp}


def _clips(setup, split="test"):
    return [setup["root"] / r["video"] for r in setup["rows"][split]]


# ---------------------------------------------------------------------------------------------
# the API, extract.py and the evaluation's features agree


def test_api_embedding_equals_extract_and_evaluation_features(setup, tmp_path):
    from avmae.data import build_dataset, build_loader
    from avmae.evaluation.probe import extract_features
    extract_tool = _tool("extract")

    clips = _clips(setup)[:3]
    model = avmae.load(setup["export"], device="cpu")
    assert model.views == 2  # the export's data.test_clips x test_crops
    api = model.embed(clips)
    single = model.embed(clips[1])
    assert set(api) == {"video", "audio", "joint"}
    assert api["video"].shape == (3, 128) and api["joint"].shape == (3, 256) and single["audio"].shape == (128,)
    for name in api:
        torch.testing.assert_close(single[name], api[name][1], rtol=1e-5, atol=1e-5)
    from_bytes = model.embed(clips[1].read_bytes())
    for name in api:
        torch.testing.assert_close(from_bytes[name], single[name], rtol=0, atol=0)

    # the linear probe's features: the test split through the evaluation dataset and loader
    cfg = setup["cfg"]
    dataset = build_dataset(cfg, "test", train=False)
    encoder = avmae.from_pretrained(setup["export"]).encoder
    ids = [r.id for r in dataset.records]
    rows = [ids.index(Path(c).stem) for c in clips]
    batches = list(build_loader(cfg, dataset, train=False))  # decoded once for the three features
    for modalities, name in (("video", "video"), ("audio", "audio"), ("audiovisual", "joint")):
        features, _ = extract_features({"p": encoder}, batches, modalities, cfg)
        torch.testing.assert_close(api[name], features["p"][rows], rtol=1e-5, atol=1e-5)

    # extract.py on the same files and views
    out = tmp_path / "emb.npz"
    assert extract_tool.main([str(setup["export"]), *map(str, clips), str(out), "--workers", "0", "--device", "cpu"]) == 0
    with np.load(out, allow_pickle=False) as z:
        assert z["id"].tolist() == [c.stem for c in clips] and int(z["views"]) == 2
        for name in api:
            torch.testing.assert_close(torch.from_numpy(z[name]), api[name], rtol=1e-5, atol=1e-5)

    # views are averaged: one view is another feature
    one_view = avmae.load(setup["export"], device="cpu", views=1).embed(clips[1])
    assert not torch.allclose(one_view["joint"], single["joint"], atol=1e-4)


def test_embedding_model_inputs_and_tokens(setup):
    model = avmae.load(setup["export"], device="cpu")
    clip = _clips(setup)[0]
    inputs = model.preprocess(clip)  # (V, ...) views of the eval path
    assert inputs["video"].dtype == torch.uint8 and inputs["video"].shape == (2, 3, 4, 64, 64)
    per_view = model.embed(inputs)
    assert per_view["audio"].shape == (2, 128)
    averaged = model.embed(clip, tokens=True)
    torch.testing.assert_close(averaged["audio"], per_view["audio"].double().mean(0).float(), rtol=1e-5, atol=1e-6)
    assert averaged["tokens"]["video"].shape == (32, 128) and averaged["tokens"]["audio"].shape == (16, 128)
    # the joint embedding pools the tokens it returns
    torch.testing.assert_close(averaged["joint"][:128], averaged["tokens"]["video"].mean(0), rtol=1e-4, atol=1e-5)
    # a file that is not there is named, as embed names it
    absent = clip.with_name("absent.mp4")
    for call in (model.preprocess, model.embed):
        with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
            call(absent)


# ---------------------------------------------------------------------------------------------
# retrieval metrics


def test_retrieval_ranks_equal_hand_computed_ranks_with_ties():
    """Cosine similarities of 4 clips; a tie with the partner counts against it (rank = number of
    candidates at least as similar as the partner)."""
    s = 2**-0.5
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    # audio->video similarity rows:  a0 [1, 0, 1, -1]: partner 1, tied with v2 -> rank 2
    #   a1 [0, 1, 0, 0] -> 1;  a2 [s, s, s, -s]: three at s -> 3;  a3 [0, -1, 0, 0]: v0, v2, v3 at 0 -> 3
    # video->audio rows: v0 [1, 0, s, 0] -> 1;  v1 [0, 1, s, -1] -> 1;  v2 [1, 0, s, 0]: a0 above -> 2;
    #   v3 [-1, 0, -s, 0]: a1 and a3 at 0 -> 2
    assert s > 0
    for block in (1, 3, 1024):
        assert retrieval_ranks(audio, video, block).tolist() == [2, 1, 3, 3]
        assert retrieval_ranks(video, audio, block).tolist() == [1, 1, 2, 2]
    metrics = retrieval_metrics({"audio": audio, "video": video}, block=3)
    assert metrics["audio->video"] == {"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "median_rank": 2.5, "mean_rank": 2.25}
    assert metrics["video->audio"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "median_rank": 1.5, "mean_rank": 1.5}
    assert metrics["clips"] == 4 and metrics["chance"]["R@1"] == 25.0 and metrics["chance"]["median_rank"] == 2.5
    # a collapsed encoder (every clip one vector) ranks every partner last
    assert retrieval_ranks(torch.ones(5, 3), torch.ones(5, 3)).tolist() == [5] * 5


def test_retrieval_ranks_equal_sorting_without_ties():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(37, 8, generator=gen), torch.randn(37, 8, generator=gen)
    sim = (q / q.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).T
    expected = [int((np.argsort(-row.numpy(), kind="stable") == i).nonzero()[0][0]) + 1 for i, row in enumerate(sim)]
    assert retrieval_ranks(q, g, block=5).tolist() == expected
    ranks = torch.tensor(expected)
    m = rank_metrics(ranks)
    assert m["R@10"] == pytest.approx(100 * sum(r <= 10 for r in expected) / 37)
    assert m["median_rank"] == float(np.median(expected)) and m["mean_rank"] == pytest.approx(np.mean(expected))


def test_retrieval_over_a_split_and_a_cavmae_subset(setup, tmp_path):
    """tools/eval.py --task retrieval scores the API's per-modality embeddings of the split's
    clips; a CAV-MAE JSON subset restricts it to its video_ids."""
    eval_tool = _tool("eval")

    clips = _clips(setup)
    api = avmae.load(setup["export"], device="cpu").embed(clips)
    expected = retrieval_metrics({"audio": api["audio"], "video": api["video"]})
    out = tmp_path / "split"
    assert eval_tool.main([str(setup["export"]), "--task", "retrieval", "--out", str(out)]) == 0
    metrics = json.loads((out / "retrieval.json").read_text())
    assert metrics["clips"] == len(clips) and metrics["views"] == 2
    for direction in ("audio->video", "video->audio"):
        assert metrics[direction] == pytest.approx(expected[direction])

    chosen = [r["id"] for r in setup["rows"]["test"][:3]]
    subset = tmp_path / "subset.json"
    entries = [{"video_id": i, "wav": f"{i}.wav", "video_path": "/x", "labels": "/m/0"} for i in chosen + ["absent"]]
    subset.write_text(json.dumps({"data": entries}))
    out = tmp_path / "subset"
    assert eval_tool.main([str(setup["export"]), "--task", "retrieval", "--subset", str(subset), "--out", str(out)]) == 0
    metrics = json.loads((out / "retrieval.json").read_text())
    assert metrics["clips"] == 3 and metrics["subset_missing"] == 1
    expected = retrieval_metrics({"audio": api["audio"][:3], "video": api["video"][:3]})
    assert metrics["audio->video"] == pytest.approx(expected["audio->video"])
    assert metrics["video->audio"] == pytest.approx(expected["video->audio"])


def test_retrieval_overrides_change_the_exports_own_data_section(setup, tmp_path):
    """Without --config, key=value overrides apply to the export's own config: one view per clip."""
    clips = _clips(setup)
    api = avmae.load(setup["export"], device="cpu", views=1).embed(clips)
    expected = retrieval_metrics({"audio": api["audio"], "video": api["video"]})
    out = tmp_path / "one_view"
    assert _tool("eval").main([str(setup["export"]), "--task", "retrieval", "--out", str(out), "data.test_clips=1"]) == 0
    metrics = json.loads((out / "retrieval.json").read_text())
    assert metrics["clips"] == len(clips) and metrics["views"] == 1
    for direction in ("audio->video", "video->audio"):
        assert metrics[direction] == pytest.approx(expected[direction])


# ---------------------------------------------------------------------------------------------
# extraction: resumable, bad files listed


def _extract(setup, out, clips, **kwargs):
    model = avmae.load(setup["export"], device="cpu", views=1)
    records = inference.file_records(clips, root=setup["root"])
    return inference.extract_to_file(model, out, records, batch_size=2, progress=False, **kwargs)


def test_an_interrupted_extraction_resumes_to_the_same_file(setup, tmp_path, monkeypatch):
    with open(setup["root"] / "bad_clips.csv") as f:
        bad = [setup["root"] / r["video"] for r in csv.DictReader(f) if r["kind"] in ("truncated", "short")]
    clips = sorted(_clips(setup, "train")[:4] + bad)  # 6 files, 2 of them bad: 3 batches of 2
    whole = _extract(setup, tmp_path / "whole.npz", clips)

    real_save, saved = extract._save_batch, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(args[0])
        if len(saved) == 1:
            raise KeyboardInterrupt  # stopped after the first of three batches

    monkeypatch.setattr(extract, "_save_batch", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _extract(setup, tmp_path / "resumed.npz", clips)
    monkeypatch.setattr(extract, "_save_batch", real_save)
    assert not (tmp_path / "resumed.npz").exists()
    assert len(list((tmp_path / "resumed.npz.parts").glob("batch_*.npz"))) == 1
    with pytest.raises(ValueError, match="other inputs or settings"):  # not resumed with other inputs
        _extract(setup, tmp_path / "resumed.npz", clips[:-1])

    encoded = []
    real_encode = inference.Embedder.encode_items
    monkeypatch.setattr(inference.Embedder, "encode_items", lambda self, items, *a, **k: encoded.append(len(items)) or real_encode(self, items, *a, **k))
    resumed = _extract(setup, tmp_path / "resumed.npz", clips)
    assert len(encoded) <= 2  # only the two missing batches were computed
    assert resumed["clips"] == whole["clips"] == 4 and resumed["bad"] == whole["bad"] == 2
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert a.files == b.files
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
    assert (tmp_path / "whole.bad.tsv").read_text() == (tmp_path / "resumed.bad.tsv").read_text()
    assert not (tmp_path / "resumed.npz.parts").exists()


def test_bad_files_are_listed_and_the_run_goes_on(setup, tmp_path):
    extract_tool = _tool("extract")

    with open(setup["root"] / "bad_clips.csv") as f:
        bad = {row["id"]: row["kind"] for row in csv.DictReader(f)}
    good = _clips(setup, "train")[:2]
    broken = [setup["root"] / "clips" / f"{i}.mp4" for i, kind in bad.items() if kind in ("truncated", "short", "video_only")]
    missing = tmp_path / "no_such_clip.mp4"
    out = tmp_path / "emb.npz"
    files = [good[0], *broken, missing, good[1]]
    assert extract_tool.main([str(setup["export"]), *map(str, files), str(out), "--workers", "0", "--device", "cpu"]) == 0
    with np.load(out) as z:
        assert z["id"].tolist() == [good[0].stem, good[1].stem]
    with open(tmp_path / "emb.bad.tsv") as f:
        listed = {row["id"]: row["error"] for row in csv.DictReader(f, delimiter="\t")}
    assert set(listed) == {p.stem for p in broken} | {"no_such_clip"}
    assert "not found" in listed["no_such_clip"]
    assert all(str(setup["root"] / "clips" / f"{i}.mp4") in listed[i] for i in listed if i != "no_such_clip")
    # the API raises on a bad file, naming it
    with pytest.raises(ValueError, match=broken[0].name):
        avmae.load(setup["export"], device="cpu").embed(broken[0])


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_names_the_class_a_trained_classifier_learned(setup, tmp_path, capsys):
    """A classifier (micro encoder, seeded) whose head is trained here on the eval-path features
    of the training clips; predict.py must name each training clip's class."""
    from avmae.data import build_dataset, build_loader
    from avmae.formats import save_finetuned
    from avmae.evaluation.evaluate import model_inputs
    from avmae.models import build_classifier
    from avmae.config import replace
    predict_tool = _tool("predict")

    cfg = setup["cfg"]
    cfg = replace(
        cfg,
        data=replace(cfg.data, test_clips=1),
        finetune=replace(cfg.finetune, heads={"label": 4}, modalities="audiovisual"),
    )
    torch.manual_seed(0)
    model = build_classifier(cfg, {"label": 4}).eval()
    dataset = build_dataset(cfg, "train", train=False)
    feats, labels = [], []
    with torch.no_grad():
        for batch in build_loader(cfg, dataset, train=False):
            feats.append(model.forward_features(**model_inputs(batch, "audiovisual", video_cfg=cfg.data.video)))
            labels.append(batch["targets"]["label"])
    x, y = torch.cat(feats), torch.cat(labels)
    head = model.heads["label"]
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    assert (head(x).argmax(1) == y).float().mean() == 1.0
    folder = save_finetuned(model, cfg, tmp_path / "classifier")

    classes = (setup["root"] / "classes.txt").read_text().split()
    rows = setup["rows"]["train"][:4]
    files = [str(setup["root"] / r["video"]) for r in rows]
    assert predict_tool.main([str(folder), *files, "--json", "--top-k", "2", "--device", "cpu"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in predictions] == [Path(f).name for f in files]
    for p, row in zip(predictions, rows):
        assert p["label"][0]["class"] == classes[int(row["label"])]
        assert p["label"][0]["score"] >= p["label"][1]["score"]
    assert predict_tool.main([str(folder), files[0]]) == 0
    assert classes[int(rows[0]["label"])] in capsys.readouterr().out


@pytest.mark.parametrize("aggregate", ["probs", "logits"])
def test_predict_scores_equal_the_multiview_evaluation(setup, tmp_path, aggregate):
    """``Classifier.scores`` of the test files equal ``evaluate``'s view-aggregated scores of the
    same records, with the views' probabilities or their logits averaged (finetune.eval_aggregate)."""
    from accelerate import Accelerator

    from avmae.config import replace
    from avmae.data import build_dataset, build_loader
    from avmae.evaluation.evaluate import evaluate
    from avmae.formats import save_finetuned
    from avmae.inference import Classifier
    from avmae.models import build_classifier

    cfg = setup["cfg"]
    cfg = replace(
        cfg,
        data=replace(cfg.data, test_clips=2),
        finetune=replace(cfg.finetune, heads={"label": 4}, modalities="audiovisual", eval_aggregate=aggregate),
    )
    torch.manual_seed(0)
    model = build_classifier(cfg, {"label": 4}).eval()
    with torch.no_grad():  # logits far from uniform, so that the two aggregates differ
        model.heads["label"][-1].weight.normal_(std=2.0)
    folder = save_finetuned(model, cfg, tmp_path / "classifier")

    dataset = build_dataset(cfg, "test", train=False)
    _, agg = evaluate(model, build_loader(cfg, dataset, train=False), Accelerator(cpu=True), "audiovisual",
                      False, video_cfg=cfg.data.video, aggregate=aggregate)  # fmt: skip
    files = [dataset.records[i].video for i in agg["index"].tolist()]
    scores, _ = Classifier(folder, device="cpu").scores(files)
    predicted = torch.stack([s["label"] for s in scores])
    torch.testing.assert_close(predicted, agg["scores"]["label"], rtol=1e-5, atol=1e-6)
    other = "probs" if aggregate == "logits" else "logits"
    _, agg_other = evaluate(model, build_loader(cfg, dataset, train=False), Accelerator(cpu=True), "audiovisual",
                            False, video_cfg=cfg.data.video, aggregate=other)  # fmt: skip
    assert not torch.allclose(predicted, agg_other["scores"]["label"], rtol=1e-3, atol=1e-4)
