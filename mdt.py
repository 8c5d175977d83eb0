"""
mDT-v2: masked training on the same blocks (Gao et al., "MDTv2: Masked Diffusion Transformer is a Strong Image
Synthesizer", sail-sg/MDT), the mDT-v2-XL/2 row of the paper's comparison.

    MDTv2            DiffusionTransformer's embedders, routes and final layer around another trunk: encoder
                     halves joined by long shortcuts (U-ViT), a side interpolator, then decoder blocks
    masked training  a random 30-50 % of the image tokens never reach the encoder; the side interpolator
                     fills them in, so the model learns to predict the full image from the rest
    MaskedDiffusion  the objective's loss on the unmasked and on the masked prediction of one forward pass,
                     summed (mDT-v2's double prediction); sampling is the wrapped objective's
"""
import torch
import torch.nn as nn

from diffusion import Noised
from model import DiffusionTransformer, size_config

ARCHS = ("dit", "mdt")  # the transformer architectures: model.DiffusionTransformer, MDTv2


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
        """The encoder's second half and the decoder fuse an earlier activation in through a long shortcut.
        With no decoder the encoder's last block is the last of the stack, yet the side interpolator reads its
        context output, so that block keeps a full context stream."""
        masking = self.mask_ratio > 0
        keep_context = lambda i: i < depth - 1 or (self.decode_layers == 0 and masking)
        self.blocks = nn.ModuleList([block(i, skip=i >= self.half, keep_context=keep_context(i))
                                     for i in range(depth)])
        # Only masked tokens need filling in: with --mask-ratio 0 the side block and the mask token would be
        # weights nothing trains (and DDP refuses parameters that get no gradient).
        if masking:
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
        # non_blocking: a copy from the host that need not wait for the device to finish its queue
        return torch.rand(B, N).argsort(dim=1)[:, :keep].to(x.device, non_blocking=True)

    def trunk(self, x, ctx, cond_vector, pos, mask=None, keep=None):
        """Encoder halves joined by long shortcuts, then (only when tokens were dropped, `keep` (B, L)) the
        side interpolator, then the decoder: image tokens x (B, N, D), positions pos (N, D) -> (B, N, D)."""
        tokens_in, D = x, x.shape[-1]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, D))  # (B, L, D): the visible tokens
        skips = []
        for i, block in enumerate(self.blocks[: 2 * self.half]):
            if i < self.half:
                x, ctx = block(x, ctx, cond_vector, mask)  # (B, L, D), (B, K, D)
                skips.append(x)
            else:
                x, ctx = block(x, ctx, cond_vector, mask, skip=skips.pop())  # (B, L, D), (B, K, D)
        # put the visible tokens back among learned mask tokens; the side block fills those in
        if keep is not None:
            full = self.mask_token.to(x.dtype).expand(x.shape[0], tokens_in.shape[1], D).clone()
            full = full.scatter(1, keep[..., None].expand(-1, -1, D), x) + pos  # (B, N, D)
            filled, _ = self.side(full, ctx, cond_vector, mask)  # (B, N, D)
            visible = torch.zeros(full.shape[:2], dtype=torch.bool, device=x.device).scatter(1, keep, True)
            # the side block's output only where tokens were dropped
            x = torch.where(visible[..., None], full, filled)
        else:
            x = x + pos  # the decoder's positional embedding (MDT: a second one; here the same fixed one)
        for block in self.blocks[2 * self.half :]:
            x, ctx = block(x, ctx, cond_vector, mask, skip=tokens_in)  # (B, N, D), (B, K, D)
        return x

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """As DiffusionTransformer.forward; in training mode (mask_ratio > 0) the unmasked and the masked
        prediction stacked, so B' = 2 B: (2 B, out_channels, H, W)."""
        H, W = x.shape[-2:]
        x, pos = self.patchify(x)  # (B, N, D), (N, D)
        cond_vector, ctx, mask = self.condition(t, y, ctrl, ctrl_drop, sem_drop)  # (B, D), (B, K, D), (B, K)
        block_vector = self.block_vector(cond_vector)  # (B, D), or (B, 6 D) for adaLN-single
        if self.training and self.mask_ratio > 0:  # both passes in one call: one DDP forward and backward
            x = torch.cat([self.trunk(x, ctx, block_vector, pos, mask),
                           self.trunk(x, ctx, block_vector, pos, mask, self.random_keep(x))])  # (2 B, N, D)
            cond_vector = cond_vector.repeat(2, 1)  # (2 B, D)
        else:
            x = self.trunk(x, ctx, block_vector, pos, mask)  # (B, N, D)
        x = self.final(x, cond_vector)  # (B', N, patch ** 2 * out_channels)
        return self.unpatchify(x, H, W)  # (B', out_channels, H, W)


def build_mdt(name, decode_layers=None, mask_ratio=0.3, **kwargs):
    """The MDTv2 preset `name` (like 'XL/2', the sizes of model.SIZES); kwargs go to the class."""
    return MDTv2(**size_config(name), decode_layers=decode_layers, mask_ratio=mask_ratio, **kwargs)


#################################################################################
#                  The double prediction: mDT-v2's training loss                #
#################################################################################

class MaskedDiffusion:
    """mDT-v2's objective around another one (flow or DDPM): one forward pass of MDTv2 in training returns the
    unmasked and the masked prediction of the same noisy batch, and the loss is the sum of the wrapped
    objective's per-sample losses of both. Everything else, sampling included, is the wrapped objective's:
    at sampling MDTv2 makes one unmasked prediction."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def __getattr__(self, name):  # sample, pred, alpha, num_steps...: the wrapped objective's
        if name == "diffusion":  # not set yet (copy, unpickling): no wrapped objective to ask
            raise AttributeError(name)
        return getattr(self.diffusion, name)

    def loss(self, model, x0, generator=None, **cond):
        """Per-sample loss (B,): the noise level, then the noise, drawn from `generator` as the wrapped
        objective draws them; then the model's (n B) output -- n = 2 in training, the unmasked and the masked
        prediction; 1 in eval mode or with --mask-ratio 0 -- scored as one batch against the draw repeated n
        times (so every reduction runs as on one stacked batch), and the n losses of each sample summed."""
        noised = self.diffusion.noised(x0, generator)
        out = model(noised.x_t, noised.t, **cond)  # (n B, ...): the unmasked prediction, then the masked one
        n = out.shape[0] // x0.shape[0]
        repeat = lambda v: None if v is None else v.repeat(n, *([1] * (v.ndim - 1)))
        stacked = Noised(*map(repeat, noised))
        return self.diffusion.prediction_loss(out, repeat(x0), stacked).view(n, -1).sum(0)  # (B,)
