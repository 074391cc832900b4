"""Helpers shared by the engine tests (no tests here)."""

from __future__ import annotations

import json
from pathlib import Path

from reflectionflow.components import Corrector, Generator, Verifier
from reflectionflow.config import RunConfig
from reflectionflow.pipeline import generate
from reflectionflow.world import data
from reflectionflow.world.spec import TAGS


def subset_file(tmp_path: Path, per_tag: int, name: str = "geneval-shapes") -> Path:
    """The first `per_tag` prompts of each category of a benchmark set, as a GenEval JSONL file."""
    metas = data.load_benchmark(name)
    picked = [m for t in TAGS for m in [x for x in metas if x["tag"] == t][:per_tag]]
    path = tmp_path / f"{name}-{per_tag}.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in picked), encoding="utf-8")
    return path


def run(out: Path, prompts: Path | str, report: bool = False, components=None, resume: bool = False, **cfg):
    config = RunConfig(progress=False, **cfg)
    return generate(config, out, prompts=str(prompts), resume=resume, components=components, report=report)


def outputs(root: Path) -> dict[str, bytes]:
    """Every file that must be identical between two runs of the same command: images, the final
    selections, traces and metadata (done.json and ledger.json also hold wall-clock times)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and (p.suffix == ".png" or p.name in ("trace.jsonl", "metadata.jsonl")):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def done_markers(root: Path) -> dict[str, dict]:
    """done.json files without their wall-clock times."""
    out = {}
    for p in sorted(Path(root).glob("*/done.json")):
        d = json.loads(p.read_text())
        d.pop("wall_s")
        out[str(p.relative_to(root))] = d
    return out


class Counting(Generator, Corrector, Verifier):
    """Wraps a component, counts the requests it serves, and can report a fixed cost per result."""

    def __init__(self, inner, nfe: int | None = None, calls: int | None = None, tokens: int | None = None):
        self.inner = inner
        self.requests = 0
        self.nfe, self.calls, self.tokens = nfe, calls, tokens

    def noise_like(self, seed):
        return self.inner.noise_like(seed)

    def _cost(self, results):
        for r in results:
            if self.nfe is not None:
                r.nfe = self.nfe
            if self.calls is not None:
                r.calls = self.calls
            if self.tokens is not None:
                r.tokens = self.tokens
        return results

    def generate(self, requests):
        self.requests += len(requests)
        return self._cost(self.inner.generate(requests))

    def correct(self, requests):
        self.requests += len(requests)
        return self._cost(self.inner.correct(requests))

    def score(self, images, prompts):
        self.requests += len(images)
        return self._cost(self.inner.score(images, prompts))
