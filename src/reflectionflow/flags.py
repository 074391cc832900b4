"""The flags several commands share, defined once so that they mean the same everywhere.

- `--device auto | cpu | cuda | cuda:N`: where models run (auto: the GPU when there is one).
- `--dtype auto | float32 | bfloat16 | float16`: the models' precision (auto: bfloat16 on a GPU,
  float32 on the CPU).
- `--batch-size N`: images (or requests) per model call, a speed and memory setting (the world's
  components compute each sample on its own on the CPU, so their results do not depend on it).
- `--bootstrap N`: bootstrap resamples for the 95 % intervals (default stats.RESAMPLES).
- `--config FILE`: a YAML or JSON file of the command's settings; flags override it.

Each helper adds the flag to a parser or group with the shared name, values, default and help.
"""

from __future__ import annotations

import argparse

from .runtime import DEVICES, is_device_name  # (no torch at import)
from .stats import RESAMPLES

DTYPES = ("auto", "float32", "bfloat16", "float16")


def device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N."""
    if is_device_name(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; accepted: {DEVICES}")


def add_device(p, default: str | None = "auto", what: str = "where the models run") -> None:
    shown = "auto: cuda when available" if default in (None, "auto") else default
    p.add_argument("--device", type=device, default=default, metavar="DEVICE",
                   help=f"{what}: {' | '.join(DEVICES.split(', '))} (default {shown})")


def add_dtype(p, default: str | None = "auto") -> None:
    p.add_argument("--dtype", choices=DTYPES, default=default,
                   help=f"model precision: {' | '.join(DTYPES)} (default auto: bfloat16 on a GPU, float32 on the CPU)")


def add_batch_size(p, default: int | None, what: str = "requests per component call", shown: int | None = None) -> None:
    p.add_argument("--batch-size", type=int, default=default, metavar="N",
                   help=f"{what} (default {shown if shown is not None else default}; a speed and memory "
                   "setting)")


def add_bootstrap(p, what: str = "bootstrap resamples for the 95 %% intervals") -> None:
    p.add_argument("--bootstrap", type=int, default=RESAMPLES, metavar="N", help=f"{what} (default {RESAMPLES})")


def add_config(p) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file of settings; flags override it")


def names(kind: str) -> str:
    """The registry names of a component kind, for a flag's help: 'a, b, c' (every built-in backend's:
    components.names loads them all)."""
    from . import components

    return ", ".join(components.names(kind))


def name_weights(text: str, names: str = "NAME", accepted: tuple[str, ...] = ()) -> dict[str, float]:
    """'a=0.1,b=0.2' -> {'a': 0.1, 'b': 0.2}: the NAME=WEIGHT lists several commands take (category
    weights, GenRef source mixes); argparse.ArgumentTypeError when a part is not NAME=NUMBER."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            of = f" with {names} one of {', '.join(accepted)}" if accepted else ""
            raise argparse.ArgumentTypeError(f"expected {names}=WEIGHT[,{names}=WEIGHT...]{of}, got {text!r}")
    return out
