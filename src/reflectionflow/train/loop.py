"""The one training loop of every trainer, and the pieces they share.

`start_run` and `run_loop` train every model of the project: the world generator
(`train_flow_model`, the flow-matching loss; train/world.py), the world's learned verifier
(train/verifier.py) and reflector (train/reflector.py), the reflection corrector of both scales
(train/corrector_common.py, for train/corrector.py and train/flux_corrector.py) and the real-scale
VLM judges (train/vlm_common.py, for train/vlm_verifier.py and train/vlm_reflector.py). Each passes
its model, its data, the loss of one batch and, as `LoopHooks`, what it does otherwise: its log
row and where rows go, its validation and where the scores go, whether `max_minutes` ends the run
or interrupts it, `stop_after`.

nanoGPT's shape: one config dataclass, one visible loop, a checkpoint that holds everything needed
to continue exactly (weights, EMA, optimizer, step, RNG and data state, config). Exact resume works
because nothing random is carried between steps: batch `s` is a function of (seed, s) (see
world.WorldBatches, verifier.VerifierData) or comes from a source whose position the checkpoint
holds (GenRef readers), and the step's noise comes from a torch.Generator seeded with (seed, s).
Statistics stay on the device between log lines (one host sync per line).

One process, or several (and gradient accumulation) through accelerate: `Run.procs` is an
`accelerate.Accelerator` (the correctors, the VLM judges) or `OneProcess`, its single-process
stand-in (the world's generator and judges).

Run folder:
    OUT/train_config.json     the resolved config
    OUT/log.jsonl             one line per log interval: step, loss, lr, the trainer's statistics
                              (the generator's: speed, loss per timestep bin and per category),
                              train_minutes, validation scores (the world judges')
    OUT/checkpoint/           what `resume` reads, one format for every trainer (`Checkpoint`):
      <weights>.safetensors   the trained parameters, fp32: model (the world's models, all of it),
                              adapters (a corrector's LoRA), trainable (a VLM judge's LoRA and head)
      ema.safetensors         their EMA (when the run keeps one)
      optimizer.pt            {"optimizer": state_dict, "step": step}
      scheduler.pt            the lr schedule at the step (LambdaLR's state_dict layout; the lr is
                              a function of the step and the config, so resume recomputes it)
      state.json              step, processes, and the trainer's fields (its config)
      rank_<r>.pt             per process: RNG states and the data source's state
                              The .pt files hold tensors and plain data only and load with
                              weights_only=True (nothing in a checkpoint can run code).
    OUT/ema/, OUT/verifier/,  the EMA model's save_pretrained (the shippable weights + config.json;
    OUT/reflector/            the generator's in fp16), written with every checkpoint
    OUT/samples/step_*.png    the generator's validation samples
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import IterableDataset, get_worker_info

from ..models.flow import RectifiedFlow, loss_by_bin
from ..runtime import DEVICES, check_device, resolve_device, to_model_space, to_uint8  # noqa: F401
from ..world.spec import TAGS

LOSS_BINS = 10
OPTIMIZERS = ("adamw", "prodigy")
LR_SCHEDULES = ("constant", "cosine")


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


def lr_at(step: int, cfg) -> float:
    """The lr of step `step` (0-based), the one schedule of every trainer: linear warm-up over
    cfg.warmup_steps, then constant (cfg.lr_schedule "constant") or cosine (the default, and the
    only schedule of configs without lr_schedule) down to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if getattr(cfg, "lr_schedule", "cosine") == "constant":
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of a step's random draws (noise, timesteps, dropout) on process `rank`."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 12_345) % (2**63 - 1)


def make_optimizer(cfg, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or Prodigy for configs with optimizer "prodigy" (the corrector's
    default, OminiControl's settings; needs the prodigyopt package)."""
    if getattr(cfg, "optimizer", "adamw") == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                       use_bias_correction=True, safeguard_warmup=True)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay after optimizer step `step` (0-based). Warm-up (as in timm/DiT ports): early
    weights are far from the final ones, so a fixed 0.999 would average in the random
    initialisation for thousands of steps."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """fp32 exponential moving average of a model's trained parameters (`shadow`, by name).

    When every parameter trains (the world's models) the EMA is a full fp32 copy of the model,
    `model`, to sample, validate and export with. When only some do (a corrector's adapters on a
    frozen base) it holds those only and `applied()` swaps them into the model for validation and
    export (a copy of a frozen FLUX transformer would double its memory); `model` is None."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = list(model.named_parameters())
        self.params = {n: p for n, p in named if p.requires_grad}
        self.model: nn.Module | None = None
        if len(self.params) == len(named):
            self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
            mine = dict(self.model.named_parameters())
            self.shadow = {n: mine[n] for n in self.params}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach().float() for p in self.params.values()],
                             1 - ema_decay_at(self.decay, step))

    @contextmanager
    def applied(self):
        """The EMA weights in the model inside the block, the trained ones after (adapter EMAs)."""
        if self.model is not None:
            yield
            return
        with torch.no_grad():
            trained = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])


# ----------------------------------------------------------------------------------------------
# Processes


class OneProcess:
    """One process on one device: the part of accelerate's Accelerator that `start_run` and
    `run_loop` use, for trainers that run without accelerate."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    sync_gradients = True
    gradient_accumulation_steps = 1

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, *objects):
        return objects

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def accumulate(self, *models):
        return nullcontext()

    def wait_for_everyone(self) -> None:
        pass

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def print(self, *args) -> None:
        print(*args)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain data (what torch.load(weights_only=True) reads back)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_plain(path: Path) -> dict:
    """A checkpoint's .pt file, read with weights_only=True: tensors and plain data, never code. A file
    holding anything else (an older format, or a crafted file) is refused with one line naming it."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; the checkpoint is incomplete (resume from a whole checkpoint or start "
                         "a new --out)") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not loadable as tensors and plain data ({first}); it was written by an older "
                         "version or not by this trainer, and is not unpickled (that could run code): start a new "
                         "--out") from None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def _restore(path: Path, into: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's tensors into `into` (same names and shapes, else a ValueError)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    if {n: tuple(t.shape) for n, t in saved.items()} != {n: tuple(p.shape) for n, p in into.items()}:
        differ = sorted(set(saved) ^ set(into))[:2]
        raise ValueError(f"{path}: the checkpoint's trainable weights differ from this run's (names or shapes"
                         + (f", e.g. {differ}" if differ else "") + "); resume with the same model, tuning and "
                         "adapter settings or start a new out_dir")
    with torch.no_grad():
        for n, p in into.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def schedule_state(cfg, step: int, groups: int) -> dict:
    """The lr schedule after `step` steps in LambdaLR's state_dict layout (scheduler.pt)."""
    return {"base_lrs": [cfg.lr] * groups, "last_epoch": step, "_last_lr": [lr_at(step, cfg)] * groups,
            "lr_lambdas": [None] * groups}


@dataclass
class Checkpoint:
    """OUT/checkpoint, the one format of every trainer (see the module's docstring), written as
    OUT/checkpoint.tmp (every process its rank_<r>.pt) and renamed by the main process, so a crash
    never leaves half a checkpoint. What differs between trainers is data: the weights file's
    name, the trainer's fields of state.json (also the weights' safetensors metadata, beside the
    step), which of them a resume must match, and the data source whose state each process keeps."""

    weights: str = "model"
    info: dict = field(default_factory=dict)  # JSON-able: the trainer's config, the model's config
    same: tuple[str, ...] = ()  # fields of `info` a resume must match (else a ValueError naming them)
    source: object | None = None  # state_dict() / load_state_dict(state): this process's data position

    def save(self, run: Run, cfg) -> None:
        procs, step = run.procs, run.step
        tmp, final, old = run.out / "checkpoint.tmp", run.out / "checkpoint", run.out / "checkpoint.old"
        if procs.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        procs.wait_for_everyone()
        source = self.source.state_dict() if self.source is not None else {}
        torch.save({"rng": _rng_state(), "source": source}, tmp / f"rank_{procs.process_index}.pt")
        procs.wait_for_everyone()
        if procs.is_main_process:
            meta = {"step": step, **self.info}
            _save_tensors(run.trained(), tmp / f"{self.weights}.safetensors", meta)
            if run.ema is not None:
                _save_tensors(run.ema.shadow, tmp / "ema.safetensors", meta)
            torch.save({"optimizer": run.opt.state_dict(), "step": step}, tmp / "optimizer.pt")
            torch.save(schedule_state(cfg, step, len(run.opt.param_groups)), tmp / "scheduler.pt")
            state = {"step": step, "processes": procs.num_processes, **self.info}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        procs.wait_for_everyone()

    def load(self, run: Run) -> int:
        """Restore `run` from OUT/checkpoint and return its step. Also reads the layouts written before
        this format: a bare optimizer state_dict, state.json's world_size, rank files' "reader" (the
        correctors'), data_<r>.json (the VLM judges'), no rank file (the world's)."""
        procs, ck = run.procs, run.out / "checkpoint"
        state = json.loads((ck / "state.json").read_text())
        saved_by = state.get("processes", state.get("world_size", 1))
        if saved_by != procs.num_processes:
            raise ValueError(f"{ck}: saved by {saved_by} process(es), resumed by {procs.num_processes}; exact "
                             "resume needs the same number (each process continues its own data)")
        for k in self.same:
            if state.get(k) != self.info[k]:
                raise ValueError(f"{ck}: the checkpoint's {k} differs from this run's; resume with the same "
                                 "settings or start a new out_dir")
        _restore(ck / f"{self.weights}.safetensors", run.trained())
        if run.ema is not None:
            _restore(ck / "ema.safetensors", run.ema.shadow)
        opt = load_plain(ck / "optimizer.pt")
        run.opt.load_state_dict(opt["optimizer"] if "optimizer" in opt else opt)
        rank, source = ck / f"rank_{procs.process_index}.pt", {}
        if rank.is_file():
            mine = load_plain(rank)
            source = mine.get("source", mine.get("reader", {}))
            _set_rng_state(mine["rng"])
        elif (ck / f"data_{procs.process_index}.json").is_file():
            source = json.loads((ck / f"data_{procs.process_index}.json").read_text())
        if self.source is not None:
            self.source.load_state_dict(source)
        return int(state["step"])


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------
# The run folder and the loop


def refuse_overwrite(cfg) -> Path:
    """OUT, unless it holds a checkpoint and cfg.resume is off (a ValueError then)."""
    out = Path(cfg.out_dir)
    if (out / "checkpoint").exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a checkpoint; pass resume=True (--resume) to continue it or pick "
                         "another out_dir")
    return out


def open_run_folder(cfg, write: bool = True) -> Path:
    """Validate `cfg`, refuse to start over a checkpoint unless resuming, and (with `write`: the
    main process) make the folder and record the resolved config in OUT/train_config.json."""
    cfg.validate()
    out = refuse_overwrite(cfg)
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
    model: nn.Module  # what trains (accelerate-prepared: DDP-wrapped over several processes)
    opt: torch.optim.Optimizer
    ema: EMA | None
    step: int  # steps done (the checkpoint's on resume); run_loop advances it
    procs: object  # accelerate.Accelerator, or OneProcess
    checkpoint: Checkpoint

    @property
    def unwrapped(self) -> nn.Module:
        return self.procs.unwrap_model(self.model)

    def trained(self) -> dict[str, nn.Parameter]:
        """The trained parameters by name (the checkpoint's weights)."""
        return {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}


def start_run(cfg, model: nn.Module | Callable[[], nn.Module], procs=None, checkpoint: Checkpoint | None = None,
              ema: bool = True) -> Run:
    """Validate, make (or resume) the run folder, put the model (or what `model()` builds, after
    seeding torch with cfg.seed) on the device, make the optimizer (`make_optimizer`) and, with
    `ema`, the EMA (cfg.ema_decay), hand model and optimizer to `procs` (an accelerate Accelerator:
    DDP over several processes; default: `OneProcess` on cfg.device), and on resume restore them
    and the rest from OUT/checkpoint. `checkpoint` names the weights file, the trainer's fields and
    the data source (default: the whole model's, its config to match on resume)."""
    procs = procs or OneProcess(resolve_device(cfg.device))
    out = open_run_folder(cfg, write=procs.is_main_process)
    procs.wait_for_everyone()
    if not isinstance(model, nn.Module):
        torch.manual_seed(cfg.seed)
        model = model()
    model.to(procs.device).train()
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], procs.device)
    average = EMA(model, cfg.ema_decay) if ema else None
    if checkpoint is None:
        checkpoint = Checkpoint("model", {"model_config": model.config.to_dict(), "train_config": cfg.to_dict()},
                                same=("model_config",))
    model, opt = procs.prepare(model, opt)
    run = Run(out, procs.device, model, opt, average, 0, procs, checkpoint)
    if cfg.resume and (out / "checkpoint").exists():
        run.step = checkpoint.load(run)
    if procs.is_main_process:
        trim_log(out / "log.jsonl", run.step)
    return run


@contextmanager
def scoring_model(run: Run):
    """The model to validate and export with: the EMA's copy, the model with the EMA's weights
    swapped in (adapter EMAs), or the model itself (no EMA)."""
    if run.ema is not None and run.ema.model is not None:
        yield run.ema.model
    elif run.ema is not None:
        with run.ema.applied():
            yield run.unwrapped
    else:
        yield run.unwrapped


@dataclass
class TrainResult:
    step: int  # steps done in total (resumed ones included)
    minutes: float  # wall time of this call's training steps (validation excluded)
    last_loss: float
    ema: nn.Module | None  # the EMA model (a full copy; None for adapter EMAs and runs without EMA)
    val: dict = field(default_factory=dict)  # the last validation scores (empty without any)
    losses: list[float] = field(default_factory=list)  # the mean loss of every log row of this call


@dataclass
class Interval:
    """One log interval, as a row function sees it."""

    step: int  # the step just done
    sums: dict  # "loss" and every statistic summed over the interval's batches and processes (floats, lists)
    batches: int  # batches summed per process (steps x gradient accumulation)
    processes: int
    seconds: float  # wall time of the interval, validation excluded
    saving: float  # of which writing checkpoints
    minutes: float  # train_minutes: the training time of this call so far
    lr: float  # the lr of the interval's last step
    loss: float  # the mean loss


Stats = dict  # name -> float, or a scalar or 1-D tensor (left on its device until the log line)
BatchLoss = Callable[[object, int], tuple[torch.Tensor, Stats]]  # (batch, step) -> (loss, stats)
Row = Callable[[Interval], dict]  # a log interval -> its row of log.jsonl
Validate = Callable[[int, nn.Module], dict | None]  # (step, model to score) -> scores (or files only)


def mean_stats(sums: dict, n: int) -> dict:
    """Every statistic's mean over `n` batches (the loss left out)."""
    return {k: [round(x / n, 5) for x in v] if isinstance(v, list) else round(v / n, 5)
            for k, v in sums.items() if k != "loss"}


def log_row(iv: Interval, **fields) -> dict:
    """A row of log.jsonl: step, loss, lr, `fields`, train_minutes."""
    return {"step": iv.step, "loss": round(iv.loss, 5), "lr": iv.lr, **fields, "train_minutes": round(iv.minutes, 3)}


def mean_row(iv: Interval) -> dict:
    """The default row: step, loss, lr, every statistic's mean, train_minutes."""
    return log_row(iv, **mean_stats(iv.sums, iv.batches * iv.processes))


@dataclass
class LoopHooks:
    """What a trainer changes in `run_loop`; every field may stay unset."""

    row: Row | None = None  # the log row (default: `mean_row`); called on every process
    log: Callable[[dict], None] | None = None  # where a row goes (default: OUT/log.jsonl, main process)
    validate: Validate | None = None  # runs on every process, on `scoring_model`, off the clock
    validate_every: int | None = None  # steps (default: at every log row)
    validate_last: bool = True  # also at the run's end (the generator: no, it ends with its own evaluation)
    # Where scores go: (step, scores), called where they are not None. Default: they join that
    # step's log row and the result, floats rounded to 4 digits.
    log_validation: Callable[[int, dict], None] | None = None
    clock_ends_run: bool = False  # max_minutes ends the run (last row, checkpoint, validation); else it
    #                               interrupts it (a checkpoint only, as at a preemption)
    clock_counts_validation: bool = False  # max_minutes and train_minutes count validation time too
    stop_after: int | None = None  # end this call after that many steps with a checkpoint only (a preempted job)


def _to_host(sums: dict, procs) -> dict:
    """The accumulated sums as floats and lists, summed over processes, with one device-to-host copy
    (and one all-reduce) for all of them."""
    several = procs.num_processes > 1
    keys = [k for k, v in sums.items() if torch.is_tensor(v) or several]
    parts = [torch.as_tensor(sums[k], dtype=torch.float32, device=procs.device) for k in keys]
    flat = torch.cat([p.reshape(-1) for p in parts]) if parts else None
    if flat is not None and several:
        flat = procs.reduce(flat, "sum")
    flat = flat.tolist() if flat is not None else []
    out, i, shapes = {}, 0, dict(zip(keys, parts))
    for k, v in sums.items():
        if k in shapes:
            p = shapes[k]
            vals, i = flat[i : i + p.numel()], i + p.numel()
            out[k] = vals[0] if p.dim() == 0 else vals
        else:
            out[k] = v
    return out


def run_loop(cfg, run: Run, batches: Iterator, batch_loss: BatchLoss, *, export: str | Callable[[int], None] | None,
             hooks: LoopHooks | None = None, desc: str = "train") -> TrainResult:
    """Train `run` until cfg.max_steps or cfg.max_minutes: warm-up/cosine lr (`lr_at`), clip, the
    optimizer, the EMA; several processes and gradient accumulation through `run.procs`.

    A step takes `procs.gradient_accumulation_steps` batches: `batch_loss(next(batches), step)`
    returns the loss and statistics (floats, or tensors summed on their device: the one host sync
    is at a log row). Every `log_every` steps (and at the end) a row (`hooks.row`, default: step,
    loss, lr, each statistic's mean, train_minutes) goes to `hooks.log` (default OUT/log.jsonl).
    Every `ckpt_every` steps, at the end and when stopped: OUT/checkpoint, then `export` with the
    EMA weights: a folder name (OUT/<export>: the scoring model's `save_pretrained`) or a function
    of the step (main process). Then `hooks.validate(step, scoring model)` when due; its time is
    off the clock (train_minutes, max_minutes, speeds). The end is max_steps (and with
    `hooks.clock_ends_run`, max_minutes); else max_minutes and `hooks.stop_after` stop the run with
    a checkpoint only."""
    from tqdm import tqdm

    hooks = hooks or LoopHooks()
    procs, model, opt, ema = run.procs, run.model, run.opt, run.ema
    params = [p for p in model.parameters() if p.requires_grad]
    make_row = hooks.row or mean_row
    log = hooks.log or (lambda row: append_log(run.out, row) if procs.is_main_process else None)
    every = hooks.validate_every or cfg.log_every
    merge = hooks.log_validation is None  # validation scores join the step's row
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=desc, unit="step",
               disable=not (cfg.progress and procs.is_main_process))
    sums: dict = {}
    n, done, saved, last_loss, losses, val = 0, 0, run.step, float("nan"), [], {}
    paused = saving = 0.0  # paused: seconds validating; saving: seconds writing checkpoints this interval
    t_start = t_log = time.perf_counter()

    def minutes() -> float:
        return (time.perf_counter() - t_start - paused) / 60

    def out_of_time() -> bool:
        return cfg.max_minutes is not None and minutes() >= cfg.max_minutes

    def save() -> None:
        nonlocal saved, saving
        t0 = time.perf_counter()
        run.checkpoint.save(run, cfg)
        if export is not None:
            if procs.is_main_process:
                with scoring_model(run) as m:
                    export(run.step) if callable(export) else m.save_pretrained(run.out / export)
            procs.wait_for_everyone()
        saved, saving = run.step, saving + time.perf_counter() - t0

    def score(step: int) -> dict | None:
        nonlocal paused, t_log
        t0 = time.perf_counter()
        model.eval()
        with scoring_model(run) as m:
            scores = hooks.validate(step, m)
        model.train()
        procs.wait_for_everyone()
        took = time.perf_counter() - t0
        paused += 0.0 if hooks.clock_counts_validation else took
        t_log += took
        return scores

    model.train()
    while run.step < cfg.max_steps:
        if not hooks.clock_ends_run and out_of_time():
            break
        step = run.step
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for _ in range(procs.gradient_accumulation_steps):
            batch = next(batches)
            with procs.accumulate(model):
                loss, stats = batch_loss(batch, step)
                procs.backward(loss)
                if procs.sync_gradients:
                    if cfg.grad_clip > 0:
                        procs.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
            n += 1
        if ema is not None:
            ema.update(step)
        run.step = step = step + 1
        done += 1
        bar.update(1)
        end = step >= cfg.max_steps or (hooks.clock_ends_run and out_of_time())
        pause = not end and hooks.stop_after is not None and done >= hooks.stop_after
        row = None
        if step % cfg.log_every == 0 or end:
            host = _to_host(sums, procs)  # the one host sync per interval
            now = time.perf_counter()
            last_loss = host["loss"] / (n * procs.num_processes)
            row = make_row(Interval(step, host, n, procs.num_processes, now - t_log, saving, minutes(),
                                    lr_at(step - 1, cfg), last_loss))
            losses.append(last_loss)
            sums, n, t_log, saving = {}, 0, now, 0.0
            if not merge:
                log(row)
        if step % cfg.ckpt_every == 0 or end or pause:
            save()
        if hooks.validate is not None and (step % every == 0 or end) and (hooks.validate_last or step < cfg.max_steps):
            scores = score(step)
            if scores is not None and merge:
                val = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
                row = row if row is None else {**row, **val}
            elif scores is not None:
                val = scores
                hooks.log_validation(step, scores)
        if row is not None:
            if merge:
                log(row)
            shown = {k: f"{v}" for k, v in val.items() if k != "step" and isinstance(v, (int, float))}
            extra = {"img_s": f"{row['img_per_s']:.0f}"} if "img_per_s" in row else {}
            bar.set_postfix(loss=f"{last_loss:.4f}", **extra, **shown)
        if end or pause:
            break
    bar.close()
    if saved != run.step:  # stopped by the clock between checkpoints: keep what was done
        save()
    return TrainResult(step=run.step, minutes=minutes(), last_loss=last_loss,
                       ema=ema.model if ema is not None else None, val=val, losses=losses)


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

    def row(iv: Interval) -> dict:
        def mean(a: str, c: str) -> list[float]:
            return [round(s / max(k, 1.0), 4) for s, k in zip(iv.sums[a], iv.sums[c])]

        return log_row(iv, img_per_s=round(iv.batches * cfg.batch_size / iv.seconds, 1),
                       loss_by_t_bin=mean("bin_sum", "bin_count"),
                       loss_by_tag=dict(zip(TAGS, mean("tag_sum", "tag_count"))))

    hooks = LoopHooks(row=row, validate=validate, validate_every=cfg.sample_every, validate_last=False)
    return run_loop(cfg, run, batches(run.step), batch_loss, export="ema", hooks=hooks, desc="train")


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
