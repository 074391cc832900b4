"""`reflectionflow genref build --backend flux` end to end on the CPU: tiny random FLUX and FLUX.1
Kontext folders, and the VLM verifier / reflector / refiner behind `reflectionflow serve` on loopback
(judges for any prompt, requiring a key). All four sources, GenRef keys, CoT records, resume with the
same bytes, the key in no file, and one-line errors before any weights load."""

from __future__ import annotations

import json
import tarfile
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("webdataset")

from reflectionflow.backends.flux.random_init import save_random_flux  # noqa: E402
from reflectionflow.components import PromptRefiner, RefinedPrompt, Reflection, Reflector, Verdict, Verifier  # noqa: E402
from reflectionflow.data.build_flux import draw_geneval_style, flaw_instruction  # noqa: E402
from reflectionflow.serve import JudgeServer, JudgeService  # noqa: E402
from reflectionflow.serve.server import Judges  # noqa: E402

SECRET = "sk-genref-77c1-NEVER-ON-DISK"
KEY_ENV = "RF_TEST_GENREF_KEY"
MODEL = "reflectionflow-test"


class HashVerifier(Verifier):
    """A judge for any prompt: a fixed function of the pixels, yes about half the time."""

    def score(self, images, prompts):
        out = []
        for im, p in zip(images, prompts):
            s = (zlib.crc32(np.ascontiguousarray(im).tobytes() + p.encode()) % 1000) / 1000
            out.append(Verdict(score=s, yes=s >= 0.5, details={"reason": f"hash {s:.3f}"}))
        return out


class EchoReflector(Reflector):
    def reflect(self, requests):
        return [Reflection(text=f"- Make the image show {r.original_prompt[len('a photo of '):]}.\n- Sharpen it.")
                for r in requests]


class LongRefiner(PromptRefiner):
    def refine(self, requests):
        return [RefinedPrompt(text=r.current_prompt + ", every object clearly visible, studio light")
                for r in requests]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("genref-flux")
    flux = save_random_flux(root / "flux", "tiny")
    kontext = save_random_flux(root / "kontext", "tiny", seed=1, kontext=True)
    judges = Judges(verifier=HashVerifier(), reflector=EchoReflector(), refiner=LongRefiner(),
                    names={"verifier": "hash", "reflector": "echo", "refiner": "long"})
    srv = JudgeServer(JudgeService(judges, model_name=MODEL), api_key=SECRET)
    srv.start()
    yield SimpleNamespace(flux=str(flux), kontext=str(kontext), url=srv.url, root=root)
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _argv(assets, out, *extra, n=6):
    return ["genref", "build", "--backend", "flux", "--out", out, "--n", n, "--shard-size", 4,
            "--mix", "rule=1,reward=1,length=1,editing=1", "--samples-per-prompt", 2,
            "--flux-path", assets.flux, "--kontext-path", assets.kontext, "--height", 16, "--width", 16,
            "--steps", 1, "--max-sequence-length", 32, "--flux-batch-size", 16, "--device", "cpu",
            "--vlm-url", assets.url, "--vlm-model", MODEL, "--vlm-api-key-env", KEY_ENV, "--quiet", *extra]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_four_sources_resume_and_no_secret(cli, assets, key, tmp_path):
    out = tmp_path / "part"
    code, stdout, err = cli(*_argv(assets, out, n=3))  # a first, partial shard ("killed" early)
    assert code == 0, err
    code, stdout, err = cli(*_argv(assets, out))  # resumed with a larger --n: shard 0 is redone, shard 1 made
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["samples"] == 6 and summary["shards"] == 2 and summary["resumed_at"] == 0
    cot = [json.loads(line) for line in (out / "genref_cot.jsonl").read_text().splitlines()]
    assert [r["key"] for r in cot] == [f"{i:09d}" for i in range(6)]
    assert {r["source"] for r in cot} == {"rule", "reward", "length", "editing"}
    for r in cot:
        assert set(r) >= {"prompt", "analysis", "instructions", "result", "subset", "source"}
        assert r["instructions"][0].startswith("- Make the image show ")
        if r["source"] in ("rule", "length", "editing"):
            assert r["good_yes"] is True and r["bad_yes"] is False
        if r["source"] == "reward":
            assert (r["good_yes"], r["good_score"]) > (r["bad_yes"], r["bad_score"])
        if r["source"] == "length":
            assert r["long_prompt"] == r["prompt"] + ", every object clearly visible, studio light"
        if r["source"] == "editing":
            assert r["flaw_edit"].endswith(".") and r["flaw"] in ("remove", "add", "recolor", "move", "replace")
        assert r["prompt"].startswith("a photo of ")
    with tarfile.open(out / "genref_0.tar") as tar:
        names = tar.getnames()
        image = tar.extractfile(names[0]).read()
    assert {m.split(".", 1)[1] for m in names} == {"bad_image.png", "good_image.png", "prompt.txt",
                                                   "reflection.txt", "subset.txt"}
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(image)).size == (16, 16)
    code, stdout, err = cli("genref", "inspect", out, "--json", "--quiet")
    assert code == 0 and json.loads(stdout)["samples"] == 6 and json.loads(stdout)["corrupt"]["count"] == 0
    build = json.loads((out / "build.json").read_text())
    assert build["components"] == {"generator": "flux", "verifier": "vlm-yesno", "reflector": "vlm",
                                   "refiner": "vlm", "corrector": "kontext"}
    for f in out.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in stdout + err

    full = tmp_path / "full"  # one uninterrupted run writes the same bytes
    code, _, err = cli(*_argv(assets, full))
    assert code == 0, err
    assert _files(full) == _files(out)
    code, _, err = cli(*_argv(assets, full, "--seed", "1"))
    assert code == 2 and "other settings (seed)" in err


@pytest.mark.parametrize("extra, message", [
    (["--verifier", "nvila"], "verifier 'nvila' is not a flux-backend component; accepted: vlm-yesno"),
    (["--corrector", "sdedit"], "corrector 'sdedit' is not a flux-backend component; accepted: reflection, kontext"),
    (["--verifier", "vlm-score"], "need a yes/no verifier (vlm-yesno, local-yesno)"),
    (["--generator", "sdxl"], "generator 'sdxl' is not a flux-backend component; accepted: flux"),
    (["--batch-size", "4"], "--batch-size: world-backend flag(s), but the backend is flux"),
    (["--height", "15"], "--height/--width must be multiples of 2"),
    (["--prompts", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
])
def test_bad_input_is_one_line_before_weights(cli, assets, key, tmp_path, extra, message):
    code, _, err = cli(*_argv(assets, tmp_path / "x", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_missing_folders_and_key(cli, assets, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, _, err = cli(*_argv(assets, tmp_path / "x"))
    assert code == 2 and "no API key" in err and KEY_ENV in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv(KEY_ENV, SECRET)
    argv = _argv(assets, tmp_path / "x")
    argv[argv.index("--flux-path") + 1] = str(tmp_path / "nowhere")
    code, _, err = cli(*argv)
    assert code == 2 and "--flux-path" in err and "no such folder" in err
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    code, _, err = cli(*_argv(assets, tmp_path / "x"))
    assert code == 2 and "refused" in err and "sk-wrong" not in err


def test_geneval_style_prompts_and_flaws():
    rng = np.random.default_rng(0)
    from reflectionflow.data.build_flux import _geneval

    _, benchmark = _geneval()
    metas = [draw_geneval_style(rng) for _ in range(300)]
    assert {m["tag"] for m in metas} == {"two_object", "counting", "colors", "position",
                                         "color_attr"}
    assert not any(m["prompt"] in benchmark for m in metas)
    counting = next(m for m in metas if m["tag"] == "counting")
    assert counting["exclude"][0]["count"] == counting["include"][0]["count"] + 1
    position = next(m for m in metas if m["tag"] == "position")
    kinds = {flaw_instruction(position, np.random.default_rng(s))[0] for s in range(40)}
    assert kinds == {"remove", "add", "move"}
    assert flaw_instruction({"prompt": "a cat on a sofa"}, rng)[0] in ("remove", "recolor", "replace")
