"""Batched component calls: every request of a step, across chains and prompts, in few calls.

`Executor.run` takes the new `Make` requests of one step (cached ones never get here) and runs
the stages in order: reflect -> refine -> correct / generate -> verify. Each stage is one list of
requests cut into chunks of `batch_size`; with `workers` > 1 the chunks are in flight at once
(API-backed judges), and results are put back by chunk position, never by completion order, so
a verdict or reflection always stays with the image it belongs to. A component that returns a
different number of results than it was given requests is an error, not a silent shift.

With `on_keep="resample"`, a correction whose reflection asks for no change (`is_keep`) is not
sent to the corrector: its round becomes a fresh noise sample of the chain's prompt (kind
"resample", the correction's own seed), since a "keep" edit can only return the same image or a
broken one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..components import (
    ComponentError,
    CorrectionRequest,
    Corrector,
    GenerationRequest,
    GenerationResult,
    Generator,
    PromptRefiner,
    RefinedPrompt,
    RefineRequest,
    Reflection,
    ReflectionRequest,
    Reflector,
    Verdict,
    Verifier,
)
from .candidates import Candidate, Make


@dataclass
class Components:
    generator: Generator
    verifier: Verifier
    reflector: Reflector | None = None
    refiner: PromptRefiner | None = None
    corrector: Corrector | None = None
    names: dict[str, str] = field(default_factory=dict)  # kind -> registry name, for errors and the ledger


@dataclass
class Job:
    """One Make in flight, with what each stage gave it."""

    prompt_index: int
    original: str  # the prompt the verifier scores against
    make: Make
    reflection: Reflection | None = None
    refined: RefinedPrompt | None = None
    result: GenerationResult | None = None
    verdict: Verdict | None = None
    wall: dict[str, float] = field(default_factory=dict)  # stage -> seconds attributed to this job
    resampled: bool = False  # a correction made as a fresh noise sample instead (on_keep="resample")

    @property
    def corrects(self) -> bool:
        return self.make.correct and not self.resampled

    @property
    def prompt_used(self) -> str:
        if self.refined is not None and not self.refined.error and self.refined.text.strip():
            return self.refined.text
        return self.make.prompt

    def to_candidate(self, order: int) -> Candidate:
        m, r, v = self.make, self.result, self.verdict
        stage = "correct" if self.corrects else "generate"
        made = {"items": 1, "images": 1, "nfe": int(r.nfe)}
        if getattr(r, "cached", 0):  # only when a step cache served passes: other trace lines stay as they were
            made["cached"] = int(r.cached)
        cost = {stage: made, "verify": _cost(v)}
        errors = []
        if self.reflection is not None:
            cost["reflect"] = _cost(self.reflection)
            if self.reflection.error:
                errors.append(f"reflect: {self.reflection.error}")
        if self.refined is not None:
            cost["refine"] = _cost(self.refined)
            if self.refined.error:
                errors.append(f"refine: {self.refined.error} (kept the chain's prompt)")
        return Candidate(
            id=m.id, order=order, kind="resample" if self.resampled else m.kind, chain=m.chain, round=m.round,
            seed=m.seed, prompt=self.prompt_used,
            verdict=v, nfe=int(r.nfe), parent=m.parent.id if m.parent is not None else None,
            reflection=self.reflection.text if self.reflection is not None else None,
            file=f"images/{m.id}.png", cost=cost, errors=errors, image=r.image,
        )


class Executor:
    def __init__(self, components: Components, batch_size: int = 64, workers: int = 1, on_keep: str = "correct"):
        self.c = components
        self.on_keep = on_keep
        self.batch_size = batch_size
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------
    def call(self, kind: str, fn: Callable[[Sequence], list], requests: Sequence, expect: type) -> tuple[list, float]:
        """fn over chunks of requests; results in request order; returns (results, seconds)."""
        t0 = time.perf_counter()
        chunks = [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        if self._pool is not None and len(chunks) > 1:
            futures = [self._pool.submit(fn, chunk) for chunk in chunks]
            outs = [f.result() for f in futures]  # by submission position, not completion
        else:
            outs = [fn(chunk) for chunk in chunks]
        results: list = []
        name = self.c.names.get(kind, kind)
        for chunk, out in zip(chunks, outs):
            out = list(out)
            if len(out) != len(chunk):
                raise ComponentError(f"{kind} {name!r} returned {len(out)} results for {len(chunk)} requests; "
                                     f"a component must return exactly one result per request, in order")
            for o in out:
                if not isinstance(o, expect):
                    raise ComponentError(f"{kind} {name!r} returned {type(o).__name__}, expected {expect.__name__}")
            results.extend(out)
        return results, time.perf_counter() - t0

    def _stage(self, stage: str, jobs: list[Job], kind: str, fn, requests: list, expect: type) -> list:
        if not jobs:
            return []
        out, seconds = self.call(kind, fn, requests, expect)
        for j in jobs:
            j.wall[stage] = j.wall.get(stage, 0.0) + seconds / len(jobs)
        return out

    def run(self, jobs: list[Job]) -> None:
        """Fill every job's reflection / refined prompt / image / verdict, stage by stage."""
        c = self.c
        # 1. reflect on the parents
        rj = [j for j in jobs if j.make.reflect]
        if rj and c.reflector is None:
            raise ComponentError("this method needs a reflector; none is configured")
        reqs = [ReflectionRequest(image=j.make.parent.load_image(), original_prompt=j.original,
                                  current_prompt=j.make.prompt, previous_reflection=j.make.parent.reflection,
                                  verdict=j.make.parent.verdict) for j in rj]
        for j, r in zip(rj, self._stage("reflect", rj, "reflector", _method(c.reflector, "reflect"), reqs, Reflection)):
            j.reflection = r
        # 2. refine the prompts (with the reflection when there is one)
        fj = [j for j in jobs if j.make.refine]
        if fj and c.refiner is None:
            raise ComponentError("this method needs a prompt refiner; none is configured")
        reqs = [RefineRequest(original_prompt=j.original, current_prompt=j.make.prompt,
                              reflection=j.reflection.text if j.reflection is not None else None,
                              verdict=j.make.parent.verdict if j.make.parent is not None else None,
                              image=j.make.parent.load_image() if j.make.parent is not None else None) for j in fj]
        for j, r in zip(fj, self._stage("refine", fj, "refiner", _method(c.refiner, "refine"), reqs, RefinedPrompt)):
            j.refined = r
        # 3. new images: corrections of parents, or generations from noise
        if self.on_keep == "resample":
            for j in jobs:
                r = j.reflection
                j.resampled = j.make.correct and r is not None and not r.error and is_keep(r.text)
        cj = [j for j in jobs if j.corrects]
        if cj and c.corrector is None:
            raise ComponentError("this method needs a corrector; none is configured")
        reqs = [CorrectionRequest(image=j.make.parent.load_image(), prompt=j.prompt_used,
                                  reflection=j.reflection.text if j.reflection is not None else "",
                                  seed=j.make.seed) for j in cj]
        for j, r in zip(cj, self._stage("correct", cj, "corrector", _method(c.corrector, "correct"), reqs,
                                        GenerationResult)):
            j.result = r
        gj = [j for j in jobs if not j.corrects]
        reqs = [GenerationRequest(prompt=j.prompt_used, seed=j.make.seed, noise=j.make.noise) for j in gj]
        for j, r in zip(gj, self._stage("generate", gj, "generator", c.generator.generate, reqs, GenerationResult)):
            j.result = r
        for j in jobs:
            r = j.result
            kind = "corrector" if j.corrects else "generator"
            if r.error or r.image is None:
                raise ComponentError(f"{kind} {c.names.get(kind, kind)!r} failed on prompt {j.prompt_index} "
                                     f"candidate {j.make.id}: {r.error or 'no image'}")
            img = np.asarray(r.image)
            if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
                raise ComponentError(f"{kind} {c.names.get(kind, kind)!r} returned an image of shape {img.shape} "
                                     f"and dtype {img.dtype}; expected (H, W, 3) uint8")
        # 4. score every new image once, against the ORIGINAL prompt
        verdicts = self._stage("verify", jobs, "verifier",
                               lambda chunk: c.verifier.score([x[0] for x in chunk], [x[1] for x in chunk]),
                               [(j.result.image, j.original) for j in jobs], Verdict)
        for j, v in zip(jobs, verdicts):
            j.verdict = v


# What reflectors write when nothing needs changing (compared lower-case, without bullets and the
# final full stop); an empty reflection says the same.
KEEP_PHRASES = frozenset({"keep the image unchanged", "keep the image as it is", "no changes needed",
                          "no change needed", "no changes", "no change", "nothing to change", "none"})


def is_keep(text: str) -> bool:
    """Whether a reflection asks for no change: no line, or only lines of KEEP_PHRASES."""
    lines = [ln.strip().lstrip("-*• ").rstrip(". ").lower() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return all(ln in KEEP_PHRASES for ln in lines)


def _cost(result: Verdict | Reflection | RefinedPrompt) -> dict:
    """A judge's cost for one request; `failed` (only when it did: trace lines stay short) counts a
    result that carries an error, e.g. a VLM call that failed after every retry."""
    cost = {"items": 1, "calls": int(result.calls), "tokens": int(result.tokens)}
    if result.error:
        cost["failed"] = 1
    return cost


def _method(component, name: str):
    return getattr(component, name) if component is not None else None
