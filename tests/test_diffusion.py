"""diffusion.py: the shift formula, timestep sampling, the flow loss target, exact flow samplers, DPM-Solver++
(flow and DDPM), guidance. (DDPM's chain, spacings and samplers: test_ddpm.py.)"""
import math

import pytest
import torch

from ddpm import DDPM
from diffusion import (
    FLOW_SAMPLERS,
    T_MIN,
    Diffusion,
    Sampling,
    guided_prediction,
    resolution_shift,
    sample_t,
    shift_time,
    time_grid,
    to_velocity,
)


def test_shift_formula():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:-1] > t[1:-1])  # pushed towards noise
    assert math.isclose(shift_time(torch.tensor(0.5), 3.0).item(), 0.75)
    assert resolution_shift(1024, 256) == 2.0 and resolution_shift(256, 256) == 1.0
    g = time_grid(10, 2.0)
    assert g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])
    # the fixed end point: 10 levels from 1 down to t_min (evenly before the shift), then 0
    assert len(g) == 11 and g[-2] == torch.tensor(T_MIN)
    u = torch.linspace(1, T_MIN / (2 - T_MIN), 10, dtype=torch.float64)  # shift_time(u[-1], 2) = T_MIN
    assert torch.allclose(g[:-1].double(), shift_time(u, 2.0), atol=1e-7)
    # t_min = 0: the grid before the end point was fixed, 11 levels evenly from 1 to 0 (its end moves)
    assert torch.equal(time_grid(10, 2.0, t_min=0), shift_time(torch.linspace(1, 0, 11, dtype=torch.float64),
                                                                2.0).float())


def test_logit_normal_t():
    t = sample_t(50000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median() - 0.5) < 0.01
    ts = sample_t(50000, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(ts.median() - 2 / 3) < 0.01  # the shift moves the median t = 0.5 to 2 * 0.5 / 1.5


def noise_of(x0, seed):
    """The noise Diffusion.loss draws for this seed: t first, then the noise."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(x0.shape[0], generator=g)
    return torch.randn(x0.shape, generator=g)


def test_flow_loss_target_is_eps_minus_x0():
    x0 = torch.randn(4, 3, 8, 8)
    eps = noise_of(x0, 0)
    perfect = lambda x, t, **_: eps - x0
    diff = Diffusion()
    assert torch.allclose(diff.loss(perfect, x0, torch.Generator().manual_seed(0)), torch.zeros(4),
                          atol=1e-10)
    zero = lambda x, t, **_: torch.zeros_like(x)
    assert torch.allclose(diff.loss(zero, x0, torch.Generator().manual_seed(0)),
                          ((eps - x0) ** 2).mean((1, 2, 3)))


def test_x_prediction_reports_a_velocity():
    """pred x: the network's output is the clean image x0; the velocity is (x_t - x0) / t (t clamped at
    0.05)."""
    x0, x_t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.01, 0.5, 1.0])
    v = to_velocity(x0, x_t, t, "x")
    assert torch.allclose(v, (x_t - x0) / torch.tensor([0.05, 0.5, 1.0]).view(-1, 1, 1, 1))
    assert to_velocity(x0, x_t, t, "v") is x0


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
@pytest.mark.parametrize("pred,steps", [("v", 7), ("x", 7), ("x", 200)])
def test_flow_samplers_are_exact_on_straight_paths(method, alpha, pred, steps):
    """With one data point x0 the true velocity is (x - x0) / t and every path is straight: any step lands on
    x0. An x-prediction model outputs x0 itself, and the samplers use its exact velocity: at 200 steps the
    grid passes below t = 0.05, where the training loss's clamp would stop the path short of x0."""
    x0 = torch.randn(2, 3, 4, 4)
    predict = (lambda x, t: x0) if pred == "x" else (lambda x, t: (x - x0) / t.view(-1, 1, 1, 1))
    out = Diffusion(pred=pred, alpha=alpha).sample(predict, torch.randn(2, 3, 4, 4),
                                                   Sampling(method, steps))
    assert torch.allclose(out, x0, atol=1e-4)


#################################################################################
#                        Classifier-free guidance                               #
#################################################################################

class Probe(torch.nn.Module):
    """v = x * (1 + y') + 10 * ctrl_drop, y' = 9 (the null class) where sem_drop: each branch gives a
    different, known answer on every channel."""

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        drop = torch.zeros(x.shape[0]) if ctrl_drop is None else ctrl_drop.float()
        if sem_drop is not None:
            y = torch.where(sem_drop, torch.full_like(y, 9), y)
        return x * (1 + y.float()).view(-1, 1, 1, 1) + 10 * drop.view(-1, 1, 1, 1)


def test_guidance_formula_on_all_channels():
    x, t, y, c = torch.ones(2, 4, 2, 2), torch.full((2,), 0.5), torch.tensor([2, 3]), torch.zeros(2, 7)
    null = 9
    cond = x * (1 + y.float()).view(-1, 1, 1, 1)
    uncond = x * (1 + null)
    out = guided_prediction(Probe(), x, t, y, c, Sampling(scale=4.0))
    assert torch.allclose(out, uncond + 4.0 * (cond - uncond))  # all 4 channels guided
    out2 = guided_prediction(Probe(), x, t, y, c, Sampling(scale=4.0, ctrl=0.5))
    assert torch.allclose(out2, uncond + 4.0 * (cond - uncond) + 0.5 * (cond - (cond + 10)))
    outside = guided_prediction(Probe(), x, t, y, c, Sampling(scale=4.0, interval=(0.0, 0.3)))
    assert torch.allclose(outside, cond)


def test_guidance_leaves_the_variance_channels_conditional():
    """A learned variance (channels beyond the data's) is not guided: it comes from the conditional branch."""
    probe = lambda x, t, y, ctrl, **kw: torch.cat([Probe()(x, t, y, ctrl, **kw)] * 2, 1)
    x, t, y, c = torch.ones(2, 4, 2, 2), torch.full((2,), 0.5), torch.tensor([2, 3]), torch.zeros(2, 7)
    out = guided_prediction(probe, x, t, y, c, Sampling(scale=4.0))
    cond = x * (1 + y.float()).view(-1, 1, 1, 1)
    assert torch.allclose(out[:, :4], 10 + 4.0 * (cond - 10)) and torch.allclose(out[:, 4:], cond)


def test_guidance_scale_one_is_the_conditional_prediction():
    from conftest import model_inputs, perturb, tiny_model
    model = perturb(tiny_model("ours"))
    x, t, y, c = model_inputs()
    t = torch.full((3,), 0.4)
    ref = model(x, t, y, c)
    assert torch.allclose(guided_prediction(model, x, t, y, c, Sampling(scale=1.0)), ref, atol=1e-6)
    # the batched two-branch path with s_sem = 1 must agree too (it differs from the shortcut only in
    # batching)
    both = guided_prediction(model, x, t, y, c, Sampling(scale=1.0 + 1e-12))
    assert torch.allclose(both, ref, atol=1e-5)


class Counting(torch.nn.Module):
    """A model wrapper that records, per call, the batch size and which (drop semantic, drop control) branches
    ran."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        B = x.shape[0]
        sem = [False] * B if sem_drop is None else sem_drop.tolist()
        ctl = [False] * B if ctrl_drop is None else ctrl_drop.tolist()
        self.calls.append(sorted(set(zip(sem, ctl))))
        return self.model(x, t, y, ctrl, ctrl_drop=ctrl_drop, sem_drop=sem_drop)


def old_guided_prediction(model, x, t, y, ctrl, s_sem, s_ctrl):
    """The guidance before branches of zero weight were skipped: (s, c) and (0s, c) always, (s, 0c) when
    s_ctrl."""
    if s_sem == 1.0 and s_ctrl == 0.0:
        return model(x, t, y=y, ctrl=ctrl)
    B = x.shape[0]
    flags = [(False, False), (True, False)] + ([(False, True)] if s_ctrl else [])
    n = len(flags)
    drop = lambda i: torch.tensor([f[i] for f in flags for _ in range(B)])
    out = model(x.repeat(n, 1, 1, 1), t.repeat(n), y=y.repeat(n), ctrl=ctrl.repeat(n, 1), ctrl_drop=drop(1),
                sem_drop=drop(0)).float().view(n, B, *x.shape[1:])
    guided = out[1] + s_sem * (out[0] - out[1])
    return guided + s_ctrl * (out[0] - out[2]) if s_ctrl else guided


@pytest.mark.parametrize("s_sem,s_ctrl,branches", [
    (1.0, 0.5, [(False, False), (False, True)]),          # no semantic guidance: the null semantic is not run
    (3.0, 0.0, [(False, False), (True, False)]),            # no control guidance: the null control is not run
    (3.0, 0.5, [(False, False), (False, True), (True, False)]),  # both
    (1.0, 0.0, [(False, False)]),                                # neither: the conditional prediction alone
])
def test_guidance_runs_only_the_branches_it_weighs(s_sem, s_ctrl, branches):
    """One model call per prediction, holding exactly the branches whose weight is not zero; the result is the
    formula's (bit-identical to the old code where it ran the same branches)."""
    from conftest import model_inputs, perturb, tiny_model
    model = Counting(perturb(tiny_model("ours")))
    x, t, y, c = model_inputs()
    t = torch.full((3,), 0.4)
    out = guided_prediction(model, x, t, y, c, Sampling(scale=s_sem, ctrl=s_ctrl))
    assert model.calls == [branches]
    ref = old_guided_prediction(model.model, x, t, y, c, s_sem, s_ctrl)
    if s_sem != 1.0 or s_ctrl == 0.0:  # the old code ran these very branches: the same bits
        assert torch.equal(out, ref)
    else:  # it also ran (0s, c), to weigh it by s_sem - 1 = 0: equal up to rounding
        assert torch.allclose(out, ref, atol=1e-5)


#################################################################################
#                DPM-Solver++(2M), on flow and on DDPM                          #
#################################################################################
# The Gaussian data N(MU, S^2): its exact data prediction D = E[x0 | x_t] is known in closed form, and so is
# the probability-flow ODE's map from noise to data, x0 = MU + S z (from pure noise z at t = 1).
MU, S = 0.3, 0.5


def gaussian_data_prediction(x, t):
    """Flow (x_t = (1 - t) x0 + t eps): D for N(MU, S^2) data, in float64."""
    t = t.double().view(-1, 1, 1, 1)
    a = 1 - t
    return (MU + a * S ** 2 / (a ** 2 * S ** 2 + t ** 2) * (x.double() - a * MU)).float()


def gaussian_eps(chain):
    """DDPM: the exact eps of N(MU, S^2) data at (possibly fractional) network times k / 1000."""
    def predict(x, t):
        alphas_cumprod = chain.alphas_cumprod_at((t.double() * 1000).tolist()).view(-1, 1, 1, 1)
        a, s = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        return (s * (x.double() - a * MU) / (a ** 2 * S ** 2 + s ** 2)).float()
    return predict


@pytest.mark.parametrize("pred", ["x", "v"])
@pytest.mark.parametrize("alpha", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_flow_dpm_solver_lands_on_the_single_data_point(pred, alpha, steps):
    """One data point: D is x0 at every level, and DPM-Solver++ reproduces it in any number of steps."""
    x0 = torch.randn(2, 3, 4, 4)
    predict = (lambda x, t: x0) if pred == "x" else (lambda x, t: (x - x0) / t.view(-1, 1, 1, 1))
    out = Diffusion(pred=pred, alpha=alpha).sample(predict, torch.randn(2, 3, 4, 4),
                                                   Sampling("dpm++2m", steps))
    assert torch.allclose(out, x0, atol=1e-5)


def gaussian_solution(z, t_min=T_MIN):
    """What a flow sampler converges to from pure noise z when it ends at t_min: the data prediction D at
    t_min on the exact path x(t) = (1 - t) MU + sigma(t) z, sigma(t) = sqrt((1 - t)^2 S^2 + t^2), which is
    MU + (1 - t) S^2 z / sigma(t) -- the ODE's own end MU + S z at t_min = 0, and about S t_min^2 / (2 S^2)
    from it otherwise (2.5e-3 of z at 0.05)."""
    a = 1 - t_min
    return MU + a * S ** 2 * z / math.sqrt(a ** 2 * S ** 2 + t_min ** 2)


def test_dpm_solver_is_second_order_on_gaussian_data():
    """On Gaussian data the sampler's error falls as 1/steps^2: about 4x per doubling (a first-order sampler:
    2x), below 1e-3 of the exact map's output at 160 flow / 80 DDPM steps. (Flow: the exact output at the
    default end point, gaussian_solution.)"""
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z

    def error(diff, predict, start, n, method, **kw):
        return ((diff.sample(predict, start.clone(), Sampling(method, n, **kw)) - exact) / z).abs().mean()
    flow = Diffusion(pred="x")
    flow_error = lambda n: ((flow.sample(gaussian_data_prediction, z.clone(), Sampling("dpm++2m", n))
                             - gaussian_solution(z)) / z).abs().mean()
    e40, e80, e160 = (flow_error(n) for n in (40, 80, 160))
    assert e160 < 1e-3 and 3.0 < e40 / e80 < 5.0 and 3.0 < e80 / e160 < 5.0
    ddpm = DDPM()
    last = ddpm.chain.alphas_cumprod[-1].float()
    start = last.sqrt() * MU + (last * S ** 2 + 1 - last).sqrt() * z  # the same z on the exact path, step 999
    # (from 160 steps on, float32 rounding of the network time near the data sets a floor of about 1e-4)
    d20, d40, d80 = (error(ddpm, gaussian_eps(ddpm.chain), start, n, "dpm++2m", spacing="logsnr")
                     for n in (20, 40, 80))
    assert d80 < 1e-3 and 3.0 < d20 / d40 < 6.0 and 3.0 < d40 / d80 < 6.0
    # DDIM, the first-order solver of the same ODE: its error halves per doubling, and at 200 steps it is 10x
    # DPM-Solver++'s at 50
    eps = gaussian_eps(ddpm.chain)
    i50, i100, i200 = (error(ddpm, eps, start, n, "ddim", spacing="time") for n in (50, 100, 200))
    assert 1.8 < i50 / i100 < 2.2 and 1.8 < i100 / i200 < 2.2
    assert i200 > 10 * error(ddpm, eps, start, 50, "dpm++2m", spacing="time")


def gaussian_velocity(x, t):
    """Flow, pred v: the exact velocity (x - D) / t of N(MU, S^2) data."""
    data = gaussian_data_prediction(x, t).double()
    return ((x.double() - data) / t.double().view(-1, 1, 1, 1)).float()


@pytest.mark.parametrize("method", FLOW_SAMPLERS)
@pytest.mark.parametrize("pred", ["x", "v"])
@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_flow_samplers_never_ask_below_the_end_point(method, pred, alpha):
    """The fixed end point: a network that is exact above t_min and wrong below it gives the same samples,
    to the bit, at any step count -- the samplers never evaluate it below t_min and return its data
    prediction there. (On the grid before the end point was fixed, the last level fell below t_min once the
    steps were many -- 0.029 at 100 steps and shift 3 -- and the samples took the wrong part.)"""
    exact = gaussian_data_prediction if pred == "x" else gaussian_velocity
    seen = []

    def wrong_below(x, t):
        seen.append(float(t.min()))
        below = (t.double() < T_MIN * (1 - 1e-6)).view(-1, 1, 1, 1)  # t_min itself, rounded to fp32, is not
        return torch.where(below, exact(x, t) + 1.0, exact(x, t))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    diffusion = Diffusion(pred=pred, alpha=alpha)
    for steps in (2, 5, 40, 200):
        out = diffusion.sample(wrong_below, z.clone(), Sampling(method, steps))
        assert torch.equal(out, diffusion.sample(exact, z.clone(), Sampling(method, steps))), steps
        assert min(seen) == pytest.approx(T_MIN, rel=1e-6)
    assert not torch.equal(diffusion.sample(wrong_below, z.clone(), Sampling(method, 200, t_min=0)),
                           diffusion.sample(exact, z.clone(), Sampling(method, 200, t_min=0)))


def test_generate_passes_the_end_point():
    """Sampling.t_min reaches the sampler: the smallest network time of a generate call is the record's
    t_min, and t_min = 0 is the grid whose last level is 1 / steps (shift 1)."""
    from conftest import model_inputs, perturb, tiny_model
    from diffusion import generate
    model = perturb(tiny_model("ours"))
    x, _, y, c = model_inputs()
    for t_min, last in ((0.1, 0.1), (0.0, 1 / 4)):
        times = []
        probe = lambda x, t, *a, **kw: times.append(float(t.min())) or model(x, t, *a, **kw)
        generate(probe, Diffusion(), x, y, c, Sampling(steps=4, scale=2.0, t_min=t_min))
        assert len(times) == 4 and min(times) == pytest.approx(last, rel=1e-6)


@pytest.mark.parametrize("pred", ["x", "v"])
@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_flow_samplers_keep_their_order_with_the_end_point(pred, alpha):
    """On Gaussian data, with the fixed end point (default t_min), against the exact answer there
    (gaussian_solution): Euler's error halves per doubling of the steps, Heun's and DPM++ 2M's fall about 4x
    (second order). Measured, unshifted, per doubling: Euler 2.00-2.02 (20 -> 40 -> 80 steps), Heun 3.98-3.99
    (20 -> 40 -> 80), DPM++ 2M 4.2-4.4 (40 -> 80 -> 160). At shift 3 Heun's error changes sign between 40
    and 80 steps (ratios 10.3, then 1.45, then 3.0 and 3.5 towards 4), so there each sampler's order is read
    over a quadrupling of the steps: Euler 4.0, Heun 15 (20 -> 80), DPM++ 2M 15 (40 -> 160)."""
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = gaussian_solution(z)
    diffusion = Diffusion(pred=pred, alpha=alpha)
    predict = gaussian_data_prediction if pred == "x" else gaussian_velocity
    error = lambda method, n: ((diffusion.sample(predict, z.clone(), Sampling(method, n)) - exact)
                               / z).abs().mean().item()
    for method, (n, low, high) in {"euler": (20, 1.8, 2.2), "heun": (20, 3.5, 4.5),
                                       "dpm++2m": (40, 3.5, 5.0)}.items():
        e = [error(method, n * k) for k in (1, 2, 4)]  # Heun's 20 steps: 39 network evaluations
        if alpha == 1.0:
            assert low < e[0] / e[1] < high and low < e[1] / e[2] < high, (method, e)
        elif method == "euler":
            assert 3.5 < e[0] / e[2] < 4.5, e
        else:
            assert 10 < e[0] / e[2] < 40, (method, e)  # second order: 16; first: 4
    assert error("euler", 80) < 0.02 and error("heun", 80) < 1e-4 and error("dpm++2m", 160) < 2e-3


def test_power_cosine_guidance_is_mdts_schedule():
    """sail-sg/MDT forward_with_cfg: scale_step = (1 - cos((1 - t / T)^pow pi)) / 2, the scale (cfg - 1)
    scale_step + 1, with t the DDPM step and T = 1000; our t is the network time t / T."""
    from scipy.integrate import quad

    from diffusion import semantic_scale
    s = Sampling(scale=3.8, schedule="power-cosine", power=4.0)
    assert semantic_scale(s, 1.0) == 1.0 and semantic_scale(s, 0.0) == pytest.approx(3.8)
    for k in (0, 1, 250, 500, 999):
        mdt = (1 - math.cos(((1 - k / 1000) ** 4.0) * math.pi)) * 1 / 2
        assert semantic_scale(s, k / 1000) == pytest.approx((3.8 - 1) * mdt + 1, abs=1e-12)
    # the mean scale over the trajectory: 1 + 2.8 x the mean weight, 0.178, so 1.50 -- DiT's constant scale
    mean_weight = quad(lambda u: (1 - math.cos(math.pi * u ** 4)) / 2, 0, 1)[0]
    grid = [semantic_scale(s, (i + 0.5) / 10_000) for i in range(10_000)]
    assert sum(grid) / len(grid) == pytest.approx(1 + 2.8 * mean_weight, abs=1e-6)
    assert 0.177 < mean_weight < 0.179
    assert semantic_scale(Sampling(scale=3.8), 0.7) == 3.8  # constant
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        semantic_scale(Sampling(schedule="no-such-schedule"), 0.5)


def test_the_guidance_schedule_reaches_every_step():
    """generate asks guided_prediction for the schedule's scale at each step's t: at t = 1 the power-cosine
    scale is 1, so only the conditional branch runs there; every later step runs both."""
    from conftest import model_inputs, perturb, tiny_model
    from diffusion import generate
    model = Counting(perturb(tiny_model("ours")))
    x, _, y, c = model_inputs()
    generate(model, Diffusion(), x, y, c, Sampling(steps=4, scale=3.0, schedule="power-cosine"))
    assert len(model.calls) == 4 and model.calls[0] == [(False, False)]
    assert all(call == [(False, False), (True, False)] for call in model.calls[1:])
