"""Equal-budget comparison of the search methods with the world's oracle components.

    python benchmarks/engine_oracle_table.py                       # GenEval-Shapes, all 553 prompts
    python benchmarks/engine_oracle_table.py --limit 60 --budgets 1,2,4,8

Every (method, budget) is its own run of `reflectionflow generate` (the default oracle components:
world-render generator, world-edit corrector, world-rule refiner, world-oracle verifier and
reflector), so each spends exactly `budget` images per prompt. Accuracy is the exact GenEval-Shapes
evaluator on each run's selection (samples/0000.png), overall = mean of the six categories.
Prints a Markdown table and writes OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reflectionflow.config import RunConfig
from reflectionflow.engine import best_of_k
from reflectionflow.pipeline import generate

# (label, RunConfig settings)
VARIANTS: dict[str, dict] = {
    "noise": {"method": "noise"},
    "zero-order": {"method": "zero-order"},
    "prompt": {"method": "prompt"},
    "reflection": {"method": "reflection"},
    "reflection+backtrack": {"method": "reflection", "backtrack": True},
    "reflection+early-stop": {"method": "reflection", "early_stop": 1.0},
}
DEFAULT = ("noise", "zero-order", "prompt", "reflection")
EXTRA_AT_MAX = ("reflection+backtrack", "reflection+early-stop")


@dataclass
class Row:
    variant: str
    budget: int
    accuracy: float
    categories: dict[str, float] = field(default_factory=dict)
    images: int = 0  # spent (early stopping spends less)
    seconds: float = 0.0
    split: str = ""


def run_table(prompts: str, budgets: list[int], variants: list[str], out: Path, limit: int | None = None,
              seed: int = 0, extra_at_max: tuple[str, ...] = EXTRA_AT_MAX) -> list[Row]:
    rows = []
    plan = [(v, b) for v in variants for b in budgets] + [(v, max(budgets)) for v in extra_at_max]
    for variant, budget in plan:
        cfg = RunConfig(budget=budget, seed=seed, limit=limit, progress=False, **VARIANTS[variant])
        folder = out / f"{variant}-b{budget}"
        t0 = time.perf_counter()
        result = generate(cfg, folder, prompts=prompts, report=False)
        seconds = time.perf_counter() - t0
        (point,) = best_of_k(folder, ks=[10**9])  # each prompt's own selection (all its images)
        c = json.loads((folder / "config.json").read_text())["config"]
        split = f"{c['pool'] or 0}+{c['chains']}x{c['depth']}" if c["chains"] else ""
        rows.append(Row(variant, budget, point.accuracy, point.categories, result.ledger["images"],
                        round(seconds, 2), split))
    return rows


def markdown(rows: list[Row], budgets: list[int]) -> str:
    variants = list(dict.fromkeys(r.variant for r in rows))
    by = {(r.variant, r.budget): r for r in rows}
    lines = ["| method | " + " | ".join(f"{b} samples" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for v in variants:
        cells = [f"{by[v, b].accuracy:.3f}" if (v, b) in by else "" for b in budgets]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    top = max(budgets)
    cats = list(next(iter(rows)).categories)
    lines += ["", f"At {top} samples per prompt:", "",
              "| method | split | images spent | overall | " + " | ".join(cats) + " | seconds |",
              "|---|---|---|---|" + "---|" * len(cats) + "---|"]
    for v in variants:
        r = by.get((v, top))
        if r is not None:
            lines.append(f"| {v} | {r.split} | {r.images} | {r.accuracy:.3f} | "
                         + " | ".join(f"{r.categories[c]:.3f}" for c in cats) + f" | {r.seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="geneval-shapes")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--budgets", default="1,2,4,8")
    ap.add_argument("--methods", default=",".join(DEFAULT), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="engine-table-"))
    rows = run_table(args.prompts, budgets, args.methods.split(","), out, args.limit, args.seed)
    (out / "table.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(markdown(rows, budgets))
    print(f"\nruns and table.json in {out}")


if __name__ == "__main__":
    main()
