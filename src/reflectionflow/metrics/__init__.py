"""Metrics for any run folder, by name: `reflectionflow evaluate DIR --metric NAME`.

    geneval-shapes  the exact GenEval-Shapes evaluator (DIR/results.jsonl, DIR/scores.json)
    clipscore       CLIPScore from a transformers CLIP (local folder or hub id)
    pickscore       PickScore, a CLIP-based reward model
    fid             FID against a folder of reference images (Inception-v3 weights from a local file)
    <verifier>      any verifier of the engine (vlm-yesno, vlm-score, local-yesno, world-oracle, ...)

Every metric but geneval-shapes writes DIR/metrics/<name>/results.jsonl (one row per image) and
DIR/metrics/<name>/summary.json. A metric that is the same judge as the run's verifier (config.json
`verifier`) is flagged `same_as_run_verifier: true`: the run selected its samples by that score, so
it is not an independent measurement.

    from reflectionflow.metrics import MetricOptions, evaluate_run
    result = evaluate_run("runs/refl8", "clipscore", MetricOptions(clip_path="models/clip"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .base import ImageScore, Metric, MetricError, MetricOptions, PromptItem, run_verifier, scan_run
from .clip import CLIPScore, PickScore
from .fid import FID
from .geneval import GenEvalShapes

__all__ = ["METRICS", "ImageScore", "Metric", "MetricError", "MetricOptions", "MetricResult", "PromptItem",
           "default_metric", "evaluate_run", "evaluate_runs", "get_metric", "metric_names", "read_metric",
           "scan_run"]

METRICS: dict[str, type[Metric]] = {m.name: m for m in (GenEvalShapes, CLIPScore, PickScore, FID)}


def _verifier_metrics() -> dict[str, str]:
    """metric name -> verifier, for every registered verifier no built-in metric already is."""
    from .verifier import registered_verifiers

    covered = {m.verifier_name for m in METRICS.values()} - {"world-oracle"}  # the oracle's graded score differs
    return {v: v for v in registered_verifiers() if v not in covered and v not in METRICS}


def metric_names() -> list[str]:
    return list(METRICS) + sorted(_verifier_metrics())


def get_metric(name: str) -> type[Metric]:
    if name in METRICS:
        return METRICS[name]
    verifiers = _verifier_metrics()
    if name in verifiers:
        from .verifier import VerifierMetric

        return VerifierMetric.for_verifier(verifiers[name])
    raise MetricError(f"unknown metric {name!r}; accepted: {', '.join(metric_names())}")


def default_metric(items: list[PromptItem]) -> str:
    """geneval-shapes where every prompt has GenEval metadata; for free text there is none."""
    # Lines with GenEval clauses go to the evaluator even when it cannot take them (other classes,
    # bad values): its errors say what is wrong (a real GenEval folder: use GenEval's detector).
    free = [it for it in items if "include" not in it.meta]
    if not free:
        return GenEvalShapes.name
    raise MetricError(f"{len(free)} of {len(items)} prompts have no GenEval metadata (e.g. "
                      f"{free[0].index}: {free[0].prompt[:60]!r}), so the exact evaluator is skipped and there is "
                      f"no default metric; choose --metric NAME (accepted: {', '.join(metric_names())})")


@dataclass
class MetricResult:
    name: str
    rows: list[dict]
    summary: dict
    files: tuple[Path, Path]  # (per-image results, summary)


def metric_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "metrics" / name


def evaluate_runs(root: str | Path, names: list[str] | None, options: MetricOptions | None = None,
                  progress: bool = False) -> list[MetricResult]:
    """Score the folder with each metric (the default one when `names` is empty). Every name, the
    folder and every metric's options are checked before any metric loads a model."""
    root = Path(root)
    options = options or MetricOptions()
    items = scan_run(root, require_images=False)  # the evaluator has its own checks and messages
    names = list(dict.fromkeys(names or [default_metric(items)]))
    classes = [get_metric(n) for n in names]
    if not any(it.samples for it in items) and any(cls is not GenEvalShapes for cls in classes):
        raise MetricError(f"{root}: no images found under <NNNNN>/samples/*.png")
    for cls in classes:
        cls.check(options, root, items)
    verifier = run_verifier(root)
    results = []
    for cls in classes:
        metric = cls(options)
        rows, summary = metric.evaluate(root, items, progress=progress)
        same = verifier is not None and verifier == cls.verifier_name
        head = {"metric": cls.name, "description": cls.description, "kind": cls.kind,
                "higher_is_better": cls.higher_is_better}
        summary = head | summary | metric.info() | {"run_verifier": verifier, "same_as_run_verifier": same}
        if same:
            summary["independence"] = (f"this metric is the run's verifier ({verifier}): the run selected its "
                                       "samples by it, so the score is not an independent measurement")
        if cls is GenEvalShapes:
            files = GenEvalShapes.files(root)
            GenEvalShapes.rewrite_summary(root, summary)
        else:
            d = metric_dir(root, cls.name)
            files = (d / "results.jsonl", d / "summary.json")
            atomic_write_text(files[0], "".join(json.dumps(r, default=str) + "\n" for r in rows))
            atomic_write_json(files[1], summary)
        results.append(MetricResult(name=cls.name, rows=rows, summary=summary, files=files))
    return results


def evaluate_run(root: str | Path, name: str | None = None, options: MetricOptions | None = None,
                 progress: bool = False) -> MetricResult:
    return evaluate_runs(root, [name] if name else None, options, progress)[0]


def read_metric(root: str | Path, name: str) -> tuple[list[dict], dict] | None:
    """A metric's (rows, summary) as `evaluate` wrote them into the folder, or None."""
    if name == GenEvalShapes.name:
        return GenEvalShapes.read(Path(root))
    d = metric_dir(root, name)
    if not (d / "summary.json").is_file():
        return None
    rows = []
    if (d / "results.jsonl").is_file():
        rows = [json.loads(x) for x in (d / "results.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return rows, json.loads((d / "summary.json").read_text(encoding="utf-8"))


def evaluated_metrics(root: str | Path) -> list[str]:
    """The metrics whose results are in the folder (geneval-shapes first)."""
    root = Path(root)
    names = [GenEvalShapes.name] if (root / "scores.json").is_file() and (root / "results.jsonl").is_file() else []
    if (root / "metrics").is_dir():
        names += sorted(p.name for p in (root / "metrics").iterdir() if (p / "summary.json").is_file())
    return names
