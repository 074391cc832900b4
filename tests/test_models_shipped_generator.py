"""The shipped world generators: v2.1 (weights/world-generator, the default) and v1
(weights/world-generator-v1): load, fit their budgets, draw what they are told."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from reflectionflow.backends.world.refine import RuleRefiner  # noqa: E402
from reflectionflow.components import RefineRequest  # noqa: E402
from reflectionflow.models.mmdit import SIZES, MMDiT  # noqa: E402
from reflectionflow.train.world import generate_images  # noqa: E402
from reflectionflow.world.spec import parse_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "weights"
V2, V1 = ROOT / "world-generator", ROOT / "world-generator-v1"
pytestmark = pytest.mark.skipif(not (V2 / "model.safetensors").is_file() or not (V1 / "model.safetensors").is_file(),
                                reason="no shipped weights")


def test_shipped_generators_load_and_fit_their_budgets():
    assert (V2 / "model.safetensors").stat().st_size < 20e6
    assert (V1 / "model.safetensors").stat().st_size < 20e6
    v2 = MMDiT.from_pretrained(V2)
    assert v2.config == SIZES["small"]() and v2.config.max_text_len == 80
    v1 = MMDiT.from_pretrained(V1)
    assert v1.config.width == SIZES["small"]().width and v1.config.max_text_len == 32


def _correct(model, prompts, metas, seeds):
    evaluate = pytest.importorskip("reflectionflow.world.evaluate")
    images, nfe = generate_images(model, prompts, seeds=seeds, steps=20, cfg_scale=3.0)
    assert nfe == 40 and images.shape == (len(prompts), 64, 64, 3)
    return [evaluate.evaluate_image(img, m).correct for img, m in zip(images, metas)]


def test_shipped_generators_draw_easy_prompts():
    prompts = ["a photo of a red circle", "a photo of a blue square"]
    metas = [parse_prompt(p) for p in prompts]
    for folder in (V2, V1):
        assert all(_correct(MMDiT.from_pretrained(folder), prompts, metas, [0, 1])), folder


def test_the_default_generator_follows_explicit_prompts():
    """The rule refiner's explicit descriptions are text the v2.1 generator was trained on and follows
    exactly, while its template prompts leave relations and colour bindings to chance (the alt-text
    noise of its training captions): explicit prompts fix position and attribute binding (4 seeds;
    exact evaluator, always against the original prompt)."""
    prompts = ["a photo of a ring", "a photo of three squares", "a photo of a cross left of a ring",
               "a photo of a red circle and a blue square"]
    metas = [parse_prompt(p) for p in prompts]
    explicit = [r.text for r in RuleRefiner().refine([RefineRequest(p, p) for p in prompts])]
    n = 4
    model = MMDiT.from_pretrained(V2)
    # The template prompts are drawn only for the position and binding prompts (the ones compared);
    # the explicit ones for all four (none may fail more than twice in 16).
    tpl = _correct(model, [p for p in prompts[2:] for _ in range(n)], [m for m in metas[2:] for _ in range(n)],
                   list(range(n)) * 2)
    exp = _correct(model, [e for e in explicit for _ in range(n)], [m for m in metas for _ in range(n)],
                   list(range(n)) * len(prompts))
    hard_tpl, hard_exp = sum(tpl), sum(exp[2 * n:])  # the position and binding prompts
    assert sum(exp) >= 14 and hard_exp >= 7 and hard_exp > hard_tpl, (tpl, exp)
