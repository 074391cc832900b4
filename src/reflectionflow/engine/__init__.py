"""The scaling engine: noise, prompt and reflection axes over the five component interfaces.

    from reflectionflow.config import RunConfig
    from reflectionflow.engine import search
    result = search(RunConfig(method="reflection", budget=8), prompts="geneval-shapes", out="runs/x")

`search` checks everything (config, prompts, the backend's folders and endpoint, output folder)
before any component is built, then searches and writes the run folder (runs.py) and the ledger.
report.html is a view of a finished run folder, a floor above (report/): `pipeline.generate` is
`search` followed by the report. `secrets` (the flux backend's API key) reach the backend's checks
and components only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import METHODS, ConfigError, RunConfig
from ..runs import RunFolder
from .backends import (
    BACKENDS,
    build_components,
    check_backend,
    component_names,
    get_backend,
    resolve_components,
)
from .candidates import Candidate, Make, NeedBudget, derive_seed
from .distributed import DistContext, DistributedError, my_share, work_units
from .executor import Components, Executor
from .posthoc import best_of_k
from .runner import SEARCH_METHODS, EngineError, PromptSpec, RunResult, prepare_folder, run, write_ledger

__all__ = [
    "BACKENDS", "METHODS", "SEARCH_METHODS", "Candidate", "Components", "DistContext", "DistributedError",
    "EngineError", "Executor",
    "Make", "NeedBudget", "Prepared", "PromptSpec", "RunResult", "best_of_k", "build_components", "derive_seed",
    "my_share", "prepare", "resolve_prompt_list", "run", "search", "work_units", "write_ledger",
]


def resolve_prompt_list(config: RunConfig, prompt: str | Sequence[str] | None = None,
                        prompts: str | None = None) -> list[dict]:
    """GenEval lines for a prompt string, a list of them, or a prompts file / named set (all of them:
    --limit is applied later, so the run's identity does not depend on it)."""
    backend = get_backend(config.backend)
    if (prompt is None) == (prompts is None):
        raise ConfigError("give either a PROMPT or --prompts FILE (.jsonl, .txt, .csv, .tsv), a folder of them, "
                          "or a named set (geneval-shapes, geneval-shapes-val)"
                          if prompt is None else "give either a PROMPT or --prompts, not both")
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ConfigError("empty list of prompts")
        return [line for p in prompt for line in resolve_prompt_list(config, prompt=p)]
    if prompt is not None:
        if backend.parse_prompt is not None:
            return [backend.parse_prompt(prompt)]
        if not prompt.strip():
            raise ConfigError("empty prompt")
        return [{"prompt": prompt.strip()}]  # backends without metadata: the engine does not need it
    if backend.resolve_prompts is None:
        raise ConfigError(f"backend {backend.name!r} reads no prompt files")
    return backend.resolve_prompts(prompts)


def limit_specs(specs: list[PromptSpec], n: int) -> list[PromptSpec]:
    """n prompts that keep the category mix: taken in turn from each category (GenEval's `tag`, in
    the order the file first names them), each in file order, and run in file order. A file without
    tags gives its first n prompts."""
    groups: dict = {}
    for s in specs:
        groups.setdefault((s.metadata or {}).get("tag"), []).append(s)
    picked: list[PromptSpec] = []
    queues = [list(g) for g in groups.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked, key=lambda s: s.index)


@dataclass
class Prepared:
    """A run that passed every check: what `search` needs to build and search."""

    config: RunConfig  # resolved: budget split, component names, the backend's settings
    prompts: list[dict]  # every prompt line (the run's identity; --limit applies to specs)
    specs: list[PromptSpec]  # the prompts to run
    folder: RunFolder
    continuing: bool  # the folder holds this run already (--resume)
    plan: object = None  # what the backend's checks found, for build_components


def prepare(config: RunConfig, out: str | Path, prompt: str | Sequence[str] | None = None,
            prompts: str | None = None, resume: bool = False, secrets: Mapping[str, str] | None = None,
            check: bool = True) -> Prepared:
    """Every check a run needs, in order, before any model loads: the config, the prompts, the
    backend's folders and endpoint (unless `check` is False: components built elsewhere), the
    output folder (its identity includes the backend's resolved settings)."""
    config = resolve_components(config.validate())
    metas = resolve_prompt_list(config, prompt, prompts)
    specs = [PromptSpec(index=i, prompt=m["prompt"], metadata=m) for i, m in enumerate(metas)]
    if config.limit is not None:
        specs = limit_specs(specs, config.limit)
    plan = None
    if check:
        config, plan = check_backend(config, secrets)
    folder, continuing = prepare_folder(config, metas, out, resume)
    return Prepared(config=config, prompts=metas, specs=specs, folder=folder, continuing=continuing, plan=plan)


def search(config: RunConfig, out: str | Path, prompt: str | Sequence[str] | None = None,
           prompts: str | None = None, resume: bool = False, components: Components | None = None,
           progress: bool = False, secrets: Mapping[str, str] | None = None,
           dist: DistContext | None = None) -> RunResult:
    """Check, build the components (unless given: the backend's own checks are then skipped), search
    and write the run folder and its ledger. `secrets`: what the backend's components need and no
    file may hold (the flux backend's API key), as the CLI read it from the environment. `dist`: this process's
    place among several that run the same call (distributed.py); each searches its share."""
    p = prepare(config, out, prompt, prompts, resume, secrets=secrets, check=components is None)
    t0 = time.perf_counter()
    if components is None:
        components = build_components(p.config, secrets, plan=p.plan)
    else:
        components = replace(components, names=components.names or component_names(p.config))
    load_s = time.perf_counter() - t0
    return run(p.config, p.specs, components, p.folder, all_prompts=p.prompts, resumed=p.continuing,
               progress=progress, load_s=load_s, dist=dist)
