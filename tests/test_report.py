"""report.html: what it shows, and that it renders offline in headless Chromium without errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reflectionflow.engine.posthoc import best_of_k, powers_up_to

from .test_engine_support import run, subset_file

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


@pytest.fixture(scope="module")
def reflection_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    run(out, subset_file(tmp, 1), method="reflection", budget=8, backtrack=True, report=True)
    return out


def test_report_shows_every_candidate_as_a_tree_with_the_selection_marked(reflection_run):
    page = (reflection_run / "report.html").read_text()
    for i in range(6):
        trace = [json.loads(x) for x in (reflection_run / f"{i:05d}" / "trace.jsonl").read_text().splitlines()]
        done = json.loads((reflection_run / f"{i:05d}" / "done.json").read_text())
        for rec in trace:
            assert f'src="{i:05d}/{rec["file"]}"' in page
        assert re.search(rf'<figure class="node selected" id="p{i:05d}-{done["selected"]}"', page)
    assert page.count('class="node selected"') == 6
    assert "- Move the" in page or "- Add one" in page or "- Keep the image unchanged." in page
    assert "exact GenEval-Shapes evaluator" in page  # the oracle is named as such
    assert '<img class=chart src="data:image/png;base64,' in page and "Best-of-k" in page
    # The exact evaluator's verdict on every candidate beside the verifier's score (world prompts).
    cards = page.count('<figure class="node')
    assert cards == 6 * 8
    assert page.count("evaluator <span class=ok>correct</span>") + page.count("evaluator <span class=bad>wrong") \
        == cards
    assert page.count(">verifier ") >= cards
    # Chains in order, and the method's notes in words, not JSON.
    for section in page.split("<details class=prompt")[1:]:
        labels = re.findall(r"<div class=label>chains? ([0-9, ]+) from", section)
        firsts = [int(x.split(",")[0]) for x in labels]
        assert firsts == sorted(firsts), labels
        assert "<dt>chain 0</dt>" in section and section.index("<dt>chain 0</dt>") < section.index("<dt>chain 1</dt>")
    assert "notes:" not in page and '{"' not in page
    assert "http://" not in page and "https://" not in page  # offline: nothing to fetch


def test_posthoc_best_of_k_reads_the_trace_in_generation_order(tmp_path):
    assert powers_up_to(8) == [1, 2, 4, 8] and powers_up_to(12) == [1, 2, 4, 8, 12] and powers_up_to(1) == [1]
    out = tmp_path / "noise"
    run(out, subset_file(tmp_path, 2), method="noise", budget=8)
    curve = best_of_k(out)
    assert [p.k for p in curve] == [1, 2, 4, 8]
    acc = [p.accuracy for p in curve]
    assert acc == sorted(acc) and acc[0] < acc[-1]  # the oracle pick can only improve with k
    # k = budget is the run's own selection: the accuracy of samples/.
    from reflectionflow.world.evaluate import evaluate_folder

    _, summary = evaluate_folder(out, progress=False)
    assert abs(summary["overall"] - acc[-1]) < 1e-9
    # k = 1 is the first noise sample of each prompt.
    first = best_of_k(out, ks=[1])[0]
    assert first.prompts == 12 and first.mean_score == curve[0].mean_score


def test_report_command_rebuilds_the_ledger(reflection_run, cli):
    ledger = json.loads((reflection_run / "ledger.json").read_text())
    (reflection_run / "ledger.json").unlink()
    code, out, err = cli("report", reflection_run, "--no-evaluate")
    assert code == 0, err
    rebuilt = json.loads((reflection_run / "ledger.json").read_text())
    assert rebuilt["totals"] == ledger["totals"] and rebuilt["per_prompt"] == ledger["per_prompt"]


def _chromium(page: Path, shot: Path, tmp: Path) -> tuple[int, list[str]]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1400,3000", "--virtual-time-budget=3000", f"--screenshot={shot}", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return res.returncode, console


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); CI installs it")
def test_report_renders_in_headless_chromium_without_console_errors(reflection_run, tmp_path):
    shot = tmp_path / "report.png"
    code, console = _chromium(reflection_run / "report.html", shot, tmp_path)
    assert code == 0
    assert console == [], console
    assert shot.is_file() and shot.stat().st_size > 20_000  # a page with thumbnails, not a blank one
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 3000)
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50
    # The check is live: a missing thumbnail is reported on the console.
    broken = tmp_path / "broken"
    shutil.copytree(reflection_run, broken)
    next((broken / "00000" / "images").glob("*.png")).unlink()
    _, console = _chromium(broken / "report.html", tmp_path / "broken.png", tmp_path)
    assert any("report: missing image" in line for line in console), console
