"""Post-hoc best-of-k: the whole scaling curve from one run's trace.

For k = 1, 2, 4, ... up to the budget, each prompt's verifier pick among its first k images in
generation order (the original's filter reads its JSONL the same way), then the exact evaluator's
accuracy on those picks. For a noise run this is best-of-k exactly. For a reflection run the first
k images of a larger budget are not a run at budget k (its pool comes first), so an equal-budget
comparison runs each budget separately; the curve shows where the images of one run paid off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..runs import RunFolder
from .candidates import Candidate, best


@dataclass
class CurvePoint:
    k: int
    prompts: int
    mean_score: float | None  # mean verifier score of the picks
    yes_rate: float | None  # share of picks the verifier says yes to (yes/no verifiers)
    accuracy: float | None = None  # evaluator: mean of the per-category accuracies (GenEval overall)
    categories: dict[str, float] = field(default_factory=dict)


def powers_up_to(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _metadata(folder: RunFolder, i: int) -> dict | None:
    path = folder.prompt_dir(i) / "metadata.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]) if lines else None


def best_of_k(root: str | Path, ks: list[int] | None = None, evaluate: bool = True,
              indices: list[int] | None = None) -> list[CurvePoint]:
    """The curve for the prompts of a run folder (all of them unless `indices`)."""
    folder = RunFolder(Path(root))
    indices = folder.prompt_indices() if indices is None else indices
    traces = {i: [Candidate.from_record(r) for r in folder.load_trace(i)] for i in indices}
    traces = {i: sorted(t, key=lambda c: c.order) for i, t in traces.items() if t}
    if not traces:
        return []
    longest = max(len(t) for t in traces.values())
    ks = ks or powers_up_to(longest)
    metas = {i: _metadata(folder, i) for i in traces}
    judge = _evaluator(metas) if evaluate else None
    verdicts: dict[tuple[int, str], bool] = {}
    points = []
    for k in ks:
        picks = {i: best(t[:k]) for i, t in traces.items()}
        scores = [c.score for c in picks.values() if c.score is not None]
        yes = [c.verdict.yes for c in picks.values() if c.verdict.yes is not None]
        point = CurvePoint(k=k, prompts=len(picks), mean_score=_mean(scores),
                           yes_rate=_mean([float(y) for y in yes]) if yes else None)
        if judge is not None:
            from ..world.evaluate import summarize

            rows = []
            for i, c in picks.items():
                key = (i, c.file)
                if key not in verdicts:
                    verdicts[key] = judge(folder.prompt_dir(i) / c.file, metas[i])
                rows.append({"tag": metas[i].get("tag", "untagged"), "correct": verdicts[key]})
            summary = summarize(rows)
            point.accuracy = summary["overall"]
            point.categories = summary["categories"]
        points.append(point)
    return points


def _evaluator(metas: dict[int, dict | None]):
    """The world's exact evaluator when every prompt is a Shapes-world line, else None."""
    from ..world.spec import is_world_metadata

    if not all(m is not None and is_world_metadata(m) for m in metas.values()):
        return None
    from ..io import load_png
    from ..world.evaluate import evaluate_image

    return lambda path, meta: bool(evaluate_image(load_png(path), meta).correct)


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None
