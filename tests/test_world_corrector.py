"""The world's MMDiT engine adapters and the corrector's pieces: shapes, NFE, determinism, exact
answers (a zero LoRA is the base model; the K/V cache changes nothing), clear errors."""

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from reflectionflow.backends.world.mmdit import (  # noqa: E402
    MMDiTCorrector,
    MMDiTGenerator,
    corrector_text,
    load_corrector,
    save_corrector,
)
from reflectionflow.components import (  # noqa: E402
    ComponentError,
    CorrectionRequest,
    GenerationRequest,
    build,
    names,
)
from reflectionflow.models.lora import LoRAConfig, apply_lora  # noqa: E402
from reflectionflow.models.mmdit import SIZES, MMDiT  # noqa: E402
from reflectionflow.train.corrector import (  # noqa: E402
    ORIGINAL_MIX_START,
    SOURCES,
    CorrectorBatches,
    WorldCorrectorConfig,
    source_weights,
)
from reflectionflow.train.corrector_pool import Pool, edit_image, label_one, scene_detections  # noqa: E402
from reflectionflow.train.world import generate_images  # noqa: E402
from reflectionflow.world.detect import detect  # noqa: E402
from reflectionflow.world.evaluate import evaluate_image  # noqa: E402
from reflectionflow.world.flaws import plant_flaw  # noqa: E402
from reflectionflow.world.render import render, sample_scene  # noqa: E402
from reflectionflow.world.spec import parse_prompt  # noqa: E402


def tiny(seed: int = 0, **kw) -> MMDiT:
    """A tiny MMDiT with non-trivial weights (a fresh one predicts zero everywhere)."""
    torch.manual_seed(seed)
    model = MMDiT(SIZES["tiny"](**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny generator and a zero-initialised corrector on it, in both condition attentions."""
    root = tmp_path_factory.mktemp("world-mmdit")
    tiny().save_pretrained(root / "gen")
    for name, mode in (("corr", "full"), ("corr-kv", "causal_kv")):
        model = apply_lora(tiny(cond_attention=mode), LoRAConfig(rank=4))
        save_corrector(root / name, model, LoRAConfig(rank=4), root / "gen", {"step": 0})
    return root


def image(prompt: str, seed: int) -> np.ndarray:
    return render(sample_scene(parse_prompt(prompt), random.Random(seed)))


def test_generator_batches_seeds_noise_and_nfe(folders):
    g = MMDiTGenerator(weights=str(folders / "gen"), steps=2, batch_size=2, device="cpu")
    reqs = [GenerationRequest("a photo of a circle", 3), GenerationRequest("a photo of two rings", 4),
            GenerationRequest("a photo of a circle", 3)]
    res = g.generate(reqs)
    assert [r.image.shape for r in res] == [(64, 64, 3)] * 3 and res[0].image.dtype == np.uint8
    assert all(r.nfe == 4 for r in res)  # 2 steps, CFG doubles
    assert np.array_equal(res[0].image, res[2].image) and not np.array_equal(res[0].image, res[1].image)
    assert np.array_equal(res[0].noise, g.noise_like(3))
    # The request's noise wins over its seed (zero-order search passes perturbed noises).
    again = g.generate([GenerationRequest("a photo of a circle", 99, noise=res[0].noise)])[0]
    assert np.array_equal(again.image, res[0].image)
    # The same images as the trainer's sampler for the same seeds (one noise convention).
    want, nfe = generate_images(g.model, ["a photo of a circle", "a photo of two rings"], [3, 4], steps=2)
    assert nfe == 4 and np.array_equal(want[0], res[0].image) and np.array_equal(want[1], res[1].image)
    unguided = MMDiTGenerator(weights=str(folders / "gen"), steps=3, guidance=1.0, device="cpu")
    assert unguided.generate(reqs[:1])[0].nfe == 3
    with pytest.raises(ValueError, match="noise must have shape"):
        g.generate([GenerationRequest("a photo of a circle", 0, noise=np.zeros(16))])


def test_registry_builds_the_adapters(folders):
    assert "world-mmdit" in names("generator")
    assert {"world-mmdit", "world-mmdit-kv"} <= set(names("corrector"))
    g = build("generator", "world-mmdit", weights=str(folders / "gen"), steps=1, device="cpu")
    assert isinstance(g, MMDiTGenerator)
    with pytest.raises(ComponentError, match="unknown option.*accepted"):
        build("generator", "world-mmdit", weights=str(folders / "gen"), temperature=1.0)
    with pytest.raises(ComponentError, match="steps must be an integer"):
        MMDiTGenerator(weights=str(folders / "gen"), steps=0)


@pytest.mark.parametrize("name", ["corr", "corr-kv"])
def test_zero_lora_corrector_is_the_base_model(folders, name):
    model, config = load_corrector(folders / name, folders / "gen")
    mode = config["cond_attention"]
    base = MMDiT.from_pretrained(folders / "gen")
    base.config.cond_attention = mode
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    t, text = torch.tensor([0.3, 0.8]), base.tokenizer(["a photo of a ring", "a photo of a cross"])
    with torch.no_grad():
        want = base(x, t, text, cond)
        assert torch.equal(model(x, t, text, cond), want)
        assert torch.equal(model(x, t, text), base(x, t, text))
        if mode == "causal_kv":  # the cached condition keys/values give the same velocity
            assert torch.allclose(model(x, t, text, model.encode_condition(cond, text)), want, atol=1e-5)


@pytest.mark.parametrize("name", ["corr", "corr-kv"])
def test_corrector_batches_and_is_deterministic(folders, name):
    c = MMDiTCorrector(weights=str(folders / name), generator=str(folders / "gen"), steps=2, batch_size=2,
                       device="cpu")
    img = image("a photo of a circle", 0)
    reqs = [CorrectionRequest(img, "a photo of a circle", "- Add one red circle.", seed=s) for s in (5, 6, 5)]
    res = c.correct(reqs)
    assert [r.image.shape for r in res] == [(64, 64, 3)] * 3 and all(r.nfe == 4 for r in res)
    assert np.array_equal(res[0].image, res[2].image) and not np.array_equal(res[0].image, res[1].image)
    alone = c.correct(reqs[1:2])[0]  # batching does not change an image
    assert np.array_equal(alone.image, res[1].image)
    with pytest.raises(ValueError, match="request 0.*uint8"):
        c.correct([CorrectionRequest(np.zeros((32, 32, 3), np.uint8), "a photo of a circle", "", seed=0)])


def test_corrector_errors_name_the_path_and_the_command(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere/lora.safetensors.*reflectionflow train world-corrector"):
        MMDiTCorrector(weights=str(tmp_path / "nothere"), generator=str(folders / "gen"))
    tiny(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="trained on the generator"):
        MMDiTCorrector(weights=str(folders / "corr"), generator=str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="no generator weights"):
        MMDiTGenerator(weights=str(tmp_path / "nothere"))


def test_corrector_text_keeps_the_prompt_and_the_first_commands():
    tok = MMDiT(SIZES["small"]()).tokenizer  # reads 32 words
    short = corrector_text("a photo of a ring", "- Add one ring.", tok)
    assert short == "a photo of a ring [Reflexion]: - Add one ring."
    refined = ("a photo of a red circle and a green square, exactly one red circle and exactly one green square, "
               "no other objects, the circle is red and the square is green")
    reflection = "\n".join(["- Change the blue circle to red.", "- Remove one green ring.",
                            "- Move the red circle to the left of the green square.", "- Remove one black cross."])
    text = corrector_text(refined, reflection, tok)
    assert len(tok.split(text)) <= tok.max_len
    assert text.startswith("a photo of a red circle and a green square [Reflexion]: - Change the blue circle to red.")
    assert "black cross" not in text


def test_minimal_edit_fixes_the_image_and_touches_nothing_else():
    meta = parse_prompt("a photo of two circles")  # an extra circle breaks the count
    rng = random.Random(3)
    scene = sample_scene(meta, rng)
    bad_scene = plant_flaw(meta, scene, "extra", rng)
    bad = render(bad_scene)
    label = label_one(bad, meta, seed=0)
    assert not label.correct and label.reflection.startswith("- Remove")
    assert label.target is not None and evaluate_image(label.target, meta).correct
    ys, xs = np.nonzero(np.any(label.target != bad, axis=-1))
    # Every changed pixel lies in the box (1 px margin) of the one removed object.
    inside = [(xs >= o.x - 1).all() and (xs < o.x + o.size + 1).all() and (ys >= o.y - 1).all()
              and (ys < o.y + o.size + 1).all() for o in bad_scene]
    assert len(xs) > 0 and sum(inside) == 1
    assert edit_image(bad, detect(bad), [], random.Random(0)) is None  # nothing to do
    assert [d.cls for d in scene_detections(bad_scene)] == [d.cls for d in detect(bad)]


def test_source_mix_warms_up_and_skips_missing_sources():
    cfg = WorldCorrectorConfig(mix_steps=100, keep_share=0.25)
    every = set(SOURCES)
    p0 = dict(zip(SOURCES, source_weights(cfg, 0, every)))
    assert p0["editing"] == pytest.approx(ORIGINAL_MIX_START["editing"])
    assert p0["rule"] + p0["keep"] == pytest.approx(ORIGINAL_MIX_START["rule"]) and p0["keep"] == pytest.approx(0.025)
    p_end = dict(zip(SOURCES, source_weights(cfg, 1000, every)))
    assert p_end["editing"] == pytest.approx(cfg.mix_end["editing"])
    only = dict(zip(SOURCES, source_weights(cfg, 50, {"editing"})))
    assert only["editing"] == 1.0 and sum(only.values()) == 1.0


def test_batches_are_a_function_of_the_step(folders, tmp_path):
    from reflectionflow.train.corrector_pool import PoolSettings, build_pool

    cfg = WorldCorrectorConfig(generator=str(folders / "gen"), batch_size=6, image_dropout=0.5, seed=2)
    settings = PoolSettings("x", size=8, per_prompt=2, steps=1, val_prompts=2, val_samples=1)
    pool = Pool.load(build_pool(MMDiT.from_pretrained(folders / "gen"), settings, tmp_path / "pool", progress=False))
    assert pool.summary["samples"] == 8 and len(pool.val) == 2
    ds = CorrectorBatches(cfg, pool, MMDiT.from_pretrained(folders / "gen").tokenizer, 0)
    a, b = ds.batch_at(3), ds.batch_at(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    good, text, src, cond = a
    assert good.shape == cond.shape == (6, 64, 64, 3) and text.shape == (6, 24) and src.max() < len(SOURCES)
    with pytest.raises(ValueError, match="other settings"):
        build_pool(None, PoolSettings("y", size=8, per_prompt=2, steps=1, val_prompts=2, val_samples=1),
                   tmp_path / "pool", progress=False)


def test_shipped_corrector_loads_fits_its_budget_and_edits():
    from reflectionflow.backends.world.mmdit import DEFAULT_CORRECTOR
    from reflectionflow.train.corrector_pool import label_one

    if not (DEFAULT_CORRECTOR / "lora.safetensors").is_file():
        pytest.skip("no shipped corrector weights")
    assert (DEFAULT_CORRECTOR / "lora.safetensors").stat().st_size < 16e6
    c = build("corrector", "world-mmdit", device="cpu")  # the shipped LoRA on the shipped generator
    assert c.cond_attention == "full" and c.config["lora"]["scope"] == "cond"
    meta = parse_prompt("a photo of three circles")
    rng = random.Random(0)
    bad = render(plant_flaw(meta, sample_scene(meta, rng), "missing", rng))
    out = c.correct([CorrectionRequest(bad, meta["prompt"], "- Add one circle.", seed=0)])[0]
    assert out.nfe == 40 and label_one(out.image, meta, 0, with_target=False).correct
