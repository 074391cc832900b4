"""The world's MMDiT engine adapters and the corrector's pieces: shapes, NFE, determinism, exact
answers (a zero LoRA is the base model; the K/V cache changes nothing), clear errors."""

import json
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
    PoolBatches,
    WorldCorrectorConfig,
    WorldFamily,
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
    assert {"world-mmdit", "world-mmdit-kv", "world-mmdit-partial", "world-mmdit-kv-partial"} <= set(names("corrector"))
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
    tok = MMDiT(SIZES["small"](max_text_len=32)).tokenizer  # reads 32 words, as the generator v1
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


def test_pool_batches_are_a_function_of_the_step(folders, tmp_path):
    from reflectionflow.train.corrector_pool import PoolSettings, build_pool

    cfg = WorldCorrectorConfig(generator=str(folders / "gen"), batch_size=6, image_dropout=0.5, text_dropout=0.3,
                               seed=2).validate()
    settings = PoolSettings("x", size=8, per_prompt=2, steps=1, val_prompts=2, val_samples=1)
    pool = Pool.load(build_pool(MMDiT.from_pretrained(folders / "gen"), settings, tmp_path / "pool", progress=False))
    assert pool.summary["samples"] == 8 and len(pool.val) == 2
    src = PoolBatches(cfg, pool)
    a, b = src.batch(3), src.batch(3)
    assert a.keys == b.keys and a.prompts == b.prompts and a.reflections == b.reflections
    assert all(np.array_equal(x, y) for x, y in zip(a.good, b.good))
    assert len(a) == 6 and set(a.subsets) <= set(SOURCES) and a.keys != src.batch(4).keys
    assert PoolBatches(cfg, pool, rank=1).batch(3).keys != a.keys  # each process its own draws
    # Dropouts: a dropped image is None (the blank canvas), a dropped text leaves no reflection either.
    assert all(r == "" for p, r in zip(a.prompts, a.reflections) if p == "")
    many = [src.batch(s) for s in range(8)]
    assert any(b is None for x in many for b in x.bad) and any(p == "" for x in many for p in x.prompts)
    # The family's CPU half: stacked pixels, token ids, which samples may start from their condition.
    family = WorldFamily(cfg, torch.device("cpu"))
    prep = family.prepare(a)
    assert prep["good"].shape == prep["cond"].shape == (6, 64, 64, 3) and prep["good"].dtype == torch.uint8
    assert prep["text"].shape == (6, 24) and prep["start_ok"].tolist() == [x is not None for x in a.bad]
    x0, inputs = family.encode(prep, torch.device("cpu"))
    assert x0.shape == (6, 3, 64, 64) and -1 <= x0.min() and x0.max() <= 1
    assert inputs["start"] is inputs["cond"]
    with pytest.raises(ValueError, match="other settings"):
        build_pool(None, PoolSettings("y", size=8, per_prompt=2, steps=1, val_prompts=2, val_samples=1),
                   tmp_path / "pool", progress=False)


def test_pool_run_resumes_exactly_with_its_ema_workers_and_partial_starts(folders, tmp_path):
    """The pool path through the shared trainer: 4 steps made by 2 DataLoader workers equal 3 steps
    made in-process, stopped, and resumed to 4 (same samples, losses, adapters and EMA); partial-noise
    starts change the loss, not the data."""
    import json

    from safetensors.torch import load_file

    from reflectionflow.train.corrector import train_world_corrector

    def config(out, **kw) -> WorldCorrectorConfig:
        values = dict(out_dir=str(tmp_path / out), generator=str(folders / "gen"), pool_dir=str(tmp_path / "pool"),
                      pool_size=8, pool_per_prompt=2, pool_batch=8, label_workers=1, val_prompts=2, val_samples=1,
                      val_size=0, val_steps=1, batch_size=4, max_steps=4, lora_rank=4, warmup_steps=1, log_every=1,
                      ckpt_every=2, num_workers=0, log_keys=True, partial_share=0.5, device="cpu", progress=False)
        return WorldCorrectorConfig(**{**values, **kw})

    full = train_world_corrector(config("full", num_workers=2))
    assert full.train.step == 4 and full.pool["samples"] == 8
    part = train_world_corrector(config("part"), stop_after=3)  # as a preempted job: a checkpoint at step 3
    assert part.train.step == 3 and json.loads((tmp_path / "part/checkpoint/state.json").read_text())["step"] == 3
    assert train_world_corrector(config("part", resume=True)).train.step == 4

    def rows(name):
        return [json.loads(ln) for ln in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    a, b = rows("full"), rows("part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["keys"] for r in a] == [r["keys"] for r in b] and [r["loss"] for r in a] == [r["loss"] for r in b]
    for name in ("adapters", "ema"):  # the EMA was saved at step 3 and restored, not restarted
        wa = load_file(str(tmp_path / "full" / "checkpoint" / f"{name}.safetensors"))
        wb = load_file(str(tmp_path / "part" / "checkpoint" / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert json.loads((tmp_path / "full" / "scores.json").read_text())["validation"] is None  # val_size 0

    plain = train_world_corrector(config("plain", partial_share=0.0, max_steps=1))
    assert rows("plain")[0]["keys"] == a[0]["keys"] and plain.train.losses[0] != full.train.losses[0]
    with pytest.raises(ValueError, match=r"partial_strengths must be start times in \(0, 1\]"):
        train_world_corrector(config("bad", partial_strengths=(0.0, 0.5)))


def test_pool_validation_also_runs_from_the_trained_partial_starts(folders, tmp_path):
    """A corrector trained for partial-noise starts is validated from pure noise and from each of its
    start strengths (fewer steps, so fewer NFE); one trained without them only from pure noise."""
    from reflectionflow.train.corrector import train_world_corrector

    def run(out, **kw):
        cfg = WorldCorrectorConfig(out_dir=str(tmp_path / out), generator=str(folders / "gen"),
                                   pool_dir=str(tmp_path / "pool"), pool_size=8, pool_per_prompt=2, pool_batch=8,
                                   label_workers=1, val_prompts=4, val_samples=1, val_size=4, val_steps=4,
                                   batch_size=4, max_steps=1, lora_rank=4, warmup_steps=1, num_workers=0,
                                   device="cpu", progress=False, **kw)
        train_world_corrector(cfg)
        return [json.loads(ln) for ln in (tmp_path / out / "val.jsonl").read_text().splitlines()][-1]

    row = run("part", partial_share=1.0, partial_strengths=(0.5,))
    assert row["failed_samples"] + row["passed_samples"] > 0
    assert row["nfe@0.5"] == row["nfe"] // 2 and ("fixed@0.5" in row and "broken@0.5" in row)
    for k in ("fixed", "broken", "fixed@0.5", "broken@0.5"):
        assert row[k] is None or 0.0 <= row[k] <= 1.0
    assert not any("@" in k for k in run("plain", partial_share=0.0))


def missing_circle_requests(n: int = 16) -> tuple[dict, list[CorrectionRequest]]:
    """n renders of "three circles" with one circle missing, each with the reflection that fixes it."""
    meta = parse_prompt("a photo of three circles")
    reqs = []
    for k in range(n):
        rng = random.Random(k)
        reqs.append(CorrectionRequest(render(plant_flaw(meta, sample_scene(meta, rng), "missing", rng)),
                                      meta["prompt"], "- Add one circle.", seed=k))
    return meta, reqs


def test_shipped_corrector_loads_fits_its_budget_and_edits():
    from reflectionflow.backends.world.mmdit import DEFAULT_CORRECTOR
    from reflectionflow.train.corrector_pool import label_one

    if not (DEFAULT_CORRECTOR / "lora.safetensors").is_file():
        pytest.skip("no shipped corrector weights")
    assert (DEFAULT_CORRECTOR / "lora.safetensors").stat().st_size < 16e6
    c = build("corrector", "world-mmdit", device="cpu")  # the shipped LoRA on the shipped generator
    assert c.cond_attention == "full" and c.config["lora"]["scope"] == "cond"
    meta, reqs = missing_circle_requests()
    outs = c.correct(reqs)
    assert all(o.nfe == 40 for o in outs)
    # A render with one circle missing is fixed 4 times in 16 by the shipped corrector (the
    # 3,500-step one before it: also 4); the flawed renders themselves: 0.
    assert sum(label_one(o.image, meta, 0, with_target=False).correct for o in outs) >= 3


@pytest.mark.parametrize("name,attention", [("world-mmdit-partial", "full"), ("world-mmdit-kv-partial", "causal_kv")])
def test_shipped_partial_start_correctors_run_half_the_steps_and_edit(name, attention):
    """The correctors trained for a half-noised start: strength 0.5 by default (20 NFE of the 40), a
    strength may still be given, and the start keeps the previous image's layout while the
    reflection's edit is made."""
    from reflectionflow.backends.world.mmdit import DEFAULT_CORRECTOR_KV_PARTIAL, DEFAULT_CORRECTOR_PARTIAL
    from reflectionflow.train.corrector_pool import label_one

    folder = DEFAULT_CORRECTOR_PARTIAL if attention == "full" else DEFAULT_CORRECTOR_KV_PARTIAL
    if not (folder / "lora.safetensors").is_file():
        pytest.skip("no shipped partial-start corrector weights")
    c = build("corrector", name, device="cpu")
    assert c.cond_attention == attention and c.opt.strength == 0.5
    assert json.loads((folder / "corrector.json").read_text())["train_config"]["partial_strengths"] == [0.5]
    meta, reqs = missing_circle_requests()
    outs = c.correct(reqs)
    assert all(o.nfe == 20 and o.image.shape == r.image.shape for o, r in zip(outs, reqs))
    fixed = sum(label_one(o.image, meta, 0, with_target=False).correct for o in outs)
    # On these renders the full corrector from pure noise fixes 4 of 16; the partial ones 3 and 5
    # (they were trained on the generator's own failures, docs/RESULTS.md).
    assert fixed >= 2
    assert build("corrector", name, device="cpu", strength=1.0).opt.strength == 1.0


def test_a_corrector_starts_where_it_was_trained_to_unless_told():
    from reflectionflow.backends.world.mmdit import trained_strength

    def cfg(share, strengths):
        return {"train_config": {"partial_share": share, "partial_strengths": strengths}}

    assert trained_strength(cfg(1.0, [0.5])) == 0.5
    assert trained_strength(cfg(0.5, [0.5])) == 1.0  # also trained from pure noise
    assert trained_strength(cfg(1.0, [0.4, 0.5])) == 1.0  # no single start to pick
    assert trained_strength({}) == 1.0  # correctors written before partial starts existed
