"""The world's detector: image -> objects with class, colour, box and a confidence.

It must be right on anything drawn to the world's spec, not only on this project's renderer
(other anti-aliasing, any size in [12, 18], Gaussian pixel noise, mild blur), so it relies on
coarse, spec-level geometry rather than on the renderer's exact pixels:

1. foreground = pixels whose largest channel difference from the background exceeds half the
   smallest palette contrast (the 50 % coverage contour of every colour);
2. objects = 8-connected foreground components (objects are >= 2 px apart by spec);
3. class from the component's silhouette: a background hole (ring), fill ratio of its box
   (square ~1, circle ~0.79), then row widths (triangle: widest at the bottom; cross: narrow in
   the upper band; diamond: wide there);
4. colour = nearest palette colour to the median of the component's strongest pixels;
5. confidence = IoU of the silhouette with the chosen class's ideal shape at the same box, so a
   malformed blob from a generator ranks below a clean shape (GenEval orders by confidence).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .render import coverage_mask
from .spec import BACKGROUND, COLOR_NAMES, COLORS

_BG = np.array(BACKGROUND, dtype=np.float32)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
_MIN_CONTRAST = float(np.abs(_PALETTE - _BG).max(axis=1).min())  # white: 92
FG_THRESHOLD = _MIN_CONTRAST / 2
SEED_THRESHOLD = 0.4 * _MIN_CONTRAST  # first pass: find candidate components
MIN_AREA = 24  # pixels; smaller components are noise or debris
MIN_SIDE = 6
MIN_CONFIDENCE = 0.35
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    cls: str
    color: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive
    confidence: float
    area: int

    def to_dict(self) -> dict:
        return {"class": self.cls, "color": self.color, "box": list(self.box),
                "confidence": round(self.confidence, 4), "area": self.area}


def foreground(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    return np.abs(img - _BG).max(axis=-1) > FG_THRESHOLD




def solidity(mask: np.ndarray) -> float:
    """Pixels of the silhouette / pixel centres inside its convex hull (1.0 for convex shapes)."""
    ys, xs = np.nonzero(mask)
    rows = np.unique(ys)
    lo = np.array([xs[ys == r].min() for r in rows])
    hi = np.array([xs[ys == r].max() for r in rows])
    pts = np.concatenate([np.stack([lo, rows], 1), np.stack([hi, rows], 1)]).astype(np.float64)
    try:
        eq = ConvexHull(pts).equations  # (k, 3): a x + b y + c <= 0 inside
    except QhullError:  # degenerate (a line): treat as convex
        return 1.0
    gy, gx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    inside = (eq[:, 0, None, None] * gx + eq[:, 1, None, None] * gy + eq[:, 2, None, None] <= 1e-6).all(0)
    return float(mask.sum()) / max(float(inside.sum()), 1.0)


def classify_silhouette(mask: np.ndarray) -> tuple[str, float]:
    """Class of one component's boolean silhouette (tight crop) and its confidence."""
    h, w = mask.shape
    filled = ndimage.binary_fill_holes(mask)
    hole = int(filled.sum() - mask.sum())
    if hole >= max(4, 0.05 * w * h):
        return "ring", confidence("ring", mask)
    if solidity(filled) < CROSS_SOLIDITY:  # the only concave class: four empty corners
        return "cross", confidence("cross", filled)
    scores = {c: confidence(c, filled) for c in _CONVEX}
    best = max(scores, key=scores.get)
    if best == "circle" and corner_fill(filled) < DIAMOND_CORNER:
        # A blurred diamond loses its thin tips and looks round inside its shrunken box, but its
        # box corners stay empty; a circle always reaches into them.
        best = "diamond"
    return best, scores[best]


def corner_fill(mask: np.ndarray) -> float:
    h, w = mask.shape
    a, b = max(1, round(0.22 * w)), max(1, round(0.22 * h))
    return float(np.mean([mask[:b, :a].mean(), mask[:b, -a:].mean(), mask[-b:, :a].mean(), mask[-b:, -a:].mean()]))


_CONVEX = ("circle", "square", "triangle", "diamond")
DIAMOND_CORNER = 0.025  # circles fill >= 0.03 of their box corners, diamonds ~0
CROSS_SOLIDITY = 0.94  # a cross is 0.69-0.92 solid even blurred; convex classes >= 0.96


@lru_cache(maxsize=4096)
def _template(cls: str, w: int, h: int) -> np.ndarray:
    m = coverage_mask(cls, float(w), float(h), ss=3) >= 0.5
    return m[:h, :w]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum()) / max(float(np.logical_or(a, b).sum()), 1.0)


def confidence(cls: str, mask: np.ndarray) -> float:
    """IoU of the silhouette with the class's ideal shape in the same box (best of a few variants
    that other drawing code may produce: the triangle's faint apex row, the cross's arm width)."""
    h, w = mask.shape
    variants = [_template(cls, w, h)]
    if cls == "triangle":
        variants.append(_template(cls, w, h + 1)[1:])
    if cls == "cross":
        variants += [_cross(w, h, d) for d in (-1, 1)]
    return max(_iou(v, mask) for v in variants)


@lru_cache(maxsize=4096)
def _cross(w: int, h: int, delta: int) -> np.ndarray:
    """A cross whose arm width differs from round(s/3) by delta pixels."""
    t = max(round(w / 3) + delta, 1)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    return (np.abs(xx - cx) <= t / 2) | (np.abs(yy - cy) <= t * h / w / 2)


def nearest_color(rgb: np.ndarray) -> str:
    return COLOR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _color_of(img: np.ndarray, dist: np.ndarray) -> tuple[str, float]:
    """Palette colour of a component's strongest pixels and that colour's contrast to the background."""
    strong = dist >= 0.7 * np.percentile(dist, 90)
    name = nearest_color(np.median(img[strong], axis=0))
    return name, float(np.abs(np.array(COLORS[name], dtype=np.float32) - _BG).max())


def detect(image: np.ndarray, min_confidence: float = MIN_CONFIDENCE) -> list[Detection]:
    """All objects in a world image, most confident first."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    dist = np.abs(img - _BG).max(axis=-1)
    labels, _ = ndimage.label(dist > SEED_THRESHOLD, structure=_EIGHT)
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), 1):
        if sl is None:
            continue
        comp = labels[sl] == k
        if comp.sum() < MIN_AREA:
            continue
        # Re-threshold at half of this colour's own contrast: the 50 % coverage contour, which is
        # what the templates use, and which cuts blur bridges between neighbouring objects.
        _, contrast = _color_of(img[sl][comp], dist[sl][comp])
        parts, _ = ndimage.label(comp & (dist[sl] >= 0.5 * contrast - 0.5), structure=_EIGHT)
        for j, psl in enumerate(ndimage.find_objects(parts), 1):
            if psl is None:
                continue
            mask = parts[psl] == j
            area = int(mask.sum())
            h, w = mask.shape
            if area < MIN_AREA or min(h, w) < MIN_SIDE:
                continue
            cls, conf = classify_silhouette(mask)
            if conf < min_confidence:
                continue
            y0, x0 = sl[0].start + psl[0].start, sl[1].start + psl[1].start
            sub = (slice(y0, y0 + h), slice(x0, x0 + w))
            color, _ = _color_of(img[sub][mask], dist[sub][mask])
            out.append(Detection(cls, color, (int(x0), int(y0), int(x0 + w), int(y0 + h)), conf, area))
    out.sort(key=lambda d: (-d.confidence, d.box[1], d.box[0]))
    return out
