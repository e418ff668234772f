"""``AVMAE``: one pretraining module for MAE, contrastive and MAE + contrastive objectives.

``loss = mae_weight * (w_v * L_video + w_a * L_audio) + contrastive_weight * L_contrastive``

- MAE branch (``mae_weight > 0``): mask each modality, encode the visible tokens, decode and score
  the masked patches (``reconstruction``: joint | inpaint | both; ``both`` averages the two).
- Contrastive branch (``contrastive != none``): pooled embeddings of the same encoder, on the
  visible tokens of the same masks (``contrastive_masked``) or on all tokens.
  ``contrastive_pairs: modalities`` contrasts a clip's video with its audio: for early and mid
  fusion the joint blocks then run per modality (no cross-modal attention), as CAV-MAE does;
  ``views`` contrasts two augmented views (``video2``/``audio2``), each embedded as the mean of
  its per-modality mean-pooled tokens.
With ``mae_weight: 0`` no decoder is built or run; with ``contrastive: none`` no head is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avmae.config import Config, ModelConfig
from .masking import TokenMask, num_visible, sample_mask, take_tokens
from .losses import masked_mse, masked_patch_mse, normalize_patches

from .contrastive import InfoNCEHead, MoCoV3Head, SimSiamHead
from .decoder import AVDecoder
from .encoder import AVEncoder
from .layers import MODALITIES, patchify_audio, patchify_video
from .registry import get_size


def model_grids(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Token grids of the configured geometry: ``{"video": (T', H', W'), "audio": (T', F')}``."""
    m, video, audio = cfg.model, cfg.data.video, cfg.data.audio
    problems = []
    if video.num_frames % m.tubelet:
        problems.append(f"data.video.num_frames={video.num_frames} is not a multiple of model.tubelet={m.tubelet}")
    if video.size % m.patch_size:
        problems.append(f"data.video.size={video.size} is not a multiple of model.patch_size={m.patch_size}")
    if audio.target_length % m.patch_size:
        problems.append(
            f"audio target length {audio.target_length} frames (data.audio.seconds={audio.seconds}) "
            f"is not a multiple of model.patch_size={m.patch_size}"
        )
    if audio.num_mel_bins % m.patch_size:
        problems.append(f"data.audio.num_mel_bins={audio.num_mel_bins} is not a multiple of model.patch_size={m.patch_size}")
    if problems:
        raise ValueError("input geometry does not tile into tokens: " + "; ".join(problems))
    return {
        "video": (video.num_frames // m.tubelet, video.size // m.patch_size, video.size // m.patch_size),
        "audio": (audio.target_length // m.patch_size, audio.num_mel_bins // m.patch_size),
    }


def num_tokens(cfg: Config) -> dict[str, int]:
    """Tokens per clip and modality for the configured geometry (no model is built)."""
    return {m: math.prod(g) for m, g in model_grids(cfg).items()}


def num_visible_tokens(cfg: Config) -> dict[str, int]:
    """Visible (unmasked) tokens per clip and modality under the configured masking."""
    m, grids = cfg.model, model_grids(cfg)
    return {
        "video": num_visible(m.video_masking, grids["video"], m.mask_ratio_video),
        "audio": num_visible(m.audio_masking, grids["audio"], m.mask_ratio_audio),
    }


def example_inputs(
    cfg: Config, batch: int, device: torch.device | str = "cpu", seed: int = 0, uint8_video: bool = False
) -> dict[str, torch.Tensor]:
    """Random model inputs of the configured geometry: ``video (B, 3, T, H, W)``, ``audio (B, 1, T_a, F)``,
    and ``video2``/``audio2`` (copies) when the contrastive pairs are two views. Seeded; empty on ``meta``.
    ``uint8_video``: video as datasets deliver it, uint8 frames that the caller normalises on the
    device (``avmae.data.device.normalize_inputs``); float everywhere on ``meta``."""
    video, audio = cfg.data.video, cfg.data.audio
    shapes = {
        "video": (batch, 3, video.num_frames, video.size, video.size),
        "audio": (batch, 1, audio.target_length, audio.num_mel_bins),
    }
    if torch.device(device).type == "meta":
        inputs = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    else:
        generator = torch.Generator().manual_seed(seed)
        inputs = {name: torch.randn(shape, generator=generator).to(device) for name, shape in shapes.items()}
        if uint8_video:
            frames = torch.randint(0, 256, shapes["video"], dtype=torch.uint8, generator=generator)
            inputs["video"] = frames.to(device)
    if cfg.model.contrastive != "none" and cfg.model.contrastive_pairs == "views":
        inputs |= {"video2": inputs["video"].clone(), "audio2": inputs["audio"].clone()}
    return inputs


def build_encoder(cfg: Config, modalities: tuple[str, ...] = MODALITIES) -> AVEncoder:
    size = get_size(cfg.model.size)
    grids = model_grids(cfg)
    encoder = AVEncoder(
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_ratio,
        fusion=cfg.model.fusion,
        fusion_layers=cfg.model.fusion_layers,
        patch_size=cfg.model.patch_size,
        tubelet=cfg.model.tubelet,
        video_grid=grids["video"],
        audio_grid=grids["audio"],
        modalities=modalities,
        modality_embed=cfg.model.modality_embed,
        drop_path=cfg.model.drop_path,
        pos_embed=cfg.model.pos_embed,
        stack_norms=cfg.model.stack_norms,
        learned_pos=cfg.model.learned_pos_embed,
        pos_grids={"video": tuple(cfg.model.pos_grid_video), "audio": tuple(cfg.model.pos_grid_audio)},
        cls_token=cfg.model.cls_token,
        joint_norms=cfg.model.joint_norms,
        final_norm=cfg.model.final_norm,
    )
    encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return encoder


class AVMAE(nn.Module):
    """Joint audiovisual masked autoencoder with an optional contrastive head.

    Inputs: ``video (B, C, T, H, W)``, ``audio (B, 1, T_a, F)``; ``video2``/``audio2`` the second
    view when ``contrastive_pairs: views``. ``generator`` makes the masks reproducible.
    """

    def __init__(self, cfg: ModelConfig, encoder: AVEncoder, decoder: AVDecoder | None) -> None:
        super().__init__()
        if cfg.mae_weight < 0 or cfg.contrastive_weight < 0:
            raise ValueError("model.mae_weight and model.contrastive_weight must be >= 0")
        if cfg.mae_weight == 0 and cfg.contrastive == "none":
            raise ValueError("model.mae_weight=0 with model.contrastive=none leaves nothing to train")
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.tubelet = cfg.tubelet
        self.encoder = encoder
        self.decoder = decoder
        self.contrastive = self._build_head(cfg, encoder)

    @staticmethod
    def _build_head(cfg: ModelConfig, encoder: AVEncoder) -> nn.Module | None:
        names = ("video", "audio") if cfg.contrastive_pairs == "modalities" else ("clip",)
        dim = encoder.embed_dim
        if cfg.contrastive == "infonce":
            group = cfg.contrastive_replica_size if cfg.contrastive_negatives == "replica" else None
            return InfoNCEHead(cfg.temperature, cfg.learn_temperature, cfg.contrastive_symmetric, group)
        if cfg.contrastive == "simsiam":
            return SimSiamHead(names, dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_dim)
        if cfg.contrastive == "mocov3":
            return MoCoV3Head(encoder, names, dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_dim,
                              cfg.temperature, cfg.momentum)
        return None

    # ---- pieces -------------------------------------------------------------------------------

    def grids(self, inputs: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {m: self.encoder.grid(m, x) for m, x in inputs.items()}

    def sample_masks(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, TokenMask]:
        policy = {"video": self.cfg.video_masking, "audio": self.cfg.audio_masking}
        ratio = {"video": self.cfg.mask_ratio_video, "audio": self.cfg.mask_ratio_audio}
        return {
            m: sample_mask(policy[m], x.shape[0], self.encoder.grid(m, x), ratio[m], generator, x.device)
            for m, x in inputs.items()
        }

    def patchify(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Raw input -> ``(B, N, patch_dim)`` in token order."""
        if modality == "video":
            return patchify_video(x, self.patch_size, self.tubelet)
        return patchify_audio(x, self.patch_size)

    def targets(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.standardised({m: self.patchify(m, x) for m, x in inputs.items()})

    def standardised(self, patches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reconstruction targets from the raw patches: each patch standardised over its own
        values when ``norm_pix_loss``, else the patches themselves."""
        if self.cfg.norm_pix_loss:
            return {m: normalize_patches(t) for m, t in patches.items()}
        return patches

    @staticmethod
    def _visible(tokens: dict[str, torch.Tensor], masks: dict[str, TokenMask] | None) -> dict[str, torch.Tensor]:
        if masks is None:
            return tokens
        return {m: take_tokens(x, masks[m].ids_keep) for m, x in tokens.items()}

    def _encode(
        self,
        encoder: AVEncoder,
        inputs: dict[str, torch.Tensor],
        masks: dict[str, TokenMask] | None,
        isolate: bool,
    ) -> dict[str, torch.Tensor]:
        return encoder.forward_tokens(self._visible(encoder.embed(inputs), masks), isolate)

    @staticmethod
    def _pool(latent: dict[str, torch.Tensor], pairs: str) -> tuple[torch.Tensor, ...]:
        """``modalities``: (video, audio) mean-pooled; ``views``: mean of the two pooled modalities."""
        pooled = {m: x.mean(dim=1) for m, x in latent.items()}
        if pairs == "modalities":
            return pooled["video"], pooled["audio"]
        return (torch.stack(list(pooled.values())).mean(dim=0),)

    # ---- the MAE branch, top to bottom: encoder, decoder, loss ---------------------------------

    def forward_encoder(
        self, inputs: dict[str, torch.Tensor], masks: dict[str, TokenMask] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Embed, keep the visible tokens, encode.

        Args:
            inputs: ``video (B, C, T, H, W)``, ``audio (B, 1, T_a, F)``.
            masks: per modality, ``ids_keep (B, N_keep_m)``; None keeps every token.

        Returns:
            ``(hidden, latent)``: the per-modality stage's output and the encoder's output, both
            ``{m: (B, N_keep_m, D)}`` (the first is reused by the contrastive branch).
        """
        hidden = self.encoder.forward_modality_stage(self._visible(self.encoder.embed(inputs), masks))
        return hidden, self.encoder.forward_joint_stage(hidden, isolate=False)

    def forward_decoder(
        self, latent: dict[str, torch.Tensor], masks: dict[str, TokenMask], grids: dict[str, tuple[int, ...]]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Predict every patch from the encoded visible tokens ``{m: (B, N_keep_m, D)}``.

        Returns ``{"joint": {m: (B, N_m, patch_dim_m)}}`` (each decoder sees its own modality's
        tokens and mask tokens; ``joint`` decoders see both) and/or ``{"inpaint": ...}`` (each
        modality predicted from the other one's tokens alone), as ``model.reconstruction`` says.
        """
        recon, predictions = self.cfg.reconstruction, {}
        if recon in ("joint", "both"):
            predictions["joint"] = self.decoder.reconstruct(latent, masks, grids)
        if recon in ("inpaint", "both"):
            predictions["inpaint"] = {m: self.decoder.inpaint(m, latent, masks, grids) for m in latent}
        return predictions

    def forward_loss(
        self,
        predictions: dict[str, dict[str, torch.Tensor]],
        patches: dict[str, torch.Tensor],
        masks: dict[str, TokenMask],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE on the masked patches (a patch's errors reduced by ``patch_loss``: mean or sum),
        averaged over the reconstruction objectives of each modality,
        then weighted by modality (``loss_weight_video``, ``loss_weight_audio``).

        Args:
            predictions: ``forward_decoder``'s output; patches: the raw ``{m: (B, N_m, patch_dim_m)}``
                (``patchify``), the target being each patch standardised when ``norm_pix_loss``;
                masks: ``mask (B, N_m)``, 1 = masked.

        With ``mae_loss_masked_only`` the masked rows are gathered first and the fp32 target is
        built at that size only (``masked_patch_mse``); otherwise at full size (``masked_mse``).
        Both give the same value.

        Returns:
            the scalar loss and its per-objective parts (``mae_video``, ``mae_audio`` and, with
            ``reconstruction: both``, ``inpaint_video``, ``inpaint_audio``).
        """
        cfg = self.cfg
        targets = None if cfg.mae_loss_masked_only else self.standardised(patches)

        def score(pred: torch.Tensor, m: str) -> torch.Tensor:
            if targets is not None:
                return masked_mse(pred, targets[m], masks[m].mask, cfg.patch_loss)
            num_masked = masks[m].mask.shape[1] - masks[m].num_visible
            return masked_patch_mse(pred, patches[m], masks[m].mask, num_masked, cfg.norm_pix_loss, cfg.patch_loss)

        objectives: dict[str, list[torch.Tensor]] = {m: [] for m in patches}
        logs = {}
        for kind, preds in predictions.items():
            for m in patches:
                objectives[m].append(score(preds[m], m))
                name = f"inpaint_{m}" if kind == "inpaint" and len(predictions) > 1 else f"mae_{m}"
                logs[name] = objectives[m][-1]
        weight = {"video": cfg.loss_weight_video, "audio": cfg.loss_weight_audio}
        loss = sum(weight[m] * torch.stack(objectives[m]).mean() for m in patches)
        return loss, logs

    def _mae_branch(self, inputs, masks, latent) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        patches = {m: self.patchify(m, x) for m, x in inputs.items()}
        predictions = self.forward_decoder(latent, masks, self.grids(inputs))
        loss, logs = self.forward_loss(predictions, patches, masks)
        preds = predictions.get("joint") or predictions["inpaint"]  # what the pictures show
        # the full-size targets, for inspection (visualize); not built in training with the
        # masked-only loss, which never needs them
        keep_targets = not (self.cfg.mae_loss_masked_only and self.training)
        targets = self.standardised(patches) if keep_targets else {}
        outputs = {}
        for m in inputs:
            outputs[f"pred_{m}"] = preds[m]
            if keep_targets:
                outputs[f"target_{m}"] = targets[m]
            outputs[f"mask_{m}"] = masks[m].mask
        return loss, logs, outputs

    # ---- the contrastive branch -----------------------------------------------------------------

    def _contrastive_branch(self, inputs, inputs2, masks, mae_pass, generator) -> torch.Tensor:
        """``mae_pass``: (modality-stage output, encoded tokens) of the MAE branch on the same
        visible tokens, reused where they are what this branch needs; None otherwise."""
        cfg = self.cfg
        pairs = cfg.contrastive_pairs
        isolate = pairs == "modalities"
        masks = masks if cfg.contrastive_masked else None

        if mae_pass is None:
            latent1 = self._encode(self.encoder, inputs, masks, isolate)
        elif isolate and self.encoder.cross_modal:
            # same per-modality layers, joint layers run again without cross-modal attention
            latent1 = self.encoder.forward_joint_stage(mae_pass[0], isolate=True)
        else:
            latent1 = mae_pass[1]
        if pairs == "modalities":
            x1, x2 = self._pool(latent1, pairs)
            names = ("video", "audio")
        else:
            masks2 = self.sample_masks(inputs2, generator) if masks is not None else None
            (x1,) = self._pool(latent1, pairs)
            (x2,) = self._pool(self._encode(self.encoder, inputs2, masks2, isolate=False), pairs)
            names = ("clip", "clip")

        if not isinstance(self.contrastive, MoCoV3Head):
            return self.contrastive(x1, x2, names)
        with torch.no_grad():
            momentum_encoder = self.contrastive.momentum_encoder
            if pairs == "modalities":
                e1, e2 = self._pool(self._encode(momentum_encoder, inputs, masks, isolate=True), pairs)
            else:
                (e1,) = self._pool(self._encode(momentum_encoder, inputs, masks, isolate=False), pairs)
                (e2,) = self._pool(self._encode(momentum_encoder, inputs2, masks2, isolate=False), pairs)
            k1, k2 = self.contrastive.keys(e1, names[0]), self.contrastive.keys(e2, names[1])
        return self.contrastive(x1, x2, names, k1, k2)

    # ---- the module ---------------------------------------------------------------------------

    def forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        video2: torch.Tensor | None = None,
        audio2: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Returns ``loss``, ``logs`` (detached scalars) and, when the MAE branch runs,
        ``pred_*``/``target_*`` ``(B, N, patch_dim)`` and ``mask_*`` ``(B, N)`` (1 = masked);
        in training with ``model.mae_loss_masked_only`` no full-size ``target_*`` is built."""
        cfg = self.cfg
        inputs = {"video": video, "audio": audio}
        inputs2 = None
        if self.contrastive is not None and cfg.contrastive_pairs == "views":
            if video2 is None or audio2 is None:
                raise ValueError("model.contrastive_pairs=views needs video2 and audio2 (augment.two_views=true)")
            inputs2 = {"video": video2, "audio": audio2}

        use_masks = self.decoder is not None or cfg.contrastive_masked
        masks = self.sample_masks(inputs, generator) if use_masks else None
        loss = torch.zeros((), device=video.device)
        logs: dict[str, torch.Tensor] = {}
        outputs: dict = {}
        mae_pass = None
        if self.decoder is not None:
            mae_pass = hidden, latent = self.forward_encoder(inputs, masks)
            mae_loss, mae_logs, outputs = self._mae_branch(inputs, masks, latent)
            loss = loss + cfg.mae_weight * mae_loss
            logs.update(mae_logs, mae=mae_loss)

        if self.contrastive is not None:
            reuse = mae_pass if cfg.contrastive_masked else None
            contrastive_loss = self._contrastive_branch(inputs, inputs2, masks, reuse, generator)
            loss = loss + cfg.contrastive_weight * contrastive_loss
            logs["contrastive"] = contrastive_loss
            if isinstance(self.contrastive, InfoNCEHead):
                logs["temperature"] = self.contrastive.temperature

        outputs["loss"] = loss
        outputs["logs"] = {k: v.detach() for k, v in logs.items()}
        return outputs

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Called by the engine after every optimiser step, ``progress`` in [0, 1]."""
        if isinstance(self.contrastive, MoCoV3Head):
            self.contrastive.update_momentum(self.encoder, progress)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of embeddings, mask tokens and the temperature (timm convention)."""
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        if self.decoder is not None:
            names |= {f"decoder.{n}" for n in self.decoder.no_weight_decay()}
        if self.contrastive is not None:
            names |= {f"contrastive.{n}" for n, _ in self.contrastive.named_parameters() if "logit_scale" in n}
        return names


def build_decoder(cfg: Config, encoder: AVEncoder) -> AVDecoder:
    m = cfg.model
    return AVDecoder(
        kind=m.decoder,
        encoder_dim=encoder.embed_dim,
        width=m.decoder_width,
        depth=m.decoder_depth,
        num_heads=m.decoder_heads,
        mlp_ratio=get_size(m.size).mlp_ratio,
        patch_dims={k: encoder.patch_embed[k].patch_dim for k in encoder.modalities},
        grids=model_grids(cfg),
        modality_embed=m.modality_embed,
        pos_embed=m.pos_embed,
    )


def build_pretrain_model(cfg: Config) -> AVMAE:
    """The pretraining model described by ``cfg.model`` for the geometry of ``cfg.data``."""
    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg, encoder) if cfg.model.mae_weight > 0 else None
    return AVMAE(cfg.model, encoder, decoder)
