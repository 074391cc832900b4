"""The real-scale backend's options: command-line flags, checks before any weights load, and the
components built from them.

    add_arguments(parser)                  the --flux-* / --lora-* / --vlm-* flags
    options = options_from_args(args, os.environ)   the only place the API key is read (from the
                                           variable --vlm-api-key-env names)
    plan = validate_options(options)       every check: folders, LoRA keys against the transformer's
                                           shapes (built on the meta device), local model folders,
                                           the endpoint's reachability, model and key; raises a
                                           ValueError subclass with a one-line message
    built = build_components(options, plan=plan)   {"generator": ..., "corrector": ..., ...}

`options.public()` is what config.json may record: everything but the key. The engine's hooks at
the end of this file (`settings_from_args`, `check_run`, `build_run`) keep the public part in
`RunConfig.backend_options` and hand the key around it, as `secrets`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ...components import KINDS, ComponentError
from ...flags import add_device, add_dtype
from ...runtime import is_int, is_number
from ..vlm.options import DEFAULT_KEY_ENV, VLMOptions, refuse_credentials
from . import DEFAULTS
from .loading import FluxFolder, FluxPathError, check_flux_folder, meta_transformer

if TYPE_CHECKING:  # lora.py imports torch: not on the command line's start-up path
    from .lora import LoRAFile

CHOICES: dict[str, tuple[str, ...]] = {
    "generator": ("flux",),
    "corrector": ("reflection", "kontext"),
    "verifier": ("vlm-yesno", "vlm-score", "local-yesno", "clip", "reward"),
    "reflector": ("vlm", "local"),
    "refiner": ("vlm",),
}
VLM_NAMES = frozenset({"vlm-yesno", "vlm-score", "vlm"})
DTYPES = ("auto", "bfloat16", "float16", "float32")
# The original's settings for FLUX.1-dev (docs/method.md, section 2); schnell is a 4-step model
# without guidance embedding, Kontext's model card uses guidance 2.5.
VARIANT_DEFAULTS = {
    "dev": dict(steps=30, guidance=3.5, max_sequence_length=512),
    "schnell": dict(steps=4, guidance=0.0, max_sequence_length=256),
    "kontext": dict(steps=28, guidance=2.5, max_sequence_length=512),
}


# What a step cache's threshold accepts (models/step_cache.py says the same; that module imports torch).
THRESHOLD_HELP = "a number >= 0 (0: off; FBCache's relative L1 change of the first block's residual)"


class FluxOptionsError(ComponentError):
    """A real-scale backend option that is missing or does not fit the others."""


@dataclass
class FluxBackendOptions:
    # Components (registry names); None means DEFAULTS.
    generator: str | None = None
    corrector: str | None = None
    verifier: str | None = None
    reflector: str | None = None
    refiner: str | None = None
    # FLUX
    flux_path: str | None = None
    kontext_path: str | None = None
    lora_path: str | None = None
    lora_alpha: float | None = None  # None: from the file, else alpha = rank (the released corrector: 32 / 32)
    height: int = 1024
    width: int = 1024
    steps: int | None = None  # None: 30 (dev), 4 (schnell)
    guidance: float | None = None  # None: 3.5 (dev); schnell ignores it
    corrector_steps: int | None = None  # None: --steps (the original ignored both for its corrector)
    corrector_guidance: float | None = None  # None: --guidance (2.5 for Kontext)
    condition_size: int = 512
    clip_text: str = "prompt"  # what CLIP sees in the corrector: "prompt" (as trained) or "full" (original script)
    kontext_include_prompt: bool = False
    max_sequence_length: int | None = None  # None: 512 (dev), 256 (schnell)
    batch_size: int = 4  # images per transformer call
    # Speed levers (docs/speed.md). Exact: compile_blocks. Changing the images: the other three.
    compile_blocks: bool = False  # regional torch.compile of the transformer blocks (about a minute at start-up)
    fp8: bool = False  # fp8 matmuls (models/fp8.py; Hopper or newer)
    corrector_strength: float = 1.0  # < 1: the corrector starts from the previous image partly noised
    corrector_cond_attention: str = "full"  # causal_kv: a corrector trained so; condition K/V computed once
    # Step caching (models/step_cache.py): > 0 skips every block but the first at the steps where an image's
    # first-block residual changed by at most this share since its last computed step. 0: off.
    cache_threshold: float = 0.0
    corrector_cache_threshold: float | None = None  # None: cache_threshold (the reflection corrector only)
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    # Local verifiers
    local_verifier_path: str | None = None
    clip_path: str | None = None
    verifier_path: str | None = None  # --verifier reward: a `reflectionflow train verifier` folder
    reflector_path: str | None = None  # --reflector local: a `reflectionflow train reflector` folder
    # The OpenAI-compatible endpoint (the key lives in vlm.api_key and is never recorded)
    vlm: VLMOptions = field(default_factory=VLMOptions)

    def name(self, kind: str) -> str:
        return getattr(self, kind) or DEFAULTS[kind]

    def public(self) -> dict:
        """Every option but the API key (what config.json may record)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "vlm"}
        d["vlm"] = self.vlm.public()
        return d


@dataclass
class FluxPlan:
    """What validation found, handed to build_components so nothing is read twice."""

    options: FluxBackendOptions  # with steps / guidance / lengths resolved
    kinds: tuple[str, ...]
    flux: FluxFolder | None = None
    kontext: FluxFolder | None = None
    lora: LoRAFile | None = None
    served_models: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, component_flags: bool = False) -> None:
    """Add the real-scale backend's flags. `component_flags` also adds --generator / --corrector /
    --verifier / --reflector / --refiner (leave False where the caller defines them itself).

    No flag has a parser default: None means "not given", so a config file's setting or the
    option's own default (FluxBackendOptions, VLMOptions) applies, and a flag given to another
    backend can be told apart."""
    if component_flags:
        g = parser.add_argument_group("components (real-scale backend)")
        for kind in ("generator", "corrector", "verifier", "reflector", "refiner"):
            g.add_argument(f"--{kind}", choices=CHOICES[kind], default=None,
                           help=f"default: {DEFAULTS[kind]}")
    f = parser.add_argument_group("FLUX (--backend flux)")
    f.add_argument("--flux-path", metavar="DIR|HUB_ID",
                   help="FLUX.1-dev or FLUX.1-schnell diffusers folder (or hub id)")
    f.add_argument("--kontext-path", metavar="DIR|HUB_ID", help="FLUX.1 Kontext folder, for --corrector kontext")
    f.add_argument("--lora-path", metavar="FILE|DIR",
                   help="reflection corrector LoRA: pytorch_lora_weights.safetensors (released or ours) or its folder")
    f.add_argument("--lora-alpha", type=float, help="LoRA alpha if the file does not record it (default: = rank)")
    f.add_argument("--height", type=int, help="image height in pixels (default 1024)")
    f.add_argument("--width", type=int, help="image width in pixels (default 1024)")
    f.add_argument("--steps", type=int, help="denoising steps (default 30 for dev, 4 for schnell)")
    f.add_argument("--guidance", type=float, help="embedded guidance scale (default 3.5; schnell has none)")
    f.add_argument("--corrector-steps", type=int, help="corrector steps (default: --steps)")
    f.add_argument("--corrector-guidance", type=float, help="corrector guidance (default: --guidance; Kontext 2.5)")
    f.add_argument("--condition-size", type=int, help="corrector condition image size in pixels (default 512)")
    f.add_argument("--clip-text", choices=("prompt", "full"),
                   help="CLIP text of the corrector: the refined prompt (default, as trained) or prompt + reflection")
    f.add_argument("--max-sequence-length", type=int, help="T5 tokens (default 512; 256 for schnell)")
    f.add_argument("--flux-batch-size", type=int, help="images per transformer call (default 4)")
    f.add_argument("--compile-blocks", action="store_const", const=True, default=None,
                   help="regional torch.compile of the transformer blocks (same images; ~1 min at start-up)")
    f.add_argument("--fp8", action="store_const", const=True, default=None,
                   help="fp8 matmuls (e4m3, row scales) on Hopper or newer GPUs (changes the images slightly)")
    f.add_argument("--corrector-strength", type=float,
                   help="in (0, 1]: the corrector starts from the previous image noised to this level and runs "
                   "that share of --corrector-steps (default 1: from pure noise, as trained)")
    f.add_argument("--corrector-cond-attention", choices=("full", "causal_kv"),
                   help="full (default; the released corrector) or causal_kv (a corrector trained with condition "
                   "tokens attending only to themselves: their keys/values are computed once per image)")
    f.add_argument("--cache-threshold", type=float, metavar="X",
                   help="step caching (first-block cache): a step skips every block but the first when the first "
                   "block's residual changed by at most X (relative L1) since the image's last computed step; "
                   "0 (default): off. Changes the images")
    f.add_argument("--corrector-cache-threshold", type=float, metavar="X",
                   help="the same for the reflection corrector (default: --cache-threshold)")
    add_device(f, default=None)
    add_dtype(f, default=None)
    v = parser.add_argument_group("VLM judges (OpenAI-compatible endpoint)")
    v.add_argument("--vlm-url", metavar="URL", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    v.add_argument("--vlm-model", metavar="NAME", help="e.g. gpt-4o or Qwen/Qwen2.5-VL-7B-Instruct")
    v.add_argument("--vlm-api-key-env", metavar="VAR",
                   help=f"environment variable holding the API key (default {DEFAULT_KEY_ENV}; "
                   "a variable named here must be set)")
    v.add_argument("--vlm-concurrency", type=int, help="calls in flight at once (default 8)")
    v.add_argument("--vlm-timeout", type=float, help="seconds per call before it is retried (default 60)")
    v.add_argument("--vlm-retries", type=int, help="retries on 429 / 5xx / timeouts (default 4)")
    v.add_argument("--vlm-reflector-style", choices=("instruct", "reflection-generator"),
                   help="instruct (default): GPT-4o / Qwen2.5-VL-Instruct; reflection-generator: the released "
                   "reflection model")
    loc = parser.add_argument_group("local verifiers")
    loc.add_argument("--local-verifier-path", metavar="DIR", help="transformers VLM folder for --verifier local-yesno")
    loc.add_argument("--clip-path", metavar="DIR", help="CLIP folder for --verifier clip")
    loc.add_argument("--verifier-path", metavar="DIR",
                     help="reward-model folder (`reflectionflow train verifier`) for --verifier reward")
    loc.add_argument("--reflector-path", metavar="DIR",
                     help="Qwen2.5-VL folder (`reflectionflow train reflector`) for --reflector local")


# Flags whose option has another name (the rest are FluxBackendOptions fields of the flag's name).
_RENAMED_FLAGS = {"flux_batch_size": "batch_size"}
_VLM_FLAGS = {"vlm_url": "url", "vlm_model": "model", "vlm_api_key_env": "api_key_env",
              "vlm_concurrency": "concurrency", "vlm_timeout": "timeout", "vlm_retries": "retries",
              "vlm_reflector_style": "reflector_style"}


def given_options(args: argparse.Namespace) -> dict:
    """The options the flags set (public form: no key), leaving out flags that were not given."""
    a = vars(args)
    plain = {f.name for f in fields(FluxBackendOptions)} - {"vlm", *_RENAMED_FLAGS.values()}
    out = {k: a[k] for k in plain if a.get(k) is not None}
    out |= {option: a[flag] for flag, option in _RENAMED_FLAGS.items() if a.get(flag) is not None}
    vlm = {option: a[flag] for flag, option in _VLM_FLAGS.items() if a.get(flag) is not None}
    if "api_key_env" in vlm:
        vlm["api_key_env_explicit"] = True  # the user named the variable: then it must be set
    if vlm:
        out["vlm"] = vlm
    return out


def options_from_args(args: argparse.Namespace, environ: Mapping[str, str],
                      base: Mapping | None = None) -> FluxBackendOptions:
    """Options from parsed flags over `base` (settings from a config file, in `public()` form); the
    API key comes from `environ` (the caller passes os.environ), from the variable the options name."""
    base = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (base or {}).items()}
    vlm_base = base.get("vlm")
    if isinstance(vlm_base, dict) and "api_key_env" in vlm_base:
        vlm_base.setdefault("api_key_env_explicit", True)  # a config file that names the variable
    given = given_options(args)
    merged = base | {k: v for k, v in given.items() if k != "vlm"}
    if "vlm" in given:
        merged["vlm"] = (vlm_base if isinstance(vlm_base, dict) else {}) | given["vlm"]
    opts = options_from_dict(merged, "flux backend")
    key = environ.get(opts.vlm.api_key_env) or None
    return replace(opts, vlm=replace(opts.vlm, api_key=key))


def options_from_dict(d: Mapping, who: str = "flux backend") -> FluxBackendOptions:
    """Options from a config's dict (no key: pass `vlm.api_key` separately)."""
    known = {f.name for f in fields(FluxBackendOptions)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise FluxOptionsError(f"{who}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    d = dict(d)
    vlm = d.pop("vlm", None) or {}
    if isinstance(vlm, VLMOptions):
        return FluxBackendOptions(**d, vlm=vlm)
    if not isinstance(vlm, Mapping):
        raise FluxOptionsError(f"{who}: vlm must be a mapping of endpoint settings, got {type(vlm).__name__}")
    # api_key: never accepted from a dict (a config file); the CLI reads it from the environment.
    vknown = {f.name for f in fields(VLMOptions)} - {"api_key"}
    vunknown = sorted(set(vlm) - vknown - {"api_key_set"})
    if vunknown:
        raise FluxOptionsError(f"{who}: unknown vlm option(s) {', '.join(vunknown)}; "
                               f"accepted: {', '.join(sorted(vknown))} (the API key comes from the environment "
                               f"variable api_key_env names)")
    return FluxBackendOptions(**d, vlm=VLMOptions(**{k: v for k, v in vlm.items() if k != "api_key_set"}))


# ----------------------------------------------------------------------------------------------
# Validation: everything before any weights load


def _int(name: str, value, minimum: int, multiple: int = 1) -> None:
    if not is_int(value, minimum) or value % multiple:
        extra = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise FluxOptionsError(f"--{name.replace('_', '-')} must be an integer >= {minimum}{extra}, got {value!r}")


def _float(name: str, value, minimum: float) -> None:
    if not is_number(value, minimum):
        raise FluxOptionsError(f"--{name.replace('_', '-')} must be a number >= {minimum}, got {value!r}")


def validate_options(options: FluxBackendOptions, kinds: Sequence[str] = KINDS,
                     check_endpoint: bool = True) -> FluxPlan:
    """Check every option the given component kinds need; return the resolved plan.

    Order: names and numbers, folders (JSON only), LoRA keys against the transformer's shapes
    (meta device), local model folders, then the endpoint (one GET /models). Raises a ValueError
    subclass with a one-line message naming the flag.
    """
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise FluxOptionsError(f"unknown component kind {kind!r}; accepted: {', '.join(KINDS)}")
        name = options.name(kind)
        if name not in CHOICES[kind]:
            raise FluxOptionsError(f"{kind} {name!r} is not a flux-backend component; accepted: "
                                   f"{', '.join(CHOICES[kind])}")
    names = {k: options.name(k) for k in kinds}
    _int("height", options.height, 2)
    _int("width", options.width, 2)
    _int("condition_size", options.condition_size, 2)
    _int("flux_batch_size", options.batch_size, 1)
    for name in ("steps", "corrector_steps", "max_sequence_length"):
        if getattr(options, name) is not None:
            _int(name, getattr(options, name), 1)
    for name in ("guidance", "corrector_guidance", "lora_alpha"):
        if getattr(options, name) is not None:
            _float(name, getattr(options, name), 0.0)
    if options.max_sequence_length is not None and options.max_sequence_length > 512:
        raise FluxOptionsError("--max-sequence-length must be <= 512 (FLUX's T5 limit), "
                               f"got {options.max_sequence_length}")
    if options.dtype not in DTYPES:
        raise FluxOptionsError(f"--dtype {options.dtype!r}; accepted: {', '.join(DTYPES)}")
    if options.clip_text not in ("prompt", "full"):
        raise FluxOptionsError(f"--clip-text {options.clip_text!r}; accepted: prompt, full")
    strength = options.corrector_strength
    if not is_number(strength, maximum=1.0, above=0.0):
        raise FluxOptionsError(f"--corrector-strength must be a number in (0, 1], got {strength!r}")
    if options.corrector_cond_attention not in ("full", "causal_kv"):
        raise FluxOptionsError(f"--corrector-cond-attention {options.corrector_cond_attention!r}; "
                               "accepted: full, causal_kv")
    for name in ("cache_threshold", "corrector_cache_threshold"):
        value = getattr(options, name)
        if (value is not None or name == "cache_threshold") and not is_number(value, 0.0):
            raise FluxOptionsError(f"--{name.replace('_', '-')} must be {THRESHOLD_HELP}, got {value!r}")
    if names.get("corrector") == "kontext" and options.corrector_cache_threshold:
        raise FluxOptionsError("--corrector-cache-threshold: the kontext corrector runs diffusers' pipeline "
                               "unchanged, without a step cache; drop it (or use --corrector reflection)")
    for name in ("compile_blocks", "fp8"):
        if not isinstance(getattr(options, name), bool):
            raise FluxOptionsError(f"--{name.replace('_', '-')} is a switch (true or false), "
                                   f"got {getattr(options, name)!r}")
    if options.fp8:
        from .transformer import fp8_available

        why = fp8_available()
        if why is not None:
            raise FluxOptionsError(f"--fp8: {why}; drop --fp8 here")

    plan = FluxPlan(options=options, kinds=kinds)
    corrector = names.get("corrector")
    needs_flux = "generator" in names or corrector == "reflection"
    if needs_flux:
        if not options.flux_path:
            raise FluxOptionsError("the flux backend needs --flux-path (a FLUX.1-dev or FLUX.1-schnell diffusers "
                                   "folder, or a hub id such as black-forest-labs/FLUX.1-dev)")
        plan.flux = check_flux_folder(options.flux_path, "flux", "--flux-path")
    if corrector == "kontext":
        if not options.kontext_path:
            raise FluxOptionsError("--corrector kontext needs --kontext-path (a FLUX.1 Kontext diffusers folder, "
                                   "e.g. black-forest-labs/FLUX.1-Kontext-dev)")
        plan.kontext = check_flux_folder(options.kontext_path, "kontext", "--kontext-path")
    for folder, flag in ((plan.flux, "--height/--width"), (plan.kontext, "--height/--width")):
        if folder is not None:
            mult = folder.vae_scale_factor * 2
            if options.height % mult or options.width % mult:
                raise FluxOptionsError(f"{flag} must be multiples of {mult} for {folder.path}, "
                                       f"got {options.height}x{options.width}")
            if corrector == "reflection" and folder is plan.flux and options.condition_size % mult:
                raise FluxOptionsError(f"--condition-size must be a multiple of {mult}, got {options.condition_size}")
    if corrector == "reflection":
        from .lora import check_lora_fits, linear_shapes, read_lora_file

        if not options.lora_path:
            raise FluxOptionsError("--corrector reflection needs --lora-path (the FLUX-Corrector LoRA: "
                                   "pytorch_lora_weights.safetensors or its folder)")
        plan.lora = read_lora_file(options.lora_path, alpha=options.lora_alpha)
        check_lora_fits(plan.lora, linear_shapes(meta_transformer(plan.flux)),
                        where=f"the transformer at {plan.flux.path}")
    verifier = names.get("verifier")
    if verifier == "local-yesno":
        from ..vlm.local import check_model_folder

        if not options.local_verifier_path:
            raise FluxOptionsError("--verifier local-yesno needs --local-verifier-path (a transformers VLM folder)")
        check_model_folder(options.local_verifier_path, "--local-verifier-path")
    if verifier == "clip":
        from ..vlm.local import check_model_folder

        if not options.clip_path:
            raise FluxOptionsError("--verifier clip needs --clip-path (a CLIP model folder)")
        check_model_folder(options.clip_path, "--clip-path", accepted=("clip",))
    if verifier == "reward":
        from ...models.qwen_vl import check_reward_folder

        if not options.verifier_path:
            raise FluxOptionsError("--verifier reward needs --verifier-path (a `reflectionflow train verifier` folder)")
        check_reward_folder(options.verifier_path, "--verifier-path")
    if names.get("reflector") == "local":
        from ...models.qwen_vl import check_qwen_folder

        if not options.reflector_path:
            raise FluxOptionsError("--reflector local needs --reflector-path (a `reflectionflow train reflector` "
                                   "folder)")
        check_qwen_folder(options.reflector_path, "--reflector-path")
    if VLM_NAMES & set(names.values()):
        options.vlm.check_values()
        if check_endpoint:
            plan.served_models = options.vlm.preflight()

    plan.options = _resolved(options, plan)
    return plan


def _resolved(options: FluxBackendOptions, plan: FluxPlan) -> FluxBackendOptions:
    variant = plan.flux.variant if plan.flux is not None else "dev"
    base = VARIANT_DEFAULTS[variant]
    steps = options.steps or base["steps"]
    guidance = options.guidance if options.guidance is not None else base["guidance"]
    corrector_guidance = options.corrector_guidance
    if corrector_guidance is None:
        kontext = options.name("corrector") == "kontext"
        corrector_guidance = VARIANT_DEFAULTS["kontext"]["guidance"] if kontext else guidance
    corrector_cache = options.corrector_cache_threshold
    if corrector_cache is None:
        corrector_cache = options.cache_threshold if options.name("corrector") == "reflection" else 0.0
    return replace(options, steps=steps, guidance=guidance, corrector_steps=options.corrector_steps or steps,
                   corrector_guidance=corrector_guidance, corrector_cache_threshold=float(corrector_cache),
                   cache_threshold=float(options.cache_threshold),
                   max_sequence_length=options.max_sequence_length or base["max_sequence_length"])


# ----------------------------------------------------------------------------------------------
# Building


def build_components(options: FluxBackendOptions, kinds: Sequence[str] = KINDS, plan: FluxPlan | None = None,
                     check_endpoint: bool = True) -> dict:
    """The components of the given kinds, sharing one FLUX load: {kind: component}.

    Validates first unless given the plan `validate_options` returned.
    """
    from .components import FluxGenerator, FluxModels, KontextCorrector, ReflectionCorrector, SamplingSettings

    plan = plan or validate_options(options, kinds, check_endpoint=check_endpoint)
    o = plan.options
    names = {k: o.name(k) for k in plan.kinds}
    built: dict = {}
    models = None
    if plan.flux is not None or plan.kontext is not None:
        models = FluxModels.shared(plan.flux or plan.kontext, device=o.device, dtype=o.dtype, kontext=plan.kontext)
        models.compile_blocks, models.fp8 = o.compile_blocks, o.fp8
    gen = SamplingSettings(height=o.height, width=o.width, steps=o.steps, guidance=o.guidance,
                           max_sequence_length=o.max_sequence_length, batch_size=o.batch_size,
                           cache_threshold=o.cache_threshold)
    cor = replace(gen, steps=o.corrector_steps, guidance=o.corrector_guidance,
                  cache_threshold=o.corrector_cache_threshold or 0.0)
    if "generator" in names:
        built["generator"] = FluxGenerator(models, gen)
    if names.get("corrector") == "reflection":
        built["corrector"] = ReflectionCorrector(models, cor, plan.lora, condition_size=o.condition_size,
                                                 clip_text=o.clip_text, strength=float(o.corrector_strength),
                                                 cond_attention=o.corrector_cond_attention)
    elif names.get("corrector") == "kontext":
        built["corrector"] = KontextCorrector(models, cor, include_prompt=o.kontext_include_prompt)
    if any(n in VLM_NAMES for n in names.values()):
        from ..vlm.judges import VLMRefiner, VLMReflector, VLMScoreVerifier, VLMYesNoVerifier

        client = o.vlm.client()  # one client: one concurrency bound and one set of counters for all
        vlm_built = {"vlm-yesno": lambda: VLMYesNoVerifier(client), "vlm-score": lambda: VLMScoreVerifier(client)}
        if names.get("verifier") in vlm_built:
            built["verifier"] = vlm_built[names["verifier"]]()
        if names.get("reflector") == "vlm":
            built["reflector"] = VLMReflector(client, style=o.vlm.reflector_style)
        if names.get("refiner") == "vlm":
            built["refiner"] = VLMRefiner(client, with_image=o.vlm.refine_with_image)
    if names.get("verifier") == "local-yesno":
        from ..vlm.local import LocalYesNoVerifier

        built["verifier"] = LocalYesNoVerifier(o.local_verifier_path, device=o.device, dtype=o.dtype)
    elif names.get("verifier") == "clip":
        from ..vlm.local import CLIPScoreVerifier

        built["verifier"] = CLIPScoreVerifier(o.clip_path, device=o.device, dtype=o.dtype)
    elif names.get("verifier") == "reward":
        from ..vlm.reward import RewardVerifier

        built["verifier"] = RewardVerifier(o.verifier_path, device=o.device, dtype=o.dtype)
    if names.get("reflector") == "local":
        from ..vlm.reward import LocalReflector

        built["reflector"] = LocalReflector(o.reflector_path, device=o.device, dtype=o.dtype)
    return built


# ----------------------------------------------------------------------------------------------
# The engine's hooks (engine/backends.py): RunConfig.backend_options holds `settings_of(options)`,
# public; the API key travels beside it in `secrets`, which no file, ledger or report ever sees.

SECRET_API_KEY = "vlm_api_key"  # the one secret: the VLM endpoint's key


# Recorded only when they are on: off is the behaviour before they existed, so run folders made then
# still resume (their config.json has no such key).
_RECORDED_WHEN_ON = ("cache_threshold", "corrector_cache_threshold")


def settings_of(options: FluxBackendOptions) -> dict:
    """What RunConfig.backend_options records: `public()` without the component names (RunConfig
    holds those), and without the step cache's thresholds when they are off."""
    return {k: v for k, v in options.public().items()
            if k not in KINDS and not (k in _RECORDED_WHEN_ON and not v)}


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str],
                       base: Mapping | None = None) -> tuple[dict, dict[str, str]]:
    """(settings, secrets) from the flags over a config file's `backend_options` (`base`); the key
    is read from `environ`, from the variable the settings name, on every run and every resume."""
    options = options_from_args(args, environ, base)
    refuse_credentials(options.vlm.url)  # settings_of would drop them silently
    secrets = {SECRET_API_KEY: options.vlm.api_key} if options.vlm.api_key else {}
    return settings_of(options), secrets


def check_run(settings: Mapping, names: Mapping[str, str], secrets: Mapping[str, str]) -> tuple[dict, FluxPlan]:
    """Every check `validate_options` makes, for the run's components (`names`: kind -> registry
    name); returns the settings with steps / guidance / lengths resolved, and the plan to build from."""
    options = options_from_dict(settings, "backend_options")
    options = replace(options, **({k: None for k in KINDS} | dict(names)))
    options = replace(options, vlm=replace(options.vlm, api_key=secrets.get(SECRET_API_KEY) or None))
    plan = validate_options(options, kinds=tuple(names))
    return settings_of(_absolute_paths(plan.options)), plan


_PATH_OPTIONS = ("flux_path", "kontext_path", "lora_path", "local_verifier_path", "clip_path", "verifier_path",
                 "reflector_path")


def _absolute_paths(options: FluxBackendOptions) -> FluxBackendOptions:
    """Local paths made absolute, so a resume from another working folder is the same run; hub ids
    stay as they are."""
    fixed = {}
    for name in _PATH_OPTIONS:
        value = getattr(options, name)
        if value and Path(value).expanduser().exists():
            fixed[name] = str(Path(value).expanduser().resolve())
    return replace(options, **fixed)


def build_run(plan: FluxPlan) -> dict:
    """The run's components from the plan `check_run` returned (this is where weights load)."""
    return build_components(plan.options, plan.kinds, plan=plan)


__all__ = [
    "DEFAULTS", "FluxBackendOptions", "FluxOptionsError", "FluxPathError", "FluxPlan", "add_arguments",
    "build_components", "build_run", "check_run", "options_from_args", "options_from_dict", "settings_from_args",
    "settings_of", "validate_options",
]
