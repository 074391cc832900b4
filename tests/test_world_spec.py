import json

import pytest

from reflectionflow.world import data, spec
from reflectionflow.world.spec import PromptError, parse_prompt


def test_parser_round_trips_every_prompt_of_every_category():
    for tag in spec.TAGS:
        for meta in spec._all_combinations(tag):
            assert parse_prompt(meta["prompt"]) == meta


def test_geneval_format_keys():
    m = parse_prompt("a photo of a cross left of a ring")
    include = [{"class": "ring", "count": 1}, {"class": "cross", "count": 1, "position": ["left of", 0]}]
    assert m == {"tag": "position", "include": include, "prompt": "a photo of a cross left of a ring"}
    m = parse_prompt("a photo of three crosses")
    assert m["exclude"] == [{"class": "cross", "count": 4}]
    assert parse_prompt("a photo of an orange circle")["include"][0]["color"] == "orange"


def test_unfit_prompt_names_unknown_words_and_shows_templates():
    with pytest.raises(PromptError) as e:
        parse_prompt("a photo of a purple dog")
    msg = str(e.value)
    assert "unknown words: dog" in msg
    assert "color_attr" in msg and "circle, square, triangle, diamond, cross, ring" in msg
    with pytest.raises(PromptError, match="empty prompt"):
        parse_prompt("   ")
    with pytest.raises(PromptError, match="fits no Shapes-world template"):
        parse_prompt("a photo of a circle and a circle")  # GenEval never pairs a class with itself


def test_validate_metadata_errors_name_the_problem():
    with pytest.raises(PromptError, match="unknown class 'dog'"):
        spec.validate_metadata({"include": [{"class": "dog", "count": 1}], "prompt": "x"})
    with pytest.raises(PromptError, match="unknown color 'teal'"):
        spec.validate_metadata({"include": [{"class": "ring", "count": 1, "color": "teal"}], "prompt": "x"})


def test_benchmark_files_have_geneval_counts_and_regenerate_identically():
    built = data.build()
    for name, metas in built.items():
        shipped = data.load_benchmark(name)
        assert shipped == metas, f"{name} does not match `python -m reflectionflow.world.data`"
        counts = {t: sum(m["tag"] == t for m in metas) for t in spec.TAGS}
        assert counts == spec.GENEVAL_COUNTS
        assert all(parse_prompt(m["prompt"]) == m for m in metas)


def test_validation_set_is_disjoint_where_the_prompt_space_allows():
    ov = data.overlap()
    assert ov["color_attr"] == 0.0  # 2,700 distinct prompts: fully disjoint
    assert ov["position"] <= 0.8  # 120 distinct prompts for 200 slots: as disjoint as possible


def test_geneval_coco_set_is_shipped_and_refused_by_the_world():
    metas = data.load_benchmark("geneval")
    assert len(metas) == 553 and metas[0]["include"][0]["class"] == "bench"
    with pytest.raises(PromptError, match="COCO"):
        data.resolve_prompts("geneval")
    assert len(data.resolve_prompts("geneval", world_only=False)) == 553


def test_resolve_prompts_names_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(parse_prompt("a photo of a ring")) + "\n{not json\n")
    with pytest.raises(PromptError, match=r"p.jsonl:2: not valid JSON"):
        data.resolve_prompts(str(p))
    with pytest.raises(PromptError, match="no such prompts file"):
        data.resolve_prompts(str(tmp_path / "missing.jsonl"))
