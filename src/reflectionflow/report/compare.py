"""Compare runs on the same prompts: one table (terminal, compare.md, compare.json) and one page.

Metric by metric, each run's value with a 95 % bootstrap interval over prompts, and each run's
difference from the first run with a paired interval: every resample draws the same prompts for
every run (stratified by category where the prompts have one, so GenEval's per-category counts
hold), which is what makes a small difference between two runs on the same prompts measurable.
GenEval-Shapes is summarised as GenEval does (mean of the category accuracies), every other
per-image metric as the mean over prompts of each prompt's mean score. FID is a set-level number:
its interval is the one `evaluate` computed (run images resampled), with no paired difference.

Prompts are matched by their text (the k-th occurrence of a text with the k-th), so runs on
reordered or partly overlapping prompt files still pair up; only prompts every run has are compared.
Samples, NFE and VLM calls come from each run's ledger for those prompts. The page (compare.html)
is self-contained: the side-by-side images of the prompts where the runs differ most are inlined
as data URLs, so it can be moved or mailed on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, atomic_write_text
from ..metrics import evaluated_metrics, read_metric
from ..metrics.base import MetricError, PromptItem, scan_run
from ..plots import COLORS, data_url, forest_chart
from ..stats import MIN_N, interval, point_estimate, strata_of
from ..stats import stratified_bootstrap as paired_bootstrap  # runs resampled together: paired by prompt

GENEVAL = "geneval-shapes"
THUMB = 256  # largest side of an inlined image
PIXEL_TIES = 200  # prompts whose images are compared when the metrics cannot rank them


class CompareError(ValueError):
    """Runs that cannot be compared (too few, nothing in common, a metric missing)."""


Key = tuple[str, int]  # (prompt text, occurrence)


@dataclass
class Run:
    name: str
    root: Path
    config: dict
    ledger: dict
    items: dict[Key, PromptItem]  # the prompts, by key, in folder order

    @property
    def verifier(self) -> str | None:
        return self.config.get("verifier") or (self.config.get("components") or {}).get("verifier")


@dataclass
class Estimate:
    value: float | None
    ci95: tuple[float, float] | None = None


@dataclass
class MetricComparison:
    name: str
    higher_is_better: bool
    kind: str  # "prompt" (paired bootstrap over prompts) or "set" (FID)
    prompts: int  # prompts compared
    runs: list[Estimate]
    differences: list[Estimate | None]  # run k - run 0 (None for run 0 and set metrics)
    same_as_run_verifier: list[bool]
    categories: dict[str, dict] = field(default_factory=dict)  # category -> {"prompts", "runs", "differences"}
    wins: list[dict | None] = field(default_factory=list)  # run k vs run 0: prompts better / worse / tied
    coverage: list[int] = field(default_factory=list)  # prompts each run has a score for (of all it has)
    per_prompt: dict[Key, list[float]] = field(default_factory=dict, repr=False)


@dataclass
class Comparison:
    runs: list[Run]
    common: list[Key]  # in the first run's order
    metrics: list[MetricComparison]
    costs: list[dict]
    differ_most: list[dict]
    notes: list[str]
    bootstrap: dict


# ----------------------------------------------------------------------------------------------
# Reading runs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _keyed(items: list[PromptItem]) -> dict[Key, PromptItem]:
    seen: Counter = Counter()
    out = {}
    for it in items:
        out[(it.prompt, seen[it.prompt])] = it
        seen[it.prompt] += 1
    return out


def _names(roots: list[Path]) -> list[str]:
    names = [r.name or str(r) for r in roots]
    if len(set(names)) < len(names):
        names = [f"{r.parent.name}/{r.name}" for r in roots]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    return names


def load_runs(roots: list[str | Path]) -> list[Run]:
    roots = [Path(r) for r in roots]
    if len(roots) < 2:
        raise CompareError(f"compare needs at least two run folders, got {len(roots)}")
    runs = []
    for name, root in zip(_names(roots), roots):
        try:
            items = scan_run(root)
        except MetricError as e:
            raise CompareError(str(e)) from None
        runs.append(Run(name=name, root=root, config=_read_json(root / "config.json"),
                        ledger=_read_json(root / "ledger.json"), items=_keyed(items)))
    return runs


def _prompt_values(run: Run, name: str, rows: list[dict]) -> tuple[dict[Key, float], dict[Key, str]]:
    """Each prompt's mean over its images (GenEval: the share correct); prompts without a score are left out."""
    by_index = {it.index: key for key, it in run.items.items()}
    acc: dict[Key, list[float]] = {}
    for r in rows:
        key = by_index.get(str(r.get("metadata_index") if name == GENEVAL else r.get("index")))
        if key is None:
            continue
        v = float(bool(r.get("correct"))) if name == GENEVAL else r.get("score")
        if v is not None:
            acc.setdefault(key, []).append(float(v))
    values = {k: float(np.mean(v)) for k, v in acc.items()}
    cats = {k: run.items[k].category for k in values if run.items[k].category is not None}
    return values, cats


# ----------------------------------------------------------------------------------------------
# Statistics


def _strata(cats: list[str | None]) -> list[np.ndarray]:
    return strata_of(cats)


def _percentile(x: np.ndarray) -> tuple[float, float]:
    return interval(x)


def compare_metric(runs: list[Run], name: str, common: list[Key], resamples: int, seed: int) -> MetricComparison:
    read = [read_metric(r.root, name) for r in runs]
    summaries = [s for _, s in read]
    higher = bool(summaries[0].get("higher_is_better", True))
    same = [bool(s.get("same_as_run_verifier")) for s in summaries]
    if summaries[0].get("kind") == "set":  # FID: each run's own number and interval
        ests = [Estimate(s.get("value"), tuple(s["ci95"]) if s.get("ci95") else None) for s in summaries]
        return MetricComparison(name=name, higher_is_better=False, kind="set",
                                prompts=min(int(s.get("n_prompts", 0)) for s in summaries), runs=ests,
                                differences=[None] * len(runs), same_as_run_verifier=same, wins=[None] * len(runs))
    per_run = [_prompt_values(r, name, rows) for r, (rows, _) in zip(runs, read)]
    keys = [k for k in common if all(k in vals for vals, _ in per_run)]
    if not keys:
        raise CompareError(f"metric {name}: no prompt has a score in every run")
    values = np.array([[vals[k] for k in keys] for vals, _ in per_run])  # (R, n)
    cats = [per_run[0][1].get(k) for k in keys]
    strata = _strata(cats)
    category_mean = name == GENEVAL
    point = point_estimate(values, strata, category_mean)
    stat, per_stratum = paired_bootstrap(values, strata, category_mean, resamples, seed)
    ests = [Estimate(float(point[r]), _percentile(stat[r])) for r in range(len(runs))]
    diffs = [None] + [Estimate(float(point[r] - point[0]), _percentile(stat[r] - stat[0]))
                      for r in range(1, len(runs))]
    categories = {}
    if len(strata) > 1:
        for pos, boot in zip(strata, per_stratum):
            cat = cats[pos[0]] or "(none)"
            mean = values[:, pos].mean(-1)
            categories[cat] = {
                "prompts": int(len(pos)),
                "runs": [Estimate(float(mean[r]), _percentile(boot[r])) for r in range(len(runs))],
                "differences": [None] + [Estimate(float(mean[r] - mean[0]), _percentile(boot[r] - boot[0]))
                                         for r in range(1, len(runs))],
            }
    sign = 1.0 if higher else -1.0
    wins = [None] + [{"better": int((sign * (values[r] - values[0]) > 0).sum()),
                      "worse": int((sign * (values[r] - values[0]) < 0).sum()),
                      "tied": int((values[r] == values[0]).sum())} for r in range(1, len(runs))]
    return MetricComparison(name=name, higher_is_better=higher, kind="prompt", prompts=len(keys), runs=ests,
                            differences=diffs, same_as_run_verifier=same, categories=categories, wins=wins,
                            coverage=[len(vals) for vals, _ in per_run],
                            per_prompt={k: values[:, j].tolist() for j, k in enumerate(keys)})


def _costs(run: Run, common: list[Key]) -> dict:
    """Samples, NFE, VLM calls and wall seconds of the compared prompts, from the run's ledger."""
    cfg = run.config.get("config", {})
    head = {"name": run.name, "path": str(run.root), "method": cfg.get("method"), "budget": cfg.get("budget"),
            "backend": cfg.get("backend"), "verifier": run.verifier}
    per = {int(p["index"]): p for p in run.ledger.get("per_prompt", [])}
    rows = [per.get(int(run.items[k].index)) for k in common]
    if not per or any(r is None for r in rows):
        return head | {"prompts": len(common), "samples": None, "nfe": None, "vlm_calls": None, "wall_s": None,
                       "note": "no ledger.json for these prompts (not a run of `reflectionflow generate`?)"}
    n = len(rows)
    tot = {k: sum(r.get(k, 0) for r in rows) for k in ("images", "nfe", "vlm_calls", "tokens", "wall_s")}
    return head | {"prompts": n, "samples": tot["images"], "nfe": tot["nfe"], "vlm_calls": tot["vlm_calls"],
                   "tokens": tot["tokens"], "wall_s": round(tot["wall_s"], 3),
                   "samples_per_prompt": tot["images"] / n, "nfe_per_prompt": tot["nfe"] / n,
                   "vlm_calls_per_prompt": tot["vlm_calls"] / n}


# ----------------------------------------------------------------------------------------------
# Where the runs differ most


def _selected(it: PromptItem) -> Path | None:
    return it.samples[0] if it.samples else None


def _small(path: Path | None, size: int = 32) -> np.ndarray | None:
    from PIL import Image

    from ..io import ImageError, load_image

    if path is None:
        return None
    try:
        im = load_image(path, pil=True)  # io.decode_image: its byte and pixel caps
    except ImageError:
        return None
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float64)


def _pixel_spread(runs: list[Run], key: Key) -> float:
    ims = [_small(_selected(r.items[key])) for r in runs]
    ims = [im for im in ims if im is not None]
    if len(ims) < 2:
        return 0.0
    return float(np.mean([np.abs(a - b).mean() for i, a in enumerate(ims) for b in ims[i + 1 :]]))


def differ_most(runs: list[Run], metrics: list[MetricComparison], common: list[Key], top: int) -> list[dict]:
    """The prompts ranked by how much the runs disagree: the spread of each per-prompt metric across
    runs in units of that metric's spread over all prompts, summed; ties (and runs with no per-prompt
    metric) broken by how different the selected images look."""
    if top <= 0 or not common:
        return []
    per = [m for m in metrics if m.kind == "prompt"]
    spread = dict.fromkeys(common, 0.0)
    for m in per:
        allv = np.array(list(m.per_prompt.values()))
        scale = float(allv.std()) or 1.0
        for k, vals in m.per_prompt.items():
            spread[k] += (max(vals) - min(vals)) / scale
    order = sorted(common, key=lambda k: -spread[k])
    cut = spread[order[min(top, len(order)) - 1]]
    sure = [k for k in order if spread[k] > cut]
    ties = [k for k in order if spread[k] == cut][:PIXEL_TIES]
    pixels = {k: _pixel_spread(runs, k) for k in ties}
    ranked = sure + sorted(ties, key=lambda k: -pixels[k])
    out = []
    for k in ranked[:top]:
        first = runs[0].items[k]
        out.append({"prompt": k[0], "occurrence": k[1], "index": first.index, "category": first.category,
                    "spread": round(spread[k], 4),
                    "pixel_difference": round(pixels[k] if k in pixels else _pixel_spread(runs, k), 3),
                    "values": {m.name: m.per_prompt.get(k) for m in per},
                    "images": [str(_selected(r.items[k]).relative_to(r.root)) if _selected(r.items[k]) else None
                               for r in runs]})
    return out


# ----------------------------------------------------------------------------------------------
# The comparison


def compare_runs(roots: list[str | Path], metrics: list[str] | None = None, top: int = 8, resamples: int = 1000,
                 seed: int = 0) -> Comparison:
    if resamples < 10:
        raise CompareError(f"--bootstrap must be >= 10 resamples, got {resamples}")
    if top < 0:
        raise CompareError(f"--top must be >= 0, got {top}")
    runs = load_runs(roots)
    notes = []
    common = [k for k in runs[0].items if all(k in r.items for r in runs[1:])]
    if not common:
        raise CompareError(f"the runs share no prompt ({', '.join(r.name for r in runs)}); compare runs on the same "
                           f"prompts")
    for r in runs:
        if len(r.items) > len(common):
            notes.append(f"{r.name}: {len(r.items) - len(common)} of its {len(r.items)} prompts are not in every run "
                         f"and are left out")
    available = [evaluated_metrics(r.root) for r in runs]
    if metrics:
        for name in metrics:
            missing = [r.name for r, have in zip(runs, available) if name not in have]
            if missing:
                raise CompareError(f"metric {name}: not evaluated in {', '.join(missing)}; run `reflectionflow "
                                   f"evaluate DIR --metric {name}` there first")
        names = list(dict.fromkeys(metrics))
    else:
        names = [n for n in available[0] if all(n in a for a in available[1:])]
        for r, have in zip(runs, available):
            extra = [n for n in have if n not in names]
            if extra:
                notes.append(f"{r.name}: {', '.join(extra)} not evaluated in every run; left out")
        if not names:
            notes.append("no metric is evaluated in every run: score each with `reflectionflow evaluate DIR "
                         "[--metric NAME]` for metric rows")
    comps = [compare_metric(runs, n, common, resamples, seed) for n in names]
    for m in comps:
        for r, n in zip(runs, m.coverage):
            have = sum(bool(it.samples) for it in r.items.values())
            if n < have:
                notes.append(f"{m.name} in {r.name} scores {n} of its {have} prompts with images (evaluated before "
                             f"the run finished, or images failed to score): re-run `reflectionflow evaluate "
                             f"{r.root} --metric {m.name}`")
        flagged = [r.name for r, s in zip(runs, m.same_as_run_verifier) if s]
        if flagged:
            notes.append(f"{m.name} is the verifier of {', '.join(flagged)}: those runs selected their samples by "
                         f"it, so it is not an independent measurement there")
        if m.kind == "set":
            notes.append(f"{m.name}: a set-level metric; each run's interval is its own bootstrap (run images "
                         f"resampled), there is no paired difference")
    costs = [_costs(r, common) for r in runs]
    budgets = {c["samples"] for c in costs if c["samples"] is not None}
    if len(budgets) > 1:
        notes.append("the runs spent different numbers of samples on these prompts: not an equal-budget comparison")
    return Comparison(runs=runs, common=common, metrics=comps, costs=costs,
                      differ_most=differ_most(runs, comps, common, top), notes=notes,
                      bootstrap={"resamples": resamples, "seed": seed, "paired": True,
                                 "stratified_by": "category" if any(m.categories for m in comps) else None})


# ----------------------------------------------------------------------------------------------
# Output: the table (terminal and markdown), JSON, HTML


def _fmt(x: float | None, digits: int | str = 3, sign: bool = False) -> str:
    """digits: decimals, or a format spec ("4g") for numbers too small for fixed decimals."""
    if x is None:
        return "n/a"
    spec = digits if isinstance(digits, str) else f".{digits}f"
    if isinstance(digits, str) and not spec.startswith("."):
        spec = "." + spec
    return format(x, ("+" if sign else "") + spec)


def _digits(m: MetricComparison) -> int | str:
    vals = [abs(v) for e in m.runs for v in (e.value, *(e.ci95 or ())) if v is not None]
    if not vals or max(vals) == 0:
        return 3
    if max(vals) < 0.01:
        return "3g"  # tiny numbers (FID of a random test network): significant digits, not decimals
    return 3 if max(vals) < 10 else 2


def _est(e: Estimate | None, digits: int | str, sign: bool = False, n: int | None = None) -> str:
    """'0.615 [0.520, 0.701]'; over fewer than MIN_N prompts the value and its n, no interval."""
    if e is None:
        return ""
    if n is not None and n < MIN_N and e.value is not None:
        return f"{_fmt(e.value, digits, sign)} (n={n}, no interval)"
    ci = f" [{_fmt(e.ci95[0], digits, sign)}, {_fmt(e.ci95[1], digits, sign)}]" if e.ci95 else ""
    return _fmt(e.value, digits, sign) + ci


def _significant(e: Estimate | None, n: int | None = None) -> bool:
    if n is not None and n < MIN_N:
        return False
    return e is not None and e.ci95 is not None and (e.ci95[0] > 0 or e.ci95[1] < 0)


def _n(m: MetricComparison) -> int | None:
    """The prompts behind a metric's intervals (None for a set-level metric: its interval is its own)."""
    return m.prompts if m.kind == "prompt" else None


def table_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The comparison as one table: a row per cost line and per metric (categories indented)."""
    head = ["", *[r.name for r in c.runs], *[f"{r.name} - {c.runs[0].name}" for r in c.runs[1:]]]
    blank = [""] * (len(c.runs) - 1)
    rows = []
    for label, key, digits in (("samples / prompt", "samples_per_prompt", 2), ("NFE / prompt", "nfe_per_prompt", 1),
                               ("VLM calls / prompt", "vlm_calls_per_prompt", 2)):
        vals = [cost.get(key) for cost in c.costs]
        if any(v is not None for v in vals) and not (key == "vlm_calls_per_prompt" and not any(vals)):
            rows.append([label, *[_fmt(v, digits) for v in vals], *blank])
    for m in c.metrics:
        d = _digits(m)
        arrow = "higher is better" if m.higher_is_better else "lower is better"
        label = f"{m.name} ({arrow}; {m.prompts} prompts)"
        n = _n(m)
        cells = [_est(e, d, n=n) + (" !" if s else "") for e, s in zip(m.runs, m.same_as_run_verifier)]
        diffs = [_est(e, d, sign=True, n=n) + (" *" if _significant(e, n) else "") for e in m.differences[1:]]
        rows.append([label, *cells, *diffs])
        for cat, cc in m.categories.items():
            k = cc["prompts"]
            rows.append([f"  {cat} ({k})", *[_est(e, d, n=k) for e in cc["runs"]],
                         *[_est(e, d, sign=True, n=k) + (" *" if _significant(e, k) else "")
                           for e in cc["differences"][1:]]])
    return head, rows


LEGEND = ("95 % bootstrap intervals over prompts; differences paired by prompt. * the interval of the difference "
          f"excludes 0. ! the metric is that run's own verifier (not independent). Over fewer than {MIN_N} prompts "
          "no interval is given.")


def format_table(c: Comparison) -> str:
    head, rows = table_rows(c)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out) + "\n" + LEGEND


def format_markdown(c: Comparison) -> str:
    head, rows = table_rows(c)
    esc = lambda s: s.replace("|", "\\|").replace("  ", "&nbsp;&nbsp;")  # noqa: E731
    lines = [f"# Compare: {' vs '.join(r.name for r in c.runs)}", "",
             "runs: " + "; ".join(f"{r.name} = `{r.root}`" for r in c.runs), "",
             "| " + " | ".join(esc(h) or "metric" for h in head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    lines += ["", LEGEND]
    if c.notes:
        lines += ["", *[f"- {n}" for n in c.notes]]
    return "\n".join(lines) + "\n"


def to_dict(c: Comparison) -> dict:
    def metric(m: MetricComparison) -> dict:
        d = asdict(m)
        d.pop("per_prompt")
        return d

    return {"runs": c.costs, "prompts_compared": len(c.common), "bootstrap": c.bootstrap,
            "metrics": [metric(m) for m in c.metrics], "differ_most": c.differ_most, "notes": c.notes}


def write_comparison(c: Comparison, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"html": out / "compare.html", "md": out / "compare.md", "json": out / "compare.json"}
    atomic_write_json(paths["json"], to_dict(c))
    atomic_write_text(paths["md"], format_markdown(c))
    atomic_write_text(paths["html"], render_html(c))
    return paths


# -- HTML ---------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left} td:not(.l){white-space:nowrap}
tr.cat td{color:#555;font-size:12px}
.muted{color:#777} .note{background:#fff7e0;border:1px solid #f0d890;padding:6px 10px;margin:8px 0}
.sig{color:#18794e;font-weight:600} .own{color:#b42318}
.prompt{background:#fff;border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px 10px}
.row{display:flex;flex-wrap:wrap;gap:10px;margin-top:6px}
figure{margin:0;width:200px;border:1px solid #e3e3e3;border-radius:6px;padding:4px;background:#fff}
figure img{width:192px;height:192px;object-fit:contain;display:block;background:#999}
figure img.px{image-rendering:pixelated}
figcaption{font-size:12px} .vals{font:11px/1.3 ui-monospace,monospace;color:#444}
img.chart{display:block;max-width:360px}
"""
OWN = " <span class=own title=\"the run's own verifier: not independent\">!</span>"


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _data_url(path: Path) -> tuple[str, bool]:
    """A thumbnail (largest side THUMB) as a data: URL; True when it is small enough to show pixelated."""
    from PIL import Image

    from ..io import load_image

    im = load_image(path, pil=True)  # io.decode_image: its caps; an unreadable image is an error naming it
    small = max(im.size) <= 128
    if max(im.size) > THUMB:
        im.thumbnail((THUMB, THUMB), Image.LANCZOS)
    buf = io.BytesIO()
    if small:
        im.save(buf, format="PNG")
        mime = "image/png"
    else:
        im.save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii"), small


def _interval_chart(m: MetricComparison, names: list[str]) -> str:
    """Each run's value and interval on one axis (plots.forest_chart), as an inline image."""
    if not any(e.value is not None for e in m.runs):
        return ""
    png = forest_chart(names, [e.value for e in m.runs], [e.ci95 for e in m.runs], xlabel=m.name, n=_n(m))
    return f"<img class=chart src=\"{data_url(png)}\" alt=\"{_e(m.name)} by run, with 95 % intervals\">"


def _wins(w: dict | None) -> str:
    if not w:
        return ""
    return (f"<div class=muted style=\"font-size:11px;font-weight:400\">better on {w['better']}, worse on "
            f"{w['worse']}, tied on {w['tied']} prompts</div>")


def _runs_table(c: Comparison) -> str:
    head = ("<tr><th class=l>run</th><th class=l>folder</th><th class=l>method</th><th>budget</th>"
            "<th class=l>verifier</th><th>prompts</th><th>samples</th><th>samples / prompt</th><th>NFE</th>"
            "<th>NFE / prompt</th><th>VLM calls</th><th>wall s</th></tr>")
    rows = []
    for i, cost in enumerate(c.costs):
        swatch = f"<span style=\"color:{COLORS[i % len(COLORS)]}\">&#9679;</span> "
        rows.append(
            f"<tr><td class=l>{swatch}<b>{_e(cost['name'])}</b></td><td class=l>{_e(cost['path'])}</td>"
            f"<td class=l>{_e(cost.get('method') or '')}</td><td>{_e(cost.get('budget') or '')}</td>"
            f"<td class=l>{_e(cost.get('verifier') or '')}</td><td>{cost['prompts']}</td>"
            f"<td>{_e(cost.get('samples') if cost.get('samples') is not None else 'n/a')}</td>"
            f"<td>{_fmt(cost.get('samples_per_prompt'), 2)}</td>"
            f"<td>{_e(cost.get('nfe') if cost.get('nfe') is not None else 'n/a')}</td>"
            f"<td>{_fmt(cost.get('nfe_per_prompt'), 1)}</td>"
            f"<td>{_e(cost.get('vlm_calls') if cost.get('vlm_calls') is not None else 'n/a')}</td>"
            f"<td>{_fmt(cost.get('wall_s'), 2)}</td></tr>")
    return "<h2>Runs and what they spent</h2><table>" + head + "".join(rows) + "</table>"


def _metrics_table(c: Comparison) -> str:
    if not c.metrics:
        return "<h2>Metrics</h2><p class=muted>No metric is evaluated in every run.</p>"
    names = [r.name for r in c.runs]
    head = ("<tr><th class=l>metric</th><th>prompts</th>" + "".join(f"<th>{_e(n)}</th>" for n in names)
            + "".join(f"<th>{_e(n)} &minus; {_e(names[0])}</th>" for n in names[1:]) + "<th>intervals</th></tr>")
    rows = []
    for m in c.metrics:
        d = _digits(m)
        arrow = "&uarr;" if m.higher_is_better else "&darr;"
        n = _n(m)
        cells = "".join(f"<td>{_e(_est(e, d, n=n))}{OWN if s else ''}</td>"
                        for e, s in zip(m.runs, m.same_as_run_verifier))
        diffs = "".join(f"<td{' class=sig' if _significant(e, n) else ''}>"
                        f"{_e(_est(e, d, sign=True, n=n)) or '&ndash;'}{_wins(w)}</td>"
                        for e, w in zip(m.differences[1:], m.wins[1:]))
        rows.append(f"<tr><td class=l><b>{_e(m.name)}</b> {arrow}</td><td>{m.prompts}</td>{cells}{diffs}"
                    f"<td>{_interval_chart(m, names)}</td></tr>")
        for cat, cc in m.categories.items():
            k = cc["prompts"]
            cells = "".join(f"<td>{_e(_est(e, d, n=k))}</td>" for e in cc["runs"])
            diffs = "".join(f"<td{' class=sig' if _significant(e, k) else ''}>{_e(_est(e, d, sign=True, n=k))}</td>"
                            for e in cc["differences"][1:])
            rows.append(f"<tr class=cat><td class=l>&nbsp;&nbsp;{_e(cat)}</td><td>{cc['prompts']}</td>{cells}{diffs}"
                        "<td></td></tr>")
    return ("<h2>Metrics</h2><table>" + head + "".join(rows) + "</table>"
            f"<p class=muted>{_e(LEGEND)} {c.bootstrap['resamples']} resamples, seed {c.bootstrap['seed']}"
            f"{', stratified by category' if c.bootstrap.get('stratified_by') else ''}.</p>")


def _differ_section(c: Comparison) -> str:
    if not c.differ_most:
        return ""
    names = [r.name for r in c.runs]
    parts = ["<h2>Where the runs differ most</h2><p class=muted>Prompts ranked by the spread of their per-prompt "
             "metrics across runs (each in units of its spread over all prompts), then by how different the "
             "selected images look. Each run's selected sample.</p>"]
    for d in c.differ_most:
        figs = []
        for i, (run, rel) in enumerate(zip(c.runs, d["images"])):
            vals = "".join(f"<div>{_e(m)} {_fmt(v[i], 3) if v else 'n/a'}</div>" for m, v in d["values"].items())
            if rel is None:
                img = "<div class=muted>no image</div>"
            else:
                url, px = _data_url(run.root / rel)
                img = (f"<img src=\"{url}\" alt=\"{_e(names[i])}: {_e(rel)}\"{' class=px' if px else ''} "
                       "onerror=\"console.error('compare: broken image ' + this.alt)\">")
            figs.append(f"<figure>{img}<figcaption><b style=\"color:{COLORS[i % len(COLORS)]}\">{_e(names[i])}"
                        f"</b> <span class=muted>{_e(rel or '')}</span><div class=vals>{vals}</div>"
                        "</figcaption></figure>")
        cat = f" <span class=muted>[{_e(d['category'])}]</span>" if d.get("category") else ""
        parts.append(f"<div class=prompt><b>#{_e(d['index'])}</b> {_e(d['prompt'])}{cat}"
                     f"<div class=row>{''.join(figs)}</div></div>")
    return "".join(parts)


def render_html(c: Comparison) -> str:
    title = " vs ".join(r.name for r in c.runs)
    body = [f"<h1>reflectionflow compare: {_e(title)}</h1>",
            f"<div class=muted>{len(c.common)} prompts in every run</div>"]
    body += [f"<div class=note>{_e(n)}</div>" for n in c.notes]
    body += [_runs_table(c), _metrics_table(c), _differ_section(c)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>compare {_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
