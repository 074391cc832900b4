"""One sweep on one process and on N processes (accelerate): wall times, scaling, and whether the
merged results are the same.

    python benchmarks/sharded_run.py --processes 2 --out runs/sharded            # GPUs: one per process
    python benchmarks/sharded_run.py --processes 2 --limit 6 --budget 4 --out /tmp/s \\
        -- --generator world-render --corrector world-edit                        # CPU smoke (gloo)

Runs `reflectionflow sweep` (arguments after `--` are passed to it: backend, components, ...) into
OUT/one and, through `accelerate launch --multi_gpu --num_processes N`, into OUT/many; then compares
the two folders run by run and prompt by prompt: every image file byte for byte, every prompt's
selected sample, and the sweep's points (overall accuracy per method, verifier and k). Prints a
table last and writes OUT/sharded.json.

The world's MMDiT components are deterministic per request but not bitwise batch-invariant: a
prompt's image may differ in its lowest bits when the processes group requests into other batches,
and a verifier's pick may then change. The comparison counts such images instead of assuming none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_argv(args, out: Path) -> list[str]:
    argv = ["sweep", "--prompts", args.prompts, "--methods", args.methods, "--budget", str(args.budget),
            "--out", str(out), "--quiet"]
    if args.verifiers:
        argv += ["--verifiers", args.verifiers]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    return argv + args.sweep_args


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t


def digests(run: Path) -> dict[str, str]:
    """'prompt/images/file.png' -> sha256 of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.glob("*/images/*.png"))}


def selected(run: Path) -> dict[str, str]:
    out = {}
    for done in sorted(run.glob("*/done.json")):
        marker = json.loads(done.read_text())
        out[done.parent.name] = json.dumps(marker.get("selected", marker.get("best")), sort_keys=True)
    return out


def compare(one: Path, many: Path) -> dict:
    rows = {}
    for run in sorted(p.name for p in (one / "runs").iterdir() if p.is_dir()):
        a, b = digests(one / "runs" / run), digests(many / "runs" / run)
        sa, sb = selected(one / "runs" / run), selected(many / "runs" / run)
        rows[run] = {"images": len(a), "images_missing": len(set(a) - set(b)),
                     "images_identical": sum(a[k] == b.get(k) for k in a),
                     "prompts": len(sa), "picks_identical": sum(sa[k] == sb.get(k) for k in sa)}
    pa = {(p["method"], p["verifier"], p["k"]): p["overall"]
          for p in json.loads((one / "sweep.json").read_text())["points"]}
    pb = {(p["method"], p["verifier"], p["k"]): p["overall"]
          for p in json.loads((many / "sweep.json").read_text())["points"]}
    return {"runs": rows, "points": len(pa), "points_equal": sum(pa[k] == pb.get(k) for k in pa),
            "max_point_difference": max((abs(pa[k] - pb.get(k, float("nan"))) for k in pa), default=0.0)}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--prompts", default="geneval-shapes")
    ap.add_argument("--methods", default="reflection")
    ap.add_argument("--verifiers", default=None)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.processes < 2:
        ap.error("--processes must be >= 2 (the one-process run is made anyway)")
    args.sweep_args = extra
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"--out {out} is not empty")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    one_s = timed([sys.executable, "-m", "reflectionflow", *sweep_argv(args, out / "one")], env)
    many_s = timed([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), "-m", "reflectionflow",
                    *sweep_argv(args, out / "many")], env)
    res = {"processes": args.processes, "one_s": round(one_s, 2), "many_s": round(many_s, 2),
           "speedup": round(one_s / many_s, 3), "efficiency": round(one_s / (args.processes * many_s), 3),
           "sweep_args": sweep_argv(args, Path("OUT")), **compare(out / "one", out / "many")}
    (out / "sharded.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"1 process: {one_s:.1f} s; {args.processes} processes: {many_s:.1f} s; speed-up {res['speedup']:.2f}, "
          f"efficiency {res['efficiency']:.2f}; sweep points equal {res['points_equal']}/{res['points']} "
          f"(largest difference {res['max_point_difference']:.4f})")
    print("| run | images | identical | missing | prompts | same pick |")
    print("|---|---|---|---|---|---|")
    for run, r in res["runs"].items():
        print(f"| {run} | {r['images']} | {r['images_identical']} | {r['images_missing']} | {r['prompts']} | "
              f"{r['picks_identical']} |")
    return res


if __name__ == "__main__":
    main()
