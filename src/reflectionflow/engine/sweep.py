"""`reflectionflow sweep`: methods x budgets x verifiers on one prompt set, as the paper's table.

One run per (method, verifier), at the largest budget, into OUT/runs/<method>-<verifier>/ (a full
`generate` run folder: resumable, distributed as `generate` is), except that noise images do not
depend on the verifier: on the world backend one noise run (with the first verifier) serves all,
each other verifier re-scoring its images. Each budget k = 1, 2, 4, ... B is
then read from that run's trace as posthoc.py does: each prompt's verifier pick among its first k
images in generation order, judged by the exact GenEval-Shapes evaluator (never the verifier's score).

For noise this is best-of-k exactly. For prompt and reflection the first k images of a budget-B run
are not a run at budget k (the reflection pool and the chains' split depend on B): the curve says
where a budget-B run's images paid off, and only its last point (k = B) is that method at budget B.
An equal-budget comparison at a smaller budget runs the sweep again with that --budget.

Intervals: a percentile bootstrap over prompts (resampled within each category, since GenEval's
overall is the mean of the category accuracies) of the same picks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import ConfigError, RunConfig
from ..plots import Series, curve_chart, format_estimate
from ..runs import RunFolder
from ..runtime import is_int
from ..stats import MIN_N, RESAMPLES, interval, strata_of, stratified_bootstrap
from .candidates import Candidate, best
from .distributed import DistContext
from .posthoc import _evaluator, _metadata, powers_up_to

COLUMNS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HEADERS = ("Single", "Two", "Counting", "Colors", "Position", "Attr. binding")


@dataclass
class SweepPoint:
    method: str
    verifier: str
    k: int  # samples per prompt
    prompts: int
    overall: float
    overall_ci: tuple[float, float]
    categories: dict[str, float] = field(default_factory=dict)
    categories_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    categories_n: dict[str, int] = field(default_factory=dict)  # prompts behind each category's value


def run_name(method: str, verifier: str) -> str:
    return f"{method}-{verifier}"


def check_sweep(methods: list[str], verifiers: list[str], budget: int) -> None:
    """Bad input before anything loads (ConfigError: one line, exit 2 at the CLI)."""
    from ..config import METHODS

    if not methods:
        raise ConfigError("--methods: give at least one method")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(bad)}; accepted: {', '.join(METHODS)}")
    if not verifiers or any(not v for v in verifiers):
        raise ConfigError("--verifiers: give at least one verifier name")
    if len(set(methods)) != len(methods) or len(set(verifiers)) != len(verifiers):
        raise ConfigError("--methods / --verifiers: a name is repeated")
    if not is_int(budget, 1):
        raise ConfigError(f"--budget must be an integer >= 1, got {budget!r}")


def run_config(base: RunConfig, method: str, verifier: str, budget: int) -> RunConfig:
    """The config of one (method, verifier) run: the split flags only for the methods that have one."""
    keep = method in ("prompt", "reflection")
    return replace(base, method=method, verifier=verifier, budget=budget,
                   chains=base.chains if keep else None, depth=base.depth if keep else None,
                   pool=base.pool if method == "reflection" else None)


def sweep(base: RunConfig, methods: list[str], verifiers: list[str], budget: int, out: str | Path,
          prompt: str | None = None, prompts: str | None = None, resume: bool = False,
          progress: bool = False, secrets=None, dist: DistContext | None = None) -> dict | None:
    """Run every (method, verifier), then (rank 0) write sweep.json, sweep.md and sweep.png.

    Every process calls this with the same arguments; `search` shares each run's prompts among
    them and waits for all before it returns, so rank 0 reads finished folders. Other ranks get None.
    """
    from . import prepare, search

    dist = dist or DistContext()
    check_sweep(methods, verifiers, budget)
    out = Path(out)
    configs = {(m, v): run_config(base, m, v, budget) for m in methods for v in verifiers}
    if resume and not out.is_dir():
        from ..runs import RunFolderError

        raise RunFolderError(f"--resume: {out}: no such sweep folder; drop --resume to start a new sweep there")
    # A run the interrupted sweep had not reached yet has no folder: it starts fresh.
    again = {(m, v): resume and (out / "runs" / run_name(m, v)).is_dir() for (m, v) in configs}
    # Check every run before the first one spends anything (a bad --chains for one method, a folder
    # from another sweep without --resume).
    for (m, v), cfg in configs.items():
        prepare(cfg, out / "runs" / run_name(m, v), prompt, prompts, again[m, v], secrets=secrets)
    built = _check_verifiers(base, verifiers)
    # Noise images do not depend on the verifier (seeds alone decide them): one noise run, made with
    # the first verifier, serves every verifier built here, each re-scoring its images (no image made
    # twice). A backend that builds its components itself (flux) runs noise once per verifier.
    rescored = {(m, v): (m, verifiers[0]) for (m, v) in configs
                if m == "noise" and v != verifiers[0] and v in built}
    for (m, v), cfg in configs.items():
        if (m, v) not in rescored:
            search(cfg, out / "runs" / run_name(m, v), prompt=prompt, prompts=prompts, resume=again[m, v],
                   progress=progress, secrets=secrets, dist=dist)
    result = None
    if dist.is_main:
        points = []
        for m, v in configs:
            src = rescored.get((m, v), (m, v))
            scorer = built[v] if (m, v) in rescored else None
            points += curve(out / "runs" / run_name(*src), m, v, budget, base.seed, rescore=scorer)
        settings = {run_name(m, v): cfg.to_dict() for (m, v), cfg in configs.items()}
        for (m, v), src in rescored.items():
            settings[run_name(m, v)] = {**settings[run_name(m, v)], "rescored_from": f"runs/{run_name(*src)}"}
        result = write_sweep(out, points, settings)
    dist.barrier()  # nobody leaves before sweep.json exists
    return result


def _check_verifiers(base: RunConfig, verifiers: list[str]) -> dict:
    """Build each verifier once now: a backend without its own checks (world) finds missing weights
    only when a component is built, which would be after the earlier runs of the sweep had spent
    their budget. World verifiers load in milliseconds; a backend with checks was checked by prepare
    (and nothing is built: {}). Returns {name: verifier}, kept for re-scoring the noise run."""
    from ..components import build
    from .backends import get_backend

    if get_backend(base.backend).check is not None:
        return {}
    return {v: build("verifier", v, **(base.options.get("verifier") or {})) for v in verifiers}


def rescore(folder: RunFolder, traces: dict[int, list[Candidate]], verifier, batch: int = 512) -> None:
    """Replace every candidate's verdict with `verifier`'s on its image and the original prompt."""
    items = [(i, c) for i, t in traces.items() for c in t]
    prompts = {i: (_metadata(folder, i) or {}).get("prompt") for i in traces}
    for j in range(0, len(items), batch):
        chunk = items[j : j + batch]
        for (i, c) in chunk:
            c.root = folder.prompt_dir(i)
        verdicts = verifier.score([c.load_image() for _, c in chunk], [prompts[i] for i, _ in chunk])
        for (_, c), v in zip(chunk, verdicts):
            c.verdict, c.image = v, None


# ----------------------------------------------------------------------------------------------
# Best-of-k from the trace, with per-prompt verdicts for the bootstrap


def pick_verdicts(root: str | Path, ks: list[int], rescore_with=None) -> dict[int, list[tuple[str, bool]]]:
    """k -> [(category tag, exact evaluator's verdict on the verifier's pick among the first k)].
    With `rescore_with` (a verifier component) the picks follow its scores instead of the run's."""
    folder = RunFolder(Path(root))
    traces = {i: sorted((Candidate.from_record(r) for r in folder.load_trace(i)), key=lambda c: c.order)
              for i in folder.prompt_indices()}
    traces = {i: t for i, t in traces.items() if t}
    if rescore_with is not None:
        rescore(folder, traces, rescore_with)
    metas = {i: _metadata(folder, i) for i in traces}
    judge = _evaluator(metas)
    if judge is None:
        raise ConfigError(f"{root}: sweep needs Shapes-world prompts (GenEval-Shapes metadata); the exact "
                          f"evaluator cannot judge these")
    cache: dict[tuple[int, str], bool] = {}
    out = {}
    for k in ks:
        rows = []
        for i, t in traces.items():
            c = best(t[:k])
            if (i, c.file) not in cache:
                cache[(i, c.file)] = judge(folder.prompt_dir(i) / c.file, metas[i])
            rows.append((metas[i].get("tag", "untagged"), cache[(i, c.file)]))
        out[k] = rows
    return out


def category_means(rows: list[tuple[str, bool]]) -> dict[str, float]:
    per: dict[str, list[bool]] = {}
    for tag, ok in rows:
        per.setdefault(tag, []).append(ok)
    return {t: float(np.mean(v)) for t, v in per.items()}


def bootstrap(rows: list[tuple[str, bool]], seed: int, resamples: int = RESAMPLES):
    """(overall, its 95% interval, per-category {tag: (lo, hi)}): stats.stratified_bootstrap over the
    prompts, resampled within each category so every resample has the categories of the point
    estimate; an interval is widened to hold the point estimate when a tiny, skewed sample's
    percentiles miss it."""
    tags = [tag for tag, _ in rows]
    strata = strata_of(tags)
    values = np.array([float(ok) for _, ok in rows])
    stat, per = stratified_bootstrap(values, strata, category_mean=True, resamples=resamples, seed=seed)
    cats = category_means(rows)
    overall = float(np.mean(list(cats.values())))
    names = [tags[pos[0]] for pos in strata]
    return overall, interval(stat[0], overall), {t: interval(d[0], cats[t]) for t, d in zip(names, per)}


def curve(root: Path, method: str, verifier: str, budget: int, seed: int = 0, rescore=None) -> list[SweepPoint]:
    ks = powers_up_to(budget)
    points = []
    for k, rows in pick_verdicts(root, ks, rescore).items():
        overall, oci, cci = bootstrap(rows, seed)
        counts = {t: sum(tag == t for tag, _ in rows) for t in cci}
        points.append(SweepPoint(method=method, verifier=verifier, k=k, prompts=len(rows), overall=overall,
                                 overall_ci=oci, categories=category_means(rows), categories_ci=cci,
                                 categories_n=counts))
    return points


# ----------------------------------------------------------------------------------------------
# Outputs


def format_markdown(points: list[SweepPoint]) -> str:
    """The paper's table: method, verifier, samples, overall and the six categories (95% intervals)."""
    head = ["Method", "Verifier", "Samples", "Prompts", "Overall", *HEADERS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [p.method, p.verifier, str(p.k), str(p.prompts), _pct(p.overall, p.overall_ci, p.prompts)]
        cells += [_pct(p.categories[t], p.categories_ci[t], p.categories_n.get(t)) if t in p.categories else "-"
                  for t in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nAccuracy (%) of the exact GenEval-Shapes evaluator on the verifier's pick among each prompt's "
            "first k images of one budget-B run (best-of-k from the trace; for prompt and reflection only "
            "k = B is that method at budget B). Brackets: bootstrap 95% interval over prompts; a value over "
            f"fewer than {MIN_N} prompts has none (its n is shown instead).\n")
    return "\n".join(lines) + "\n" + note


def _pct(x: float, ci: tuple[float, float], n: int | None) -> str:
    return format_estimate(x, ci, n, scale=100.0)


def write_plot(points: list[SweepPoint], path: Path) -> Path:
    """Overall accuracy vs samples (log2 axis), one series per (method, verifier), with interval bars
    (plots.curve_chart: every series visible, a point over too few prompts flagged)."""
    series: dict[tuple[str, str], list[SweepPoint]] = {}
    for p in points:
        series.setdefault((p.method, p.verifier), []).append(p)
    drawn = []
    for (m, v), ps in series.items():
        ps = sorted(ps, key=lambda p: p.k)
        drawn.append(Series(label=f"{m} / {v}", x=[p.k for p in ps], y=[p.overall for p in ps],
                            intervals=[tuple(p.overall_ci) for p in ps], n=[p.prompts for p in ps]))
    prompts = max((p.prompts for p in points), default=0)
    png = curve_chart(drawn, xlabel="samples per prompt (k, log scale)",
                      ylabel="GenEval-Shapes overall accuracy (%)", percent=True, ylim=(-2, 102),
                      title=f"Best-of-k on {prompts} prompts, exact evaluator; bars: bootstrap 95% interval")
    Path(path).write_bytes(png)
    return Path(path)


def write_sweep(out: Path, points: list[SweepPoint], configs: dict[str, dict]) -> dict:
    data = {"points": [asdict(p) for p in points], "runs": configs,
            "note": "best-of-k from one run per (method, verifier); accuracy by the exact evaluator"}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(out / "sweep.json")
    (out / "sweep.md").write_text(format_markdown(points), encoding="utf-8")
    write_plot(points, out / "sweep.png")
    return data
