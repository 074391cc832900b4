"""reflectionflow: inference-time scaling for text-to-image diffusion (noise, prompt, reflection).

The Python API is `ReflectionFlowPipeline` (reflectionflow.pipeline, docs/api.md):

    from reflectionflow import ReflectionFlowPipeline
    pipe = ReflectionFlowPipeline.from_pretrained("world")
    out = pipe("a photo of a red circle and a blue square", budget=8)
"""

import os as _os

# MKL (PyTorch's CPU GEMMs on x86) in its reproducible mode (CNR), set before its first call:
# outside it MKL does not promise the same bits from one call to the next (they may depend on
# memory alignment and on how many threads it picks at run time), so the same request could give
# another image. "AUTO" keeps MKL's own code path for the processor; "STRICT" makes its GEMMs'
# bits independent of its thread count. A user's own MKL_CBWR wins. docs/backends.md, "Batch
# invariance".
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .version import __version__  # noqa: E402

_API = ("ArgumentError", "Ledger", "PipelineOutput", "ReflectionFlowPipeline", "StageCost", "TraceEntry")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # The API imports on first use, so the command line starts without it.
    if name in _API:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'reflectionflow' has no attribute {name!r}")
