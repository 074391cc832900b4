"""GenEval's rules, applied exactly, on the world detector's output.

`evaluate_image` mirrors GenEval's `evaluate_images.py`: for each include clause take the first
`count` detections of the class (most confident first); fail when there are fewer; check their
colour when the clause names one; check the relative position against the earlier matched group;
then every exclude clause must have fewer than its `count` detections. Overall accuracy is the
mean of the per-category image accuracies (GenEval's summary).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write_text, load_png
from .detect import Detection, detect
from .render import relations
from .spec import COLOR_NAMES, TAGS, PromptError, validate_metadata


@dataclass
class ImageVerdict:
    correct: bool
    reason: str
    score: float  # fraction of include/exclude clauses satisfied (a graded score for ranking)
    detections: list[Detection] = field(default_factory=list)


def group_by_class(dets: Iterable[Detection]) -> dict[str, list[Detection]]:
    out: dict[str, list[Detection]] = defaultdict(list)
    for d in dets:  # already most-confident first
        out[d.cls].append(d)
    return out


def evaluate_detections(dets: Sequence[Detection], meta: dict) -> ImageVerdict:
    objects = group_by_class(dets)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    satisfied = 0
    clauses = len(meta["include"]) + len(meta.get("exclude", []))
    for req in meta["include"]:
        cls, count = req["class"], req["count"]
        matched = True
        found = objects.get(cls, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    found_colors = ", ".join(f"{colors.count(c)} {c}" for c in COLOR_NAMES if c in colors)
                    reasons.append(
                        f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                        f"{req['color']}; and {found_colors}"
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relations(obj.box, target.box)["rels"]
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reasons.append(
                                    f"expected {cls} {expected_rel} target, found "
                                    f"{' and '.join(sorted(true_rels)) or 'no relation to the'} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
        satisfied += matched
    for req in meta.get("exclude", []):
        cls = req["class"]
        n = len(objects.get(cls, []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {cls}<{req['count']}, found {n}")
        else:
            satisfied += 1
    return ImageVerdict(correct, "\n".join(reasons), satisfied / max(clauses, 1), list(dets))


def evaluate_image(image: np.ndarray, meta: dict) -> ImageVerdict:
    return evaluate_detections(detect(image), meta)


def summarize(rows: Sequence[dict]) -> dict:
    """GenEval summary: per-category image accuracy, overall = mean of the categories present."""
    per: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per[r["tag"]].append(bool(r["correct"]))
    cats = {t: float(np.mean(per[t])) for t in TAGS if per[t]}
    for t in sorted(set(per) - set(TAGS)):
        cats[t] = float(np.mean(per[t]))
    return {
        "overall": float(np.mean(list(cats.values()))) if cats else 0.0,
        "categories": cats,
        "images": {t: len(v) for t, v in per.items()},
        "n_images": len(rows),
    }


# ----------------------------------------------------------------------------------------------
# Folders in GenEval layout: <DIR>/<NNNNN>/metadata.jsonl and <DIR>/<NNNNN>/samples/*.png


class EvaluationError(ValueError):
    """A folder that cannot be evaluated; the message names the file and the problem."""


GENEVAL_HINT = (
    "real GenEval prompts (COCO classes) need GenEval's own detector: from a checkout of "
    "djghosh13/geneval run `python evaluation/evaluate_images.py {dir} --outfile {dir}/results.jsonl "
    "--model-path <mask2former dir>` then `python evaluation/summary_scores.py {dir}/results.jsonl`"
)


def coco_classes() -> frozenset[str]:
    from .data import HERE

    return frozenset((HERE / "geneval_object_names.txt").read_text(encoding="utf-8").split("\n")) - {""}


def scan_folder(root: str | os.PathLike) -> list[tuple[Path, dict, list[Path]]]:
    """(prompt folder, metadata, sample files) for every prompt; validates before any work."""
    root = Path(root)
    if not root.exists():
        raise EvaluationError(f"{root}: no such folder")
    if not root.is_dir():
        raise EvaluationError(f"{root}: not a folder (expected a GenEval-layout folder)")
    prompt_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not prompt_dirs:
        raise EvaluationError(
            f"{root}: no prompt folders; expected {root}/<NNNNN>/metadata.jsonl and {root}/<NNNNN>/samples/*.png"
        )
    items, coco = [], 0
    for d in prompt_dirs:
        mpath = d / "metadata.jsonl"
        if not mpath.is_file():
            raise EvaluationError(f"{mpath}: missing (every prompt folder needs its GenEval metadata line)")
        try:
            text = mpath.read_text(encoding="utf-8").strip().splitlines()
            meta = json.loads(text[0]) if text else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvaluationError(f"{mpath}: not a JSON line ({e})") from None
        if meta is None:
            raise EvaluationError(f"{mpath}: empty")
        try:
            validate_metadata(meta, where=str(mpath))
        except PromptError as e:
            classes = [c.get("class") for c in meta.get("include", []) if isinstance(c, dict)]
            if classes and all(c in coco_classes() for c in classes):
                coco += 1
                continue
            raise EvaluationError(str(e)) from None
        samples = sorted((d / "samples").glob("*.png")) if (d / "samples").is_dir() else []
        items.append((d, meta, samples))
    if coco:
        if items:
            raise EvaluationError(f"{root}: mixes Shapes-world and real GenEval prompts ({coco} COCO-class folders)")
        raise EvaluationError(f"{root}: " + GENEVAL_HINT.format(dir=root))
    if not any(s for _, _, s in items):
        raise EvaluationError(f"{root}: no images found under <NNNNN>/samples/*.png")
    return items


def evaluate_folder(root: str | os.PathLike, progress: bool = True) -> tuple[list[dict], dict]:
    """Evaluate every image; write results.jsonl and scores.json into the folder."""
    from tqdm import tqdm

    root = Path(root)
    items = scan_folder(root)
    rows: list[dict] = []
    total = sum(len(s) for _, _, s in items)
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
    unreadable = 0
    for d, meta, samples in items:
        for path in samples:
            row = {"filename": str(path.relative_to(root)), "tag": meta.get("tag", "untagged"),
                   "prompt": meta["prompt"], "metadata_index": d.name}
            try:
                img = load_png(path)
            except Exception as e:  # a bad file is a failed image, not a failed run
                unreadable += 1
                row.update(correct=False, reason=f"unreadable image: {type(e).__name__}: {e}", error=True)
            else:
                v = evaluate_image(img, meta)
                row.update(correct=v.correct, reason=v.reason, score=round(v.score, 4),
                           detections=[x.to_dict() for x in v.detections])
            rows.append(row)
            bar.update(1)
    bar.close()
    summary = summarize(rows)
    summary["unreadable"] = unreadable
    summary["evaluator"] = "geneval-shapes (world v1 detector, GenEval rules)"
    atomic_write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(root / "scores.json", json.dumps(summary, indent=2) + "\n")
    return rows, summary


def format_summary(summary: dict) -> str:
    lines = [f"overall  {summary['overall']:.3f}  ({summary['n_images']} images)"]
    for t, acc in summary["categories"].items():
        lines.append(f"  {t:14s} {acc:.3f}  ({summary['images'].get(t, 0)})")
    return "\n".join(lines)
