"""Two-step smoke runs of the world generator's trainer: what it saves, and exact resume."""

import json
from dataclasses import asdict

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from reflectionflow.models.mmdit import MMDiT  # noqa: E402
from reflectionflow.models.text import Tokenizer  # noqa: E402
from reflectionflow.train.loop import lr_at  # noqa: E402
from reflectionflow.train.world import (  # noqa: E402
    TRAIN_SEED_FLOOR,
    WorldBatches,
    WorldTrainConfig,
    train_world_generator,
)
from reflectionflow.world import spec  # noqa: E402
from reflectionflow.world.captions import CaptionMix  # noqa: E402
from reflectionflow.world.commands import VOCABULARY  # noqa: E402


def config(out, **kw) -> WorldTrainConfig:
    base = dict(out_dir=str(out), model_size="tiny", batch_size=4, max_steps=2, warmup_steps=1, device="cpu",
                num_workers=0, log_every=1, ckpt_every=2, sample_every=2, sample_steps=2, val_prompts=6,
                final_eval=False, progress=False)
    return WorldTrainConfig(**{**base, **kw})


def test_batches_are_a_function_of_the_step_and_never_use_small_seeds(monkeypatch):
    tok = Tokenizer(VOCABULARY, 32)
    seen = []
    import reflectionflow.train.world as world

    class Recording(world.random.Random):  # every scene and caption draw is seeded through random.Random
        def __init__(self, seed=None):
            seen.append(seed)
            super().__init__(seed)

    monkeypatch.setattr(world.random, "Random", Recording)
    ds = WorldBatches(16, seed=5, start_step=0, tag_weights={"position": 1.0, "counting": 1.0}, tokenizer=tok,
                      caption_mix=asdict(CaptionMix()))
    a, b = ds.batch_at(7), ds.batch_at(7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], ds.batch_at(8)[0])
    images, text, tags = a
    assert images.shape == (16, 64, 64, 3) and images.dtype == torch.uint8 and text.shape == (16, 32)
    assert set(tags.tolist()) <= {spec.TAGS.index("position"), spec.TAGS.index("counting")}
    assert seen and min(seen) >= TRAIN_SEED_FLOOR
    # explicit captions beside the templates; without a caption mix, the templates alone
    plain = WorldBatches(16, seed=5, start_step=0, tag_weights={"position": 1.0, "counting": 1.0}, tokenizer=tok)
    assert torch.equal(plain.batch_at(7)[0], a[0]) and not torch.equal(plain.batch_at(7)[1], a[1])
    texts = {tok.decode(row.tolist()) for row in a[1]}
    assert any("on the" in t or "at the" in t or "in the" in t or "exactly" in t for t in texts), texts


def test_lr_warms_up_then_decays():
    cfg = WorldTrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(60, cfg) == pytest.approx(0.55)


def test_two_step_run_saves_everything_and_resume_is_exact(tmp_path):
    res = train_world_generator(config(tmp_path / "a", sample_every=1))
    out = tmp_path / "a"
    assert res.train.step == 2
    assert (out / "samples" / "step_000001.png").is_file()
    val = json.loads((out / "val.jsonl").read_text())
    assert val["step"] == 1 and set(val["scores"]["categories"]) == set(spec.TAGS)
    ck = out / "checkpoint"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"):
        assert (ck / name).is_file(), name
    assert json.loads((ck / "state.json").read_text())["step"] == 2
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["model_size"] == "tiny" and saved["max_steps"] == 2
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert len(first["loss_by_t_bin"]) == 10 and set(first["loss_by_tag"]) == set(spec.TAGS)
    ema = load_file(str(out / "ema" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in ema.values())
    assert MMDiT.from_pretrained(out / "ema").config.width == 32

    with pytest.raises(ValueError, match="resume"):
        train_world_generator(config(out))
    # 2 steps + resume to 3 == 3 steps in one go
    resumed = train_world_generator(config(out, max_steps=3, resume=True))
    assert resumed.train.step == 3
    fresh = train_world_generator(config(tmp_path / "b", max_steps=3, ckpt_every=3, sample_every=3, final_eval=True,
                                         final_eval_prompts=12, sample_steps=1))
    report = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert report["prompts"] == 12 and report["nfe_per_image"] == 2 and fresh.scores == report["scores"]
    a = load_file(str(out / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="model_size"):
        train_world_generator(config(tmp_path, model_size="huge"))
    with pytest.raises(ValueError, match="tag_weights"):
        config(tmp_path, tag_weights={"shapes": 1.0}).validate()


def test_warm_start_copies_weights_words_and_positions(tmp_path):
    from reflectionflow.models.mmdit import SIZES
    from reflectionflow.train.world import warm_start

    torch.manual_seed(0)
    src = MMDiT(SIZES["tiny"](**{"vocab": tuple(w for w in VOCABULARY if w not in ("top", "bottom")),
                                  "max_text_len": 8}))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    src.save_pretrained(tmp_path / "src", dtype=torch.float32)
    model = MMDiT(SIZES["tiny"](**{"max_text_len": 12}))
    info = warm_start(model, tmp_path / "src")
    assert set(info["new_words"]) == {"top", "bottom"} and info["new_positions"] == 4
    a, b = model.state_dict(), src.state_dict()
    assert torch.equal(a["double_blocks.0.img_qkv.weight"], b["double_blocks.0.img_qkv.weight"])
    emb = "text_encoder.embed.weight"
    for w in ("circle", "left", "a"):
        assert torch.equal(a[emb][model.tokenizer.index[w]], b[emb][src.tokenizer.index[w]])
    pos = a["text_encoder.pos"]
    assert torch.equal(pos[:8], b["text_encoder.pos"]) and torch.equal(pos[11], b["text_encoder.pos"][7])
    with pytest.raises(ValueError, match="differs from this run's in width"):
        warm_start(MMDiT(SIZES["compact"]()), tmp_path / "src")


def test_init_from_is_checked_before_any_weights_load(tmp_path):
    with pytest.raises(ValueError, match="init_from .*nothere.*no generator weights"):
        config(tmp_path / "run", init_from=str(tmp_path / "nothere")).validate()
    from reflectionflow.models.mmdit import SIZES

    small = tmp_path / "small"
    MMDiT(SIZES["small"]()).save_pretrained(small)
    (small / "model.safetensors").write_bytes(b"not read by validate")  # only config.json is read
    with pytest.raises(ValueError, match="init_from .* differs from this run's in width"):
        config(tmp_path / "run", init_from=str(small)).validate()
