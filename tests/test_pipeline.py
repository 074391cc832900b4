"""The Python API (reflectionflow.pipeline, docs/api.md): outputs, errors naming arguments, and every
example of the README and docs/api.md run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from reflectionflow import ArgumentError, Ledger, PipelineOutput, ReflectionFlowPipeline, TraceEntry
from reflectionflow.engine.executor import is_keep

ROOT = Path(__file__).resolve().parents[1]
FAST = {"generator": "world-render", "verifier": "world-oracle", "reflector": "world-oracle",
        "corrector": "world-edit"}


@pytest.fixture(scope="module")
def pipe():
    return ReflectionFlowPipeline.from_pretrained("world", **FAST)


def test_call_returns_images_selected_trace_and_ledger(pipe):
    out = pipe(["a photo of a red circle and a blue square", "a photo of three squares"], budget=6, pool=2,
               chains=2, depth=2)
    assert isinstance(out, PipelineOutput) and isinstance(out.ledger, Ledger)
    assert out.prompts == ["a photo of a red circle and a blue square", "a photo of three squares"]
    assert len(out.images) == len(out.selected) == len(out.traces) == 2
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in out.images)
    for trace, pick, image in zip(out.traces, out.selected, out.images):
        assert [t.order for t in trace] == list(range(6))
        assert all(isinstance(t, TraceEntry) for t in trace)
        assert pick in trace and pick.image is image
        assert max(t.score for t in trace) == pick.score
        assert all(t.correct in (True, False) for t in trace)  # world prompts: the exact evaluator's verdict
        # the pool, then a correction per round, or a fresh sample where the reflection said keep
        assert {t.kind for t in trace[:2]} == {"noise"}
        assert all(t.kind == ("resample" if is_keep(t.reflection) else "correct") for t in trace[2:])
    assert out.ledger.images == 12 and out.ledger.prompts == 2 and out.ledger.budget_per_prompt == 6
    corrected = sum(t.kind == "correct" for trace in out.traces for t in trace)
    stages = out.ledger.by_stage
    assert stages["correct"].images == corrected and stages["generate"].images == 12 - corrected
    assert out.output_dir is None


def test_same_call_same_images_and_the_cli_agrees(pipe, tmp_path):
    a = pipe("a photo of a cross left of a ring", method="noise", budget=3, seed=5)
    b = pipe("a photo of a cross left of a ring", method="noise", budget=3, seed=5, output_dir=tmp_path / "run")
    assert [t.id for t in a.traces[0]] == [t.id for t in b.traces[0]]
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert (tmp_path / "run" / "report.html").is_file() and b.output_dir == tmp_path / "run"
    from reflectionflow.cli import main

    assert main(["generate", "a photo of a cross left of a ring", "--method", "noise", "--budget", "3", "--seed", "5",
                 "--generator", "world-render", "--verifier", "world-oracle", "--out", str(tmp_path / "cli"),
                 "--quiet"]) == 0
    cli = Image.open(tmp_path / "cli" / "00000" / "samples" / "0000.png").convert("RGB")
    assert cli.tobytes() == a.images[0].tobytes()
    again = pipe("a photo of a cross left of a ring", method="noise", budget=3, seed=5, output_dir=tmp_path / "run",
                 resume=True)
    assert again.selected[0].id == b.selected[0].id


@pytest.mark.parametrize("kwargs, argument, words", [
    ({"budget": 0}, "budget", "budget must be an integer in 1..4096, got 0"),
    ({"method": "best-of-n"}, "method", "accepted: noise, zero-order, prompt, reflection"),
    ({"pool": 1, "chains": 2, "depth": 3}, "pool", "but budget is 8"),
    ({"method": "noise", "chains": 2}, "chains", "the noise method has no chains"),
    ({"early_stop": 0.9, "method": "noise"}, "early_stop", "early_stop applies"),
    ({"resume": True}, "output_dir", "give output_dir"),
])
def test_bad_call_names_the_argument(pipe, kwargs, argument, words):
    with pytest.raises(ArgumentError) as e:
        pipe("a photo of a red circle", **kwargs)
    assert e.value.argument == argument
    assert words in str(e.value)
    assert "--" not in str(e.value)


def test_bad_prompts_and_folders_name_the_argument(pipe, tmp_path):
    for prompt in ([], [1, 2], 3):
        with pytest.raises(ArgumentError) as e:
            pipe(prompt)
        assert e.value.argument == "prompt"
    with pytest.raises(ArgumentError) as e:
        pipe("a photo of a pink elephant")
    assert e.value.argument == "prompt" and "elephant" in str(e.value)
    with pytest.raises(ArgumentError) as e:
        pipe()
    assert e.value.argument == "prompt"
    pipe("a photo of a red circle", budget=2, method="noise", output_dir=tmp_path / "r")
    with pytest.raises(ArgumentError) as e:
        pipe("a photo of a blue circle", budget=2, method="noise", output_dir=tmp_path / "r")
    assert e.value.argument == "output_dir" and "--" not in str(e.value)


def test_bad_from_pretrained_names_the_argument(tmp_path):
    cases = [({"pretrained": "nowhere"}, "pretrained"), ({"generator": "nope"}, "generator"),
             ({"verifier": str(tmp_path / "missing")}, "verifier"),
             ({"generator": "world-render", "options": {"generator": {"stepz": 1}}}, "generator"),
             ({"options": {"painter": {}}}, "options")]
    cases += [({"pretrained": "flux"}, "backend_options"),
              ({"pretrained": "flux", "backend_options": {"flux_path": str(tmp_path / "none")}}, "backend_options"),
              ({"pretrained": "flux", "generator": str(tmp_path)}, "generator")]
    for kwargs, argument in cases:
        with pytest.raises(ArgumentError) as e:
            ReflectionFlowPipeline.from_pretrained(**kwargs)
        assert e.value.argument == argument, (kwargs, str(e.value))
        assert "--" not in str(e.value)


@pytest.mark.trained_world
def test_a_folder_names_weights(tmp_path):
    from reflectionflow.shipped import shipped

    pipe = ReflectionFlowPipeline.from_pretrained("world", verifier=shipped("world-verifier"),
                                                  generator="world-render", corrector="world-edit")
    assert pipe.config.verifier == "world-learned"
    assert pipe.config.options["verifier"]["weights"] == str(shipped("world-verifier"))
    with pytest.raises(ArgumentError) as e:
        ReflectionFlowPipeline.from_pretrained("world", refiner=shipped("world-verifier"))
    assert e.value.argument == "refiner"


# ----------------------------------------------------------------------------------------------
# Every example runs as written


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, but those after a `<!-- not run ... -->` line."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"(?m)^(<!-- not run[^\n]*-->\n)?```python\n(.*?)^```", text, re.S):
        if not m.group(1):
            blocks.append(m.group(2))
    return blocks


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_examples_run_unchanged(doc, tmp_path):
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no Python example"
    for k, code in enumerate(blocks):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{doc} example {k + 1}:\n{code}\n{proc.stderr[-3000:]}"
    if doc == "README.md":
        assert len(blocks[0].strip().splitlines()) <= 12
        assert (tmp_path / "circle.png").is_file()


def test_documented_error_output_is_what_the_api_prints(pipe):
    text = (ROOT / "docs/api.md").read_text(encoding="utf-8")
    shown = text.split("prints\n\n```\n", 1)[1].split("```", 1)[0].strip().splitlines()
    got = []
    for bad in ({"budget": 0}, {"method": "best-of-n"}, {"pool": 1, "chains": 2, "depth": 3}):
        with pytest.raises(ArgumentError) as e:
            pipe("a photo of a red circle", **bad)
        got.append(f"{e.value.argument} | {e.value}")
    assert got == shown
