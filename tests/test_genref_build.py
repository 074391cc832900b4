"""`reflectionflow genref build --backend world`: counts that `genref inspect` confirms, GenRef keys,
CoT records, byte-identical output and resume, one-line errors."""

import json
import tarfile

import pytest

pytest.importorskip("webdataset")

N, SHARD = 12, 5
MIX = "rule=1,reward=1,length=1,editing=1"


def build(cli, out, *extra, n=N):
    return cli("genref", "build", "--backend", "world", "--out", out, "--n", n, "--shard-size", SHARD,
               "--no-generator", "--mix", MIX, "--quiet", *extra)


def files(folder):
    """Every file of a build folder and its bytes (build.json, shards, CoT parts, the merged CoT)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_counts_keys_cot_and_determinism(cli, tmp_path):
    code, stdout, err = build(cli, tmp_path / "a")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["samples"] == N and summary["shards"] == 3
    cot = [json.loads(ln) for k in range(3)
           for ln in (tmp_path / "a" / "cot" / f"genref_{k}.jsonl").read_text().splitlines()]
    assert len(cot) == N and [r["key"] for r in cot] == [f"{i:09d}" for i in range(N)]
    assert all(set(r) >= {"prompt", "analysis", "instructions", "result", "subset", "source"} for r in cot)
    assert {r["source"] for r in cot} == {"rule", "reward", "length", "editing"}
    code, stdout, err = cli("genref", "inspect", tmp_path / "a", "--json", "--quiet")
    assert code == 0, err
    report = json.loads(stdout)
    want = {s: sum(r["subset"] == s for r in cot) for s in ("general", "length", "rule", "editing")}
    assert report["samples"] == N and report["subsets"] == want and report["corrupt"]["count"] == 0
    with tarfile.open(tmp_path / "a" / "genref_0.tar") as tar:
        members = tar.getnames()
    assert {m.split(".", 1)[1] for m in members} == {"bad_image.png", "good_image.png", "prompt.txt",
                                                     "reflection.txt", "subset.txt"}
    for r in cot:
        if r["source"] in ("rule", "length"):
            assert r["good_score"] == 1.0 and r["bad_score"] < 1.0
        if r["source"] == "reward":
            assert r["good_score"] > r["bad_score"]
        if r["source"] == "length":
            assert r["long_prompt"].startswith(r["prompt"] + ", ")
    code, _, err = build(cli, tmp_path / "b")
    assert code == 0, err
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_resume_writes_the_same_bytes(cli, tmp_path):
    assert build(cli, tmp_path / "full")[0] == 0
    code, _, err = build(cli, tmp_path / "part", n=7)  # one complete shard and a partial one
    assert code == 0, err
    code, stdout, err = build(cli, tmp_path / "part")  # "killed" and started again with a larger --n
    assert code == 0, err
    assert json.loads(stdout)["resumed_at"] == SHARD
    assert files(tmp_path / "full") == files(tmp_path / "part")
    code, _, err = build(cli, tmp_path / "part", "--seed", "1")
    assert code == 2 and "other settings (seed)" in err


@pytest.mark.parametrize("extra, message", [
    (["--backend", "sdxl"], "--backend 'sdxl': genref build knows world, flux"),
    (["--backend", "flux"], "--no-generator: world-backend flag(s), but the backend is flux"),
    (["--flux-path", "x", "--verifier", "vlm-yesno"], "--flux-path, --verifier: flag(s) of --backend flux, but the "
                                                      "backend is world"),
    (["--n", "0"], "--n must be >= 1"),
    (["--mix", "rule=1,vibes=2"], "--mix must weigh rule, reward, length, editing"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
])
def test_bad_input_is_a_one_line_error(cli, tmp_path, extra, message):
    code, _, err = cli("genref", "build", "--out", tmp_path / "x", "--n", "4", "--no-generator", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_out_is_a_file_and_generator_missing(cli, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = cli("genref", "build", "--out", tmp_path / "f", "--n", "4", "--no-generator")
    assert code == 2 and "is not a folder" in err
    code, _, err = cli("genref", "build", "--out", tmp_path / "x", "--n", "4", "--generator", tmp_path / "none")
    assert code == 2 and "no model.safetensors" in err


def test_generator_that_never_succeeds_is_named(cli, tmp_path):
    torch = pytest.importorskip("torch")
    from reflectionflow.models.mmdit import SIZES, MMDiT

    torch.manual_seed(0)
    MMDiT(SIZES["tiny"]()).save_pretrained(tmp_path / "gen")  # predicts zero: an empty grey image
    code, _, err = cli("genref", "build", "--out", tmp_path / "x", "--n", "1", "--generator", tmp_path / "gen",
                       "--mix", "rule=1", "--steps", "1", "--samples-per-prompt", "2", "--device", "cpu", "--quiet")
    assert code == 2 and "no rule pair in 16 prompt draws" in err
