"""The ground floor every layer may import: devices and image tensors.

Inference (backends), training (train) and the commands share these; none of them imports a
layer above it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: the command line's --help and flag checks stay light
    import torch

DEVICES = "auto, cpu, cuda, cuda:N"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def is_device_name(name: object) -> bool:
    return isinstance(name, str) and DEVICE_PATTERN.fullmatch(name) is not None


def check_device(name: str, flag: str = "--device") -> None:
    """ValueError (one line naming the flag and what is accepted) unless `name` is a device this
    trainer can use on this machine."""
    import torch

    if not is_device_name(name):
        raise ValueError(f"{flag} {str(name)[:40]!r}: not a device; accepted: {DEVICES}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: no CUDA device on this machine; accepted here: auto, cpu")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_device(name: str) -> torch.device:
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], contiguous (plain NCHW strides, not the
    channels-last ones the permuted pixels would keep): a model's inputs have one layout."""
    import torch

    return images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    import torch

    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# Number checks: what every config's validation asks of a value (a bool is never a number here).


def is_int(value: object, minimum: int | None = None, maximum: int | None = None) -> bool:
    """`value` is an int (not a bool) within [minimum, maximum] (either bound may be None)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (minimum is None or value >= minimum) and (maximum is None or value <= maximum))


def is_number(value: object, minimum: float | None = None, maximum: float | None = None, *,
              above: float | None = None) -> bool:
    """`value` is a finite int or float (not a bool) within [minimum, maximum], and > `above` if given."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
            and (above is None or value > above))
