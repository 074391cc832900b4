"""benchmarks/world_corrector_eval.py: its corrector settings and its cache of generator samples."""

from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import load_benchmark_module

pytest.importorskip("torch")


def test_corrector_settings_parse_and_bad_ones_are_named():
    bench = load_benchmark_module("world_corrector_eval")
    assert bench.parse_setting("steps=12,guidance=4.5") == {"steps": 12, "guidance": 4.5}
    assert bench.parse_setting("strength=0.5") == {"strength": 0.5}
    for bad, said in (("shift=2", "one of steps, guidance, strength"), ("steps=a", "'a' is not a number"),
                      ("steps", "KEY=VALUE"), ("steps=0", "steps >= 1"), ("strength=1.5", "strength in")):
        with pytest.raises(ValueError, match=said):
            bench.parse_setting(bad)


class CountingGenerator:
    def __init__(self):
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        return [SimpleNamespace(image=np.full((64, 64, 3), r.seed, np.uint8)) for r in requests]


def test_generator_samples_are_cached_and_reused_only_for_the_same_prompts(tmp_path):
    bench = load_benchmark_module("world_corrector_eval")
    metas = [{"prompt": "a photo of a ring"}, {"prompt": "a photo of two squares"}]
    args = SimpleNamespace(samples=2, generator="g", steps=20, guidance=3.0, samples_cache=str(tmp_path / "s.npz"))
    gen = CountingGenerator()
    first = bench.cached_samples(gen, metas, args)
    again = bench.cached_samples(gen, metas, args)
    assert gen.calls == 1 and (tmp_path / "s.npz").is_file()
    assert first[0] == again[0] and first[1] == again[1] == [0, 1, 2, 3]
    assert np.array_equal(first[2], again[2]) and again[2][3, 0, 0, 0] == 3
    with pytest.raises(SystemExit, match="made for other prompts"):
        bench.cached_samples(gen, metas[:1], args)
    args.samples_cache = None  # no cache: sampled every time, nothing written
    bench.cached_samples(gen, metas, args)
    assert gen.calls == 2
