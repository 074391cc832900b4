"""Benchmark prompt files shipped with the package.

- `geneval-shapes`: GenEval-Shapes, 553 world prompts with GenEval's per-category counts,
  drawn by `spec.sample_prompts(seed=BENCHMARK_SEED)`.
- `geneval-shapes-val`: a validation set of the same size and counts (seed VALIDATION_SEED),
  drawn with the benchmark's prompts held back, so the two sets share no prompt wherever a
  category's prompt space allows it (see `overlap()`).
- `geneval`: GenEval's own 553 prompts (COCO classes; MIT licence in LICENSE.geneval). Their
  images need GenEval's detector; the world's evaluator refuses them with a pointer.

Regenerate the two world files (byte-identical) with:
    python -m reflectionflow.world.data
"""

from __future__ import annotations

import json
from pathlib import Path

from ..spec import load_metadata_file, sample_prompts

BENCHMARK_SEED = 20250422
VALIDATION_SEED = 20250423
HERE = Path(__file__).parent
FILES = {
    "geneval-shapes": HERE / "geneval_shapes.jsonl",
    "geneval-shapes-val": HERE / "geneval_shapes_val.jsonl",
    "geneval": HERE / "geneval_metadata.jsonl",
}


def benchmark_path(name: str) -> Path:
    if name not in FILES:
        raise ValueError(f"unknown prompt set {name!r}; accepted: {', '.join(FILES)}")
    return FILES[name]


def load_benchmark(name: str) -> list[dict]:
    return load_metadata_file(benchmark_path(name))


def build() -> dict[str, list[dict]]:
    test = sample_prompts(seed=BENCHMARK_SEED)
    val = sample_prompts(seed=VALIDATION_SEED, avoid=test)
    return {"geneval-shapes": test, "geneval-shapes-val": val}


def overlap() -> dict[str, float]:
    """Per category: share of validation prompts whose text also appears in the benchmark."""
    test, val = load_benchmark("geneval-shapes"), load_benchmark("geneval-shapes-val")
    texts = {m["prompt"] for m in test}
    out: dict[str, list[bool]] = {}
    for m in val:
        out.setdefault(m["tag"], []).append(m["prompt"] in texts)
    return {t: sum(v) / len(v) for t, v in out.items()}


def write() -> None:
    for name, metas in build().items():
        FILES[name].write_text("".join(json.dumps(m) + "\n" for m in metas), encoding="utf-8")



def resolve_prompts(arg: str, world_only: bool = True) -> list[dict]:
    """A named prompt set or a GenEval JSONL path -> validated metadata lines.

    Errors name the file and line. With world_only, every line must fit the Shapes world.
    """
    from ..spec import PromptError, validate_metadata

    if arg in FILES:
        path = FILES[arg]
        if world_only and arg == "geneval":
            raise PromptError(
                "prompt set 'geneval' holds COCO classes; the world backend draws only the Shapes "
                "world (use --prompts geneval-shapes, or a real-scale backend for GenEval itself)"
            )
    else:
        path = Path(arg)
        if not path.is_file():
            raise PromptError(f"{arg}: no such prompts file (or named set: {', '.join(FILES)})")
    metas = load_metadata_file(path)
    for i, m in enumerate(metas, 1):
        if world_only:
            validate_metadata(m, where=f"{path}: line {i}")
        elif not isinstance(m, dict) or "prompt" not in m:
            raise PromptError(f"{path}: line {i}: expected a GenEval line with a 'prompt' key")
    return metas
