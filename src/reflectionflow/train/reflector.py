"""`reflectionflow train world-reflector`: the learned reflector, trained on the oracle's reflections.

Data as the verifier's (train/verifier.py): a prompt by category weights, its ground-truth scene
from a training seed, with chance `p_flaw` one planted flaw; the target is what the oracle
reflector (the detector versus the prompt, backends/world/oracle.py) writes for the rendered image
("- Keep the image unchanged." for a correct one). Teacher-forced cross-entropy; checkpoints,
exact resume and the log as the other trainers; OUT/reflector holds the shippable weights.
Validation: the share of held-out renders whose decoded commands equal the oracle's exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..backends.world.oracle import reflect_commands
from ..models.reflector import SIZES, WorldReflector
from ..world import spec
from ..world.commands import format_reflection, parse_reflection
from ..world.detect import detect
from .loop import EMA, TrainConfig, _trim_log, load_checkpoint, lr_at, resolve_device, save_checkpoint
from .verifier import flawed_render
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
    ckpt_every: int = 500
    log_every: int = 100

    def validate(self) -> WorldReflectorConfig:
        super().validate()
        if self.model_size not in SIZES:
            raise ValueError(f"model_size {self.model_size!r}; accepted: {', '.join(SIZES)}")
        if not 0.0 <= self.p_flaw <= 1.0:
            raise ValueError(f"p_flaw must be in [0, 1], got {self.p_flaw}")
        bad = sorted(set(self.tag_weights) - set(spec.TAGS))
        if bad or any(w < 0 for w in self.tag_weights.values()) or sum(self.tag_weights.values()) <= 0:
            raise ValueError(f"tag_weights: categories of {', '.join(spec.TAGS)} with weights >= 0 and a "
                             f"positive sum, got {self.tag_weights}")
        return self


def oracle_examples(metas: list[dict], seeds: list[int], p_flaw: float) -> tuple[np.ndarray, list[str]]:
    images = np.stack([flawed_render(m, s, p_flaw) for m, s in zip(metas, seeds)])  # (B, 64, 64, 3)
    return images, [format_reflection(reflect_commands(detect(img), m)) for img, m in zip(images, metas)]


class ReflectorData(IterableDataset):
    """Batches from `start_step` on; worker w of n makes steps start+w, start+w+n, ... (rendering,
    detecting and the oracle's commands run on the CPU, so DataLoader workers make them)."""

    def __init__(self, cfg: WorldReflectorConfig, start_step: int):
        self.cfg, self.start_step = cfg, start_step
        self.pools = [spec._all_combinations(t) for t in spec.TAGS]

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + wid
        while True:
            yield batch_at(self.cfg, step, self.pools)
            step += n


def batch_at(cfg: WorldReflectorConfig, step: int, pools) -> tuple[torch.Tensor, list[str], list[str]]:
    """Batch `step`: a function of (seed, step) alone, so a resumed run sees the same batches."""
    rng = np.random.default_rng([cfg.seed, step])
    w = np.array([cfg.tag_weights.get(t, 0.0) for t in spec.TAGS], dtype=np.float64)
    tags = rng.choice(len(spec.TAGS), size=cfg.batch_size, p=w / w.sum())
    metas = [pools[t][rng.integers(len(pools[t]))] for t in tags]
    seeds = rng.integers(TRAIN_SEED_FLOOR, 2**62, size=len(metas)).tolist()
    images, targets = oracle_examples(metas, seeds, cfg.p_flaw)
    return torch.from_numpy(images), [m["prompt"] for m in metas], targets


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
    from tqdm import tqdm

    cfg.validate()
    out = Path(cfg.out_dir)
    if (out / "checkpoint").exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a checkpoint; pass resume=True to continue it or pick another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    dev = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = WorldReflector(SIZES[cfg.model_size]()).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    step = load_checkpoint(out, model, ema, opt) if cfg.resume and (out / "checkpoint").exists() else 0
    _trim_log(out / "log.jsonl", step)
    batches = iter(DataLoader(ReflectorData(cfg, step), batch_size=None, num_workers=cfg.num_workers,
                              prefetch_factor=4 if cfg.num_workers else None))
    val = None
    if cfg.val_size:
        metas = [m for m in load_prompt_file("geneval_shapes_val.jsonl") if cfg.tag_weights.get(m["tag"], 0) > 0]
        metas = spread(metas, cfg.val_size)
        images, targets = oracle_examples(metas, list(range(len(metas))), cfg.p_flaw)  # small seeds: held out
        val = (torch.from_numpy(images), [m["prompt"] for m in metas], targets)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train reflector", unit="step", disable=not cfg.progress)
    t0, acc_loss, acc_n, last_loss, val_exact = time.perf_counter(), 0.0, 0, float("nan"), None
    while step < cfg.max_steps and (cfg.max_minutes is None or (time.perf_counter() - t0) / 60 < cfg.max_minutes):
        images, prompts, targets = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with autocast:
            loss = model.loss(images.to(dev), model.tokenizer(prompts).to(dev), model.out_tokenizer(targets).to(dev))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(step)
        step += 1
        bar.update(1)
        acc_loss += loss.item()
        acc_n += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last_loss = acc_loss / acc_n
            row = {"step": step, "loss": round(last_loss, 5), "lr": lr_at(step - 1, cfg),
                   "train_minutes": round((time.perf_counter() - t0) / 60, 3)}
            if val is not None:
                val_exact = row["val_exact_match"] = round(exact_match(ema.model, *val), 4)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{last_loss:.4f}", exact=f"{val_exact}")
            acc_loss, acc_n = 0.0, 0
            model.train()
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(out, model, ema, opt, step, cfg)
            ema.model.save_pretrained(out / "reflector")
    bar.close()
    if step % cfg.ckpt_every and step != cfg.max_steps:  # stopped by the clock: keep what was done
        save_checkpoint(out, model, ema, opt, step, cfg)
        ema.model.save_pretrained(out / "reflector")
    return ReflectorTrainResult(step=step, minutes=(time.perf_counter() - t0) / 60, last_loss=last_loss,
                                val_exact=val_exact, ema=ema.model)
