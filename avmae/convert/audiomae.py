"""facebookresearch/AudioMAE, ``models_mae.py`` / ``models_vit.py``: MAE's layout over the
``(1, 1024, 128)`` fbank image, time first (a ``(64, 8)`` token grid in time-major order).
docs/checkpoints.md.
"""

from __future__ import annotations

from avmae.convert.mae import read_mae_layout
from avmae.convert.source import ConversionError, Source, SourceKeys

# models_vit.py vit_* and models_mae.py mae_vit_* build every norm as partial(nn.LayerNorm, eps=1e-6)
NORM_EPS = 1e-6
PREPROCESSING = {
    # dataset.py: (fbank - mean) / (std * 2) with main_finetune_as.py's AudioSet statistics
    "audio.norm_mean": -4.2677393, "audio.norm_std": 2 * 4.5689974,
    "source": "facebookresearch/AudioMAE dataset.py + main_finetune_as.py: Kaldi fbank, 128 bins, "
    "10 ms shift, 1024 frames, (x - (-4.2677393)) / (2 * 4.5689974)",
}


def read_audiomae(keys: SourceKeys, num_mel_bins: int = 128) -> Source:
    def grid_of(n: int) -> tuple[int, int]:
        patch = keys.state["patch_embed.proj.weight"].shape[-1]
        freq = num_mel_bins // patch
        if n % freq:
            raise ConversionError(f"{keys.origin}: pos_embed holds {n} tokens, not a (time, {freq}) grid")
        return (n // freq, freq)

    return read_mae_layout(keys, "audiomae", "audio", grid_of, in_chans=1)
