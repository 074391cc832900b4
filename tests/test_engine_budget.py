"""Every method spends exactly its budget; the split adds up or fails clearly; the ledger adds up."""

from __future__ import annotations

import json

import pytest

from reflectionflow.components import build
from reflectionflow.config import ConfigError, RunConfig, resolve_split
from reflectionflow.engine import Components

from .test_engine_support import Counting, run, subset_file


def _trace(root, i):
    return [json.loads(x) for x in (root / f"{i:05d}" / "trace.jsonl").read_text().splitlines()]


def test_default_splits_add_up_to_the_budget():
    for budget in range(1, 65):
        s = resolve_split("reflection", budget, None, None, None)
        assert s["pool"] + s["chains"] * s["depth"] == budget
        assert s["pool"] >= 1 and (s["depth"] == 0 or s["pool"] >= s["chains"])
        p = resolve_split("prompt", budget, None, None, None)
        assert p["chains"] * p["depth"] == budget
    assert resolve_split("reflection", 32, None, None, None) == {"chains": 2, "depth": 12, "pool": 8}
    assert resolve_split("reflection", 8, None, None, None) == {"chains": 2, "depth": 3, "pool": 2}
    assert resolve_split("reflection", 32, 2, 14, None) == {"chains": 2, "depth": 14, "pool": 4}
    assert resolve_split("reflection", 32, 4, None, 8) == {"chains": 4, "depth": 6, "pool": 8}
    assert resolve_split("prompt", 12, 3, None, None) == {"chains": 3, "depth": 4, "pool": None}


@pytest.mark.parametrize("method, budget, chains, depth, pool, match", [
    ("reflection", 32, 2, 16, 4, r"4 \+ 2 x 16 = 36, but --budget is 32"),
    ("reflection", 8, 2, 4, None, r"2 x 4 = 8 leaves no room for an initial pool"),
    ("reflection", 9, 2, None, 4, r"9 - 4 = 5 is not a multiple of --chains 2"),
    ("reflection", 8, 4, 1, 4, None),
    ("reflection", 10, 4, None, 2, r"--pool must be >= --chains, got pool 2"),
    ("prompt", 8, 3, None, None, r"3 x 2 = 6, but --budget is 8"),
    ("prompt", 8, None, None, 2, r"--pool 2: the prompt method has no noise pool"),
    ("noise", 8, 2, None, None, r"--chains 2: the noise method has no chains"),
])
def test_impossible_splits_name_the_numbers(method, budget, chains, depth, pool, match):
    if match is None:
        assert resolve_split(method, budget, chains, depth, pool)["pool"] == 4
        return
    with pytest.raises(ConfigError, match=match):
        resolve_split(method, budget, chains, depth, pool)


def test_config_validation_errors_list_what_is_accepted():
    with pytest.raises(ConfigError, match="unknown method 'beam'; accepted: noise, zero-order, prompt, reflection"):
        RunConfig(method="beam").validate()
    with pytest.raises(ConfigError, match=r"budget \(--budget\) must be an integer in 1..4096, got 0"):
        RunConfig(budget=0).validate()
    with pytest.raises(ConfigError, match="early_stop applies to the prompt and reflection methods"):
        RunConfig(method="noise", early_stop=1.0).validate()


@pytest.mark.parametrize("method", ["noise", "zero-order", "prompt", "reflection"])
def test_each_method_spends_exactly_its_budget(tmp_path, method):
    prompts = subset_file(tmp_path, 1)  # one prompt per category
    for budget in (1, 2, 3, 5, 8):
        out = tmp_path / f"{method}-{budget}"
        result = run(out, prompts, method=method, budget=budget)
        for i in range(6):
            trace = _trace(out, i)
            assert len(trace) == budget, (method, budget, i)
            assert len(list((out / f"{i:05d}" / "images").glob("*.png"))) == budget
            assert (out / f"{i:05d}" / "samples" / "0000.png").is_file()
            assert [r["order"] for r in trace] == list(range(budget))
        assert result.ledger["images"] == budget * 6 and result.ledger["saved"] == 0


def test_early_stopping_saves_images_and_moves_them_to_prompts_that_fail(tmp_path):
    prompts = subset_file(tmp_path, 4)
    base = run(tmp_path / "plain", prompts, method="reflection", budget=8)
    chains = run(tmp_path / "chains", prompts, method="reflection", budget=8, early_stop=1.0)
    shared = run(tmp_path / "shared", prompts, method="reflection", budget=8, early_stop=1.0,
                 reallocate="prompts", prompt_batch=12)
    n = 24
    assert base.ledger["images"] == 8 * n
    # Per prompt the budget is a cap with early stopping; solved prompts stop early.
    assert all(d["images"] <= 8 for d in chains.selected.values())
    assert chains.ledger["saved"] > 0
    # Shared: prompts that still fail draw on the savings of their wave, never beyond its total.
    assert shared.ledger["images"] <= 8 * n
    drawn = [d for d in shared.selected.values() if d["granted"] > 0]
    assert drawn and all(d["images"] > 8 for d in drawn)
    assert sum(d["images"] for d in shared.selected.values()) == shared.ledger["images"]
    # A chain stops as soon as the verifier is confident; it never makes images after that.
    for d in chains.selected.values():
        for ch in d["notes"]["chains"]:
            if ch["stopped_at"] is not None:
                assert ch["depth"] == ch["stopped_at"]


def test_ledger_adds_up_and_counts_cost_from_results(tmp_path):
    prompts = subset_file(tmp_path, 2)
    gen = Counting(build("generator", "world-render"), nfe=28)
    cor = Counting(build("corrector", "world-edit"), nfe=40)
    ver = Counting(build("verifier", "world-oracle"), calls=1, tokens=7)
    comps = Components(generator=gen, verifier=ver, reflector=build("reflector", "world-oracle"),
                       refiner=build("refiner", "world-rule"), corrector=cor)
    out = tmp_path / "run"
    result = run(out, prompts, method="reflection", budget=8, components=comps, on_keep="correct")
    led = json.loads((out / "ledger.json").read_text())
    assert led == json.loads(json.dumps(result.ledger))
    tot, per = led["totals"], led["per_prompt"]
    n_images = sum(len(_trace(out, i)) for i in range(12))
    on_disk = len(list(out.glob("*/images/*.png")))
    assert tot["images"] == n_images == on_disk == 8 * 12 == gen.requests + cor.requests
    assert tot["images"] == sum(p["images"] for p in per)
    assert tot["nfe"] == 28 * gen.requests + 40 * cor.requests == sum(p["nfe"] for p in per)
    st = tot["by_stage"]
    assert st["generate"]["images"] == gen.requests == 2 * 12  # the pool
    assert st["correct"]["images"] == cor.requests == 6 * 12  # 2 chains x 3 rounds
    assert st["verify"]["items"] == n_images == ver.requests  # every image scored exactly once
    assert st["verify"]["calls"] == n_images and st["verify"]["tokens"] == 7 * n_images
    assert st["reflect"]["items"] == st["refine"]["items"] == st["correct"]["items"]
    assert tot["vlm_calls"] == sum(s["calls"] for s in st.values())
    assert abs(tot["wall_s"] - sum(p["wall_s"] for p in per)) < 1e-3
    for stage in ("generate", "correct", "verify", "reflect", "refine"):
        assert st[stage]["wall_s"] > 0
    assert led["verifier"] == "world-oracle" and led["components"]["corrector"] == "world-edit"
    config = json.loads((out / "config.json").read_text())
    assert config["verifier"] == "world-oracle"
    assert config["config"]["pool"] == 2 and config["config"]["chains"] == 2 and config["config"]["depth"] == 3
