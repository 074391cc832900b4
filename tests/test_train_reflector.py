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
