"""The corrector's transformer pass: FLUX with OminiControl condition tokens (REFERENCE.md section 3).

A function over diffusers' unmodified `FluxTransformer2DModel` (no subclass, no patched methods), so
the same weights serve the plain FLUX generator. Three token streams go through every block:

    text       -> the context weights (add_q_proj, ff_context, ...), modulated by temb
    image      -> the image weights, modulated by temb (timestep t, guidance g)
    condition  -> the image weights + the condition-branch LoRA, modulated by temb_0
                  (timestep 0, guidance 1: the condition image is clean)

and meet in one joint attention over [text; image; condition] with no mask. Condition outputs are
dropped after the last block. The condition's position ids are the image grid's shifted left by its
own width (`condition_ids`), so the condition sits immediately left of the target.

With no condition tokens this computes exactly what `FluxTransformer2DModel.forward` computes (the
ops below follow diffusers' blocks in order; `tests/test_flux_corrector.py` checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .lora import lin


def condition_ids(rows: int, cols: int, shift_cols: int | None = None, device=None, dtype=None) -> torch.Tensor:
    """Position ids [0, row, col] of a rows x cols condition grid, columns shifted by -cols by default.

    OminiControl's `position_delta = [0, -condition_size // 16]`: for FLUX's 8x VAE and 2x2 packing
    that is minus the grid's width in tokens (-32 at 512 px).
    """
    shift = -cols if shift_cols is None else shift_cols
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :] + shift
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)  # (rows*cols, 3)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, S, H, Dh)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    q = apply_rotary_emb(q, rope, sequence_dim=1)
    k = apply_rotary_emb(k, rope, sequence_dim=1)
    # The processor's backend, so `transformer.set_attention_backend(...)` applies here too.
    backend = getattr(attn.processor, "_attention_backend", None)
    out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=backend)
    return out.flatten(2, 3).to(q.dtype)  # (B, S, H*Dh)


def _ada_zero(norm, x: torch.Tensor, emb: torch.Tensor, lora: bool, chunks: int):
    """diffusers' AdaLayerNormZero(Single).forward, with the modulation linear's LoRA on request."""
    e = lin(norm.linear, norm.silu(emb), lora).chunk(chunks, dim=1)
    return (norm.norm(x) * (1 + e[1][:, None]) + e[0][:, None],) + e[2:]


def _ff(ff, x: torch.Tensor, lora: bool) -> torch.Tensor:
    """diffusers' FeedForward (GELU-tanh projection, dropout, linear) with every linear's LoRA on request."""
    act = ff.net[0]
    h = F.gelu(lin(act.proj, x, lora), approximate=act.approximate)
    for m in ff.net[1:]:
        h = lin(m, h, lora)
    return h


def _qkv(attn, x: torch.Tensor, lora: bool):
    q = attn.norm_q(_heads(lin(attn.to_q, x, lora), attn.head_dim))
    k = attn.norm_k(_heads(lin(attn.to_k, x, lora), attn.head_dim))
    v = _heads(lin(attn.to_v, x, lora), attn.head_dim)
    return q, k, v


def double_block(block, txt, img, cond, temb, temb_c, rope):
    """FluxTransformerBlock over three streams; `cond` may be None."""
    attn = block.attn
    n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb)
    n_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=temb)

    q_t = attn.norm_added_q(_heads(attn.add_q_proj(n_txt), attn.head_dim))
    k_t = attn.norm_added_k(_heads(attn.add_k_proj(n_txt), attn.head_dim))
    v_t = _heads(attn.add_v_proj(n_txt), attn.head_dim)
    q_i, k_i, v_i = _qkv(attn, n_img, lora=False)
    qs, ks, vs = [q_t, q_i], [k_t, k_i], [v_t, v_i]
    if cond is not None:
        n_cnd, k_gate_msa, k_shift_mlp, k_scale_mlp, k_gate_mlp = _ada_zero(block.norm1, cond, temb_c, True, 6)
        q_c, k_c, v_c = _qkv(attn, n_cnd, lora=True)
        qs, ks, vs = qs + [q_c], ks + [k_c], vs + [v_c]
    out = _attention(attn, torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1), rope)  # [text; image; cond]
    sizes = [txt.shape[1], img.shape[1]] + ([cond.shape[1]] if cond is not None else [])
    o = out.split_with_sizes(sizes, dim=1)

    o_img = attn.to_out[1](attn.to_out[0](o[1].contiguous()))
    img = img + gate_msa.unsqueeze(1) * o_img
    n2 = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    img = img + gate_mlp.unsqueeze(1) * block.ff(n2)

    o_txt = attn.to_add_out(o[0].contiguous())
    txt = txt + c_gate_msa.unsqueeze(1) * o_txt
    n2 = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    txt = txt + c_gate_mlp.unsqueeze(1) * block.ff_context(n2)
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)

    if cond is not None:
        o_cnd = attn.to_out[1](lin(attn.to_out[0], o[2].contiguous(), True))
        cond = cond + k_gate_msa.unsqueeze(1) * o_cnd
        n2 = block.norm2(cond) * (1 + k_scale_mlp[:, None]) + k_shift_mlp[:, None]
        cond = cond + k_gate_mlp.unsqueeze(1) * _ff(block.ff, n2, True)
    return txt, img, cond


def single_block(block, txt, img, cond, temb, temb_c, rope):
    """FluxSingleTransformerBlock over [text; image] plus the condition stream; `cond` may be None."""
    attn = block.attn
    n_txt = txt.shape[1]
    h = torch.cat([txt, img], dim=1)  # diffusers runs text and image as one stream here
    n_h, gate = block.norm(h, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(n_h))
    q, k, v = _qkv(attn, n_h, lora=False)
    if cond is not None:
        n_c, gate_c = _ada_zero(block.norm, cond, temb_c, True, 3)
        mlp_c = block.act_mlp(lin(block.proj_mlp, n_c, True))
        q_c, k_c, v_c = _qkv(attn, n_c, lora=True)
        q, k, v = torch.cat([q, q_c], 1), torch.cat([k, k_c], 1), torch.cat([v, v_c], 1)
    out = _attention(attn, q, k, v, rope)
    o_h = out[:, : h.shape[1]]
    h = h + gate.unsqueeze(1) * block.proj_out(torch.cat([o_h, mlp], dim=2))
    if h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    if cond is not None:
        o_c = out[:, h.shape[1]:]
        cond = cond + gate_c.unsqueeze(1) * lin(block.proj_out, torch.cat([o_c, mlp_c], dim=2), True)
    return h[:, :n_txt], h[:, n_txt:], cond


def corrector_forward(
    transformer,
    hidden_states: torch.Tensor,  # (B, N_img, C*4) packed noisy latents
    encoder_hidden_states: torch.Tensor,  # (B, N_txt, joint_attention_dim) T5 states
    pooled_projections: torch.Tensor,  # (B, pooled_projection_dim) CLIP pooled
    timestep: torch.Tensor,  # (B,) in [0, 1] (diffusers' pipelines pass t / 1000)
    img_ids: torch.Tensor,  # (N_img, 3)
    txt_ids: torch.Tensor,  # (N_txt, 3)
    guidance: torch.Tensor | None = None,  # (B,) guidance-distilled models (FLUX.1-dev) only
    condition: torch.Tensor | None = None,  # (B, N_cond, C*4) packed clean latents of the condition image
    cond_ids: torch.Tensor | None = None,  # (N_cond, 3)
    condition_timestep: float = 0.0,
) -> torch.Tensor:
    """The velocity for the image tokens, (B, N_img, C*4)."""
    tf = transformer
    if getattr(tf.transformer_blocks[0].attn, "fused_projections", False):
        raise ValueError("transformer: fused QKV projections are not supported by the corrector; unfuse them first")
    use_cond = condition is not None and condition.shape[1] > 0
    if use_cond and (cond_ids is None or cond_ids.shape[0] != condition.shape[1]):
        raise ValueError(f"cond_ids must give one position per condition token ({condition.shape[1]})")

    img = tf.x_embedder(hidden_states)
    t = timestep.to(img.dtype) * 1000
    g = guidance.to(img.dtype) * 1000 if guidance is not None else None
    temb = tf.time_text_embed(t, pooled_projections) if g is None else tf.time_text_embed(t, g, pooled_projections)
    txt = tf.context_embedder(encoder_hidden_states)
    ids = [txt_ids, img_ids]
    cond, temb_c = None, None
    if use_cond:
        cond = lin(tf.x_embedder, condition.to(img.dtype), True)
        t_c = torch.full_like(t, condition_timestep * 1000)
        # OminiControl modulates the clean condition with timestep c_t (0) and guidance 1.
        temb_c = (tf.time_text_embed(t_c, pooled_projections) if g is None
                  else tf.time_text_embed(t_c, torch.ones_like(g) * 1000, pooled_projections))
        ids.append(cond_ids)
    rope = tf.pos_embed(torch.cat(ids, dim=0))

    ckpt = torch.is_grad_enabled() and getattr(tf, "gradient_checkpointing", False)
    for block in tf.transformer_blocks:
        args = (block, txt, img, cond, temb, temb_c, rope)
        txt, img, cond = checkpoint(double_block, *args, use_reentrant=False) if ckpt else double_block(*args)
    for block in tf.single_transformer_blocks:
        args = (block, txt, img, cond, temb, temb_c, rope)
        txt, img, cond = checkpoint(single_block, *args, use_reentrant=False) if ckpt else single_block(*args)

    img = tf.norm_out(img, temb)
    return tf.proj_out(img)
