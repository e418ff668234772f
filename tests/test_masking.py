"""Masking policies: ratios, restore indices, structure (tubes, rows, columns), reproducibility."""

import pytest
import torch

from avmae.models.masking import sample_mask, take_tokens


def _check_consistent(m, batch: int, num_tokens: int, num_visible: int) -> None:
    assert m.ids_keep.shape == (batch, num_visible)
    assert m.ids_restore.shape == m.mask.shape == (batch, num_tokens)
    assert (m.mask.sum(1) == num_tokens - num_visible).all()
    # the kept ids are exactly the unmasked positions
    visible = torch.zeros(batch, num_tokens).scatter_(1, m.ids_keep, 1.0)
    assert torch.equal(visible, 1 - m.mask)
    # ids_restore is a permutation that sends visible token j of ids_keep back to its grid slot,
    # and every masked slot to the appended mask tokens (positions >= num_visible)
    assert torch.equal(m.ids_restore.sort(dim=1).values, torch.arange(num_tokens).expand(batch, -1))
    assert torch.equal(m.ids_restore.gather(1, m.ids_keep), torch.arange(num_visible).expand(batch, -1))
    assert ((m.ids_restore >= num_visible) == (m.mask == 1)).all()
    # as the decoder uses it: [encoded visible, mask tokens] un-shuffled lands in grid order
    x = torch.randn(batch, num_tokens, 3)
    filled = torch.cat([take_tokens(x, m.ids_keep), torch.zeros(batch, num_tokens - num_visible, 3)], dim=1)
    restored = take_tokens(filled, m.ids_restore)
    assert torch.equal(restored, x * (1 - m.mask)[..., None])


def test_random_masking_ratio_and_restore():
    g = torch.Generator().manual_seed(0)
    m = sample_mask("random", 4, (8, 4, 4), 0.9, g)
    _check_consistent(m, 4, 128, int(128 * 0.1))
    assert not torch.equal(m.mask[0], m.mask[1])  # per-sample masks


def test_random_masking_follows_mae_shuffle():
    noise = torch.rand(2, 10, generator=torch.Generator().manual_seed(3))
    m = sample_mask("random", 2, (10, 1), 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(m.ids_keep, noise.argsort(dim=1)[:, :4])
    _check_consistent(m, 2, 10, 4)


def test_tube_masking_repeats_one_spatial_mask_over_time():
    g = torch.Generator().manual_seed(1)
    m = sample_mask("tube", 3, (4, 5, 5), 0.75, g)
    _check_consistent(m, 3, 100, 4 * int(25 * 0.25))
    per_time = m.mask.reshape(3, 4, 25)
    assert (per_time == per_time[:, :1]).all()
    assert not torch.equal(per_time[0, 0], per_time[1, 0])


@pytest.mark.parametrize("policy", ["time", "freq", "time_freq"])
def test_structured_audio_masking(policy):
    g = torch.Generator().manual_seed(2)
    time, freq = 16, 8
    m = sample_mask(policy, 2, (time, freq), 0.5, g)
    grid = m.mask.reshape(2, time, freq)
    rows_masked = grid.amin(dim=2) == 1  # rows masked across every frequency
    cols_masked = grid.amin(dim=1) == 1
    if policy == "time":
        _check_consistent(m, 2, 128, 8 * freq)
        assert (grid == grid[:, :, :1]).all()
    elif policy == "freq":
        _check_consistent(m, 2, 128, time * 4)
        assert (grid == grid[:, :1, :]).all()
    else:
        # 1 - sqrt(0.5) of the rows and of the columns: int(16 * .707) x int(8 * .707) visible
        _check_consistent(m, 2, 128, 11 * 5)
        assert (rows_masked.sum(1) == 5).all() and (cols_masked.sum(1) == 3).all()
        # visible exactly where neither the row nor the column is masked
        assert torch.equal(grid == 0, ~rows_masked[:, :, None] & ~cols_masked[:, None, :])


@pytest.mark.parametrize("policy,grid", [("random", (4, 4, 4)), ("tube", (4, 4, 4)), ("time_freq", (16, 8))])
def test_masks_are_reproducible_under_a_seeded_generator(policy, grid):
    first = sample_mask(policy, 2, grid, 0.7, torch.Generator().manual_seed(7))
    again = sample_mask(policy, 2, grid, 0.7, torch.Generator().manual_seed(7))
    other = sample_mask(policy, 2, grid, 0.7, torch.Generator().manual_seed(8))
    assert torch.equal(first.ids_keep, again.ids_keep) and torch.equal(first.mask, again.mask)
    assert not torch.equal(first.mask, other.mask)


def test_zero_ratio_keeps_everything():
    m = sample_mask("random", 2, (3, 2), 0.0)
    _check_consistent(m, 2, 6, 6)


@pytest.mark.parametrize(
    "policy,grid,ratio,message",
    [
        ("random", (4, 4), 1.0, r"\[0, 1\)"),
        ("random", (2, 2), 0.9, "no visible token"),
        ("tube", (16, 8), 0.5, "video grid"),
        ("time", (4, 4, 4), 0.5, "audio grid"),
        ("blocks", (4, 4), 0.5, "policy"),
    ],
)
def test_bad_masking_requests_raise(policy, grid, ratio, message):
    with pytest.raises(ValueError, match=message):
        sample_mask(policy, 1, grid, ratio)


@pytest.mark.parametrize(
    "policy, grid", [("random", (4, 6, 6)), ("tube", (4, 6, 6)), ("time", (16, 20)), ("freq", (16, 20)), ("time_freq", (16, 20))]
)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_num_visible_is_what_the_masks_keep(policy, grid, ratio):
    from avmae.models.masking import num_visible

    mask = sample_mask(policy, 3, grid, ratio, torch.Generator().manual_seed(0))
    assert mask.ids_keep.shape[1] == num_visible(policy, grid, ratio)
    assert int((mask.mask == 0).sum(dim=1)[0]) == num_visible(policy, grid, ratio)
