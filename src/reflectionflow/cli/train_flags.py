"""What the `train` commands share: the flag types, the flags every world trainer takes (COMMON), and
`build_config`, which turns a command's flag table (flag, config field, type, help) into its
config dataclass.

Each table maps a flag to one field of the command's config; every parser default is None, so that
a resumed run knows what was given: the saved `train_config.json` (on --resume), then `--config
FILE.json`, then the flags given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path


def weight_map(text: str) -> dict:
    """'a=0.1,b=0.2' -> {'a': 0.1, 'b': 0.2}."""
    from ..flags import name_weights

    return name_weights(text)


def name_list(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def number_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# (flag, config field, type, help); every default is None so that a resumed run knows what was given.
COMMON = [
    ("--steps", "max_steps", int, "optimizer steps (the lr schedule ends there)"),
    ("--batch-size", "batch_size", int, "images per step"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--warmup", "warmup_steps", int, "linear lr warm-up steps"),
    ("--minutes", "max_minutes", float, "wall-clock stop in minutes (checkpoint written at the stop)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--seed", "seed", int, "seed of the data, the noise and the initialisation"),
    ("--workers", "num_workers", int, "DataLoader worker processes making batches"),
    ("--ema", "ema_decay", float, "EMA decay of the trained weights"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip (0: none)"),
    ("--text-dropout", "text_dropout", float, "share of samples trained with the empty text (for CFG)"),
    ("--log-every", "log_every", int, "steps per line of log.jsonl"),
    ("--ckpt-every", "ckpt_every", int, "steps per checkpoint"),
    ("--val-prompts", "val_prompts", int, "validation prompts (0: no validation)"),
]


def add_flags(p: argparse.ArgumentParser, table) -> None:
    for flag, dest, typ, text in table:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, samples, the shippable weights)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (its saved config "
                   "is the base; flags given override it)")
    # Tri-state (None: not given), so that --resume keeps the saved value unless told otherwise.
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (--no-compile: eager)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA (default; --no-bf16: fp32)")
    p.add_argument("--config", default=None, help="JSON file of config fields (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_flags(p, COMMON)


def build_config(cls, args, table) -> object:
    """The command's config: saved (on --resume), then --config, then the flags given; validated."""
    from ..io import check_writable_dir
    from ..runtime import check_device

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if args.resume and not out.is_dir():
        raise ValueError(f"--resume: --out {out}: no such run folder; drop --resume to start a new run there")
    check_writable_dir(out, "--out")
    values: dict = {}
    saved = out / "train_config.json"
    if args.resume and saved.is_file():
        values.update(json.loads(saved.read_text()))
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            values.update(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not JSON ({e.msg})") from None
    for _, dest, _, _ in table:
        if getattr(args, dest, None) is not None:
            values[dest] = getattr(args, dest)
    for dest in ("compile", "bf16", "final_eval", "snapshots", "flip"):
        if getattr(args, dest, None) is not None:
            values[dest] = getattr(args, dest)
    if getattr(args, "template_captions", False):
        values["caption_mix"] = None
    values.update(out_dir=str(out), resume=bool(args.resume), progress=not args.quiet)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    if isinstance(values.get("device"), str):
        check_device(values["device"])
    cfg = cls(**values).validate()
    if (out / "checkpoint").exists() and not cfg.resume:
        raise ValueError(f"--out {out} already holds a checkpoint; add --resume to continue it or pick another --out")
    return cfg
