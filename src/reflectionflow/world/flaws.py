"""Planted flaws: one controlled mistake in a legal scene, and the scene's ground truth.

The five kinds are the mistakes text-to-image models make on GenEval: an object missing, an extra
one, a wrong colour, a wrong class, a swapped relation. Used by the evaluator benchmark, by the
renderer-backed generator of the engine, and by world GenRef's editing source.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from .detect import Detection
from .evaluate import ImageVerdict, evaluate_detections
from .render import Obj, Scene, place
from .spec import CLASSES, COLOR_NAMES

FLAW_KINDS = ("missing", "extra", "color", "class", "relation")


def _pick(rng: random.Random, seq: Sequence):
    return seq[rng.randrange(len(seq))]


def plant_flaw(meta: dict, scene: Scene, kind: str, rng: random.Random) -> Scene | None:
    """A copy of `scene` with one flaw of `kind`; None when the kind cannot apply to this scene."""
    scene = list(scene)
    named = {c["class"] for c in meta["include"]}
    if kind == "missing":
        if not scene:
            return None
        del scene[rng.randrange(len(scene))]
        return scene
    if kind == "extra":
        if meta.get("exclude"):  # counting: one more of the counted class
            cls = meta["include"][0]["class"]
        else:
            cls = _pick(rng, [c for c in CLASSES if c not in named] or list(CLASSES))
        o = place(cls, _pick(rng, COLOR_NAMES), scene, rng)
        return None if o is None else scene + [o]
    if kind == "color":
        colored = [i for i, o in enumerate(scene) if any(c.get("color") for c in meta["include"])]
        idx = colored or list(range(len(scene)))
        if not idx:
            return None
        i = _pick(rng, idx)
        scene[i] = Obj(scene[i].cls, _pick(rng, [c for c in COLOR_NAMES if c != scene[i].color]),
                       scene[i].size, scene[i].x, scene[i].y)
        return scene
    if kind == "class":
        if not scene:
            return None
        i = rng.randrange(len(scene))
        others = [c for c in CLASSES if c not in named] or [c for c in CLASSES if c != scene[i].cls]
        scene[i] = Obj(_pick(rng, others), scene[i].color, scene[i].size, scene[i].x, scene[i].y)
        return scene
    if kind == "relation":
        if len(scene) < 2:
            return None
        i, j = (0, 1) if "position" in str(meta["include"]) else rng.sample(range(len(scene)), 2)
        a, b = scene[i], scene[j]
        # Swap where the two objects sit (each keeps its class, colour and size, centred on the
        # other's old centre); boxes of different sizes are re-clamped into the border.
        scene[i] = _centred(a, b)
        scene[j] = _centred(b, a)
        return scene if _legal_pair(scene) else None
    raise ValueError(f"unknown flaw {kind!r}; accepted: {', '.join(FLAW_KINDS)}")


def _centred(o: Obj, at: Obj) -> Obj:
    cx, cy = at.x + at.size / 2, at.y + at.size / 2
    return Obj(o.cls, o.color, o.size, int(round(cx - o.size / 2)), int(round(cy - o.size / 2)))


def _legal_pair(scene: Scene) -> bool:
    from .render import is_legal

    return is_legal(scene)


def truth(scene: Sequence[Obj], meta: dict) -> tuple[bool | None, ImageVerdict]:
    """GenEval's verdict on the scene's true objects.

    GenEval takes the most confident detections of a class first, so a scene with several objects
    of one class can have an order-dependent verdict. Every order is tried; the first result is
    returned with None instead of a bool when the orders disagree (an ambiguous scene).
    """
    by_cls: dict[str, list[Obj]] = {}
    for o in scene:
        by_cls.setdefault(o.cls, []).append(o)
    verdicts = set()
    first: ImageVerdict | None = None
    perms = [list(itertools.permutations(v)) for v in by_cls.values()]
    for combo in itertools.islice(itertools.product(*perms), 48):
        dets = [Detection(o.cls, o.color, o.box, 1.0, o.size * o.size) for group in combo for o in group]
        v = evaluate_detections(dets, meta)
        first = first or v
        verdicts.add(v.correct)
    if first is None:  # empty scene
        first = evaluate_detections([], meta)
        verdicts.add(first.correct)
    return (first.correct if len(verdicts) == 1 else None), first
