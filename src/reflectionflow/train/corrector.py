"""Training the world corrector: a LoRA on the frozen trained generator (docs/method.md, section 3).

The corrector is the generator plus a LoRA in OminiControl's layout: the previous image enters as
condition tokens (models/mmdit.py), the text is `prompt [Reflexion]: reflection`, the loss is
flow matching on the improved image. With the default scope "cond" the adapters act on the
condition tokens only, so with no condition image the corrector is exactly the generator.

It trains through the trainer shared with the FLUX corrector (train/corrector_common.py):
`WorldFamily` is the world's side of its model interface, `PoolBatches` (by default) or GenRef
shards (with `genref` set, e.g. what `reflectionflow genref build` writes) its data.

The default data is made on the fly, batch `s` a function of (seed, s), so DataLoader workers make
it ahead, from five sources (GenRef's subsets in brackets):
- editing [editing]: a true scene and a one-flaw copy (world.flaws), both rendered; the reflection
  is the oracle's commands on the flawed scene; the target is the true scene;
- rule [rule]: a failed generator sample and its minimal edit (train/corrector_pool.py), so the
  corrector learns to fix the generator's real outputs, soft edges and all;
- keep [rule]: a passed generator sample, "- Keep the image unchanged.", itself as the target,
  so the corrector learns not to break correct images;
- reward [general]: two samples of one prompt draw, the lower graded score as the condition and a
  correct one as the target (GenRef's reward pairs: a better image, not an edit);
- length [length]: a rule pair whose text carries the refined prompt the engine would send
  (backends.world.refine), so the corrector reads long prompts too.
The subset mix warms up like the original's (0.1/0.1/0.1/0.7 general/length/rule/editing at
step 0, linearly to `mix_end` at `mix_steps`). Text, image and reflection are each dropped 10% of
the time (the image becomes a blank canvas; the reflection dropped leaves the prompt alone; the
text dropped leaves the empty prompt). With `partial_share` > 0 that share of the samples with a
condition image trains the start from the condition image partly noised (the corrector's
strength < 1; corrector_common.partial_path).

Run folder: what the shared trainer writes (train_config.json, log.jsonl with the loss per
timestep bin and per source, checkpoint/ with adapters, EMA, optimizer and RNG states), plus
pool/ (the generator samples; `pool_dir` may name a shared one), corrector/ (the shippable fp16
EMA LoRA + corrector.json, what the `world-mmdit` corrector loads, written with every
checkpoint), val.jsonl and samples/ (validation: the share of failed validation samples fixed
by one correction with the oracle's reflection, and the share of passed ones broken by a "keep"
correction), scores.json at the end. With `genref` set, val.jsonl and val/ hold the GenRef
validation instead (a registered verifier, the exact evaluator by default) and there is no pool.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from ..backends.world.mmdit import (
    DEFAULT_GENERATOR,
    TRAIN_GENERATOR_HINT,
    corrector_text,
    file_sha256,
    load_generator,
    save_corrector,
    seed_noise,
)
from ..models.flow import RectifiedFlow
from ..models.lora import LORA_TARGETS, LoRAConfig, apply_lora, target_names
from ..models.mmdit import COND_ATTENTION, SIZES, MMDiT
from ..world import spec
from ..world.evaluate import evaluate_image
from ..world.flaws import FLAW_KINDS, plant_flaw
from ..world.render import render, sample_scene
from .corrector_common import (
    BatchSource,
    CorrectorBatch,
    CorrectorFamily,
    CorrectorTrainConfig,
    CorrectorTrainResult,
    Validator,
    apply_dropout,
    check_resumable,
    train_corrector,
)
from .corrector_pool import (
    KEEP,
    POOL_TAG_WEIGHTS,
    Pool,
    PoolSettings,
    build_pool,
    check_harvests,
    default_workers,
    load_harvests,
    reward_groups,
    scene_detections,
)
from .loop import refuse_overwrite, resolve_device, to_model_space, to_uint8
from .world import DEFAULT_TAG_WEIGHTS, save_grid, spread

if TYPE_CHECKING:
    from ..data.genref import MixSchedule

SOURCES = ("editing", "rule", "keep", "reward", "length")
SUBSETS = ("general", "length", "rule", "editing")  # GenRef's (data.genref.SUBSETS, which imports the shard reader)
# train_flux/config.yaml of the original: this mix at step 0 ...
ORIGINAL_MIX_START = {"general": 0.1, "length": 0.1, "rule": 0.1, "editing": 0.7}
# ... moving to general .3 / length .3 / rule .4 / editing 0 by step 5000. Here rule pairs are the
# generator's own failures, the data that matters most, and editing pairs stay (they are exact).
DEFAULT_MIX_END = {"general": 0.1, "length": 0.15, "rule": 0.55, "editing": 0.2}
BLANK = np.broadcast_to(np.array(spec.BACKGROUND, np.uint8), (spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3))


@dataclass
class WorldCorrectorConfig(CorrectorTrainConfig):
    """The shared trainer's settings with the world's defaults, and the world's own (model, pool, mix)."""

    out_dir: str = "runs/world-corrector"
    generator: str = str(DEFAULT_GENERATOR)  # the frozen base
    cond_attention: str = "full"  # full | causal_kv (condition tokens attend only to themselves)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_scope: str = "cond"  # cond: adapters act on condition tokens only (OminiControl); all: everywhere
    batch_size: int = 256
    max_steps: int = 4000
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.995  # short runs: a 200-step average
    bf16: bool = True  # autocast on CUDA (the world's weights stay fp32); the CPU runs fp32
    gradient_checkpointing: bool = False  # (not used: the world's model is small)
    num_workers: int = 4  # pool batches are rendered on the CPU: workers make them ahead
    log_every: int = 50
    val_every: int = 500
    # Pool: failed (and as many passed) validation samples corrected per validation; GenRef: samples.
    val_size: int = 256
    val_verifier: str = "world-oracle"  # scores GenRef validation corrections (the pool's use the evaluator)
    val_steps: int = 20  # Euler steps of validation corrections and of the pool's generator samples
    val_guidance: float = 3.0  # CFG scale of both
    trackers: tuple[str, ...] = ()
    # The subset mix (the core's `mix` is derived from these by `validate`).
    mix_start: dict = field(default_factory=lambda: dict(ORIGINAL_MIX_START))
    mix_end: dict = field(default_factory=lambda: dict(DEFAULT_MIX_END))
    mix_steps: int = 1000
    keep_share: float = 0.25  # of the rule subset's draws
    pool_dir: str | None = None  # None: OUT/pool (several runs may share one pool)
    harvest: tuple[str, ...] = ()  # harvest folders (genref harvest, one per round): the pool instead of OUT/pool
    pool_size: int = 49_152
    pool_per_prompt: int = 4
    pool_tag_weights: dict = field(default_factory=lambda: dict(POOL_TAG_WEIGHTS))
    pool_batch: int = 512
    label_workers: int = 0  # processes labelling the pool; 0: all cores but one
    val_prompts: int = 553  # validation prompts sampled into the pool
    val_samples: int = 2  # samples per validation prompt

    resumable_changes = CorrectorTrainConfig.resumable_changes | {"label_workers", "pool_batch"}

    def validate(self) -> WorldCorrectorConfig:
        super().validate()
        if self.cond_attention not in COND_ATTENTION:
            raise ValueError(f"cond_attention {self.cond_attention!r}; accepted: {', '.join(COND_ATTENTION)}")
        self.lora().validate()
        if not target_names(MMDiT(SIZES["tiny"]()), self.lora().targets):
            raise ValueError(f"lora_targets {list(self.lora_targets)} match no layer; the defaults are "
                             f"{', '.join(LORA_TARGETS)} (txt_* and img_fc1 exist too)")
        if not 0.0 <= self.keep_share <= 1.0:
            raise ValueError(f"keep_share must be in [0, 1], got {self.keep_share}")
        for name in ("mix_start", "mix_end"):
            mix = getattr(self, name)
            bad = sorted(set(mix) - set(SUBSETS))
            if bad or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"{name} must weigh GenRef subsets ({', '.join(SUBSETS)}) with weights >= 0 "
                                 f"and a positive sum, got {mix}")
        bad = sorted(set(self.pool_tag_weights) - set(spec.TAGS))
        if bad or sum(self.pool_tag_weights.values()) <= 0 or any(w < 0 for w in self.pool_tag_weights.values()):
            raise ValueError(f"pool_tag_weights must weigh categories ({', '.join(spec.TAGS)}), "
                             f"got {self.pool_tag_weights}")
        for name in ("pool_size", "pool_batch", "val_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_per_prompt < 2:
            raise ValueError(f"pool_per_prompt must be >= 2 (reward pairs compare samples of one prompt), "
                             f"got {self.pool_per_prompt}")
        if self.mix_steps < 0 or self.val_prompts < 0 or self.label_workers < 0:
            raise ValueError("mix_steps, val_prompts and label_workers must be >= 0")
        self.mix = self.mix_schedule().to_dict()
        self.harvest = tuple(str(h) for h in self.harvest)
        check_harvests(self.harvest)
        if not (Path(self.generator) / "model.safetensors").is_file():
            raise FileNotFoundError(f"{Path(self.generator) / 'model.safetensors'}: no generator weights; "
                                    f"{TRAIN_GENERATOR_HINT}")
        return self

    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, tuple(self.lora_targets) or LORA_TARGETS, self.lora_scope)

    def mix_schedule(self) -> MixSchedule:
        """The subset mix as data.genref.MixSchedule: mix_start at step 0, linearly to mix_end at mix_steps."""
        from ..data.genref import MixSchedule

        if self.mix_steps == 0:
            return MixSchedule.constant(self.mix_end)
        return MixSchedule.linear(self.mix_start, self.mix_end, self.mix_steps)

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(file_sha256(Path(self.generator) / "model.safetensors"), self.pool_size,
                            self.pool_per_prompt, dict(self.pool_tag_weights), self.val_steps, self.val_guidance,
                            self.seed, self.val_prompts, self.val_samples)


# ----------------------------------------------------------------------------------------------
# The pool's batches


def source_weights(cfg: WorldCorrectorConfig, step: int, available: set[str]) -> np.ndarray:
    """Probability of each of SOURCES at `step`: the subset mix, rule split into rule and keep, and
    sources without data (a pool with no failure, say) left out."""
    sub = cfg.mix_schedule().weights(step)
    w = {"editing": sub["editing"], "rule": sub["rule"] * (1 - cfg.keep_share), "keep": sub["rule"] * cfg.keep_share,
         "reward": sub["general"], "length": sub["length"]}
    p = np.array([w[s] if s in available else 0.0 for s in SOURCES])
    if p.sum() <= 0:
        p = np.array([1.0 if s == "editing" else 0.0 for s in SOURCES])  # editing pairs never run out
    return p / p.sum()


@dataclass
class Pair:
    good: np.ndarray  # (64, 64, 3) uint8 target
    bad: np.ndarray  # (64, 64, 3) uint8 condition
    prompt: str
    reflection: str
    key: str  # where it came from: "rule/17" (pool sample 17), "editing/<seed>", ...


class PoolBatches(BatchSource):
    """Batch `step` from the five sources, a pure function of (seed, step, rank), so DataLoader
    workers make batches ahead (rendering editing pairs is CPU work)."""

    subsets = SOURCES
    stateless = True

    def __init__(self, cfg: WorldCorrectorConfig, pool: Pool, rank: int = 0):
        self.cfg, self.pool, self.rank = cfg, pool, rank
        rows = pool.samples
        self.fail = [i for i, r in enumerate(rows) if r["target"] >= 0]
        self.passed = [i for i, r in enumerate(rows) if r["correct"]]
        self.reward = []  # (worse, correct) within one prompt draw (or one search of one prompt)
        for group in reward_groups(pool):
            self.reward += [(a, b) for a in group for b in group
                            if rows[b]["correct"] and rows[a]["score"] < rows[b]["score"]]
        self.available = {"editing"} | ({"rule", "length"} if self.fail else set()) | \
            ({"keep"} if self.passed else set()) | ({"reward"} if self.reward else set())
        w = np.array([DEFAULT_TAG_WEIGHTS.get(t, 0.0) for t in spec.TAGS])
        self.tag_p = w / w.sum()
        self.prompt_space = [spec._all_combinations(t) for t in spec.TAGS]
        self._refined: dict[int, str] = {}

    def editing_pair(self, rng: random.Random) -> Pair:
        from ..backends.world.oracle import reflect_commands
        from ..world.commands import format_reflection

        for _ in range(50):
            tag = rng.choices(range(len(spec.TAGS)), weights=self.tag_p)[0]
            meta = self.prompt_space[tag][rng.randrange(len(self.prompt_space[tag]))]
            scene = sample_scene(meta, rng)
            bad = plant_flaw(meta, scene, FLAW_KINDS[rng.randrange(len(FLAW_KINDS))], rng)
            if bad is None:
                continue
            commands = reflect_commands(scene_detections(bad), meta)
            if commands[0].op == "keep":  # a flaw GenEval and the oracle cannot see teaches nothing
                continue
            return Pair(render(scene), render(bad), meta["prompt"], format_reflection(commands), "")
        raise RuntimeError("no editing pair in 50 draws")  # unreachable for world v1 prompts

    def refined_prompt(self, i: int) -> str:
        if i not in self._refined:
            from ..backends.world.refine import RuleRefiner
            from ..components import RefineRequest

            r = self.pool.samples[i]
            req = RefineRequest(original_prompt=r["prompt"], current_prompt=r["prompt"], reflection=r["reflection"])
            self._refined[i] = RuleRefiner().refine([req])[0].text
        return self._refined[i]

    def pair(self, source: str, seed: int) -> Pair:
        """One sample of `source`, drawn with `seed`."""
        rng = random.Random(seed)
        rows, images = self.pool.samples, self.pool.images
        if source == "editing":
            p = self.editing_pair(rng)
            p.key = f"editing/{seed}"
            return p
        if source in ("rule", "length"):
            i = self.fail[rng.randrange(len(self.fail))]
            prompt = rows[i]["prompt"] if source == "rule" else self.refined_prompt(i)
            return Pair(self.pool.targets[rows[i]["target"]], images[i], prompt, rows[i]["reflection"], f"{source}/{i}")
        if source == "keep":
            i = self.passed[rng.randrange(len(self.passed))]
            return Pair(images[i], images[i], rows[i]["prompt"], KEEP, f"keep/{i}")
        a, b = self.reward[rng.randrange(len(self.reward))]
        return Pair(images[b], images[a], rows[a]["prompt"], rows[a]["reflection"], f"reward/{a}-{b}")

    def batch(self, step: int) -> CorrectorBatch:
        cfg, B = self.cfg, self.cfg.batch_size
        rng = np.random.default_rng([cfg.seed, step, self.rank, 1])
        src = rng.choice(len(SOURCES), size=B, p=source_weights(cfg, step, self.available))
        seeds = rng.integers(0, 2**63, size=B)
        pairs = [self.pair(SOURCES[k], int(seed)) for k, seed in zip(src, seeds)]
        batch = CorrectorBatch(good=[p.good for p in pairs], bad=[p.bad for p in pairs],
                               prompts=[p.prompt for p in pairs], reflections=[p.reflection for p in pairs],
                               subsets=[SOURCES[k] for k in src], keys=[p.key for p in pairs])
        return apply_dropout(batch, cfg, step, self.rank)


# ----------------------------------------------------------------------------------------------
# Correcting and validating


@torch.no_grad()
def correct_images(model: MMDiT, images: np.ndarray, prompts: Sequence[str], reflections: Sequence[str],
                   seeds: Sequence[int], steps: int = 20, cfg_scale: float = 3.0,
                   batch_size: int = 256, strength: float = 1.0) -> tuple[np.ndarray, int]:
    """(B, 64, 64, 3) uint8 corrections of `images` and the NFE per image (the engine adapter,
    backends.world.mmdit.MMDiTCorrector, does the same through the Corrector interface).
    `strength` < 1 starts from each image partly noised (RectifiedFlow.sample)."""
    dev = next(model.parameters()).device
    flow = RectifiedFlow(model, model.tokenizer([""])[0].to(dev), text_dropout=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    out, nfe = [], 0
    model.eval()
    for i in range(0, len(images), batch_size):
        cond = to_model_space(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev))
        noise = torch.stack([seed_noise(s, model.config) for s in seeds[i : i + batch_size]]).to(dev)
        texts = [corrector_text(p, r, model.tokenizer) for p, r in
                 zip(prompts[i : i + batch_size], reflections[i : i + batch_size])]
        with autocast:
            res = flow.sample(noise, model.tokenizer(texts).to(dev), cond, steps=steps, cfg=cfg_scale,
                              strength=strength)
        out.append(to_uint8(res.images).numpy())
        nfe = res.nfe
    return (np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)), nfe


class Validation(Validator):
    """Correct failed validation samples with their oracle reflections and passed ones with "keep";
    report the share fixed and the share broken (samples/step_*.png: condition, correction pairs)."""

    def __init__(self, cfg: WorldCorrectorConfig, pool: Pool):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        val = pool.val
        fail = [i for i, r in enumerate(val) if not r["correct"]]
        ok = [i for i, r in enumerate(val) if r["correct"]]
        # evenly through the category-ordered list, so every category is represented
        self.fail, self.ok = spread(fail, cfg.val_size), spread(ok, cfg.val_size)
        idx = self.fail + self.ok
        self.images = np.asarray(pool.val_images[idx]) if idx else np.zeros((0, 64, 64, 3), np.uint8)
        self.rows = [val[i] for i in idx]
        self.metas = [spec.parse_prompt(r["prompt"]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, step: int, family: WorldFamily) -> dict:
        reflections = [r["reflection"] if not r["correct"] else KEEP for r in self.rows]
        seeds = [1_000_000 + i for i in range(len(self.rows))]  # not the samples' own noises
        prompts = [r["prompt"] for r in self.rows]
        nf = len(self.fail)
        result: dict = {"step": step}
        # From pure noise, and from each partial-start strength the corrector is trained for.
        strengths = [1.0] + ([s for s in self.cfg.partial_strengths if s < 1] if self.cfg.partial_share > 0 else [])
        for s in strengths:
            out, nfe = correct_images(family.model, self.images, prompts, reflections, seeds,
                                      self.cfg.val_steps, self.cfg.val_guidance, strength=s)
            now = [evaluate_image(img, m).correct for img, m in zip(out, self.metas)]
            tag = "" if s == 1.0 else f"@{s:g}"
            result[f"fixed{tag}"] = round(float(np.mean(now[:nf])), 4) if nf else None
            result[f"broken{tag}"] = round(1 - float(np.mean(now[nf:])), 4) if len(now) > nf else None
            if s == 1.0:
                result.update(failed_samples=nf, passed_samples=len(now) - nf, nfe=nfe)
                pairs = np.stack([self.images[:48], out[:48]], 1).reshape(-1, *out.shape[1:]) if len(out) else out
                save_grid(pairs, self.out / "samples" / f"step_{step:06d}.png")  # (condition, correction) pairs
            else:
                result[f"nfe{tag}"] = nfe
        return result

    def describe(self, row: dict) -> str:
        parts = [f"fixed {row['fixed']} broken {row['broken']}"]
        parts += [f"from {k[6:]}: fixed {v} broken {row.get('broken' + k[5:])}"
                  for k, v in row.items() if k.startswith("fixed@")]
        return "; ".join(parts)


def pool_validation(cfg: WorldCorrectorConfig, pool: Pool) -> Validation | None:
    v = Validation(cfg, pool)
    return v if len(v) else None  # val_size 0, or a pool without validation samples


# ----------------------------------------------------------------------------------------------
# The world family of the shared corrector trainer


class _WorldModule(nn.Module):
    """`forward(x_t, t, inputs) -> velocity` around the MMDiT (what DDP wraps)."""

    def __init__(self, model: MMDiT):
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.model(x_t, t, inputs["text"], inputs["cond"])  # (B, 3, 64, 64)


class WorldFamily(CorrectorFamily):
    """The world's MMDiT corrector behind the shared trainer's interface: pixels are the flow's data,
    the world tokenizer reads `corrector_text` (shortened to its word budget), a dropped image is
    the blank canvas, the adapters ship as OUT/corrector (what the world-mmdit corrector loads).
    `info` joins corrector.json (the pool's summary, say)."""

    default_verifier = "world-oracle"
    adapters_folder = "corrector"

    def __init__(self, cfg: WorldCorrectorConfig, device: torch.device, info: dict | None = None):
        self.cfg, self.info = cfg, dict(info or {})
        model = load_generator(cfg.generator, cfg.cond_attention, device=device)
        self.model = apply_lora(model, cfg.lora()).to(device)
        self.module = _WorldModule(self.model)
        self.tokenizer, self.size = self.model.tokenizer, self.model.config.image_size

    def prepare(self, batch: CorrectorBatch) -> dict[str, torch.Tensor]:
        """Images stacked and texts tokenized on the CPU (in a DataLoader worker with the pool)."""
        tok = self.tokenizer
        texts = [corrector_text(p, r, tok) if p and r else p for p, r in zip(batch.prompts, batch.reflections)]
        return {"good": _stack(batch.good, self.size),  # (B, 64, 64, 3) uint8
                "cond": _stack([BLANK if b is None else b for b in batch.bad], self.size),  # (B, 64, 64, 3) uint8
                "text": tok(texts),  # (B, L) int64
                "start_ok": torch.tensor([b is not None for b in batch.bad])}  # (B,) bool

    def encode(self, prepared: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
        x = {k: v.to(device, non_blocking=True) for k, v in prepared.items()}  # pinned when prefetched: no sync
        cond = to_model_space(x["cond"])  # (B, 3, 64, 64)
        # The condition is the previous image in the flow's own space: it is the partial-noise start too.
        return to_model_space(x["good"]), {"text": x["text"], "cond": cond, "start": cond, "start_ok": x["start_ok"]}

    def correct(self, images, prompts, reflections, seeds) -> list[np.ndarray]:
        out, _ = correct_images(self.model, _stack(images, self.size).numpy(), prompts, reflections, seeds,
                                self.cfg.val_steps, self.cfg.val_guidance)
        return list(out)

    def save_adapters(self, folder: Path, info: dict) -> Path:
        save_corrector(folder, self.model, self.cfg.lora(), self.cfg.generator, {**info, **self.info})
        return Path(folder) / "lora.safetensors"


def _stack(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([_fit(im, size) for im in images]))  # (B, size, size, 3) uint8


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class WorldCorrectorResult:
    train: CorrectorTrainResult
    pool: dict  # the pool's summary (samples, failed, fixable, ...); empty when trained on GenRef
    scores: dict | None  # the last validation row (None without validation)


def prepare_pool(cfg: WorldCorrectorConfig) -> Pool:
    """Build (or reuse) the run's pool of judged generator samples."""
    cfg.validate()
    if cfg.harvest:  # the search's own candidates, labelled: no generator pool to build
        return load_harvests(cfg.harvest)
    folder = Path(cfg.pool_dir) if cfg.pool_dir else Path(cfg.out_dir) / "pool"
    settings = cfg.pool_settings()
    model = None
    if not (folder / "pool.json").is_file():
        model = load_generator(cfg.generator, device=resolve_device(cfg.device))
    build_pool(model, settings, folder, cfg.label_workers or default_workers(), cfg.pool_batch, cfg.progress)
    return Pool.load(folder)


def train_world_corrector(cfg: WorldCorrectorConfig, stop_after: int | None = None) -> WorldCorrectorResult:
    """Train the corrector's LoRA through the shared trainer on the pool (or on GenRef shards with
    `genref` set); OUT/corrector holds the shippable adapters. `stop_after`: as train_corrector's."""
    cfg.validate()
    check_resumable(cfg)  # before the pool, which can take minutes to build
    out = refuse_overwrite(cfg)
    if cfg.genref:  # the shared trainer's defaults: GenRefBatches and the GenRef validation
        pool, source, validation, info = None, None, None, {"genref": cfg.genref}
    else:
        pool = prepare_pool(cfg)
        source = lambda rank, world_size: PoolBatches(cfg, pool, rank)  # noqa: E731
        validation = lambda: pool_validation(cfg, pool)  # noqa: E731
        info = {"pool": pool.summary}
    res = train_corrector(cfg, WorldFamily, {"cfg": cfg, "info": info}, name="world-corrector",
                          stop_after=stop_after, source=source, validation=validation)
    report = {"validation": res.validation, "steps": res.step, "train_minutes": round(res.minutes, 2),
              "cond_attention": cfg.cond_attention, "lora": {"rank": cfg.lora_rank, "scope": cfg.lora_scope}, **info}
    (out / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    return WorldCorrectorResult(train=res, pool=pool.summary if pool else {}, scores=res.validation)
