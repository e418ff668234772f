"""Every on-disk format of avmae, in one place (docs/checkpoints.md):

- ``weights``: safetensors and ``.pt`` state dicts read safely, run configs, and the plain model
  weights of a training checkpoint folder (``read_checkpoint``; the engine writes those folders);
- ``exports``: export folders (``export``, ``write_export``, ``from_pretrained``) and the timm audio ViT;
- ``classifier``: finetuned classifier folders (``save_finetuned``, ``load_finetuned``).
"""

from avmae.formats.classifier import load_finetuned, save_finetuned
from avmae.formats.exports import (
    EXPORT_CONFIG,
    PARTS,
    TIMM_WEIGHTS,
    apply_pretrained,
    build_part,
    export,
    export_config,
    from_pretrained,
    load_part,
    load_timm_audio_vit,
    pretrained_encoder_weights,
    read_export,
    timm_audio_vit,
    write_export,
)
from avmae.formats.weights import (
    CONFIG_FILE,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
    plain_state_dict,
    read_checkpoint,
    read_config,
    read_state_dict,
    write_safetensors,
)

__all__ = [
    "CONFIG_FILE",
    "EXPORT_CONFIG",
    "PARTS",
    "TIMM_WEIGHTS",
    "TRAINER_STATE_FILE",
    "WEIGHTS_FILE",
    "apply_pretrained",
    "build_part",
    "export",
    "export_config",
    "from_pretrained",
    "load_finetuned",
    "load_part",
    "load_timm_audio_vit",
    "plain_state_dict",
    "pretrained_encoder_weights",
    "read_checkpoint",
    "read_config",
    "read_export",
    "read_state_dict",
    "save_finetuned",
    "timm_audio_vit",
    "write_export",
    "write_safetensors",
]
