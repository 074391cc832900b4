"""Backends: which prompts they accept and which components they use when none is named.

A backend is data plus a few functions, looked up by name in BACKENDS. A new backend (FLUX) is one
more entry: the module that registers its components (with a DEFAULTS dict), how it reads prompts
(None: free text, no metadata needed), and optionally its own `generate` flags
(`add_arguments(parser)`) turned into per-kind component options (`options_from_args(args,
environ)`, called by the CLI only: the one place that may read the environment). Everything here
is cheap: no weights load until `build_components`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .. import components as registry
from ..config import METHOD_COMPONENTS, ConfigError, RunConfig
from .executor import Components


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    module: str  # importing it registers the backend's components
    defaults_attr: str = "DEFAULTS"  # kind -> component name, in that module
    parse_prompt: Callable[[str], dict] | None = None  # one prompt string -> GenEval line (or raise)
    resolve_prompts: Callable[[str], list[dict]] | None = None  # --prompts argument -> GenEval lines
    add_arguments: Callable | None = None  # (argparse parser) -> None: the backend's own flags
    options_from_args: Callable | None = None  # (args, environ) -> {kind: {option: value}}

    def defaults(self) -> dict[str, str]:
        return dict(getattr(importlib.import_module(self.module), self.defaults_attr))


def _world_parse(text: str) -> dict:
    from ..world.spec import parse_prompt

    return parse_prompt(text)


def _world_prompts(arg: str) -> list[dict]:
    from ..world.data import resolve_prompts

    return resolve_prompts(arg)


BACKENDS: dict[str, Backend] = {
    "world": Backend(
        name="world",
        description="the embedded Shapes world (oracle components until the trained world models land)",
        module="reflectionflow.backends.world",
        parse_prompt=_world_parse,
        resolve_prompts=_world_prompts,
    ),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def resolve_components(config: RunConfig) -> RunConfig:
    """Fill in the backend's default component names and check every name against the registry."""
    backend = get_backend(config.backend)
    defaults = backend.defaults()
    filled = {}
    for kind in METHOD_COMPONENTS["reflection"]:
        name = getattr(config, kind) or defaults.get(kind)
        if name is not None:
            registry.check_name(kind, name)
        filled[kind] = name
    for kind in METHOD_COMPONENTS[config.method]:
        if filled[kind] is None:
            raise ConfigError(f"the {config.method} method needs a {kind}; backend {backend.name!r} has no "
                              f"default, name one with --{kind} (accepted: {', '.join(registry.names(kind))})")
    from dataclasses import replace

    return replace(config, **filled)


def component_names(config: RunConfig) -> dict[str, str]:
    """The components this run calls (the ones its method needs)."""
    return {kind: getattr(config, kind) for kind in METHOD_COMPONENTS[config.method]}


def build_components(config: RunConfig) -> Components:
    """Construct the method's components (this is where weights load)."""
    names = component_names(config)
    built = {kind: registry.build(kind, name, **config.options.get(kind, {})) for kind, name in names.items()}
    return Components(names=names, **built)
