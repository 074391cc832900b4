"""report.html: a static, offline page that tells a run's whole story.

One self-contained file beside the run's images (relative links, inline CSS and SVG, no network):
the resolved config, the ledger by stage, the post-hoc best-of-k curve, and for every prompt its
candidates as a tree of thumbnails (noise pool, chains, zero-order neighbours) with each image's
verifier score, the reflection that produced it and the prompt it was made from; the final
selection is marked. The only script is an `onerror` on each thumbnail that reports a missing
image to the console, so a headless browser can check the page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..engine.candidates import Candidate
from ..engine.posthoc import CurvePoint, best_of_k
from ..io import atomic_write_text
from ..redact import scrub
from ..runs import RunFolder

OPEN_PROMPTS = 12  # prompts shown expanded
EAGER_IMAGES = 400  # thumbnails loaded at once; the rest lazily (big runs)

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left}
.muted{color:#777} .note{background:#fff7e0;border:1px solid #f0d890;padding:6px 10px;margin:8px 0}
details.prompt{background:#fff;border:1px solid #ddd;border-radius:6px;margin:8px 0;padding:6px 10px}
details.prompt>summary{cursor:pointer;font-weight:600}
.ok{color:#18794e} .bad{color:#b42318}
.grid{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
.row{display:flex;align-items:flex-start;gap:4px;margin:4px 0}
.branches{display:flex;flex-direction:column}
.arrow{align-self:center;color:#999;font-size:18px;padding:0 2px}
figure.node{margin:0;width:132px;border:2px solid #e3e3e3;border-radius:6px;padding:4px;background:#fff}
figure.node img{width:96px;height:96px;image-rendering:pixelated;display:block;margin:0 auto;background:#999}
figure.node figcaption{font-size:12px}
figure.selected{border-color:#18794e;box-shadow:0 0 0 2px #18794e55}
.badge{background:#18794e;color:#fff;border-radius:3px;padding:0 4px;font-size:11px}
.refl{font:11px/1.3 ui-monospace,monospace;white-space:pre-wrap;color:#444;margin-top:2px}
.pr{font-size:11px;color:#555;margin-top:2px}
.err{font-size:11px;color:#b42318}
.label{font-size:12px;color:#555;margin:6px 0 0}
img.chart{display:block;max-width:720px;margin:6px 0}
.ev{font-size:11px} dl.notes{display:grid;grid-template-columns:max-content auto;gap:0 10px;font-size:12px;color:#555}
dl.notes dt{font-weight:600} dl.notes dd{margin:0}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def write_report(root: str | Path, evaluate: bool = True) -> Path:
    """Build OUT/report.html from the folder (config, ledger, traces, done-markers)."""
    folder = RunFolder(Path(root))
    config = folder.read_config() or {}
    ledger = json.loads(folder.ledger_path.read_text(encoding="utf-8")) if folder.ledger_path.is_file() else {}
    curve = best_of_k(folder.root, evaluate=evaluate)
    body = [_header(folder, config, ledger), _evaluation_note(folder), _ledger_table(ledger), _curve_section(curve),
            _metrics_section(folder)]
    body.append("<h2>Prompts</h2>")
    counter = [0]
    for n, i in enumerate(folder.prompt_indices()):
        body.append(_prompt_section(folder, i, open_=n < OPEN_PROMPTS, counter=counter, evaluate=evaluate))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>reflectionflow run {_e(folder.root.name)}</title><style>{CSS}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
    atomic_write_text(folder.report_path, scrub(page))  # no secret an endpoint echoed reaches the page
    return folder.report_path


def _header(folder: RunFolder, config: dict, ledger: dict) -> str:
    cfg = config.get("config", {})
    comps = config.get("components", {})
    split = ""
    if cfg.get("method") in ("prompt", "reflection"):
        split = f" = {cfg.get('pool') or 0} pool + {cfg.get('chains')} chains x {cfg.get('depth')} rounds"
    rows = [("method", cfg.get("method")), ("budget (images per prompt)", f"{cfg.get('budget')}{split}"),
            ("seed", cfg.get("seed")), ("backend", cfg.get("backend"))]
    rows += [(k, v) for k, v in comps.items()]
    relevant = {"zero-order": ("neighbors", "threshold"), "prompt": ("early_stop", "reallocate"),
                "reflection": ("refine_prompts", "backtrack", "early_stop", "reallocate")}
    for k in relevant.get(cfg.get("method"), ()):
        if k in cfg and not (k == "reallocate" and cfg.get("early_stop") is None):
            rows.append((k, cfg[k]))
    procs = (ledger.get("session") or {}).get("processes") or 1
    out = [f"<h1>reflectionflow run: {_e(folder.root.name)}</h1>",
           f"<div class=muted>reflectionflow {_e(config.get('reflectionflow', '?'))}; "
           f"{ledger.get('prompts_done', '?')}/{ledger.get('prompts', '?')} prompts done"
           f"{f'; last session: {procs} processes' if procs > 1 else ''}</div>"]
    if str(comps.get("verifier", "")).startswith("world-oracle"):
        out.append("<div class=note>The verifier is the world oracle: the exact GenEval-Shapes evaluator. "
                   "Accuracies here are the paper's oracle-verifier upper bound, not a learned judge's.</div>")
    out.append("<h2>Config</h2><table>" + "".join(
        f"<tr><th class=l>{_e(k)}</th><td class=l>{_e(v)}</td></tr>" for k, v in rows) + "</table>")
    return "\n".join(out)


def _evaluation_note(folder: RunFolder) -> str:
    """Say so when the exact evaluator cannot judge the run's prompts (free text, other classes)."""
    from ..world.spec import is_world_metadata

    indices = folder.prompt_indices()
    free = 0
    for i in indices:
        path = folder.prompt_dir(i) / "metadata.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        free += not (lines and is_world_metadata(json.loads(lines[0])))
    if not free:
        return ""
    return (f"<div class=note>{free} of {len(indices)} prompts have no Shapes-world GenEval metadata: the exact "
            "GenEval-Shapes evaluator is skipped for them (the curve below shows verifier scores). Score the run "
            f"with <code>reflectionflow evaluate {_e(folder.root)} --metric NAME</code> (clipscore, pickscore, fid, "
            "a VLM judge).</div>")


def _metrics_section(folder: RunFolder) -> str:
    """The summaries `reflectionflow evaluate --metric` left in the folder."""
    from ..metrics import evaluated_metrics, read_metric
    from ..stats import enough

    rows = []
    for name in evaluated_metrics(folder.root):
        _, s = read_metric(folder.root, name)
        value = s.get("overall", s.get("mean", s.get("value")))
        n = s.get("n_images") if s.get("kind") == "set" else s.get("n_prompts")  # what the interval resamples
        if isinstance(n, int) and not enough(n):
            ci = f" (n={n}, no interval)"
        else:
            ci = f" [{s['ci95'][0]:.4g}, {s['ci95'][1]:.4g}]" if s.get("ci95") else ""
        own = " <span class=bad title=\"the run's own verifier\">not independent</span>" if s.get(
            "same_as_run_verifier") else ""
        rows.append(f"<tr><td class=l>{_e(name)}</td><td>{'' if value is None else f'{value:.4g}'}{ci}</td>"
                    f"<td>{_e(s.get('n_images', ''))}</td><td class=l>{_e(s.get('description', ''))}{own}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Metrics</h2><table><tr><th class=l>metric</th><th>value</th><th>images</th><th class=l>what</th></tr>"
            + "".join(rows) + "</table>")


def _ledger_table(ledger: dict) -> str:
    if not ledger:
        return "<h2>Ledger</h2><p class=muted>no ledger.json</p>"
    tot = ledger["totals"]
    # A step cache's passes (only the first block ran) get a column when a run has any.
    cached = tot.get("cached", 0)
    cached_head = ("<th title=\"transformer passes a step cache served: only the first block ran; not in NFE\">"
                   "cached passes</th>") if cached else ""
    head = "<tr><th class=l>stage</th><th>requests</th><th>images</th><th>NFE</th>" + cached_head + \
           "<th>VLM calls</th><th>tokens</th><th title=\"requests whose result carried an error (VLM calls failed " \
           "after every retry included)\">failed</th><th>wall s</th></tr>"
    rows = []
    for stage, st in tot["by_stage"].items():
        failed = st.get("failed", 0)
        rows.append(f"<tr><td class=l>{_e(stage)}</td><td>{st['items']}</td><td>{st['images']}</td>"
                    f"<td>{st['nfe']}</td>" + (f"<td>{st.get('cached', 0)}</td>" if cached else "")
                    + f"<td>{st['calls']}</td><td>{st['tokens']}</td>"
                    f"<td{' class=bad' if failed else ''}>{failed}</td><td>{st['wall_s']:.2f}</td></tr>")
    failed = tot.get("failed", 0)
    rows.append(f"<tr><th class=l>total</th><th></th><th>{tot['images']}</th><th>{tot['nfe']}</th>"
                + (f"<th>{cached}</th>" if cached else "")
                + f"<th>{tot['vlm_calls']}</th><th>{tot['tokens']}</th><th>{failed}</th>"
                f"<th>{tot['wall_s']:.2f}</th></tr>")
    saved = ledger.get("saved")
    tail = (f"<p>{tot['images']} images for a budget of {ledger['budget_total']} "
            f"({ledger['budget_per_prompt']} per prompt x {ledger['prompts']} prompts)"
            f"{'' if not saved else f'; {saved} saved by early stopping'}.</p>")
    if failed:
        where = [(p["index"], p.get("failed", 0)) for p in ledger.get("per_prompt", []) if p.get("failed")]
        tail += (f"<p class=bad>{failed} request{'s' if failed > 1 else ''} failed (the run went on; each card "
                 f"says why): " + ", ".join(f"<a href=\"#prompt{i:05d}\">#{i:05d}</a> ({n})" for i, n in where)
                 + ".</p>")
    return "<h2>Ledger</h2><table>" + head + "".join(rows) + "</table>" + tail


def _curve_section(curve: list[CurvePoint]) -> str:
    if not curve:
        return ""
    has_acc = any(p.accuracy is not None for p in curve)
    cats = list(curve[-1].categories) if has_acc else []
    head = "<tr><th>k</th><th>prompts</th><th>mean verifier score</th><th>verifier yes</th>" + (
        "<th>accuracy</th>" + "".join(f"<th>{_e(c)}</th>" for c in cats) if has_acc else "") + "</tr>"
    rows = []
    for p in curve:
        cells = [f"{p.k}", f"{p.prompts}", _f(p.mean_score), _f(p.yes_rate)]
        if has_acc:
            cells += [_f(p.accuracy)] + [_f(p.categories.get(c)) for c in cats]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<h2>Best-of-k from this run's trace</h2><p class=muted>Each prompt's verifier pick among its "
            "first k images in generation order.</p>" + _curve_chart(curve, has_acc) + "<table>" + head
            + "".join(rows) + "</table>")


def _curve_chart(curve: list[CurvePoint], has_acc: bool) -> str:
    """The curve as an inline image (plots.curve_chart): accuracy, mean score and yes rate against k."""
    from ..plots import Series, curve_chart, data_url

    ks, n = [p.k for p in curve], [p.prompts for p in curve]
    series = []
    if has_acc:
        series.append(Series("accuracy (exact evaluator)", ks, [p.accuracy for p in curve], n=n))
    series.append(Series("mean verifier score", ks, [p.mean_score for p in curve], n=n))
    if any(p.yes_rate is not None for p in curve):
        series.append(Series("verifier yes rate", ks, [p.yes_rate for p in curve], n=n))
    scores = [p.mean_score for p in curve if p.mean_score is not None]
    bounded = all(0.0 <= v <= 1.0 for v in scores)
    png = curve_chart(series, xlabel="k: images per prompt, in generation order (log scale)",
                      ylabel="share of prompts / score", ylim=(-0.03, 1.03) if bounded else None,
                      size=(7.0, 3.6))
    return f"<img class=chart src=\"{data_url(png)}\" alt=\"best-of-k curve\">"


def _f(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _prompt_section(folder: RunFolder, i: int, open_: bool, counter: list[int], evaluate: bool = True) -> str:
    cands = [Candidate.from_record(r) for r in folder.load_trace(i)]
    done = folder.read_done(i)
    meta_path = folder.prompt_dir(i) / "metadata.jsonl"
    meta = json.loads(meta_path.read_text(encoding="utf-8").splitlines()[0]) if meta_path.is_file() else {}
    original = meta.get("prompt", "")
    selected = done.get("selected") if done else None
    status = ""
    if done:
        sel = next((c for c in cands if c.id == selected), None)
        yes = sel is not None and sel.verdict.yes
        status = (f" - selected <b>{_e(selected)}</b> score {_f(done.get('score'))} "
                  f"<span class={'ok' if yes else 'bad'}>{'yes' if yes else 'no'}</span>")
    else:
        status = " - <span class=muted>not finished</span>"
    failed = sum(int(st.get("failed", 0)) for c in cands for st in c.cost.values())
    if failed:
        status += f" - <span class=bad>{failed} failed request{'s' if failed > 1 else ''}</span>"
    summary = (f"<summary>#{i:05d} {_e(original)} <span class=muted>[{_e(meta.get('tag', ''))}] "
               f"{len(cands)} images</span>{status}</summary>")
    kids: dict[str | None, list[Candidate]] = {}
    for c in cands:
        kids.setdefault(c.parent, []).append(c)
    roots = kids.get(None, [])
    leaves = [c for c in roots if c.id not in kids]
    trees = [c for c in roots if c.id in kids]
    parts = []
    ctx = {"folder": f"{i:05d}", "kids": kids, "selected": selected, "original": original, "counter": counter,
           "judge": _judge(folder, i, meta) if evaluate else None}
    if leaves:
        label = "noise samples" if not trees else "initial pool (not continued)"
        parts.append(f"<div class=label>{label}</div><div class=grid>"
                     + "".join(_card(c, ctx) for c in leaves) + "</div>")
    def chains_of(c: Candidate) -> list[int]:
        return sorted({k.chain for k in kids[c.id] if k.kind in ("correct", "prompt", "resample")})

    # Chains in their own order (chain 0 first), whatever pool image each continues.
    for c in sorted(trees, key=lambda c: (min(chains_of(c), default=1 << 30), c.order)):
        chains = chains_of(c)
        what = (f"chain{'s' if len(chains) > 1 else ''} {', '.join(map(str, chains))} from {c.id}"
                if chains else f"search from {c.id}")
        parts.append(f"<div class=label>{_e(what)}</div>" + _row(c, ctx))
    if done and done.get("notes"):
        parts.append(_notes(done["notes"]))
    return (f"<details class=prompt id=\"prompt{i:05d}\"{' open' if open_ else ''}>{summary}{''.join(parts)}"
            "</details>")


def _judge(folder: RunFolder, i: int, meta: dict):
    """The exact evaluator's verdict on a candidate's image, for a Shapes-world prompt (else None)."""
    from ..world.spec import is_world_metadata

    if not is_world_metadata(meta):
        return None
    from ..io import load_png
    from ..world.evaluate import evaluate_image

    def judge(c: Candidate):
        path = folder.prompt_dir(i) / c.file
        if not path.is_file():
            return None
        return evaluate_image(load_png(path), meta)

    return judge


_NOTE_NAMES = {"rounds": "zero-order rounds", "base_noises": "fresh base noises", "pivot_moves": "pivot moves",
               "granted": "images granted by other prompts", "unspent": "images left unspent",
               "heads": "chains start from"}


def _notes(notes: dict) -> str:
    """What the method reported, in words: one line per chain (in order), then its counts."""
    rows = []
    for ch in sorted(notes.get("chains") or [], key=lambda ch: ch.get("chain", 0)):
        members = ch.get("members") or []
        stopped = f", stopped early at round {ch['stopped_at']}" if ch.get("stopped_at") is not None else ""
        rows.append((f"chain {ch.get('chain')}", f"{len(members)} images ({' &rarr; '.join(map(_e, members))}), "
                     f"best {_e(ch.get('best'))}{stopped}"))
    for key, value in notes.items():
        if key == "chains" or (key in ("granted", "unspent") and not value):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        rows.append((_e(_NOTE_NAMES.get(key, key.replace("_", " "))), _e(shown[:300])))
    if not rows:
        return ""
    return "<dl class=notes>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _row(c: Candidate, ctx: dict) -> str:
    """A candidate, then its descendants: one child continues the row, several branch downwards."""
    kids = ctx["kids"].get(c.id, [])
    out = _card(c, ctx)
    if len(kids) == 1:
        out += "<span class=arrow>&rarr;</span>" + _row(kids[0], ctx)
    elif kids:
        out += "<span class=arrow>&rarr;</span><div class=branches>" + "".join(_row(k, ctx) for k in kids) + "</div>"
    return f"<div class=row>{out}</div>"


def _evaluator_line(c: Candidate, ctx: dict) -> str:
    judge = ctx.get("judge")
    verdict = judge(c) if judge is not None else None
    if verdict is None:
        return ""
    why = _e(verdict.reason.replace("\n", "; ")) if verdict.reason else "every clause holds"
    word = "<span class=ok>correct</span>" if verdict.correct else "<span class=bad>wrong</span>"
    return f"<div class=ev title=\"exact GenEval-Shapes evaluator: {why}\">evaluator {word}</div>"


def _card(c: Candidate, ctx: dict) -> str:
    ctx["counter"][0] += 1
    lazy = " loading=\"lazy\"" if ctx["counter"][0] > EAGER_IMAGES else ""
    sel = c.id == ctx["selected"]
    src = f"{ctx['folder']}/{c.file}"
    yes = ""
    if c.verdict.yes is not None:
        yes = " <span class=ok>yes</span>" if c.verdict.yes else " <span class=bad>no</span>"
    parts = [f"<figure class=\"node{' selected' if sel else ''}\" id=\"p{ctx['folder']}-{_e(c.id)}\">",
             f"<img src=\"{_e(src)}\" alt=\"{_e(c.id)}\" title=\"seed {c.seed}\"{lazy} "
             "onerror=\"console.error('report: missing image ' + this.getAttribute('src'))\">",
             f"<figcaption><b>{_e(c.id)}</b>{' <span class=badge>selected</span>' if sel else ''}"
             f"<div title=\"the verifier's score\">verifier {_f(c.score) or 'error'}{yes}</div>"
             f"{_evaluator_line(c, ctx)}</figcaption>"]
    if c.reflection:
        parts.append(f"<div class=refl>{_e(c.reflection)}</div>")
    if c.prompt != ctx["original"]:
        parts.append(f"<div class=pr>prompt: {_e(c.prompt)}</div>")
    reason = (c.verdict.details or {}).get("reason") if isinstance(c.verdict.details, dict) else None
    if reason:
        parts.append(f"<div class=pr title=\"verifier\">{_e(reason)}</div>")
    for e in c.errors:
        parts.append(f"<div class=err>{_e(e)}</div>")
    if c.verdict.error:
        parts.append(f"<div class=err>verifier: {_e(c.verdict.error)}</div>")
    parts.append("</figure>")
    return "".join(parts)
