"""The world's learned reflector: (image, prompt) -> reflection text in the world's command language.

The verifier's encoder (patch tokens of the image and the world text encoder's prompt tokens,
attending jointly) gives a memory; a small causal transformer decoder writes the reflection word
by word while cross-attending to it (an image-conditioned captioner, as the paper's VLM reflector
is, at world scale). The tokenizer drops punctuation and every command starts with its verb, so
the words are cut back into "- Verb ..." lines at each verb (`words_to_reflection`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world.commands import OPS, VOCABULARY
from .batching import per_sample, splits
from .text import PAD_ID, TextEncoder, Tokenizer, _EncoderLayer

FORMAT = "reflectionflow-world-reflector/1"
BOS = "<bos>"  # no text ever splits into it (the tokenizer keeps [a-z]+), so it only starts decoding


@dataclass
class ReflectorConfig:
    image_size: int = 64
    patch: int = 8
    width: int = 192
    layers: int = 4  # joint image-prompt encoder layers
    dec_layers: int = 4
    heads: int = 6
    text_layers: int = 2
    max_text_len: int = 32
    max_out_len: int = 48  # reflection words (PAD ends a reflection)
    vocab: tuple[str, ...] = field(default_factory=lambda: tuple(VOCABULARY))

    def __post_init__(self):
        self.vocab = tuple(self.vocab)
        if self.image_size % self.patch or self.width % self.heads:
            raise ValueError("image_size must be a multiple of patch and width of heads")

    def to_dict(self) -> dict:
        return {**asdict(self), "vocab": list(self.vocab)}


SIZES = {
    "tiny": lambda **kw: ReflectorConfig(**{"width": 64, "layers": 1, "dec_layers": 1, "heads": 4, "text_layers": 1,
                                            **kw}),
    "small": lambda **kw: ReflectorConfig(**kw),
}


MAX_COMMANDS = 8  # a reflection never holds more commands than this


def words_to_reflection(words: list[str]) -> str:
    """['add', 'one', 'red', 'circle', 'remove', ...] -> '- Add one red circle.\\n- Remove ...'.
    A repeated command is written once, and at most MAX_COMMANDS are kept, so a decoder that loops
    (one command 24 times on an odd image) still gives a short, actionable reflection."""
    lines: list[list[str]] = []
    for w in words:
        if w in OPS or not lines:
            lines.append([])
        lines[-1].append(w)
    out: list[str] = []
    for ws in lines:
        line = "- " + " ".join(ws).capitalize() + "."
        if line not in out:
            out.append(line)
    return "\n".join(out[:MAX_COMMANDS])


class WorldReflector(nn.Module):
    def __init__(self, config: ReflectorConfig):
        super().__init__()
        self.config = c = config
        self.tokenizer = Tokenizer(c.vocab, c.max_text_len)
        self.out_tokenizer = Tokenizer((*c.vocab, BOS), c.max_out_len)
        self.bos_id = self.out_tokenizer.index[BOS]
        n = (c.image_size // c.patch) ** 2
        self.patchify = nn.Conv2d(3, c.width, c.patch, stride=c.patch)
        self.image_pos = nn.Parameter(torch.zeros(n, c.width))
        self.text_encoder = TextEncoder(len(self.tokenizer), c.max_text_len, c.width, c.text_layers, c.heads)
        self.kind = nn.Parameter(torch.zeros(2, c.width))  # image, prompt
        self.enc = nn.ModuleList([_EncoderLayer(c.width, c.heads) for _ in range(c.layers)])
        self.out_embed = nn.Embedding(len(self.out_tokenizer), c.width)
        self.out_pos = nn.Parameter(torch.zeros(c.max_out_len, c.width))
        self.dec = nn.ModuleList([nn.TransformerDecoderLayer(c.width, c.heads, 4 * c.width, dropout=0.0,
                                                             activation="gelu", batch_first=True, norm_first=True)
                                  for _ in range(c.dec_layers)])
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, len(self.out_tokenizer))
        for p in (self.image_pos, self.text_encoder.pos, self.out_pos):
            nn.init.normal_(p, std=0.02)

    @per_sample  # models/batching.py
    def encode(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory (B, N + L, W), its pad mask (B, N + L), True = ignore)."""
        B = images.shape[0]
        x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W)
        img = self.patchify(x).flatten(2).transpose(1, 2) + self.image_pos  # (B, N, W)
        h = torch.cat([img + self.kind[0], self.text_encoder(ids).tokens + self.kind[1]], 1)
        keep = torch.cat([torch.ones(B, img.shape[1], dtype=torch.bool, device=ids.device), ids != PAD_ID], 1)
        for layer in self.enc:
            h = layer(h, keep)
        return h, ~keep

    @per_sample
    def decode(self, memory: torch.Tensor, pad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """inp (B, T) output-token ids starting with BOS -> next-token logits (B, T, V)."""
        T = inp.shape[1]
        h = self.out_embed(inp) + self.out_pos[:T]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=inp.device), 1)
        for layer in self.dec:
            h = layer(h, memory, tgt_mask=causal, memory_key_padding_mask=pad)
        return self.head(self.norm(h))

    def loss(self, images: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy; the first PAD after the words is the end token, later pads are ignored."""
        memory, pad = self.encode(images, ids)
        bos = torch.full_like(target[:, :1], self.bos_id)
        logits = self.decode(memory, pad, torch.cat([bos, target[:, :-1]], 1))  # (B, T, V)
        seen_end = torch.cumsum((target == PAD_ID).long(), 1)  # (B, T)
        weight = (seen_end <= 1).float()  # words, then one end token
        ce = F.cross_entropy(logits.transpose(1, 2).float(), target, reduction="none")  # (B, T)
        return (ce * weight).sum() / weight.sum()

    @torch.no_grad()
    def reflect(self, images: torch.Tensor, prompts: list[str]) -> list[str]:
        """Greedy decoding -> reflection texts. On the CPU each image is decoded on its own, so that
        its text does not depend on its batch (models/batching.py)."""
        dev = next(self.parameters()).device
        images = images.to(dev)
        if splits(images):
            return [text for i in range(len(prompts)) for text in self.reflect(images[i : i + 1], prompts[i : i + 1])]
        memory, pad = self.encode(images, self.tokenizer(prompts).to(dev))
        B = len(prompts)
        seq = torch.full((B, 1), self.bos_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(self.config.max_out_len):
            nxt = self.decode(memory, pad, seq)[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == PAD_ID
            if bool(done.all()):
                break
        words = self.out_tokenizer.words
        texts = []
        for row in seq[:, 1:].tolist():
            ws = [words[i] for i in row[: row.index(PAD_ID) if PAD_ID in row else len(row)] if i != self.bos_id]
            texts.append(words_to_reflection(ws) if ws else "- Keep the image unchanged.")
        return texts

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"format": FORMAT, **self.config.to_dict()}, indent=1))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> WorldReflector:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{folder}: not a world reflector folder (config.json has no format {FORMAT!r})")
        model = cls(ReflectorConfig(**meta))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device).eval()
