"""What the search methods ask for and what they get back: `Make` -> `Candidate`.

A method never calls a component. It yields a list of `Make` requests (one new image each, with
the reflection / refinement / correction steps that lead to it) and receives one `Candidate` per
request, in the same order, already scored by the verifier against the ORIGINAL prompt. The
engine batches the requests of every chain of every prompt in flight into one call per component,
serves requests already on disk from the trace, and keeps the budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..components import Verdict

# How a candidate was made; "resample": a fresh noise sample made in a correction's place, when the
# reflection asked for no change and the run's on_keep is "resample".
CANDIDATE_KINDS = ("noise", "neighbour", "prompt", "correct", "resample")
STAGES = ("generate", "correct", "verify", "reflect", "refine")  # ledger stages


def derive_seed(run_seed: int, prompt_index: int, chain: int, round: int, kind: str) -> int:
    """A stable 63-bit seed for (run seed, prompt, chain, round, kind); never Python's salted hash()."""
    key = f"{run_seed}/{prompt_index}/{chain}/{round}/{kind}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


@dataclass
class Candidate:
    """One image the search produced, with everything that led to it and its cost."""

    id: str  # unique within the prompt: n0003 (noise), z0002-1 (neighbour), c01r0004 (chain step)
    order: int  # generation order within the prompt (post-hoc best-of-k reads the trace in this order)
    kind: str
    chain: int
    round: int
    seed: int
    prompt: str  # the prompt the image was made from (refined prompts differ from the original)
    verdict: Verdict
    nfe: int = 0
    parent: str | None = None
    reflection: str | None = None  # the reflection that produced this image (corrections only)
    file: str = ""  # relative to the prompt folder: images/<id>.png
    cost: dict[str, dict] = field(default_factory=dict)  # stage -> {items, images, nfe, calls, tokens}
    errors: list[str] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)  # dropped once on disk; see load_image
    root: Path | None = field(default=None, repr=False)  # the prompt folder, to reload the image

    @property
    def score(self) -> float | None:
        return None if self.verdict.error else self.verdict.score

    def load_image(self) -> np.ndarray:
        if self.image is None:
            from ..io import load_png

            if self.root is None:
                raise RuntimeError(f"candidate {self.id}: image not in memory and no folder to load it from")
            self.image = load_png(self.root / self.file)
        return self.image

    def to_record(self) -> dict:
        """The trace line (JSON); deterministic, so a resumed run writes the same bytes."""
        v = self.verdict
        return {
            "id": self.id, "order": self.order, "kind": self.kind, "chain": self.chain, "round": self.round,
            "parent": self.parent, "seed": self.seed, "prompt": self.prompt, "reflection": self.reflection,
            "score": None if v.error else _exact(v.score), "yes": v.yes, "verdict": _jsonable(v.details),
            "nfe": self.nfe, "cost": self.cost, "errors": self.errors or None,
            "verdict_error": v.error, "file": self.file,
        }

    @staticmethod
    def from_record(rec: dict, root: Path | None = None) -> Candidate:
        verdict = Verdict(score=rec["score"] if rec["score"] is not None else float("-inf"), yes=rec["yes"],
                          details=rec.get("verdict") or {}, error=rec.get("verdict_error"))
        return Candidate(
            id=rec["id"], order=rec["order"], kind=rec["kind"], chain=rec["chain"], round=rec["round"],
            seed=rec["seed"], prompt=rec["prompt"], verdict=verdict, nfe=rec["nfe"], parent=rec["parent"],
            reflection=rec["reflection"], file=rec["file"], cost=rec.get("cost") or {},
            errors=list(rec.get("errors") or []), root=root,
        )


def _exact(x: float) -> float:
    # Scores are stored exactly (JSON writes a float's shortest repr, which reads back bit for bit):
    # a resumed run ranks the candidates it reads from the trace exactly as the run that made them
    # did, near-ties included.
    return float(x)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _exact(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)  # a judge's odd detail (an object, an array) is kept as text, not a crash


def rank_key(c: Candidate) -> tuple:
    """Higher is better: a verdict without error first, then yes before no, then the score."""
    if c.verdict.error:
        return (0, 0, float("-inf"))
    return (1, *c.verdict.rank_key)


def best(cands: Sequence[Candidate]) -> Candidate:
    """The verifier's pick; ties go to the earliest generated (stable, as a best-of-k filter reads)."""
    if not cands:
        raise ValueError("no candidates to choose from")
    top = cands[0]
    for c in cands[1:]:
        if rank_key(c) > rank_key(top) or (rank_key(c) == rank_key(top) and c.order < top.order):
            top = c
    return top


def ranked(cands: Sequence[Candidate]) -> list[Candidate]:
    """Best first; ties in generation order."""
    return sorted(cands, key=lambda c: (tuple(-x for x in rank_key(c)), c.order))


def confident(c: Candidate, threshold: float | None) -> bool:
    """Early stopping: the verifier says yes (when it answers yes/no) with a score >= threshold."""
    if threshold is None or c.verdict.error:
        return False
    if c.verdict.yes is False:
        return False
    return c.verdict.score >= threshold


# ----------------------------------------------------------------------------------------------
# Requests from methods


@dataclass
class Make:
    """Ask for one new image. Steps run in this order: reflect on the parent, refine the prompt,
    then correct the parent image (correct=True) or generate from noise; then verify."""

    id: str
    kind: str
    chain: int
    round: int
    seed: int
    prompt: str  # the prompt to use, or to refine from when refine=True
    parent: Candidate | None = None
    noise: np.ndarray | None = None
    reflect: bool = False
    refine: bool = False
    correct: bool = False

    def __post_init__(self):
        if (self.reflect or self.correct) and self.parent is None:
            raise ValueError(f"{self.id}: reflect/correct need a parent image")


@dataclass
class NeedBudget:
    """A prompt that spent its own budget and still fails asks its wave for up to `images` more."""

    images: int
