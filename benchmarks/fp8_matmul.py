"""fp8 against bf16 matmuls on FLUX's linear shapes (what models/fp8.py's FP8Linear runs).

    python benchmarks/fp8_matmul.py            # H100: M = 8 images x 4,608 tokens, FLUX.1's K -> N
    python benchmarks/fp8_matmul.py --tiny     # CPU smoke run, small shapes

Per shape, milliseconds per call: bf16 `x @ w.t()`; `torch._scaled_mm` on pre-quantised e4m3
inputs with row scales and with one tensor scale, each with exact and with fast accumulation;
and the compiled quantise-then-matmul of FP8Linear itself (activation quantisation included).
Prints a table last.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

# FLUX.1's block linears: attention projections, MLP up/down, the single blocks' fused in/out.
FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 9216)]


def bench(fn, device: str, repeats: int) -> float:
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return 1000 * (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with small shapes")
    ap.add_argument("--tokens", type=int, default=None, help="rows M (default 8 x 4608; 64 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 20; 2 --tiny)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled FP8Linear column")
    args = ap.parse_args(argv)

    import torch

    from reflectionflow.models.fp8 import E4M3, FP8Linear, fp8_unavailable, quantize_rows

    device = "cpu" if args.tiny else "cuda"
    why = fp8_unavailable(device)
    if why is not None:
        raise SystemExit(f"fp8 matmuls unavailable here: {why} (--tiny runs on the CPU)")
    M = args.tokens or (64 if args.tiny else 8 * 4608)
    repeats = args.repeats or (2 if args.tiny else 20)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shapes = [(32, 48), (48, 32)] if args.tiny else FLUX_SHAPES
    fast_ok = device != "cpu"  # fast accumulation is a CUDA kernel option
    rows = []
    for K, N in shapes:
        x = torch.randn(M, K, device=device, dtype=dtype)
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        w = lin.weight.detach()
        xq, sx = quantize_rows(x)
        wq, sw = quantize_rows(w)
        swr = sw.reshape(1, -1).contiguous()
        st_w = w.float().abs().amax() / 448
        wqt = (w.float() / st_w).to(E4M3)
        one = torch.ones((), device=device)

        def mm(a, b, sa, sb, fast):
            return lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=dtype,
                                            use_fast_accum=fast and fast_ok)

        row = {"K": K, "N": N, "bf16": bench(partial(torch.matmul, x, w.t()), device, repeats)}
        row["row"] = bench(mm(xq, wq, sx, swr, False), device, repeats)
        row["row_fast"] = bench(mm(xq, wq, sx, swr, True), device, repeats)
        row["tensor"] = bench(mm(xq, wqt, one, st_w, False), device, repeats)
        row["tensor_fast"] = bench(mm(xq, wqt, one, st_w, True), device, repeats)
        if not args.no_compile:
            layer = FP8Linear(lin)
            with torch.no_grad():
                row["fp8linear_compiled"] = bench(partial(torch.compile(layer), x), device, repeats)
        row["bf16_tflops"] = 2 * M * K * N / row["bf16"] / 1e9
        rows.append(row)

    cols = ["bf16", "row", "row_fast", "tensor", "tensor_fast"] + ([] if args.no_compile else ["fp8linear_compiled"])
    where = "CPU" if args.tiny else torch.cuda.get_device_name()
    print(f"\n# fp8 vs bf16 matmuls, M = {M} rows, ms per call ({where})")
    print("| K -> N | " + " | ".join(cols) + " | bf16 TFLOP/s |")
    print("|---" * (len(cols) + 2) + "|")
    for r in rows:
        print(f"| {r['K']} -> {r['N']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {r['bf16_tflops']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
