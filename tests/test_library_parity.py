"""Pieces written out beside a library (docs/dependencies.md) give the library's results."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", [(64, 80), (300, 451), (1000, 700), (28, 28)])
def test_qwen_preprocessing_is_transformers_own(shape):
    processor = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if processor is None:
        pytest.skip("this transformers has no PIL Qwen2-VL image processor")
    from reflectionflow.models import qwen_vl

    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8))
    ref = processor()(images=[image], return_tensors="np")
    pixels, grid = qwen_vl.preprocess_images([image], qwen_vl.PixelConfig())
    assert np.asarray(grid).tolist() == ref["image_grid_thw"].tolist()
    np.testing.assert_allclose(np.asarray(pixels), ref["pixel_values"], rtol=0, atol=1e-5)


def test_fid_distance_is_the_textbook_formula():
    from scipy import linalg

    from reflectionflow.metrics.fid import FrechetToReference

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(0.3, 1.2, size=(200, 12))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    textbook = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert FrechetToReference(b)(a) == pytest.approx(textbook, rel=1e-6)
