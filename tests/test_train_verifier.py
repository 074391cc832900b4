"""`train world-verifier` and verifier `world-learned`: two-step smoke runs, exact resume, the component."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reflectionflow.components import ComponentError, build

SMOKE = ["--size", "tiny", "--batch-size", 8, "--workers", 0, "--val-size", 8, "--log-every", 1,
         "--ckpt-every", 1, "--device", "cpu", "--quiet", "--no-bf16"]


def test_two_step_smoke_run_saves_config_checkpoint_and_weights(tmp_path, cli):
    out = tmp_path / "v"
    code, stdout, err = cli("train", "world-verifier", "--out", out, "--steps", 2, *SMOKE)
    assert code == 0, err
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["max_steps"] == 2 and cfg["model_size"] == "tiny"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert {"model.safetensors", "config.json"} <= {p.name for p in (out / "verifier").iterdir()}
    assert "weights in" in stdout
    # The trained folder is a verifier: P(yes) for each (image, prompt), yes-answers by threshold.
    v = build("verifier", "world-learned", weights=str(out / "verifier"), device="cpu")
    images = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)]
    verdicts = v.score(images, ["a photo of a red circle", "a photo of two blue squares"])
    assert len(verdicts) == 2 and all(0.0 <= d.score <= 1.0 and d.yes == (d.score > 0.5) for d in verdicts)
    # A second run in the same folder without --resume is refused in one line.
    code, _, err = cli("train", "world-verifier", "--out", out, "--steps", 3, *SMOKE)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


def test_resume_continues_exactly(tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    # In warm-up the lr does not depend on --steps, so 2 steps + resume to 3 must equal 3 straight.
    flags = [*SMOKE, "--warmup", 100]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("train", "world-verifier", "--out", straight, "--steps", 3, *flags)[0] == 0
    assert cli("train", "world-verifier", "--out", split, "--steps", 2, *flags)[0] == 0
    assert cli("train", "world-verifier", "--out", split, "--steps", 3, "--resume", "--quiet")[0] == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(d / "checkpoint" / name)) for d in (straight, split))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (split / "log.jsonl").read_text().count("\n") == 3


def test_missing_weights_name_the_train_command(tmp_path):
    with pytest.raises(ComponentError, match="train world-verifier"):
        build("verifier", "world-learned", weights=str(tmp_path / "none"))


def test_bad_flags_are_one_line(tmp_path, cli):
    code, _, err = cli("train", "world-verifier", "--out", tmp_path / "v", "--p-flaw", 2, *SMOKE)
    assert code == 2 and "p_flaw" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_few_dozen_cpu_steps_beat_chance_on_held_out_renders(tmp_path):
    from reflectionflow.train.verifier import WorldVerifierConfig, train_world_verifier, validation_set

    # Single objects, every scene flawed (about half the flaws matter to the evaluator): balanced labels.
    cfg = WorldVerifierConfig(out_dir=str(tmp_path / "v"), model_size="tiny", batch_size=32, max_steps=64, lr=3e-3,
                              warmup_steps=5, val_size=128, log_every=64, ckpt_every=64, num_workers=0,
                              progress=False, device="cpu", ema_decay=0.0, p_flaw=1.0,
                              tag_weights={"single_object": 1.0})
    res = train_world_verifier(cfg)
    images, prompts, labels = validation_set(cfg)  # validation prompts, seeds never trained on
    p = res.ema.p_yes(images, prompts)
    pos, neg = p[labels == 1], p[labels == 0]
    assert len(pos) > 20 and len(neg) > 20
    auc = float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
    assert auc > 0.65  # chance is 0.5 (0.80 when written)


def test_generator_samples_join_the_data(tmp_path, cli):
    import torch

    from reflectionflow.models.mmdit import SIZES, MMDiT

    gen = tmp_path / "gen"
    torch.manual_seed(0)
    MMDiT(SIZES["tiny"]()).save_pretrained(gen)
    out = tmp_path / "v"
    code, _, err = cli("train", "world-verifier", "--out", out, "--steps", 2, "--generator", gen, "--pool-size", 8,
                       "--generator-share", 0.5, *SMOKE)
    assert code == 0, err
    pool = np.load(out / "pool.npz")
    assert pool["images"].shape == (8, 64, 64, 3) and set(np.unique(pool["labels"])) <= {0.0, 1.0}
    assert len(pool["prompts"]) == 8


def test_scene_maps_name_each_object_where_it_is_drawn():
    from reflectionflow.train.verifier import flip_prompt, scene_maps
    from reflectionflow.world.detect import detect
    from reflectionflow.world.render import Obj, render
    from reflectionflow.world.spec import CLASSES, COLOR_NAMES

    img = render([Obj("square", "red", 16, 4, 4), Obj("ring", "blue", 16, 40, 40)])
    maps = scene_maps(img, detect(img))
    assert maps.shape == (2, 8, 8)
    sq, ring = 1 + CLASSES.index("square"), 1 + CLASSES.index("ring")
    assert (maps[0, 0:2, 0:2] == sq).all() and (maps[1, 0:2, 0:2] == 1 + COLOR_NAMES.index("red")).all()
    assert (maps[0, 5:7, 5:7] == ring).any() and (maps[1, 5:7, 5:7] == 1 + COLOR_NAMES.index("blue")).any()
    assert maps[0, 3, 3] == 0 and maps[0, 0, 7] == 0 and set(np.unique(maps[0])) == {0, sq, ring}
    assert flip_prompt("a photo of a red circle left of a blue square") == \
        "a photo of a red circle right of a blue square"
    with pytest.raises(ValueError, match="scene_weight"):
        from reflectionflow.train.verifier import WorldVerifierConfig

        WorldVerifierConfig(scene_weight=-1).validate()


def test_an_old_verifier_folder_loads_without_a_scene_head(tmp_path):
    import torch

    from reflectionflow.models.verifier import SIZES, WorldVerifier

    torch.manual_seed(0)
    plain = WorldVerifier(SIZES["tiny"]())
    plain.save_pretrained(tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    del cfg["scene_head"]  # a folder written before the scene head existed
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    back = WorldVerifier.from_pretrained(tmp_path / "v")
    assert back.scene is None
    with_head = WorldVerifier(SIZES["tiny"](scene_head=True))
    with_head.load_state_dict(plain.state_dict(), strict=False)
    img = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    ids = back.tokenizer(["a photo of a ring", "a photo of two red squares"])
    with torch.no_grad():
        logits, scene = with_head.forward_with_scene(img, ids)
        assert torch.allclose(logits, back(img, ids), atol=1e-6) and scene.shape == (2, 64, 7 + 11)
