"""
The denoiser: a diffusion transformer whose conditioning route is a flag.

    image latents (B, C, H, W) -> patches + 2-D sin-cos positions -> image tokens (B, N, D)
    semantic condition (class)  -> context tokens (B, K, D)
    time + control metadata     -> one adaLN vector (B, D)
    depth x JointBlock: each stream has its own weights; both are concatenated for ONE attention call (mmDiT)
    final adaLN layer -> velocity (B, C, H, W)

Conditioning routes (`cond`), all built from the same blocks:
    ours   semantic tokens only in the context stream; adaLN = e_t + sum_k g_k(t) e_ctrl,k  (gated per control group)
    mmdit  SD3: context stream + pooled semantic vector added into adaLN; control added ungated
    adaln  DiT: no context stream; class embedding and control added to e_t -> adaLN-Zero

A fresh model is the identity in every block and outputs zero: all adaLN modulations and the final layer are
zero-initialised (DiT practice), so training starts from a well-behaved function.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from conditioning import ClassEmbedder, ControlEmbedder, TimestepEmbedder

CONDS = ("ours", "mmdit", "adaln")
PREDS = ("v", "x")
POS_MODES = ("resample", "extend")


def modulate(x, shift, scale):
    """adaLN: x (B, N, D), shift / scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


#################################################################################
#                         Positional embedding                                  #
#################################################################################

def sincos_1d(dim, pos):
    """(L,) positions -> (L, dim) sin-cos features (MAE / DiT convention)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim, grid_h, grid_w, base_h, base_w, mode="resample"):
    """Fixed 2-D sin-cos embedding (grid_h * grid_w, dim) for a token grid, rows first.

    The model is trained on a base grid (base_h x base_w). On a grid with more tokens:
      resample  evaluate the embedding at positions scaled back by s = sqrt(base tokens / tokens), one factor for both
                axes, so the image spans the positional range it was trained on and keeps its aspect ratio (the
                paper's choice for 256 -> 512: a 2x larger square grid lands its even positions on the base grid)
      extend    keep integer positions 0 .. grid - 1, i.e. new, never-seen positions beyond the base grid
    Grids with no more tokens than the base use integer positions in both modes.
    """
    if mode not in POS_MODES:
        raise ValueError(f"unknown pos mode {mode!r}; choose one of {POS_MODES}")
    s = min(1.0, math.sqrt(base_h * base_w / (grid_h * grid_w))) if mode == "resample" else 1.0
    ys, xs = torch.arange(grid_h, dtype=torch.float64) * s, torch.arange(grid_w, dtype=torch.float64) * s
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, gy.reshape(-1)), sincos_1d(dim // 2, gx.reshape(-1))], dim=1)
    return emb.float()


#################################################################################
#                          Attention and blocks                                 #
#################################################################################

class Mlp(nn.Sequential):
    def __init__(self, dim, ratio=4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Stream(nn.Module):
    """The per-stream half of a joint block: adaLN modulation, qkv with QK-norm, output projection, MLP.
    `pre_only`: only the attention inputs (the context stream of the last block, whose output nobody reads; SD3)."""

    def __init__(self, dim, heads, mlp_ratio, pre_only=False):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)  # QK-norm keeps attention logits bounded (SD3)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def pre_attention(self, x, vec):
        """x (B, L, D), vec (B, D) -> q, k, v each (B, H, L, D/H), and the modulation left for later."""
        shift1, scale1, *mod = self.ada(vec).chunk(self.ada[-1].out_features // x.shape[-1], dim=-1)
        B, L, D = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x, attn, mod):
        """Residual updates gated by adaLN; attn (B, H, L, D/H)."""
        gate1, shift2, scale2, gate2 = mod
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).flatten(2))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    """mmDiT block: image and context streams with separate weights, one attention over both token sets.
    With no context stream (`context=None`) it is exactly a DiT block (self-attention over image tokens);
    `context="pre_only"` is the last block, where the context stream only feeds the attention."""

    def __init__(self, dim, heads, mlp_ratio=4.0, context="full"):
        super().__init__()
        self.img = Stream(dim, heads, mlp_ratio)
        self.ctx = Stream(dim, heads, mlp_ratio, pre_only=context == "pre_only") if context else None

    def forward(self, x, c, vec, mask=None):
        """x (B, N, D) image tokens, c (B, K, D) context tokens or None, vec (B, D), mask (B, K) bool (True = keep)."""
        qi, ki, vi, mod_i = self.img.pre_attention(x, vec)
        if self.ctx is None:
            return self.img.post_attention(x, F.scaled_dot_product_attention(qi, ki, vi), mod_i), c
        qc, kc, vc, mod_c = self.ctx.pre_attention(c, vec)
        q, k, v = torch.cat([qc, qi], 2), torch.cat([kc, ki], 2), torch.cat([vc, vi], 2)  # (B, H, K + N, D/H)
        attn_mask = None
        if mask is not None:  # padding tokens of the context are never attended to
            keep = torch.cat([mask, mask.new_ones(x.shape[0], x.shape[1])], dim=1)  # (B, K + N)
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        K = c.shape[1]
        x = self.img.post_attention(x, out[:, :, K:], mod_i)
        return x, (None if not mod_c else self.ctx.post_attention(c, out[:, :, :K], mod_c))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to patch pixels; zero-initialised so a fresh model predicts 0."""

    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.ada(vec).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


#################################################################################
#                                Core model                                     #
#################################################################################

class DiffusionTransformer(nn.Module):
    def __init__(self, input_size=32, patch=2, in_channels=4, depth=28, width=1152, heads=16, mlp_ratio=4.0,
                 num_classes=1000, class_tokens=1, cond="ours", gates=None, pos_mode="resample", base_size=None,
                 pred="v"):
        super().__init__()
        if cond not in CONDS:
            raise ValueError(f"unknown --cond {cond!r}; choose one of {CONDS}")
        if pos_mode not in POS_MODES:
            raise ValueError(f"unknown --pos-mode {pos_mode!r}; choose one of {POS_MODES}")
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch}")
        if pred not in PREDS:
            raise ValueError(f"unknown --pred {pred!r}; choose one of {PREDS}")
        self.patch, self.in_channels, self.width, self.cond, self.pos_mode = patch, in_channels, width, cond, pos_mode
        self.pred = pred
        self.base_grid = (base_size or input_size) // patch  # the grid the positional embedding is defined on
        self.x_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = ClassEmbedder(num_classes, width, class_tokens)
        self.c_embed = ControlEmbedder(width, gates=gates)
        context = lambda i: None if cond == "adaln" else ("pre_only" if i == depth - 1 else "full")
        self.blocks = nn.ModuleList([JointBlock(width, heads, mlp_ratio, context(i)) for i in range(depth)])
        self.final = FinalLayer(width, patch, in_channels)
        self._pos_cache = {}
        self.initialize_weights()

    def initialize_weights(self):
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic)
        w = self.x_embed.weight.data  # initialise the patch embedding like a linear layer (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        for mlp in [self.t_embed.mlp, *self.c_embed.mlps.values()]:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # zero-init every modulation and the output: each block starts as the identity, the model outputs 0
        for block in self.blocks:
            for stream in (block.img, block.ctx):
                if stream is not None:
                    nn.init.zeros_(stream.ada[-1].weight)
                    nn.init.zeros_(stream.ada[-1].bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def pos_embed(self, grid_h, grid_w, device):
        key = (grid_h, grid_w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.width, grid_h, grid_w, self.base_grid, self.base_grid,
                                             self.pos_mode).to(device)
        return self._pos_cache[key]

    def condition(self, t, y, ctrl, ctrl_drop=None):
        """The adaLN vector (B, D) and the context tokens (B, K, D) or None, following the route."""
        e_t = self.t_embed(t)
        tokens, pooled = self.y_embed(y)
        e_ctrl = self.c_embed(ctrl, ctrl_drop)  # (B, G, D)
        if self.cond == "ours":  # control enters gently along the trajectory; nothing semantic in adaLN
            vec = e_t + (self.c_embed.gate_weights(t)[..., None].to(e_ctrl.dtype) * e_ctrl).sum(1)
            return vec, tokens
        vec = e_t + e_ctrl.sum(1) + pooled  # additive, ungated: the entangled baselines
        return vec, (tokens if self.cond == "mmdit" else None)

    def forward(self, x, t, y, ctrl, ctrl_drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) labels, ctrl (B, S) raw control, ctrl_drop (B,) bool -> (B, C, H, W)"""
        B, C, H, W = x.shape
        x_t = x
        if H % self.patch or W % self.patch:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch}")
        h, w = H // self.patch, W // self.patch
        x = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed(h, w, x.device)  # (B, N, D)
        vec, c = self.condition(t, y, ctrl, ctrl_drop)
        for block in self.blocks:
            x, c = block(x, c, vec)
        x = self.final(x, vec)  # (B, N, p * p * C)
        x = x.view(B, h, w, self.patch, self.patch, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        if self.pred == "x":  # the network outputs the clean image; report the velocity it implies
            return (x_t - x) / t.clamp(min=0.05).view(B, 1, 1, 1)  # in fp32: t is not rounded to bf16
        return x


#################################################################################
#                                  Configs                                      #
#################################################################################
# DiT naming: size x patch. T and XS are small presets for tests and CPU runs.

SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
         "XS": (4, 128, 4), "T": (2, 64, 2)}
MODELS = [f"{s}/{p}" for s in SIZES for p in (2, 4, 8)]


def build_model(name, **kwargs):
    """`name` like 'XL/2'; kwargs go to DiffusionTransformer."""
    size, _, patch = name.partition("/")
    if size not in SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    depth, width, heads = SIZES[size]
    return DiffusionTransformer(patch=int(patch), depth=depth, width=width, heads=heads, **kwargs)


def count_params(model):
    return sum(p.numel() for p in model.parameters())
