"""`reflectionflow train world-verifier|world-reflector`: flags -> the config dataclass -> the trainer.

No torch at import: the trainers load when their command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .train_flags import COMMON, add_common_flags, add_flags, build_config, name_list, weight_map

VERIFIER = [
    ("--size", "model_size", str, "model size: tiny | small"),
    ("--p-flaw", "p_flaw", float, "share of rendered scenes given one planted flaw"),
    ("--tag-weights", "tag_weights", weight_map, "category weights of the data, e.g. position=0.3,counting=0.2"),
    ("--generator", "generator", str, "a generator folder: mix its own judged samples into every batch"),
    ("--generator-share", "generator_share", float, "share of each batch from the generator's pool"),
    ("--pool-size", "pool_size", int, "generator samples in the pool (made once, OUT/pool.npz)"),
    ("--corrector", "corrector", str, "a corrector folder: its corrections of the pool's samples join the pool"),
    ("--val-size", "val_size", int, "held-out renders scored at every log line (0: none)"),
    ("--harvest", "harvest", name_list, "harvest folders (genref harvest; comma-separated, one per round): the "
     "search's labelled candidates are the pool (its share of a batch: --generator-share)"),
    ("--holdout", "holdout", float, "share of the harvests' searches held out for calibration and scores"),
    ("--scene-weight", "scene_weight", float, "weight of the scene head's per-patch class/colour loss beside "
     "the yes/no loss (0: no scene head)"),
]

REFLECTOR = [row for row in VERIFIER if row[1] in ("model_size", "p_flaw", "tag_weights", "val_size", "generator",
                                                  "generator_share", "pool_size", "corrector", "harvest",
                                                  "holdout")]


def register(tsub: argparse._SubParsersAction) -> None:
    v = tsub.add_parser("world-verifier", help="the world's learned yes/no verifier (image + prompt -> P(yes))",
                        description="A patch-transformer image encoder and the world's text encoder with joint "
                        "attention and a yes/no head, trained on renders with planted flaws (and a generator's "
                        "samples with --generator), every label from the exact evaluator; OUT/verifier holds "
                        "the weights (copy it to weights/world-verifier for verifier world-learned).")
    add_common_flags(v)  # the flow-only flags (--cfg, --sample-steps, ...) are refused by the config if given
    add_flags(v, VERIFIER)
    v.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror pool samples left-right by chance 1/2 (left/right swapped in the prompt, the "
                   "label judged again)")
    v.set_defaults(func=cmd_world_verifier)
    r = tsub.add_parser("world-reflector", help="the world's learned reflector (image + prompt -> edit commands)",
                        description="The verifier's encoder and a small causal decoder, trained on the oracle "
                        "reflector's commands for renders with planted flaws; OUT/reflector holds the weights "
                        "(copy it to weights/world-reflector for reflector world-learned).")
    add_common_flags(r)
    add_flags(r, REFLECTOR)
    r.set_defaults(func=cmd_world_reflector)


def cmd_world_verifier(args) -> int:
    from ..train.verifier import WorldVerifierConfig, train_world_verifier

    cfg = build_config(WorldVerifierConfig, args, COMMON + VERIFIER)
    res = train_world_verifier(cfg)
    acc = "" if res.val_accuracy is None else f"; held-out accuracy {res.val_accuracy:.3f}"
    if res.held is not None:
        after = res.held["after"]

        def f3(x) -> str:  # None: the held-out searches hold one class only
            return "n/a" if x is None else f"{x:.3f}"

        acc += (f"; held-out harvest: AUC {f3(after['auc'])}, calibration error {f3(res.held['before']['ece'])} -> "
                f"{f3(after['ece'])} (temperature {res.held['temperature']})")
    print(f"trained {res.step} steps in {res.minutes:.1f} min{acc}; weights in {Path(cfg.out_dir) / 'verifier'}")
    return 0


def cmd_world_reflector(args) -> int:
    from ..train.reflector import WorldReflectorConfig, train_world_reflector

    cfg = build_config(WorldReflectorConfig, args, COMMON + REFLECTOR)
    res = train_world_reflector(cfg)
    exact = "" if res.val_exact is None else f"; held-out exact match {res.val_exact:.3f}"
    print(f"trained {res.step} steps in {res.minutes:.1f} min{exact}; weights in {Path(cfg.out_dir) / 'reflector'}")
    return 0
