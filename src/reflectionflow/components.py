"""The five interfaces the engine drives, their batch dataclasses, and the name registry.

Every interface takes a batch (a sequence of requests) and returns one result per request, in the
same order. Images are numpy arrays of shape (H, W, 3), dtype uint8, RGB. Results carry their own
cost (NFE, VLM calls, tokens) so the engine's ledger adds up whatever the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Image = np.ndarray  # (H, W, 3) uint8 RGB

KINDS = ("generator", "verifier", "reflector", "refiner", "corrector")


class ComponentError(ValueError):
    """A component name or option that does not exist or does not fit."""


# ----------------------------------------------------------------------------------------------
# Batch items and results


@dataclass
class GenerationRequest:
    prompt: str
    seed: int
    # Initial noise; None means "draw it from seed". The noise search's zero-order variant passes
    # perturbed copies of the best noise here (tt-scale-flux passes it through `latents=`).
    noise: np.ndarray | None = None


@dataclass
class GenerationResult:
    image: Image
    nfe: int  # full transformer forward passes (CFG counted as 2)
    noise: np.ndarray | None = None  # the initial noise actually used, when the backend has one
    error: str | None = None
    # Passes served from a step cache (only the first block ran; not in nfe): nfe + cached is the
    # sampler's steps x passes per step.
    cached: int = 0


@dataclass
class Verdict:
    score: float  # higher is better
    yes: bool | None = None  # yes/no verifiers: ranking puts yes-answers first, then by score
    details: dict = field(default_factory=dict)
    calls: int = 0
    tokens: int = 0
    error: str | None = None

    @property
    def rank_key(self) -> tuple[int, float]:
        return (1 if self.yes else 0, self.score) if self.yes is not None else (0, self.score)


@dataclass
class ReflectionRequest:
    image: Image
    original_prompt: str
    current_prompt: str
    previous_reflection: str | None = None
    verdict: Verdict | None = None


@dataclass
class Reflection:
    text: str  # bullet-point edit commands, most critical first ("- Add one red circle.")
    calls: int = 0
    tokens: int = 0
    error: str | None = None


@dataclass
class RefineRequest:
    original_prompt: str
    current_prompt: str
    reflection: str | None = None
    verdict: Verdict | None = None
    image: Image | None = None


@dataclass
class RefinedPrompt:
    text: str
    calls: int = 0
    tokens: int = 0
    error: str | None = None


@dataclass
class CorrectionRequest:
    image: Image  # the previous image, to be edited
    prompt: str  # the (refined) prompt; the corrector appends the reflection itself
    reflection: str
    seed: int


# ----------------------------------------------------------------------------------------------
# Interfaces


class Generator(ABC):
    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def noise_like(self, seed: int) -> np.ndarray | None:
        """The initial noise this generator would draw for `seed` (None if it has none)."""
        return None


class Verifier(ABC):
    @abstractmethod
    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[Verdict]: ...


class Reflector(ABC):
    @abstractmethod
    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[Reflection]: ...


class PromptRefiner(ABC):
    @abstractmethod
    def refine(self, requests: Sequence[RefineRequest]) -> list[RefinedPrompt]: ...


class Corrector(ABC):
    @abstractmethod
    def correct(self, requests: Sequence[CorrectionRequest]) -> list[GenerationResult]: ...


# ----------------------------------------------------------------------------------------------
# Registry: configs pick components by name.

_REGISTRY: dict[str, dict[str, Callable]] = {k: {} for k in KINDS}
_DESCRIPTIONS: dict[str, dict[str, str]] = {k: {} for k in KINDS}


def register(kind: str, name: str, description: str = "") -> Callable:
    if kind not in KINDS:
        raise ComponentError(f"unknown component kind {kind!r}; accepted: {', '.join(KINDS)}")

    def deco(factory: Callable) -> Callable:
        _REGISTRY[kind][name] = factory
        _DESCRIPTIONS[kind][name] = description or (factory.__doc__ or "").strip().split("\n")[0]
        return factory

    return deco


# The modules whose import registers the built-in components. All of them register factories only
# (heavy libraries load when a component is built), so every name is known whatever was imported
# before: `names("verifier")` is the same list in a fresh interpreter and after a run.
BUILTIN_MODULES = ("reflectionflow.backends.world", "reflectionflow.backends.vlm", "reflectionflow.backends.flux")


def _ensure_builtin() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def names(kind: str) -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY[kind])


def describe(kind: str) -> dict[str, str]:
    _ensure_builtin()
    return dict(sorted(_DESCRIPTIONS[kind].items()))


def check_name(kind: str, name: str) -> None:
    if name not in names(kind):
        raise ComponentError(f"unknown {kind} {name!r}; accepted: {', '.join(names(kind))}")


def build(kind: str, name: str, **options):
    check_name(kind, name)
    return _REGISTRY[kind][name](**options)
