"""`reflectionflow genref inspect` through the real entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from reflectionflow.cli import main
from reflectionflow.data.writer import GenRefWriter


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    subsets = ["general", "length", "rule", "editing", "editing"]
    with GenRefWriter(tmp_path / "wds", max_samples_per_shard=4, image_format="jpeg") as w:
        for i in range(10):
            w.write(prompt=f"a photo of {i} rings", reflection="Remove the extra ring", subset=subsets[i % 5],
                    good=rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),
                    bad=rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    return tmp_path / "wds"


def test_inspect_json_and_preview(shards, tmp_path, capsys):
    preview = tmp_path / "preview.png"
    rc = main(["genref", "inspect", str(shards / "genref_{0..2}.tar"), "--json", "--quiet",
               "--preview", str(preview), "--per-subset", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 10
    assert report["subsets"] == {"general": 2, "length": 2, "rule": 2, "editing": 4}
    assert report["corrupt"]["count"] == 0 and report["corrupt"]["items"] == []
    assert report["preview"]["pairs"] == 8  # two per subset
    with Image.open(preview) as im:
        assert im.format == "PNG" and im.height > 8 * 100


def test_inspect_table(shards, capsys):
    assert main(["genref", "inspect", str(shards), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "samples  10 readable of 10 read" in out and "editing   4" in out


@pytest.mark.parametrize("pattern", ["{tmp}/nowhere/genref_{{0..3}}.tar", "{tmp}/nowhere", "{shards}/other_*.tar"])
def test_bad_shard_patterns_are_one_line_errors(shards, tmp_path, capsys, pattern):
    rc = main(["genref", "inspect", pattern.format(tmp=tmp_path, shards=shards), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("reflectionflow: error: no shard matches") and err.count("\n") == 1


def test_bad_preview_name_is_an_error(shards, capsys):
    assert main(["genref", "inspect", str(shards), "--preview", "grid.jpg"]) == 2
    assert "--preview must name a .png file" in capsys.readouterr().err
