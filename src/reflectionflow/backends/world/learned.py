"""The world's learned judges behind the engine's interfaces: verifier and reflector `world-learned`.

The verifier answers "does this image match the prompt?" with P(yes) from the model of
models/verifier.py (trained by `reflectionflow train world-verifier`). As NVILA's verifier in the
paper (docs/method.md, section 5), yes-answers rank first, then by P(yes): Verdict.yes is
P(yes) > threshold and Verdict.score is P(yes). It reads pixels and the prompt text only: never
the evaluator, the metadata or the category tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...components import ComponentError, Reflection, ReflectionRequest, Reflector, Verdict, Verifier, register
from ...shipped import WEIGHTS_DIR
from .mmdit import _options

DEFAULT_VERIFIER = WEIGHTS_DIR / "world-verifier"
DEFAULT_REFLECTOR = WEIGHTS_DIR / "world-reflector"
TRAIN_VERIFIER_HINT = "train it with `reflectionflow train world-verifier --out RUN` and copy RUN/verifier " \
                      "there (or pass the folder as the verifier's `weights` option)"


@dataclass
class LearnedVerifierOptions:
    weights: str = ""  # a folder with model.safetensors + config.json ("": weights/world-verifier)
    threshold: float = 0.5  # P(yes) above this is a yes
    batch_size: int = 512
    device: str = "auto"

    def check(self, who: str) -> None:
        self.weights = self.weights or str(DEFAULT_VERIFIER)
        if not 0.0 < float(self.threshold) < 1.0:
            raise ComponentError(f"{who}: option threshold must be in (0, 1), got {self.threshold!r}")
        if not (Path(self.weights) / "model.safetensors").is_file():
            raise ComponentError(f"{who}: no weights in {self.weights}; {TRAIN_VERIFIER_HINT}")


@register("verifier", "world-learned", "the world's learned yes/no verifier: P(yes) from pixels and prompt")
class LearnedVerifier(Verifier):
    who = "verifier world-learned"

    def __init__(self, **options):
        from ...models.verifier import WorldVerifier
        from ...runtime import resolve_device

        self.opt: LearnedVerifierOptions = _options(LearnedVerifierOptions, options, self.who)
        self.model = WorldVerifier.from_pretrained(self.opt.weights, device=resolve_device(self.opt.device))

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        import torch

        out: list[Verdict] = []
        n = self.opt.batch_size
        for i in range(0, len(prompts), n):
            batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images[i : i + n]]))
            p = self.model.p_yes(batch, list(prompts[i : i + n]))
            out += [Verdict(score=float(v), yes=bool(v > self.opt.threshold)) for v in p.tolist()]
        return out


@dataclass
class LearnedReflectorOptions:
    weights: str = ""  # a folder with model.safetensors + config.json ("": weights/world-reflector)
    batch_size: int = 256
    device: str = "auto"

    def check(self, who: str) -> None:
        self.weights = self.weights or str(DEFAULT_REFLECTOR)
        if not (Path(self.weights) / "model.safetensors").is_file():
            raise ComponentError(f"{who}: no weights in {self.weights}; train it with `reflectionflow train "
                                 f"world-reflector --out RUN` and copy RUN/reflector there (or pass the folder "
                                 f"as the reflector's `weights` option)")


@register("reflector", "world-learned", "the world's learned reflector: edit commands from pixels and prompt")
class LearnedReflector(Reflector):
    """Reads the image and the original prompt only (as the oracle reflector does)."""

    who = "reflector world-learned"

    def __init__(self, **options):
        from ...models.reflector import WorldReflector
        from ...runtime import resolve_device

        self.opt: LearnedReflectorOptions = _options(LearnedReflectorOptions, options, self.who)
        self.model = WorldReflector.from_pretrained(self.opt.weights, device=resolve_device(self.opt.device))

    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[Reflection]:
        import torch

        out: list[Reflection] = []
        n = self.opt.batch_size
        for i in range(0, len(requests), n):
            chunk = requests[i : i + n]
            images = torch.from_numpy(np.stack([np.asarray(r.image, dtype=np.uint8) for r in chunk]))
            out += [Reflection(text=t) for t in self.model.reflect(images, [r.original_prompt for r in chunk])]
        return out
