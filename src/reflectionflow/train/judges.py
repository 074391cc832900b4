"""The training loop shared by the world's learned judges (verifier and reflector).

Both trainers start the same way (fresh folder or exact resume, AdamW, EMA) and run the same
loop (warm-up/cosine lr, clip, EMA, periodic log with a validation score, checkpoint, an EMA
export of shippable weights, a final save when the clock stops the run); they differ only in the
model, the data, the loss of one batch and the validation score, which they pass in.
`open_run_folder` and `append_log` are also the real-scale VLM trainers' (train/vlm_common.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .loop import EMA, _trim_log, load_checkpoint, lr_at, resolve_device, save_checkpoint


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
    """One line of OUT/log.jsonl (the run's whole story; `_trim_log` cuts it back on resume)."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@dataclass
class JudgeRun:
    out: Path
    device: torch.device
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: EMA
    step: int


def start_judge_run(cfg, build_model: Callable[[], torch.nn.Module]) -> JudgeRun:
    """Validate, make (or resume) the run folder, build the model, optimizer and EMA."""
    out = open_run_folder(cfg)
    dev = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model().to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    step = load_checkpoint(out, model, ema, opt) if cfg.resume and (out / "checkpoint").exists() else 0
    _trim_log(out / "log.jsonl", step)
    return JudgeRun(out, dev, model, opt, ema, step)


@dataclass
class JudgeLoopResult:
    step: int
    minutes: float
    last_loss: float
    val: dict = field(default_factory=dict)  # the last validation row (empty without validation)


def run_judge_loop(cfg, run: JudgeRun, name: str, batches: Iterator,
                   batch_loss: Callable[[object], tuple[torch.Tensor, dict[str, float]]],
                   validate: Callable[[torch.nn.Module], dict[str, float]] | None) -> JudgeLoopResult:
    """Train until max_steps or max_minutes. `batch_loss(batch)` returns the loss and running
    statistics (averaged over each log interval); `validate(ema_model)` returns held-out scores.
    The EMA weights are exported to OUT/<name> at every checkpoint."""
    from tqdm import tqdm

    out, model, opt, ema, step = run.out, run.model, run.opt, run.ema, run.step
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {name}", unit="step", disable=not cfg.progress)
    t0, sums, n, last_loss, val = time.perf_counter(), {}, 0, float("nan"), {}

    def save() -> None:
        save_checkpoint(out, model, ema, opt, step, cfg)
        ema.model.save_pretrained(out / name)

    while step < cfg.max_steps and (cfg.max_minutes is None or (time.perf_counter() - t0) / 60 < cfg.max_minutes):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, stats = batch_loss(next(batches))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(step)
        step += 1
        bar.update(1)
        for k, v in {"loss": loss.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last_loss = sums["loss"] / n
            row = {"step": step, **{k: round(v / n, 5) for k, v in sums.items()}, "lr": lr_at(step - 1, cfg),
                   "train_minutes": round((time.perf_counter() - t0) / 60, 3)}
            if validate is not None:
                val = {k: round(v, 4) for k, v in validate(ema.model).items()}
                row.update(val)
            append_log(out, row)
            bar.set_postfix(loss=f"{last_loss:.4f}", **{k: f"{v}" for k, v in val.items()})
            sums, n = {}, 0
            model.train()
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save()
    bar.close()
    if step % cfg.ckpt_every and step != cfg.max_steps:  # stopped by the clock: keep what was done
        save()
    return JudgeLoopResult(step=step, minutes=(time.perf_counter() - t0) / 60, last_loss=last_loss, val=val)
