"""`reflectionflow compare`: runs on the same prompts, metric by metric with paired bootstrap
intervals, the samples and NFE spent, side-by-side images; the page renders in headless Chromium."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from reflectionflow.report.compare import paired_bootstrap

from .test_engine_support import run, subset_file
from .test_metrics import tiny_inception  # noqa: F401  (module fixture: a tiny random Inception-v3)
from .test_report import CHROMIUM, _chromium


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_inception):  # noqa: F811
    """Noise at 1 and at 4 samples per prompt on two prompts per category, each evaluated (FID against
    the ground truth of the prompts)."""
    from reflectionflow.cli import main

    tmp = tmp_path_factory.mktemp("compare")
    prompts = subset_file(tmp, 2)
    assert main(["world", "sample", "--prompts", str(prompts), "--out", str(tmp / "truth"), "--n-samples", "2"]) == 0
    runs = []
    for budget in (1, 4):
        out = tmp / f"noise{budget}"
        run(out, prompts, method="noise", budget=budget)
        assert main(["evaluate", str(out), "--quiet"]) == 0
        assert main(["evaluate", str(out), "--quiet", "--metric", "world-oracle", "--metric", "fid", "--reference",
                     str(tmp / "truth"), "--inception-path", str(tiny_inception), "--bootstrap", "50"]) == 0
        runs.append(out)
    return runs


def test_compare_writes_the_table_json_and_page(two_runs, tmp_path, cli):
    a, b = two_runs
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", a, b, "--out", out, "--top", 4, "--bootstrap", 500)
    assert code == 0, err
    data = json.loads((out / "compare.json").read_text())
    assert data["prompts_compared"] == 12 and [r["name"] for r in data["runs"]] == ["noise1", "noise4"]
    assert [r["samples_per_prompt"] for r in data["runs"]] == [1, 4] and data["runs"][1]["samples"] == 48
    assert [m["name"] for m in data["metrics"]] == ["geneval-shapes", "fid", "world-oracle"]
    fid = data["metrics"][1]
    assert fid["kind"] == "set" and fid["higher_is_better"] is False and fid["differences"] == [None, None]
    assert [e["value"] for e in fid["runs"]] == [json.loads((r / "metrics" / "fid" / "summary.json").read_text())[
        "value"] for r in two_runs]
    gen = data["metrics"][0]
    scores = [json.loads((r / "scores.json").read_text())["overall"] for r in two_runs]
    assert [e["value"] for e in gen["runs"]] == pytest.approx(scores)  # GenEval's overall, exactly
    assert gen["differences"][0] is None and gen["differences"][1]["value"] == pytest.approx(scores[1] - scores[0])
    for e in gen["runs"] + gen["differences"][1:]:
        assert e["ci95"][0] <= e["value"] <= e["ci95"][1]
    assert len(gen["categories"]) == 6 and all(c["prompts"] == 2 for c in gen["categories"].values())
    assert gen["same_as_run_verifier"] == [True, True]  # the oracle verifier IS the evaluator
    assert data["bootstrap"] == {"resamples": 500, "seed": 0, "paired": True, "stratified_by": "category"}
    top = data["differ_most"]
    assert len(top) == 4 and all(d["images"] == [f"{d['index']}/samples/0000.png"] * 2 for d in top)
    assert [d["spread"] for d in top] == sorted((d["spread"] for d in top), reverse=True)
    if gen["differences"][1]["value"] != 0:  # some prompt's verdict differs: it comes first
        assert top[0]["values"]["geneval-shapes"][0] != top[0]["values"]["geneval-shapes"][1]
    assert any("not independent" in n or "not an independent" in n for n in data["notes"])
    # The terminal table and compare.md carry the same rows.
    assert "geneval-shapes (higher is better; 12 prompts)" in stdout and "samples / prompt" in stdout
    md = (out / "compare.md").read_text()
    assert "| samples / prompt | 1.00 | 4.00 |" in md and "geneval-shapes" in md
    page = (out / "compare.html").read_text()
    assert page.count("<figure>") == 2 * len(data["differ_most"]) and page.count("data:image/png;base64,") >= 2
    assert "http://" not in page and "https://" not in page and 'src="0' not in page  # self-contained


def test_paired_intervals_see_what_unpaired_ones_cannot():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 200)
    values = np.stack([a, a + 0.01])  # run B is A plus a small constant: hidden in A's spread
    stat, _ = paired_bootstrap(values, [np.arange(200)], category_mean=False, resamples=300, seed=0)
    diff = stat[1] - stat[0]
    assert np.allclose(diff, 0.01)  # every resample draws the same prompts for both runs
    lo, hi = np.percentile(stat[0], [2.5, 97.5])
    assert hi - lo > 0.05  # each run's own interval is far wider than the difference


def test_identical_runs_differ_by_exactly_zero(two_runs, tmp_path, cli):
    a = two_runs[0]
    copy = tmp_path / "again" / a.name
    shutil.copytree(a, copy)
    code, stdout, err = cli("compare", a, copy, "--out", tmp_path / "cmp", "--top", 2)
    assert code == 0, err
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["compare0/noise1", "again/noise1"]  # same names made unique
    for m in data["metrics"]:
        if m["kind"] == "prompt":
            assert m["differences"][1] == {"value": 0.0, "ci95": [0.0, 0.0]}
        else:
            assert m["runs"][0] == m["runs"][1]


def test_bad_compare_input_is_one_line_with_exit_code_2(two_runs, tmp_path, cli):
    a, b = two_runs
    other = tmp_path / "other"
    shutil.copytree(a, other)
    for k, path in enumerate(sorted(other.glob("*/metadata.jsonl"))):
        path.write_text(json.dumps({"prompt": f"a lighthouse at dusk, take {k}"}) + "\n")
    cases = [
        ([a], "compare needs at least two run folders, got 1"),
        ([a, tmp_path / "missing"], "no such folder"),
        ([a, other], "the runs share no prompt (noise1, other); compare runs on the same prompts"),
        ([a, b, "--metric", "clipscore"], "metric clipscore: not evaluated in noise1, noise4; run `reflectionflow "
                                          "evaluate DIR --metric clipscore` there first"),
        ([a, b, "--bootstrap", 3], "--bootstrap must be >= 10"),
    ]
    for argv, message in cases:
        code, _, err = cli("compare", *argv, "--out", tmp_path / "c")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); CI installs it")
def test_compare_page_renders_in_headless_chromium_without_console_errors(two_runs, tmp_path, cli):
    out = tmp_path / "cmp"
    code, _, err = cli("compare", *two_runs, "--out", out, "--top", 6)
    assert code == 0, err
    shot = tmp_path / "compare.png"
    code, console = _chromium(out / "compare.html", shot, tmp_path)
    assert code == 0 and console == [], console
    from PIL import Image

    with Image.open(shot) as im:
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50  # tables, plots and images, not a blank page
