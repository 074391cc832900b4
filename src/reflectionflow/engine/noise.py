"""The noise axis: best-of-N random search and Flux-TTS zero-order search.

Both spend exactly `budget` images. Noise sample k uses the seed of (chain k, round 0, "noise"),
the same seed as pool image k of the reflection method and round 0 of prompt chain k, so methods
compared at equal budget start from the same noises.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from .candidates import Candidate, Make, NeedBudget, best, rank_key
from .context import PromptContext


def noise_id(k: int) -> str:
    return f"n{k:04d}"


def make_noise(ctx: PromptContext, k: int) -> Make:
    return Make(id=noise_id(k), kind="noise", chain=k, round=0, seed=ctx.seed(k, 0, "noise"), prompt=ctx.prompt)


def random_search(ctx: PromptContext) -> Generator[list[Make] | NeedBudget, list[Candidate] | int, dict]:
    """Best-of-N: N = budget independent noises, all in one batch; the verifier keeps the best."""
    yield [make_noise(ctx, k) for k in range(ctx.budget)]
    return {}


def neighbours(x: np.ndarray, threshold: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points with the norm of x at cosine `threshold` to it (Flux-TTS's zero-order neighbours).

    Each is threshold * x_hat + sqrt(1 - threshold^2) * w, scaled by |x|, with w a random unit
    direction orthogonal to x. Returns (n, *x.shape), float64.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    norm = float(np.sqrt(np.sum(flat * flat)))
    if norm == 0.0:
        raise ValueError("zero-order search needs a non-zero pivot noise")
    u = flat / norm
    v = rng.standard_normal((n, flat.size))  # (n, D)
    v -= (v @ u)[:, None] * u[None, :]  # project out the pivot direction
    w = v / np.sqrt(np.sum(v * v, axis=1, keepdims=True))
    out = norm * (threshold * u[None, :] + np.sqrt(1.0 - threshold**2) * w)  # (n, D)
    return out.reshape(n, *np.shape(x))


def zero_order(ctx: PromptContext) -> Generator[list[Make] | NeedBudget, list[Candidate] | int, dict]:
    """Zero-order search (Flux-TTS): start from a random noise; each round draws `neighbors` noises
    at cosine `threshold` to the pivot; the best neighbour becomes the pivot when it beats it,
    otherwise the round is rejected and the next one starts from a fresh random noise. The last
    round is cut short so that exactly `budget` images are made."""
    cfg = ctx.config
    spent, rounds, bases = 0, 0, 0
    pivot: Candidate | None = None
    pivot_noise: np.ndarray | None = None
    moves = 0
    while spent < ctx.budget:
        if pivot is None:
            op = make_noise(ctx, bases)
            pivot_noise = ctx.noise_like(op.seed)
            if pivot_noise is None:
                raise ValueError("zero-order search needs a generator with an initial noise (noise_like "
                                 "returned None); use --method noise")
            (pivot,) = yield [op]
            bases += 1
            spent += 1
            continue
        rounds += 1
        n = min(cfg.neighbors, ctx.budget - spent)
        seed = ctx.seed(0, rounds, "neighbour")
        cand_noises = neighbours(pivot_noise, cfg.threshold, n, np.random.default_rng(seed))
        kids = yield [
            Make(id=f"z{rounds:04d}-{i}", kind="neighbour", chain=0, round=rounds, seed=seed, prompt=ctx.prompt,
                 parent=pivot, noise=cand_noises[i])
            for i in range(n)
        ]
        spent += len(kids)
        top = best(kids)
        if rank_key(top) > rank_key(pivot):
            pivot, pivot_noise = top, cand_noises[kids.index(top)]
            moves += 1
        else:
            pivot, pivot_noise = None, None  # rejected round: restart from a fresh noise
    return {"rounds": rounds, "base_noises": bases, "pivot_moves": moves}
