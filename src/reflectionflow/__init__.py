"""reflectionflow: inference-time scaling for text-to-image diffusion (noise, prompt, reflection).

The Python API is `ReflectionFlowPipeline` (reflectionflow.pipeline, docs/api.md):

    from reflectionflow import ReflectionFlowPipeline
    pipe = ReflectionFlowPipeline.from_pretrained("world")
    out = pipe("a photo of a red circle and a blue square", budget=8)
"""

from .version import __version__

_API = ("ArgumentError", "Ledger", "PipelineOutput", "ReflectionFlowPipeline", "StageCost", "TraceEntry")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # The API imports on first use, so the command line starts without it.
    if name in _API:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'reflectionflow' has no attribute {name!r}")
