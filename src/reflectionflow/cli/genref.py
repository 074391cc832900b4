"""The `genref` command group: `genref inspect`, `genref build`, `genref merge` and `genref harvest`.

Every flag, the reading of the environment (the flux builder's API key) and the printing live here;
the builders (data/build.py, data/build_flux.py, data/harvest.py) take config dataclasses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..flags import add_batch_size

if TYPE_CHECKING:
    from ..data.build import BuildConfig


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "genref",
        help="GenRef triplet shards (webdataset): build and inspect them",
        description="GenRef-wds shards hold (bad image, good image, prompt, reflection, subset) triplets.",
    )
    gsub = g.add_subparsers(dest="genref_command", metavar="WHAT", required=True)
    register_inspect(gsub)
    register_build(gsub)
    register_harvest(gsub)


def register_inspect(gsub: argparse._SubParsersAction) -> None:
    p = gsub.add_parser(
        "inspect",
        help="count samples per subset, list unreadable ones, draw a preview grid",
        description="Read every sample of the shards once (images decoded) and report the samples per "
        "subset and what could not be read, and why. Shards: paths, globs, a directory, brace "
        "patterns (genref_{0..208}.tar) or URLs (pipe:..., https://...), several joined with '::'.",
    )
    p.add_argument("shards", nargs="+", help="shard files, globs, brace patterns, a directory or URLs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--preview", metavar="FILE.png", default=None,
                   help="write a grid of bad | good pairs with prompt and reflection")
    p.add_argument("--per-subset", type=int, default=3, help="pairs per subset in the preview (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from ..data.genref import GenRefError
    from ..data.preview import format_report, inspect_shards, save_preview

    if args.per_subset < 1:
        raise GenRefError(f"--per-subset must be >= 1, got {args.per_subset}")
    if args.preview is not None and not args.preview.lower().endswith(".png"):
        raise GenRefError(f"--preview must name a .png file, got {args.preview!r}")
    report = inspect_shards(args.shards, examples_per_subset=args.per_subset if args.preview else 0,
                            progress=not args.quiet)
    shown = save_preview(args.preview, report.examples) if args.preview else 0
    if args.json:
        d = report.to_dict()
        if args.preview:
            d["preview"] = {"path": args.preview, "pairs": shown}
        print(json.dumps(d))
    else:
        print(format_report(report))
        if args.preview:
            print(f"wrote {args.preview} ({shown} pairs)")
    return 0


# ----------------------------------------------------------------------------------------------
# genref build and genref merge (data/build.py is the builder)


def _mix(text: str) -> dict:
    from ..data.build import SOURCES
    from ..flags import name_weights

    return name_weights(text, "SOURCE", SOURCES)


BUILD_DESCRIPTION = """Build GenRef-wds shards and GenRef-CoT records from the four sources: rule (a prompt's failed vs
passed sample), reward (its lowest vs highest judged sample), length (a failed sample of the short
prompt vs a passed one of its long form) and editing (a correct image vs one with a planted flaw).
Deterministic and resumable: run the same command again, with any number of processes.

--backend world (default): Shapes-world samples judged by the exact evaluator, reflections from the
oracle reflector, planted-flaw scenes for editing.

--backend flux: FLUX samples (--flux-path), judged by the verifier (default vlm-yesno: its yes/no
decides the rule, length and editing pairs; the reward pairs rank by its score), reflections on the
bad image by the reflector (vlm), long prompts by the refiner (vlm), and editing pairs from the
Kontext corrector (--kontext-path) asked to plant a flaw in a passed sample (the edit must fail the
verifier). Prompts: --prompts FILE|SET, or GenEval-style prompts drawn over GenEval's 80 classes
(never one of the benchmark's own). The API key is read from the variable --vlm-api-key-env names
(default OPENAI_API_KEY) on every run and never written anywhere.

Several processes, GPUs or nodes: accelerate launch --multi_gpu --num_processes N -m reflectionflow
genref build ... (or torchrun). Each process makes its own shards; rank 0 merges the CoT parts into
genref_cot.jsonl. See docs/scale-out.md.
"""


def register_build(gsub: argparse._SubParsersAction) -> None:
    from ..backends.flux.options import add_arguments as flux_arguments
    from ..data.build import DEFAULT_MIX

    p = gsub.add_parser(
        "build", help="build GenRef triplet shards from the four sources (world or FLUX with VLM judges)",
        description=BUILD_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="world", help="world (default) | flux")
    p.add_argument("--out", required=True, help="output folder (shards, cot/, genref_cot.jsonl, build.json)")
    p.add_argument("--n", type=int, required=True, help="triplets to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", type=_mix, default=None,
                   help="source weights, default " + ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()))
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard, the unit of work (default 1000)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="generator samples per prompt draw")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--generator", default=None,
                   help="world: generator folder (default weights/world-generator); flux: component name (flux)")
    g.add_argument("--no-generator", action="store_true",
                   help="world: the renderer-backed stand-in with planted flaws instead of the trained generator")
    w = p.add_argument_group("world backend")
    add_batch_size(w, None, "images per generator call", shown=256)
    w.add_argument("--workers", type=int, default=None, help="processes judging images (default 1)")
    c = p.add_argument_group("flux backend: components and prompts")
    for kind, what in (("verifier", "vlm-yesno, local-yesno, vlm-score or clip (default vlm-yesno)"),
                       ("reflector", "vlm (default)"), ("refiner", "vlm (default)"),
                       ("corrector", "kontext (default) or reflection: plants the editing source's flaws")):
        c.add_argument(f"--{kind}", default=None, metavar="NAME", help=what)
    c.add_argument("--prompts", default=None, metavar="FILE|DIR|SET",
                   help="GenEval metadata .jsonl, .txt, .csv / .tsv, a folder of them, or the set geneval "
                   "(default: GenEval-style prompts drawn over GenEval's classes)")
    flux_arguments(p)
    for action in p._actions:  # shared with the world backend: say both defaults
        if action.dest in ("steps", "guidance", "device"):
            world = {"steps": "20", "guidance": "3.0", "device": "auto"}[action.dest]
            action.help = f"world: default {world}; flux: {action.help}"
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)

    m = gsub.add_parser(
        "merge", help="check a finished build and rewrite its merged CoT file (genref_cot.jsonl)",
        description="Check that DIR holds every shard of a genref build with its CoT part, and write "
        "DIR/genref_cot.jsonl from the parts in key order. `genref build` does this itself when it finishes.")
    m.add_argument("dir", help="a folder written by `reflectionflow genref build`")
    m.set_defaults(func=cmd_merge)


_WORLD_ONLY = {"no_generator": "--no-generator", "batch_size": "--batch-size", "workers": "--workers"}


def config_from_args(args, environ: Mapping[str, str]) -> tuple[BuildConfig, dict]:
    """(BuildConfig, secrets) from the flags; the flux backend's API key comes from `environ`."""
    from ..backends.flux.options import given_options
    from ..components import KINDS
    from ..data.build import DEFAULT_MIX, WORLD_DEFAULTS, BuildConfig, BuildError

    common = dict(out=args.out, n=args.n, backend=args.backend, seed=args.seed,
                  mix=args.mix if args.mix is not None else dict(DEFAULT_MIX), shard_size=args.shard_size,
                  samples_per_prompt=args.samples_per_prompt)
    # --generator, --steps, --guidance and --device serve both backends.
    flux_given = sorted(k for k in given_options(args) if k not in ("steps", "guidance", "device", *KINDS))
    flux_given += [k for k in ("verifier", "reflector", "refiner", "corrector", "prompts")
                   if getattr(args, k) is not None]
    if args.backend == "flux":
        given = [flag for dest, flag in _WORLD_ONLY.items() if getattr(args, dest)]
        if given:
            raise BuildError(f"{', '.join(given)}: world-backend flag(s), but the backend is flux "
                             "(FLUX batches with --flux-batch-size)")
        return flux_config_from_args(args, environ, common)
    if args.backend == "world" and flux_given:
        flags = ", ".join("--" + k.replace("_", "-") for k in flux_given)
        raise BuildError(f"{flags}: flag(s) of --backend flux, but the backend is world; add --backend flux")
    from ..backends.world.mmdit import DEFAULT_GENERATOR

    generator = None if args.no_generator else (args.generator or str(DEFAULT_GENERATOR))
    world = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in WORLD_DEFAULTS.items()}
    return BuildConfig(**common, generator=generator, device=args.device or "auto", **world), {}


def cmd_build(args) -> int:
    from ..data.build import BuildFailed, build_genref
    from ..engine.distributed import DistributedError
    from .generate import launched

    cfg, secrets = config_from_args(args, os.environ)
    try:
        with launched() as dist:
            summary = build_genref(cfg, progress=not args.quiet, dist=dist, secrets=secrets)
    except (DistributedError, BuildFailed) as e:
        print(f"reflectionflow: error: {e}", file=sys.stderr)
        return 1
    if dist.is_main:
        print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    from ..data.build import merge_build

    print(json.dumps(merge_build(args.dir)))
    return 0


def flux_config_from_args(args, environ: Mapping[str, str], common: dict) -> tuple[BuildConfig, dict]:
    """(BuildConfig, secrets) as `generate --backend flux` reads them: the key from `environ`, from the
    variable --vlm-api-key-env names; the config holds only the public settings."""
    from ..backends.flux.options import settings_from_args
    from ..data.build import BuildConfig
    from ..data.build_flux import DEFAULTS

    settings, secrets = settings_from_args(args, environ, {})
    names = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    return BuildConfig(**common, prompts=args.prompts, components=names, flux=settings), secrets


# ----------------------------------------------------------------------------------------------
# genref harvest (data/harvest.py is the harvester)


def register_harvest(gsub: argparse._SubParsersAction) -> None:
    from ..data.harvest import COMPONENT_KINDS, HARVEST_METHODS

    p = gsub.add_parser(
        "harvest",
        help="on-policy world data: run the real search on training prompts, label every candidate",
        description="Run `reflectionflow generate` (noise, prompt and reflection by default) on training prompts "
        "with the components named, then label every candidate with the exact evaluator and the oracle "
        "reflector, and write a pool the world trainers read (`train world-verifier|world-reflector|"
        "world-corrector --harvest OUT`), verifier pairs and GenRef shards. Round k should harvest with the "
        "components trained on rounds < k. Resumable: --resume continues a killed harvest.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="harvest folder (new, or one to --resume)")
    p.add_argument("--round", type=int, default=1, help="round number recorded with every candidate (default 1)")
    p.add_argument("--prompts", type=int, default=1200, metavar="N", help="training prompts (default 1200)")
    p.add_argument("--prompt-seed", type=int, default=1, help="draws the training prompts (default 1)")
    p.add_argument("--seed", type=int, default=1001, help="the searches' run seed, >= 1 (default 1001)")
    p.add_argument("--methods", default=",".join(HARVEST_METHODS),
                   help=f"comma-separated, of {', '.join(HARVEST_METHODS)} (default all)")
    p.add_argument("--budget", type=int, default=8, help="images per prompt and method (default 8)")
    for kind in COMPONENT_KINDS:
        p.add_argument(f"--{kind}", default=None, metavar="NAME", help=f"{kind} registry name (the world default)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a `generate --config` file (YAML or JSON), e.g. component options naming weights folders")
    p.add_argument("--val-prompts", type=int, default=553, metavar="N",
                   help="validation prompts sampled for the corrector's validation (default 553; 0: none)")
    p.add_argument("--processes", type=int, default=3, help="searches run at once (default 3)")
    p.add_argument("--batch-size", type=int, default=1024, help="requests per component call (default 1024)")
    p.add_argument("--prompt-batch", type=int, default=512, help="prompts searched together (default 512)")
    p.add_argument("--label-workers", type=int, default=0, help="labelling processes (default: all cores but one)")
    p.add_argument("--resume", action="store_true", help="continue (or reuse) the harvest in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_harvest)


def cmd_harvest(args) -> int:
    from ..data.harvest import COMPONENT_KINDS, HarvestConfig, harvest

    cfg = HarvestConfig(
        out=args.out, round=args.round, prompts=args.prompts, prompt_seed=args.prompt_seed, seed=args.seed,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), budget=args.budget,
        components={k: getattr(args, k) for k in COMPONENT_KINDS if getattr(args, k)}, run_config=args.config,
        val_prompts=args.val_prompts, processes=args.processes, batch_size=args.batch_size,
        prompt_batch=args.prompt_batch, label_workers=args.label_workers, resume=args.resume,
        progress=not args.quiet)
    summary = harvest(cfg)
    kinds = ", ".join(f"{k} {v['samples']} ({v['failed']} failed)" for k, v in summary["kinds"].items())
    print(f"harvest {args.out}: {summary['samples']} candidates: {kinds}; {summary['fixable']} failures with a "
          f"minimal edit; genref {summary['genref']['rule']} rule + {summary['genref']['general']} general")
    return 0
