"""LoRA for the FLUX corrector: the released FLUX-Corrector file format, read and checked before any
weights load, and linear layers whose low-rank update only the condition tokens see.

File format (what `FluxPipeline.save_lora_weights(transformer_lora_layers=get_peft_model_state_dict(...))`
writes, which is how the released `pytorch_lora_weights.safetensors` was made):

    transformer.<module>.lora_A.weight   (rank, in_features)
    transformer.<module>.lora_B.weight   (out_features, rank)

Also accepted, because peft and older diffusers write them: no prefix, the `base_model.model.` prefix
(peft's `adapter_model.safetensors`), `.lora_A.default.weight` (a live peft model's state dict) and
`.lora_down` / `.lora_up` for A / B. The scale is alpha / rank. The released file stores no alpha;
its training config says r = 32, alpha = 32, which is what diffusers assumes for a file without one
(alpha = rank, scale 1). Our own files store rank and alpha in the safetensors metadata
(`save_lora`), and diffusers' `lora_adapter_metadata` is read when present.

Where the update applies (docs/method.md, section 3, OminiControl's `enable_lora(..., latent_lora=False)`):
only to the condition tokens, in the layers that image and condition tokens share. The wrapped layer
(`ConditionLoRALinear`) is still an `nn.Linear` whose plain `forward` is the base layer, so the same
transformer serves the plain FLUX generator and the corrector without a second copy in memory; the
corrector's forward (`transformer.py`) calls `forward_lora` on the condition tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
# Layers the condition tokens pass through (the only place a condition-branch LoRA can act).
CONDITION_PATH = re.compile(
    r"^(x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_[qkv]|attn\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv]))$"
)
# The released corrector's targets (train_flux/config.yaml's regex, written as suffixes).
RELEASED_TARGETS: tuple[str, ...] = (
    "x_embedder",
    "transformer_blocks.*.norm1.linear", "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k",
    "transformer_blocks.*.attn.to_v", "transformer_blocks.*.attn.to_out.0", "transformer_blocks.*.ff.net.2",
    "single_transformer_blocks.*.norm.linear", "single_transformer_blocks.*.proj_mlp",
    "single_transformer_blocks.*.proj_out", "single_transformer_blocks.*.attn.to_q",
    "single_transformer_blocks.*.attn.to_k", "single_transformer_blocks.*.attn.to_v",
)
_PREFIXES = ("base_model.model.", "transformer.")
_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(\.default)?\.weight$")
_PART = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}
METADATA_FORMAT = "reflectionflow-flux-lora/1"


class LoRAError(ValueError):
    """A LoRA file that is missing, unreadable or does not fit the FLUX transformer."""


@dataclass
class LoRAFile:
    """What a LoRA file holds, read from its header only (no tensor is loaded)."""

    path: Path
    modules: dict[str, tuple[int, int, int]]  # module name -> (rank, in_features, out_features)
    keys: dict[str, tuple[str, str]]  # module name -> (key of A, key of B) in the file
    alpha: float | None = None  # None: alpha = rank (scale 1), diffusers' rule for files without one
    metadata: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(r for r, _, _ in self.modules.values())

    def scale(self, module: str) -> float:
        rank = self.modules[module][0]
        return 1.0 if self.alpha is None else float(self.alpha) / rank


def resolve_lora_path(path: str | Path) -> Path:
    """A `.safetensors` file, or a folder holding one of WEIGHT_NAMES."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in WEIGHT_NAMES:
            if (p / name).is_file():
                return p / name
        raise LoRAError(f"--lora-path {p}: folder holds none of {', '.join(WEIGHT_NAMES)}")
    if not p.is_file():
        raise LoRAError(f"--lora-path {p}: no such file or folder")
    if p.suffix != ".safetensors":
        raise LoRAError(f"--lora-path {p}: expected a .safetensors file (or a folder holding "
                        f"{WEIGHT_NAMES[0]}), got {p.suffix or 'no extension'}")
    return p


def read_lora_file(path: str | Path, alpha: float | None = None) -> LoRAFile:
    """Parse the key layout and shapes of a LoRA file. `alpha` overrides what the file says."""
    from safetensors import safe_open

    p = resolve_lora_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise LoRAError(f"--lora-path {p}: not a readable safetensors file ({e})") from e
    if not shapes:
        raise LoRAError(f"--lora-path {p}: the file holds no tensors")

    parts: dict[str, dict[str, tuple[str, tuple]]] = {}
    bad: list[str] = []
    for key, shape in shapes.items():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        m = _SUFFIX.match(name)
        # kohya / ComfyUI files flatten the module path into one name (lora_unet_single_blocks_0_...)
        if m is None or len(shape) != 2 or name.startswith(("lora_unet", "lora_te", "lora_transformer_")):
            bad.append(key)
            continue
        parts.setdefault(m["module"], {})[_PART[m["part"]]] = (key, shape)
    if bad:
        raise LoRAError(
            f"--lora-path {p}: {len(bad)} key(s) are not in the peft/diffusers LoRA layout, e.g. {bad[0]!r}; "
            "accepted: transformer.<module>.lora_A.weight / lora_B.weight (as FluxPipeline.save_lora_weights writes)"
        )
    modules, keys = {}, {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoRAError(f"--lora-path {p}: layer {module!r} has no {missing} weight")
        (ka, (ra, fan_in)), (kb, (fan_out, rb)) = ab["A"], ab["B"]
        if ra != rb:
            raise LoRAError(f"--lora-path {p}: layer {module!r} has lora_A rank {ra} but lora_B rank {rb}")
        modules[module] = (ra, fan_in, fan_out)
        keys[module] = (ka, kb)
    if alpha is None:
        alpha = _alpha_from_metadata(meta, p)
    return LoRAFile(path=p, modules=modules, keys=keys, alpha=alpha, metadata=meta)


def _alpha_from_metadata(meta: dict, path: Path) -> float | None:
    if "alpha" in meta:  # ours (save_lora)
        return float(meta["alpha"])
    raw = meta.get("lora_adapter_metadata")  # diffusers >= 0.35 stores the LoraConfig here
    if raw:
        try:
            cfg = json.loads(raw)
            cfg = cfg.get("transformer", cfg) if isinstance(cfg, dict) else {}
            if "lora_alpha" in cfg:
                return float(cfg["lora_alpha"])
        except (ValueError, TypeError):
            pass
    side = path.parent / "adapter_config.json"  # peft's save_pretrained
    if side.is_file():
        try:
            cfg = json.loads(side.read_text())
            if "lora_alpha" in cfg:
                return float(cfg["lora_alpha"])
        except ValueError:
            pass
    return None


def linear_shapes(transformer: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every linear layer (works on the meta device)."""
    return {n: (m.in_features, m.out_features) for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}


def check_lora_fits(lora: LoRAFile, shapes: dict[str, tuple[int, int]], where: str = "the FLUX transformer") -> None:
    """Every LoRA layer must exist, sit on the condition path and match the layer's shape."""
    problems = []
    for module, (rank, fan_in, fan_out) in lora.modules.items():
        if module not in shapes:
            problems.append(f"{module!r} is not a linear layer of {where}")
        elif not CONDITION_PATH.match(module):
            problems.append(f"{module!r} is not on the condition tokens' path (the corrector's LoRA acts on "
                            "condition tokens only)")
        elif shapes[module] != (fan_in, fan_out):
            problems.append(f"{module!r} is {shapes[module][0]}->{shapes[module][1]} but the LoRA is "
                            f"{fan_in}->{fan_out} (rank {rank})")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LoRAError(f"--lora-path {lora.path}: keys do not fit {where}: {problems[0]}{more}")


class ConditionLoRALinear(nn.Linear):
    """A linear layer plus a low-rank update that only `forward_lora` applies.

    `forward` is the base layer, so every caller that does not know about the condition branch
    (diffusers' own blocks, the plain FLUX pipeline) sees the unmodified model.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        # Built on the meta device and then handed the base layer's own parameters: no copy.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)
        self.scale = scale
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
        nn.init.zeros_(self.lora_B.weight)  # B = 0: a fresh adapter changes nothing

    def forward_lora(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scale

    def unwrap(self) -> nn.Linear:
        base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight, base.bias = self.weight, self.bias
        return base


def lin(layer: nn.Module, x: torch.Tensor, lora: bool) -> torch.Tensor:
    """`layer(x)`, with its condition-branch LoRA when `lora` and the layer has one."""
    if lora and hasattr(layer, "forward_lora"):  # ConditionLoRALinear, or its fp8 twin (models/fp8.py)
        return layer.forward_lora(x)
    return layer(x)


def _wrap(transformer: nn.Module, name: str, rank: int, scale: float) -> ConditionLoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = transformer.get_submodule(parent_name) if parent_name else transformer
    layer = getattr(parent, child)
    if isinstance(layer, ConditionLoRALinear):
        layer = layer.unwrap()
    wrapped = ConditionLoRALinear(layer, rank, scale)
    setattr(parent, child, wrapped)
    return wrapped


def load_lora(transformer: nn.Module, lora: LoRAFile) -> list[str]:
    """Wrap the file's layers and load its weights (checked again against the live model)."""
    from safetensors import safe_open

    check_lora_fits(lora, linear_shapes(transformer))
    with safe_open(str(lora.path), framework="pt") as f:
        for module, (rank, _, _) in lora.modules.items():
            layer = _wrap(transformer, module, rank, lora.scale(module))
            ka, kb = lora.keys[module]
            with torch.no_grad():
                layer.lora_A.weight.copy_(f.get_tensor(ka))
                layer.lora_B.weight.copy_(f.get_tensor(kb))
    return sorted(lora.modules)


def add_lora(transformer: nn.Module, rank: int = 32, alpha: float = 32.0,
             targets: tuple[str, ...] = RELEASED_TARGETS) -> list[str]:
    """Fresh (B = 0) condition-branch adapters on the layers matching `targets` (`*` = block index)."""
    if rank < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
    pats = [re.compile("^" + re.escape(t).replace(r"\*", r"\d+") + "$") for t in targets]
    names = [n for n in linear_shapes(transformer) if CONDITION_PATH.match(n) and any(p.match(n) for p in pats)]
    if not names:
        raise LoRAError(f"LoRA targets {list(targets)} match no layer on the condition path")
    for n in names:
        _wrap(transformer, n, rank, alpha / rank)
    return names


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in the released file's key layout (`transformer.<module>.lora_A.weight`)."""
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, ConditionLoRALinear):
            out[f"transformer.{name}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"transformer.{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_lora(path: str | Path, transformer: nn.Module, alpha: float, extra: dict | None = None) -> Path:
    """Write the adapters as `pytorch_lora_weights.safetensors` (a folder) or to the given file."""
    import os

    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / WEIGHT_NAMES[0]
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(transformer).items()}
    if not state:
        raise LoRAError("the transformer has no LoRA layers to save")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    meta = {"format": METADATA_FORMAT, "alpha": str(float(alpha)), "rank": str(max(ranks))}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")  # written whole, then renamed (io.py's rule)
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


def remove_lora(transformer: nn.Module) -> None:
    for name, m in list(transformer.named_modules()):
        if isinstance(m, ConditionLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, m.unwrap())
