"""The world generator's flow-matching training loop, and pieces other trainers share (`TrainConfig`,
`StepBatches`, the EMA and its warm-up, checkpoints). The corrector has its own trainer, shared with
FLUX: train/corrector_common.py.

nanoGPT's shape: one config dataclass, one visible loop, a checkpoint that holds everything needed
to continue exactly (weights, EMA, optimizer, step, config). Exact resume works because nothing
random is carried between steps: batch `s` is a function of (seed, s) (see world.WorldBatches) and
the step's timesteps, noise and text dropout come from a generator seeded with (seed, s).

Run folder:
    OUT/train_config.json     the resolved config
    OUT/log.jsonl             one line per log interval: loss, loss per timestep bin and per
                              category, lr, speed
    OUT/checkpoint/           model.safetensors, ema.safetensors (fp32, config in metadata),
                              optimizer.pt, state.json (step): what `resume` reads
    OUT/ema/                  the EMA weights in fp16 + config.json (the shippable model), written
                              with every checkpoint
    OUT/samples/step_*.png    validation samples
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import IterableDataset, get_worker_info

from ..models.flow import RectifiedFlow, loss_by_bin
from ..world.spec import TAGS

LOSS_BINS = 10


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    model_size: str = "small"
    model_overrides: dict = field(default_factory=dict)  # MMDiTConfig fields, e.g. {"cond_attention": "causal_kv"}
    batch_size: int = 512
    max_steps: int = 20_000
    max_minutes: float | None = None  # wall-clock stop (the lr schedule still follows max_steps)
    lr: float = 8e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * this at max_steps
    warmup_steps: int = 500
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    text_dropout: float = 0.1
    t_mean: float = 0.0
    t_std: float = 1.0
    compile: bool = False
    bf16: bool = True  # autocast on CUDA; CPU runs in fp32
    device: str = "auto"
    seed: int = 0
    num_workers: int = 4
    log_every: int = 100
    ckpt_every: int = 2_000
    sample_every: int = 2_000
    sample_steps: int = 20
    cfg_scale: float = 3.0
    resume: bool = False
    progress: bool = True

    def validate(self) -> TrainConfig:
        for name in ("batch_size", "max_steps", "log_every", "ckpt_every", "sample_every", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.betas = tuple(self.betas)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    images: torch.Tensor  # (B, H, W, 3) uint8
    text: torch.Tensor  # (B, L) int64 token ids
    tags: torch.Tensor  # (B,) int64 index into world.spec.TAGS, for logging


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay after optimizer step `step` (0-based). Warm-up (as in timm/DiT ports): early
    weights are far from the final ones, so a fixed 0.999 would average in the random
    initialisation for thousands of steps."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """fp32 exponential moving average of a model's trainable weights (a full copy, for sampling)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = ema_decay_at(self.decay, step)
        ema, cur = zip(*self._pairs)
        torch._foreach_lerp_(list(ema), [p.detach().float() for p in cur], 1 - d)


DEVICES = "auto, cpu, cuda, cuda:N"


def check_device(name: str, flag: str = "--device") -> None:
    """ValueError (one line naming the flag and what is accepted) unless `name` is a device this
    trainer can use on this machine."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", name):
        raise ValueError(f"{flag} {str(name)[:40]!r}: not a device; accepted: {DEVICES}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: no CUDA device on this machine; accepted here: auto, cpu")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _save_weights(module: nn.Module, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def save_checkpoint(out: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig) -> None:
    """Write OUT/checkpoint atomically (a new folder renamed over the old one)."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"model_config": model.config.to_dict(), "train_config": cfg.to_dict(), "step": step}
    _save_weights(model, tmp / "model.safetensors", meta)
    _save_weights(ema.model, tmp / "ema.safetensors", meta)
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "model_config": model.config.to_dict()}, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    ck = out / "checkpoint"
    state = json.loads((ck / "state.json").read_text())
    if state["model_config"] != model.config.to_dict():
        raise ValueError(f"{ck}: the checkpoint's model config differs from this run's; resume with the same "
                         "model_size and model_overrides, or start a new out_dir")
    model.load_state_dict(load_file(str(ck / "model.safetensors")))
    ema.model.load_state_dict(load_file(str(ck / "ema.safetensors")))
    opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"])
    return int(state["step"])


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    step: int  # steps done in total (resumed ones included)
    minutes: float  # wall time of this call's training steps (validation excluded)
    last_loss: float
    ema: nn.Module


Validate = Callable[[int, nn.Module], None]  # (step, EMA model) -> writes samples/scores


def save_ema_model(out: Path, ema: nn.Module) -> None:
    """The shippable weights: the whole EMA model in fp16 (OUT/ema), loadable with from_pretrained."""
    ema.save_pretrained(out / "ema")


def train_flow_model(cfg: TrainConfig, model: nn.Module, batches: Callable[[int], Iterator[Batch]],
                     validate: Validate | None = None) -> TrainResult:
    """Train the MMDiT `model` with the rectified-flow loss on `batches(start_step)`; checkpoints
    (and OUT/ema), logs the loss per timestep bin and per GenEval category (`Batch.tags`), resumes."""
    from tqdm import tqdm

    cfg.validate()
    out = Path(cfg.out_dir)
    if (out / "checkpoint").exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a checkpoint; pass resume=True to continue it or pick another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    dev = resolve_device(cfg.device)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=dev.type == "cuda")
    ema = EMA(model, cfg.ema_decay)
    step = 0
    if cfg.resume and (out / "checkpoint").exists():
        step = load_checkpoint(out, model, ema, opt)
    _trim_log(out / "log.jsonl", step)
    flow = RectifiedFlow(model, model.tokenizer([""]).to(dev)[0], cfg.text_dropout, cfg.t_mean, cfg.t_std)
    fwd = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    gen = torch.Generator(device=dev)

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not cfg.progress)
    acc_loss = torch.zeros((), device=dev)
    acc_bins = torch.zeros(LOSS_BINS, device=dev)
    acc_counts = torch.zeros(LOSS_BINS, device=dev)
    acc_tags = torch.zeros(2, len(TAGS), device=dev)  # per-category loss sums and counts
    acc_n, last_loss, paused = 0, float("nan"), 0.0  # paused: seconds spent validating
    t_start = t_log = time.perf_counter()

    def minutes() -> float:
        return (time.perf_counter() - t_start - paused) / 60

    it = batches(step)
    while step < cfg.max_steps and (cfg.max_minutes is None or minutes() < cfg.max_minutes):
        b = next(it)
        x0 = to_model_space(b.images.to(dev, non_blocking=True))  # (B, 3, H, W)
        text = b.text.to(dev, non_blocking=True)  # (B, L)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        gen.manual_seed(step_seed(cfg.seed, step))
        with autocast:
            res = flow.loss(x0, text, generator=gen, model=fwd)
        res.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(step)
        step += 1
        bar.update(1)
        s, c = loss_by_bin(res.t, res.per_sample, LOSS_BINS)
        acc_loss += res.loss.detach()
        acc_bins += s
        acc_counts += c
        tags = b.tags.to(dev, non_blocking=True)
        acc_tags[0].index_add_(0, tags, res.per_sample.detach().float())
        acc_tags[1].index_add_(0, tags, torch.ones_like(res.per_sample, dtype=torch.float))
        acc_n += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last_loss = (acc_loss / acc_n).item()  # the one host sync per interval
            now = time.perf_counter()
            row = {"step": step, "loss": round(last_loss, 5), "lr": lr_at(step - 1, cfg),
                   "img_per_s": round(acc_n * cfg.batch_size / (now - t_log), 1),
                   "loss_by_t_bin": [round(v, 4) for v in (acc_bins / acc_counts.clamp(min=1)).tolist()],
                   "loss_by_tag": {t: round(v, 4) for t, v in
                                   zip(TAGS, (acc_tags[0] / acc_tags[1].clamp(min=1)).tolist())},
                   "train_minutes": round(minutes(), 3)}
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{row['img_per_s']:.0f}")
            for acc in (acc_loss, acc_bins, acc_counts, acc_tags):
                acc.zero_()
            acc_n, t_log = 0, now
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(out, model, ema, opt, step, cfg)
            save_ema_model(out, ema.model)
        if validate is not None and step % cfg.sample_every == 0 and step < cfg.max_steps:
            t0 = time.perf_counter()
            validate(step, ema.model)
            paused += time.perf_counter() - t0
            t_log += time.perf_counter() - t0
    bar.close()
    if step % cfg.ckpt_every and step != cfg.max_steps:  # stopped by the clock: keep what was done
        save_checkpoint(out, model, ema, opt, step, cfg)
        save_ema_model(out, ema.model)
    return TrainResult(step=step, minutes=minutes(), last_loss=last_loss, ema=ema.model)


class StepBatches(IterableDataset):
    """Batches as a pure function of the step: `batch_at(step)`. DataLoader workers take steps
    start, start + n, ... in turn, so the data order is the same with any number of workers and a
    resumed run continues exactly where it stopped. Subclasses set `start_step` and `batch_at`."""

    start_step: int = 0

    def batch_at(self, step: int):
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + wid
        while True:
            yield self.batch_at(step)
            step += n
