"""`reflectionflow sweep`: the paper's score-vs-samples table and plot in one command."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..flags import add_batch_size, add_config
from . import one_line_errors
from .generate import add_component_arguments, build_config, launched

SWEEP_HELP = """\
Run every method x verifier on a prompt set at --budget images per prompt (one run each, in
OUT/runs/<method>-<verifier>/; on the world backend noise is made once, with the first verifier,
and re-scored by the others), then read best-of-k for k = 1, 2, 4, ... budget from each run's
trace and judge every pick with the exact GenEval-Shapes evaluator. Writes OUT/sweep.json,
OUT/sweep.md (the paper's table: overall and the six categories, bootstrap 95% intervals over
prompts) and OUT/sweep.png (overall accuracy vs samples).

For noise, best-of-k from the trace is best-of-k exactly. For prompt and reflection the first k
images of a budget-B run are not a budget-k run (the pool and the chains' split depend on B): only
k = B is that method at budget B; run the sweep again with a smaller --budget for an equal-budget
point. --chains / --depth (prompt, reflection) and --pool (reflection) set the split: a depth-vs-width
study is one sweep per split, each with its own --out.

Several processes: accelerate launch --multi_gpu --num_processes N -m reflectionflow sweep ...
(each run's prompts are shared as `generate` shares them; rank 0 writes the merged sweep.json once
every process has finished). --resume continues every run where it stopped. The runs skip
report.html; `reflectionflow report OUT/runs/<method>-<verifier>` writes one.
"""


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("sweep", help="methods x budgets x verifiers on a prompt set: the paper's table and plot",
                       description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_errors(g, "sweep")
    g.add_argument("--prompts", default="geneval-shapes", metavar="FILE|SET",
                   help="GenEval-Shapes metadata .jsonl or a named set (default geneval-shapes)")
    g.add_argument("--methods", default="noise,prompt,reflection", metavar="LIST",
                   help="comma-separated methods (default noise,prompt,reflection)")
    g.add_argument("--budget", type=int, default=32, help="largest budget: images per prompt (default 32)")
    g.add_argument("--verifiers", default=None, metavar="LIST",
                   help="comma-separated verifier names (default: the backend's verifier)")
    g.add_argument("--chains", type=int, default=None, help="prompt / reflection: parallel chains N")
    g.add_argument("--depth", type=int, default=None, help="prompt / reflection: rounds per chain M")
    g.add_argument("--pool", type=int, default=None, help="reflection: initial noise pool P")
    g.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    add_config(g)
    g.add_argument("--out", default=None, metavar="DIR", help="sweep folder (default runs/sweep-b<budget>-s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    add_component_arguments(g, verifier=False)
    x = g.add_argument_group("execution")
    x.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only N prompts, taken in turn from each category (the mix kept)")
    add_batch_size(x, None, shown=64)
    x.add_argument("--prompt-batch", type=int, default=None, help="prompts searched together (default 64)")
    x.add_argument("--workers", type=int, default=None, help="component calls in flight at once (default 1)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_sweep)


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def cmd_sweep(args) -> int:
    from ..config import ConfigError
    from ..engine.distributed import DistributedError
    from ..engine.sweep import check_sweep, sweep

    methods = _names(args.methods)
    # The base config is built as for a noise run (it has no split); each run gets its own split.
    split = {"chains": args.chains, "depth": args.depth, "pool": args.pool}
    flags = argparse.Namespace(**{**vars(args), "method": "noise", "budget": args.budget,
                                  "chains": None, "depth": None, "pool": None})
    base, secrets = build_config(flags)
    base = replace(base, **split)
    verifiers = _names(args.verifiers) or [_default_verifier(base)]
    check_sweep(methods, verifiers, args.budget)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    out = args.out or f"runs/sweep-b{args.budget}-s{base.seed}"
    try:
        with launched() as dist:
            result = sweep(base, methods, verifiers, args.budget, out, prompts=args.prompts, resume=args.resume,
                           progress=base.progress, secrets=secrets, dist=dist)
    except DistributedError as e:
        print(f"reflectionflow: error: {e}", file=sys.stderr)
        return 1
    if result is None:
        return 0  # rank 0 reports
    from ..plots import format_estimate

    for p in result["points"]:
        if p["k"] == args.budget:
            shown = format_estimate(p["overall"], p["overall_ci"], p["prompts"], scale=100.0)
            print(f"{p['method']:>10} / {p['verifier']}: {shown} % at {p['k']} samples ({p['prompts']} prompts)")
    print(f"wrote {out}/sweep.json, sweep.md, sweep.png")
    return 0


def _default_verifier(base) -> str:
    from ..config import ConfigError
    from ..engine.backends import get_backend

    name = get_backend(base.backend).defaults().get("verifier")
    if name is None:
        raise ConfigError(f"--verifiers: backend {base.backend!r} has no default verifier; name one or more")
    return name
