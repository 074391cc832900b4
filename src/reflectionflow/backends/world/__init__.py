"""The world backend's components, registered by name (components.py imports this package).

Defaults: the trained MMDiT generator and reflection-tuned corrector (`mmdit.py`), the learned
verifier and reflector (`learned.py`; all weights in weights/) and the rule refiner. The oracle
verifier and reflector (the exact evaluator and the detector: the paper's "oracle verifier" upper
bound) stay available by name: `--verifier world-oracle --reflector world-oracle`. The renderer-backed stand-ins
`world-render` and `world-edit` make every path of the engine run on a CPU in milliseconds.
"""

from __future__ import annotations

from ...components import register
from .options import NoOptions, build_options
from .oracle import OracleReflector, OracleVerifier
from .refine import RuleRefiner
from .simulated import EditCorrector, RenderGenerator

# What `--backend world` uses when no component name is given.
DEFAULTS: dict[str, str] = {
    "generator": "world-mmdit",
    "verifier": "world-learned",
    "reflector": "world-learned",
    "refiner": "world-rule",
    "corrector": "world-mmdit",
}


def _plain(cls, who: str):
    def factory(**options):
        build_options(NoOptions, options, who)
        return cls()

    return factory


register("generator", "world-render", "renderer-backed world generator with configurable flaws (oracle stand-in)")(
    RenderGenerator)
register("corrector", "world-edit", "applies the reflection's commands to the detected scene (oracle stand-in)")(
    EditCorrector)
register("verifier", "world-oracle", "the exact GenEval-Shapes evaluator as verifier (oracle upper bound)")(
    _plain(OracleVerifier, "verifier world-oracle"))
register("reflector", "world-oracle", "edit commands from the detector versus the prompt (oracle)")(
    _plain(OracleReflector, "reflector world-oracle"))
register("refiner", "world-rule", "restates a world prompt explicitly, stressing what the reflection fixes")(
    _plain(RuleRefiner, "refiner world-rule"))

# Registering: generator world-mmdit, correctors world-mmdit, world-mmdit-kv, world-mmdit-partial and
# world-mmdit-kv-partial; verifier and reflector world-learned.
from . import learned, mmdit  # noqa: E402,F401
