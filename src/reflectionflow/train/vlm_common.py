"""What the real-scale judge trainers (train/vlm_verifier.py, train/vlm_reflector.py) share.

One config base (`VLMTrainConfig`), the data sources (a JSONL file or GenRef shards, each read in
a seeded order that a checkpoint records, so a resumed run sees the same data), LoRA or full
tuning of a Qwen2-VL-family model, and one accelerate loop: bf16, gradient checkpointing,
gradient accumulation, several GPUs and nodes (DDP), warm-up/cosine lr (train/loop.lr_at),
validation every `val_every` steps, checkpoints with exact resume, tensorboard when installed.

Run folder (as the world's trainers: train/loop.open_run_folder, append_log):
    OUT/train_config.json   the resolved config (also inside the checkpoint)
    OUT/log.jsonl           one line per log interval and per validation
    OUT/tb/                 tensorboard events (only if tensorboard is importable)
    OUT/checkpoint/         trainable.safetensors (LoRA adapters / head / tuned weights, fp32),
                            optimizer.pt, state.json (step, config, every process's data position)
    OUT/<name>/             the exported model, written when the run ends (also on the clock)

Multi-node runs need OUT on a filesystem every node sees (checkpoints are written by all ranks).
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data.genref import SUBSETS
from ..runtime import is_int
from .loop import append_log, lr_at, open_run_folder, step_seed, trim_log

# Linear layers of the language model only: the vision tower's MLP has layers of the same names.
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TUNES = ("lora", "full")
DATA_FORMATS = ("auto", "jsonl", "genref")


class Skip(Exception):
    """One example that cannot be used (counted by reason, never raised to the user)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class VLMTrainConfig:
    out_dir: str = "runs/vlm"
    base: str = ""  # a Qwen2.5-VL (or Qwen2-VL) model folder
    data: str = ""  # a JSONL file, or GenRef shards (a folder, a glob, a brace pattern)
    data_format: str = "auto"  # auto: .jsonl files are JSONL, anything else GenRef shards
    val_data: str | None = None  # held-out data of the same kind (None: split off val_size)
    val_size: int = 64  # held-out examples (JSONL: split off the data; GenRef: the last shard)
    genref_mix: dict = field(default_factory=lambda: dict.fromkeys(SUBSETS, 1.0))  # GenRef subset weights
    buffer_size: int = 256  # GenRef reader's per-subset shuffle buffer
    tune: str = "lora"  # lora: adapters on the language model; full: every language-model weight
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LM_TARGETS
    train_vision: bool = False  # full tuning only: the vision tower too
    batch_size: int = 2  # examples per process per micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    bf16: bool = True  # on CUDA: frozen weights in bf16, autocast; CPU runs in fp32
    grad_checkpointing: bool = True
    min_pixels: int | None = None  # None: the base folder's preprocessor_config.json
    max_pixels: int | None = 512 * 512  # images are resized to fit (Qwen2-VL's smart resize)
    max_length: int = 2048  # longer examples are skipped (counted as too_long)
    seed: int = 0
    device: str = "auto"  # auto | cpu (accelerate places the processes on GPUs)
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 500
    resume: bool = False
    progress: bool = True

    def validate(self) -> VLMTrainConfig:
        from ..models.qwen_vl import check_qwen_folder

        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "ckpt_every", "lora_rank",
                     "max_length", "buffer_size"):
            v = getattr(self, name)
            if not is_int(v, 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.val_size < 0 or self.warmup_steps < 0:
            raise ValueError("val_size and warmup_steps must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.tune not in TUNES:
            raise ValueError(f"tune {self.tune!r}; accepted: {', '.join(TUNES)}")
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"device {self.device!r}; accepted: auto, cpu (launch with `accelerate launch` "
                             "to choose GPUs)")
        bad = sorted(set(self.lora_targets) - set(LM_TARGETS))
        if bad or not self.lora_targets:
            raise ValueError(f"lora_targets {', '.join(bad) or '(none)'}; accepted: {', '.join(LM_TARGETS)}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 28 * 28:
                raise ValueError(f"{name} must be >= {28 * 28} (one 28x28 patch group), got {getattr(self, name)}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        bad_mix = sorted(set(self.genref_mix) - set(SUBSETS))
        if bad_mix or any(w < 0 for w in self.genref_mix.values()) or sum(self.genref_mix.values()) <= 0:
            raise ValueError(f"genref_mix: subsets of {', '.join(SUBSETS)} with weights >= 0 and a positive sum, "
                             f"got {self.genref_mix}")
        if not self.base:
            raise ValueError("base is required: a Qwen2.5-VL model folder (--base DIR)")
        check_qwen_folder(self.base, "--base")
        if not self.data:
            raise ValueError("data is required (--data FILE.jsonl or GenRef shards)")
        self.data_format = resolve_format(self.data, self.data_format, "--data")
        if self.val_data is not None:
            resolve_format(self.val_data, self.data_format, "--val-data")
        self.betas = tuple(self.betas)
        self.lora_targets = tuple(self.lora_targets)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_format(path: str, data_format: str, flag: str) -> str:
    """'jsonl' or 'genref' for `path`; a missing file or unreadable shard spec is a ValueError."""
    from ..data.shards import resolve_shards

    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format {data_format!r}; accepted: {', '.join(DATA_FORMATS)}")
    fmt = data_format if data_format != "auto" else ("jsonl" if str(path).endswith(".jsonl") else "genref")
    if fmt == "jsonl":
        if not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    else:
        try:
            resolve_shards(path)
        except ValueError as e:
            raise ValueError(f"{flag} {path}: {e}") from None
    return fmt


# ----------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: str | Path, check: Callable[[dict], str | None], flag: str) -> list[dict]:
    """Every line as a dict; `check(line)` names what is wrong with a line (None: fine). A bad line
    is an error naming the file and line (images are checked later, and skipped, not refused)."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{flag} {path}:{n}: not JSON ({e.msg})") from None
        problem = check(d) if isinstance(d, dict) else "not a JSON object"
        if problem:
            raise ValueError(f"{flag} {path}:{n}: {problem}")
        d["_dir"] = str(path.parent)
        items.append(d)
    if not items:
        raise ValueError(f"{flag} {path}: no lines")
    return items


def load_image(item: dict, key: str) -> np.ndarray:
    """The image a JSONL line names (relative paths from the JSONL's folder), or Skip."""
    from ..io import ImageError
    from ..io import load_image as _load

    p = Path(item[key])
    p = p if p.is_absolute() else Path(item["_dir"]) / p
    if not p.is_file():
        raise Skip("missing_image")
    try:
        return _load(p)  # io.decode_image: its byte and pixel caps
    except ImageError:  # any decoder failure on a foreign file is one corrupt example
        raise Skip("corrupt_image") from None


def split_items(items: list[dict], val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): `val_size` lines chosen by the seed, never trained on."""
    if val_size == 0:
        return items, []
    if len(items) <= val_size:
        raise ValueError(f"the data has {len(items)} lines: too few to hold out val_size {val_size} (lower --val-size "
                         "or give --val-data)")
    order = np.random.default_rng([seed, 77]).permutation(len(items))
    held = set(order[:val_size].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


class JsonlSource:
    """Examples from JSONL lines: a seeded permutation per epoch of this process's share (lines
    rank, rank + world, ...); `make(line)` builds one example or raises Skip (counted)."""

    def __init__(self, items: list[dict], make: Callable, seed: int, rank: int = 0, world: int = 1):
        self.items = items[rank::world]
        if not self.items:
            raise ValueError(f"{len(items)} data lines cannot feed {world} processes")
        self.make, self.seed, self.pos, self.skipped = make, seed, 0, {}
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, len(self.items))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.items)))
        return int(self._perm[1][i])

    def next(self):
        for _ in range(len(self.items)):
            item = self.items[self._index(self.pos)]
            self.pos += 1
            try:
                return self.make(item)
            except Skip as s:
                self.skipped[s.reason] = self.skipped.get(s.reason, 0) + 1
        raise ValueError(f"no usable example in {len(self.items)} data lines; skipped: {self.skipped}")

    def state_dict(self) -> dict:
        return {"pos": self.pos, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.skipped = int(state["pos"]), dict(state["skipped"])


class GenRefSource:
    """Examples from GenRef shards through GenRefReader (one stream, the subset mix, exact resume);
    undecodable images are skipped and counted by the reader, Skip by `make` here."""

    def __init__(self, shards, make: Callable, seed: int, mix: dict, buffer_size: int, rank: int = 0, world: int = 1):
        from ..data.genref import GenRefReader, MixSchedule

        self.reader = GenRefReader(shards, seed=seed, buffer_size=buffer_size, mix=MixSchedule.constant(mix),
                                   rank=rank, world_size=world)
        self.make, self.own_skips = make, {}

    @property
    def skipped(self) -> dict:
        return self.reader.stats.corrupt | self.own_skips

    def next(self):
        while True:
            sample = self.reader.draw(step=0)  # a constant mix: the step does not matter
            try:
                return self.make(sample)
            except Skip as s:
                self.own_skips[s.reason] = self.own_skips.get(s.reason, 0) + 1

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "own_skips": dict(self.own_skips)}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.own_skips = dict(state["own_skips"])


def genref_split(spec: str, val_size: int) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): the last shard is held out when there are several."""
    from ..data.shards import resolve_shards

    shards = resolve_shards(spec)
    if val_size and len(shards) > 1:
        return shards[:-1], shards[-1:]
    return shards, []


def genref_examples(shards: list[str], make: Callable, limit: int) -> tuple[list, dict]:
    """The first `limit` usable examples of `shards` in file order (validation), and the skips."""
    from ..data.genref import ReadStats, iter_genref

    stats, out, skipped = ReadStats(), [], {}
    for sample in iter_genref(shards, stats=stats):
        try:
            out.append(make(sample))
        except Skip as s:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
        if len(out) >= limit:
            break
    return out, stats.corrupt | skipped


def jsonl_examples(items: list[dict], make: Callable) -> tuple[list, dict]:
    out, skipped = [], {}
    for item in items:
        try:
            out.append(make(item))
        except Skip as s:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
    return out, skipped


# ----------------------------------------------------------------------------------------------
# Models


def _vision_tower(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None) or model.visual


def apply_tuning(model: nn.Module, cfg: VLMTrainConfig) -> nn.Module:
    """Gradient checkpointing, then LoRA adapters on the language model's linear layers (peft) or
    full tuning (the vision tower frozen unless train_vision). Returns the model to train."""
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.tune == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        targets = r".*language_model.*\.(" + "|".join(cfg.lora_targets) + ")"
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none")
        return get_peft_model(model, lcfg)
    model.requires_grad_(True)
    if not cfg.train_vision:
        _vision_tower(model).requires_grad_(False)
    return model


def weights_dtype(cfg: VLMTrainConfig, device: torch.device) -> torch.dtype:
    """Frozen weights in bf16 on CUDA under LoRA (trainable adapters stay fp32); fp32 otherwise
    (full tuning keeps fp32 master weights and trains under autocast)."""
    return torch.bfloat16 if cfg.bf16 and device.type == "cuda" and cfg.tune == "lora" else torch.float32


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def merged(model: nn.Module) -> nn.Module:
    """The LoRA adapters folded into the weights (a plain transformers model), or the model itself."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class VLMRun:
    cfg: VLMTrainConfig
    out: Path
    acc: object  # accelerate.Accelerator
    model: nn.Module  # prepared (DDP-wrapped on several processes)
    opt: torch.optim.Optimizer
    source: object  # JsonlSource | GenRefSource
    step: int
    tb: object | None = None  # tensorboard SummaryWriter on the main process

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)


def make_accelerator(cfg: VLMTrainConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.bf16 and not cpu else "no",
                       gradient_accumulation_steps=cfg.grad_accum)


def start_vlm_run(cfg: VLMTrainConfig, build_model: Callable, make_source: Callable) -> VLMRun:
    """Validate, open (or resume) the run folder, build the model on this process's device, the
    optimizer over the trainable weights and the data source; restore all three on resume."""
    acc = make_accelerator(cfg)
    out = open_run_folder(cfg, write=acc.is_main_process)
    acc.wait_for_everyone()
    torch.manual_seed(cfg.seed)
    model = build_model(acc.device).to(acc.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    source = make_source(acc.process_index, acc.num_processes)
    step = 0
    ck = out / "checkpoint"
    if cfg.resume and ck.exists():
        step = load_vlm_checkpoint(ck, model, opt, source, acc.process_index, acc.num_processes)
    if acc.is_main_process:
        trim_log(out / "log.jsonl", step)
    model, opt = acc.prepare(model, opt)
    tb = None
    if acc.is_main_process:
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"), purge_step=step + 1)
        else:
            print(f"tensorboard is not installed: the log is {out / 'log.jsonl'} only")
    return VLMRun(cfg, out, acc, model, opt, source, step, tb)


def save_vlm_checkpoint(run: VLMRun) -> None:
    """OUT/checkpoint written by every process (its data position), then renamed in one move."""
    acc, out = run.acc, run.out
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    (tmp / f"data_{acc.process_index}.json").write_text(json.dumps(run.source.state_dict()))
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file(trainable_state(run.unwrapped), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": run.opt.state_dict(), "step": run.step}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": run.step, "processes": acc.num_processes,
                                                    "train_config": run.cfg.to_dict()}, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def load_vlm_checkpoint(ck: Path, model: nn.Module, opt, source, rank: int, world: int) -> int:
    from safetensors.torch import load_file

    state = json.loads((ck / "state.json").read_text())
    if state["processes"] != world:
        raise ValueError(f"{ck} was written by {state['processes']} processes; resume with the same number "
                         f"(got {world}) so that every process continues its own data")
    saved = load_file(str(ck / "trainable.safetensors"))
    mine = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if {n: tuple(t.shape) for n, t in saved.items()} != mine:
        raise ValueError(f"{ck}: the checkpoint's trainable weights differ from this run's "
                         f"(names or shapes); resume with the same base, tune and LoRA settings")
    dev = next(model.parameters()).device
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n].to(dev, p.dtype))
    opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"])
    source.load_state_dict(json.loads((ck / f"data_{rank}.json").read_text()))
    return int(state["step"])


@dataclass
class VLMLoopResult:
    step: int
    minutes: float
    last_loss: float
    val: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # reason -> examples skipped, all processes


BatchLoss = Callable[[nn.Module, list], tuple[torch.Tensor, dict[str, float]]]
Validate = Callable[[nn.Module], dict[str, float]]


def _skipped_total(run: VLMRun) -> dict:
    """Skip counts summed over processes (a collective: every process calls it)."""
    mine = run.source.skipped
    if run.acc.num_processes == 1:
        return dict(mine)
    from accelerate.utils import gather_object

    total: dict = {}
    for d in gather_object([mine]):
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def run_vlm_loop(run: VLMRun, name: str, batch_loss: BatchLoss, validate: Validate | None,
                 export: Callable[[nn.Module], None]) -> VLMLoopResult:
    """Train until max_steps or max_minutes; log, validate, checkpoint; export OUT/<name> at the end.

    Batches come from `run.source` (cfg.batch_size examples per micro-step); `batch_loss(model,
    examples)` returns the loss and per-batch statistics; `validate(unwrapped model)` runs on
    every process and returns scores already reduced over processes."""
    from tqdm import tqdm

    cfg, acc, model, opt = run.cfg, run.acc, run.model, run.opt
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=f"train {name}", unit="step",
               disable=not (cfg.progress and acc.is_main_process))
    t0, sums, n, last_loss, val = time.perf_counter(), {}, 0, float("nan"), {}
    t_log = t0

    def log(row: dict) -> None:
        if acc.is_main_process:
            append_log(run.out, row)
            if run.tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step":
                        run.tb.add_scalar(k, v, row["step"])
                run.tb.flush()

    def do_validate() -> None:
        nonlocal val
        if validate is None:
            return
        model.eval()
        val = {k: round(float(v), 5) for k, v in validate(run.unwrapped).items()}
        model.train()
        log({"step": run.step, **val})
        bar.set_postfix(loss=f"{last_loss:.4f}", **{k: f"{v:.3f}" for k, v in val.items()})

    model.train()
    while run.step < cfg.max_steps and (cfg.max_minutes is None or (time.perf_counter() - t0) / 60 < cfg.max_minutes):
        for g in opt.param_groups:
            g["lr"] = lr_at(run.step, cfg)
        # LoRA dropout (the only randomness in a step) from (seed, step, process): exact resume.
        torch.manual_seed(step_seed(cfg.seed, run.step) + acc.process_index)
        random.seed(step_seed(cfg.seed, run.step))
        for _ in range(cfg.grad_accum):
            examples = [run.source.next() for _ in range(cfg.batch_size)]
            with acc.accumulate(model):
                loss, stats = batch_loss(model, examples)
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.item(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        run.step += 1
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
            keys = sorted(sums)
            means = acc.reduce(torch.tensor([sums[k] / n for k in keys], device=acc.device), "mean").tolist()
            now = time.perf_counter()
            row = {"step": run.step, **{k: round(v, 5) for k, v in zip(keys, means)}, "lr": lr_at(run.step - 1, cfg),
                   "s_per_step": round((now - t_log) * cfg.grad_accum / n, 3),
                   "train_minutes": round((now - t0) / 60, 3), "skipped": _skipped_total(run)}
            last_loss = row["loss"]
            log(row)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            sums, n, t_log = {}, 0, now
        t_pause = time.perf_counter()
        if run.step % cfg.val_every == 0 or run.step == cfg.max_steps:
            do_validate()
        if run.step % cfg.ckpt_every == 0 or run.step == cfg.max_steps:
            save_vlm_checkpoint(run)
        t_log += time.perf_counter() - t_pause  # s_per_step counts training steps only
    bar.close()
    if run.step % cfg.ckpt_every and run.step != cfg.max_steps:  # stopped by the clock: keep what was done
        save_vlm_checkpoint(run)
    skipped = _skipped_total(run)
    if acc.is_main_process:
        export(run.unwrapped)
    acc.wait_for_everyone()
    if run.tb is not None:
        run.tb.close()
    minutes = (time.perf_counter() - t0) / 60
    return VLMLoopResult(step=run.step, minutes=minutes, last_loss=last_loss, val=val, skipped=skipped)


def reduce_sums(acc, values: list[float]) -> list[float]:
    """Element-wise sums over processes (validation counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, "sum").tolist() if acc.num_processes > 1 else t.tolist()


def data_sources(cfg, maker, read_lines: Callable[[str, str], list[dict]]):
    """(make_source(rank, world), held-out examples, their skips) for either trainer: a JSONL file
    (`read_lines(path, flag)` reads and checks its lines) or GenRef shards; the held-out part is
    `--val-data` when given, else `val_size` items split off the training data."""
    if cfg.data_format == "jsonl":
        items = read_lines(cfg.data, "--data")
        if cfg.val_data:
            train, held = items, read_lines(cfg.val_data, "--val-data")[: cfg.val_size]
        else:
            train, held = split_items(items, cfg.val_size, cfg.seed)
        val, val_skipped = jsonl_examples(held, maker.from_jsonl)
        return (lambda rank, world: JsonlSource(train, maker.from_jsonl, cfg.seed, rank, world)), val, val_skipped
    train_shards, held_shards = genref_split(cfg.data, 0 if cfg.val_data else cfg.val_size)
    if cfg.val_data:
        from ..data.shards import resolve_shards

        held_shards = resolve_shards(cfg.val_data)
    val, val_skipped = genref_examples(held_shards, maker.from_genref, cfg.val_size) if held_shards else ([], {})
    return (lambda rank, world: GenRefSource(train_shards, maker.from_genref, cfg.seed, cfg.genref_mix,
                                             cfg.buffer_size, rank, world)), val, val_skipped
