"""``build_dataset``: the one dataset factory, over mp4 files (``AVDataset``) or prepared shards
(``ShardDataset``), chosen by ``data.format``. docs/data.md.
"""

from __future__ import annotations

import logging

from avmae import augment
from avmae.config import Config
from avmae.data.dataset import AVDataset, missing_list_path
from avmae.data.manifests import read_manifest
from avmae.data.shards import ShardDataset, ShardStore, split_location

log = logging.getLogger(__name__)


def build_dataset(cfg: Config, split: str, train: bool) -> AVDataset:
    """The dataset of ``split`` (train/val/test): training clips when ``train``, else multi-view."""
    if train and cfg.data.clips_per_video > 1 and cfg.model.contrastive in ("infonce", "mocov3"):
        log.warning(
            "data.clips_per_video=%d with model.contrastive=%s: the clips of one video share a batch "
            "and are negatives of each other in the contrastive loss",
            cfg.data.clips_per_video, cfg.model.contrastive,
        )
    if cfg.data.format == "shards":
        source = ShardStore(split_location(cfg.data, split), cfg.data.shard_cache)
        dataset_class, extra = ShardDataset, {}
    else:
        source = read_manifest(cfg.data, split)
        dataset_class, extra = AVDataset, {"missing_list": missing_list_path(cfg, split)}
    return dataset_class(
        source,
        cfg.data,
        cfg.augment,
        train=train,
        transforms=augment.build_transforms(cfg, train=True) if train else None,
        seed=cfg.train.seed,
        split=split,
        **extra,
    )
