"""How well the world correctors fix the world generator's own failures on GenEval-Shapes.

    python benchmarks/world_corrector_eval.py --correctors weights/world-corrector weights/world-corrector-kv \
        --samples 8 --rounds 4 --workers 15 --out corrector_eval.json

1. The generator (engine adapter `world-mmdit`) draws `--samples` images per benchmark prompt
   (seed = prompt index x samples + k); the evaluator judges them.
2. For each corrector (engine adapter, the Corrector interface):
   - failed samples: `--rounds` rounds of "oracle reflection on the current image -> one
     correction" (re-reflected every round). Reported: the share of failures correct after one
     correction, the share fixed by round r (correct at some round <= r: what an oracle verifier
     keeps), and the share correct at the last round (the chain never stops);
   - passed samples: one correction with "- Keep the image unchanged."; reported: the share broken;
   - GenEval-Shapes overall of the first sample per prompt, then with its failures replaced by
     their corrections up to round r (the oracle verifier picks a correct image when there is one);
   - corrector wall milliseconds per image (batched, steps and CFG as given).
   `--corrector-settings` runs every corrector at several sampler settings on the same samples (for
   instance `steps=20,guidance=3 steps=12,guidance=3`); the first is the reference of a paired
   count: failures fixed in round 1 by a row and not by the first row, and the reverse.
`--samples-cache F.npz` keeps the generator's samples: written on the first run, read (and checked
against the prompts and generator) on the next, so settings can be compared without sampling again.
Prints a table and writes everything as JSON (with the indices of the failures each row fixed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from reflectionflow.backends.world.mmdit import DEFAULT_GENERATOR, MMDiTCorrector, MMDiTGenerator
from reflectionflow.components import CorrectionRequest
from reflectionflow.train.corrector_pool import KEEP, default_workers, generator_samples, label_images
from reflectionflow.world.data import resolve_prompts
from reflectionflow.world.evaluate import summarize


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"  # None: no image of that kind to correct


def judge(images, metas, seeds, workers):
    return label_images(np.asarray(images), metas, seeds, workers, with_target=False)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # the stages of a run that can take an hour on a CPU


def correct(corrector, images, metas, reflections, seeds) -> tuple[np.ndarray, float, set[int]]:
    """The corrections, wall ms per image and the passes per image the corrector reported."""
    reqs = [CorrectionRequest(image=img, prompt=m["prompt"], reflection=r, seed=s)
            for img, m, r, s in zip(images, metas, reflections, seeds)]
    t = time.perf_counter()
    out = corrector.correct(reqs)
    ms = 1000 * (time.perf_counter() - t) / max(len(reqs), 1)
    images = np.stack([o.image for o in out]) if out else np.zeros((0, 64, 64, 3), np.uint8)
    return images, ms, {o.nfe for o in out}


SETTING_KEYS = {"steps": int, "guidance": float, "strength": float}


def parse_setting(text: str) -> dict:
    """'steps=12,guidance=3' -> {'steps': 12, 'guidance': 3.0}: corrector sampler options."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SETTING_KEYS:
            raise ValueError(f"corrector setting {part!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(SETTING_KEYS)}")
        try:
            out[key] = SETTING_KEYS[key](value)
        except ValueError:
            raise ValueError(f"corrector setting {part!r}: {value!r} is not a number") from None
    if out.get("steps", 1) < 1 or out.get("guidance", 1.0) <= 0 or not 0 < out.get("strength", 1.0) <= 1:
        raise ValueError(f"corrector setting {text!r}: steps >= 1, guidance > 0, strength in (0, 1]")
    return out


def evaluate_corrector(path, args, metas, images, labels, first, setting: dict | None = None) -> dict:
    opts = {"steps": args.steps, "guidance": args.guidance, **(setting or {})}
    corrector = MMDiTCorrector(weights=path, batch_size=args.batch, device=args.device, **opts)
    fails = [i for i, lab in enumerate(labels) if not lab.correct]
    passes = [i for i, lab in enumerate(labels) if lab.correct][: args.keep_max]
    res = {"corrector": str(path), "cond_attention": corrector.cond_attention, "setting": opts,
           "failed": len(fails), "passed_corrected": len(passes)}
    progress(f"{path} {opts}: {len(passes)} correct samples with \"keep\", {len(fails)} failures x "
             f"{args.rounds} rounds")
    # passed samples, "keep"
    out, ms_keep, nfe = correct(corrector, images[passes], [metas[i] for i in passes], [KEEP] * len(passes),
                           [10**6 + i for i in passes])
    kept = judge(out, [metas[i] for i in passes], passes, args.workers)
    res["broken"] = round(1 - float(np.mean([k.correct for k in kept])), 4) if passes else None
    # failed samples, re-reflected every round
    cur = images[fails]
    reflections = [labels[i].reflection for i in fails]
    fixed_any = np.zeros(len(fails), bool)
    fixed_round = {}
    res["rounds"] = []
    ms = []
    for r in range(1, args.rounds + 1):
        cur, t, round_nfe = correct(corrector, cur, [metas[i] for i in fails], reflections,
                                    [10**7 * r + i for i in fails])
        ms.append(t)
        nfe |= round_nfe
        labs = judge(cur, [metas[i] for i in fails], fails, args.workers)
        now = np.array([lab.correct for lab in labs], dtype=bool)
        fixed_any |= now
        reflections = [lab.reflection for lab in labs]
        fixed_round.update({fails[j]: r for j in np.nonzero(now)[0] if fails[j] not in fixed_round})
        if r == 1:
            res["fixed_r1"] = [fails[j] for j in np.nonzero(now)[0]]  # sample indices, for paired counts
        # GenEval-Shapes at one sample per prompt: sample k = 0, its failure replaced if fixed by round r
        rows = [{"tag": metas[i]["tag"], "correct": labels[i].correct or fixed_round.get(i, 99) <= r} for i in first]
        res["rounds"].append({"round": r, "correct_now": round(float(now.mean()), 4) if len(now) else None,
                              "fixed_by_round": round(float(fixed_any.mean()), 4) if len(now) else None,
                              "geneval_first_sample": round(summarize(rows)["overall"], 4)})
    res["ms_per_image"] = round(float(np.mean(ms + [ms_keep])), 3)
    res["nfe_per_image"] = max(nfe) if nfe else None  # as the corrector reports it (one value per setting)
    return res


def cached_samples(generator, metas_all, args):
    """generator_samples, read from / written to `--samples-cache` when given."""
    key = json.dumps({"prompts": [m["prompt"] for m in metas_all], "samples": args.samples,
                      "generator": str(args.generator), "steps": args.steps, "guidance": args.guidance})
    path = args.samples_cache
    if path and os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                raise SystemExit(f"--samples-cache {path}: made for other prompts, samples or generator; "
                                 "remove it or name another file")
            metas = [m for m in metas_all for _ in range(args.samples)]
            return metas, list(range(len(metas))), z["images"], float(z["seconds"])
    progress(f"sampling {len(metas_all) * args.samples} images from {args.generator}")
    metas, seeds, images, gen_s = generator_samples(generator, metas_all, args.samples)
    if path:
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, images=images, seconds=gen_s, key=key)
        os.replace(tmp, path)
    return metas, seeds, images, gen_s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--correctors", nargs="+", required=True,
                   help="corrector folders (lora.safetensors + corrector.json)")
    p.add_argument("--generator", default=str(DEFAULT_GENERATOR),
                   help="the generator whose samples are corrected (a corrector loads on the generator it was "
                   "trained on)")
    p.add_argument("--prompts", default="geneval-shapes", help="GenEval JSONL or a named world prompt set")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--samples", type=int, default=8, help="generator samples per prompt")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--keep-max", type=int, default=100_000, help="at most this many passed samples corrected")
    p.add_argument("--workers", type=int, default=default_workers(), help="processes judging images")
    p.add_argument("--device", default="auto")
    p.add_argument("--corrector-settings", nargs="+", default=None, metavar="KEY=VALUE,...",
                   help="evaluate every corrector at each of these sampler settings (keys: steps, guidance, "
                   "strength; unnamed keys from --steps / --guidance and the corrector's own strength)")
    p.add_argument("--samples-cache", default=None, help="an .npz that keeps the generator's samples between runs")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("samples", "rounds", "steps", "batch", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        settings = [parse_setting(t) for t in args.corrector_settings] if args.corrector_settings else [{}]
    except ValueError as e:
        p.error(str(e))

    metas_all = resolve_prompts(args.prompts)[: args.limit]
    generator = MMDiTGenerator(weights=args.generator, steps=args.steps, guidance=args.guidance,
                               batch_size=args.batch, device=args.device)
    metas, seeds, images, gen_s = cached_samples(generator, metas_all, args)
    first = list(range(0, len(metas), args.samples))
    labels = judge(images, metas, seeds, args.workers)
    base = summarize([{"tag": metas[i]["tag"], "correct": labels[i].correct} for i in first])
    results = {"prompts": len(metas_all), "samples_per_prompt": args.samples, "images": len(metas),
               "generator_seconds": round(gen_s, 2),
               "sample_accuracy": round(float(np.mean([lab.correct for lab in labels])), 4),
               "geneval_first_sample": round(base["overall"], 4), "steps": args.steps, "guidance": args.guidance,
               "correctors": [evaluate_corrector(c, args, metas, images, labels, first, st)
                              for c in args.correctors for st in settings]}
    print(f"generator: {results['images']} images, sample accuracy {results['sample_accuracy']:.3f}, "
          f"GenEval-Shapes (first sample) {results['geneval_first_sample']:.3f}")
    rounds = [r for r in (1, 2, 4) if r <= args.rounds]
    head = ["corrector", "setting", "failures"] + [f"fixed by r{r}" for r in rounds] + \
           [f"correct at r{args.rounds}", "broken (keep)", f"GenEval@1 -> r{args.rounds}", "ms/img",
            "r1 fixes: only here / only in row 1"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    ref = set(results["correctors"][0].get("fixed_r1", []))
    for c in results["correctors"]:
        rr = {x["round"]: x for x in c["rounds"]}
        mine = set(c.get("fixed_r1", []))
        setting = ",".join(f"{k}={v}" for k, v in c["setting"].items())
        cells = [f"{c['cond_attention']} {os.path.basename(str(c['corrector']).rstrip('/'))}", setting,
                 str(c["failed"])] + [fmt(rr[r]["fixed_by_round"]) for r in rounds] + \
                [fmt(rr[args.rounds]["correct_now"]), fmt(c["broken"]),
                 f"{results['geneval_first_sample']:.3f} -> {rr[args.rounds]['geneval_first_sample']:.3f}",
                 f"{c['ms_per_image']:.2f}", f"{len(mine - ref)} / {len(ref - mine)}"]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
