"""
The UNet baseline: LDM-4-G, the class-conditional ImageNet-256 Latent Diffusion Model (Rombach et al., 2022),
the "UNet/LDM-G4" row of the paper's comparison, with the same interface as the transformer in model.py.

    latents (B, C, H, W) -> conv -> levels of ResBlocks (+ SpatialTransformer at the attention strides),
        downsampling -> middle (ResBlock, SpatialTransformer, ResBlock) -> mirrored levels with skip
        connections, upsampling -> conv
    time (+ control metadata) -> one embedding vector (B, 4 * model_channels) added inside every ResBlock
    class label -> context tokens (B, K, context_dim) read by the cross-attention of every SpatialTransformer

Published config (CompVis/latent-diffusion `configs/latent-diffusion/cin256-v2.yaml`, read from the copy in
CompVis/stable-diffusion; blocks from `ldm/modules/diffusionmodules/openaimodel.py` and
`ldm/modules/attention.py`): model_channels 192, channel_mult (1, 2, 3, 5), num_res_blocks 2,
attention_resolutions (8, 4, 2) (downsampling strides, so attention at every level but the first, and in the
middle), num_heads 1 (one head as wide as the layer: legacy mode with a spatial transformer),
transformer_depth 1, context_dim 512, use_scale_shift_norm False (the embedding is added, not FiLM), dropout
0, ClassEmbedder n_classes 1001 x 512 (one token) trained jointly. Parameters: "400M" in the LDM paper (arXiv
2112.10752, Table 3, LDM-4-G); exactly 400.92 M for the UNet as printed by LDM when it loads cin256-v2
("DiffusionWrapper has 400.92 M params.", scripts/latent_imagenet_diffusion.ipynb), plus 0.51 M in the class
table. Built here with 3 channels and without the control embedder it has 400,920,579 (400.92 M); the G4
preset (4 channels, control embedder 1.86 M, class table) has 403.3 M.

What differs here: the SD-VAE f = 8 latent space (4 channels, 32 x 32 at 256 px) instead of the f = 4 VQ (3
channels, 64 x 64), so the same network sees 4x fewer positions (it attends on 16, 8, 4 px maps instead of 32,
16, 8); t in [0, 1] (scaled by 1000 inside TimestepEmbedder, the range of LDM's integer steps); the class
table is conditioning.ClassEmbedder (num_classes + 1 rows, the last one the null class: LDM's 1001); and
control metadata enter the time embedding through conditioning.ControlEmbedder, as the route's adaLN terms
say (model.ROUTES): xattn adds sum_k e_ctrl,k (the LDM / PixArt recipe: additive, ungated), ours adds
sum_k g_k(t) e_ctrl,k (gated per control group along the trajectory). The class always goes through
cross-attention, so the UNet takes the routes whose context is the semantic tokens alone and whose adaLN
terms are control terms (UNET_CONDS); nothing semantic is added to the embedding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from conditioning import ClassEmbedder, ControlEmbedder, TimestepEmbedder
from model import ROUTES

# what the UNet's embedding can add to e_t: the control terms of model.ADALN_TERMS (no pooled semantic vector)
UNET_ADALN_TERMS = ("control", "gated control")
# the routes of model.ROUTES the UNet can follow: the class in its cross-attention, control in its embedding
UNET_CONDS = tuple(name for name, route in ROUTES.items()
                   if route.context == ("semantic",) and set(route.adaln) <= set(UNET_ADALN_TERMS))


def zero_(module):
    """Zero a layer's weights so the residual branch it ends starts as 0 (LDM's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


#################################################################################
#                      Residual, resampling and attention blocks               #
#################################################################################

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding is added between the convs. The second conv is
    zero-initialised, so a fresh block is its skip path."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(),
                                        zero_(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]  # (B, cout, H, W)
        return self.skip(x) + self.out_layers(h)                 # (B, cout, H, W)


class Downsample(nn.Conv2d):
    """A strided 3x3 conv (LDM's conv_resample), halving H and W."""

    def __init__(self, ch):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Conv2d):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__(ch, ch, 3, padding=1)

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention of x (B, N, D) to itself or to the context tokens `ctx` (B, K, Dc); no q/k/v
    biases (LDM)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible into {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim or dim, dim, bias=False)
        self.v = nn.Linear(context_dim or dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        B, N, D = x.shape
        split = lambda z: z.view(B, z.shape[1], self.heads, D // self.heads).transpose(1, 2)  # (B, h, L, D/h)
        q, k, v = split(self.q(x)), split(self.k(ctx)), split(self.v(ctx))
        out = F.scaled_dot_product_attention(q, k, v)                                       # (B, h, N, D/h)
        return self.out(out.transpose(1, 2).reshape(B, N, D))                               # (B, N, D)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context tokens, GEGLU feed-forward (LDM's
    BasicTransformerBlock)."""

    def __init__(self, dim, heads, context_dim, mult=4):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads, context_dim)
        self.ff_in = nn.Linear(dim, 2 * mult * dim)  # value and gate halves of the GEGLU
        self.ff_out = nn.Linear(mult * dim, dim)

    def forward(self, x, ctx):
        """x (B, N, D), ctx (B, K, context_dim) -> (B, N, D)"""
        x = x + self.attn1(self.norm1(x))                         # (B, N, D)
        x = x + self.attn2(self.norm2(x), ctx)                    # (B, N, D)
        value, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)  # each (B, N, mult * D)
        return x + self.ff_out(value * F.gelu(gate))              # (B, N, D)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, a residual branch whose output conv is
    zero-initialised."""

    def __init__(self, ch, heads, context_dim, depth=1):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim) for _ in range(depth)])
        self.proj_out = zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x, ctx):
        """x (B, C, H, W), ctx (B, K, context_dim) -> (B, C, H, W)"""
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)         # (B, H * W, C)
        for block in self.blocks:
            h = block(h, ctx)                                             # (B, H * W, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))  # (B, C, H, W)


class Step(nn.ModuleList):
    """One UNet step: its layers in order, each given what it reads (ResBlock: the embedding; attention: the
    context tokens)."""

    def forward(self, x, emb, ctx):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, ctx)
            else:
                x = layer(x)
        return x


#################################################################################
#                                Core model                                     #
#################################################################################

class UNet(nn.Module):
    def __init__(self, input_size=32, in_channels=4, out_channels=None, num_classes=1000, class_tokens=1,
                 cond="xattn", gates=None, model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
                 attention_ds=(2, 4, 8), head_channels=None, context_dim=512, transformer_depth=1):
        super().__init__()
        if cond not in UNET_CONDS:
            raise ValueError(f"unknown --cond {cond!r} for the UNet; choose one of {UNET_CONDS}")
        self.factor = 2 ** (len(channel_mult) - 1)
        if input_size % self.factor:
            raise ValueError(f"input size {input_size} is not divisible by the UNet's downsampling "
                             f"{self.factor}")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.input_size, self.cond, self.route = input_size, cond, ROUTES[cond]
        emb_dim = 4 * model_channels  # LDM: sinusoid of model_channels -> MLP -> 4 x model_channels
        self.t_embed = TimestepEmbedder(emb_dim, freq_dim=model_channels)
        self.y_embed = ClassEmbedder(num_classes, context_dim, class_tokens)
        # LDM's class table is a plain nn.Embedding (N(0, 1)) read by to_k / to_v with no norm in between
        nn.init.normal_(self.y_embed.table.weight, std=1.0)
        self.c_embed = ControlEmbedder(emb_dim, gates=gates)
        # head_channels None: one head as wide as the layer (the published num_heads = 1)
        attn = lambda ch: SpatialTransformer(ch, ch // (head_channels or ch), context_dim, transformer_depth)

        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        # channels of every skip connection, current stride
        skips, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * model_channels, emb_dim)]
                ch = mult * model_channels
                layers += [attn(ch)] if ds in attention_ds else []
                self.input_blocks.append(Step(layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(Step([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        self.middle = Step([ResBlock(ch, ch, emb_dim), attn(ch), ResBlock(ch, ch, emb_dim)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            # one more than on the way down: it eats the downsample's skip
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * model_channels, emb_dim)]
                ch = mult * model_channels
                layers += [attn(ch)] if ds in attention_ds else []
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Step(layers))
        # zero-init the output conv: a fresh model predicts exactly 0
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(),
                                 zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def embedding(self, t, ctrl, ctrl_drop=None):
        """The vector every ResBlock reads (B, 4 * model_channels): e_t plus the route's adaLN terms, in its
        order (ours: the control enters gently along the trajectory, per group; xattn: added ungated)."""
        e_ctrl = self.c_embed(ctrl, ctrl_drop)  # (B, G, emb_dim)
        terms = {"control": lambda: e_ctrl.sum(1), "gated control": lambda: self.c_embed.gated(e_ctrl, t)}
        emb = self.t_embed(t)  # (B, emb_dim)
        for term in self.route.adaln:
            emb = emb + terms[term]()
        return emb

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) labels, ctrl (B, S) raw control, ctrl_drop (B,) bool
        -> (B, out_channels, H, W)"""
        H, W = x.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"input {H}x{W} is not divisible by the UNet's downsampling factor "
                             f"{self.factor}")
        emb = self.embedding(t, ctrl, ctrl_drop)  # (B, E)
        ctx, _ = self.y_embed(y, sem_drop)  # (B, K, context_dim); sem_drop: the null class
        skips = []
        for step in self.input_blocks:
            x = step(x, emb, ctx)  # (B, C_level, H / 2^level, W / 2^level)
            skips.append(x)
        x = self.middle(x, emb, ctx)  # (B, C_max, H / factor, W / factor)
        for step in self.output_blocks:
            x = step(torch.cat([x, skips.pop()], dim=1), emb, ctx)  # (B, C_level, H / 2^level, W / 2^level)
        return self.out(x)  # (B, out_channels, H, W)


#################################################################################
#                                  Configs                                      #
#################################################################################
# G4 is the published LDM-4-G; S and XS keep its shape (attention at every stride but the first) for smaller
# runs.

UNET_SIZES = {"G4": dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
                         attention_ds=(2, 4, 8), head_channels=None, context_dim=512, transformer_depth=1),
              "S": dict(model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                        attention_ds=(2, 4, 8), head_channels=64, context_dim=256, transformer_depth=1),
              "XS": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                         head_channels=32, context_dim=64, transformer_depth=1)}


# The UNet at a transformer's scale, so that one --model (a scale recipe's XS/4, the default XL/2) serves
# every architecture: `--recipe ldm` on the CPU scale builds the XS UNet, on ImageNet's the published G4.
UNET_AT_SCALE = {"T": "XS", "XS": "XS", "S": "S", "B": "S", "L": "G4", "XL": "G4"}


def unet_size(model):
    """--model for --arch unet: a UNet size as it is, or a transformer size (XS/4, XL/2) as the UNet of its
    scale; None for a name that is neither."""
    if model in UNET_SIZES:
        return model
    size, _, patch = model.partition("/")
    return UNET_AT_SCALE.get(size) if patch in ("2", "4", "8") else None


def build_unet(name, **kwargs):
    """`name` one of UNET_SIZES; kwargs go to UNet and override the preset."""
    if name not in UNET_SIZES:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {', '.join(UNET_SIZES)}")
    return UNet(**{**UNET_SIZES[name], **kwargs})
