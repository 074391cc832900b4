"""LoRA on the trained generator, for the corrector.

Two scopes:
- "all": plain LoRA through peft (`inject_adapter_in_model`), the update applies to every token
  that passes a target layer (image and condition tokens share the image-stream weights).
- "cond": the update applies to condition tokens only, as OminiControl does, so that with no
  condition image the corrector IS the generator. peft's LoRA layer adds its update to every
  row it is given and offers per-sample (not per-token) adapter switching, so this scope uses a
  small LoRA layer of our own: the MMDiT calls each of its linears with `cond=True` on the
  condition stream (models/mmdit.py: `BranchLinear`), and `CondLoRALinear` adds B(A(x)) there only.

Both start with B = 0, so a fresh adapter leaves the model's output exactly unchanged.
Default targets follow the released OminiControl/ReflectionFlow config mapped onto this model's
names: the patch embedder, the double blocks' image-stream modulation, fused q/k/v, output
projection and second MLP layer, and the single blocks' modulation, fused input and output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .mmdit import BranchLinear

LORA_TARGETS: tuple[str, ...] = ("x_embedder", "img_mod", "img_qkv", "img_proj", "img_fc2", "mod", "lin1", "lin2")
SCOPES = ("cond", "all")


@dataclass
class LoRAConfig:
    rank: int = 32  # the released corrector config; the paper's text says 256
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS
    scope: str = "cond"

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.scope not in SCOPES:
            raise ValueError(f"LoRA scope {self.scope!r}; accepted: {', '.join(SCOPES)}")
        if not self.targets:
            raise ValueError("LoRA targets are empty; name some of: " + ", ".join(LORA_TARGETS))
        self.targets = tuple(self.targets)
        return self


class CondLoRALinear(nn.Module):
    """A frozen BranchLinear plus a low-rank update applied only on the condition branch."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, cond: bool = False) -> torch.Tensor:
        y = self.base(x)
        if cond:
            y = y + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(y.dtype) * self.scaling
        return y


def _is_target(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule for a list of names: the module's name is the target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BranchLinear) and _is_target(n, targets)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze the model and add LoRA adapters in place; returns the model."""
    config.validate()
    names = target_names(model, config.targets)
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BranchLinear)})
        raise ValueError(f"LoRA targets {list(config.targets)} match no layer; accepted: {', '.join(available)}")
    for p in model.parameters():
        p.requires_grad_(False)
    if config.scope == "all":
        from peft import LoraConfig, inject_adapter_in_model

        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=names, init_lora_weights=True)
        inject_adapter_in_model(peft_config, model)
    else:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, CondLoRALinear(getattr(parent, child), config.rank, config.alpha))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a corrector checkpoint adds to the generator's)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}
