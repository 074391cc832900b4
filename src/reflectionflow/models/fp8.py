"""fp8 matmuls with plain tensors: e4m3 weights, one scale per output row, activations quantised per
row at run time, `torch._scaled_mm` (Hopper's fp8 tensor cores; the CPU runs it too, slowly).

Why not torchao's tensor subclass: a quantised weight that is a subclass makes `torch.compile` guard
on it, and regional compilation of FLUX's 57 blocks (one graph per block kind, the block's
parameters as graph inputs) then stalled for minutes at full size. Here a quantised layer is an
ordinary module holding two ordinary tensors, so the compiled block graph stays shared and the
quantise/scale/matmul/bias chain fuses.

`quantize_linears(model, pick)` swaps the chosen `nn.Linear` layers for `FP8Linear` in place (the
bf16 weights are freed) and returns their names. A layer with a condition-branch LoRA (FLUX's
`ConditionLoRALinear`) becomes `FP8ConditionLoRALinear`: fp8 base, bf16 adapters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value


def fp8_unavailable(device: torch.device | str | None = None) -> str | None:
    """None when fp8 matmuls can run on `device` (a CUDA GPU of compute capability 8.9+; the CPU
    for tests), else why not, in one line."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8 matmul"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return None
    if not torch.cuda.is_available():
        return "fp8 matmuls need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < (8, 9):
        return f"fp8 matmuls need compute capability 8.9 or newer (Ada, Hopper), this GPU has {major}.{minor}"
    return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 values (M, K) and fp32 scales (M, 1), x ~ values * scales."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


_EPILOGUE_BIAS: dict[str, bool] = {}


def bias_in_epilogue(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` takes the bias into its epilogue with row scales here (one tiny
    call per device and dtype, cached): then the bias costs no extra pass over the output."""
    key = f"{torch.device(device)}:{dtype}"
    if key not in _EPILOGUE_BIAS:
        try:
            a = torch.ones(16, 16, device=device, dtype=dtype)
            aq, sa = quantize_rows(a)
            y = torch._scaled_mm(aq, aq.t(), scale_a=sa, scale_b=sa.reshape(1, -1).contiguous(),
                                 bias=torch.ones(16, device=device, dtype=dtype), out_dtype=dtype)
            _EPILOGUE_BIAS[key] = bool(torch.allclose(y.float(), torch.full_like(y.float(), 17.0)))
        except (RuntimeError, TypeError):
            _EPILOGUE_BIAS[key] = False
    return _EPILOGUE_BIAS[key]


class FP8Linear(nn.Module):
    """`y = x W^T + b` with W in e4m3 (row scales) and x quantised per row at each call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"fp8 matmuls need features divisible by 16, got {linear.in_features}->"
                             f"{linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", w8)  # (N, K)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, N) fp32
        self.bias = linear.bias  # kept in its dtype
        # Added in the matmul's epilogue where _scaled_mm takes it: decided here, on the device type the
        # layer is quantised on (a plain string, so compiled graphs see a constant). A layer moved to
        # another device type later (offloading) adds the bias apart.
        dev, dt = linear.weight.device, linear.weight.dtype
        ok = linear.bias is not None and linear.bias.dtype == dt and dt != torch.float32 and bias_in_epilogue(dev, dt)
        self.epilogue_bias = dev.type if ok else None

    def forward(self, x: torch.Tensor, cond: bool = False) -> torch.Tensor:
        """`cond`: the world MMDiT's BranchLinear signature (the base layer ignores the branch)."""
        lead = x.shape[:-1]
        xq, sx = quantize_rows(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
        # Fast accumulation (Hopper's fp8 accumulator, as inference kernels use it): 15-20% faster
        # than the exact one on FLUX's shapes (benchmarks in docs/RESULTS.md).
        if self.epilogue_bias == x.device.type and x.dtype == self.bias.dtype:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale, bias=self.bias,
                                 out_dtype=x.dtype, use_fast_accum=xq.is_cuda)
            return y.reshape(*lead, self.out_features)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale, out_dtype=x.dtype,
                             use_fast_accum=xq.is_cuda)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-scaled"


class FP8ConditionLoRALinear(FP8Linear):
    """FP8Linear plus the condition-branch LoRA that only `forward_lora` applies (see
    backends/flux/lora.ConditionLoRALinear): the adapters stay in their own dtype."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.lora_A, self.lora_B, self.scale = layer.lora_A, layer.lora_B, layer.scale

    def forward_lora(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) + self.lora_B(self.lora_A(x)) * self.scale


def quantize_linears(model: nn.Module, pick: Callable[[str, nn.Linear], bool]) -> list[str]:
    """Replace every `nn.Linear` for which `pick(name, layer)` holds (and whose features are
    multiples of 16) by its fp8 twin, in place; returns the replaced layers' names."""
    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and not n.rpartition(".")[2].startswith("lora_")  # adapters stay
              and m.in_features % 16 == 0 and m.out_features % 16 == 0 and pick(n, m)]
    for name, layer in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        twin = FP8ConditionLoRALinear(layer) if hasattr(layer, "forward_lora") else FP8Linear(layer)
        setattr(parent, child, twin)
    return [n for n, _ in chosen]
