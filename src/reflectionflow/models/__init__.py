"""The world's neural models: the FLUX-style MMDiT, its text encoder, rectified flow and LoRA."""

from .flow import FlowLoss, PathSample, RectifiedFlow, SampleResult, euler, path_sample, time_grid
from .mmdit import SIZES, CondCache, MMDiT, MMDiTConfig, count_parameters
from .text import TextEncoder, TextFeatures, Tokenizer

__all__ = [
    "SIZES", "CondCache", "FlowLoss", "MMDiT", "MMDiTConfig", "PathSample", "RectifiedFlow", "SampleResult",
    "TextEncoder", "TextFeatures", "Tokenizer", "count_parameters", "euler", "path_sample", "time_grid",
]
