"""Backends: which prompts they accept and which components they use when none is named.

A backend is data plus a few functions, looked up by name in BACKENDS. A new backend is one more
entry: the module that registers its components (with a DEFAULTS dict), how it reads prompts
(None: free text, no metadata needed), and optionally its own `generate` flags
(`add_arguments(parser)`) turned into per-kind component options (`options_from_args(args,
environ)`, called by the CLI only: the one place that may read the environment).

A backend whose components share one set of settings (flux: one FLUX load, one VLM endpoint)
instead turns its flags into `RunConfig.backend_options`, which config.json records, and a
`secrets` mapping (the API key), which is no part of any RunConfig: the CLI reads it from the
environment on every run and every `--resume`, and only the backend's `check` and `build` see it.
So a key never reaches config.json, the ledger, the trace, report.html or an error message.

Everything here is cheap: no weights load until `build_components`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

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
    # Shared settings (see the module's docstring); all three or none.
    settings_from_args: Callable | None = None  # (args, environ, config file's settings) -> (settings, secrets)
    check: Callable | None = None  # (settings, {kind: name}, secrets) -> (resolved settings, plan); no weights
    build: Callable | None = None  # (plan) -> {kind: component}: where weights load

    def defaults(self) -> dict[str, str]:
        return dict(getattr(importlib.import_module(self.module), self.defaults_attr))


def _world_parse(text: str) -> dict:
    from ..world.spec import parse_prompt

    return parse_prompt(text)


def _world_prompts(arg: str) -> list[dict]:
    from ..world.data import resolve_prompts

    return resolve_prompts(arg)


def _any_prompts(arg: str) -> list[dict]:
    """GenEval lines with any classes (`geneval`: GenEval's own 553 prompts), or any file of them."""
    from ..world.data import resolve_prompts

    return resolve_prompts(arg, world_only=False)


def _flux(hook: str) -> Callable:
    # The flux module imports only on use: `generate --help` and world runs never load it.
    def call(*args):
        from ..backends.flux import options

        return getattr(options, hook)(*args)

    return call


def _flux_arguments(parser) -> None:
    from ..backends.flux.options import add_arguments

    add_arguments(parser)


BACKENDS: dict[str, Backend] = {
    "world": Backend(
        name="world",
        description="the embedded Shapes world (trained MMDiT generator and corrector, oracle judges)",
        module="reflectionflow.backends.world",
        parse_prompt=_world_parse,
        resolve_prompts=_world_prompts,
    ),
    "flux": Backend(
        name="flux",
        description="FLUX.1 through diffusers, the reflection-tuned corrector or Kontext, VLM judges behind an "
        "OpenAI-compatible endpoint (GPT-4o, vLLM)",
        module="reflectionflow.backends.flux",
        parse_prompt=None,  # free text: any prompt, no metadata needed
        resolve_prompts=_any_prompts,
        add_arguments=_flux_arguments,
        settings_from_args=_flux("settings_from_args"),
        check=_flux("check_run"),
        build=_flux("build_run"),
    ),
}


def get_backend(name: str) -> Backend:
    if not isinstance(name, str) or name not in BACKENDS:
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
    return replace(config, **filled)


def component_names(config: RunConfig) -> dict[str, str]:
    """The components this run calls (the ones its method needs)."""
    return {kind: getattr(config, kind) for kind in METHOD_COMPONENTS[config.method]}


def check_backend(config: RunConfig, secrets: Mapping[str, str] | None = None) -> tuple[RunConfig, object]:
    """The backend's own checks of a resolved config (folders, LoRA keys, the endpoint and its key),
    before any weights load. Returns the config with the backend's settings resolved, and the plan
    `build_components` takes (None for backends without shared settings)."""
    backend = get_backend(config.backend)
    if backend.check is None:
        if config.backend_options:
            raise ConfigError(f"backend {backend.name!r} has no backend_options (got "
                              f"{', '.join(map(str, config.backend_options))}); per-component settings go in options")
        return config, None
    if config.options:
        raise ConfigError(f"backend {backend.name!r} takes its settings from its flags or backend_options, not "
                          f"per-component options (got options for {', '.join(config.options)})")
    settings, plan = backend.check(config.backend_options, component_names(config), secrets or {})
    return replace(config, backend_options=settings), plan


def build_components(config: RunConfig, secrets: Mapping[str, str] | None = None, plan: object = None) -> Components:
    """Construct the method's components (this is where weights load). `plan`: what `check_backend`
    returned (checked again when not given)."""
    names = component_names(config)
    backend = get_backend(config.backend)
    if backend.build is not None:
        if plan is None:
            config, plan = check_backend(config, secrets)
        built = backend.build(plan)
    else:
        built = {kind: registry.build(kind, name, **config.options.get(kind, {})) for kind, name in names.items()}
    return Components(names=names, **built)
