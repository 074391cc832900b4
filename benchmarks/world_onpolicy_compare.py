"""Shipped vs newly trained world judges and corrector, on held-out on-policy data.

    python benchmarks/world_onpolicy_compare.py --harvest H --verifier NEW_VER --reflector NEW_REFL \
        --corrector NEW_CORR --json compare.json

Everything here is validation data, never GenEval-Shapes:
- verifier: the harvest's held-out searches (the trainer's `holdout` split, the same hash), every
  candidate kind apart: accuracy, ROC AUC, calibration error (ECE), shipped against new;
- reflector: the held-out failures: exact match with the oracle's commands, and the share of
  them its reflection fixes through a corrector (the new one, one correction), beside the oracle
  reflection through the same corrector;
- corrector: the harvest's validation samples (generator samples of the validation prompts):
  failures corrected once with the oracle's reflection (share fixed), passed samples corrected
  with "keep" (share broken), shipped against new.
Each part runs only when its new model is given (`--verifier`, `--reflector`, `--corrector`);
without `--corrector` the reflections are corrected by the shipped corrector.
Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from reflectionflow.backends.world.learned import DEFAULT_REFLECTOR, DEFAULT_VERIFIER
from reflectionflow.backends.world.mmdit import DEFAULT_CORRECTOR, MMDiTCorrector
from reflectionflow.components import CorrectionRequest
from reflectionflow.models.reflector import WorldReflector
from reflectionflow.models.verifier import WorldVerifier
from reflectionflow.train.corrector_pool import KEEP, Pool, load_harvests
from reflectionflow.train.verifier import harvest_pool, held_out_scores
from reflectionflow.train.world import spread
from reflectionflow.world import spec
from reflectionflow.world.commands import parse_reflection
from reflectionflow.world.evaluate import evaluate_image


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"  # None: undefined (one class only, or nothing to correct)


def correct(corrector: MMDiTCorrector, images, prompts, reflections, seed0: int) -> np.ndarray:
    out = []
    for i in range(0, len(images), 1024):
        reqs = [CorrectionRequest(image=images[j], prompt=prompts[j], reflection=reflections[j], seed=seed0 + j)
                for j in range(i, min(i + 1024, len(images)))]
        out += [np.asarray(r.image) for r in corrector.correct(reqs)]
    return np.stack(out) if out else np.zeros((0, 64, 64, 3), np.uint8)


def share_correct(images, prompts) -> float:
    return float(np.mean([evaluate_image(im, spec.parse_prompt(p)).correct for im, p in zip(images, prompts)]))


def reflections_of(model: WorldReflector, images, prompts) -> list[str]:
    out = []
    for i in range(0, len(images), 512):
        out += model.reflect(torch.from_numpy(np.ascontiguousarray(images[i : i + 512])), prompts[i : i + 512])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harvest", required=True, nargs="+", help="harvest folders (as given to the trainers)")
    ap.add_argument("--holdout", type=float, default=0.1, help="the trainers' --holdout (default 0.1)")
    ap.add_argument("--verifier", help="the new verifier folder")
    ap.add_argument("--reflector", help="the new reflector folder")
    ap.add_argument("--corrector", help="the new corrector folder (default: the reflections go through the "
                    "shipped one, and the correctors are not compared)")
    ap.add_argument("--max", type=int, default=1024, help="samples per set (default 1024)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if not (args.verifier or args.reflector or args.corrector):
        ap.error("nothing to compare: give --verifier, --reflector and/or --corrector")
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    _, held = harvest_pool(args.harvest, args.holdout)
    res: dict = {"held_out_candidates": len(held["labels"])}
    print(f"held-out candidates: {res['held_out_candidates']}")
    if args.verifier:
        for name, folder in (("shipped", DEFAULT_VERIFIER), ("new", args.verifier)):
            model = WorldVerifier.from_pretrained(folder, device=dev)
            res[f"verifier_{name}"] = held_out_scores(model, held, model.config.temperature)
        print("| verifier | kind | n | yes share | AUC | ECE |\n|---|---|---|---|---|---|")
        for name in ("shipped", "new"):
            s = res[f"verifier_{name}"]
            print(f"| {name} | all | {s['n']} | - | {fmt(s['auc'])} | {fmt(s['ece'])} |")
            for k, v in s["kinds"].items():
                print(f"| {name} | {k} | {v['n']} | {v['yes_share']:.3f} | {fmt(v['auc'])} | {fmt(v['ece'])} |")
    corr = MMDiTCorrector(weights=args.corrector or DEFAULT_CORRECTOR, device=dev) \
        if args.reflector or args.corrector else None
    if args.reflector:  # the held-out failures
        fails = [int(i) for i in spread(list(np.nonzero(held["labels"] < 0.5)[0]), args.max)]
        f_images = held["images"][fails]
        f_prompts = [held["prompts"][i] for i in fails]
        oracle = [held["reflections"][i] for i in fails]
        fixed_oracle = share_correct(correct(corr, f_images, f_prompts, oracle, 7_000_000), f_prompts)
        res["reflector_corrector"] = str(args.corrector or DEFAULT_CORRECTOR)
        res["reflector_oracle_fix"] = fixed_oracle
        for name, folder in (("shipped", DEFAULT_REFLECTOR), ("new", args.reflector)):
            model = WorldReflector.from_pretrained(folder, device=dev)
            got = reflections_of(model, f_images, f_prompts)
            exact = float(np.mean([parse_reflection(g)[0] == parse_reflection(t)[0] for g, t in zip(got, oracle)]))
            fixed = share_correct(correct(corr, f_images, f_prompts, got, 7_000_000), f_prompts)
            res[f"reflector_{name}"] = {"n": len(fails), "exact_match": exact, "fixed": fixed,
                                        "fix_ratio_to_oracle": fixed / fixed_oracle if fixed_oracle else None,
                                        "max_commands": max((len(g.splitlines()) for g in got), default=0)}
        print("| reflector | n | exact match | fixed (corrector) | ratio to oracle | max commands |\n"
              "|---|---|---|---|---|---|")
        for name in ("shipped", "new"):
            s = res[f"reflector_{name}"]
            print(f"| {name} | {s['n']} | {s['exact_match']:.3f} | {s['fixed']:.3f} | "
                  f"{fmt(s['fix_ratio_to_oracle'])} | {s['max_commands']} |")
        print(f"| oracle | {len(fails)} | 1.000 | {fixed_oracle:.3f} | 1.000 | - |")
    if args.corrector:  # the harvest's validation samples
        pool: Pool = load_harvests(args.harvest)
        val = pool.val
        vf = spread([i for i, r in enumerate(val) if not r["correct"]], args.max)
        vp = spread([i for i, r in enumerate(val) if r["correct"]], args.max)
        for name, folder in (("shipped", DEFAULT_CORRECTOR), ("new", args.corrector)):
            c = corr if name == "new" else MMDiTCorrector(weights=folder, device=dev)
            row = {"failed": len(vf), "passed": len(vp)}
            if vf:
                ims = np.asarray(pool.val_images[vf])
                ps = [val[i]["prompt"] for i in vf]
                row["fixed"] = share_correct(correct(c, ims, ps, [val[i]["reflection"] for i in vf], 9_000_000), ps)
            if vp:
                ims = np.asarray(pool.val_images[vp])
                ps = [val[i]["prompt"] for i in vp]
                row["broken_by_keep"] = 1 - share_correct(correct(c, ims, ps, [KEEP] * len(vp), 9_500_000), ps)
            res[f"corrector_{name}"] = row
        print("| corrector | failed | fixed (oracle reflection) | passed | broken by keep |\n|---|---|---|---|---|")
        for name in ("shipped", "new"):
            s = res[f"corrector_{name}"]
            print(f"| {name} | {s['failed']} | {fmt(s.get('fixed'))} | {s['passed']} | "
                  f"{fmt(s.get('broken_by_keep'))} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
