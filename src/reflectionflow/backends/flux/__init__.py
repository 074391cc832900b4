"""The real-scale FLUX backend: FLUX.1-dev / schnell through diffusers, the reflection-tuned corrector
(OminiControl layout, released LoRA format) and FLUX.1 Kontext as a training-free corrector.

Importing this package registers the components; diffusers loads only when one is built.
Flags, checks and building: `options.py`. Install: `pip install reflectionflow[flux]`.
"""

from __future__ import annotations

from ...components import register
from .. import vlm  # noqa: F401  (the flux backend's default judges are the VLM ones)

# What --backend flux uses when no component name is given.
DEFAULTS: dict[str, str] = {
    "generator": "flux",
    "corrector": "reflection",
    "verifier": "vlm-yesno",
    "reflector": "vlm",
    "refiner": "vlm",
}


def _factory(kind: str, name: str):
    def factory(**options):
        from .options import build_components, options_from_dict

        opts = options_from_dict({**options, kind: name}, f"{kind} {name}")
        return build_components(opts, kinds=(kind,))[kind]

    return factory


register("generator", "flux", "FLUX.1-dev / FLUX.1-schnell through diffusers (noise via latents=)")(
    _factory("generator", "flux"))
register("corrector", "reflection", "reflection-tuned FLUX corrector: OminiControl condition tokens + LoRA")(
    _factory("corrector", "reflection"))
register("corrector", "kontext", "FLUX.1 Kontext as a training-free corrector (the reflection is the edit)")(
    _factory("corrector", "kontext"))
