"""What a search method knows about the prompt it works on."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from ..config import RunConfig
from .candidates import Candidate, Make, NeedBudget, derive_seed

# A method is a generator: it yields a list of Make (or a NeedBudget), receives the Candidates
# (or the number of images granted), and returns notes for the prompt's done-marker.
Method = Callable[["PromptContext"], Generator[list[Make] | NeedBudget, list[Candidate] | int, dict]]


@dataclass
class PromptContext:
    index: int  # position in the prompt list: part of every seed
    prompt: str  # the ORIGINAL prompt: the verifier always scores against it
    metadata: dict | None  # GenEval line when known; methods must work without it
    config: RunConfig  # resolved (split filled in)
    noise_like: Callable[[int], np.ndarray | None]  # the generator's initial noise for a seed

    @property
    def budget(self) -> int:
        return self.config.budget

    def seed(self, chain: int, round: int, kind: str) -> int:
        return derive_seed(self.config.seed, self.index, chain, round, kind)
