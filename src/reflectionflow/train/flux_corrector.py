"""`reflectionflow train flux-corrector`: reflection tuning of FLUX.1 in the OminiControl layout.

The FLUX family of the shared corrector trainer (train/corrector_common.py): a condition-branch LoRA
(backends/flux/lora.py, rank, alpha and targets configurable; the released corrector's layers by
default) on a frozen FLUX.1 transformer, trained with `corrector_forward` (backends/flux/transformer.py),
the same function the inference pipeline calls. Per sample:

    target image  -> resized to `resolution`, VAE (mode), shifted and scaled, packed   = x0
    condition     -> resized to `condition_size`, the same encoding, columns shifted left of the
                     target grid (a black image when the image is dropped)
    CLIP (pooled) <- the prompt;  T5 <- prompt + " [Reflexion]: " + reflection
    guidance      =  1 (the original trains FLUX.1-dev's guidance embedding at 1)

The shippable adapters (OUT/lora/pytorch_lora_weights.safetensors) use the released file layout:
`--lora-path OUT/lora` loads them into the FLUX backend's reflection corrector, and
`FluxPipeline.load_lora_weights(OUT/lora)` into diffusers (which applies them to every token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .corrector_common import (
    NO_GENREF,
    CorrectorBatch,
    CorrectorFamily,
    CorrectorTrainConfig,
    CorrectorTrainResult,
    train_corrector,
)


@dataclass
class FluxCorrectorConfig(CorrectorTrainConfig):
    out_dir: str = "runs/flux-corrector"
    flux_path: str = ""  # a local diffusers FLUX.1 folder (FluxPipeline)
    resolution: int = 1024  # target images (the original: a 64x64 token grid)
    condition_size: int = 512  # condition images (32x32 = 1024 tokens)
    max_sequence_length: int = 512  # T5 tokens
    train_guidance: float = 1.0
    val_verifier: str = "clip"

    def validate(self) -> FluxCorrectorConfig:
        from ..backends.flux.loading import check_flux_folder, meta_transformer
        from ..backends.flux.lora import RELEASED_TARGETS, LoRAError, add_lora

        if not self.flux_path:
            raise ValueError("flux_path: no FLUX folder given (--flux-path, a local diffusers FLUX.1 folder)")
        folder = check_flux_folder(self.flux_path)  # JSON files only
        if not self.genref:
            raise ValueError(NO_GENREF)
        super().validate()
        mult = folder.vae_scale_factor * 2
        for name in ("resolution", "condition_size"):
            if getattr(self, name) < mult or getattr(self, name) % mult:
                raise ValueError(f"{name} must be a positive multiple of {mult} (VAE factor x 2x2 packing), "
                                 f"got {getattr(self, name)}")
        if self.max_sequence_length < 1 or self.max_sequence_length > 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {self.max_sequence_length}")
        try:  # on the meta device: names and shapes, no memory
            add_lora(meta_transformer(folder), self.lora_rank, self.lora_alpha, self.lora_targets or RELEASED_TARGETS)
        except LoRAError as e:
            raise ValueError(f"lora_targets: {e}; the defaults are {', '.join(RELEASED_TARGETS)}") from None
        return self


class FluxCorrectorModule(nn.Module):
    """`forward(x_t, t, inputs) -> velocity` around the transformer (what DDP wraps)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        from ..backends.flux.transformer import corrector_forward

        dtype = self.transformer.dtype
        return corrector_forward(self.transformer, x_t.to(dtype), inputs["t5"], inputs["pooled"], t,
                                 inputs["img_ids"], inputs["txt_ids"], guidance=inputs["guidance"],
                                 condition=inputs["cond"], cond_ids=inputs["cond_ids"])  # (B, N_img, C*4)


class FluxFamily(CorrectorFamily):
    default_verifier = "clip"

    def __init__(self, cfg: FluxCorrectorConfig, device: torch.device, pipe=None):
        """`pipe`: a FluxPipeline already in memory (tests, benchmarks); else loaded from cfg.flux_path."""
        from diffusers import FluxPipeline

        from ..backends.flux.lora import RELEASED_TARGETS, add_lora
        from ..backends.flux.pipeline import FluxReflectionCorrectorPipeline

        self.cfg = cfg
        self.dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32
        if pipe is None:
            pipe = FluxPipeline.from_pretrained(cfg.flux_path, dtype=self.dtype)
        pipe.to(device)
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            part.requires_grad_(False).eval()
        tf = pipe.transformer
        self.names = add_lora(tf, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or RELEASED_TARGETS)
        for name in self.names:  # adapters train in fp32 (autocast runs them in bf16)
            layer = tf.get_submodule(name)
            layer.lora_A.float().requires_grad_(True)
            layer.lora_B.float().requires_grad_(True)
        if cfg.gradient_checkpointing:
            tf.gradient_checkpointing = True  # corrector_forward checkpoints each block when set
        self.device = device
        self.corrector = FluxReflectionCorrectorPipeline(**pipe.components)
        self.corrector.set_progress_bar_config(disable=True)
        self.module = FluxCorrectorModule(tf)

    def _latents(self, images: Sequence[np.ndarray], size: int) -> torch.Tensor:
        tokens, _ = self.corrector.encode_condition(images, size, self.device, torch.float32)
        return tokens  # (B, (size/16)^2, C*4) packed, shifted and scaled VAE latents (the mode)

    def encode(self, batch: CorrectorBatch, device: torch.device) -> tuple[torch.Tensor, dict]:
        from ..backends.flux.components import corrector_text
        from ..backends.flux.transformer import condition_ids

        cfg, pipe, B = self.cfg, self.corrector, len(batch)
        x0 = self._latents(batch.good, cfg.resolution)  # (B, N_img, C*4)
        black = np.zeros((cfg.condition_size, cfg.condition_size, 3), np.uint8)
        cond = self._latents([black if b is None else b for b in batch.bad], cfg.condition_size)
        cols = cfg.condition_size // (pipe.vae_scale_factor * 2)
        t5_texts = [corrector_text(p, r) if p else "" for p, r in zip(batch.prompts, batch.reflections)]
        t5, pooled, txt_ids = pipe.encode_prompt(prompt=list(batch.prompts), prompt_2=t5_texts, device=device,
                                                 max_sequence_length=cfg.max_sequence_length)
        grid = cfg.resolution // (pipe.vae_scale_factor * 2)
        img_ids = pipe._prepare_latent_image_ids(B, grid, grid, device, self.dtype)  # (N_img, 3)
        guidance = (torch.full((B,), cfg.train_guidance, device=device)
                    if pipe.transformer.config.guidance_embeds else None)
        inputs = {"t5": t5, "pooled": pooled, "txt_ids": txt_ids, "img_ids": img_ids, "guidance": guidance,
                  "cond": cond.to(self.dtype), "cond_ids": condition_ids(cols, cols, device=device, dtype=self.dtype)}
        if cfg.partial_share > 0:  # partial-noise starts: the previous image at the target's size
            inputs["start"] = self._latents([g if b is None else b for g, b in zip(batch.good, batch.bad)],
                                            cfg.resolution)
            inputs["start_ok"] = torch.tensor([b is not None for b in batch.bad], device=device)
        return x0, inputs

    @torch.no_grad()
    def correct(self, images, prompts, reflections, seeds) -> list[np.ndarray]:
        from ..backends.flux.components import _to_uint8, corrector_text

        cfg, out = self.cfg, []
        auto = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for i in range(0, len(images), cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[sl]]
            with auto:
                res = self.corrector(image=list(images[sl]), prompt=list(prompts[sl]),
                                     prompt_2=[corrector_text(p, r) for p, r in zip(prompts[sl], reflections[sl])],
                                     height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.val_steps,
                                     guidance_scale=cfg.val_guidance, generator=gens, condition_size=cfg.condition_size,
                                     max_sequence_length=cfg.max_sequence_length, output_type="np").images
            out += _to_uint8(res)
        return out

    def save_adapters(self, folder: Path, info: dict) -> Path:
        from ..backends.flux.lora import save_lora

        cfg = self.cfg
        # diffusers reads the LoraConfig (rank, alpha, layers) from this key, prefixed by the component.
        diffusers_meta = {"transformer.r": cfg.lora_rank, "transformer.lora_alpha": cfg.lora_alpha,
                          "transformer.target_modules": list(self.names)}
        extra = {"lora_adapter_metadata": json.dumps(diffusers_meta), "step": info.get("step", ""),
                 "train_config": json.dumps(info.get("train_config", {}))}
        path = save_lora(folder, self.module.transformer, cfg.lora_alpha, extra)
        (Path(folder) / "train_config.json").write_text(json.dumps(info.get("train_config", {}), indent=1) + "\n")
        return path


def train_flux_corrector(cfg: FluxCorrectorConfig, pipe=None, stop_after: int | None = None) -> CorrectorTrainResult:
    """Train the FLUX corrector's LoRA; OUT/lora holds the shippable adapters."""
    cfg.validate()
    return train_corrector(cfg, FluxFamily, {"cfg": cfg, "pipe": pipe}, name="flux-corrector", stop_after=stop_after)
