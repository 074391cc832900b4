"""The world backend's oracle components: exact answers where the world gives them."""

from __future__ import annotations

import re

import numpy as np
import pytest

from reflectionflow.backends.world.refine import ASPECTS, parse_refined
from reflectionflow.backends.world.simulated import NOISE_DIM
from reflectionflow.components import (
    ComponentError,
    CorrectionRequest,
    GenerationRequest,
    RefineRequest,
    ReflectionRequest,
    build,
    describe,
)
from reflectionflow.world import data
from reflectionflow.world.commands import VOCABULARY, format_reflection, parse_reflection
from reflectionflow.world.detect import detect
from reflectionflow.world.evaluate import evaluate_image
from reflectionflow.world.render import Obj, render
from reflectionflow.world.spec import parse_prompt

BENCH = data.load_benchmark("geneval-shapes")


def _sample(per_tag=8):
    out, seen = [], {}
    for m in BENCH:
        if seen.get(m["tag"], 0) < per_tag:
            seen[m["tag"]] = seen.get(m["tag"], 0) + 1
            out.append(m)
    return out


def test_registry_names_the_oracle_components():
    assert "world-oracle" in describe("verifier") and "oracle" in describe("verifier")["world-oracle"]
    for kind, name in [("generator", "world-render"), ("corrector", "world-edit"), ("reflector", "world-oracle"),
                       ("refiner", "world-rule")]:
        assert name in describe(kind)
    with pytest.raises(ComponentError, match=r"unknown option\(s\) p_mising; accepted: p_missing, p_extra"):
        build("generator", "world-render", p_mising=0.1)
    with pytest.raises(ComponentError, match="p_fail must be a probability in \\[0, 1\\], got 2"):
        build("corrector", "world-edit", p_fail=2)
    with pytest.raises(ComponentError, match="accepted: $"):
        build("verifier", "world-oracle", strict=True)


def test_oracle_verifier_is_the_evaluator_with_a_graded_score():
    gen, ver = build("generator", "world-render"), build("verifier", "world-oracle")
    metas = _sample()
    images = [r.image for r in gen.generate([GenerationRequest(m["prompt"], seed=i) for i, m in enumerate(metas)])]
    verdicts = ver.score(images, [m["prompt"] for m in metas])  # prompt text only: never the category
    wrong = 0
    for img, m, v in zip(images, metas, verdicts):
        truth = evaluate_image(img, m)
        assert v.yes == truth.correct and v.score == truth.score
        assert (v.score == 1.0) == v.yes
        wrong += not v.yes
    assert 0 < wrong < len(metas)  # the generator makes mistakes, not always


def _scene_image(*objs):
    return render([Obj(*o) for o in objs])


@pytest.mark.parametrize("prompt, objs, expected", [
    ("a photo of a red circle and a green square", [("square", "green", 14, 40, 40)], ["- Add one red circle."]),
    ("a photo of two triangles", [("triangle", "red", 14, 4, 4), ("triangle", "blue", 14, 30, 4),
                                  ("triangle", "pink", 14, 4, 40)], ["- Remove one pink triangle."]),
    ("a photo of a green square", [("square", "blue", 14, 20, 20)], ["- Change the blue square to green."]),
    ("a photo of a cross left of a ring", [("cross", "red", 14, 44, 20), ("ring", "blue", 14, 6, 20)],
     ["- Move the cross to the left of the ring."]),
    ("a photo of a square", [("diamond", "red", 14, 20, 20)], ["- Replace the red diamond with a square."]),
    ("a photo of a square", [("square", "red", 14, 20, 20)], ["- Keep the image unchanged."]),
    # Most critical first: the missing object, then the extra of a requested class, then strays.
    ("a photo of a blue circle and a yellow ring",
     [("ring", "yellow", 14, 4, 4), ("ring", "red", 14, 30, 4), ("cross", "black", 14, 4, 40)],
     ["- Replace the black cross with a blue circle.", "- Remove one red ring."]),
    ("a photo of four crosses", [("cross", "red", 14, 4, 4)], ["- Add three crosses."]),
])
def test_oracle_reflector_writes_reflectionflow_commands(prompt, objs, expected):
    refl = build("reflector", "world-oracle").reflect([ReflectionRequest(_scene_image(*objs), prompt, prompt)])
    assert refl[0].text.splitlines() == expected
    commands, rejected = parse_reflection(refl[0].text)
    assert not rejected and format_reflection(commands) == refl[0].text


def test_reflect_then_perfect_correction_fixes_every_flawed_image():
    metas = _sample(10)
    gen = build("generator", "world-render", p_missing=0.5, p_extra=0.5, p_color=0.5, p_class=0.5, p_relation=0.5)
    refl, cor = build("reflector", "world-oracle"), build("corrector", "world-edit", p_fail=0.0, p_new_flaw=0.0)
    images = [r.image for r in gen.generate([GenerationRequest(m["prompt"], seed=i) for i, m in enumerate(metas)])]
    flawed = [(m, img) for m, img in zip(metas, images) if not evaluate_image(img, m).correct]
    assert len(flawed) > len(metas) // 2
    texts = refl.reflect([ReflectionRequest(img, m["prompt"], m["prompt"]) for m, img in flawed])
    fixed = cor.correct([CorrectionRequest(img, m["prompt"], t.text, seed=k)
                         for k, ((m, img), t) in enumerate(zip(flawed, texts))])
    assert all(evaluate_image(f.image, m).correct for (m, _), f in zip(flawed, fixed))


def test_corrector_commands_fail_with_their_configured_chance():
    img = _scene_image(("square", "blue", 14, 20, 20))
    never = build("corrector", "world-edit", p_fail=1.0, p_new_flaw=0.0)
    out = never.correct([CorrectionRequest(img, "a photo of a green square", "- Change the blue square to green.",
                                           seed=s) for s in range(5)])
    assert all([(d.cls, d.color) for d in detect(o.image)] == [("square", "blue")] for o in out)
    always = build("corrector", "world-edit", p_fail=0.0, p_new_flaw=0.0)
    o = always.correct([CorrectionRequest(img, "a photo of a green square", "- Change the blue square to green.", 1)])
    assert [(d.cls, d.color) for d in detect(o[0].image)] == [("square", "green")]


def test_generator_is_seeded_by_seed_or_noise():
    gen = build("generator", "world-render")
    p = "a photo of a cross left of a ring"
    a, b, c = gen.generate([GenerationRequest(p, 5), GenerationRequest(p, 5), GenerationRequest(p, 6)])
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    z = gen.noise_like(5)
    assert z.shape == (NOISE_DIM,)
    (d,) = gen.generate([GenerationRequest(p, seed=999, noise=z)])  # the noise decides, not the seed
    assert np.array_equal(d.image, a.image)
    with pytest.raises(ValueError, match="noise must have 16 values"):
        gen.generate([GenerationRequest(p, 1, noise=np.zeros(3))])
    perfect = build("generator", "world-render", p_missing=0, p_extra=0, p_color=0, p_class=0, p_relation=0)
    imgs = perfect.generate([GenerationRequest(m["prompt"], i) for i, m in enumerate(_sample(4))])
    assert all(evaluate_image(r.image, m).correct for r, m in zip(imgs, _sample(4)))


def test_refiner_restates_in_the_world_vocabulary_and_the_generator_reads_it():
    ref = build("refiner", "world-rule")
    words = set(VOCABULARY)
    for m in _sample(6):
        p = m["prompt"]
        plain = ref.refine([RefineRequest(p, p)])[0].text
        assert plain.startswith(p + ", ")  # the original description is never changed
        meta, aspects = parse_refined(plain)
        assert meta == parse_prompt(p) and {"count", "class", "extra"} <= aspects <= set(ASPECTS)
        assert set(re.findall(r"[a-z]+", plain.lower())) <= words, plain
    p = "a photo of a red circle and a green square"
    step1 = ref.refine([RefineRequest(p, p, reflection="- Change the blue circle to red.")])[0].text
    assert step1.startswith(p + ", a red circle ") and "green square" in step1.split(", ", 1)[1]
    assert "no other objects" not in step1 and parse_refined(step1)[1] == {"count", "class", "color"}
    step2 = ref.refine([RefineRequest(p, step1, reflection="- Remove one pink triangle.")])[0].text
    assert parse_refined(step2)[1] == {"count", "class", "color", "extra"}  # aspects accumulate along a chain
    assert step2.endswith("exactly two objects, no other objects")
    keep = ref.refine([RefineRequest(p, step2, reflection="- Keep the image unchanged.")])[0].text
    assert keep == step2
    gen = build("generator", "world-render")
    assert gen.generate([GenerationRequest(step2, 3)])[0].image.shape == (64, 64, 3)
    bad = ref.refine([RefineRequest("a photo of a dog", "a photo of a dog")])[0]
    assert bad.error and "unknown words: dog" in bad.error
