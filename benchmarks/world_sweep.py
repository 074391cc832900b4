"""GenEval-Shapes end to end with the trained world models, timed: images per second and wall time.

    python benchmarks/world_sweep.py --json world_sweep.json          # H100: 553 prompts, reflection at 32
    python benchmarks/world_sweep.py --methods reflection,noise       # both methods (one run each)
    python benchmarks/world_sweep.py --cpu-generate                   # the default one-prompt generate, timed
    python benchmarks/world_sweep.py --tiny                           # CPU smoke run: 2 prompts, budget 4

Runs `reflectionflow sweep` (a subprocess, so start-up, model loading and file writes are counted)
with the world backend's defaults: the trained MMDiT generator and corrector, the learned verifier
and reflector, the rule refiner. Everything is batched across prompts and chains: --prompt-batch
prompts are searched together and each component call carries up to --batch-size requests, with
--workers calls in flight. The ledger of each run gives the images (every kind counted); images per
second is images / wall seconds of the whole command. `--cpu-generate` times the one-prompt
`reflectionflow generate "a photo of a red circle and a blue square"` with its defaults (target:
<= 30 s on 2 CPU cores, start-up included). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of a red circle and a blue square"


def cli() -> list[str]:
    return [sys.executable, "-m", "reflectionflow"]


def run_timed(cmd: list[str], env: dict | None = None,
              timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, proc


def ledger_images(run: Path) -> dict:
    led = json.loads((run / "ledger.json").read_text())["totals"]
    return {"images": led["images"], "nfe": led["nfe"],
            "stages": {s: round(st["wall_s"], 2) for s, st in led["by_stage"].items() if st.get("items")}}


def sweep(args, method: str, out: Path) -> dict:
    cmd = cli() + ["sweep", "--methods", method, "--budget", str(args.budget), "--prompts", args.prompts,
                   "--out", str(out), "--batch-size", str(args.batch_size), "--prompt-batch", str(args.prompt_batch),
                   "--workers", str(args.workers), "--quiet"] + args.extra
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    try:
        wall, proc = run_timed(cmd, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        done = len(list(out.glob("runs/*/*/samples/0000.png")))  # prompts with a final selection
        return {"method": method, "wall_s": args.timeout, "timed_out": True, "prompts_done": done,
                "images": done * args.budget, "images_per_s": done * args.budget / args.timeout,
                "overall": None, "overall_ci": None, "prompts": done, "command": " ".join(cmd[2:])}
    result = json.loads((out / "sweep.json").read_text())
    points = [p for p in result["points"] if p["k"] == args.budget]
    runs = sorted((out / "runs").iterdir())
    led = ledger_images(runs[0])
    return {"method": method, "wall_s": wall, "images": led["images"], "nfe": led["nfe"],
            "images_per_s": led["images"] / wall, "stages_s": led["stages"],
            "overall": points[0]["overall"] if points else None,
            "overall_ci": points[0]["overall_ci"] if points else None,
            "prompts": points[0]["prompts"] if points else None, "command": " ".join(cmd[2:])}


def cpu_generate(repeats: int) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU figure, even on a GPU machine
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            wall, _ = run_timed(cli() + ["generate", PROMPT, "--out", f"{tmp}/g{i}", "--quiet"], env=env)
            walls.append(wall)
        led = ledger_images(Path(f"{tmp}/g0"))
    return {"walls_s": walls, "images": led["images"], "stages_s": led["stages"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: 2 prompts, budget 4, CPU")
    ap.add_argument("--methods", default="reflection", help="comma-separated (one sweep run each)")
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--prompts", default="geneval-shapes")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--batch-size", type=int, default=1024, help="requests per component call")
    ap.add_argument("--prompt-batch", type=int, default=553, help="prompts searched together")
    ap.add_argument("--workers", type=int, default=2, help="component calls in flight at once")
    ap.add_argument("--cpu-generate", action="store_true", help="time the default one-prompt generate (CPU)")
    ap.add_argument("--no-sweep", action="store_true", help="only --cpu-generate")
    ap.add_argument("--repeats", type=int, default=3, help="--cpu-generate runs")
    ap.add_argument("--timeout", type=float, default=560.0,
                    help="seconds before a sweep run is stopped (its finished prompts are still counted)")
    ap.add_argument("--out", default=None, help="keep the sweep folders here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    ap.add_argument("extra", nargs="*", help="after --: more `reflectionflow sweep` flags")
    args = ap.parse_args(argv)
    if args.tiny:
        args.limit, args.budget, args.batch_size, args.prompt_batch = args.limit or 2, 4, 64, 2
        args.repeats = 1
    fig: dict = {"budget": args.budget, "prompts": args.prompts, "limit": args.limit, "runs": []}
    try:
        import torch

        fig["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        fig["device"] = "cpu"
    fig["cpu_cores"] = os.cpu_count()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="world-sweep-"))
    try:
        if not args.no_sweep:
            for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
                out = root / f"{method}-b{args.budget}"
                if out.exists():
                    shutil.rmtree(out)
                r = sweep(args, method, out)
                fig["runs"].append(r)
                print(f"{method}: {r['wall_s']:.1f} s, {r['images']} images, {r['images_per_s']:.1f} images/s, "
                      f"GenEval-Shapes {r['overall']}", flush=True)
        if args.cpu_generate:
            fig["cpu_generate"] = cpu_generate(args.repeats)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")

    print(f"\n# World, GenEval-Shapes end to end on {fig['device']} ({fig['cpu_cores']} CPU cores), budget "
          f"{args.budget}, {args.limit or 'all'} prompts; wall = the whole `reflectionflow sweep` command")
    print("| run | prompts | images | wall s | images/s | GenEval-Shapes overall [95% CI] |")
    print("|---|---|---|---|---|---|")
    for r in fig["runs"]:
        ci = f" [{r['overall_ci'][0]:.3f}, {r['overall_ci'][1]:.3f}]" if r["overall_ci"] else ""
        score = f"{r['overall']:.3f}{ci}" if r["overall"] is not None else "-"
        name = f"{r['method']} at {args.budget}" + (" (stopped at --timeout)" if r.get("timed_out") else "")
        print(f"| {name} | {r['prompts']} | {r['images']} | {r['wall_s']:.1f} | "
              f"{r['images_per_s']:.1f} | {score} |")
    if "cpu_generate" in fig:
        g = fig["cpu_generate"]
        print(f"| CPU `reflectionflow generate \"{PROMPT}\"` (defaults) | 1 | {g['images']} | "
              f"{' / '.join(f'{w:.1f}' for w in g['walls_s'])} | - | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
