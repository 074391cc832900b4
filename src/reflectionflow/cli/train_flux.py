"""`reflectionflow train flux-corrector`: flags -> FluxCorrectorConfig -> the shared corrector trainer.

Every flag maps to one field of train.flux_corrector.FluxCorrectorConfig; `--config FILE.json` sets
any field; with `--resume` the run folder's saved `train_config.json` is the base and the flags
given override it. The config is validated (FLUX folder, shards, LoRA targets against the
transformer built on the meta device, optimizer, verifier name) before any weights load.

Several GPUs or nodes: `accelerate launch [--num_processes N ...] -m reflectionflow train flux-corrector ...`
(each process reads its own shards of the GenRef list and trains batch_size samples per step).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .train_flags import build_config, name_list, number_list, weight_map


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _mix(text: str) -> dict:
    """A JSON schedule {"stages": [...], "ratios": {...}} or constant weights general=0.3,rule=0.7."""
    if text.lstrip().startswith("{"):
        return _json(text)
    return {"stages": [0], "ratios": {k: [v] for k, v in weight_map(text).items()}}


FLUX = [
    ("--flux-path", "flux_path", str, "local diffusers FLUX.1 folder (FluxPipeline)"),
    ("--genref", "genref", str, "GenRef shards: folder, glob, brace pattern genref_{0..208}.tar, or URLs"),
    ("--val-genref", "val_genref", str, "validation shards (default: the first --val-size samples of --genref)"),
    ("--mix", "mix", _mix, "subset mix: JSON {\"stages\": [0, 5000], \"ratios\": {...}} or general=0.3,rule=0.7 "
     "(default: the original's warm-up 0.1/0.1/0.1/0.7 -> 0.3/0.3/0.4/0 over 5000 steps)"),
    ("--buffer", "buffer_size", int, "encoded samples buffered per subset (the sample shuffle)"),
    ("--steps", "max_steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "samples per step and process"),
    ("--minutes", "max_minutes", float, "wall-clock stop in minutes (checkpoint written at the stop)"),
    ("--optimizer", "optimizer", str, "prodigy (the original's, lr 1; needs prodigyopt) | adamw"),
    ("--lr", "lr", float, "learning rate (1 for prodigy; about 1e-4 for adamw)"),
    ("--lr-schedule", "lr_schedule", str, "constant | cosine (after --warmup)"),
    ("--warmup", "warmup_steps", int, "linear lr warm-up steps"),
    ("--weight-decay", "weight_decay", float, "optimizer weight decay"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip (0: none)"),
    ("--rank", "lora_rank", int, "LoRA rank (the released config: 32; the paper's text: 256)"),
    ("--alpha", "lora_alpha", float, "LoRA alpha (scale alpha / rank)"),
    ("--targets", "lora_targets", name_list, "comma-separated layer patterns (* = block index); default: the "
     "released corrector's"),
    ("--text-dropout", "text_dropout", float, "share of samples with no text"),
    ("--image-dropout", "image_dropout", float, "share of samples with a black condition image"),
    ("--reflection-dropout", "reflection_dropout", float, "share of samples with the prompt alone"),
    ("--partial-share", "partial_share", float, "share of samples trained to start from the previous image "
     "partly noised (the corrector's --corrector-strength); 0: off"),
    ("--partial-strengths", "partial_strengths", number_list, "comma-separated start times in (0, 1] for those samples "
     "(default 0.5,0.75)"),
    ("--resolution", "resolution", int, "target image size in pixels"),
    ("--condition-size", "condition_size", int, "condition image size in pixels"),
    ("--max-seq-len", "max_sequence_length", int, "T5 tokens"),
    ("--seed", "seed", int, "seed of the data order, dropouts, noise and adapter initialisation"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N (single process; accelerate launch picks per process)"),
    ("--log-every", "log_every", int, "steps per line of log.jsonl"),
    ("--ckpt-every", "ckpt_every", int, "steps per checkpoint (and per export of OUT/lora)"),
    ("--val-every", "val_every", int, "steps per validation"),
    ("--val-size", "val_size", int, "validation samples (0: no validation)"),
    ("--val-verifier", "val_verifier", str, "registered verifier that scores the validation corrections"),
    ("--val-verifier-options", "val_verifier_options", _json, "JSON options of the verifier, e.g. "
     "{\"path\": \"/models/clip\"}"),
    ("--val-steps", "val_steps", int, "sampling steps of a validation correction"),
    ("--val-guidance", "val_guidance", float, "guidance of a validation correction"),
    ("--trackers", "trackers", name_list, "tensorboard,wandb (log.jsonl is always written)"),
]
# Tri-state switches copied by build_config like the flags above (None: not given).
SWITCHES = [(None, "gradient_checkpointing", None, None)]


def register(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("flux-corrector", help="reflection tuning of FLUX.1: the OminiControl-layout corrector LoRA",
                        description="LoRA on a frozen FLUX.1 transformer, condition tokens from the previous image, "
                        "trained on GenRef shards (flow matching; docs/method.md, section 3). OUT/lora holds the "
                        "adapters in the released corrector's format. Several GPUs: accelerate launch -m "
                        "reflectionflow train flux-corrector ...")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, validation, OUT/lora)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (its saved config is "
                   "the base; flags given override it)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 base weights and autocast on CUDA (default; --no-bf16: fp32)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in the backward pass (default on)")
    p.add_argument("--config", default=None, help="JSON file of config fields (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for flag, dest, typ, text in FLUX:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text)
    p.set_defaults(func=cmd_flux_corrector)


def cmd_flux_corrector(args) -> int:
    from ..train.flux_corrector import FluxCorrectorConfig, train_flux_corrector

    cfg = build_config(FluxCorrectorConfig, args, FLUX + SWITCHES)
    res = train_flux_corrector(cfg)
    line = f"trained {res.step} steps in {res.minutes:.1f} min; adapters in {Path(cfg.out_dir) / 'lora'}"
    if res.validation is not None:
        v = res.validation
        line += f"; validation score {v['corrected']['score']} (before {v['before']['score']})"
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process under accelerate launch
        print(line)
    return 0
