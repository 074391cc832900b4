"""Batch-invariant inference: on the CPU a model computes every sample of a batch on its own.

A CPU GEMM (MKL, OpenBLAS, oneDNN, Arm's libraries) picks its blocking, its micro-kernel and how
it splits the work among threads from the matrix shapes, and a linear layer over a (B, N, D)
batch is one GEMM with B x N rows. So the rounding of one sample's row changes with B, and with
MKL's AVX2 path (the one it takes on AMD processors) even with the row's position in the batch:
the same request gave an image that differed by one level in a few pixels depending on what it
was batched with. `per_sample` removes the cause instead of hiding it: where it applies, a call
with B > 1 runs as B calls with B = 1, so each sample's every operation (GEMMs, attention,
norms, vectorised loops and their tails) sees the same shapes, the same memory layout and the
same position whatever the batch holds. Every sample, a lone one (B = 1) included, enters as a
fresh contiguous copy: the same strides and the same alignment (PyTorch's CPU allocator gives 64
bytes) whether it came alone, from a batch, or as a view in another layout (channels-last
images). On a given machine (processor, thread count, library build) an image then depends on
its request only. MKL itself runs in its reproducible mode (the package sets `MKL_CBWR`,
reflectionflow/__init__.py): without it MKL may round the same GEMM differently from call to
call.

It applies on the CPU without autograd (sampling, scoring). Elsewhere the batched call runs
unchanged: training needs the batch's speed and its gradient is an average anyway, and a GPU runs
a batch of hundreds in the time of a few samples (docs/backends.md, "Batch invariance").
"""

from __future__ import annotations

import dataclasses
import functools

import torch


def sample_wise(x: torch.Tensor) -> bool:
    """Whether a call on batch `x` runs sample by sample: a non-empty CPU batch, no autograd."""
    return x.device.type == "cpu" and x.ndim > 0 and x.shape[0] > 0 and not torch.is_grad_enabled()


def splits(x: torch.Tensor) -> bool:
    """Whether a call on batch `x` is cut into samples: a CPU batch of more than one, no autograd."""
    return sample_wise(x) and x.shape[0] > 1


def take(obj, i: int, batch: int):
    """Sample i of a batch-first structure (tensors, their lists/tuples and dataclasses), as fresh
    contiguous memory (whatever the batch's strides: a channels-last or expanded batch gives the
    same sample as a contiguous one); what is not batch-first (None, numbers, 0-d or other-sized
    tensors) passes."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim > 0 and obj.shape[0] == batch:
            return obj[i : i + 1].clone(memory_format=torch.contiguous_format)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(take(o, i, batch) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: take(getattr(obj, f.name), i, batch)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def select(obj, index: torch.Tensor, batch: int):
    """Rows `index` (a 1-d index tensor) of a batch-first structure, as `take` reads one sample: tensors
    whose first dimension is `batch`, in lists, tuples and dataclasses; anything else passes."""
    if isinstance(obj, torch.Tensor):
        return obj[index.to(obj.device)] if obj.ndim > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(select(o, index, batch) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: select(getattr(obj, f.name), index, batch)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def join(parts: list):
    """The inverse of `take` over the samples' outputs: tensors concatenated along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)):
        return type(first)(join([p[k] for p in parts]) for k in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: join([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first) if f.init})
    if first is None:
        return None
    raise TypeError(f"per_sample cannot join outputs of type {type(first).__name__}")


def per_sample(method):
    """Decorate a module method whose first argument is the batch (B, ...): where `sample_wise`
    says so, every batch-first argument is cut into samples (fresh contiguous copies, for B = 1
    too), the method runs once per sample and the outputs are joined, so that a sample's result
    does not depend on the rest of the batch nor on the layout it came in."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        if not sample_wise(x):
            return method(self, x, *args, **kwargs)
        B = x.shape[0]
        parts = [method(self, take(x, i, B), *take(args, i, B), **{k: take(v, i, B) for k, v in kwargs.items()})
                 for i in range(B)]
        return parts[0] if B == 1 else join(parts)

    return wrapper
