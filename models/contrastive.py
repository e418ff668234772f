"""Contrastive / siamese heads over pooled clip embeddings.

Every head scores a pair of embedding batches ``x1, x2 (B, D)`` that belong together row by row,
named by ``names = (name1, name2)``: ``("video", "audio")`` when the pair is the two modalities
of one clip, ``("clip", "clip")`` when it is two augmented views. Projectors and predictors are
kept per name, so audio and video get their own.

- ``InfoNCEHead``: CAV-MAE's audio-visual contrast, L2-normalised embeddings, fixed or learnable
  temperature, negatives from all processes or from each clip's replica group
  (``avmae.models.losses.info_nce``).
- ``SimSiamHead``: projector + predictor, negative cosine against the stop-gradient projection.
- ``MoCoV3Head``: projector + predictor on the query side; a momentum copy of the encoder and
  projector (EMA, never trained by gradient) produces the keys.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .losses import cosine_momentum, info_nce, moco_loss, simsiam_loss


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear-BN-ReLU blocks, the last layer followed by an affine-free BN."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class InfoNCEHead(nn.Module):
    def __init__(
        self, temperature: float = 0.05, learnable: bool = False, symmetric: bool = True, group: int | None = None
    ) -> None:
        super().__init__()
        self.symmetric = symmetric  # False: only x1 -> x2 (video picks its audio), CAV-MAE's default
        # None: negatives from the global batch; 0: from this process's batch; G: from consecutive
        # groups of G clips of the global batch (model.contrastive_negatives / _replica_size)
        self.group = group
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        scale = torch.tensor(math.log(1.0 / temperature))
        # learned as log(1 / T), as CLIP does, so it stays positive
        if learnable:
            self.log_logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_logit_scale", scale, persistent=False)

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.logit_scale()

    def logit_scale(self) -> torch.Tensor:
        # CLIP clamps the scale at 100 (temperature 0.01) to keep training stable
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, names: tuple[str, str]) -> torch.Tensor:
        x1 = nn.functional.normalize(x1.float(), dim=-1)
        x2 = nn.functional.normalize(x2.float(), dim=-1)
        group = 0 if self.group is None else self.group or x1.shape[0]
        return info_nce(x1, x2, self.logit_scale(), self.symmetric, group)


class SimSiamHead(nn.Module):
    """SimSiam: 3-layer projector, 2-layer bottleneck predictor (``pred_dim`` hidden)."""

    def __init__(self, names: tuple[str, ...], dim: int, hidden_dim: int, proj_dim: int, pred_dim: int) -> None:
        super().__init__()
        self.projector = nn.ModuleDict({n: build_mlp(3, dim, hidden_dim, proj_dim) for n in names})
        self.predictor = nn.ModuleDict({n: build_mlp(2, proj_dim, pred_dim, proj_dim, last_bn=False) for n in names})

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, names: tuple[str, str]) -> torch.Tensor:
        z1, z2 = self.projector[names[0]](x1), self.projector[names[1]](x2)
        p1, p2 = self.predictor[names[0]](z1), self.predictor[names[1]](z2)
        return simsiam_loss(p1, z2, p2, z1)


class MoCoV3Head(nn.Module):
    """MoCo v3 on top of an encoder: queries from the trained encoder, keys from its momentum copy.

    ``momentum_encoder`` is a frozen copy of the encoder passed in (its weights are copied now and
    then follow by EMA); the pretraining module runs it to produce ``k1, k2``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        names: tuple[str, ...],
        dim: int,
        hidden_dim: int,
        proj_dim: int,
        pred_dim: int,
        temperature: float = 0.2,
        momentum: float = 0.99,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.base_momentum = momentum
        self.projector = nn.ModuleDict({n: build_mlp(3, dim, hidden_dim, proj_dim) for n in names})
        self.predictor = nn.ModuleDict({n: build_mlp(2, proj_dim, pred_dim, proj_dim) for n in names})
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for param in self.momentum_parameters():
            param.requires_grad_(False)

    def momentum_parameters(self):
        yield from self.momentum_encoder.parameters()
        yield from self.momentum_projector.parameters()

    @torch.no_grad()
    def keys(self, embedding: torch.Tensor, name: str) -> torch.Tensor:
        """Momentum-projected key ``(B, proj_dim)`` of a momentum-encoder embedding."""
        return self.momentum_projector[name](embedding)

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        names: tuple[str, str],
        k1: torch.Tensor,
        k2: torch.Tensor,
    ) -> torch.Tensor:
        """x1, x2: trained-encoder embeddings; k1, k2: the momentum keys of the same inputs."""
        q1 = self.predictor[names[0]](self.projector[names[0]](x1))
        q2 = self.predictor[names[1]](self.projector[names[1]](x2))
        return moco_loss(q1, k2, self.temperature) + moco_loss(q2, k1, self.temperature)

    @torch.no_grad()
    def update_momentum(self, encoder: nn.Module, progress: float) -> float:
        """EMA step ``key = m * key + (1 - m) * query`` with MoCo v3's cosine schedule; returns m."""
        m = cosine_momentum(self.base_momentum, progress)
        for online, target in ((encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            online_params = list(online.parameters())
            target_params = list(target.parameters())
            torch._foreach_mul_(target_params, m)
            torch._foreach_add_(target_params, online_params, alpha=1.0 - m)
        return m
