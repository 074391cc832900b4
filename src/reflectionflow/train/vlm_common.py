"""What the real-scale judge trainers (train/vlm_verifier.py, train/vlm_reflector.py) share.

One config base (`VLMTrainConfig`), the data sources (a JSONL file or GenRef shards, each read in
a seeded order that a checkpoint records, so a resumed run sees the same data), LoRA or full
tuning of a Qwen2-VL-family model, and what they give the project's one training loop
(train/loop.py's `start_run` and `run_loop`): an accelerate Accelerator (bf16, gradient
accumulation, several GPUs and nodes with DDP), their log row and tensorboard, validation every
`val_every` steps, the export at the end. Warm-up/cosine lr (train/loop.lr_at) and checkpoints
with exact resume are the loop's; gradient checkpointing is `apply_tuning`'s.

Run folder (as every trainer's: train/loop.py):
    OUT/train_config.json   the resolved config (also inside the checkpoint)
    OUT/log.jsonl           one line per log interval and per validation
    OUT/tb/                 tensorboard events (only if tensorboard is importable)
    OUT/checkpoint/         the loop's format: trainable.safetensors (LoRA adapters / head / tuned
                            weights, fp32), optimizer.pt, scheduler.pt, state.json (step, processes,
                            train_config), rank_<r>.pt (every process's data position)
    OUT/<name>/             the exported model, written when the run ends (also on the clock)

Multi-node runs need OUT on a filesystem every node sees (checkpoints are written by all ranks).
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data.genref import SUBSETS
from ..runtime import is_int
from .loop import Checkpoint, Interval, LoopHooks, Run, TrainResult, append_log, run_loop, start_run, step_seed

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


def merged(model: nn.Module) -> nn.Module:
    """The LoRA adapters folded into the weights (a plain transformers model), or the model itself."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ----------------------------------------------------------------------------------------------
# The run: train/loop.py's start_run and run_loop with the judges' accelerator, data and log


def make_accelerator(cfg: VLMTrainConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.bf16 and not cpu else "no",
                       gradient_accumulation_steps=cfg.grad_accum)


def start_vlm_run(cfg: VLMTrainConfig, build_model: Callable, make_source: Callable) -> tuple[Run, object]:
    """The accelerator, this process's data source (`make_source(rank, world)`) and `start_run`:
    validate, open (or resume) the run folder, build the model on this process's device
    (`build_model(device)`), the optimizer over the trainable weights, no EMA; restore all three on
    resume (OUT/checkpoint/trainable.safetensors, each process's data position). Returns the run
    and the source."""
    acc = make_accelerator(cfg)
    source = make_source(acc.process_index, acc.num_processes)
    checkpoint = Checkpoint("trainable", {"train_config": cfg.to_dict()}, source=source)
    run = start_run(cfg, lambda: build_model(acc.device), acc, checkpoint, ema=False)
    return run, source


BatchLoss = Callable[[nn.Module, list], tuple[torch.Tensor, dict[str, float]]]
Validate = Callable[[nn.Module], dict[str, float]]


def _skipped_total(source, acc) -> dict:
    """Skip counts summed over processes (a collective: every process calls it)."""
    mine = source.skipped
    if acc.num_processes == 1:
        return dict(mine)
    from accelerate.utils import gather_object

    total: dict = {}
    for d in gather_object([mine]):
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _examples(cfg: VLMTrainConfig, run: Run, source) -> Iterator[list]:
    """cfg.batch_size examples per micro-step, cfg.grad_accum micro-steps per step. LoRA dropout (the
    only randomness in a step) is drawn from (seed, step, process), seeded as a step's first
    examples are drawn: exact resume."""
    step = run.step
    while True:
        torch.manual_seed(step_seed(cfg.seed, step) + run.procs.process_index)
        random.seed(step_seed(cfg.seed, step))
        for _ in range(cfg.grad_accum):
            yield [source.next() for _ in range(cfg.batch_size)]
        step += 1


def train_vlm_judge(cfg: VLMTrainConfig, run: Run, source, name: str, batch_loss: BatchLoss,
                    validate: Validate | None, export: Callable[[nn.Module], None]) -> tuple[TrainResult, dict]:
    """Train through train/loop.run_loop until max_steps or max_minutes, then export OUT/<name> on the
    main process (`export(unwrapped model)`, also when the clock stopped the run).

    `batch_loss(model, examples)` returns the loss and per-batch statistics (floats); `validate(
    unwrapped model)` runs on every process every val_every steps and at the end, and returns scores
    already reduced over processes (a row of log.jsonl, as the trainer's rows: step, the statistics'
    means, lr, s_per_step, train_minutes, skipped). tensorboard (OUT/tb) when installed; the clock
    (max_minutes, train_minutes) counts validation. Returns the result (its minutes include the
    export) and the skip counts summed over processes."""
    acc = run.procs
    tb = None
    if acc.is_main_process:
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run.out / "tb"), purge_step=run.step + 1)
        else:
            print(f"tensorboard is not installed: the log is {run.out / 'log.jsonl'} only")

    def log(row: dict) -> None:
        if acc.is_main_process:
            append_log(run.out, row)
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step":
                        tb.add_scalar(k, v, row["step"])
                tb.flush()

    def row(iv: Interval) -> dict:
        keys = sorted(iv.sums)
        means = torch.tensor([iv.sums[k] / (iv.batches * iv.processes) for k in keys]).tolist()
        return {"step": iv.step, **{k: round(v, 5) for k, v in zip(keys, means)}, "lr": iv.lr,
                "s_per_step": round((iv.seconds - iv.saving) * cfg.grad_accum / iv.batches, 3),
                "train_minutes": round(iv.minutes, 3), "skipped": _skipped_total(source, acc)}

    def scores(step: int, model: nn.Module) -> dict:
        return {k: round(float(v), 5) for k, v in validate(model).items()}

    hooks = LoopHooks(row=row, log=log, validate=scores if validate is not None else None,
                      validate_every=cfg.val_every, log_validation=lambda step, val: log({"step": step, **val}),
                      clock_counts_validation=True)
    res = run_loop(cfg, run, _examples(cfg, run, source), lambda examples, step: batch_loss(run.model, examples),
                   export=None, hooks=hooks, desc=f"train {name}")
    t0 = time.perf_counter()
    skipped = _skipped_total(source, acc)
    if acc.is_main_process:
        export(run.unwrapped)
    acc.wait_for_everyone()
    if tb is not None:
        tb.close()
    res.minutes += (time.perf_counter() - t0) / 60
    res.last_loss = round(res.last_loss, 5)
    return res, skipped


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
