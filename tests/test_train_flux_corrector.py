"""The shared corrector trainer on tiny random FLUX and tiny generated GenRef shards: two steps save a
LoRA that loads (FLUX backend and diffusers) and changes the corrector; an interrupted run resumed
at step 2 equals the uninterrupted one; bad settings are one-line errors before any weights load;
the world corrector trains through the same code on world GenRef; the GPU benchmark runs --tiny."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from reflectionflow.components import Verdict, Verifier, register  # noqa: E402
from reflectionflow.data.writer import GenRefWriter  # noqa: E402
from reflectionflow.train.flux_corrector import FluxCorrectorConfig, train_flux_corrector  # noqa: E402

SUBSETS = ("general", "length", "rule", "editing")


@register("verifier", "test-brightness", "mean brightness (tests only)")
class Brightness(Verifier):
    def score(self, images, prompts):
        return [Verdict(score=float(np.asarray(im).mean() / 255.0)) for im in images]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny random FLUX folder and 3 shards of 8 triplets each (24 px images, all four subsets)."""
    from reflectionflow.backends.flux.random_init import save_random_flux

    root = tmp_path_factory.mktemp("flux-train")
    flux = save_random_flux(root / "flux", "tiny")
    rng = np.random.default_rng(0)
    with GenRefWriter(root / "genref", max_samples_per_shard=8) as w:
        for i in range(24):
            good = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            bad = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            w.write(prompt=f"a photo of {i} cats", reflection=f"- Add {i % 3 + 1} dog.\n- Remove the hat.",
                    subset=SUBSETS[i % 4], good=good, bad=bad, key=f"s{i:03d}")
    return flux, root / "genref"


def config(data, out, **kw) -> FluxCorrectorConfig:
    flux, shards = data
    values = dict(out_dir=str(out), flux_path=str(flux), genref=str(shards), resolution=16, condition_size=16,
                  max_sequence_length=32, batch_size=2, optimizer="adamw", lr=2e-2, lora_rank=4, lora_alpha=4.0,
                  buffer_size=4, log_every=1, ckpt_every=2, val_every=2, val_size=2, val_steps=1,
                  val_verifier="test-brightness", trackers=(), progress=False, bf16=False)
    values.update(kw)
    return FluxCorrectorConfig(**values)


def test_two_steps_save_a_lora_that_loads_and_changes_the_corrector(data, tmp_path, cli):
    from diffusers import FluxPipeline

    from reflectionflow.backends.flux.lora import load_lora, read_lora_file
    from reflectionflow.backends.flux.random_init import random_flux_pipeline
    from reflectionflow.backends.flux.transformer import condition_ids, corrector_forward

    flux, shards = data
    out = tmp_path / "run"
    code, stdout, err = cli("train", "flux-corrector", "--out", out, "--flux-path", flux, "--genref", shards,
                            "--steps", "2", "--batch-size", "2", "--optimizer", "adamw", "--lr", "0.02",
                            "--rank", "4", "--alpha", "4", "--resolution", "16", "--condition-size", "16",
                            "--max-seq-len", "32", "--log-every", "1", "--ckpt-every", "2", "--val-every", "2",
                            "--val-size", "2", "--val-steps", "1", "--val-verifier", "test-brightness",
                            "--trackers", "", "--quiet")
    assert code == 0, err
    assert "trained 2 steps" in stdout and "validation score" in stdout
    ck = out / "checkpoint"
    for name in ("adapters.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "rank_0.pt"):
        assert (ck / name).is_file(), name
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["lora_rank"] == 4 and state["config"]["optimizer"] == "adamw"
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert len(rows[0]["loss_by_t_bin"]) == 10 and set(rows[0]["loss_by_subset"]) <= set(SUBSETS)
    val = [json.loads(ln) for ln in (out / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [2] and {"corrected", "before", "target"} <= set(val[0])
    assert (out / "val" / "step_000002.png").is_file()

    # The FLUX backend's loader reads it: released key layout, rank and alpha from the metadata.
    lora = read_lora_file(out / "lora")
    assert lora.rank == 4 and lora.alpha == 4.0 and "x_embedder" in lora.modules
    saved = load_file(str(lora.path))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())  # trained: B != 0

    # ... and it changes the corrector's velocity (a fresh B = 0 adapter would not).
    pipe = random_flux_pipeline("tiny")
    tf = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x, enc, pooled = torch.randn(1, 64, 4, generator=g), torch.randn(1, 7, 32, generator=g), torch.randn(1, 32)
    cond, t, guid = torch.randn(1, 16, 4, generator=g), torch.tensor([0.5]), torch.tensor([1.0])
    img_ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    args = (tf, x, enc, pooled, t, img_ids, torch.zeros(7, 3), guid)
    with torch.no_grad():
        before = corrector_forward(*args, condition=cond, cond_ids=condition_ids(4, 4))
        load_lora(tf, lora)
        after = corrector_forward(*args, condition=cond, cond_ids=condition_ids(4, 4))
    assert not torch.allclose(before, after)

    # diffusers loads the same file into FluxPipeline (applied to every token there).
    dp = FluxPipeline.from_pretrained(str(flux))
    kw = dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t, img_ids=img_ids,
              txt_ids=torch.zeros(7, 3), guidance=guid, return_dict=False)
    with torch.no_grad():
        plain = dp.transformer(**kw)[0]
        dp.load_lora_weights(str(out / "lora"))
        assert not torch.allclose(dp.transformer(**kw)[0], plain)


def test_resume_continues_with_the_same_data_and_losses(data, tmp_path):
    full = config(data, tmp_path / "full", max_steps=4, log_keys=True, val_size=0)
    train_flux_corrector(full)
    part = config(data, tmp_path / "part", max_steps=4, log_keys=True, val_size=0)
    res = train_flux_corrector(part, stop_after=2)
    assert res.step == 2 and json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"] == 2
    res = train_flux_corrector(config(data, tmp_path / "part", max_steps=4, log_keys=True, val_size=0, resume=True))
    assert res.step == 4

    def rows(name):
        return [json.loads(ln) for ln in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    a, b = rows("full"), rows("part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["keys"] for r in a] == [r["keys"] for r in b]  # the same samples in the same order
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(str(tmp_path / "full" / "checkpoint" / "adapters.safetensors"))
    wb = load_file(str(tmp_path / "part" / "checkpoint" / "adapters.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A resume with other model settings is refused before anything loads.
    with pytest.raises(ValueError, match="other lora_rank"):
        train_flux_corrector(config(data, tmp_path / "part", max_steps=6, lora_rank=8, resume=True))


@pytest.mark.parametrize("change, message", [
    ({"flux_path": "/no/such/flux"}, "no such folder"),
    ({"lora_targets": ("transformer_blocks.*.attn.add_q_proj",)}, "lora_targets"),
    ({"optimizer": "sgd"}, "optimizer 'sgd'; accepted: adamw, prodigy"),
    ({"genref": "/no/such/shards_{0..3}.tar"}, "no shard matches"),
    ({"val_verifier": "nope"}, "unknown verifier 'nope'"),
    ({"resolution": 15}, "resolution must be a positive multiple of 2"),
    ({"trackers": ("mlflow",)}, "trackers"),
])
def test_bad_settings_are_one_line_errors_before_weights_load(data, tmp_path, change, message):
    cfg = config(data, tmp_path / "x", **change)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_prodigy_is_an_optional_dependency(data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed")
    with pytest.raises(ValueError, match="pip install prodigyopt"):
        config(data, tmp_path / "x", optimizer="prodigy").validate()


def test_world_corrector_trains_on_world_genref_through_the_shared_trainer(tmp_path):
    from reflectionflow.backends.world.mmdit import load_corrector
    from reflectionflow.data.build import BuildConfig, build_genref
    from reflectionflow.models.mmdit import SIZES, MMDiT
    from reflectionflow.train.corrector import WorldCorrectorConfig, train_world_corrector

    build_genref(BuildConfig(out=str(tmp_path / "genref"), n=12, shard_size=6, batch_size=8), progress=False)
    torch.manual_seed(0)
    MMDiT(SIZES["tiny"]()).save_pretrained(tmp_path / "gen")
    cfg = WorldCorrectorConfig(out_dir=str(tmp_path / "run"), generator=str(tmp_path / "gen"),
                               genref=str(tmp_path / "genref"), batch_size=4, max_steps=2, lora_rank=4,
                               warmup_steps=1, log_every=1, ckpt_every=2, val_every=2, val_steps=1,
                               val_size=2, partial_share=0.5, device="cpu", progress=False)
    res = train_world_corrector(cfg)
    assert res.train.step == 2 and "corrected" in res.scores
    out = tmp_path / "run"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / "checkpoint" / "ema.safetensors").is_file()  # the world's EMA, on either data
    assert [json.loads(ln)["verifier"] for ln in (out / "val.jsonl").read_text().splitlines()] == ["world-oracle"]
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert set(rows[0]["loss_by_subset"]) <= set(SUBSETS)
    model, card = load_corrector(out / "corrector", tmp_path / "gen")  # what the world-mmdit corrector loads
    assert card["step"] == 2 and card["lora"]["rank"] == 4 and card["train_config"]["partial_share"] == 0.5


def test_gpu_benchmark_runs_tiny_on_the_cpu(capsys):
    from tests.conftest import load_benchmark_module

    bench = load_benchmark_module("flux_train_gpu")
    rows = bench.main(["--tiny", "--batches", "1,2", "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert [r["batch"] for r in rows] == [1, 2] and all(r["step_s"] > 0 for r in rows)
    assert "projected" in out and out.strip().splitlines()[-1].startswith("projected")
