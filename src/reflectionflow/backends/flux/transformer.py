"""The corrector's transformer pass: FLUX with OminiControl condition tokens (docs/method.md, section 3).

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

Speed levers (docs/speed.md):
- `cond_attention="causal_kv"`: condition tokens attend only to themselves (the world's
  `world-corrector-kv` layout, OminiControl2's). Their stream then depends on nothing but the
  condition image and the prompt's pooled vector, so `encode_condition_kv` computes their keys and
  values in every block once per image and `corrector_forward(cond_kv=...)` reuses them at every
  step. It changes the model: it needs a corrector trained that way.
- `compile_blocks(transformer)`: regional `torch.compile` of the two block functions (one graph
  per block kind, reused by all 19 + 38 blocks), about a minute of compiling instead of the
  full model's seven with max-autotune.
- `quantize_fp8(transformer)`: fp8 matmuls (models/fp8.py, Hopper or newer) on the blocks' linears.
- `corrector_forward(step_cache=StepCache(...))`: step caching (models/step_cache.py, FBCache's rule).
  The first double block runs for every image; an image whose first-block residual changed by at
  most the threshold since its last computed step skips the other 18 + 38 blocks and reuses their
  residual. The decision is per image (the rows that compute run as a smaller batch), so an image's
  steps do not depend on its batch-mates. diffusers' own FirstBlockCache hook is not used: it hooks
  the block modules' forward, which this function does not call, it decides for the whole batch,
  and its state lives on the transformer that the generator and the corrector share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...models.step_cache import StepCache
from .lora import lin

COND_ATTENTION = ("full", "causal_kv")


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


def _rope(x: torch.Tensor, rope) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rope, sequence_dim=1)


def _sdpa(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    # The processor's backend, so `transformer.set_attention_backend(...)` applies here too.
    backend = getattr(attn.processor, "_attention_backend", None)
    out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=backend)
    return out.flatten(2, 3).to(q.dtype)  # (B, S, H*Dh)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
    return _sdpa(attn, _rope(q, rope), _rope(k, rope), v)


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


def double_block(block, txt, img, cond, temb, temb_c, rope, rope_c=None, cond_kv=None):
    """FluxTransformerBlock over three streams; `cond` may be None.

    Full attention (default): one joint attention over [text; image; condition]. With `rope_c`
    (causal_kv) the condition stream attends only to itself, under its own rotary embedding `rope_c`,
    and the text and image queries read its keys/values, either computed here from `cond` or taken
    from `cond_kv` (then `cond` is None and stays None).
    """
    attn = block.attn
    n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb)
    n_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=temb)

    q_t = attn.norm_added_q(_heads(attn.add_q_proj(n_txt), attn.head_dim))
    k_t = attn.norm_added_k(_heads(attn.add_k_proj(n_txt), attn.head_dim))
    v_t = _heads(attn.add_v_proj(n_txt), attn.head_dim)
    q_i, k_i, v_i = _qkv(attn, n_img, lora=False)
    causal = rope_c is not None or cond_kv is not None
    if causal:
        if cond_kv is None and cond is not None:
            cond, cond_kv = double_block_condition(block, cond, temb_c, rope_c)
        q = _rope(torch.cat([q_t, q_i], 1), rope)
        k = _rope(torch.cat([k_t, k_i], 1), rope)
        v = torch.cat([v_t, v_i], 1)
        if cond_kv is not None:
            k, v = torch.cat([k, cond_kv[0]], 1), torch.cat([v, cond_kv[1]], 1)  # cached keys are roped
        o = _sdpa(attn, q, k, v).split_with_sizes([txt.shape[1], img.shape[1]], dim=1)
    else:
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

    if cond is not None and not causal:
        o_cnd = attn.to_out[1](lin(attn.to_out[0], o[2].contiguous(), True))
        cond = cond + k_gate_msa.unsqueeze(1) * o_cnd
        n2 = block.norm2(cond) * (1 + k_scale_mlp[:, None]) + k_shift_mlp[:, None]
        cond = cond + k_gate_mlp.unsqueeze(1) * _ff(block.ff, n2, True)
    return txt, img, cond


def double_block_condition(block, cond, temb_c, rope_c):
    """The condition stream of a double block alone (causal_kv): its next state and its (roped) keys/values."""
    attn = block.attn
    n_cnd, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero(block.norm1, cond, temb_c, True, 6)
    q, k, v = _qkv(attn, n_cnd, lora=True)
    q, k = _rope(q, rope_c), _rope(k, rope_c)
    o = _sdpa(attn, q, k, v)
    cond = cond + gate_msa.unsqueeze(1) * attn.to_out[1](lin(attn.to_out[0], o, True))
    n2 = block.norm2(cond) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    cond = cond + gate_mlp.unsqueeze(1) * _ff(block.ff, n2, True)
    return cond, (k, v)


def single_block(block, txt, img, cond, temb, temb_c, rope, rope_c=None, cond_kv=None):
    """FluxSingleTransformerBlock over [text; image] plus the condition stream; `cond` may be None.
    `rope_c` / `cond_kv`: causal_kv, as in `double_block`."""
    attn = block.attn
    n_txt = txt.shape[1]
    h = torch.cat([txt, img], dim=1)  # diffusers runs text and image as one stream here
    n_h, gate = block.norm(h, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(n_h))
    q, k, v = _qkv(attn, n_h, lora=False)
    causal = rope_c is not None or cond_kv is not None
    if causal:
        if cond_kv is None and cond is not None:
            cond, cond_kv = single_block_condition(block, cond, temb_c, rope_c)
        q, k = _rope(q, rope), _rope(k, rope)
        if cond_kv is not None:
            k, v = torch.cat([k, cond_kv[0]], 1), torch.cat([v, cond_kv[1]], 1)
        o_h = _sdpa(attn, q, k, v)
    else:
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
    if cond is not None and not causal:
        o_c = out[:, h.shape[1]:]
        cond = cond + gate_c.unsqueeze(1) * lin(block.proj_out, torch.cat([o_c, mlp_c], dim=2), True)
    return h[:, :n_txt], h[:, n_txt:], cond


def single_block_condition(block, cond, temb_c, rope_c):
    """The condition stream of a single block alone (causal_kv): its next state and its (roped) keys/values."""
    attn = block.attn
    n_c, gate_c = _ada_zero(block.norm, cond, temb_c, True, 3)
    mlp_c = block.act_mlp(lin(block.proj_mlp, n_c, True))
    q, k, v = _qkv(attn, n_c, lora=True)
    q, k = _rope(q, rope_c), _rope(k, rope_c)
    o = _sdpa(attn, q, k, v)
    cond = cond + gate_c.unsqueeze(1) * lin(block.proj_out, torch.cat([o, mlp_c], dim=2), True)
    return cond, (k, v)


@dataclass
class ConditionKV:
    """The condition tokens' keys/values in every block (causal_kv), rotary embedding applied:
    one (k, v) pair of (B, N_cond, H, Dh) per double block, then per single block."""

    double: list[tuple[torch.Tensor, torch.Tensor]]
    single: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return self.double[0][0].shape[0] if self.double else self.single[0][0].shape[0]


def _embeddings(tf, pooled, timestep, guidance, dtype):
    t = timestep.to(dtype) * 1000
    g = guidance.to(dtype) * 1000 if guidance is not None else None
    temb = tf.time_text_embed(t, pooled) if g is None else tf.time_text_embed(t, g, pooled)
    return t, g, temb


def _condition_embeddings(tf, t, g, pooled, condition_timestep: float):
    t_c = torch.full_like(t, condition_timestep * 1000)
    # OminiControl modulates the clean condition with timestep c_t (0) and guidance 1.
    return tf.time_text_embed(t_c, pooled) if g is None else tf.time_text_embed(t_c, torch.ones_like(g) * 1000, pooled)


@torch.no_grad()
def encode_condition_kv(
    transformer,
    condition: torch.Tensor,  # (B, N_cond, C*4) packed clean latents
    cond_ids: torch.Tensor,  # (N_cond, 3)
    pooled_projections: torch.Tensor,  # (B, pooled_projection_dim)
    guidance: torch.Tensor | None = None,  # (B,) only whether it is None matters (guidance 1 is used)
    condition_timestep: float = 0.0,
) -> ConditionKV:
    """Keys/values of the condition tokens in every block, once per image (causal_kv): the condition
    stream reads only itself, so nothing in it changes from one sampling step to the next."""
    tf = transformer
    if cond_ids.shape[0] != condition.shape[1]:
        raise ValueError(f"cond_ids must give one position per condition token ({condition.shape[1]})")
    cond = lin(tf.x_embedder, condition.to(tf.dtype), True)
    t = torch.zeros(condition.shape[0], device=condition.device, dtype=cond.dtype)
    g = torch.ones_like(t) if guidance is not None else None
    temb_c = _condition_embeddings(tf, t, g, pooled_projections, condition_timestep)
    rope_c = tf.pos_embed(cond_ids)
    double, single = [], []
    for block in tf.transformer_blocks:
        cond, kv = double_block_condition(block, cond, temb_c, rope_c)
        double.append(kv)
    for block in tf.single_transformer_blocks:
        cond, kv = single_block_condition(block, cond, temb_c, rope_c)
        single.append(kv)
    return ConditionKV(double=double, single=single)


_EAGER_BLOCKS = {"double": double_block, "single": single_block}
_COMPILED_ATTR = "_reflectionflow_compiled_blocks"


def compile_blocks(transformer, mode: str | None = None) -> None:
    """Regional compilation: `torch.compile` of the double- and single-block functions that
    `corrector_forward` runs. Blocks of one kind share their graph (the block's parameters are
    graph inputs), so compiling costs two graphs per input shape rather than the whole model.
    Recorded on the transformer; `corrector_forward` uses the compiled functions from then on."""
    import torch._dynamo

    # 57 blocks per forward, a few token layouts (plain, condition, cached condition) and batch sizes.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fns = {k: torch.compile(f, mode=mode, dynamic=False) for k, f in _EAGER_BLOCKS.items()}
    object.__setattr__(transformer, _COMPILED_ATTR, fns)


def fp8_available(device=None) -> str | None:
    """None when fp8 matmuls can run here (a CUDA GPU of compute capability 8.9+), else why not."""
    from ...models.fp8 import fp8_unavailable

    if device is None or torch.device(device).type == "cpu":
        device = "cuda" if torch.cuda.is_available() else None
    return fp8_unavailable(device) if device is not None else "fp8 matmuls need a CUDA GPU"


def quantize_fp8(transformer) -> int:
    """fp8 (e4m3) weights with row scales and per-row dynamically quantised activations for the
    linears of every block (models/fp8.py; the LoRA adapters stay bf16). Returns how many layers
    changed. Raises RuntimeError with the reason when fp8 is not available here."""
    from ...models.fp8 import quantize_linears

    why = fp8_available(transformer.device)
    if why is not None:
        raise RuntimeError(f"fp8: {why}")
    names = quantize_linears(transformer,
                             lambda n, m: n.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    return len(names)


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
    cond_attention: str = "full",
    cond_kv: ConditionKV | None = None,  # causal_kv: from encode_condition_kv, instead of `condition`
    step_cache: StepCache | None = None,  # this sampling run's first-block cache (one row per image)
) -> torch.Tensor:
    """The velocity for the image tokens, (B, N_img, C*4)."""
    tf = transformer
    if getattr(tf.transformer_blocks[0].attn, "fused_projections", False):
        raise ValueError("transformer: fused QKV projections are not supported by the corrector; unfuse them first")
    if cond_attention not in COND_ATTENTION:
        raise ValueError(f"cond_attention {cond_attention!r}; accepted: {', '.join(COND_ATTENTION)}")
    if cond_kv is not None and (cond_attention != "causal_kv" or condition is not None):
        raise ValueError("cond_kv is for cond_attention='causal_kv' and replaces `condition`: pass one of them")
    if cond_kv is not None and len(cond_kv) != hidden_states.shape[0]:
        raise ValueError(f"cond_kv holds {len(cond_kv)} images for a batch of {hidden_states.shape[0]}")
    use_cond = condition is not None and condition.shape[1] > 0
    if use_cond and (cond_ids is None or cond_ids.shape[0] != condition.shape[1]):
        raise ValueError(f"cond_ids must give one position per condition token ({condition.shape[1]})")
    causal = cond_attention == "causal_kv" and (use_cond or cond_kv is not None)

    img = tf.x_embedder(hidden_states)
    t, g, temb = _embeddings(tf, pooled_projections, timestep, guidance, img.dtype)
    txt = tf.context_embedder(encoder_hidden_states)
    ids = [txt_ids, img_ids]
    cond, temb_c, rope_c = None, None, None
    if use_cond:
        cond = lin(tf.x_embedder, condition.to(img.dtype), True)
        temb_c = _condition_embeddings(tf, t, g, pooled_projections, condition_timestep)
        if causal:
            rope_c = tf.pos_embed(cond_ids)
        else:
            ids.append(cond_ids)
    rope = tf.pos_embed(torch.cat(ids, dim=0))

    fns = getattr(tf, _COMPILED_ATTR, _EAGER_BLOCKS)
    ckpt = torch.is_grad_enabled() and getattr(tf, "gradient_checkpointing", False)
    layers = [(fns["double"], b, cond_kv.double[i] if cond_kv else None) for i, b in enumerate(tf.transformer_blocks)]
    layers += [(fns["single"], b, cond_kv.single[i] if cond_kv else None)
               for i, b in enumerate(tf.single_transformer_blocks)]
    streams = _Streams(txt, img, cond, temb, temb_c, rope, rope_c, causal, ckpt)
    if step_cache is None:
        img = streams.run(layers).img
    else:
        img = _cached_blocks(streams, layers, step_cache)

    img = tf.norm_out(img, temb)
    return tf.proj_out(img)


@dataclass
class _Streams:
    """The token streams between blocks, with what every block reads beside them."""

    txt: torch.Tensor
    img: torch.Tensor
    cond: torch.Tensor | None
    temb: torch.Tensor
    temb_c: torch.Tensor | None
    rope: tuple
    rope_c: tuple | None
    causal: bool
    ckpt: bool

    def run(self, layers) -> _Streams:
        txt, img, cond = self.txt, self.img, self.cond
        for fn, block, kv in layers:
            args = (block, txt, img, cond, self.temb, self.temb_c, self.rope)
            if self.causal:
                args += (self.rope_c, kv)
            txt, img, cond = checkpoint(fn, *args, use_reentrant=False) if self.ckpt else fn(*args)
        return replace(self, txt=txt, img=img, cond=cond)

    def rows(self, index: torch.Tensor) -> _Streams:
        def pick(x):
            return None if x is None else x[index]

        return replace(self, txt=self.txt[index], img=self.img[index], cond=pick(self.cond), temb=self.temb[index],
                       temb_c=pick(self.temb_c))


def _cached_blocks(streams: _Streams, layers, cache: StepCache) -> torch.Tensor:
    """The image stream after the last block, with the remaining blocks skipped for the images the
    step cache serves (models/step_cache.py)."""
    first = streams.run(layers[:1])
    residual = first.img - streams.img  # the first block's image residual
    run = cache.compute(residual)
    rows, skip = run.nonzero().squeeze(1), (~run).nonzero().squeeze(1)
    if rows.numel() == run.numel():  # every image computes: the plain forward, no gather
        last = first.run(layers[1:]).img
        cache.store(rows, residual, last - first.img)
        return last
    last = first.img.clone()
    if rows.numel():
        sub = [(fn, block, None if kv is None else (kv[0][rows], kv[1][rows])) for fn, block, kv in layers[1:]]
        out = first.rows(rows).run(sub).img
        cache.store(rows, residual[rows], out - first.img[rows])
        last[rows] = out
    last[skip] = first.img[skip] + cache.served(skip).to(last.dtype)
    return last
