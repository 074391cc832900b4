"""`reflectionflow train world-verifier`: the learned yes/no verifier, labelled by the exact evaluator.

Data, made on the fly: a prompt from the world's whole prompt space (by category weights), its
ground-truth scene from a seed in [2**40, 2**62) (never a benchmark or engine seed), and with
chance `p_flaw` one planted flaw (world.flaws: missing, extra, colour, class, relation); with a
generator folder, a share `generator_share` of every batch comes instead from a pool of that
generator's own samples (made once, OUT/pool.npz). Every label is the exact GenEval-Shapes
evaluator's verdict on the rendered pixels, so a planted flaw that happens not to matter (an extra
object of an unnamed class) is labelled yes, as the evaluator says.

Two options for the finite pool of generator samples (a harvest has tens of thousands, which the
model can memorise):
- `flip`: each pool sample is, by chance 1/2, mirrored left-right with "left" and "right" swapped
  in its prompt, labelled by the evaluator on the mirrored image and prompt (every shape is
  symmetric about its vertical axis, so the label almost always stays; it is judged, not assumed);
- `scene_weight`: the verifier's scene head (models/verifier.py) learns, for every 8x8 patch, the
  class and colour of the detected object covering it (`scene_maps`), with this weight beside the
  yes/no loss: dense targets from the same detections the labels come from.

Batch `s` is a function of (seed, s) and the pool, so a resumed run sees exactly the batches the
interrupted one would have. Trained by train/loop.py's loop, its run folder: train_config.json,
log.jsonl, checkpoint/ (exact resume), and OUT/verifier (the shippable weights, with every checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..models.verifier import SCENE_CLASSES, SIZES, WorldVerifier
from ..world import spec
from ..world.detect import detect, foreground
from ..world.evaluate import evaluate_detections, evaluate_image
from ..world.flaws import FLAW_KINDS, plant_flaw
from ..world.render import render, sample_scene
from .corrector_pool import check_harvests, load_harvests
from .loop import LoopHooks, StepBatches, TrainConfig, run_loop, start_run
from .world import DEFAULT_TAG_WEIGHTS, TRAIN_SEED_FLOOR, generate_images, load_prompt_file, spread

TRAIN_HINT = "reflectionflow train world-verifier --out RUN (weights in RUN/verifier)"


@dataclass
class WorldVerifierConfig(TrainConfig):
    out_dir: str = "runs/world-verifier"
    model_size: str = "small"
    batch_size: int = 256
    max_steps: int = 6_000
    lr: float = 3e-4
    warmup_steps: int = 300
    weight_decay: float = 0.05
    p_flaw: float = 0.6  # share of renderer scenes given one planted flaw
    tag_weights: dict = field(default_factory=lambda: dict(DEFAULT_TAG_WEIGHTS))  # categories of the data
    generator: str | None = None  # a generator folder: mix in its own judged samples
    generator_share: float = 0.5
    pool_size: int = 8192  # generator samples in the pool
    corrector: str | None = None  # a corrector folder: its corrections of the pool's samples join the pool
    harvest: tuple[str, ...] = ()  # harvest folders (genref harvest, one per round): the pool instead
    holdout: float = 0.1  # share of a harvest's searches (prompt x method) held out: calibration and scores
    val_size: int = 1024  # held-out renders (validation prompts, small seeds) scored at each log
    flip: bool = False  # mirror pool samples left-right (prompt's left/right swapped, label re-judged)
    scene_weight: float = 0.0  # weight of the per-patch class/colour loss (0: no scene head)
    ckpt_every: int = 500
    log_every: int = 100

    def validate(self) -> WorldVerifierConfig:
        super().validate()
        check_judge_data(self, SIZES)
        if not 0.0 <= self.scene_weight <= 10.0:
            raise ValueError(f"scene_weight must be in [0, 10], got {self.scene_weight}")
        return self


def check_judge_data(cfg, sizes) -> None:
    """The checks the world judges' configs share: model size, data mix, the generator pool."""
    if cfg.model_size not in sizes:
        raise ValueError(f"model_size {cfg.model_size!r}; accepted: {', '.join(sizes)}")
    for name in ("p_flaw", "generator_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    check_pool_models(cfg.generator, cfg.corrector)
    cfg.harvest = tuple(str(h) for h in cfg.harvest)
    if cfg.harvest and cfg.generator:
        raise ValueError("--harvest and --generator both name the pool; give one")
    check_harvests(cfg.harvest)
    if not 0.0 <= cfg.holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {cfg.holdout}")
    bad = sorted(set(cfg.tag_weights) - set(spec.TAGS))
    if bad or any(w < 0 for w in cfg.tag_weights.values()) or sum(cfg.tag_weights.values()) <= 0:
        raise ValueError(f"tag_weights: categories of {', '.join(spec.TAGS)} with weights >= 0 and a "
                         f"positive sum, got {cfg.tag_weights}")
    if cfg.pool_size < 1 or cfg.val_size < 0:
        raise ValueError("pool_size must be >= 1 and val_size >= 0")


def check_pool_models(generator: str | None, corrector: str | None) -> None:
    if generator is not None and not (Path(generator) / "model.safetensors").is_file():
        raise ValueError(f"--generator {generator}: no generator weights (model.safetensors missing)")
    if corrector is not None:
        if generator is None:
            raise ValueError("--corrector needs --generator (it corrects the generator's samples)")
        if not (Path(corrector) / "lora.safetensors").is_file():
            raise ValueError(f"--corrector {corrector}: no corrector weights (lora.safetensors missing)")


def flawed_render(meta: dict, seed: int, p_flaw: float) -> np.ndarray:
    """A scene for the prompt with, by chance p_flaw, one planted flaw; (64, 64, 3) uint8."""
    rng = random.Random(seed)
    scene = sample_scene(meta, rng)
    if rng.random() < p_flaw:
        kinds = list(FLAW_KINDS)
        rng.shuffle(kinds)
        for kind in kinds:  # the first kind that applies to this scene
            flawed = plant_flaw(meta, scene, kind, rng)
            if flawed is not None:
                scene = flawed
                break
    return render(scene)


def labelled_renders(metas: list[dict], seeds: list[int], p_flaw: float,
                     maps: bool = False) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders and the evaluator's labels; with `maps`, their scene maps too (scene_maps)."""
    images = np.stack([flawed_render(m, s, p_flaw) for m, s in zip(metas, seeds)])  # (B, 64, 64, 3)
    dets = [detect(img) for img in images]
    labels = np.array([evaluate_detections(d, m).correct for d, m in zip(dets, metas)], dtype=np.float32)
    if not maps:
        return images, labels
    return images, labels, np.stack([scene_maps(img, d) for img, d in zip(images, dets)])


PATCH = 8  # the verifier's patch side in pixels (VerifierConfig.patch of every size)
MIN_PATCH_PIXELS = 6  # an object names a patch when it covers at least this many of its 64 pixels


def scene_maps(image: np.ndarray, dets) -> np.ndarray:
    """(2, 8, 8) int64 for a 64x64 image: per 8x8 patch, 0 or 1 + the index in spec.CLASSES of the
    detected object covering most of its foreground pixels (row 0), and 0 or 1 + its colour's index
    in spec.COLOR_NAMES (row 1); 0 where no detection covers MIN_PATCH_PIXELS of the patch."""
    size = image.shape[0]
    fg = foreground(image)
    owner = np.full((size, size), -1, dtype=np.int64)
    for k in range(len(dets) - 1, -1, -1):  # the most confident detection wins overlapping boxes
        x1, y1, x2, y2 = dets[k].box
        region = owner[y1:y2, x1:x2]
        region[fg[y1:y2, x1:x2]] = k
    g = size // PATCH
    cells = owner.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g, g, PATCH * PATCH)
    out = np.zeros((2, g, g), dtype=np.int64)
    best = np.zeros((g, g), dtype=np.int64)
    for k, d in enumerate(dets):
        counts = (cells == k).sum(-1)  # (g, g): the patch's pixels this detection owns
        take = (counts >= MIN_PATCH_PIXELS) & (counts > best)
        out[0][take] = 1 + spec.CLASSES.index(d.cls)
        out[1][take] = 1 + spec.COLOR_NAMES.index(d.color)
        best = np.maximum(best, counts)
    return out


def flip_prompt(prompt: str) -> str:
    """The prompt of the mirrored image: "left" and "right" swapped."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(w, w) for w in prompt.split(" "))


def _pool_extras_chunk(job) -> tuple[np.ndarray, np.ndarray]:
    images, prompts = job
    maps, flipped = [], []
    for img, prompt in zip(images, prompts):
        maps.append(scene_maps(img, detect(img)))
        try:
            meta = spec.parse_prompt(flip_prompt(prompt))
            flipped.append(float(evaluate_image(np.ascontiguousarray(img[:, ::-1]), meta).correct))
        except spec.PromptError:  # not a prompt of the world's grammar: never mirrored
            flipped.append(np.nan)
    return np.stack(maps) if maps else np.zeros((0, 2, 8, 8), np.int64), np.array(flipped, dtype=np.float32)


def pool_extras(pool: dict, workers: int = 1, chunk: int = 512) -> None:
    """Adds to a pool, in place: `maps` (scene_maps of every image) and `flip_labels` (the
    evaluator's verdict on each image mirrored, against its mirrored prompt; NaN: never mirrored)."""
    images, prompts = pool["images"], pool["prompts"]
    jobs = [(images[i : i + chunk], prompts[i : i + chunk]) for i in range(0, len(prompts), chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(jobs))) as procs:  # numpy only: safe after CUDA
            parts = procs.map(_pool_extras_chunk, jobs)
    else:
        parts = [_pool_extras_chunk(j) for j in jobs]
    pool["maps"] = np.concatenate([m for m, _ in parts]) if parts else np.zeros((0, 2, 8, 8), np.int64)
    pool["flip_labels"] = np.concatenate([f for _, f in parts]) if parts else np.zeros(0, np.float32)


class VerifierData(StepBatches):
    """Batch `step` -> (images uint8 (B, H, W, 3), prompts, labels (B,) in {0, 1}, scene maps
    (B, 2, 8, 8) or None without cfg.scene_weight); iterated from
    `start_step`, worker w of n making steps start+w, start+w+n, ... (rendering and judging on the
    CPU is the cost, so DataLoader workers make the batches)."""

    def __init__(self, cfg: WorldVerifierConfig, pool: dict | None, start_step: int = 0):
        self.cfg, self.pool, self.start_step = cfg, pool, start_step
        w = np.array([cfg.tag_weights.get(t, 0.0) for t in spec.TAGS], dtype=np.float64)
        self.p = w / w.sum()
        self.pools = [spec._all_combinations(t) for t in spec.TAGS]

    def batch_at(self, step: int):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        n_gen = int(round(cfg.batch_size * cfg.generator_share)) if self.pool is not None else 0
        tags = rng.choice(len(spec.TAGS), size=cfg.batch_size - n_gen, p=self.p)
        metas = [self.pools[t][rng.integers(len(self.pools[t]))] for t in tags]
        seeds = rng.integers(TRAIN_SEED_FLOOR, 2**62, size=len(metas)).tolist()
        scene = cfg.scene_weight > 0
        images, labels, *maps = labelled_renders(metas, seeds, cfg.p_flaw, maps=scene)
        prompts = [m["prompt"] for m in metas]
        if n_gen:
            pool = self.pool
            idx = rng.integers(len(pool["labels"]), size=n_gen)
            gen_images, gen_labels = pool["images"][idx], pool["labels"][idx]
            gen_prompts = [pool["prompts"][i] for i in idx]
            gen_maps = pool["maps"][idx] if scene else None
            if cfg.flip:
                coin = rng.random(n_gen) < 0.5
                coin &= ~np.isnan(pool["flip_labels"][idx])
                gen_images = np.where(coin[:, None, None, None], gen_images[:, :, ::-1], gen_images)
                gen_labels = np.where(coin, pool["flip_labels"][idx], gen_labels).astype(np.float32)
                gen_prompts = [flip_prompt(p) if c else p for p, c in zip(gen_prompts, coin)]
                if scene:
                    gen_maps = np.where(coin[:, None, None, None], gen_maps[:, :, :, ::-1], gen_maps)
            images = np.concatenate([images, gen_images])
            labels = np.concatenate([labels, gen_labels])
            prompts += gen_prompts
            if scene:
                maps = [np.concatenate([maps[0], gen_maps])]
        return (torch.from_numpy(np.ascontiguousarray(images)), prompts, torch.from_numpy(labels),
                torch.from_numpy(maps[0]) if scene else None)


def build_pool(cfg, dev: torch.device) -> dict:
    """The generator's samples on prompts drawn from the whole prompt space, judged once, and with a
    corrector its corrections of them (every failure with the oracle's reflection, as many passed
    samples with "keep"), judged too; OUT/pool.npz. Keys: images, labels, prompts, reflections (the
    oracle reflector's commands for each image: the reflector's targets)."""
    from ..backends.world.mmdit import MMDiTCorrector, load_generator
    from ..components import CorrectionRequest
    from .corrector_pool import KEEP, label_images

    path = Path(cfg.out_dir) / "pool.npz"
    if path.is_file():
        z = np.load(path)
        return {"images": z["images"], "labels": z["labels"], "prompts": [str(p) for p in z["prompts"]],
                "reflections": [str(r) for r in z["reflections"]]}
    rng = np.random.default_rng([cfg.seed, 2**31])
    every = [m for t in spec.TAGS for m in spec._all_combinations(t)]
    metas = [every[i] for i in rng.integers(len(every), size=cfg.pool_size)]
    seeds = rng.integers(TRAIN_SEED_FLOOR, 2**62, size=cfg.pool_size).tolist()
    model = load_generator(cfg.generator, device=dev)
    images, _ = generate_images(model, [m["prompt"] for m in metas], seeds)
    del model
    workers = max(1, cfg.num_workers)
    labs = label_images(images, metas, seeds, workers, with_target=False)
    fails = [i for i, lab in enumerate(labs) if not lab.correct]
    if cfg.corrector and fails:
        passes = [i for i, lab in enumerate(labs) if lab.correct][: len(fails)]
        todo = fails + passes
        corrector = MMDiTCorrector(weights=cfg.corrector, device=str(dev))  # on the generator it was trained on
        reqs = [CorrectionRequest(image=images[i], prompt=metas[i]["prompt"],
                                  reflection=KEEP if labs[i].correct else labs[i].reflection,
                                  seed=int(seeds[i]) + 1) for i in todo]
        fixed = np.stack([r.image for r in corrector.correct(reqs)])
        fmetas = [metas[i] for i in todo]
        images = np.concatenate([images, fixed])
        labs += label_images(fixed, fmetas, [int(seeds[i]) + 1 for i in todo], workers, with_target=False)
        metas += fmetas
    labels = np.array([lab.correct for lab in labs], dtype=np.float32)
    prompts = np.array([m["prompt"] for m in metas])
    reflections = np.array([lab.reflection for lab in labs])
    tmp = path.with_name(".pool.tmp.npz")  # written whole, then renamed: a crash never leaves half a pool
    np.savez_compressed(tmp, images=images, labels=labels, prompts=prompts, reflections=reflections)
    tmp.replace(path)
    return {"images": images, "labels": labels, "prompts": list(map(str, prompts)),
            "reflections": list(map(str, reflections))}


def held_out(group: str, share: float) -> bool:
    """Whether a harvest row's search (prompt x method) is held out: a stable hash of its group."""
    h = int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8).digest(), "big")
    return (h % 10_000) < share * 10_000


def harvest_pool(harvest: Sequence[str], holdout: float) -> tuple[dict, dict | None]:
    """The harvests' candidates as the pool (images, labels, prompts, reflections, kinds, rounds),
    and the held-out share `holdout` of their searches (None when it holds nothing)."""
    pool = load_harvests(harvest)
    rows = pool.samples
    out = held = None
    flags = np.array([held_out(f"{r['round']}/{r['group']}", holdout) for r in rows], dtype=bool)
    for part, mask in (("train", ~flags), ("held", flags)):
        idx = np.nonzero(mask)[0]
        d = {"images": np.asarray(pool.images[idx]) if len(idx) else np.zeros((0, 64, 64, 3), np.uint8),
             "labels": np.array([rows[i]["correct"] for i in idx], dtype=np.float32),
             "prompts": [rows[i]["prompt"] for i in idx], "reflections": [rows[i]["reflection"] for i in idx],
             "kinds": [rows[i].get("kind", "noise") for i in idx], "rounds": [rows[i].get("round", 1) for i in idx]}
        if part == "train":
            out = d
        elif len(idx):
            held = d
    if not len(out["labels"]):
        raise ValueError(f"--harvest {', '.join(harvest)}: every candidate is held out; lower --holdout")
    return out, held


def calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean P(yes) - share correct| per equal-width bin, weighted by size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.mean() * abs(float(p[m].mean()) - float(y[m].mean()))
    return float(err)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None without both classes."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return None
    _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # tied scores share the mean of their ranks (1-based)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the log loss of sigmoid(logit / T) (a 1-D search: cheap and exact
    enough for one number)."""
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)

    def nll(t: float) -> float:
        s = z / t
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    best = min(grid, key=nll)
    lo, hi = best / 1.03, best * 1.03
    for _ in range(40):  # golden-section refinement around the best grid point
        a, b = hi - (hi - lo) * 0.618, lo + (hi - lo) * 0.618
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return float((lo + hi) / 2)


@torch.no_grad()
def logits_of(model: WorldVerifier, images: np.ndarray, prompts: list[str], batch: int = 512) -> np.ndarray:
    model.eval()
    dev = next(model.parameters()).device
    out = [model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(dev),
                 model.tokenizer(prompts[i : i + batch]).to(dev)).float().cpu()
           for i in range(0, len(prompts), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def scores_by_kind(p: np.ndarray, y: np.ndarray, kinds: Sequence[str]) -> dict:
    """A verifier's P(yes) `p` against the evaluator's labels `y`: accuracy, ROC AUC and calibration
    error overall, and yes share, AUC and calibration error per candidate kind (noise, refined, ...)."""
    y = np.asarray(y, dtype=np.float64)
    kinds = np.asarray(kinds)
    out = {"n": int(len(y)), "accuracy": float(((p > 0.5) == (y > 0.5)).mean()), "auc": roc_auc(p, y > 0.5),
           "ece": calibration_error(p, y), "kinds": {}}
    for k in sorted(set(kinds.tolist())):
        m = kinds == k
        out["kinds"][k] = {"n": int(m.sum()), "yes_share": float(y[m].mean()), "auc": roc_auc(p[m], y[m] > 0.5),
                           "ece": calibration_error(p[m], y[m])}
    return out


def held_out_scores(model: WorldVerifier, held: dict, temperature: float = 1.0) -> dict:
    """scores_by_kind on the held-out harvest, P(yes) at `temperature`."""
    z = logits_of(model, held["images"], held["prompts"])
    return scores_by_kind(1.0 / (1.0 + np.exp(-z / temperature)), held["labels"], held["kinds"])


def validation_set(cfg: WorldVerifierConfig) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Held-out renders: validation prompts of the trained categories and small seeds (training
    seeds are >= 2**40)."""
    metas = [m for m in load_prompt_file("geneval_shapes_val.jsonl") if cfg.tag_weights.get(m["tag"], 0) > 0]
    metas = spread(metas, cfg.val_size)
    metas = (metas * (cfg.val_size // max(len(metas), 1) + 1))[: cfg.val_size]
    images, labels = labelled_renders(metas, list(range(len(metas))), cfg.p_flaw)
    return torch.from_numpy(images), [m["prompt"] for m in metas], torch.from_numpy(labels)


@torch.no_grad()
def accuracy(model: WorldVerifier, images, prompts, labels, batch: int = 512) -> float:
    model.eval()
    p = torch.cat([model.p_yes(images[i : i + batch], prompts[i : i + batch]) for i in range(0, len(prompts), batch)])
    return float(((p > 0.5).float() == labels).float().mean())


@dataclass
class VerifierTrainResult:
    step: int
    minutes: float
    last_loss: float
    val_accuracy: float | None
    ema: WorldVerifier
    held: dict | None = None  # held-out harvest scores before / after calibration, and the temperature


def train_world_verifier(cfg: WorldVerifierConfig) -> VerifierTrainResult:
    scene = cfg.scene_weight > 0
    run = start_run(cfg, lambda: WorldVerifier(SIZES[cfg.model_size](scene_head=scene)))
    model, dev = run.model, run.device
    held = None
    if cfg.harvest:
        pool, held = harvest_pool(cfg.harvest, cfg.holdout)
    else:
        pool = build_pool(cfg, dev) if cfg.generator else None
    if pool is not None and (cfg.flip or scene):
        pool_extras(pool, workers=max(1, cfg.num_workers))
    data = VerifierData(cfg, pool, start_step=run.step)
    batches = iter(DataLoader(data, batch_size=None, num_workers=cfg.num_workers,
                              prefetch_factor=4 if cfg.num_workers else None))
    step_fn = model.forward_with_scene if scene else model
    fwd = torch.compile(step_fn) if cfg.compile else step_fn
    val = validation_set(cfg) if cfg.val_size else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")

    def batch_loss(batch, step: int):
        images, prompts, labels, maps = batch
        labels = labels.to(dev)
        with autocast:
            out = fwd(images.to(dev), model.tokenizer(prompts).to(dev))  # (B,) [, (B, patches, C)]
        logits = out[0] if scene else out
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        right = ((logits.detach() > 0).float() == labels).float().mean()
        extra = {"train_accuracy": right, "yes_share": labels.mean()}
        if scene:
            per_patch = out[1].float()  # (B, N, classes + colours)
            target = maps.to(dev).flatten(2)  # (B, 2, N)
            cls_loss = F.cross_entropy(per_patch[..., :SCENE_CLASSES].transpose(1, 2), target[:, 0])
            col_loss = F.cross_entropy(per_patch[..., SCENE_CLASSES:].transpose(1, 2), target[:, 1])
            loss = loss + cfg.scene_weight * (cls_loss + col_loss) / 2
            extra["scene_loss"] = (cls_loss + col_loss).detach() / 2
        return loss, extra

    def validate(step: int, m) -> dict:
        row = {"val_accuracy": accuracy(m, *val)} if val is not None else {}
        if held is not None:
            s = held_out_scores(m, held)
            row.update(held_accuracy=s["accuracy"], held_auc=s["auc"] or 0.0, held_ece=s["ece"])
        return row

    hooks = LoopHooks(validate=validate if (val is not None or held is not None) else None)
    res = run_loop(cfg, run, batches, batch_loss, export="verifier", hooks=hooks, desc="train verifier")
    scores = None
    if held is not None:
        # Calibration: one temperature on the held-out searches, so that P(yes) means what it says
        # (early-stop thresholds); ranking, and so best-of-N, is unchanged by it.
        ema = run.ema.model
        t = fit_temperature(logits_of(ema, held["images"], held["prompts"]), held["labels"])
        scores = {"before": held_out_scores(ema, held), "temperature": round(t, 4),
                  "after": held_out_scores(ema, held, t)}
        ema.config.temperature = round(t, 4)
        ema.save_pretrained(run.out / "verifier")
        (run.out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    return VerifierTrainResult(step=res.step, minutes=res.minutes, last_loss=res.last_loss,
                               val_accuracy=res.val.get("val_accuracy"), ema=run.ema.model, held=scores)
