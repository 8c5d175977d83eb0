"""
The denoiser: a diffusion transformer whose conditioning route is a flag.

    image latents (B, C, H, W) -> patches + 2-D sin-cos positions -> image tokens (B, N, D)
    semantic condition (class)  -> context tokens (B, K, D)
    time + control metadata     -> one adaLN vector (B, D)
    depth x JointBlock: each stream has its own weights; both are concatenated for ONE attention call (mmDiT)
    final adaLN layer -> velocity (B, C, H, W)

Conditioning routes (`cond`), all built from the same blocks:
    ours   semantic tokens only in the context stream; adaLN = e_t + sum_k g_k(t) e_ctrl,k  (gated per control
           group)
    mmdit  SD3: context stream + pooled semantic vector, through its own MLP, added into adaLN; control added
           ungated
    adaln  DiT: no context stream; class embedding and control added to e_t -> adaLN-Zero
    xattn  PixArt-alpha: image tokens cross-attend to the semantic tokens; control added to e_t; adaLN-single
           (one shared modulation MLP, per-block learned offsets)

Architectures (`arch`) on the same blocks:
    dit    DiffusionTransformer: a plain stack of blocks
    mdt    MDTv2, a subclass: encoder halves joined by long shortcuts, a side interpolator and decoder blocks;
           during training a random 30-50 % of the image tokens are dropped and the model predicts the full
           image from the rest
(the UNet of the LDM baseline is a different network and lives in unet.py)

A fresh model outputs zero: the final layer is zero-initialised, and with adaLN-Zero (every route but xattn)
every block is the identity (DiT practice), so training starts from a well-behaved function. xattn follows
PixArt-alpha's initialisation (random per-block offsets, zero cross-attention output).
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from conditioning import CONTROL_GROUPS, ClassEmbedder, ControlEmbedder, TextEmbedder, TimestepEmbedder


class Route(NamedTuple):
    """How one conditioning route feeds the shared blocks (one row of ROUTES)."""

    # the semantic tokens: "joint" (mmDiT's second stream), "cross" (cross-attention), None
    context: str | None
    qk_norm: bool  # RMSNorm of each head's queries and keys, as the published recipe has it
    # "ada" (adaLN-Zero: each block's own MLP) | "single" (adaLN-single: one MLP, per-block tables)
    modulation: str
    adaln: tuple  # the terms added to the time embedding e_t, in this order (ADALN_TERMS)
    source: str  # whose recipe it is

    @property
    def gated(self):
        """Whether the --gate-* schedules act: the control enters through "gated control"."""
        return "gated control" in self.adaln


# What a route may add to the time embedding e_t to make the adaLN vector (DiffusionTransformer.condition)
ADALN_TERMS = {"control": "sum_k e_ctrl,k: the control metadata, ungated",
               "gated control": "sum_k g_k(t) e_ctrl,k: each control group weighted by its gate schedule",
               "pooled": "the pooled semantic vector (the class embedding for a class model)",
               "pooled mlp": "the pooled semantic vector through an MLP of its own (SD3's pooled text "
               "projection)"}

# The conditioning routes, one entry each: CONDS, --cond's help, validation and docs/baselines.md's table
# follow from it (a test holds that page to this table). A new route that recombines these parts is one more
# line.
ROUTES = {
    "ours": Route("joint", True, "ada", ("gated control",), "the paper's: semantics only as tokens"),
    "mmdit": Route("joint", True, "ada", ("control", "pooled mlp"), "SD3 (mmDiT)"),
    "adaln": Route(None, False, "ada", ("control", "pooled"), "DiT"),
    "xattn": Route("cross", False, "single", ("control",), "PixArt-alpha"),
}
CONDS = tuple(ROUTES)
ARCHS = ("dit", "mdt")
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
    """Fixed 2-D sin-cos embedding (grid_h * grid_w, dim) for a token grid, rows first; the first half of the
    channels encodes the column, the second the row (MAE / DiT order, so DiT checkpoints load unchanged).

    The model is trained on a base grid (base_h x base_w). On a grid with more tokens:
      resample  evaluate the embedding at positions scaled back by s = sqrt(base tokens / tokens), one factor
                for both axes, so the image spans the positional range it was trained on and keeps its aspect
                ratio (the paper's choice for 256 -> 512: a 2x larger square grid lands its even positions on
                the base grid)
      extend    keep integer positions 0 .. grid - 1, i.e. new, never-seen positions beyond the base grid
    Grids with no more tokens than the base use integer positions in both modes.
    """
    if mode not in POS_MODES:
        raise ValueError(f"unknown pos mode {mode!r}; choose one of {POS_MODES}")
    s = min(1.0, math.sqrt(base_h * base_w / (grid_h * grid_w))) if mode == "resample" else 1.0
    ys, xs = torch.arange(grid_h, dtype=torch.float64) * s, torch.arange(grid_w, dtype=torch.float64) * s
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, gx.reshape(-1)), sincos_1d(dim // 2, gy.reshape(-1))], dim=1)
    return emb.float()


#################################################################################
#                          Attention and blocks                                 #
#################################################################################

class Mlp(nn.Sequential):
    def __init__(self, dim, ratio=4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def heads_norm(dim, heads, on):
    """QK-norm on each head's queries or keys: keeps attention logits bounded (SD3); identity when off."""
    return nn.RMSNorm(dim // heads, eps=1e-6) if on else nn.Identity()


class Stream(nn.Module):
    """The per-stream half of a joint block: modulation, qkv (+ QK-norm), output projection, MLP.

    modulation "ada"     adaLN-Zero: the block's own SiLU + Linear maps the conditioning vector (B, D) to 6
                         vectors
               "single"  adaLN-single (PixArt-alpha): the vector is already the shared projection (B, 6 D);
                         the block adds its learned offsets `table` (6, D)
    pre_only: only the attention inputs (the context stream of the last block, whose output nobody reads;
    SD3)."""

    def __init__(self, dim, heads, mlp_ratio, pre_only=False, qk_norm=True, modulation="ada"):
        super().__init__()
        self.heads, self.n_mod = heads, 2 if pre_only else 6
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = heads_norm(dim, heads, qk_norm), heads_norm(dim, heads, qk_norm)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, mlp_ratio)
        if modulation == "ada":
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))
        else:
            self.table = nn.Parameter(torch.randn(self.n_mod, dim) / dim ** 0.5)

    def modulation(self, vec, dim):
        """(shift1, scale1, gate1, shift2, scale2, gate2), each (B, D); two of them for a pre-only stream."""
        if hasattr(self, "ada"):
            return self.ada(vec).chunk(self.n_mod, dim=-1)
        return (self.table[None] + vec.view(vec.shape[0], -1, dim)[:, :self.n_mod]).unbind(1)

    def pre_attention(self, x, vec):
        """x (B, L, D), vec (B, D) -> q, k, v each (B, H, L, D/H), and the modulation left for later."""
        B, L, D = x.shape
        shift1, scale1, *mod = self.modulation(vec, D)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x, attn, mod, between=None):
        """Residual updates gated by the modulation; attn (B, H, L, D/H). `between` runs after the attention
        update and before the MLP (PixArt-alpha's cross-attention)."""
        gate1, shift2, scale2, gate2 = mod
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).flatten(2))
        if between is not None:
            x = between(x)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the context tokens (keys, values) (PixArt-alpha). Unmodulated,
    ungated."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = heads_norm(dim, heads, qk_norm), heads_norm(dim, heads, qk_norm)

    def forward(self, x, ctx, mask=None):
        """x (B, N, D), ctx (B, K, D), mask (B, K) bool (True = keep) -> (B, N, D)"""
        (B, N, D), K, H = x.shape, ctx.shape[1], self.heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)                   # (B, H, N, D/H)
        k, v = self.kv(ctx).view(B, K, 2, H, D // H).permute(2, 0, 3, 1, 4)   # each (B, H, K, D/H)
        attn_mask = None if mask is None else mask[:, None, None, :]          # (B, 1, 1, K)
        # (B, H, N, D/H)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))                      # (B, N, D)


class JointBlock(nn.Module):
    """One transformer block; the context route is an option:
        context "joint"     mmDiT: image and context streams with separate weights, ONE attention over both
                "pre_only"  the same in the last block, where the context stream only feeds the attention
                "cross"     PixArt-alpha: self-attention over the image, then cross-attention to the context
                None        DiT: self-attention over the image tokens only
    `skip`: an mDT long shortcut, Linear(2 D -> D) fusing an earlier activation into the input."""

    def __init__(self, dim, heads, mlp_ratio=4.0, context="joint", qk_norm=True, modulation="ada",
                 skip=False):
        super().__init__()
        self.img = Stream(dim, heads, mlp_ratio, qk_norm=qk_norm, modulation=modulation)
        joint = context in ("joint", "pre_only")
        self.ctx = Stream(dim, heads, mlp_ratio, context == "pre_only", qk_norm,
                          modulation) if joint else None
        self.cross = CrossAttention(dim, heads, qk_norm) if context == "cross" else None
        self.skip = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, ctx, vec, mask=None, skip=None):
        """x (B, N, D) image tokens, ctx (B, K, D) context tokens or None, vec (B, D) or (B, 6 D) for
        adaLN-single, mask (B, K) bool (True = keep), skip (B, N, D) for a long shortcut -> (x, ctx); ctx is
        None after a pre-only context stream, whose output nobody reads."""
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))                                    # (B, N, D)
        qi, ki, vi, mod_i = self.img.pre_attention(x, vec)                               # each (B, H, N, D/H)
        if self.ctx is None:  # DiT / PixArt-alpha: the context has no stream in the attention
            between = None if self.cross is None else (lambda h: h + self.cross(h, ctx, mask))
            return self.img.post_attention(x, F.scaled_dot_product_attention(qi, ki, vi), mod_i, between), ctx
        qc, kc, vc, mod_c = self.ctx.pre_attention(ctx, vec)                             # each (B, H, K, D/H)
        # each (B, H, K + N, D/H)
        q, k, v = torch.cat([qc, qi], 2), torch.cat([kc, ki], 2), torch.cat([vc, vi], 2)
        attn_mask = None
        if mask is not None:  # padding tokens of the context are never attended to
            keep = torch.cat([mask, mask.new_ones(x.shape[0], x.shape[1])], dim=1)        # (B, K + N)
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)                # (B, H, K + N, D/H)
        K = ctx.shape[1]
        x = self.img.post_attention(x, out[:, :, K:], mod_i)                               # (B, N, D)
        return x, (None if not mod_c else self.ctx.post_attention(ctx, out[:, :, :K], mod_c))

    def ada_outputs(self):
        """The last layers of the adaLN-Zero modulation MLPs: zeroed, they make the block the identity."""
        return [stream.ada[-1] for stream in (self.img, self.ctx) if stream is not None]


class FinalLayer(nn.Module):
    """Modulated norm + linear to patch pixels; the linear is zero-initialised so a fresh model predicts 0.
    Modulation "ada": (shift, scale) from SiLU + Linear of the vector (DiT); "single": a learned (2, D) table
    plus the time embedding itself (PixArt-alpha)."""

    def __init__(self, dim, patch, out_channels, modulation="ada"):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        if modulation == "ada":
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        else:
            self.table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, vec):
        """x (B, N, D), vec (B, D) -> (B, N, patch ** 2 * out_channels)"""
        if hasattr(self, "ada"):
            shift, scale = self.ada(vec).chunk(2, dim=-1)               # each (B, D)
        else:
            shift, scale = (self.table[None] + vec[:, None]).unbind(1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))       # (B, N, patch ** 2 * out_channels)


#################################################################################
#                                Core model                                     #
#################################################################################

class DiffusionTransformer(nn.Module):
    """The denoiser with DiT's plain stack of blocks; `cond` picks the conditioning route (module
    docstring)."""

    def __init__(self, input_size=32, patch=2, in_channels=4, out_channels=None, depth=28, width=1152,
                 heads=16, mlp_ratio=4.0, num_classes=1000, class_tokens=1, cond="ours", gates=None,
                 pos_mode="resample", base_size=None, qk_norm=None, text=None):
        super().__init__()
        if cond not in CONDS:
            raise ValueError(f"unknown --cond {cond!r}; choose one of {CONDS}")
        if pos_mode not in POS_MODES:
            raise ValueError(f"unknown --pos-mode {pos_mode!r}; choose one of {POS_MODES}")
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch}")
        self.patch, self.in_channels, self.width = patch, in_channels, width
        self.cond, self.pos_mode = cond, pos_mode
        self.out_channels = out_channels or in_channels
        self.base_grid = (base_size or input_size) // patch  # the grid the positional embedding is defined on
        self.route = route = ROUTES[cond]
        qk_norm = route.qk_norm if qk_norm is None else qk_norm
        mod = route.modulation
        self.x_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.t_embed = TimestepEmbedder(width)
        # the semantic condition: class labels, or (text=dict(text_dim, max_length, pad, pad_noise, null)) a
        # prompt
        if text:
            self.y_embed = TextEmbedder(dim=width, **text)
        else:
            self.y_embed = ClassEmbedder(num_classes, width, class_tokens)
        self.c_embed = ControlEmbedder(width, gates=gates)
        if "pooled mlp" in route.adaln:  # SD3: the pooled semantic vector's own MLP before it joins e_t
            self.pool_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        if mod == "single":  # adaLN-single: one modulation MLP shared by all blocks
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        context = route.context
        last = "pre_only" if context == "joint" else context  # nobody reads the last context stream's output

        def block(i, skip=False, ctx_read=None):
            """Block i of `depth`. Every block's context output is read by the next one, except the last
            block's: its context stream is pre-only. `ctx_read` overrides that for a trunk that reads it after
            the stack."""
            ctx_read = i < depth - 1 if ctx_read is None else ctx_read
            return JointBlock(width, heads, mlp_ratio, context if ctx_read else last, qk_norm, mod, skip)

        self.make_blocks(depth, block)
        self.final = FinalLayer(width, patch, self.out_channels, mod)
        self._pos_cache = {}
        self.initialize_weights()

    def make_blocks(self, depth, block):
        """The trunk's modules; `block(i, skip=False, ctx_read=True)` builds block i of `depth` (skip: it
        fuses a long shortcut; ctx_read: its context stream is kept, not attention-only). A method so that a
        subclass can add modules of its own here, before the final layer: the registration order fixes the
        initialisation order, and with it which random numbers each tensor gets."""
        self.blocks = nn.ModuleList([block(i) for i in range(depth)])

    def initialize_weights(self):
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.x_embed.weight.data  # initialise the patch embedding like a linear layer (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        mlps = [self.t_embed.mlp,
                *self.c_embed.mlps.values()] + ([self.pool_embed] if hasattr(self, "pool_embed") else [])
        for mlp in mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        zero = [self.final.linear]
        # PixArt-alpha: small shared modulation, cross-attention switched off
        if self.route.modulation == "single":
            nn.init.normal_(self.t_block[1].weight, std=0.02)
            zero += [block.cross.proj for block in self.blocks]
        else:  # adaLN-Zero: every block starts as the identity
            zero += [layer for block in self.blocks for layer in block.ada_outputs()] + [self.final.ada[-1]]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def pos_embed(self, grid_h, grid_w, device):
        """The fixed sin-cos embedding (grid_h * grid_w, D) of a token grid, computed once per grid and
        device."""
        key = (grid_h, grid_w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.width, grid_h, grid_w, self.base_grid, self.base_grid,
                                             self.pos_mode).to(device)
        return self._pos_cache[key]

    def patchify(self, x):
        """imgs: (B, C, H, W) -> tokens: (B, N, D) with their positions added, and the positions (N, D), where
        N = H * W / patch ** 2 (rows of patches first)."""
        H, W = x.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch}")
        pos = self.pos_embed(H // self.patch, W // self.patch, x.device)
        return self.x_embed(x).flatten(2).transpose(1, 2) + pos, pos

    def unpatchify(self, x, H, W):
        """x: (B, N, patch ** 2 * out_channels), N = H * W / patch ** 2 -> imgs: (B, out_channels, H, W)"""
        p, out = self.patch, self.out_channels
        return x.view(-1, H // p, W // p, p, p, out).permute(0, 5, 1, 3, 2, 4).reshape(-1, out, H, W)

    def condition(self, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """The adaLN vector (B, D), the context tokens (B, K, D) or None, and their attention mask (B, K) or
        None, as the route says: e_t plus the route's ADALN_TERMS, in its order; tokens only for a route with
        a context."""
        e_t = self.t_embed(t)  # (B, D)
        tokens, pooled, mask = semantic_tokens(self.y_embed, y, sem_drop)  # (B, K, D), (B, D), (B, K) or None
        e_ctrl = self.c_embed(ctrl, ctrl_drop)  # (B, G, D)
        terms = {
            "control": lambda: e_ctrl.sum(1),  # each (B, D)
            "gated control": lambda: self.c_embed.gated(e_ctrl, t),  # control enters gently along t
            "pooled": lambda: pooled, "pooled mlp": lambda: self.pool_embed(pooled),
        }
        vec = e_t
        for term in self.route.adaln:
            vec = vec + terms[term]()
        if self.route.context is None:  # DiT: the semantic condition is in the vector, there are no tokens
            return vec, None, None
        return vec, tokens, mask

    def block_vector(self, vec):
        """What each block's modulation reads: the adaLN vector itself, or for adaLN-single the shared
        projection of it (B, 6 D), to which each block adds its own table."""
        return self.t_block(vec) if self.route.modulation == "single" else vec

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) labels or a prompt's (features (B, L, d), mask (B, L)[,
        padding noise (B, L, d)]),
        ctrl (B, S) raw control, ctrl_drop / sem_drop (B,) bool: use the null control / semantic condition
        -> (B, out_channels, H, W)"""
        H, W = x.shape[-2:]
        x, _ = self.patchify(x)  # (B, N, D), where N = H * W / patch ** 2
        vec, ctx, mask = self.condition(t, y, ctrl, ctrl_drop, sem_drop)  # (B, D), (B, K, D), (B, K)
        block_vec = self.block_vector(vec)  # (B, D), or (B, 6 D) for adaLN-single
        for block in self.blocks:
            x, ctx = block(x, ctx, block_vec, mask)  # (B, N, D), (B, K, D)
        x = self.final(x, vec)  # (B, N, patch ** 2 * out_channels)
        return self.unpatchify(x, H, W)  # (B, out_channels, H, W)


def semantic_tokens(embedder, y, drop=None):
    """Class labels (B,) or a prompt (features, mask), at sampling (features, mask, padding noise) -> context
    tokens (B, K, D), pooled (B, D), attention mask (B, K) or None; `drop` (B,) bool selects the null
    condition (the null class row, or the null prompt)."""
    if isinstance(embedder, TextEmbedder):
        # training draws fresh padding noise; diffusion.generate brings each sample's own
        features, mask, *noise = y
        return embedder(features, mask, drop, noise=noise[0] if noise else None)
    return (*embedder(y, drop), None)


#################################################################################
#                     mDT-v2: masked training on the same blocks                #
#################################################################################


def mdt_decode_layers(depth, decode_layers=None):
    """The decoder blocks of an mDT of this depth: as given, or 4 from depth 12 up, else what leaves two equal
    encoder halves; a count that leaves no two equal halves is refused."""
    decode_layers = decode_layers if decode_layers is not None else (4 if depth >= 12 else (depth - 2) % 4)
    if not 0 <= decode_layers <= depth - 2 or (depth - decode_layers) % 2:
        raise ValueError(f"--decode-layers {decode_layers}: depth {depth} minus the decoder layers must be "
                         f"even and at least 2")
    return decode_layers


class MDTv2(DiffusionTransformer):
    """mDT-v2 (Gao et al., MDTv2): the encoder's two halves are joined by long shortcuts (U-ViT), then decoder
    blocks each re-read the input tokens. In training (mask_ratio > 0) a random share of the image tokens,
    drawn from [mask_ratio, mask_ratio + 0.2] (30-50 % by default), never reaches the encoder; a side
    interpolator (one more block) fills them in before the decoder, so the model learns to predict the full
    image from the rest. With mask_ratio 0 nothing is masked and neither the side block nor the mask token is
    built. Everything else (embedders, routes, final layer) is DiffusionTransformer's.
    decode_layers: decoder blocks, default 4 from depth 12 up, else what leaves two equal encoder halves."""

    def __init__(self, depth=28, decode_layers=None, mask_ratio=0.3, **kwargs):
        decode_layers = mdt_decode_layers(depth, decode_layers)
        # set before the base constructor: its make_blocks reads them
        self.half = (depth - decode_layers) // 2
        self.decode_layers, self.mask_ratio = decode_layers, mask_ratio
        super().__init__(depth=depth, **kwargs)

    def make_blocks(self, depth, block):
        # the encoder's second half and the decoder fuse an earlier activation in through a long shortcut.
        # With no decoder the encoder's last block is the last of the stack, yet the side interpolator reads
        # its context output: that block keeps a full context stream
        masking = self.mask_ratio > 0
        ctx_read = lambda i: i < depth - 1 or (self.decode_layers == 0 and masking)
        self.blocks = nn.ModuleList([block(i, skip=i >= self.half,
                                           ctx_read=ctx_read(i)) for i in range(depth)])
        # only masked tokens need filling in: with --mask-ratio 0 these would be weights nothing trains
        if masking:
            # (and DDP refuses parameters that get no gradient)
            self.side = block(depth - 1)  # like the last block, it reads the context without updating it
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.width))

    def initialize_weights(self):
        super().initialize_weights()
        if self.mask_ratio <= 0:
            return
        if self.route.modulation == "ada":  # adaLN-Zero: the side block starts as the identity too
            for layer in self.side.ada_outputs():
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_keep(self, x):
        """mDT-v2 masking: indices (B, L) of the tokens kept, L = N (1 - r), r ~ U[mask_ratio, mask_ratio +
        0.2] once per batch. Drawn on the CPU so the global (checkpointed) RNG state makes resumes exact."""
        B, N, _ = x.shape
        ratio = self.mask_ratio + 0.2 * torch.rand(()).item()
        keep = max(1, int(N * (1 - ratio)))
        return torch.rand(B, N).argsort(dim=1)[:, :keep].to(x.device)

    def trunk(self, x, ctx, vec, pos, mask=None, keep=None):
        """Encoder halves joined by long shortcuts, then -- only when tokens were dropped (`keep` (B, L)) --
        the side interpolator, then the decoder: image tokens x (B, N, D), positions pos (N, D) -> (B, N,
        D)."""
        x_in, D = x, x.shape[-1]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, D))  # (B, L, D): the visible tokens
        skips = []
        for i, block in enumerate(self.blocks[: 2 * self.half]):
            if i < self.half:
                x, ctx = block(x, ctx, vec, mask)  # (B, L, D), (B, K, D)
                skips.append(x)
            else:
                x, ctx = block(x, ctx, vec, mask, skip=skips.pop())  # (B, L, D), (B, K, D)
        # put the visible tokens back among learned mask tokens; the side block fills those in
        if keep is not None:
            full = self.mask_token.to(x.dtype).expand(x.shape[0], x_in.shape[1], D).clone()
            full = full.scatter(1, keep[..., None].expand(-1, -1, D), x) + pos  # (B, N, D)
            filled, _ = self.side(full, ctx, vec, mask)  # (B, N, D)
            visible = torch.zeros(full.shape[:2], dtype=torch.bool, device=x.device).scatter(1, keep, True)
            # the side block's output only where tokens were dropped
            x = torch.where(visible[..., None], full, filled)
        else:
            x = x + pos  # the decoder's positional embedding (MDT: a second one; here the same fixed one)
        for block in self.blocks[2 * self.half :]:
            x, ctx = block(x, ctx, vec, mask, skip=x_in)  # (B, N, D), (B, K, D)
        return x

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """As DiffusionTransformer.forward; in training mode (mask_ratio > 0) the unmasked and the masked
        prediction stacked, so B' = 2 B: (2 B, out_channels, H, W)."""
        H, W = x.shape[-2:]
        x, pos = self.patchify(x)  # (B, N, D), (N, D)
        vec, ctx, mask = self.condition(t, y, ctrl, ctrl_drop, sem_drop)  # (B, D), (B, K, D), (B, K)
        block_vec = self.block_vector(vec)  # (B, D), or (B, 6 D) for adaLN-single
        if self.training and self.mask_ratio > 0:  # both passes in one call: one DDP forward and backward
            x = torch.cat([self.trunk(x, ctx, block_vec, pos, mask),
                           self.trunk(x, ctx, block_vec, pos, mask, self.random_keep(x))])  # (2 B, N, D)
            vec = vec.repeat(2, 1)  # (2 B, D)
        else:
            x = self.trunk(x, ctx, block_vec, pos, mask)  # (B, N, D)
        x = self.final(x, vec)  # (B', N, patch ** 2 * out_channels)
        return self.unpatchify(x, H, W)  # (B', out_channels, H, W)


#################################################################################
#                                  Configs                                      #
#################################################################################
# DiT naming: size x patch. T and XS are small presets for tests and CPU runs.

SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "XS": (4, 128, 4),
         "T": (2, 64, 2)}
MODELS = [f"{s}/{p}" for s in SIZES for p in (2, 4, 8)]


def build_model(name, arch="dit", decode_layers=None, mask_ratio=0.3, **kwargs):
    """`name` like 'XL/2', `arch` dit (DiffusionTransformer) or mdt (MDTv2, the only one that reads
    decode_layers and mask_ratio); kwargs go to the class."""
    size, _, patch = name.partition("/")
    if size not in SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {ARCHS} (or unet)")
    if arch == "mdt":
        kwargs.update(decode_layers=decode_layers, mask_ratio=mask_ratio)
    depth, width, heads = SIZES[size]
    model = MDTv2 if arch == "mdt" else DiffusionTransformer
    return model(patch=int(patch), depth=depth, width=width, heads=heads, **kwargs)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                     Published checkpoints: DiT (facebookresearch)             #
#################################################################################
# The official DiT models.py names its tensors differently; the computation is the same as ours with
# cond="adaln", qk_norm off and 8 output channels (eps + learned variance). The fixed positional embedding is
# not a parameter here: it is recomputed (same formula) and checked against the file's. Our control embedder
# has no counterpart: its output layers are zeroed, so the mapped model ignores the control metadata and
# computes exactly what DiT computes.

DIT_NAMES = [("x_embedder.proj.", "x_embed."), ("t_embedder.mlp.", "t_embed.mlp."),
             ("y_embedder.embedding_table.", "y_embed.table."),
             ("final_layer.adaLN_modulation.", "final.ada."), ("final_layer.linear.", "final.linear."),
             (".attn.qkv.", ".img.qkv."), (".attn.proj.", ".img.proj."), (".mlp.fc1.", ".img.mlp.0."),
             (".mlp.fc2.", ".img.mlp.2."), (".adaLN_modulation.", ".img.ada.")]


def is_dit_state_dict(state):
    return (isinstance(state,
                       dict) and "x_embedder.proj.weight" in state and "final_layer.linear.weight" in state)


def from_dit(state, width):
    """An official DiT state dict -> (our state dict, the DiT grid size). Unknown names raise. Only the
    control MLPs' first layers are left out: they keep the model's own initialisation (zeroing both layers
    would leave the branch without a gradient forever, should the model be fine-tuned with control
    metadata)."""
    out = {}
    for name, tensor in state.items():
        if name == "pos_embed":
            continue
        new = next((name.replace(a, b, 1) for a, b in DIT_NAMES if a in name), None)
        if new is None:
            raise ValueError(f"unexpected tensor {name!r} in the DiT checkpoint")
        out[new] = tensor
    grid = int(round(math.sqrt(state["pos_embed"].shape[1])))
    ours = sincos_2d(width, grid, grid, grid, grid)
    if not torch.allclose(state["pos_embed"].reshape(-1, width).float(), ours, atol=1e-5):
        raise ValueError("the DiT checkpoint's positional embedding is not the standard sin-cos one")
    for group in CONTROL_GROUPS:  # silence the control branch DiT never had
        for kind in ("weight", "bias"):
            ref = out.get(f"t_embed.mlp.2.{kind}")
            shape = (width, width) if kind == "weight" else (width,)
            out[f"c_embed.mlps.{group}.2.{kind}"] = torch.zeros(shape, dtype=ref.dtype)
    out["c_embed.null"] = torch.zeros(len(CONTROL_GROUPS), width, dtype=out["t_embed.mlp.2.weight"].dtype)
    return out, grid
