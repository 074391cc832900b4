"""Step caching (models/step_cache.py, FBCache's rule) in the world's sampler and components: off by
default and at 0 nothing changes; a threshold no step passes gives the same bits as no cache; a
large one skips the remaining blocks (fewer block calls, counted apart from the NFE); decisions are
per image; bad thresholds are one-line errors before any weights load. Batch invariance with the
cache on: tests/test_batch_invariance.py. FLUX: tests/test_flux_cli.py and test_flux_pipeline.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")


def _model(double: int = 1, single: int = 2, mode: str = "full", seed: int = 0, lora: bool = True):
    from dataclasses import replace

    from reflectionflow.models.lora import LoRAConfig, apply_lora
    from reflectionflow.models.mmdit import SIZES, MMDiT

    torch.manual_seed(seed)
    model = MMDiT(replace(SIZES["tiny"](cond_attention=mode), double_blocks=double, single_blocks=single))
    if lora:
        apply_lora(model, LoRAConfig(rank=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


class _Counting:
    """Counts block calls of a model (every double and single block)."""

    def __init__(self, model):
        self.calls = 0
        for block in [*model.double_blocks, *model.single_blocks]:
            block.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def test_thresholds_are_checked_with_one_line_errors():
    from reflectionflow.models.step_cache import StepCache, check_threshold

    assert check_threshold(0) == 0.0 and check_threshold(0.25) == 0.25
    for bad in (-0.1, math.nan, math.inf, "0.1", True, None):
        with pytest.raises(ValueError, match=r"^cache_threshold must be a number >= 0 \(0: off") as e:
            check_threshold(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="threshold 0 caches nothing"):
        StepCache(0.0, 2)
    with pytest.raises(ValueError, match="multiple of images"):
        StepCache(0.1, 2, rows=3)


def test_the_decision_is_per_image_over_its_rows():
    from reflectionflow.models.step_cache import StepCache

    cache = StepCache(0.1, images=2, rows=4)  # rows: [image 0, image 1] text, then unconditional
    r = torch.ones(4, 3)
    assert cache.compute(r).all()  # the first step always computes
    cache.store(torch.arange(4), r, torch.full((4, 3), 5.0))
    # Image 0 moves 5% in its text row and 5% in its unconditional row (5% together): served from the
    # cache. Image 1 moves 30% in one row only (15% together): computed, both rows.
    step = r.clone()
    step[0] *= 1.05
    step[2] *= 1.05
    step[1] *= 1.30
    assert cache.compute(step).tolist() == [False, True, False, True]
    assert cache.cached_steps.tolist() == [1, 0] and cache.cached_passes() == [2, 0]
    cache.store(torch.tensor([1, 3]), step[[1, 3]], torch.zeros(2, 3))
    assert torch.equal(cache.served(torch.tensor([0, 1])), torch.tensor([[5.0] * 3, [0.0] * 3]))
    # The reference stays that of the last computed step: image 0's changes add up (10% > the threshold).
    again = r.clone()
    again[0] *= 1.10
    again[2] *= 1.10
    again[1], again[3] = step[1], step[3]
    assert cache.compute(again).tolist() == [True, False, True, False]


@pytest.mark.parametrize("double,single,mode", [(1, 2, "full"), (0, 2, "full"), (2, 1, "causal_kv")])
def test_head_tail_finish_is_forward_bit_for_bit(double, single, mode):
    model = _model(double, single, mode)
    g = torch.Generator().manual_seed(1)
    x, cond, t = torch.randn(3, 3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g), torch.rand(3)
    feats = model.encode_text(model.tokenizer(["a photo of a ring", "", "a photo of two red crosses"]))
    conds = [None, cond] + ([model.encode_condition(cond, feats)] if mode == "causal_kv" else [])
    with torch.no_grad():
        for c in conds:
            img, txt, cond_x, first = model.head(x, t, feats, c)
            assert first.shape == img.shape
            assert torch.equal(model.finish(model.tail(img, txt, cond_x, t, feats, c), t, feats), model(x, t, feats, c))


def _flow(model):
    from reflectionflow.models.flow import RectifiedFlow

    return RectifiedFlow(model, model.tokenizer([""])[0], text_dropout=0.0)


@pytest.mark.parametrize("with_cond", [False, True])
def test_sampler_thresholds_zero_tiny_and_large(with_cond):
    model = _model(1, 2)
    flow, count = _flow(model), _Counting(model)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(3, 3, 64, 64, generator=g)
    cond = torch.randn(3, 3, 64, 64, generator=g) if with_cond else None
    text = model.tokenizer(["a photo of a ring", "a photo of two red crosses", "a photo of a circle"])

    def run(**kw):
        count.calls = 0
        res = flow.sample(noise, text, cond, steps=4, **kw)
        return res, count.calls

    plain, calls = run()
    assert plain.cached is None and plain.nfe == 8 and calls == 3 * 8 * 3  # samples x passes x blocks
    zero, _ = run(cache_threshold=0.0)
    assert torch.equal(zero.images, plain.images) and zero.cached is None
    tiny, tiny_calls = run(cache_threshold=1e-12)  # no change is that small: every block runs
    assert torch.equal(tiny.images, plain.images) and tiny.cached == [0, 0, 0] and tiny_calls == calls
    large, large_calls = run(cache_threshold=1e9)  # every step after the first is served from the cache
    assert large.nfe == 8 and large.cached == [6, 6, 6]  # text + unconditional rows of 3 cached steps
    # 4 steps x 2 rows x 3 samples run the first block; only the first step runs the other two
    assert large_calls == 4 * 2 * 3 + 1 * 2 * 3 * 2
    assert not torch.equal(large.images, plain.images)
    with pytest.raises(ValueError, match="cache_threshold must be"):
        flow.sample(noise, text, cond, steps=2, cache_threshold=-1.0)


def test_unguided_sampling_caches_one_row_per_image():
    model = _model(1, 1)
    res = _flow(model).sample(torch.randn(2, 3, 64, 64), model.tokenizer(["a photo of a ring"] * 2), steps=3, cfg=1.0,
                              cache_threshold=1e9)
    assert res.nfe == 3 and res.cached == [2, 2]


def test_world_components_take_the_option_and_count_what_ran(tmp_path):
    from reflectionflow.backends.world.mmdit import MMDiTGenerator
    from reflectionflow.components import ComponentError, GenerationRequest

    _model(1, 2, lora=False).save_pretrained(tmp_path / "gen")
    reqs = [GenerationRequest("a photo of a ring", seed=1), GenerationRequest("a photo of two crosses", seed=2)]

    def gen(**kw):
        return MMDiTGenerator(weights=str(tmp_path / "gen"), steps=3, device="cpu", **kw).generate(reqs)

    plain, off, large = gen(), gen(cache_threshold=0), gen(cache_threshold=1e9)
    assert all(np.array_equal(a.image, b.image) and a.nfe == b.nfe == 6 and a.cached == b.cached == 0
               for a, b in zip(plain, off))
    assert [(r.nfe, r.cached) for r in large] == [(2, 4), (2, 4)]  # full passes, passes served from the cache
    # Bad values: one line naming the option and what it accepts, before the weights are looked at.
    for bad in (-1, "fast", float("nan"), True):
        with pytest.raises(ComponentError, match=r"option cache_threshold must be a number >= 0 \(0: off") as e:
            MMDiTGenerator(weights=str(tmp_path / "missing"), cache_threshold=bad)
        assert "\n" not in str(e.value)


def test_a_cached_run_says_so_in_its_ledger_and_report(tmp_path, cli):
    import json

    _model(1, 2, lora=False).save_pretrained(tmp_path / "gen")
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"options": {"generator": {"weights": str(tmp_path / "gen"), "steps": 3,
                                                          "cache_threshold": 1e9, "device": "cpu"}}}))
    out = tmp_path / "run"
    code, stdout, err = cli("generate", "a photo of a ring", "--config", conf, "--method", "noise", "--budget", "2",
                            "--generator", "world-mmdit", "--verifier", "world-oracle", "--out", out, "--quiet")
    assert code == 0, err
    assert "NFE 4 (+8 passes from the step cache)" in stdout
    led = json.loads((out / "ledger.json").read_text())
    assert (led["totals"]["nfe"], led["totals"]["cached"], led["per_prompt"][0]["cached"]) == (4, 8, 8)
    assert "cached passes</th>" in (out / "report.html").read_text()
    from reflectionflow.pipeline import Ledger

    assert Ledger.from_dict(led).cached == 8 and Ledger.from_dict(led).by_stage["generate"].cached == 8
