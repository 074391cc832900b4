"""Two world reflectors on the generator's own failures of the validation prompts (never GenEval-Shapes).

    python benchmarks/world_reflector_compare.py --new RUN/reflector [--prompts 250] [--json out.json]

The shipped generator samples `--prompts` validation prompts (spread over the categories, seed =
2**40 + index: never a benchmark or engine seed); each failure, by the exact evaluator, is
reflected on by the shipped reflector, the new one and the oracle, and corrected once by the
shipped corrector with each reflection (the same seed for all three). Reports each reflector's exact
match with the oracle's commands, the share of failures its reflection fixes, and that share over
the oracle's (the "ratio to oracle" of the on-policy judges' goals). It also reports how often
each says "keep" (no change): on the failures (the engine then resamples instead of correcting,
`--on-keep resample`) and on the correct samples (where anything else sends a correct image to the
corrector). Runs on a CPU in about ten minutes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from reflectionflow.backends.world.learned import DEFAULT_REFLECTOR, LearnedReflector
from reflectionflow.backends.world.mmdit import MMDiTCorrector, MMDiTGenerator
from reflectionflow.backends.world.oracle import OracleReflector
from reflectionflow.components import CorrectionRequest, GenerationRequest, ReflectionRequest
from reflectionflow.engine.executor import is_keep
from reflectionflow.world.commands import parse_reflection
from reflectionflow.world.data import load_prompt_file, spread
from reflectionflow.world.evaluate import evaluate_image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", required=True, help="the new reflector folder")
    ap.add_argument("--prompts", type=int, default=250, help="validation prompts sampled (default 250)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    metas = spread(load_prompt_file("geneval_shapes_val.jsonl"), args.prompts)
    gen = MMDiTGenerator(device=args.device)
    images = [r.image for r in gen.generate([GenerationRequest(prompt=m["prompt"], seed=2**40 + i)
                                             for i, m in enumerate(metas)])]
    fails = [i for i, (im, m) in enumerate(zip(images, metas)) if not evaluate_image(im, m).correct]
    passes = [i for i in range(len(metas)) if i not in set(fails)]

    def requests(idx):
        return [ReflectionRequest(image=images[i], original_prompt=metas[i]["prompt"],
                                  current_prompt=metas[i]["prompt"]) for i in idx]

    texts = {"oracle": [r.text for r in OracleReflector().reflect(requests(fails))]}
    keep_on_passes = {}
    for name, folder in (("shipped", DEFAULT_REFLECTOR), ("new", args.new)):
        model = LearnedReflector(weights=str(folder), device=args.device)
        texts[name] = [r.text for r in model.reflect(requests(fails))]
        keep_on_passes[name] = float(np.mean([is_keep(r.text) for r in model.reflect(requests(passes))]))
    corrector = MMDiTCorrector(device=args.device)
    res = {"prompts": len(metas), "failures": len(fails)}
    for name, refl in texts.items():
        out = corrector.correct([CorrectionRequest(image=images[i], prompt=metas[i]["prompt"], reflection=t,
                                                   seed=2**41 + i) for i, t in zip(fails, refl)])
        fixed = float(np.mean([evaluate_image(o.image, metas[i]).correct for o, i in zip(out, fails)]))
        exact = float(np.mean([parse_reflection(a)[0] == parse_reflection(b)[0]
                               for a, b in zip(refl, texts["oracle"])]))
        res[name] = {"exact_match": exact, "fixed": fixed,
                     "keep_on_failures": float(np.mean([is_keep(t) for t in refl])),
                     "keep_on_passes": keep_on_passes.get(name, 1.0),
                     "max_commands": max((len(t.splitlines()) for t in refl), default=0)}
    for name in ("shipped", "new"):
        res[name]["ratio_to_oracle"] = res[name]["fixed"] / res["oracle"]["fixed"] if res["oracle"]["fixed"] else None
    print(f"{res['failures']} failures of {res['prompts']} validation samples")
    print("| reflector | exact match | fixed (shipped corrector) | ratio to oracle | keep on failures | keep on passes "
          "| longest |\n|---|---|---|---|---|---|---|")
    for name in ("shipped", "new", "oracle"):
        r = res[name]
        ratio = "-" if r.get("ratio_to_oracle") is None else f"{r['ratio_to_oracle']:.3f}"
        print(f"| {name} | {r['exact_match']:.3f} | {r['fixed']:.3f} | {ratio} | {r['keep_on_failures']:.3f} | "
              f"{r['keep_on_passes']:.3f} | {r['max_commands']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
