"""A FLUX-style MMDiT for the Shapes world: the pure function v(x, t, text, cond).

Layout (FLUX.1): text features from a small text encoder and image patches go through
double-stream blocks (separate text and image weights, one joint attention), then single-stream
blocks (one set of weights over the joined sequence). Every block is modulated (AdaLN) by
`vec = time_embed(t) + text_embed(pooled text)`. Rotary position ids are 2-D (row, col) over
the patch grid; text tokens all sit at position 0, as in FLUX.

Pixels, not latents. A 64x64 RGB image is cut into 4x4 patches: a 16x16 grid of 256 tokens of
48 values. Objects are 12-18 px (3-5 patches a side), so a patch holds at most a few edges and
the linear patch embedder loses nothing; 2x2 patches would give 1024 tokens (16x the attention
cost and 4x the MLP cost) and 8x8 patches would put whole object outlines into one token. A VAE
would add a second trained model and its reconstruction error to a 20 MB budget to save
attention over only 256 tokens, so there is none.

Condition tokens (the corrector; OminiControl's layout, docs/method.md, section 3): the previous
image goes through the same patch embedder, sits beside the target grid (columns shifted by
-W), is modulated with the timestep-0 embedding, passes through the image-stream weights of
every block and joins the joint attention [text; image; condition]; its outputs are dropped.
`cond_attention="causal_kv"` lets condition tokens attend only to themselves. FLUX's text stream
is not step-invariant (text tokens attend to the noisy image and are modulated by t), so a
condition token that read the text would change at every step; reading only itself, its keys
and values depend on nothing but the condition image and the prompt's pooled vector, and
`encode_condition` computes them once per image for every sampling step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world.commands import VOCABULARY
from .batching import per_sample
from .text import TextEncoder, TextFeatures, Tokenizer

COND_ATTENTION = ("full", "causal_kv")


@dataclass
class MMDiTConfig:
    image_size: int = 64
    patch_size: int = 4
    channels: int = 3
    width: int = 256
    heads: int = 4
    double_blocks: int = 2
    single_blocks: int = 4
    mlp_ratio: float = 4.0
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 2
    max_text_len: int = 80  # words; the generator v1 (weights/world-generator-v1) reads 32
    vocab: tuple[str, ...] = field(default_factory=lambda: tuple(VOCABULARY))
    cond_attention: str = "full"
    rope_theta: float = 10_000.0

    def __post_init__(self):
        self.vocab = tuple(self.vocab)  # JSON gives a list back

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self) -> MMDiTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads or self.head_dim % 4:
            raise ValueError(
                f"width {self.width} / heads {self.heads} must give a head size divisible by 4 "
                "(2-D rotary embedding: two axes of rotated pairs)"
            )
        if self.cond_attention not in COND_ATTENTION:
            raise ValueError(f"cond_attention {self.cond_attention!r}; accepted: {', '.join(COND_ATTENTION)}")
        if self.double_blocks + self.single_blocks < 1:
            raise ValueError("the model needs at least one block")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMDiT config keys {unknown}; accepted: {sorted(known)}")
        return cls(**d).validate()


# Model sizes (DiT style): the CLI offers the keys. tiny 75K parameters (tests); compact 5.01M, 10 MB in
# fp16; small 9.51M, 19.0 MB in fp16 (the generators v1 and v2.1); base 41.5M, 83 MB.
SIZES = {
    "tiny": lambda **kw: MMDiTConfig(**{"width": 32, "heads": 2, "double_blocks": 1, "single_blocks": 1,
                                        "text_width": 16, "text_layers": 1, "text_heads": 1, "max_text_len": 24, **kw}),
    "compact": lambda **kw: MMDiTConfig(width=192, heads=3, double_blocks=2, single_blocks=3, **kw),
    "small": lambda **kw: MMDiTConfig(width=256, heads=4, double_blocks=2, single_blocks=4, **kw),
    "base": lambda **kw: MMDiTConfig(width=384, heads=6, double_blocks=4, single_blocks=8, text_width=256,
                                     text_heads=4, **kw),
}


# ----------------------------------------------------------------------------------------------
# Stateless pieces


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, h*w, p*p*C)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    B = tokens.shape[0]
    x = tokens.reshape(B, grid, grid, p, p, channels)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * p, grid * p)  # (B, C, H, W)


def image_position_ids(grid: int) -> torch.Tensor:
    """(grid*grid, 2) (row, col) ids in raster order, as FLUX's latent image ids."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def condition_position_ids(grid: int) -> torch.Tensor:
    """The target grid's ids shifted left by the grid width: the condition sits beside the target."""
    ids = image_position_ids(grid)
    ids[:, 1] -= grid
    return ids


def rope_angles(ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(N, 2) integer ids -> (N, head_dim/2) rotation angles; the first half of the pairs turn with
    the row, the second half with the column (FLUX's EmbedND with two axes)."""
    axis = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis, 2, dtype=torch.float64) / axis)  # (axis/2,)
    angles = torch.cat([ids[:, :1].double() * freqs, ids[:, 1:2].double() * freqs], dim=-1)
    return angles.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, H, N, Dh) by per-token angles; cos, sin are (N, Dh/2)."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (B, H, N, Dh/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, N, Dh/2, 2)
    return out.flatten(-2).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of 1000*t (t in [0, 1]; DiT/FLUX scale their timesteps to [0, 1000])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, Dh) x (B, H, Nk, Dh) -> (B, Nq, H*Dh); no mask, so SDPA can use flash kernels."""
    if q.is_cuda and q.shape[2] != k.shape[2]:
        # Only causal_kv has more keys than queries (the condition's cached K/V). There PyTorch
        # 2.11's cuDNN SDPA fails on an H100 ("mha_graph.execute ... is_good()", then an illegal
        # memory access) on this model's strided q/k/v, while plain attention math runs
        # (docs/RESULTS.md, "World corrector"). The math is exactly SDPA's.
        w = torch.softmax((q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5, dim=-1)  # (B, H, Nq, Nk)
        a = w.to(v.dtype) @ v
    else:
        a = F.scaled_dot_product_attention(q, k, v)
    return a.transpose(1, 2).flatten(2)


# ----------------------------------------------------------------------------------------------
# Modules


class BranchLinear(nn.Linear):
    """nn.Linear called with the token branch. The base model ignores it; a condition-branch LoRA
    (models/lora.py) adds its update only where `cond=True`, as OminiControl does."""

    def forward(self, x: torch.Tensor, cond: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKNorm(nn.Module):
    """RMSNorm of queries and keys per head (FLUX); keeps attention logits bounded at high lr."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q = nn.RMSNorm(head_dim, eps=1e-6)
        self.k = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, q, k):
        return self.q(q), self.k(k)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, width), nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class DoubleBlock(nn.Module):
    """Separate text and image weights, one joint attention. Condition tokens use the image weights."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        hidden = int(width * mlp_ratio)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", BranchLinear(width, 6 * width))
            setattr(self, f"{s}_norm1", nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_qkv", BranchLinear(width, 3 * width))
            setattr(self, f"{s}_qk_norm", QKNorm(width // heads))
            setattr(self, f"{s}_proj", BranchLinear(width, width))
            setattr(self, f"{s}_norm2", nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_fc1", BranchLinear(width, hidden))
            setattr(self, f"{s}_fc2", BranchLinear(hidden, width))

    def _part(self, s: str, name: str):
        return getattr(self, f"{s}_{name}")

    def _qkv(self, s: str, x, mod, cond=False):
        B, N, D = x.shape
        shift, scale = mod[0], mod[1]
        h = modulate(self._part(s, "norm1")(x), shift, scale)
        q, k, v = self._part(s, "qkv")(h, cond=cond).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self._part(s, "qk_norm")(q, k)
        return q, k, v  # each (B, H, N, Dh)

    def _post(self, s: str, x, a, mod, cond=False):
        gate1, shift2, scale2, gate2 = mod[2], mod[3], mod[4], mod[5]
        x = x + gate1[:, None] * self._part(s, "proj")(a, cond=cond)
        h = modulate(self._part(s, "norm2")(x), shift2, scale2)
        h = self._part(s, "fc2")(F.gelu(self._part(s, "fc1")(h, cond=cond), approximate="tanh"), cond=cond)
        return x + gate2[:, None] * h

    def cond_only(self, c, vec_c, rope_c):
        """The condition stream alone (causal_kv): returns its next state and its keys/values."""
        mc = self.img_mod(F.silu(vec_c), cond=True).chunk(6, dim=-1)
        qc, kc, vc = self._qkv("img", c, mc, cond=True)
        qc, kc = apply_rope(qc, *rope_c), apply_rope(kc, *rope_c)
        return self._post("img", c, attention(qc, kc, vc), mc, cond=True), (kc, vc)

    def forward(self, img, txt, vec, rope, cond=None, vec_c=None, rope_c=None, cond_kv=None, causal=False):
        L = txt.shape[1]
        mi = self.img_mod(F.silu(vec)).chunk(6, dim=-1)
        mt = self.txt_mod(F.silu(vec)).chunk(6, dim=-1)
        qi, ki, vi = self._qkv("img", img, mi)
        qt, kt, vt = self._qkv("txt", txt, mt)
        q, k, v = torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)  # (B, H, L+N, Dh)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a_cond = None
        if cond is not None and not causal:
            mc = self.img_mod(F.silu(vec_c), cond=True).chunk(6, dim=-1)
            qc, kc, vc = self._qkv("img", cond, mc, cond=True)
            qc, kc = apply_rope(qc, *rope_c), apply_rope(kc, *rope_c)
            a = attention(torch.cat([q, qc], 2), torch.cat([k, kc], 2), torch.cat([v, vc], 2))
            a, a_cond = a[:, : q.shape[2]], a[:, q.shape[2] :]
            cond = self._post("img", cond, a_cond, mc, cond=True)
        else:
            if cond is not None:  # causal_kv without a cache: the condition stream on its own
                cond, cond_kv = self.cond_only(cond, vec_c, rope_c)
            if cond_kv is not None:
                k, v = torch.cat([k, cond_kv[0]], 2), torch.cat([v, cond_kv[1]], 2)  # (B, H, L+N+M, Dh)
            a = attention(q, k, v)
        txt = self._post("txt", txt, a[:, :L], mt)
        img = self._post("img", img, a[:, L:], mi)
        return img, txt, cond


class SingleBlock(nn.Module):
    """One set of weights over the joined sequence; attention and MLP in parallel (FLUX)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.hidden = int(width * mlp_ratio)
        self.mod = BranchLinear(width, 3 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.lin1 = BranchLinear(width, 3 * width + self.hidden)
        self.qk_norm = QKNorm(width // heads)
        self.lin2 = BranchLinear(width + self.hidden, width)

    def _qkv(self, x, mod, cond=False):
        B, N, D = x.shape
        h = modulate(self.norm(x), mod[0], mod[1])
        qkv, mlp = self.lin1(h, cond=cond).split([3 * D, self.hidden], dim=-1)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
        q, k = self.qk_norm(q, k)
        return q, k, v, mlp

    def _post(self, x, a, mlp, mod, cond=False):
        return x + mod[2][:, None] * self.lin2(torch.cat([a, F.gelu(mlp, approximate="tanh")], -1), cond=cond)

    def cond_only(self, c, vec_c, rope_c):
        mc = self.mod(F.silu(vec_c), cond=True).chunk(3, dim=-1)
        qc, kc, vc, mlp_c = self._qkv(c, mc, cond=True)
        qc, kc = apply_rope(qc, *rope_c), apply_rope(kc, *rope_c)
        return self._post(c, attention(qc, kc, vc), mlp_c, mc, cond=True), (kc, vc)

    def forward(self, x, vec, rope, cond=None, vec_c=None, rope_c=None, cond_kv=None, causal=False):
        m = self.mod(F.silu(vec)).chunk(3, dim=-1)
        q, k, v, mlp = self._qkv(x, m)  # x = [text; image]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cond is not None and not causal:
            mc = self.mod(F.silu(vec_c), cond=True).chunk(3, dim=-1)
            qc, kc, vc, mlp_c = self._qkv(cond, mc, cond=True)
            qc, kc = apply_rope(qc, *rope_c), apply_rope(kc, *rope_c)
            a = attention(torch.cat([q, qc], 2), torch.cat([k, kc], 2), torch.cat([v, vc], 2))
            a, a_cond = a[:, : q.shape[2]], a[:, q.shape[2] :]
            cond = self._post(cond, a_cond, mlp_c, mc, cond=True)
        else:
            if cond is not None:
                cond, cond_kv = self.cond_only(cond, vec_c, rope_c)
            if cond_kv is not None:
                k, v = torch.cat([k, cond_kv[0]], 2), torch.cat([v, cond_kv[1]], 2)
            a = attention(q, k, v)
        return self._post(x, a, mlp, m), cond


@dataclass
class CondCache:
    """Keys/values of the condition tokens in every block (causal_kv), for one batch of
    (condition image, text): valid for every timestep and every noisy image."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block, double then single: (B, H, M, Dh) each

    def __len__(self) -> int:
        return self.kv[0][0].shape[0]

    def cat(self, other: CondCache) -> CondCache:
        return CondCache([(torch.cat([k, k2]), torch.cat([v, v2])) for (k, v), (k2, v2) in zip(self.kv, other.kv)])


@dataclass
class _Run:
    """What every block of one forward reads besides the token streams."""

    vec: torch.Tensor  # (B, width) AdaLN input
    rope: tuple[torch.Tensor, torch.Tensor]  # text + image rotary cos, sin
    rope_c: tuple[torch.Tensor, torch.Tensor]  # condition rotary cos, sin
    vec_c: torch.Tensor | None  # (B, width) the condition stream's timestep-0 modulation input
    kv: list | None  # CondCache.kv: per block, the condition's cached keys/values (causal_kv)
    causal: bool

    def kv_of(self, block: int):
        return self.kv[block] if self.kv is not None else None


class MMDiT(nn.Module):
    """v(x, t, text, cond): velocity (eps - x0) for images x (B, C, H, W) in [-1, 1] at times t (B,)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config.validate()
        self.tokenizer = Tokenizer(c.vocab, c.max_text_len)
        self.text_encoder = TextEncoder(len(self.tokenizer), c.max_text_len, c.text_width, c.text_layers,
                                        c.text_heads)
        patch_dim = c.patch_size**2 * c.channels
        self.x_embedder = BranchLinear(patch_dim, c.width)
        self.context_embedder = nn.Linear(c.text_width, c.width)
        self.time_in = MLPEmbedder(256, c.width)
        self.vector_in = MLPEmbedder(c.text_width, c.width)
        self.double_blocks = nn.ModuleList([DoubleBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.double_blocks)])
        self.single_blocks = nn.ModuleList([SingleBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.single_blocks)])
        self.final_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Linear(c.width, 2 * c.width)
        self.final_linear = nn.Linear(c.width, patch_dim)
        img = rope_angles(image_position_ids(c.grid), c.head_dim, c.rope_theta)  # (N, Dh/2)
        cnd = rope_angles(condition_position_ids(c.grid), c.head_dim, c.rope_theta)  # (M, Dh/2)
        self.register_buffer("img_cos", img.cos(), persistent=False)
        self.register_buffer("img_sin", img.sin(), persistent=False)
        self.register_buffer("cond_cos", cnd.cos(), persistent=False)
        self.register_buffer("cond_sin", cnd.sin(), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's recipe: xavier linears, N(0, 0.02) embeddings, and zero modulations and output so
        that every block starts as the identity and the model starts by predicting zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_encoder.embed.weight, std=0.02)
        nn.init.normal_(self.text_encoder.pos, std=0.02)
        for emb in (self.time_in, self.vector_in):
            nn.init.normal_(emb.fc1.weight, std=0.02)
            nn.init.normal_(emb.fc2.weight, std=0.02)
        for b in self.double_blocks:
            for lin in (b.img_mod, b.txt_mod):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for b in self.single_blocks:
            nn.init.zeros_(b.mod.weight)
            nn.init.zeros_(b.mod.bias)
        for lin in (self.final_mod, self.final_linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- inputs ---------------------------------------------------------------------------------

    def encode_text(self, text: torch.Tensor | TextFeatures) -> TextFeatures:
        """Token ids (B, L) -> TextFeatures (passes features through)."""
        return text if isinstance(text, TextFeatures) else self.text_encoder(text)

    def conditioning_vector(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """AdaLN input: time embedding + pooled text embedding, (B, width)."""
        t_emb = timestep_embedding(t, 256).to(pooled.dtype)
        return self.time_in(t_emb) + self.vector_in(pooled)

    def _rope_main(self, n_text: int):
        zeros = self.img_cos.new_zeros(n_text, self.img_cos.shape[1])  # text sits at position 0
        return torch.cat([zeros + 1, self.img_cos]), torch.cat([zeros, self.img_sin])  # (L+N, Dh/2) each

    def _embed_cond(self, cond: torch.Tensor, feats: TextFeatures):
        c = self.x_embedder(patchify(cond, self.config.patch_size), cond=True)  # (B, M, width)
        zero = torch.zeros(cond.shape[0], device=cond.device)
        return c, self.conditioning_vector(zero, feats.pooled)  # timestep-0 modulation

    @per_sample
    def encode_condition(self, cond: torch.Tensor, text: torch.Tensor | TextFeatures) -> CondCache:
        """The condition tokens' keys/values in every block, once per (image, text) (causal_kv only)."""
        if self.config.cond_attention != "causal_kv":
            raise ValueError("encode_condition needs cond_attention='causal_kv' (with 'full', condition "
                             "tokens attend to the noisy image and change at every step)")
        feats = self.encode_text(text)
        c, vec_c = self._embed_cond(cond, feats)
        rope_c = (self.cond_cos, self.cond_sin)
        kv = []
        for block in [*self.double_blocks, *self.single_blocks]:
            c, block_kv = block.cond_only(c, vec_c, rope_c)
            kv.append(block_kv)
        return CondCache(kv)

    # -- the function ---------------------------------------------------------------------------

    @per_sample  # on the CPU, sample by sample: an image must not depend on its batch (models/batching.py)
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | TextFeatures,
                cond: torch.Tensor | CondCache | None = None) -> torch.Tensor:
        img, txt, cond_x, run = self._start(x, t, text, cond)
        img, _, _ = self._blocks(img, txt, cond_x, run)
        return self._finish(img, run.vec)

    # -- the same function in three parts, for step caching (models/step_cache.py) --------------
    # head: inputs + the first block; tail: the remaining blocks; finish: the output layer. Each runs
    # sample by sample on the CPU like forward, and finish(tail(head(...))) is forward, bit for bit.

    @per_sample
    def head(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | TextFeatures,
             cond: torch.Tensor | CondCache | None = None):
        """(img, txt, cond stream, first block's image residual) after the first block."""
        img0, txt, cond_x, run = self._start(x, t, text, cond)
        img, txt, cond_x = self._blocks(img0, txt, cond_x, run, stop=1)
        return img, txt, cond_x, img - img0

    @per_sample
    def tail(self, img: torch.Tensor, txt: torch.Tensor, cond_x: torch.Tensor | None, t: torch.Tensor,
             text: torch.Tensor | TextFeatures, cond: torch.Tensor | CondCache | None = None) -> torch.Tensor:
        """The image stream after the last block, from `head`'s streams."""
        run = self._context(t, self.encode_text(text), cond, img.shape[0])
        img, _, _ = self._blocks(img, txt, cond_x, run, start=1)
        return img

    @per_sample
    def finish(self, img: torch.Tensor, t: torch.Tensor, text: torch.Tensor | TextFeatures) -> torch.Tensor:
        """The velocity from the image stream after the last block."""
        feats = self.encode_text(text)
        return self._finish(img, self.conditioning_vector(self._times(t, img.shape[0]), feats.pooled))

    @property
    def n_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    @staticmethod
    def _times(t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.expand(batch) if t.ndim == 0 else t

    def _context(self, t: torch.Tensor, feats: TextFeatures, cond, batch: int) -> _Run:
        """What every block reads besides the streams: modulation vectors, rotary angles, cached K/V."""
        vec = self.conditioning_vector(self._times(t, batch), feats.pooled)  # (B, width)
        causal = self.config.cond_attention == "causal_kv"
        cache = cond if isinstance(cond, CondCache) else None
        if cache is not None and not causal:
            raise ValueError("a CondCache needs cond_attention='causal_kv'")
        vec_c = None
        if cond is not None and cache is None:  # timestep-0 modulation of the condition stream
            vec_c = self.conditioning_vector(torch.zeros(batch, device=vec.device), feats.pooled)
        return _Run(vec=vec, rope=self._rope_main(feats.tokens.shape[1]), rope_c=(self.cond_cos, self.cond_sin),
                    vec_c=vec_c, kv=cache.kv if cache is not None else None, causal=causal)

    def _start(self, x: torch.Tensor, t: torch.Tensor, text, cond):
        feats = self.encode_text(text)
        img = self.x_embedder(patchify(x, self.config.patch_size))  # (B, N, width)
        txt = self.context_embedder(feats.tokens)  # (B, L, width)
        run = self._context(t, feats, cond, x.shape[0])
        cond_x = None
        if cond is not None and not isinstance(cond, CondCache):
            cond_x = self.x_embedder(patchify(cond, self.config.patch_size), cond=True)  # (B, M, width)
        return img, txt, cond_x, run

    def _blocks(self, img, txt, cond_x, run: _Run, start: int = 0, stop: int | None = None):
        """Blocks [start, stop) of double then single blocks over the streams; returns (img, txt, cond_x)."""
        n_double = len(self.double_blocks)
        stop = self.n_blocks if stop is None else stop
        for i in range(start, min(stop, n_double)):
            img, txt, cond_x = self.double_blocks[i](img, txt, run.vec, run.rope, cond_x, run.vec_c, run.rope_c,
                                                     run.kv_of(i), run.causal)
        if stop > n_double:
            L = txt.shape[1]
            h = torch.cat([txt, img], 1)  # (B, L+N, width)
            for i in range(max(start, n_double), stop):
                h, cond_x = self.single_blocks[i - n_double](h, run.vec, run.rope, cond_x, run.vec_c, run.rope_c,
                                                             run.kv_of(i), run.causal)
            txt, img = h[:, :L], h[:, L:]  # text (and the condition stream) are dropped after the last block
        return img, txt, cond_x

    def _finish(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        c = self.config
        shift, scale = self.final_mod(F.silu(vec)).chunk(2, dim=-1)
        out = self.final_linear(modulate(self.final_norm(img), shift, scale))  # (B, N, p*p*C)
        return unpatchify(out, c.patch_size, c.channels, c.grid)

    # -- weights on disk ------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """model.safetensors (weights, config in its metadata) + config.json, written atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = json.dumps(self.config.to_dict(), indent=1)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        tmp = folder / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"config": cfg, "format": "reflectionflow-mmdit"})
        tmp.replace(folder / "model.safetensors")
        (folder / "config.json.tmp").write_text(cfg + "\n")
        (folder / "config.json.tmp").replace(folder / "config.json")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> MMDiT:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(folder) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no weights (expected model.safetensors + config.json)")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "config" in meta:
            config = MMDiTConfig.from_dict(json.loads(meta["config"]))
        else:
            config = MMDiTConfig.from_dict(json.loads((Path(folder) / "config.json").read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(path)))
        return model.to(device=device, dtype=dtype).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
