"""
Conditioning: every embedder the denoiser reads, in the order the paper's mechanism uses them.

    control   crop / flip / size / aspect / resolution scalars, as the augmentation recorded them
              -> Fourier features per scalar -> one MLP per signal group -> e_ctrl,k     (B, groups, D)
    gates     g_k(t) per group along the trajectory -> sum_k g_k(t) * e_ctrl,k            (B, D), added to e_t
    time      t in [0, 1] (1 = pure noise) -> sinusoidal features -> MLP -> e_t           (B, D)
    class     label (num_classes = null) -> K learned tokens                 (B, K, D) + pooled (B, D)
    text      prompt -> frozen encoder (text.py), cached once per dataset -> features (B, L, d) + mask (B, L)
              -> padding (noisy replicate by default) -> MLP -> L tokens     (B, L, D) + pooled (B, D)
    dropout   for classifier-free guidance: the semantic and the control condition, each dropped independently

The paper's point: semantic conditions (class, text) are *what* to draw and go through attention as tokens;
control metadata is *how* it was captured and goes through adaLN, each group switched on by its own schedule
of t (GATES: one entry per schedule; they read the t the network reads, after the noise shift).
"""
import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

#################################################################################
#                 Control metadata: what the augmentation recorded              #
#################################################################################
# Order of the control vector. Units: pixels, except flip (0/1) and aspect (target width / height).
#   orig_h, orig_w : size of the image before it was resized to the training canvas (small: upsampled, blurry)
#   crop_top/left  : offset of the training crop inside the resized canvas
#   flip           : 1 if the crop was mirrored left-right
#   aspect         : aspect ratio (w / h) of the training image
#   res            : training resolution sqrt(h * w)
CONTROL_SIGNALS = ("orig_h", "orig_w", "crop_top", "crop_left", "flip", "aspect", "res")
# control[..., SIGNAL["flip"]] reads a field by name
SIGNAL = {name: i for i, name in enumerate(CONTROL_SIGNALS)}


def make_control(orig_h, orig_w, crop_top, crop_left, flip, res, aspect=1.0):
    """A control vector in CONTROL_SIGNALS order."""
    return torch.tensor([orig_h, orig_w, crop_top, crop_left, float(flip), aspect, res], dtype=torch.float32)


#################################################################################
#                      Control metadata: Fourier features + gates               #
#################################################################################
# Each raw control scalar is brought to a unit-ish scale first (sizes on a log2 scale, crop as a fraction of
# the training resolution) so the same Fourier frequencies suit every signal and every resolution.

CONTROL_GROUPS = {"size": ("orig_h", "orig_w", "aspect", "res"), "crop": ("crop_top", "crop_left"),
                  "flip": ("flip",)}


class Gate(NamedTuple):
    """A schedule g(t) in [0, 1]: g(t, *params), its parameters' defaults in order, and what it means."""

    fn: Callable
    params: tuple
    meaning: str


# The gate schedules, one entry each; a new schedule is one more line. On the command line a schedule is NAME,
# or NAME:P1,P2 for other parameter values (--gate-size cosine_pow:4); that string is the run's configuration,
# so a checkpoint records the parameters with the name. Which t: the one the network reads (t = 1 pure noise,
# 0 data), i.e. after the resolution shift for flow (so under --shift 3 a schedule that opens at t = 0.5 is
# open only in the last quarter of the sampler's steps) and k / 1000 for ddpm.
GATES = {
    "none": Gate(lambda t: torch.ones_like(t), (), "1 everywhere: the group is ungated"),
    "cosine": Gate(lambda t: torch.cos(0.5 * math.pi * t), (), "cos(pi t / 2): 0 at pure noise, 1 at data"),
    "cosine_pow": Gate(lambda t, power: torch.cos(0.5 * math.pi * t).clamp(min=0) ** power, (2.0,),
                       "cos(pi t / 2) ** power, power 2 unless given"),
    "linear": Gate(lambda t: 1.0 - t, (), "1 - t"),
    "off": Gate(lambda t: torch.zeros_like(t), (), "0 everywhere: the group is ignored"),
}
DEFAULT_GATES = {"size": "cosine", "crop": "none", "flip": "none"}


def parse_gate(spec):
    """'NAME' or 'NAME:P1,P2' -> (name, parameter values): the defaults, or as many values as the schedule
    has."""
    name, _, given = spec.partition(":")
    if name not in GATES:
        raise ValueError(f"unknown gate {spec!r}; choose one of {', '.join(GATES)}")
    params = GATES[name].params
    if given:
        try:
            params = tuple(float(v) for v in given.split(","))
        except ValueError:
            params = ()
        if len(params) != len(GATES[name].params):
            raise ValueError(f"gate {spec!r}: {name} takes {len(GATES[name].params)} number(s) after the "
                             "colon")
    return name, params


def gate(spec, t):
    """Weight g(t) in [0, 1] of a control group at noise level t, by its schedule's spec (GATES)."""
    name, params = parse_gate(spec)
    return GATES[name].fn(t, *params)


def normalise_control(ctrl):
    """(B, len(CONTROL_SIGNALS)) raw control -> same shape, unit-ish scale."""
    raw = dict(zip(CONTROL_SIGNALS, ctrl.float().unbind(-1)))
    res = raw["res"].clamp(min=1.0)
    log_size = lambda name: torch.log2(raw[name].clamp(min=1.0))
    out = {"orig_h": log_size("orig_h"), "orig_w": log_size("orig_w"),
           "crop_top": raw["crop_top"] / res, "crop_left": raw["crop_left"] / res, "flip": raw["flip"],
           "aspect": torch.log2(raw["aspect"].clamp(min=1e-3)), "res": torch.log2(res)}
    return torch.stack([out[k] for k in CONTROL_SIGNALS], dim=-1)


class ControlEmbedder(nn.Module):
    """Control metadata -> one embedding per group (B, G, D), gated per group by g_k(t).

    Fourier features of every normalised scalar (frequencies 2^-4 ... 2^(F-5) cycles per unit), concatenated
    per group, then one MLP per group. A dropped control (for guidance) uses a learned null embedding instead.
    """

    def __init__(self, dim, num_freqs=8, gates=None):
        super().__init__()
        self.gates = dict(DEFAULT_GATES, **(gates or {}))
        self.schedules = {g: parse_gate(spec) for g, spec in self.gates.items()}  # an unknown name fails here
        self.register_buffer("freqs", 2.0 ** torch.arange(-4, num_freqs - 4, dtype=torch.float32),
                             persistent=False)
        self.index = {g: [SIGNAL[s] for s in sig] for g, sig in CONTROL_GROUPS.items()}
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
        schedules = [self.schedules[g] for g in self.index]
        return torch.stack([GATES[name].fn(t, *params) for name, params in schedules], 1)

    def gated(self, emb, t):
        """The paper's control term sum_k g_k(t) * e_ctrl,k: emb (B, G, D) from forward, t (B,) -> (B, D). The
        one place it is computed, for the transformer's adaLN vector and the UNet's embedding alike."""
        return (self.gate_weights(t)[..., None].to(emb.dtype) * emb).sum(1)


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
    """t in [0, 1] -> (B, D). t is scaled by 1000 so the sinusoid spans the same range as DiT's integer
    steps."""

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
    """Label -> K context tokens (B, K, D) and a pooled vector (B, D). Row `num_classes` is the null class
    that classifier-free guidance uses for the unconditional branch; `drop` (B,) bool selects it per
    sample."""

    def __init__(self, num_classes, dim, tokens=1):
        super().__init__()
        self.num_classes, self.tokens = num_classes, tokens
        self.table = nn.Embedding(num_classes + 1, tokens * dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y, drop=None):
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        tokens = self.table(y).view(y.shape[0], self.tokens, -1)  # (B, K, D)
        return tokens, tokens.mean(dim=1)


#################################################################################
#                 Semantic condition: text -- padding and tokens                #
#################################################################################

TEXT_PADS = ("zero", "replicate", "noisy_replicate")
TEXT_NULLS = ("learned", "empty")


def pad_text(features, mask, mode="noisy_replicate", noise_std=0.1, generator=None, noise=None):
    """Fill the padding slots of encoded prompts. features (B, L, d), mask (B, L) bool -> (features, mask).

    zero             padding slots are zeros; the mask is returned as is, for the attention to skip them
    replicate        slot j of a prompt with n valid tokens holds its valid token j mod n (the valid tokens
                     repeated cyclically; valid tokens stay where they are when they come first, as with right
                     padding); every slot is now a real token, so the returned mask is all True
    noisy_replicate  (default, the paper's) replicate, then Gaussian noise on the copies only, of std
                     noise_std x the std of that prompt's valid features (over all its valid tokens and
                     channels): the noise level is relative to the encoder's scale, so one flag value suits
                     every encoder
    A prompt with no valid token at all comes out as zeros, with an all-False mask in zero mode (the encoders
    here always give at least one token, so this never reaches the attention).
    The noise is drawn from `generator` (training: fresh every step), unless `noise` (B, L, d), standard
    Gaussian, is given (sampling: each sample's own, from padding_noise, so every guidance branch and step
    sees the same prompt)."""
    if mode not in TEXT_PADS:
        raise ValueError(f"unknown text padding {mode!r}; choose one of {TEXT_PADS}")
    mask = mask.bool()
    if mode == "zero":
        return features * mask[..., None].to(features.dtype), mask
    B, L, d = features.shape
    valid_count = mask.sum(1, keepdim=True)  # (B, 1) valid tokens per prompt
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # (B, L) valid positions first
    slot = torch.arange(L, device=features.device)[None]  # (1, L)
    source = order.gather(1, slot % valid_count.clamp(min=1))  # (B, L) the position each slot copies
    out = features.gather(1, source[..., None].expand(-1, -1, d))
    out = out * (valid_count > 0)[..., None].to(features.dtype)  # (B, L, d)
    if mode == "noisy_replicate" and noise_std > 0:
        # the std of each prompt's valid features, over all its valid tokens and channels
        values, valid = features.detach().float(), mask[..., None].float()
        count = (valid_count * d).float()  # (B, 1)
        mean = (values * valid).sum((1, 2)) / count.clamp(min=1)[:, 0]  # (B,)
        squares = ((values - mean[:, None, None]) ** 2 * valid).sum((1, 2))  # (B,)
        std = (squares / (count - 1).clamp(min=1)[:, 0]).sqrt()  # (B,)
        if noise is None:
            noise = torch.randn(out.shape, generator=generator, device=out.device)  # (B, L, d)
        copies = (slot >= valid_count)[..., None].float()  # (B, L, 1): never the valid tokens themselves
        out = out + (noise * copies * (noise_std * std)[:, None, None]).to(out.dtype)
    return out, torch.ones_like(mask)


# The padding noise of the sample with noise seed s comes from seed PAD_SEED + s: a stream of its own, not a
# copy of the first numbers of the sample's image noise (seed s).
PAD_SEED = 1 << 40


def padding_noise(seeds, length, dim, device=None):
    """Sampling-time noise for noisy_replicate padding: one standard Gaussian (L, d) per sample, from its own
    seed (the seed of its image noise), so a prompt and a seed give the same image whatever the batch, the
    rank or the global RNG. -> (len(seeds), L, d)"""
    return torch.stack([torch.randn(length, dim, generator=torch.Generator().manual_seed(PAD_SEED + int(s)))
                        for s in seeds]).to(device)


class TextEmbedder(nn.Module):
    """Encoded prompt -> L context tokens (B, L, D) and a pooled vector (B, D), like ClassEmbedder, so a model
    holds either as `y_embed` (a class -> text transfer then loads every other tensor and reports y_embed.*
    as new).

    The encoder's features are padded (pad_text), then projected by PixArt-alpha's caption projection
    (Linear -> GELU(tanh) -> Linear). pooled = the mean of the projected *valid* tokens, so padding never
    shifts it. A dropped prompt (classifier-free guidance) becomes the null prompt:
      learned (default)  a learned (L, D) token sequence, all of it attended to, pooled = its mean. The class
                         route's null is a learned row too, it needs nothing from the caller or the encoder,
                         and PixArt-alpha learns its null caption the same way.
      empty              the encoded empty string (Stable Diffusion / SD3), padded and projected like any
                         prompt; the caller supplies it once with set_empty(*encoder.encode([""])), and it is
                         saved with the model.
    forward returns the mask for the attention only with zero padding; the replicate modes leave no padding to
    hide (None, so the attention can use its fastest kernel).
    """

    def __init__(self, text_dim, dim, max_length, pad="noisy_replicate", pad_noise=0.1, null="learned"):
        super().__init__()
        if pad not in TEXT_PADS:
            raise ValueError(f"unknown --text-pad {pad!r}; choose one of {TEXT_PADS}")
        if null not in TEXT_NULLS:
            raise ValueError(f"unknown --text-null {null!r}; choose one of {TEXT_NULLS}")
        self.text_dim, self.max_length, self.null_mode = text_dim, max_length, null
        self.pad, self.pad_noise = pad, pad_noise
        self.proj = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        if null == "learned":
            self.null = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        else:  # filled by set_empty or by loading a checkpoint
            self.register_buffer("empty_features", torch.zeros(max_length, text_dim))
            self.register_buffer("empty_mask", torch.zeros(max_length, dtype=torch.bool))
            self.empty_ready = False
            ready = lambda m, _: setattr(m, "empty_ready", bool(m.empty_mask.any()))
            self.register_load_state_dict_post_hook(ready)

    def set_empty(self, features, mask):
        """Store the encoded empty string, (1, L, d) or (L, d) and (1, L) or (L,), as the null prompt."""
        if self.null_mode != "empty":
            raise ValueError("set_empty is for null='empty'; this embedder learns its null prompt")
        features, mask = features.reshape(-1, features.shape[-1]), mask.reshape(-1)
        if features.shape != self.empty_features.shape or mask.shape != self.empty_mask.shape:
            raise ValueError(f"the empty prompt's features {tuple(features.shape)} do not match this "
                             f"embedder's (max_length, text_dim) = {tuple(self.empty_features.shape)}")
        if not mask.any():
            raise ValueError("the encoded empty prompt has no valid token")
        self.empty_features.copy_(features)
        self.empty_mask.copy_(mask)
        self.empty_ready = True

    def forward(self, features, mask, drop=None, generator=None, noise=None):
        """features (B, L, d), mask (B, L) bool, drop (B,) bool or None, noise (B, L, d) the padding noise to
        use or None (drawn from `generator`, see pad_text) -> tokens (B, L, D), pooled (B, D), mask (B, L)
        bool for the attention or None."""
        mask = mask.bool()
        if drop is not None and self.null_mode == "empty":
            if not self.empty_ready:
                raise RuntimeError("TextEmbedder(null='empty') needs the encoded empty prompt: call "
                                   "set_empty(*encoder.encode(['']))  before training or sampling")
            features = torch.where(drop[:, None, None], self.empty_features.to(features.dtype)[None],
                                   features)
            mask = torch.where(drop[:, None], self.empty_mask[None], mask)
        padded, keep = pad_text(features, mask, self.pad, self.pad_noise, generator, noise)
        tokens = self.proj(padded)  # (B, L, D)
        valid = mask[..., None].to(tokens.dtype)
        pooled = (tokens * valid).sum(1) / valid.sum(1).clamp(min=1)  # (B, D) mean over the valid tokens only
        if drop is not None and self.null_mode == "learned":
            null = self.null.to(tokens.dtype)
            tokens = torch.where(drop[:, None, None], null[None], tokens)
            pooled = torch.where(drop[:, None], null.mean(0)[None], pooled)
            keep = keep | drop[:, None]
        return tokens, pooled, (keep if self.pad == "zero" else None)


#################################################################################
#                    Condition dropout for classifier-free guidance             #
#################################################################################

def drop_flags(batch, p_sem, p_ctrl, generator=None, device=None):
    """Which samples drop their semantic and which their control condition: two independent (B,) bool masks
    (the text route passes the first to TextEmbedder as `drop`)."""
    uniform = torch.rand(2, batch, generator=generator, device=device)
    return uniform[0] < p_sem, uniform[1] < p_ctrl

