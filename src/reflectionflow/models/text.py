"""The world's text encoder: a word-level tokenizer and a small transformer trained with the MMDiT.

The world's language is closed (`world.commands.VOCABULARY`: prompts, refined prompts and the
reflection commands), so a word-level vocabulary covers it exactly and needs no learned merges.
The encoder plays T5's role in FLUX: it gives per-token features that join the MMDiT's joint
attention, and a pooled vector (CLIP's role) that joins the timestep in the AdaLN modulation.
The MMDiT gives text tokens rotary position 0, so word order must be encoded here, by the
encoder's own learned position table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import per_sample

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_WORD = re.compile(r"[a-z]+")


class Tokenizer:
    """Lower-cased words -> ids, padded (or truncated) to a fixed length.

    Punctuation and bullets carry no meaning in the world's language (every command starts with
    its verb), so they are dropped. Text longer than `max_len` words is truncated, as FLUX
    truncates T5 input at its maximum length.
    """

    def __init__(self, vocab: Sequence[str], max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        words = [w for w in vocab if w not in (PAD, UNK)]
        if len(set(words)) != len(words):
            raise ValueError("vocab has repeated words")
        self.words: tuple[str, ...] = (PAD, UNK, *words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_len = max_len
        self._cache: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.words)

    def split(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.index.get(w, UNK_ID) for w in self.split(text))[: self.max_len]
            ids = ids + (PAD_ID,) * (self.max_len - len(ids))
            if len(self._cache) < 100_000:  # prompts repeat endlessly in training; reflections do not
                self._cache[text] = ids
        return ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, max_len) int64 ids."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a list of texts; wrap a single text in a list")
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids if i != PAD_ID)


@dataclass
class TextFeatures:
    """What the MMDiT reads from the text: computed once per prompt, reused at every step."""

    tokens: torch.Tensor  # (B, L, text_width)
    pooled: torch.Tensor  # (B, text_width)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def cat(self, other: TextFeatures) -> TextFeatures:
        return TextFeatures(torch.cat([self.tokens, other.tokens]), torch.cat([self.pooled, other.pooled]))


class _EncoderLayer(nn.Module):
    """Pre-LN transformer layer with a key padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, H, L, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """ids (B, L) -> TextFeatures; pads are masked out as keys and from the pooled mean."""

    def __init__(self, vocab_size: int, max_len: int, width: int, layers: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by text heads {heads}")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        self.layers = nn.ModuleList([_EncoderLayer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    @per_sample  # a prompt's features do not depend on its batch (models/batching.py)
    def forward(self, ids: torch.Tensor) -> TextFeatures:
        B, L = ids.shape
        if L > self.max_len:
            raise ValueError(f"text has {L} tokens; this encoder takes at most {self.max_len}")
        keep = ids != PAD_ID  # (B, L)
        # The empty text (CFG's unconditional branch) is all pads: let it attend to its first pad so
        # the softmax is defined; that pad's embedding + position is then the learned "no text".
        keep = keep.clone()
        keep[:, 0] = True
        x = self.embed(ids) + self.pos[:L]  # (B, L, W)
        for layer in self.layers:
            x = layer(x, keep)
        x = self.norm(x)
        w = keep.to(x.dtype)[..., None]  # (B, L, 1)
        pooled = (x * w).sum(1) / w.sum(1)  # (B, W)
        return TextFeatures(tokens=x, pooled=pooled)
