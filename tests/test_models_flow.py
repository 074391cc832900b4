"""Rectified flow against exact answers."""

import pytest

torch = pytest.importorskip("torch")

from reflectionflow.models.flow import (  # noqa: E402
    RectifiedFlow,
    euler,
    logit_normal,
    loss_by_bin,
    partial_path_sample,
    path_sample,
    time_grid,
)


def test_path_hits_its_endpoints_and_target_is_the_velocity():
    x0, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.equal(path_sample(x0, eps, torch.zeros(3)).x_t, x0)
    assert torch.equal(path_sample(x0, eps, torch.ones(3)).x_t, eps)
    mid = path_sample(x0, eps, torch.full((3,), 0.25))
    assert torch.allclose(mid.x_t, 0.75 * x0 + 0.25 * eps)
    assert torch.equal(mid.target, eps - x0)


def test_euler_on_a_constant_velocity_is_exact():
    x1, c = torch.randn(4, 5), torch.randn(4, 5)
    out = euler(lambda x, t: c, x1, time_grid(7))
    assert torch.allclose(out, x1 - c, atol=1e-6)  # x(0) = x(1) - c


def test_euler_follows_a_straight_path_to_its_data_point():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def exact(x, t):  # the true velocity field of a single straight path
        return (x - x0) / t.view(-1, 1, 1, 1)

    assert torch.allclose(euler(exact, eps, time_grid(5)), x0, atol=1e-5)


def test_time_grid_runs_from_noise_to_data():
    g = time_grid(4, shift=3.0)
    assert g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


class KnowsTheData(torch.nn.Module):
    """A 'model' that returns the exact velocity (x_t - x0) / t for known data."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, text, cond=None):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_loss_is_zero_for_the_exact_velocity():
    x0 = torch.randn(6, 3, 8, 8)
    flow = RectifiedFlow(KnowsTheData(x0), null_text=torch.zeros(4, dtype=torch.long), text_dropout=0.5)
    res = flow.loss(x0, torch.ones(6, 4, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert res.per_sample.shape == (6,) and res.t.shape == (6,)
    assert res.loss.item() < 1e-10


def test_logit_normal_and_bins():
    t = logit_normal(10_000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    sums, counts = loss_by_bin(torch.tensor([0.05, 0.15, 0.16, 0.99]), torch.tensor([1.0, 2.0, 4.0, 8.0]), bins=10)
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1] and sums[1] == 6 and sums[9] == 8


def test_cfg_counts_two_nfe_per_step_and_one_without():
    class Zero(torch.nn.Module):
        def encode_text(self, ids):
            return ids

        def forward(self, x, t, text, cond=None):
            return torch.zeros_like(x)

    flow = RectifiedFlow(Zero(), null_text=torch.zeros(4, dtype=torch.long))
    noise = torch.randn(2, 3, 8, 8)
    text = torch.ones(2, 4, dtype=torch.long)
    guided = flow.sample(noise, text, steps=5, cfg=3.0)
    plain = flow.sample(noise, text, steps=5, cfg=1.0)
    assert (guided.nfe, plain.nfe) == (10, 5)
    assert torch.equal(guided.images, noise)


def test_partial_start_from_the_condition_runs_the_grid_tail():
    """strength s: start at x_t0 = (1 - t0) cond + t0 noise, t0 the grid's time at step steps - round(s x steps);
    a velocity that knows the condition is the data lands on it exactly."""

    class KnowsCond(torch.nn.Module):
        class config:
            cond_attention = "full"

        def encode_text(self, ids):
            return ids

        def forward(self, x, t, text, cond=None):
            tt = t.view(-1, 1, 1, 1)
            return (x - cond) / tt  # the straight path's velocity eps - x0, with x0 = cond

    flow = RectifiedFlow(KnowsCond(), null_text=torch.zeros(4, dtype=torch.long))
    noise, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    text = torch.ones(2, 4, dtype=torch.long)
    res = flow.sample(noise, text, cond=cond, steps=10, cfg=1.0, strength=0.3)
    assert res.nfe == 3 and torch.allclose(res.images, cond, atol=1e-5)
    full = flow.sample(noise, text, cond=cond, steps=10, cfg=1.0)
    assert full.nfe == 10 and torch.allclose(full.images, cond, atol=1e-5)
    with pytest.raises(ValueError, match="condition image"):
        flow.sample(noise, text, steps=10, strength=0.5)


def test_partial_path_is_the_line_the_partial_sampler_integrates():
    """Strength s: the path starts where `sample(strength=s)` starts (u = 1 gives (1 - s) prev + s eps at
    t = s), its velocity target is constant along it and leads to the target, and s = 1 is the plain path."""
    x0, eps, prev = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    s = torch.tensor([0.5, 0.75, 1.0, 0.3])
    start = partial_path_sample(x0, eps, torch.ones(4), prev, s)
    assert torch.allclose(start.t, s)
    sb = s.view(-1, 1, 1, 1)
    assert torch.allclose(start.x_t, (1 - sb) * prev + sb * eps, atol=1e-6)
    u = torch.tensor([0.2, 0.9, 0.5, 0.7])
    mid = partial_path_sample(x0, eps, u, prev, s)
    assert torch.allclose(mid.t, u * s)
    assert torch.allclose(mid.x_t - mid.t.view(-1, 1, 1, 1) * mid.target, x0, atol=1e-5)  # x(0) = x0
    # Euler with the path's own (constant) velocity from the start lands on the target.
    grid = torch.linspace(0.5, 0.0, 6)
    one = partial_path_sample(x0[:1], eps[:1], torch.ones(1), prev[:1], torch.tensor([0.5]))
    assert torch.allclose(euler(lambda x, t: one.target, one.x_t, grid), x0[:1], atol=1e-5)
    plain = path_sample(x0, eps, u)
    full = partial_path_sample(x0, eps, u, prev, torch.ones(4))
    assert torch.allclose(full.x_t, plain.x_t) and torch.allclose(full.target, plain.target)
    same = partial_path_sample(x0, eps, u, x0, s)  # previous image = target: the plain path at t = s u
    ref = path_sample(x0, eps, u * s)
    assert torch.allclose(same.x_t, ref.x_t, atol=1e-5) and torch.allclose(same.target, ref.target, atol=1e-5)
