import json
import random

import numpy as np
import pytest

from reflectionflow.world import data
from reflectionflow.world.detect import detect
from reflectionflow.world.evaluate import evaluate_image
from reflectionflow.world.flaws import FLAW_KINDS, plant_flaw, truth
from reflectionflow.world.render import Obj, draw, is_legal, relations, render, render_batch, sample_scene
from reflectionflow.world.spec import BACKGROUND, parse_prompt

from .conftest import load_benchmark_module


def test_scenes_are_legal_exact_and_seeded():
    for i, meta in enumerate(data.load_benchmark("geneval-shapes")):
        scene = sample_scene(meta, random.Random(i))
        assert is_legal(scene)
        assert len(scene) == sum(c["count"] for c in meta["include"])  # exactly what is asked
        assert truth(scene, meta)[0] is True
    meta = parse_prompt("a photo of four rings")
    a, b = draw(meta, 7), draw(meta, 7)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], draw(meta, 8)[1])


def test_render_follows_the_spec_pixels():
    img = render([Obj("square", "red", 12, 10, 20)])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == BACKGROUND
    assert tuple(img[25, 15]) == (220, 30, 30)
    ring = render([Obj("ring", "blue", 16, 30, 30)])
    assert tuple(ring[38, 38]) == BACKGROUND  # the hole shows the background
    batch = render_batch([parse_prompt("a photo of a circle")] * 3, [1, 2, 3])
    assert batch.shape == (3, 64, 64, 3)


def test_geneval_relative_position_rule():
    # A centred 20 px left of B, same row: left of only.
    assert relations((0, 10, 10, 20), (20, 10, 30, 20))["rels"] == {"left of"}
    # Overlapping centres within the shrink margin: no relation at all.
    assert relations((0, 0, 10, 10), (1, 1, 11, 11))["rels"] == set()
    # Diagonal: both relations.
    assert relations((0, 0, 10, 10), (30, 30, 40, 40))["rels"] == {"left of", "above"}


def test_detector_finds_every_class_and_colour():
    scene = [Obj("circle", "pink", 14, 3, 3), Obj("triangle", "black", 18, 25, 3),
             Obj("diamond", "white", 13, 47, 3), Obj("cross", "brown", 15, 3, 30),
             Obj("ring", "yellow", 17, 24, 30), Obj("square", "purple", 12, 48, 40)]
    found = {(d.cls, d.color) for d in detect(render(scene))}
    assert found == {(o.cls, o.color) for o in scene}


def test_evaluator_follows_geneval_on_planted_flaws():
    meta = parse_prompt("a photo of a red circle and a green square")
    scene = sample_scene(meta, random.Random(0))
    assert evaluate_image(render(scene), meta).correct
    wrong = plant_flaw(meta, scene, "color", random.Random(1))
    v = evaluate_image(render(wrong), meta)
    assert not v.correct and "expected" in v.reason and v.score == 0.5
    count = parse_prompt("a photo of two crosses")
    extra = plant_flaw(count, sample_scene(count, random.Random(2)), "extra", random.Random(3))
    v = evaluate_image(render(extra), count)
    assert not v.correct and v.reason == "expected cross<3, found 3"


@pytest.mark.parametrize("source", ["project", "foreign"])
def test_evaluator_agrees_with_truth_small(source):
    bench = load_benchmark_module("evaluator_accuracy")
    out = bench.run(n=480, seed=11)
    assert out[source]["images"] > 400
    assert out[source]["agreement"] >= (0.995 if source == "project" else 0.98)


def test_flaw_kinds_all_apply():
    meta = parse_prompt("a photo of a cross left of a ring")
    scene = sample_scene(meta, random.Random(4))
    for kind in FLAW_KINDS:
        flawed = plant_flaw(meta, scene, kind, random.Random(5))
        assert flawed is not None and is_legal(flawed)
        # Colours are free in a position prompt, and GenEval ignores unrequested extra objects.
        assert truth(flawed, meta)[0] is (kind in ("extra", "color")), kind


def test_evaluate_folder_end_to_end_and_bad_input(tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, _ = cli("world", "sample", "--prompts", "geneval-shapes", "--out", out,
                          "--limit", 12, "--n-samples", 2)
    assert code == 0
    code, stdout, _ = cli("evaluate", out, "--quiet")
    assert code == 0 and "overall  1.000" in stdout
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) >= {"filename", "tag", "correct", "reason"}
    assert rows[0]["filename"] == "00000/samples/0000.png"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["overall"] == 1.0

    # one unreadable image: reported, counted as incorrect, the run goes on
    (out / "00001" / "samples" / "0000.png").write_bytes(b"not a png")
    code, stdout, _ = cli("evaluate", out, "--quiet")
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r.get("error")]
    assert code == 0 and len(bad) == 1 and "unreadable image" in bad[0]["reason"] and len(rows) == 24

    # unknown class in a metadata line: one-line error naming the file
    (out / "00002" / "metadata.jsonl").write_text(json.dumps(
        {"tag": "colors", "include": [{"class": "hexagon", "count": 1}], "prompt": "a photo of a hexagon"}) + "\n")
    code, _, err = cli("evaluate", out)
    assert code == 2 and "00002/metadata.jsonl" in err and "unknown class 'hexagon'" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    (out / "00002" / "metadata.jsonl").write_text(json.dumps(
        {"tag": "colors", "include": [{"class": "ring", "count": 1, "color": "teal"}], "prompt": "x"}) + "\n")
    code, _, err = cli("evaluate", out)
    assert code == 2 and "unknown color 'teal'" in err

    code, _, err = cli("evaluate", tmp_path / "nope")
    assert code == 2 and "no such folder" in err
    (tmp_path / "empty" / "00000").mkdir(parents=True)
    code, _, err = cli("evaluate", tmp_path / "empty")
    assert code == 2 and "metadata.jsonl: missing" in err


def test_evaluate_points_real_geneval_folders_to_geneval(tmp_path, cli):
    d = tmp_path / "g" / "00000"
    (d / "samples").mkdir(parents=True)
    (d / "metadata.jsonl").write_text(json.dumps(data.load_benchmark("geneval")[0]) + "\n")
    code, _, err = cli("evaluate", tmp_path / "g")
    assert code == 2 and "GenEval's own detector" in err and "evaluate_images.py" in err
