"""`reflectionflow train world-generator|world-corrector`: flags -> a config dataclass -> the trainer.

Every flag maps to one field of the command's config (train.world.WorldTrainConfig,
train.corrector.WorldCorrectorConfig); `--config FILE.json` sets any field; with `--resume` the
run folder's saved `train_config.json` is the starting point and the flags given override it.
The config is validated (generator weights present, LoRA targets real, ...) before any weights
load, so a bad argument costs a one-line error, not a model load.

The other trainers' verbs come from their own modules beside this one, each with
`register(train_subparsers)`: train_world_judges.py (world-verifier, world-reflector),
train_flux.py (flux-corrector), train_vlm.py (verifier, reflector: the transformers VLM judges).
Standalone: `python -m reflectionflow.cli.train world-corrector --out RUN ...` (no other command
modules imported, for machines that lack their dependencies).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path


def _mapping(text: str) -> dict:
    """'a=0.1,b=0.2' -> {'a': 0.1, 'b': 0.2}."""
    from ..flags import name_weights

    return name_weights(text)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _floats(text: str) -> tuple[float, ...]:
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
GENERATOR = [
    ("--sample-every", "sample_every", int, "steps per validation"),
    ("--sample-steps", "sample_steps", int, "Euler steps when sampling for validation"),
    ("--cfg", "cfg_scale", float, "CFG scale when sampling for validation"),
    ("--size", "model_size", str, "model size"),
    ("--tag-weights", "tag_weights", _mapping, "category weights of the data, e.g. position=0.3,counting=0.2"),
    ("--final-eval-prompts", "final_eval_prompts", int, "benchmark prompts scored at the end (default all 553)"),
    ("--eval-batch", "eval_batch", int, "batch when sampling for evaluation"),
    ("--caption-mix", "caption_mix", _mapping, "training-caption shares (world.captions.CaptionMix), e.g. "
     "template=0.3,combined=0.35,relation=0.35"),
]
# The corrector trains through the shared corrector trainer, whose fields name validation settings val_*.
CORRECTOR = [
    ("--sample-every", "val_every", int, "steps per validation (and at the end)"),
    ("--sample-steps", "val_steps", int, "Euler steps when sampling the pool and validation corrections"),
    ("--cfg", "val_guidance", float, "CFG scale when sampling the pool and validation corrections"),
    ("--generator", "generator", str, "the frozen base generator folder (default weights/world-generator)"),
    ("--genref", "genref", str, "GenRef shards (glob or {a..b}): train through the shared corrector trainer"),
    ("--cond-attention", "cond_attention", str, "full | causal_kv (condition tokens see only themselves; K/V cached)"),
    ("--rank", "lora_rank", int, "LoRA rank"),
    ("--alpha", "lora_alpha", float, "LoRA alpha"),
    ("--targets", "lora_targets", _names, "comma-separated layer names the LoRA adapts"),
    ("--scope", "lora_scope", str, "cond (condition tokens only, OminiControl) | all"),
    ("--image-dropout", "image_dropout", float, "share of samples with a blank condition image"),
    ("--reflection-dropout", "reflection_dropout", float, "share of samples without the reflection"),
    ("--partial-share", "partial_share", float, "share of samples trained to start from the previous image "
     "partly noised (the corrector's strength < 1); 0: off"),
    ("--partial-strengths", "partial_strengths", _floats, "comma-separated start times in (0, 1] for those samples "
     "(default 0.5,0.75)"),
    ("--mix-start", "mix_start", _mapping, "GenRef subset weights at step 0, e.g. general=0.1,length=0.1,..."),
    ("--mix-end", "mix_end", _mapping, "GenRef subset weights from --mix-steps on"),
    ("--mix-steps", "mix_steps", int, "steps of the subset-mix warm-up"),
    ("--keep-share", "keep_share", float, "share of rule draws that are 'keep' pairs of passed samples"),
    ("--pool", "pool_dir", str, "folder of the judged generator samples (default OUT/pool; may be shared)"),
    ("--harvest", "harvest", _names, "harvest folders (genref harvest; comma-separated, one per round): the "
     "search's labelled candidates are the pool"),
    ("--pool-size", "pool_size", int, "generator samples in the pool"),
    ("--pool-per-prompt", "pool_per_prompt", int, "samples per prompt draw in the pool"),
    ("--pool-tag-weights", "pool_tag_weights", _mapping, "category weights of the pool's prompts"),
    ("--pool-batch", "pool_batch", int, "batch when sampling the pool"),
    ("--label-workers", "label_workers", int, "processes labelling the pool (0: all cores but one)"),
    ("--val-samples", "val_samples", int, "samples per validation prompt"),
    ("--val-max", "val_size", int, "failed (and passed) validation samples corrected per validation "
     "(with --genref: GenRef validation samples; 0: no validation)"),
]


def _add_flags(p: argparse.ArgumentParser, table) -> None:
    for flag, dest, typ, text in table:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text)


def _common(p: argparse.ArgumentParser) -> None:
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
    _add_flags(p, COMMON)


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train models: the world's four, the FLUX corrector, the VLM judges",
                       description="Train the Shapes world's models (generator, corrector, verifier, reflector), "
                       "the FLUX reflection corrector and the Qwen2.5-VL verifier and reflector; each run folder "
                       "stores its resolved config.")
    tsub = t.add_subparsers(dest="train_command", metavar="WHAT", required=True)
    g = tsub.add_parser("world-generator", help="the world's text-to-image MMDiT, from scratch",
                        description="Flow matching on scenes rendered on the fly; OUT/ema holds the fp16 weights.")
    _common(g)
    _add_flags(g, GENERATOR)
    g.add_argument("--no-final-eval", dest="final_eval", action="store_false", default=None,
                   help="skip scoring GenEval-Shapes at the end")
    g.add_argument("--template-captions", dest="template_captions", action="store_true",
                   help="train on the template prompts only (the generator v1's data), no explicit captions")
    g.add_argument("--snapshots", dest="snapshots", action="store_true", default=None,
                   help="keep the EMA weights of every validation step in OUT/snapshots/step_N")
    g.set_defaults(func=cmd_world_generator)
    c = tsub.add_parser("world-corrector", help="the reflection-tuned LoRA on the trained generator",
                        description="OminiControl-style LoRA on the frozen generator, trained by the shared "
                        "corrector trainer (the FLUX corrector's) on world GenRef pairs made on the fly (editing "
                        "pairs and the generator's own judged samples), or on GenRef shards with --genref; "
                        "OUT/corrector holds the fp16 (EMA) adapters.")
    _common(c)
    _add_flags(c, CORRECTOR)
    c.add_argument("--pool-only", action="store_true", help="build the pool of judged generator samples and stop")
    c.set_defaults(func=cmd_world_corrector)
    from . import train_flux, train_vlm, train_world_judges  # they build on this module's tables

    for module in (train_world_judges, train_flux, train_vlm):
        module.register(tsub)


def build_config(cls, args, table) -> object:
    """The command's config: saved (on --resume), then --config, then the flags given; validated."""
    from ..io import check_writable_dir
    from ..train.loop import check_device

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
    for dest in ("compile", "bf16", "final_eval", "snapshots"):
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


def cmd_world_generator(args) -> int:
    from ..train.world import WorldTrainConfig, train_world_generator

    cfg = build_config(WorldTrainConfig, args, COMMON + GENERATOR)
    res = train_world_generator(cfg)
    line = f"trained {res.train.step} steps in {res.train.minutes:.1f} min; weights in {Path(cfg.out_dir) / 'ema'}"
    if res.scores is not None:
        line += f"; GenEval-Shapes overall {res.scores['overall']:.3f}"
    print(line)
    return 0


def cmd_world_corrector(args) -> int:
    from ..train.corrector import WorldCorrectorConfig, prepare_pool, train_world_corrector

    cfg = build_config(WorldCorrectorConfig, args, COMMON + CORRECTOR)
    if args.pool_only:
        pool = prepare_pool(cfg)
        print(f"pool {pool.folder}: {json.dumps(pool.summary)}")
        return 0
    res = train_world_corrector(cfg)
    line = f"trained {res.train.step} steps in {res.train.minutes:.1f} min;" \
        f" adapters in {Path(cfg.out_dir) / 'corrector'}"
    if res.scores is not None and "fixed" in res.scores:
        line += f"; validation fixed {res.scores['fixed']} broken {res.scores['broken']}"
    elif res.scores is not None:  # the GenRef validation (--genref)
        line += f"; validation score {res.scores['corrected']['score']} (before {res.scores['before']['score']})"
    print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflectionflow.cli.train")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    # `python -m reflectionflow.cli.train world-corrector ...` == `reflectionflow train world-corrector ...`
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        from . import one_line

        print(f"reflectionflow train: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
