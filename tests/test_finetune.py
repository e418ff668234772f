"""Finetuning and linear probing from an export, on real mp4 files.

- layer-wise lr decay reaches the optimiser through the timm scheduler;
- a model exported at one geometry (8 frames of 64x64, 2.56 s) finetunes and evaluates at
  another (4 frames of 32x32, 1.28 s): positional embeddings are recomputed, weights unchanged;
- 2 processes under ``accelerate launch`` finetune a few steps, then evaluate a split whose length
  leaves the sampler padding: the padded repeat is dropped, and a single-process evaluation of the
  saved model gives the same numbers;
- the linear probe runs on raw inputs and on a random encoder.
"""

import csv
import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import decodable_rows, kill_process_tree, write_manifests
from safetensors.torch import load_file, save_file

import avmae
from avmae.config import load_config, save_config
from avmae.engine import read_scalars
from avmae.engine.finetune import build_model, classification_loss, prepare_config
from avmae.engine.optim import build_optimizer, build_scheduler
from avmae.formats import export
from avmae.models import build_classifier, build_pretrain_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
FINETUNE = REPO / "configs" / "finetune" / "synthetic.yaml"
# finetuning geometry, different from the demo's pretraining geometry in every token axis
GEOMETRY = [
    "data.video.num_frames=4",
    "data.video.resize=32",
    "data.video.size=32",
    "data.audio.seconds=1.28",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.test_clips=1",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An encoder export of the demo's micro model, made at the demo geometry, with its own
    normalisation statistics (so inheriting them is visible)."""
    root = tmp_path_factory.mktemp("pretrained")
    cfg = load_config(DEMO, ["data.audio.norm_mean=-4.5", "data.audio.norm_std=3.5"])
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    step = root / "step_00000010"
    step.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    save_config(cfg, step / "config.yaml")
    export(step, root / "export_audio", part="audio")
    return export(step, root / "export", part="encoder")


@pytest.fixture(scope="module")
def clean_data(synthetic_root, tmp_path_factory):
    """Overrides pointing at the session dataset's decodable clips: train, a 3-record val split
    (odd, so two processes at batch 2 need one padded repeat) and test."""
    rows = decodable_rows(synthetic_root)
    rows["val"] = (rows["val"] + rows["test"])[:3]
    assert len(rows["val"]) == 3 and len(rows["train"]) >= 8
    return write_manifests(synthetic_root, tmp_path_factory.mktemp("manifests"), rows)


def test_layer_decay_is_applied_by_the_timm_scheduler():
    cfg = load_config(FINETUNE, ["train.warmup_epochs=0"])
    model = build_classifier(cfg, {"label": 4})
    optimizer = build_optimizer(model, cfg.train, lr=1.0, layer_decay=0.5)
    scheduler = build_scheduler(optimizer, cfg.train, num_steps=10, num_warmup=0)
    scheduler.step_update(0)
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[p] = group["lr"]
    named = dict(model.named_parameters())
    # micro mid fusion: stem, 3 per-modality blocks, 1 joint block, then the heads: 6 layers
    assert lr_of[named["heads.label.2.weight"]] == pytest.approx(1.0)
    assert lr_of[named["encoder.blocks.0.attn.qkv.weight"]] == pytest.approx(0.5)
    assert lr_of[named["encoder.modality_blocks.audio.2.mlp.fc1.weight"]] == pytest.approx(0.25)
    assert lr_of[named["encoder.modality_blocks.video.0.mlp.fc1.weight"]] == pytest.approx(0.0625)
    assert lr_of[named["encoder.patch_embed.audio.embed.proj.weight"]] == pytest.approx(0.5**5)
    scheduler.step_update(5)  # half-way down the cosine: every group keeps its ratio
    head_lr, stem_lr = lr_of[named["heads.label.2.weight"]], lr_of[named["encoder.patch_embed.audio.embed.proj.weight"]]
    by_param = {p: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert by_param[named["heads.label.2.weight"]] < head_lr
    assert by_param[named["encoder.patch_embed.audio.embed.proj.weight"]] / by_param[
        named["heads.label.2.weight"]
    ] == pytest.approx(stem_lr / head_lr)


def test_classification_losses():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen)
    labels = torch.randint(0, 5, (6,), generator=gen)
    smoothing = 0.1
    soft = torch.full((6, 5), smoothing / 5).scatter_(1, labels[:, None], 1 - smoothing + smoothing / 5)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(classification_loss({"label": logits}, {"label": soft}, False), expected)
    multi_hot = (torch.rand(6, 5, generator=gen) > 0.7).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, multi_hot)
    torch.testing.assert_close(classification_loss({"label": logits}, {"label": multi_hot}, True), expected)


def test_export_made_at_one_geometry_fits_another(exported):
    # The finetune config asks for another fusion and default normalisation: the export wins on
    # both (architecture must match the weights; inputs must be normalised as in pretraining).
    cfg = prepare_config(load_config(FINETUNE, GEOMETRY + ["model.fusion=late", f"finetune.pretrained={exported}"]))
    assert cfg.model.fusion == "mid" and cfg.model.size == "micro"
    assert (cfg.data.audio.norm_mean, cfg.data.audio.norm_std) == (-4.5, 3.5)
    assert (cfg.data.video.num_frames, cfg.data.video.size, cfg.data.audio.target_length) == (4, 32, 128)

    model = build_model(cfg, {"label": 4}, log=lambda *_: None).eval()
    pretrained = avmae.from_pretrained(exported)
    assert pretrained.pos_embed["audio"].grid == (16, 8) and model.encoder.pos_embed["audio"].grid == (8, 8)
    assert pretrained.pos_embed["video"].grid == (4, 4, 4) and model.encoder.pos_embed["video"].grid == (2, 2, 2)
    weights = pretrained.state_dict()
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, weights[name]), name

    gen = torch.Generator().manual_seed(0)
    small = {"video": torch.randn(2, 3, 4, 32, 32, generator=gen), "audio": torch.randn(2, 1, 128, 128, generator=gen)}
    large = {"video": torch.randn(2, 3, 8, 64, 64, generator=gen), "audio": torch.randn(2, 1, 256, 128, generator=gen)}
    with torch.no_grad():
        assert model(**small)["label"].shape == (2, 4)
        # at the pretraining geometry the finetuning model computes exactly the exported encoder
        ours, theirs = model.encoder.forward_features(**large), pretrained.forward_features(**large)
    for m in ("video", "audio"):
        assert torch.equal(ours[m], theirs[m])


def test_one_modality_export_refuses_audiovisual_finetuning(exported):
    audio_only = exported.parent / "export_audio"
    cfg = prepare_config(load_config(FINETUNE, GEOMETRY + [f"finetune.pretrained={audio_only}"]))
    with pytest.raises(ValueError, match="holds only the audio encoder; set finetune.modalities=audio"):
        build_model(cfg, {"label": 4}, log=lambda *_: None)
    audio_cfg = prepare_config(
        load_config(FINETUNE, GEOMETRY + [f"finetune.pretrained={audio_only}", "finetune.modalities=audio"])
    )
    model = build_model(audio_cfg, {"label": 4}, log=lambda *_: None)
    assert model.modalities == ("audio",)


@pytest.mark.parametrize("recipe,fusion", [("avmae_vggsound_vitl", "late"), ("avmae_audioset_vitl", "mid")])
def test_mbt_final_norm_starts_as_scenic_initialises_it(recipe, fusion, tmp_path):
    """scenic projects/av_mae/mbt.py: ``initialise_from_separate_encoders`` renames only the blocks
    and embeddings, so MBT's ``encoder_norm`` keeps flax's LayerNorm initialisation (scale 1,
    bias 0); ``initialise_from_mid_fusion`` renames ``Transformer_concat/encoder_norm`` to it. The
    pretraining's final norms are moved away from that initialisation first."""
    pre_cfg = load_config(DEMO, [f"model.fusion={fusion}", f"model.stack_norms={fusion == 'mid'}"])
    torch.manual_seed(0)
    pre = build_pretrain_model(pre_cfg)
    with torch.no_grad():
        for name, param in pre.encoder.named_parameters():
            if name.startswith("norm."):
                param.add_(torch.randn_like(param))
    step = tmp_path / "step_00000001"
    step.mkdir()
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(step / "model.safetensors"))
    save_config(pre_cfg, step / "config.yaml")
    exported = export(step, tmp_path / "export", part="encoder")

    final_norm = load_config(REPO / "configs" / "finetune" / f"{recipe}.yaml").finetune.mbt_final_norm
    cfg = prepare_config(load_config(FINETUNE, GEOMETRY + [
        f"finetune.pretrained={exported}", "finetune.fusion=bottleneck", "finetune.fusion_layer=2",
        f"finetune.mbt_final_norm={final_norm}",
    ]))  # fmt: skip
    model = build_model(cfg, {"label": 4}, log=lambda *_: None)
    for m in ("video", "audio"):
        norm = model.encoder.norm[m]
        if fusion == "late":  # the source's fresh LayerNorm
            assert torch.equal(norm.weight, torch.ones(norm.weight.shape))
            assert torch.equal(norm.bias, torch.zeros(norm.bias.shape))
            assert not torch.equal(pre.encoder.norm[m].weight, norm.weight)
        else:  # the pretrained joint norm, in each modality's norm
            assert torch.equal(norm.weight, pre.encoder.norm.weight) and torch.equal(norm.bias, pre.encoder.norm.bias)
        block, pretrained_block = model.encoder.modality_blocks[m][0], pre.encoder.modality_blocks[m][0]
        assert torch.equal(block.attn.qkv.weight, pretrained_block.attn.qkv.weight)


def _tool(name: str):
    """A script of tools/ as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch_args(*args: str) -> list[str]:
    """``accelerate launch`` of 2 CPU processes on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *args,
    ]  # fmt: skip


def _launch(*args: str) -> subprocess.CompletedProcess:
    command = _launch_args(*args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO)
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{output}")
    return result


FINETUNE_STEPS = 4


def finetune_command(exported: Path, clean_data: list[str], out: Path) -> list[str]:
    """The 2-process finetuning run of these tests: a checkpoint after every step, evaluation on
    the 3-record val split at the end."""
    return [
        str(REPO / "tools" / "finetune.py"), "--config", str(FINETUNE), *clean_data, *GEOMETRY,
        f"finetune.pretrained={exported}", f"train.output_dir={out}", f"train.max_steps={FINETUNE_STEPS}",
        "train.log_every=1", "train.checkpoint_every=1", "finetune.eval_split=val", "finetune.eval_every=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(exported, clean_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted run: its output folder and the launcher's output."""
    out = tmp_path_factory.mktemp("finetuned") / "run"
    return out, _launch(*finetune_command(exported, clean_data, out))


@pytest.mark.slow
def test_two_process_finetune_then_eval_without_padded_repeats(finetuned, tmp_path):
    out, result = finetuned
    assert "4 clips per step" in result.stdout  # 2 processes x batch 2 per optimiser step
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["finetune"]["heads"] == {"label": 4} and saved["model"]["fusion"] == "mid"
    assert saved["data"]["video"]["num_frames"] == 4
    two = json.loads((out / "metrics.json").read_text())
    assert two["step"] == FINETUNE_STEPS and two["split"] == "val"
    # 3 records over 2 processes at batch 2: one padded repeat, dropped
    assert (two["records_scored"], two["records_unscored"], two["duplicates_dropped"]) == (3, 0, 1)
    assert two["label"]["top1"] in (0.0, pytest.approx(100 / 3), pytest.approx(200 / 3), 100.0)
    # finetuning checkpoints like pretraining: the newest two, each with the classifier's weights
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"step_{FINETUNE_STEPS - 1:08d}", f"step_{FINETUNE_STEPS:08d}"]
    last = load_file(out / "checkpoints" / checkpoints[-1] / "model.safetensors")
    final = load_file(out / "model.safetensors")
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)

    # the same model evaluated by tools/eval.py in one process (overrides before and after options)
    assert _tool("eval").main([str(out), "data.num_workers=0", "--split", "val", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["duplicates_dropped"] == 0 and one["records_scored"] == 3 and one["split"] == "val"
    assert one["label"] == pytest.approx(two["label"])


@pytest.mark.slow
def test_two_process_finetune_killed_mid_epoch_resumes_to_identical_weights(finetuned, exported, clean_data, tmp_path):
    """SIGKILL to every process (no chance to save) after the first checkpoint; the same command
    resumes from the newest complete checkpoint and ends with the uninterrupted run's weights, bit
    for bit (mixup draws, drop path and the sampler's order all follow the run's position)."""
    whole, _ = finetuned
    out = tmp_path / "run"
    command = finetune_command(exported, clean_data, out)
    log = open(tmp_path / "killed.log", "w")
    launcher = subprocess.Popen(_launch_args(*command), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    first = out / "checkpoints" / "step_00000001"
    deadline = time.monotonic() + 240
    while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), (tmp_path / "killed.log").read_text()[-4000:]
    # the launcher, torchrun's agent, both training processes and their loader workers; none is left
    assert len(kill_process_tree(launcher.pid, str(out))) >= 3
    launcher.wait(timeout=60)
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved and saved[-1] < f"step_{FINETUNE_STEPS:08d}", saved

    resumed = _launch(*command)
    assert f"resuming from {out / 'checkpoints' / saved[-1]}" in resumed.stdout + resumed.stderr
    expected, got = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the resumed run's weights differ"
    losses = read_scalars(out, "train/loss")
    assert sorted(losses) == list(range(1, FINETUNE_STEPS + 1)) and losses == read_scalars(whole, "train/loss")


def test_linear_probe_on_raw_inputs_and_a_random_encoder(clean_data):
    from avmae.evaluation.probe import format_probe_results, run_linear_probes

    probe = ["finetune.probe_weight_decays=[0.01,1.0]", "finetune.probe_max_iter=30"]
    cfg = load_config(FINETUNE, clean_data + GEOMETRY + probe)
    with pytest.raises(ValueError, match="needs a pretrained model"):
        run_linear_probes(cfg, None)
    raw, random = run_linear_probes(cfg, None, sources=("raw", "random"))
    assert raw["source"] == "raw" and random["source"] == "random"
    assert raw["dim"] == 3 * 2 * 4 * 4 + 8 * 8 and random["dim"] == 2 * 128
    assert raw["records"]["val"] == 3 and raw["records"]["train"] == random["records"]["train"]
    for result in (raw, random):
        assert set(result["sweep"]["label"]) == {0.01, 1.0}
        for split in ("train", "val", "test"):
            assert 0.0 <= result[split]["label"]["top1"] <= 100.0
    # one decoding pass or one per source: the same features, the same probe
    (alone,) = run_linear_probes(cfg, None, sources=("random",))
    assert alone["test"] == random["test"] and alone["sweep"] == random["sweep"]
    table = format_probe_results([random, raw])
    assert "random" in table and "raw" in table


def test_multilabel_finetune_with_balanced_sampling_in_one_process(synthetic_root, tmp_path):
    """AudioSet-format manifests over the synthetic mp4s: BCE, sigmoid views, mAP with a class
    that has no positive excluded and reported, balanced sampling through the weighted sampler."""
    from avmae.engine.finetune import finetune

    bad = {row["id"] for row in csv.DictReader(open(synthetic_root / "bad_clips.csv"))}
    mids = ["/m/a", "/m/b", "/m/c", "/m/d", "/m/never"]
    (tmp_path / "labels.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{m},"class {i}"\n' for i, m in enumerate(mids))
    )
    header = "# Segments csv\n# num_ytids=0\n# YTID, start_seconds, end_seconds, positive_labels\n"
    for split, sources in (("train", ("train",)), ("val", ("val", "test"))):
        lines = []
        for source in sources:
            for row in csv.DictReader(open(synthetic_root / f"{source}.csv")):
                if row["id"] in bad:
                    continue
                label = int(row["label"])
                labels = {mids[label], mids[(label + 1) % 4]} if label % 2 else {mids[label]}
                lines.append(f'{row["id"]}, 0.000, 2.500, "{",".join(sorted(labels))}"\n')
        (tmp_path / f"{split}.csv").write_text(header + "".join(lines))
    overrides = [
        "data.format=audioset", f"data.root={synthetic_root / 'clips'}", f"data.train={tmp_path / 'train.csv'}",
        f"data.val={tmp_path / 'val.csv'}", f"data.test={tmp_path / 'val.csv'}",
        f"data.label_file={tmp_path / 'labels.csv'}",
        "data.balanced_sampling=true", "finetune.modalities=audio", "finetune.eval_split=val",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.log_every=1",
    ]  # fmt: skip
    torch.set_num_threads(1)  # the run takes its own count on the CPU and gives this one back
    metrics = finetune(load_config(FINETUNE, overrides + GEOMETRY))
    assert torch.get_num_threads() == 1

    assert set(metrics["label"]) >= {"mAP", "mAUC", "d_prime", "per_class_ap", "excluded_classes"}
    assert 4 in metrics["label"]["excluded_classes"] and 0.0 < metrics["label"]["mAP"] <= 100.0
    rows = list(csv.reader(open(tmp_path / "run" / "per_class_ap_label.csv")))
    assert rows[0] == ["index", "name", "ap"] and len(rows) == 6 and rows[5] == ["4", "class 4", ""]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["label"]["excluded_classes"] == metrics["label"]["excluded_classes"]


def test_mbt_recipe_options_finetune_from_a_mid_fusion_export(exported, clean_data, tmp_path):
    """The MBT recipe's pieces together in one process: bottleneck fusion started from the demo's
    mid-fusion export, momentum SGD with layer decay, gradient clipping, per-modality mixup; the
    saved classifier reloads as an MBT classifier with the trained weights."""
    from avmae.engine.finetune import finetune
    from avmae.formats import load_finetuned
    from avmae.models import MBTClassifier

    out = tmp_path / "run"
    overrides = [
        *clean_data, *GEOMETRY, f"finetune.pretrained={exported}", f"train.output_dir={out}",
        "train.max_steps=2", "train.warmup_epochs=0", "train.log_every=1", "finetune.eval_split=val", "finetune.fusion=bottleneck",
        "finetune.fusion_layer=2", "finetune.bottlenecks=4", "train.optimizer=sgd", "train.momentum=0.9",
        "train.weight_decay=0.0", "train.clip_grad=1.0", "train.base_lr=0.1", "augment.mixup=0.5",
        "augment.mixup_per_modality=true", "finetune.label_smoothing=0.3",
    ]  # fmt: skip
    metrics = finetune(load_config(FINETUNE, overrides))
    assert 0.0 <= metrics["label"]["top1"] <= 100.0
    model, cfg = load_finetuned(out)
    assert isinstance(model, MBTClassifier) and cfg.finetune.fusion == "bottleneck" and cfg.model.fusion == "mid"
    # the joint block of the mid-fusion export became the top block of both stacks, then trained
    # apart (the zero-initialised heads pass gradient to the encoder from the second step on)
    video_top, audio_top = (model.encoder.modality_blocks[m][-1].attn.qkv.weight for m in ("video", "audio"))
    assert not torch.equal(video_top, audio_top)
