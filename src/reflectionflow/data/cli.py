"""The `genref` command group: `genref inspect` here; more verbs come from GENREF_COMMAND_MODULES.

A module listed there adds its verbs with `register(genref_subparsers)`, like the top-level
command modules do; one that is not part of this installation is skipped. That is how
`genref build` (the four-source construction) joins without this file changing its commands.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json

GENREF_COMMAND_MODULES = ("reflectionflow.data.build", "reflectionflow.data.harvest")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "genref",
        help="GenRef triplet shards (webdataset): build and inspect them",
        description="GenRef-wds shards hold (bad image, good image, prompt, reflection, subset) triplets.",
    )
    gsub = g.add_subparsers(dest="genref_command", metavar="WHAT", required=True)
    register_inspect(gsub)
    for name in GENREF_COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(gsub)


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
    from .genref import GenRefError
    from .preview import format_report, inspect_shards, save_preview

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
