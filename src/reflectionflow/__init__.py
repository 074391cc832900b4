"""reflectionflow: inference-time scaling for text-to-image diffusion (noise, prompt, reflection)."""

__version__ = "0.1.0"
