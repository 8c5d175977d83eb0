"""mdt.py: mDT-v2's trunk (masking, the side interpolator, the decoder) and its double-prediction loss, which
must give the bits the stacked loss gave before it moved out of diffusion.py."""
import math

import pytest
import torch

from conftest import model_inputs, perturb, tiny_model
from ddpm import DDPM, discretized_gaussian_nll, normal_kl
from diffusion import Diffusion, to_velocity
from mdt import MaskedDiffusion, MDTv2, build_mdt


@pytest.mark.parametrize("decode_layers", [0, 2])
def test_mdt_without_masking_builds_no_side_block(decode_layers):
    """--mask-ratio 0: no token is dropped, so there is no side interpolator or mask token to fill them in,
    and every parameter still gets a gradient (under DDP a parameter without one stops training at the second
    step)."""
    model = perturb(MDTv2(patch=4, depth=4, width=64, heads=2, decode_layers=decode_layers, mask_ratio=0,
                          input_size=16, in_channels=3, num_classes=10, cond="ours"))
    assert not hasattr(model, "side") and not hasattr(model, "mask_token")
    x, t, y, c = model_inputs()
    drop = torch.tensor([False, True, False])  # condition dropout, as in training
    out = model.train()(x, t, y, c, ctrl_drop=drop, sem_drop=drop)
    assert out.shape == x.shape  # one unmasked pass in training too
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("cond", ["ours", "mmdit"])
@pytest.mark.parametrize("depth", [2, 4])
def test_mdt_without_decoder_trains_and_samples(cond, depth):
    """No decoder blocks (T/4's default, or --decode-layers 0): the encoder's last block feeds the side
    interpolator, which reads its context tokens, so that block keeps a full context stream; training and
    sampling both run."""
    kw = dict(input_size=16, in_channels=3, num_classes=10, cond=cond)
    model = perturb(build_mdt("T/4", **kw) if depth == 2 else
                    MDTv2(patch=4, depth=depth, width=64, heads=2, decode_layers=0, **kw))
    assert model.decode_layers == 0 and len(model.blocks) == depth
    x, t, y, c = model_inputs()
    drop = torch.tensor([False, True, False])
    out = model.train()(x, t, y, c, ctrl_drop=drop, sem_drop=drop)
    assert out.shape == (6,) + x.shape[1:]
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert model.eval()(x, t, y, c).shape == x.shape  # sampling: one unmasked pass, no side block


def test_mdt_encoder_sees_only_the_kept_tokens():
    model = perturb(tiny_model("adaln", "mdt", mask_ratio=0.5))
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o[0].shape[1]))
    x, t, y, c = model_inputs()
    model(x, t, y, c)
    assert seen[0] == 16 and 3 <= seen[1] <= 8  # unmasked pass, then 16 * (1 - r), r in [0.5, 0.7]
    assert model.half == 1 and model.decode_layers == 2 and len(model.blocks) == 4
    assert all(b.skip is not None for b in model.blocks[1:]) and model.blocks[0].skip is None
    with pytest.raises(ValueError, match="decode-layers"):
        MDTv2(input_size=16, patch=4, depth=4, width=64, heads=2, decode_layers=1)


#################################################################################
#                   The double prediction                                       #
#################################################################################

def stacked_loss(diffusion, model, x0, generator, **cond):
    """The loss as diffusion.py computed it before mDT's double prediction moved here: n stacked predictions
    of one draw, every data tensor repeated n times, the per-sample losses summed over the n."""
    B = x0.shape[0]
    if diffusion.objective == "flow":
        t = torch.sigmoid(diffusion.t_mean + diffusion.t_std * torch.randn(B, generator=generator))
        t = diffusion.alpha * t / (1 + (diffusion.alpha - 1) * t)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        out = model(x_t, t, **cond)
        n = out.shape[0] // B
        v = to_velocity(out, x_t.repeat(n, 1, 1, 1), t.repeat(n), diffusion.pred)
        per = ((v.float() - (noise - x0).float().repeat(n, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
        return per.view(n, B).sum(0)
    chain = diffusion.chain
    k = torch.randint(0, diffusion.num_steps, (B,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = chain.q_sample(x0, k, noise)
    out = model(x_t, k.float() / diffusion.num_steps, **cond)
    n, C = out.shape[0] // B, x0.shape[1]
    x0n, x_tn, kn = x0.repeat(n, 1, 1, 1), x_t.repeat(n, 1, 1, 1), k.repeat(n)
    eps = out[:, :C].float()
    per = ((eps - noise.float().repeat(n, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
    if diffusion.min_snr > 0:
        snr = (chain.alphas_cumprod / (1 - chain.alphas_cumprod))[kn]
        per = per * (snr.clamp(max=diffusion.min_snr) / snr).float()
    if diffusion.learn_sigma:
        mean, _ = chain.posterior(chain.predict_x0(x_tn.float(), kn, eps.detach()), x_tn.float(), kn)
        model_logvar = chain.model_logvar(out[:, C:], kn)
        true_mean, true_logvar = chain.posterior(x0n.float(), x_tn.float(), kn)
        kl = normal_kl(true_mean, true_logvar, mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = discretized_gaussian_nll(x0n.float(), mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        per = per + torch.where(kn == 0, nll, kl)
    return per.view(n, B).sum(0)


@pytest.mark.parametrize("objective", [Diffusion(), Diffusion(pred="x", alpha=2.0), DDPM(),
                                       DDPM(learn_sigma=True, min_snr=5.0)],
                         ids=["flow-v", "flow-x", "ddpm", "ddpm-sigma-minsnr"])
def test_masked_loss_gives_the_bits_of_the_stacked_loss(objective):
    """MaskedDiffusion scores each half of MDTv2's (2 B) output with the wrapped objective's per-sample loss
    and sums them: the same bits as the old stacked loss, in training (two predictions) and in eval (one)."""
    learn_sigma = getattr(objective, "learn_sigma", False)
    model = perturb(tiny_model("adaln", "mdt", out_channels=6 if learn_sigma else 3))
    x0, _, y, c = model_inputs()
    for train in (True, False):
        model.train(train)
        torch.manual_seed(0)  # the mask MDTv2 draws from the global RNG
        ours = MaskedDiffusion(objective).loss(model, x0, torch.Generator().manual_seed(3), y=y, ctrl=c)
        torch.manual_seed(0)
        ref = stacked_loss(objective, model, x0, torch.Generator().manual_seed(3), y=y, ctrl=c)
        assert ours.shape == (3,) and torch.equal(ours, ref), (train, ours, ref)


def test_the_two_predictions_are_summed_and_sampling_is_the_wrapped_objectives():
    x0 = torch.randn(4, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    torch.randn(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    # the first prediction exact, the second zero: the sum is the second one's loss alone
    twice = lambda x, t, **_: torch.cat([eps - x0, torch.zeros_like(x)])
    masked = MaskedDiffusion(Diffusion(alpha=1.5))
    assert torch.allclose(masked.loss(twice, x0, torch.Generator().manual_seed(0)),
                          ((eps - x0) ** 2).mean((1, 2, 3)))
    assert masked.sample.__func__ is Diffusion.sample and (masked.alpha, masked.pred) == (1.5, "v")
    assert MaskedDiffusion(DDPM()).num_steps == 1000
