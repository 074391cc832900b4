"""The engine: drive a search method over many prompts at once, keep the budget, write the run folder.

Prompts are searched in waves of `prompt_batch`. Within a wave every prompt's method runs as a
coroutine in lockstep: at each step the engine gathers the `Make` requests of all of them (all
chains of all prompts), serves those already in the trace from disk, runs the rest through the
components in a few batched calls (executor.py), writes the step (trace lines, then images), and
hands each prompt its candidates. Resuming is the same code: a method replays its decisions from
the trace's verdicts, and only requests missing from the trace reach a component.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import METHODS, RunConfig
from ..runs import RunFolder, RunFolderError, prompts_fingerprint
from ..version import __version__
from .candidates import Candidate, Make, NeedBudget, best
from .chains import prompt_chains, reflection_flow
from .context import Method, PromptContext
from .distributed import DistContext, work_units
from .executor import Components, Executor, Job
from .ledger import prompt_ledger, run_ledger
from .noise import random_search, zero_order

SEARCH_METHODS: dict[str, Method] = {  # config.METHODS, name -> the method coroutine
    "noise": random_search,
    "zero-order": zero_order,
    "prompt": prompt_chains,
    "reflection": reflection_flow,
}
if tuple(SEARCH_METHODS) != METHODS:  # config.METHODS names the methods this table runs
    raise RuntimeError(f"config.METHODS {METHODS} and engine SEARCH_METHODS {tuple(SEARCH_METHODS)} disagree")


class EngineError(RuntimeError):
    """A method or component broke the engine's contract (a bug, not bad input)."""


@dataclass
class PromptSpec:
    index: int  # position in the full prompt list (seeds and folder names derive from it)
    prompt: str
    metadata: dict  # the GenEval line; {"prompt": text} when the prompt has none


@dataclass
class RunResult:
    out: Path
    ledger: dict
    selected: dict[int, dict]  # prompt index -> done-marker
    resumed: bool
    rank: int = 0  # with several processes: this one's rank (rank 0's result covers the whole run)
    processes: int = 1


@dataclass
class _PromptRun:
    spec: PromptSpec
    coroutine: Generator
    cache: dict[str, dict]
    allowance: int
    was_done: bool
    root: Path
    candidates: list[Candidate] = field(default_factory=list)
    pending: list[Make] | NeedBudget | None = None
    notes: dict | None = None
    finished: bool = False
    deposited: bool = False
    wall: dict[str, float] = field(default_factory=dict)

    @property
    def spent(self) -> int:
        return len(self.candidates)

    def advance(self, value) -> None:
        try:
            self.pending = self.coroutine.send(value)
        except StopIteration as stop:
            self.pending, self.notes, self.finished = None, stop.value or {}, True
            return
        if isinstance(self.pending, list) and not self.pending:
            raise EngineError(f"prompt {self.spec.index}: the method yielded an empty request list")


def run_identity(config: RunConfig, prompts: Sequence[dict]) -> dict:
    """What decides a run's outputs; a folder holding another identity is another run."""
    return {"search": config.search_dict(),
            "prompts": {"count": len(prompts), "sha256": prompts_fingerprint(list(prompts))}}


def prepare_folder(config: RunConfig, all_prompts: Sequence[dict], out: str | Path,
                   resume: bool) -> tuple[RunFolder, bool]:
    """Check the output folder against this run (raises RunFolderError); nothing is written yet."""
    folder = RunFolder(Path(out))
    continuing = folder.check(run_identity(config, all_prompts), resume)
    return folder, continuing


class Engine:
    def __init__(self, config: RunConfig, components: Components, folder: RunFolder, progress=None):
        self.config = config
        self.c = components
        self.folder = folder
        self.method = SEARCH_METHODS[config.method]
        self.executor = Executor(components, batch_size=config.batch_size, workers=config.workers,
                                 on_keep=config.on_keep)
        self.bar = progress
        self._best: dict[int, float] = {}
        self._done = 0
        self._total = 0

    # ------------------------------------------------------------------------------------------
    def run(self, prompts: Sequence[PromptSpec]) -> dict[int, dict]:
        cfg = self.config
        self._total = len(prompts)
        share = cfg.early_stop is not None and cfg.reallocate == "prompts"
        selected: dict[int, dict] = {}
        try:
            for w in range(0, len(prompts), cfg.prompt_batch):
                wave = list(prompts[w : w + cfg.prompt_batch])
                done = {p.index: self.folder.read_done(p.index) for p in wave}
                for p in wave:
                    if done[p.index] is not None:
                        selected[p.index] = done[p.index]
                # A shared wave must be replayed whole: its finished prompts' savings feed the others.
                todo = wave if share and any(d is None for d in done.values()) else [
                    p for p in wave if done[p.index] is None]
                for p in wave:
                    if p not in todo:
                        self._note_done(done[p.index])
                if todo:
                    selected.update(self._wave(todo, done))
        finally:
            self.executor.close()
        return selected

    def _note_done(self, d: dict) -> None:
        self._done += 1
        if d.get("score") is not None:
            self._best[d["index"]] = d["score"]
        if self.bar is not None:
            self.bar.update(d.get("images", 0))
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None and self._best:
            mean = sum(self._best.values()) / len(self._best)
            self.bar.set_postfix_str(f"prompts {self._done}/{self._total} best {mean:.3f}", refresh=False)

    # ------------------------------------------------------------------------------------------
    def _start(self, spec: PromptSpec, was_done: bool) -> _PromptRun:
        root = self.folder.prompt_dir(spec.index)
        self.folder.write_metadata(spec.index, spec.metadata)
        records = self.folder.load_trace(spec.index)
        ctx = PromptContext(index=spec.index, prompt=spec.prompt, metadata=spec.metadata, config=self.config,
                            noise_like=self.c.generator.noise_like)
        run = _PromptRun(spec=spec, coroutine=self.method(ctx), cache={r["id"]: r for r in records},
                         allowance=self.config.budget, was_done=was_done, root=root)
        run.advance(None)
        return run

    def _wave(self, todo: list[PromptSpec], done: dict[int, dict | None]) -> dict[int, dict]:
        runs = [self._start(p, done[p.index] is not None) for p in todo]
        spare = 0
        out: dict[int, dict] = {}
        while True:
            makers = [r for r in runs if not r.finished and isinstance(r.pending, list)]
            if makers:
                self._step(makers)
            for r in runs:
                if r.finished and not r.deposited:
                    r.deposited = True
                    spare += r.allowance - r.spent  # zero unless the prompt stopped early
                    out[r.spec.index] = self._finish(r)
            waiting = [r for r in runs if not r.finished and isinstance(r.pending, NeedBudget)]
            for r in waiting:  # prompt order: deterministic
                grant = min(spare, r.pending.images)
                if grant > 0:
                    spare -= grant
                    r.allowance += grant
                    r.advance(grant)
            if not any(not r.finished and isinstance(r.pending, list) for r in runs):
                # Nobody is making images, so no more savings can come: release the waiting.
                stuck = [r for r in runs if not r.finished and isinstance(r.pending, NeedBudget)]
                if spare == 0:
                    for r in stuck:
                        r.advance(0)
                if all(r.finished for r in runs):
                    for r in runs:
                        if not r.deposited:
                            r.deposited = True
                            out[r.spec.index] = self._finish(r)
                    return out

    def _step(self, makers: list[_PromptRun]) -> None:
        jobs: list[Job] = []
        slots: list[tuple[_PromptRun, int]] = []
        results: dict[int, list] = {}
        for r in makers:
            ops: list[Make] = r.pending
            if r.spent + len(ops) > r.allowance:
                raise EngineError(f"prompt {r.spec.index}: the {self.config.method} method asked for "
                                  f"{r.spent + len(ops)} images; its budget is {r.allowance}")
            row: list = [None] * len(ops)
            for k, m in enumerate(ops):
                rec = r.cache.get(m.id)
                if rec is not None:
                    row[k] = self._from_trace(r, m, rec, r.spent + k)
                else:
                    jobs.append(Job(prompt_index=r.spec.index, original=r.spec.prompt, make=m))
                    slots.append((r, k))
            results[id(r)] = row
        if jobs:
            self.executor.run(jobs)
            for job in jobs:  # parents were loaded for this step only: keep memory flat (FLUX-size images)
                if job.make.parent is not None:
                    job.make.parent.image = None
        for job, (r, k) in zip(jobs, slots):
            results[id(r)][k] = job
        for r in makers:
            row = results[id(r)]
            new: list[Candidate] = []
            for k, item in enumerate(row):
                if isinstance(item, Job):
                    cand = item.to_candidate(order=r.spent + k)
                    cand.root = r.root
                    for stage, s in item.wall.items():
                        r.wall[stage] = r.wall.get(stage, 0.0) + s
                    new.append(cand)
                    row[k] = cand
            # Trace lines first, then images: see runs.py for why this order is crash-safe.
            self.folder.append_trace(r.spec.index, [c.to_record() for c in new])
            for c in new:
                self.folder.write_image(r.spec.index, c.file, c.image)
                c.image = None  # reloaded from disk when a later step needs it
            r.candidates.extend(row)
            top = best(r.candidates)
            if top.score is not None:
                self._best[r.spec.index] = top.score
            if self.bar is not None:
                self.bar.update(len(row))
            r.advance(row)
        self._postfix()

    def _from_trace(self, r: _PromptRun, m: Make, rec: dict, order: int) -> Candidate:
        want = {"kind": m.kind, "chain": m.chain, "round": m.round, "seed": m.seed, "order": order,
                "parent": m.parent.id if m.parent is not None else None}
        got = {k: rec.get(k) for k in want}
        if m.correct and got["kind"] == "resample" and self.config.on_keep == "resample":
            got["kind"] = m.kind  # made in the correction's place (executor.py)
        if got != want:
            raise RunFolderError(f"{self.folder.trace_path(r.spec.index)}: candidate {m.id} was made by another "
                                 f"search ({got} vs {want}); resume with the run's own settings or choose "
                                 f"another --out")
        return Candidate.from_record(rec, root=r.root)

    def _finish(self, r: _PromptRun) -> dict:
        top = best(r.candidates)
        marker = {
            "index": r.spec.index, "prompt": r.spec.prompt, "selected": top.id, "file": top.file,
            "score": top.score, "yes": top.verdict.yes, "images": r.spent, "budget": self.config.budget,
            "granted": r.allowance - self.config.budget, "unspent": r.allowance - r.spent,
            "notes": r.notes or {}, "wall_s": {k: round(v, 4) for k, v in sorted(r.wall.items())},
        }
        old = self.folder.read_done(r.spec.index) if r.was_done else None
        if old is not None and old.get("selected") == top.id:
            marker = old  # replayed for a shared wave: keep the original marker (and its times)
        else:
            self.folder.write_done(r.spec.index, top.file, marker)
        self._done += 1
        if self.bar is not None:
            self._postfix()
        return marker


# ----------------------------------------------------------------------------------------------


def write_ledger(folder: RunFolder, indices: Sequence[int], budget: int, components: dict[str, str],
                 session: dict | None = None) -> dict:
    """Rebuild ledger.json from the traces and done-markers of these prompts."""
    from ..io import atomic_write_json

    per_prompt = []
    for i in indices:
        d = folder.read_done(i)
        per_prompt.append(prompt_ledger(i, folder.load_trace(i), (d or {}).get("wall_s"), budget, d is not None))
    ledger = run_ledger(per_prompt, budget, components, session)
    atomic_write_json(folder.ledger_path, ledger)
    return ledger


def share_group(config: RunConfig) -> int:
    """Prompts searched by one process together: a wave whose prompts share their savings
    (--early-stop with --reallocate prompts) must stay whole, anything else can go anywhere."""
    return config.prompt_batch if config.early_stop is not None and config.reallocate == "prompts" else 1


def run(config: RunConfig, prompts: Sequence[PromptSpec], components: Components, folder: RunFolder,
        all_prompts: Sequence[dict] | None = None, resumed: bool = False, progress: bool = False,
        load_s: float = 0.0, dist: DistContext | None = None) -> RunResult:
    """Search every prompt, then write ledger.json (report.html is the caller's: pipeline.generate).

    `all_prompts` is the full prompt list the run was started from (before --limit); its
    fingerprint is part of the run's identity in config.json.

    With `dist` (one of several processes: distributed.py), every process calls this with the same
    arguments and searches its share of the prompts not yet done; rank 0 writes config.json before
    anyone else writes, and ledger.json once every process has finished. Its
    result then covers the whole run; another rank's covers its share and has no ledger.
    """
    t0 = time.perf_counter()
    dist = dist or DistContext()
    all_prompts = list(all_prompts) if all_prompts is not None else [p.metadata for p in prompts]
    identity = run_identity(config, all_prompts)
    # 1. Agree before anyone writes: the same run everywhere, and what is left as rank 0 reads it.
    dist.check_same("run settings or prompts", identity)
    resumed = dist.agree(resumed)
    by_index = {p.index: p for p in prompts}
    units = work_units(list(by_index), share_group(config))
    mine = dist.share(units, done=lambda unit: all(folder.read_done(i) is not None for i in unit))
    # 2. The run's shared files, while the others wait: no prompt folder ever exists without config.json.
    if dist.is_main:
        folder.remove_stale_temporaries()  # what a killed earlier attempt left half-written
        if folder.read_config() is None:
            folder.write_config(identity, {
                "reflectionflow": __version__,
                "config": config.to_dict(),
                "components": components.names,
                # The world oracle verifier IS the evaluator: say so wherever results are read.
                "verifier": components.names.get("verifier"),
            })
    dist.barrier()
    # 3. This process's share (whole waves where prompts share savings: the engine cuts the same waves).
    todo = [by_index[i] for unit in mine for i in unit]
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        who = f" (rank 0 of {dist.world_size})" if dist.distributed else ""
        bar = tqdm(total=len(todo) * config.budget, desc=f"{config.method} b{config.budget}{who}", unit="img")
    try:
        engine = Engine(config, components, folder, bar)
        selected = engine.run(todo)
    finally:
        if bar is not None:
            bar.close()
    mine_s = {"rank": dist.rank, "prompts": len(todo), "wall_s": round(time.perf_counter() - t0, 3),
              "load_s": round(load_s, 3)}
    # 4. The merge: rank 0, once every process has finished, from the per-prompt files alone.
    sessions = dist.all_gather(mine_s)
    if not dist.is_main:
        return RunResult(out=folder.root, ledger={}, selected=selected, resumed=resumed, rank=dist.rank,
                         processes=dist.world_size)
    session = {"wall_s": round(time.perf_counter() - t0, 3), "load_s": round(load_s, 3), "resumed": resumed}
    if dist.distributed:
        session |= {"load_s": max(s["load_s"] for s in sessions), "processes": dist.world_size, "ranks": sessions}
    indices = list(by_index)
    ledger = write_ledger(folder, indices, config.budget, components.names, session)
    selected = {i: d for i in indices if (d := folder.read_done(i)) is not None}
    return RunResult(out=folder.root, ledger=ledger, selected=selected, resumed=resumed, processes=dist.world_size)
