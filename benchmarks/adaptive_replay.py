"""Adaptive compute replayed from finished runs: stop a prompt at its first candidate the verifier
is sure of, and what that saves.

    python benchmarks/adaptive_replay.py --runs RUN [RUN ...] --thresholds 0.9,0.95,0.98 --json out.json

RUN folders are `reflectionflow sweep` / `generate` run folders (world prompts, a learned or oracle
verifier). For a threshold t, each prompt's candidates are taken in the order the engine made
them (`order` in the trace) up to and including the first one the verifier is sure of by the
engine's early-stop test (`engine.candidates.confident`: a yes with a score >= t; all of them when
none is). The pick among those is the engine's (`engine.candidates.best`, as post-hoc best-of-k),
judged by the exact evaluator.

This is a replay, not a run: it is exact for a policy that stops a whole prompt at that point,
because the engine makes candidates in a fixed order and nothing made before the stop depends on
anything after it. It is not the engine's `--early-stop`, which stops one chain at a time and can
hand the unspent images to other chains or prompts (`--reallocate`); those need a run. Seconds per
prompt are estimated from the run's ledger: each candidate costs its stage's mean wall seconds per
item (a correction the corrector's, any other image the generator's), plus one verifier call,
plus one reflector and one refiner call for a candidate of round 1 or later; the run's fixed
overheads (start-up, writing) are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from reflectionflow.engine.candidates import Candidate, best, confident
from reflectionflow.engine.posthoc import _evaluator, _metadata
from reflectionflow.runs import RunFolder


def unit_seconds(folder: Path) -> dict[str, float]:
    """Mean wall seconds per item of each stage, from the run's ledger (0 for a stage not used)."""
    ledger = json.loads((folder / "ledger.json").read_text()) if (folder / "ledger.json").is_file() else {}
    stages = ledger.get("totals", {}).get("by_stage", {})
    return {name: (st["wall_s"] / st["items"] if st.get("items") else 0.0) for name, st in stages.items()}


def candidate_seconds(c: Candidate, unit: dict[str, float]) -> float:
    s = unit.get("correct" if "correct" in c.kind else "generate", 0.0) + unit.get("verify", 0.0)
    if c.round >= 1:
        s += unit.get("reflect", 0.0) + unit.get("refine", 0.0)
    return s


def replay(folder: Path, thresholds: list[float]) -> dict:
    """Accuracy, images and seconds per prompt at the fixed budget and at each threshold: the
    engine's own pick (`best`) among the candidates up to its first `confident` one."""
    run = RunFolder(folder)
    unit = unit_seconds(folder)
    traces = {i: sorted((Candidate.from_record(r) for r in run.load_trace(i)), key=lambda c: c.order)
              for i in run.prompt_indices()}
    traces = {i: t for i, t in traces.items() if t}
    metas = {i: _metadata(run, i) for i in traces}
    judge = _evaluator(metas)
    if judge is None:
        raise SystemExit(f"{folder}: not every prompt is a Shapes-world prompt; the exact evaluator cannot judge it")
    verdicts: dict[tuple[int, str], bool] = {}  # each picked image is judged once
    out = {"run": str(folder), "prompts": len(traces), "rows": []}
    for t in [None, *thresholds]:
        acc, images, seconds = [], [], []
        for i, cands in traces.items():
            stop = next((j + 1 for j, c in enumerate(cands) if confident(c, t)), len(cands))
            pick = best(cands[:stop])
            if (i, pick.file) not in verdicts:
                verdicts[i, pick.file] = judge(run.prompt_dir(i) / pick.file, metas[i])
            acc.append(verdicts[i, pick.file])
            images.append(stop)
            seconds.append(sum(candidate_seconds(c, unit) for c in cands[:stop]))
        out["rows"].append({"threshold": t, "accuracy": round(float(np.mean(acc)), 4),
                            "images_per_prompt": round(float(np.mean(images)), 3),
                            "seconds_per_prompt": round(float(np.mean(seconds)), 3)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (a sweep's runs/METHOD-VERIFIER)")
    ap.add_argument("--thresholds", default="0.8,0.9,0.95,0.98,0.99",
                    help="comma-separated verifier scores in (0, 1] (default 0.8,0.9,0.95,0.98,0.99)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        thresholds = [float(x) for x in args.thresholds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--thresholds: expected comma-separated numbers, got {args.thresholds!r}")
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        ap.error(f"--thresholds: each must be in (0, 1], got {args.thresholds!r}")
    for r in args.runs:
        if not any(Path(r).glob("*/trace.jsonl")):
            ap.error(f"--runs {r}: not a run folder (no PROMPT/trace.jsonl there)")
    results = [replay(Path(r), thresholds) for r in args.runs]
    print("| run | prompts | threshold | accuracy | images per prompt | seconds per prompt (ledger) |\n"
          "|---|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            t = "fixed budget" if row["threshold"] is None else f"{row['threshold']:.2f}"
            print(f"| {Path(res['run']).name} | {res['prompts']} | {t} | {row['accuracy']:.3f} | "
                  f"{row['images_per_prompt']:.2f} | {row['seconds_per_prompt']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
