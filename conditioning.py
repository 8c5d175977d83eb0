"""
Conditioning: every embedder the denoiser reads.

    time      t in [0, 1] (1 = pure noise)  -> sinusoidal features -> MLP -> e_t            (B, D)
    class     label (num_classes = null)    -> K learned tokens                           (B, K, D) + pooled (B, D)
    control   crop / flip / size / aspect / resolution scalars
              -> Fourier features per scalar -> one MLP per signal group -> e_ctrl,k      (B, groups, D)
              -> gated along the trajectory: sum_k g_k(t) * e_ctrl,k

The paper's point: semantic conditions (class, text) are *what* to draw and go through attention as tokens; control
metadata is *how* it was captured and goes through adaLN, each group switched on by its own schedule of t.
Condition dropout for classifier-free guidance drops the two kinds independently.
"""
import math

import torch
import torch.nn as nn

from data import CONTROL_SIGNALS

#################################################################################
#                              Timestep                                         #
#################################################################################


def sinusoidal(x, dim, max_period=10000.0):
    """DiT / ADM sinusoidal features of a (B,) tensor -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D). t is scaled by 1000 so the sinusoid spans the same range as DiT's integer steps."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sinusoidal(t * 1000.0, self.freq_dim))


#################################################################################
#                        Semantic condition: class tokens                       #
#################################################################################

class ClassEmbedder(nn.Module):
    """Label -> K context tokens (B, K, D) and a pooled vector (B, D). Row `num_classes` is the null class that
    classifier-free guidance uses for the unconditional branch."""

    def __init__(self, num_classes, dim, tokens=1):
        super().__init__()
        self.num_classes, self.tokens = num_classes, tokens
        self.table = nn.Embedding(num_classes + 1, tokens * dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y):
        tok = self.table(y).view(y.shape[0], self.tokens, -1)  # (B, K, D)
        return tok, tok.mean(dim=1)


#################################################################################
#                      Control metadata: Fourier features + gates               #
#################################################################################
# Each raw control scalar is brought to a unit-ish scale first (sizes on a log2 scale, crop as a fraction of the
# training resolution) so the same Fourier frequencies suit every signal and every resolution.

CONTROL_GROUPS = {"size": ("orig_h", "orig_w", "aspect", "res"), "crop": ("crop_top", "crop_left"), "flip": ("flip",)}
GATES = ("none", "cosine", "cosine_pow", "linear", "off")
DEFAULT_GATES = {"size": "cosine", "crop": "none", "flip": "none"}


def gate(name, t, power=2.0):
    """Weight g(t) in [0, 1] of a control group at noise level t (t = 1 noise, t = 0 data).
    none: 1 everywhere (ungated); cosine: cos(pi t / 2), 0 at pure noise and 1 at data; cosine_pow: cosine ** power;
    linear: 1 - t; off: 0 everywhere (the group is ignored)."""
    if name == "none":
        return torch.ones_like(t)
    if name == "cosine":
        return torch.cos(0.5 * math.pi * t)
    if name == "cosine_pow":
        return torch.cos(0.5 * math.pi * t).clamp(min=0) ** power
    if name == "linear":
        return 1.0 - t
    if name == "off":
        return torch.zeros_like(t)
    raise ValueError(f"unknown gate {name!r}; choose one of {GATES}")


def normalise_control(ctrl):
    """(B, len(CONTROL_SIGNALS)) raw control -> same shape, unit-ish scale."""
    c = dict(zip(CONTROL_SIGNALS, ctrl.float().unbind(-1)))
    res = c["res"].clamp(min=1.0)
    out = {"orig_h": torch.log2(c["orig_h"].clamp(min=1.0)), "orig_w": torch.log2(c["orig_w"].clamp(min=1.0)),
           "crop_top": c["crop_top"] / res, "crop_left": c["crop_left"] / res, "flip": c["flip"],
           "aspect": torch.log2(c["aspect"].clamp(min=1e-3)), "res": torch.log2(res)}
    return torch.stack([out[k] for k in CONTROL_SIGNALS], dim=-1)


class ControlEmbedder(nn.Module):
    """Control metadata -> one embedding per group (B, G, D), gated per group by g_k(t).

    Fourier features of every normalised scalar (frequencies 2^-4 ... 2^(F-5) cycles per unit), concatenated per group,
    then one MLP per group. A dropped control (for guidance) uses a learned null embedding instead.
    """

    def __init__(self, dim, num_freqs=8, gates=None):
        super().__init__()
        self.gates = dict(DEFAULT_GATES, **(gates or {}))
        for name in self.gates.values():
            gate(name, torch.zeros(1))  # fail at construction on an unknown name
        self.register_buffer("freqs", 2.0 ** torch.arange(-4, num_freqs - 4, dtype=torch.float32), persistent=False)
        self.index = {g: [CONTROL_SIGNALS.index(s) for s in sig] for g, sig in CONTROL_GROUPS.items()}
        self.mlps = nn.ModuleDict({g: nn.Sequential(nn.Linear(2 * num_freqs * len(sig), dim), nn.SiLU(),
                                                    nn.Linear(dim, dim)) for g, sig in self.index.items()})
        self.null = nn.Parameter(torch.zeros(len(self.index), dim))

    def fourier(self, x):
        """(B, S) -> (B, S * 2F)"""
        args = 2 * math.pi * x[..., None] * self.freqs
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1).flatten(1)

    def forward(self, ctrl, drop=None):
        """ctrl (B, len(CONTROL_SIGNALS)) raw, drop (B,) bool or None -> (B, G, D), ungated."""
        x = normalise_control(ctrl)
        emb = torch.stack([self.mlps[g](self.fourier(x[:, idx])) for g, idx in self.index.items()], dim=1)
        if drop is not None:
            emb = torch.where(drop[:, None, None], self.null.to(emb.dtype)[None], emb)
        return emb

    def gate_weights(self, t):
        """(B,) -> (B, G) weights g_k(t)."""
        return torch.stack([gate(self.gates[g], t) for g in self.index], dim=1)


#################################################################################
#                    Condition dropout for classifier-free guidance             #
#################################################################################

def drop_conditions(y, num_classes, p_sem, p_ctrl, generator=None):
    """Drop semantic and control conditions independently per sample.
    Returns (y with dropped entries set to the null class, ctrl_drop (B,) bool)."""
    u = torch.rand(2, y.shape[0], generator=generator, device=y.device)
    y = torch.where(u[0] < p_sem, torch.full_like(y, num_classes), y)
    return y, u[1] < p_ctrl
