"""ddpm.py: the chain's schedules, the eps loss target, the variational bound, ADM's and diffusers' step
spacings, DDIM / ancestral / DPM-Solver++ landing on the data. (DPM-Solver++'s order on both objectives:
test_diffusion.py.)"""
import math

import pytest
import torch

from config import get_args
from ddpm import (
    DDPM,
    OBJECTIVES,
    SAMPLERS,
    Chain,
    ddpm_betas,
    discretized_gaussian_nll,
    normal_kl,
    spaced_steps,
)
from diffusion import Diffusion, Sampling


def noise_of(x0, seed):
    """The noise DDPM.loss draws for this seed: the step k first, then the noise."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (x0.shape[0],), generator=g)
    return torch.randn(x0.shape, generator=g)


def test_ddpm_schedules_and_spacing():
    b = ddpm_betas("linear")
    assert len(b) == 1000 and math.isclose(b[0].item(), 1e-4) and math.isclose(b[-1].item(), 0.02)
    alphas_cumprod = Chain(b).alphas_cumprod
    assert 0.99 < alphas_cumprod[0] < 1 and alphas_cumprod[-1] < 1e-4  # the chain ends in (almost) pure noise
    ldm = ddpm_betas("ldm")
    assert math.isclose(ldm[0].item(), 0.0015) and math.isclose(ldm[-1].item(), 0.0195)
    assert spaced_steps(1000, 50, "ddim") == list(range(0, 1000, 20))  # DiT's "ddim50"
    steps = spaced_steps(1000, 250, "ddpm")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    # respacing keeps the cumulative products at the kept steps
    kept = Chain(b).respaced([0, 499, 999])
    assert torch.allclose(kept.alphas_cumprod, alphas_cumprod[[0, 499, 999]])
    with pytest.raises(ValueError, match="beta-schedule"):
        ddpm_betas("no-such-schedule")


def test_ddpm_loss_target_is_the_noise():
    x0 = torch.randn(4, 3, 8, 8)
    eps = noise_of(x0, 1)
    diff = DDPM()
    perfect = lambda x, t, **_: eps
    assert torch.allclose(diff.loss(perfect, x0, torch.Generator().manual_seed(1)), torch.zeros(4))
    zero = lambda x, t, **_: torch.zeros_like(x)
    assert torch.allclose(diff.loss(zero, x0, torch.Generator().manual_seed(1)), (eps ** 2).mean((1, 2, 3)))


def test_learned_variance_bound_is_zero_for_the_true_posterior():
    """Exact eps and the variance output -1 (log-variance = the posterior's) make the KL term vanish for k >=
    1; the output +1 (variance beta) does not."""
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(2)
    k = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    diff = DDPM(learn_sigma=True)
    post = lambda x, t, **_: torch.cat([eps, -torch.ones_like(x)], 1)
    loss = diff.loss(post, x0, torch.Generator().manual_seed(2))
    assert torch.allclose(loss[k > 0], torch.zeros(int((k > 0).sum())), atol=1e-4)
    k = torch.tensor([1, 2, 3, 5, 8, 10])  # early steps, where beta and the posterior variance differ most
    x_t = diff.chain.q_sample(x0, k, eps)
    assert torch.allclose(diff.vb_term(eps, -torch.ones_like(x0), x0, x_t, k), torch.zeros(6), atol=1e-4)
    assert (diff.vb_term(eps, torch.ones_like(x0), x0, x_t, k) > 1e-3).all()
    # the pieces: KL of identical Gaussians is 0; the decoder's likelihood of a sharp Gaussian on the data is
    # ~1 bin
    m, lv = torch.randn(5), torch.randn(5)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(5), atol=1e-6)
    assert torch.allclose(normal_kl(m, lv, m + 1, lv), 0.5 * torch.exp(-lv))  # the mean term alone
    nll = discretized_gaussian_nll(torch.zeros(3), torch.zeros(3), torch.full((3,), -20.0))
    assert torch.allclose(nll, torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_samplers_land_on_the_single_data_point(method, learn_sigma):
    """With one data point the exact eps is known in closed form; DDIM and ancestral sampling both end on
    x0."""
    x0 = torch.randn(2, 3, 4, 4)
    diff = DDPM(learn_sigma=learn_sigma)
    alphas_cumprod = diff.chain.alphas_cumprod.float()

    def predict(x, t):
        a = alphas_cumprod[(t * 1000).round().long()].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(x)], 1) if learn_sigma else eps
    out = diff.sample(predict, torch.randn(2, 3, 4, 4), Sampling(method, 10), generator=torch.Generator())
    assert torch.allclose(out, x0, atol=1e-3)
    with pytest.raises(ValueError, match="does not fit"):
        diff.sample(predict, torch.randn(2, 3, 4, 4), Sampling("euler", 10))


def test_objective_and_prediction_must_agree(capsys):
    with pytest.raises(ValueError, match="does not fit"):
        DDPM(pred="x")
    with pytest.raises(ValueError, match="does not fit"):
        Diffusion(pred="eps")
    # The objective is a class: flow has no learned variance to ask for (and the command line refuses
    # --learn-sigma without --objective ddpm, test_recipes.py); an objective outside the table is no choice.
    with pytest.raises(TypeError, match="learn_sigma"):
        Diffusion(learn_sigma=True)
    assert OBJECTIVES == ("flow", "ddpm") and SAMPLERS == {"flow": Diffusion.samplers, "ddpm": DDPM.samplers}
    with pytest.raises(SystemExit) as refused:
        get_args(["--objective", "no-such-objective"])
    assert refused.value.code == 2 and "invalid choice: 'no-such-objective'" in capsys.readouterr().err


@pytest.mark.parametrize("n", [30, 50, 250, 7, 1000, 3])
def test_ddim_spacing_is_adms_ddimN_stride(n):
    """ADM's "ddimN" (guided-diffusion respace.space_timesteps, copied unchanged by DiT): the smallest integer
    stride s with len(range(0, 1000, s)) == N. That length is ceil(1000 / s), so the stride is ceil(1000 / N)
    whenever it fits -- also when N does not divide 1000 (N = 30: stride 34, 0 .. 986, not the even
    spacing)."""
    s = -(-1000 // n)
    # the smallest that fits
    assert len(range(0, 1000, s)) == n and (s == 1 or len(range(0, 1000, s - 1)) != n)
    assert spaced_steps(1000, n, "ddim") == list(range(0, 1000, s))


@pytest.mark.parametrize("n, neighbours", [(37, "36 or 38"), (400, "334 or 500"), (1, "2")])
def test_ddim_spacing_without_an_integer_stride_raises(n, neighbours):
    """No stride gives exactly N steps (37: stride 27 gives 38, stride 28 gives 36; 1: ADM's strides stop
    below 1000): ADM raises, and so do we, naming the counts that work and the ancestral sampler, which spaces
    any count evenly."""
    assert not any(len(range(0, 1000, s)) == n for s in range(1, 1000))
    with pytest.raises(ValueError, match=f"{neighbours}.*--sampler ddpm"):
        spaced_steps(1000, n, "ddim")


def test_ancestral_spacing_rounds_as_adm_accumulates():
    """ADM's plain "N": steps round(c) for c = 0, f, f + f, ... with f = (total - 1) / (N - 1), the float sum
    built up step by step. The sum lands just below the ties that i * f hits exactly (21 steps of 1000: 10 *
    49.95 sums to 499.49999..., so ADM keeps step 499 where round(499.5) would give 500)."""
    for total in (1000, 100):
        for n in range(2, total + 1):
            f, c, want = (total - 1) / (n - 1), 0.0, []
            for _ in range(n):
                want.append(round(c))
                c += f
            assert spaced_steps(total, n, "ddpm") == want, (total, n)
    assert spaced_steps(1000, 21, "ddpm")[10] == 499
    # our one deviation: ADM's [0] would return the noise almost as is
    assert spaced_steps(1000, 1, "ddpm") == [999]


@pytest.mark.parametrize("spacing,steps", [("time", 1), ("time", 10), ("logsnr", 2), ("logsnr", 50),
                                           ("ddim", 10), ("ddpm", 13)])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_dpm_solver_lands_on_the_single_data_point(spacing, steps, learn_sigma):
    x0 = torch.randn(2, 3, 4, 4)
    diff = DDPM(learn_sigma=learn_sigma)

    def predict(x, t):
        alphas_cumprod = diff.chain.alphas_cumprod_at((t.double() * 1000).tolist()).float().view(-1, 1, 1, 1)
        eps = (x - alphas_cumprod.sqrt() * x0) / (1 - alphas_cumprod).sqrt()
        return torch.cat([eps, torch.zeros_like(x)], 1) if learn_sigma else eps
    out = diff.sample(predict, torch.randn(2, 3, 4, 4), Sampling("dpm++2m", steps, spacing))
    assert torch.allclose(out, x0, atol=1e-4)


def test_time_and_logsnr_spacings():
    alphas_cumprod = Chain(ddpm_betas()).alphas_cumprod
    assert spaced_steps(1000, 1, "time") == [999]
    assert spaced_steps(1000, 4, "time") == [250, 500, 749, 999]  # round(249.75) = 250, round(749.25) = 749
    with pytest.raises(ValueError, match="round to only"):
        spaced_steps(1000, 1000, "time")  # round(499.5) = round(500.499) = 500
    # fractional, from step 0 to step 999, evenly in log sigma
    steps = spaced_steps(1000, 50, "logsnr", alphas_cumprod)
    assert len(steps) == 50 and steps[0] == pytest.approx(0) and steps[-1] == pytest.approx(999)
    at_steps = Chain(ddpm_betas()).alphas_cumprod_at(steps)
    log_sigma = 0.5 * ((1 - at_steps) / at_steps).log()
    gaps = log_sigma.diff()
    assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=1e-6)
    with pytest.raises(ValueError, match="fractional steps"):
        DDPM().sample(lambda x, t: x, torch.zeros(1, 3, 2, 2), Sampling("ddim", 5, "logsnr"))
    with pytest.raises(ValueError, match="unknown step spacing"):
        spaced_steps(1000, 5, "no-such-spacing")
