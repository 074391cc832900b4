"""The screenshots in docs/screenshots/ (report.html, compare.html, sweep.png): the checked-in ones
are real pictures of the expected size, and benchmarks/screenshots.py renders them again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import load_benchmark_module

ROOT = Path(__file__).resolve().parents[1]
shots = load_benchmark_module("screenshots")
SIZES = {"report": shots.REPORT_SIZE, "compare": shots.COMPARE_SIZE, "sweep": (750, 440)}


def check_picture(path: Path, size: tuple[int, int]) -> None:
    """A PNG of `size` that is not blank: many colours, and ink across the picture, not in one corner."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size, (path, im.size)
        rgb = np.asarray(im.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50, path
    ink = (rgb < 235).any(-1)  # anything darker than the near-white backgrounds
    h, w = ink.shape
    for part in (ink[: h // 2], ink[h // 2 :], ink[:, : w // 2]):
        assert part.mean() > 0.02, path
    assert ink[:, w // 2 :].mean() > 0.002, path  # a page's right half holds less than its left


@pytest.mark.parametrize("name", list(SIZES))
def test_checked_in_screenshots_are_pictures(name):
    check_picture(ROOT / "docs" / "screenshots" / f"{name}.png", SIZES[name])


@pytest.mark.slow
@pytest.mark.skipif(shots.chromium() is None, reason="no chromium binary (apt-get install chromium); CI installs it")
def test_screenshots_render_again(tmp_path):
    made = shots.make(tmp_path / "shots", fast=True, work=tmp_path / "work")
    assert set(made) == set(SIZES)
    for name, path in made.items():
        check_picture(path, SIZES[name])
