"""The exact GenEval-Shapes evaluator as a metric: GenEval's rules on the world detector's output.

It keeps GenEval's own files, DIR/results.jsonl (one verdict per image) and DIR/scores.json
(overall = mean of the category accuracies), and applies only to prompts with Shapes-world GenEval
metadata: free text has nothing for it to check.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_json
from .base import Metric, MetricError, MetricOptions, PromptItem


class GenEvalShapes(Metric):
    name = "geneval-shapes"
    description = "the exact GenEval-Shapes evaluator: GenEval's rules on the world detector (accuracy)"
    verifier_name = "world-oracle"  # the oracle verifier IS this evaluator

    @classmethod
    def check(cls, options: MetricOptions, root: Path, items: list[PromptItem]) -> None:
        free = [it for it in items if "include" not in it.meta]
        if free:
            from . import metric_names

            others = ", ".join(n for n in metric_names() if n != cls.name)
            raise MetricError(f"{root}: {len(free)} of {len(items)} prompts have no GenEval metadata (e.g. "
                              f"{free[0].index}: {free[0].prompt[:60]!r}); the exact GenEval-Shapes evaluator does "
                              f"not apply to free text; choose another --metric ({others})")
        # Real GenEval lines (COCO classes) and malformed ones: evaluate_folder's own errors say what to do.

    def evaluate(self, root: Path, items: list[PromptItem], progress: bool = False) -> tuple[list[dict], dict]:
        from ..world.evaluate import EvaluationError, evaluate_folder

        try:
            rows, summary = evaluate_folder(root, progress=progress)
        except EvaluationError as e:
            raise MetricError(str(e)) from None
        return rows, summary

    @staticmethod
    def files(root: Path) -> tuple[Path, Path]:
        return root / "results.jsonl", root / "scores.json"

    @staticmethod
    def rewrite_summary(root: Path, summary: dict) -> None:
        """scores.json with the run-verifier flag added (evaluate_folder wrote it without)."""
        atomic_write_json(root / "scores.json", summary)

    @staticmethod
    def read(root: Path) -> tuple[list[dict], dict] | None:
        res, scores = GenEvalShapes.files(root)
        if not (res.is_file() and scores.is_file()):
            return None
        rows = [json.loads(line) for line in res.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows, json.loads(scores.read_text(encoding="utf-8"))
