"""`reflectionflow train world-reflector`: the learned reflector, trained on the oracle's reflections.

Data as the verifier's (train/verifier.py): a prompt by category weights, its ground-truth scene
from a training seed, with chance `p_flaw` one planted flaw; the target is what the oracle
reflector (the detector versus the prompt, backends/world/oracle.py) writes for the rendered image
("- Keep the image unchanged." for a correct one). With `--generator` (and `--corrector`), a share
of every batch comes from a pool of that generator's samples (and the corrector's corrections of
them), mostly failures, with the oracle's commands on them as targets: the images the reflector
meets in a search, not only renders. Teacher-forced cross-entropy, trained by train/loop.py's loop
(checkpoints, exact resume and the log as the other world trainers); OUT/reflector holds the
shippable weights.
Validation: the share of held-out renders whose decoded commands equal the oracle's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..backends.world.oracle import reflect_commands
from ..models.reflector import SIZES, WorldReflector
from ..world import spec
from ..world.commands import format_reflection, parse_reflection
from ..world.detect import detect
from .loop import LoopHooks, StepBatches, TrainConfig, run_loop, start_run
from .verifier import build_pool, check_judge_data, flawed_render, harvest_pool
from .world import DEFAULT_TAG_WEIGHTS, TRAIN_SEED_FLOOR, load_prompt_file, spread


@dataclass
class WorldReflectorConfig(TrainConfig):
    out_dir: str = "runs/world-reflector"
    model_size: str = "small"
    batch_size: int = 256
    max_steps: int = 8_000
    lr: float = 3e-4
    warmup_steps: int = 300
    weight_decay: float = 0.05
    p_flaw: float = 0.8  # most targets should be edits, not "keep"
    tag_weights: dict = field(default_factory=lambda: dict(DEFAULT_TAG_WEIGHTS))
    val_size: int = 512
    generator: str | None = None  # a generator folder: mix its own failures (oracle targets) into every batch
    generator_share: float = 0.5
    pool_size: int = 8192  # generator samples in the pool (OUT/pool.npz)
    corrector: str | None = None  # a corrector folder: its corrections of the pool's samples join the pool
    harvest: tuple[str, ...] = ()  # harvest folders (genref harvest, one per round): the pool instead
    holdout: float = 0.1  # share of a harvest's searches held out (the held-out exact match)
    ckpt_every: int = 500
    log_every: int = 100

    def validate(self) -> WorldReflectorConfig:
        super().validate()
        check_judge_data(self, SIZES)
        return self


def oracle_examples(metas: list[dict], seeds: list[int], p_flaw: float) -> tuple[np.ndarray, list[str]]:
    images = np.stack([flawed_render(m, s, p_flaw) for m, s in zip(metas, seeds)])  # (B, 64, 64, 3)
    return images, [format_reflection(reflect_commands(detect(img), m)) for img, m in zip(images, metas)]


class ReflectorData(StepBatches):
    """Batches from `start_step` on; worker w of n makes steps start+w, start+w+n, ... (rendering,
    detecting and the oracle's commands run on the CPU, so DataLoader workers make them)."""

    def __init__(self, cfg: WorldReflectorConfig, start_step: int, pool: dict | None = None):
        self.cfg, self.start_step, self.pool = cfg, start_step, pool
        self.pools = [spec._all_combinations(t) for t in spec.TAGS]

    def batch_at(self, step: int):
        return batch_at(self.cfg, step, self.pools, self.pool)


def batch_at(cfg: WorldReflectorConfig, step: int, pools, pool: dict | None = None):
    """Batch `step`: a function of (seed, step) and the pool alone, so a resumed run sees the same
    batches. With a pool, a share `generator_share` of the batch are its samples, four in five of
    them failures (their targets are edits; a correct sample's target is "keep")."""
    rng = np.random.default_rng([cfg.seed, step])
    n_gen = int(round(cfg.batch_size * cfg.generator_share)) if pool is not None else 0
    w = np.array([cfg.tag_weights.get(t, 0.0) for t in spec.TAGS], dtype=np.float64)
    tags = rng.choice(len(spec.TAGS), size=cfg.batch_size - n_gen, p=w / w.sum())
    metas = [pools[t][rng.integers(len(pools[t]))] for t in tags]
    seeds = rng.integers(TRAIN_SEED_FLOOR, 2**62, size=len(metas)).tolist()
    images, targets = oracle_examples(metas, seeds, cfg.p_flaw)
    prompts = [m["prompt"] for m in metas]
    if n_gen:
        fails, passes = pool["fails"], pool["passes"]
        idx = []
        for _ in range(n_gen):
            src = fails if len(fails) and (not len(passes) or rng.random() < 0.8) else passes
            idx.append(int(src[rng.integers(len(src))]))
        images = np.concatenate([images, pool["images"][idx]])
        prompts += [pool["prompts"][i] for i in idx]
        targets += [pool["reflections"][i] for i in idx]
    return torch.from_numpy(images), prompts, targets


@torch.no_grad()
def exact_match(model: WorldReflector, images: torch.Tensor, prompts: list[str], targets: list[str]) -> float:
    model.eval()
    got = model.reflect(images, prompts)
    return float(np.mean([parse_reflection(g)[0] == parse_reflection(t)[0] for g, t in zip(got, targets)]))


@dataclass
class ReflectorTrainResult:
    step: int
    minutes: float
    last_loss: float
    val_exact: float | None
    ema: WorldReflector


def train_world_reflector(cfg: WorldReflectorConfig) -> ReflectorTrainResult:
    run = start_run(cfg, lambda: WorldReflector(SIZES[cfg.model_size]()))
    model, dev = run.model, run.device
    pool = held = None
    if cfg.harvest:
        pool, held = harvest_pool(cfg.harvest, cfg.holdout)
    elif cfg.generator:
        pool = build_pool(cfg, dev)
    if pool is not None:
        pool["fails"] = np.nonzero(pool["labels"] < 0.5)[0]
        pool["passes"] = np.nonzero(pool["labels"] >= 0.5)[0]
    batches = iter(DataLoader(ReflectorData(cfg, run.step, pool), batch_size=None, num_workers=cfg.num_workers,
                              prefetch_factor=4 if cfg.num_workers else None))
    validate = val = held_fails = None
    if cfg.val_size:
        metas = [m for m in load_prompt_file("geneval_shapes_val.jsonl") if cfg.tag_weights.get(m["tag"], 0) > 0]
        metas = spread(metas, cfg.val_size)
        images, targets = oracle_examples(metas, list(range(len(metas))), cfg.p_flaw)  # small seeds: held out
        val = (torch.from_numpy(images), [m["prompt"] for m in metas], targets)
    if held is not None:  # the held-out searches' failures (at most 1,024, spread over them)
        idx = [int(i) for i in spread(list(np.nonzero(held["labels"] < 0.5)[0]), 1024)]
        if idx:
            held_fails = (torch.from_numpy(held["images"][idx]), [held["prompts"][i] for i in idx],
                          [held["reflections"][i] for i in idx])
    if val is not None or held_fails is not None:
        def validate(step: int, m) -> dict:
            row = {"val_exact_match": exact_match(m, *val)} if val is not None else {}
            if held_fails is not None:
                row["held_exact_match"] = exact_match(m, *held_fails)
            return row
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")

    def batch_loss(batch, step: int):
        images, prompts, targets = batch
        with autocast:
            loss = model.loss(images.to(dev), model.tokenizer(prompts).to(dev), model.out_tokenizer(targets).to(dev))
        return loss, {}

    res = run_loop(cfg, run, batches, batch_loss, export="reflector", hooks=LoopHooks(validate=validate),
                   desc="train reflector")
    return ReflectorTrainResult(step=res.step, minutes=res.minutes, last_loss=res.last_loss,
                                val_exact=res.val.get("val_exact_match"), ema=run.ema.model)
