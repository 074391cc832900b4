"""The shipped world generator (weights/world-generator): loads, fits its budget, draws what it is told."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from reflectionflow.models.mmdit import SIZES, MMDiT  # noqa: E402
from reflectionflow.train.world import generate_images  # noqa: E402
from reflectionflow.world.spec import parse_prompt  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "world-generator"
pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="no shipped weights")


def test_shipped_generator_loads_and_fits_the_budget():
    assert (WEIGHTS / "model.safetensors").stat().st_size < 20e6
    model = MMDiT.from_pretrained(WEIGHTS)
    assert model.config == SIZES["small"]()


def test_shipped_generator_draws_easy_prompts():
    evaluate = pytest.importorskip("reflectionflow.world.evaluate")
    model = MMDiT.from_pretrained(WEIGHTS)
    prompts = ["a photo of a red circle", "a photo of a blue square"]
    images, nfe = generate_images(model, prompts, seeds=[0, 1], steps=20, cfg_scale=3.0)
    assert nfe == 40 and images.shape == (2, 64, 64, 3)
    for img, p in zip(images, prompts):
        verdict = evaluate.evaluate_image(img, parse_prompt(p))
        assert verdict.correct, (p, verdict.reason)
