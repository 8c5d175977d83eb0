"""
Diffusion: the flow objective's core (its noise-level schedule, the loss, the samplers), classifier-free
guidance, and `generate`, which draws a batch of guided samples from fixed per-seed noise.

    flow (default, SD3)  x_t = (1 - t) x_0 + t eps         t in [0, 1], t = 0 data, t = 1 pure noise
                         target v = eps - x_0              t ~ sigmoid(N(mean, std)), then shifted
                         samplers: Euler, Heun (integrate dx/dt = v from t = 1 to a fixed t_min, then
                         return the data prediction there), DPM-Solver++(2M)

DDPM, the objective of the DiT and LDM recipes (`--objective ddpm`), is a subclass in ddpm.py with the same
interface (a loss, a sampler), so every architecture and conditioning route trains and samples through the
same code. The network always receives a time in [0, 1] where 1 is noise: t for flow, k / 1000 for ddpm
(the time embedder multiplies by 1000, so a DiT checkpoint sees its own integer steps).

Resolution shift (noise-schedule scaling, flow only): more tokens carry more redundant signal, so the same t
destroys less information at a higher resolution. We push t towards noise with t' = a t / (1 + (a - 1) t),
a = shift * sqrt(tokens / base_tokens), for training and for the sampler's time grid alike.
"""
import math
from typing import NamedTuple

import torch

from conditioning import padding_noise

FLOW_PREDS = ("v", "x")  # what the network predicts: the velocity, or the clean image
FLOW_SAMPLERS = ("euler", "heun", "dpm++2m")  # the default first
# The flow samplers' last evaluation level (time_grid, --t-min): below it the network is not asked. Training
# draws t below 0.05 with probability 2.6e-5 at the shapes recipe (logit-normal, shift 3) and 1.6e-3 at the
# ImageNet default (shift 1), and the x-prediction loss clamps t there; on the default model every sampler
# comes closer to a fine solve from this end point than from 0.01 or 0.02 (docs/samplers.md, "Convergence").
T_MIN = 0.05
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


def time_grid(steps, alpha=1.0, device="cpu", t_min=T_MIN):
    """The flow samplers' noise levels, shifted like the training t: `steps` levels at which the network is
    evaluated, from 1 down to t_min (evenly spaced before the shift, so the last one is t_min after it),
    then 0, where the last step lands on the data prediction D(x, t_min). The end point t_min does not move
    with the step count, so more steps converge to one answer. t_min = 0 is the grid before the fixed end
    point (and older checkpoints' setting): steps + 1 levels evenly from 1 to 0, whose last evaluation
    level, shift_time(1 / steps), moves with the step count (0.058 at 50 steps, 0.0075 at 400, shift 3)."""
    if not t_min:
        levels = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        return shift_time(levels, alpha).float()
    u_min = t_min / (alpha - (alpha - 1) * t_min)  # the unshifted time that shift_time takes to t_min
    levels = torch.linspace(1.0, u_min, steps, device=device, dtype=torch.float64)
    grid = torch.cat([shift_time(levels, alpha), torch.zeros(1, device=device, dtype=torch.float64)])
    if steps > 1:
        grid[-2] = t_min  # exactly, not up to the rounding of the shift
    return grid.float()


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
#                  DPM-Solver++(2M), for flow and for DDPM                      #
#################################################################################


def dpm_solver_2m(data, x, alphas, sigmas, step_range):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2 with the midpoint rule; diffusers'
    DPMSolverMultistepScheduler at solver_order=2, k-diffusion's and SD3's sample_dpmpp_2m). Between two noise
    levels of x = alpha x0 + sigma eps the probability-flow ODE is solved exactly in its linear part, with the
    data prediction D taken as linear in lambda = log(alpha / sigma) through the last two evaluations:

        h        = lambda_{i+1} - lambda_i
        x_{i+1}  = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^-h - 1) D'
        D'       = D_i                                        the first step, and the last one onto sigma = 0
        D'       = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   r = (lambda_i - lambda_{i-1}) / h    otherwise

    alphas, sigmas (n + 1,): the levels visited, from noise to sigma = 0; data(x, i): D at level i;
    step_range: the steps i to take (a range, or a progress bar over one). One network evaluation per step.
    lambda = +inf at sigma = 0 (and -inf at alpha = 0) is taken in its stride: e^-h = 0 there, and the last
    step returns D itself."""
    alphas, sigmas = alphas.double().cpu(), sigmas.double().cpu()
    lambdas = alphas.log() - sigmas.log()
    data_prev = None
    for i in step_range:
        data_now = data(x, i).float()
        h = lambdas[i + 1] - lambdas[i]
        mixed = data_now
        if data_prev is not None and sigmas[i + 1] > 0:
            r = float((lambdas[i] - lambdas[i - 1]) / h)
            mixed = (1 + 1 / (2 * r)) * data_now - (1 / (2 * r)) * data_prev
        x = float(sigmas[i + 1] / sigmas[i]) * x.float() - float(alphas[i + 1] * torch.expm1(-h)) * mixed
        data_prev = data_now
    return x


#################################################################################
#                        The flow objective: loss and sampling                  #
#################################################################################


class Noised(NamedTuple):
    """One training draw: the noisy batch and the time the network reads, the noise, and DDPM's step."""

    x_t: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,) the network's time in [0, 1], 1 = pure noise
    noise: torch.Tensor  # (B, C, H, W)
    # (B,) the integer step k of ddpm.DDPM's chain (t = k / num_steps), which its loss indexes; None for flow
    step: torch.Tensor = None


class Diffusion:
    """The flow objective: its training loss and its samplers. `predict(x, t)` in `sample` returns the raw
    network output. ddpm.DDPM is the other objective, with the same interface."""

    objective, preds, samplers = "flow", FLOW_PREDS, FLOW_SAMPLERS

    def __init__(self, pred=None, alpha=1.0, t_mean=0.0, t_std=1.0):
        pred = pred or self.preds[0]
        if pred not in self.preds:
            raise ValueError(f"--pred {pred!r} does not fit --objective {self.objective}; choose one of "
                             f"{self.preds}")
        self.pred, self.alpha, self.t_mean, self.t_std = pred, alpha, t_mean, t_std

    def noised(self, x0, generator=None):
        """The training draw for data x0 (B, C, H, W): the noise level, then the noise, from `generator`."""
        t = sample_t(x0.shape[0], self.t_mean, self.t_std, self.alpha, generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        return Noised(x_t, t, noise)

    def prediction_loss(self, out, x0, noised):
        """Per-sample loss (B,) of one prediction `out` of the draw `noised`: the velocity's squared error."""
        v = to_velocity(out, noised.x_t, noised.t, self.pred)
        return ((v.float() - (noised.noise - x0).float()) ** 2).mean(dim=(1, 2, 3))

    def loss(self, model, x0, generator=None, **cond):
        """Per-sample loss (B,) of the model on data x0 (B, C, H, W); `cond` goes to the model."""
        noised = self.noised(x0, generator)
        return self.prediction_loss(model(noised.x_t, noised.t, **cond), x0, noised)

    def sampler_steps(self, method, steps, progress=False):
        """The sampler `method` names (None: the objective's first), refused if it does not fit the objective,
        and the range of its steps (with a progress bar)."""
        method = method or self.samplers[0]
        if method not in self.samplers:
            raise ValueError(f"sampler {method!r} does not fit --objective {self.objective}; choose one of "
                             f"{self.samplers}")
        step_range = range(steps)
        if progress:
            from tqdm import tqdm

            step_range = tqdm(step_range, desc="sampling", leave=False)
        return method, step_range

    @torch.no_grad()
    def sample(self, predict, noise, sampling=None, progress=False, generator=None):
        """From noise to data as `sampling` (a Sampling; None: its defaults) says: its method (None: euler)
        in its steps network evaluations (Heun: about twice as many) along the shifted time grid from 1 to its
        end point t_min (time_grid), then one step to 0; its guidance is `predict`'s, not the sampler's.
        Every flow sampler's last step returns the data prediction at t_min, D(x, t_min): Euler's is
        x - t_min v = D, Heun's is its Euler step, DPM-Solver++'s onto sigma = 0 is D itself. (A v-prediction
        model needs the end point as much as an x-prediction one: its last step too returns D = x - t v at
        the last level evaluated, and without a fixed t_min that level moves with the step count.) Every
        flow sampler is deterministic given `noise`; `generator` and the spacing are DDPM's (DDPM.sample)."""
        sampling = sampling or Sampling()
        method, step_range = self.sampler_steps(sampling.method, sampling.steps, progress)
        grid = time_grid(sampling.steps, self.alpha, noise.device, sampling.t_min)
        time_at = lambda i: grid[i].expand(noise.shape[0])  # the network time of level i, one per sample
        if method == "dpm++2m":
            # The flow ODE dx/dt = (x - D) / t is the probability-flow ODE of alpha = 1, sigma = t, so
            # lambda = -log t, as SD3's reference sampler (sd3.5 sd3_impls.py, sample_dpmpp_2m) integrates it.
            # diffusers' flow setting (use_flow_sigmas) takes alpha = 1 - t instead, whose lambda is -inf at
            # t = 1: its second step would fall back to first order on our grid, which starts at pure noise.
            data = lambda x, i: to_data(predict(x, time_at(i)), x, time_at(i), self.pred)
            return dpm_solver_2m(data, noise, torch.ones_like(grid), grid, step_range)
        velocity = lambda x, t: to_velocity(predict(x, t), x, t, self.pred, min_t=0).float()
        x = noise
        for i in step_range:
            t, t_next = grid[i], grid[i + 1]
            v = velocity(x, time_at(i))
            x_next = x + (t_next - t) * v
            if method == "heun" and t_next > 0:  # trapezoidal correction, skipped on the final step to t = 0
                v_next = velocity(x_next, time_at(i + 1))
                x_next = x + (t_next - t) * 0.5 * (v + v_next)
            x = x_next
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
    t_min: float = T_MIN  # flow: the last noise level evaluated (time_grid); 0: the grid before it was fixed
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


def guided_prediction(model, x, t, y, ctrl, sampling=Sampling()):
    """Guided network output; guidance acts on ALL data channels (DiT-derived code famously guides only 3 of
    4), with the scales of `sampling` (s_sem = semantic_scale at this t, s_ctrl = sampling.ctrl):

        out = out(0s, c) + s_sem (out(s, c) - out(0s, c)) + s_ctrl (out(s, c) - out(s, 0c))

    0s / 0c: the null semantic condition (null class or null prompt) / the null control, selected by the
    model's sem_drop / ctrl_drop flags. The control c is kept in both semantic branches. Only the branches
    whose weight is not zero run, batched into one forward pass: (0s, c) only when s_sem != 1, (s, 0c) only
    when s_ctrl != 0. Outside sampling.interval (a range of t) guidance is off and out = out(s, c); s_sem = 1,
    s_ctrl = 0 is exactly the conditional prediction (and costs one pass). Guiding the raw output is the same
    as guiding the velocity or eps it implies: they are affine in it with the same x_t and t in every branch.
    Channels beyond the data's (a learned variance) are taken from the conditional branch. y: labels (B,) or
    a prompt's (features, mask[, padding noise]), every part repeated alike for every branch.
    """
    B, C = x.shape[0], x.shape[1]
    t_now = float(t.reshape(-1)[0])
    s_sem, s_ctrl, interval = semantic_scale(sampling, t_now), sampling.ctrl, sampling.interval
    if not interval[0] <= t_now <= interval[1] or (s_sem == 1.0 and s_ctrl == 0.0):
        return model(x, t, y=y, ctrl=ctrl)
    # (drop semantic, drop control) of each branch; a branch whose difference has weight zero is not run
    flags = [(False, False)] + ([(True, False)] if s_sem != 1.0 else []) + ([(False, True)] if s_ctrl else [])
    n = len(flags)
    drop = lambda i: torch.tensor([f[i] for f in flags for _ in range(B)], device=x.device)
    repeat = lambda v: v.repeat(n, *([1] * (v.ndim - 1)))
    y_branches = tuple(map(repeat, y)) if isinstance(y, tuple) else repeat(y)
    out = model(x.repeat(n, 1, 1, 1), t.repeat(n), y=y_branches, ctrl=ctrl.repeat(n, 1), ctrl_drop=drop(1),
                sem_drop=drop(0))
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


FRESH_SEED = 1 << 41  # added to a sample's seed for the stream of its fresh noise (ancestral sampling)


class Draw(NamedTuple):
    """How generate walks its samples: the chunk size, a progress bar, and the seeds of the noise it draws."""

    batch: int = 256  # samples per sampler call
    progress: bool = False  # a progress bar over each chunk's steps
    seed: int = 0  # the first sample's seed when `seeds` is None
    # (B,) each sample's seed: its text padding noise and the ancestral (ddpm) sampler's fresh noise are
    # drawn from it (the other samplers are deterministic given the noise); None: seed, seed + 1, ...
    seeds: object = None


@torch.no_grad()
def generate(model, diffusion, noise, y, ctrl, sampling=Sampling(), draw=Draw()):
    """Latents for labels y (B,) (or a prompt's (features, mask)) and controls ctrl (B, S) from the given
    noise (B, C, H, W), in chunks of draw.batch, drawn as `sampling` says (guided by guided_prediction).
    A prompt's padding noise (noisy_replicate) is drawn here once per sample from its seed (draw.seeds), so
    it is the same in every guidance branch and step, and a prompt with a seed gives the same image in any
    batch, on any rank, whatever the global RNG did before."""
    seeds = range(draw.seed, draw.seed + noise.shape[0]) if draw.seeds is None else draw.seeds
    if isinstance(y, tuple) and len(y) == 2:  # a prompt: (features, mask) -> (features, mask, padding noise)
        B, L, d = y[0].shape
        y = (*y, padding_noise(seeds, L, d, y[0].device))
    out = []
    # the ancestral sampler's fresh noise: each sample's own stream, from its seed (apart from the stream of
    # its starting noise), so a sample is the same in any batch, chunk or rank
    generators = [torch.Generator(noise.device).manual_seed(FRESH_SEED + int(s)) for s in seeds]
    for i in range(0, noise.shape[0], draw.batch):
        chunk = slice(i, i + draw.batch)
        y_chunk = tuple(v[chunk] for v in y) if isinstance(y, tuple) else y[chunk]  # labels or a prompt
        ctrl_chunk = ctrl[chunk]
        predict = lambda x, t: guided_prediction(model, x, t, y_chunk, ctrl_chunk, sampling)
        out.append(diffusion.sample(predict, noise[chunk], sampling, draw.progress, generators[chunk]))
    return torch.cat(out)
