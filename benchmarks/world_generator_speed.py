"""How fast the world generator trains: data throughput and training step time per size and batch.

    python benchmarks/world_generator_speed.py --sizes small --batches 256 512 --workers 12 --compile

Prints one JSON line per measurement: rendered images per second through the DataLoader, then,
for each (size, batch), the first step's seconds (torch.compile included) and the steady
milliseconds per optimizer step on a fixed batch (data excluded), with peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from reflectionflow.models.flow import RectifiedFlow
from reflectionflow.models.mmdit import SIZES, MMDiT, count_parameters
from reflectionflow.train.loop import EMA, to_model_space
from reflectionflow.train.world import DEFAULT_TAG_WEIGHTS, WorldBatches, WorldTrainConfig, world_batches


def data_speed(workers: int, batch: int, batches: int = 60) -> dict:
    tok = MMDiT(SIZES["tiny"]()).tokenizer
    it = world_batches(WorldTrainConfig(batch_size=batch, num_workers=workers, device="cpu"), tok)(0)
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return {"what": "data", "workers": workers, "img_per_s": round(batches * batch / (time.perf_counter() - t))}


def step_speed(size: str, batch: int, compile_: bool, steps: int = 40) -> dict:
    dev = torch.device("cuda")
    model = MMDiT(SIZES[size]()).to(dev)
    images, text, _ = WorldBatches(batch, 0, 0, DEFAULT_TAG_WEIGHTS, model.tokenizer).batch_at(0)
    x0, text = to_model_space(images.to(dev)), text.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = EMA(model, 0.999)
    flow = RectifiedFlow(model, model.tokenizer([""])[0].to(dev))
    fwd = torch.compile(model) if compile_ else model

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow.loss(x0, text, model=fwd).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(i)

    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step(0)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for i in range(5):
        step(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t) / steps
    return {"what": "step", "size": size, "batch": batch, "compile": compile_, "params": count_parameters(model),
            "first_step_s": round(first, 1), "ms_per_step": round(ms, 2), "img_per_s": round(batch * 1000 / ms),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small"], choices=sorted(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[512])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    print(json.dumps(data_speed(args.workers, max(args.batches))), flush=True)
    if not torch.cuda.is_available():
        print(json.dumps({"what": "step", "skipped": "no CUDA device"}))
        return
    for size in args.sizes:
        for batch in args.batches:
            print(json.dumps(step_speed(size, batch, args.compile)), flush=True)


if __name__ == "__main__":
    main()
