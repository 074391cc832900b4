"""One prompt through ReflectionFlow with a full-size FLUX of random weights, timed per stage.

    python benchmarks/flux_reflection_gpu.py                 # H100: FLUX.1-dev shapes, 1024 px, bf16
    python benchmarks/flux_reflection_gpu.py --tiny          # any CPU: tiny shapes, 32 px, seconds

What runs: a FLUX.1-dev-shaped pipeline (12B transformer, T5-XXL and CLIP-L encoders, the FLUX VAE)
built on the device with random weights, a random rank-32 corrector LoRA in the released layout
(saved and read back through the --lora-path code), and the world's oracle judges behind
`reflectionflow serve` on loopback, reached over HTTP by the VLM verifier, reflector and refiner.
The engine's `generate` runs the reflection method (pool P noise images, then N chains x M
corrections) on one prompt; the ledger's wall seconds per stage are printed, with one transformer
forward timed alone (plain, and with the 512 px condition tokens) for comparison with
docs/method.md, section 3. Random weights make the images noise; the timings are what matter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of a red circle and a blue square"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(pipe, height: int, width: int, condition_size: int, device: str, repeats: int) -> dict:
    """Seconds per transformer forward at batch 1: plain, and with the condition tokens + LoRA."""
    import torch

    from reflectionflow.backends.flux.transformer import condition_ids, corrector_forward

    tf = pipe.transformer
    mult = pipe.vae_scale_factor * 2
    h, w, c = height // mult, width // mult, tf.config.in_channels
    ch = condition_size // mult
    dt = tf.dtype
    x = torch.randn(1, h * w, c, device=device, dtype=dt)
    cond = torch.randn(1, ch * ch, c, device=device, dtype=dt)
    txt = torch.randn(1, 512, tf.config.joint_attention_dim, device=device, dtype=dt)
    pooled = torch.randn(1, tf.config.pooled_projection_dim, device=device, dtype=dt)
    t = torch.full((1,), 0.5, device=device, dtype=dt)
    g = torch.full((1,), 3.5, device=device, dtype=dt) if tf.config.guidance_embeds else None
    img_ids = pipe._prepare_latent_image_ids(1, h, w, device, dt)
    txt_ids = torch.zeros(512, 3, device=device, dtype=dt)
    cids = condition_ids(ch, ch, device=device, dtype=dt)
    out = {}
    for name, kw in (("plain", {}), ("with_condition", {"condition": cond, "cond_ids": cids})):
        with torch.no_grad():
            for _ in range(2):  # warm-up
                corrector_forward(tf, x, txt, pooled, t, img_ids, txt_ids, g, **kw)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                corrector_forward(tf, x, txt, pooled, t, img_ids, txt_ids, g, **kw)
            _sync(device)
        out[name] = (time.perf_counter() - t0) / repeats
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random FLUX on the CPU (a smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--height", type=int, default=None, help="default 1024 (32 with --tiny)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default 4 (reduced from the original's 30); 2 with --tiny")
    ap.add_argument("--condition-size", type=int, default=None, help="default 512 (16 with --tiny)")
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="transformer forwards timed alone (0: skip)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)

    import torch

    from reflectionflow.backends.flux.components import (
        FluxGenerator,
        FluxModels,
        ReflectionCorrector,
        SamplingSettings,
    )
    from reflectionflow.backends.flux.lora import add_lora, read_lora_file, remove_lora, save_lora
    from reflectionflow.backends.flux.random_init import random_flux_pipeline
    from reflectionflow.backends.vlm.judges import VLMRefiner, VLMReflector, VLMYesNoVerifier
    from reflectionflow.backends.vlm.options import VLMOptions
    from reflectionflow.config import RunConfig
    from reflectionflow.engine import Components
    from reflectionflow.pipeline import generate
    from reflectionflow.serve import JudgeServer, JudgeService, world_judges

    size = "tiny" if args.tiny else "dev"
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    height = args.height or (32 if args.tiny else 1024)
    width = args.width or height
    steps = args.steps or (2 if args.tiny else 4)
    cond_size = args.condition_size or (16 if args.tiny else 512)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    figures: dict = {"size": size, "device": device, "dtype": str(dtype).replace("torch.", ""), "height": height,
                     "width": width, "steps": steps, "condition_size": cond_size, "pool": args.pool,
                     "chains": args.chains, "depth": args.depth}
    if device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    pipe = random_flux_pipeline(size, device=device, dtype=dtype)
    _sync(device)
    figures["build_s"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        # A random corrector LoRA in the released layout, written and read back like --lora-path.
        add_lora(pipe.transformer, rank=args.lora_rank, alpha=float(args.lora_rank))
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
        lora = read_lora_file(save_lora(Path(tmp) / "lora", pipe.transformer, alpha=float(args.lora_rank)))
        remove_lora(pipe.transformer)

        models = FluxModels.from_pipeline(pipe)
        settings = SamplingSettings(height=height, width=width, steps=steps, guidance=3.5, max_sequence_length=512,
                                    batch_size=max(args.pool, args.chains))
        t0 = time.perf_counter()
        corrector = ReflectionCorrector(models, settings, lora, condition_size=cond_size)
        models.corrector_pipe(lora)  # loads the LoRA into the shared transformer
        figures["lora_load_s"] = time.perf_counter() - t0

        server = JudgeServer(JudgeService(world_judges()))
        server.start()
        try:
            client = VLMOptions(url=server.url, model="reflectionflow-world", concurrency=8, timeout=60).client()
            comps = Components(generator=FluxGenerator(models, settings), verifier=VLMYesNoVerifier(client),
                               reflector=VLMReflector(client), refiner=VLMRefiner(client), corrector=corrector)
            budget = args.pool + args.chains * args.depth
            config = RunConfig(method="reflection", budget=budget, pool=args.pool, chains=args.chains,
                               depth=args.depth, seed=0, backend="world", generator="flux", corrector="reflection",
                               verifier="vlm-yesno", reflector="vlm", refiner="vlm", progress=False)
            t0 = time.perf_counter()
            result = generate(config, Path(tmp) / "run", prompt=PROMPT, components=comps, report=False)
            _sync(device)
            figures["run_s"] = time.perf_counter() - t0
        finally:
            server.shutdown()
            server.server_close()
        led = result.ledger["totals"]
        figures["images"], figures["nfe"], figures["vlm_calls"] = led["images"], led["nfe"], led["vlm_calls"]
        figures["stages"] = {s: {"wall_s": st["wall_s"], "images": st["images"], "nfe": st["nfe"],
                                 "calls": st["calls"]} for s, st in led["by_stage"].items() if st["items"]}
        figures["client"] = client.stats.to_dict()
    if args.repeats:
        figures["forward_s"] = time_forward(pipe, height, width, cond_size, device, args.repeats)
    if device.startswith("cuda"):
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30

    print(f"# ReflectionFlow, one prompt, {size} FLUX (random weights) on {figures.get('gpu', device)}, "
          f"{height}x{width}, {steps} steps, pool {args.pool} + {args.chains} chains x {args.depth} rounds")
    print(f"build {figures['build_s']:.1f} s, LoRA load {figures['lora_load_s']:.2f} s, "
          f"run {figures['run_s']:.2f} s ({figures['images']} images, NFE {figures['nfe']}, "
          f"{figures['vlm_calls']} VLM calls)")
    print("| stage | wall s | images | NFE | VLM calls | s per image or call |")
    print("|---|---|---|---|---|---|")
    for stage, st in figures["stages"].items():
        n = st["images"] or st["calls"] or 1
        print(f"| {stage} | {st['wall_s']:.3f} | {st['images']} | {st['nfe']} | {st['calls']} "
              f"| {st['wall_s'] / n:.3f} |")
    if "forward_s" in figures:
        f = figures["forward_s"]
        print(f"transformer forward, batch 1: plain {1000 * f['plain']:.1f} ms, with {cond_size} px condition "
              f"{1000 * f['with_condition']:.1f} ms (+{100 * (f['with_condition'] / f['plain'] - 1):.0f}%)")
    if "peak_memory_gb" in figures:
        print(f"peak GPU memory {figures['peak_memory_gb']:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
