"""Explicit captions (world.captions) and the rule refiner that writes them."""

import random
import re

import numpy as np

from reflectionflow.backends.world.refine import RuleRefiner, parse_refined
from reflectionflow.components import RefineRequest
from reflectionflow.world import captions as C
from reflectionflow.world.commands import VOCABULARY
from reflectionflow.world.render import Obj, relations, sample_scene
from reflectionflow.world.spec import _all_combinations, parse_prompt, sample_prompts

WORDS = set(VOCABULARY)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text)


def test_cells_sizes_and_mentions():
    assert C.cell(Obj("circle", "red", 12, 2, 2)) == ("top", "left")
    assert C.cell(Obj("circle", "red", 12, 26, 26)) == ("middle", "centre")
    assert C.cell(Obj("circle", "red", 18, 44, 44)) == ("bottom", "right")
    assert C.size_word(Obj("ring", "red", 12, 0, 0)) == "small" and C.size_word(Obj("ring", "red", 15, 0, 0)) is None
    m = C.Mention("ring", "orange", "large", ("middle", "left"))
    assert m.text(0) == "a large orange ring on the left" and m.text(1) == "a large orange ring on the left side"
    assert C.Mention("ring", "orange").text() == "an orange ring" and C.Mention("ring").name() == "the ring"
    assert C.join(["a", "b", "c"]) == "a, b and c" and C.join(["a"]) == "a"


def test_training_captions_are_true_of_the_scene_and_in_the_vocabulary():
    metas = sample_prompts(seed=4)
    kinds = {"template": 0, "explicit": 0, "combined": 0}
    for i, m in enumerate(metas[::3]):
        scene = sample_scene(m, random.Random(i))
        text = C.scene_caption(m, scene, random.Random(1000 + i))
        assert set(_words(text)) <= WORDS, text
        assert len(_words(text)) <= C.MAX_WORDS
        kinds["template" if text == m["prompt"] else "combined" if text.startswith(m["prompt"] + ", ")
              else "explicit"] += 1
        # every colour and class said is in the scene; every "where" is the cell of such an object
        for cls in set(_words(text)) & {"circle", "square", "triangle", "diamond", "cross", "ring"}:
            assert any(o.cls == cls for o in scene) or cls in m["prompt"], (text, scene)
        for color in set(_words(text)) & {"red", "green", "blue", "white", "black", "pink"}:
            assert any(o.color == color for o in scene), (text, scene)
        for sent in re.findall(r"the (?:(\w+) )?(\w+) is (left of|right of|above|below) the (?:(\w+) )?(\w+)", text):
            ca, a, rel, cb, b = sent
            if a not in ("circle", "square", "triangle", "diamond", "cross", "ring"):
                ca, a = "", ca or a
            oa = [o for o in scene if o.cls == a and (not ca or o.color == ca)]
            ob = [o for o in scene if o.cls == b and (not cb or o.color == cb)]
            assert len(oa) == 1 and len(ob) == 1, (text, scene)
            assert rel in relations(oa[0].box, ob[0].box)["rels"], (text, scene)
        for n in re.findall(r"exactly (\w+) objects", text):
            assert {"two": 2, "three": 3, "four": 4}[n] == len(scene), text
    assert all(v > 5 for v in kinds.values()), kinds


def test_caption_mix_zero_gives_templates():
    m = parse_prompt("a photo of a cross left of a ring")
    scene = sample_scene(m, random.Random(0))
    mix = C.CaptionMix(template=1.0, combined=0.0)
    assert all(C.scene_caption(m, scene, random.Random(s), mix) == m["prompt"] for s in range(20))


def _at(cell: tuple[str, str]) -> Obj:
    """A 15 px object centred in a cell of the 3 x 3 grid."""
    third = 64 / 3
    row, col = C.ROWS.index(cell[0]), C.COLUMNS.index(cell[1])
    return Obj("circle", "red", 15, round(col * third + third / 2 - 7.5), round(row * third + third / 2 - 7.5))


def test_explicit_caption_states_a_layout_that_satisfies_the_prompt():
    for m in (_all_combinations("position")[::7] + _all_combinations("counting")
              + _all_combinations("color_attr")[::97]):
        text = C.explicit_caption(m, random.Random(3), stress=("count", "extra"))
        assert text.startswith(m["prompt"] + ", ") and set(_words(text)) <= WORDS
        mentions, rel = C.prompt_mentions(m)
        body = text[len(m["prompt"]) + 2:]
        assert all(f" {k.cls} " in f" {body} " or f" {k.cls}," in body for k in mentions), text
        if rel is not None:
            a, r, b = rel
            assert f"the {mentions[a].cls} is {r} the {mentions[b].cls}" in text
        for r, layouts in C.RELATION_LAYOUTS.items():  # every layout puts A on the relation's side of B
            for ca, cb in layouts:
                oa, ob = (_at(c) for c in (ca, cb))
                assert r in relations(oa.box, ob.box)["rels"], (r, ca, cb)
        if len(mentions) >= 2:
            assert "exactly" in text and text.endswith("no other objects")


def test_refiner_layouts_differ_between_images_and_repeat_for_the_same_one():
    p = "a photo of a cross above a diamond"
    img_a = np.zeros((64, 64, 3), np.uint8)
    img_b = np.full((64, 64, 3), 7, np.uint8)
    ref = RuleRefiner()
    texts = {ref.refine([RefineRequest(p, p, image=img)])[0].text for img in (img_a, img_b, img_a)}
    again = ref.refine([RefineRequest(p, p, image=img_a)])[0].text
    assert again in texts and 1 <= len(texts) <= 2
    many = {ref.refine([RefineRequest(p, p, image=np.full((64, 64, 3), k, np.uint8))])[0].text for k in range(12)}
    assert len(many) >= 2  # chains refining the same prompt from different images try different layouts
    for t in many:
        assert parse_refined(t)[1] >= {"relation", "count", "extra"}


def test_alt_text_noise_corrupts_the_scene_not_the_caption():
    from reflectionflow.world.evaluate import evaluate_image
    from reflectionflow.world.render import render

    clean = C.CaptionMix()
    noisy = C.CaptionMix(relation_noise=1.0, binding_noise=1.0, count_noise=1.0)
    pos = parse_prompt("a photo of a cross left of a ring")
    attr = parse_prompt("a photo of a red circle and a blue square")
    three = parse_prompt("a photo of three circles")
    for m in (pos, attr, three, parse_prompt("a photo of a circle")):  # zero noise: no draw, the prompt itself
        rng = random.Random(3)
        assert C.scene_metadata(m, rng, clean) is m and rng.random() == random.Random(3).random()
    assert C.scene_metadata(parse_prompt("a photo of a circle"), random.Random(0), noisy)["include"] == \
        parse_prompt("a photo of a circle")["include"]
    # a dropped relation: some scenes violate it, and the caption keeps the prompt's words
    drawn = [C.scene_metadata(pos, random.Random(s), noisy) for s in range(40)]
    assert all("position" not in c for d in drawn for c in d["include"]) and all(d["prompt"] == pos["prompt"]
                                                                                for d in drawn)
    verdicts = [evaluate_image(render(sample_scene(d, random.Random(s))), pos).correct for s, d in enumerate(drawn)]
    assert 0 < sum(verdicts) < len(verdicts)
    # swapped colours: a blue circle and a red square
    swapped = C.scene_metadata(attr, random.Random(0), noisy)
    assert {(c["class"], c["color"]) for c in swapped["include"]} == {("circle", "blue"), ("square", "red")}
    scene = sample_scene(swapped, random.Random(1))
    text = C.scene_caption(attr, scene, random.Random(2), C.CaptionMix(template=0.0, combined=1.0, color=1.0))
    assert text.startswith(attr["prompt"] + ", ") and "blue circle" in text and "red square" in text
    # counts one off, within the world's counts, with the matching exclude clause
    counts = {C.scene_metadata(three, random.Random(s), noisy)["include"][0]["count"] for s in range(30)}
    assert counts == {2, 4}
    four = C.scene_metadata(parse_prompt("a photo of four rings"), random.Random(0), noisy)
    assert four["include"][0]["count"] == 3 and four["exclude"] == [{"class": "ring", "count": 4}]
    # at a rate, about that share of scenes is corrupted
    half = C.CaptionMix(binding_noise=0.5)
    share = sum(C.scene_metadata(attr, random.Random(s), half) is not attr for s in range(400)) / 400
    assert 0.4 < share < 0.6
