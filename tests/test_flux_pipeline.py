"""The FLUX backend on tiny random FLUX components (CPU, seconds): generator, reflection corrector,
the released LoRA format, Kontext, and the checks that run before any weights load."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from reflectionflow.backends.flux.components import (  # noqa: E402
    FluxGenerator,
    FluxModels,
    KontextCorrector,
    ReflectionCorrector,
    SamplingSettings,
    corrector_text,
    kontext_instruction,
)
from reflectionflow.backends.flux.loading import check_flux_folder  # noqa: E402
from reflectionflow.backends.flux.lora import (  # noqa: E402
    RELEASED_TARGETS,
    ConditionLoRALinear,
    LoRAError,
    add_lora,
    read_lora_file,
    save_lora,
)
from reflectionflow.backends.flux.options import (  # noqa: E402
    FluxBackendOptions,
    add_arguments,
    build_components,
    options_from_args,
    validate_options,
)
from reflectionflow.backends.flux.random_init import random_flux_pipeline, save_random_flux  # noqa: E402
from reflectionflow.backends.flux.transformer import condition_ids, corrector_forward  # noqa: E402
from reflectionflow.cli import one_line  # noqa: E402
from reflectionflow.components import CorrectionRequest, GenerationRequest  # noqa: E402

H = W = 16  # tiny VAE: scale factor 1, so 16 px = 8x8 tokens
SETTINGS = SamplingSettings(height=H, width=W, steps=2, guidance=3.5, max_sequence_length=32, batch_size=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    flux = save_random_flux(root / "flux", "tiny")
    kontext = save_random_flux(root / "kontext", "tiny", seed=1, kontext=True)
    return flux, kontext


@pytest.fixture(scope="module")
def models(folders):
    return FluxModels(check_flux_folder(folders[0]), kontext=check_flux_folder(folders[1], "kontext", "--kontext-path"))


@pytest.fixture(scope="module")
def released_lora(folders, tmp_path_factory):
    """A LoRA written the way the released FLUX-Corrector was: peft adapter with the released
    config's targets, saved by FluxPipeline.save_lora_weights (keys transformer.<module>.lora_A.weight)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(str(folders[0]))
    regex = "|".join(".*" + t.replace(".", r"\.").replace("*", "[0-9]+") + "$" for t in RELEASED_TARGETS)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=regex))
    torch.manual_seed(3)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # trained-looking: B != 0
    out = tmp_path_factory.mktemp("lora")
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return out


def _latents(pipe, seed, n=1):
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((n, 1, H, W), generator=g)
    return pipe._pack_latents(x, n, 1, H, W)


def test_corrector_forward_equals_diffusers_forward_without_condition():
    pipe = random_flux_pipeline("tiny")
    tf = pipe.transformer
    torch.manual_seed(0)
    x, enc, pooled = torch.randn(2, 64, 4), torch.randn(2, 7, 32), torch.randn(2, 32)
    t, g = torch.tensor([0.7, 0.2]), torch.tensor([3.5, 3.5])
    img_ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    txt_ids = torch.zeros(7, 3)
    with torch.no_grad():
        ref = tf(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                 txt_ids=txt_ids, guidance=g, return_dict=False)[0]
        assert torch.equal(corrector_forward(tf, x, enc, pooled, t, img_ids, txt_ids, g), ref)
        # Condition-branch LoRA layers, even non-zero ones, leave the plain model and the
        # condition-free path exactly as they were.
        add_lora(tf, rank=4, alpha=4)
        for m in tf.modules():
            if isinstance(m, ConditionLoRALinear):
                torch.nn.init.normal_(m.lora_B.weight)
        assert torch.equal(tf(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                              img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0], ref)
        assert torch.equal(corrector_forward(tf, x, enc, pooled, t, img_ids, txt_ids, g), ref)
        cond = torch.randn(2, 16, 4)
        with_cond = corrector_forward(tf, x, enc, pooled, t, img_ids, txt_ids, g, condition=cond,
                                      cond_ids=condition_ids(4, 4))
        assert with_cond.shape == ref.shape and not torch.allclose(with_cond, ref)


def test_condition_ids_sit_left_of_the_target():
    ids = condition_ids(32, 32)  # 512 px condition with FLUX's 8x VAE
    assert ids.shape == (1024, 3)
    assert ids[:, 0].abs().max() == 0
    assert ids[:, 1].min() == 0 and ids[:, 1].max() == 31
    assert ids[:, 2].min() == -32 and ids[:, 2].max() == -1  # shifted by -32 columns


def test_generator_batches_and_uses_the_noise_it_is_given(models):
    gen = FluxGenerator(models, SETTINGS)
    res = gen.generate([GenerationRequest("a red circle", 1), GenerationRequest("two squares", 2),
                        GenerationRequest("a red circle", 1, noise=gen.noise_like(7))])
    assert [r.image.shape for r in res] == [(H, W, 3)] * 3 and all(r.image.dtype == np.uint8 for r in res)
    assert all(r.nfe == 2 for r in res)
    # The seed's noise is FluxPipeline's own draw with a CPU generator: same image as the plain pipeline.
    ref = models.pipe(prompt="a red circle", height=H, width=W, num_inference_steps=2, guidance_scale=3.5,
                      max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(1), output_type="np").images
    assert np.array_equal((np.clip(ref[0], 0, 1) * 255).round().astype(np.uint8), res[0].image)
    # Noise passed in (the zero-order search's perturbed noise) is used as is: seed 7's noise = seed 7's image.
    again = gen.generate([GenerationRequest("a red circle", 7)])[0]
    assert np.array_equal(again.image, res[2].image)
    assert not np.array_equal(res[0].image, res[2].image)


def test_zero_lora_corrector_with_empty_condition_equals_plain_flux(models, tmp_path):
    # A zero LoRA in our own file format, through the file path the CLI uses.
    tf = random_flux_pipeline("tiny").transformer
    add_lora(tf, rank=4, alpha=4)
    lora = read_lora_file(save_lora(tmp_path, tf, alpha=4.0))
    assert lora.alpha == 4.0 and lora.rank == 4
    corrector = ReflectionCorrector(models, SETTINGS, lora, condition_size=8)
    pipe = corrector.pipe
    text = corrector_text("a red circle", "- Add one red circle.")
    out = pipe(image=None, prompt=["a red circle"], prompt_2=[text], height=H, width=W, num_inference_steps=2,
               latents=_latents(pipe, 5), max_sequence_length=32).images
    plain = models.pipe(prompt=["a red circle"], prompt_2=[text], height=H, width=W, num_inference_steps=2,
                        latents=_latents(pipe, 5), max_sequence_length=32, output_type="np").images
    assert np.array_equal(out, plain)
    # With a condition image the corrector sees it: the output changes.
    img = np.full((H, W, 3), 200, np.uint8)
    edited = pipe(image=[img], prompt=["a red circle"], prompt_2=[text], height=H, width=W, num_inference_steps=2,
                  latents=_latents(pipe, 5), condition_size=8, max_sequence_length=32).images
    assert not np.allclose(edited, plain)


def test_released_lora_loads_and_changes_the_output(folders, released_lora):
    lora = read_lora_file(released_lora)  # a folder: finds pytorch_lora_weights.safetensors
    assert lora.path.name == "pytorch_lora_weights.safetensors"
    assert all(k[0].startswith("transformer.") and k[0].endswith(".lora_A.weight") for k in lora.keys.values())
    assert lora.alpha is None and lora.rank == 4  # no alpha stored: alpha = rank, diffusers' rule
    assert "x_embedder" in lora.modules and "single_transformer_blocks.0.proj_mlp" in lora.modules

    folder = check_flux_folder(folders[0])
    plain = ReflectionCorrector(FluxModels(folder), SETTINGS, None, condition_size=8)
    tuned = ReflectionCorrector(FluxModels(folder), SETTINGS, lora, condition_size=8)
    from safetensors.torch import load_file

    state = load_file(str(lora.path))
    layer = tuned.pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, ConditionLoRALinear)
    assert torch.equal(layer.lora_B.weight, state["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])
    img = (np.arange(H * W * 3) % 251).reshape(H, W, 3).astype(np.uint8)
    reqs = [CorrectionRequest(img, "a red circle", "- Add one red circle.", seed=4),
            CorrectionRequest(img, "two squares", "- Remove one square.", seed=5)]
    a, b = plain.correct(reqs), tuned.correct(reqs)
    assert all(r.nfe == 2 and r.image.shape == (H, W, 3) for r in a + b)
    assert not np.array_equal(a[0].image, b[0].image)
    # Batched = one at a time (each request keeps its own noise and condition).
    assert np.array_equal(tuned.correct(reqs[1:])[0].image, b[1].image)


def test_corrector_honours_steps_guidance_and_seeds(models, tmp_path):
    corrector = ReflectionCorrector(models, SETTINGS, None, condition_size=8)
    img = np.full((H, W, 3), 90, np.uint8)
    req = CorrectionRequest(img, "a red circle", "- Add one red circle.", seed=4)
    base = corrector.correct([req])[0].image
    assert np.array_equal(corrector.correct([req])[0].image, base)  # deterministic per seed
    seed = corrector.correct([CorrectionRequest(img, "a red circle", "- Add one red circle.", seed=9)])[0].image
    steps = ReflectionCorrector(models, replace(SETTINGS, steps=3), None, 8).correct([req])
    guid = ReflectionCorrector(models, replace(SETTINGS, guidance=1.0), None, 8).correct([req])
    assert steps[0].nfe == 3
    for other in (seed, steps[0].image, guid[0].image):
        assert not np.array_equal(other, base)


def test_step_cache_thresholds_zero_tiny_and_large(models, folders, tmp_path):
    """Off (0) is diffusers' FluxPipeline; a threshold no change passes gives its very bits through the
    corrector's loop; a large one runs only the first block at every step after the first (counted),
    for the generator and the reflection corrector; bad thresholds are one-line errors."""
    tf = models.pipe.transformer
    calls = []
    hooks = [b.norm1.register_forward_pre_hook(lambda *a: calls.append(1)) for b in tf.transformer_blocks]
    hooks += [b.norm.register_forward_pre_hook(lambda *a: calls.append(1)) for b in tf.single_transformer_blocks]
    blocks = len(hooks)  # 1 double + 1 single in the tiny FLUX
    reqs = [GenerationRequest("a red circle", 1), GenerationRequest("two squares", 2)]
    img = np.full((H, W, 3), 90, np.uint8)
    fixes = [CorrectionRequest(img, "a red circle", "- Add one red circle.", seed=4)]
    settings = replace(SETTINGS, steps=4)
    try:
        base = FluxGenerator(models, settings).generate(reqs)
        for threshold, cached, runs in ((1e-12, 0, 4 * blocks), (1e9, 3, 4 + blocks - 1)):
            calls.clear()
            out = FluxGenerator(models, replace(settings, cache_threshold=threshold)).generate(reqs)
            assert [(r.nfe, r.cached) for r in out] == [(4 - cached, cached)] * 2
            assert len(calls) == runs  # one call per block over the batch: 4 steps x 2 blocks, or 4 + 1
            assert all(np.array_equal(a.image, b.image) == (cached == 0) for a, b in zip(out, base))
        plain = ReflectionCorrector(models, settings, None, condition_size=8).correct(fixes)[0]
        same = ReflectionCorrector(models, replace(settings, cache_threshold=1e-12), None, 8).correct(fixes)[0]
        fast = ReflectionCorrector(models, replace(settings, cache_threshold=1e9), None, 8).correct(fixes)[0]
    finally:
        for h in hooks:
            h.remove()
    assert np.array_equal(same.image, plain.image) and (same.nfe, same.cached) == (4, 0)
    assert (fast.nfe, fast.cached) == (1, 3) and not np.array_equal(fast.image, plain.image)
    assert "--cache-threshold must be a number >= 0" in _error(["--flux-path", str(folders[0]), "--cache-threshold",
                                                                "-1"], kinds=("generator",))
    assert "kontext corrector runs diffusers' pipeline" in _error(
        ["--flux-path", str(folders[0]), "--corrector", "kontext", "--kontext-path", str(folders[1]),
         "--corrector-cache-threshold", "0.1"], kinds=("generator", "corrector"))


def test_kontext_corrector_runs(models):
    k = KontextCorrector(models, SETTINGS)
    img = np.full((24, 24, 3), 120, np.uint8)  # any size in: resized to the run's size
    res = k.correct([CorrectionRequest(img, "a red circle", "- Add one red circle.\n- Remove the square", 1),
                     CorrectionRequest(img, "two squares", "", 2)])
    assert [r.image.shape for r in res] == [(H, W, 3)] * 2 and res[0].nfe == 2
    instruction = kontext_instruction("p", "- Add one red circle.\n- Remove the square")
    assert instruction == "Add one red circle. Remove the square."
    assert kontext_instruction("two squares", "") == "Make the image match this description: two squares."


def test_build_components_shares_one_flux(folders, released_lora, tmp_path):
    opts = FluxBackendOptions(flux_path=str(folders[0]), lora_path=str(released_lora), height=H, width=W, steps=2,
                              condition_size=8, max_sequence_length=32)
    built = build_components(opts, kinds=("generator", "corrector"))
    assert built["generator"].models is built["corrector"].models
    gen = built["generator"].generate([GenerationRequest("a red circle", 3)])[0]
    cor = built["corrector"].correct([CorrectionRequest(gen.image, "a red circle", "- Add one red circle.", 3)])[0]
    assert cor.image.shape == (H, W, 3)
    # The corrector's LoRA is inert for the generator: same image after the LoRA loaded.
    assert np.array_equal(built["generator"].generate([GenerationRequest("a red circle", 3)])[0].image, gen.image)


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem, before any weights load


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, component_flags=True)
    return p.parse_args(argv)


def _error(argv, env=None, kinds=("generator", "corrector")):
    opts = options_from_args(_parse(argv), env or {})
    with pytest.raises(ValueError) as e:
        validate_options(opts, kinds=kinds)
    msg = one_line(e.value)
    assert "\n" not in str(e.value)
    return msg


def test_flux_path_that_is_not_a_flux_folder(tmp_path, folders):
    assert "no such folder" in _error(["--flux-path", str(tmp_path / "nope"), "--lora-path", "x"])
    assert "model_index.json" in _error(["--flux-path", str(tmp_path), "--lora-path", "x"])
    (tmp_path / "f.txt").write_text("x")
    assert "is a file" in _error(["--flux-path", str(tmp_path / "f.txt")])
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert "expected FluxPipeline" in _error(["--flux-path", str(sd)])
    msg = _error(["--flux-path", str(folders[1])])  # a Kontext folder where FLUX.1 is expected
    assert "FluxKontextPipeline" in msg and "--flux-path" in msg
    assert "--flux-path" in _error([])
    assert "--lora-path" in _error(["--flux-path", str(folders[0])])
    assert "multiples of 2" in _error(["--flux-path", str(folders[0]), "--height", "17", "--lora-path", "x"])
    assert "--kontext-path" in _error(["--flux-path", str(folders[0]), "--corrector", "kontext"])


def test_lora_whose_keys_do_not_fit(tmp_path, folders):
    from safetensors.torch import save_file

    flux = str(folders[0])
    base = ["--flux-path", flux, "--height", "16", "--width", "16", "--condition-size", "8"]
    assert "no such file" in _error(base + ["--lora-path", str(tmp_path / "none.safetensors")])
    assert "holds none of" in _error(base + ["--lora-path", str(tmp_path)])
    # Full-size FLUX shapes against the tiny transformer.
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(32, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(3072, 32)}, str(tmp_path / "big.safetensors"))
    msg = _error(base + ["--lora-path", str(tmp_path / "big.safetensors")])
    assert "do not fit" in msg and "x_embedder" in msg and "64->3072" in msg
    save_file({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "deep.safetensors"))
    assert "not a linear layer" in _error(base + ["--lora-path", str(tmp_path / "deep.safetensors")])
    save_file({"transformer.context_embedder.lora_A.weight": torch.zeros(4, 32),
               "transformer.context_embedder.lora_B.weight": torch.zeros(32, 4)}, str(tmp_path / "txt.safetensors"))
    assert "condition tokens' path" in _error(base + ["--lora-path", str(tmp_path / "txt.safetensors")])
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 32)},
              str(tmp_path / "kohya.safetensors"))
    assert "peft/diffusers LoRA layout" in _error(base + ["--lora-path", str(tmp_path / "kohya.safetensors")])
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 4)}, str(tmp_path / "half.safetensors"))
    assert "no lora_B" in _error(base + ["--lora-path", str(tmp_path / "half.safetensors")])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert "not a readable safetensors" in _error(base + ["--lora-path", str(tmp_path / "junk.safetensors")])
    with pytest.raises(LoRAError):
        add_lora(random_flux_pipeline("tiny").transformer, rank=0)


def test_registry_builds_share_one_flux(folders, released_lora):
    import reflectionflow.backends.flux  # noqa: F401  (registers generator flux, correctors reflection / kontext)
    from reflectionflow import components

    common = dict(flux_path=str(folders[0]), height=H, width=W, steps=2, condition_size=8, max_sequence_length=32)
    gen = components.build("generator", "flux", **common)
    cor = components.build("corrector", "reflection", lora_path=str(released_lora), **common)
    assert gen.models is cor.models  # built one kind at a time, one FLUX in memory
    with pytest.raises(ValueError, match="unknown option"):
        components.build("generator", "flux", flux_pth="x")


def test_public_options_hold_no_key():
    opts = options_from_args(_parse(["--vlm-url", "http://127.0.0.1:1/v1", "--vlm-model", "m"]),
                             {"OPENAI_API_KEY": "sk-abc123"})
    pub = opts.public()
    assert "sk-abc123" not in repr(pub) and "sk-abc123" not in repr(opts)
    assert pub["vlm"]["api_key_env"] == "OPENAI_API_KEY" and pub["vlm"]["api_key_set"] is True
