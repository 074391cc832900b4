"""One ledger for the whole run: images, NFE, VLM calls, tokens, failed requests and wall seconds
per stage, per prompt and in total.

Counts come from the trace (every candidate records what it cost at each stage), so they are
exact after a resume and `reflectionflow report DIR` can rebuild them from the folder alone.
Wall seconds come from the prompt's done-marker: a component call's time is split evenly over
the requests it served. Work lost to a kill is not in them (it was not kept either).

`nfe` counts full transformer passes; `cached` the passes a step cache served (only the first
block ran: models/step_cache.py), so nfe + cached is what the samplers' steps add up to.

`failed` counts requests whose result carried an error: a VLM call that still failed after every
retry (the verdict then ranks last, the reflection is empty, the refinement keeps the prompt), or
a judge's answer that could not be read. The run goes on past them; the trace says what each was.
"""

from __future__ import annotations

from collections.abc import Iterable

from .candidates import STAGES

COUNT_KEYS = ("items", "images", "nfe", "cached", "calls", "tokens", "failed")


def empty_stage() -> dict:
    return {k: 0 for k in COUNT_KEYS} | {"wall_s": 0.0}


def prompt_ledger(index: int, records: Iterable[dict], wall: dict[str, float] | None = None,
                  budget: int | None = None, done: bool = False) -> dict:
    stages = {s: empty_stage() for s in STAGES}
    for rec in records:
        for stage, cost in (rec.get("cost") or {}).items():
            st = stages.setdefault(stage, empty_stage())
            for k in COUNT_KEYS:
                st[k] += int(cost.get(k, 0))
    for stage, seconds in (wall or {}).items():
        stages.setdefault(stage, empty_stage())["wall_s"] += float(seconds)
    return _summarise({"index": index, "done": done, "budget": budget}, stages)


def _summarise(head: dict, stages: dict) -> dict:
    for st in stages.values():
        st["wall_s"] = round(st["wall_s"], 4)
    return head | {
        "images": sum(st["images"] for st in stages.values()),
        "nfe": sum(st["nfe"] for st in stages.values()),
        "cached": sum(st.get("cached", 0) for st in stages.values()),
        "vlm_calls": sum(st["calls"] for st in stages.values()),
        "tokens": sum(st["tokens"] for st in stages.values()),
        "failed": sum(st["failed"] for st in stages.values()),
        "wall_s": round(sum(st["wall_s"] for st in stages.values()), 4),
        "by_stage": stages,
    }


def total_ledger(per_prompt: list[dict]) -> dict:
    stages = {s: empty_stage() for s in STAGES}
    for p in per_prompt:
        for stage, st in p["by_stage"].items():
            tot = stages.setdefault(stage, empty_stage())
            for k in COUNT_KEYS:
                tot[k] += st.get(k, 0)  # ledgers written before a key existed have none
            tot["wall_s"] += st["wall_s"]
    return _summarise({}, stages)


def run_ledger(per_prompt: list[dict], budget: int, components: dict[str, str], session: dict | None = None) -> dict:
    totals = total_ledger(per_prompt)
    done = [p for p in per_prompt if p["done"]]
    planned = budget * len(per_prompt)
    return {
        "budget_per_prompt": budget,
        "prompts": len(per_prompt),
        "prompts_done": len(done),
        "budget_total": planned,
        "images": totals["images"],
        # With early stopping a prompt may leave images unspent (or take a wave-mate's).
        "saved": planned - totals["images"] if len(done) == len(per_prompt) else None,
        "verifier": components.get("verifier"),
        "components": components,
        "totals": totals,
        "per_prompt": per_prompt,
        "session": session or {},
    }
