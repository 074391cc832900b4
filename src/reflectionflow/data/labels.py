"""Labelling world images: the exact evaluator's verdict, the oracle's reflection, the minimal edit.

What the data builders (`genref build`, `genref harvest`) and the corrector's pool share. For each
image and its prompt:
- the evaluator's verdict and graded score (world.evaluate), and its reasons;
- the oracle reflection: edit commands from the detections versus the prompt
  (backends.world.oracle.reflect_commands);
- for a failed image, the minimal edit that fixes it: the commands applied to the detected scene
  (backends.world.simulated.apply_command), then only what changed is repainted on the image itself
  (removed objects erased to the background, new or changed ones drawn), so the pair differs only
  where the reflection says; kept only when the evaluator passes the result.

A labelled pool on disk (train/corrector_pool.py's folder, and a harvest's OUT/pool) has the format
POOL_FORMAT.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..world import spec
from ..world.detect import Detection, detect
from ..world.evaluate import evaluate_detections, evaluate_image
from ..world.render import coverage_mask

KEEP = "- Keep the image unchanged."
POOL_FORMAT = "reflectionflow-corrector-pool/1"
_BG = np.array(spec.BACKGROUND, dtype=np.float32)


@dataclass
class Label:
    correct: bool
    score: float  # fraction of GenEval clauses satisfied
    reflection: str  # the oracle's commands ("- Keep the image unchanged." when correct)
    target: np.ndarray | None = None  # (64, 64, 3) uint8 minimal edit of a failed sample
    reason: str = ""  # the evaluator's reasons, one per line (empty when correct)
    objects: list[str] = field(default_factory=list)  # what the detector saw: "green ring", ...


@lru_cache(maxsize=512)
def _mask(cls: str, size: int) -> np.ndarray:
    return coverage_mask(cls, float(size))[:, :, None].astype(np.float32)  # (s, s, 1)


def edit_image(image: np.ndarray, dets: Sequence[Detection], commands, rng: random.Random) -> np.ndarray | None:
    """The sample with the commands applied where they act, or None when they change nothing."""
    from ..backends.world.simulated import apply_command, scene_from_detections

    source = scene_from_detections(dets)
    scene = source
    for c in commands:
        scene = apply_command(scene, c, rng)
    before, after = set(source), set(scene)
    removed = [i for i, o in enumerate(source) if o not in after]
    added = [o for o in scene if o not in before]
    if not removed and not added:
        return None
    canvas = image.astype(np.float32)  # (64, 64, 3), a copy
    size = canvas.shape[0]
    for i in removed:
        # The detection's box (not the size-clamped Obj) is where the pixels are; 1 px of margin
        # takes the soft edge too (objects are at least 2 px apart).
        x1, y1, x2, y2 = dets[i].box
        canvas[max(y1 - 1, 0) : min(y2 + 1, size), max(x1 - 1, 0) : min(x2 + 1, size)] = _BG
    for o in added:
        region = canvas[o.y : o.y + o.size, o.x : o.x + o.size]
        region += _mask(o.cls, o.size) * (np.array(spec.COLORS[o.color], dtype=np.float32) - region)
    return np.rint(canvas).clip(0, 255).astype(np.uint8)


def label_one(image: np.ndarray, meta: dict, seed: int, with_target: bool = True) -> Label:
    from ..backends.world.oracle import reflect_commands
    from ..world.commands import format_reflection

    dets = detect(image)
    verdict = evaluate_detections(dets, meta)
    commands = reflect_commands(dets, meta)
    label = Label(verdict.correct, float(verdict.score), format_reflection(commands), reason=verdict.reason,
                  objects=[f"{d.color} {d.cls}" for d in dets])
    if with_target and not verdict.correct:
        target = edit_image(image, dets, commands, random.Random(int(seed)))
        if target is not None and evaluate_image(target, meta).correct:
            label.target = target
    return label


def _label_chunk(args) -> list[Label]:
    images, metas, seeds, with_target = args
    return [label_one(im, m, s, with_target) for im, m, s in zip(images, metas, seeds)]


def label_images(images: np.ndarray, metas: Sequence[dict], seeds: Sequence[int], workers: int = 1,
                 with_target: bool = True, chunk: int = 256) -> list[Label]:
    """Label every image, in order; `workers` > 1 spreads chunks over forked processes (they touch
    numpy only, so forking after CUDA started is safe; spawn would re-run `python -m`'s main)."""
    jobs = [(images[i : i + chunk], metas[i : i + chunk], seeds[i : i + chunk], with_target)
            for i in range(0, len(images), chunk)]
    if workers <= 1 or len(jobs) <= 1:
        return [lab for job in jobs for lab in _label_chunk(job)]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        return [lab for part in pool.map(_label_chunk, jobs) for lab in part]


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1) - 1)
