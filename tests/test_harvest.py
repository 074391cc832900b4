"""The on-policy world data engine (`genref harvest`) and the trainers that read it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reflectionflow.data.harvest import HarvestConfig, HarvestError, harvest, training_prompts
from reflectionflow.train.corrector_pool import load_harvests, reward_groups
from reflectionflow.train.verifier import calibration_error, fit_temperature, held_out, roc_auc
from reflectionflow.world import spec
from reflectionflow.world.evaluate import evaluate_image

STAND_INS = {"generator": "world-render", "corrector": "world-edit", "verifier": "world-oracle",
             "reflector": "world-oracle"}


def _cfg(out, **kw) -> HarvestConfig:
    base = dict(out=str(out), prompts=12, budget=4, components=dict(STAND_INS), val_prompts=6, label_workers=1,
                progress=False)
    base.update(kw)
    return HarvestConfig(**base)


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest") / "h"
    summary = harvest(_cfg(out))
    return out, summary


def test_harvest_labels_every_candidate_of_every_search(harvested):
    out, summary = harvested
    pool = load_harvests([out])
    # 12 prompts x 3 methods x budget 4, every candidate once
    assert summary["samples"] == len(pool.samples) == 144 == len(pool.images)
    assert set(summary["kinds"]) == {"noise", "refined", "corrected"}
    assert sum(k["samples"] for k in summary["kinds"].values()) == 144
    rng = np.random.default_rng(0)
    for i in rng.choice(len(pool.samples), 20, replace=False):
        r = pool.samples[i]
        verdict = evaluate_image(pool.images[i], spec.parse_prompt(r["prompt"]))
        assert verdict.correct == r["correct"]
        if not r["correct"]:  # a failure always gets commands (a pass may too: an extra unnamed object)
            assert r["reflection"] != "- Keep the image unchanged."
        if r["target"] >= 0:  # a minimal edit the evaluator passes
            assert not r["correct"]
            assert evaluate_image(pool.targets[r["target"]], spec.parse_prompt(r["prompt"])).correct
    parents = [r for r in pool.samples if r["kind"] == "corrected"]
    assert parents and all(pool.samples[r["parent"]]["group"] == r["group"] for r in parents)
    pairs = [json.loads(line) for line in (out / "verifier_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 144 and {p["kind"] for p in pairs} == {"noise", "refined", "corrected"}
    assert len(pool.val) == 12 and len(pool.val_images) == 12
    assert summary["genref"]["rule"] == summary["fixable"]
    assert list((out / "genref").glob("harvest_*.tar"))


def test_harvest_resume_reuses_and_refuses_other_settings(harvested, tmp_path):
    out, summary = harvested
    with pytest.raises(HarvestError, match="--resume"):
        harvest(_cfg(out))
    assert harvest(_cfg(out, resume=True)) == summary
    with pytest.raises(HarvestError, match="other settings.*budget"):
        harvest(_cfg(out, budget=6, resume=True))


@pytest.mark.parametrize("bad, match", [({"seed": 0}, "seed"), ({"methods": ("noise", "best")}, "accepted"),
                                        ({"budget": 1}, "budget"), ({"components": {"painter": "x"}}, "kind"),
                                        ({"components": {"verifier": "nope"}}, "--verifier: unknown verifier")])
def test_harvest_rejects_bad_settings(tmp_path, bad, match):
    with pytest.raises(HarvestError, match=match):
        harvest(_cfg(tmp_path / "h", **bad))
    assert not (tmp_path / "h").exists()  # nothing written before the settings are checked


def test_training_prompts_avoid_the_benchmarks_where_they_can():
    from reflectionflow.train.world import load_prompt_file

    files = ("geneval_shapes.jsonl", "geneval_shapes_val.jsonl")
    bench = {m["prompt"] for f in files for m in load_prompt_file(f)}
    metas = training_prompts(400, 3, {"position": 0.5, "color_attr": 0.5})
    assert len(metas) == 400
    # position has 120 prompts, the benchmarks use fewer; attribute binding has 2,700
    fresh_position = len({m["prompt"] for m in spec._all_combinations("position")} - bench)
    pos = [m for m in metas if m["tag"] == "position"]
    assert sum(m["prompt"] not in bench for m in pos) == min(len(pos), fresh_position)
    assert not any(m["prompt"] in bench for m in metas if m["tag"] == "color_attr")


def test_two_rounds_concatenate(harvested, tmp_path):
    out, _ = harvested
    second = tmp_path / "h2"
    harvest(_cfg(second, round=2, seed=2002, methods=("reflection",)))
    one, two = load_harvests([out]), load_harvests([second])
    both = load_harvests([out, second])
    assert len(both.samples) == len(one.samples) + len(two.samples)
    assert len(both.targets) == len(one.targets) + len(two.targets)
    for r in both.samples[len(one.samples):]:
        if r["target"] >= 0:
            assert r["target"] >= len(one.targets)
    assert {r["round"] for r in both.samples} == {1, 2}
    groups = reward_groups(both)
    assert all(len({both.samples[i]["group"] for i in g}) == 1 for g in groups)


def test_verifier_trains_on_a_harvest_and_is_calibrated(harvested, tmp_path):
    from reflectionflow.models.verifier import WorldVerifier
    from reflectionflow.train.verifier import WorldVerifierConfig, train_world_verifier

    out, _ = harvested
    cfg = WorldVerifierConfig(out_dir=str(tmp_path / "v"), model_size="tiny", harvest=(str(out),), holdout=0.3,
                              batch_size=16, max_steps=6, log_every=3, ckpt_every=6, val_size=8, num_workers=0,
                              progress=False, device="cpu")
    res = train_world_verifier(cfg)
    scores = json.loads((tmp_path / "v" / "scores.json").read_text())
    assert res.held["temperature"] == scores["temperature"] > 0
    assert set(scores["after"]["kinds"]) <= {"noise", "refined", "corrected"}
    model = WorldVerifier.from_pretrained(tmp_path / "v" / "verifier")
    assert model.config.temperature == scores["temperature"]
    log = [json.loads(line) for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert "held_auc" in log[-1] and "held_ece" in log[-1]


def test_verifier_with_flips_and_the_scene_head_trains_on_a_harvest(harvested, tmp_path):
    from reflectionflow.models.verifier import WorldVerifier
    from reflectionflow.train.verifier import WorldVerifierConfig, flip_prompt, harvest_pool, train_world_verifier
    from reflectionflow.world.evaluate import evaluate_image
    from reflectionflow.world.spec import parse_prompt

    out, _ = harvested
    cfg = WorldVerifierConfig(out_dir=str(tmp_path / "v"), model_size="tiny", harvest=(str(out),), holdout=0.3,
                              batch_size=16, max_steps=3, log_every=3, ckpt_every=3, val_size=8, num_workers=0,
                              progress=False, device="cpu", flip=True, scene_weight=0.5, generator_share=0.75)
    train_world_verifier(cfg)
    log = [json.loads(line) for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["scene_loss"] > 0
    model = WorldVerifier.from_pretrained(tmp_path / "v" / "verifier")
    assert model.config.scene_head and model.scene is not None
    # The mirrored labels are the evaluator's verdicts on the mirrored images and prompts.
    pool, _ = harvest_pool([str(out)], 0.3)
    from reflectionflow.train.verifier import pool_extras

    pool_extras(pool, workers=2, chunk=7)
    assert pool["maps"].shape == (len(pool["labels"]), 2, 8, 8) and len(pool["flip_labels"]) == len(pool["labels"])
    for i in range(0, len(pool["labels"]), 5):
        want = evaluate_image(np.ascontiguousarray(pool["images"][i][:, ::-1]),
                              parse_prompt(flip_prompt(pool["prompts"][i]))).correct
        assert pool["flip_labels"][i] == float(want)


def test_verifier_config_refuses_a_pool_named_twice(harvested, tmp_path):
    from reflectionflow.train.verifier import WorldVerifierConfig

    out, _ = harvested
    with pytest.raises(ValueError, match="give one"):
        WorldVerifierConfig(out_dir=str(tmp_path), harvest=(str(out),), generator="weights/world-generator").validate()
    with pytest.raises(ValueError, match="no complete harvest"):
        WorldVerifierConfig(out_dir=str(tmp_path), harvest=(str(tmp_path / "nothing"),)).validate()


def test_calibration_helpers():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-logits / 2.0))).astype(np.float64)  # true temperature 2
    t = fit_temperature(logits, labels)
    assert abs(t - 2.0) < 0.15
    p = 1 / (1 + np.exp(-logits / t))
    assert calibration_error(p, labels) < 0.02
    assert calibration_error(1 / (1 + np.exp(-logits * 3)), labels) > 0.05  # over-confident
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert roc_auc(np.array([0.1, 0.2]), np.array([1, 1], bool)) is None
    share = np.mean([held_out(f"1/noise/{i}", 0.1) for i in range(5000)])
    assert 0.08 < share < 0.12


def test_reflections_hold_no_repeated_and_not_too_many_commands():
    from reflectionflow.models.reflector import MAX_COMMANDS, words_to_reflection

    looped = "add one red circle ".split() * 24
    assert words_to_reflection(looped) == "- Add one red circle."
    many = []
    for c in ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]:
        many += ["add", "one", c, "circle"]
    assert len(words_to_reflection(many).splitlines()) == MAX_COMMANDS


def test_harvest_command_line(tmp_path, capsys):
    from reflectionflow.cli import main

    rc = main(["genref", "harvest", "--out", str(tmp_path / "h"), "--prompts", "6", "--budget", "2",
               "--methods", "noise", "--val-prompts", "0", "--generator", "world-render", "--verifier",
               "world-oracle", "--label-workers", "1", "--quiet"])
    assert rc == 0
    assert "12 candidates" in capsys.readouterr().out


def test_onpolicy_compare_runs_only_the_parts_given(harvested, tmp_path, monkeypatch, capsys):
    """benchmarks/world_onpolicy_compare.py: the shipped and a new verifier on the same held-out
    searches; without --reflector / --corrector those parts are left out; with nothing, a clear error."""
    from reflectionflow.train.verifier import WorldVerifierConfig, train_world_verifier

    from .conftest import load_benchmark_module

    out, _ = harvested
    train_world_verifier(WorldVerifierConfig(out_dir=str(tmp_path / "v"), model_size="tiny", harvest=(str(out),),
                                             holdout=0.3, batch_size=16, max_steps=2, log_every=2, ckpt_every=2,
                                             val_size=8, num_workers=0, progress=False, device="cpu"))
    bench = load_benchmark_module("world_onpolicy_compare")
    res_file = tmp_path / "c.json"
    monkeypatch.setattr("sys.argv", ["x", "--harvest", str(out), "--holdout", "0.3", "--verifier",
                                     str(tmp_path / "v" / "verifier"), "--json", str(res_file)])
    assert bench.main() == 0
    res = json.loads(res_file.read_text())
    assert res["verifier_shipped"]["n"] == res["verifier_new"]["n"] == res["held_out_candidates"] > 0
    assert not any(k.startswith(("reflector", "corrector")) for k in res)
    assert "| new | all |" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["x", "--harvest", str(out)])
    with pytest.raises(SystemExit):
        bench.main()
    assert "nothing to compare" in capsys.readouterr().err
