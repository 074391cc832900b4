"""Requests per second against `reflectionflow serve` at several concurrency limits.

    python benchmarks/serve_throughput.py                         # oracle judges, 400 requests per limit
    python benchmarks/serve_throughput.py --judges default        # the world's learned verifier and reflector
    python benchmarks/serve_throughput.py --tiny                  # a smoke run: 24 requests per limit

Starts `reflectionflow serve --port 0` as a subprocess (the real command: its HTTP server, JSON,
base64 PNG decoding and judges), then fires OpenAI-format chat requests the way the project's VLM
components write them: alternately a yes/no verdict with logprobs and a reflection, each with a
64x64 rendered image as a data: URL. For each concurrency limit c (threads, each with one request
in flight) it reports requests per second and the latency p50 / p95. The server serialises its
component calls (serve/server.py), so throughput saturates once the judges are the bottleneck.
Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROMPTS = ("a photo of a red circle and a blue square", "a photo of three triangles",
           "a photo of a ring left of a cross", "a photo of a green diamond")
JUDGES = {"oracle": ["--verifier", "world-oracle", "--reflector", "world-oracle"], "default": []}


def bodies(n: int) -> list[bytes]:
    """n request bodies: yes/no (with logprobs) and reflect, over a few prompts and images."""
    from reflectionflow.backends.vlm import prompts as P
    from reflectionflow.backends.vlm.judges import data_url
    from reflectionflow.world.render import draw
    from reflectionflow.world.spec import parse_prompt

    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        image = draw(parse_prompt(PROMPTS[(i // 2) % len(PROMPTS)]), i)[1]
        url = data_url(image)
        if i % 2 == 0:
            text = P.YESNO_USER.format(prompt=prompt)
            extra = {"max_tokens": 1, "logprobs": True, "top_logprobs": 2}
        else:
            text = P.REFLECT_USER.format(original=prompt, current=prompt, previous="none", evaluation="not given")
            extra = {}
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        body = {"model": "reflectionflow-world", "messages": [{"role": "user", "content": content}], **extra}
        out.append(json.dumps(body).encode())
    return out


def post(url: str, body: bytes) -> float:
    req = urllib.request.Request(url + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - t0


def measure(url: str, reqs: list[bytes], concurrency: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: post(url, b), reqs[: 2 * concurrency]))  # warm-up: connections, first calls
        t0 = time.perf_counter()
        lat = list(pool.map(lambda b: post(url, b), reqs))
        wall = time.perf_counter() - t0
    lat_ms = 1000 * np.asarray(lat)
    return {"concurrency": concurrency, "requests": len(reqs), "wall_s": wall, "rps": len(reqs) / wall,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95))}


def start_server(judges: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "reflectionflow", "serve", "--port", "0", *JUDGES[judges]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise RuntimeError(f"reflectionflow serve did not start: {line!r} {proc.stderr.read()[-1000:]}")
    return proc, line.split(" at ")[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="24 requests per limit, limits 1 2 4")
    ap.add_argument("--judges", choices=tuple(JUDGES), default="oracle",
                    help="oracle (exact evaluator + detector, microseconds) or default (the learned world judges)")
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency limit")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.tiny:
        args.requests, args.concurrency = 24, [1, 2, 4]
    if args.requests < 1 or min(args.concurrency) < 1:
        ap.error("--requests and --concurrency must be >= 1")

    reqs = bodies(args.requests)
    t0 = time.perf_counter()
    proc, url = start_server(args.judges)
    startup = time.perf_counter() - t0
    try:
        rows = [measure(url, reqs, c) for c in args.concurrency]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    fig = {"judges": args.judges, "server_startup_s": startup, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(f"# `reflectionflow serve` ({args.judges} judges), {args.requests} requests per limit "
          f"(yes/no with logprobs and reflections alternating, 64x64 PNG data URLs); start-up {startup:.1f} s")
    print("| concurrency | requests/s | p50 ms | p95 ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
