"""The one training loop of the Shapes world's models, and pieces other trainers share.

`start_run` and `run_loop` train the world generator (`train_flow_model`, the flow-matching loss;
train/world.py), the learned verifier (train/verifier.py) and the learned reflector
(train/reflector.py): each passes its model, its data, the loss of one batch and its validation.
`TrainConfig`, `StepBatches`, the EMA and its warm-up, `lr_at`, `open_run_folder`, `append_log` and
`trim_log` are also the real-scale VLM trainers' (train/vlm_common.py); the corrector has its own
trainer, shared with FLUX: train/corrector_common.py.

nanoGPT's shape: one config dataclass, one visible loop, a checkpoint that holds everything needed
to continue exactly (weights, EMA, optimizer, step, config). Exact resume works because nothing
random is carried between steps: batch `s` is a function of (seed, s) (see world.WorldBatches,
verifier.VerifierData) and the world generator's timesteps, noise and text dropout come from a
torch.Generator seeded with (seed, s). Statistics stay on the device between log lines (one host sync per line).

Run folder:
    OUT/train_config.json     the resolved config
    OUT/log.jsonl             one line per log interval: step, loss, lr, the trainer's statistics
                              (the generator's: speed, loss per timestep bin and per category),
                              train_minutes, validation scores (the judges')
    OUT/checkpoint/           model.safetensors, ema.safetensors (fp32, config in metadata),
                              optimizer.pt, state.json (step): what `resume` reads
    OUT/ema/, OUT/verifier/,  the EMA model's save_pretrained (the shippable weights + config.json;
    OUT/reflector/            the generator's in fp16), written with every checkpoint
    OUT/samples/step_*.png    the generator's validation samples
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
from ..runtime import DEVICES, check_device, resolve_device, to_model_space, to_uint8  # noqa: F401
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


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------
# The run folder and the loop


def open_run_folder(cfg, write: bool = True) -> Path:
    """Validate `cfg`, refuse to start over a checkpoint unless resuming, and (with `write`: the
    main process) make the folder and record the resolved config in OUT/train_config.json."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if (out / "checkpoint").exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a checkpoint; pass resume=True to continue it or pick another out_dir")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    return out


def append_log(out: Path, row: dict) -> None:
    """One line of OUT/log.jsonl (the run's whole story; `trim_log` cuts it back on resume)."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@dataclass
class Run:
    out: Path
    device: torch.device
    model: nn.Module
    opt: torch.optim.Optimizer
    ema: EMA
    step: int  # steps done (the checkpoint's on resume); run_loop advances it


def start_run(cfg: TrainConfig, model: nn.Module | Callable[[], nn.Module]) -> Run:
    """Validate, make (or resume) the run folder, put the model (or what `model()` builds, after
    seeding torch with cfg.seed) on the device, make AdamW (fused on CUDA) and the EMA, and on
    resume restore all three from OUT/checkpoint."""
    out = open_run_folder(cfg)
    dev = resolve_device(cfg.device)
    if not isinstance(model, nn.Module):
        torch.manual_seed(cfg.seed)
        model = model()
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=dev.type == "cuda")
    ema = EMA(model, cfg.ema_decay)
    step = load_checkpoint(out, model, ema, opt) if cfg.resume and (out / "checkpoint").exists() else 0
    trim_log(out / "log.jsonl", step)
    return Run(out, dev, model, opt, ema, step)


@dataclass
class TrainResult:
    step: int  # steps done in total (resumed ones included)
    minutes: float  # wall time of this call's training steps (validation excluded)
    last_loss: float
    ema: nn.Module
    val: dict = field(default_factory=dict)  # the last validation scores (empty without any)


Stats = dict  # name -> float, or a scalar or 1-D tensor (left on its device until the log line)
BatchLoss = Callable[[object, int], tuple[torch.Tensor, Stats]]  # (batch, step) -> (loss, stats)
Summarize = Callable[[dict, int, float], dict]  # (stat sums, steps, seconds) -> row fields
Validate = Callable[[int, nn.Module], dict | None]  # (step, EMA model) -> scores (or files only)


def _to_host(sums: dict, device: torch.device) -> dict:
    """The accumulated sums as floats and lists, with one device-to-host copy for all tensors."""
    keys = [k for k, v in sums.items() if torch.is_tensor(v)]
    flat = torch.cat([sums[k].reshape(-1).to(device) for k in keys]).tolist() if keys else []
    out, i = {}, 0
    for k, v in sums.items():
        if torch.is_tensor(v):
            vals, i = flat[i : i + v.numel()], i + v.numel()
            out[k] = vals[0] if v.dim() == 0 else vals
        else:
            out[k] = v
    return out


def mean_stats(sums: dict, n: int, seconds: float) -> dict:
    """The default row fields: every statistic's mean over the log interval."""
    return {k: [round(x / n, 5) for x in v] if isinstance(v, list) else round(v / n, 5)
            for k, v in sums.items() if k != "loss"}


def run_loop(cfg: TrainConfig, run: Run, batches: Iterator, batch_loss: BatchLoss, *, export: str,
             summarize: Summarize | None = None, validate: Validate | None = None,
             validate_every: int | None = None, desc: str = "train") -> TrainResult:
    """Train `run` until cfg.max_steps or cfg.max_minutes: warm-up/cosine lr, clip, AdamW, EMA.

    `batch_loss(next(batches), step)` returns the loss and statistics (floats, or tensors summed on
    their device: the one host sync is at a log line). Every `log_every` steps (and the last)
    OUT/log.jsonl gets a row: step, loss, lr, `summarize(sums, steps, seconds)` (default: each
    statistic's mean), train_minutes, and the validation scores of that step. `validate(step, EMA
    model)` runs at every log line (`validate_every` None) or every `validate_every` steps before
    the last; its time is off the clock (train_minutes, max_minutes, speeds). Every `ckpt_every`
    steps, the last, and when the clock stops the run: OUT/checkpoint and OUT/<export> (the EMA
    model's `save_pretrained`)."""
    from tqdm import tqdm

    out, model, opt, ema = run.out, run.model, run.opt, run.ema
    params = [p for p in model.parameters() if p.requires_grad]
    summarize = summarize or mean_stats
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=desc, unit="step", disable=not cfg.progress)
    sums: dict = {}
    n, last_loss, val, paused = 0, float("nan"), {}, 0.0  # paused: seconds spent validating
    t_start = t_log = time.perf_counter()

    def minutes() -> float:
        return (time.perf_counter() - t_start - paused) / 60

    def save() -> None:
        save_checkpoint(out, model, ema, opt, run.step, cfg)
        ema.model.save_pretrained(out / export)

    while run.step < cfg.max_steps and (cfg.max_minutes is None or minutes() < cfg.max_minutes):
        step = run.step
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, stats = batch_loss(batch, step)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(step)
        run.step = step = step + 1
        bar.update(1)
        for k, v in {"loss": loss, **stats}.items():
            sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        n += 1
        logs = step % cfg.log_every == 0 or step == cfg.max_steps
        due = logs if validate_every is None else step % validate_every == 0 and step < cfg.max_steps
        scores = None
        if validate is not None and due:
            t0 = time.perf_counter()
            scores = validate(step, ema.model)
            model.train()
            paused += time.perf_counter() - t0
            t_log += time.perf_counter() - t0
            if scores is not None:
                val = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
        if logs:
            host = _to_host(sums, run.device)  # the one host sync per interval
            now = time.perf_counter()
            last_loss = host["loss"] / n
            row = {"step": step, "loss": round(last_loss, 5), "lr": lr_at(step - 1, cfg),
                   **summarize(host, n, now - t_log), "train_minutes": round(minutes(), 3),
                   **(val if scores is not None else {})}
            append_log(out, row)
            extra = {"img_s": f"{row['img_per_s']:.0f}"} if "img_per_s" in row else {}
            bar.set_postfix(loss=f"{last_loss:.4f}", **extra, **{k: f"{v}" for k, v in val.items()})
            sums, n, t_log = {}, 0, now
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save()
    bar.close()
    if run.step % cfg.ckpt_every and run.step != cfg.max_steps:  # stopped by the clock: keep what was done
        save()
    return TrainResult(step=run.step, minutes=minutes(), last_loss=last_loss, ema=ema.model, val=val)


# ----------------------------------------------------------------------------------------------
# The world generator's flow-matching loss


def train_flow_model(cfg: TrainConfig, model: nn.Module, batches: Callable[[int], Iterator[Batch]],
                     validate: Validate | None = None) -> TrainResult:
    """Train the MMDiT `model` with the rectified-flow loss on `batches(start_step)` through
    `run_loop`: logs the loss per timestep bin and per GenEval category (`Batch.tags`), validates
    every `sample_every` steps, exports OUT/ema, resumes."""
    run = start_run(cfg, model)
    dev = run.device
    flow = RectifiedFlow(model, model.tokenizer([""]).to(dev)[0], cfg.text_dropout, cfg.t_mean, cfg.t_std)
    fwd = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    gen = torch.Generator(device=dev)

    def batch_loss(b: Batch, step: int) -> tuple[torch.Tensor, Stats]:
        x0 = to_model_space(b.images.to(dev, non_blocking=True))  # (B, 3, H, W)
        text = b.text.to(dev, non_blocking=True)  # (B, L)
        gen.manual_seed(step_seed(cfg.seed, step))  # timesteps, noise, text dropout: from (seed, step)
        with autocast:
            res = flow.loss(x0, text, generator=gen, model=fwd)
        bin_sum, bin_count = loss_by_bin(res.t, res.per_sample, LOSS_BINS)
        tags = b.tags.to(dev, non_blocking=True)
        per = res.per_sample.detach().float()
        tag_sum = torch.zeros(len(TAGS), device=dev).index_add_(0, tags, per)
        tag_count = torch.zeros(len(TAGS), device=dev).index_add_(0, tags, torch.ones_like(per))
        return res.loss, {"bin_sum": bin_sum, "bin_count": bin_count, "tag_sum": tag_sum, "tag_count": tag_count}

    def summarize(sums: dict, n: int, seconds: float) -> dict:
        def mean(a: str, c: str) -> list[float]:
            return [round(s / max(k, 1.0), 4) for s, k in zip(sums[a], sums[c])]

        return {"img_per_s": round(n * cfg.batch_size / seconds, 1),
                "loss_by_t_bin": mean("bin_sum", "bin_count"),
                "loss_by_tag": dict(zip(TAGS, mean("tag_sum", "tag_count")))}

    return run_loop(cfg, run, batches(run.step), batch_loss, export="ema", summarize=summarize,
                    validate=validate, validate_every=cfg.sample_every, desc="train")


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
