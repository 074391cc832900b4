"""Step caching for a sampler: a first-block cache (ParaAttention's FBCache, diffusers' FirstBlockCache).

At every sampling step the transformer's first block runs. Its output residual (output minus
input, image stream) is compared with the one of the last step whose remaining blocks ran:

    change = mean |r1 - r1_ref| / mean |r1_ref|

When the change is at most `threshold` the remaining blocks are skipped and their residual of that
step (the last block's image output minus the first block's) is added to this step's first-block
output instead; otherwise they run and both residuals are kept as the new reference. The
reference is only replaced on a computed step, so small changes add up until they pass the
threshold (FBCache's rule). The first step always computes.

The decision is per image, not per batch. A classifier-free-guided batch holds each image twice
(its text row and its unconditional row); both rows count in the image's change and are computed
or served from the cache together, so the guidance never mixes a fresh branch with a stale one.
And an image's steps then depend on that image alone, never on what it is batched with: on the CPU
every row's sums are reduced on their own (models/batching.py), so the decisions, and with them the
images, are the same for any batch size and order.

The class holds the state of one sampling run (one batch of images over its steps); it knows
nothing about the model. The sampler asks `compute(r1)` which rows must run the remaining blocks,
runs them on those rows, and hands back their residuals with `store`; `served(rows)` gives the
cached rows' residuals. Counts per image: `cached_steps` (steps served from the cache).
"""

from __future__ import annotations

import math

import torch

THRESHOLD_HELP = "a number >= 0 (0: off; FBCache's relative L1 change of the first block's residual)"


def check_threshold(value, who: str = "cache_threshold") -> float:
    """The threshold as a float, or a one-line ValueError naming `who` and what is accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{who} must be {THRESHOLD_HELP}, got {value!r}")
    return float(value)


def row_abs_sums(x: torch.Tensor) -> torch.Tensor:
    """(R, ...) -> (R,) float64 sums of |x| per row. On the CPU each row is reduced on its own, in fresh
    memory, so a row's sum does not depend on how many rows the batch has (batch invariance)."""
    if x.device.type == "cpu":
        return torch.stack([x[i].clone().abs().sum(dtype=torch.float64) for i in range(x.shape[0])])
    return x.flatten(1).abs().sum(1, dtype=torch.float64)


class StepCache:
    """First-block cache state of one sampling run over `images` images in `rows` batch rows; row r
    belongs to image r % images (a guided batch: [text rows; unconditional rows])."""

    def __init__(self, threshold: float, images: int, rows: int | None = None):
        self.threshold = check_threshold(threshold)
        if self.threshold == 0:
            raise ValueError("a StepCache with threshold 0 caches nothing: sample without one")
        self.images = int(images)
        self.rows = int(rows if rows is not None else images)
        if self.images < 1 or self.rows % self.images:
            raise ValueError(f"rows ({self.rows}) must be a multiple of images ({self.images})")
        self.first_ref: torch.Tensor | None = None  # (R, ...) first block's residual at the last computed step
        self.rest: torch.Tensor | None = None  # (R, ...) the remaining blocks' residual at that step
        self.cached_steps = torch.zeros(self.images, dtype=torch.long)  # per image: steps served from the cache
        self.steps = 0

    @property
    def rows_per_image(self) -> int:
        return self.rows // self.images

    def image_of_rows(self, device=None) -> torch.Tensor:
        return torch.arange(self.rows, device=device) % self.images

    def change(self, first: torch.Tensor) -> torch.Tensor:
        """(images,) float64: each image's relative L1 change of the first block's residual against its
        reference (inf where there is none yet or it is zero)."""
        if self.first_ref is None:
            return torch.full((self.images,), math.inf, dtype=torch.float64)
        num = row_abs_sums(first - self.first_ref.to(first.dtype)).cpu()
        den = row_abs_sums(self.first_ref).cpu()
        img = self.image_of_rows()
        num = torch.zeros(self.images, dtype=torch.float64).index_add_(0, img, num)
        den = torch.zeros(self.images, dtype=torch.float64).index_add_(0, img, den)
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, math.inf))

    def compute(self, first: torch.Tensor) -> torch.Tensor:
        """(R,) bool on first's device: the rows whose remaining blocks must run at this step. Counts the
        images served from the cache."""
        if first.shape[0] != self.rows:
            raise ValueError(f"the step cache holds {self.rows} rows, got a batch of {first.shape[0]}")
        self.steps += 1
        run = self.change(first) > self.threshold  # (images,)
        self.cached_steps += (~run).long()
        return run.repeat(self.rows_per_image).to(first.device)

    def store(self, rows: torch.Tensor, first: torch.Tensor, rest: torch.Tensor) -> None:
        """Rows (indices) that ran every block: their first-block residual and the remaining blocks' residual
        become the reference."""
        if self.first_ref is None:
            if rows.numel() != self.rows:
                raise ValueError("the first step must compute every row")
            self.first_ref, self.rest = first.clone(), rest.clone()
            return
        self.first_ref[rows] = first.to(self.first_ref.dtype)
        self.rest[rows] = rest.to(self.rest.dtype)

    def served(self, rows: torch.Tensor) -> torch.Tensor:
        """The cached residual of the remaining blocks for these rows (indices)."""
        return self.rest[rows]

    def cached_passes(self) -> list[int]:
        """Per image: transformer passes served from the cache (steps x rows per image)."""
        return [int(n) * self.rows_per_image for n in self.cached_steps]
