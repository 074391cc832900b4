"""Run configuration: one dataclass per run, loaded from YAML/JSON, validated before any model loads.

A `RunConfig` is what `reflectionflow generate` resolves from `--config FILE` and its flags; the
resolved copy (budget split filled in, component names filled in from the backend) is written to
OUT/config.json, and `--resume` refuses a folder whose config differs in anything that changes
the outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .runtime import is_int

METHODS: tuple[str, ...] = ("noise", "zero-order", "prompt", "reflection")
REALLOCATE: tuple[str, ...] = ("none", "chains", "prompts")
ON_KEEP: tuple[str, ...] = ("correct", "resample")  # reflection: what a "keep" reflection's round makes
COMPONENT_KINDS: tuple[str, ...] = ("generator", "verifier", "reflector", "refiner", "corrector")
# The components each method calls (the others are neither built nor checked).
METHOD_COMPONENTS: dict[str, tuple[str, ...]] = {
    "noise": ("generator", "verifier"),
    "zero-order": ("generator", "verifier"),
    "prompt": ("generator", "verifier", "refiner"),
    "reflection": ("generator", "verifier", "reflector", "refiner", "corrector"),
}
# Settings that change how fast a run goes but never what it produces; `--resume` may change them.
EXECUTION_KEYS: frozenset[str] = frozenset({"batch_size", "workers", "progress", "prompt_batch", "limit"})
# The same for backend_options (dotted paths into it): the flux backend's images per transformer
# call, and how its VLM client reaches the endpoint (concurrency, patience, which variable holds the key).
BACKEND_EXECUTION_KEYS: frozenset[str] = frozenset({
    "batch_size", "vlm.concurrency", "vlm.timeout", "vlm.retries", "vlm.backoff", "vlm.api_key_env",
    "vlm.api_key_env_explicit", "vlm.api_key_set",
})


class ConfigError(ValueError):
    """A run setting that is missing, malformed or does not fit the others."""


@dataclass
class RunConfig:
    # What to search and how much to spend.
    method: str = "reflection"
    budget: int = 8  # images per prompt, every kind counted (noise + prompt-refined + corrected)
    chains: int | None = None  # prompt / reflection: parallel chains (search width N)
    depth: int | None = None  # prompt / reflection: rounds per chain (search depth M)
    pool: int | None = None  # reflection: initial noise pool P; pool + chains * depth == budget
    seed: int = 0
    # Components: the backend supplies defaults for any name left empty.
    backend: str = "world"
    generator: str | None = None
    verifier: str | None = None
    reflector: str | None = None
    refiner: str | None = None
    corrector: str | None = None
    options: dict[str, dict] = field(default_factory=dict)  # per component kind: constructor options
    # Settings every component of the backend shares (flux: folders, sizes, the VLM endpoint), as
    # the backend records them. Never a secret: API keys travel apart (engine/backends.py).
    backend_options: dict = field(default_factory=dict)
    # Search variants.
    neighbors: int = 4  # zero-order: neighbours per round (Flux-TTS default)
    threshold: float = 0.95  # zero-order: cosine similarity of a neighbour to its pivot noise
    refine_prompts: bool = True  # reflection: refine the chain's prompt before each correction
    backtrack: bool = False  # reflection: correct the chain's best image so far, not its latest
    early_stop: float | None = None  # prompt / reflection: stop a chain once the verifier says yes
    reallocate: str = "chains"  # with early_stop: where saved images go (none | chains | prompts)
    # reflection: when the reflector asks for no change, "resample" (default) spends the round on a
    # fresh noise sample of the chain's prompt; "correct" still runs the corrector with that
    # reflection, as the original ReflectionFlow does (docs/method.md: measured, resample wins).
    on_keep: str = "resample"
    # Execution (may differ between a run and its resume).
    batch_size: int = 64  # requests per component call
    prompt_batch: int = 64  # prompts searched together (one wave); with reallocate=prompts, the share group
    workers: int = 1  # component calls in flight at once (API-backed components)
    limit: int | None = None  # only N prompts, taken in turn from each category (engine.limit_specs)
    progress: bool = True

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def search_dict(self) -> dict:
        """The settings that decide the outputs (what `--resume` compares)."""
        d = self.to_dict()
        keys = set(EXECUTION_KEYS)
        if self.reallocate == "prompts" and self.early_stop is not None:
            keys.discard("prompt_batch")  # the share group then changes what each prompt gets
        out = {k: v for k, v in d.items() if k not in keys}
        if self.backend_options:
            out["backend_options"] = _without(self.backend_options, BACKEND_EXECUTION_KEYS)
        else:
            del out["backend_options"]  # backends without shared settings: identities as before the field
        if self.on_keep == "correct" or self.method != "reflection":
            # no effect on other methods; "correct" is the behaviour before the field (run folders
            # made then resume with --on-keep correct)
            del out["on_keep"]
        return out

    def validate(self) -> RunConfig:
        """Check every field on its own and against the others; return a copy with the split resolved."""
        _check_choice("method", self.method, METHODS)
        for name in ("budget", "seed", "batch_size", "prompt_batch", "workers", "chains", "depth", "pool", "limit"):
            value = getattr(self, name)
            if value is not None or name in ("budget", "seed", "batch_size", "prompt_batch", "workers"):
                _check_int(name, value, *LIMITS[name])
        _check_choice("reallocate", self.reallocate, REALLOCATE)
        _check_choice("on_keep", self.on_keep, ON_KEEP)
        if not isinstance(self.options, dict) or not all(
            isinstance(v, dict) and k in COMPONENT_KINDS for k, v in self.options.items()
        ):
            raise ConfigError(
                f"options must map a component kind ({', '.join(COMPONENT_KINDS)}) to a dict of settings, "
                f"got {self.options!r}"
            )
        if not isinstance(self.backend_options, dict):
            raise ConfigError(f"backend_options must be a mapping of the backend's settings, "
                              f"got {self.backend_options!r}")
        if self.method == "zero-order":
            _check_int("neighbors", self.neighbors, *LIMITS["neighbors"])
            if not isinstance(self.threshold, (int, float)) or not 0.0 < float(self.threshold) < 1.0:
                raise ConfigError(f"threshold must be a number in (0, 1) (cosine to the pivot noise), "
                                  f"got {self.threshold!r}")
        if self.early_stop is not None:
            if self.method not in ("prompt", "reflection"):
                raise ConfigError(
                    f"early_stop applies to the prompt and reflection methods (chains), not {self.method!r}"
                )
            if not isinstance(self.early_stop, (int, float)) or isinstance(self.early_stop, bool):
                raise ConfigError(f"early_stop must be a verifier score threshold, got {self.early_stop!r}")
        if self.backtrack and self.method != "reflection":
            raise ConfigError(f"backtrack applies to the reflection method, not {self.method!r}")
        return replace(self, **resolve_split(self.method, self.budget, self.chains, self.depth, self.pool))


def _without(settings: dict, dotted: frozenset[str], prefix: str = "") -> dict:
    """A copy of a nested dict without the keys at the given dotted paths."""
    out = {}
    for k, v in settings.items():
        path = prefix + str(k)
        if path in dotted:
            continue
        out[k] = _without(v, dotted, path + ".") if isinstance(v, dict) else v
    return out


# (least, most) of each integer setting. The upper bounds are far above any sensible run (the paper's
# largest budget is 32; a GenEval run has 553 prompts) and keep a typo from asking for memory
# without end: the engine holds budget x prompt_batch candidates at once.
LIMITS = {
    "budget": (1, 4096), "chains": (1, 4096), "depth": (1, 4096), "pool": (0, 4096), "seed": (0, 2**63 - 1),
    "batch_size": (1, 4096), "prompt_batch": (1, 4096), "workers": (1, 256), "limit": (1, 10**7),
    "neighbors": (1, 1024),
}


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    flag = "--" + name.replace("_", "-")
    if not is_int(value, minimum, maximum):
        accepted = f"an integer in {minimum}..{maximum}" if maximum is not None else f"an integer >= {minimum}"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ConfigError(f"{name} ({flag}) must be {accepted}, got {shown}")


def _check_choice(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


# ----------------------------------------------------------------------------------------------
# Budget split: pool + chains * depth == budget, exactly.


def resolve_split(method: str, budget: int, chains: int | None, depth: int | None,
                  pool: int | None) -> dict[str, int | None]:
    """Fill in chains / depth / pool for a method so that every image of the budget is accounted for.

    noise, zero-order: no split (chains, depth and pool must be unset).
    prompt: chains * depth == budget (no pool); chains defaults to 2 when it divides the budget.
    reflection: pool + chains * depth == budget; chains defaults to 2 (1 under a budget of 4);
    the pool defaults to what remains after the given depth, or else to the smallest size of at
    least max(chains, budget / 4) that leaves a multiple of chains for the corrections. The
    original runs 32 noise images and then 2 chains x 16 corrections (64 images); at a budget of
    32 the default here is pool 8 then 2 chains x 12 rounds.
    """
    for name, v in (("chains", chains), ("depth", depth), ("pool", pool)):
        if v is not None:
            _check_int(name, v, 0 if name == "depth" else 1)
    if method in ("noise", "zero-order"):
        given = [f"--{n} {v}" for n, v in (("chains", chains), ("depth", depth), ("pool", pool)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: the {method} method has no chains or pool; it spends "
                              f"--budget {budget} on noise samples (use --method prompt or reflection)")
        return {"chains": None, "depth": None, "pool": None}
    if method == "prompt":
        if pool is not None:
            raise ConfigError(f"--pool {pool}: the prompt method has no noise pool; it spends "
                              f"--budget = chains x depth")
        if chains is None and depth is None:
            chains = 2 if budget % 2 == 0 else 1
        if chains is None:
            chains = budget // max(depth, 1)
        if depth is None:
            depth = budget // chains
        if chains * depth != budget:
            raise ConfigError(f"prompt method: chains x depth must equal the budget: {chains} x {depth} = "
                              f"{chains * depth}, but --budget is {budget}")
        return {"chains": chains, "depth": depth, "pool": None}
    # reflection
    if chains is None:
        chains = 2 if budget >= 4 else 1
    if pool is None and depth is not None:
        pool = budget - chains * depth
        if pool < 1:
            raise ConfigError(f"reflection: chains x depth = {chains} x {depth} = {chains * depth} leaves "
                              f"no room for an initial pool (>= 1) in --budget {budget}")
    if pool is None:
        lo = max(chains, math.ceil(budget / 4))
        pool = next((p for p in range(lo, budget + 1) if (budget - p) % chains == 0), budget)
    if depth is None:
        if (budget - pool) % chains:
            raise ConfigError(f"reflection: budget - pool = {budget} - {pool} = {budget - pool} is not a "
                              f"multiple of --chains {chains}; pool + chains x depth must equal the budget")
        depth = (budget - pool) // chains
    if pool + chains * depth != budget:
        raise ConfigError(f"reflection: pool + chains x depth = {pool} + {chains} x {depth} = "
                          f"{pool + chains * depth}, but --budget is {budget}")
    if pool < 1:
        raise ConfigError(f"reflection: the initial pool must hold at least 1 image, got --pool {pool}")
    if depth > 0 and pool < chains:
        raise ConfigError(f"reflection: {chains} chains start from the best {chains} pool images, "
                          f"so --pool must be >= --chains, got pool {pool}")
    return {"chains": chains, "depth": depth, "pool": pool}


# ----------------------------------------------------------------------------------------------
# Files


def load_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping of RunConfig fields; unknown keys are an error that lists the known ones."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the config "
                              f"as .json") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # the parser's own message names the line
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                          f"{' '.join(str(e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of run settings, got {type(data).__name__}")
    check_keys(data, where=str(path))
    return data


def check_keys(data: dict, where: str = "config") -> None:
    known = [f.name for f in fields(RunConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(known)}")


def from_dict(data: dict, where: str = "config") -> RunConfig:
    check_keys(data, where)
    return RunConfig(**data)


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable 'key: old -> new' for every differing key."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
