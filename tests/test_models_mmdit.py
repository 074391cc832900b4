"""The MMDiT on a tiny config: shapes, position ids, the condition branch and its key/value cache."""

import pytest

torch = pytest.importorskip("torch")

from reflectionflow.models.flow import RectifiedFlow  # noqa: E402
from reflectionflow.models.mmdit import (  # noqa: E402
    SIZES,
    CondCache,
    MMDiT,
    MMDiTConfig,
    condition_position_ids,
    image_position_ids,
    patchify,
    unpatchify,
)
from reflectionflow.models.text import PAD_ID, UNK_ID, Tokenizer  # noqa: E402
from reflectionflow.world.commands import VOCABULARY  # noqa: E402

PROMPTS = ["a photo of a red circle and a blue square", "a photo of three rings"]


def tiny(seed: int = 0, **kw) -> MMDiT:
    """A tiny model with every weight random: the zero-initialised modulations and output layer
    would otherwise make every block the identity and every output zero."""
    torch.manual_seed(seed)
    model = MMDiT(SIZES["tiny"](**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(model: MMDiT, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=g)
    cond = torch.randn(2, 3, 64, 64, generator=g)
    return x, torch.tensor([0.3, 0.8]), model.tokenizer(PROMPTS), cond


def test_sizes_build_and_small_fits_the_budget():
    for name, make in SIZES.items():
        assert make().validate().grid == 16, name
    small = MMDiT(SIZES["small"]())
    assert sum(p.numel() for p in small.parameters()) * 2 < 20e6  # fp16 bytes: the shipped generator's budget


def test_tokenizer_covers_the_world_and_pads():
    tok = Tokenizer(VOCABULARY, max_len=12)
    text = "a photo of a red circle [Reflexion]: - Add one blue ring."
    ids = tok.encode(text)
    assert len(ids) == 12 and UNK_ID not in ids
    assert tok.decode(ids) == "a photo of a red circle reflexion add one blue ring"
    assert tok.encode("")[0] == PAD_ID and tok.encode("a zebra")[1] == UNK_ID
    assert tok(["a", "b"]).shape == (2, 12)


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 64, 64)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 256, 48)
    assert torch.equal(unpatchify(tokens, 4, 3, 16), x)


def test_forward_shapes_with_and_without_condition():
    model = tiny()
    x, t, text, cond = inputs(model)
    assert model(x, t, text).shape == x.shape
    out = model(x, t, text, cond)
    assert out.shape == x.shape  # condition outputs are dropped: only the target grid comes back
    assert not torch.allclose(out, model(x, t, text))  # ... but the condition was read


def test_condition_position_ids_sit_left_of_the_target_grid():
    img, cnd = image_position_ids(16), condition_position_ids(16)
    assert img.shape == cnd.shape == (256, 2)
    assert torch.equal(img[:3], torch.tensor([[0, 0], [0, 1], [0, 2]]))
    assert torch.equal(cnd[:, 0], img[:, 0]) and torch.equal(cnd[:, 1], img[:, 1] - 16)
    assert cnd[:, 1].min() == -16 and cnd[:, 1].max() == -1
    model = tiny()
    # text sits at position 0: its rotation is the identity
    cos, sin = model._rope_main(3)
    assert torch.equal(cos[:3], torch.ones_like(cos[:3])) and torch.equal(sin[:3], torch.zeros_like(sin[:3]))


def test_condition_tokens_are_modulated_with_timestep_zero():
    model = tiny()
    x, t, text, cond = inputs(model)
    seen = []
    hook = model.double_blocks[0].img_mod.register_forward_hook(lambda m, a, kw, out: seen.append((a[0], kw)),
                                                                with_kwargs=True)
    model(x, t, text, cond)
    hook.remove()
    feats = model.encode_text(text)
    (vec_img, kw_img), (vec_cond, kw_cond) = seen
    silu = torch.nn.functional.silu
    assert not kw_img.get("cond", False) and kw_cond["cond"] is True
    assert torch.allclose(vec_img, silu(model.conditioning_vector(t, feats.pooled)))
    assert torch.allclose(vec_cond, silu(model.conditioning_vector(torch.zeros(2), feats.pooled)))


def test_causal_kv_condition_ignores_the_noisy_image():
    model = tiny(cond_attention="causal_kv")
    x, t, text, cond = inputs(model)
    a = model.encode_condition(cond, text)
    b = model.encode_condition(cond, text)
    assert isinstance(a, CondCache) and len(a.kv) == 2
    assert all(torch.equal(k1, k2) for (k1, _), (k2, _) in zip(a.kv, b.kv))
    with pytest.raises(ValueError, match="causal_kv"):
        tiny().encode_condition(cond, text)


def test_causal_kv_cache_equals_uncached_forward():
    model = tiny(cond_attention="causal_kv")
    x, t, text, cond = inputs(model)
    cache = model.encode_condition(cond, text)
    uncached = model(x, t, text, cond)
    cached = model(x, t, text, cache)
    assert torch.allclose(cached, uncached, atol=1e-5, rtol=1e-5)
    # causal and full attention are different models on the same weights
    full = MMDiT(MMDiTConfig(**{**model.config.to_dict(), "cond_attention": "full"}))
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full(x, t, text, cond), uncached, atol=1e-4)


def test_sampler_cache_equals_no_cache():
    model = tiny(cond_attention="causal_kv")
    x, _, text, cond = inputs(model)
    flow = RectifiedFlow(model, model.tokenizer([""])[0])
    a = flow.sample(x, text, cond, steps=3, cfg=2.0, cache_cond=True)
    b = flow.sample(x, text, cond, steps=3, cfg=2.0, cache_cond=False)
    assert a.nfe == b.nfe == 6
    assert torch.allclose(a.images, b.images, atol=1e-5, rtol=1e-5)


def test_save_and_load_pretrained(tmp_path):
    model = tiny(cond_attention="causal_kv")
    model.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = MMDiT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x, t, text, _ = inputs(model)
    assert torch.equal(loaded(x, t, text), model(x, t, text))
    with pytest.raises(ValueError, match="unknown MMDiT config keys"):
        MMDiTConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="cond_attention"):
        MMDiTConfig(cond_attention="sideways").validate()
