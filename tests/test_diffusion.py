"""diffusion.py: the shift formula, timestep sampling, the loss target, exact samplers, guidance."""
import math

import pytest
import torch

from diffusion import flow_loss, guided_velocity, resolution_shift, sample, sample_t, shift_time, time_grid


def test_shift_formula():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:-1] > t[1:-1])  # pushed towards noise
    assert math.isclose(shift_time(torch.tensor(0.5), 3.0).item(), 0.75)
    assert resolution_shift(1024, 256) == 2.0 and resolution_shift(256, 256) == 1.0
    g = time_grid(10, 2.0)
    assert g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])


def test_logit_normal_t():
    t = sample_t(50000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median() - 0.5) < 0.01
    ts = sample_t(50000, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(ts.median() - 2 / 3) < 0.01  # the shift moves the median t = 0.5 to 2 * 0.5 / 1.5


def test_flow_loss_target_is_eps_minus_x0():
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    perfect = lambda x, t, **_: eps - x0
    assert torch.allclose(flow_loss(perfect, x0, t, eps), torch.zeros(4))
    zero = lambda x, t, **_: torch.zeros_like(x)
    assert torch.allclose(flow_loss(zero, x0, t, eps), ((eps - x0) ** 2).mean((1, 2, 3)))


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_samplers_are_exact_on_straight_paths(method, alpha):
    """With one data point x0 the true velocity is (x - x0) / t and every path is straight: any step size lands on x0."""
    x0 = torch.randn(2, 3, 4, 4)
    vel = lambda x, t: (x - x0) / t.view(-1, 1, 1, 1)
    out = sample(vel, torch.randn(2, 3, 4, 4), steps=7, alpha=alpha, method=method)
    assert torch.allclose(out, x0, atol=1e-4)


class Probe(torch.nn.Module):
    """v = x * (1 + y) + 10 * ctrl_drop: each branch gives a different, known answer on every channel."""

    def forward(self, x, t, y, ctrl, ctrl_drop=None):
        drop = torch.zeros(x.shape[0]) if ctrl_drop is None else ctrl_drop.float()
        return x * (1 + y.float()).view(-1, 1, 1, 1) + 10 * drop.view(-1, 1, 1, 1)


def test_guidance_formula_on_all_channels():
    x, t, y, c = torch.ones(2, 4, 2, 2), torch.full((2,), 0.5), torch.tensor([2, 3]), torch.zeros(2, 7)
    null = 9
    cond = x * (1 + y.float()).view(-1, 1, 1, 1)
    uncond = x * (1 + null)
    out = guided_velocity(Probe(), x, t, y, c, null, s_sem=4.0)
    assert torch.allclose(out, uncond + 4.0 * (cond - uncond))  # all 4 channels guided
    out2 = guided_velocity(Probe(), x, t, y, c, null, s_sem=4.0, s_ctrl=0.5)
    assert torch.allclose(out2, uncond + 4.0 * (cond - uncond) + 0.5 * (cond - (cond + 10)))
    outside = guided_velocity(Probe(), x, t, y, c, null, s_sem=4.0, interval=(0.0, 0.3))
    assert torch.allclose(outside, cond)


def test_guidance_scale_one_is_the_conditional_prediction():
    from test_model import inputs, perturb, tiny
    model = perturb(tiny("ours"))
    x, t, y, c = inputs()
    t = torch.full((3,), 0.4)
    ref = model(x, t, y, c)
    assert torch.allclose(guided_velocity(model, x, t, y, c, 10, s_sem=1.0), ref, atol=1e-6)
    # the batched two-branch path with s_sem = 1 must agree too (it differs from the shortcut only in batching)
    both = guided_velocity(model, x, t, y, c, 10, s_sem=1.0 + 1e-12)
    assert torch.allclose(both, ref, atol=1e-5)
