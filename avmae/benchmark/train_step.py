"""Training-step throughput, peak memory and MFU, with variants measured side by side.

One step is what the engine does per optimiser update, without the data pipeline: the uint8
video normalised on the device (``avmae.data.device``), forward under the variant's autocast,
backward, optimiser step, ``zero_grad``; inputs are random tensors of the config's shapes (video
as uint8), built once on the device. Variants (``VARIANTS``):

- ``avmae``: ``avmae.models.build_pretrain_model(cfg)`` (attention through SDPA) and
  ``avmae.engine.optim.build_optimizer`` (timm's AdamW, fused on CUDA), autocast to
  ``train.mixed_precision``, TF32 off (as the engine runs);
- ``avmae_full_loss``: the same with ``model.mae_loss_masked_only=false`` (the full-size fp32
  target path), the "before" of that change;
- ``compiled``, ``compiled_max_autotune``, ``compiled_max_autotune_no_cudagraphs``,
  ``compiled_cudagraphs``: the avmae variant under ``torch.compile`` in each ``mode`` (default,
  max-autotune, max-autotune-no-cudagraphs, reduce-overhead = CUDA graphs);
- ``reference_bf16``: ``avmae.benchmark.reference.ReferenceAVMAE`` with ``plain_adamw`` under the
  same autocast as avmae and with TF32 matmuls allowed: the fair baseline;
- ``reference_fp32``: the reference in fp32, no autocast, no TF32 (research code as often run).

Every variant is built and warmed up first (memory is measured there), then the timed steps run
in rounds that alternate the variants, reversing their order every round, so a change of load on
a shared machine falls on all of them alike. A variant that fails (out of memory, a compiler
error) gets ``error`` and the others go on.

FLOPs are counted by ``avmae.models.count_flops`` on the ``meta`` device: the forward pass, and
forward + backward of the loss (``backward=True``). Throughput in FLOP/s and MFU use the counted
forward + backward (the 3 x forward convention is recorded beside it): the backward of the patch
embeddings needs no input gradient, so the count is a little under 3 x forward.
"""

from __future__ import annotations

import time
from typing import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avmae.augment.transforms import normalize_video
from avmae.config import Config, replace
from avmae.engine.optim import build_optimizer, scaled_lr
from avmae.models import build_pretrain_model, count_flops, example_inputs, num_tokens, num_visible_tokens
from avmae.benchmark.reference import ReferenceAVMAE, check_reference_config, plain_adamw

from .machine import PeakMemory, datasheet_peak, environment, finish, measure_gemm_flops, peak_flops, synchronize

@dataclass(frozen=True)
class VariantSpec:
    """How a variant is built: which model, autocast or not, TF32, compile mode, config changes."""

    description: str
    model: str = "avmae"  # avmae | reference
    autocast: bool = True  # train.mixed_precision autocast; False = fp32
    tf32: bool = False  # TF32 matmuls and convolutions for the fp32 parts (CUDA)
    compile_mode: str | None = None  # torch.compile mode; None = eager
    overrides: tuple[tuple[str, str, object], ...] = ()  # (section, field, value) config changes


SPECS = {
    "avmae": VariantSpec("AVMAE (SDPA attention), timm AdamW (fused on CUDA), train.mixed_precision autocast, TF32 off"),
    "avmae_full_loss": VariantSpec(
        "the avmae variant with model.mae_loss_masked_only=false: full-size fp32 targets (before the masked-only loss)",
        overrides=(("model", "mae_loss_masked_only", False),),
    ),
    "compiled": VariantSpec("the avmae variant under torch.compile(mode=default), inductor", compile_mode="default"),
    "compiled_max_autotune": VariantSpec("torch.compile(mode=max-autotune)", compile_mode="max-autotune"),
    "compiled_max_autotune_no_cudagraphs": VariantSpec(
        "torch.compile(mode=max-autotune-no-cudagraphs)", compile_mode="max-autotune-no-cudagraphs"
    ),
    "compiled_cudagraphs": VariantSpec("torch.compile(mode=reduce-overhead): CUDA graphs", compile_mode="reduce-overhead"),
    "reference_bf16": VariantSpec(
        "avmae/benchmark/reference.py (dense softmax(q @ k.T / sqrt(d)) @ v attention, AdamW foreach=False) under "
        "the same train.mixed_precision autocast, TF32 allowed: the fair baseline",
        model="reference", tf32=True,
    ),  # fmt: skip
    "reference_fp32": VariantSpec(
        "avmae/benchmark/reference.py in fp32: no autocast, no TF32, AdamW foreach=False",
        model="reference", autocast=False,
    ),  # fmt: skip
}
VARIANTS = {name: spec.description for name, spec in SPECS.items()}
PRECISIONS = {"no": None, "bf16": torch.bfloat16}
COMPILE_MODES = {"default": None, "max-autotune": "max-autotune",
                 "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs", "reduce-overhead": "reduce-overhead"}  # fmt: skip


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class Variant:
    """A model and its optimiser, and how one training step runs them."""

    name: str
    module: nn.Module  # what is called: the model, or its compiled wrapper
    optimizer: torch.optim.Optimizer
    autocast: torch.dtype | None
    tf32: bool = False
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def step(self, video: torch.Tensor, audio: torch.Tensor) -> None:
        set_tf32(self.tf32)
        video = normalize_video(video, self.mean, self.std)  # uint8 -> model input, as the engine does
        with torch.autocast(video.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.module(video, audio)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_precision(cfg: Config) -> torch.dtype | None:
    """Autocast dtype of ``train.mixed_precision`` (fp16 needs a gradient scaler: not measured)."""
    if cfg.train.mixed_precision not in PRECISIONS:
        raise ValueError(
            f"train.mixed_precision={cfg.train.mixed_precision!r}: the benchmark measures 'no' or 'bf16'"
        )
    return PRECISIONS[cfg.train.mixed_precision]


def check_variants(cfg: Config, variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be some of {', '.join(VARIANTS)}, got {variants}")
    if any(SPECS[v].model == "reference" for v in variants):
        check_reference_config(cfg)
    if "reference_bf16" in variants and cfg.train.mixed_precision != "bf16":
        raise ValueError("the reference_bf16 variant runs under train.mixed_precision=bf16; this config has "
                         f"{cfg.train.mixed_precision!r} (set train.mixed_precision=bf16)")
    step_precision(cfg)


def default_variants(cfg: Config) -> list[str]:
    """``avmae``, and both reference rows when the reference model implements ``cfg`` (compiled
    variants are asked for by name: compiling takes minutes on the CPU)."""
    try:
        check_reference_config(cfg)
    except ValueError:
        return ["avmae"]
    return ["avmae", "reference_bf16", "reference_fp32"] if cfg.train.mixed_precision == "bf16" else ["avmae", "reference_fp32"]


def synthetic_inputs(cfg: Config, batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 ``video (B, C, T, H, W)`` (as datasets deliver it) and normalised float
    ``audio (B, 1, T_a, F)`` of the config's geometry (``avmae.models.example_inputs``); float
    video on ``meta`` (FLOP counting)."""
    inputs = example_inputs(cfg, batch, device, uint8_video=True)
    return inputs["video"], inputs["audio"]


def variant_config(cfg: Config, name: str) -> Config:
    """``cfg`` with the variant's config changes applied."""
    for section, key, value in SPECS[name].overrides:
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})
    return cfg


def _build_model(cfg: Config, name: str) -> nn.Module:
    return ReferenceAVMAE(cfg) if SPECS[name].model == "reference" else build_pretrain_model(variant_config(cfg, name))


def build_variant(cfg: Config, name: str, device: torch.device) -> Variant:
    spec = SPECS[name]
    model = _build_model(cfg, name).to(device).train()
    lr = scaled_lr(cfg.train, cfg.data.batch_size)
    autocast = step_precision(cfg) if spec.autocast else None
    stats = {"mean": tuple(cfg.data.video.mean), "std": tuple(cfg.data.video.std)}
    if spec.model == "reference":
        return Variant(name, model, plain_adamw(model, cfg.train, lr), autocast, spec.tf32, **stats)
    optimizer = build_optimizer(model, cfg.train, lr, fused=device.type == "cuda")  # as the engine
    module = model
    if spec.compile_mode is not None:
        module = torch.compile(model, backend="inductor", mode=COMPILE_MODES[spec.compile_mode])
    return Variant(name, module, optimizer, autocast, spec.tf32, **stats)


def count_step_flops(cfg: Config, name: str, batch: int = 2) -> dict[str, int]:
    """FLOPs per clip of the forward pass and of forward + backward, counted on ``meta``."""
    with torch.device("meta"):
        model = _build_model(cfg, name).train()
    video, audio = synthetic_inputs(cfg, batch, "meta")
    return {
        "forward": count_flops(model, video, audio) // batch,
        "step": count_flops(model, video, audio, backward=True) // batch,
    }


def split_rounds(steps: int, rounds: int) -> list[int]:
    """``steps`` split into ``rounds`` near-equal positive parts."""
    if steps < 1 or not 1 <= rounds <= steps:
        raise ValueError(f"need 1 <= rounds <= steps, got steps={steps}, rounds={rounds}")
    return [steps // rounds + (r < steps % rounds) for r in range(rounds)]


def reference_ratios(results: dict[str, dict], precision: str) -> None:
    """Add ``vs_reference_bf16`` / ``vs_reference_fp32`` (clips/s ratios) to every avmae variant
    that ran, for each reference that ran, and ``vs_reference`` against the fair reference: the
    same precision (``reference_bf16`` under bf16, with TF32). When the fair one was asked for and
    failed there is no ``vs_reference`` (the fp32 reference, slower for reasons of its own, never
    stands in for it); ``reference_note`` says why."""
    fair_name = "reference_bf16" if precision == "bf16" else "reference_fp32"
    clips = {r: results.get(r, {}).get("clips_per_s") for r in ("reference_bf16", "reference_fp32")}
    note = None
    if fair_name in results and not clips[fair_name]:
        note = f"no vs_reference: {fair_name} failed ({results[fair_name].get('error', 'no timing')})"
    for name in results:
        if SPECS[name].model == "reference" or "clips_per_s" not in results[name]:
            continue
        for ref, value in clips.items():
            if value:
                results[name][f"vs_{ref}"] = results[name]["clips_per_s"] / value
        if clips[fair_name]:
            results[name]["vs_reference"] = results[name]["clips_per_s"] / clips[fair_name]
        elif note:
            results[name]["reference_note"] = note


def _out_of_memory(err: Exception) -> str:
    return f"out of memory: {str(err).splitlines()[0]}"


def measure_train_step(
    cfg: Config,
    device: torch.device,
    variants: list[str],
    warmup: int = 3,
    steps: int = 10,
    rounds: int = 2,
    gemm_size: int = 2048,
    on_round: Callable[[dict], None] | None = None,
) -> dict:
    """Measure each variant's training step at ``data.batch_size`` clips; see the module doc.
    ``on_round`` receives the record so far (with ``partial``) after every timed round but the
    last, so that a run stopped from outside (the suite's timeout) keeps what it measured.

    Returns a JSON-ready record: environment, geometry, FLOPs, the MFU yardstick and, per
    variant, ``clips_per_s``, ``step_ms``, ``round_clips_per_s``, ``peak_memory_bytes``,
    ``build_and_warmup_s``, ``achieved_flops``, ``mfu`` and, when the reference ran, ``vs_reference``
    (clips/s ratio). A variant that runs out of memory gets ``error`` instead.
    """
    check_variants(cfg, variants)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
    per_round = split_rounds(steps, rounds)
    batch = cfg.data.batch_size
    env = environment(device, torch.get_num_threads())
    tokens = num_tokens(cfg)
    precision = step_precision(cfg)
    flops = {name: count_step_flops(cfg, name) for name in variants}
    video, audio = synthetic_inputs(cfg, batch, device)

    results: dict[str, dict] = {}
    built: dict[str, Variant] = {}
    for name in variants:
        results[name] = {"description": VARIANTS[name]}
        try:
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                variant = build_variant(cfg, name, device)
                for _ in range(warmup):
                    variant.step(video, audio)
                synchronize(device)
            built[name] = variant
            results[name] |= {"build_and_warmup_s": time.perf_counter() - start,
                              "peak_memory_bytes": memory.bytes, "memory_measure": memory.what}  # fmt: skip
        except torch.OutOfMemoryError as err:
            results[name]["error"] = _out_of_memory(err)
            torch.cuda.empty_cache()
        except Exception as err:  # a compiler failure in one variant must not lose the others
            results[name]["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    gemm_dtype = precision or torch.float32
    gemm_before = None if datasheet_peak(device, gemm_dtype) else measure_gemm_flops(device, gemm_dtype, gemm_size)
    timings: dict[str, list[tuple[int, float]]] = {name: [] for name in built}

    def summary(peak: float, peak_source: str) -> dict:
        """The record from the rounds timed so far."""
        variants = {name: dict(result) for name, result in results.items()}
        for name, parts in timings.items():
            if name not in built or not parts:
                continue
            done, seconds = sum(n for n, _ in parts), sum(t for _, t in parts)
            clips_per_s = done * batch / seconds
            achieved = flops[name]["step"] * clips_per_s
            variants[name] |= {
                "timed_steps": done,
                "timed_s": seconds,
                "clips_per_s": clips_per_s,
                "step_ms": 1000.0 * seconds / done,
                "round_clips_per_s": [n * batch / t for n, t in parts],
                "achieved_flops": achieved,
                "mfu": achieved / peak,
            }
        reference_ratios(variants, cfg.train.mixed_precision)
        video_cfg, audio_cfg = cfg.data.video, cfg.data.audio
        return {
            "kind": "train_step",
            **finish(env),
            "model_size": cfg.model.size,
            "batch_size": batch,
            "precision": cfg.train.mixed_precision,
            "fused_adamw": device.type == "cuda",
            "geometry": {
                "video": [3, video_cfg.num_frames, video_cfg.size, video_cfg.size],
                "audio": [1, audio_cfg.target_length, audio_cfg.num_mel_bins],
            },
            "tokens": tokens,
            "visible_tokens": num_visible_tokens(cfg),
            "warmup_steps": warmup,
            "timed_steps": steps,
            "rounds": rounds,
            "flops_per_clip": flops,
            "flops_convention": "counted forward + backward (torch FlopCounterMode); 3 x forward for comparison: "
            + ", ".join(f"{n} {3 * f['forward'] / 1e9:.3f} GFLOP" for n, f in flops.items()),
            "peak_flops": peak,
            "peak_source": peak_source,
            "variants": variants,
        }

    for r, count in enumerate(per_round):
        for name in list(built) if r % 2 == 0 else list(reversed(built)):
            try:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(count):
                    built[name].step(video, audio)
                synchronize(device)
                timings[name].append((count, time.perf_counter() - start))
            except torch.OutOfMemoryError as err:
                results[name]["error"] = _out_of_memory(err)
                del built[name]
                torch.cuda.empty_cache()
        if on_round is not None and r + 1 < len(per_round):
            before = datasheet_peak(device, gemm_dtype) or (gemm_before, "GEMM measured before the rounds")
            on_round(summary(*before) | {"partial": f"{r + 1} of {len(per_round)} rounds timed"})
    peak, peak_source = peak_flops(device, gemm_dtype, gemm_size, gemm_before)  # before and after the timed rounds
    set_tf32(False)
    return summary(peak, peak_source)
