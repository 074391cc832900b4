"""How often each world corrector fixes one planted flaw in a clean render (CPU: about 4 minutes).

    python benchmarks/corrector_renders.py
    python benchmarks/corrector_renders.py --correctors world-mmdit world-mmdit-partial --seeds 32

A complement to benchmarks/world_levers.py, whose failures are the generator's own: here each case
is a prompt, a flaw planted in its rendered scene (world/flaws.py) and the oracle's reflection on
it. Every corrector makes one correction per seed with its defaults (the partial-start ones from
the previous image half noised), and the evaluator says whether the result is right. Prints a table
last: fixed out of --seeds per case and corrector.
"""

from __future__ import annotations

import argparse
import random

CASES = [("a photo of a red square and a blue circle", "color"), ("a photo of three circles", "missing")]
CORRECTORS = ["world-mmdit", "world-mmdit-kv", "world-mmdit-partial", "world-mmdit-kv-partial"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--correctors", nargs="+", default=CORRECTORS, help="registered corrector names")
    ap.add_argument("--seeds", type=int, default=16, help="renders per case")
    ap.add_argument("--device", default=None, help="the MMDiT correctors' device (default: theirs, auto)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")

    from reflectionflow.components import CorrectionRequest, build, names
    from reflectionflow.train.corrector_pool import label_one
    from reflectionflow.world.flaws import plant_flaw
    from reflectionflow.world.render import render, sample_scene
    from reflectionflow.world.spec import parse_prompt

    unknown = sorted(set(args.correctors) - set(names("corrector")))
    if unknown:
        ap.error(f"unknown corrector(s) {', '.join(unknown)}; registered: {', '.join(names('corrector'))}")
    cases = []
    for prompt, flaw in CASES:
        meta = parse_prompt(prompt)
        reqs = []
        for k in range(args.seeds):
            rng = random.Random(k)
            bad = render(plant_flaw(meta, sample_scene(meta, rng), flaw, rng))
            reqs.append(CorrectionRequest(bad, prompt, label_one(bad, meta, k, with_target=False).reflection, seed=k))
        cases.append((prompt, flaw, meta, reqs))
    fixed: dict = {}
    for name in args.correctors:
        corrector = build("corrector", name, **({"device": args.device} if args.device else {}))
        for prompt, flaw, meta, reqs in cases:
            outs = corrector.correct(reqs)
            fixed[(name, prompt, flaw)] = sum(label_one(o.image, meta, 0, with_target=False).correct for o in outs)

    print(f"\n# One correction of a planted flaw in a render, fixed of {args.seeds} seeds")
    print("| prompt | flaw | " + " | ".join(args.correctors) + " |")
    print("|---|---" + "|---" * len(args.correctors) + "|")
    for prompt, flaw, _, _ in cases:
        print(f"| {prompt} | {flaw} | " + " | ".join(str(fixed[(n, prompt, flaw)]) for n in args.correctors) + " |")
    return fixed


if __name__ == "__main__":
    main()
