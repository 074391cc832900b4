import json

import pytest

from reflectionflow.backends import world


@pytest.mark.trained_world
def test_generate_defaults_to_the_trained_world_models(tmp_path, cli):
    assert world.DEFAULTS["generator"] == "world-mmdit" and world.DEFAULTS["corrector"] == "world-mmdit"
    out = tmp_path / "run"
    # budget 2 = one noise image + one correction: both trained models run, in a few seconds
    # (--on-keep correct: the corrector runs even when the reflection asks for no change)
    code, stdout, err = cli("generate", "a photo of a red circle and a blue square", "--budget", 2,
                            "--pool", 1, "--chains", 1, "--depth", 1, "--on-keep", "correct", "--out", out, "--quiet")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["components"]["generator"] == "world-mmdit" and config["components"]["corrector"] == "world-mmdit"
    trace = [json.loads(x) for x in (out / "00000" / "trace.jsonl").read_text().splitlines()]
    assert [t["kind"] for t in trace] == ["noise", "correct"]
    assert all(t["nfe"] == 40 for t in trace)  # 20 Euler steps with classifier-free guidance
    assert (out / "00000" / "samples" / "0000.png").is_file()
