"""FLUX corrector training at full size with random weights: step time and peak memory per batch size.

What one optimizer step of `reflectionflow train flux-corrector` costs on one GPU: the FLUX.1-dev
transformer (12B, random bf16 weights built from its config, no download), the released corrector's
condition-branch LoRA (rank 32 on the released layers, fp32 adapters, bf16 autocast), gradient
checkpointing on every block, AdamW on the adapters, `corrector_forward` (the function training
and inference share) over [512 text tokens; target tokens; 1024 condition tokens (512 px)].
VAE and text-encoder passes are not included (they run without gradients and can be cached).

    python benchmarks/flux_train_gpu.py                   # one H100: batch 1, 4, 8 at 1024 and 512 px targets
    python benchmarks/flux_train_gpu.py --tiny            # the tiny config on the CPU (a smoke test)

A batch size that runs out of memory is recorded as OOM and the next one still runs. The last
lines are the table and the projection for the paper's run: `--paper-steps` steps (default: one
pass over GenRef's 1M triplets) at 8 per GPU on 8 GPUs (docs/method.md, section 3), assuming the
data-parallel step costs what one GPU's step costs (only the LoRA's gradients are all-reduced).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reflectionflow.backends.flux.lora import RELEASED_TARGETS, add_lora  # noqa: E402
from reflectionflow.backends.flux.random_init import TRANSFORMER_CONFIGS  # noqa: E402
from reflectionflow.backends.flux.transformer import condition_ids, corrector_forward  # noqa: E402

GENREF_TRIPLETS = 1_000_000  # docs/method.md, section 4
PAPER_GPUS, PAPER_BATCH_PER_GPU = 8, 8  # docs/method.md, section 3


def build(size: str, device: str, dtype: torch.dtype, rank: int):
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place in bf16: an fp32 copy of 12B would not fit beside it
    try:
        with torch.device(device):
            torch.manual_seed(0)
            tf = FluxTransformer2DModel(**TRANSFORMER_CONFIGS[size])
    finally:
        torch.set_default_dtype(previous)
    tf.requires_grad_(False)
    names = add_lora(tf, rank=rank, alpha=float(rank), targets=RELEASED_TARGETS)
    params = []
    for n in names:
        layer = tf.get_submodule(n)
        for lin in (layer.lora_A, layer.lora_B):
            lin.float().requires_grad_(True)
            params += list(lin.parameters())
        torch.nn.init.normal_(layer.lora_B.weight, std=1e-3)  # a trained-looking adapter (B != 0)
    tf.gradient_checkpointing = True
    return tf, params


def inputs(tf, batch: int, resolution: int, condition: int, text_len: int, device: str, dtype):
    cfg = tf.config
    ch = cfg.in_channels  # packed channels: 16 latent channels x 2x2 (64 for FLUX.1)
    vae = 8 if cfg.in_channels == 64 else 1  # the tiny test VAE does not downsample
    grid, cgrid = resolution // (vae * 2), condition // (vae * 2)
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    img_ids = torch.zeros(grid, grid, 3, device=device)
    img_ids[..., 1] = torch.arange(grid, device=device)[:, None]
    img_ids[..., 2] = torch.arange(grid, device=device)[None, :]
    return dict(
        x0=randn(batch, grid * grid, ch, dt=torch.float32), eps=randn(batch, grid * grid, ch, dt=torch.float32),
        t5=randn(batch, text_len, cfg.joint_attention_dim), pooled=randn(batch, cfg.pooled_projection_dim),
        cond=randn(batch, cgrid * cgrid, ch), txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(dtype), cond_ids=condition_ids(cgrid, cgrid, device=device, dtype=dtype),
        guidance=torch.ones(batch, device=device) if cfg.guidance_embeds else None,
    )


def train_step(tf, opt, params, x: dict, device: str, dtype) -> float:
    batch = x["x0"].shape[0]
    t = torch.sigmoid(torch.randn(batch, device=device))  # (B,)
    tb = t[:, None, None]
    x_t = (1 - tb) * x["x0"] + tb * x["eps"]  # (B, N, C)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        v = corrector_forward(tf, x_t.to(dtype), x["t5"], x["pooled"], t, x["img_ids"], x["txt_ids"],
                              guidance=x["guidance"], condition=x["cond"], cond_ids=x["cond_ids"])
    loss = torch.nn.functional.mse_loss(v.float(), x["eps"] - x["x0"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(tf, params, batch, resolution, condition, text_len, steps, warmup, device, dtype) -> dict:
    cuda = device.startswith("cuda")
    row = {"batch": batch, "resolution": resolution, "condition": condition}
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = None
    try:
        x = inputs(tf, batch, resolution, condition, text_len, device, dtype)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            train_step(tf, opt, params, x, device, dtype)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(tf, opt, params, x, device, dtype)
        if cuda:
            torch.cuda.synchronize()
        row["step_s"] = (time.perf_counter() - t0) / steps
        row["img_s"] = batch / row["step_s"]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    except torch.OutOfMemoryError:
        row["step_s"] = None
        row["status"] = "OOM"
    finally:
        del x, opt
        for p in params:
            p.grad = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny FLUX config on the CPU (smoke test)")
    p.add_argument("--batches", default="1,4,8", help="batch sizes per step")
    p.add_argument("--resolutions", default=None, help="target sizes in px (default 1024,512; tiny: 16)")
    p.add_argument("--condition-size", type=int, default=None, help="condition size in px (default 512; tiny: 16)")
    p.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; tiny: 8)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (the released config: 32)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per setting")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new setting after this many seconds")
    p.add_argument("--paper-steps", type=int, default=math.ceil(GENREF_TRIPLETS / (PAPER_GPUS * PAPER_BATCH_PER_GPU)),
                   help="steps of the projected run (default: one pass over GenRef's 1M triplets at batch 64)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    device = "cpu" if a.tiny else "cuda"
    dtype = torch.float32 if a.tiny else torch.bfloat16
    resolutions = [int(r) for r in (a.resolutions or ("16" if a.tiny else "1024,512")).split(",")]
    condition = a.condition_size or (16 if a.tiny else 512)
    text_len = a.text_len or (8 if a.tiny else 512)
    batches = [int(b) for b in a.batches.split(",")]
    if not a.tiny and not torch.cuda.is_available():
        p.error("no CUDA device; use --tiny for the CPU smoke test")

    t0 = time.perf_counter()
    tf, params = build("tiny" if a.tiny else "dev", device, dtype, a.rank)
    n_base = sum(q.numel() for q in tf.parameters()) - sum(q.numel() for q in params)
    print(f"built {'tiny' if a.tiny else 'FLUX.1-dev-sized'} transformer: {n_base / 1e9:.2f}B frozen + "
          f"{sum(q.numel() for q in params) / 1e6:.1f}M LoRA (rank {a.rank}) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    if not a.tiny:
        print(f"device: {torch.cuda.get_device_name()}; weights {torch.cuda.memory_allocated() / 2**30:.1f} GiB",
              flush=True)
    rows = []
    for res in resolutions:
        for b in batches:
            if time.perf_counter() - t_start > a.budget_s:
                rows.append({"batch": b, "resolution": res, "condition": condition, "step_s": None,
                             "status": "skipped (time budget)"})
                continue
            row = measure(tf, params, b, res, condition, text_len, a.steps, a.warmup, device, dtype)
            rows.append(row)
            print(f"  target {res}px batch {b}: " + (f"{row['step_s']:.3f} s/step" if row["step_s"] else row["status"]),
                  flush=True)

    print()
    print(f"{'target':>7} {'cond':>5} {'batch':>5} {'s/step':>8} {'img/s':>7} {'peak GiB':>9}")
    for r in rows:
        if r["step_s"] is None:
            print(f"{r['resolution']:>7} {r['condition']:>5} {r['batch']:>5} {r['status']:>8}")
        else:
            print(f"{r['resolution']:>7} {r['condition']:>5} {r['batch']:>5} {r['step_s']:>8.3f} {r['img_s']:>7.2f} "
                  f"{r['peak_gib']:>9.1f}")
    for res in resolutions:
        ref = next((r for r in rows if r["resolution"] == res and r["batch"] == PAPER_BATCH_PER_GPU
                    and r["step_s"]), None)
        if ref is None:  # no batch-8 measurement: scale the largest batch that ran
            ran = [r for r in rows if r["resolution"] == res and r["step_s"]]
            if not ran:
                continue
            big = max(ran, key=lambda r: r["batch"])
            step_s, how = big["step_s"] * PAPER_BATCH_PER_GPU / big["batch"], f"scaled from batch {big['batch']}"
        else:
            step_s, how = ref["step_s"], "batch 8 measured"
        hours = a.paper_steps * step_s / 3600
        print(f"projected ({res}px targets, {how}): {a.paper_steps} steps x batch {PAPER_GPUS * PAPER_BATCH_PER_GPU} "
              f"({PAPER_GPUS} GPUs x {PAPER_BATCH_PER_GPU}) = {hours:.1f} h on {PAPER_GPUS} GPUs, "
              f"{hours * PAPER_GPUS:.1f} GPU-hours")
    return rows


if __name__ == "__main__":
    main()
