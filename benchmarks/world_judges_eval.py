"""How good the world's learned verifier and reflector are, on the generator's own samples.

    python benchmarks/world_judges_eval.py --samples 8 --workers 15 --out judges_eval.json

1. The trained generator draws `--samples` images per GenEval-Shapes prompt (seed = prompt index x
   samples + k, as benchmarks/world_corrector_eval.py); the exact evaluator labels them and the
   oracle reflector writes its commands. None of these seeds is a training seed (those are >= 2**40).
2. Verifier (image + prompt -> P(yes); it never sees the evaluator or the category tag):
   accuracy at its threshold, ROC AUC, and on the prompts where at least one of the samples is
   correct, how often its top-1 is correct (beside a random pick's expected rate and the first sample's).
   The same on held-out renders with planted flaws (validation prompts, small seeds).
3. Reflector (image + prompt -> edit commands), on the generator's failed samples:
   - exact match: its commands parse to exactly the oracle's;
   - fix rate: the share of failures correct after its reflection is applied by the oracle corrector
     (the scene edit `world-edit` with no dropped commands and no new flaws), beside the oracle
     reflector's own rate (below 1 where the oracle's minimal edit is not enough, e.g. a relation it
     cannot place), and after one correction by the trained corrector with each reflection;
   - on passed samples: the share it leaves alone ("keep").
Prints a table and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from reflectionflow.backends.world.learned import DEFAULT_REFLECTOR, DEFAULT_VERIFIER, LearnedReflector, LearnedVerifier
from reflectionflow.backends.world.mmdit import DEFAULT_GENERATOR, MMDiTCorrector, MMDiTGenerator
from reflectionflow.backends.world.simulated import EditCorrector
from reflectionflow.components import CorrectionRequest, ReflectionRequest
from reflectionflow.train.corrector_pool import KEEP, default_workers, generator_samples, label_images
from reflectionflow.train.verifier import labelled_renders, roc_auc
from reflectionflow.train.world import load_prompt_file
from reflectionflow.world.commands import parse_reflection
from reflectionflow.world.data import resolve_prompts


def verifier_scores(verifier, images, prompts) -> np.ndarray:
    return np.array([v.score for v in verifier.score(list(images), list(prompts))])


def verifier_report(p: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    return {"n": int(len(p)), "yes_share": round(float(labels.mean()), 4),
            "accuracy": round(float(((p > threshold) == labels).mean()), 4),
            "auc": None if (a := roc_auc(p, labels)) is None else round(a, 4),
            "precision": round(float(labels[p > threshold].mean()), 4) if (p > threshold).any() else None,
            "recall": round(float((p[labels] > threshold).mean()), 4) if labels.any() else None}


def top1(p: np.ndarray, labels: np.ndarray, k: int) -> dict:
    p, labels = p.reshape(-1, k), labels.reshape(-1, k)
    some = labels.any(1)
    pick = labels[np.arange(len(p)), p.argmax(1)]
    return {"prompts_with_a_correct_sample": int(some.sum()), "prompts": int(len(p)),
            "top1_correct_given_one": round(float(pick[some].mean()), 4),
            "random_pick_given_one": round(float(labels[some].mean()), 4),
            "first_sample_given_one": round(float(labels[some, 0].mean()), 4)}


def same_commands(a: str, b: str) -> bool:
    return parse_reflection(a)[0] == parse_reflection(b)[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", default=str(DEFAULT_VERIFIER), help="learned verifier folder")
    p.add_argument("--reflector", default=str(DEFAULT_REFLECTOR), help="learned reflector folder")
    p.add_argument("--generator", default=str(DEFAULT_GENERATOR),
                   help="the generator whose samples are corrected (a corrector loads on the generator it was "
                   "trained on)")
    p.add_argument("--corrector", default="weights/world-corrector", help="trained corrector folder ('' to skip)")
    p.add_argument("--prompts", default="geneval-shapes", help="GenEval JSONL or a named world prompt set")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--samples", type=int, default=8, help="generator samples per prompt")
    p.add_argument("--renders", type=int, default=2048, help="held-out planted-flaw renders (0: none)")
    p.add_argument("--steps", type=int, default=20, help="generator and corrector Euler steps")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--workers", type=int, default=default_workers(), help="processes judging images")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("samples", "batch", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")

    metas_all = resolve_prompts(args.prompts)[: args.limit]
    t0 = time.perf_counter()
    generator = MMDiTGenerator(weights=args.generator, steps=args.steps, batch_size=args.batch, device=args.device)
    metas, seeds, images, _ = generator_samples(generator, metas_all, args.samples)
    prompts = [m["prompt"] for m in metas]
    labels = label_images(images, metas, seeds, args.workers, with_target=False)
    correct = np.array([lab.correct for lab in labels])
    res: dict = {"prompts": len(metas_all), "samples_per_prompt": args.samples, "images": len(metas),
                 "sample_accuracy": round(float(correct.mean()), 4)}

    # ---- verifier
    verifier = LearnedVerifier(weights=args.verifier, batch_size=args.batch, device=args.device)
    t = time.perf_counter()
    pv = verifier_scores(verifier, images, prompts)
    res["verifier_ms_per_image"] = round(1000 * (time.perf_counter() - t) / len(pv), 4)
    th = verifier.opt.threshold
    res["verifier_generator_samples"] = {**verifier_report(pv, correct, th), **top1(pv, correct, args.samples)}
    if args.renders:
        vmetas = load_prompt_file("geneval_shapes_val.jsonl")
        vmetas = (vmetas * (args.renders // len(vmetas) + 1))[: args.renders]
        rimg, rlab = labelled_renders(vmetas, list(range(len(vmetas))), 0.6)
        pr = verifier_scores(verifier, rimg, [m["prompt"] for m in vmetas])
        res["verifier_flawed_renders"] = verifier_report(pr, rlab.astype(bool), th)

    # ---- reflector
    reflector = LearnedReflector(weights=args.reflector, batch_size=args.batch, device=args.device)
    fails = np.nonzero(~correct)[0]
    passes = np.nonzero(correct)[0][: max(len(fails), 1)]
    t = time.perf_counter()
    learned = [r.text for r in reflector.reflect([ReflectionRequest(image=images[i], original_prompt=prompts[i],
                                                                    current_prompt=prompts[i]) for i in fails])]
    res["reflector_ms_per_image"] = round(1000 * (time.perf_counter() - t) / max(len(fails), 1), 4)
    oracle = [labels[i].reflection for i in fails]
    kept = [r.text for r in reflector.reflect([ReflectionRequest(image=images[i], original_prompt=prompts[i],
                                                                 current_prompt=prompts[i]) for i in passes])]
    res["reflector"] = {"failures": int(len(fails)),
                        "exact_match": round(float(np.mean([same_commands(a, b) for a, b in zip(learned, oracle)])), 4),
                        "parsed_share": round(float(np.mean([not parse_reflection(a)[1] for a in learned])), 4),
                        "keep_on_passed": (round(float(np.mean([same_commands(k, KEEP) for k in kept])), 4)
                                           if kept else None)}
    fmetas = [metas[i] for i in fails]

    def fix_rate(corrector, reflections) -> float:
        reqs = [CorrectionRequest(image=images[i], prompt=prompts[i], reflection=r, seed=10**7 + int(i))
                for i, r in zip(fails, reflections)]
        out = np.stack([o.image for o in corrector.correct(reqs)])
        return round(float(np.mean([lab.correct for lab in label_images(out, fmetas, list(fails), args.workers,
                                                                      with_target=False)])), 4)

    exact = EditCorrector(p_fail=0.0, p_new_flaw=0.0)
    res["reflector"]["fix_oracle_corrector"] = {"learned": fix_rate(exact, learned), "oracle": fix_rate(exact, oracle)}
    if args.corrector:
        trained = MMDiTCorrector(weights=args.corrector, steps=args.steps,
                                 batch_size=args.batch,
                                 device=args.device)
        res["reflector"]["fix_trained_corrector"] = {"learned": fix_rate(trained, learned),
                                                     "oracle": fix_rate(trained, oracle)}
    res["minutes"] = round((time.perf_counter() - t0) / 60, 2)

    v, r = res["verifier_generator_samples"], res["reflector"]
    print(f"generator: {res['images']} images, {res['sample_accuracy']:.3f} correct")
    print("| verifier on | n | yes share | accuracy | ROC AUC | top-1 of k correct (given one) | random pick | first |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| generator samples | {v['n']} | {v['yes_share']} | {v['accuracy']} | {v['auc']} | "
          f"{v['top1_correct_given_one']} | {v['random_pick_given_one']} | {v['first_sample_given_one']} |")
    if "verifier_flawed_renders" in res:
        w = res["verifier_flawed_renders"]
        print(f"| flawed renders | {w['n']} | {w['yes_share']} | {w['accuracy']} | {w['auc']} | - | - | - |")
    fo, ft = r["fix_oracle_corrector"], r.get("fix_trained_corrector", {})
    print("| reflector on failures | n | exact match | keep on passed | fix, oracle corrector (learned / oracle "
          "reflection) | fix, trained corrector (learned / oracle) |")
    print("|---|---|---|---|---|---|")
    print(f"| generator samples | {r['failures']} | {r['exact_match']} | {r['keep_on_passed']} | "
          f"{fo['learned']} / {fo['oracle']} | {ft.get('learned', '-')} / {ft.get('oracle', '-')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
