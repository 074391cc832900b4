"""The GenEval-Shapes effect of each algorithm speed lever, measured with the world's models.

    python benchmarks/world_levers.py --json world_levers.json            # H100, ~3 min
    python benchmarks/world_levers.py --tiny                              # CPU smoke run, seconds

The levers are the world analogs of the FLUX ones in benchmarks/flux_budget.py:
- cached_kv: the corrector whose condition tokens attend only to themselves, keys/values computed
  once per image (weights/world-corrector-kv) instead of the full-attention one (weights/world-corrector);
- corrector_strength_S: the full corrector started from the previous image noised to the grid's time
  at step (1 - S) x steps, running that share of the steps (--strengths, default 0.5 and 0.75:
  10 and 15 of 20);
- combined_S: both;
- with --partial / --partial-kv (correctors trained to start from a noised image, `train
  world-corrector --partial-share`), the strength rows use those, and partial_trained(_kv) rows
  report them run from pure noise;
- fp8: the full corrector with fp8 matmuls (models/fp8.py, weights bf16 -> fp8; CUDA 8.9+ only);
- all_S: every lever at once (the causal_kv corrector, strength S, fp8), as the FLUX budget's last row;
  all_full_S: strength S and fp8 with the full-attention corrector.
Each is compared with the exact version: the full corrector, 20 steps from pure noise, bf16 autocast.

Protocol (benchmarks/world_corrector_eval.py's): the generator draws --samples images per prompt
(seed = prompt x samples + k); every failure gets up to --rounds rounds of "oracle reflection on
the current image -> one correction", and an oracle verifier keeps a correct image when one appears.
The score is GenEval-Shapes overall (mean of the six category accuracies) of sample k with its
failure replaced that way, averaged over k (--samples replicates of the benchmark). Also: the share
of failures fixed, the share of --keep-max passed samples broken by a "keep" correction (what a
learned verifier would pay for), and corrector milliseconds per image. Effects are lever minus
exact, with a 95% percentile bootstrap over prompts (paired: the same prompts and seeds; resampled
within each category). Prints a table last; --json writes everything (flux_budget.py reads it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from reflectionflow.backends.world.mmdit import (
    DEFAULT_CORRECTOR,
    DEFAULT_CORRECTOR_KV,
    DEFAULT_GENERATOR,
    MMDiTCorrector,
    MMDiTGenerator,
)
from reflectionflow.components import CorrectionRequest
from reflectionflow.train.corrector_pool import KEEP, generator_samples, label_images
from reflectionflow.world.data import resolve_prompts
from reflectionflow.world.evaluate import TAGS

RESAMPLES = 1000


def judge(images, metas, seeds, workers):
    return label_images(np.asarray(images), metas, seeds, workers, with_target=False)


def fp8_model(model) -> int:
    """bf16 weights, then fp8 (e4m3, row scales; models/fp8.py, as the FLUX backend) for the blocks'
    linears (not the LoRA adapters)."""
    import torch

    from reflectionflow.models.fp8 import quantize_linears

    model.to(torch.bfloat16)
    return len(quantize_linears(model, lambda name, layer: "blocks." in name))


def correct(corrector, images, metas, reflections, seeds) -> tuple[np.ndarray, float, int]:
    reqs = [CorrectionRequest(image=img, prompt=m["prompt"], reflection=r, seed=s)
            for img, m, r, s in zip(images, metas, reflections, seeds)]
    if not reqs:
        return np.zeros((0, 64, 64, 3), np.uint8), 0.0, 0
    t = time.perf_counter()
    out = corrector.correct(reqs)
    ms = 1000 * (time.perf_counter() - t) / len(reqs)
    return np.stack([o.image for o in out]), ms, out[0].nfe


def run_config(cfg: dict, args, metas, images, labels) -> dict:
    """One corrector configuration: final correctness of every sample, fix / break rates, speed."""
    corrector = MMDiTCorrector(weights=cfg["weights"], steps=args.steps,
                               guidance=cfg.get("guidance", args.guidance), batch_size=args.batch,
                               device=args.device, strength=cfg["strength"])
    if cfg.get("fp8"):
        cfg["fp8_layers"] = fp8_model(corrector.model)
    fails = [i for i, lab in enumerate(labels) if not lab.correct]
    passes = [i for i, lab in enumerate(labels) if lab.correct][: args.keep_max]
    correct_final = np.array([lab.correct for lab in labels], dtype=bool)
    # warm-up (first CUDA calls, autotuning) outside the timing
    correct(corrector, images[:2], metas[:2], [KEEP, KEEP], [0, 1])
    out, ms_keep, nfe = correct(corrector, images[passes], [metas[i] for i in passes], [KEEP] * len(passes),
                                [10**6 + i for i in passes])
    kept = judge(out, [metas[i] for i in passes], passes, args.workers) if passes else []
    cur, reflections = images[fails], [labels[i].reflection for i in fails]
    fixed_after = []
    ms = [ms_keep] if passes else []
    for r in range(1, args.rounds + 1):
        if not fails:
            break
        cur, t, nfe = correct(corrector, cur, [metas[i] for i in fails], reflections,
                              [10**7 * r + i for i in fails])
        ms.append(t)
        labs = judge(cur, [metas[i] for i in fails], fails, args.workers)
        now = np.array([lab.correct for lab in labs], dtype=bool)
        correct_final[np.asarray(fails)[now]] = True  # the oracle verifier keeps a correct image
        reflections = [lab.reflection for lab in labs]
        fixed_after.append(float(correct_final[fails].mean()))
    return {"name": cfg["name"], "weights": str(cfg["weights"]), "strength": cfg["strength"],
            "fp8": bool(cfg.get("fp8")), "nfe_per_image": nfe, "ms_per_image": float(np.mean(ms)) if ms else None,
            "failures": len(fails), "fixed_by_round": fixed_after,
            "broken_keep": (1 - float(np.mean([k.correct for k in kept]))) if kept else None,
            "correct": correct_final}


def geneval(correct: np.ndarray, tags: np.ndarray, prompt_idx: np.ndarray, samples: int) -> float:
    """Mean over the sample replicates of GenEval-Shapes overall (the category mean); `prompt_idx`
    picks (possibly resampled) prompts."""
    by_prompt = correct.reshape(-1, samples)[prompt_idx]  # (P, samples)
    t = tags[prompt_idx]
    cats = [by_prompt[t == c].mean() for c in TAGS if (t == c).any()]
    return float(np.mean(cats))


def bootstrap_diff(a: np.ndarray, b: np.ndarray, tags: np.ndarray, samples: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(tags == c)[0] for c in TAGS if (tags == c).any()]
    base = np.arange(len(tags))
    diff = geneval(a, tags, base, samples) - geneval(b, tags, base, samples)
    draws = []
    for _ in range(RESAMPLES):
        idx = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
        draws.append(geneval(a, tags, idx, samples) - geneval(b, tags, idx, samples))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return diff, (float(lo), float(hi))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 4 prompts, 1 sample, 2 steps, 1 round")
    p.add_argument("--generator", default=str(DEFAULT_GENERATOR),
                   help="the generator whose samples are corrected (a corrector loads on the generator it was "
                   "trained on)")
    p.add_argument("--full", default=str(DEFAULT_CORRECTOR), help="the exact corrector (full attention)")
    p.add_argument("--kv", default=str(DEFAULT_CORRECTOR_KV), help="the causal_kv corrector")
    p.add_argument("--partial", default=None, help="the full-attention corrector used for the strength < 1 rows "
                   "(one trained for partial-noise starts, train world-corrector --partial-share); default --full")
    p.add_argument("--partial-kv", default=None, help="the causal_kv corrector of the combined rows; default --kv")
    p.add_argument("--prompts", default="geneval-shapes")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--samples", type=int, default=8, help="generator samples per prompt")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--partial-guidance", type=float, default=None,
                   help="CFG of the strength < 1 rows (default --guidance): a start from the previous image "
                   "may want less extrapolation")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75],
                   help="corrector_strength lever: shares of the steps run from the noised previous image")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--keep-max", type=int, default=1000, help="passed samples given a 'keep' correction")
    p.add_argument("--workers", type=int, default=None, help="judging processes (default: cores - 1; 1 --tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.limit = args.limit or 4
        args.samples, args.rounds, args.steps, args.batch = 1, 1, 2, 64
        args.keep_max = min(args.keep_max, 2)
        args.strengths = args.strengths[:1]
        args.device = "cpu" if args.device == "auto" else args.device
    if not all(0 < x <= 1 for x in args.strengths):
        p.error("--strengths must be in (0, 1]")
    from reflectionflow.train.corrector_pool import default_workers

    args.workers = args.workers or (1 if args.tiny else default_workers())
    start = time.perf_counter()

    metas_all = resolve_prompts(args.prompts)[: args.limit]
    generator = MMDiTGenerator(weights=args.generator, steps=args.steps, guidance=args.guidance,
                               batch_size=args.batch, device=args.device)
    metas, seeds, images, gen_s = generator_samples(generator, metas_all, args.samples)
    labels = judge(images, metas, seeds, args.workers)
    tags = np.array([m["tag"] for m in metas_all])
    configs = [dict(name="exact", weights=args.full, strength=1.0),
               dict(name="cached_kv", weights=args.kv, strength=1.0)]
    partial, partial_kv = args.partial or args.full, args.partial_kv or args.kv
    if args.partial:  # the partial-start corrector run from pure noise: what training for partial starts costs
        configs.append(dict(name="partial_trained", weights=partial, strength=1.0))
    if args.partial_kv:
        configs.append(dict(name="partial_trained_kv", weights=partial_kv, strength=1.0))
    pg = {} if args.partial_guidance is None else {"guidance": args.partial_guidance}
    for x in args.strengths:
        configs += [dict(name=f"corrector_strength_{x:g}", weights=partial, strength=x, **pg),
                    dict(name=f"combined_{x:g}", weights=partial_kv, strength=x, **pg)]
    from reflectionflow.models.fp8 import fp8_unavailable

    fp8_why = ("--no-fp8" if args.no_fp8 else "needs a CUDA GPU" if args.device == "cpu"
               else fp8_unavailable("cuda"))
    if fp8_why is None:
        configs.append(dict(name="fp8", weights=args.full, strength=1.0, fp8=True))
        configs += [dict(name=f"all_{x:g}", weights=partial_kv, strength=x, fp8=True, **pg) for x in args.strengths]
        configs += [dict(name=f"all_full_{x:g}", weights=partial, strength=x, fp8=True, **pg) for x in args.strengths]
    results = []
    for cfg in configs:
        try:
            results.append(run_config(cfg, args, metas, images, labels))
        except Exception as exc:  # fp8 kernels that import but do not run here: report, keep the rest
            if not cfg.get("fp8"):
                raise
            fp8_why = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(f"[{time.perf_counter() - start:6.1f} s] {cfg['name']} done", flush=True)
    base = np.array([lab.correct for lab in labels])
    exact = results[0]
    all_prompts = np.arange(len(metas_all))
    before = geneval(base, tags, all_prompts, args.samples)
    effects = {}
    for r in results:
        r["geneval"] = geneval(r["correct"], tags, all_prompts, args.samples)
        if r is not exact:
            d, ci = bootstrap_diff(r["correct"], exact["correct"], tags, args.samples)
            effects[r["name"]] = {"diff": d, "ci": ci, "within_0.01": abs(d) <= 0.01}
    if fp8_why is not None:
        effects["fp8"] = f"unavailable ({fp8_why})"
    out = {"prompts": len(metas_all), "samples_per_prompt": args.samples, "rounds": args.rounds, "steps": args.steps,
           "guidance": args.guidance, "generator_seconds": gen_s, "images": len(metas),
           "geneval_before_correction": before, "effects": effects,
           "configs": [{k: v for k, v in r.items() if k != "correct"} for r in results],
           "wall_s": time.perf_counter() - start}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    print(f"\n# World levers: {len(metas_all)} prompts x {args.samples} samples ({len(metas)} images, "
          f"GenEval-Shapes {before:.3f} before correction), up to {args.rounds} corrections per failure "
          f"(oracle reflection, oracle keeps a correct image), {args.steps} steps, CFG {args.guidance:g}; "
          f"{out['wall_s']:.0f} s")
    print("| configuration | NFE/image | ms/image | failures fixed | broken by keep | GenEval-Shapes | "
          "effect vs exact [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        e = effects.get(r["name"])
        cell = "-" if e is None else f"{e['diff']:+.4f} [{e['ci'][0]:+.4f}, {e['ci'][1]:+.4f}]"
        fixed = f"{r['fixed_by_round'][-1]:.3f}" if r["fixed_by_round"] else "-"
        broken = "-" if r["broken_keep"] is None else f"{r['broken_keep']:.3f}"
        ms = "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}"
        print(f"| {r['name']} | {r['nfe_per_image']} | {ms} | {fixed} | {broken} | "
              f"{r['geneval']:.4f} | {cell} |")
    if fp8_why is not None:
        print(f"| fp8 | - | - | - | - | - | unavailable ({fp8_why}) |")
    return out


if __name__ == "__main__":
    main()
