"""train/loop.py's one loop: the world generator, verifier and reflector all train through it, and a
verifier run stopped by the clock and resumed logs the rows of an uninterrupted one."""

from __future__ import annotations

import json
import types

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from reflectionflow.train import loop, reflector, verifier  # noqa: E402
from reflectionflow.train.reflector import WorldReflectorConfig, train_world_reflector  # noqa: E402
from reflectionflow.train.verifier import WorldVerifierConfig, train_world_verifier  # noqa: E402
from reflectionflow.train.world import WorldTrainConfig, train_world_generator  # noqa: E402

SMALL = dict(model_size="tiny", batch_size=8, num_workers=0, device="cpu", bf16=False, progress=False)


def test_generator_verifier_and_reflector_train_through_the_same_loop(tmp_path, monkeypatch):
    assert verifier.run_loop is loop.run_loop and reflector.run_loop is loop.run_loop
    real, calls = loop.run_loop, []

    def spy(cfg, run, *args, export, **kw):
        calls.append((export, type(run.model).__name__))
        return real(cfg, run, *args, export=export, **kw)

    for module in (loop, verifier, reflector):  # train_flow_model (loop.py) and the judges' trainers
        monkeypatch.setattr(module, "run_loop", spy)
    train_world_generator(WorldTrainConfig(out_dir=str(tmp_path / "g"), max_steps=1, val_prompts=0,
                                           final_eval=False, **{**SMALL, "batch_size": 4}))
    train_world_verifier(WorldVerifierConfig(out_dir=str(tmp_path / "v"), max_steps=1, val_size=4, **SMALL))
    train_world_reflector(WorldReflectorConfig(out_dir=str(tmp_path / "r"), max_steps=1, val_size=4, **SMALL))
    assert calls == [("ema", "MMDiT"), ("verifier", "WorldVerifier"), ("reflector", "WorldReflector")]
    for out, export in (("g", "ema"), ("v", "verifier"), ("r", "reflector")):
        assert (tmp_path / out / export / "model.safetensors").is_file()
        assert json.loads((tmp_path / out / "checkpoint" / "state.json").read_text())["step"] == 1


def rows(out) -> list[dict]:
    """The log rows without the wall time (the one field a resumed run cannot repeat)."""
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "train_minutes"} for ln in lines]


def test_a_verifier_stopped_by_the_clock_and_resumed_logs_the_uninterrupted_rows(tmp_path, monkeypatch):
    def config(out, **kw) -> WorldVerifierConfig:
        return WorldVerifierConfig(out_dir=str(tmp_path / out), max_steps=4, warmup_steps=2, val_size=8,
                                   log_every=1, ckpt_every=100, **{**SMALL, **kw})

    straight = train_world_verifier(config("straight"))
    assert straight.step == 4

    # The clock: still until the second step is done, then far past max_minutes.
    started = {}

    def start(cfg, build):
        started["run"] = run = loop.start_run(cfg, build)
        return run

    monkeypatch.setattr(verifier, "start_run", start)
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(
        perf_counter=lambda: 0.0 if started["run"].step < 2 else 1e9))
    stopped = train_world_verifier(config("split", max_minutes=1.0))
    monkeypatch.undo()
    assert stopped.step == 2  # the clock stopped it, and what was done is saved
    split = tmp_path / "split"
    assert json.loads((split / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (split / "verifier" / "model.safetensors").is_file()

    resumed = train_world_verifier(config("split", resume=True))
    assert resumed.step == 4 and resumed.last_loss == straight.last_loss
    assert rows(split) == rows(tmp_path / "straight")
    assert [r["step"] for r in rows(split)] == [1, 2, 3, 4] and "val_accuracy" in rows(split)[0]
    for name in ("checkpoint/model.safetensors", "checkpoint/ema.safetensors", "verifier/model.safetensors"):
        a, b = (load_file(str(tmp_path / d / name)) for d in ("straight", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
