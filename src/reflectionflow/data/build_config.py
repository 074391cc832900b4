"""What `genref build` and its flux builder share: the sources and their mix, the config, the errors,
the triplet record and the seeded draws (data/build.py builds the world's GenRef, data/build_flux.py
FLUX's; both import this, neither the other's internals)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SOURCES = ("rule", "reward", "length", "editing")
SUBSET_OF = {"rule": "rule", "reward": "general", "length": "length", "editing": "editing"}
# GenRef's own proportions: 185K rule, 143K reward, 96K long/short, 619K editing.
DEFAULT_MIX = {"rule": 0.18, "reward": 0.14, "length": 0.09, "editing": 0.59}
BACKENDS = ("world", "flux")
MAX_ATTEMPTS = 16  # prompt draws per sample before giving up (each draw: k fresh samples)
FORMAT = "reflectionflow-genref-world/1"
WORLD_DEFAULTS = {"steps": 20, "guidance": 3.0, "batch_size": 256, "workers": 1}
COT_MERGED = "genref_cot.jsonl"
# Fields of BuildConfig that only the flux backend reads; the world's identity leaves them out.
_FLUX_FIELDS = ("prompts", "components", "flux")


class BuildError(ValueError):
    """Bad `genref build` input."""


class BuildFailed(RuntimeError):
    """A build that could not go on (a judge that keeps failing); what is complete stays on disk."""


@dataclass
class BuildConfig:
    out: str
    n: int
    backend: str = "world"
    seed: int = 0
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    shard_size: int = 1000
    samples_per_prompt: int = 4  # k: generator samples per prompt draw
    generator: str | None = None  # world: the generator folder; None: the renderer-backed stand-in
    steps: int = 20
    guidance: float = 3.0
    batch_size: int = 256
    device: str = "auto"
    workers: int = 1  # processes judging images
    # --backend flux (build_flux.py)
    prompts: str | None = None  # a prompt file or set; None: GenEval-style prompts drawn per sample
    components: dict = field(default_factory=dict)  # kind -> registry name (the rest: build_flux.DEFAULTS)
    flux: dict = field(default_factory=dict)  # the flux backend's public settings (no API key)

    def validate(self) -> BuildConfig:
        if self.backend not in BACKENDS:
            raise BuildError(f"--backend {self.backend!r}: genref build knows {', '.join(BACKENDS)}")
        for name in ("n", "shard_size", "steps", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise BuildError(f"--samples-per-prompt must be >= 2 (pairs compare samples), "
                             f"got {self.samples_per_prompt}")
        bad = sorted(set(self.mix) - set(SOURCES))
        if bad or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise BuildError(f"--mix must weigh {', '.join(SOURCES)} with weights >= 0 and a positive sum, "
                             f"got {self.mix}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise BuildError(f"--out {out} exists and is not a folder")
        if self.backend == "world":
            if self.prompts is not None or self.components or self.flux:
                raise BuildError("--prompts, component names and FLUX settings are for --backend flux; the world "
                                 "backend draws Shapes-world prompts and judges exactly")
            if self.generator is not None and not (Path(self.generator) / "model.safetensors").is_file():
                raise BuildError(f"--generator {self.generator}: no model.safetensors there (use --no-generator for "
                                 "the renderer-backed stand-in)")
        return self

    def identity(self) -> dict:
        """The world backend's: what must not change between a run and its resumption (n may grow; speed
        settings may change). The flux backend's is build_flux.identity."""
        from ..backends.world.mmdit import file_sha256

        skip = ("out", "n", "batch_size", "device", "workers", *_FLUX_FIELDS)
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["generator_sha256"] = file_sha256(Path(self.generator) / "model.safetensors") if self.generator else None
        return {"format": FORMAT, **d}


@dataclass
class Triplet:
    source: str
    prompt: str
    bad: np.ndarray
    good: np.ndarray
    reflection: str
    analysis: str
    result: str
    extra: dict


def seeded_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def choose(rng: np.random.Generator, weights: dict, names) -> str:
    p = np.array([weights.get(n, 0.0) for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]
