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
from collections.abc import Sequence
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


# Category weights the world's trainers and data builders draw prompts by. Harder categories get
# more of the data; every category keeps a share (GenEval weighs them equally).
DEFAULT_TAG_WEIGHTS = {"single_object": 0.10, "two_object": 0.15, "counting": 0.20, "colors": 0.10,
                       "position": 0.20, "color_attr": 0.25}
# The generator fails mostly on two objects, counting and position (weights/world-generator):
# pool prompts (and world GenRef's generator sources) are drawn there, so more samples fail.
POOL_TAG_WEIGHTS = {"single_object": 0.04, "two_object": 0.32, "counting": 0.22, "colors": 0.04,
                    "position": 0.30, "color_attr": 0.08}


def load_prompt_file(name: str) -> list[dict]:
    """A prompt set shipped with the world (geneval_shapes.jsonl: the benchmark; *_val: validation)."""
    return load_metadata_file(HERE / name)


def spread(metas: Sequence[dict], n: int) -> list[dict]:
    """n prompts taken evenly through a category-ordered file, so every category is represented."""
    if n >= len(metas):
        return list(metas)
    import numpy as np

    idx = np.linspace(0, len(metas) - 1, n).round().astype(int)
    return [metas[i] for i in idx]



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



# ----------------------------------------------------------------------------------------------
# Prompt files: GenEval JSONL, plain text, CSV / TSV (DrawBench, PartiPrompts), or a folder of them.

PROMPT_SUFFIXES = (".jsonl", ".txt", ".csv", ".tsv")
PROMPT_COLUMNS = ("prompt", "prompts")  # matched case-insensitively: PartiPrompts "Prompt", DrawBench "Prompts"
CATEGORY_COLUMNS = ("category",)


def read_free_text(path: Path) -> list[tuple[str, str | None, str]]:
    """(prompt, category or None, where) for every prompt of a .txt / .csv / .tsv file.

    .txt: one prompt per line, blank lines skipped. .csv / .tsv: a header row with a prompt column
    (prompt / Prompt / Prompts) and an optional category column; other columns are ignored.
    """
    from ..spec import PromptError

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".txt":
        return [(line.strip(), None, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    import csv

    rows = csv.reader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    header = next(rows, None)
    while header is not None and not any(c.strip() for c in header):
        header = next(rows, None)  # blank lines before the header
    if header is None:
        return []
    names = [c.strip().lower() for c in header]
    col = next((names.index(c) for c in PROMPT_COLUMNS if c in names), None)
    if col is None:
        raise PromptError(f"{path}: no prompt column (columns: {', '.join(h.strip() for h in header) or 'none'}); "
                          f"expected one named {', '.join(('prompt', 'Prompt', 'Prompts'))}")
    cat = next((names.index(c) for c in CATEGORY_COLUMNS if c in names), None)
    out = []
    for n, row in enumerate(rows, 2):
        if not any(c.strip() for c in row):
            continue
        prompt = row[col].strip() if col < len(row) else ""
        if not prompt:
            raise PromptError(f"{path}:{n}: empty {header[col].strip()!r} cell")
        category = row[cat].strip() if cat is not None and cat < len(row) and row[cat].strip() else None
        out.append((prompt, category, f"{path}:{n}"))
    return out


def _prompt_files(arg: str) -> list[Path]:
    from ..spec import PromptError

    path = Path(arg)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in PROMPT_SUFFIXES)
        if not files:
            raise PromptError(f"{arg}: a folder with no prompt files (accepted: {', '.join(PROMPT_SUFFIXES)})")
        return files
    if not path.is_file():
        raise PromptError(f"{arg}: no such prompts file or folder (or named set: {', '.join(FILES)})")
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise PromptError(f"{arg}: unknown prompts file type {path.suffix or '(none)'!r}; accepted: "
                          f"{', '.join(PROMPT_SUFFIXES)} or a folder of them")
    return [path]


def _from_free_text(prompt: str, category: str | None, where: str, world_only: bool) -> dict:
    """A free-text prompt's line: with world_only, the GenEval metadata the world parser gives it
    (or an error: the world's generators draw only world prompts); else just the prompt."""
    from ..spec import PromptError, parse_prompt

    if world_only:
        try:
            meta = parse_prompt(prompt)
        except PromptError as e:
            head = str(e).splitlines()[0]
            raise PromptError(f"{where}: {head}; the world backend draws only Shapes-world prompts (see "
                              f"`reflectionflow world vocabulary`); run free text with a real-scale backend "
                              f"(--backend flux)") from None
    else:
        meta = {"prompt": prompt}
    if category is not None:
        meta["category"] = category  # not GenEval's `tag`: the file's own grouping (DrawBench, PartiPrompts)
    return meta


def _from_jsonl(path: Path, world_only: bool) -> list[dict]:
    from ..spec import PromptError, validate_metadata

    metas = load_metadata_file(path)
    for i, m in enumerate(metas, 1):
        text = m.get("prompt") if isinstance(m, dict) else None
        has_text = isinstance(text, str) and bool(text.strip())
        if world_only and has_text and "include" not in m:  # a line of free text ({"prompt": ...}): parse it
            metas[i - 1] = _from_free_text(text.strip(), m.get("category"), f"{path}:{i}", True)
        elif world_only:
            validate_metadata(m, where=f"{path}: line {i}")
        elif not has_text:
            raise PromptError(f"{path}: line {i}: expected a GenEval line with a 'prompt' key")
    return metas


def resolve_prompts(arg: str, world_only: bool = True) -> list[dict]:
    """A named prompt set, a prompts file (.jsonl GenEval lines, .txt one prompt per line, .csv /
    .tsv with a prompt column and an optional category column) or a folder of them (files in name
    order) -> metadata lines, each with at least a `prompt`.

    With world_only every prompt must be a Shapes-world one: GenEval lines are validated, free text
    is parsed into its GenEval line. Otherwise free text stays free text: {"prompt": ..., "category"?}
    (no GenEval metadata, so the world's exact evaluator does not apply to it). Errors name the file
    and line.
    """
    from ..spec import PromptError

    if arg in FILES:
        if world_only and arg == "geneval":
            raise PromptError(
                "prompt set 'geneval' holds COCO classes; the world backend draws only the Shapes "
                "world (use --prompts geneval-shapes, or a real-scale backend for GenEval itself)"
            )
        return _from_jsonl(FILES[arg], world_only)
    metas: list[dict] = []
    for path in _prompt_files(arg):
        if path.suffix.lower() == ".jsonl":
            metas += _from_jsonl(path, world_only)
            continue
        lines = read_free_text(path)
        if not lines:
            raise PromptError(f"{path}: the prompts file is empty")
        metas += [_from_free_text(p, c, where, world_only) for p, c, where in lines]
    return metas
