"""Prompt files besides GenEval JSONL: plain text, CSV / TSV (DrawBench, PartiPrompts), folders.
World prompts get their GenEval metadata; free text runs with every method, without the evaluator."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from reflectionflow.config import RunConfig
from reflectionflow.engine import METHODS
from reflectionflow.engine import backends as engine_backends
from reflectionflow.pipeline import generate
from reflectionflow.world import data
from reflectionflow.world.spec import PromptError

WORLD = ["a photo of a red circle", "a photo of three rings", "a photo of a cross left of a square"]
DRAWBENCH = 'Prompts,Category\n"A red colored car.",Colors\n"A black apple and a green backpack.",Colors\n' \
            '"An umbrella on top of a spoon, seen from above.",Positional\n'
PARTI = "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\tBiology\n" \
        'A robot painted as graffiti. The words "Fly an airplane" are written.\tOutdoor Scenes\tComplex\t\n'


@pytest.fixture
def plain(monkeypatch):
    """A backend whose prompts are free text (as flux's are), with the world's components."""
    backend = replace(engine_backends.BACKENDS["world"], name="plain", parse_prompt=None,
                      resolve_prompts=lambda arg: data.resolve_prompts(arg, world_only=False))
    monkeypatch.setitem(engine_backends.BACKENDS, "plain", backend)
    return "plain"


def test_text_csv_tsv_and_folders(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(WORLD[:2]) + "\n\n  " + WORLD[2] + "  \n")
    metas = data.resolve_prompts(str(txt))  # world: parsed into GenEval lines
    assert [m["prompt"] for m in metas] == WORLD
    assert [m["tag"] for m in metas] == ["colors", "counting", "position"] and "category" not in metas[0]
    assert data.resolve_prompts(str(txt), world_only=False) == [{"prompt": p} for p in WORLD]

    csv = tmp_path / "drawbench.csv"
    csv.write_text(DRAWBENCH)
    assert data.resolve_prompts(str(csv), world_only=False) == [
        {"prompt": "A red colored car.", "category": "Colors"},
        {"prompt": "A black apple and a green backpack.", "category": "Colors"},
        {"prompt": "An umbrella on top of a spoon, seen from above.", "category": "Positional"}]
    tsv = tmp_path / "parti.tsv"
    tsv.write_text(PARTI)
    parti = data.resolve_prompts(str(tsv), world_only=False)
    assert parti[1] == {"prompt": 'A robot painted as graffiti. The words "Fly an airplane" are written.',
                        "category": "Outdoor Scenes"}

    world_csv = tmp_path / "w.csv"
    world_csv.write_text("prompt,category\n" + "".join(f"{p},easy\n" for p in WORLD))
    metas = data.resolve_prompts(str(world_csv))
    assert metas[2]["tag"] == "position" and metas[2]["category"] == "easy" and metas[2]["include"]

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.tsv").write_text(PARTI)
    (folder / "b.csv").write_text(DRAWBENCH)
    (folder / "notes.md").write_text("ignored")
    both = data.resolve_prompts(str(folder), world_only=False)
    assert [m["prompt"] for m in both] == [m["prompt"] for m in parti] + [
        "A red colored car.", "A black apple and a green backpack.", "An umbrella on top of a spoon, seen from above."]


def test_bad_prompt_files_are_one_line_errors(tmp_path, cli):
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("text,Category\na cat,Animals\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("Prompts,Category\n")
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text(DRAWBENCH)
    yaml = tmp_path / "p.yaml"
    yaml.write_text("x")
    cases = [
        (nocol, "nocol.csv: no prompt column (columns: text, Category); expected one named prompt, Prompt, Prompts"),
        (empty, "empty.txt: the prompts file is empty"),
        (header_only, "header.csv: the prompts file is empty"),
        (tmp_path / "missing.txt", "missing.txt: no such prompts file or folder"),
        (yaml, "p.yaml: unknown prompts file type '.yaml'; accepted: .jsonl, .txt, .csv, .tsv"),
        (drawbench, "drawbench.csv:2: prompt 'A red colored car.' fits no Shapes-world template"),
    ]
    for path, message in cases:
        code, _, err = cli("generate", "--prompts", path, "--out", tmp_path / "o", "--quiet")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "--backend flux" in err  # the world's refusal of free text says where free text runs
    assert not (tmp_path / "o").exists()
    with pytest.raises(PromptError, match=r"bad.csv:3: empty 'Prompts' cell"):
        bad = tmp_path / "bad.csv"
        bad.write_text("Prompts,Category\nA cat,Animals\n,Animals\n")
        data.resolve_prompts(str(bad), world_only=False)


def test_free_text_runs_every_method_and_the_evaluator_is_skipped(tmp_path, plain, cli):
    txt = tmp_path / "free.txt"
    txt.write_text("\n".join(WORLD[:2]) + "\n")
    for method in METHODS:
        out = tmp_path / method
        res = generate(RunConfig(backend=plain, method=method, budget=4, progress=False), out, prompts=str(txt))
        assert res.ledger["images"] == 8 and len(res.selected) == 2
        assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == {"prompt": WORLD[0]}
        page = (out / "report.html").read_text()
        assert "no Shapes-world GenEval metadata: the exact GenEval-Shapes evaluator is skipped" in page
    code, _, err = cli("evaluate", tmp_path / "noise", "--quiet")
    assert code == 2 and "2 of 2 prompts have no GenEval metadata" in err
    assert "accepted: geneval-shapes, clipscore" in err
    code, _, err = cli("evaluate", tmp_path / "noise", "--metric", "geneval-shapes", "--quiet")
    assert code == 2 and "does not apply to free text" in err
    code, stdout, err = cli("generate", "--backend", plain, "--prompts", txt, "--method", "noise", "--budget", 2,
                            "--out", tmp_path / "cli", "--quiet", "--no-report")
    assert code == 0, err
    assert "2 of 2 prompts have no Shapes-world GenEval metadata, so the exact GenEval-Shapes evaluator is " \
           "skipped" in stdout and "--metric clipscore" in stdout
