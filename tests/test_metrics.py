"""`reflectionflow evaluate DIR --metric NAME` on a world run folder: every metric writes its files,
FID's statistics are exact, a metric that is the run's verifier is flagged, bad input is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from reflectionflow.io import load_png, save_png
from reflectionflow.metrics import metric_names
from reflectionflow.metrics.fid import FrechetToReference, frechet_distance, moments
from reflectionflow.world.evaluate import evaluate_image

from .test_engine_support import run, subset_file
from .test_vlm_local import tiny_clip, tiny_llava  # noqa: F401  (module fixtures: tiny random CLIP and LLaVA)


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A noise run over one prompt per category, selected by the world oracle."""
    tmp = tmp_path_factory.mktemp("metrics")
    out = tmp / "run"
    run(out, subset_file(tmp, 1), method="noise", budget=2)
    return out


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    import torch

    from reflectionflow.metrics.inception import INCEPTION_SIZES, InceptionV3, save_inception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "tiny-inception.safetensors"
    save_inception(InceptionV3(INCEPTION_SIZES["tiny"]()), path)
    return path


def _files(root, name):
    rows = [json.loads(x) for x in (root / "metrics" / name / "results.jsonl").read_text().splitlines()]
    return rows, json.loads((root / "metrics" / name / "summary.json").read_text())


def test_clip_pickscore_and_verifiers_write_results_and_summaries(world_run, tiny_clip, tiny_llava, cli):  # noqa: F811
    code, out, err = cli("evaluate", world_run, "--quiet", "--metric", "clipscore", "--clip-path", tiny_clip,
                         "--metric", "pickscore", "--pickscore-path", tiny_clip, "--metric", "world-oracle",
                         "--metric", "local-yesno", "--local-verifier-path", tiny_llava, "--device", "cpu")
    assert code == 0, err
    for name in ("clipscore", "pickscore", "world-oracle", "local-yesno"):
        rows, summary = _files(world_run, name)
        assert len(rows) == 6 and {r["filename"] for r in rows} == {f"{i:05d}/samples/0000.png" for i in range(6)}
        assert all(r["score"] is not None and r["category"] for r in rows)
        assert summary["metric"] == name and summary["n_images"] == 6 and len(summary["categories"]) == 6
        assert summary["mean"] == pytest.approx(np.mean([r["score"] for r in rows]))
        assert summary["run_verifier"] == "world-oracle"
        assert summary["same_as_run_verifier"] is (name == "world-oracle"), name
        assert f"wrote {world_run / 'metrics' / name / 'results.jsonl'}" in out
    clip_rows, clip = _files(world_run, "clipscore")
    assert all(r["score"] == pytest.approx(100 * max(r["details"]["cosine"], 0), abs=1e-3) for r in clip_rows)
    pick_rows, pick = _files(world_run, "pickscore")
    assert pick["logit_scale"] > 1 and all(
        r["score"] == pytest.approx(pick["logit_scale"] * r["details"]["cosine"], rel=1e-4) for r in pick_rows)
    oracle_rows, oracle = _files(world_run, "world-oracle")
    assert "not an independent measurement" in oracle["independence"]
    assert "note: this metric is the run's verifier (world-oracle)" in out
    assert all(0 < r["score"] < 1 and "p_yes" in r["details"] for r in _files(world_run, "local-yesno")[0])
    # The exact evaluator keeps GenEval's files, and is flagged too: the oracle verifier IS it.
    code, out, err = cli("evaluate", world_run, "--quiet")
    assert code == 0 and "overall" in out
    scores = json.loads((world_run / "scores.json").read_text())
    assert scores["same_as_run_verifier"] is True and scores["metric"] == "geneval-shapes"
    verdicts = [json.loads(x) for x in (world_run / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in verdicts] == [r["yes"] for r in oracle_rows]  # the oracle IS the evaluator


def test_vlm_judges_as_metrics_through_an_openai_compatible_server(world_run, cli):
    from reflectionflow.serve import JudgeServer, JudgeService, world_judges

    srv = JudgeServer(JudgeService(world_judges()))
    srv.start()
    try:
        code, out, err = cli("evaluate", world_run, "--quiet", "--metric", "vlm-yesno", "--metric", "vlm-score",
                             "--vlm-url", srv.url, "--vlm-model", "reflectionflow-world")
    finally:
        srv.shutdown()
        srv.server_close()
    assert code == 0, err
    rows, yesno = _files(world_run, "vlm-yesno")
    assert yesno["calls"] == 6 and yesno["same_as_run_verifier"] is False
    for r in rows:  # the served world judge says yes exactly where the exact evaluator does
        meta = json.loads((world_run / r["index"] / "metadata.jsonl").read_text())
        assert r["yes"] is evaluate_image(load_png(world_run / r["filename"]), meta).correct
        assert (r["score"] > 0.5) is r["yes"]
    _, score = _files(world_run, "vlm-score")
    assert score["failed"] == 0 and 0 <= score["mean"] <= 10


def test_fid_is_zero_against_itself_and_grows_with_a_shift(world_run, tiny_inception, tmp_path, cli):
    shifted = tmp_path / "shifted"
    for src in sorted(world_run.glob("*/samples/*.png")):
        img = load_png(src).astype(int)
        save_png(shifted / f"{src.parent.parent.name}.png", np.clip(img + 70, 0, 255).astype(np.uint8))
    fid = {}
    for name, ref in (("self", world_run), ("shifted", shifted)):
        code, out, err = cli("evaluate", world_run, "--quiet", "--metric", "fid", "--reference", ref,
                             "--inception-path", tiny_inception, "--bootstrap", 50)
        assert code == 0, err
        rows, summary = _files(world_run, "fid")
        assert len(rows) == 6 and summary["n_reference"] == 6 and summary["feature_dim"] == 128
        assert summary["higher_is_better"] is False and summary["kind"] == "set" and not summary["same_as_run_verifier"]
        assert summary["ci95"][0] <= summary["ci95"][1]
        fid[name] = summary["value"]
    assert abs(fid["self"]) < 1e-9
    assert fid["shifted"] > 1e-6 and fid["shifted"] > 1e4 * abs(fid["self"])


def test_frechet_distance_is_exact():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(1.0, 1.5, size=(150, 8)) @ rng.normal(size=(8, 8))
    (m1, s1), (m2, s2) = moments(a), moments(b)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula, fine for full-rank covariances
    want = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)
    assert FrechetToReference(b)(a) == pytest.approx(want, rel=1e-9)  # the d x d path (n > d)
    few = a[:5]  # n < d: the Gram path, singular covariance
    assert FrechetToReference(b)(few) == pytest.approx(frechet_distance(*moments(few), m2, s2), rel=1e-9)
    assert abs(FrechetToReference(few)(few)) < 1e-9


def test_bad_metric_input_is_one_line_with_exit_code_2(world_run, tiny_inception, tmp_path, cli):
    pth = tmp_path / "tiny.pth"
    import torch

    from reflectionflow.metrics.inception import INCEPTION_SIZES, InceptionV3

    torch.save(InceptionV3(INCEPTION_SIZES["tiny"]()).state_dict(), pth)  # a .pth is read as the full network
    cases = [
        (["--metric", "nope"], "unknown metric 'nope'; accepted: " + ", ".join(metric_names())),
        (["--metric", "fid", "--reference", world_run], "--metric fid needs --inception-path FILE"),
        (["--metric", "fid", "--inception-path", tiny_inception], "--metric fid needs --reference DIR"),
        (["--metric", "fid", "--inception-path", tiny_inception, "--reference", tmp_path / "none"], "no such folder"),
        (["--metric", "fid", "--inception-path", pth, "--reference", world_run], "of another shape"),
        (["--metric", "clipscore", "--clip-path", tmp_path / "nothing"], "no such folder"),
        (["--metric", "local-yesno"], "needs --local-verifier-path"),
        (["--metric", "vlm-yesno"], "need --vlm-url"),
        (["--metric", "world-oracle", "--verifier-option", "novalue"], "expected KEY=VALUE"),
        (["--metric", "world-oracle", "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for argv, message in cases:
        code, _, err = cli("evaluate", world_run, "--quiet", *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err
    assert "metrics" not in {p.name for p in world_run.iterdir()} or not (world_run / "metrics" / "nope").exists()
    empty = tmp_path / "empty"
    shutil.copytree(world_run, empty, ignore=shutil.ignore_patterns("*.png"))
    code, _, err = cli("evaluate", empty, "--metric", "world-oracle")
    assert code == 2 and "no images found" in err
