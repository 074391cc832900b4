"""Step caching in the world generator: GenEval-Shapes accuracy and seconds per image at a few thresholds.

    python benchmarks/world_step_cache.py --json world_step_cache.json          # GPU: 553 prompts, noise at 8
    python benchmarks/world_step_cache.py --limit 12 --budget 2 --thresholds 0,0.1,0.3   # a CPU taste
    python benchmarks/world_step_cache.py --tiny                                # seconds (the test's run)

For each threshold (0, step caching off, is always run: it is the baseline) the GenEval-Shapes noise
sweep runs through the command line, in this process: `reflectionflow sweep --methods noise
--verifiers world-oracle --budget B --generator world-mmdit --config FILE`, the file setting the
generator's option `cache_threshold` (models/step_cache.py). The oracle verifier is the exact
evaluator, so best-of-k is the share of prompts with a correct image among their first k.

Reported per threshold: GenEval-Shapes overall (the mean of the category accuracies) at k = 1 (the
generator alone) and k = B, each threshold's effect against threshold 0 with a 95% bootstrap over
prompts (paired: the same prompts and seeds; resampled within categories, stats.py), the share of
first images identical to threshold 0's, seconds per image (the ledger's generate stage: component
time, model loading excluded), and the share of transformer passes served from the cache. Prints a
table last; seconds depend on the device and, on a shared CPU, on its load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers >= 0, got {text!r}") from None
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"comma-separated numbers >= 0, got {text!r}")
    return sorted(set([0.0] + values))


def run_sweep(args, threshold: float, out: Path) -> Path:
    """The noise sweep at one threshold; returns its run folder."""
    from reflectionflow.cli import main as cli

    options = {"cache_threshold": threshold, "device": args.device, "batch_size": args.batch_size}
    if args.steps:
        options["steps"] = args.steps
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps({"options": {"generator": options}}))
    argv = ["sweep", "--methods", "noise", "--verifiers", "world-oracle", "--budget", str(args.budget),
            "--prompts", args.prompts, "--generator", args.generator, "--config", str(config), "--out", str(out),
            "--batch-size", str(args.batch_size), "--prompt-batch", str(args.prompt_batch), "--quiet"]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"reflectionflow {' '.join(argv)} exited {code}")
    runs = sorted(p for p in (out / "runs").iterdir() if p.is_dir())
    return runs[0]


def read_run(run: Path, budget: int) -> dict:
    """Per prompt (in index order): its category, whether a correct image is among its first 1 and first
    `budget` images (the oracle's yes is the exact verdict), its first image; and the generate stage's cost."""
    from reflectionflow.io import load_png

    tags, first, best, images = [], [], [], []
    for folder in sorted(p for p in run.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        trace = [json.loads(ln) for ln in (folder / "trace.jsonl").read_text().splitlines()]
        trace.sort(key=lambda r: r["order"])
        yes = [bool(r["yes"]) for r in trace[:budget]]
        tags.append(meta.get("tag"))
        first.append(yes[0])
        best.append(any(yes))
        images.append(load_png(folder / trace[0]["file"]))
    gen = json.loads((run / "ledger.json").read_text())["totals"]["by_stage"]["generate"]
    return {"tags": tags, "k1": np.array(first, float), "kB": np.array(best, float), "images": images,
            "generate": gen}


def effect(a: np.ndarray, b: np.ndarray, tags: list, resamples: int = 1000) -> dict:
    """GenEval overall of a minus b, paired over prompts, with a stratified 95% bootstrap interval."""
    from reflectionflow.stats import enough, interval, point_estimate, strata_of, stratified_bootstrap

    strata = strata_of(tags)
    point = point_estimate(np.stack([a, b]), strata, category_mean=True)
    diff = float(point[0] - point[1])
    if not enough(len(a)):
        return {"diff": diff, "ci": None}
    draws, _ = stratified_bootstrap(np.stack([a, b]), strata, category_mean=True, resamples=resamples)
    return {"diff": diff, "ci": list(interval(draws[0] - draws[1], diff))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="seconds on a CPU: 2 prompts, budget 2, 3 steps, 2 thresholds")
    ap.add_argument("--thresholds", type=_thresholds, default=_thresholds("0.05,0.1,0.2,0.3"),
                    help="comma-separated cache thresholds (0, the baseline, is always added; default "
                    "0.05,0.1,0.2,0.3)")
    ap.add_argument("--budget", type=int, default=8, help="noise images per prompt (best-of-k up to it)")
    ap.add_argument("--prompts", default="geneval-shapes")
    ap.add_argument("--limit", type=int, default=None, help="only N prompts, taken in turn from each category")
    ap.add_argument("--generator", default="world-mmdit", help="a world generator name or weights folder")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the generator's, 20)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=1024, help="requests per generator call")
    ap.add_argument("--prompt-batch", type=int, default=553, help="prompts searched together")
    ap.add_argument("--out", default=None, help="keep the sweep folders here (default: a temporary folder)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.tiny:
        args.limit, args.budget, args.steps = args.limit or 2, 2, args.steps or 3
        args.device = "cpu" if args.device == "auto" else args.device
        args.thresholds = [0.0, 1e9]
    for name in ("budget", "batch_size", "prompt_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    fig: dict = {"budget": args.budget, "prompts": args.prompts, "limit": args.limit, "generator": args.generator,
                 "steps": args.steps or 20, "device": torch.cuda.get_device_name(device)
                 if device.startswith("cuda") else "cpu", "torch_threads": torch.get_num_threads(), "rows": []}
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="world-step-cache-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = {}
    try:
        for t in args.thresholds:
            out = root / f"t{t:g}"
            if out.exists():
                shutil.rmtree(out)
            runs[t] = read_run(run_sweep(args, t, out), args.budget)
            g = runs[t]["generate"]
            print(f"[{time.perf_counter() - start:6.1f} s] threshold {t:g}: {g['images']} images, "
                  f"{g['wall_s']:.1f} s generating", file=sys.stderr, flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    base = runs[0.0]
    for t, r in runs.items():
        g = r["generate"]
        passes = g["nfe"] + g.get("cached", 0)
        row = {"threshold": t, "prompts": len(r["tags"]), "images": g["images"],
               "s_per_image": g["wall_s"] / max(g["images"], 1), "cached_share": g.get("cached", 0) / max(passes, 1),
               "nfe_per_image": g["nfe"] / max(g["images"], 1),
               "same_first_image": float(np.mean([np.array_equal(a, b) for a, b in zip(r["images"], base["images"])])),
               "acc_k1": effect(r["k1"], np.zeros_like(r["k1"]), r["tags"])["diff"],
               "acc_kB": effect(r["kB"], np.zeros_like(r["kB"]), r["tags"])["diff"]}
        if t:
            row["effect_k1"] = effect(r["k1"], base["k1"], r["tags"])
            row["effect_kB"] = effect(r["kB"], base["kB"], r["tags"])
        fig["rows"].append(row)
    fig["wall_s"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")

    def cell(e: dict | None) -> str:
        if e is None:
            return "-"
        ci = "" if e["ci"] is None else f" [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}]"
        return f"{e['diff']:+.3f}{ci}"

    base_s = fig["rows"][0]["s_per_image"]
    print(f"\n# World step cache: GenEval-Shapes noise sweep, {fig['rows'][0]['prompts']} prompts x {args.budget} "
          f"images, oracle verifier, {args.generator} at {fig['steps']} steps on {fig['device']} "
          f"({fig['torch_threads']} torch threads); {fig['wall_s']:.0f} s wall")
    print(f"| threshold | passes cached | s / image | speed-up | same first image | GenEval k=1 | effect k=1 "
          f"[95% CI] | GenEval k={args.budget} | effect k={args.budget} [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in fig["rows"]:
        print(f"| {r['threshold']:g} | {100 * r['cached_share']:.1f}% | {r['s_per_image']:.3f} | "
              f"{base_s / max(r['s_per_image'], 1e-9):.2f}x | {100 * r['same_first_image']:.0f}% | {r['acc_k1']:.3f} | "
              f"{cell(r.get('effect_k1'))} | {r['acc_kB']:.3f} | {cell(r.get('effect_kB'))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
