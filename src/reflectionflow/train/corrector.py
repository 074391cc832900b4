"""Training the world corrector: a LoRA on the frozen trained generator (REFERENCE.md section 3).

The corrector is the generator plus a LoRA in OminiControl's layout: the previous image enters as
condition tokens (models/mmdit.py), the text is `prompt [Reflexion]: reflection`, the loss is
flow matching on the improved image. With the default scope "cond" the adapters act on the
condition tokens only, so with no condition image the corrector is exactly the generator.

Data is made on the fly, batch `s` a function of (seed, s) as for the generator, from five
sources (GenRef's subsets in brackets):
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
the time (the image becomes a blank canvas; the reflection dropped leaves the prompt alone).

Run folder: what train/loop.py writes (checkpoint/ with the config, log.jsonl with loss per
timestep bin and per source), plus pool/ (the generator samples), corrector/ (the shippable fp16
LoRA + corrector.json, written with every checkpoint), val.jsonl and samples/ (validation: the
share of failed validation samples fixed by one correction with the oracle's reflection, and the
share of passed ones broken by a "keep" correction), scores.json at the end.

With `genref` set (a GenRef shard list, e.g. what `reflectionflow genref build` writes) the same
corrector trains through the trainer shared with the FLUX corrector (train/corrector_common.py):
data from GenRefReader with the subset mix, exact resume of the reader position, validation by a
registered verifier (`genref_val_verifier`, the exact evaluator by default). `WorldGenRefFamily`
is the world's side of that interface.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

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
from ..models.text import Tokenizer
from ..world import spec
from ..world.evaluate import evaluate_image
from ..world.flaws import FLAW_KINDS, plant_flaw
from ..world.render import render, sample_scene
from .corrector_common import CorrectorBatch, CorrectorFamily, CorrectorTrainConfig, train_corrector
from .corrector_pool import KEEP, POOL_TAG_WEIGHTS, Pool, PoolSettings, build_pool, default_workers, scene_detections
from .loop import (
    Batch,
    StepBatches,
    TrainConfig,
    TrainResult,
    resolve_device,
    to_model_space,
    to_uint8,
    train_flow_model,
)
from .world import DEFAULT_TAG_WEIGHTS, save_grid, spread

SOURCES = ("editing", "rule", "keep", "reward", "length")
SUBSETS = ("general", "length", "rule", "editing")  # GenRef's (data.genref.SUBSETS, which imports the shard reader)
# train_flux/config.yaml of the original: this mix at step 0 ...
ORIGINAL_MIX_START = {"general": 0.1, "length": 0.1, "rule": 0.1, "editing": 0.7}
# ... moving to general .3 / length .3 / rule .4 / editing 0 by step 5000. Here rule pairs are the
# generator's own failures, the data that matters most, and editing pairs stay (they are exact).
DEFAULT_MIX_END = {"general": 0.1, "length": 0.15, "rule": 0.55, "editing": 0.2}
BLANK = np.broadcast_to(np.array(spec.BACKGROUND, np.uint8), (spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3))


@dataclass
class WorldCorrectorConfig(TrainConfig):
    out_dir: str = "runs/world-corrector"
    generator: str = str(DEFAULT_GENERATOR)  # the frozen base (model_size and model_overrides are unused)
    cond_attention: str = "full"  # full | causal_kv (condition tokens attend only to themselves)
    lora_rank: int = 32  # the released corrector config (the paper's text says 256)
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_scope: str = "cond"  # cond: adapters act on condition tokens only (OminiControl); all: everywhere
    batch_size: int = 256
    max_steps: int = 4000
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 0.5  # the original's
    ema_decay: float = 0.995  # short runs: a 200-step average
    image_dropout: float = 0.1
    reflection_dropout: float = 0.1
    mix_start: dict = field(default_factory=lambda: dict(ORIGINAL_MIX_START))
    mix_end: dict = field(default_factory=lambda: dict(DEFAULT_MIX_END))
    mix_steps: int = 1000
    keep_share: float = 0.25  # of the rule subset's draws
    pool_dir: str | None = None  # None: OUT/pool (several runs may share one pool)
    pool_size: int = 49_152
    pool_per_prompt: int = 4
    pool_tag_weights: dict = field(default_factory=lambda: dict(POOL_TAG_WEIGHTS))
    pool_batch: int = 512
    label_workers: int = 0  # processes labelling the pool; 0: all cores but one
    val_prompts: int = 553
    val_samples: int = 2
    val_max: int = 256  # failed and passed validation samples corrected at each validation (each)
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 500
    genref: str | None = None  # GenRef shards: train through the shared corrector trainer instead of the pool
    genref_val_verifier: str = "world-oracle"  # scores the GenRef validation corrections

    def validate(self) -> WorldCorrectorConfig:
        super().validate()
        if self.genref:
            from ..components import check_name
            from ..data.shards import resolve_shards

            resolve_shards(self.genref)  # a ShardError (ValueError) names what is missing
            check_name("verifier", self.genref_val_verifier)
        if self.cond_attention not in COND_ATTENTION:
            raise ValueError(f"cond_attention {self.cond_attention!r}; accepted: {', '.join(COND_ATTENTION)}")
        self.lora_targets = tuple(self.lora_targets)
        self.lora().validate()
        if not target_names(MMDiT(SIZES["tiny"]()), self.lora_targets):
            raise ValueError(f"lora_targets {list(self.lora_targets)} match no layer; the defaults are "
                             f"{', '.join(LORA_TARGETS)} (txt_* and img_fc1 exist too)")
        for name in ("image_dropout", "reflection_dropout", "text_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
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
        for name in ("pool_size", "pool_batch", "val_samples", "val_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_per_prompt < 2:
            raise ValueError(f"pool_per_prompt must be >= 2 (reward pairs compare samples of one prompt), "
                             f"got {self.pool_per_prompt}")
        if self.mix_steps < 0 or self.val_prompts < 0 or self.label_workers < 0:
            raise ValueError("mix_steps, val_prompts and label_workers must be >= 0")
        if not (Path(self.generator) / "model.safetensors").is_file():
            raise FileNotFoundError(f"{Path(self.generator) / 'model.safetensors'}: no generator weights; "
                                    f"{TRAIN_GENERATOR_HINT}")
        return self

    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, tuple(self.lora_targets), self.lora_scope)

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(file_sha256(Path(self.generator) / "model.safetensors"), self.pool_size,
                            self.pool_per_prompt, dict(self.pool_tag_weights), self.sample_steps, self.cfg_scale,
                            self.seed, self.val_prompts, self.val_samples)


def source_weights(cfg: WorldCorrectorConfig, step: int, available: set[str]) -> np.ndarray:
    """Probability of each of SOURCES at `step`: the subset mix, rule split into rule and keep, and
    sources without data (a pool with no failure, say) left out."""
    frac = 1.0 if cfg.mix_steps == 0 else min(1.0, step / cfg.mix_steps)
    sub = {s: (1 - frac) * cfg.mix_start.get(s, 0.0) + frac * cfg.mix_end.get(s, 0.0) for s in SUBSETS}
    w = {"editing": sub["editing"], "rule": sub["rule"] * (1 - cfg.keep_share), "keep": sub["rule"] * cfg.keep_share,
         "reward": sub["general"], "length": sub["length"]}
    p = np.array([w[s] if s in available else 0.0 for s in SOURCES])
    if p.sum() <= 0:
        p = np.array([1.0 if s == "editing" else 0.0 for s in SOURCES])  # editing pairs never run out
    return p / p.sum()


class CorrectorBatches(StepBatches):
    """Endless batches (target, text, source, condition) from `start_step`; worker w of n makes the
    batches of steps start+w, start+w+n, ... (the DataLoader yields them in order)."""

    def __init__(self, cfg: WorldCorrectorConfig, pool: Pool, tokenizer: Tokenizer, start_step: int):
        self.cfg, self.pool, self.tok, self.start_step = cfg, pool, tokenizer, start_step
        rows = pool.samples
        self.fail = [i for i, r in enumerate(rows) if r["target"] >= 0]
        self.passed = [i for i, r in enumerate(rows) if r["correct"]]
        self.reward = []  # (worse, correct) within one prompt draw
        k = pool.settings["per_prompt"]
        for g in range(0, len(rows), k):
            group = range(g, min(g + k, len(rows)))
            self.reward += [(a, b) for a in group for b in group
                            if rows[b]["correct"] and rows[a]["score"] < rows[b]["score"]]
        self.available = {"editing"} | ({"rule", "length"} if self.fail else set()) | \
            ({"keep"} if self.passed else set()) | ({"reward"} if self.reward else set())
        w = np.array([DEFAULT_TAG_WEIGHTS.get(t, 0.0) for t in spec.TAGS])
        self.tag_p = w / w.sum()
        self.prompt_space = [spec._all_combinations(t) for t in spec.TAGS]
        self._refined: dict[int, str] = {}

    def editing_pair(self, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str, str]:
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
            return render(scene), render(bad), meta["prompt"], format_reflection(commands)
        raise RuntimeError("no editing pair in 50 draws")  # unreachable for world v1 prompts

    def refined_prompt(self, i: int) -> str:
        if i not in self._refined:
            from ..backends.world.refine import RuleRefiner
            from ..components import RefineRequest

            r = self.pool.samples[i]
            req = RefineRequest(original_prompt=r["prompt"], current_prompt=r["prompt"], reflection=r["reflection"])
            self._refined[i] = RuleRefiner().refine([req])[0].text
        return self._refined[i]

    def pair(self, source: str, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str, str]:
        """(target, condition, prompt, reflection) of one sample of `source`."""
        rows, images = self.pool.samples, self.pool.images
        if source == "editing":
            return self.editing_pair(rng)
        if source in ("rule", "length"):
            i = self.fail[rng.randrange(len(self.fail))]
            prompt = rows[i]["prompt"] if source == "rule" else self.refined_prompt(i)
            return self.pool.targets[rows[i]["target"]], images[i], prompt, rows[i]["reflection"]
        if source == "keep":
            i = self.passed[rng.randrange(len(self.passed))]
            return images[i], images[i], rows[i]["prompt"], KEEP
        a, b = self.reward[rng.randrange(len(self.reward))]
        return images[b], images[a], rows[a]["prompt"], rows[a]["reflection"]

    def batch_at(self, step: int) -> tuple[torch.Tensor, ...]:
        cfg, B = self.cfg, self.cfg.batch_size
        rng = np.random.default_rng([cfg.seed, step, 1])
        src = rng.choice(len(SOURCES), size=B, p=source_weights(cfg, step, self.available))
        seeds = rng.integers(0, 2**63, size=B)
        drop_image = rng.random(B) < cfg.image_dropout
        drop_reflection = rng.random(B) < cfg.reflection_dropout
        goods, bads, texts = [], [], []
        for j in range(B):
            good, bad, prompt, reflection = self.pair(SOURCES[src[j]], random.Random(int(seeds[j])))
            goods.append(good)
            bads.append(BLANK if drop_image[j] else bad)
            texts.append(prompt if drop_reflection[j] else corrector_text(prompt, reflection, self.tok))
        return (torch.from_numpy(np.stack(goods)), self.tok(texts), torch.from_numpy(src.astype(np.int64)),
                torch.from_numpy(np.stack(bads)))  # (B, 64, 64, 3) uint8, (B, L), (B,), (B, 64, 64, 3)


def corrector_batches(cfg: WorldCorrectorConfig, pool: Pool, tokenizer: Tokenizer):
    def make(start_step: int) -> Iterator[Batch]:
        ds = CorrectorBatches(cfg, pool, tokenizer, start_step)
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=resolve_device(cfg.device).type == "cuda",
                            prefetch_factor=4 if cfg.num_workers else None)
        for good, text, src, bad in loader:
            yield Batch(images=good, text=text, tags=src, cond=bad)

    return make


# ----------------------------------------------------------------------------------------------
# Correcting and validating


@torch.no_grad()
def correct_images(model: MMDiT, images: np.ndarray, prompts: Sequence[str], reflections: Sequence[str],
                   seeds: Sequence[int], steps: int = 20, cfg_scale: float = 3.0,
                   batch_size: int = 256) -> tuple[np.ndarray, int]:
    """(B, 64, 64, 3) uint8 corrections of `images` and the NFE per image (the engine adapter,
    backends.world.mmdit.MMDiTCorrector, does the same through the Corrector interface)."""
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
            res = flow.sample(noise, model.tokenizer(texts).to(dev), cond, steps=steps, cfg=cfg_scale)
        out.append(to_uint8(res.images).numpy())
        nfe = res.nfe
    return (np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)), nfe


class Validation:
    """Correct failed validation samples with their oracle reflections and passed ones with "keep";
    report the share fixed and the share broken."""

    def __init__(self, cfg: WorldCorrectorConfig, pool: Pool):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        val = pool.val
        fail = [i for i, r in enumerate(val) if not r["correct"]]
        ok = [i for i, r in enumerate(val) if r["correct"]]
        # evenly through the category-ordered list, so every category is represented
        self.fail, self.ok = spread(fail, cfg.val_max), spread(ok, cfg.val_max)
        idx = self.fail + self.ok
        self.images = np.asarray(pool.val_images[idx]) if idx else np.zeros((0, 64, 64, 3), np.uint8)
        self.rows = [val[i] for i in idx]
        self.metas = [spec.parse_prompt(r["prompt"]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, step: int, model: MMDiT) -> dict:
        reflections = [r["reflection"] if not r["correct"] else KEEP for r in self.rows]
        seeds = [1_000_000 + i for i in range(len(self.rows))]  # not the samples' own noises
        out, nfe = correct_images(model, self.images, [r["prompt"] for r in self.rows], reflections, seeds,
                                  self.cfg.sample_steps, self.cfg.cfg_scale)
        now = [evaluate_image(img, m).correct for img, m in zip(out, self.metas)]
        nf = len(self.fail)
        result = {"step": step, "fixed": round(float(np.mean(now[:nf])), 4) if nf else None,
                  "broken": round(1 - float(np.mean(now[nf:])), 4) if len(now) > nf else None,
                  "failed_samples": nf, "passed_samples": len(now) - nf, "nfe": nfe}
        pairs = np.stack([self.images[:48], out[:48]], 1).reshape(-1, *out.shape[1:]) if len(out) else out
        save_grid(pairs, self.out / "samples" / f"step_{step:06d}.png")  # (condition, correction) pairs
        log = self.out / "val.jsonl"
        rows = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] < step] if log.exists() else []
        log.write_text("".join(r + "\n" for r in rows + [json.dumps(result)]))  # a resumed run rewrites later lines
        if self.cfg.progress:
            from tqdm import tqdm

            tqdm.write(f"step {step}: validation fixed {result['fixed']} broken {result['broken']}")
        return result


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class WorldCorrectorResult:
    train: TrainResult
    pool: dict  # the pool's summary (samples, failed, fixable, ...)
    scores: dict | None  # the final validation (None without validation samples)


def _check_resume(cfg: WorldCorrectorConfig) -> None:
    """A resumed run must keep what shapes the adapters and their base."""
    saved_path = Path(cfg.out_dir) / "train_config.json"
    if not (cfg.resume and (Path(cfg.out_dir) / "checkpoint").exists() and saved_path.is_file()):
        return
    saved = json.loads(saved_path.read_text())
    now = cfg.to_dict()
    keys = ("generator", "cond_attention", "lora_rank", "lora_alpha", "lora_targets", "lora_scope", "seed")
    differ = [k for k in keys if json.loads(json.dumps(now[k])) != saved.get(k)]
    if differ:
        raise ValueError(f"{cfg.out_dir}: the checkpoint was trained with other {', '.join(differ)}; resume with "
                         "the same settings or start a new out_dir")


def prepare_pool(cfg: WorldCorrectorConfig, model: MMDiT | None = None) -> Pool:
    """Build (or reuse) the run's pool of judged generator samples."""
    cfg.validate()
    folder = Path(cfg.pool_dir) if cfg.pool_dir else Path(cfg.out_dir) / "pool"
    settings = cfg.pool_settings()
    if not (folder / "pool.json").is_file():
        model = model or load_generator(cfg.generator, device=resolve_device(cfg.device))
    build_pool(model, settings, folder, cfg.label_workers or default_workers(), cfg.pool_batch, cfg.progress)
    return Pool.load(folder)


def train_world_corrector(cfg: WorldCorrectorConfig) -> WorldCorrectorResult:
    """Train the corrector's LoRA; OUT/corrector holds the shippable adapters."""
    cfg.validate()
    if cfg.genref:
        return train_world_corrector_genref(cfg)
    _check_resume(cfg)
    out = Path(cfg.out_dir)
    if (out / "checkpoint").exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a checkpoint; pass resume=True (--resume) to continue it or pick "
                         "another out_dir")
    model = load_generator(cfg.generator, cfg.cond_attention, device=resolve_device(cfg.device))
    pool = prepare_pool(cfg, model)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    model = apply_lora(model, cfg.lora())
    validation = Validation(cfg, pool)

    def export(run: Path, ema: MMDiT) -> None:
        step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
        save_corrector(run / "corrector", ema, cfg.lora(), cfg.generator,
                       {"step": step, "train_config": cfg.to_dict(), "pool": pool.summary})

    result = train_flow_model(cfg, model, corrector_batches(cfg, pool, model.tokenizer),
                              validate=validation if len(validation) else None, tag_names=SOURCES, export=export)
    scores = validation(result.step, result.ema) if len(validation) else None
    report = {"validation": scores, "steps": result.step, "train_minutes": round(result.minutes, 2),
              "cond_attention": cfg.cond_attention, "lora": {"rank": cfg.lora_rank, "scope": cfg.lora_scope},
              "pool": pool.summary}
    (out / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    return WorldCorrectorResult(train=result, pool=pool.summary, scores=scores)


# ----------------------------------------------------------------------------------------------
# The world family of the shared corrector trainer (GenRef shards in, train/corrector_common.py)


class _WorldModule(nn.Module):
    """`forward(x_t, t, inputs) -> velocity` around the MMDiT (what DDP wraps)."""

    def __init__(self, model: MMDiT):
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.model(x_t, t, inputs["text"], inputs["cond"])  # (B, 3, 64, 64)


class WorldGenRefFamily(CorrectorFamily):
    """The world's MMDiT corrector behind the shared trainer's interface: pixels are the flow's data,
    the world tokenizer reads `corrector_text` (shortened to its word budget), a dropped image is
    the blank canvas, as in the pool trainer."""

    default_verifier = "world-oracle"

    def __init__(self, cfg: WorldCorrectorConfig, device: torch.device):
        self.cfg = cfg
        model = load_generator(cfg.generator, cfg.cond_attention, device=device)
        self.model = apply_lora(model, cfg.lora()).to(device)
        self.module = _WorldModule(self.model)

    def encode(self, batch: CorrectorBatch, device: torch.device) -> tuple[torch.Tensor, dict]:
        tok = self.model.tokenizer
        size = self.model.config.image_size

        def pixels(images) -> torch.Tensor:
            arr = np.stack([_fit(im, size) for im in images])  # (B, 64, 64, 3) uint8
            return to_model_space(torch.from_numpy(arr).to(device))  # (B, 3, 64, 64)

        texts = [corrector_text(p, r, tok) if p and r else p for p, r in zip(batch.prompts, batch.reflections)]
        cond = pixels([BLANK if b is None else b for b in batch.bad])
        return pixels(batch.good), {"text": tok(texts).to(device), "cond": cond}

    def correct(self, images, prompts, reflections, seeds) -> list[np.ndarray]:
        size = self.model.config.image_size
        out, _ = correct_images(self.model, np.stack([_fit(im, size) for im in images]), prompts, reflections, seeds,
                                self.cfg.sample_steps, self.cfg.cfg_scale)
        self.model.train()
        return list(out)

    def save_adapters(self, folder: Path, info: dict) -> Path:
        save_corrector(folder, self.model, self.cfg.lora(), self.cfg.generator, info)
        return Path(folder) / "lora.safetensors"


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def genref_train_config(cfg: WorldCorrectorConfig) -> CorrectorTrainConfig:
    """The world corrector's settings as the shared trainer's config (the subset mix as a schedule)."""
    from ..data.genref import MixSchedule

    return CorrectorTrainConfig(
        out_dir=cfg.out_dir, genref=cfg.genref, mix=MixSchedule.linear(cfg.mix_start, cfg.mix_end,
                                                                      max(cfg.mix_steps, 1)).to_dict(),
        batch_size=cfg.batch_size, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, optimizer="adamw", lr=cfg.lr,
        weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), lr_schedule="cosine", warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_targets=tuple(cfg.lora_targets), text_dropout=cfg.text_dropout, image_dropout=cfg.image_dropout,
        reflection_dropout=cfg.reflection_dropout, t_mean=cfg.t_mean, t_std=cfg.t_std, bf16=cfg.bf16,
        gradient_checkpointing=False, seed=cfg.seed, device=cfg.device, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, val_every=cfg.sample_every, val_size=min(cfg.val_max, cfg.val_prompts),
        val_verifier=cfg.genref_val_verifier, val_steps=cfg.sample_steps, val_guidance=cfg.cfg_scale, trackers=(),
        resume=cfg.resume, progress=cfg.progress)


def train_world_corrector_genref(cfg: WorldCorrectorConfig, stop_after: int | None = None) -> WorldCorrectorResult:
    """The world corrector trained on GenRef shards by the shared trainer; OUT/lora holds the adapters
    (lora.safetensors + corrector.json, what the world-mmdit corrector loads)."""
    core = genref_train_config(cfg)
    res = train_corrector(core, WorldGenRefFamily, {"cfg": cfg}, name="world-corrector", stop_after=stop_after)
    report = {"validation": res.validation, "steps": res.step, "train_minutes": round(res.minutes, 2),
              "cond_attention": cfg.cond_attention, "lora": {"rank": cfg.lora_rank, "scope": cfg.lora_scope},
              "genref": cfg.genref}
    (Path(cfg.out_dir) / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    return WorldCorrectorResult(train=res, pool={}, scores=None)
