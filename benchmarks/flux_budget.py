"""One prompt's ReflectionFlow budget at FLUX scale: the original's way, then each speed lever added.

    python benchmarks/flux_budget.py --json flux_budget.json     # H100: FLUX.1-dev shapes, random weights, ~4 min
    python benchmarks/flux_budget.py --tiny                      # any CPU: tiny shapes, a smoke run

The budget (docs/method.md, sections 2 and 3): 32 noise images + 32 corrector images per prompt, 1024 px,
30 steps, condition image 512 px (1024 condition tokens), T5 length 512, a rank-32 condition LoRA.
The FLUX.1-dev-shaped transformer and VAE are built on the device with random weights (no
download); the text encoders are not built (one T5 call per text, not counted).

Nothing runs the whole budget: each configuration's pieces are timed on the device (one transformer
forward at batch 1 and at --batch, eager and regionally compiled, plain / with condition tokens /
with cached condition keys and values, bf16 and fp8; VAE decode and encode) and the budget is
extrapolated with the formula printed above the table:

    transformer = 32 x 30 x f_gen + 32 x (S_c x f_corr + e_kv)     S_c = round(30 x strength)
    vae         = 64 x decode_1024 + 32 x encode_512 (+ 32 x encode_1024 when strength < 1)
    vlm         = calls x L                      sequential (the original)
                  max(0, calls x L / c - gpu)    overlapped: c calls in flight beside generation
    calls       = 64 verdicts (x2 when each image is scored twice) + 32 reflections + 32 refinements

f_* are seconds per image per forward at the configuration's batch size, e_kv the once-per-image
condition encoding (cached KV only). The VLM is a stub: a fixed latency L per call (default 0.5 s),
served with c parallel slots (default 8, the VLM client's default concurrency), whose calls overlap
generation when the run batches prompts (the engine's `--workers`, `--prompt-batch`): the overlapped
figure is a multi-prompt run's steady state per prompt. A short probe checks that stub calls on
threads do not slow the GPU down.

Levers that change images carry the GenEval-Shapes effect of the same lever in the world
(`benchmarks/world_levers.py --json FILE`, passed here with --world-effects FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NOISE_IMAGES, CORRECTOR_IMAGES = 32, 32


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> float:
    """Seconds per call of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / max(repeats, 1)


def build(size: str, device: str, dtype, lora_rank: int, seed: int = 0):
    """FLUX.1-dev-shaped transformer (+ a random condition LoRA) and VAE, random weights, on the device."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from reflectionflow.backends.flux.lora import add_lora
    from reflectionflow.backends.flux.random_init import TRANSFORMER_CONFIGS, VAE_CONFIGS

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            tf = FluxTransformer2DModel(**TRANSFORMER_CONFIGS[size]).eval()
            vae = AutoencoderKL(**VAE_CONFIGS[size]).eval()
    finally:
        torch.set_default_dtype(previous)
    add_lora(tf, rank=lora_rank, alpha=float(lora_rank))
    with torch.no_grad():
        for name, p in tf.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)  # a trained-looking adapter: B = 0 would let kernels skip nothing anyway
    tf.requires_grad_(False)
    vae.requires_grad_(False)
    return tf, vae


class Inputs:
    """Random transformer inputs of the budget's shapes at one batch size."""

    def __init__(self, tf, batch: int, height: int, cond_size: int, text_len: int, device: str, pixels: int = 16):
        import torch

        from reflectionflow.backends.flux.transformer import condition_ids

        c, dt = tf.config.in_channels, tf.dtype
        side, cside = height // pixels, cond_size // pixels  # pixels per token side: 8x VAE, 2x2 packing
        g = torch.Generator(device="cpu").manual_seed(batch)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        self.x = rnd(batch, side * side, c)
        self.cond = rnd(batch, cside * cside, c)
        self.txt = rnd(batch, text_len, tf.config.joint_attention_dim)
        self.pooled = rnd(batch, tf.config.pooled_projection_dim)
        self.t = torch.full((batch,), 0.5, device=device, dtype=dt)
        self.g = torch.full((batch,), 3.5, device=device, dtype=dt) if tf.config.guidance_embeds else None
        ii = torch.zeros(side, side, 3)
        ii[..., 1], ii[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        self.img_ids = ii.reshape(-1, 3).to(device=device, dtype=dt)
        self.txt_ids = torch.zeros(text_len, 3, device=device, dtype=dt)
        self.cids = condition_ids(cside, cside, device=device, dtype=dt)


def forward_fns(tf, inp: Inputs) -> dict:
    """The three transformer calls of the budget, as closures over the inputs."""
    import torch

    from reflectionflow.backends.flux.transformer import corrector_forward, encode_condition_kv

    base = (tf, inp.x, inp.txt, inp.pooled, inp.t, inp.img_ids, inp.txt_ids, inp.g)
    cache = {}
    # Attention runs on torch's default SDPA backend choice for every call, as in the pipeline
    # (backends/flux/pipeline.py): on the H100 with torch 2.11 that is cuDNN's kernel, which also
    # takes the cached condition's different query and key lengths (docs/RESULTS.md).

    @torch.no_grad()
    def plain():
        return corrector_forward(*base)

    @torch.no_grad()
    def cond():
        return corrector_forward(*base, condition=inp.cond, cond_ids=inp.cids)

    @torch.no_grad()
    def encode_kv():
        cache["kv"] = encode_condition_kv(tf, inp.cond, inp.cids, inp.pooled, inp.g)
        return cache["kv"]

    @torch.no_grad()
    def kv():
        if "kv" not in cache:
            encode_kv()
        return corrector_forward(*base, cond_attention="causal_kv", cond_kv=cache["kv"])

    return {"plain": plain, "cond": cond, "encode_kv": encode_kv, "kv": kv}


def vae_times(vae, height: int, cond_size: int, batch: int, device: str, warmup: int, repeats: int,
              factor: int = 8) -> dict:
    """Seconds per image: decode at the output size, encode the condition and the full-size start image
    (`factor`: the VAE's downscaling, 8 for FLUX's)."""
    import torch

    dt = vae.dtype
    lat_c = vae.config.latent_channels
    z = torch.randn(batch, lat_c, height // factor, height // factor, device=device, dtype=dt)
    px_c = torch.rand(batch, 3, cond_size, cond_size, device=device, dtype=dt) * 2 - 1
    px = torch.rand(batch, 3, height, height, device=device, dtype=dt) * 2 - 1
    with torch.no_grad():
        out = {"decode": timed(lambda: vae.decode(z), device, warmup, repeats),
               "encode_cond": timed(lambda: vae.encode(px_c).latent_dist.mode(), device, warmup, repeats),
               "encode_start": timed(lambda: vae.encode(px).latent_dist.mode(), device, warmup, repeats)}
    return {k: v / batch for k, v in out.items()}


def vae_channels_last_probe(vae, height: int, batch: int, device: str, repeats: int) -> dict:
    """Decode seconds per image with the VAE's convolutions channels-last and cuDNN autotuning on,
    against the default (recorded only; the VAE is put back as it was)."""
    import torch

    z = torch.randn(batch, vae.config.latent_channels, height // 8, height // 8, device=device, dtype=vae.dtype)
    bench = torch.backends.cudnn.benchmark
    with torch.no_grad():
        ref = vae.decode(z).sample.float()
        base = timed(lambda: vae.decode(z), device, 1, repeats) / batch
        torch.backends.cudnn.benchmark = True
        vae.to(memory_format=torch.channels_last)
        try:
            fast = timed(lambda: vae.decode(z), device, 1, repeats) / batch
            diff = float((vae.decode(z).sample.float() - ref).abs().max())
        finally:
            vae.to(memory_format=torch.contiguous_format)
            torch.backends.cudnn.benchmark = bench
    return {"decode_default_s": base, "decode_channels_last_s": fast, "max_abs_diff": diff}


def overlap_probe(fn, device: str, calls: int, latency: float, concurrency: int) -> dict:
    """GPU forwards with stub VLM calls (sleeps) in flight on threads: wall vs. the two alone."""
    gpu = timed(fn, device, 0, 3) * 3
    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(time.sleep, latency) for _ in range(calls)]
        timed(fn, device, 0, 3)
        for f in futures:
            f.result()
        both = time.perf_counter() - t0
    vlm = -(-calls // concurrency) * latency
    hidden = max(0.0, (gpu + vlm - both) / min(gpu, vlm))
    return {"gpu_s": gpu, "vlm_s": vlm, "together_s": both, "hidden_share": hidden}


def vlm_calls(double_scoring: bool, noise: int = NOISE_IMAGES, corrector: int = CORRECTOR_IMAGES) -> int:
    images = noise + corrector
    return images * (2 if double_scoring else 1) + 2 * corrector  # verdicts + reflections + refinements


def budget(f_gen: float, f_corr: float, e_kv: float, vae: dict, steps: int, strength: float, double: bool,
           overlap: bool, latency: float, concurrency: int, noise: int = NOISE_IMAGES,
           corrector: int = CORRECTOR_IMAGES) -> dict:
    """One prompt's seconds by the formula of the module's docstring (`noise` + `corrector` images:
    the paper's 32 + 32 unless given; benchmarks/flux_end_to_end.py passes its run's)."""
    s_c = max(1, round(steps * strength))
    transformer = noise * steps * f_gen + corrector * (s_c * f_corr + e_kv)
    v = (noise + corrector) * vae["decode"] + corrector * vae["encode_cond"]
    if strength < 1:
        v += corrector * vae["encode_start"]
    calls = vlm_calls(double, noise, corrector)
    gpu = transformer + v
    vlm = max(0.0, calls * latency / concurrency - gpu) if overlap else calls * latency
    return {"transformer_s": transformer, "vae_s": v, "vlm_s": vlm, "total_s": gpu + vlm, "vlm_calls": calls,
            "corrector_steps": s_c}


def load_effects(path: str | None) -> dict:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return data.get("effects", data)


def pick_strength(effects: dict, tolerance: float = 0.01) -> tuple[float, bool]:
    """(S, with cached K/V): the smallest strength S whose world effect is within `tolerance` for
    corrector_strength_S, and whether combined_S (with the causal_kv corrector) is too; (1, True)
    when none is (the lever stays off)."""
    ok = []
    for key, e in effects.items():
        if key.startswith("corrector_strength_") and isinstance(e, dict) and abs(e["diff"]) <= tolerance:
            s = key.removeprefix("corrector_strength_")
            both = effects.get(f"combined_{s}")
            ok.append((float(s), isinstance(both, dict) and abs(both["diff"]) <= tolerance))
    return min(ok, key=lambda x: (x[0], not x[1])) if ok else (1.0, True)


def effect_cell(effects: dict, key: str) -> str:
    e = effects.get(key)
    if e is None:
        return "not measured (world_levers.py)"
    if isinstance(e, str):
        return e
    lo, hi = e["ci"]
    return f"{e['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random FLUX on the CPU (a smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--height", type=int, default=None, help="default 1024 (32 with --tiny)")
    ap.add_argument("--condition-size", type=int, default=None, help="default 512 (16 with --tiny)")
    ap.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; 8 with --tiny)")
    ap.add_argument("--steps", type=int, default=30, help="steps per image in the budget (extrapolated)")
    ap.add_argument("--batch", type=int, default=8, help="images per transformer call with batching")
    ap.add_argument("--strength", default="0.5",
                    help="corrector start: share of the steps run from the partly noised previous image; 'auto': "
                    "the smallest strength whose world effect (--world-effects, alone and with cached K/V) is "
                    "within 0.01, else 1 (lever off)")
    ap.add_argument("--latency", type=float, default=0.5, help="stub VLM seconds per call")
    ap.add_argument("--concurrency", type=int, default=8, help="stub VLM calls in flight at once")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; 1 --tiny)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled configurations")
    ap.add_argument("--no-fp8", action="store_true", help="skip fp8 (reported as skipped)")
    ap.add_argument("--max-seconds", type=float, default=330.0,
                    help="skip the remaining measurements once this much wall time has passed")
    ap.add_argument("--world-effects", default=None, metavar="FILE", help="world_levers.py --json output")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    effects = load_effects(args.world_effects)
    args.strength, args.kv = pick_strength(effects) if args.strength == "auto" else (float(args.strength), True)
    if not 0 < args.strength <= 1:
        ap.error("--strength must be in (0, 1] or auto")
    for name in ("steps", "batch", "concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")

    import torch

    from reflectionflow.backends.flux.transformer import compile_blocks, fp8_available, quantize_fp8

    start = time.perf_counter()
    size = "tiny" if args.tiny else "dev"
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    height = args.height or (32 if args.tiny else 1024)
    cond_size = args.condition_size or (16 if args.tiny else 512)
    text_len = args.text_len or (8 if args.tiny else 512)
    repeats = args.repeats or (1 if args.tiny else 3)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B = args.batch
    fig: dict = {"size": size, "device": device, "dtype": str(dtype).replace("torch.", ""), "height": height,
                 "condition_size": cond_size, "text_len": text_len, "steps": args.steps, "batch": B,
                 "strength": args.strength, "latency_s": args.latency, "concurrency": args.concurrency,
                 "torch": torch.__version__, "skipped": {}}
    if device.startswith("cuda"):
        fig["gpu"] = torch.cuda.get_device_name(device)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    def out_of_time(what: str) -> bool:
        if time.perf_counter() - start > args.max_seconds:
            fig["skipped"][what] = f"time: past --max-seconds {args.max_seconds:.0f}"
            log(f"skip {what}: past --max-seconds")
            return True
        return False

    t0 = time.perf_counter()
    tf, vae = build(size, device, dtype, args.lora_rank)
    _sync(device)
    fig["build_s"] = time.perf_counter() - t0
    log(f"built {size} transformer + VAE in {fig['build_s']:.1f} s")
    inp1 = Inputs(tf, 1, height, cond_size, text_len, device)
    inpB = Inputs(tf, B, height, cond_size, text_len, device)
    f: dict = {}  # seconds per image per forward

    # Eager: batch 1 (the original) and batch B.
    for tag, inp, n in (("b1", inp1, 1), (f"b{B}", inpB, B)):
        fns = forward_fns(tf, inp)
        for kind in ("plain", "cond", "kv", "encode_kv"):
            f[f"eager_{kind}_{tag}"] = timed(fns[kind], device, 1, repeats) / n
        log(f"eager batch {n}: plain {1000 * f[f'eager_plain_{tag}']:.1f} ms/img, cond "
            f"{1000 * f[f'eager_cond_{tag}']:.1f}, cached kv {1000 * f[f'eager_kv_{tag}']:.1f}, "
            f"kv encode {1000 * f[f'eager_encode_kv_{tag}']:.1f}")
    vae1 = vae_times(vae, height, cond_size, 1, device, 1, repeats)
    vaeB = vae_times(vae, height, cond_size, min(B, 4), device, 1, repeats)
    fig["vae_b1"], fig["vae_batched"] = vae1, vaeB
    log(f"VAE per image: decode {vaeB['decode']:.3f} s, encode cond {vaeB['encode_cond']:.3f}, "
        f"encode start {vaeB['encode_start']:.3f}")
    if device.startswith("cuda") and not args.tiny:
        fig["vae_channels_last"] = vae_channels_last_probe(vae, height, min(B, 4), device, repeats)
        log(f"VAE channels-last probe: {fig['vae_channels_last']}")
        names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
        try:
            fig["sdpa_priority"] = [names.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()]
        except (AttributeError, RuntimeError):
            pass
    fns = forward_fns(tf, inpB)
    fig["overlap_probe"] = overlap_probe(fns["plain"], device, calls=2 * args.concurrency, latency=args.latency,
                                         concurrency=args.concurrency)
    log(f"overlap probe: {fig['overlap_probe']}")

    # Regional compile at batch B (exact up to kernel rounding: the max difference is recorded).
    compiled = False
    if args.no_compile:
        fig["skipped"]["compile"] = "--no-compile"
    elif not out_of_time("compile"):
        ref = {k: fns[k]().float() for k in ("plain", "cond")}
        compile_blocks(tf)
        for kind in ("plain", "cond", "kv"):
            t0 = time.perf_counter()
            fns[kind]()
            _sync(device)
            fig[f"compile_{kind}_s"] = time.perf_counter() - t0
            f[f"compiled_{kind}"] = timed(fns[kind], device, 1, repeats) / B
            log(f"compiled {kind}: {1000 * f[f'compiled_{kind}']:.1f} ms/img (compiling took "
                f"{fig[f'compile_{kind}_s']:.1f} s)")
        fig["compile_max_rel_diff"] = {k: float((fns[k]().float() - v).abs().max() / v.abs().max())
                                       for k, v in ref.items()}
        compiled = True

    def report() -> None:
        """Rows, JSON and table from the figures so far (printed before fp8 too: a hang there keeps them)."""
        fig["forward_s_per_image"] = f

        # The budget, lever by lever (cumulative).
        lat, conc, steps, s = args.latency, args.concurrency, args.steps, args.strength
        bt = f"b{B}"
        gen_c = f.get("compiled_plain", f[f"eager_plain_{bt}"])
        cond_c = f.get("compiled_cond", f[f"eager_cond_{bt}"])
        kv_c = f.get("compiled_kv", f[f"eager_kv_{bt}"])
        enc_kv = f[f"eager_encode_kv_{bt}"]
        # With a strength whose combined effect with cached K/V is outside the tolerance, the strength
        # and fp8 rows use the full-attention corrector (K/V recomputed) instead.
        corr_s, enc_s = (kv_c, enc_kv) if args.kv else (cond_c, 0.0)
        kv_note = "" if args.kv or s >= 1 else "; full-attention corrector: its cached-K/V twin is outside 0.01"
        ctag = "compiled" if compiled else "eager (compile skipped)"
        rows = [
            ("original: eager, batch 1, condition recomputed, scored twice, sequential VLM", True, None,
             budget(f["eager_plain_b1"], f["eager_cond_b1"], 0.0, vae1, steps, 1.0, True, False, lat, conc)),
            (f"+ batching ({B} images per call across chains and prompts)", True, None,
             budget(f[f"eager_plain_{bt}"], f[f"eager_cond_{bt}"], 0.0, vaeB, steps, 1.0, True, False, lat, conc)),
            (f"+ regional torch.compile of the blocks ({ctag})", True, None,
             budget(gen_c, cond_c, 0.0, vaeB, steps, 1.0, True, False, lat, conc)),
            ("+ no double scoring", True, None, budget(gen_c, cond_c, 0.0, vaeB, steps, 1.0, False, False, lat, conc)),
            (f"+ VLM calls overlap generation ({conc} in flight)  = exact levers", True, None,
             budget(gen_c, cond_c, 0.0, vaeB, steps, 1.0, False, True, lat, conc)),
            ("+ cached condition K/V (causal_kv corrector)", False, "cached_kv",
             budget(gen_c, kv_c, enc_kv, vaeB, steps, 1.0, False, True, lat, conc)),
            (f"+ corrector from the previous image, strength {s:g} ({max(1, round(steps * s))} of {steps} steps"
             f"{kv_note})" if s < 1 else "+ corrector from the previous image: off (strength 1)",
             False, (f"combined_{s:g}" if args.kv else f"corrector_strength_{s:g}") if s < 1 else None,
             budget(gen_c, corr_s, enc_s, vaeB, steps, s, False, True, lat, conc)),
        ]
        if "fp8_plain" in f:
            # the world's effect of every lever at once where it was measured, else fp8's alone
            every = f"all_{s:g}" if args.kv else f"all_full_{s:g}"
            fp8_corr, fp8_enc = (f["fp8_kv"], f["fp8_encode_kv"]) if args.kv else (f["fp8_cond"], 0.0)
            rows.append(("+ fp8 matmuls (models/fp8.py)", False, every if every in effects else "fp8",
                         budget(f["fp8_plain"], fp8_corr, fp8_enc, vaeB, steps, s, False, True, lat, conc)))
        else:
            why = fig["skipped"].get("fp8")
            rows.append((f"+ fp8 matmuls: unavailable ({why})" if why else "+ fp8 matmuls: measured next",
                         False, "fp8", None))
        orig = rows[0][3]["total_s"]
        fig["rows"] = [{"config": name, "exact": exact, "world_effect": effect_cell(effects, key) if key else None,
                        **(b or {}), "speedup": (orig / b["total_s"]) if b else None} for name, exact, key, b in rows]
        fig["wall_s"] = time.perf_counter() - start
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")

        print()
        print(f"# One prompt's budget: {NOISE_IMAGES} noise + {CORRECTOR_IMAGES} corrector images, {size} FLUX "
              f"(random weights) on {fig.get('gpu', device)}, {height} px, {steps} steps, condition {cond_size} px, "
              f"T5 {text_len} tokens, {fig['dtype']}")
        print(f"transformer = {NOISE_IMAGES} x {steps} x f_gen + {CORRECTOR_IMAGES} x (S_c x f_corr + e_kv); "
              f"vae = {NOISE_IMAGES + CORRECTOR_IMAGES} x decode + {CORRECTOR_IMAGES} x encode_cond "
              f"(+ {CORRECTOR_IMAGES} x encode_start if strength < 1); vlm = calls x {lat:g} s sequential, or "
              f"max(0, calls x {lat:g} / {conc} - gpu) overlapped; f measured per image at the row's batch size")
        p = fig["overlap_probe"]
        print(f"overlap probe: {p['gpu_s']:.2f} s GPU + {p['vlm_s']:.2f} s stub VLM took "
              f"{p['together_s']:.2f} s together "
              f"({100 * p['hidden_share']:.0f}% of the shorter hidden); measured in {fig['wall_s']:.0f} s wall")
        print("| configuration | transformer s | VAE s | VLM s | s per prompt | speed-up | changes images? | "
              "GenEval-Shapes effect (world) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in fig["rows"]:
            if r["speedup"] is None:
                print(f"| {r['config']} | - | - | - | - | - | yes | {r['world_effect']} |")
                continue
            print(f"| {r['config']} | {r['transformer_s']:.1f} | {r['vae_s']:.1f} | {r['vlm_s']:.1f} | "
                  f"{r['total_s']:.1f} | {r['speedup']:.2f}x | {'no' if r['exact'] else 'yes'} | "
                  f"{r['world_effect'] or '-'} |")

    report()  # everything but fp8, first: quantising a full-size model can outlast the command
    print(flush=True)
    # fp8 (changes the weights in place: last).
    why = "--no-fp8" if args.no_fp8 else fp8_available(device if device.startswith("cuda") else None)
    if why is None and not out_of_time("fp8"):
        try:
            ref = fns["kv"]().float()
            fig["fp8_layers"] = quantize_fp8(tf)
            for kind in ("plain", "cond", "kv"):
                f[f"fp8_{kind}"] = timed(fns[kind], device, 1, repeats) / B
                log(f"fp8{' compiled' if compiled else ''} {kind}: {1000 * f[f'fp8_{kind}']:.1f} ms/img")
            fns["encode_kv"]()
            f["fp8_encode_kv"] = timed(fns["encode_kv"], device, 0, 1) / B
            fig["fp8_max_rel_diff_kv"] = float((fns["kv"]().float() - ref).abs().max() / ref.abs().max())
        except Exception as exc:  # fp8 that cannot run here after all: report it, keep the rest
            why = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            for k in ("fp8_plain", "fp8_cond", "fp8_kv", "fp8_encode_kv"):
                f.pop(k, None)
    if why is not None:
        fig["skipped"]["fp8"] = why
        log(f"fp8 unavailable: {why}")
    report()  # the final table, fp8 included when it ran
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
