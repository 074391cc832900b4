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
from reflectionflow.io import load_png
from reflectionflow.train.corrector_pool import KEEP, label_images
from reflectionflow.train.verifier import calibration_error, roc_auc
from reflectionflow.world.commands import parse_reflection
from reflectionflow.world.evaluate import evaluate_image
from world_onpolicy_compare import correct  # benchmarks/: one correction per image, batched

KIND = {"noise": "noise", "neighbour": "noise", "prompt": "refined", "correct": "corrected"}


def read_run(folder: Path) -> tuple[list[dict], list[dict], np.ndarray]:
    """(metas per prompt, candidate rows, images) of a run folder."""
    metas, rows, images = [], [], []
    for pdir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = json.loads((pdir / "metadata.jsonl").read_text().splitlines()[0])
        k = len(metas)
        metas.append(meta)
        for line in (pdir / "trace.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            rows.append({"prompt": k, "kind": KIND.get(rec["kind"], rec["kind"]), "score": rec["score"],
                         "seed": rec["seed"], "order": rec["order"]})
            images.append(load_png(pdir / rec["file"]))
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
    res: dict = {"verifier": {}}
    pooled: dict[str, list] = {}
    for run in args.runs:
        metas, rows, images = read_run(Path(run))
        labels = label_images(images, [metas[r["prompt"]] for r in rows], [r["seed"] for r in rows], args.workers,
                              with_target=False)
        for r, lab in zip(rows, labels):
            pooled.setdefault(r["kind"], []).append((r["score"], lab.correct))
    for kind, pairs in sorted(pooled.items()):
        p = np.array([s for s, _ in pairs], dtype=np.float64)
        y = np.array([c for _, c in pairs], dtype=bool)
        res["verifier"][kind] = {"n": len(y), "yes_share": float(y.mean()), "auc": roc_auc(p, y),
                                 "ece": calibration_error(p, y.astype(np.float64))}
    allp = np.array([s for v in pooled.values() for s, _ in v])
    ally = np.array([c for v in pooled.values() for _, c in v], dtype=bool)
    res["verifier"]["all"] = {"n": len(ally), "yes_share": float(ally.mean()), "auc": roc_auc(allp, ally),
                              "ece": calibration_error(allp, ally.astype(np.float64))}
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
    for kind, v in res["verifier"].items():
        auc = "-" if v["auc"] is None else f"{v['auc']:.3f}"
        print(f"| {kind} | {v['n']} | {v['yes_share']:.3f} | {auc} | {v['ece']:.3f} |")
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
