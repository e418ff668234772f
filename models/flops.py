"""FLOPs of one forward (optionally forward + backward) pass, counted by torch's FlopCounterMode.

Counts are of matrix multiplications, convolutions and attention (2 FLOPs per multiply-add), the
convention used for model FLOPs utilisation. Inputs may live on the ``meta`` device: nothing is
computed then, so even ViT-L counts instantly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that
# scaled_dot_product_attention dispatches to; without these, CPU counts would miss attention.
_CPU_ATTENTION = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CPU_ATTENTION[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _CPU_ATTENTION[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_attention_backward


def output_scalar(output) -> torch.Tensor:
    """What a backward pass of a model's output runs through: the pretraining model's ``loss``,
    else the sum of every floating-point output (a classifier's logits per head)."""
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    values = output.values() if isinstance(output, dict) else [output]
    return sum(v.float().sum() for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())


def count_flops(
    model: nn.Module,
    video: torch.Tensor | None = None,
    audio: torch.Tensor | None = None,
    backward: bool = False,
    **more_inputs: torch.Tensor,
) -> int:
    """Total FLOPs of ``model(video=video, audio=audio, **more_inputs)`` for the given batch.

    ``more_inputs`` carries e.g. ``video2``/``audio2`` for a two-view contrastive model.
    ``backward=True`` adds the backward pass of the loss (``AVMAE``) or of the summed outputs
    (other models). Divide by the batch size for FLOPs per clip.
    """
    inputs = {k: v for k, v in (("video", video), ("audio", audio)) if v is not None} | more_inputs
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        if backward:
            output_scalar(model(**inputs)).backward()
        else:
            with torch.no_grad():
                model(**inputs)
    return int(counter.get_total_flops())


def describe_model(cfg, batch: int = 2, device: str = "meta") -> dict:
    """Token counts, parameter counts and FLOPs per clip of the pretraining model of ``cfg``.

    Built on the ``meta`` device by default: no memory is allocated and nothing is computed, so
    any size is described in seconds. FLOPs are per clip (the batch only has to exceed 1 for the
    batch norms of the contrastive heads).
    """
    from .pretrain import build_pretrain_model, example_inputs, num_tokens, num_visible_tokens

    with torch.device(device):
        model = build_pretrain_model(cfg)
    inputs = example_inputs(cfg, batch, device)
    model.train()

    def params(module: nn.Module | None, trainable: bool = False) -> int:
        if module is None:
            return 0
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    encoder_flops = count_flops(model.encoder, inputs["video"], inputs["audio"])
    pretrain_flops = count_flops(model, **inputs)
    step_flops = count_flops(model, backward=True, **inputs)
    return {
        "size": cfg.model.size,
        "tokens": num_tokens(cfg),
        "visible_tokens": num_visible_tokens(cfg),
        "params": {
            "encoder": params(model.encoder),
            "decoder": params(model.decoder),
            "contrastive": params(model.contrastive, trainable=True),
            "total_trainable": params(model, trainable=True),
            "total": params(model),
        },
        "flops_per_clip": {
            "encoder_unmasked": encoder_flops // batch,
            "pretrain_forward": pretrain_flops // batch,
            "pretrain_step": step_flops // batch,
        },
    }
