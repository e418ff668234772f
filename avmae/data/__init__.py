"""Data: manifests, video/audio decoding, fbank, the Dataset and samplers.

- ``manifests``: ``ClipRecord``, ``Manifest``, ``read_manifest(data_cfg, split)``, one reader per format.
- ``video``: ``open_video(path, decoder)`` and clip sampling in seconds.
- ``audio``: ``read_audio`` windows, ``fbank`` (CAV-MAE / AST / AudioMAE features), ``NoAudioError``.
- ``dataset``: ``AVDataset``, the clips of mp4 files.
- ``factory``: ``build_dataset(cfg, split, train)``, over mp4s or shards (``data.format``).
- ``collate``: ``collate_clips``, the batching of items holding several clips of one video.
- ``sampler``: ``DistributedWeightedSampler``, ``balanced_weights`` (AudioSet balanced sampling).
- ``loader``: ``build_loader(cfg, dataset, train)``, the one DataLoader factory.
- ``synthetic``: the embedded synthetic audiovisual dataset.
- ``shards``: ``ShardDataset``, the ``AVDataset`` that reads prepared shards (``data.format: shards``);
  ``shard_writer``: ``prepare_shards`` (``prepare_part`` on each machine, ``merge_shards``), which
  decodes every clip once into them; ``storage``: ``Location``, a folder or an ``s3://`` prefix of
  whole files; docs/data.md.
"""

from avmae.data.audio import AudioDecodeError, NoAudioError, fbank, kaldi_fbank, normalize_fbank, read_audio
from avmae.data.collate import collate_clips
from avmae.data.dataset import AVDataset, TooManyDecodeFailures
from avmae.data.factory import build_dataset
from avmae.data.loader import build_loader
from avmae.data.manifests import ClipRecord, Manifest, ManifestError, read_manifest
from avmae.data.sampler import DistributedWeightedSampler, balanced_weights
from avmae.data.video import ClipTooShortError, VideoDecodeError, VideoReader, open_video

__all__ = [
    "AVDataset",
    "AudioDecodeError",
    "ClipRecord",
    "ClipTooShortError",
    "DistributedWeightedSampler",
    "Manifest",
    "ManifestError",
    "NoAudioError",
    "TooManyDecodeFailures",
    "VideoDecodeError",
    "VideoReader",
    "balanced_weights",
    "build_dataset",
    "build_loader",
    "collate_clips",
    "fbank",
    "kaldi_fbank",
    "normalize_fbank",
    "open_video",
    "read_audio",
    "read_manifest",
]
