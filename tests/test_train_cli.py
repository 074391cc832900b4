"""`reflectionflow train world-generator|world-corrector`: two-step smoke runs through the command
line that check what was saved, exact resume, and one-line errors before any weights load."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from reflectionflow.models.mmdit import SIZES, MMDiT  # noqa: E402
from reflectionflow.train.corrector import SOURCES  # noqa: E402

QUICK = ["--device", "cpu", "--workers", "0", "--batch-size", "4", "--warmup", "1", "--log-every", "1",
         "--sample-steps", "1", "--quiet"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny"
    torch.manual_seed(0)
    MMDiT(SIZES["tiny"]()).save_pretrained(path)
    return path


def corrector_args(generator, out, pool, *extra):
    return ["train", "world-corrector", "--out", out, "--generator", generator, "--pool", pool,
            "--pool-size", "8", "--pool-batch", "8", "--pool-per-prompt", "2", "--label-workers", "1",
            "--val-prompts", "3", "--val-samples", "1", "--val-max", "2", "--ckpt-every", "2", "--sample-every", "2",
            *QUICK, *extra]


def steps_logged(out):
    return [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]


def test_world_corrector_two_steps_save_everything_and_resume_exactly(cli, generator, tmp_path):
    out, pool = tmp_path / "run", tmp_path / "pool"
    code, stdout, err = cli(*corrector_args(generator, out, pool, "--steps", "2", "--rank", "4"))
    assert code == 0, err
    assert "trained 2 steps" in stdout and "adapters in" in stdout
    ck = out / "checkpoint"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"):
        assert (ck / name).is_file(), name
    assert json.loads((ck / "state.json").read_text())["step"] == 2
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lora_rank"] == 4 and saved["cond_attention"] == "full" and saved["generator"] == str(generator)
    meta = load_file(str(ck / "model.safetensors"))  # the config rides in the checkpoint too
    assert any("lora_A" in k for k in meta)
    lora = load_file(str(out / "corrector" / "lora.safetensors"))
    assert lora and all("lora_" in k and v.dtype == torch.float16 for k, v in lora.items())
    card = json.loads((out / "corrector" / "corrector.json").read_text())
    assert card["step"] == 2 and card["lora"]["rank"] == 4 and card["train_config"]["max_steps"] == 2
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert set(first["loss_by_tag"]) == set(SOURCES) and len(first["loss_by_t_bin"]) == 10
    assert [json.loads(ln)["step"] for ln in (out / "val.jsonl").read_text().splitlines()] == [2]
    assert json.loads((out / "scores.json").read_text())["steps"] == 2
    assert json.loads((pool / "pool.json").read_text())["summary"]["samples"] == 8

    # again without --resume: refused before anything loads
    code, _, err = cli(*corrector_args(generator, out, pool, "--steps", "2", "--rank", "4"))
    assert code == 2 and "--resume" in err
    # --resume continues at step 2 with the saved config (rank 4 is not repeated) ...
    code, stdout, err = cli("train", "world-corrector", "--out", out, "--resume", "--steps", "3", "--quiet")
    assert code == 0, err
    assert json.loads((ck / "state.json").read_text())["step"] == 3 and steps_logged(out) == [1, 2, 3]
    # ... and ends where an uninterrupted 3-step run ends
    fresh = tmp_path / "fresh"
    code, _, err = cli(*corrector_args(generator, fresh, pool, "--steps", "3", "--rank", "4"))
    assert code == 0, err
    a, b = load_file(str(ck / "model.safetensors")), load_file(str(fresh / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_corrector_causal_kv_one_step(cli, generator, tmp_path):
    out = tmp_path / "kv"
    code, _, err = cli(*corrector_args(generator, out, tmp_path / "pool", "--steps", "1", "--rank", "2",
                                       "--cond-attention", "causal_kv", "--ckpt-every", "1"))
    assert code == 0, err
    assert json.loads((out / "corrector" / "corrector.json").read_text())["cond_attention"] == "causal_kv"


def test_world_generator_two_steps_through_the_cli(cli, tmp_path):
    out = tmp_path / "gen"
    code, stdout, err = cli("train", "world-generator", "--out", out, "--size", "tiny", "--steps", "2",
                            "--ckpt-every", "2", "--sample-every", "1", "--val-prompts", "6", "--no-final-eval", *QUICK)
    assert code == 0, err
    assert "trained 2 steps" in stdout
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert json.loads((out / "train_config.json").read_text())["model_size"] == "tiny"
    assert MMDiT.from_pretrained(out / "ema").config.width == 32
    assert steps_logged(out) == [1, 2] and (out / "samples" / "step_000001.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--cond-attention", "sideways"], "cond_attention 'sideways'; accepted: full, causal_kv"),
    (["--targets", "to_q,to_k"], "lora_targets"),
    (["--scope", "text"], "LoRA scope 'text'"),
    (["--image-dropout", "1.5"], "image_dropout must be in [0, 1)"),
    (["--mix-end", "rule=1,weird=1"], "mix_end must weigh GenRef subsets"),
    (["--pool-per-prompt", "1"], "pool_per_prompt must be >= 2"),
    (["--steps", "0"], "max_steps must be >= 1"),
])
def test_world_corrector_bad_arguments_are_one_line_errors(cli, generator, tmp_path, extra, message):
    code, _, err = cli("train", "world-corrector", "--out", tmp_path / "x", "--generator", generator, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written, nothing loaded


def test_missing_generator_and_bad_config_file(cli, tmp_path):
    code, _, err = cli("train", "world-corrector", "--out", tmp_path / "x", "--generator", tmp_path / "none")
    assert code == 2 and "none/model.safetensors: no generator weights" in err
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"lora_rnak": 8}))
    code, _, err = cli("train", "world-corrector", "--out", tmp_path / "x", "--config", bad)
    assert code == 2 and "unknown config field(s) lora_rnak" in err
    code, _, err = cli("train", "world-generator", "--out", tmp_path / "g", "--size", "huge")
    assert code == 2 and "model_size 'huge'" in err
