"""Requests per second against `reflectionflow serve` at several concurrency limits.

    python benchmarks/serve_throughput.py                         # oracle judges, 400 requests per limit
    python benchmarks/serve_throughput.py --judges default        # the world's learned verifier and reflector
    python benchmarks/serve_throughput.py --tiny                  # a smoke run: 24 requests per limit
    python benchmarks/serve_throughput.py --max-batch 1           # no batching: one request per judge call

Starts `reflectionflow serve --port 0` as a subprocess (the real command: its HTTP server, JSON,
base64 PNG decoding and judges), then fires OpenAI-format chat requests the way the project's VLM
components write them: alternately a yes/no verdict with logprobs and a reflection, each with a
64x64 rendered image as a data: URL. For each concurrency limit c (threads, each with one request
in flight) it reports requests per second, the latency p50 / p95 and the mean batch size the
server formed (component calls are one at a time; concurrent requests for one judge are merged into
one call, serve/server.py). The batch sizes come from each answer's X-Batch-Size header: a call of
b requests answers b requests, so calls = sum(1 / b) and the mean batch per call = requests / calls.
--max-batch and --batch-wait-ms are passed to the server. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass
class Reply:
    latency_s: float
    batch: int  # the size of the judge call that answered (X-Batch-Size)


def post(url: str, body: bytes) -> Reply:
    req = urllib.request.Request(url + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        batch = int(r.headers.get("X-Batch-Size") or 1)
    return Reply(time.perf_counter() - t0, batch)


def measure(url: str, reqs: list[bytes], concurrency: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: post(url, b), reqs[: 2 * concurrency]))  # warm-up: connections, first calls
        t0 = time.perf_counter()
        replies = list(pool.map(lambda b: post(url, b), reqs))
        wall = time.perf_counter() - t0
    lat_ms = 1000 * np.asarray([r.latency_s for r in replies])
    calls = sum(1 / r.batch for r in replies)
    return {"concurrency": concurrency, "requests": len(reqs), "wall_s": wall, "rps": len(reqs) / wall,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95)),
            "judge_calls": round(calls), "mean_batch": len(reqs) / calls, "max_batch": max(r.batch for r in replies)}


def start_server(judges: str, server_args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "reflectionflow", "serve", "--port", "0", *JUDGES[judges],
                             *server_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    ap.add_argument("--max-batch", type=int, default=None, metavar="N",
                    help="the server's --max-batch (default: the server's own; 1: no batching)")
    ap.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                    help="the server's --batch-wait-ms (default: the server's own, 0)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.tiny:
        args.requests, args.concurrency = 24, [1, 2, 4]
    if args.requests < 1 or min(args.concurrency) < 1:
        ap.error("--requests and --concurrency must be >= 1")
    server_args = []
    if args.max_batch is not None:
        server_args += ["--max-batch", str(args.max_batch)]
    if args.batch_wait_ms is not None:
        server_args += ["--batch-wait-ms", f"{args.batch_wait_ms:g}"]

    reqs = bodies(args.requests)
    t0 = time.perf_counter()
    proc, url = start_server(args.judges, server_args)
    startup = time.perf_counter() - t0
    try:
        rows = [measure(url, reqs, c) for c in args.concurrency]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    fig = {"judges": args.judges, "server_args": server_args, "server_startup_s": startup, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(f"# `{' '.join(['reflectionflow serve', *server_args])}` ({args.judges} judges), {args.requests} requests "
          f"per limit (yes/no with logprobs and reflections alternating, 64x64 PNG data URLs); "
          f"start-up {startup:.1f} s")
    print("| concurrency | requests/s | p50 ms | p95 ms | mean batch | largest batch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{r['mean_batch']:.2f} | {r['max_batch']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
