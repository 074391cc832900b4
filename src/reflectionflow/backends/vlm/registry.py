"""Registry entries of the VLM components. Factories take the options a config names (checked, with
the accepted keys in the error) and import transformers only when a local model is built."""

from __future__ import annotations

from ...components import register
from .client import VLMError
from .options import vlm_options


def _local_kwargs(options: dict, who: str, accepted=("path", "device", "dtype", "batch_size")) -> dict:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise VLMError(f"{who}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    if not options.get("path"):
        raise VLMError(f"{who}: needs the option path (a local transformers model folder)")
    return options


@register("verifier", "vlm-score", "0-10 JSON scores from an OpenAI-compatible VLM (GPT-4o, vLLM)")
def vlm_score(**options):
    from .judges import VLMScoreVerifier

    return VLMScoreVerifier(vlm_options(options, "verifier vlm-score").client())


@register("verifier", "vlm-yesno", "P(yes) from an OpenAI-compatible VLM's token log-probabilities")
def vlm_yesno(**options):
    from .judges import VLMYesNoVerifier

    return VLMYesNoVerifier(vlm_options(options, "verifier vlm-yesno").client())


@register("reflector", "vlm", "edit commands from an OpenAI-compatible VLM (or the released reflection model)")
def vlm_reflector(**options):
    from .judges import VLMReflector

    opts = vlm_options(options, "reflector vlm")
    return VLMReflector(opts.client(), style=opts.reflector_style)


@register("refiner", "vlm", "prompt refinement by an OpenAI-compatible VLM")
def vlm_refiner(**options):
    from .judges import VLMRefiner

    opts = vlm_options(options, "refiner vlm")
    return VLMRefiner(opts.client(), with_image=opts.refine_with_image)


@register("verifier", "local-yesno", "a local transformers VLM asked yes/no; NVILA-style ranking")
def local_yesno(**options):
    from .local import LocalYesNoVerifier

    return LocalYesNoVerifier(**_local_kwargs(options, "verifier local-yesno"))


@register("verifier", "clip", "CLIPScore from a local CLIP model")
def clip_score(**options):
    from .local import CLIPScoreVerifier

    return CLIPScoreVerifier(**_local_kwargs(options, "verifier clip"))


@register("verifier", "reward", "a Qwen2.5-VL reward model from `reflectionflow train verifier` (normalised score)")
def reward(**options):
    from .reward import RewardVerifier

    return RewardVerifier(**_local_kwargs(options, "verifier reward"))


@register("reflector", "local", "edit commands from a local Qwen2.5-VL (`reflectionflow train reflector` output)")
def local_reflector(**options):
    from .reward import LocalReflector

    accepted = ("path", "device", "dtype", "batch_size", "max_new_tokens", "style")
    return LocalReflector(**_local_kwargs(options, "reflector local", accepted))
