"""Losses: masked MSE, patch normalisation, InfoNCE (by hand, with CAV-MAE's per-replica negatives,
across 2 real processes), SimSiam's stop-gradient, MoCo v3's loss and momentum schedule."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from avmae.models.losses import (
    cosine_momentum,
    info_nce,
    masked_mse,
    moco_loss,
    normalize_patches,
    simsiam_loss,
)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# tiny models: one torch thread is faster than two competing for a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_mse_counts_masked_patches_only():
    torch.manual_seed(0)
    pred = torch.randn(2, 6, 4, requires_grad=True)
    target = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.float)
    loss = masked_mse(pred, target, mask)
    by_hand = sum(((pred[b, n] - target[b, n]) ** 2).mean() for b, n in mask.nonzero().tolist()) / 5
    assert torch.allclose(loss, by_hand)

    changed = pred.detach().clone()
    changed[mask == 0] += 100.0  # visible patches: any prediction
    assert torch.allclose(masked_mse(changed, target, mask), loss)

    loss.backward()
    assert (pred.grad[mask == 0] == 0).all()
    assert (pred.grad[mask == 1].abs().sum(-1) > 0).all()


def test_masked_mse_without_masked_patches_is_zero():
    pred, target = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    assert masked_mse(pred, target, torch.zeros(1, 3)).item() == 0.0


def test_normalize_patches_matches_mae():
    x = torch.randn(2, 5, 12) * 3 + 1
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)  # MAE: unbiased variance, eps 1e-6 inside the sqrt
    assert torch.allclose(normalize_patches(x), (x - mean) / (var + 1e-6) ** 0.5)


def test_info_nce_equals_hand_computed_3x3():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    b = F.normalize(torch.tensor([[1.0, 0.2], [-0.3, 1.0], [0.5, 0.5]]), dim=1)
    temperature = 0.1
    sim = [[float(a[i] @ b[j]) / temperature for j in range(3)] for i in range(3)]

    def cross_entropy(rows):
        return sum(-row[i] + math.log(sum(math.exp(v) for v in row)) for i, row in enumerate(rows)) / 3

    columns = [[sim[j][i] for j in range(3)] for i in range(3)]  # b -> a: the transpose
    expected = 0.5 * (cross_entropy(sim) + cross_entropy(columns))
    assert info_nce(a, b, 1.0 / temperature).item() == pytest.approx(expected, rel=1e-5)


def _info_nce_worker(rank: int, world: int, folder: str, a: torch.Tensor, b: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        rows = slice(rank * 2, rank * 2 + 2)
        local_a = a[rows].clone().requires_grad_(True)
        local_b = b[rows].clone().requires_grad_(True)
        loss = info_nce(local_a, local_b, 10.0)
        loss.backward()
        torch.save((loss.detach(), local_a.grad, local_b.grad), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_info_nce_gathers_negatives_with_gradient_across_two_processes(tmp_path):
    torch.manual_seed(0)
    a = F.normalize(torch.randn(4, 8), dim=1)
    b = F.normalize(torch.randn(4, 8), dim=1)
    full_a, full_b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    full = info_nce(full_a, full_b, 10.0)
    full.backward()

    # fork: the workers need nothing but torch, already imported here
    mp.start_processes(_info_nce_worker, args=(2, str(tmp_path), a, b), nprocs=2, join=True, start_method="fork")
    out = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    # each process scores its 2 rows against all 4: the mean of the two losses is the full loss
    assert torch.allclose((out[0][0] + out[1][0]) / 2, full.detach(), atol=1e-6)
    # the gathered negatives carry gradient back: rank r's grad is world x the full-batch grad
    # of its rows (DDP then averages over the 2 processes)
    for rank in (0, 1):
        rows = slice(rank * 2, rank * 2 + 2)
        assert torch.allclose(out[rank][1], 2 * full_a.grad[rows], atol=1e-6)
        assert torch.allclose(out[rank][2], 2 * full_b.grad[rows], atol=1e-6)


def _cavmae_forward_contrastive(audio: torch.Tensor, video: torch.Tensor, temperature: float) -> float:
    """CAV-MAE's ``forward_contrastive`` (src/models/cav_mae.py, bidirect_contrast=False) on one
    DataParallel replica, in plain Python: ``total[i][j] = audio_i . video_j / T``, a log-softmax
    down each column (over the audios for video j), minus the mean of the diagonal."""
    n = audio.shape[0]
    total = [[float(audio[i] @ video[j]) / temperature for j in range(n)] for i in range(n)]
    diagonal = [total[j][j] - math.log(sum(math.exp(total[i][j]) for i in range(n))) for j in range(n)]
    return -sum(diagonal) / n


def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 8, generator=generator), dim=1), F.normalize(torch.randn(n, 8, generator=generator), dim=1)


def _head(negatives: str, replica_size: int = 0):
    from types import SimpleNamespace

    from avmae.config import load_config
    from avmae.models.pretrain import AVMAE

    cfg = load_config(CONFIGS / "pretrain" / "cavmae_base.yaml", [
        f"model.contrastive_negatives={negatives}", f"model.contrastive_replica_size={replica_size}",
    ])
    return AVMAE._build_head(cfg.model, SimpleNamespace(embed_dim=8))


def test_info_nce_replica_negatives_equal_cavmae_per_replica():
    """CAV-MAE's batch of 6 on 2 DataParallel replicas of 3 clips: each replica's
    forward_contrastive, averaged over the replicas (traintest_cavmae.py sums them; summing every
    replica's loss only scales the step, which Adam does not see). ``global`` is one matrix
    over all 6."""
    video, audio = _pairs(6)
    temperature = 0.05
    replicas = [_cavmae_forward_contrastive(audio[r], video[r], temperature) for r in (slice(0, 3), slice(3, 6))]
    head = _head("replica", 3)
    assert head(video, audio, ("video", "audio")).item() == pytest.approx(sum(replicas) / 2, rel=1e-5)
    whole = _cavmae_forward_contrastive(audio, video, temperature)
    assert _head("global")(video, audio, ("video", "audio")).item() == pytest.approx(whole, rel=1e-5)
    assert abs(whole - sum(replicas) / 2) > 0.1  # the two choices differ on this batch
    # replica size 0: each process's batch is a replica (here the whole batch, one process)
    assert _head("replica", 0)(video, audio, ("video", "audio")).item() == pytest.approx(whole, rel=1e-5)


def test_info_nce_groups_uneven_and_symmetric_by_hand():
    """5 clips in groups of 2: {0, 1}, {2, 3} and {4} (a clip alone: loss 0); the mean over the 3
    groups of each group's mean, both directions."""
    a, b = _pairs(5, seed=1)
    groups = [slice(0, 2), slice(2, 4), slice(4, 5)]
    per_group = [
        0.5 * (_cavmae_forward_contrastive(b[g], a[g], 0.1) + _cavmae_forward_contrastive(a[g], b[g], 0.1)) for g in groups
    ]
    assert per_group[2] == 0.0
    assert info_nce(a, b, 10.0, symmetric=True, group=2).item() == pytest.approx(sum(per_group) / 3, rel=1e-5)


def _group_worker(rank: int, world: int, folder: str, a: torch.Tensor, b: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        rows = slice(rank * 3, rank * 3 + 3)
        local_a = a[rows].clone().requires_grad_(True)
        local_b = b[rows].clone().requires_grad_(True)
        losses = {}
        for group in (2, 3):  # 2: the group {2, 3} spans both processes; 3: one group per process
            loss = info_nce(local_a, local_b, 10.0, symmetric=False, group=group)
            grads = torch.autograd.grad(loss, (local_a, local_b))
            losses[group] = (loss.detach(), *grads)
        torch.save(losses, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_info_nce_replica_groups_across_two_processes(tmp_path):
    """2 processes of 3 clips: the mean of their losses is the one-process loss of the same 6
    clips, groups of 2 (one spanning the processes) or of 3; the gradient reaches each clip's
    own process."""
    a, b = _pairs(6, seed=2)
    mp.start_processes(_group_worker, args=(2, str(tmp_path), a, b), nprocs=2, join=True, start_method="fork")
    out = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for group in (2, 3):
        full_a, full_b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        full = info_nce(full_a, full_b, 10.0, symmetric=False, group=group)
        full.backward()
        by_hand = [_cavmae_forward_contrastive(b[g], a[g], 0.1) for g in map(lambda i: slice(i, i + group), range(0, 6, group))]
        assert full.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
        assert torch.allclose((out[0][group][0] + out[1][group][0]) / 2, full.detach(), atol=1e-6)
        for rank in (0, 1):
            rows = slice(rank * 3, rank * 3 + 3)
            assert torch.allclose(out[rank][group][1], 2 * full_a.grad[rows], atol=1e-6)
            assert torch.allclose(out[rank][group][2], 2 * full_b.grad[rows], atol=1e-6)


def test_contrastive_negatives_config_is_checked():
    from avmae.config import load_config

    with pytest.raises(ValueError, match="contrastive_negatives"):
        load_config(None, ["model.contrastive_negatives=batch"])
    with pytest.raises(ValueError, match="only with model.contrastive_negatives=replica"):
        load_config(None, ["model.contrastive_replica_size=4"])


@pytest.mark.parametrize("name, replica", [("cavmae_audioset", 64), ("cavmae_vggsound", 30)])
def test_cavmae_recipes_use_replica_negatives(name, replica):
    """run_cavmae_pretrain_scale++.sh: batch 256 on 4 GPUs; vggsound/run_cavmae_pretrain.sh: 120 on 4."""
    from avmae.config import load_config

    cfg = load_config(CONFIGS / "pretrain" / f"{name}.yaml")
    assert (cfg.model.contrastive_negatives, cfg.model.contrastive_replica_size) == ("replica", replica)


def test_simsiam_stops_gradient_at_the_projections():
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss = simsiam_loss(p1, z2, p2, z1)
    expected = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    assert torch.allclose(loss, expected)
    loss.backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None
    assert simsiam_loss(z1, z1, z1, z1).item() == pytest.approx(-1.0)


def test_moco_loss_is_scaled_cross_entropy():
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    t = 0.2
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / t
    assert torch.allclose(moco_loss(q, k, t), F.cross_entropy(logits, torch.arange(3)) * 2 * t)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 0.25) < cosine_momentum(0.99, 0.75)
