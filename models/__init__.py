"""avmae.models: the AV-MAE model family (encoders, decoders, contrastive heads, classifiers)."""

from .classifier import AVClassifier, LoadReport, MBTClassifier, build_classifier, load_pretrained
from .contrastive import InfoNCEHead, MoCoV3Head, SimSiamHead
from .decoder import AVDecoder
from .encoder import AVEncoder
from .flops import count_flops
from .layers import (
    MODALITIES,
    AudioPatchEmbed,
    VideoPatchEmbed,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
)
from .pretrain import (
    AVMAE,
    build_decoder,
    build_encoder,
    build_pretrain_model,
    example_inputs,
    model_grids,
    num_tokens,
    num_visible_tokens,
)
from .registry import SIZES, ViTSize, get_size
from .state_dict import unwrap_name, unwrap_state_dict

__all__ = [
    "AVClassifier",
    "AVDecoder",
    "AVEncoder",
    "AVMAE",
    "AudioPatchEmbed",
    "InfoNCEHead",
    "LoadReport",
    "MBTClassifier",
    "MODALITIES",
    "MoCoV3Head",
    "SIZES",
    "SimSiamHead",
    "VideoPatchEmbed",
    "ViTSize",
    "build_classifier",
    "build_decoder",
    "build_encoder",
    "build_pretrain_model",
    "count_flops",
    "example_inputs",
    "get_size",
    "load_pretrained",
    "model_grids",
    "num_tokens",
    "num_visible_tokens",
    "patchify_audio",
    "patchify_video",
    "unpatchify_audio",
    "unpatchify_video",
    "unwrap_name",
    "unwrap_state_dict",
]
