"""PyTorch's attention kernels on FLUX's attention shapes: which one the transformer should run.

    python benchmarks/sdpa_backends.py           # GPU: 8 images x 24 heads x 128, bf16
    python benchmarks/sdpa_backends.py --tiny    # CPU smoke run, small shapes

For each shape of the budget (generation: 4,608 queries and keys; a corrector with 1,024 condition
tokens: 5,632; a corrector with cached condition keys/values: 4,608 queries against 5,632 keys; the
condition's once-per-image encoding: 1,024), the milliseconds per
`scaled_dot_product_attention` call on each backend (flash, memory-efficient, cuDNN, math on
--tiny) and on torch's default choice, the TFLOP/s, and the largest difference from the first
backend that ran. A backend that cannot take a shape is reported with its error. Prints the
default backend order and a table last.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

SHAPES = {"generation": (4608, 4608), "with condition": (5632, 5632), "cached condition": (4608, 5632),
          "condition encoding": (1024, 1024)}
TINY_SHAPES = {"equal": (64, 64), "unequal": (64, 96)}


def timed_ms(fn, device: str, repeats: int) -> float:
    import torch

    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with small shapes")
    ap.add_argument("--batch", type=int, default=8, help="images per call")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10; 2 --tiny)")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
    heads, dim = (2, 16) if args.tiny else (24, 128)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    repeats = args.repeats or (2 if args.tiny else 10)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    if args.tiny:
        backends = {"math": SDPBackend.MATH}
    names = {int(b): n for n, b in {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                                    "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                    "cudnn": SDPBackend.CUDNN_ATTENTION}.items()}
    try:
        order = [names.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()]
    except (AttributeError, RuntimeError):
        order = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for shape, (lq, lk) in (TINY_SHAPES if args.tiny else SHAPES).items():
        def rnd(n):
            return torch.randn(args.batch, heads, n, dim, generator=gen).to(device=device, dtype=dtype)

        q, k, v = rnd(lq), rnd(lk), rnd(lk)
        call = partial(F.scaled_dot_product_attention, q, k, v)
        flop = 4 * args.batch * heads * lq * lk * dim
        row: dict = {"shape": shape, "queries": lq, "keys": lk}
        ref = None
        for name, backend in backends.items():
            try:
                with sdpa_kernel(backend):
                    out = call()
                    ms = timed_ms(call, device, repeats)
            except RuntimeError as exc:
                row[name] = {"error": str(exc).splitlines()[0][:120]}
                continue
            ref = out.float() if ref is None else ref
            row[name] = {"ms": ms, "tflops": flop / ms / 1e9, "max_diff": float((out.float() - ref).abs().max())}
        row["default"] = {"ms": timed_ms(call, device, repeats)}
        rows.append(row)

    where = "CPU" if args.tiny else torch.cuda.get_device_name()
    print(f"\n# scaled_dot_product_attention, batch {args.batch} x {heads} heads x {dim}, {str(dtype)[6:]}, "
          f"ms per call [TFLOP/s] ({where}, torch {torch.__version__}); default order: {', '.join(order) or '?'}")
    cols = [*backends, "default"]
    print("| shape | queries / keys | " + " | ".join(cols) + " |")
    print("|---|---" + "|---" * len(cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            e = r[c]
            cells.append(f"failed: {e['error']}" if "error" in e else
                         f"{e['ms']:.3f}" + (f" [{e['tflops']:.0f}]" if "tflops" in e else ""))
        print(f"| {r['shape']} | {r['queries']} / {r['keys']} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
