"""fp8 matmuls (models/fp8.py) on the CPU: close to the full-precision layers, adapters untouched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from reflectionflow.models.fp8 import (  # noqa: E402
    E4M3_MAX,
    FP8ConditionLoRALinear,
    FP8Linear,
    fp8_unavailable,
    quantize_linears,
    quantize_rows,
)

pytestmark = pytest.mark.skipif(fp8_unavailable("cpu") is not None, reason="this torch has no fp8 matmul")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_row_quantisation_round_trips_within_e4m3_precision():
    x = torch.randn(7, 64) * torch.logspace(-3, 3, 7)[:, None]  # rows of very different magnitude
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 1)
    assert float(q.float().abs().max()) <= E4M3_MAX
    back = q.float() * s
    assert torch.all((back - x).abs() <= 0.0625 * x.abs().amax(1, keepdim=True))  # 3 mantissa bits per row
    assert _rel(back, x) < 0.05


def test_fp8_linear_is_close_to_the_linear_it_replaces_and_keeps_shapes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    fp8 = FP8Linear(lin)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    y = fp8(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    assert _rel(y, lin(x)) < 0.05
    assert torch.equal(fp8(x, cond=True), y)  # the world's BranchLinear signature: the base ignores it
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear(torch.nn.Linear(10, 16))


def test_bf16_bias_goes_into_the_matmul_epilogue_with_the_same_result():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    fused = FP8Linear(lin)
    apart = FP8Linear(lin)
    apart.epilogue_bias = None  # as a layer quantised on another device type
    assert fused.epilogue_bias == "cpu"  # the CPU's _scaled_mm takes a bf16 bias
    assert float((fused(x).float() - apart(x).float()).abs().max()) <= 0.0625 * float(apart(x).float().abs().max())
    assert not FP8Linear(torch.nn.Linear(64, 48)).epilogue_bias  # fp32 layers add it apart
    assert not FP8Linear(torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)).epilogue_bias


def test_quantize_linears_replaces_the_picked_layers_and_leaves_adapters():
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    from reflectionflow.backends.flux.lora import add_lora, lin
    from reflectionflow.backends.flux.random_init import TRANSFORMER_CONFIGS
    from reflectionflow.backends.flux.transformer import condition_ids, corrector_forward

    torch.manual_seed(0)
    tf = FluxTransformer2DModel(**{**TRANSFORMER_CONFIGS["tiny"], "num_layers": 1, "num_single_layers": 1}).eval()
    add_lora(tf, rank=4, alpha=4.0)
    with torch.no_grad():
        for name, p in tf.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    kw = dict(hidden_states=torch.randn(2, 16, 4, generator=g),
              encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
              pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.full((2,), 0.4),
              img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3), guidance=torch.full((2,), 3.5),
              condition=torch.randn(2, 9, 4, generator=g), cond_ids=condition_ids(3, 3))
    layer = tf.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        ref, ref_lora = corrector_forward(tf, **kw), lin(layer, x, True)
        adapters = {n: p.clone() for n, p in tf.named_parameters() if "lora_" in n}
        names = quantize_linears(tf, lambda n, m: n.startswith(("transformer_blocks.", "single_transformer_blocks.")))
        out = corrector_forward(tf, **kw)
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    assert not any("lora_" in n for n in names)
    assert isinstance(tf.x_embedder, torch.nn.Linear) and not isinstance(tf.x_embedder, FP8Linear)  # not picked
    q = tf.transformer_blocks[0].attn.to_q
    assert isinstance(q, FP8ConditionLoRALinear)  # the condition-branch adapter survives, in full precision
    assert _rel(lin(q, x, True), ref_lora) < 0.05
    for n, p in tf.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, adapters[n])
    assert out.shape == ref.shape and _rel(out, ref) < 0.1
