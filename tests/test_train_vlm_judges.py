"""Real-scale judge trainers on a tiny random Qwen2.5-VL built here (tokenizer included, no hub):
two steps of each save a model that loads back into the engine, a resumed run continues exactly,
and bad input is skipped and counted or refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from reflectionflow.components import ReflectionRequest, build  # noqa: E402
from reflectionflow.models import qwen_vl as Q  # noqa: E402
from reflectionflow.train.vlm_common import JsonlSource, Skip, load_image  # noqa: E402
from reflectionflow.train.vlm_reflector import ReflectorTrainConfig, train_reflector  # noqa: E402
from reflectionflow.train.vlm_verifier import VerifierTrainConfig, pair_loss, train_verifier  # noqa: E402

FAST = dict(batch_size=2, log_every=1, val_every=2, ckpt_every=1, lr=2e-2, warmup_steps=0, min_lr_ratio=1.0,
            lora_rank=4, progress=False, device="cpu", val_size=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    Q.tiny_qwen_vl(root / "base")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + 6 * i, 48, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    pairs = [dict(prompt=f"a red circle {i}", image_a=f"img/{i}.png", image_b=f"img/{(i + 1) % 6}.png",
                  label=["a", "b", "tie"][i % 3]) for i in range(6)]
    bad = [dict(prompt="x", image_a="img/missing.png", image_b="img/0.png", label="a"),
           dict(prompt="y", image_a="img/corrupt.png", image_b="img/0.png", label="b")]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs + bad))
    (root / "val_pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs[:3] + bad))
    cot = [dict(prompt=f"two dogs {i}", image=f"img/{i}.png", analysis="One dog is missing.",
                instructions=["Add one dog on the left.", "Remove the cat."], result="no") for i in range(6)]
    (root / "cot.jsonl").write_text("".join(json.dumps(x) + "\n" for x in cot))
    return root


def _images(root, n=3):
    return [np.asarray(Image.open(root / "img" / f"{i}.png").convert("RGB")) for i in range(n)]


def test_pixels_match_the_qwen_processor_and_the_model(world):
    pix = Q.PixelConfig(min_pixels=28 * 28, max_pixels=112 * 112)
    images = [np.zeros((50, 130, 3), np.uint8), np.full((200, 90, 3), 200, np.uint8)]
    pv, grid = Q.preprocess_images(images, pix)
    for t, h, w in grid.tolist():
        assert t == 1 and h % 2 == 0 and w % 2 == 0 and h * w * 14 * 14 <= 112 * 112
    assert pv.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    try:
        from transformers import Qwen2VLImageProcessorPil
    except ImportError:
        Qwen2VLImageProcessorPil = None
    if Qwen2VLImageProcessorPil is not None:
        ref = Qwen2VLImageProcessorPil(min_pixels=pix.min_pixels, max_pixels=pix.max_pixels)(images=images,
                                                                                         return_tensors="pt")
        assert torch.equal(ref["image_grid_thw"], grid)
        assert torch.allclose(ref["pixel_values"], pv, atol=1e-5)
    # The vision tower turns them into exactly the tokens the text reserves.
    model = Q.load_qwen_vl(world / "base")
    feats = model.model.get_image_features(pv, grid, return_dict=True).pooler_output
    assert [f.shape[0] for f in feats] == Q.image_tokens(grid, 2)


def test_pair_losses_exact():
    ra, rb = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    label = torch.tensor([1, -1, 0])
    # bt: ties left out; -log sigmoid(2) and -log sigmoid(1)
    want = (-torch.log(torch.sigmoid(torch.tensor(2.0))) - torch.log(torch.sigmoid(torch.tensor(1.0)))) / 2
    assert torch.isclose(pair_loss(ra, rb, label, "bt"), want)
    # btt: the three outcomes' probabilities sum to one
    for d in (-3.0, 0.0, 0.7):
        a, b = torch.tensor([d, d, d]), torch.zeros(3)
        per = [float(pair_loss(a[:1], b[:1], torch.tensor([k]), "btt", tie_margin=0.5)) for k in (1, -1, 0)]
        assert sum(np.exp(-np.array(per))) == pytest.approx(1.0, abs=1e-5)
    assert float(pair_loss(ra, rb, label, "margin", margin=1.0)) == pytest.approx((0 + 0 + 0) / 3)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    want = 0.5 * ((ra - targets[:, 0]) ** 2 + (rb - targets[:, 1]) ** 2).mean()
    assert torch.isclose(pair_loss(ra, rb, label, "regression", targets=targets), want)


def test_missing_and_corrupt_images_are_skipped_and_counted(world):
    lines = [json.loads(x) | {"_dir": str(world)} for x in (world / "pairs.jsonl").read_text().splitlines()]

    def make(d):
        return load_image(d, "image_a"), load_image(d, "image_b")

    src = JsonlSource(lines, make, seed=0)
    for _ in range(12):  # two passes
        src.next()
    assert src.skipped == {"missing_image": 2, "corrupt_image": 2}
    with pytest.raises(Skip):
        load_image({"_dir": str(world), "a": "img/corrupt.png"}, "a")


@pytest.fixture(scope="module")
def verifier_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "verifier"
    cfg = VerifierTrainConfig(out_dir=str(out), base=str(world / "base"), data=str(world / "pairs.jsonl"),
                              val_data=str(world / "val_pairs.jsonl"), val_size=8, norm_size=6, loss="btt", **{
                                  k: v for k, v in FAST.items() if k != "val_size"}, max_steps=2)
    return cfg, train_verifier(cfg)


def test_verifier_trains_exports_and_scores_in_the_engine(world, verifier_run, tmp_path):
    from reflectionflow.config import RunConfig
    from reflectionflow.engine import Components
    from reflectionflow.pipeline import generate

    cfg, res = verifier_run
    assert res.step == 2 and (res.out / Q.REWARD_CONFIG).is_file()
    assert res.skipped["val_missing_image"] == 1 and res.skipped["val_corrupt_image"] == 1
    rows = [json.loads(x) for x in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and "val_accuracy" in rows[-1]
    saved = json.loads((Path(cfg.out_dir) / "checkpoint" / "state.json").read_text())
    assert saved["step"] == 2 and saved["train_config"]["loss"] == "btt"

    verifier = build("verifier", "reward", path=str(res.out), device="cpu")
    from reflectionflow.backends.flux.options import FluxBackendOptions, build_components

    flux_built = build_components(FluxBackendOptions(verifier="reward", verifier_path=str(res.out), device="cpu"),
                                  kinds=("verifier",), check_endpoint=False)
    assert type(flux_built["verifier"]) is type(verifier)
    images, prompts = _images(world), ["a red circle 0", "a red circle 1", "a red circle 2"]
    verdicts = verifier.score(images, prompts)
    meta = json.loads((res.out / Q.REWARD_CONFIG).read_text())
    for v in verdicts:
        assert v.score == pytest.approx((v.details["raw"] - meta["mean"]) / meta["std"], rel=1e-5)
    # batching does not change a score (right padding, reward read at each row's last token)
    assert verifier.score(images[1:2], prompts[1:2])[0].score == pytest.approx(verdicts[1].score, abs=1e-4)
    # the trained LoRA changed the rewards: the base decoder under the same head scores otherwise
    base = Q.RewardModel.from_causal(Q.load_qwen_vl(world / "base")).eval()
    base.head.load_state_dict(verifier.model.head.state_dict())
    verifier.model = base
    assert not np.allclose(verifier.raw(images, prompts), [v.details["raw"] for v in verdicts], atol=1e-4)

    # and the engine runs with it (world generator / corrector, the trained verifier)
    trained = build("verifier", "reward", path=str(res.out), device="cpu")
    comps = Components(generator=build("generator", "world-render"), verifier=trained,
                       reflector=build("reflector", "world-oracle"), refiner=build("refiner", "world-rule"),
                       corrector=build("corrector", "world-edit"))
    out = tmp_path / "engine"
    generate(RunConfig(progress=False, method="reflection", budget=4), out, prompt="a photo of a red circle",
             components=comps, report=False)
    trace = [json.loads(x) for x in next(out.glob("*/trace.jsonl")).read_text().splitlines()]
    assert len(trace) == 4 and all(np.isfinite(t["score"]) for t in trace)


def test_verifier_resume_is_exact(world, verifier_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    cfg, _ = verifier_run
    resumed = tmp_path / "resumed"
    shutil.copytree(cfg.out_dir, resumed)
    common = dict(base=cfg.base, data=cfg.data, val_data=cfg.val_data, val_size=8, norm_size=6, loss="btt",
                  **{k: v for k, v in FAST.items() if k != "val_size"}, max_steps=3)
    res = train_verifier(VerifierTrainConfig(out_dir=str(resumed), resume=True, **common))
    assert res.step == 3
    rows = [r["step"] for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert rows == [1, 2, 3]
    straight = tmp_path / "straight"
    train_verifier(VerifierTrainConfig(out_dir=str(straight), **common))
    a = load_file(str(resumed / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(straight / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a resume with other LoRA settings is refused before training
    with pytest.raises(ValueError, match="trainable weights differ"):
        train_verifier(VerifierTrainConfig(out_dir=str(straight), resume=True, **(common | {"lora_rank": 2})))


def test_reflector_trains_exports_and_writes_other_text(world, tmp_path):
    out = tmp_path / "reflector"
    cfg = ReflectorTrainConfig(out_dir=str(out), base=str(world / "base"), data=str(world / "cot.jsonl"),
                               **(FAST | {"val_size": 2}), max_steps=2, val_generate=1, max_new_tokens=4)
    res = train_reflector(cfg)
    assert res.step == 2 and res.val_loss is not None and res.val_parse_share is not None
    assert (out / "reflector-lora" / "adapter_config.json").is_file()
    assert json.loads((res.out / "reflector_config.json").read_text())["message_style"] == "instruct"
    request = ReflectionRequest(image=_images(world, 1)[0], original_prompt="two dogs", current_prompt="two dogs")
    trained = build("reflector", "local", path=str(res.out), device="cpu", max_new_tokens=8)
    before = build("reflector", "local", path=str(world / "base"), device="cpu", max_new_tokens=8)
    t_after, t_before = trained.reflect([request])[0].text, before.reflect([request])[0].text
    assert t_after != t_before

    # the FLUX backend's flags (--verifier reward --verifier-path, --reflector local --reflector-path)
    # build the same judges, checked before anything loads
    from reflectionflow.backends.flux.options import FluxBackendOptions, FluxOptionsError, build_components
    from reflectionflow.backends.vlm.reward import LocalReflector

    opts = FluxBackendOptions(reflector="local", reflector_path=str(res.out), device="cpu")
    built = build_components(opts, kinds=("reflector",), check_endpoint=False)
    assert isinstance(built["reflector"], LocalReflector)
    with pytest.raises(FluxOptionsError, match="needs --reflector-path"):
        build_components(FluxBackendOptions(reflector="local"), kinds=("reflector",), check_endpoint=False)


def test_bad_folders_and_flags_are_one_line_errors(world, tmp_path, cli):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForCausalLM"]}))
    code, _, err = cli("train", "verifier", "--out", tmp_path / "o", "--base", llava, "--data", world / "pairs.jsonl")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model_type 'llava'" in err and "qwen2_5_vl" in err
    code, _, err = cli("train", "reflector", "--out", tmp_path / "o", "--base", world / "base", "--data",
                       world / "pairs.jsonl")
    assert code == 2 and "pairs.jsonl:1: missing image, instructions" in err
    code, _, err = cli("train", "verifier", "--out", tmp_path / "o", "--base", world / "base", "--data",
                       world / "pairs.jsonl", "--loss", "hinge")
    assert code == 2 and "accepted: bt, btt, margin, regression" in err
    with pytest.raises(ValueError, match="no reward_head.safetensors"):
        build("verifier", "reward", path=str(world / "base"), device="cpu")
    with pytest.raises(ValueError, match="model_type 'llava'"):
        build("reflector", "local", path=str(llava), device="cpu")
