"""Sub-commands of the reports: `compare RUN_A RUN_B ...` (the run's own report.html is `report DIR`,
registered by the engine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..flags import add_bootstrap

COMPARE_HELP = """\
Compare runs on the same prompts, metric by metric, with 95 % bootstrap intervals over prompts
(paired: every resample draws the same prompts for every run; stratified by category), the
samples and NFE each run spent on them, and side-by-side images of the prompts where the runs
differ most. Prompts are matched by text; only those in every run are compared.

Metrics are read from each run folder, as `reflectionflow evaluate DIR [--metric NAME]` wrote
them: GenEval-Shapes (DIR/scores.json) and DIR/metrics/<name>/. By default, every metric
evaluated in all the runs. A metric that is a run's own verifier is marked: not independent.

Writes OUT/compare.html (self-contained: images inlined), OUT/compare.md and OUT/compare.json, and
prints the table.
"""


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="compare runs on the same prompts: metrics with bootstrap intervals, "
                       "samples and NFE, side-by-side images", description=COMPARE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message: str):  # one line, not the whole usage
        c.exit(2, f"reflectionflow compare: error: {message}\n")

    c.error = error
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (two or more)")
    c.add_argument("--out", default="compare", metavar="DIR", help="where the page and tables go (default compare/)")
    c.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="compare only these metrics (repeatable; default: every metric evaluated in all runs)")
    c.add_argument("--top", type=int, default=8, metavar="K", help="prompts shown side by side (default 8)")
    add_bootstrap(c)
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from ..io import check_writable_dir
    from ..report.compare import compare_runs, format_table, write_comparison

    check_writable_dir(args.out, "--out")  # before any run is read: compare writes three files in a folder
    comparison = compare_runs(args.runs, metrics=args.metric, top=args.top, resamples=args.bootstrap, seed=args.seed)
    paths = write_comparison(comparison, Path(args.out))
    where = "; ".join(f"{r.name} = {r.root}" for r in comparison.runs if r.name != str(r.root))
    print(f"{len(comparison.common)} prompts in every run{f' ({where})' if where else ''}")
    print(format_table(comparison))
    for note in comparison.notes:
        print(f"note: {note}")
    print(f"wrote {paths['html']}, {paths['md']} and {paths['json']}")
    return 0
