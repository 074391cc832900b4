"""A world generator's GenEval-Shapes profile at one sample, beside FLUX.1-dev's on GenEval.

    # per-category accuracy of generators at one sample, template vs explicit (rule-refined) prompts,
    # and the share of prompts that fail on at least 5 of 8 seeds
    python benchmarks/world_generator_profile.py profile --generators v2=weights/world-generator \
        v1=weights/world-generator-v1 --prompts geneval-shapes --samples 8 --json profile.json

    # choose among a training run's snapshots (train world-generator --snapshots) on the validation set:
    # the snapshot whose profile is closest to FLUX.1-dev's among those with overall in [0.60, 0.72]
    python benchmarks/world_generator_profile.py choose --snapshots RUN/snapshots --json choice.json

    python benchmarks/world_generator_profile.py profile --tiny        # CPU smoke run (random tiny model)

Protocol: sample k of prompt i has noise seed i for k = 0 (the model card's one-sample protocol) and
1_000_003 x k + i after; 20 Euler steps, CFG 3. "Explicit" prompts are the rule refiner's rewrite of
each prompt with no reflection (`backends.world.refine.RuleRefiner`); every image is judged by the
exact evaluator against the ORIGINAL prompt. Overall = mean of the six category accuracies.
Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# FLUX.1-dev on GenEval at one sample (the ReflectionFlow paper's table).
FLUX = {"overall": 0.67, "single_object": 0.99, "two_object": 0.81, "counting": 0.75, "colors": 0.80,
        "position": 0.21, "color_attr": 0.48}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RANGE = (0.60, 0.72)


def seeds_for(n: int, k: int) -> list[int]:
    return [i if k == 0 else 1_000_003 * k + i for i in range(n)]


def load_prompts(name: str) -> list[dict]:
    from reflectionflow.train.world import load_prompt_file
    from reflectionflow.world.spec import load_metadata_file

    files = {"geneval-shapes": "geneval_shapes.jsonl", "val": "geneval_shapes_val.jsonl"}
    return load_prompt_file(files[name]) if name in files else load_metadata_file(name)


def explicit_prompts(metas: list[dict]) -> list[str]:
    from reflectionflow.backends.world.refine import RuleRefiner
    from reflectionflow.components import RefineRequest

    out = RuleRefiner().refine([RefineRequest(m["prompt"], m["prompt"]) for m in metas])
    return [r.text for r in out]


def correct_matrix(model, metas: list[dict], prompts: list[str], samples: int, batch: int) -> np.ndarray:
    """(samples, prompts) bool: is sample k of prompt i correct for the ORIGINAL prompt?"""
    from reflectionflow.train.world import generate_images
    from reflectionflow.world.evaluate import evaluate_image

    out = np.zeros((samples, len(metas)), dtype=bool)
    for k in range(samples):
        images, _ = generate_images(model, prompts, seeds_for(len(metas), k), batch_size=batch)
        out[k] = [evaluate_image(img, m).correct for img, m in zip(images, metas)]
    return out


def summary(correct: np.ndarray, metas: list[dict]) -> dict:
    """Per-category accuracy of sample 0, the mean over samples, and the hard share."""
    tags = np.array([m["tag"] for m in metas])
    one = {t: float(correct[0, tags == t].mean()) for t in TAGS if (tags == t).any()}
    mean = {t: float(correct[:, tags == t].mean()) for t in TAGS if (tags == t).any()}
    fails = (~correct).sum(0)
    res = {"one_sample": {"overall": float(np.mean(list(one.values()))), **one},
           "mean_of_samples": {"overall": float(np.mean(list(mean.values()))), **mean},
           "samples": int(correct.shape[0])}
    if correct.shape[0] >= 8:
        hard = fails[None, :] >= 5
        res["fail_5_of_8"] = {"overall": float(hard.mean()),
                              **{t: float(hard[0, tags == t].mean()) for t in TAGS if (tags == t).any()}}
    return res


def flux_distance(profile: dict) -> float:
    return float(sum(abs(profile[t] - FLUX[t]) for t in TAGS))


def build_model(folder: str | None, tiny: bool):
    import torch

    from reflectionflow.models.mmdit import SIZES, MMDiT

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if tiny:
        torch.manual_seed(0)
        return MMDiT(SIZES["tiny"]()).to(dev).eval()
    return MMDiT.from_pretrained(folder, device=dev).eval()


def cmd_profile(args) -> dict:
    metas = load_prompts(args.prompts)
    if args.limit:
        metas = metas[:: max(1, len(metas) // args.limit)][: args.limit]
    explicit = explicit_prompts(metas)
    gens = dict(g.split("=", 1) for g in args.generators) if not args.tiny else {"tiny": None}
    out = {"prompts": args.prompts, "n_prompts": len(metas), "samples": args.samples, "flux": FLUX, "generators": {}}
    for name, folder in gens.items():
        t0 = time.perf_counter()
        model = build_model(folder, args.tiny)
        tpl = correct_matrix(model, metas, [m["prompt"] for m in metas], args.samples, args.batch)
        exp = correct_matrix(model, metas, explicit, args.samples, args.batch)
        out["generators"][name] = {"folder": folder, "template": summary(tpl, metas),
                                   "explicit": summary(exp, metas), "seconds": round(time.perf_counter() - t0, 1)}
    out["examples"] = {m["prompt"]: e for m, e in list(zip(metas, explicit))[:: max(1, len(metas) // 6)]}
    return out


def cmd_choose(args) -> dict:
    metas = load_prompts(args.prompts)
    if args.limit:
        metas = metas[:: max(1, len(metas) // args.limit)][: args.limit]
    folders = [Path(args.snapshots)] if args.tiny else sorted(p for p in Path(args.snapshots).iterdir()
                                                                if (p / "model.safetensors").is_file())
    rows = []
    for folder in folders:
        model = build_model(str(folder), args.tiny)
        s = summary(correct_matrix(model, metas, [m["prompt"] for m in metas], args.samples, args.batch), metas)
        prof = s["mean_of_samples"]
        rows.append({"snapshot": folder.name, "profile": prof, "flux_distance": flux_distance(prof),
                     "in_range": RANGE[0] <= prof["overall"] <= RANGE[1]})
    fitting = [r for r in rows if r["in_range"]]
    # none in range: the one whose overall is nearest to it (flagged by in_range false)
    gap = [max(RANGE[0] - r["profile"]["overall"], r["profile"]["overall"] - RANGE[1], 0.0) for r in rows]
    chosen = min(fitting, key=lambda r: r["flux_distance"]) if fitting else (
        rows[int(np.argmin(gap))] if rows else None)
    return {"prompts": args.prompts, "n_prompts": len(metas), "samples": args.samples, "range": RANGE,
            "rows": rows, "chosen": chosen and chosen["snapshot"]}


def table(res: dict, mode: str) -> str:
    head = "| {:<26} | overall | single | two | count | colors | position | attr |".format("")
    lines = [head, "|" + "---|" * 8]

    def row(name, p):
        return "| {:<26} | {:.3f} | {} |".format(name, p["overall"], " | ".join(f"{p.get(t, float('nan')):.2f}"
                                                                                for t in TAGS))
    lines.append(row("FLUX.1-dev (GenEval)", FLUX))
    if mode == "choose":
        for r in res["rows"]:
            lines.append(row(r["snapshot"] + (" *" if r["snapshot"] == res["chosen"] else ""), r["profile"]))
        lines.append(f"chosen: {res['chosen']}")
    else:
        for name, g in res["generators"].items():
            for kind in ("template", "explicit"):
                lines.append(row(f"{name} {kind} @1", g[kind]["one_sample"]))
                if "fail_5_of_8" in g[kind]:
                    lines.append(row(f"{name} {kind} fail>=5/8", g[kind]["fail_5_of_8"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("profile", "choose"))
    ap.add_argument("--generators", nargs="*", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--snapshots", default=None, help="choose: a folder of snapshot folders")
    ap.add_argument("--prompts", default=None, help="geneval-shapes | val | FILE (default: profile geneval-shapes, "
                    "choose val)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt (default: profile 8, choose 2)")
    ap.add_argument("--limit", type=int, default=None, help="prompts spread over the file")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a random tiny model")
    args = ap.parse_args(argv)
    args.prompts = args.prompts or ("val" if args.mode == "choose" else "geneval-shapes")
    args.samples = args.samples or (2 if args.mode == "choose" else 8)
    if args.tiny:
        args.limit, args.samples, args.batch = args.limit or 12, min(args.samples, 8), 64
    if args.mode == "profile" and not args.generators and not args.tiny:
        ap.error("profile needs --generators NAME=FOLDER ...")
    if args.mode == "choose" and not args.snapshots and not args.tiny:
        ap.error("choose needs --snapshots DIR")
    res = cmd_profile(args) if args.mode == "profile" else cmd_choose(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(table(res, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
