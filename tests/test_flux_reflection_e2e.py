"""ReflectionFlow end to end at tiny scale: the engine's `generate` drives tiny random FLUX (generator
and reflection corrector with a LoRA in the released layout) and the VLM verifier, reflector and
refiner, which talk over HTTP to `reflectionflow serve` (the world's judges) on loopback. The
server injects faults; the run finishes, the failures are in the trace, and the key is nowhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

from reflectionflow.backends.flux.lora import add_lora, save_lora  # noqa: E402
from reflectionflow.backends.flux.options import (  # noqa: E402
    FluxBackendOptions,
    build_components,
    validate_options,
)
from reflectionflow.backends.flux.random_init import random_flux_pipeline, save_random_flux  # noqa: E402
from reflectionflow.backends.vlm import prompts as P  # noqa: E402
from reflectionflow.backends.vlm.options import VLMOptions  # noqa: E402
from reflectionflow.config import RunConfig  # noqa: E402
from reflectionflow.engine import Components  # noqa: E402
from reflectionflow.pipeline import generate  # noqa: E402
from reflectionflow.serve import JudgeServer, JudgeService, world_judges  # noqa: E402

SECRET = "sk-e2e-2b9f-NEVER-WRITTEN"
PROMPT = "a photo of a red circle and a blue square"


def _fail_first_reflection():
    """A 500 on every attempt of the first reflection request: that call fails for good."""
    state = {"reflect": 0}

    def hook(path, body):
        if body is None:
            return None
        text = " ".join(p.get("text", "") for m in body["messages"] if m["role"] == "user"
                        for p in (m["content"] if isinstance(m["content"], list) else []))
        if P.TASK_REFLECT in text:
            state["reflect"] += 1
            if state["reflect"] <= 2:  # the first call and its one retry
                return 500, b'{"error": {"message": "injected"}}', 0.0
        return None

    return hook


def test_reflection_method_end_to_end(tmp_path):
    flux = save_random_flux(tmp_path / "flux", "tiny")
    tf = random_flux_pipeline("tiny").transformer
    add_lora(tf, rank=4, alpha=4)
    for name, p in tf.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    lora = save_lora(tmp_path / "lora", tf, alpha=4.0)

    srv = JudgeServer(JudgeService(world_judges()), api_key=SECRET, hook=_fail_first_reflection())
    srv.start()
    try:
        opts = FluxBackendOptions(
            flux_path=str(flux), lora_path=str(lora.parent), height=32, width=32, steps=2, condition_size=16,
            max_sequence_length=48, verifier="vlm-yesno",
            # One call at a time, so that the hook's first two reflect requests are one call and its retry.
            vlm=VLMOptions(url=srv.url, model="reflectionflow-world", api_key=SECRET, concurrency=1, timeout=10,
                           retries=1, backoff=0.01),
        )
        plan = validate_options(opts)  # every check, the endpoint's GET /models included
        assert plan.served_models == ["reflectionflow-world"]
        built = build_components(opts, plan=plan)
        config = RunConfig(method="reflection", budget=6, pool=2, chains=2, depth=2, seed=3, backend="world",
                           generator="flux", corrector="reflection", verifier="vlm-yesno", reflector="vlm",
                           refiner="vlm", progress=False)
        out = tmp_path / "run"
        result = generate(config, out, prompt=PROMPT, components=Components(**built), report=False)
    finally:
        srv.shutdown()
        srv.server_close()

    trace = [json.loads(line) for line in (out / "00000" / "trace.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in trace]
    assert kinds.count("noise") == 2 and kinds.count("correct") == 4
    corrections = [r for r in trace if r["kind"] == "correct"]
    assert all(r["parent"] for r in corrections)
    # The failed reflection is recorded, and that chain's correction ran with an empty reflection.
    failed = [r for r in corrections if r["errors"] and any("reflect" in e for e in r["errors"])]
    assert len(failed) == 1 and "HTTP 500" in failed[0]["errors"][0]
    ok = [r for r in corrections if r not in failed]
    assert all(r["reflection"].startswith("- ") for r in ok)
    assert all(r["prompt"].startswith(PROMPT + ", ") for r in ok)  # refined by the world's rule refiner
    assert all(r["score"] is not None and r["yes"] is not None for r in trace)
    for r in trace:
        img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "00000" / r["file"]))
        assert img.shape == (32, 32, 3)

    led = result.ledger["totals"]
    assert led["images"] == 6 and led["nfe"] == 12
    stages = led["by_stage"]
    assert stages["verify"]["calls"] == 6 and stages["refine"]["calls"] == 4
    assert stages["reflect"]["calls"] == 5  # 4 calls, one of which was tried twice
    assert (out / "00000" / "samples" / "0000.png").is_file()
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".html", ".txt"):
            assert SECRET not in f.read_text(), f
