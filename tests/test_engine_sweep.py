"""`reflectionflow sweep`: the paper's table from one run per (method, verifier), on the stand-ins."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from reflectionflow.config import RunConfig
from reflectionflow.engine import DistContext
from reflectionflow.engine.sweep import bootstrap, sweep

from .test_engine_distributed import ThreadComm, _env, _free_port, _Hub
from .test_engine_support import subset_file

COLUMNS = ["Method", "Verifier", "Samples", "Prompts", "Overall", "Single", "Two", "Counting", "Colors", "Position",
           "Attr. binding"]


def _sweep(cli, out: Path, prompts: Path, *extra):
    return cli("sweep", "--prompts", prompts, "--budget", 4, "--methods", "noise,reflection", "--out", out,
               "--quiet", *extra)


def _points(out: Path) -> dict:
    return {(p["method"], p["verifier"], p["k"]): p for p in json.loads((out / "sweep.json").read_text())["points"]}


def test_table_has_the_papers_columns_and_the_curve_is_monotone_for_the_oracle(tmp_path, cli):
    prompts = subset_file(tmp_path, 1)  # one prompt per category
    code, stdout, err = _sweep(cli, tmp_path / "s", prompts)
    assert code == 0, err
    table = (tmp_path / "s" / "sweep.md").read_text().splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")] == COLUMNS
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # One prompt per category: too few for an interval, and the table says so instead of printing one.
    assert "(n=1, no interval)" in table[2] and "(n=6, no interval)" in table[2]
    points = _points(tmp_path / "s")
    assert sorted({k for _, _, k in points}) == [1, 2, 4]
    for method in ("noise", "reflection"):
        curve = [points[(method, "world-oracle", k)] for k in (1, 2, 4)]
        # The oracle verifier is the evaluator: a pick among more images is never worse.
        assert all(a["overall"] <= b["overall"] for a, b in zip(curve, curve[1:]))
        assert len(curve[0]["categories"]) == 6 and curve[0]["prompts"] == 6
        for p in curve:
            assert p["overall_ci"][0] <= p["overall"] <= p["overall_ci"][1]
            for t, (lo, hi) in p["categories_ci"].items():
                assert lo <= p["categories"][t] <= hi
    assert "world-oracle" in stdout and "sweep.json" in stdout


def test_bootstrap_interval_holds_the_point_estimate():
    rng = np.random.default_rng(0)
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    for trial in range(20):
        rows = [(tags[i % 6], bool(rng.random() < 0.2 + 0.03 * trial)) for i in range(int(rng.integers(6, 60)))]
        overall, (lo, hi), cats = bootstrap(rows, seed=trial, resamples=200)
        assert lo <= overall <= hi and 0.0 <= lo and hi <= 1.0
        assert set(cats) == set(tags)


def test_resume_regenerates_nothing_and_adds_a_new_method(tmp_path, cli):
    prompts = subset_file(tmp_path, 1)
    out = tmp_path / "s"
    assert cli("sweep", "--prompts", prompts, "--budget", 4, "--methods", "noise", "--out", out, "--quiet")[0] == 0
    images = {p: p.stat().st_mtime_ns for p in out.glob("runs/noise-world-oracle/*/images/*.png")}
    assert images
    code, _, err = _sweep(cli, out, prompts)  # a folder that holds a sweep: refused without --resume
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = _sweep(cli, out, prompts, "--resume")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/noise-world-oracle/*/images/*.png")} == images
    before = _points(out)
    assert ("reflection", "world-oracle", 4) in before
    assert _sweep(cli, out, prompts, "--resume")[0] == 0 and _points(out) == before


@pytest.mark.parametrize("argv, words", [
    (["--methods", "noise,bogus"], "unknown method"),
    (["--budget", "0"], "budget"),
    (["--verifiers", "nope"], "nope"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--methods", "reflection", "--chains", "3", "--depth", "3"], "budget"),  # a split that does not fit 4
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, cli, argv, words):
    prompts = subset_file(tmp_path, 1)
    base = ["sweep", "--prompts", prompts, "--budget", "4", "--out", tmp_path / "s", "--quiet"]
    code, _, err = cli(*base, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "s" / "runs").exists()  # checked before anything ran


def test_ranks_together_write_what_one_process_writes(tmp_path):
    prompts = subset_file(tmp_path, 1)
    cfg = RunConfig(progress=False, seed=3)
    one = sweep(cfg, ["noise", "reflection"], ["world-oracle"], 4, tmp_path / "one", prompts=str(prompts))
    hub, results = _Hub(2), [None, None]

    def rank(r: int):
        ctx = DistContext(rank=r, world_size=2, comm=ThreadComm(hub, r))
        try:
            results[r] = sweep(cfg, ["noise", "reflection"], ["world-oracle"], 4, tmp_path / "two",
                               prompts=str(prompts), dist=ctx)
        except Exception as e:
            results[r] = e
            hub.gate.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1] is None and results[0] == one  # rank 0 merges; the numbers equal one process's


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    import sys

    prompts = subset_file(tmp_path, 1)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "reflectionflow", "sweep", "--generator", "world-render", "--corrector",
           "world-edit", "--prompts", str(prompts), "--budget", "2", "--methods", "noise", "--out", str(out),
           "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote") == 1  # rank 0 reports
    assert len(_points(out)) == 2 and (out / "sweep.md").is_file()


def test_a_verifier_without_weights_stops_the_sweep_before_any_run(tmp_path, cli, monkeypatch):
    from reflectionflow.backends.world import learned

    monkeypatch.setattr(learned, "DEFAULT_VERIFIER", tmp_path / "no-weights")
    prompts = subset_file(tmp_path, 1)
    code, _, err = cli("sweep", "--prompts", prompts, "--budget", 2, "--methods", "noise", "--verifiers",
                       "world-oracle,world-learned", "--out", tmp_path / "s", "--quiet")
    assert code == 2 and "train world-verifier" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "runs").exists()


def test_noise_is_made_once_and_rescored_as_a_run_with_that_verifier_would_pick(tmp_path, cli):
    from reflectionflow.engine.sweep import curve

    prompts = subset_file(tmp_path, 1)
    out = tmp_path / "s"
    code, _, err = cli("sweep", "--prompts", prompts, "--budget", 4, "--methods", "noise", "--verifiers",
                       "world-oracle,world-learned", "--out", out, "--quiet")
    assert code == 0, err
    assert (out / "runs" / "noise-world-oracle").is_dir() and not (out / "runs" / "noise-world-learned").exists()
    settings = json.loads((out / "sweep.json").read_text())
    assert "rescored_from" in json.dumps(settings)
    # The same noise run made with the learned verifier picks the same images.
    direct = tmp_path / "direct"
    code, _, err = cli("generate", "--prompts", prompts, "--budget", 4, "--method", "noise", "--verifier",
                       "world-learned", "--out", direct, "--quiet")
    assert code == 0, err
    got = {p["k"]: p["overall"] for p in json.loads((out / "sweep.json").read_text())["points"]
           if p["verifier"] == "world-learned"}
    assert got == {p.k: p.overall for p in curve(direct, "noise", "world-learned", 4)}
