"""`reflectionflow serve`: the project's judges behind an OpenAI-compatible endpoint.

    reflectionflow serve                      # world judges on http://127.0.0.1:8000/v1
    reflectionflow serve --port 0 --verifier world-oracle --reflector world-oracle
    reflectionflow serve --max-batch 1        # one request per judge call (no batching)
    reflectionflow generate ... --vlm-url http://127.0.0.1:8000/v1 --vlm-model reflectionflow-world
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..flags import names
from ..serve.server import MAX_WAIT_MS, BatchOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the world's verifier and reflector as an OpenAI-compatible chat endpoint",
        description="An OpenAI-compatible HTTP endpoint (POST /v1/chat/completions with image_url data: URLs, "
        "GET /v1/models) in front of registered judges, by default the Shapes world's. The project's VLM "
        "components (--vlm-url) and any OpenAI client can use it. Listens on 127.0.0.1 unless --host says "
        "otherwise.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    for kind in ("verifier", "reflector", "refiner"):
        p.add_argument(f"--{kind}", metavar="NAME", help=f"{kind}: {names(kind)} (default: the world backend's)")
    p.add_argument("--no-refiner", action="store_true", help="answer refine requests with the current prompt")
    p.add_argument("--model-name", default="reflectionflow-world", help="the model id clients name (--vlm-model)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="require clients to send the key held in this environment variable")
    p.add_argument("--max-batch", type=int, default=BatchOptions.max_batch, metavar="N",
                   help="merge up to N concurrent requests for one judge into one batched call (default "
                        f"{BatchOptions.max_batch}; 1: one request per call, as before batching)")
    p.add_argument("--batch-wait-ms", type=float, default=BatchOptions.max_wait_ms, metavar="MS",
                   help="after a batch's first request, wait up to MS milliseconds for more before calling the "
                        f"judge (default 0: take whatever is waiting when the judge is free; at most {MAX_WAIT_MS})")
    p.add_argument("--workers", type=int, default=64, metavar="N",
                   help="connections served at once (default 64); 64 more may wait, beyond that: 503 at once")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="seconds for a whole request (line, headers, body) to arrive (default 30)")
    p.add_argument("--idle-timeout", type=float, default=10.0, metavar="S",
                   help="seconds any one read may wait, and a kept-alive connection may sit idle (default 10)")
    p.add_argument("--log", action="store_true", help="log every request to stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..serve import JudgeServer, JudgeService, ServeError, world_judges

    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise ServeError(f"--max-batch must be >= 1 (1: no batching), got {args.max_batch}")
    if not (math.isfinite(args.batch_wait_ms) and 0 <= args.batch_wait_ms <= MAX_WAIT_MS):
        raise ServeError(f"--batch-wait-ms must be in 0..{MAX_WAIT_MS} milliseconds, got {args.batch_wait_ms:g}")
    if not 1 <= args.workers <= 4096:
        raise ServeError(f"--workers must be in 1..4096, got {args.workers}")
    for flag, v in (("--request-timeout", args.request_timeout), ("--idle-timeout", args.idle_timeout)):
        if not (math.isfinite(v) and 0 < v <= 3600):
            raise ServeError(f"{flag} must be a number of seconds in (0, 3600], got {v:g}")
    batch = BatchOptions(max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms)
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ServeError(f"--api-key-env {args.api_key_env}: the environment variable is not set")
    judges = world_judges(args.verifier, args.reflector, args.refiner, no_refiner=args.no_refiner)
    try:
        server = JudgeServer(JudgeService(judges, model_name=args.model_name, batch=batch), host=args.host,
                             port=args.port, api_key=key, log=args.log, workers=args.workers,
                             backlog=args.workers, request_timeout=args.request_timeout,
                             idle_timeout=args.idle_timeout)
    except OSError as e:
        raise ServeError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"reflectionflow serve: listening on {args.host}: anyone who can reach this address can use it",
              file=sys.stderr)
    names = ", ".join(f"{k} {v}" for k, v in (judges.names or {}).items())
    print(f"serving {names} as model {args.model_name!r} at {server.url} (batches of up to {batch.max_batch}, "
          f"wait {batch.max_wait_ms:g} ms; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
