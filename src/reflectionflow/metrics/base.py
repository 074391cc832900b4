"""What every metric shares: the run folder it reads, its options, its per-image rows and summary.

A run folder here is any GenEval-layout folder: DIR/<NNNNN>/metadata.jsonl holding at least a
`prompt` (GenEval metadata, or free text with an optional `category`) and DIR/<NNNNN>/samples/*.png.
A metric writes DIR/metrics/<name>/results.jsonl (one row per image) and summary.json; the exact
GenEval-Shapes evaluator keeps GenEval's own DIR/results.jsonl and DIR/scores.json.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..stats import RESAMPLES


class MetricError(ValueError):
    """A metric name, option or folder that cannot be scored; the message says what is accepted."""


@dataclass
class MetricOptions:
    """Everything a metric may need, set by the command line (which alone reads the environment)."""

    clip_path: str | None = None  # clipscore: a CLIP folder or hub id
    pickscore_path: str | None = None  # pickscore: the PickScore CLIP folder or hub id
    pickscore_processor: str | None = None  # pickscore: processor folder or hub id, when the model has none
    local_verifier_path: str | None = None  # verifier local-yesno
    vlm: dict = field(default_factory=dict)  # verifiers vlm-*: VLMOptions fields (url, model, api_key, ...)
    verifier_options: dict = field(default_factory=dict)  # any other verifier's registry options
    reference: str | None = None  # fid: folder of reference images
    inception_path: str | None = None  # fid: Inception-v3 FID weights file
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    bootstrap: int = RESAMPLES  # fid: resamples of the run's images for the 95 % interval
    seed: int = 0


@dataclass
class PromptItem:
    """One prompt folder of a run."""

    index: str  # the folder name, "00000"
    meta: dict  # its metadata line
    samples: list[Path]  # DIR/<index>/samples/*.png, sorted

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]

    @property
    def category(self) -> str | None:
        # The file's own grouping (DrawBench / PartiPrompts Category) or GenEval's tag.
        return self.meta.get("category") or self.meta.get("tag")


@dataclass
class ImageScore:
    score: float | None  # None: the image could not be scored (see error)
    yes: bool | None = None
    details: dict = field(default_factory=dict)
    calls: int = 0
    tokens: int = 0
    error: str | None = None


def scan_run(root: str | Path, require_images: bool = True) -> list[PromptItem]:
    """Every prompt folder with its metadata and samples; one-line errors naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise MetricError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not dirs:
        raise MetricError(f"{root}: no prompt folders; expected {root}/<NNNNN>/metadata.jsonl and "
                          f"{root}/<NNNNN>/samples/*.png")
    items = []
    for d in dirs:
        path = d / "metadata.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            meta = json.loads(lines[0]) if lines else None
        except FileNotFoundError:
            raise MetricError(f"{path}: missing (every prompt folder needs its metadata line)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MetricError(f"{path}: not a JSON line ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
            raise MetricError(f"{path}: expected a JSON object with a 'prompt'")
        samples = sorted((d / "samples").glob("*.png")) if (d / "samples").is_dir() else []
        items.append(PromptItem(index=d.name, meta=meta, samples=samples))
    if require_images and not any(it.samples for it in items):
        raise MetricError(f"{root}: no images found under <NNNNN>/samples/*.png")
    return items


def run_verifier(root: str | Path) -> str | None:
    """The verifier the run selected its samples with (config.json), if the folder is a run."""
    path = Path(root) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config.get("verifier") or (config.get("components") or {}).get("verifier")


def finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def mean_or_none(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def summarize_scores(rows: Sequence[dict]) -> dict:
    """Mean over the images scored, per category too, and what failed."""
    scored = [r for r in rows if r.get("score") is not None]
    out: dict = {"mean": mean_or_none([r["score"] for r in scored]), "n_images": len(rows),
                 "n_prompts": len({r["index"] for r in rows}), "failed": len(rows) - len(scored)}
    cats: dict[str, list[float]] = {}
    for r in scored:
        if r.get("category") is not None:
            cats.setdefault(str(r["category"]), []).append(r["score"])
    if cats:
        out["categories"] = {c: float(np.mean(v)) for c, v in sorted(cats.items())}
    yes = [bool(r["yes"]) for r in scored if r.get("yes") is not None]
    if yes:
        out["yes_rate"] = float(np.mean(yes))
    calls = sum(int(r.get("calls", 0)) for r in rows)
    if calls:
        out["calls"] = calls
        out["tokens"] = sum(int(r.get("tokens", 0)) for r in rows)
    return out


class Metric:
    """A score for the images of a run folder.

    Per-image metrics implement `score(images, prompts) -> list[ImageScore]`; the summary is the
    mean (per category too). Set-level metrics (FID) override `evaluate` instead.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    # "image": a score per image, summarised by its mean; "set": one number for the whole set (FID),
    # its summary's `value` with its own `ci95`.
    kind: ClassVar[str] = "image"
    # The engine verifier this metric is the same judge as: a run selected with it is not scored
    # independently by it (the summary says so).
    verifier_name: ClassVar[str | None] = None

    def __init__(self, options: MetricOptions):
        self.options = options

    @classmethod
    def check(cls, options: MetricOptions, root: Path, items: list[PromptItem]) -> None:
        """Everything that can be checked before weights load; raise MetricError."""

    def info(self) -> dict:
        """What the summary records about the metric's own settings (model, reference, ...)."""
        return {}

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[ImageScore]:
        raise NotImplementedError(f"metric {self.name} scores sets, not images")

    def evaluate(self, root: Path, items: list[PromptItem], progress: bool = False) -> tuple[list[dict], dict]:
        """Score every sample in batches; (rows, summary)."""
        from tqdm import tqdm

        from ..io import load_png

        todo = [(it, p) for it in items for p in it.samples]
        rows: list[dict] = []
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), desc=self.name, unit="img", disable=not progress)
        step = max(1, self.options.batch_size)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            images, prompts, slots = [], [], []
            for it, path in chunk:
                row = {"index": it.index, "filename": str(path.relative_to(root)), "prompt": it.prompt,
                       "category": it.category, "score": None}
                rows.append(row)
                try:
                    images.append(load_png(path))
                except Exception as e:  # a bad file is an unscored image, not a failed command
                    row["error"] = f"unreadable image: {type(e).__name__}: {e}"
                    continue
                prompts.append(it.prompt)
                slots.append(len(rows) - 1)
            results = self.score(images, prompts) if images else []
            if len(results) != len(images):
                raise RuntimeError(f"metric {self.name} returned {len(results)} scores for {len(images)} images")
            for slot, res in zip(slots, results):
                rows[slot].update(_row_fields(res))
            bar.update(len(chunk))
        bar.close()
        summary = summarize_scores(rows)
        summary["wall_s"] = round(time.perf_counter() - t0, 3)
        return rows, summary


def _row_fields(res: ImageScore) -> dict:
    out: dict = {"score": finite(res.score)}
    if res.yes is not None:
        out["yes"] = bool(res.yes)
    if res.details:
        out["details"] = res.details
    if res.calls:
        out["calls"], out["tokens"] = res.calls, res.tokens
    if res.error or out["score"] is None:
        out["score"] = None
        out["error"] = res.error or "no score"
    return out
