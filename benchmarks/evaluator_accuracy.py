"""How often the world evaluator agrees with the truth.

Two image sources, each over the GenEval-Shapes prompts, clean and with exactly one planted flaw
(missing, extra, colour, class, relation):
  - project: this project's renderer;
  - foreign: an independent drawing of the same spec with PIL (other anti-aliasing: none or 4x box
    downsampling; sizes anywhere in [12, 18], sub-pixel placement), plus Gaussian pixel noise of
    sigma 6 and, for half of the images, a mild Gaussian blur (radius 0.5 to 0.8 px).
Truth is GenEval's verdict on the scene's true objects; scenes whose verdict depends on detection
order (several objects of one class, see flaws.truth) are counted apart and left out.

    python benchmarks/evaluator_accuracy.py --n 6000
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reflectionflow.world.data import load_benchmark
from reflectionflow.world.evaluate import evaluate_image
from reflectionflow.world.flaws import FLAW_KINDS, plant_flaw, truth
from reflectionflow.world.render import render, sample_scene
from reflectionflow.world.spec import BACKGROUND, COLORS, IMAGE_SIZE, MIN_SIZE


def foreign_render(scene, rng: random.Random) -> np.ndarray:
    """The spec drawn by other code: PIL primitives, continuous sizes, other anti-aliasing."""
    k = rng.choice([1, 4])  # 1: aliased; 4: 4x supersampled then box-filtered
    im = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in scene:
        s = max(MIN_SIZE, o.size - rng.uniform(0.0, 0.9))
        cx, cy = o.x + o.size / 2, o.y + o.size / 2
        x0, y0, x1, y1 = ((cx - s / 2) * k, (cy - s / 2) * k, (cx + s / 2) * k, (cy + s / 2) * k)
        col = COLORS[o.color]
        if o.cls == "circle":
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=col)
        elif o.cls == "square":
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=col)
        elif o.cls == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=col)
        elif o.cls == "diamond":
            d.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=col)
        elif o.cls == "cross":
            t = round(s / 3) * k / 2
            d.rectangle([x0, cy * k - t, x1 - 1, cy * k + t - 1], fill=col)
            d.rectangle([cx * k - t, y0, cx * k + t - 1, y1 - 1], fill=col)
        elif o.cls == "ring":
            hr = round(s / 2) * k / 2
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=col)
            d.ellipse([cx * k - hr, cy * k - hr, cx * k + hr - 1, cy * k + hr - 1], fill=BACKGROUND)
    if k > 1:
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.8)))
    arr = np.asarray(im, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, 6.0, arr.shape)
    return np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8)


def run(n: int, seed: int = 0, show: int = 0) -> dict:
    prompts = load_benchmark("geneval-shapes")
    results: dict[str, Counter] = {"project": Counter(), "foreign": Counter()}
    kinds = ("clean",) + FLAW_KINDS
    shown = 0
    for i in range(n):
        meta = prompts[i % len(prompts)]
        rng = random.Random(seed * 1_000_003 + i)
        scene = sample_scene(meta, rng)
        kind = kinds[i % len(kinds)]
        if kind != "clean":
            flawed = plant_flaw(meta, scene, kind, rng)
            if flawed is None:
                continue
            scene = flawed
        expected, _ = truth(scene, meta)
        for source in results:
            c = results[source]
            if expected is None:
                c["ambiguous"] += 1
                continue
            img = render(scene) if source == "project" else foreign_render(scene, rng)
            ok = evaluate_image(img, meta).correct == expected
            c["agree" if ok else "disagree"] += 1
            c[f"{kind}:{'agree' if ok else 'disagree'}"] += 1
            if not ok and shown < show:
                shown += 1
                print(source, kind, meta["prompt"], "truth", expected, [o.to_dict() for o in scene])
    out = {}
    for source, c in results.items():
        total = c["agree"] + c["disagree"]
        per_kind = {k: c[f"{k}:agree"] / max(c[f"{k}:agree"] + c[f"{k}:disagree"], 1) for k in kinds}
        out[source] = {"agreement": c["agree"] / max(total, 1), "images": total,
                       "ambiguous": c["ambiguous"], "per_kind": per_kind}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6000, help="scenes (each drawn by both sources)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="print this many disagreements")
    args = ap.parse_args()
    t = time.perf_counter()
    out = run(args.n, args.seed, args.show)
    print(json.dumps(out, indent=2))
    print(f"{time.perf_counter() - t:.1f} s")
    for source, r in out.items():
        kinds = "  ".join(f"{k} {v:.4f}" for k, v in r["per_kind"].items())
        head = f"{source:8s} agreement {r['agreement']:.4f} on {r['images']} images ({r['ambiguous']} ambiguous)"
        print(f"{head}  {kinds}")


if __name__ == "__main__":
    main()
