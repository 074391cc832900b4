"""`FluxReflectionCorrectorPipeline`: FLUX.1 + the reflection-tuned LoRA edits an image.

A new task is a new pipeline class (diffusers' rule): it reuses FluxPipeline's prompt encoding,
latent packing and scheduler handling, and replaces the transformer call with
`transformer.corrector_forward`, which adds the condition image's tokens (docs/method.md, section 3).

Unlike the original `generate(...)` it takes a batch of conditions (one per prompt), and it honours
`num_inference_steps`, `guidance_scale` and the noise it is given (`latents=` or `generator=`).

Two speed levers change what is computed (docs/speed.md): `strength < 1` starts from the previous
image noised to the schedule's sigma at step (1 - strength) x steps and runs only the remaining
steps (diffusers' img2img rule); `cond_attention="causal_kv"` (a corrector trained so) computes the
condition tokens' keys/values once per image instead of at every step. A third, `step_cache`
(models/step_cache.py), skips every block but the first at the steps where an image's first-block
residual barely changed; the caller keeps the cache and reads its counts after the call.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput, calculate_shift, retrieve_timesteps
from PIL import Image

from ...models.step_cache import StepCache
from .transformer import COND_ATTENTION, condition_ids, corrector_forward, encode_condition_kv


def to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


class FluxReflectionCorrectorPipeline(FluxPipeline):
    """Edit `image` toward `prompt_2` (the T5 text: prompt + " [Reflexion]: " + reflection).

    Same components as FluxPipeline; the transformer may carry condition-branch LoRA layers
    (`lora.load_lora`). With `image=None` it is exactly FluxPipeline.
    """

    def check_corrector_inputs(self, image, prompt, prompt_2, height, width, condition_size, latents,
                               strength: float = 1.0, cond_attention: str = "full"):
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}")
        if strength < 1.0 and image is None:
            raise ValueError("`strength` < 1 starts from the previous image: pass `image`")
        if cond_attention not in COND_ATTENTION:
            raise ValueError(f"`cond_attention` {cond_attention!r}; accepted: {', '.join(COND_ATTENTION)}")
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"`height` and `width` must be multiples of {multiple}, got {height}x{width}")
        if condition_size % multiple or condition_size <= 0:
            raise ValueError(f"`condition_size` must be a positive multiple of {multiple}, got {condition_size}")
        if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"`prompt` must be a list of strings, got {type(prompt).__name__}")
        if prompt_2 is not None and len(prompt_2) != len(prompt):
            raise ValueError(f"`prompt_2` has {len(prompt_2)} texts for {len(prompt)} prompts")
        if image is not None and len(image) != len(prompt):
            raise ValueError(f"`image` has {len(image)} condition images for {len(prompt)} prompts")
        if latents is not None and latents.shape[0] != len(prompt):
            raise ValueError(f"`latents` has batch {latents.shape[0]} for {len(prompt)} prompts")

    def encode_condition(self, images, condition_size: int, device, dtype):
        """Condition images -> packed clean latents (B, N_cond, C*4) and their shifted position ids."""
        pil = [to_pil(im).resize((condition_size, condition_size), Image.BICUBIC) for im in images]
        pixels = self.image_processor.preprocess(pil, condition_size, condition_size)  # (B, 3, S, S) in [-1, 1]
        pixels = pixels.to(device=device, dtype=self.vae.dtype)
        # The mode, not a sample (the original samples): the same condition always gives the same tokens.
        lat = self.vae.encode(pixels).latent_dist.mode()
        lat = (lat - self.vae.config.shift_factor) * self.vae.config.scaling_factor  # (B, C, h, w)
        b, c, h, w = lat.shape
        tokens = self._pack_latents(lat.to(dtype), b, c, h, w)  # (B, h/2*w/2, C*4)
        ids = condition_ids(h // 2, w // 2, device=device, dtype=dtype)
        return tokens, ids

    def encode_start(self, images, height: int, width: int, device, dtype) -> torch.Tensor:
        """Previous images -> packed clean latents at the output size (B, N_img, C*4), the start of a
        partial (strength < 1) correction."""
        pil = [to_pil(im).resize((width, height), Image.BICUBIC) for im in images]
        pixels = self.image_processor.preprocess(pil, height, width).to(device=device, dtype=self.vae.dtype)
        lat = self.vae.encode(pixels).latent_dist.mode()
        lat = (lat - self.vae.config.shift_factor) * self.vae.config.scaling_factor  # (B, C, h, w)
        b, c, h, w = lat.shape
        return self._pack_latents(lat.to(dtype), b, c, h, w)  # (B, h/2*w/2, C*4)

    @torch.no_grad()
    def __call__(
        self,
        image: list | None = None,
        prompt: list[str] | None = None,
        prompt_2: list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 30,
        guidance_scale: float = 3.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        condition_size: int = 512,
        max_sequence_length: int = 512,
        output_type: str = "np",
        return_dict: bool = True,
        strength: float = 1.0,
        cond_attention: str = "full",
        cache_condition: bool = True,
        step_cache: StepCache | None = None,
    ):
        # 1. Check inputs
        self.check_corrector_inputs(image, prompt, prompt_2, height, width, condition_size, latents, strength,
                                    cond_attention)
        if step_cache is not None and (step_cache.rows != len(prompt) or step_cache.steps):
            raise ValueError(f"`step_cache` must be fresh and hold one row per prompt ({len(prompt)}), got "
                             f"{step_cache.rows} rows after {step_cache.steps} steps")
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = {}
        self._interrupt = False
        batch_size = len(prompt)
        device = self._execution_device

        # 2. Encode the texts: CLIP (pooled) gets `prompt`, T5 gets `prompt_2`
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, max_sequence_length=max_sequence_length
        )

        # 3. Encode the condition images
        cond, cond_ids, cond_kv = None, None, None
        if image is not None and len(image):
            cond, cond_ids = self.encode_condition(image, condition_size, device, prompt_embeds.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([batch_size], guidance_scale, device=device, dtype=torch.float32)
        if cond is not None and cond_attention == "causal_kv" and cache_condition:
            # Once per image: the condition stream reads only itself, so it is the same at every step.
            cond_kv = encode_condition_kv(self.transformer, cond, cond_ids, pooled_prompt_embeds, guidance)
            cond = None

        # 4. Prepare the noise
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            batch_size, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents
        )

        # 5. Timesteps: FluxPipeline's schedule (shift from the image's token count only, as the original)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        begin = 0
        if strength < 1.0:
            # 5b. Partial start: skip the first (1 - strength) of the grid; the previous image noised to
            # the first remaining sigma (x = sigma * noise + (1 - sigma) * x0) replaces the pure noise.
            begin = num_inference_steps - max(1, round(num_inference_steps * strength))
            timesteps = timesteps[begin:]
            start = self.encode_start(image, height, width, device, prompt_embeds.dtype)
            self.scheduler.set_begin_index(begin)
            latents = self.scheduler.scale_noise(start, timesteps[:1], latents)
        self._num_timesteps = len(timesteps)

        # 6. Denoise
        self.scheduler.set_begin_index(begin)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                timestep = t.expand(batch_size).to(latents.dtype)
                noise_pred = corrector_forward(
                    self.transformer, latents, prompt_embeds, pooled_prompt_embeds, timestep / 1000,
                    latent_image_ids, text_ids, guidance=guidance, condition=cond, cond_ids=cond_ids,
                    cond_attention=cond_attention, cond_kv=cond_kv, step_cache=step_cache,
                )
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress_bar.update()

        # 7. Decode
        if output_type == "latent":
            images = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if return_dict else (images,)
