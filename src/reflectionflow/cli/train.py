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
from pathlib import Path

from .train_flags import COMMON, add_common_flags, add_flags, build_config, name_list, number_list, weight_map

GENERATOR = [
    ("--sample-every", "sample_every", int, "steps per validation"),
    ("--sample-steps", "sample_steps", int, "Euler steps when sampling for validation"),
    ("--cfg", "cfg_scale", float, "CFG scale when sampling for validation"),
    ("--size", "model_size", str, "model size"),
    ("--tag-weights", "tag_weights", weight_map, "category weights of the data, e.g. position=0.3,counting=0.2"),
    ("--final-eval-prompts", "final_eval_prompts", int, "benchmark prompts scored at the end (default all 553)"),
    ("--eval-batch", "eval_batch", int, "batch when sampling for evaluation"),
    ("--caption-mix", "caption_mix", weight_map, "training-caption shares and alt-text noise rates "
     "(world.captions.CaptionMix), e.g. template=0.3,combined=0.35,relation_noise=0.9"),
    ("--init-from", "init_from", str, "a trained generator folder to start from (same --size; new words and "
     "text positions start fresh)"),
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
    ("--targets", "lora_targets", name_list, "comma-separated layer names the LoRA adapts"),
    ("--scope", "lora_scope", str, "cond (condition tokens only, OminiControl) | all"),
    ("--image-dropout", "image_dropout", float, "share of samples with a blank condition image"),
    ("--reflection-dropout", "reflection_dropout", float, "share of samples without the reflection"),
    ("--partial-share", "partial_share", float, "share of samples trained to start from the previous image "
     "partly noised (the corrector's strength < 1); 0: off"),
    ("--partial-strengths", "partial_strengths", number_list, "comma-separated start times in (0, 1] for those samples "
     "(default 0.5,0.75)"),
    ("--mix-start", "mix_start", weight_map, "GenRef subset weights at step 0, e.g. general=0.1,length=0.1,..."),
    ("--mix-end", "mix_end", weight_map, "GenRef subset weights from --mix-steps on"),
    ("--mix-steps", "mix_steps", int, "steps of the subset-mix warm-up"),
    ("--keep-share", "keep_share", float, "share of rule draws that are 'keep' pairs of passed samples"),
    ("--pool", "pool_dir", str, "folder of the judged generator samples (default OUT/pool; may be shared)"),
    ("--harvest", "harvest", name_list, "harvest folders (genref harvest; comma-separated, one per round): the "
     "search's labelled candidates are the pool"),
    ("--pool-size", "pool_size", int, "generator samples in the pool"),
    ("--pool-per-prompt", "pool_per_prompt", int, "samples per prompt draw in the pool"),
    ("--pool-tag-weights", "pool_tag_weights", weight_map, "category weights of the pool's prompts"),
    ("--pool-batch", "pool_batch", int, "batch when sampling the pool"),
    ("--label-workers", "label_workers", int, "processes labelling the pool (0: all cores but one)"),
    ("--val-samples", "val_samples", int, "samples per validation prompt"),
    ("--val-max", "val_size", int, "failed (and passed) validation samples corrected per validation "
     "(with --genref: GenRef validation samples; 0: no validation)"),
]


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train models: the world's four, the FLUX corrector, the VLM judges",
                       description="Train the Shapes world's models (generator, corrector, verifier, reflector), "
                       "the FLUX reflection corrector and the Qwen2.5-VL verifier and reflector; each run folder "
                       "stores its resolved config.")
    tsub = t.add_subparsers(dest="train_command", metavar="WHAT", required=True)
    g = tsub.add_parser("world-generator",
                        help="the world's text-to-image MMDiT, from scratch or --init-from a trained one",
                        description="Flow matching on scenes rendered on the fly; OUT/ema holds the fp16 weights.")
    add_common_flags(g)
    add_flags(g, GENERATOR)
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
    add_common_flags(c)
    add_flags(c, CORRECTOR)
    c.add_argument("--pool-only", action="store_true", help="build the pool of judged generator samples and stop")
    c.set_defaults(func=cmd_world_corrector)
    from . import train_flux, train_vlm, train_world_judges  # they build on this module's tables

    for module in (train_world_judges, train_flux, train_vlm):
        module.register(tsub)


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
