"""Which tokens the encoder sees: masking policies over one modality's token grid.

Every policy returns a ``TokenMask`` with the same number of visible tokens for every sample, so
visible tokens batch as a dense ``(B, N_keep, D)`` tensor (MAE's gather trick):

- ``random``: an independent random subset per sample (MAE's per-sample shuffle);
- ``tube`` (video grid ``(T', H', W')``): one spatial mask repeated over all time steps (VideoMAE);
- ``time`` / ``freq`` (audio grid ``(T', F')``): whole time rows / frequency columns;
- ``time_freq``: rows and columns, each at ``1 - sqrt(1 - ratio)`` so that the visible fraction
  is close to ``1 - ratio`` (a token is visible when its row and its column both are).

All randomness comes from ``torch.rand(..., generator=generator)``: the same seeded generator
gives the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from avmae.config import AUDIO_MASKINGS, VIDEO_MASKINGS

POLICIES = tuple(dict.fromkeys(VIDEO_MASKINGS + AUDIO_MASKINGS))  # random, tube, time, freq, time_freq


@dataclass
class TokenMask:
    """One modality's masking of a batch.

    ids_keep: ``(B, N_keep)`` indices of the visible tokens, in the order the encoder sees them.
    ids_restore: ``(B, N)``; position of each token in ``cat([visible, masked])`` order, used to
        put decoder tokens back into grid order (``torch.gather(x, 1, ids_restore)``).
    mask: ``(B, N)`` float, 1 = masked, 0 = visible, in grid order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _num_keep(units: int, ratio: float, what: str) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio} for {what}")
    keep = int(units * (1.0 - ratio))
    if keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible {what} out of {units}")
    return keep


def _keep_lowest(noise: torch.Tensor, keep: int) -> torch.Tensor:
    """``(B, U)`` bool: True for the ``keep`` units with the lowest noise."""
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < keep


def mask_from_keep(keep: torch.Tensor, num_keep: int) -> TokenMask:
    """A ``TokenMask`` from a ``(B, N)`` bool of visible tokens, ``num_keep`` True in every row."""
    # stable sort: visible tokens first, each group in grid order
    ids_shuffle = (~keep).to(torch.uint8).argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    return TokenMask(
        ids_keep=ids_shuffle[:, :num_keep],
        ids_restore=ids_restore,
        mask=(~keep).float(),
    )


def random_masking(
    batch: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None, device=None
) -> TokenMask:
    """MAE: per-sample random shuffle, keep the first ``int(N * (1 - ratio))``."""
    keep = _num_keep(num_tokens, ratio, "token")
    noise = _rand((batch, num_tokens), generator, device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_tokens, device=noise.device)
    mask[:, :keep] = 0
    return TokenMask(ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore))


def tube_masking(
    batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None, device=None
) -> TokenMask:
    """Video: the same random spatial positions are masked at every time step."""
    time, height, width = grid
    spatial = height * width
    num_keep = _num_keep(spatial, ratio, "spatial position")
    keep = _keep_lowest(_rand((batch, spatial), generator, device), num_keep)
    return mask_from_keep(keep[:, None, :].expand(batch, time, spatial).reshape(batch, -1), num_keep * time)


def audio_structured_masking(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    policy: str,
    generator: torch.Generator | None = None,
    device=None,
) -> TokenMask:
    """Audio grid ``(T', F')``, time-major tokens: mask whole time rows and/or frequency columns."""
    time, freq = grid
    if policy not in ("time", "freq", "time_freq"):
        raise ValueError(f"audio masking policy must be time, freq or time_freq, got {policy!r}")
    row_ratio = {"time": ratio, "freq": 0.0, "time_freq": 1.0 - math.sqrt(1.0 - ratio)}[policy]
    col_ratio = {"time": 0.0, "freq": ratio, "time_freq": row_ratio}[policy]
    rows, cols = _num_keep(time, row_ratio, "time step"), _num_keep(freq, col_ratio, "frequency band")
    keep_rows = _keep_lowest(_rand((batch, time), generator, device), rows)
    keep_cols = _keep_lowest(_rand((batch, freq), generator, device), cols)
    keep = keep_rows[:, :, None] & keep_cols[:, None, :]
    return mask_from_keep(keep.reshape(batch, -1), rows * cols)


def sample_mask(
    policy: str,
    batch: int,
    grid: tuple[int, ...],
    ratio: float,
    generator: torch.Generator | None = None,
    device=None,
) -> TokenMask:
    """Dispatch on the policy name; ``grid`` is ``(T', H', W')`` for video, ``(T', F')`` for audio."""
    if policy == "random":
        return random_masking(batch, math.prod(grid), ratio, generator, device)
    if policy == "tube":
        if len(grid) != 3:
            raise ValueError(f"tube masking needs a video grid (T', H', W'), got {grid}")
        return tube_masking(batch, grid, ratio, generator, device)
    if policy in ("time", "freq", "time_freq"):
        if len(grid) != 2:
            raise ValueError(f"{policy} masking needs an audio grid (T', F'), got {grid}")
        return audio_structured_masking(batch, grid, ratio, policy, generator, device)
    raise ValueError(f"masking policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def num_visible(policy: str, grid: tuple[int, ...], ratio: float) -> int:
    """Visible tokens per sample that ``sample_mask(policy, ..., grid, ratio)`` keeps: the one
    formula (``int(units * (1 - ratio))`` over the units the policy masks) that masking, FLOP
    counts and benchmarks share."""
    if policy == "random":
        return _num_keep(math.prod(grid), ratio, "token")
    if policy == "tube":
        return _num_keep(grid[1] * grid[2], ratio, "spatial position") * grid[0]
    if policy in ("time", "freq", "time_freq"):
        row_ratio = {"time": ratio, "freq": 0.0, "time_freq": 1.0 - math.sqrt(1.0 - ratio)}[policy]
        col_ratio = {"time": 0.0, "freq": ratio, "time_freq": row_ratio}[policy]
        return _num_keep(grid[0], row_ratio, "time step") * _num_keep(grid[1], col_ratio, "frequency band")
    raise ValueError(f"masking policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def take_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)`` gathered at ``(B, K)`` token indices -> ``(B, K, D)``."""
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))
