"""The reflection corrector's trainer, one code path for both scales (docs/method.md, section 3).

A corrector is a flow-matching model that sees the previous image as condition tokens and the text
`prompt + " [Reflexion]: " + reflection`, with a LoRA on its condition branch. Two model families
sit behind one small interface (`CorrectorFamily`): the world's MMDiT (train/corrector.py,
`WorldFamily`) and FLUX.1 in the OminiControl layout (train/flux_corrector.py). Where the batches
come from is a second interface (`BatchSource`): GenRef shards (`GenRefBatches`, the default) or
the world's pool of judged generator samples (train/corrector.py, `PoolBatches`). Everything else
is shared and lives here:

- data: a source's batch of step s (GenRef: `data.genref.GenRefReader`, one pass per epoch, the
  subset mix of the step, exact resume of the reader), text / image / reflection dropout (10% each
  by default); the family's `prepare` (its CPU half: stacking, tokenizing) runs where the batch is
  made, in `num_workers` DataLoader workers when the source is a pure function of the step;
- loss: flow matching, t = sigmoid(N(0, 1)), x_t = (1 - t) x0 + t eps, target eps - x0, MSE
  (models/flow.py's path and loss functions), or for `partial_share` of the samples the path of a
  start from the partly noised previous image; per-sample losses logged per subset and t-bin;
- the loop: the project's one (train/loop.py's `start_run`, `run_loop`) with `accelerate` (one
  process, or several GPUs and nodes under `accelerate launch`): AdamW or Prodigy, warm-up then
  constant or cosine lr (down to `min_lr_ratio`), gradient clipping, bf16 autocast, optional
  torch.compile, optional EMA of the adapters (`ema_decay`; the exported adapters and validation
  then use the EMA weights); `max_minutes` ends the run (a last log row, checkpoint, validation),
  `stop_after` interrupts it (a checkpoint only);
- checkpoints in the loop's one format, written atomically, holding everything exact resume needs:
  adapters, EMA, optimizer, lr schedule, step, every process's RNG states and source state (the
  GenRef reader position), and the config;
- validation every `val_every` steps and at the end: by default a fixed set of GenRef samples
  corrected with the current adapters and scored by any registered verifier (`CorrectorValidation`);
  a caller may pass its own `Validator` (the world pool's: share fixed, share broken).

Run folder:
    OUT/train_config.json         the resolved config
    OUT/log.jsonl                 loss (mean, per subset, per t-bin), lr, images/s, memory
    OUT/val.jsonl                 one row per validation (the validator's: GenRef's holds the verifier
                                  score of the corrected images, and of the condition ("before") and
                                  target images as reference)
    OUT/val/step_*.png            (condition | correction | target) rows (GenRef validation)
    OUT/checkpoint/               adapters.safetensors (fp32), ema.safetensors (fp32, with EMA),
                                  optimizer.pt, scheduler.pt, state.json (step, processes, config),
                                  rank_<r>.pt (RNG + source state); the .pt files hold tensors
                                  and plain data only and load with weights_only=True (nothing
                                  in a checkpoint can run code)
    OUT/<family.adapters_folder>/ the shippable adapters (the family's format: OUT/lora for FLUX,
                                  OUT/corrector for the world), with every checkpoint
    OUT/tensorboard/              when tensorboard is installed (else log.jsonl only)
"""

from __future__ import annotations

import importlib.util
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from ..io import append_jsonl
from .loop import (
    LOSS_BINS,
    LR_SCHEDULES,
    OPTIMIZERS,
    Checkpoint,
    Interval,
    LoopHooks,
    StepBatches,
    log_row,
    refuse_overwrite,
    run_loop,
    start_run,
    step_seed,
    trim_log,
)

TRACKERS = ("tensorboard", "wandb")
NO_GENREF = "genref: no GenRef shards given (a folder, glob or brace pattern of .tar shards)"
# Fields a resumed run may change; any other difference means another experiment.
RESUMABLE_CHANGES = frozenset({"out_dir", "max_steps", "max_minutes", "log_every", "ckpt_every", "val_every",
                               "val_size", "val_steps", "val_guidance", "val_verifier", "val_verifier_options",
                               "val_genref", "trackers", "resume", "progress", "log_keys", "device",
                               "num_workers", "compile"})


def _original_mix() -> dict:
    from ..data.genref import MixSchedule

    return MixSchedule().to_dict()


@dataclass
class CorrectorTrainConfig:
    """What every corrector run sets; a family's config adds its model fields."""

    out_dir: str = "runs/corrector"
    # GenRef shards: a folder, a glob, a brace pattern (genref_{0..208}.tar) or a URL list; the data
    # of the default source (a caller passing its own BatchSource may leave it empty)
    genref: str = ""
    mix: dict = field(default_factory=_original_mix)  # {"stages": [...], "ratios": {subset: [...]}}
    buffer_size: int = 256  # encoded samples held per subset (the sample-level shuffle)
    batch_size: int = 8  # per process (the original: 8 per GPU on 8 GPUs)
    max_steps: int = 20_000
    max_minutes: float | None = None  # wall-clock stop; a checkpoint is written there
    optimizer: str = "prodigy"  # the original's (lr 1); adamw needs an lr like 1e-4
    lr: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: decays to lr * this at max_steps
    grad_clip: float = 0.5  # the original's
    ema_decay: float = 0.0  # EMA of the adapters (0: none); when on, exports and validation use it
    lora_rank: int = 32  # the released config (the paper's text says 256)
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ()  # empty: the family's defaults (the released corrector's layers)
    text_dropout: float = 0.1
    image_dropout: float = 0.1
    reflection_dropout: float = 0.1
    t_mean: float = 0.0
    t_std: float = 1.0
    # Partial-noise starts (the corrector run with strength s < 1 starts from the previous image
    # noised to time s): this share of the samples with a condition image trains on that path
    # (models/flow.partial_path_sample), at a start time drawn from partial_strengths.
    partial_share: float = 0.0
    partial_strengths: tuple[float, ...] = (0.5, 0.75)
    bf16: bool = True  # base weights in bf16 and autocast on CUDA; the CPU runs fp32
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile the module
    num_workers: int = 0  # DataLoader workers making batches ahead (sources that are a pure function of the step)
    seed: int = 0
    device: str = "auto"  # a single process's device; under accelerate launch each process takes its own
    log_every: int = 10
    ckpt_every: int = 1000
    val_every: int = 1000
    val_size: int = 8  # validation samples (0: no validation)
    val_genref: str | None = None  # None: the first val_size readable samples of `genref`
    val_verifier: str = ""  # a registered verifier name; empty: the family's default
    val_verifier_options: dict = field(default_factory=dict)
    val_steps: int = 28
    val_guidance: float = 3.5
    trackers: tuple[str, ...] = ("tensorboard",)  # log.jsonl is always written
    log_keys: bool = False  # record every step's sample keys in log.jsonl (data-order audits)
    resume: bool = False
    progress: bool = True

    resumable_changes: ClassVar[frozenset[str]] = RESUMABLE_CHANGES

    def validate(self) -> CorrectorTrainConfig:
        """Cheap checks only (no weights): the values, the shards' names, the verifier's name."""
        from ..components import check_name
        from ..data.genref import MixSchedule
        from ..data.shards import resolve_shards

        for name in ("batch_size", "max_steps", "log_every", "ckpt_every", "val_every", "val_steps",
                     "buffer_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_size", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if self.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
            raise ValueError("optimizer 'prodigy' needs the prodigyopt package (pip install prodigyopt); "
                             "or pass optimizer adamw with an lr like 1e-4")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}; accepted: {', '.join(LR_SCHEDULES)}")
        if self.lr <= 0 or self.lora_alpha <= 0:
            raise ValueError(f"lr and lora_alpha must be > 0, got {self.lr} and {self.lora_alpha}")
        for name in ("text_dropout", "image_dropout", "reflection_dropout", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_partial(self.partial_share, self.partial_strengths)
        self.partial_strengths = tuple(float(x) for x in self.partial_strengths)
        self.trackers = tuple(self.trackers)
        bad = [t for t in self.trackers if t not in TRACKERS]
        if bad:
            raise ValueError(f"trackers {bad}; accepted: {', '.join(TRACKERS)} (log.jsonl is always written)")
        if "wandb" in self.trackers and importlib.util.find_spec("wandb") is None:
            raise ValueError("tracker 'wandb' needs the wandb package (pip install wandb)")
        self.lora_targets = tuple(self.lora_targets)
        self.betas = tuple(self.betas)
        if self.genref:
            resolve_shards(self.genref)  # a ShardError (ValueError) names what is missing
        if self.val_genref:
            resolve_shards(self.val_genref)
        MixSchedule.from_dict(self.mix)  # a GenRefError (ValueError) names the bad subset or stage
        if self.val_size and self.val_verifier:
            check_name("verifier", self.val_verifier)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        return cls(**values)


def check_partial(share: float, strengths: Sequence[float]) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"partial_share must be in [0, 1], got {share}")
    if share > 0 and (not len(strengths) or any(not 0.0 < float(x) <= 1.0 for x in strengths)):
        raise ValueError(f"partial_strengths must be start times in (0, 1], got {list(strengths)}")


def partial_path(x0: torch.Tensor, eps: torch.Tensor, u: torch.Tensor, inputs: dict, share: float,
                 strengths: Sequence[float] | torch.Tensor, generator: torch.Generator):
    """The step's flow path: the plain one, or with `share` > 0 the partial-noise start path for that
    share of the samples that have a previous image (`inputs["start"]`, (B, ...) in x0's space, and
    `inputs["start_ok"]`, (B,) bool; a family that trains partial starts puts both there).
    `strengths` may be a tensor on x0's device already (the loop's, so no copy per step)."""
    from ..models.flow import partial_path_sample, path_sample

    if share <= 0:
        return path_sample(x0, eps, u)
    if "start" not in inputs:
        raise ValueError("partial_share > 0 needs the previous image as a start (inputs['start']); this model "
                         "family does not give it")
    B, dev = x0.shape[0], x0.device
    strengths = torch.as_tensor(strengths, device=dev, dtype=torch.float32)
    use = (torch.rand(B, device=dev, generator=generator) < share) & inputs["start_ok"].to(dev)
    pick = torch.randint(len(strengths), (B,), device=dev, generator=generator)
    s = torch.where(use, strengths[pick], torch.ones(B, device=dev))
    return partial_path_sample(x0, eps, u, inputs["start"], s)


# ----------------------------------------------------------------------------------------------
# Data: a source's batches (GenRef triplets, the world's pool) with the three dropouts


@dataclass
class CorrectorBatch:
    """One step's samples (this process's share). Dropped parts are empty or None."""

    good: list[np.ndarray]  # targets, (H, W, 3) uint8
    bad: list[np.ndarray | None]  # conditions; None: image dropped (the family draws its blank)
    prompts: list[str]  # "" where the text was dropped
    reflections: list[str]  # "" where the reflection (or the whole text) was dropped
    subsets: list[str]  # one of the source's `subsets` per sample (the loss is logged by them)
    keys: list[str]

    def __len__(self) -> int:
        return len(self.good)


def apply_dropout(batch: CorrectorBatch, cfg: CorrectorTrainConfig, step: int, rank: int) -> CorrectorBatch:
    """Text, image and reflection dropout with flags drawn from (seed, step, rank): a dropped image
    becomes None (the family's blank), a dropped reflection leaves the prompt alone, a dropped text
    leaves nothing (the empty prompt, CFG's unconditional input)."""
    B = len(batch)
    rng = np.random.default_rng([cfg.seed, step, rank, 11])
    drop_text = rng.random(B) < cfg.text_dropout
    drop_image = rng.random(B) < cfg.image_dropout
    drop_reflection = rng.random(B) < cfg.reflection_dropout
    return CorrectorBatch(
        good=batch.good,
        bad=[None if drop_image[i] else b for i, b in enumerate(batch.bad)],
        prompts=["" if drop_text[i] else p for i, p in enumerate(batch.prompts)],
        reflections=["" if drop_text[i] or drop_reflection[i] else r for i, r in enumerate(batch.reflections)],
        subsets=batch.subsets, keys=batch.keys)


class BatchSource(ABC):
    """Where a run's batches come from: `batch(step)` is this process's batch of that step, with the
    dropouts applied (`apply_dropout`). A source with state between steps saves and restores it for
    exact resume; a `stateless` one (a pure function of the step) may be made ahead by DataLoader
    workers."""

    subsets: tuple[str, ...]  # what CorrectorBatch.subsets holds; the loss is logged per name
    stateless: bool = False

    @abstractmethod
    def batch(self, step: int) -> CorrectorBatch: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state between steps, got {sorted(state)}")

    def skipped(self) -> dict | None:
        """What the source skipped so far (unreadable samples and shards), or None when nothing."""
        return None


SourceFactory = Callable[[int, int], BatchSource]  # (rank, world size) -> this process's source


class GenRefBatches(BatchSource):
    """Batch `step` = the reader's next `batch_size` draws under the step's subset mix, plus dropout
    flags drawn from (seed, step, rank). Resumable through `state_dict` (the reader's position)."""

    def __init__(self, cfg: CorrectorTrainConfig, rank: int = 0, world_size: int = 1):
        from ..data.genref import SUBSETS, GenRefReader, MixSchedule

        self.cfg, self.rank, self.subsets = cfg, rank, SUBSETS
        self.reader = GenRefReader(cfg.genref, seed=cfg.seed, buffer_size=cfg.buffer_size,
                                   mix=MixSchedule.from_dict(cfg.mix), samples_per_step=cfg.batch_size,
                                   rank=rank, world_size=world_size)

    def batch(self, step: int) -> CorrectorBatch:
        samples = [self.reader.draw(step) for _ in range(self.cfg.batch_size)]
        batch = CorrectorBatch(good=[s.good for s in samples], bad=[s.bad for s in samples],
                               prompts=[s.prompt for s in samples], reflections=[s.reflection for s in samples],
                               subsets=[s.subset for s in samples], keys=[s.key for s in samples])
        return apply_dropout(batch, self.cfg, step, self.rank)

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)

    def skipped(self) -> dict | None:
        return skip_summary(self.reader.stats)


def skip_summary(stats) -> dict | None:
    """A GenRef ReadStats' skips as a log entry: counts by reason and the first few, each naming its
    shard and sample; None when nothing was skipped."""
    if not stats.corrupt:
        return None
    return {"samples": stats.corrupt_samples, "shards": stats.corrupt_shards, "by_reason": dict(stats.corrupt),
            "first": [dict(item) for item in stats.corrupt_items[:3]]}


def describe_skips(where: str, skipped: dict) -> str:
    """One line: how many were skipped, by reason, and the first (shard, sample, why)."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped["by_reason"].items()))
    line = f"{where}: skipped {skipped['samples']} unreadable sample(s) and {skipped['shards']} damaged shard(s) " \
           f"({reasons})"
    if skipped["first"]:
        f = skipped["first"][0]
        line += f"; first: shard {f['shard']}" + (f" sample {f['key']}" if f.get("key") else "") + \
            f": {f['reason']}" + (f" ({f['detail'][:160]})" if f.get("detail") else "")
    return line


class Prepared(NamedTuple):
    """A batch as the loop takes it: what the family's `prepare` made of it, and what logging needs."""

    subsets: torch.Tensor  # (B,) int64 index into the source's subsets
    keys: list[str]
    data: object  # family.prepare(batch)


class _PreparedSteps(StepBatches):
    def __init__(self, source: BatchSource, prepare: Callable[[CorrectorBatch], object], start_step: int):
        self.source, self.prepare, self.start_step = source, prepare, start_step
        self.index = {name: i for i, name in enumerate(source.subsets)}

    def batch_at(self, step: int) -> Prepared:
        b = self.source.batch(step)
        try:
            data = self.prepare(b)
        except ValueError as e:  # name the samples: a bad one must be findable in the shards
            shown = ", ".join(map(str, list(b.keys)[:4])) + (", ..." if len(b.keys) > 4 else "")
            raise ValueError(f"step {step}, samples {shown}: {e}") from None
        return Prepared(torch.tensor([self.index[x] for x in b.subsets], dtype=torch.long), list(b.keys), data)


def prepared_batches(source: BatchSource, prepare: Callable[[CorrectorBatch], object], start_step: int,
                     workers: int, pin_memory: bool) -> Iterator[Prepared]:
    """The batches of steps start_step, start_step + 1, ...: made by `workers` DataLoader processes
    when the source is stateless (worker w makes steps start + w, start + w + n, ..., so the order
    does not depend on n), else here, one step at a time (a reader's state must follow the steps)."""
    from torch.utils.data import DataLoader

    steps = _PreparedSteps(source, prepare, start_step)
    if not (source.stateless and workers > 0):
        return iter(steps)
    # Forked workers inherit the source and the family's `prepare`; tensors come back through shared
    # memory and are pinned, so the loop's copies to the GPU need no host sync.
    return iter(DataLoader(steps, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4))


# ----------------------------------------------------------------------------------------------
# The model family interface


class CorrectorFamily(ABC):
    """A corrector model family: `module(x_t, t, inputs) -> velocity` holds the trainable adapters.

    `prepare` is the CPU half of encoding a batch (no weights, no device: stacking images, tokenizing;
    it may run in a DataLoader worker), `encode` the rest: the flow's data `x0` and the module's
    other inputs (no gradient: VAE, text encoders). `correct` edits images with the current
    adapters; `save_adapters` writes the shippable LoRA in the family's inference format into
    OUT/`adapters_folder`.
    """

    module: nn.Module
    default_verifier: str = ""
    adapters_folder: str = "lora"

    def prepare(self, batch: CorrectorBatch) -> object:
        return batch

    @abstractmethod
    def encode(self, prepared, device: torch.device) -> tuple[torch.Tensor, dict]:
        """`prepared`: what `prepare` returned (the CorrectorBatch itself by default)."""

    @abstractmethod
    def correct(self, images: Sequence[np.ndarray], prompts: Sequence[str], reflections: Sequence[str],
                seeds: Sequence[int]) -> list[np.ndarray]: ...

    @abstractmethod
    def save_adapters(self, folder: Path, info: dict) -> Path: ...

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# Resume


def check_resumable(cfg: CorrectorTrainConfig) -> None:
    """Refuse to resume a checkpoint trained with other settings (before any weights load). A field
    the saved config lacks (added since) counts as its default."""
    state_file = Path(cfg.out_dir) / "checkpoint" / "state.json"
    if not state_file.is_file():
        return
    saved = json.loads(state_file.read_text())["config"]
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as saved
    defaults = json.loads(json.dumps({f.name: f.default if f.default is not MISSING else f.default_factory()
                                      for f in fields(cfg) if f.default is not MISSING
                                      or f.default_factory is not MISSING}))
    differ = sorted(k for k in set(saved) | set(now) if k not in cfg.resumable_changes
                    and saved.get(k, defaults.get(k)) != now.get(k))
    if differ:
        raise ValueError(f"{cfg.out_dir}: the checkpoint was trained with other {', '.join(differ)}; resume with "
                         "the same settings or start a new out_dir")


# ----------------------------------------------------------------------------------------------
# Logging


class Trackers:
    """log.jsonl always; tensorboard when installed and asked for; wandb when asked for (validated)."""

    def __init__(self, cfg: CorrectorTrainConfig, is_main: bool, name: str):
        self.out, self.is_main, self.notes = Path(cfg.out_dir), is_main, []
        self.tb = self.wandb = None
        if not is_main:
            return
        if "tensorboard" in cfg.trackers:
            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            else:
                self.notes.append("tensorboard is not installed: logging to log.jsonl only")
        if "wandb" in cfg.trackers:
            import wandb

            self.wandb = wandb.init(project="reflectionflow", name=name, dir=str(self.out), config=cfg.to_dict())

    def log(self, row: dict, file: str = "log.jsonl") -> None:
        if not self.is_main:
            return
        append_jsonl(self.out / file, [row])  # secrets scrubbed
        scalars = {k: v for k, v in _flatten(row).items() if isinstance(v, (int, float)) and k != "step"}
        prefix = file.split(".")[0]
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out.update({f"{prefix}{k}/{i}": x for i, x in enumerate(v)})
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Validation


class Validator(ABC):
    """Scores the current adapters (the EMA weights when EMA is on) every `val_every` steps and at
    the end, on the main process; the loop writes the row to val.jsonl and the trackers."""

    @abstractmethod
    def __call__(self, step: int, family: CorrectorFamily) -> dict:
        """A val.jsonl row: {"step": step, ...} (pictures go where the validator writes them)."""

    def describe(self, row: dict) -> str:
        """The progress line's text for a row."""
        return json.dumps({k: v for k, v in row.items() if k != "step"})


ValidatorFactory = Callable[[], "Validator | None"]  # called on the main process, before the model loads


def _grid(rows: list[list[np.ndarray]], path: Path, size: int = 128) -> None:
    from PIL import Image

    if not rows:
        return
    tiles = [[np.asarray(Image.fromarray(im).resize((size, size))) for im in row] for row in rows]
    canvas = np.concatenate([np.concatenate(r, axis=1) for r in tiles], axis=0)  # (rows*size, cols*size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)


class CorrectorValidation(Validator):
    """A fixed set of GenRef samples (file order), corrected every `val_every` steps and scored by
    the configured verifier against the prompt. The condition ("before") and target images are
    scored once, as the two ends of the scale."""

    def __init__(self, cfg: CorrectorTrainConfig, default_verifier: str):
        """Built before the model loads, so a verifier option that does not fit fails early."""
        from itertools import islice

        from ..components import build
        from ..data.genref import ReadStats, iter_genref

        self.cfg = cfg
        self.read = ReadStats()
        self.samples = list(islice(iter_genref(cfg.val_genref or cfg.genref, stats=self.read), cfg.val_size))
        self.skipped = skip_summary(self.read)
        self.verifier_name = name = cfg.val_verifier or default_verifier
        self.verifier = build("verifier", name, **cfg.val_verifier_options) if self.samples and name else None
        self.reference: dict | None = None

    def __len__(self) -> int:
        return len(self.samples) if self.verifier is not None else 0

    def _score(self, images: Sequence[np.ndarray]) -> dict:
        verdicts = self.verifier.score(list(images), [s.prompt for s in self.samples])
        out = {"score": round(float(np.mean([v.score for v in verdicts])), 5)}
        yes = [v.yes for v in verdicts if v.yes is not None]
        if yes:
            out["yes"] = round(float(np.mean(yes)), 4)
        return out

    def __call__(self, step: int, family: CorrectorFamily) -> dict:
        s = self.samples
        if self.reference is None:
            self.reference = {"before": self._score([x.bad for x in s]), "target": self._score([x.good for x in s])}
        t0 = time.perf_counter()
        seeds = [1_000_000 + i for i in range(len(s))]  # fixed: the same noise at every validation
        images = family.correct([x.bad for x in s], [x.prompt for x in s], [x.reflection for x in s], seeds)
        row = {"step": step, "corrected": self._score(images), **self.reference,
               "verifier": self.verifier_name, "samples": len(s),
               "seconds": round(time.perf_counter() - t0, 2)}
        _grid([[x.bad, im, x.good] for x, im in zip(s[:8], images)],
              Path(self.cfg.out_dir) / "val" / f"step_{step:06d}.png")
        return row

    def describe(self, row: dict) -> str:
        return f"{json.dumps(row['corrected'])} (before {json.dumps(row['before'])})"


def genref_validation(cfg: CorrectorTrainConfig, default_verifier: str) -> CorrectorValidation | None:
    if not cfg.val_size:
        return None
    v = CorrectorValidation(cfg, default_verifier)
    return v if len(v) else None


# ----------------------------------------------------------------------------------------------
# Training: train/loop.py's start_run and run_loop with the corrector's loss, log and validation


@dataclass
class CorrectorTrainResult:
    step: int
    minutes: float
    losses: list[float]  # the logged mean losses of this call, in order
    validation: dict | None  # the last validation row
    skipped: dict | None = None  # what the data source skipped (GenRef: unreadable samples, damaged shards)


class CorrectorSteps:
    """The corrector's part of `run_loop`: a batch's loss (flow matching from the step's noise,
    `partial_share` of it from partly noised previous images) and the log row (the loss per t-bin
    and per subset, images/s, peak memory, the samples' keys, what the source skipped)."""

    def __init__(self, cfg: CorrectorTrainConfig, acc, family: CorrectorFamily, forward: Callable,
                 source: BatchSource):
        self.cfg, self.acc, self.family, self.forward, self.source = cfg, acc, family, forward, source
        self.dev, self.cuda = acc.device, acc.device.type == "cuda"
        self.subsets = tuple(source.subsets)
        self.strengths = torch.tensor(cfg.partial_strengths, device=self.dev)  # once: a per-step copy syncs
        self.gen = torch.Generator(device=self.dev)
        self.keys: list = []  # each step's sample keys (log_keys), until the next row
        self.losses: list[float] = []  # the rows' mean losses

    def loss(self, batch: Prepared, step: int) -> tuple[torch.Tensor, dict]:
        from ..models.flow import logit_normal, loss_by_bin, per_sample_mse

        cfg, dev, gen, acc = self.cfg, self.dev, self.gen, self.acc
        with torch.no_grad():
            x0, inputs = self.family.encode(batch.data, dev)  # x0: (B, ...) the family's data space
        gen.manual_seed(step_seed(cfg.seed, step, acc.process_index))
        t = logit_normal(x0.shape[0], cfg.t_mean, cfg.t_std, device=dev, generator=gen)  # (B,)
        eps = torch.randn(x0.shape, device=dev, generator=gen, dtype=x0.dtype)
        path = partial_path(x0, eps, t, inputs, cfg.partial_share, self.strengths, gen)
        with acc.autocast():
            v = self.forward(path.x_t, path.t, inputs)
        per = per_sample_mse(v.float(), path.target.float())  # (B,)
        if cfg.log_keys:
            self.keys.append(acc.gather_for_metrics(batch.keys, use_gather_object=True) if acc.num_processes > 1
                             else list(batch.keys))
        done, sub = per.detach(), batch.subsets.to(dev, non_blocking=True)
        bin_sum, bin_count = loss_by_bin(path.t, done, LOSS_BINS)
        sub_sum = torch.zeros(len(self.subsets), device=dev).index_add_(0, sub, done)
        sub_count = torch.zeros(len(self.subsets), device=dev).index_add_(0, sub, torch.ones_like(done))
        return per.mean(), {"bin_sum": bin_sum, "bin_count": bin_count, "sub_sum": sub_sum, "sub_count": sub_count,
                            "images": x0.shape[0]}

    def row(self, iv: Interval) -> dict:
        s = iv.sums
        bins = torch.tensor(s["bin_sum"]) / torch.tensor(s["bin_count"]).clamp(min=1)
        sub_n = torch.tensor(s["sub_count"])
        sub_mean = (torch.tensor(s["sub_sum"]) / sub_n.clamp(min=1)).tolist()
        self.losses.append(float(torch.tensor(s["loss"]) / iv.batches) / iv.processes)
        row = log_row(iv, img_per_s=round(s["images"] / iv.seconds, 2),
                      loss_by_t_bin=[round(x, 5) for x in bins.tolist()],
                      loss_by_subset={n: round(x, 5) for n, x, k in zip(self.subsets, sub_mean, sub_n.tolist()) if k})
        row["loss"] = round(self.losses[-1], 6)
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.dev) / 2**30, 2)
        if self.cfg.log_keys:
            row["keys"] = list(self.keys)
            self.keys.clear()
        skipped = self.source.skipped()
        if skipped:  # reported as it happens (and kept in the checkpoint's reader state)
            row["skipped"] = skipped
        return row


def train_corrector(cfg: CorrectorTrainConfig, family_cls: type[CorrectorFamily], family_kwargs: dict | None = None,
                    name: str = "corrector", stop_after: int | None = None, source: SourceFactory | None = None,
                    validation: ValidatorFactory | None = None) -> CorrectorTrainResult:
    """Train the adapters of `family_cls(**family_kwargs, device=...)` through the project's one loop.

    `source` makes each process's batches (default: `GenRefBatches` on cfg.genref); `validation`
    makes the validator (default: `CorrectorValidation` of cfg.val_size GenRef samples; a factory
    returning None: no validation). The run ends at max_steps or max_minutes, with a checkpoint,
    the exported adapters and a validation; `stop_after` ends this call after that many steps with
    a checkpoint only, as a preempted job would."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm import tqdm

    cfg.validate()
    if source is None and not cfg.genref:
        raise ValueError(NO_GENREF)
    check_resumable(cfg)
    out = refuse_overwrite(cfg)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda and cfg.device.startswith("cuda:"):  # a single process on a chosen GPU (accelerate takes the current one)
        torch.cuda.set_device(torch.device(cfg.device))
    # The last single block's condition outputs are dropped, so its condition-only adapters (to_q,
    # proj_mlp, proj_out) never get a gradient: DDP must be told that some parameters go unused.
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cfg.bf16 and cuda else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    dev = acc.device
    validator = None
    if acc.is_main_process:  # before the model loads: a verifier option that does not fit fails early
        validator = validation() if validation is not None else genref_validation(cfg, family_cls.default_verifier)

    # 1. the data, the model (its adapters train), the optimizer, the EMA of the adapters; on resume
    # all of them (and the RNG states, the source's position) as the checkpoint left them
    batches = (source or (lambda rank, n: GenRefBatches(cfg, rank, n)))(acc.process_index, acc.num_processes)
    made: dict = {}

    def build() -> nn.Module:  # start_run seeds torch first: the same adapters on every process
        made["family"] = family = family_cls(**(family_kwargs or {}), device=dev)
        if not family.trainable():
            raise ValueError("the model has no trainable adapter parameters")
        return family.module

    checkpoint = Checkpoint("adapters", {"config": cfg.to_dict()}, source=batches)
    run = start_run(cfg, build, acc, checkpoint, ema=cfg.ema_decay > 0)
    family = made["family"]
    trackers = Trackers(cfg, acc.is_main_process, name)
    for note in trackers.notes:
        acc.print(note)
    if getattr(validator, "skipped", None):
        acc.print(describe_skips("GenRef validation", validator.skipped))
    if acc.is_main_process:
        trim_log(out / "val.jsonl", run.step)
    stream = prepared_batches(batches, family.prepare, run.step, cfg.num_workers, pin_memory=cuda)
    steps = CorrectorSteps(cfg, acc, family, torch.compile(run.model) if cfg.compile else run.model, batches)

    # 2. validation (the EMA weights when EMA is on; the main process), its rows in val.jsonl
    def validate(step: int, _model: nn.Module) -> dict | None:
        return validator(step, family) if validator is not None else None

    def log_validation(step: int, val_row: dict) -> None:
        trim_log(out / "val.jsonl", step - 1)
        trackers.log(val_row, "val.jsonl")
        if cfg.progress:
            tqdm.write(f"step {step}: validation {validator.describe(val_row)}")

    def export(step: int) -> None:  # the shippable adapters, with every checkpoint (the EMA weights when on)
        family.save_adapters(out / family.adapters_folder, {"step": step, "train_config": cfg.to_dict()})

    hooks = LoopHooks(row=steps.row, log=trackers.log, validate=validate, validate_every=cfg.val_every,
                      log_validation=log_validation, clock_ends_run=True, stop_after=stop_after)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    res = run_loop(cfg, run, stream, steps.loss, export=export, hooks=hooks, desc=f"train {name}")
    del stream  # DataLoader workers end here
    trackers.close()
    acc.end_training()
    skipped = batches.skipped()
    if skipped:
        acc.print(describe_skips(f"GenRef training data (process {acc.process_index})", skipped))
    return CorrectorTrainResult(step=res.step, minutes=res.minutes, losses=steps.losses, validation=res.val or None,
                                skipped=skipped)
