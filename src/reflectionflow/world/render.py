"""Scenes and the renderer: metadata line + seed -> a legal scene and its 64x64 image.

A scene is a list of `Obj` (class, colour, box side, top-left corner). Shapes are drawn with
anti-aliased coverage masks (4x4 supersampling), precomputed once per (class, size), so drawing is
a few numpy blends per object: well over 5,000 images a second on one core
(benchmarks/render_speed.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from .spec import (
    BACKGROUND,
    BORDER,
    CLASSES,
    COLOR_NAMES,
    COLORS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_GAP,
    MIN_SIZE,
)

SUPERSAMPLE = 4
POSITION_THRESHOLD = 0.1  # GenEval's shrink factor for relative positions
RELATION_MARGIN = 0.62  # sampled position scenes clear GenEval's 0.5 with room for detector error


@dataclass(frozen=True, slots=True)
class Obj:
    cls: str
    color: str
    size: int  # side of the axis-aligned box, pixels
    x: int  # top-left corner of the box, pixels
    y: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2), x2/y2 exclusive, in pixels."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)

    def to_dict(self) -> dict:
        return {"class": self.cls, "color": self.color, "size": self.size, "x": self.x, "y": self.y}

    @staticmethod
    def from_dict(d: dict) -> Obj:
        return Obj(d["class"], d["color"], int(d["size"]), int(d["x"]), int(d["y"]))


Scene = list[Obj]


# ----------------------------------------------------------------------------------------------
# Geometry: each class as an inside-test over continuous coordinates of an s x s box.


def shape_inside(cls: str, u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    """Boolean mask: is the point (u, v) (box coordinates, 0..s) inside the shape?"""
    c = s / 2.0
    if cls == "circle":
        return (u - c) ** 2 + (v - c) ** 2 <= c * c
    if cls == "square":
        return (u >= 0) & (u <= s) & (v >= 0) & (v <= s)
    if cls == "triangle":  # apex up at (c, 0), base on the bottom edge
        return (v >= 0) & (v <= s) & (np.abs(u - c) <= v / 2.0)
    if cls == "diamond":
        return np.abs(u - c) + np.abs(v - c) <= c
    if cls == "cross":
        t = round(s / 3.0) / 2.0
        inside = (u >= 0) & (u <= s) & (v >= 0) & (v <= s)
        return inside & ((np.abs(u - c) <= t) | (np.abs(v - c) <= t))
    if cls == "ring":
        r2 = (u - c) ** 2 + (v - c) ** 2
        h = round(s / 2.0) / 2.0
        return (r2 <= c * c) & (r2 > h * h)
    raise ValueError(f"unknown class {cls!r}; accepted: {', '.join(CLASSES)}")


def coverage_mask(cls: str, w: float, h: float | None = None, ss: int = SUPERSAMPLE, dx: float = 0.0,
                  dy: float = 0.0) -> np.ndarray:
    """Fractional coverage of each pixel of a ceil(w) x ceil(h) grid by the shape.

    The shape's box is s = w wide (a non-square h stretches it vertically); dx, dy shift it by a
    sub-pixel offset. Used by the renderer (square, integer boxes) and by the detector's templates.
    """
    h = w if h is None else h
    nx, ny = int(np.ceil(w + dx)), int(np.ceil(h + dy))
    off = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(nx)[:, None] + off[None, :]).reshape(-1) - dx
    ys = (np.arange(ny)[:, None] + off[None, :]).reshape(-1) - dy
    u, v = np.meshgrid(xs, ys * (w / h))  # rescale v so a w x h box maps onto an s x s shape
    inside = shape_inside(cls, u, v, w).astype(np.float32)
    return inside.reshape(ny, ss, nx, ss).mean(axis=(1, 3))  # (ny, nx)


@cache
def _mask(cls: str, size: int) -> np.ndarray:
    return coverage_mask(cls, float(size))[:, :, None].astype(np.float32)  # (s, s, 1)


_COLOR_ARR = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLORS.items()}
_BG = np.array(BACKGROUND, dtype=np.float32)


def render(scene: Sequence[Obj], out: np.ndarray | None = None) -> np.ndarray:
    """Draw a scene; returns (64, 64, 3) uint8 (written into `out` when given)."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[:] = _BG
    for o in scene:
        a = _mask(o.cls, o.size)
        region = canvas[o.y : o.y + o.size, o.x : o.x + o.size]
        region += a * (_COLOR_ARR[o.color] - region)
    if out is None:
        out = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    np.rint(canvas, out=canvas)
    out[:] = canvas
    return out


# ----------------------------------------------------------------------------------------------
# Relations (GenEval's rule on boxes) and legality.


def relations(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """GenEval's relative position of A to B. Returns the normalised offsets and the relations set
    as {"dx": .., "dy": .., "rels": set}; boxes are (x1, y1, x2, y2)."""
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    ox = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
    oy = (ay1 + ay2) / 2 - (by1 + by2) / 2
    # plain floats, not numpy scalars: this runs for every placement try of the scene sampler
    rx = math.copysign(max(abs(ox) - POSITION_THRESHOLD * ((ax2 - ax1) + (bx2 - bx1)), 0.0), ox)
    ry = math.copysign(max(abs(oy) - POSITION_THRESHOLD * ((ay2 - ay1) + (by2 - by1)), 0.0), oy)
    rels: set[str] = set()
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return {"dx": 0.0, "dy": 0.0, "rels": rels}
    norm = math.hypot(ox, oy)
    dx, dy = rx / norm, ry / norm
    if dx < -threshold:
        rels.add("left of")
    if dx > threshold:
        rels.add("right of")
    if dy < -threshold:
        rels.add("above")
    if dy > threshold:
        rels.add("below")
    return {"dx": float(dx), "dy": float(dy), "rels": rels}


def holds(relation: str, a: Obj, b: Obj, threshold: float = 0.5) -> bool:
    return relation in relations(a.box, b.box, threshold)["rels"]


def clear_of(o: Obj, scene: Sequence[Obj], gap: int = MIN_GAP) -> bool:
    """True when o keeps `gap` pixels from every object of the scene and from the border."""
    x1, y1, x2, y2 = o.box
    if x1 < BORDER or y1 < BORDER or x2 > IMAGE_SIZE - BORDER or y2 > IMAGE_SIZE - BORDER:
        return False
    for p in scene:
        if x1 < p.x + p.size + gap and p.x < x2 + gap and y1 < p.y + p.size + gap and p.y < y2 + gap:
            return False
    return True


def is_legal(scene: Sequence[Obj]) -> bool:
    for i, o in enumerate(scene):
        if o.cls not in CLASSES or o.color not in COLORS or not MIN_SIZE <= o.size <= MAX_SIZE:
            return False
        if not clear_of(o, scene[:i]):
            return False
    return True


def _ri(rng: random.Random, a: int, b: int) -> int:
    """Uniform integer in [a, b]; randint's generality costs more than a whole drawing here."""
    return a + int(rng.random() * (b - a + 1))


def place(cls: str, color: str, scene: Sequence[Obj], rng: random.Random, tries: int = 200,
          relation: tuple[str, Obj] | None = None, size: int | None = None) -> Obj | None:
    """A random legal placement of one object beside `scene` (optionally `relation` to a target)."""
    lo, hi = BORDER, IMAGE_SIZE - BORDER
    for attempt in range(tries):
        s = size or _ri(rng, MIN_SIZE, MAX_SIZE)
        x0, x1, y0, y1 = lo, hi - s, lo, hi - s
        if relation is not None and attempt < tries // 2:
            # Draw from the side of the target the relation asks for (the margin test still decides).
            rel, t = relation
            if rel == "left of":
                x1 = min(x1, t.x - s - MIN_GAP)
            elif rel == "right of":
                x0 = max(x0, t.x + t.size + MIN_GAP)
            elif rel == "above":
                y1 = min(y1, t.y - s - MIN_GAP)
            else:
                y0 = max(y0, t.y + t.size + MIN_GAP)
            if x0 > x1 or y0 > y1:
                continue
        o = Obj(cls, color, s, _ri(rng, x0, x1), _ri(rng, y0, y1))
        if not clear_of(o, scene):
            continue
        if relation is not None and not holds(relation[0], o, relation[1], RELATION_MARGIN):
            continue
        return o
    return None


def sample_scene(meta: dict, rng: random.Random | int) -> Scene:
    """A random legal scene that satisfies the metadata exactly (counting: exactly N objects)."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    include = meta["include"]
    for _ in range(100):
        scene: Scene = []
        groups: list[list[Obj]] = []
        ok = True
        for clause in include:
            group = []
            rel = None
            if "position" in clause:
                rel_name, idx = clause["position"]
                rel = (rel_name, groups[idx][0])
            for _ in range(clause["count"]):
                color = clause.get("color") or COLOR_NAMES[int(rng.random() * len(COLOR_NAMES))]
                o = place(clause["class"], color, scene, rng, relation=rel)
                if o is None:
                    ok = False
                    break
                scene.append(o)
                group.append(o)
            if not ok:
                break
            groups.append(group)
        if ok:
            return scene
    raise RuntimeError(f"could not place a legal scene for {meta['prompt']!r}")


def draw(meta: dict, seed: int) -> tuple[Scene, np.ndarray]:
    """The ground-truth scene and image for a metadata line and a seed."""
    scene = sample_scene(meta, random.Random(seed))
    return scene, render(scene)


def render_batch(metas: Sequence[dict], seeds: Sequence[int]) -> np.ndarray:
    """(B, 64, 64, 3) uint8 ground-truth images, one per (metadata, seed)."""
    out = np.empty((len(metas), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (m, s) in enumerate(zip(metas, seeds)):
        render(sample_scene(m, random.Random(s)), out=out[i])
    return out
