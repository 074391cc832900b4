"""The FLUX components behind the five interfaces: generator, reflection corrector, Kontext corrector.

Noise: every component draws its initial noise the same way, `noise_like(seed)`: a float32 array
of the unpacked latent shape (C, H/8, W/8) from a CPU `torch.Generator` seeded with `seed`, so a
seed gives the same noise on any device, and the noise search's perturbed noises (passed in
`GenerationRequest.noise`) go through `latents=` unchanged, as in tt-scale-flux.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...components import CorrectionRequest, Corrector, GenerationRequest, GenerationResult, Generator
from .loading import FluxFolder, load_pipeline, resolve_device, resolve_dtype
from .lora import LoRAFile, load_lora

REFLEXION_SEPARATOR = " [Reflexion]: "  # the original inference script's text layout
CLIP_TEXTS = ("prompt", "full")


def corrector_text(prompt: str, reflection: str) -> str:
    """The corrector's T5 text: refined prompt + " [Reflexion]: " + reflection (one line)."""
    reflection = " ".join(line.strip() for line in (reflection or "").splitlines() if line.strip())
    return prompt + REFLEXION_SEPARATOR + reflection if reflection else prompt


def kontext_instruction(prompt: str, reflection: str, include_prompt: bool = False) -> str:
    """The reflection's bullet commands as one edit instruction for FLUX.1 Kontext."""
    lines = [line.strip().lstrip("-*\u2022 ").strip() for line in (reflection or "").splitlines()]
    commands = [c if c.endswith((".", "!", "?")) else c + "." for c in lines if c]
    if not commands:
        return f"Make the image match this description: {prompt}."
    text = " ".join(commands)
    return f"{text} The result should show: {prompt}." if include_prompt else text


def _to_uint8(images) -> list[np.ndarray]:
    arr = np.asarray(images)  # (B, H, W, 3) float in [0, 1] (output_type="np")
    return [np.ascontiguousarray((np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)) for a in arr]


def _step_cache(s: SamplingSettings, images: int):
    """A fresh first-block cache for one pipeline call (models/step_cache.py), or None when it is off."""
    if not s.cache_threshold:
        return None
    from ...models.step_cache import StepCache

    return StepCache(s.cache_threshold, images)


def _cached(cache, images: int) -> list[int]:
    """Per image: transformer passes the call's step cache served (none without one)."""
    return cache.cached_passes() if cache is not None else [0] * images


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


@dataclass
class SamplingSettings:
    height: int = 1024
    width: int = 1024
    steps: int = 30
    guidance: float = 3.5
    max_sequence_length: int = 512
    batch_size: int = 4  # images per transformer call (batching across chains and prompts)
    cache_threshold: float = 0.0  # > 0: step caching (models/step_cache.py); 0: every block at every step


class FluxModels:
    """Loads each FLUX pipeline once and shares its parts.

    The reflection corrector wraps the generator's own transformer (its LoRA layers are inert for
    the plain pipeline), and Kontext reuses FLUX.1-dev's text encoders and VAE, which it ships
    unchanged: one copy of each in memory.
    """

    _shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @classmethod
    def shared(cls, flux: FluxFolder, device: str = "auto", dtype: str = "auto",
               kontext: FluxFolder | None = None) -> FluxModels:
        """One instance per (folders, device, dtype) while anything uses it: components built one kind
        at a time (the registry's way) still share one FLUX in memory."""
        key = cls._key(flux, device, dtype, kontext)
        models = cls._shared.get(key)
        if models is None:
            models = cls(flux, device, dtype, kontext)
            cls._shared[key] = models
        elif kontext is not None and models.kontext_folder is None:
            models.kontext_folder = kontext
        return models

    @staticmethod
    def _key(flux: FluxFolder, device: str, dtype: str, kontext: FluxFolder | None = None) -> tuple:
        return (str(flux.path), str(kontext.path) if kontext else None, resolve_device(device), dtype)

    @classmethod
    def adopt(cls, pipe, flux_path: str, device: str = "auto", dtype: str = "auto") -> FluxModels:
        """Serve `pipe`, a FluxPipeline already in memory, to every component built for the FLUX folder
        `flux_path` with these --device / --dtype settings, for as long as the returned object is kept:
        a command naming that folder then loads no weights (random full-size weights for timing, built
        on the GPU, with a folder of their configs for the checks; benchmarks/flux_end_to_end.py). The
        speed levers the run asks for (--compile-blocks, --fp8) are applied to it at first use."""
        from .loading import check_flux_folder

        folder = check_flux_folder(flux_path)
        models = cls.from_pipeline(pipe)
        models.flux_folder = folder
        cls._shared[cls._key(folder, device, dtype)] = models
        return models

    def __init__(self, flux: FluxFolder, device: str = "auto", dtype: str = "auto",
                 kontext: FluxFolder | None = None):
        self.flux_folder = flux
        self.kontext_folder = kontext
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._pipe = None
        self._corrector = None
        self._kontext = None
        self.lora: LoRAFile | None = None
        self.compile_blocks = False  # regional torch.compile, applied when the pipeline loads
        self.fp8 = False  # fp8 matmuls (models/fp8.py), applied when the pipeline loads
        self._sped_up = False

    @classmethod
    def from_pipeline(cls, pipe, kontext_pipe=None) -> FluxModels:
        """Wrap pipelines already in memory (random weights for timing, a pipeline built elsewhere)."""
        models = cls.__new__(cls)
        models.flux_folder = models.kontext_folder = None
        models.device = str(pipe._execution_device)
        models.dtype = pipe.transformer.dtype
        models._pipe, models._corrector, models._kontext, models.lora = pipe, None, kontext_pipe, None
        models.compile_blocks = models.fp8 = models._sped_up = False
        return models

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = load_pipeline(self.flux_folder, self.device, self.dtype)
        if not self._sped_up:  # once, at first use (the flags are set after the models are made)
            self._sped_up = True
            self.speed_up(self._pipe.transformer)
        return self._pipe

    def speed_up(self, transformer) -> None:
        """fp8 first (the compiled graphs then hold the fp8 matmuls), then regional compilation of the
        blocks, for the corrector's functions and for diffusers' own blocks (the plain generator)."""
        from .transformer import compile_blocks, quantize_fp8

        if self.fp8:
            quantize_fp8(transformer)
        if self.compile_blocks:
            compile_blocks(transformer)
            transformer.compile_repeated_blocks()

    def corrector_pipe(self, lora: LoRAFile | None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from .pipeline import FluxReflectionCorrectorPipeline

        if self._corrector is None or (lora is not None and (self.lora is None or self.lora.path != lora.path)):
            base = self.pipe
            if lora is not None:
                load_lora(base.transformer, lora)  # replaces an earlier LoRA's layers
                self.lora = lora
            parts = dict(base.components)
            parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
            self._corrector = FluxReflectionCorrectorPipeline(**parts)
            self._corrector.set_progress_bar_config(disable=True)
        return self._corrector

    def kontext_pipe(self):
        if self._kontext is None:
            if self.kontext_folder is None:
                raise ValueError("the kontext corrector needs --kontext-path (a FLUX.1 Kontext folder)")
            shared = {}
            if self._pipe is not None:
                p = self._pipe
                shared = dict(text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2, tokenizer=p.tokenizer,
                              tokenizer_2=p.tokenizer_2, vae=p.vae)
            self._kontext = load_pipeline(self.kontext_folder, self.device, self.dtype, **shared)
        return self._kontext


class _Noise:
    """`noise_like` and `latents=` for a pipeline's transformer/VAE and the settings' image size."""

    s: SamplingSettings

    def _noise_shape(self, pipe) -> tuple[int, int, int]:
        mult = pipe.vae_scale_factor * 2
        return (pipe.transformer.config.in_channels // 4, 2 * (self.s.height // mult), 2 * (self.s.width // mult))

    def _noise(self, pipe, seed: int) -> np.ndarray:
        import torch

        g = torch.Generator("cpu").manual_seed(int(seed) % (2**63))
        return torch.randn(self._noise_shape(pipe), generator=g, dtype=torch.float32).numpy()

    def _latents(self, pipe, noises: list[np.ndarray]):
        import torch

        shape = self._noise_shape(pipe)
        for n in noises:
            if tuple(n.shape) != shape:
                raise ValueError(f"noise of shape {tuple(n.shape)} does not fit {self.s.height}x{self.s.width} "
                                 f"images; expected {shape}")
        x = torch.from_numpy(np.stack(noises).astype(np.float32))  # (B, C, h, w)
        packed = pipe._pack_latents(x, x.shape[0], shape[0], shape[1], shape[2])  # (B, h/2*w/2, C*4)
        return packed.to(device=pipe._execution_device, dtype=pipe.transformer.dtype)


class FluxGenerator(_Noise, Generator):
    """Text to image with FLUX.1-dev or FLUX.1-schnell (diffusers' FluxPipeline, unmodified)."""

    def __init__(self, models: FluxModels, settings: SamplingSettings):
        self.models = models
        self.s = settings

    def noise_like(self, seed: int) -> np.ndarray:
        return self._noise(self.models.pipe, seed)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        pipe, s = self.models.pipe, self.s
        out: list[GenerationResult] = []
        for chunk in _chunks(list(requests), s.batch_size):
            noises = [r.noise if r.noise is not None else self._noise(pipe, r.seed) for r in chunk]
            kwargs = dict(prompt=[r.prompt for r in chunk], height=s.height, width=s.width,
                          num_inference_steps=s.steps, guidance_scale=s.guidance,
                          latents=self._latents(pipe, noises), max_sequence_length=s.max_sequence_length,
                          output_type="np")
            cache = _step_cache(s, len(chunk))
            if cache is None:
                images = pipe(**kwargs).images
            else:
                # With a step cache the corrector's pipeline runs the plain model (no condition image: exactly
                # FluxPipeline's computation, tests/test_flux_pipeline.py), through corrector_forward.
                images = self.models.corrector_pipe(None)(image=None, step_cache=cache, **kwargs).images
            # Guidance-distilled FLUX: one transformer pass per step and image (no CFG batch doubling).
            out += [GenerationResult(image=im, nfe=s.steps - c, noise=n, cached=c)
                    for im, n, c in zip(_to_uint8(images), noises, _cached(cache, len(chunk)))]
        return out


class ReflectionCorrector(_Noise, Corrector):
    """The reflection-tuned FLUX corrector (OminiControl layout + condition-branch LoRA).

    `clip_text`: what CLIP's pooled embedding sees. "prompt" (default): the refined prompt alone, as in
    the corrector's training (CLIP got the prompt, T5 "prompt [Reflexion] reflection"); "full": the
    whole text, as the original inference script passed it to both encoders.
    """

    def __init__(self, models: FluxModels, settings: SamplingSettings, lora: LoRAFile | None,
                 condition_size: int = 512, clip_text: str = "prompt", strength: float = 1.0,
                 cond_attention: str = "full"):
        from .transformer import COND_ATTENTION

        if clip_text not in CLIP_TEXTS:
            raise ValueError(f"clip_text {clip_text!r}; accepted: {', '.join(CLIP_TEXTS)}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if cond_attention not in COND_ATTENTION:
            raise ValueError(f"cond_attention {cond_attention!r}; accepted: {', '.join(COND_ATTENTION)}")
        self.models = models
        self.s = settings
        self.lora = lora
        self.condition_size = condition_size
        self.clip_text = clip_text
        self.strength = strength  # < 1: start from the previous image partly noised (fewer steps)
        self.cond_attention = cond_attention  # causal_kv: a corrector trained so; condition K/V cached

    @property
    def pipe(self):
        return self.models.corrector_pipe(self.lora)

    def noise_like(self, seed: int) -> np.ndarray:
        return self._noise(self.pipe, seed)

    def correct(self, requests: Sequence[CorrectionRequest]) -> list[GenerationResult]:
        pipe, s = self.pipe, self.s
        out: list[GenerationResult] = []
        for chunk in _chunks(list(requests), s.batch_size):
            texts = [corrector_text(r.prompt, r.reflection) for r in chunk]
            clip = [r.prompt for r in chunk] if self.clip_text == "prompt" else texts
            noises = [self._noise(pipe, r.seed) for r in chunk]
            cache = _step_cache(s, len(chunk))
            images = pipe(image=[r.image for r in chunk], prompt=clip, prompt_2=texts, height=s.height,
                          width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance,
                          latents=self._latents(pipe, noises), condition_size=self.condition_size,
                          max_sequence_length=s.max_sequence_length, output_type="np", strength=self.strength,
                          cond_attention=self.cond_attention, step_cache=cache).images
            nfe = pipe._num_timesteps  # fewer than s.steps when strength < 1
            out += [GenerationResult(image=im, nfe=nfe - c, noise=n, cached=c)
                    for im, n, c in zip(_to_uint8(images), noises, _cached(cache, len(chunk)))]
        return out


class KontextCorrector(_Noise, Corrector):
    """FLUX.1 Kontext as a training-free corrector: the reflection is the edit instruction."""

    def __init__(self, models: FluxModels, settings: SamplingSettings, include_prompt: bool = False):
        self.models = models
        self.s = settings
        self.include_prompt = include_prompt

    def noise_like(self, seed: int) -> np.ndarray:
        return self._noise(self.models.kontext_pipe(), seed)

    def correct(self, requests: Sequence[CorrectionRequest]) -> list[GenerationResult]:
        import torch

        from .pipeline import to_pil

        pipe, s = self.models.kontext_pipe(), self.s
        out: list[GenerationResult] = []
        for chunk in _chunks(list(requests), s.batch_size):
            # The previous image at the output size, as a [0, 1] tensor batch: Kontext's own resizing
            # to its preferred ~1 MP sizes is switched off so the output keeps the run's size.
            pix = np.stack([np.asarray(to_pil(r.image).resize((s.width, s.height))) for r in chunk])
            image = torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
            noises = [self._noise(pipe, r.seed) for r in chunk]
            images = pipe(image=image, prompt=[kontext_instruction(r.prompt, r.reflection, self.include_prompt)
                                               for r in chunk],
                          height=s.height, width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance,
                          latents=self._latents(pipe, noises), max_sequence_length=s.max_sequence_length,
                          max_area=s.height * s.width, _auto_resize=False, output_type="np").images
            out += [GenerationResult(image=im, nfe=s.steps, noise=n) for im, n in zip(_to_uint8(images), noises)]
        return out
