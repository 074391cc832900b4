"""The learned world judges and corrector, measured on the search's own candidates.

    python benchmarks/world_onpolicy_eval.py --runs RUN [RUN ...] --noise-run NOISE_RUN --json eval.json

RUN folders are `reflectionflow generate` / `sweep` run folders made with the learned verifier
(any prompt set of world prompts). Every candidate in their traces is judged by the exact
evaluator; with the verifier's score from the trace that gives, per candidate kind (noise,
refined, corrected): ROC AUC, expected calibration error of P(yes), yes share.

From NOISE_RUN (a noise run), the first sample of every prompt that the evaluator fails is given
to the reflectors (the learned one and the oracle) and corrected once by the corrector (the
defaults, or --corrector); the table gives the share fixed with each reflection, the learned
reflector's exact match with the oracle, and the corrector's share of correct first samples broken
by a "keep" correction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from reflectionflow.backends.world.learned import LearnedReflector
from reflectionflow.backends.world.mmdit import MMDiTCorrector
from reflectionflow.backends.world.oracle import OracleReflector
from reflectionflow.components import ReflectionRequest
from reflectionflow.data.harvest import KIND_NAMES
from reflectionflow.io import load_png
from reflectionflow.runs import RunFolder
from reflectionflow.train.corrector_pool import KEEP, label_images
from reflectionflow.train.verifier import scores_by_kind
from reflectionflow.world.commands import parse_reflection
from reflectionflow.world.evaluate import evaluate_image
from world_onpolicy_compare import correct  # benchmarks/: one correction per image, batched


def read_run(folder: Path) -> tuple[list[dict], list[dict], np.ndarray]:
    """(metas per prompt, candidate rows, images) of a run folder."""
    run = RunFolder(folder)
    metas, rows, images = [], [], []
    for i in run.prompt_indices():
        metas.append(json.loads((run.prompt_dir(i) / "metadata.jsonl").read_text().splitlines()[0]))
        for rec in run.load_trace(i):
            rows.append({"prompt": len(metas) - 1, "kind": KIND_NAMES.get(rec["kind"], rec["kind"]),
                         "score": rec["score"], "seed": rec["seed"], "order": rec["order"]})
            images.append(load_png(run.image_path(i, rec["file"])))
    return metas, rows, np.stack(images)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="run folders made with the learned verifier")
    ap.add_argument("--noise-run", required=True, help="a noise run folder: its first samples are reflected on")
    ap.add_argument("--corrector", default=None, help="a corrector folder (default: the shipped world-mmdit)")
    ap.add_argument("--workers", type=int, default=8, help="labelling processes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    scores, labels, kinds = [], [], []
    for run in args.runs:
        metas, rows, images = read_run(Path(run))
        labs = label_images(images, [metas[r["prompt"]] for r in rows], [r["seed"] for r in rows], args.workers,
                            with_target=False)
        scores += [r["score"] for r in rows]
        labels += [lab.correct for lab in labs]
        kinds += [r["kind"] for r in rows]
    res: dict = {"verifier": scores_by_kind(np.array(scores, dtype=np.float64), np.array(labels), kinds)}
    # Reflector and corrector on the noise run's first samples
    metas, rows, images = read_run(Path(args.noise_run))
    first = {}
    for i, r in enumerate(rows):
        if r["prompt"] not in first or r["order"] < rows[first[r["prompt"]]]["order"]:
            first[r["prompt"]] = i
    idx = [first[k] for k in sorted(first)]
    ims = images[idx]
    prompts = [metas[rows[i]["prompt"]]["prompt"] for i in idx]
    ok = np.array([evaluate_image(im, metas[rows[i]["prompt"]]).correct for im, i in zip(ims, idx)])
    f_ims, f_prompts = ims[~ok], [p for p, o in zip(prompts, ok) if not o]
    reqs = [ReflectionRequest(image=im, original_prompt=p, current_prompt=p) for im, p in zip(f_ims, f_prompts)]
    learned = [r.text for r in LearnedReflector(device=dev).reflect(reqs)]
    oracle = [r.text for r in OracleReflector().reflect(reqs)]
    corrector = MMDiTCorrector(**({"weights": args.corrector} if args.corrector else {}), device=dev)

    def fixed(refl) -> float:
        out = correct(corrector, f_ims, f_prompts, refl, 5_000_000)
        return float(np.mean([evaluate_image(o, m).correct for o, m in
                              zip(out, [metas[rows[i]["prompt"]] for i, g in zip(idx, ok) if not g])]))

    fo, fl = fixed(oracle), fixed(learned)
    exact = float(np.mean([parse_reflection(a)[0] == parse_reflection(b)[0] for a, b in zip(learned, oracle)]))
    p_ims, p_prompts = ims[ok], [p for p, o in zip(prompts, ok) if o]
    kept = correct(corrector, p_ims, p_prompts, [KEEP] * len(p_ims), 6_000_000)
    p_metas = [metas[rows[i]["prompt"]] for i, g in zip(idx, ok) if g]
    broken = 1 - float(np.mean([evaluate_image(o, m).correct for o, m in zip(kept, p_metas)])) if len(p_ims) else None
    res["reflector"] = {"failures": int((~ok).sum()), "exact_match": exact, "fixed_learned": fl, "fixed_oracle": fo,
                        "ratio": fl / fo if fo else None,
                        "max_commands": max((len(t.splitlines()) for t in learned), default=0)}
    res["corrector"] = {"passed": int(ok.sum()), "broken_by_keep": broken, "fixed_with_oracle": fo}
    print("| candidates | n | yes share | ROC AUC | ECE |\n|---|---|---|---|---|")
    v = res["verifier"]
    for kind, row in [*v["kinds"].items(), ("all", {**v, "yes_share": float(np.mean(labels))})]:
        auc = "-" if row["auc"] is None else f"{row['auc']:.3f}"
        print(f"| {kind} | {row['n']} | {row['yes_share']:.3f} | {auc} | {row['ece']:.3f} |")
    r = res["reflector"]
    print(f"\nfirst-sample failures {r['failures']}: fixed in one correction with the learned reflection {fl:.3f}, "
          f"with the oracle's {fo:.3f} (ratio {r['ratio'] or 0:.3f}); exact match {exact:.3f}; "
          f"longest reflection {r['max_commands']} commands")
    shown = broken if broken is None else round(broken, 3)
    print(f"correct first samples {int(ok.sum())}: broken by a keep correction {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
