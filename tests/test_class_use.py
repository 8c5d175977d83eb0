"""experiments/class_use.py: where a model uses its class and where its objective spends its loss, by noise
level (docs/samplers.md's DiT-objective section rests on it)."""
import math

import pytest
import torch

from build import TrainedModel, make_model
from config import get_args
from conftest import TINY, facts_of, perturb
from ddpm import DDPM, ddpm_betas
from diffusion import Diffusion
from experiments import class_use


@pytest.mark.parametrize("diffusion", [Diffusion("x", alpha=3.0), DDPM("eps")], ids=["flow", "ddpm"])
def test_a_draw_lands_at_the_signal_to_noise_ratio_asked_for(diffusion):
    ones, zeros = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    for log_snr in (-9.0, -3.0, 0.0, 1.0, 5.0):
        a = class_use.noised_at(diffusion, ones, zeros, log_snr).x_t[0, 0, 0, 0]  # x_t = a x0 + s eps
        s = class_use.noised_at(diffusion, zeros, ones, log_snr).x_t[0, 0, 0, 0]
        got = math.log(a ** 2 / s ** 2)
        # flow reaches the level exactly; DDPM takes the nearest of its 1000 steps (spaced < 0.2 here)
        assert got == pytest.approx(log_snr, abs=1e-4 if diffusion.objective == "flow" else 0.2)


def test_the_clean_prediction_inverts_each_parameterisation():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with_variance = torch.cat([noise, torch.randn_like(noise)], 1)  # eps, then the variance channels
    for diffusion, out in ((Diffusion("x"), lambda: x0), (Diffusion("v"), lambda: noise - x0),
                           (DDPM("eps", learn_sigma=True), lambda: with_variance)):
        noised = class_use.noised_at(diffusion, x0, noise, 0.7)
        assert torch.allclose(class_use.clean_prediction(diffusion, out(), noised), x0, atol=1e-5)


def test_the_training_levels_density_matches_each_objectives_own_distribution():
    for mean, std, alpha in ((0.0, 1.0, 3.0), (-0.5, 1.5, 1.0)):
        flow = Diffusion("x", alpha=alpha, t_mean=mean, t_std=std)
        for edge in (-4.0, 0.0, 3.0):
            # SNR below e^edge is t above t_e = 1 / (1 + e^(edge / 2)); before the shift, u above
            # u_e = t_e / (alpha - (alpha - 1) t_e); u = sigmoid(z), z ~ N(mean, std)
            t_e = 1 / (1 + math.exp(edge / 2))
            u_e = t_e / (alpha - (alpha - 1) * t_e)
            z_e = (math.log(u_e / (1 - u_e)) - mean) / std
            expected = 0.5 * (1 - math.erf(z_e / math.sqrt(2)))
            below = class_use.level_density(flow, [-10.0, edge, 10.0])[0]
            assert below == pytest.approx(expected, abs=0.005), (mean, std, alpha, edge)
    # DDPM: the step k is uniform, so the share below a level is the fraction of the 1000 steps below it
    alphas_cumprod = torch.cumprod(1 - ddpm_betas("linear"), 0)
    log_snr = torch.log(alphas_cumprod / (1 - alphas_cumprod))
    for edge in (-4.0, 0.0, 3.0):
        below = class_use.level_density(DDPM("eps"), [-10.0, edge, 10.0])[0]
        assert below == pytest.approx(float((log_snr < edge).double().mean()))
    assert sum(class_use.level_density(DDPM("eps"))) == pytest.approx(1.0)


def untrained(flags):
    """A TrainedModel of TINY's configuration with `flags`, its zero-initialised layers made random so every
    path (the class's included) reaches the output."""
    args = get_args(TINY + flags)
    facts = facts_of(args)
    return TrainedModel(perturb(make_model(args, facts)).eval(), None, args, facts)


def measured(trained, images=16):
    pixels, labels, ctrl = class_use.held_out_shapes(images, trained.facts.res)
    return class_use.measure(trained, pixels, labels, ctrl, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("objective", [[], ["--objective", "ddpm", "--pred", "eps", "--learn-sigma"]],
                         ids=["flow", "ddpm"])
def test_a_model_that_cannot_tell_its_classes_apart_shows_no_class_gain(objective):
    trained = untrained(objective)
    assert any(abs(r["class_gain"]) > 1e-6 for r in measured(trained)["levels"])  # the class rows differ
    table = trained.model.y_embed.table.weight
    with torch.no_grad():
        table[:-1] = table[-1]  # every class row is the null row: the class cannot be read
    assert all(r["class_gain"] == 0 for r in measured(trained)["levels"])


def test_the_ddpm_loss_share_is_the_eps_loss_alone_with_its_min_snr_weighting():
    trained = untrained(["--objective", "ddpm", "--pred", "eps", "--learn-sigma"])
    shares = [r["loss_share"] for r in measured(trained)["levels"]]
    final = trained.model.final.linear  # output feature f is channel f % 6: eps 0..2, then the variance 3..5
    with torch.no_grad():
        variance = torch.arange(final.out_features) % 6 >= 3
        final.weight[variance] *= 3.0
        final.bias[variance] += 1.0
    assert [r["loss_share"] for r in measured(trained)["levels"]] == shares  # the variance term is left out
    weighted = trained._replace(args=get_args(TINY + ["--objective", "ddpm", "--pred", "eps", "--learn-sigma",
                                                      "--min-snr", "5"]))
    noisy = lambda run: run["loss_share_below_snr_1"]
    # min(SNR, 5) / SNR lowers the loss of the levels above SNR 5 only: the noisy levels' share grows
    assert noisy(measured(weighted)) > noisy(measured(trained)) + 0.05
