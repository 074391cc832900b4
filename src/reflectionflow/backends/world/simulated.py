"""Renderer-backed stand-ins for the world generator and corrector: `world-render` and `world-edit`.

The world backend's defaults are the trained models (`world-mmdit`, weights in weights/); these two
need no weights, run in milliseconds on a CPU and plant flaws at rates that are settings, so every
path of the engine runs anywhere (and `genref build --no-generator` samples `world-render`).

Generator. The "initial noise" is a 16-d standard normal vector (`noise_like(seed)`), so the
noise axis is real: zero-order search moves through it. The first five coordinates decide,
through the normal CDF, whether each kind of flaw (world.flaws: missing, extra, colour, class,
relation) is planted; the whole vector, hashed, seeds the layout. A neighbour at cosine 0.95
keeps most flaw decisions and draws a new layout. A refined prompt (backends.world.refine)
lowers the chance of the flaws whose aspect it states.

Corrector. Detects the previous image's objects, applies the reflection's commands
(world.commands) to that scene, each dropped with chance p_fail, sometimes breaks something new
(p_new_flaw), and renders the result. Seeded from CorrectionRequest.seed.

Both are deterministic functions of their request and cost no network evaluations (nfe = 0).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

import numpy as np
from scipy.special import ndtr

from ...components import CorrectionRequest, Corrector, GenerationRequest, GenerationResult, Generator
from ...world.commands import Command, parse_reflection
from ...world.detect import Detection, detect
from ...world.flaws import FLAW_KINDS, plant_flaw
from ...world.render import Obj, Scene, place, render, sample_scene
from ...world.spec import BORDER, COLOR_NAMES, IMAGE_SIZE, MAX_SIZE, MIN_SIZE, PromptError, normalize_prompt
from .options import EditCorrectorOptions, RenderGeneratorOptions, build_options
from .refine import parse_refined

NOISE_DIM = 16
# Which refined-prompt aspect guards against which flaw.
_ASPECT_OF_FLAW = {"missing": "count", "extra": "extra", "color": "color", "class": "class", "relation": "relation"}


def _rng_from(*parts) -> random.Random:
    key = "/".join(str(p) for p in parts).encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))


def _shift(p: float, logit_delta: float) -> float:
    """p moved by logit_delta in logit space."""
    return 1.0 / (1.0 + math.exp(-(math.log(p / (1.0 - p)) + logit_delta)))


class RenderGenerator(Generator):
    """Draws the prompt's scene with the renderer, with a configurable chance of each flaw."""

    def __init__(self, **options):
        self.opt: RenderGeneratorOptions = build_options(RenderGeneratorOptions, options, "generator world-render")
        self._parsed: dict[str, tuple[dict, set[str]]] = {}

    def noise_like(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(NOISE_DIM)

    def _rate(self, original: str, kind: str) -> float:
        """This prompt's chance of a flaw of this kind (before any help from a refined prompt)."""
        base = getattr(self.opt, f"p_{kind}")
        if base <= 0.0 or base >= 1.0 or self.opt.difficulty_spread == 0:
            return base
        h = _rng_from("difficulty", normalize_prompt(original), kind).gauss(0.0, 1.0)
        return _shift(base, self.opt.difficulty_spread * h)

    def _parse(self, prompt: str) -> tuple[dict, set[str]]:
        if prompt not in self._parsed:
            self._parsed[prompt] = parse_refined(prompt)
        return self._parsed[prompt]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for r in requests:
            z = self.noise_like(r.seed) if r.noise is None else np.asarray(r.noise, dtype=np.float64).reshape(-1)
            if z.shape != (NOISE_DIM,):
                raise ValueError(f"world-render generator: noise must have {NOISE_DIM} values, got shape {z.shape}")
            meta, aspects = self._parse(r.prompt)
            u = ndtr(z[: len(FLAW_KINDS)])  # (5,) uniform in (0, 1): one draw per flaw kind
            # Rounded so that the layout does not hinge on the last bits of float arithmetic.
            rng = _rng_from("layout", np.round(z, 9).tobytes().hex())
            scene = sample_scene(meta, rng)
            for k, kind in enumerate(FLAW_KINDS):
                p = self._rate(meta["prompt"], kind)
                if _ASPECT_OF_FLAW[kind] in aspects and 0.0 < p < 1.0:
                    p = _shift(p, -self.opt.prompt_help)
                if u[k] < p:
                    scene = plant_flaw(meta, scene, kind, rng) or scene
            out.append(GenerationResult(image=render(scene), nfe=0, noise=z))
        return out


class EditCorrector(Corrector):
    """Applies the reflection's edit commands to the previous image's detected scene."""

    def __init__(self, **options):
        self.opt: EditCorrectorOptions = build_options(EditCorrectorOptions, options, "corrector world-edit")

    def _fail_rate(self, meta: dict | None, op: str) -> float:
        base = self.opt.p_fail
        if meta is None or self.opt.difficulty_spread == 0 or not 0.0 < base < 1.0:
            return base
        h = _rng_from("edit-difficulty", normalize_prompt(meta["prompt"]), op).gauss(0.0, 1.0)
        return _shift(base, self.opt.difficulty_spread * h)

    def correct(self, requests: Sequence[CorrectionRequest]) -> list[GenerationResult]:
        out = []
        for r in requests:
            rng = random.Random(r.seed)
            scene = scene_from_detections(detect(r.image))
            commands, _ = parse_reflection(r.reflection or "")
            try:
                meta, _ = parse_refined(r.prompt)
            except PromptError:
                meta = None  # a prompt outside the world: edits still apply, at the base rate
            for c in commands:
                if rng.random() < self._fail_rate(meta, c.op):
                    continue
                scene = apply_command(scene, c, rng)
            if rng.random() < self.opt.p_new_flaw:
                if meta is not None:
                    kind = FLAW_KINDS[int(rng.random() * len(FLAW_KINDS))]
                    scene = plant_flaw(meta, scene, kind, rng) or scene
            out.append(GenerationResult(image=render(scene), nfe=0))
        return out


def scene_from_detections(dets: Sequence[Detection]) -> Scene:
    """Objects at the detected boxes (size = the larger box side, clamped to the world's range)."""
    scene = []
    for d in dets:
        x1, y1, x2, y2 = d.box
        s = int(min(max(max(x2 - x1, y2 - y1), MIN_SIZE), MAX_SIZE))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        x = int(min(max(round(cx - s / 2), BORDER), IMAGE_SIZE - BORDER - s))
        y = int(min(max(round(cy - s / 2), BORDER), IMAGE_SIZE - BORDER - s))
        scene.append(Obj(d.cls, d.color, s, x, y))
    return scene


def _find(scene: Scene, cls: str | None, color: str | None) -> int | None:
    exact = [i for i, o in enumerate(scene) if o.cls == cls and (color is None or o.color == color)]
    if exact:
        return exact[0]
    loose = [i for i, o in enumerate(scene) if o.cls == cls]
    return loose[0] if loose else None


def apply_command(scene: Scene, c: Command, rng: random.Random) -> Scene:
    """The scene after one edit; an edit whose object is not there changes nothing."""
    scene = list(scene)
    if c.op == "add":
        for _ in range(c.count):
            color = c.color or COLOR_NAMES[int(rng.random() * len(COLOR_NAMES))]
            o = place(c.cls, color, scene, rng)
            if o is not None:
                scene.append(o)
    elif c.op == "remove":
        for _ in range(c.count):
            i = _find(scene, c.cls, c.color)
            if i is not None:
                del scene[i]
    elif c.op == "change":
        i = _find(scene, c.cls, c.color)
        if i is not None:
            o = scene[i]
            scene[i] = Obj(o.cls, c.new_color, o.size, o.x, o.y)
    elif c.op == "replace":
        i = _find(scene, c.cls, c.color)
        if i is not None:
            o = scene[i]
            scene[i] = Obj(c.new_cls, c.new_color or o.color, o.size, o.x, o.y)
    elif c.op == "move":
        i = _find(scene, c.cls, c.color)
        j = _find(scene, c.target_cls, c.target_color)
        if i is not None and j is not None and i != j:
            o, target = scene[i], scene[j]
            rest = scene[:i] + scene[i + 1 :]
            moved = place(o.cls, o.color, rest, rng, relation=(c.relation, target), size=o.size)
            if moved is not None:
                return rest[:i] + [moved] + rest[i:]
            # No room on that side of the target (it sits at the border): move both, as an
            # editor asked to put A left of B would.
            others = [p for k, p in enumerate(scene) if k not in (i, j)]
            for _ in range(20):
                t2 = place(target.cls, target.color, others, rng, size=target.size)
                if t2 is None:
                    continue
                moved = place(o.cls, o.color, others + [t2], rng, relation=(c.relation, t2), size=o.size)
                if moved is not None:
                    out = list(scene)
                    out[i], out[j] = moved, t2
                    return out
    return scene
