"""FLUX pipelines with random weights, built from configs: tiny ones for tests and CPU smoke runs,
full-size ones (FLUX.1-dev's shapes) for GPU timing. No hub access: the tokenizers are built here
from a small character vocabulary, which is all random weights need.

    pipe = random_flux_pipeline("tiny")                 # seconds on a CPU
    pipe = random_flux_pipeline("dev", device="cuda")   # 12B transformer + T5-XXL encoder, bf16
    save_random_flux("DIR", "tiny")                     # a diffusers folder --flux-path accepts
"""

from __future__ import annotations

import string
from pathlib import Path

# Shapes of the released models (their config.json files); "tiny" follows diffusers' own fast tests.
TRANSFORMER_CONFIGS = {
    "tiny": dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8)),
    "dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
}
VAE_CONFIGS = {
    "tiny": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                 latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                 shift_factor=0.0609, scaling_factor=1.5035),
    "dev": dict(sample_size=1024, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}
CLIP_CONFIGS = {
    "tiny": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
    "dev": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                projection_dim=768),
}
T5_CONFIGS = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    "dev": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu"),
}
SIZES = tuple(TRANSFORMER_CONFIGS)
_CHARS = list(string.ascii_lowercase + string.digits + ".,:;-!?'\"[]()/")


def tiny_tokenizers(clip_max_length: int = 77):
    """A character-level CLIP BPE tokenizer (no merges) and a T5 unigram tokenizer."""
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=clip_max_length)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -3.5) for c in _CHARS]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0)
    return clip, t5


def random_flux_pipeline(size: str = "tiny", device: str = "cpu", dtype=None, seed: int = 0, kontext: bool = False):
    """A FluxPipeline (or FluxKontextPipeline) with random weights of the given size."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if size not in SIZES:
        raise ValueError(f"size {size!r}; accepted: {', '.join(SIZES)}")
    dtype = dtype or torch.float32
    clip_tok, t5_tok = tiny_tokenizers()
    # Built directly on the device in the target dtype: a full-size fp32 copy would not fit beside
    # the bf16 one on an 80 GB GPU.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIGS[size])
            torch.manual_seed(seed + 1)
            clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                vocab_size=49408 if size != "tiny" else len(clip_tok),
                                                max_position_embeddings=77, **CLIP_CONFIGS[size]))
            torch.manual_seed(seed + 2)
            t5 = T5EncoderModel(T5Config(vocab_size=32128 if size != "tiny" else len(t5_tok), pad_token_id=0,
                                         eos_token_id=1, decoder_start_token_id=0, **T5_CONFIGS[size]))
            torch.manual_seed(seed + 3)
            vae = AutoencoderKL(**VAE_CONFIGS[size])
    finally:
        torch.set_default_dtype(previous)
    for module in (transformer, clip, t5, vae):  # inference mode, as from_pretrained leaves them (T5 has dropout)
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
               tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_flux(path: str | Path, size: str = "tiny", seed: int = 0, kontext: bool = False) -> Path:
    """Write a random FLUX (or Kontext) pipeline as a diffusers folder."""
    pipe = random_flux_pipeline(size, seed=seed, kontext=kontext)
    pipe.save_pretrained(str(path))
    return Path(path)
