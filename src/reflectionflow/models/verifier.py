"""The world's learned yes/no verifier: (image, prompt) -> P(yes), NVILA-verifier style.

A ViT-style patch encoder for the 64x64 image and the world's text encoder (text.py) for the
prompt; image and text tokens then attend to each other jointly (as in the MMDiT's joint
attention: image tokens read the text, text tokens read the image) behind a [CLS] token whose
logit is the answer to "does this image match the prompt?". It sees only pixels and prompt text:
never the evaluator, the metadata or the category tag.

With `scene_head`, a linear head on the image tokens also names, for every 8x8 patch, the class
and the colour of the object that covers it (or none): a training-time auxiliary task (dense
supervision from the same evaluator's detections) that the yes/no answer never reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..world.commands import VOCABULARY
from ..world.spec import CLASSES, COLOR_NAMES
from .batching import per_sample
from .text import PAD_ID, TextEncoder, Tokenizer, _EncoderLayer

FORMAT = "reflectionflow-world-verifier/1"


@dataclass
class VerifierConfig:
    image_size: int = 64
    patch: int = 8
    width: int = 192
    layers: int = 6  # joint image-text layers
    heads: int = 6
    text_layers: int = 2
    max_text_len: int = 32
    vocab: tuple[str, ...] = field(default_factory=lambda: tuple(VOCABULARY))
    temperature: float = 1.0  # P(yes) = sigmoid(logit / temperature), fitted on held-out data (calibration)
    scene_head: bool = False  # the auxiliary per-patch class/colour head (training only)

    def __post_init__(self):
        self.vocab = tuple(self.vocab)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        return d


SCENE_CLASSES = 1 + len(CLASSES)  # the scene head's class outputs: none, then CLASSES in order
SCENE_COLORS = 1 + len(COLOR_NAMES)  # its colour outputs: none, then COLOR_NAMES in order


# Sizes as one-line factories (DiT's habit); the CLI offers the names.
SIZES = {
    "tiny": lambda **kw: VerifierConfig(**{"width": 64, "layers": 2, "heads": 4, "text_layers": 1, **kw}),
    "small": lambda **kw: VerifierConfig(**kw),
}


class WorldVerifier(nn.Module):
    """images (B, H, W, 3) uint8 + token ids (B, L) -> yes-logits (B,)."""

    def __init__(self, config: VerifierConfig):
        super().__init__()
        self.config = c = config
        self.tokenizer = Tokenizer(c.vocab, c.max_text_len)
        n = (c.image_size // c.patch) ** 2
        self.patchify = nn.Conv2d(3, c.width, c.patch, stride=c.patch)
        self.image_pos = nn.Parameter(torch.zeros(n, c.width))
        self.text_encoder = TextEncoder(len(self.tokenizer), c.max_text_len, c.width, c.text_layers, c.heads)
        self.kind = nn.Parameter(torch.zeros(3, c.width))  # which stream a token is: cls, image, text
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
        self.layers = nn.ModuleList([_EncoderLayer(c.width, c.heads) for _ in range(c.layers)])
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, 1)
        # per patch: none + each class, then none + each colour
        self.scene = nn.Linear(c.width, SCENE_CLASSES + SCENE_COLORS) if c.scene_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.image_pos, std=0.02)
        nn.init.normal_(self.text_encoder.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.zeros_(self.head.weight)  # start at P(yes) = 0.5

    @per_sample  # a score does not depend on what else is scored with it (models/batching.py)
    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images, ids)[:, 0]).squeeze(-1)  # (B,)

    def forward_with_scene(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: yes-logits (B,) and the scene head's logits (B, patches, SCENE_CLASSES + SCENE_COLORS)."""
        if self.scene is None:
            raise ValueError("this verifier has no scene head (VerifierConfig.scene_head is False)")
        h = self.encode(images, ids)
        n = (self.config.image_size // self.config.patch) ** 2
        return self.head(h[:, 0]).squeeze(-1), self.scene(h[:, 1 : 1 + n])

    def encode(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The joint layers' normed output (B, 1 + patches + L, width): [CLS], image, text tokens."""
        B = images.shape[0]
        x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
        img = self.patchify(x).flatten(2).transpose(1, 2) + self.image_pos  # (B, N, W)
        txt = self.text_encoder(ids).tokens  # (B, L, W)
        h = torch.cat([self.cls.expand(B, -1, -1) + self.kind[0], img + self.kind[1], txt + self.kind[2]], 1)
        keep = torch.cat([torch.ones(B, 1 + img.shape[1], dtype=torch.bool, device=ids.device),
                          ids != PAD_ID], 1)  # (B, 1 + N + L): pads are never attended to
        for layer in self.layers:
            h = layer(h, keep)
        return self.norm(h)

    @torch.no_grad()
    def p_yes(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dev = next(self.parameters()).device
        logits = self(images.to(dev), self.tokenizer(prompts).to(dev)).float()
        return torch.sigmoid(logits / self.config.temperature).cpu()

    # On disk: config.json (with FORMAT) and model.safetensors ----------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"format": FORMAT, **self.config.to_dict()}, indent=1))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> WorldVerifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{folder}: not a world verifier folder (config.json has no format {FORMAT!r})")
        model = cls(VerifierConfig(**meta))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device).eval()
