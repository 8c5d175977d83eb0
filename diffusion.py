"""
Diffusion: the noising processes, their losses and samplers, classifier-free guidance, and `generate`, which
draws a batch of guided samples from fixed per-seed noise.

Two objectives behind one interface (`Diffusion`), so every architecture and conditioning route trains and
samples through the same code:

    flow (default, SD3)  x_t = (1 - t) x_0 + t eps         t in [0, 1], t = 0 data, t = 1 pure noise
                         target v = eps - x_0              t ~ sigmoid(N(mean, std)), then shifted
                         samplers: Euler, Heun (integrate dx/dt = v from t = 1 to 0), DPM-Solver++(2M)
    ddpm (DiT, LDM)      x_k = sqrt(ab_k) x_0 + sqrt(1 - ab_k) eps,  k = 0 .. 999,  ab = prod(1 - beta)
                         target eps (+ a learned variance trained by the variational bound, DiT's "learn
                         sigma") samplers: DDIM (eta = 0), ancestral (DDPM), DPM-Solver++(2M)

The network always receives a time in [0, 1] where 1 is noise: t for flow, k / 1000 for ddpm (the time
embedder multiplies by 1000, so a DiT checkpoint sees its own integer steps).

Resolution shift (noise-schedule scaling, flow only): more tokens carry more redundant signal, so the same t
destroys less information at a higher resolution. We push t towards noise with t' = a t / (1 + (a - 1) t),
a = shift * sqrt(tokens / base_tokens), for training and for the sampler's time grid alike.
"""
import bisect
import math
from typing import NamedTuple

import torch

from conditioning import padding_noise

OBJECTIVES = ("flow", "ddpm")
PREDS = {"flow": ("v", "x"), "ddpm": ("eps",)}
BETA_SCHEDULES = ("linear", "ldm")
SAMPLERS = {"flow": ("euler", "heun", "dpm++2m"), "ddpm": ("ddim", "ddpm", "dpm++2m")}
# which of the 1000 DDPM steps an n-step sampler visits (spaced_steps); each sampler's own by default
SPACINGS = ("ddim", "ddpm", "time", "logsnr")
DEFAULT_SPACING = {"ddim": "ddim", "ddpm": "ddpm", "dpm++2m": "time"}
CFG_SCHEDULES = ("constant", "power-cosine")

#################################################################################
#                        Flow: noise-level schedule                             #
#################################################################################


def shift_time(t, alpha):
    """t' = alpha t / (1 + (alpha - 1) t); alpha = 1 is the identity, alpha > 1 moves every t towards
    noise."""
    return alpha * t / (1 + (alpha - 1) * t)


def resolution_shift(tokens, base_tokens):
    """alpha = sqrt(tokens / base_tokens): 1 at the base resolution, 2 for 4x the tokens (256 -> 512)."""
    return math.sqrt(tokens / base_tokens)


def noise_shift(shift, res, base_res):
    """alpha for training and sampling at `res`: the base shift times the resolution shift (at a fixed patch
    size the token ratio is the pixel ratio)."""
    return shift * resolution_shift(res ** 2, base_res ** 2)


def sample_t(n, mean=0.0, std=1.0, alpha=1.0, generator=None, device="cpu"):
    """Training noise levels: logit-normal, then shifted. (n,) in (0, 1)."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return shift_time(t, alpha)


def time_grid(steps, alpha=1.0, device="cpu"):
    """steps + 1 noise levels from 1 down to 0, shifted like the training t."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), alpha).float()


def to_velocity(out, x_t, t, pred, min_t=0.05):
    """The velocity implied by the network output: itself (pred v) or, for pred x (the network outputs the
    clean image), (x_t - x0_hat) / t, computed in fp32 so t is never rounded to bf16. For the training loss t
    is clamped at `min_t`: near data the division would weigh the error of x0_hat without bound. The samplers
    pass min_t=0, the exact velocity of the ODE (they never evaluate at t = 0, and an Euler step of length t
    from t lands on x0_hat itself, where a clamped velocity would stop short of it)."""
    if pred == "v":
        return out
    t = t.float().clamp(min=min_t) if min_t else t.float()
    return (x_t.float() - out.float()) / t.view(-1, *([1] * (x_t.ndim - 1)))


def to_data(out, x_t, t, pred):
    """The clean image implied by the network output (the data prediction D of DPM-Solver++): itself (pred x)
    or x_t - t v (pred v), in fp32."""
    if pred == "x":
        return out.float()
    return x_t.float() - t.float().view(-1, *([1] * (x_t.ndim - 1))) * out.float()


#################################################################################
#                     DDPM: a discrete chain of 1000 steps                      #
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
        self.ab = torch.cumprod(1 - betas, 0)
        self.ab_prev = torch.cat([torch.ones(1, dtype=betas.dtype), self.ab[:-1]])
        post_var = betas * (1 - self.ab_prev) / (1 - self.ab)
        # the first posterior variance is 0: clip its log to the second one (ADM)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.coef_x0 = betas * self.ab_prev.sqrt() / (1 - self.ab)
        self.coef_xt = (1 - self.ab_prev) * (1 - betas).sqrt() / (1 - self.ab)

    def respaced(self, keep):
        """The chain that visits only the steps `keep` (sorted): its betas join the skipped steps (ADM
        respacing)."""
        ab_kept = self.ab[list(keep)]
        prev = torch.cat([torch.ones(1, dtype=ab_kept.dtype), ab_kept[:-1]])
        return Chain(1 - ab_kept / prev, steps=self.steps[list(keep)])

    def ab_at(self, steps):
        """ab at (possibly fractional) steps, float64: log sigma, sigma = sqrt((1 - ab) / ab), interpolated
        linearly between integer steps (diffusers' _sigma_to_t, inverted); the chain's own value at an
        integer step."""
        log_sigma = 0.5 * ((1 - self.ab) / self.ab).log()

        def one(k):
            if k == int(k):
                return self.ab[int(k)]
            lo = min(int(k), len(self.ab) - 2)
            return 1 / (1 + (2 * ((lo + 1 - k) * log_sigma[lo] + (k - lo) * log_sigma[lo + 1])).exp())
        return torch.stack([one(k) for k in steps])

    @staticmethod
    def at(values, j, x):
        """values[j] for j (B,) as a float32 (B, 1, ..., 1) tensor on x's device."""
        return values.to(x.device)[j].float().view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, j, noise):
        return self.at(self.ab.sqrt(), j, x0) * x0 + self.at((1 - self.ab).sqrt(), j, x0) * noise

    def predict_x0(self, x_t, j, eps):
        return (x_t - self.at((1 - self.ab).sqrt(), j, x_t) * eps) / self.at(self.ab.sqrt(), j, x_t)

    def posterior(self, x0, x_t, j):
        """Mean and log-variance of q(x_{j-1} | x_j, x_0)."""
        mean = self.at(self.coef_x0, j, x_t) * x0 + self.at(self.coef_xt, j, x_t) * x_t
        return mean, self.at(self.post_logvar, j, x_t)

    def model_logvar(self, out_var, j):
        """Learned variance: out_var in [-1, 1] interpolates the log-variance between the posterior's and
        beta's."""
        frac = (out_var.float() + 1) / 2
        high, low = self.at(self.betas.log(), j, out_var), self.at(self.post_logvar, j, out_var)
        return frac * high + (1 - frac) * low


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


def check_spacing(sampler, spacing):
    """The logsnr spacing visits fractional steps, which only DPM-Solver++ takes; the other DDPM samplers walk
    integer ones. (An unknown spacing is refused by spaced_steps.)"""
    if spacing == "logsnr" and sampler != "dpm++2m":
        raise ValueError("the logsnr spacing visits fractional steps, which only dpm++2m takes; --sampler "
                         f"{sampler} walks integer steps: use spacing ddim, ddpm or time")


def spaced_steps(total, n, method, ab=None):
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
               sqrt((1 - ab) / ab), evenly from the last step's to step 0's, each mapped to a fractional step
               by linear interpolation between integer steps (diffusers' sigmas; it then rounds the step it
               feeds the network, which repeats steps near the data from 50 steps on, and we do not). Needs
               the chain's `ab`; DPM-Solver++ only, as the other samplers walk integer steps."""
    if not 1 <= n <= total:
        raise ValueError(f"sampling steps must be in 1..{total}, got {n}")
    if method in ("time", "logsnr"):
        if method == "logsnr":  # fractional steps: rounded, 50 of 1000 would repeat steps near the data
            log_sigma = (0.5 * ((1 - ab) / ab).log()).tolist()  # rises with the step
            ends = torch.linspace(log_sigma[-1], log_sigma[0], n, dtype=torch.float64).tolist()
            return sorted(_interp(v, log_sigma) for v in ends)
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
    # the running float sum, as ADM builds it: where i * stride is an exact .5 the sum falls just below, and
    # rounding it (not i * stride) gives ADM's steps (21 of 1000: step 499, not 500)
    stride, c, steps = (total - 1) / (n - 1), 0.0, []
    for _ in range(n):
        steps.append(round(c))
        c += stride
    return steps


def _interp(v, ys):
    """The fractional index at which the increasing sequence ys reaches v (clamped to its ends)."""
    j = max(1, min(len(ys) - 1, bisect.bisect_left(ys, v)))
    return min(max(j - 1 + (v - ys[j - 1]) / (ys[j] - ys[j - 1]), 0.0), len(ys) - 1.0)


def dpm_solver_2m(data, x, alphas, sigmas, it):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2 with the midpoint rule; diffusers'
    DPMSolverMultistepScheduler at solver_order=2, k-diffusion's and SD3's sample_dpmpp_2m). Between two noise
    levels of x = alpha x0 + sigma eps the probability-flow ODE is solved exactly in its linear part, with the
    data prediction D taken as linear in lambda = log(alpha / sigma) through the last two evaluations:

        h        = lambda_{i+1} - lambda_i
        x_{i+1}  = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^-h - 1) D'
        D'       = D_i                                        the first step, and the last one onto sigma = 0
        D'       = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   r = (lambda_i - lambda_{i-1}) / h    otherwise

    alphas, sigmas (n + 1,): the levels visited, from noise to sigma = 0; data(x, i): D at level i. One
    network evaluation per step. lambda = +inf at sigma = 0 (and -inf at alpha = 0) is taken in its stride:
    e^-h = 0 there, and the last step returns D itself."""
    alphas, sigmas = alphas.double().cpu(), sigmas.double().cpu()
    lam = alphas.log() - sigmas.log()
    prev = None
    for i in it:
        d = data(x, i).float()
        h = lam[i + 1] - lam[i]
        mixed = d
        if prev is not None and sigmas[i + 1] > 0:
            r = float((lam[i] - lam[i - 1]) / h)
            mixed = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev
        x = float(sigmas[i + 1] / sigmas[i]) * x.float() - float(alphas[i + 1] * torch.expm1(-h)) * mixed
        prev = d
    return x


#################################################################################
#                        The process: loss and sampling                         #
#################################################################################


class Diffusion:
    """One objective's training loss and sampler. `predict(x, t)` in `sample` returns the raw network
    output."""

    def __init__(self, objective="flow", pred=None, alpha=1.0, t_mean=0.0, t_std=1.0, beta_schedule="linear",
                 learn_sigma=False, num_steps=1000, min_snr=0.0):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown --objective {objective!r}; choose one of {OBJECTIVES}")
        if learn_sigma and objective != "ddpm":
            raise ValueError("--learn-sigma applies to --objective ddpm only")
        pred = pred or PREDS[objective][0]
        if pred not in PREDS[objective]:
            raise ValueError(f"--pred {pred!r} does not fit --objective {objective}; choose one of "
                             f"{PREDS[objective]}")
        self.objective, self.pred, self.alpha, self.t_mean, self.t_std = objective, pred, alpha, t_mean, t_std
        self.learn_sigma, self.num_steps, self.min_snr = learn_sigma, num_steps, min_snr
        self.chain = Chain(ddpm_betas(beta_schedule, num_steps)) if objective == "ddpm" else None

    # ---- training
    # -----------------------------------------------------------------------------------------------
    def loss(self, model, x0, generator=None, **cond):
        """Per-sample loss (B,); the noise level, then the noise, are drawn from `generator`. A model may
        return n stacked predictions (n B, ...) of the same inputs (the unmasked and masked passes of mDT);
        their losses are summed."""
        B = x0.shape[0]
        if self.objective == "flow":
            t = sample_t(B, self.t_mean, self.t_std, self.alpha, generator, x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            out = model(x_t, t, **cond)
            n = out.shape[0] // B
            v = to_velocity(out, x_t.repeat(n, 1, 1, 1), t.repeat(n), self.pred)
            per = ((v.float() - (noise - x0).float().repeat(n, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
            return per.view(n, B).sum(0)
        k = torch.randint(0, self.num_steps, (B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = self.chain.q_sample(x0, k, noise)
        out = model(x_t, k.float() / self.num_steps, **cond)
        n, C = out.shape[0] // B, x0.shape[1]
        x0n, x_tn, kn = x0.repeat(n, 1, 1, 1), x_t.repeat(n, 1, 1, 1), k.repeat(n)
        eps = out[:, :C].float()
        per = ((eps - noise.float().repeat(n, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
        # min-SNR-gamma (Hang et al. 2023; mDT-v2): the eps loss weighted by min(SNR, gamma) / SNR
        if self.min_snr > 0:
            snr = (self.chain.ab / (1 - self.chain.ab)).to(x0.device)[kn]
            per = per * (snr.clamp(max=self.min_snr) / snr).float()
        # the variational bound trains the variance only: the mean is frozen (ADM's L_hybrid)
        if self.learn_sigma:
            per = per + self.vb_term(eps.detach(), out[:, C:], x0n.float(), x_tn.float(), kn)
        return per.view(n, B).sum(0)

    def vb_term(self, eps, out_var, x0, x_t, k):
        """Bits per dimension of the chain's step k under the model: KL to the true posterior, or the
        decoder's negative log-likelihood at k = 0."""
        mean, logvar = self.chain.posterior(self.chain.predict_x0(x_t, k, eps), x_t, k)
        model_logvar = self.chain.model_logvar(out_var, k)
        true_mean, true_logvar = self.chain.posterior(x0, x_t, k)
        kl = normal_kl(true_mean, true_logvar, mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(k == 0, nll, kl)

    # ---- sampling
    # -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, predict, noise, steps=50, method=None, progress=False, generator=None, spacing=None):
        """From noise to data in `steps` network evaluations (Heun: about twice as many). method None: euler
        (flow) or ddim (ddpm); spacing (ddpm): which of the 1000 steps are visited, the method's own
        (DEFAULT_SPACING) when None. `generator` feeds the ancestral sampler's fresh noise; every other
        sampler is deterministic given `noise`."""
        method = method or SAMPLERS[self.objective][0]
        if method not in SAMPLERS[self.objective]:
            raise ValueError(f"sampler {method!r} does not fit --objective {self.objective}; choose one of "
                             f"{SAMPLERS[self.objective]}")
        it = range(steps)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="sampling", leave=False)
        if self.objective == "flow":
            return self._flow(predict, noise, steps, method, it)
        return self._ddpm(predict, noise, steps, method, it, generator, spacing or DEFAULT_SPACING[method])

    def _flow(self, predict, noise, steps, method, it):
        ts = time_grid(steps, self.alpha, noise.device)
        at = lambda i: ts[i].expand(noise.shape[0])
        if method == "dpm++2m":
            # the flow ODE dx/dt = (x - D) / t is the probability-flow ODE of alpha = 1, sigma = t: lambda =
            # -log t, as SD3's reference sampler (sd3.5 sd3_impls.py, sample_dpmpp_2m) integrates it.
            # diffusers' flow setting (use_flow_sigmas) takes alpha = 1 - t instead, whose lambda is -inf at t
            # = 1: its second step would fall back to first order from our grid, which starts at pure noise.
            data = lambda x, i: to_data(predict(x, at(i)), x, at(i), self.pred)
            return dpm_solver_2m(data, noise, torch.ones_like(ts), ts, it)
        velocity = lambda x, t: to_velocity(predict(x, t), x, t, self.pred, min_t=0).float()
        x = noise
        for i in it:
            t, t_next = ts[i], ts[i + 1]
            v = velocity(x, at(i))
            x_next = x + (t_next - t) * v
            if method == "heun" and t_next > 0:  # trapezoidal correction, skipped on the final step to t = 0
                v_next = velocity(x_next, at(i + 1))
                x_next = x + (t_next - t) * 0.5 * (v + v_next)
            x = x_next
        return x

    def _ddpm(self, predict, noise, steps, method, it, generator, spacing):
        check_spacing(method, spacing)
        keep = spaced_steps(self.num_steps, steps, spacing, self.chain.ab)
        x, B, C = noise, noise.shape[0], noise.shape[1]
        if method == "dpm++2m":
            levels = list(reversed(keep))  # from noise to data
            ab = self.chain.ab_at(levels)
            alphas = torch.cat([ab.sqrt(), torch.ones(1, dtype=ab.dtype)])  # the last level: sigma = 0, data
            sigmas = torch.cat([(1 - ab).sqrt(), torch.zeros(1, dtype=ab.dtype)])

            def data(x, i):  # eps -> x0, in fp32
                k = torch.full((B,), levels[i] / self.num_steps, device=x.device)
                eps = predict(x, k).float()[:, :C]
                return (x.float() - float(sigmas[i]) * eps) / float(alphas[i])
            return dpm_solver_2m(data, noise, alphas, sigmas, it)
        chain = self.chain.respaced(keep)
        for i in it:
            j = torch.full((B,), len(chain.steps) - 1 - i, dtype=torch.long, device=x.device)
            k = chain.steps.to(x.device)[j]  # the original step index the network was trained on
            out = predict(x, k.float() / self.num_steps).float()
            eps = out[:, :C]
            x0 = chain.predict_x0(x, j, eps)
            if method == "ddim":  # eta = 0: move to the next noise level along the predicted eps
                ab_prev = chain.at(chain.ab_prev, j, x)
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
                continue
            mean, logvar = chain.posterior(x0, x, j)
            if self.learn_sigma:
                logvar = chain.model_logvar(out[:, C:], j)
            z = (torch.randn(x.shape, generator=generator, device=x.device)
                 if j[0] > 0
                 else torch.zeros_like(x))
            x = mean + (0.5 * logvar).exp() * z
        return x


#################################################################################
#                        Classifier-free guidance                               #
#################################################################################


class Sampling(NamedTuple):
    """How samples are drawn: the sampler and its step grid, and the guidance. A run's own come from its flags
    (config.run_sampling), which its recipe sets; sample.py's flags override them."""

    method: str = None  # None: the objective's first sampler (euler, ddim)
    steps: int = 50  # network evaluations (Heun: about twice as many)
    spacing: str = None  # ddpm: which of the 1000 steps are visited; None: the method's own
    scale: float = 1.0  # semantic guidance, 1 = none
    ctrl: float = 0.0  # control guidance, 0 = none
    interval: tuple = (0.0, 1.0)  # guide only while t is in [lo, hi]
    schedule: str = "constant"  # the semantic scale along t: constant or power-cosine (mDT-v2)
    power: float = 4.0  # power-cosine's exponent


def semantic_scale(sampling, t):
    """The semantic guidance scale at network time t (1 = noise, 0 = data).

    constant      sampling.scale everywhere
    power-cosine  mDT-v2's (sail-sg/MDT, masked_diffusion/models.py, forward_with_cfg, l. 513-515):
                  1 + (scale - 1) (1 - cos(pi (1 - t)^power)) / 2, which is 1 (no guidance) at pure noise and
                  rises to `scale` at the data; power 4 (scripts/image_sample.py's --scale_pow) keeps it near
                  1 for most of the trajectory (at t = 0.5 the weight is 0.01). MDT passes t = k / 1000 for
                  its DDPM steps k, the network time here."""
    if sampling.schedule == "constant":
        return sampling.scale
    if sampling.schedule == "power-cosine":
        weight = (1 - math.cos(math.pi * (1 - t) ** sampling.power)) / 2
        return 1 + (sampling.scale - 1) * weight
    raise ValueError(f"unknown guidance schedule {sampling.schedule!r}; choose one of {CFG_SCHEDULES}")


def guided_prediction(model, x, t, y, ctrl, s_sem=1.0, s_ctrl=0.0, interval=(0.0, 1.0)):
    """Guided network output; guidance acts on ALL data channels (DiT-derived code famously guides only 3 of
    4).

        out = out(0s, c) + s_sem (out(s, c) - out(0s, c)) + s_ctrl (out(s, c) - out(s, 0c))

    0s / 0c: the null semantic condition (null class or null prompt) / the null control, selected by the
    model's sem_drop / ctrl_drop flags. The control c is kept in both semantic branches. Only the branches
    whose weight is not zero run, batched into one forward pass: (0s, c) only when s_sem != 1, (s, 0c) only
    when s_ctrl != 0. Outside `interval` (a range of t) guidance is off and out = out(s, c). s_sem = 1, s_ctrl
    = 0 is exactly the conditional prediction (and costs one pass). Guiding the raw output is the same as
    guiding the velocity or eps it implies: they are affine in it with the same x_t and t in every branch.
    Channels beyond the data's (a learned variance) are taken from the conditional branch. y: labels (B,) or a
    prompt's (features, mask[, padding noise]), every part repeated alike for every branch.
    """
    B, C = x.shape[0], x.shape[1]
    t_now = float(t.reshape(-1)[0])
    if not interval[0] <= t_now <= interval[1] or (s_sem == 1.0 and s_ctrl == 0.0):
        return model(x, t, y=y, ctrl=ctrl)
    # (drop semantic, drop control) of each branch; a branch whose difference has weight zero is not run
    flags = [(False, False)] + ([(True, False)] if s_sem != 1.0 else []) + ([(False, True)] if s_ctrl else [])
    n = len(flags)
    drop = lambda i: torch.tensor([f[i] for f in flags for _ in range(B)], device=x.device)
    rep = lambda v: v.repeat(n, *([1] * (v.ndim - 1)))
    out = model(x.repeat(n, 1, 1, 1), t.repeat(n), y=tuple(map(rep, y)) if isinstance(y, tuple) else rep(y),
                ctrl=ctrl.repeat(n, 1), ctrl_drop=drop(1), sem_drop=drop(0))
    out = out.float().view(n, B, *out.shape[1:])
    cond = out[0, :, :C]
    guided = cond
    if s_sem != 1.0:
        guided = out[1, :, :C] + s_sem * (cond - out[1, :, :C])
    if s_ctrl:  # the null-control branch is the last one
        guided = guided + s_ctrl * (cond - out[-1, :, :C])
    return torch.cat([guided, out[0, :, C:]], dim=1)


#################################################################################
#                        Sampling a batch, in chunks                            #
#################################################################################


def make_noise(seeds, shape, device):
    """One noise tensor per seed, independent of batch composition: (len(seeds), *shape)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def generate(model, diffusion, noise, y, ctrl, sampling=Sampling(), batch=256, progress=False, seed=0,
             seeds=None):
    """Latents for labels y (B,) (or a prompt's (features, mask)) and controls ctrl (B, S) from the given
    noise (B, C, H, W), in chunks of `batch`, drawn as `sampling` says (guided by guided_prediction).
    `seed` feeds the ancestral (ddpm) sampler's fresh noise; the other samplers are deterministic given
    `noise`. `seeds` (B,), the seeds of the samples' noise (default seed, seed + 1, ...), seed their text
    padding noise (noisy_replicate): drawn once per sample here, it is the same in every guidance branch and
    step, and a prompt with a seed gives the same image in any batch, on any rank, whatever the global RNG did
    before."""
    if isinstance(y, tuple) and len(y) == 2:  # a prompt: (features, mask) -> (features, mask, padding noise)
        B, L, d = y[0].shape
        seeds = range(seed, seed + B) if seeds is None else seeds
        y = (*y, padding_noise(seeds, L, d, y[0].device))
    out = []
    gen = torch.Generator(noise.device).manual_seed(seed)
    for i in range(0, noise.shape[0], batch):
        # labels or a prompt
        yi = tuple(v[i : i + batch] for v in y) if isinstance(y, tuple) else y[i : i + batch]
        ci = ctrl[i : i + batch]

        def fn(x, t):
            s_sem = semantic_scale(sampling, float(t.reshape(-1)[0]))
            return guided_prediction(model, x, t, yi, ci, s_sem, sampling.ctrl, sampling.interval)
        out.append(diffusion.sample(fn, noise[i : i + batch], sampling.steps, sampling.method, progress, gen,
                                    sampling.spacing))
    return torch.cat(out)
