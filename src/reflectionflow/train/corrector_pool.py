"""The generator's own samples, judged and repaired: the corrector's rule, keep, reward and length data.

The corrector must fix what the trained generator actually draws (soft edges, odd sizes, two
rings where a ring and a cross were asked for), not only crisp renders. So a pool of generator
samples is drawn once, on the GPU, and each is labelled on the CPU (a process pool; data/labels.py):

- the evaluator's verdict and graded score (world.evaluate),
- the oracle reflection: edit commands from the detections versus the prompt
  (backends.world.oracle.reflect_commands),
- for a failed sample, the minimal edit that fixes it: the commands applied to the detected scene
  (backends.world.simulated.apply_command), then only what changed is repainted on the sample
  itself (removed objects erased to the background, new or changed ones drawn), so the pair
  differs only where the reflection says; kept only when the evaluator passes the result.

Pool folder (written by `build_pool`, `pool.json` last, so its presence means complete):
    images.npy   (N, 64, 64, 3) uint8  generator samples
    targets.npy  (T, 64, 64, 3) uint8  minimal edits of the failed samples that could be fixed
    val_images.npy                     validation samples (validation prompts, small seeds)
    pool.json    settings, and per sample: prompt, tag, seed, correct, score, reflection, target
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.labels import KEEP, POOL_FORMAT, Label, default_workers, edit_image, label_images, label_one  # noqa: F401
from ..world import spec
from ..world.data import POOL_TAG_WEIGHTS  # noqa: F401  (the pool's name for it)
from ..world.detect import Detection
from ..world.render import Obj


def generator_samples(generator, metas_all: Sequence[dict], samples: int):
    """The world benchmarks' protocol: `samples` images per prompt from a Generator component, seed =
    prompt index x samples + k (never a training seed). Returns (metas, seeds, images, seconds)."""
    import time

    from ..components import GenerationRequest

    metas = [m for m in metas_all for _ in range(samples)]
    seeds = list(range(len(metas)))
    t = time.perf_counter()
    out = generator.generate([GenerationRequest(prompt=m["prompt"], seed=s) for m, s in zip(metas, seeds)])
    return metas, seeds, np.stack([r.image for r in out]), time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# The pool


@dataclass
class PoolSettings:
    generator_sha256: str
    size: int = 49_152  # generator samples
    per_prompt: int = 4  # samples per prompt draw (reward pairs compare samples of one draw)
    tag_weights: dict | None = None  # categories to draw prompts from; None: the generator's weights
    steps: int = 20
    cfg_scale: float = 3.0
    seed: int = 0
    val_prompts: int = 553  # of geneval_shapes_val.jsonl, spread over the categories
    val_samples: int = 2  # samples per validation prompt (seed = its position in the list)


def draw_pool_prompts(s: PoolSettings) -> tuple[list[dict], list[int]]:
    """(metadata, seed) per sample: prompt draws from the whole prompt space by category weight,
    `per_prompt` consecutive samples per draw, seeds above the train floor (never a benchmark's)."""
    from .world import DEFAULT_TAG_WEIGHTS, TRAIN_SEED_FLOOR

    weights = s.tag_weights or DEFAULT_TAG_WEIGHTS
    p = np.array([weights.get(t, 0.0) for t in spec.TAGS], dtype=np.float64)
    rng = np.random.default_rng([s.seed, 17])
    pools = [spec._all_combinations(t) for t in spec.TAGS]
    draws = -(-s.size // s.per_prompt)
    tags = rng.choice(len(spec.TAGS), size=draws, p=p / p.sum())
    metas = [pools[t][rng.integers(len(pools[t]))] for t in tags]
    seeds = rng.integers(TRAIN_SEED_FLOOR, 2**62, size=draws * s.per_prompt).tolist()
    return [m for m in metas for _ in range(s.per_prompt)][: s.size], seeds[: s.size]


def _generate(model, metas: Sequence[dict], seeds: Sequence[int], s: PoolSettings, batch: int,
              what: str, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    from .world import generate_images

    out = []
    step = batch * 8
    for i in tqdm(range(0, len(metas), step), desc=what, unit="chunk", disable=not progress):
        images, _ = generate_images(model, [m["prompt"] for m in metas[i : i + step]], seeds[i : i + step],
                                    s.steps, s.cfg_scale, batch)
        out.append(images)
    return np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)


def build_pool(model, s: PoolSettings, folder: str | Path, workers: int = 1, batch: int = 512,
               progress: bool = True) -> Path:
    """Draw, label and save the pool (and the validation samples) into `folder`; reuse a complete
    pool with the same settings, refuse one with other settings."""
    import time

    from .world import load_prompt_file, spread

    folder = Path(folder)
    if (folder / "pool.json").is_file():
        saved = json.loads((folder / "pool.json").read_text())["settings"]
        if saved != asdict(s):
            differ = sorted(k for k in saved if saved[k] != asdict(s).get(k))
            raise ValueError(f"{folder} holds a pool built with other settings ({', '.join(differ)}); "
                             "remove it or name another pool folder")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metas, seeds = draw_pool_prompts(s)
    images = _generate(model, metas, seeds, s, batch, "pool: generate", progress)
    val_metas = [m for m in spread(load_prompt_file("geneval_shapes_val.jsonl"), s.val_prompts)
                 for _ in range(s.val_samples)]
    val_seeds = list(range(len(val_metas)))  # small seeds: the pool's are >= 2**40, so never one of these
    val_images = _generate(model, val_metas, val_seeds, s, batch, "pool: validation", progress)
    t1 = time.perf_counter()
    labels = label_images(images, metas, seeds, workers)
    val_labels = label_images(val_images, val_metas, val_seeds, workers, with_target=False)
    t2 = time.perf_counter()
    targets, rows = [], []
    for m, seed, lab in zip(metas, seeds, labels):
        rows.append({"prompt": m["prompt"], "tag": m["tag"], "seed": int(seed), "correct": lab.correct,
                     "score": round(lab.score, 4), "reflection": lab.reflection,
                     "target": len(targets) if lab.target is not None else -1})
        if lab.target is not None:
            targets.append(lab.target)
    val_rows = [{"prompt": m["prompt"], "tag": m["tag"], "seed": int(seed), "correct": lab.correct,
                 "reflection": lab.reflection} for m, seed, lab in zip(val_metas, val_seeds, val_labels)]
    np.save(folder / "images.npy", images)
    np.save(folder / "targets.npy", np.stack(targets) if targets else np.zeros((0, 64, 64, 3), np.uint8))
    np.save(folder / "val_images.npy", val_images)
    failed = sum(not r["correct"] for r in rows)
    summary = {"samples": len(rows), "failed": failed, "fixable": len(targets),
               "passed": len(rows) - failed, "val_samples": len(val_rows),
               "val_failed": sum(not r["correct"] for r in val_rows),
               "generate_seconds": round(t1 - t0, 1), "label_seconds": round(t2 - t1, 1)}
    doc = {"format": POOL_FORMAT, "settings": asdict(s), "summary": summary, "samples": rows, "val": val_rows}
    (folder / "pool.json.tmp").write_text(json.dumps(doc))
    (folder / "pool.json.tmp").replace(folder / "pool.json")
    return folder


@dataclass
class Pool:
    """A built pool, images memory-mapped (DataLoader workers share the pages)."""

    folder: Path
    settings: dict
    summary: dict
    samples: list[dict]
    val: list[dict]
    images: np.ndarray
    targets: np.ndarray
    val_images: np.ndarray

    @classmethod
    def load(cls, folder: str | Path) -> Pool:
        folder = Path(folder)
        if not (folder / "pool.json").is_file():
            raise FileNotFoundError(f"{folder}/pool.json: no complete corrector pool there")
        doc = json.loads((folder / "pool.json").read_text())
        if doc.get("format") != POOL_FORMAT:
            raise ValueError(f"{folder}/pool.json: format {doc.get('format')!r}, expected {POOL_FORMAT!r}")
        load = lambda name: np.load(folder / name, mmap_mode="r")  # noqa: E731
        return cls(folder, doc["settings"], doc["summary"], doc["samples"], doc["val"], load("images.npy"),
                   load("targets.npy"), load("val_images.npy"))


def scene_detections(scene: Sequence[Obj]) -> list[Detection]:
    """What the detector reports on a clean render of `scene` (it agrees with the truth on every
    rendered scene: docs/RESULTS.md), in its order, without spending 2 ms per image on detection."""
    dets = [Detection(o.cls, o.color, o.box, 1.0, o.size * o.size) for o in scene]
    return sorted(dets, key=lambda d: (d.box[1], d.box[0]))


def check_harvests(folders: Sequence[str | Path]) -> None:
    """Each folder holds a complete harvest (before any weights load)."""
    for f in folders:
        if not (Path(f) / "pool" / "pool.json").is_file():
            raise ValueError(f"--harvest {f}: no complete harvest there (pool/pool.json missing); make one with "
                             "`reflectionflow genref harvest --out DIR`")


def load_harvests(folders: Sequence[str | Path]) -> Pool:
    """The pools of one or more harvests (`reflectionflow genref harvest`, one per round) as one Pool:
    samples concatenated in the order given (target indices shifted), the first one's validation
    samples (every round samples the same validation prompts and seeds). Each row keeps its
    harvest's fields (kind, method, round, group: the search and prompt it came from)."""
    if not folders:
        raise ValueError("no harvest folder given")
    pools = []
    for f in folders:
        f = Path(f)
        if not (f / "pool" / "pool.json").is_file():
            raise FileNotFoundError(f"{f}: no complete harvest there (pool/pool.json missing); make one with "
                                    "`reflectionflow genref harvest --out DIR`")
        pools.append(Pool.load(f / "pool"))
    if len(pools) == 1:
        return pools[0]
    rows, images, targets, offset = [], [], [], 0
    for p in pools:
        for r in p.samples:
            rows.append({**r, "target": r["target"] + offset if r["target"] >= 0 else -1})
        offset += len(p.targets)
        images.append(np.asarray(p.images))
        targets.append(np.asarray(p.targets))
    summary = {"harvests": [str(p.folder) for p in pools], "samples": len(rows),
               "failed": sum(not r["correct"] for r in rows), "fixable": sum(r["target"] >= 0 for r in rows)}
    first = pools[0]
    return Pool(first.folder, {**first.settings, "harvests": summary["harvests"]}, summary, rows, first.val,
                np.concatenate(images), np.concatenate(targets), first.val_images)


def reward_groups(pool: Pool) -> list[list[int]]:
    """Rows that are samples of one prompt: a harvest's `group` (one search of one prompt), else
    blocks of `per_prompt` consecutive rows (a generator pool's prompt draws)."""
    rows = pool.samples
    if rows and "group" in rows[0]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r["group"], []).append(i)
        return list(groups.values())
    k = pool.settings["per_prompt"]
    return [list(range(g, min(g + k, len(rows)))) for g in range(0, len(rows), k)]
