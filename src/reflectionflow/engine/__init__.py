"""The scaling engine: noise, prompt and reflection axes over the five component interfaces.

    from reflectionflow.config import RunConfig
    from reflectionflow.engine import generate
    result = generate(RunConfig(method="reflection", budget=8), prompts="geneval-shapes", out="runs/x")

`generate` checks everything (config, prompts, output folder) before any component is built, then
searches, writes the run folder (runs.py), the ledger and report.html.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..config import ConfigError, RunConfig
from .backends import BACKENDS, build_components, component_names, get_backend, resolve_components
from .candidates import Candidate, Make, NeedBudget, derive_seed
from .executor import Components, Executor
from .posthoc import best_of_k
from .runner import METHODS, EngineError, PromptSpec, RunResult, prepare_folder, run, write_ledger

__all__ = [
    "BACKENDS", "METHODS", "Candidate", "Components", "EngineError", "Executor", "Make", "NeedBudget",
    "PromptSpec", "RunResult", "best_of_k", "build_components", "derive_seed", "generate", "prepare",
    "resolve_prompt_list", "run", "write_ledger",
]


def resolve_prompt_list(config: RunConfig, prompt: str | None = None, prompts: str | None = None) -> list[dict]:
    """GenEval lines for a single prompt string or a prompts file / named set (all of them: --limit
    is applied later, so the run's identity does not depend on it)."""
    backend = get_backend(config.backend)
    if (prompt is None) == (prompts is None):
        raise ConfigError("give either a PROMPT or --prompts FILE.jsonl|geneval-shapes|geneval-shapes-val"
                          if prompt is None else "give either a PROMPT or --prompts, not both")
    if prompt is not None:
        if backend.parse_prompt is not None:
            return [backend.parse_prompt(prompt)]
        if not prompt.strip():
            raise ConfigError("empty prompt")
        return [{"prompt": prompt.strip()}]  # backends without metadata: the engine does not need it
    if backend.resolve_prompts is None:
        raise ConfigError(f"backend {backend.name!r} reads no prompt files")
    return backend.resolve_prompts(prompts)


def prepare(config: RunConfig, out: str | Path, prompt: str | None = None, prompts: str | None = None,
            resume: bool = False):
    """Every check a run needs, in order, before any model loads.

    Returns (resolved config, all prompt lines, the prompts to run, run folder, continuing).
    """
    config = resolve_components(config.validate())
    metas = resolve_prompt_list(config, prompt, prompts)
    specs = [PromptSpec(index=i, prompt=m["prompt"], metadata=m) for i, m in enumerate(metas)]
    if config.limit is not None:
        specs = specs[: config.limit]
    folder, continuing = prepare_folder(config, metas, out, resume)
    return config, metas, specs, folder, continuing


def generate(config: RunConfig, out: str | Path, prompt: str | None = None, prompts: str | None = None,
             resume: bool = False, components: Components | None = None, progress: bool = False,
             report: bool = True) -> RunResult:
    """Check, build the components (unless given), search and write the run folder."""
    config, metas, specs, folder, continuing = prepare(config, out, prompt, prompts, resume)
    t0 = time.perf_counter()
    if components is None:
        components = build_components(config)
    else:
        components = replace(components, names=components.names or component_names(config))
    load_s = time.perf_counter() - t0
    return run(config, specs, components, folder, all_prompts=metas, resumed=continuing, progress=progress,
               report=report, load_s=load_s)
