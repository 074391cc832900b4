"""Renderer throughput on one CPU core: metadata + seed -> legal scene -> 64x64 image.

    taskset -c 0 python benchmarks/render_speed.py --n 20000
"""

from __future__ import annotations

import argparse
import os
import random
import time

from reflectionflow.world.data import load_benchmark
from reflectionflow.world.render import render, render_batch, sample_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, whatever the launcher
    prompts = load_benchmark("geneval-shapes")
    metas = [prompts[i % len(prompts)] for i in range(args.n)]
    render_batch(metas[:200], range(200))  # warm the mask cache

    t = time.perf_counter()
    render_batch(metas, range(args.n))
    full = args.n / (time.perf_counter() - t)

    scenes = [sample_scene(m, random.Random(i)) for i, m in enumerate(metas)]
    t = time.perf_counter()
    for s in scenes:
        render(s)
    draw_only = args.n / (time.perf_counter() - t)
    print(f"scene sampling + drawing: {full:,.0f} images/s on one core")
    print(f"drawing only:             {draw_only:,.0f} images/s on one core")


if __name__ == "__main__":
    main()
