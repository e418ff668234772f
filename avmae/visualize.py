"""Pictures of masked reconstruction: input, masked input, reconstruction and target, for a few
frames of the video and for the spectrogram of one clip.

The model predicts patches in the space of its loss: per-patch standardised pixels and fbank
values when ``model.norm_pix_loss`` is on. To put all four rows on the input's scale, each
predicted patch is mapped back with the mean and standard deviation of the true patch (as MAE's
own pictures do). The reconstruction row pastes the predictions into the masked positions around
the visible patches; the target row shows the masked patches alone, which is what the loss
compares the predictions with. The printed MSE is the loss's own, in its space.
"""

from __future__ import annotations

from pathlib import Path

import torch

from avmae.config import Config, replace
from avmae.data.dataset import AVDataset
from avmae.data.device import normalize_inputs
from avmae.data.manifests import ClipRecord, Manifest
from avmae.formats import EXPORT_CONFIG, build_part, export_config, from_pretrained, load_part, read_checkpoint
from avmae.models import AVMAE, unpatchify_audio, unpatchify_video


def load_pretraining_model(path: str | Path) -> tuple[torch.nn.Module, Config]:
    """The ``AVMAE`` (decoder included) of a pretraining checkpoint (``step_XXXXXXXX/``) or of a
    ``--part model`` export folder, in eval mode, and its config."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        model, cfg = from_pretrained(path), export_config(path)
    else:
        state_dict, cfg = read_checkpoint(path)
        model = build_part(cfg, "model")
        load_part(model, state_dict, "model")
    if not isinstance(model, AVMAE) or model.decoder is None:
        raise ValueError(f"{path}: holds no decoder to reconstruct with (export it with --part model)")
    return model.eval(), cfg


def load_clip(cfg: Config, clip: str | Path) -> dict[str, torch.Tensor]:
    """The centred evaluation clip of a media file at ``cfg``'s geometry: ``video (C, T, H, W)``,
    ``audio (1, T_a, F)``."""
    clip = Path(clip)
    if not clip.is_file():
        raise FileNotFoundError(f"clip not found: {clip}")
    manifest = Manifest(records=[ClipRecord(id=clip.stem, video=clip)], classes={}, source=clip)
    data = replace(cfg.data, test_clips=1, test_crops=1, max_decode_failures=0.0)
    dataset = AVDataset(manifest, data, cfg.augment, train=False, split=clip.name)
    item = dataset[0]
    if item["failures"]:
        raise ValueError(f"{clip}: could not be decoded (see the warning above)")
    return normalize_inputs({"video": item["video"], "audio": item["audio"]}, cfg.data.video)


def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the statistics avmae.models.losses.normalize_patches standardises with
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()


@torch.no_grad()
def reconstruct(model: torch.nn.Module, inputs: dict[str, torch.Tensor], seed: int = 0) -> dict[str, dict]:
    """One masked forward pass on a single clip.

    Returns, per modality, ``input``, ``masked``, ``reconstruction`` and ``target`` in the input's
    layout (``(C, T, H, W)`` or ``(1, T_a, F)``), the ``mask_ratio`` and the masked-patch ``mse``.
    """
    batch = {m: x[None] for m, x in inputs.items()}
    out = model(**batch, generator=torch.Generator().manual_seed(seed))
    result = {}
    for m, x in batch.items():
        grid = model.encoder.grid(m, x)

        def unpatchify(p: torch.Tensor) -> torch.Tensor:
            if m == "video":
                return unpatchify_video(p, grid, model.patch_size, model.tubelet, x.shape[1])[0]
            return unpatchify_audio(p, grid, model.patch_size)[0]

        patches = model.patchify(m, x)
        mask = out[f"mask_{m}"].bool()[..., None]  # (1, N, 1), True = masked
        pred, target = out[f"pred_{m}"], out[f"target_{m}"]
        pred_in_input = pred
        if model.cfg.norm_pix_loss:
            mean, std = _patch_stats(patches)
            pred_in_input = pred * std + mean
        result[m] = {
            "input": x[0],
            "masked": unpatchify(patches.masked_fill(mask, float("nan"))),
            "reconstruction": unpatchify(torch.where(mask, pred_in_input, patches)),
            "target": unpatchify(patches.masked_fill(~mask, float("nan"))),
            "mask_ratio": mask.float().mean().item(),
            "mse": ((pred - target) ** 2).mean(dim=-1)[mask[..., 0]].mean().item(),
        }
    return result


def _to_rgb(video: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised ``(C, T, H, W)`` -> displayable ``(T, H, W, C)`` in [0, 1]; masked (NaN) -> grey."""
    rgb = video * torch.tensor(std).view(-1, 1, 1, 1) + torch.tensor(mean).view(-1, 1, 1, 1)
    return rgb.nan_to_num(0.5).clamp(0, 1).permute(1, 2, 3, 0)


def save_reconstruction_figure(
    result: dict[str, dict], cfg: Config, out: str | Path, num_frames: int = 4, title: str = ""
) -> Path:
    """Write a PNG: one row per panel (input, masked input, reconstruction, target), ``num_frames``
    evenly spaced frames on the left and the spectrogram (time across, mel bins up) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ("input", "masked", "reconstruction", "target")
    labels = {
        "input": "input",
        "masked": "masked input",
        "reconstruction": "reconstruction",
        "target": "target",
    }
    video, audio = result.get("video"), result.get("audio")
    frames = []
    if video is not None:
        t = video["input"].shape[1]
        frames = torch.linspace(0, t - 1, min(num_frames, t)).round().long().tolist()
    cols = len(frames) + (1 if audio is not None else 0)
    widths = [1.0] * len(frames) + ([3.0] if audio is not None else [])
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(sum(widths) * 1.6 + 0.5, len(rows) * 1.7), squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )  # fmt: skip
    mean, std = cfg.data.video.mean, cfg.data.video.std
    for r, row in enumerate(rows):
        if video is not None:
            shown = _to_rgb(video[row], mean, std)
            for c, f in enumerate(frames):
                axes[r, c].imshow(shown[f].numpy(), interpolation="nearest")
                if r == 0:
                    axes[r, c].set_title(f"frame {f}", fontsize=8)
        if audio is not None:
            spec = audio[row][0].T  # (F, T_a): mel bins up, time across
            lo, hi = float(audio["input"].min()), float(audio["input"].max())
            axes[r, -1].imshow(
                spec.nan_to_num(lo).numpy(), origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi
            )
            if r == 0:
                axes[r, -1].set_title("fbank (time ->, mel bins ^)", fontsize=8)
        axes[r, 0].set_ylabel(labels[row], fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    summary = ", ".join(
        f"{m}: {res['mask_ratio']:.0%} masked, masked-patch loss {res['mse']:.3f}" for m, res in result.items()
    )
    fig.suptitle(f"{title}\n{summary}" if title else summary, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def visualize(checkpoint: str | Path, clip: str | Path, out: str | Path, seed: int = 0) -> tuple[Path, dict]:
    """Reconstruct ``clip`` with the model of ``checkpoint`` and write the PNG ``out``.

    Returns the PNG path and ``{modality: {"mask_ratio", "mse"}}``."""
    model, cfg = load_pretraining_model(checkpoint)
    result = reconstruct(model, load_clip(cfg, clip), seed)
    path = save_reconstruction_figure(result, cfg, out, title=f"{Path(clip).name} ({Path(checkpoint).name})")
    return path, {m: {"mask_ratio": r["mask_ratio"], "mse": r["mse"]} for m, r in result.items()}
