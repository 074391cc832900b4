"""LoRA on the generator: a fresh adapter is exactly the base model; the condition scope touches
only the condition branch."""

import pytest

torch = pytest.importorskip("torch")

from reflectionflow.models.lora import LoRAConfig, apply_lora, lora_state_dict, target_names  # noqa: E402
from reflectionflow.models.mmdit import SIZES, MMDiT  # noqa: E402


def tiny(seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(SIZES["tiny"]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(model):
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    return x, torch.tensor([0.2, 0.9]), model.tokenizer(["a photo of a cross", "a photo of two rings"]), cond


def test_default_targets_follow_the_released_corrector():
    model = tiny()
    names = target_names(model, LoRAConfig().targets)
    assert "x_embedder" in names
    assert "double_blocks.0.img_qkv" in names and "double_blocks.0.txt_qkv" not in names
    assert "single_blocks.0.mod" in names and "double_blocks.0.img_mod" in names


def test_zero_cond_lora_equals_base_and_trains_only_adapters():
    base = tiny()
    x, t, text, cond = inputs(base)
    want_plain, want_cond = base(x, t, text), base(x, t, text, cond)
    model = apply_lora(tiny(), LoRAConfig(rank=4, scope="cond"))
    assert torch.equal(model(x, t, text), want_plain)
    assert torch.equal(model(x, t, text, cond), want_cond)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(lora_state_dict(model)) == trainable


def test_cond_lora_acts_on_the_condition_branch_only():
    base = tiny()
    x, t, text, cond = inputs(base)
    model = apply_lora(tiny(), LoRAConfig(rank=4, scope="cond"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    assert torch.equal(model(x, t, text), base(x, t, text))  # no condition image: the generator itself
    assert not torch.allclose(model(x, t, text, cond), base(x, t, text, cond))


def test_zero_peft_lora_equals_base():
    pytest.importorskip("peft")
    base = tiny()
    x, t, text, cond = inputs(base)
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, scope="all"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert torch.equal(model(x, t, text, cond), base(x, t, text, cond))


def test_unknown_targets_are_named():
    with pytest.raises(ValueError, match="match no layer"):
        apply_lora(tiny(), LoRAConfig(targets=("to_q",)))
    with pytest.raises(ValueError, match="scope"):
        LoRAConfig(scope="text").validate()
