"""
Diffusion: rectified flow (SD3 style), its resolution shift, samplers and classifier-free guidance.

    x_t = (1 - t) x_0 + t eps          t = 0 data, t = 1 pure noise
    target v = eps - x_0               so dx_t/dt = v and sampling integrates from t = 1 down to t = 0
    t ~ sigmoid(N(mean, std))          logit-normal: most training effort on mid-range noise levels

Resolution shift (noise-schedule scaling): more tokens carry more redundant signal, so the same t destroys less
information at a higher resolution. We push t towards noise with t' = a t / (1 + (a - 1) t),
a = sqrt(tokens / base_tokens), for training and for the sampler's time grid alike.
"""
import math

import torch

#################################################################################
#                            Noise-level schedule                               #
#################################################################################


def shift_time(t, alpha):
    """t' = alpha t / (1 + (alpha - 1) t); alpha = 1 is the identity, alpha > 1 moves every t towards noise."""
    return alpha * t / (1 + (alpha - 1) * t)


def resolution_shift(tokens, base_tokens):
    """alpha = sqrt(tokens / base_tokens): 1 at the base resolution, 2 for 4x the tokens (256 -> 512)."""
    return math.sqrt(tokens / base_tokens)


def noise_shift(shift, res, base_res):
    """alpha for training and sampling at `res`: the base shift times the resolution shift (at a fixed patch size the
    token ratio is the pixel ratio)."""
    return shift * resolution_shift(res ** 2, base_res ** 2)


def sample_t(n, mean=0.0, std=1.0, alpha=1.0, generator=None, device="cpu"):
    """Training noise levels: logit-normal, then shifted. (n,) in (0, 1)."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return shift_time(t, alpha)


#################################################################################
#                               Training loss                                   #
#################################################################################

def flow_loss(model, x0, t, noise, **cond):
    """Per-sample MSE between the predicted and the true velocity eps - x0. Returns (B,)."""
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - tb) * x0 + tb * noise
    v = model(xt, t, **cond)
    return ((v.float() - (noise - x0).float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))


#################################################################################
#                        Classifier-free guidance                               #
#################################################################################

def guided_velocity(model, x, t, y, ctrl, null_y, s_sem=1.0, s_ctrl=0.0, interval=(0.0, 1.0)):
    """Guided velocity on ALL channels (DiT-derived code famously guides only 3 of 4).

        v = v(0s, c) + s_sem (v(s, c) - v(0s, c)) + s_ctrl (v(s, c) - v(s, 0c))

    The control c is kept in both semantic branches; the control term costs one more forward pass and is skipped when
    s_ctrl = 0. Outside `interval` (a range of t) guidance is off and v = v(s, c). s_sem = 1, s_ctrl = 0 is exactly
    the conditional prediction (and costs one pass).
    """
    B = x.shape[0]
    t_now = float(t.reshape(-1)[0])
    if not interval[0] <= t_now <= interval[1] or (s_sem == 1.0 and s_ctrl == 0.0):
        return model(x, t, y=y, ctrl=ctrl)
    branches = [(y, False), (torch.full_like(y, null_y), False)] + ([(y, True)] if s_ctrl else [])
    n = len(branches)
    v = model(x.repeat(n, 1, 1, 1), t.repeat(n), y=torch.cat([b[0] for b in branches]), ctrl=ctrl.repeat(n, 1),
              ctrl_drop=torch.tensor([b[1] for b in branches for _ in range(B)], device=x.device))
    v = v.float().view(n, B, *x.shape[1:])
    out = v[1] + s_sem * (v[0] - v[1])
    if s_ctrl:
        out = out + s_ctrl * (v[0] - v[2])
    return out


#################################################################################
#                                 Samplers                                      #
#################################################################################

def time_grid(steps, alpha=1.0, device="cpu"):
    """steps + 1 noise levels from 1 down to 0, shifted like the training t."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), alpha).float()


@torch.no_grad()
def sample(velocity, noise, steps=50, alpha=1.0, method="euler", progress=False):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 (data).
    velocity(x, t) takes t as a (B,) tensor. Euler: `steps` evaluations; Heun: 2 per step except the last."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {method!r}; choose 'euler' or 'heun'")
    ts = time_grid(steps, alpha, noise.device)
    x = noise
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        t, t_next = ts[i], ts[i + 1]
        tb = t.expand(x.shape[0])
        v = velocity(x, tb).float()
        x_next = x + (t_next - t) * v
        if method == "heun" and t_next > 0:  # trapezoidal correction, skipped on the final step to t = 0
            v_next = velocity(x_next, t_next.expand(x.shape[0])).float()
            x_next = x + (t_next - t) * 0.5 * (v + v_next)
        x = x_next
    return x
