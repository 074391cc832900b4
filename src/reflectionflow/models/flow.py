"""Rectified flow: the straight path, its loss and an Euler sampler with classifier-free guidance.

Convention (docs/method.md, section 3, as FLUX and SD3 train): t = 0 is data, t = 1 is noise,
x_t = (1 - t) x0 + t eps, and the model predicts the velocity dx_t/dt = eps - x0. Sampling
integrates from t = 1 down to t = 0. `RectifiedFlow` wraps any `model(x, t, text, cond)` the way
minRF does: `loss` for training (with text dropout for CFG) and `sample` for inference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .text import TextFeatures

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> v


@dataclass
class PathSample:
    x_t: torch.Tensor  # (B, ...) the point on the path
    t: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, ...) the velocity eps - x0


def path_sample(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> PathSample:
    tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return PathSample(x_t=(1 - tb) * x0 + tb * eps, t=t, target=eps - x0)


def partial_path_sample(x0: torch.Tensor, eps: torch.Tensor, u: torch.Tensor, start: torch.Tensor,
                        strength: torch.Tensor) -> PathSample:
    """The path a sampler started from a partly noised previous image follows (`sample(strength=s)`).

    Such a sampler starts at time s from z_s = (1 - s) start + s eps instead of from noise. Training
    on the straight line from z_s to the target x0 teaches that start: for u in (0, 1], t = s u,
    x_t = (1 - u) x0 + u z_s, velocity target (z_s - x0) / s. With s = 1 (or start = x0) it is
    `path_sample` exactly. `strength` (B,) in (0, 1]; `u` (B,) the unit time (logit-normal)."""
    shape = (-1, *([1] * (x0.ndim - 1)))
    sb, ub = strength.view(shape).to(x0.dtype), u.view(shape).to(x0.dtype)
    z = (1 - sb) * start.to(x0.dtype) + sb * eps
    return PathSample(x_t=(1 - ub) * x0 + ub * z, t=u * strength, target=(z - x0) / sb)


def logit_normal(n: int, mean: float = 0.0, std: float = 1.0, device=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """t = sigmoid(N(mean, std)): SD3's sampling, which spends training on the middle times."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """(steps + 1,) times from 1 to 0; shift > 1 spends more steps near the noise (SD3's shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


def euler(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) along `grid` (first to last time)."""
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * velocity(x, t0.expand(x.shape[0]))
    return x


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)


def loss_by_bin(t: torch.Tensor, losses: torch.Tensor, bins: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of per-sample losses in `bins` equal bins of t (minRF logs these): on device,
    so a training loop can accumulate them without a host sync every step."""
    idx = (t.detach().float() * bins).long().clamp_(0, bins - 1)
    sums = torch.zeros(bins, device=t.device).index_add_(0, idx, losses.detach().float())
    counts = torch.zeros(bins, device=t.device).index_add_(0, idx, torch.ones_like(losses, dtype=torch.float))
    return sums, counts


@dataclass
class FlowLoss:
    loss: torch.Tensor  # scalar, the mean
    per_sample: torch.Tensor  # (B,)
    t: torch.Tensor  # (B,)


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, C, H, W) in model space ([-1, 1] for the world)
    nfe: int  # model forward passes per image (CFG counts 2 per step), the cached ones included
    # Per image: of those passes, the ones served from the step cache (only the first block ran);
    # None when sampling without one.
    cached: list[int] | None = None


class RectifiedFlow:
    """Loss and sampler around `model(x, t, text, cond)`.

    `null_text` (L,) is the token ids of the empty prompt: text dropout replaces a sample's text
    with it in training, and CFG's unconditional branch uses it at sampling time.
    """

    def __init__(self, model: nn.Module, null_text: torch.Tensor, text_dropout: float = 0.1,
                 t_mean: float = 0.0, t_std: float = 1.0):
        if not 0.0 <= text_dropout < 1.0:
            raise ValueError(f"text_dropout must be in [0, 1), got {text_dropout}")
        self.model = model
        self.null_text = null_text
        self.text_dropout = text_dropout
        self.t_mean, self.t_std = t_mean, t_std

    def drop_text(self, text: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.text_dropout == 0:
            return text
        drop = torch.rand(text.shape[0], device=text.device, generator=generator) < self.text_dropout
        return torch.where(drop[:, None], self.null_text.to(text.device)[None], text)

    def loss(self, x0: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None, model: nn.Module | None = None) -> FlowLoss:
        """Flow-matching MSE; `model` overrides the wrapped one (e.g. its torch.compile'd twin)."""
        model = self.model if model is None else model
        B = x0.shape[0]
        t = logit_normal(B, self.t_mean, self.t_std, device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        path = path_sample(x0, eps, t)
        text = self.drop_text(text, generator)
        v = model(path.x_t, t, text, cond) if cond is not None else model(path.x_t, t, text)
        per = per_sample_mse(v, path.target)
        return FlowLoss(loss=per.mean(), per_sample=per, t=t)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None = None,
               steps: int = 20, cfg: float = 3.0, shift: float = 1.0, cache_cond: bool = True,
               model: nn.Module | None = None, strength: float = 1.0,
               cache_threshold: float = 0.0) -> SampleResult:
        """Euler from t=1 (noise) to t=0; CFG v = v_null + cfg (v_text - v_null) on a doubled batch.

        With a condition image, the unconditional branch drops the text and keeps the image. When
        the model's condition tokens are causal (`cond_attention="causal_kv"`) their keys/values
        are computed once here and reused at every step (`cache_cond`). `strength` < 1 starts from
        the condition image noised to the grid's time at step (1 - strength) x steps, on the path
        x_t = (1 - t) cond + t noise, and runs only the remaining steps.

        `cache_threshold` > 0 caches steps (models/step_cache.py, FBCache's rule): at a step where an
        image's first-block residual changed by at most that share since its last computed step, the
        remaining blocks are skipped for that image and their last residual reused. The decision is
        per image, its text and unconditional rows together. 0 (the default) runs every block.
        """
        from .step_cache import StepCache, check_threshold

        if strength < 1.0 and cond is None:
            raise ValueError("strength < 1 starts from the condition image: a condition image is needed")
        model = self.model if model is None else model
        if check_threshold(cache_threshold) > 0 and not all(hasattr(model, f) for f in ("head", "tail", "finish")):
            raise ValueError("cache_threshold > 0 needs a model with head / tail / finish (the world MMDiT)")
        guided = cfg != 1.0
        B = noise.shape[0]
        texts = torch.cat([text, self.null_text.to(text.device)[None].expand(B, -1)]) if guided else text
        feats: TextFeatures = model.encode_text(texts)  # once, not per step
        conds = cond
        if cond is not None:
            conds = torch.cat([cond, cond]) if guided else cond
            if cache_cond and model.config.cond_attention == "causal_kv":
                conds = model.encode_condition(conds, feats)

        step_cache = StepCache(cache_threshold, B, 2 * B if guided else B) if cache_threshold > 0 else None

        def velocity(x, t):
            if guided:
                x, t = torch.cat([x, x]), torch.cat([t, t])
            v = model(x, t, feats, conds) if step_cache is None else cached_velocity(model, step_cache, x, t, feats,
                                                                                      conds)
            if not guided:
                return v
            v_text, v_null = v.chunk(2)
            return v_null + cfg * (v_text - v_null)

        grid = time_grid(steps, shift, device=noise.device)
        begin = steps - max(1, round(steps * strength)) if strength < 1.0 else 0
        x = noise if begin == 0 else (1 - grid[begin]) * cond.float() + grid[begin] * noise
        x = euler(velocity, x, grid[begin:])
        return SampleResult(images=x, nfe=(steps - begin) * (2 if guided else 1),
                            cached=step_cache.cached_passes() if step_cache is not None else None)


def cached_velocity(model: nn.Module, cache, x: torch.Tensor, t: torch.Tensor, text, cond) -> torch.Tensor:
    """One step of `model` (an MMDiT: head, tail, finish) with a first-block cache (models/step_cache.py):
    every row runs the first block; the rows the cache says must compute run the remaining blocks, the
    others add the remaining blocks' cached residual; the output layer runs on every row."""
    from .batching import select

    img, txt, cond_x, first = model.head(x, t, text, cond)
    run = cache.compute(first)  # (R,) bool
    rows = run.nonzero().squeeze(1)
    skip = (~run).nonzero().squeeze(1)
    R = x.shape[0]
    if rows.numel() == R:  # every row computes: no gather
        last = model.tail(img, txt, cond_x, t, text, cond)
        cache.store(rows, first, last - img)
    else:
        last = img.clone()
        if rows.numel():
            sub = model.tail(img[rows], txt[rows], select(cond_x, rows, R), t[rows], select(text, rows, R),
                             select(cond, rows, R))
            cache.store(rows, first[rows], sub - img[rows])
            last[rows] = sub.to(last.dtype)
        last[skip] = img[skip] + cache.served(skip).to(img.dtype)
    return model.finish(last, t, text)
