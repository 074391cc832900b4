"""GenRef data: read and write GenRef-wds triplet shards and GenRef-CoT records.

- `genref`: the sample format, the one-pass reader with the subset mix (`GenRefReader`,
  `MixSchedule`), a plain scan (`iter_genref`).
- `writer`: `GenRefWriter` (deterministic, atomic, resumable shards) and `CoTWriter`.
- `shards`: shard lists (globs, brace patterns, URLs) and damage-tolerant tar reading.
- `preview`: what `reflectionflow genref inspect` reports and draws.

Names are loaded on first use so that `reflectionflow --help` does not import image libraries.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SUBSETS": "genref",
    "GenRefError": "genref",
    "GenRefReader": "genref",
    "GenRefSample": "genref",
    "MixSchedule": "genref",
    "ReadStats": "genref",
    "iter_genref": "genref",
    "GenRefWriter": "writer",
    "CoTRecord": "writer",
    "CoTWriter": "writer",
    "read_cot": "writer",
    "ShardError": "shards",
    "resolve_shards": "shards",
    "InspectReport": "preview",
    "inspect_shards": "preview",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
