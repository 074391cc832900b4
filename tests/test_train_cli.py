"""`reflectionflow train world-generator|world-corrector`: two-step smoke runs through the command
line that check what was saved, exact resume, and one-line errors before any weights load."""

import json
import random

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
    """A tiny generator with non-trivial weights (a fresh MMDiT's zero output layer passes no
    gradient to the adapters)."""
    path = tmp_path_factory.mktemp("gen") / "tiny"
    torch.manual_seed(0)
    model = MMDiT(SIZES["tiny"]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    model.save_pretrained(path)
    return path


def corrector_args(generator, out, pool, *extra):
    return ["train", "world-corrector", "--out", out, "--generator", generator, "--pool", pool,
            "--pool-size", "8", "--pool-batch", "8", "--pool-per-prompt", "2", "--label-workers", "1",
            "--val-prompts", "3", "--val-samples", "1", "--val-max", "2", "--ckpt-every", "2", "--sample-every", "2",
            *QUICK, *extra]


def steps_logged(out):
    return [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]


def test_world_corrector_two_steps_save_everything_and_resume_exactly(cli, generator, tmp_path):
    from reflectionflow.backends.world.mmdit import MMDiTCorrector
    from reflectionflow.components import CorrectionRequest
    from reflectionflow.world.render import render, sample_scene
    from reflectionflow.world.spec import parse_prompt

    out, pool = tmp_path / "run", tmp_path / "pool"
    code, stdout, err = cli(*corrector_args(generator, out, pool, "--steps", "2", "--rank", "4"))
    assert code == 0, err
    assert "trained 2 steps" in stdout and "adapters in" in stdout and "validation fixed" in stdout
    ck = out / "checkpoint"  # the shared corrector trainer's checkpoint
    for name in ("adapters.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "rank_0.pt"):
        assert (ck / name).is_file(), name
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["lora_rank"] == 4 and state["config"]["pool_dir"] == str(pool)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lora_rank"] == 4 and saved["cond_attention"] == "full" and saved["generator"] == str(generator)
    assert saved["ema_decay"] == 0.995 and saved["min_lr_ratio"] == 0.1 and saved["partial_share"] == 0.0
    adapters, ema = load_file(str(ck / "adapters.safetensors")), load_file(str(ck / "ema.safetensors"))
    assert adapters and set(adapters) == set(ema) and all("lora_" in k for k in adapters)
    lora = load_file(str(out / "corrector" / "lora.safetensors"))
    assert lora and all("lora_" in k and v.dtype == torch.float16 for k, v in lora.items())
    # The shipped adapters are the EMA weights (after 2 steps of warm-up they differ from the trained ones).
    named = {k: next(c for c in ema if c.endswith(k)) for k in lora}  # the checkpoint names the module's parameters
    assert all(torch.equal(lora[k], ema[c].half()) for k, c in named.items())
    assert any(not torch.equal(ema[c], adapters[c]) for c in named.values())
    card = json.loads((out / "corrector" / "corrector.json").read_text())
    assert card["step"] == 2 and card["lora"]["rank"] == 4 and card["train_config"]["max_steps"] == 2
    assert card["pool"]["samples"] == 8
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert set(first["loss_by_subset"]) <= set(SOURCES) and len(first["loss_by_t_bin"]) == 10
    val = [json.loads(ln) for ln in (out / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [2] and {"fixed", "broken"} <= set(val[0])
    assert (out / "samples" / "step_000002.png").is_file()
    assert json.loads((out / "scores.json").read_text())["steps"] == 2
    assert json.loads((pool / "pool.json").read_text())["summary"]["samples"] == 8
    # The engine's world-mmdit corrector loads what was exported and corrects with it.
    corrector = MMDiTCorrector(weights=str(out / "corrector"), generator=str(generator), steps=1, device="cpu")
    meta = parse_prompt("a photo of a circle")
    img = render(sample_scene(meta, random.Random(0)))
    res = corrector.correct([CorrectionRequest(img, meta["prompt"], "- Add one red circle.", seed=0)])
    assert res[0].image.shape == (64, 64, 3)

    # again without --resume: refused before anything loads
    code, _, err = cli(*corrector_args(generator, out, pool, "--steps", "2", "--rank", "4"))
    assert code == 2 and "--resume" in err
    # other model settings with --resume: refused before anything loads
    code, _, err = cli("train", "world-corrector", "--out", out, "--resume", "--steps", "3", "--rank", "8", "--quiet")
    assert code == 2 and "other lora_rank" in err
    # --resume continues at step 2 with the saved config (rank 4 is not repeated) ...
    code, stdout, err = cli("train", "world-corrector", "--out", out, "--resume", "--steps", "3", "--quiet")
    assert code == 0, err
    assert json.loads((ck / "state.json").read_text())["step"] == 3 and steps_logged(out) == [1, 2, 3]
    # ... and ends where an uninterrupted 3-step run ends (the lr of steps 0 and 1 does not depend on
    # max_steps with one warm-up step)
    fresh = tmp_path / "fresh"
    code, _, err = cli(*corrector_args(generator, fresh, pool, "--steps", "3", "--rank", "4"))
    assert code == 0, err
    for name in ("adapters.safetensors", "ema.safetensors"):
        a, b = load_file(str(ck / name)), load_file(str(fresh / "checkpoint" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[json.loads(ln)["loss"] for ln in (run / "log.jsonl").read_text().splitlines()] for run in (out, fresh)]
    assert losses[0] == losses[1]


def test_world_corrector_lead_command_line_parses(generator, tmp_path):
    """The H100 command of the shipped corrector (weights/MODEL_CARD.md) with partial-noise starts."""
    import argparse

    from reflectionflow.cli.train import COMMON, CORRECTOR, build_config, register
    from reflectionflow.train.corrector import WorldCorrectorConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    argv = ["world-corrector", "--generator", str(generator), "--pool", "runs/pool", "--pool-size", "32768",
            "--out", str(tmp_path / "full"), "--steps", "3500", "--minutes", "4.8", "--compile", "--workers", "5",
            "--batch-size", "256", "--mix-steps", "700", "--sample-every", "700", "--ckpt-every", "700",
            "--log-every", "50", "--partial-share", "0.5", "--quiet"]
    cfg = build_config(WorldCorrectorConfig, parser.parse_args(["train", *argv]), COMMON + CORRECTOR)
    assert (cfg.max_steps, cfg.max_minutes, cfg.compile, cfg.num_workers, cfg.batch_size) == (3500, 4.8, True, 5, 256)
    assert (cfg.mix_steps, cfg.val_every, cfg.ckpt_every, cfg.log_every) == (700, 700, 700, 50)
    assert (cfg.partial_share, cfg.partial_strengths, cfg.progress) == (0.5, (0.5, 0.75), False)
    assert (cfg.pool_dir, cfg.pool_size, cfg.genref) == ("runs/pool", 32768, "")
    # the shipped corrector's schedule: AdamW 1e-3, 100 warm-up steps, cosine to 0.1x, EMA 0.995
    assert (cfg.optimizer, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio, cfg.ema_decay) == \
        ("adamw", 1e-3, 100, "cosine", 0.1, 0.995)
    assert cfg.mix == {"stages": [0, 700], "ratios": {"general": [0.1, 0.1], "length": [0.1, 0.15],
                                                     "rule": [0.1, 0.55], "editing": [0.7, 0.2]}}
    strengths = parser.parse_args(["train", *argv, "--partial-strengths", "0.25, 0.5,1"])
    assert strengths.partial_strengths == (0.25, 0.5, 1.0)


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
    (["--partial-share", "0.5", "--partial-strengths", "0,1.5"], "partial_strengths must be start times in (0, 1]"),
    (["--partial-share", "1.5"], "partial_share must be in [0, 1]"),
    (["--ema", "1"], "ema_decay must be in [0, 1)"),
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
