"""Fixed sine-cosine positional embeddings, computed from the token grid of the actual input.

Three codes (``model.pos_embed``): ``grid`` (separable: a temporal code plus MAE's 2-D spatial
code), ``2d`` (MAE's 2-D code over all channels, CAV-MAE's layout) and ``1d`` (AV-MAE's code of
the token sequence); their formulas are in docs/architecture.md, "Encoder, positions,
classifiers". Nothing fixed is learned or saved, so a model built for another frame count or
audio length computes the code for its own grid. ``LearnedPosEmbed`` is the exception: a stored
table, as converted checkpoints of other codebases carry it, resampled by ``resample_table``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avmae.config import POS_EMBEDS


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(M,)`` positions -> ``(M, dim)``: ``[sin(pos * omega), cos(pos * omega)]``."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """``(rows * cols, dim)`` for a row-major grid; first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    row = torch.arange(rows, device=device).repeat_interleave(cols)
    col = torch.arange(cols, device=device).repeat(rows)
    return torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1)


def audio_sincos(dim: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """``(T' * F', dim)`` for an audio grid ``(T', F')`` in time-major token order."""
    time, freq = grid
    return sincos_2d(dim, time, freq, device)


def video_spatial_dim(dim: int) -> int:
    """Channels given to the spatial part of the video embedding (a multiple of 4)."""
    return 4 * (dim // 6)


def video_sincos(dim: int, grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """``(T' * H' * W', dim)`` for a video grid ``(T', H', W')`` in (t, h, w) token order."""
    time, height, width = grid
    spatial_dim = video_spatial_dim(dim)
    temporal = sincos_1d(dim - spatial_dim, torch.arange(time, device=device))  # (T', D_t)
    spatial = sincos_2d(spatial_dim, height, width, device)  # (H'W', D_s)
    temporal = temporal.repeat_interleave(height * width, dim=0)
    spatial = spatial.repeat(time, 1)
    return torch.cat([temporal, spatial], dim=1)


def video_sincos_2d(dim: int, grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """``(H' * W', dim)``: MAE's 2-D code of the one frame of a video grid ``(1, H', W')``."""
    time, height, width = grid
    if time != 1:
        raise ValueError(f"pos_embed=2d codes a single video frame (T' = 1), got a token grid of {time} steps {tuple(grid)}")
    return sincos_2d(dim, height, width, device)


def audio_sincos_2d(dim: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """``(T' * F', dim)`` in time-major token order: MAE's 2-D code of the fbank image with
    ``F'`` rows and ``T'`` columns (first half of the channels: time; second: frequency)."""
    time, freq = grid
    table = sincos_2d(dim, freq, time, device)  # (F' * T', dim), frequency-major
    return table.reshape(freq, time, dim).transpose(0, 1).reshape(time * freq, dim)


def sequence_sincos(dim: int, length: int, device=None) -> torch.Tensor:
    """``(length, dim)``: the 1-D code of positions ``0 .. length - 1``, sine and cosine
    interleaved on even / odd channels (AV-MAE's ``sinusoidal_1d``)."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even width, got {dim}")
    code = sincos_1d(dim, torch.arange(length, device=device))  # [sin ..., cos ...]
    half = dim // 2
    return torch.stack([code[:, :half], code[:, half:]], dim=2).reshape(length, dim)


_BUILDERS = {"video": video_sincos, "audio": audio_sincos}
_BUILDERS_2D = {"video": video_sincos_2d, "audio": audio_sincos_2d}


def fixed_table(modality: str, dim: int, grid: tuple[int, ...], kind: str = "grid", device=None) -> torch.Tensor:
    """``(N, dim)``: the fixed code of ``kind`` (``model.pos_embed``) for a token grid."""
    if kind == "1d":
        return sequence_sincos(dim, math.prod(grid), device)
    if kind == "2d":
        return _BUILDERS_2D[modality](dim, grid, device)
    return _BUILDERS[modality](dim, grid, device)


def _check(modality: str, kind: str) -> None:
    if modality not in _BUILDERS:
        raise ValueError(f"no positional embedding for modality {modality!r}")
    if kind not in POS_EMBEDS:
        raise ValueError(f"positional embedding kind must be one of {', '.join(POS_EMBEDS)}, got {kind!r}")


class SinCosPosEmbed(nn.Module):
    """The fixed embedding of one modality at one width.

    ``kind``: ``"grid"`` (the separable grid code above), ``"2d"`` (MAE's 2-D code of one image)
    or ``"1d"`` (the 1-D code of the token sequence). Holds the embedding of the configured grid as a non-persistent buffer (moved with
    the model, never saved); any other grid is computed on the fly, so inputs of another length
    just work.
    """

    def __init__(self, modality: str, dim: int, grid: tuple[int, ...], kind: str = "grid") -> None:
        super().__init__()
        _check(modality, kind)
        self.modality = modality
        self.dim = dim
        self.kind = kind
        self.grid = tuple(grid)
        self.register_buffer("pos_embed", self._build(self.grid)[None], persistent=False)

    def _build(self, grid: tuple[int, ...], device=None) -> torch.Tensor:
        return fixed_table(self.modality, self.dim, grid, self.kind, device)

    def forward(self, grid: tuple[int, ...]) -> torch.Tensor:
        """``(1, N, dim)`` for the given token grid."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return self._build(tuple(grid), device=self.pos_embed.device)[None].to(self.pos_embed.dtype)

    def extra_repr(self) -> str:
        return f"{self.modality}, {self.kind}, dim={self.dim}, grid={self.grid}"


# ---------------------------------------------------------------------------------------------
# stored (learned) tables, as the checkpoints of other MAE codebases carry them

# How a stored table is fitted to another token grid; written into converted exports' config.json.
RESAMPLE_METHOD = {
    "audio": "2-D bicubic with antialiasing over the (time, frequency) grid (timm.layers.resample_abs_pos_embed)",
    "video": "per frame 2-D bicubic with antialiasing over (height, width) (timm.layers.resample_abs_pos_embed), "
    "then linear interpolation along time (align_corners=True); a single frame is repeated",
}


def resample_table(table: torch.Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...]) -> torch.Tensor:
    """A ``(1, prod(old_grid), D)`` table of a 2-D ``(T', F')`` or 3-D ``(T', H', W')`` grid,
    token order row-major, fitted to ``new_grid`` (see ``RESAMPLE_METHOD``)."""
    from timm.layers import resample_abs_pos_embed

    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return table
    if len(old_grid) != len(new_grid) or len(old_grid) not in (2, 3):
        raise ValueError(f"cannot resample a positional table from grid {old_grid} to {new_grid}")
    if table.shape[1] != math.prod(old_grid):
        raise ValueError(f"positional table of {table.shape[1]} tokens does not fit grid {old_grid}")
    dim = table.shape[-1]
    if len(old_grid) == 2:
        return resample_abs_pos_embed(table, list(new_grid), list(old_grid), num_prefix_tokens=0)
    (t0, h0, w0), (t1, h1, w1) = old_grid, new_grid
    frames = table.reshape(t0, h0 * w0, dim)
    if (h0, w0) != (h1, w1):
        frames = torch.cat(
            [resample_abs_pos_embed(f[None], [h1, w1], [h0, w0], num_prefix_tokens=0) for f in frames]
        )
    if t0 != t1:
        seq = frames.permute(1, 2, 0)  # (H'W', D, T')
        if t0 == 1:
            seq = seq.expand(-1, -1, t1)
        else:
            seq = torch.nn.functional.interpolate(seq, size=t1, mode="linear", align_corners=True)
        frames = seq.permute(2, 0, 1)
    return frames.reshape(1, t1 * h1 * w1, dim)


class LearnedPosEmbed(nn.Module):
    """A stored positional table ``table (1, N, dim)`` for the token grid ``grid`` (a parameter,
    trained and saved); another grid gets the table resampled on the fly (``resample_table``).
    It starts as the fixed code of ``kind``, so an untrained table is still a position code and a
    table learned from a fixed-code checkpoint (``finetune.learn_pos_embed``) starts where it was."""

    def __init__(self, modality: str, dim: int, grid: tuple[int, ...], kind: str = "grid") -> None:
        super().__init__()
        _check(modality, kind)
        self.modality = modality
        self.dim = dim
        self.grid = tuple(grid)
        self.table = nn.Parameter(fixed_table(modality, dim, self.grid, kind)[None])

    def forward(self, grid: tuple[int, ...]) -> torch.Tensor:
        """``(1, N, dim)`` for the given token grid."""
        return resample_table(self.table, self.grid, tuple(grid))

    def extra_repr(self) -> str:
        return f"{self.modality}, dim={self.dim}, grid={self.grid}, learned"
