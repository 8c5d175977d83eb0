"""
DDPM: DiT's and LDM's objective, a discrete Gaussian chain of 1000 steps (Ho et al. 2020; ADM's
GaussianDiffusion, which DiT copies), behind the flow objective's interface (diffusion.Diffusion).

    x_k = sqrt(alphas_cumprod_k) x_0 + sqrt(1 - alphas_cumprod_k) eps,   k = 0 .. 999,
    alphas_cumprod = prod(1 - beta)
    target eps (+ a learned variance trained by the variational bound, DiT's "learn sigma")
    samplers: DDIM (eta = 0), ancestral (DDPM), DPM-Solver++(2M), on a subset of the steps (a spacing)

The network reads the time t = k / 1000 (its time embedder multiplies by 1000, so a DiT checkpoint sees its
own integer steps). The table at the end (SAMPLERS, OBJECTIVES) names both objectives for the command line.
"""
import bisect
import copy
import math

import torch

from diffusion import Diffusion, Noised, Sampling, dpm_solver_2m

DDPM_PREDS = ("eps",)
DDPM_SAMPLERS = ("ddim", "ddpm", "dpm++2m")  # the default first
BETA_SCHEDULES = ("linear", "ldm")
# which of the 1000 steps an n-step sampler visits (spaced_steps); each sampler's own by default
SPACINGS = ("ddim", "ddpm", "time", "logsnr")
DEFAULT_SPACING = {"ddim": "ddim", "ddpm": "ddpm", "dpm++2m": "time"}

#################################################################################
#                     The chain of 1000 steps                                   #
#################################################################################

def ddpm_betas(schedule="linear", steps=1000):
    """linear: ADM / DiT, beta from 1e-4 to 0.02 (scaled to keep the chain's total noise at other lengths);
    ldm: LDM's schedule, linear in sqrt(beta) from 0.0015 to 0.0195."""
    if schedule == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if schedule == "ldm":
        return torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown --beta-schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


class Chain:
    """The float64 quantities of a Gaussian chain with the given betas (ADM's GaussianDiffusion, reduced to
    what training and sampling use). `steps` are the original step indices the chain's entries stand for."""

    def __init__(self, betas, steps=None):
        self.betas = betas
        self.steps = torch.arange(len(betas)) if steps is None else torch.as_tensor(steps)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=betas.dtype), self.alphas_cumprod[:-1]])
        posterior_var = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # the first posterior variance is 0: clip its log to the second one (ADM)
        self.posterior_logvar = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
        # the posterior mean's coefficients of x0 and of x_t (ADM's posterior_mean_coef1 and 2)
        self.coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.coef_xt = (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)

    def to(self, device):
        """This chain with its tables on `device` (a copy; the CPU's is itself), so that a training step
        indexes them by steps drawn there without waiting for a copy from the host."""
        if torch.device(device) == self.betas.device:
            return self
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(moved, name, value.to(device))
        return moved

    def respaced(self, keep):
        """The chain that visits only the steps `keep` (sorted): its betas join the skipped steps (ADM
        respacing)."""
        kept = self.alphas_cumprod[list(keep)]
        prev = torch.cat([torch.ones(1, dtype=kept.dtype), kept[:-1]])
        return Chain(1 - kept / prev, steps=self.steps[list(keep)])

    def alphas_cumprod_at(self, steps):
        """alphas_cumprod at (possibly fractional) steps, float64: log sigma, with sigma = sqrt((1 -
        alphas_cumprod) / alphas_cumprod), interpolated linearly between integer steps (diffusers'
        _sigma_to_t, inverted); the chain's own value at an integer step."""
        log_sigma = 0.5 * ((1 - self.alphas_cumprod) / self.alphas_cumprod).log()

        def at_step(k):
            if k == int(k):
                return self.alphas_cumprod[int(k)]
            lo = min(int(k), len(self.alphas_cumprod) - 2)
            return 1 / (1 + (2 * ((lo + 1 - k) * log_sigma[lo] + (k - lo) * log_sigma[lo + 1])).exp())
        return torch.stack([at_step(k) for k in steps])

    @staticmethod
    def extract(values, j, x):
        """values[j] for j (B,) as a float32 (B, 1, ..., 1) tensor on x's device (ADM's
        _extract_into_tensor)."""
        return values.to(x.device)[j].float().view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, j, noise):
        """x_j of x0 and the noise: the chain's forward process in one step."""
        return (self.extract(self.alphas_cumprod.sqrt(), j, x0) * x0
                + self.extract((1 - self.alphas_cumprod).sqrt(), j, x0) * noise)

    def predict_x0(self, x_t, j, eps):
        """The clean image implied by x_t and the predicted noise."""
        return ((x_t - self.extract((1 - self.alphas_cumprod).sqrt(), j, x_t) * eps)
                / self.extract(self.alphas_cumprod.sqrt(), j, x_t))

    def posterior(self, x0, x_t, j):
        """Mean and log-variance of q(x_{j-1} | x_j, x_0)."""
        mean = self.extract(self.coef_x0, j, x_t) * x0 + self.extract(self.coef_xt, j, x_t) * x_t
        return mean, self.extract(self.posterior_logvar, j, x_t)

    def model_logvar(self, out_var, j):
        """Learned variance: out_var in [-1, 1] interpolates the log-variance between the posterior's and
        beta's."""
        frac = (out_var.float() + 1) / 2
        high = self.extract(self.betas.log(), j, out_var)
        low = self.extract(self.posterior_logvar, j, out_var)
        return frac * high + (1 - frac) * low


#################################################################################
#                     The variational bound                                     #
#################################################################################

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x, mean, logvar):
    """-log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^logvar) (the chain's last step,
    ADM)."""
    approx_cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    inv_std = torch.exp(-0.5 * logvar)
    cdf_plus = approx_cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = approx_cdf(inv_std * (x - mean - 1 / 255))
    log_p = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                        torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                    (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    return -log_p


#################################################################################
#                     Timestep spacings                                         #
#################################################################################

def check_spacing(sampler, spacing):
    """The logsnr spacing visits fractional steps, which only DPM-Solver++ takes; the other DDPM samplers walk
    integer ones. (An unknown spacing is refused by spaced_steps.)"""
    if spacing == "logsnr" and sampler != "dpm++2m":
        raise ValueError("the logsnr spacing visits fractional steps, which only dpm++2m takes; --sampler "
                         f"{sampler} walks integer steps: use spacing ddim, ddpm or time")


def spaced_steps(total, n, method, alphas_cumprod=None):
    """Which of the `total` steps an n-step sampler visits, ascending. `ddim` and `ddpm` are ADM's
    respace.space_timesteps (DiT's is a copy), `time` and `logsnr` diffusers' DPMSolverMultistepScheduler's.

    ddim       ADM's "ddimN": range(0, total, s) for the smallest integer stride s that gives exactly n steps,
               i.e. s = ceil(total / n) when that fits (n = 30 of 1000: stride 34, steps 0 .. 986). Many n fit
               no stride (37, 400, and 1, as ADM's strides stop below `total`): a ValueError names the nearest
               n that do.
    ddpm       ADM's plain "N" (DiT's sample.py default, "250"): n evenly spaced steps from the first to the
               last, round(c) as c grows by (total - 1) / (n - 1). One deviation: n = 1 takes the last step,
               not ADM's step 0, from which a one-step sampler would hand back its input noise almost
               unchanged.
    time       uniform in time (diffusers' timestep_spacing "linspace", its DPM-Solver default; PixArt-alpha's
               "time_uniform"): round(i (total - 1) / n) for i = 1 .. n, from the last step down, never step 0
               (the sampler's final step goes to the data itself).
    logsnr     uniform in log-SNR (diffusers' use_lu_lambdas, DPM-Solver's "logSNR"): log sigma, sigma =
               sqrt((1 - alphas_cumprod) / alphas_cumprod), evenly from the last step's to step 0's, each
               mapped to a fractional step by linear interpolation between integer steps (diffusers' sigmas;
               it then rounds the step it feeds the network, which repeats steps near the data from 50 steps
               on, and we do not). Needs the chain's `alphas_cumprod`; DPM-Solver++ only, as the other
               samplers walk integer steps."""
    if not 1 <= n <= total:
        raise ValueError(f"sampling steps must be in 1..{total}, got {n}")
    if method in ("time", "logsnr"):
        if method == "logsnr":  # fractional steps: rounded, 50 of 1000 would repeat steps near the data
            log_sigma = (0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()).tolist()  # rises with the step
            ends = torch.linspace(log_sigma[-1], log_sigma[0], n, dtype=torch.float64).tolist()
            return sorted(fractional_index(v, log_sigma) for v in ends)
        # i * stride as numpy.linspace computes it, so that an exact .5 rounds (to even) alike
        steps = sorted({round(i * ((total - 1) / n)) for i in range(1, n)} | {total - 1})
        if len(steps) < n:
            raise ValueError(f"{n} time-uniform steps of {total} round to only {len(steps)} distinct steps: "
                             f"ask for fewer")
        return steps
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"unknown step spacing {method!r}; choose one of {SPACINGS}")
    if method == "ddim":
        # count -> smallest stride giving it
        fitting = {len(range(0, total, s)): s for s in range(total - 1, 0, -1)}
        if n in fitting:
            return list(range(0, total, fitting[n]))
        below, above = [c for c in fitting if c < n], [c for c in fitting if c > n]
        near = [str(c) for c in ([max(below)] if below else []) + ([min(above)] if above else [])]
        raise ValueError(f"DDIM's integer stride (ADM's \"ddim{n}\") cannot make exactly {n} of {total} "
                         f"steps: {' or '.join(near) or 'no count'} can; or use the ancestral sampler "
                         f"(--sampler ddpm), which spaces any number of steps evenly")
    if n == 1:
        return [total - 1]
    # The running float sum, as ADM builds it: where i * stride is an exact .5 the sum falls just below, and
    # rounding it (not i * stride) gives ADM's steps (21 of 1000: step 499, not 500).
    stride, c, steps = (total - 1) / (n - 1), 0.0, []
    for _ in range(n):
        steps.append(round(c))
        c += stride
    return steps


def fractional_index(v, ys):
    """The fractional index at which the increasing sequence ys reaches v (clamped to its ends)."""
    j = max(1, min(len(ys) - 1, bisect.bisect_left(ys, v)))
    return min(max(j - 1 + (v - ys[j - 1]) / (ys[j] - ys[j - 1]), 0.0), len(ys) - 1.0)


def fresh_noise(x, generator):
    """Noise shaped like x for the ancestral sampler's step: from one generator, or from one per sample (a
    list: each sample's own stream, so its noise does not depend on the batch it is drawn in)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device)


#################################################################################
#                     The DDPM objective: loss and sampling                     #
#################################################################################

class DDPM(Diffusion):
    """The DDPM objective: eps-prediction on the chain (+ a learned variance), with min-SNR weighting as an
    option, and its samplers. `alpha` is the resolution shift the run's flags name; the chain does not shift,
    and the value is only recorded with the samples (as for flow)."""

    objective, preds, samplers = "ddpm", DDPM_PREDS, DDPM_SAMPLERS

    def __init__(self, pred=None, beta_schedule="linear", learn_sigma=False, num_steps=1000, min_snr=0.0,
                 alpha=1.0):
        super().__init__(pred, alpha)
        self.learn_sigma, self.num_steps, self.min_snr = learn_sigma, num_steps, min_snr
        self.chain = Chain(ddpm_betas(beta_schedule, num_steps))
        self.chains = {}  # the chain's tables per device, moved once

    def chain_on(self, device):
        """The chain with its tables on `device`, moved there once."""
        if device not in self.chains:
            self.chains[device] = self.chain.to(device)
        return self.chains[device]

    def noised(self, x0, generator=None):
        """The training draw for data x0 (B, C, H, W): the step k, then the noise, from `generator`."""
        k = torch.randint(0, self.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return Noised(self.chain_on(x0.device).q_sample(x0, k, noise), k.float() / self.num_steps, noise, k)

    def prediction_loss(self, out, x0, noised):
        """Per-sample loss (B,) of one prediction `out` (eps, then the variance channels with learn_sigma):
        the eps error, weighted by min-SNR when asked, plus the variational bound's term of the variance."""
        C, k = x0.shape[1], noised.step
        eps = out[:, :C].float()
        per_sample = ((eps - noised.noise.float()) ** 2).mean(dim=(1, 2, 3))
        # min-SNR-gamma (Hang et al. 2023; mDT-v2): the eps loss weighted by min(SNR, gamma) / SNR
        if self.min_snr > 0:
            alphas_cumprod = self.chain_on(x0.device).alphas_cumprod
            snr = (alphas_cumprod / (1 - alphas_cumprod))[k]
            per_sample = per_sample * (snr.clamp(max=self.min_snr) / snr).float()
        # the variational bound trains the variance only: the mean is frozen (ADM's L_hybrid)
        if self.learn_sigma:
            vb = self.vb_term(eps.detach(), out[:, C:], x0.float(), noised.x_t.float(), k)
            per_sample = per_sample + vb
        return per_sample

    def vb_term(self, eps, out_var, x0, x_t, k):
        """Bits per dimension of the chain's step k under the model: KL to the true posterior, or the
        decoder's negative log-likelihood at k = 0."""
        chain = self.chain_on(x_t.device)
        mean, logvar = chain.posterior(chain.predict_x0(x_t, k, eps), x_t, k)
        model_logvar = chain.model_logvar(out_var, k)
        true_mean, true_logvar = chain.posterior(x0, x_t, k)
        kl = normal_kl(true_mean, true_logvar, mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(k == 0, nll, kl)

    @torch.no_grad()
    def sample(self, predict, noise, sampling=None, progress=False, generator=None):
        """From noise to data as `sampling` (a Sampling; None: its defaults) says: its method (None: ddim) in
        its steps network evaluations; its spacing, which of the 1000 steps are visited, the method's own
        (DEFAULT_SPACING) when None. `generator` feeds the ancestral sampler's fresh noise; the other samplers
        are deterministic given `noise`. Its t_min is flow's end point (diffusion.time_grid): the chain ends
        at its own step 0."""
        sampling = sampling or Sampling()
        method, step_range = self.sampler_steps(sampling.method, sampling.steps, progress)
        spacing = sampling.spacing or DEFAULT_SPACING[method]
        check_spacing(method, spacing)
        keep = spaced_steps(self.num_steps, sampling.steps, spacing, self.chain.alphas_cumprod)
        if method == "dpm++2m":
            return self.dpm_solver(predict, noise, keep, step_range)
        return self.walk_chain(predict, noise, self.chain.respaced(keep), method, step_range, generator)

    def dpm_solver(self, predict, noise, keep, step_range):
        """DPM-Solver++(2M) through the (possibly fractional) steps `keep`, from the last to the data."""
        levels = list(reversed(keep))  # from noise to data
        alphas_cumprod = self.chain.alphas_cumprod_at(levels)
        one, zero = torch.ones(1, dtype=alphas_cumprod.dtype), torch.zeros(1, dtype=alphas_cumprod.dtype)
        alphas = torch.cat([alphas_cumprod.sqrt(), one])  # the last level: sigma = 0, the data
        sigmas = torch.cat([(1 - alphas_cumprod).sqrt(), zero])
        B, C = noise.shape[0], noise.shape[1]

        def data(x, i):  # eps -> x0, in fp32
            t = torch.full((B,), levels[i] / self.num_steps, device=x.device)  # the network's time
            eps = predict(x, t).float()[:, :C]
            return (x.float() - float(sigmas[i]) * eps) / float(alphas[i])
        return dpm_solver_2m(data, noise, alphas, sigmas, step_range)

    def walk_chain(self, predict, noise, chain, method, step_range, generator=None):
        """DDIM (eta = 0) or ancestral sampling down the respaced `chain`; `generator` feeds the ancestral
        sampler's fresh noise (fresh_noise: one generator, or one per sample)."""
        x, B, C = noise, noise.shape[0], noise.shape[1]
        for i in step_range:
            j = torch.full((B,), len(chain.steps) - 1 - i, dtype=torch.long, device=x.device)
            k = chain.steps.to(x.device)[j]  # the original step index the network was trained on
            out = predict(x, k.float() / self.num_steps).float()
            eps = out[:, :C]
            x0 = chain.predict_x0(x, j, eps)
            if method == "ddim":  # eta = 0: move to the next noise level along the predicted eps
                alphas_cumprod_prev = chain.extract(chain.alphas_cumprod_prev, j, x)
                x = alphas_cumprod_prev.sqrt() * x0 + (1 - alphas_cumprod_prev).sqrt() * eps
                continue
            mean, logvar = chain.posterior(x0, x, j)
            if self.learn_sigma:
                logvar = chain.model_logvar(out[:, C:], j)
            fresh = j[0] > 0  # no noise on the last step, onto the data
            z = fresh_noise(x, generator) if fresh else torch.zeros_like(x)
            x = mean + (0.5 * logvar).exp() * z
        return x


#################################################################################
#                     Both objectives, for the command line                     #
#################################################################################

# each objective's samplers, its default first
SAMPLERS = {Diffusion.objective: Diffusion.samplers, DDPM.objective: DDPM.samplers}
OBJECTIVES = tuple(SAMPLERS)  # --objective's choices: flow (diffusion.Diffusion), ddpm (DDPM)
