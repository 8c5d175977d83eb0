"""
The denoiser: a diffusion transformer whose conditioning route is a flag.

    image latents (B, C, H, W) -> patches + 2-D sin-cos positions -> image tokens (B, N, D)
    the route's context terms (by default the semantic tokens) -> context tokens (B, K, D)
    time + the route's adaLN terms (by default the gated control) -> one adaLN vector (B, D)
    depth x JointBlock: each stream has its own weights; both are concatenated for ONE attention call (mmDiT)
    final adaLN layer -> velocity (B, C, H, W)

The conditioning routes (`cond`) are the rows of ROUTES, all built from the same blocks: each row names what
enters the context (CONTEXT_TERMS), how the image tokens read it (joint attention, cross-attention, or no
context), and what is added to the time embedding for adaLN (ADALN_TERMS). The paper's route, `ours`, puts
the semantic tokens only in the context and the control metadata, gated per group by a schedule of t, only in
adaLN. mDT-v2 (mdt.py) is a subclass with another trunk; the LDM baseline's UNet is another network (unet.py).

A fresh model outputs zero: the final layer is zero-initialised, and with adaLN-Zero (every route but xattn)
every block is the identity (DiT practice), so training starts from a well-behaved function. xattn follows
PixArt-alpha's initialisation (random per-block offsets, zero cross-attention output).
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from conditioning import ClassEmbedder, ControlEmbedder, TextEmbedder, TimestepEmbedder


class Route(NamedTuple):
    """How one conditioning route feeds the shared blocks (one row of ROUTES)."""

    # how the image tokens read the context: "joint" (mmDiT's second stream in one attention call), "cross"
    # (cross-attention after self-attention), None (there is no context)
    attention: str | None
    context: tuple  # the context tokens, in this order (CONTEXT_TERMS); () when attention is None
    qk_norm: bool  # RMSNorm of each head's queries and keys, as the published recipe has it
    modulation: str  # "ada" (adaLN-Zero: each block's own MLP) | "single" (adaLN-single: one shared MLP)
    adaln: tuple  # the terms added to the time embedding e_t, in this order (ADALN_TERMS)
    source: str  # whose recipe it is

    @property
    def gated(self):
        """Whether the --gate-* schedules act: the control enters through "gated control"."""
        return "gated control" in self.adaln


# What a route may put in the context stream, as tokens (DiffusionTransformer.condition)
CONTEXT_TERMS = {"semantic": "the class tokens, or the prompt's tokens",
                 "control": "e_ctrl,k: one token per control group, ungated"}
# What a route may add to the time embedding e_t to make the adaLN vector (DiffusionTransformer.condition)
ADALN_TERMS = {"control": "sum_k e_ctrl,k: the control metadata, ungated",
               "gated control": "sum_k g_k(t) e_ctrl,k: each control group weighted by its gate schedule",
               "pooled": "the pooled semantic vector (the class embedding for a class model)",
               "pooled mlp": "the pooled semantic vector through an MLP of its own (SD3's pooled projection)"}

# The conditioning routes, one row each: CONDS, --cond's choices and help, the validation of --gate-*, the
# UNet's supported routes and docs/baselines.md's table follow from it (a test holds that page to this table).
# A new route that recombines the terms above is one more row.
ROUTES = {
    "ours": Route("joint", ("semantic",), True, "ada", ("gated control",), "the paper's"),
    "mmdit": Route("joint", ("semantic",), True, "ada", ("control", "pooled mlp"), "SD3 (mmDiT)"),
    "adaln": Route(None, (), False, "ada", ("control", "pooled"), "DiT"),
    "xattn": Route("cross", ("semantic",), False, "single", ("control",), "PixArt-alpha"),
}
CONDS = tuple(ROUTES)
POS_MODES = ("resample", "extend")


def check_route(name):
    """The route `name` of ROUTES, refused with the reason if it is not one or does not hold together."""
    if name not in ROUTES:
        raise ValueError(f"unknown --cond {name!r}; choose one of {CONDS}")
    route = ROUTES[name]
    unknown = [t for t in route.context if t not in CONTEXT_TERMS]
    unknown += [t for t in route.adaln if t not in ADALN_TERMS]
    if unknown:
        raise ValueError(f"route {name!r}: unknown terms {unknown}; the context terms are "
                         f"{tuple(CONTEXT_TERMS)}, the adaLN terms {tuple(ADALN_TERMS)}")
    if route.attention not in ("joint", "cross", None) or (route.attention is None) != (not route.context):
        raise ValueError(f"route {name!r}: context tokens need an attention to read them (joint or cross), "
                         "and an attention needs context tokens")
    return route


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
    scale = min(1.0, math.sqrt(base_h * base_w / (grid_h * grid_w))) if mode == "resample" else 1.0
    ys = torch.arange(grid_h, dtype=torch.float64) * scale
    xs = torch.arange(grid_w, dtype=torch.float64) * scale
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, gx.reshape(-1)), sincos_1d(dim // 2, gy.reshape(-1))], dim=1)
    return emb.float()


#################################################################################
#                          Attention and blocks                                 #
#################################################################################

class Mlp(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear, hidden width `ratio` x dim (DiT's)."""

    def __init__(self, dim, ratio=4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def heads_norm(dim, heads, on):
    """QK-norm on each head's queries or keys: keeps attention logits bounded (SD3); identity when off."""
    return nn.RMSNorm(dim // heads, eps=1e-6) if on else nn.Identity()


class Stream(nn.Module):
    """The per-stream half of a joint block: modulation, qkv (+ QK-norm), output projection, MLP.

    modulation "ada"     adaLN-Zero: the block's own SiLU + Linear maps the adaLN vector (B, D) to 6 vectors
               "single"  adaLN-single (PixArt-alpha): the vector is already the shared projection (B, 6 D);
                         the block adds its learned offsets `table` (6, D)
    pre_only: only the attention inputs, for the context stream of the last block, whose output nobody reads
    (SD3)."""

    def __init__(self, dim, heads, mlp_ratio, pre_only=False, qk_norm=True, modulation="ada"):
        super().__init__()
        self.heads, self.num_vectors = heads, 2 if pre_only else 6
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = heads_norm(dim, heads, qk_norm), heads_norm(dim, heads, qk_norm)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, mlp_ratio)
        if modulation == "ada":
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_vectors * dim))
        else:
            self.table = nn.Parameter(torch.randn(self.num_vectors, dim) / dim ** 0.5)

    def modulation(self, cond_vector, dim):
        """(shift1, scale1, gate1, shift2, scale2, gate2), each (B, D); two of them for a pre-only stream."""
        if hasattr(self, "ada"):
            return self.ada(cond_vector).chunk(self.num_vectors, dim=-1)
        shared = cond_vector.view(cond_vector.shape[0], -1, dim)[:, :self.num_vectors]  # (B, num_vectors, D)
        return (self.table[None] + shared).unbind(1)

    def pre_attention(self, x, cond_vector):
        """x (B, L, D), cond_vector (B, D) -> q, k, v each (B, H, L, D/H), and the modulation of the residual
        updates, for post_attention."""
        B, L, D = x.shape
        shift1, scale1, *residual_modulation = self.modulation(cond_vector, D)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        return self.q_norm(q), self.k_norm(k), v, residual_modulation

    def post_attention(self, x, attn, residual_modulation, before_mlp=None):
        """Residual updates gated by the modulation; attn (B, H, L, D/H). `before_mlp` runs after the
        attention update and before the MLP (PixArt-alpha's cross-attention)."""
        gate1, shift2, scale2, gate2 = residual_modulation
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).flatten(2))
        if before_mlp is not None:
            x = before_mlp(x)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the context tokens (keys, values), unmodulated and ungated
    (PixArt-alpha)."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = heads_norm(dim, heads, qk_norm), heads_norm(dim, heads, qk_norm)

    def forward(self, x, ctx, mask=None):
        """x (B, N, D), ctx (B, K, D), mask (B, K) bool (True = keep) -> (B, N, D)"""
        (B, N, D), K, H = x.shape, ctx.shape[1], self.heads
        q = self.q_norm(self.q(x).view(B, N, H, D // H).transpose(1, 2))         # (B, H, N, D/H)
        k, v = self.kv(ctx).view(B, K, 2, H, D // H).permute(2, 0, 3, 1, 4)      # each (B, H, K, D/H)
        attn_mask = None if mask is None else mask[:, None, None, :]             # (B, 1, 1, K)
        out = F.scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=attn_mask)  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).flatten(2))                         # (B, N, D)


class JointBlock(nn.Module):
    """One transformer block; how the image reads the context is an option:
        attention "joint"     mmDiT: image and context streams with separate weights, ONE attention over both
                  "pre_only"  the same in the last block, where the context stream only feeds the attention
                  "cross"     PixArt-alpha: self-attention over the image, then cross-attention to the context
                  None        DiT: self-attention over the image tokens only
    `skip`: an mDT long shortcut, Linear(2 D -> D) fusing an earlier activation into the input."""

    def __init__(self, dim, heads, mlp_ratio=4.0, attention="joint", qk_norm=True, modulation="ada",
                 skip=False):
        super().__init__()
        self.img = Stream(dim, heads, mlp_ratio, qk_norm=qk_norm, modulation=modulation)
        joint = attention in ("joint", "pre_only")
        self.ctx = Stream(dim, heads, mlp_ratio, attention == "pre_only", qk_norm,
                          modulation) if joint else None
        self.cross = CrossAttention(dim, heads, qk_norm) if attention == "cross" else None
        self.skip = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, ctx, cond_vector, mask=None, skip=None):
        """x (B, N, D) image tokens, ctx (B, K, D) context tokens or None, cond_vector (B, D), or (B, 6 D) for
        adaLN-single, mask (B, K) bool (True = keep), skip (B, N, D) for a long shortcut -> (x, ctx); ctx is
        None after a pre-only context stream, whose output nobody reads."""
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))                                  # (B, N, D)
        qi, ki, vi, img_modulation = self.img.pre_attention(x, cond_vector)            # each (B, H, N, D/H)
        if self.ctx is None:  # DiT / PixArt-alpha: the context has no stream in the attention
            cross = None if self.cross is None else (lambda h: h + self.cross(h, ctx, mask))
            attn = F.scaled_dot_product_attention(qi, ki, vi)                          # (B, H, N, D/H)
            return self.img.post_attention(x, attn, img_modulation, cross), ctx
        qc, kc, vc, ctx_modulation = self.ctx.pre_attention(ctx, cond_vector)          # each (B, H, K, D/H)
        q, k, v = torch.cat([qc, qi], 2), torch.cat([kc, ki], 2), torch.cat([vc, vi], 2)  # (B, H, K + N, D/H)
        attn_mask = None
        if mask is not None:  # padding tokens of the context are never attended to
            keep = torch.cat([mask, mask.new_ones(x.shape[0], x.shape[1])], dim=1)      # (B, K + N)
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)              # (B, H, K + N, D/H)
        K = ctx.shape[1]
        x = self.img.post_attention(x, out[:, :, K:], img_modulation)                    # (B, N, D)
        if not ctx_modulation:  # a pre-only context stream: nothing reads its output
            return x, None
        return x, self.ctx.post_attention(ctx, out[:, :, :K], ctx_modulation)            # (B, K, D)

    def ada_outputs(self):
        """The last layers of the adaLN-Zero modulation MLPs: zeroed, they make the block the identity."""
        return [stream.ada[-1] for stream in (self.img, self.ctx) if stream is not None]


class FinalLayer(nn.Module):
    """Modulated norm + linear to patch pixels; the linear is zero-initialised so a fresh model predicts 0.
    Modulation "ada": (shift, scale) from SiLU + Linear of the adaLN vector (DiT); "single": a learned (2, D)
    table plus the adaLN vector itself (PixArt-alpha)."""

    def __init__(self, dim, patch, out_channels, modulation="ada"):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        if modulation == "ada":
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        else:
            self.table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, cond_vector):
        """x (B, N, D), cond_vector (B, D) -> (B, N, patch ** 2 * out_channels)"""
        if hasattr(self, "ada"):
            shift, scale = self.ada(cond_vector).chunk(2, dim=-1)               # each (B, D)
        else:
            shift, scale = (self.table[None] + cond_vector[:, None]).unbind(1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, patch ** 2 * out_channels)


#################################################################################
#                                Core model                                     #
#################################################################################

class DiffusionTransformer(nn.Module):
    """The denoiser with DiT's plain stack of blocks; `cond` picks the conditioning route (ROUTES)."""

    def __init__(self, input_size=32, patch=2, in_channels=4, out_channels=None, depth=28, width=1152,
                 heads=16, mlp_ratio=4.0, num_classes=1000, class_tokens=1, cond="ours", gates=None,
                 pos_mode="resample", base_size=None, qk_norm=None, text=None):
        super().__init__()
        self.route = route = check_route(cond)
        if pos_mode not in POS_MODES:
            raise ValueError(f"unknown --pos-mode {pos_mode!r}; choose one of {POS_MODES}")
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch}")
        self.patch, self.in_channels, self.width = patch, in_channels, width
        self.cond, self.pos_mode = cond, pos_mode
        self.out_channels = out_channels or in_channels
        self.base_grid = (base_size or input_size) // patch  # the grid the positional embedding is defined on
        qk_norm = route.qk_norm if qk_norm is None else qk_norm
        self.x_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.t_embed = TimestepEmbedder(width)
        # the semantic condition: class labels, or a prompt when `text` holds the TextEmbedder's settings
        if text:
            self.y_embed = TextEmbedder(dim=width, **text)
        else:
            self.y_embed = ClassEmbedder(num_classes, width, class_tokens)
        self.c_embed = ControlEmbedder(width, gates=gates)
        if "pooled mlp" in route.adaln:  # SD3: the pooled semantic vector's own MLP before it joins e_t
            self.pool_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        if route.modulation == "single":  # adaLN-single: one modulation MLP shared by all blocks
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        # nobody reads the last block's context output: its joint stream is pre-only
        last_attention = "pre_only" if route.attention == "joint" else route.attention

        def block(i, skip=False, keep_context=None):
            """Block i of `depth`. Every block's context output is read by the next one, except the last
            block's: its context stream is pre-only. `keep_context` overrides that for a trunk that reads the
            context after the stack."""
            keep_context = i < depth - 1 if keep_context is None else keep_context
            return JointBlock(width, heads, mlp_ratio, route.attention if keep_context else last_attention,
                              qk_norm, route.modulation, skip)

        self.make_blocks(depth, block)
        self.final = FinalLayer(width, patch, self.out_channels, route.modulation)
        self._pos_cache = {}
        self.initialize_weights()

    def make_blocks(self, depth, block):
        """The trunk's modules; `block(i, skip=False, keep_context=None)` builds block i of `depth` (skip: it
        fuses a long shortcut; keep_context: its context stream is kept, not attention-only). A method so
        that a subclass can add modules of its own here, before the final layer: the registration order fixes
        the initialisation order, and with it which random numbers each tensor gets."""
        self.blocks = nn.ModuleList([block(i) for i in range(depth)])

    def initialize_weights(self):
        """DiT's initialisation: Xavier linears, small embedder MLPs, and zeros where a fresh model must be
        the identity (or, for adaLN-single, where PixArt-alpha switches the cross-attention off)."""
        def xavier_linear(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier_linear)
        patch_weight = self.x_embed.weight.data  # initialise the patch embedding like a linear layer (DiT)
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        mlps = [self.t_embed.mlp,
                *self.c_embed.mlps.values()] + ([self.pool_embed] if hasattr(self, "pool_embed") else [])
        for mlp in mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        zeroed = [self.final.linear]
        if self.route.modulation == "single":  # PixArt-alpha: small shared modulation, cross-attention off
            nn.init.normal_(self.t_block[1].weight, std=0.02)
            zeroed += [block.cross.proj for block in self.blocks]
        else:  # adaLN-Zero: every block starts as the identity
            zeroed += [layer for block in self.blocks for layer in block.ada_outputs()] + [self.final.ada[-1]]
        for layer in zeroed:
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
        None, as the route says: e_t plus the route's ADALN_TERMS in its order, and its CONTEXT_TERMS in its
        order as tokens."""
        e_t = self.t_embed(t)  # (B, D)
        tokens, pooled, mask = semantic_tokens(self.y_embed, y, sem_drop)  # (B, K, D), (B, D), (B, K) or None
        e_ctrl = self.c_embed(ctrl, ctrl_drop)  # (B, G, D)
        adaln_terms = {
            "control": lambda: e_ctrl.sum(1),  # each (B, D)
            "gated control": lambda: self.c_embed.gated(e_ctrl, t),  # control enters gently along t
            "pooled": lambda: pooled, "pooled mlp": lambda: self.pool_embed(pooled),
        }
        context_terms = {"semantic": lambda: (tokens, mask), "control": lambda: (e_ctrl, None)}  # (B, K_i, D)
        cond_vector = e_t
        for term in self.route.adaln:
            cond_vector = cond_vector + adaln_terms[term]()
        if not self.route.context:  # DiT: there are no tokens; the semantic condition is in the vector
            return cond_vector, None, None
        return (cond_vector, *join_context([context_terms[term]() for term in self.route.context]))

    def block_vector(self, cond_vector):
        """What each block's modulation reads: the adaLN vector itself, or for adaLN-single the shared
        projection of it (B, 6 D), to which each block adds its own table."""
        return self.t_block(cond_vector) if self.route.modulation == "single" else cond_vector

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) labels or a prompt's (features (B, L, d), mask (B, L)),
        at sampling also its padding noise (B, L, d); ctrl (B, S) raw control; ctrl_drop / sem_drop (B,)
        bool: use the null control / semantic condition -> (B, out_channels, H, W)"""
        H, W = x.shape[-2:]
        x, _ = self.patchify(x)  # (B, N, D), where N = H * W / patch ** 2
        cond_vector, ctx, mask = self.condition(t, y, ctrl, ctrl_drop, sem_drop)  # (B, D), (B, K, D), (B, K)
        block_vector = self.block_vector(cond_vector)  # (B, D), or (B, 6 D) for adaLN-single
        for block in self.blocks:
            x, ctx = block(x, ctx, block_vector, mask)  # (B, N, D), (B, K, D)
        x = self.final(x, cond_vector)  # (B, N, patch ** 2 * out_channels)
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


def join_context(parts):
    """[(tokens (B, K_i, D), mask (B, K_i) or None), ...] -> the tokens one after the other (B, sum K_i, D)
    and their mask, or None when no part has one (a part without a mask is attended to whole)."""
    if len(parts) == 1:
        return parts[0]
    tokens = torch.cat([part_tokens for part_tokens, _ in parts], dim=1)
    if all(mask is None for _, mask in parts):
        return tokens, None
    masks = [torch.ones(part_tokens.shape[:2], dtype=torch.bool, device=part_tokens.device) if mask is None
             else mask for part_tokens, mask in parts]
    return tokens, torch.cat(masks, dim=1)


#################################################################################
#                                  Configs                                      #
#################################################################################
# DiT naming: size x patch. T and XS are small presets for tests and CPU runs.

SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "XS": (4, 128, 4),
         "T": (2, 64, 2)}
MODELS = [f"{s}/{p}" for s in SIZES for p in (2, 4, 8)]


def size_config(name):
    """`name` like 'XL/2' -> dict(patch, depth, width, heads), the keyword arguments of a preset."""
    size, _, patch = name.partition("/")
    if size not in SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    depth, width, heads = SIZES[size]
    return dict(patch=int(patch), depth=depth, width=width, heads=heads)


def build_model(name, **kwargs):
    """The DiffusionTransformer preset `name` (like 'XL/2'); kwargs go to the class (mdt.build_mdt builds
    mDT-v2's)."""
    return DiffusionTransformer(**size_config(name), **kwargs)


def count_params(model):
    return sum(p.numel() for p in model.parameters())
