"""Training the Shapes world's generator on scenes rendered on the fly.

Data: every batch draws GenEval categories by `tag_weights`, a prompt uniformly from that
category's whole prompt space (`spec._all_combinations`: 2,934 prompts over the six categories)
and a scene seed, renders the ground truth, and captions it (`world.captions.scene_caption`:
the template prompt, or an explicit description of the rendered scene, or both; `caption_mix`,
None for template prompts only). Scene seeds are drawn from
[2**40, 2**62): the benchmark, the validation set and the engine seed their images with small
integers (prompt index, chain, round), so no training image is ever one of theirs.

Batch `s` depends only on (seed, s), so DataLoader workers can produce batches in any process
and a resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..models.flow import RectifiedFlow
from ..models.mmdit import SIZES, MMDiT, MMDiTConfig, count_parameters
from ..models.text import Tokenizer
from ..runtime import is_number
from ..world import spec
from ..world.captions import CaptionMix, scene_caption, scene_metadata
from ..world.data import DEFAULT_TAG_WEIGHTS, load_prompt_file, spread  # noqa: F401  (the trainers' names)
from ..world.render import render, sample_scene
from .loop import Batch, StepBatches, TrainConfig, TrainResult, resolve_device, to_uint8, train_flow_model

TRAIN_SEED_FLOOR = 2**40
CAPTION_SALT = 0x9E3779B97F4A7C15  # a caption's draws: seeded by its scene's seed, apart from the scene's
DATA_DIR = Path(spec.__file__).parent / "data"


@dataclass
class WorldTrainConfig(TrainConfig):
    out_dir: str = "runs/world-generator"
    tag_weights: dict = field(default_factory=lambda: dict(DEFAULT_TAG_WEIGHTS))
    val_prompts: int = 120  # validation prompts sampled and scored at every sample_every (0: none)
    final_eval: bool = True  # score the EMA model on GenEval-Shapes (553 prompts, one sample each)
    final_eval_prompts: int | None = None  # fewer, spread over the categories (quick runs); None: all
    eval_batch: int = 256
    # Training captions (world.captions.CaptionMix fields; the ones not given keep their defaults);
    # None: the template prompts only.
    caption_mix: dict | None = field(default_factory=lambda: asdict(CaptionMix()))
    snapshots: bool = False  # keep the EMA weights of every validation step in OUT/snapshots/step_N
    init_from: str | None = None  # a trained generator folder to start from (`warm_start`); None: from scratch

    def validate(self) -> WorldTrainConfig:
        super().validate()
        if self.caption_mix is not None:
            known = set(CaptionMix.__dataclass_fields__)
            bad = sorted(set(self.caption_mix) - known)
            if bad:
                raise ValueError(f"caption_mix has unknown keys {bad}; accepted: {', '.join(sorted(known))}")
            for k, v in self.caption_mix.items():
                if not is_number(v, 0.0, 1.0):
                    raise ValueError(f"caption_mix {k} must be a probability in [0, 1], got {v!r}")
            self.caption_mix = {**asdict(CaptionMix()), **self.caption_mix}
            if self.caption_mix["template"] + self.caption_mix["combined"] > 1.0:
                raise ValueError("caption_mix template + combined must be <= 1")
        if self.model_size not in SIZES:
            raise ValueError(f"model_size {self.model_size!r}; accepted: {', '.join(SIZES)}")
        if self.init_from is not None:
            check_init_from(self.init_from, SIZES[self.model_size](**self.model_overrides))
        bad = sorted(set(self.tag_weights) - set(spec.TAGS))
        if bad:
            raise ValueError(f"tag_weights has unknown categories {bad}; accepted: {', '.join(spec.TAGS)}")
        if any(w < 0 for w in self.tag_weights.values()) or sum(self.tag_weights.values()) <= 0:
            raise ValueError("tag_weights must be >= 0 with a positive sum")
        return self


class WorldBatches(StepBatches):
    """Endless batches (images, token ids, category ids) starting at `start_step`; worker w of n
    makes the batches of steps start+w, start+w+n, ... (the DataLoader yields them in order)."""

    def __init__(self, batch_size: int, seed: int, start_step: int, tag_weights: dict, tokenizer: Tokenizer,
                 caption_mix: dict | None = None):
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.tokenizer = tokenizer
        self.mix = None if caption_mix is None else CaptionMix(**caption_mix)
        w = np.array([tag_weights.get(t, 0.0) for t in spec.TAGS], dtype=np.float64)
        self.p = w / w.sum()
        self.pools = [spec._all_combinations(t) for t in spec.TAGS]

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        tags = rng.choice(len(spec.TAGS), size=self.batch_size, p=self.p)
        metas = [self.pools[t][rng.integers(len(self.pools[t]))] for t in tags]
        seeds = rng.integers(TRAIN_SEED_FLOOR, 2**62, size=self.batch_size).tolist()
        images = np.empty((self.batch_size, spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3), dtype=np.uint8)
        texts = []
        for i, (m, s) in enumerate(zip(metas, seeds)):
            rng = random.Random(s ^ CAPTION_SALT)
            drawn = m if self.mix is None else scene_metadata(m, rng, self.mix)  # alt-text noise
            scene = sample_scene(drawn, random.Random(s))
            render(scene, out=images[i])
            texts.append(m["prompt"] if self.mix is None else scene_caption(m, scene, rng, self.mix))
        return torch.from_numpy(images), self.tokenizer(texts), torch.from_numpy(tags)


def world_batches(cfg: WorldTrainConfig, tokenizer: Tokenizer):
    def make(start_step: int) -> Iterator[Batch]:
        ds = WorldBatches(cfg.batch_size, cfg.seed, start_step, cfg.tag_weights, tokenizer, cfg.caption_mix)
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=resolve_device(cfg.device).type == "cuda",
                            prefetch_factor=4 if cfg.num_workers else None)
        for images, text, tags in loader:
            yield Batch(images=images, text=text, tags=tags)

    return make


# ----------------------------------------------------------------------------------------------
# Sampling and scoring


@torch.no_grad()
def generate_images(model: MMDiT, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20,
                    cfg_scale: float = 3.0, batch_size: int = 256) -> tuple[np.ndarray, int]:
    """(B, 64, 64, 3) uint8 images, one per (prompt, seed), and the NFE per image. The noise for a
    seed is drawn on the CPU so the same seed gives the same image on any device."""
    dev = next(model.parameters()).device
    c = model.config
    flow = RectifiedFlow(model, model.tokenizer([""])[0].to(dev), text_dropout=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    out, nfe = [], 0
    model.eval()
    for i in range(0, len(prompts), batch_size):
        noise = torch.stack([torch.randn(c.channels, c.image_size, c.image_size,
                                         generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds[i : i + batch_size]]).to(dev)
        text = model.tokenizer(list(prompts[i : i + batch_size])).to(dev)
        with autocast:
            res = flow.sample(noise, text, steps=steps, cfg=cfg_scale)
        out.append(to_uint8(res.images).numpy())
        nfe = res.nfe
    return np.concatenate(out), nfe


def score_images(images: np.ndarray, metas: Sequence[dict]) -> dict | None:
    """GenEval-Shapes summary (overall, per category) from the world's evaluator, or None while
    that module is not part of the installed package."""
    try:
        from ..world.evaluate import evaluate_image, summarize
    except ImportError:
        return None
    rows = [{"tag": m["tag"], "correct": evaluate_image(img, m).correct} for img, m in zip(images, metas)]
    return summarize(rows)


def save_grid(images: np.ndarray, path: Path, columns: int = 16) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def evaluate_generator(model: MMDiT, metas: Sequence[dict], steps: int, cfg_scale: float,
                       batch_size: int = 256) -> tuple[np.ndarray, dict | None, int]:
    """One sample per prompt (noise seed = prompt index): images, summary, NFE per image."""
    images, nfe = generate_images(model, [m["prompt"] for m in metas], list(range(len(metas))), steps,
                                  cfg_scale, batch_size)
    return images, score_images(images, metas), nfe


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class WorldTrainResult:
    train: TrainResult
    parameters: int
    scores: dict | None  # GenEval-Shapes summary of the final EMA model (None: not evaluated)


_SHAPE = ("image_size", "patch_size", "channels", "width", "heads", "double_blocks", "single_blocks", "mlp_ratio",
          "text_width", "text_layers", "text_heads", "cond_attention")


def check_init_from(folder: str | Path, config: MMDiTConfig) -> MMDiTConfig:
    """The trained generator's config in `folder`, read from its config.json (no weights), if a run of
    `config` can start from it; else a one-line error naming what differs."""
    path = Path(folder) / "config.json"
    if not (Path(folder) / "model.safetensors").is_file() or not path.is_file():
        raise ValueError(f"init_from {folder}: no generator weights there (expected model.safetensors and config.json)")
    try:
        theirs = MMDiTConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"init_from {folder}: config.json is not a generator's ({e})") from None
    differ = [k for k in _SHAPE if getattr(config, k) != getattr(theirs, k)]
    if differ:
        raise ValueError(f"init_from {folder}: its generator differs from this run's in {', '.join(differ)} "
                         f"({', '.join(f'{k}={getattr(theirs, k)} here {getattr(config, k)}' for k in differ)}); "
                         "pick the --size it was trained with")
    return theirs


def warm_start(model: MMDiT, folder: str | Path) -> dict:
    """Start `model` from a trained generator (a fine-tune, the way a model is re-trained on better
    captions): every weight of the same name and shape is copied; the text embedding is copied word
    by word, so words the trained model never read keep their fresh initialisation; a longer text
    encoder copies the trained position rows and repeats the last one for the rest. Everything else
    (widths, blocks, patch size) must match. Returns what was copied."""
    check_init_from(folder, model.config)
    src = MMDiT.from_pretrained(folder)
    a, b = model.config, src.config
    state, theirs = model.state_dict(), src.state_dict()
    emb, pos = "text_encoder.embed.weight", "text_encoder.pos"
    copied = 0
    with torch.no_grad():
        for k, v in theirs.items():
            if k in (emb, pos):
                continue
            if k not in state or state[k].shape != v.shape:
                raise ValueError(f"init_from {folder}: weight {k} does not fit this run's model")
            state[k].copy_(v)
            copied += 1
        new_words = []
        for i, w in enumerate(model.tokenizer.words):
            j = src.tokenizer.index.get(w)
            if j is None:
                new_words.append(w)
            else:
                state[emb][i].copy_(theirs[emb][j])
        n = min(a.max_text_len, b.max_text_len)
        state[pos][:n].copy_(theirs[pos][:n])
        state[pos][n:].copy_(theirs[pos][n - 1])
    return {"from": str(folder), "tensors": copied + 2, "new_words": new_words,
            "new_positions": max(0, a.max_text_len - b.max_text_len)}


def train_world_generator(cfg: WorldTrainConfig) -> WorldTrainResult:
    """Train the world's text-to-image MMDiT; OUT/ema holds the shippable fp16 weights."""
    cfg.validate()
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    model = MMDiT(SIZES[cfg.model_size](**cfg.model_overrides))
    if cfg.init_from and not (cfg.resume and (out / "checkpoint").exists()):
        info = warm_start(model, cfg.init_from)
        out.mkdir(parents=True, exist_ok=True)
        (out / "init_from.json").write_text(json.dumps(info, indent=1) + "\n")
    val_metas = spread(load_prompt_file("geneval_shapes_val.jsonl"), cfg.val_prompts) if cfg.val_prompts else []

    def validate(step: int, ema: MMDiT) -> None:
        if not val_metas:
            return
        images, summary, _ = evaluate_generator(ema, val_metas, cfg.sample_steps, cfg.cfg_scale, cfg.eval_batch)
        save_grid(images[:96], out / "samples" / f"step_{step:06d}.png")
        if cfg.snapshots:
            ema.save_pretrained(out / "snapshots" / f"step_{step:06d}")
        log = out / "val.jsonl"
        rows = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] < step] if log.exists() else []
        rows.append(json.dumps({"step": step, "scores": summary}))  # a resumed run rewrites its later lines
        log.write_text("".join(r + "\n" for r in rows))
        if summary is not None and cfg.progress:
            from tqdm import tqdm

            cats = " ".join(f"{k[:5]}={v:.2f}" for k, v in summary["categories"].items())
            tqdm.write(f"step {step}: val overall {summary['overall']:.3f} ({cats})")

    result = train_flow_model(cfg, model, world_batches(cfg, model.tokenizer), validate)
    scores = None
    if cfg.final_eval:
        metas = load_prompt_file("geneval_shapes.jsonl")
        metas = spread(metas, cfg.final_eval_prompts) if cfg.final_eval_prompts else metas
        images, scores, nfe = evaluate_generator(result.ema, metas, cfg.sample_steps, cfg.cfg_scale, cfg.eval_batch)
        save_grid(images, out / "samples" / "benchmark.png", columns=24)
        np.savez_compressed(out / "benchmark_samples.npz", images=images)
        report = {"scores": scores, "steps": result.step, "train_minutes": round(result.minutes, 2),
                  "sample_steps": cfg.sample_steps, "cfg_scale": cfg.cfg_scale, "nfe_per_image": nfe,
                  "parameters": count_parameters(result.ema), "prompts": len(metas)}
        (out / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    return WorldTrainResult(train=result, parameters=count_parameters(model), scores=scores)
