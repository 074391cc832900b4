"""`reflectionflow generate` / `report`: defaults, and bad input as one-line errors before any model loads."""

from __future__ import annotations

import json

import pytest

from reflectionflow import engine

from .test_engine_support import outputs, subset_file


@pytest.fixture
def rf(cli, monkeypatch):
    """The CLI in-process; argparse's own exits are caught too."""

    def call(*argv):
        try:
            return cli(*argv)
        except SystemExit as e:
            return e.code, "", ""

    return call


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("components were built before the input was checked")

    monkeypatch.setattr(engine, "build_components", refuse)


def test_help_names_the_default_judges_and_the_oracle_ones(capsys):
    from reflectionflow.cli import main

    from .conftest import SHIPPED

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert SHIPPED["verifier"] == SHIPPED["reflector"] == "world-learned"  # what the help text says
    assert "learned ones (world-learned)" in text and "world-oracle" in text and "reflection method" in text
    assert "world-mmdit-partial" in text and "world-mmdit-kv-partial" in text


def test_default_generate_then_evaluate_and_report(rf, tmp_path):
    out = tmp_path / "one"
    code, stdout, err = rf("generate", "a photo of a cross left of a ring", "--out", out, "--quiet")
    assert code == 0, err
    assert "8 images" in stdout and "verifier world-oracle" in stdout
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["backend"], cfg["method"], cfg["budget"]) == ("world", "reflection", 8)
    for name in ("config.json", "ledger.json", "report.html", "00000/metadata.jsonl", "00000/trace.jsonl",
                 "00000/samples/0000.png", "00000/done.json"):
        assert (out / name).is_file(), name
    code, stdout, err = rf("evaluate", out, "--quiet")
    assert code == 0 and "overall" in stdout, err
    (out / "report.html").unlink()
    code, stdout, err = rf("report", out)
    assert code == 0 and (out / "report.html").is_file() and "1/1 prompts, 8 images" in stdout


def test_config_file_and_flags(rf, tmp_path):
    prompts = subset_file(tmp_path, 1)
    conf = tmp_path / "run.yaml"
    conf.write_text("method: prompt\nbudget: 4\nseed: 3\noptions:\n  generator:\n    p_relation: 0.9\n")
    out = tmp_path / "cfg"
    code, _, err = rf("generate", "--prompts", prompts, "--config", conf, "--budget", "6", "--out", out, "--quiet",
                      "--no-report")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["budget"], cfg["seed"], cfg["chains"], cfg["depth"]) == ("prompt", 6, 3, 2, 3)
    assert cfg["options"] == {"generator": {"p_relation": 0.9}}
    assert not (out / "report.html").exists()


def _bad(rf, capsys_err, *argv):
    code, _, err = rf(*argv)
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["generate", ""], "empty prompt; templates:"),
    (["generate", "a photo of a purple dog"], "unknown words: dog"),
    (["generate", "a photo of a purple dog"], "classes: circle, square, triangle, diamond, cross, ring"),
    (["generate", "--prompts", "/nonexistent/p.jsonl"], "no such prompts file"),
    (["generate", "a photo of a ring", "--budget", "0"], "budget (--budget) must be an integer in 1..4096, got 0"),
    (["generate", "a photo of a ring", "--budget", "many"], "argument --budget: invalid int value: 'many'"),
    (["generate", "a photo of a ring", "--method", "beam"],
     "unknown method 'beam'; accepted: noise, zero-order, prompt, reflection"),
    (["generate", "a photo of a ring", "--verifier", "gpt5"], "unknown verifier 'gpt5'; accepted: "),
    (["generate", "a photo of a ring", "--backend", "dalle"], "unknown backend 'dalle'; accepted: world"),
    (["generate", "a photo of a ring", "--chains", "2", "--depth", "4", "--pool", "1"],
     "pool + chains x depth = 1 + 2 x 4 = 9, but --budget is 8"),
    (["generate"], "give either a PROMPT or --prompts"),
    (["generate", "a photo of a ring", "--prompts", "geneval-shapes"], "not both"),
    (["generate", "a photo of a ring", "--reallocate", "sideways", "--early-stop", "1"],
     "unknown reallocate 'sideways'; accepted: none, chains, prompts"),
])
def test_bad_input_is_one_line_exit_2_before_any_model_loads(rf, tmp_path, no_models, capsys, argv, message):
    out = tmp_path / "never"
    code, _, err = rf(*argv, "--out", out)
    err = err or capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not out.exists()


def test_malformed_prompts_files_name_the_line(rf, tmp_path, no_models, capsys):
    good = json.dumps({"tag": "single_object", "include": [{"class": "ring", "count": 1}],
                       "prompt": "a photo of a ring"})
    cases = [
        ("{not json", ":2: not valid JSON"),
        (json.dumps({"include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}),
         "line 2: unknown class 'dog'; the Shapes world has circle, square"),
        (json.dumps({"include": [{"class": "ring", "count": 1}]}), "line 2: missing key 'prompt'"),
    ]
    for k, (line, message) in enumerate(cases):
        p = tmp_path / f"p{k}.jsonl"
        p.write_text(good + "\n" + line + "\n")
        code, _, err = rf("generate", "--prompts", p, "--out", tmp_path / f"o{k}")
        err = err or capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    conf = tmp_path / "bad.yaml"
    conf.write_text("method: noise\nbudgett: 4\n")
    code, _, err = rf("generate", "a photo of a ring", "--config", conf, "--out", tmp_path / "c")
    err = err or capsys.readouterr().err
    assert code == 2 and "unknown setting(s) budgett; accepted: method, budget" in err


def test_a_folder_holding_another_run_is_refused_and_kept(rf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert rf("generate", "a photo of two rings", "--out", out, "--quiet")[0] == 0
    before = outputs(out)
    config_before = (out / "config.json").read_bytes()
    monkeypatch.setattr(engine, "build_components", lambda *a, **k: pytest.fail("built components"))
    for extra, message in [
        (["--budget", "4"], "already holds a different run (budget: 8 -> 4"),
        ([], "already holds a run with the same config; pass --resume"),
        (["--budget", "4", "--resume"], "--resume: "),
    ]:
        code, _, err = rf("generate", "a photo of two rings", "--out", out, "--quiet", *extra)
        err = err or capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = rf("generate", "a photo of three rings", "--out", out, "--quiet", "--resume")
    err = err or capsys.readouterr().err
    assert code == 2 and "prompts.sha256" in err
    assert outputs(out) == before and (out / "config.json").read_bytes() == config_before
    (tmp_path / "file").write_text("x")
    code, _, err = rf("generate", "a photo of two rings", "--out", tmp_path / "file")
    err = err or capsys.readouterr().err
    assert code == 2 and "exists and is not a folder" in err


def test_report_on_a_folder_that_is_not_a_run(rf, tmp_path, capsys):
    code, _, err = rf("report", tmp_path / "missing")
    err = err or capsys.readouterr().err
    assert code == 2 and "no such run folder" in err
    code, _, err = rf("report", tmp_path)
    err = err or capsys.readouterr().err
    assert code == 2 and "no config.json" in err


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    from reflectionflow.cli.generate import default_out
    from reflectionflow.config import RunConfig

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(method="noise", budget=2)
    a, b = default_out(cfg, "a photo of a ring", False), default_out(cfg, "a photo of a circle", False)
    assert a != b and a.startswith("runs/noise-b2-s0-")  # the name depends on the prompt
    (tmp_path / a).mkdir(parents=True)
    assert default_out(cfg, "a photo of a ring", False) == a + "-2"  # a second run of it gets its own folder
    (tmp_path / (a + "-2")).mkdir()
    assert default_out(cfg, "a photo of a ring", False) == a + "-3"
    assert default_out(cfg, "a photo of a ring", True) == a  # --resume continues the plain name


def test_limit_keeps_the_category_mix():
    from reflectionflow.engine import PromptSpec, limit_specs
    from reflectionflow.world.spec import sample_prompts

    metas = sample_prompts(seed=1)  # category-ordered: 80 single objects first
    specs = [PromptSpec(index=i, prompt=m["prompt"], metadata=m) for i, m in enumerate(metas)]
    picked = limit_specs(specs, 12)
    assert [s.index for s in picked] == sorted(s.index for s in picked)
    tags = [s.metadata["tag"] for s in picked]
    assert len(picked) == 12 and all(tags.count(t) == 2 for t in set(tags)) and len(set(tags)) == 6
    plain = [PromptSpec(index=i, prompt=f"p{i}", metadata={}) for i in range(5)]
    assert [s.index for s in limit_specs(plain, 3)] == [0, 1, 2]
