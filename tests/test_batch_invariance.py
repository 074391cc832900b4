"""A sample's result does not depend on what it is batched with (models/batching.py): the MMDiT's
velocity, its text features and cached condition keys/values, the sampler's float output (CFG,
Euler steps, the partial start, condition images in either memory layout), the world generator's
and correctors' images (with step caching too), the learned verifier's scores and the learned
reflector's texts, for batches of 1, 2, 3 and 7 in shuffled orders, exactly. The same checks but
the step cache's run again in subprocesses whose kernels are forced onto other paths: MKL's AVX2
code (the one it takes on AMD processors) with PyTorch's AVX2 kernels on one thread, where batched
GEMMs used to round a sample differently with its batch; and MKL's AVX code under PyTorch's widest
kernels on 3 threads, more than a 2-core machine has, where every op over 32768 elements is cut
into chunks whose ends fall mid-vector."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

BATCHES = (1, 2, 3, 7)
# Environments of the subprocess (None: the variable is removed, so the library picks). MKL caps
# OMP_NUM_THREADS at the physical cores unless MKL_DYNAMIC is FALSE.
OTHER_KERNELS = {
    "mkl-avx2-aten-avx2-1-thread": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                    "OMP_NUM_THREADS": "1"},
    "mkl-avx-aten-widest-3-threads": {"MKL_ENABLE_INSTRUCTIONS": "AVX", "ATEN_CPU_CAPABILITY": None,
                                      "OMP_NUM_THREADS": "3", "MKL_DYNAMIC": "FALSE"},
}


def _perturbed(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _mmdit(mode: str = "full", lora: bool = False):
    from reflectionflow.models.lora import LoRAConfig, apply_lora
    from reflectionflow.models.mmdit import SIZES, MMDiT

    torch.manual_seed(0)
    model = MMDiT(SIZES["tiny"](cond_attention=mode))
    if lora:
        apply_lora(model, LoRAConfig(rank=4))
    return _perturbed(model, 0)


def _orders(n: int, seed: int = 0):
    """Batchings of range(n): every batch size of BATCHES over a shuffled order."""
    rng = random.Random(seed)
    for b in BATCHES:
        order = list(range(n))
        rng.shuffle(order)
        yield b, order


def _batched(fn, n: int, b: int, order: list[int]) -> list:
    """fn(indices) -> per-index results, called on consecutive batches of `b` of `order`, by index."""
    out: list = [None] * n
    for s in range(0, n, b):
        idx = order[s : s + b]
        for i, r in zip(idx, fn(idx)):
            out[i] = r
    return out


def _same(results: list[list], what: str) -> None:
    first = results[0]
    for k, other in enumerate(results[1:], 1):
        for i, (a, b) in enumerate(zip(first, other)):
            a, b = (np.asarray(a), np.asarray(b)) if not isinstance(a, str) else (a, b)
            assert np.array_equal(a, b), f"{what}: sample {i} differs between batching 0 and {k}"


def check_mmdit(n: int = 7) -> None:
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(n, 3, 64, 64, generator=g), torch.randn(n, 3, 64, 64, generator=g)
    t = torch.rand(n, generator=g)
    for mode in ("full", "causal_kv"):
        _check_mmdit_mode(mode, x, cond, t, n)


def _check_mmdit_mode(mode: str, x, cond, t, n: int) -> None:
    model = _mmdit(mode, lora=True)
    words = ["a photo of a ring", "a photo of two red crosses", "", "a photo of a blue circle"]
    ids = model.tokenizer([words[i % 4] for i in range(n)])

    def velocity(idx):
        feats = model.encode_text(ids[idx])
        c = model.encode_condition(cond[idx], feats) if mode == "causal_kv" else cond[idx]
        return list(model(x[idx], t[idx], feats, c).numpy())

    def features(idx):
        return list(model.encode_text(ids[idx]).tokens.numpy())

    with torch.no_grad():
        for fn, what in ((velocity, f"MMDiT velocity ({mode})"), (features, "text features")):
            _same([_batched(fn, n, b, order) for b, order in _orders(n)], what)


def check_sampler(n: int = 7) -> None:
    """The sampler's float output (before rounding to pixels, so a last-bit difference shows): its
    CFG combination, Euler updates and partial start run on the whole batch, outside `per_sample`;
    they are single IEEE operations (+, -, *), so a sample's value cannot depend on its position.
    Condition images come channels-last (the strides of permuted pixels) in every other batching."""
    from reflectionflow.models.flow import RectifiedFlow

    g = torch.Generator().manual_seed(6)
    noise = torch.randn(n, 3, 64, 64, generator=g)
    pixels = torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)
    cond_nchw = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    cond_nhwc = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # channels-last strides
    for mode in ("full", "causal_kv"):
        model = _mmdit(mode, lora=True)
        flow = RectifiedFlow(model, model.tokenizer([""])[0], text_dropout=0.0)
        ids = model.tokenizer([["a photo of a ring", "a photo of two red crosses", ""][i % 3] for i in range(n)])
        for strength in (1.0, 0.5):
            def run(idx, cond, flow=flow, ids=ids, strength=strength):
                with torch.no_grad():
                    res = flow.sample(noise[idx], ids[idx], cond[idx], steps=3, cfg=3.0, strength=strength)
                return list(res.images.numpy())

            _same([_batched(lambda idx, c=(cond_nhwc if k % 2 else cond_nchw): run(idx, c), n, b, order)
                   for k, (b, order) in enumerate(_orders(n))], f"sampler floats ({mode}, strength {strength})")


def _world_folders(root: Path) -> Path:
    from reflectionflow.backends.world.mmdit import save_corrector
    from reflectionflow.models.lora import LoRAConfig

    _mmdit().save_pretrained(root / "gen")
    for name, mode in (("corr", "full"), ("corr-kv", "causal_kv")):
        model = _mmdit(mode, lora=True)  # a non-zero LoRA: the condition branch differs from the base
        save_corrector(root / name, model, LoRAConfig(rank=4), root / "gen", {"step": 0})
    return root


def check_components(root: Path, n: int = 7, strengths=(1.0, 0.5)) -> None:
    from reflectionflow.backends.world.mmdit import MMDiTCorrector, MMDiTGenerator
    from reflectionflow.components import CorrectionRequest, GenerationRequest
    from reflectionflow.world.render import render, sample_scene
    from reflectionflow.world.spec import parse_prompt

    prompts = ["a photo of a circle", "a photo of two rings", "a photo of a red square and a blue cross"]
    gens = [GenerationRequest(prompts[i % 3], seed=10 + i) for i in range(n)]
    imgs = {b: MMDiTGenerator(weights=str(root / "gen"), steps=2, batch_size=b, device="cpu") for b in BATCHES}
    _same([_batched(lambda idx, g=imgs[b]: [r.image for r in g.generate([gens[i] for i in idx])], n, b, order)
           for b, order in _orders(n)], "generator images")
    scenes = [render(sample_scene(parse_prompt(prompts[i % 3]), random.Random(i))) for i in range(n)]
    fixes = [CorrectionRequest(scenes[i], prompts[i % 3], "- Add one red circle.", seed=i) for i in range(n)]
    for name in ("corr", "corr-kv"):
        for strength in strengths:
            cs = {b: MMDiTCorrector(weights=str(root / name), generator=str(root / "gen"), steps=2, batch_size=b,
                                    device="cpu", strength=strength) for b in BATCHES}
            _same([_batched(lambda idx, c=cs[b]: [r.image for r in c.correct([fixes[i] for i in idx])], n, b, order)
                   for b, order in _orders(n)], f"corrector {name} images (strength {strength})")


def check_step_cache(root: Path, n: int = 7, threshold: float = 1.5) -> None:
    """Step caching (models/step_cache.py) decides per image: with a threshold that serves some steps of
    some images from the cache (this perturbed tiny model changes a lot per step), images and their
    cached-pass counts do not depend on the batch either."""
    from reflectionflow.backends.world.mmdit import MMDiTCorrector, MMDiTGenerator
    from reflectionflow.components import CorrectionRequest, GenerationRequest
    from reflectionflow.world.render import render, sample_scene
    from reflectionflow.world.spec import parse_prompt

    prompts = ["a photo of a circle", "a photo of two rings", "a photo of a red square and a blue cross"]
    gens = [GenerationRequest(prompts[i % 3], seed=10 + i) for i in range(n)]
    opts = dict(steps=4, device="cpu", cache_threshold=threshold)
    imgs = {b: MMDiTGenerator(weights=str(root / "gen"), batch_size=b, **opts) for b in BATCHES}
    runs = [_batched(lambda idx, g=imgs[b]: [(r.image, r.cached) for r in g.generate([gens[i] for i in idx])], n, b,
                     order) for b, order in _orders(n)]
    _same([[im for im, _ in run] for run in runs], "generator images (step cache)")
    cached = [[c for _, c in run] for run in runs]
    assert all(c == cached[0] for c in cached), cached
    assert 0 < min(cached[0]) < 6 or min(cached[0]) < max(cached[0]), cached[0]  # some steps cached, not all alike
    scenes = [render(sample_scene(parse_prompt(prompts[i % 3]), random.Random(i))) for i in range(n)]
    fixes = [CorrectionRequest(scenes[i], prompts[i % 3], "- Add one red circle.", seed=i) for i in range(n)]
    for name in ("corr", "corr-kv"):
        cs = {b: MMDiTCorrector(weights=str(root / name), generator=str(root / "gen"), batch_size=b, **opts)
              for b in BATCHES}
        _same([_batched(lambda idx, c=cs[b]: [r.image for r in c.correct([fixes[i] for i in idx])], n, b, order)
               for b, order in _orders(n)], f"corrector {name} images (step cache)")


def check_judges(n: int = 7) -> None:
    from reflectionflow.models.reflector import SIZES as REFLECTOR_SIZES
    from reflectionflow.models.reflector import WorldReflector
    from reflectionflow.models.verifier import SIZES as VERIFIER_SIZES
    from reflectionflow.models.verifier import WorldVerifier

    torch.manual_seed(0)
    verifier = _perturbed(WorldVerifier(VERIFIER_SIZES["tiny"]()), 2)
    reflector = _perturbed(WorldReflector(REFLECTOR_SIZES["tiny"](max_out_len=8)), 3)
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)
    prompts = [["a photo of a ring", "a photo of two red crosses", "a photo of a circle"][i % 3] for i in range(n)]
    _same([_batched(lambda idx: list(verifier.p_yes(images[idx], [prompts[i] for i in idx]).numpy()), n, b, order)
           for b, order in _orders(n)], "verifier P(yes)")
    _same([_batched(lambda idx: reflector.reflect(images[idx], [prompts[i] for i in idx]), n, b, order)
           for b, order in _orders(n)], "reflector texts")


def test_mmdit_velocity_and_text_features_do_not_depend_on_the_batch():
    check_mmdit()


def test_sampler_floats_do_not_depend_on_the_batch_or_the_layout():
    check_sampler()


def test_world_images_do_not_depend_on_the_batch(tmp_path):
    check_components(_world_folders(tmp_path), strengths=(1.0,))  # the subprocess adds 0.5


def test_step_cached_images_do_not_depend_on_the_batch(tmp_path):
    check_step_cache(_world_folders(tmp_path))


def test_learned_judges_do_not_depend_on_the_batch():
    check_judges()


def test_batched_training_forward_is_unchanged():
    """With autograd (training) the batch runs as one call, and agrees with the sample-by-sample
    inference to rounding."""
    model = _mmdit("full")
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(3, 3, 64, 64, generator=g), torch.rand(3, generator=g)
    ids = model.tokenizer(["a photo of a ring"] * 3)
    train = model(x, t, ids)
    assert train.requires_grad
    with torch.no_grad():
        infer = model(x, t, ids)
    torch.testing.assert_close(train.detach(), infer, rtol=1e-4, atol=1e-5)


def _environment(changes: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.skipif(sys.platform == "win32", reason="forced kernels are set through the environment")
@pytest.mark.parametrize("kernels", sorted(OTHER_KERNELS))
def test_batch_invariance_holds_on_other_cpu_kernels(tmp_path, kernels):
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=_environment(OTHER_KERNELS[kernels]),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"batch invariant: threads={OTHER_KERNELS[kernels]['OMP_NUM_THREADS']} " in proc.stdout, proc.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="MKL's report is read through the environment")
def test_importing_the_package_puts_mkl_in_its_reproducible_mode():
    """MKL_VERBOSE reports each MKL call with its reproducibility mode (CNR): after `import
    reflectionflow`, even when torch was imported first (MKL reads MKL_CBWR at its first call), a
    GEMM runs in strict CNR. A torch without MKL (no report) skips."""
    code = "import torch, reflectionflow; torch.ones(64, 64) @ torch.ones(64, 64)"
    env = _environment({"MKL_VERBOSE": "1", "MKL_CBWR": None})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    calls = [ln for ln in out.splitlines() if "GEMM(" in ln]
    if not calls:
        pytest.skip("this torch reports no MKL calls (built without MKL)")
    assert all("CNR:AUTO,STRICT" in ln for ln in calls), calls[0]


if __name__ == "__main__":  # the subprocess of test_batch_invariance_holds_on_other_cpu_kernels
    import reflectionflow  # noqa: F401  (first, as the package's users do: MKL's reproducible mode)

    check_mmdit()
    check_sampler()
    check_components(_world_folders(Path(sys.argv[1])))  # (the step cache's check runs in-process only)
    check_judges()
    print(f"batch invariant: threads={torch.get_num_threads()} aten={torch.backends.cpu.get_cpu_capability()} "
          f"mkl={os.environ.get('MKL_ENABLE_INSTRUCTIONS')} cnr={os.environ.get('MKL_CBWR')}")
