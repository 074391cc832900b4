"""`train world-reflector` and reflector `world-learned`: a two-step smoke run, the component, the text format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reflectionflow.components import ComponentError, ReflectionRequest, build
from reflectionflow.models.reflector import words_to_reflection
from reflectionflow.world.commands import parse_reflection

SMOKE = ["--size", "tiny", "--batch-size", 8, "--workers", 0, "--val-size", 4, "--log-every", 1,
         "--ckpt-every", 1, "--device", "cpu", "--quiet", "--no-bf16"]


def test_decoded_words_are_cut_into_command_lines():
    text = words_to_reflection("add two red circles move the blue square to the left of the ring".split())
    commands, rejected = parse_reflection(text)
    assert not rejected and [c.op for c in commands] == ["add", "move"]
    assert text.splitlines()[0] == "- Add two red circles."


def test_two_step_smoke_run_and_the_component(tmp_path, cli):
    out = tmp_path / "r"
    code, stdout, err = cli("train", "world-reflector", "--out", out, "--steps", 2, *SMOKE)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 2
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and 0.0 <= rows[-1]["val_exact_match"] <= 1.0
    assert "weights in" in stdout
    reflector = build("reflector", "world-learned", weights=str(out / "reflector"), device="cpu")
    image = np.full((64, 64, 3), 255, np.uint8)
    got = reflector.reflect([ReflectionRequest(image=image, original_prompt="a photo of a red circle",
                                               current_prompt="a photo of a red circle")])
    assert len(got) == 1 and got[0].text.startswith("- ")


def test_missing_weights_name_the_train_command(tmp_path):
    with pytest.raises(ComponentError, match="train world-reflector"):
        build("reflector", "world-learned", weights=str(tmp_path / "none"))


def test_a_pool_of_generator_failures_and_their_corrections_joins_the_batches(tmp_path, cli):
    import torch

    from reflectionflow.models.lora import LoRAConfig, apply_lora
    from reflectionflow.models.mmdit import SIZES, MMDiT
    from reflectionflow.train.corrector import save_corrector
    from reflectionflow.train.reflector import WorldReflectorConfig, batch_at
    from reflectionflow.world import spec

    torch.manual_seed(0)
    gen, corr = tmp_path / "gen", tmp_path / "corr"
    MMDiT(SIZES["tiny"]()).save_pretrained(gen)  # an untrained generator: every sample fails
    save_corrector(corr, apply_lora(MMDiT(SIZES["tiny"]()), LoRAConfig(rank=4)), LoRAConfig(rank=4), gen, {"step": 0})
    out = tmp_path / "r"
    code, _, err = cli("train", "world-reflector", "--out", out, "--steps", 2, "--generator", gen, "--corrector", corr,
                       "--pool-size", 6, "--generator-share", 0.5, *SMOKE)
    assert code == 0, err
    pool = np.load(out / "pool.npz")
    n = len(pool["labels"])
    assert n > 6 and pool["images"].shape == (n, 64, 64, 3)  # the samples, then their corrections
    assert len(pool["reflections"]) == n and all(parse_reflection(str(r))[0] for r in pool["reflections"])
    assert not (out / ".pool.tmp.npz").exists()
    cfg = WorldReflectorConfig(out_dir=str(out), batch_size=8, generator_share=0.5, generator=str(gen))
    data = {k: pool[k] for k in ("images", "labels")}
    data.update(prompts=[str(p) for p in pool["prompts"]], reflections=[str(r) for r in pool["reflections"]],
                fails=np.nonzero(pool["labels"] < 0.5)[0], passes=np.nonzero(pool["labels"] >= 0.5)[0])
    pools = [spec._all_combinations(t) for t in spec.TAGS]
    images, prompts, targets = batch_at(cfg, 3, pools, data)
    assert images.shape[0] == len(prompts) == len(targets) == 8
    assert set(targets[4:]) <= set(data["reflections"]) and set(prompts[4:]) <= set(data["prompts"])
    again = batch_at(cfg, 3, pools, data)  # a function of the step: a resumed run sees the same batch
    assert again[1] == prompts and again[2] == targets and torch.equal(again[0], images)
    code, _, err = cli("train", "world-reflector", "--out", tmp_path / "x", "--corrector", corr, *SMOKE)
    assert code == 2 and "--corrector needs --generator" in err
