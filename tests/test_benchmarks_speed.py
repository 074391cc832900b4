"""The speed levers (exact answers where there are some) and tiny CPU runs of the speed benchmarks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import STAND_INS, load_benchmark_module

torch = pytest.importorskip("torch")


def _tiny_transformer(seed: int = 0):
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    from reflectionflow.backends.flux.lora import add_lora
    from reflectionflow.backends.flux.random_init import TRANSFORMER_CONFIGS

    torch.manual_seed(seed)
    tf = FluxTransformer2DModel(**{**TRANSFORMER_CONFIGS["tiny"], "num_layers": 2, "num_single_layers": 2}).eval()
    add_lora(tf, rank=4, alpha=4.0)
    with torch.no_grad():
        for name, p in tf.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a non-zero adapter, so the condition branch differs from the base
    return tf


def _inputs(batch: int = 2):
    from reflectionflow.backends.flux.transformer import condition_ids

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 4, generator=g)  # 4x4 grid of packed latents
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.4),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5)), \
        torch.randn(batch, 9, 4, generator=g), condition_ids(3, 3)


def test_cached_condition_kv_equals_recomputing_it():
    from reflectionflow.backends.flux.transformer import corrector_forward, encode_condition_kv

    tf = _tiny_transformer()
    kw, cond, cids = _inputs()
    with torch.no_grad():
        every_step = corrector_forward(tf, **kw, condition=cond, cond_ids=cids, cond_attention="causal_kv")
        kv = encode_condition_kv(tf, cond, cids, kw["pooled_projections"], kw["guidance"])
        cached = corrector_forward(tf, **kw, cond_attention="causal_kv", cond_kv=kv)
        full = corrector_forward(tf, **kw, condition=cond, cond_ids=cids)
        plain = corrector_forward(tf, **kw)
    assert torch.equal(every_step, cached)
    # causal_kv is another model: the image reads the condition, the condition does not read the image
    assert not torch.allclose(every_step, full) and not torch.allclose(every_step, plain)
    with pytest.raises(ValueError, match="cond_kv"):
        corrector_forward(tf, **kw, cond_kv=kv)  # cond_kv without causal_kv
    with pytest.raises(ValueError, match="cond_attention"):
        corrector_forward(tf, **kw, cond_attention="sideways")


def test_partial_start_runs_the_tail_of_the_schedule():
    pytest.importorskip("diffusers")
    from reflectionflow.backends.flux.lora import add_lora
    from reflectionflow.backends.flux.pipeline import FluxReflectionCorrectorPipeline
    from reflectionflow.backends.flux.random_init import random_flux_pipeline

    base = random_flux_pipeline("tiny")
    add_lora(base.transformer, rank=4, alpha=4.0)
    pipe = FluxReflectionCorrectorPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)

    def run(**kw):
        return pipe(image=[image], prompt=["a red circle"], height=32, width=32, num_inference_steps=6,
                    condition_size=16, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                    output_type="np", **kw).images

    full = run()
    assert pipe._num_timesteps == 6
    tol = 5e-3  # the tiny CPU pipeline differs by ~1e-3 from one call to the next (threaded kernels)
    half = run(strength=0.5)
    assert pipe._num_timesteps == 3 and half.shape == full.shape
    assert np.allclose(run(strength=1.0), full, atol=tol) and not np.allclose(half, full, atol=tol)
    cached = run(cond_attention="causal_kv")
    assert np.allclose(cached, run(cond_attention="causal_kv", cache_condition=False), atol=tol)
    with pytest.raises(ValueError, match="strength"):
        run(strength=0.0)


def test_speed_options_are_checked_before_weights_load():
    from reflectionflow.backends.flux.options import FluxBackendOptions, FluxOptionsError, validate_options
    from reflectionflow.backends.flux.transformer import fp8_available

    with pytest.raises(FluxOptionsError, match="--corrector-strength"):
        validate_options(FluxBackendOptions(corrector_strength=1.5), kinds=("generator",))
    with pytest.raises(FluxOptionsError, match="--corrector-cond-attention"):
        validate_options(FluxBackendOptions(corrector_cond_attention="half"), kinds=("generator",))
    if fp8_available() is not None:
        with pytest.raises(FluxOptionsError, match="--fp8"):
            validate_options(FluxBackendOptions(fp8=True), kinds=("generator",))


def test_world_partial_start_at_strength_one_is_the_full_sampler():
    from reflectionflow.backends.world.mmdit import MMDiTCorrector
    from reflectionflow.components import ComponentError

    c = MMDiTCorrector(device="cpu", steps=2, batch_size=4)
    rng = np.random.default_rng(0)
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cond = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    full, passes = c.sampler.sample(noise, ["a photo of a ring"], cond)
    tail, passes_tail = c.sampler.sample(noise, ["a photo of a ring"], cond, strength=1.0)
    assert np.array_equal(full, tail) and passes == passes_tail == [(4, 0)]  # (full passes, cached) per image
    _, passes_half = c.sampler.sample(noise, ["a photo of a ring"], cond, strength=0.5)
    assert passes_half == [(2, 0)]
    with pytest.raises(ComponentError, match="strength"):
        MMDiTCorrector(device="cpu", strength=0.0)


def test_flux_budget_tiny(tmp_path, capsys):
    bench = load_benchmark_module("flux_budget")
    out = tmp_path / "fb.json"
    assert bench.main(["--tiny", "--no-compile", "--repeats", "1", "--batch", "2", "--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    rows = fig["rows"]
    assert rows[0]["config"].startswith("original") and rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[0]["vlm_calls"] == 192 and rows[3]["vlm_calls"] == 128  # double scoring, then not
    assert rows[6]["corrector_steps"] == 15  # strength 0.5 of 30 steps
    assert "fp8" in rows[-1]["config"]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-len(rows) - 2].startswith("| configuration")


def test_serve_throughput_tiny(tmp_path):
    bench = load_benchmark_module("serve_throughput")
    out = tmp_path / "s.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2, 4] and all(r["rps"] > 0 for r in rows)
    assert rows[0]["mean_batch"] == 1 and all(1 <= r["mean_batch"] <= r["concurrency"] for r in rows)


def test_world_sweep_tiny_on_stand_ins(tmp_path):
    bench = load_benchmark_module("world_sweep")
    out = tmp_path / "w.json"
    extra = ["--generator", "world-render", "--corrector", "world-edit", "--reflector", "world-oracle",
             "--verifiers", "world-oracle"]
    assert STAND_INS[1] == "world-render"
    assert bench.main(["--tiny", "--json", str(out), "--", *extra]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["images"] == 2 * 4 and run["images_per_s"] > 0 and 0 <= run["overall"] <= 1


@pytest.mark.slow
def test_world_levers_tiny(tmp_path):
    bench = load_benchmark_module("world_levers")
    out = bench.main(["--tiny", "--limit", "2", "--no-fp8", "--json", str(tmp_path / "l.json")])
    names = [c["name"] for c in out["configs"]]
    assert names == ["exact", "cached_kv", "corrector_strength_0.5", "combined_0.5"]
    assert set(out["effects"]) == {"cached_kv", "corrector_strength_0.5", "combined_0.5", "fp8"}
    assert out["configs"][2]["nfe_per_image"] == 2  # half of 2 steps, with CFG


def test_flux_end_to_end_tiny(tmp_path, capsys):
    """The real command on tiny random FLUX with judges over HTTP in their own process, step cache on."""
    pytest.importorskip("diffusers")
    bench = load_benchmark_module("flux_end_to_end")
    out = tmp_path / "e2e.json"
    assert bench.main(["--tiny", "--steps", "3", "--cache-threshold", "1e9", "--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    m = fig["measured"]
    assert fig["command"].startswith("reflectionflow generate --backend flux --prompts geneval-shapes --limit 2")
    # 2 prompts x (4 noise + 2 chains x 2 corrections), 3 steps: 1 computed + 2 served from the cache each
    assert (m["images"], m["nfe"], m["cached"], m["failed"]) == (16, 16, 32, 0)
    assert m["vlm_calls"] == 2 * (8 + 4 + 4)  # a verdict per image, a reflection and a refinement per correction
    assert set(m["stages"]) == {"generate", "correct", "verify", "reflect", "refine"} and m["wall_s_per_prompt"] > 0
    assert set(fig["predicted"]["per_prompt"]) == {"sequential", "overlapped"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| flux_budget.py, VLM overlapped")


def test_world_step_cache_tiny(tmp_path, capsys):
    bench = load_benchmark_module("world_step_cache")
    assert bench.main(["--tiny", "--json", str(tmp_path / "c.json")]) == 0
    fig = json.loads((tmp_path / "c.json").read_text())
    off, on = fig["rows"]
    assert (off["threshold"], off["cached_share"], off["same_first_image"]) == (0.0, 0.0, 1.0)
    # 3 steps: the first computes, the other two are served from the cache (text and unconditional rows)
    assert on["cached_share"] == pytest.approx(2 / 3) and on["nfe_per_image"] == 2
    assert {"effect_k1", "effect_kB"} <= set(on) and on["effect_k1"]["ci"] is None  # 2 prompts: no interval
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| 1e+09 |")


@pytest.mark.slow
def test_sharded_run_compares_one_and_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    bench = load_benchmark_module("sharded_run")
    res = bench.main(["--processes", "2", "--limit", "6", "--budget", "4", "--verifiers", "world-oracle",
                      "--out", str(tmp_path / "s"), "--", "--generator", "world-render", "--corrector", "world-edit",
                      "--reflector", "world-oracle"])
    run = res["runs"]["reflection-world-oracle"]
    # the stand-ins are batch-invariant: the two-process run is the one-process run, byte for byte
    assert run["images"] == 24 and run["images_identical"] == 24 and run["picks_identical"] == run["prompts"] == 6
    assert res["points_equal"] == res["points"] == 3
    assert json.loads((tmp_path / "s" / "sharded.json").read_text())["processes"] == 2


def test_fp8_matmul_tiny():
    from reflectionflow.models.fp8 import fp8_unavailable

    if fp8_unavailable("cpu") is not None:
        pytest.skip("this torch has no fp8 matmul")
    bench = load_benchmark_module("fp8_matmul")
    rows = bench.main(["--tiny", "--no-compile"])
    assert [(r["K"], r["N"]) for r in rows] == [(32, 48), (48, 32)]
    for r in rows:
        assert all(r[c] > 0 for c in ("bf16", "row", "row_fast", "tensor", "tensor_fast"))
        assert "fp8linear_compiled" not in r


def test_sdpa_backends_tiny():
    rows = load_benchmark_module("sdpa_backends").main(["--tiny", "--batch", "1"])
    assert [(r["queries"], r["keys"]) for r in rows] == [(64, 64), (64, 96)]
    for r in rows:
        assert r["math"]["ms"] > 0 and r["math"]["max_diff"] == 0.0 and r["default"]["ms"] > 0


def test_corrector_renders_counts_fixes_per_case(capsys):
    bench = load_benchmark_module("corrector_renders")
    fixed = bench.main(["--correctors", "world-edit", "--seeds", "2"])  # the renderer-backed stand-in
    assert set(fixed) == {("world-edit", p, f) for p, f in bench.CASES}
    assert all(0 <= n <= 2 for n in fixed.values())
    assert "| a photo of three circles | missing |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--correctors", "no-such-corrector"])
