"""`reflectionflow train verifier|reflector`: flags -> the config dataclass -> the trainer.

Real-scale judges on a Qwen2.5-VL base (train/vlm_verifier.py, train/vlm_reflector.py). The
config is validated (base folder of the right family, data readable, every JSONL line well
formed) before any weights load. Several GPUs or nodes: `accelerate launch -m reflectionflow
train verifier ...` (or `python -m reflectionflow.cli.train verifier ...`). No torch at import.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .train_flags import add_flags, build_config, name_list, weight_map

COMMON = [
    ("--base", "base", str, "Qwen2.5-VL (or Qwen2-VL) model folder to start from"),
    ("--data", "data", str, "training data: a JSONL file or GenRef shards (folder, glob, brace pattern)"),
    ("--data-format", "data_format", str, "auto | jsonl | genref (auto: *.jsonl is JSONL)"),
    ("--val-data", "val_data", str, "held-out data of the same kind (default: split --val-size off --data)"),
    ("--val-size", "val_size", int, "held-out examples (0: no validation)"),
    ("--genref-mix", "genref_mix", weight_map, "GenRef subset weights, e.g. general=1,length=1,rule=1,editing=1"),
    ("--tune", "tune", str, "lora (adapters on the language model) | full"),
    ("--rank", "lora_rank", int, "LoRA rank"),
    ("--alpha", "lora_alpha", float, "LoRA alpha"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout"),
    ("--targets", "lora_targets", name_list, "comma-separated language-model layers the LoRA adapts"),
    ("--steps", "max_steps", int, "optimizer steps (the lr schedule ends there)"),
    ("--batch-size", "batch_size", int, "examples per process per micro-step"),
    ("--grad-accum", "grad_accum", int, "micro-steps per optimizer step"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--warmup", "warmup_steps", int, "linear lr warm-up steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip (0: none)"),
    ("--minutes", "max_minutes", float, "wall-clock stop in minutes (checkpoint and export at the stop)"),
    ("--min-pixels", "min_pixels", int, "smallest image area after resizing (default: the base's)"),
    ("--max-pixels", "max_pixels", int, "largest image area after resizing"),
    ("--max-length", "max_length", int, "longest sequence in tokens (longer examples are skipped)"),
    ("--device", "device", str, "auto | cpu"),
    ("--seed", "seed", int, "seed of the data order, the head and LoRA initialisation"),
    ("--log-every", "log_every", int, "steps per line of log.jsonl"),
    ("--val-every", "val_every", int, "steps per validation"),
    ("--ckpt-every", "ckpt_every", int, "steps per checkpoint"),
]
VERIFIER = [
    ("--loss", "loss", str, "bt | btt (Bradley-Terry with ties) | margin | regression"),
    ("--tie-margin", "tie_margin", float, "btt: log(theta) of the ties model"),
    ("--margin", "margin", float, "margin loss: the hinge margin"),
    ("--norm-size", "norm_size", int, "training images whose rewards set the saved mean / std"),
]
REFLECTOR = [
    ("--message-style", "message_style", str, "instruct (the engine's reflection prompt) | reflection-generator"),
    ("--val-generate", "val_generate", int, "held-out images reflected at each validation (parse share)"),
    ("--max-new-tokens", "max_new_tokens", int, "longest generated reflection"),
]


def _flags(p: argparse.ArgumentParser, table) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, the exported model)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (its saved config "
                   "is the base; flags given override it)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 on CUDA (default; --no-bf16: fp32)")
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="gradient checkpointing (default on)")
    p.add_argument("--config", default=None, help="JSON file of config fields (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_flags(p, COMMON + table)


def register(tsub: argparse._SubParsersAction) -> None:
    v = tsub.add_parser("verifier", help="a Qwen2.5-VL reward model on preference pairs (the image verifier)",
                        description="A scalar reward head on a Qwen2.5-VL, trained on preference pairs (GenRef "
                        "good/bad images or a JSONL of pairs) with Bradley-Terry, Bradley-Terry with ties, margin "
                        "or regression losses; OUT/verifier is the model for --verifier reward --verifier-path.")
    _flags(v, VERIFIER)
    v.set_defaults(func=cmd_verifier)
    r = tsub.add_parser("reflector", help="a Qwen2.5-VL reflection generator (LoRA SFT on GenRef-CoT)",
                        description="Supervised fine-tuning on GenRef-CoT-style JSONL (prompt, image, analysis, "
                        "instructions) or GenRef shards to write '- <instruction>' edit commands; OUT/reflector "
                        "is the merged model for --reflector local --reflector-path, or for `vllm serve`.")
    _flags(r, REFLECTOR)
    r.set_defaults(func=cmd_reflector)


def _skips(skipped: dict) -> str:
    return f"; skipped {json.dumps(skipped, sort_keys=True)}" if skipped else ""


def cmd_verifier(args) -> int:
    from ..train.vlm_verifier import VerifierTrainConfig, train_verifier

    table = VERIFIER + [("--grad-checkpointing", "grad_checkpointing", bool, "")]
    cfg = build_config(VerifierTrainConfig, args, COMMON + table)
    res = train_verifier(cfg)
    acc = "" if res.val_accuracy is None else f"; held-out pairwise accuracy {res.val_accuracy:.3f}"
    print(f"trained {res.step} steps in {res.minutes:.1f} min{acc}{_skips(res.skipped)}; model in {res.out}")
    return 0


def cmd_reflector(args) -> int:
    from ..train.vlm_reflector import ReflectorTrainConfig, train_reflector

    table = REFLECTOR + [("--grad-checkpointing", "grad_checkpointing", bool, "")]
    cfg = build_config(ReflectorTrainConfig, args, COMMON + table)
    res = train_reflector(cfg)
    parts = []
    if res.val_loss is not None:
        parts.append(f"held-out loss {res.val_loss:.3f}")
    if res.val_parse_share is not None:
        parts.append(f"parse share {res.val_parse_share:.2f}")
    extra = "; " + ", ".join(parts) if parts else ""
    print(f"trained {res.step} steps in {res.minutes:.1f} min{extra}{_skips(res.skipped)}; merged model in "
          f"{res.out} (adapters in {Path(res.out).parent / 'reflector-lora'})")
    return 0
