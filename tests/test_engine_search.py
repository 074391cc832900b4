"""What each method does with its images: lineage, selection, seeds; and prompts without metadata."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from reflectionflow.config import RunConfig
from reflectionflow.engine import METHODS, derive_seed
from reflectionflow.engine import backends as engine_backends
from reflectionflow.engine.candidates import Candidate
from reflectionflow.engine.noise import neighbours
from reflectionflow.pipeline import generate
from reflectionflow.world.data import resolve_prompts

from .test_engine_support import run, subset_file


def _cands(out, i):
    recs = [json.loads(x) for x in (out / f"{i:05d}" / "trace.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in recs}, [Candidate.from_record(r) for r in recs]


def _rank(r):
    return (r["yes"], r["score"])


def test_seeds_are_stable_hashes_of_run_prompt_chain_round_kind():
    assert derive_seed(0, 0, 0, 0, "noise") == derive_seed(0, 0, 0, 0, "noise") == 403431042092950208
    seeds = {derive_seed(s, p, c, r, k) for s in (0, 1) for p in (0, 1) for c in (0, 1) for r in (0, 1)
             for k in ("noise", "correct")}
    assert len(seeds) == 32 and all(0 <= s < 2**63 for s in seeds)


def test_zero_order_neighbours_sit_at_the_threshold_cosine_with_the_pivot_norm():
    x = np.random.default_rng(0).standard_normal((3, 4))
    nb = neighbours(x, 0.95, 5, np.random.default_rng(1))
    assert nb.shape == (5, 3, 4)
    flat, n = x.reshape(-1), nb.reshape(5, -1)
    cos = n @ flat / (np.linalg.norm(n, axis=1) * np.linalg.norm(flat))
    assert np.allclose(cos, 0.95) and np.allclose(np.linalg.norm(n, axis=1), np.linalg.norm(flat))


def test_zero_order_moves_the_pivot_only_on_improvement(tmp_path):
    out = tmp_path / "zo"
    run(out, subset_file(tmp_path, 2), method="zero-order", budget=13)
    moved = 0
    for i in range(12):
        by_id, cands = _cands(out, i)
        for c in cands:
            if c.kind == "neighbour":
                parent = by_id[c.parent]
                siblings = [x for x in cands if x.parent == c.parent]
                assert len(siblings) <= 4
                if parent["kind"] == "neighbour":  # the pivot moved here: it beat its own pivot
                    assert _rank(parent) > _rank(by_id[parent["parent"]])
                    moved += 1
    assert moved > 0


@pytest.mark.parametrize("backtrack", [False, True])
def test_reflection_chains_start_from_the_best_pool_images_and_follow_their_parents(tmp_path, backtrack):
    out = tmp_path / "r"
    run(out, subset_file(tmp_path, 2), method="reflection", budget=10, chains=2, pool=4, backtrack=backtrack,
        on_keep="correct")
    for i in range(12):
        by_id, cands = _cands(out, i)
        pool = [c for c in cands if c.kind == "noise"]
        assert len(pool) == 4 and all(c.order < 4 for c in pool)
        done = json.loads((out / f"{i:05d}" / "done.json").read_text())
        heads = done["notes"]["heads"]
        ranked = sorted(pool, key=lambda c: (-c.verdict.yes, -c.verdict.score, c.order))
        assert heads == [c.id for c in ranked[:2]]
        for ch, head in enumerate(heads):
            members = [c for c in cands if c.kind == "correct" and c.chain == ch]
            assert [c.round for c in members] == [1, 2, 3]
            best = by_id[head]
            prev = head
            for c in members:
                expected_parent = best["id"] if backtrack else prev
                assert c.parent == expected_parent and c.reflection
                rec = by_id[c.id]
                if _rank(rec) > _rank(best):
                    best = rec
                prev = c.id
        # The verifier picks the best over everything produced (ties: the earliest).
        top = max(cands, key=lambda c: (c.verdict.yes, c.verdict.score, -c.order))
        assert done["selected"] == top.id


def test_prompt_chains_refine_each_round_and_score_against_the_original(tmp_path):
    out = tmp_path / "p"
    run(out, subset_file(tmp_path, 1), method="prompt", budget=6, chains=2)
    for i in range(6):
        by_id, cands = _cands(out, i)
        original = json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text())["prompt"]
        for c in cands:
            if c.round == 0:
                assert c.prompt == original and c.parent is None
            else:
                parent = by_id[c.parent]
                assert parent["chain"] == c.chain and parent["round"] == c.round - 1
                assert c.prompt.startswith(original + ", ") and c.seed == derive_seed(0, i, c.chain, c.round, "noise")


def test_prompts_without_metadata_run_every_method(tmp_path, monkeypatch):
    # A backend whose prompts are free text (as FLUX's will be): the engine must not need metadata.
    plain = replace(engine_backends.BACKENDS["world"], name="plain", parse_prompt=None,
                    resolve_prompts=lambda arg: [{"prompt": m["prompt"]} for m in resolve_prompts(arg, False)])
    monkeypatch.setitem(engine_backends.BACKENDS, "plain", plain)
    for method in METHODS:
        out = tmp_path / method
        res = generate(RunConfig(backend="plain", method=method, budget=4, progress=False), out,
                       prompt="a photo of a ring and a square")
        assert res.ledger["images"] == 4
        meta = json.loads((out / "00000" / "metadata.jsonl").read_text())
        assert meta == {"prompt": "a photo of a ring and a square"}
        assert "Best-of-k" in (out / "report.html").read_text()  # verifier-score curve, no evaluator column
    out = tmp_path / "file"
    res = generate(RunConfig(backend="plain", budget=2, progress=False, limit=3), out,
                   prompts=str(subset_file(tmp_path, 1)))
    assert res.ledger["prompts"] == 3


def test_a_backend_brings_its_own_flags_as_component_options(tmp_path, monkeypatch, cli):
    def add(parser):
        parser.add_argument("--flaw-rate", type=float, default=None)

    def options(args, environ):
        return {} if args.flaw_rate is None else {"generator": {"p_relation": args.flaw_rate}}

    sim = replace(engine_backends.BACKENDS["world"], name="sim", add_arguments=add, options_from_args=options)
    monkeypatch.setitem(engine_backends.BACKENDS, "sim", sim)
    out = tmp_path / "sim"
    code, _, err = cli("generate", "a photo of a cross left of a ring", "--backend", "sim", "--flaw-rate", "1",
                       "--method", "noise", "--budget", "3", "--out", out, "--quiet", "--no-report")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["options"] == {"generator": {"p_relation": 1.0}}
    assert config["config"]["backend"] == "sim"


@pytest.mark.parametrize("method", ["prompt", "reflection"])
def test_every_image_is_scored_against_the_original_prompt_never_the_refined_one(tmp_path, method):
    """The verifier sees each prompt's own GenEval text for every candidate, although the refiner
    rewrites the prompt the generator and the corrector are given."""
    from reflectionflow.components import build
    from reflectionflow.engine.executor import Components

    class Recording:
        def __init__(self, inner):
            self.inner, self.prompts = inner, []

        def score(self, images, prompts):
            self.prompts += list(prompts)
            return self.inner.score(images, prompts)

    ver = Recording(build("verifier", "world-oracle"))
    comps = Components(generator=build("generator", "world-render"), verifier=ver,
                       reflector=build("reflector", "world-oracle"), refiner=build("refiner", "world-rule"),
                       corrector=build("corrector", "world-edit"))
    prompts = subset_file(tmp_path, 1)
    out = tmp_path / method
    run(out, prompts, method=method, budget=6, chains=2, **({"pool": 2} if method == "reflection" else {}),
        components=comps)
    originals = {json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text())["prompt"] for i in range(6)}
    refined = {c.prompt for i in range(6) for c in _cands(out, i)[1]} - originals
    assert refined, "the refiner changed no prompt: the test would prove nothing"
    assert len(ver.prompts) == 6 * 6 and set(ver.prompts) <= originals


def test_on_keep_resample_spends_a_keep_round_on_a_fresh_sample_and_resumes(tmp_path):
    from reflectionflow.config import ConfigError
    from reflectionflow.engine.executor import is_keep

    assert is_keep("- Keep the image unchanged.") and is_keep("") and is_keep("No changes needed.\n")
    assert not is_keep("- Keep the image unchanged.\n- Add one red circle.") and not is_keep("- Add one ring.")
    out = tmp_path / "r"
    prompts = subset_file(tmp_path, 2)
    run(out, prompts, method="reflection", budget=8, chains=2, pool=2, on_keep="resample")
    kinds = {"resample": 0, "correct": 0}
    for i in range(12):
        by_id, cands = _cands(out, i)
        for c in cands:
            if c.round == 0 or c.kind == "noise":
                continue
            assert c.kind in kinds and c.reflection is not None and c.parent in by_id
            kinds[c.kind] += 1
            # a resample is exactly the rounds whose reflection asked for nothing, at the correction's seed
            assert (c.kind == "resample") == is_keep(c.reflection)
            assert c.seed == derive_seed(0, i, c.chain, c.round, "correct")
            stage = "generate" if c.kind == "resample" else "correct"
            assert by_id[c.id]["cost"][stage]["images"] == 1
    assert kinds["resample"] > 0 and kinds["correct"] > 0
    for i in range(12):
        assert json.loads((out / f"{i:05d}" / "done.json").read_text())["images"] == 8
    before = {p: p.read_bytes() for p in out.rglob("trace.jsonl")}
    run(out, prompts, method="reflection", budget=8, chains=2, pool=2, on_keep="resample", resume=True)
    assert {p: p.read_bytes() for p in out.rglob("trace.jsonl")} == before
    assert "on_keep" not in RunConfig(method="noise").validate().search_dict()  # no effect there
    assert "on_keep" not in RunConfig(on_keep="correct").validate().search_dict()  # folders made before it
    with pytest.raises(ConfigError, match="on_keep"):
        RunConfig(on_keep="skip").validate()
