"""`reflectionflow serve` under hostile requests, then at concurrency 1 / 8 / 32: memory and latency.

    python benchmarks/serve_hostile.py                 # the figures in docs/RESULTS.md
    python benchmarks/serve_hostile.py --tiny          # a smoke run (a few requests each)

Starts `reflectionflow serve --port 0` with the oracle judges as a subprocess on 127.0.0.1 and
reads the server's own memory (VmRSS now, VmHWM the peak) and thread count from /proc/<pid>/status
after each step. The hostile steps, in order:
  bomb-12000   3 concurrent requests, each a 12000x12000 PNG header (a few hundred bytes, which a
               decoder without a cap turns into 430 MB of pixels)
  bomb-20000   one 20000x20000 PNG
  bad-length   Content-Length: abc, -1 and 10^12
  bad-parts    a content part that is not an object; content that is a number
  wrong-key    a wrong API key with a 10 MB body announced and never sent
  idle-100     100 connections opened and left idle (the server's threads must stay bounded)
  drip         one header byte every 0.2 s (cut at the request deadline)
Each reports its statuses and the time to the answer. Then the load steps: c clients (c = 1, 8,
32) each keep one good yes/no or reflect request in flight (64x64 PNG data URLs, as the project's
VLM components send them), reporting requests/s and the latency p50 / p95. The server runs with
its defaults except a request deadline of 3 s and an idle timeout of 2 s (flags of this script),
so the idle and drip steps end in seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import bodies, measure  # noqa: E402

KEY = "bench-key-0123456789"


def proc_status(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "Threads"):
            fields[k] = int(v.split()[0])
    return {"rss_mib": fields["VmRSS"] / 1024, "peak_mib": fields["VmHWM"] / 1024, "threads": fields["Threads"]}


def bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def raw(port: int, data: bytes, timeout: float = 30.0) -> tuple[int, float]:
    """Send raw bytes, read the answer; (status or 0 for none, seconds)."""
    t0 = time.perf_counter()
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            while b"\r\n\r\n" not in got:
                part = s.recv(65536)
                if not part:
                    break
                got += part
    except OSError:
        pass
    status = int(got.split()[1]) if got.startswith(b"HTTP/") else 0
    return status, time.perf_counter() - t0


def post(body: bytes, headers: dict | None = None, length: str | None = None) -> bytes:
    h = {"Host": "x", "Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
         "Content-Length": length if length is not None else str(len(body)), **(headers or {})}
    return (b"POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode()
            + b"\r\n" + body)


def chat_with(url: str) -> bytes:
    from reflectionflow.backends.vlm import prompts as P

    content = [{"type": "image_url", "image_url": {"url": url}},
               {"type": "text", "text": P.YESNO_USER.format(prompt="a photo of a red circle")}]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


def hostile(port: int, pid: int, idle: int) -> list[dict]:
    rows = []

    def step(name: str, results: list[tuple[int, float]]) -> None:
        rows.append({"step": name, "statuses": sorted({s for s, _ in results}),
                     "max_s": max(t for _, t in results), **proc_status(pid)})

    bomb12 = chat_with("data:image/png;base64," + base64.b64encode(bomb_png(12000, 12000)).decode())
    with ThreadPoolExecutor(3) as pool:
        step("bomb-12000 x3", list(pool.map(lambda _: raw(port, post(bomb12)), range(3))))
    bomb20 = chat_with("data:image/png;base64," + base64.b64encode(bomb_png(20000, 20000)).decode())
    step("bomb-20000", [raw(port, post(bomb20))])
    step("bad-length", [raw(port, post(b"{}", length=v)) for v in ("abc", "-1", str(10**12))])
    bad = [json.dumps({"messages": [{"role": "user", "content": c}]}).encode() for c in (["x"], 7)]
    step("bad-parts", [raw(port, post(b)) for b in bad])
    step("wrong-key", [raw(port, post(b"", headers={"Authorization": "Bearer wrong"}, length="10000000"))])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(idle)]
    time.sleep(0.5)
    during = proc_status(pid)
    t0 = time.perf_counter()
    for s in socks:  # every one answered (503: no worker free) or closed at the idle timeout
        try:
            s.recv(4096)
        except OSError:
            pass
        s.close()
    rows.append({"step": f"idle-{idle}", "statuses": [], "max_s": time.perf_counter() - t0, **during})
    t0 = time.perf_counter()
    status = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.setblocking(False)
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + b"x" * 200:
                try:
                    s.send(bytes([byte]))
                    got = s.recv(4096)
                    status = int(got.split()[1]) if got.startswith(b"HTTP/") else status
                    break
                except BlockingIOError:
                    time.sleep(0.2)
    except OSError:
        pass
    step("drip", [(status, time.perf_counter() - t0)])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a smoke run: 24 requests per level, 10 idle sockets")
    ap.add_argument("--requests", type=int, default=400, help="good requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--idle", type=int, default=100, help="idle connections opened in the idle step")
    ap.add_argument("--request-timeout", type=float, default=3.0)
    ap.add_argument("--idle-timeout", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.tiny:
        args.requests, args.idle = 24, 10
    env = dict(os.environ, BENCH_SERVE_KEY=KEY)
    cmd = [sys.executable, "-m", "reflectionflow", "serve", "--port", "0", "--verifier", "world-oracle",
           "--reflector", "world-oracle", "--api-key-env", "BENCH_SERVE_KEY",
           "--request-timeout", f"{args.request_timeout:g}", "--idle-timeout", f"{args.idle_timeout:g}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise RuntimeError(f"reflectionflow serve did not start: {line!r} {proc.stderr.read()[-1000:]}")
    url = line.split(" at ")[1].split()[0]
    port = int(url.split(":")[2].split("/")[0])
    try:
        start = proc_status(proc.pid)
        rows = hostile(port, proc.pid, args.idle)
        reqs = bodies(args.requests)
        load = []
        import urllib.request

        opener = urllib.request.build_opener()
        opener.addheaders = [("Authorization", f"Bearer {KEY}")]
        urllib.request.install_opener(opener)
        for c in args.concurrency:
            r = measure(url, reqs, c)
            load.append({**r, **proc_status(proc.pid)})
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    fig = {"start": start, "hostile": rows, "load": load}
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(f"# `{' '.join(cmd[2:])}`; server at start: {start['rss_mib']:.0f} MiB, {start['threads']} threads")
    print("| step | statuses | slowest answer s | server RSS MiB | peak RSS MiB | threads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {' '.join(map(str, r['statuses'])) or '-'} | {r['max_s']:.2f} | {r['rss_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['threads']} |")
    print()
    print("| concurrency | requests/s | p50 ms | p95 ms | mean batch | server RSS MiB | peak RSS MiB | threads |")
    print("|---|---|---|---|---|---|---|---|")
    for r in load:
        print(f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{r['mean_batch']:.2f} | {r['rss_mib']:.0f} | {r['peak_mib']:.0f} | {r['threads']} |")
    return 0 if all(np.isfinite(r["rps"]) for r in load) else 1


if __name__ == "__main__":
    raise SystemExit(main())
