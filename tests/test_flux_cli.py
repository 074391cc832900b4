"""`reflectionflow generate --backend flux` from the command line, on tiny random FLUX and a tiny
corrector LoRA on disk, with the VLM judges behind `reflectionflow serve` on loopback, which
requires a key. Bad input is one line and exit code 2 before any weights load; the key is in no
file of the run folder, no output and no error; `--resume` reads the key from the environment
again; VLM calls that fail for good are counted per stage, per prompt and in total."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("diffusers")

from reflectionflow import engine  # noqa: E402
from reflectionflow.backends.flux.lora import add_lora, save_lora  # noqa: E402
from reflectionflow.backends.flux.random_init import random_flux_pipeline, save_random_flux  # noqa: E402
from reflectionflow.backends.vlm import prompts as P  # noqa: E402
from reflectionflow.components import (  # noqa: E402
    PromptRefiner,
    RefinedPrompt,
    Reflection,
    Reflector,
    Verdict,
    Verifier,
)
from reflectionflow.config import ConfigError, RunConfig  # noqa: E402
from reflectionflow.serve import JudgeServer, JudgeService  # noqa: E402
from reflectionflow.serve.server import Judges  # noqa: E402

SECRET = "sk-cli-5e1f-NEVER-ON-DISK"
KEY_ENV = "RF_TEST_VLM_KEY"
MODEL = "reflectionflow-test"
PROMPT = "a red apple on a table"


# ----------------------------------------------------------------------------------------------
# Judges for any prompt (the world's judge only Shapes-world prompts): redness as the score.


class RednessVerifier(Verifier):
    def score(self, images, prompts):
        out = []
        for im in images:
            rgb = np.asarray(im, dtype=np.float32) / 255.0
            s = float(np.clip(0.5 + rgb[..., 0].mean() - rgb[..., 1:].mean(), 0.0, 1.0))
            out.append(Verdict(score=s, yes=s > 0.5, details={"reason": f"redness {s:.2f}"}))
        return out


class AppleReflector(Reflector):
    def reflect(self, requests):
        return [Reflection(text="- Make the apple redder.\n- Remove the blue cup.") for _ in requests]


class AppleRefiner(PromptRefiner):
    def refine(self, requests):
        return [RefinedPrompt(text=r.current_prompt + ", a vivid red apple") for r in requests]


def _task(body: dict | None) -> str | None:
    if body is None:
        return None
    text = "\n".join(part.get("text", "") for m in body["messages"] if m["role"] == "user"
                     for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
    return P.task_of(text)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("flux-cli")
    flux = save_random_flux(root / "flux", "tiny")
    tf = random_flux_pipeline("tiny").transformer
    add_lora(tf, rank=4, alpha=4)
    for name, p in tf.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    lora = save_lora(root / "lora", tf, alpha=4.0)
    return SimpleNamespace(flux=str(flux), lora=str(lora.parent), root=root)


@pytest.fixture
def serve():
    """Start `reflectionflow serve` (in a thread) with a required key and an optional fault hook."""
    servers = []

    def start(hook=None) -> JudgeServer:
        judges = Judges(verifier=RednessVerifier(), reflector=AppleReflector(), refiner=AppleRefiner(),
                        names={"verifier": "redness", "reflector": "apple", "refiner": "apple"})
        srv = JudgeServer(JudgeService(judges, model_name=MODEL), api_key=SECRET, hook=hook)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def rf(cli):
    """The CLI in-process; argparse's own exits are caught too."""

    def call(*argv):
        try:
            return cli(*argv)
        except SystemExit as e:
            return e.code, "", ""

    return call


def _argv(assets, url: str, out, *extra) -> list:
    return ["generate", PROMPT, "--backend", "flux", "--flux-path", assets.flux, "--lora-path", assets.lora,
            "--steps", "2", "--height", "64", "--width", "64", "--condition-size", "32",
            "--max-sequence-length", "32", "--method", "reflection", "--budget", "4",
            "--vlm-url", url, "--vlm-model", MODEL, "--vlm-api-key-env", KEY_ENV, "--out", out, "--quiet", *extra]


def _no_secret_anywhere(out: Path, *texts: str) -> None:
    files = [f for f in out.rglob("*") if f.is_file()]
    assert files
    for f in files:
        assert SECRET.encode() not in f.read_bytes(), f
    for t in texts:
        assert SECRET not in t


def _trace(out: Path, i: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"{i:05d}" / "trace.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------


def test_help_lists_the_flux_flags_in_their_groups(capsys):
    from reflectionflow.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "world | flux" in text
    groups = {"FLUX (--backend flux):": ("--flux-path", "--lora-path", "--steps", "--guidance"),
              "VLM judges (OpenAI-compatible endpoint):": ("--vlm-url", "--vlm-model", "--vlm-api-key-env")}
    for group, flags in groups.items():
        start = text.index(group)
        section = text[start: text.index("\n\n", start)]  # argparse ends a group with a blank line
        assert all(f in section for f in flags), section


def test_free_text_prompts_and_genevals_own_set():
    flux = RunConfig(backend="flux")
    assert engine.resolve_prompt_list(flux, prompt="  a red apple on a table ") == [{"prompt": PROMPT}]
    lines = engine.resolve_prompt_list(flux, prompts="geneval")
    assert len(lines) == 553 and all(m["prompt"] for m in lines)
    with pytest.raises(ValueError, match="COCO classes"):
        engine.resolve_prompt_list(RunConfig(), prompts="geneval")  # the world draws only its shapes


def test_generate_end_to_end_then_report(assets, serve, rf, tmp_path, monkeypatch):
    seen = []
    srv = serve(hook=lambda path, body: seen.append(_task(body)))
    monkeypatch.setenv(KEY_ENV, SECRET)
    out = tmp_path / "run"
    code, stdout, err = rf(*_argv(assets, srv.url, out))
    assert code == 0, err
    assert "1/1 prompts, 4 images (4 per prompt), NFE 8, VLM calls 8" in stdout and "failed" not in stdout
    assert seen.count("yesno") == 4 and seen.count("reflect") == 2 and seen.count("refine") == 2

    config = json.loads((out / "config.json").read_text())
    cfg = config["config"]
    assert (cfg["backend"], cfg["generator"], cfg["corrector"], cfg["verifier"]) == (
        "flux", "flux", "reflection", "vlm-yesno")
    opts = cfg["backend_options"]
    assert opts["flux_path"] == str(Path(assets.flux).resolve()) and opts["steps"] == 2 and opts["height"] == 64
    assert opts["vlm"]["url"] == srv.url and opts["vlm"]["api_key_env"] == KEY_ENV and opts["vlm"]["api_key_set"]
    assert "api_key" not in opts["vlm"]
    trace = _trace(out)
    assert [r["kind"] for r in trace] == ["noise", "noise", "correct", "correct"]
    for r in trace[2:]:
        assert r["reflection"] == "- Make the apple redder.\n- Remove the blue cup."
        assert r["prompt"] == PROMPT + ", a vivid red apple" and r["parent"] in ("n0000", "n0001")
    from PIL import Image

    for r in trace:
        assert r["errors"] is None and r["score"] is not None
        with Image.open(out / "00000" / r["file"]) as im:
            assert im.size == (64, 64)
    assert (out / "00000" / "samples" / "0000.png").is_file()
    led = json.loads((out / "ledger.json").read_text())
    tot = led["totals"]
    assert (tot["images"], tot["nfe"], tot["vlm_calls"], tot["failed"]) == (4, 8, 8, 0)
    assert tot["by_stage"]["reflect"]["calls"] == tot["by_stage"]["refine"]["calls"] == 2

    (out / "report.html").unlink()
    (out / "ledger.json").unlink()
    code, stdout2, err2 = rf("report", out, "--no-evaluate")
    assert code == 0, err2
    rebuilt = json.loads((out / "ledger.json").read_text())
    assert rebuilt["totals"] == led["totals"] and rebuilt["per_prompt"] == led["per_prompt"]
    page = (out / "report.html").read_text()
    assert "vlm-yesno" in page and "c00r0001" in page and "Make the apple redder" in page
    _no_secret_anywhere(out, stdout, err, stdout2, err2)


def test_step_cache_passes_are_counted_apart_from_the_nfe(assets, serve, rf, tmp_path, monkeypatch):
    """--cache-threshold: a threshold no change can pass serves every step after the first from the
    cache, for the generator and (inheriting it) the corrector; the ledger, the trace, the command's
    summary and the report count those passes apart from the full ones."""
    srv = serve()
    monkeypatch.setenv(KEY_ENV, SECRET)
    out = tmp_path / "run"
    code, stdout, err = rf(*_argv(assets, srv.url, out, "--steps", "3", "--cache-threshold", "1e9"))
    assert code == 0, err
    assert "NFE 4 (+8 passes from the step cache)" in stdout  # 4 images x (1 computed + 2 cached steps)
    opts = json.loads((out / "config.json").read_text())["config"]["backend_options"]
    assert opts["cache_threshold"] == opts["corrector_cache_threshold"] == 1e9
    for r in _trace(out):
        stage = "correct" if r["kind"] == "correct" else "generate"
        assert r["nfe"] == 1 and r["cost"][stage]["cached"] == 2
    tot = json.loads((out / "ledger.json").read_text())["totals"]
    assert (tot["nfe"], tot["cached"], tot["by_stage"]["correct"]["cached"]) == (4, 8, 4)
    assert "cached passes</th>" in (out / "report.html").read_text()
    # Off (the default): no cached passes anywhere, and the report has no such column.
    code, stdout, err = rf(*_argv(assets, srv.url, tmp_path / "off", "--steps", "3"))
    assert code == 0 and "NFE 12, VLM" in stdout and "step cache" not in stdout
    assert "cached passes" not in (tmp_path / "off" / "report.html").read_text()
    # Off is recorded as nothing: folders made before the option resume as they did.
    off_opts = json.loads((tmp_path / "off" / "config.json").read_text())["config"]["backend_options"]
    assert "cache_threshold" not in off_opts and "corrector_cache_threshold" not in off_opts
    assert all("cached" not in r["cost"]["generate" if r["kind"] != "correct" else "correct"]
               for r in _trace(tmp_path / "off"))


def test_resume_reads_the_key_from_the_environment_again(assets, serve, rf, tmp_path, monkeypatch):
    srv = serve()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "a green pear"}) + "\n")
    out = tmp_path / "run"
    argv = [a for a in _argv(assets, srv.url, out) if a != PROMPT] + ["--prompts", prompts, "--budget", "2",
                                                                      "--method", "noise"]
    monkeypatch.setenv(KEY_ENV, SECRET)
    code, _, err = rf(*argv, "--limit", "1")
    assert code == 0, err
    first = (out / "00000" / "trace.jsonl").read_bytes()
    outputs = []
    # Nothing on disk holds the key: without the variable the resume stops before any weights load.
    monkeypatch.delenv(KEY_ENV)
    code, _, err = rf(*argv, "--resume")
    assert code == 2 and KEY_ENV in err and "no API key" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv(KEY_ENV, "sk-not-the-one")
    code, _, err = rf(*argv, "--resume")
    assert code == 2 and "was refused" in err and "sk-not-the-one" not in err
    outputs.append(err)
    assert not (out / "00001").exists()
    # Settings that decide the images must match; how the endpoint is reached need not.
    monkeypatch.setenv(KEY_ENV, SECRET)
    code, _, err = rf(*argv, "--resume", "--steps", "3")
    assert code == 2 and "steps" in err
    code, stdout, err = rf(*argv, "--resume", "--vlm-concurrency", "2", "--vlm-retries", "1")
    assert code == 0, err
    assert "2/2 prompts" in stdout and (out / "00000" / "trace.jsonl").read_bytes() == first
    assert len(_trace(out, 1)) == 2
    _no_secret_anywhere(out, stdout, err, *outputs)


def test_failed_calls_are_counted_per_stage_per_prompt_and_in_total(assets, serve, rf, tmp_path, monkeypatch):
    def permanent_errors(path, body):
        task = _task(body)
        if task == "reflect":  # retried, and still failing
            return 500, b'{"error": {"message": "injected outage"}}', 0.0
        if task == "refine":  # not retried: a request the server refuses for good
            return 400, b'{"error": {"message": "injected refusal"}}', 0.0
        return None

    srv = serve(hook=permanent_errors)
    monkeypatch.setenv(KEY_ENV, SECRET)
    out = tmp_path / "run"
    code, stdout, err = rf(*_argv(assets, srv.url, out, "--vlm-retries", "1"))
    assert code == 0, err  # the run goes on past failed calls
    assert "(4 requests failed" in stdout
    trace = _trace(out)
    for r in trace[2:]:
        assert r["reflection"] == "" and r["prompt"] == PROMPT  # no reflection; the chain kept its prompt
        assert any("HTTP 500" in e for e in r["errors"]) and any("HTTP 400" in e for e in r["errors"])
    led = json.loads((out / "ledger.json").read_text())
    for block in (led["totals"], led["per_prompt"][0]):
        st = block["by_stage"]
        assert block["failed"] == 4
        assert (st["reflect"]["failed"], st["refine"]["failed"], st["verify"]["failed"]) == (2, 2, 0)
        assert st["reflect"]["calls"] == 4 and st["refine"]["calls"] == 2  # each reflect call tried twice
    page = (out / "report.html").read_text()
    assert "<th title=" in page and ">failed</th>" in page
    assert "4 requests failed" in page and "injected outage" in page and "4 failed requests" in page
    _no_secret_anywhere(out, stdout, err)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing built and no folder written


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("components were built before the input was checked")

    monkeypatch.setattr(engine, "build_components", refuse)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_is_one_line_exit_2_before_any_weights_load(assets, serve, rf, tmp_path, monkeypatch, no_weights,
                                                               capsys):
    import torch
    from safetensors.torch import save_file

    srv = serve()
    big = tmp_path / "big.safetensors"  # full-size FLUX shapes against the tiny transformer
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(32, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(3072, 32)}, str(big))
    monkeypatch.setenv(KEY_ENV, SECRET)
    out = tmp_path / "never"

    def swap(flag, value):
        argv = _argv(assets, srv.url, out)
        argv[argv.index(flag) + 1] = value
        return argv

    def drop(flag):
        argv = _argv(assets, srv.url, out)
        i = argv.index(flag)
        return argv[:i] + argv[i + 2:]

    cases = [
        (drop("--flux-path"), ["needs --flux-path"]),
        (swap("--flux-path", str(tmp_path / "nope")), ["--flux-path", "no such folder"]),
        (swap("--flux-path", str(tmp_path)), ["--flux-path", "model_index.json"]),
        (swap("--lora-path", str(big)), ["--lora-path", "do not fit", "64->3072"]),
        (swap("--height", "63"), ["multiples of 2"]),
        (swap("--vlm-url", f"http://127.0.0.1:{_free_port()}/v1"), ["--vlm-url", "unreachable"]),
        (swap("--vlm-url", f"http://user:{SECRET}@127.0.0.1:1/v1"), ["user name or password"]),
        (swap("--vlm-model", "gpt-4o"), ["'gpt-4o' is not served", MODEL]),
        (swap("--vlm-api-key-env", "RF_TEST_UNSET_VARIABLE"), ["no API key", "RF_TEST_UNSET_VARIABLE"]),
        (swap("--vlm-api-key-env", "RF_TEST_WRONG_KEY"), ["HTTP 401", "RF_TEST_WRONG_KEY was refused"]),
        (_argv(assets, srv.url, out, "--verifier", "world-oracle"), ["not a flux-backend component"]),
        (_argv(assets, srv.url, out, "--verifier", "reward"), ["--verifier reward needs --verifier-path"]),
        (_argv(assets, srv.url, out, "--verifier", "reward", "--verifier-path", assets.flux), ["--verifier-path"]),
        (_argv(assets, srv.url, out, "--reflector", "local"), ["--reflector local needs --reflector-path"]),
        (["generate", "a photo of a ring", "--flux-path", assets.flux, "--steps", "2", "--out", out],
         ["--flux-path, --steps: flags of --backend flux", "add --backend flux"]),
        (_argv(assets, srv.url, out, "--cache-threshold", "-0.1"), ["--cache-threshold must be a number >= 0"]),
        (_argv(assets, srv.url, out, "--corrector-cache-threshold", "nan"),
         ["--corrector-cache-threshold must be a number >= 0", "nan"]),
        (_argv(assets, srv.url, out, "--cache-threshold", "fast"), ["--cache-threshold", "fast"]),
    ]
    monkeypatch.delenv("RF_TEST_UNSET_VARIABLE", raising=False)
    monkeypatch.setenv("RF_TEST_WRONG_KEY", "sk-wrong-0000")
    for argv, words in cases:
        code, _, err = rf(*argv)
        err = err or capsys.readouterr().err
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), (words, err)
        assert SECRET not in err and "sk-wrong-0000" not in err
        assert not out.exists()


def test_config_file_settings_under_flags_and_no_key_in_a_config_file(tmp_path, monkeypatch):
    from reflectionflow.cli import build_parser
    from reflectionflow.cli.generate import build_config

    conf = tmp_path / "flux.json"
    conf.write_text(json.dumps({"backend": "flux", "method": "noise", "backend_options": {
        "flux_path": "/models/FLUX.1-dev", "height": 512, "steps": 20,
        "vlm": {"url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "api_key_env": KEY_ENV}}}))
    monkeypatch.setenv(KEY_ENV, SECRET)
    args = build_parser().parse_args(["generate", "x", "--config", str(conf), "--steps", "4", "--vlm-retries", "2"])
    config, secrets = build_config(args)
    opts = config.backend_options
    assert (opts["flux_path"], opts["height"], opts["steps"], opts["width"]) == ("/models/FLUX.1-dev", 512, 4, 1024)
    assert opts["vlm"]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and opts["vlm"]["retries"] == 2
    assert opts["vlm"]["api_key_env"] == KEY_ENV and opts["vlm"]["api_key_env_explicit"] is True
    assert list(secrets.values()) == [SECRET] and SECRET not in json.dumps(config.to_dict())
    # How the endpoint is reached is no part of the run's identity; what it makes is.
    search = config.search_dict()["backend_options"]
    assert "retries" not in search["vlm"] and "api_key_env" not in search["vlm"] and search["steps"] == 4
    conf.write_text(json.dumps({"backend": "flux", "backend_options": {"vlm": {"api_key": SECRET}}}))
    with pytest.raises(ValueError, match="unknown vlm option.*api_key.*environment") as e:
        build_config(build_parser().parse_args(["generate", "x", "--config", str(conf)]))
    assert SECRET not in str(e.value)
    with pytest.raises(ConfigError, match="backend 'world' has no backend_options"):
        engine.prepare(RunConfig(backend_options={"steps": 4}), tmp_path / "w", prompt="a photo of a ring")
