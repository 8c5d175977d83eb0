"""Every formula of the training step and of the conditioning, pinned by a fast test that a one-line change to
it fails: each control signal's normalisation, the Fourier frequencies, the noising of both objectives, the
learning-rate and EMA schedules and the EMA update, gradient clipping inside the training step, and the order
in which a resume seeds and then restores the noise stream. (The gate schedules, the gated sum and condition
dropout are pinned in test_conditioning.py; the samplers and guidance in test_diffusion.py.)"""
import math
from types import SimpleNamespace

import pytest
import torch

import train
from conditioning import CONTROL_SIGNALS, SIGNAL, ControlEmbedder, make_control, normalise_control
from ddpm import DDPM
from diffusion import Diffusion
from run import Process, restore

#################################################################################
#                                 Conditioning                                  #
#################################################################################


def test_every_control_signal_is_normalised_by_its_formula():
    """Distinct values for every signal, so that a wrong divisor or a swapped signal shows: sizes and the
    aspect on a log2 scale, crops as a fraction of the resolution, the flip as it is."""
    raw = make_control(orig_h=96, orig_w=48, crop_top=12, crop_left=20, flip=1, res=64, aspect=0.5)
    out = dict(zip(CONTROL_SIGNALS, normalise_control(raw[None])[0].tolist()))
    want = dict(orig_h=math.log2(96), orig_w=math.log2(48), crop_top=12 / 64, crop_left=20 / 64, flip=1.0,
                aspect=-1.0, res=6.0)
    assert out == pytest.approx(want, abs=1e-6)
    assert list(CONTROL_SIGNALS) == ["orig_h", "orig_w", "crop_top", "crop_left", "flip", "aspect", "res"]
    assert [SIGNAL[s] for s in CONTROL_SIGNALS] == list(range(7))


def test_fourier_features_are_sines_and_cosines_at_powers_of_two():
    emb = ControlEmbedder(8, num_freqs=4)
    x = torch.tensor([[0.3, -1.25]])
    freqs = [2.0 ** k for k in (-4, -3, -2, -1)]
    want = [math.sin(2 * math.pi * v * f) for v in (0.3, -1.25) for f in freqs]
    want_cos = [math.cos(2 * math.pi * v * f) for v in (0.3, -1.25) for f in freqs]
    got = emb.fourier(x)[0].view(2, 2, 4)  # (signal, sin / cos, frequency)
    assert got[:, 0].flatten().tolist() == pytest.approx(want, abs=1e-6)
    assert got[:, 1].flatten().tolist() == pytest.approx(want_cos, abs=1e-6)


#################################################################################
#                          Noising: what the network sees                       #
#################################################################################


class Recorder(torch.nn.Module):
    """A 'network' that records its input and time and returns zeros."""

    def forward(self, x, t, **_):
        self.x, self.t = x.clone(), t.clone()
        return torch.zeros_like(x)


def drawn(x0, seed, objective):
    """(t or k, noise) as Diffusion.loss draws them from this seed."""
    g = torch.Generator().manual_seed(seed)
    first = (torch.randn(x0.shape[0], generator=g) if objective == "flow"
             else torch.randint(0, 1000, (x0.shape[0],), generator=g))
    return first, torch.randn(x0.shape, generator=g)


def test_flow_noising_mixes_data_and_noise_by_t():
    """x_t = (1 - t) x0 + t eps with t the shifted logit-normal draw: t = 1 is pure noise."""
    x0 = torch.randn(6, 3, 4, 4)
    rec = Recorder()
    Diffusion(pred="v", alpha=3.0).loss(rec, x0, torch.Generator().manual_seed(4))
    z, eps = drawn(x0, 4, "flow")
    u = torch.sigmoid(z)
    t = 3.0 * u / (1 + 2.0 * u)
    assert torch.allclose(rec.t, t)
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(rec.x, (1 - tt) * x0 + tt * eps, atol=1e-6)


def test_ddpm_noising_is_the_chain_at_step_k():
    x0 = torch.randn(6, 3, 4, 4)
    rec = Recorder()
    diff = DDPM()
    diff.loss(rec, x0, torch.Generator().manual_seed(5))
    k, eps = drawn(x0, 5, "ddpm")
    alphas_cumprod = diff.chain.alphas_cumprod[k].float().view(-1, 1, 1, 1)
    assert torch.allclose(rec.t, k.float() / 1000)
    assert torch.allclose(rec.x, alphas_cumprod.sqrt() * x0 + (1 - alphas_cumprod).sqrt() * eps, atol=1e-6)


#################################################################################
#                        The training step's schedules                          #
#################################################################################


def test_learning_rate_warms_up_from_a_step_then_decays_to_a_tenth():
    a = SimpleNamespace(lr=1.0, warmup=4, steps=104, decay="cosine")
    assert [train.lr_at(s, a) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # never 0
    assert train.lr_at(4, a) == pytest.approx(1.0)
    assert train.lr_at(54, a) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the cosine's middle
    assert train.lr_at(104, a) == pytest.approx(0.1) and train.lr_at(500, a) == pytest.approx(0.1)
    a.decay = "constant"
    assert train.lr_at(54, a) == 1.0 and train.lr_at(0, a) == 0.25


def test_ema_decay_warms_up_and_the_ema_moves_by_one_minus_decay():
    on = SimpleNamespace(ema=0.999, ema_warmup="on")
    assert train.ema_decay(0, on) == pytest.approx(0.1) and train.ema_decay(8, on) == pytest.approx(0.5)
    assert train.ema_decay(10**6, on) == 0.999
    assert train.ema_decay(0, SimpleNamespace(ema=0.999, ema_warmup="off")) == 0.999
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
    train.update_ema(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())  # 0.9 * 0 + 0.1 * 1


class SteepLoss:
    """A 'diffusion' whose loss is 100 x the sum of the weights: every gradient element is 100."""

    def loss(self, net, x0, gen, **_):
        return (100 * sum(p.sum() for p in net.parameters())).expand(x0.shape[0])


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_the_training_step_clips_the_gradient_norm(clip):
    model = torch.nn.Linear(4, 4)
    ema = torch.nn.Linear(4, 4)
    args = SimpleNamespace(lr=1e-3, warmup=0, steps=10, decay="constant", clip=clip, ema=0.9,
                           ema_warmup="off", p_drop_sem=0.0, p_drop_ctrl=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    batch = (torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 7))
    state = train.TrainState(model, model, ema, opt, SteepLoss(), torch.Generator())
    _, gnorm, updated = train.train_step(state, [batch], 0, args)
    raw = 100 * math.sqrt(20)  # 20 weights and biases, each gradient 100
    assert updated and float(gnorm) == pytest.approx(raw)  # the norm before clipping
    step = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    # SGD: the step is lr x the gradient it was given; clipped, that gradient has norm `clip`
    assert float(step.norm()) == pytest.approx(1e-3 * (clip if clip else raw), rel=1e-4)


def test_a_resume_restores_the_noise_stream_after_seeding_it():
    """build_state seeds the generator and run.start then restores the checkpoint's stream: the restored state
    wins."""
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(123)
    torch.randn(17, generator=g)  # a stream some way along
    ckpt = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=7, epoch=2,
                position=3, gen=[g.get_state()], torch_rng=torch.get_rng_state(), cuda_rng=[None],
                loss_window=(1.5, 2, 3))
    args, proc = SimpleNamespace(seed=0), Process(0, 1, torch.device("cpu"), False)
    state = train.TrainState(model, model, ema, opt, None, train.noise_generator(args, proc))
    loop = train.Progress.fresh(proc.device, streamed=False)
    restore(ckpt, state, loop, proc)
    assert torch.equal(state.gen.get_state(), g.get_state())
    assert (loop.step, loop.epoch, loop.position, loop.n_acc, loop.n_steps) == (7, 2, 3, 2, 3)
    fresh = train.noise_generator(args, proc)
    assert torch.equal(fresh.get_state(), torch.Generator().manual_seed(0).get_state())


def test_a_non_finite_step_leaves_the_weights_and_the_optimizer_as_they_were():
    """train.optimizer_step: fused AdamW takes the non-finite flag on the device (found_inf, as torch's
    GradScaler passes it) and skips the update, its moments and its step count, without a host read; the
    for-each AdamW reads the flag and skips the same way. A finite flag updates both alike."""
    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
        p.grad = torch.full((3,), float("nan"))
        train.optimizer_step(opt, torch.tensor(False))
        assert torch.equal(p.detach(), torch.ones(3)), fused
        assert not opt.state or (opt.state[p]["step"] == 0 and not opt.state[p]["exp_avg"].any()), fused
        p.grad = torch.ones(3)
        train.optimizer_step(opt, torch.tensor(True))
        decayed_then_stepped = 1 - 0.1 * 0.01 - 0.1  # AdamW: weight decay 0.01, then a first step of about lr
        assert opt.state[p]["step"] == 1
        assert torch.allclose(p.detach(), torch.full((3,), decayed_then_stepped))


def test_the_ema_skips_a_non_finite_step_and_takes_a_finite_one_as_before():
    """train.update_ema with the step's finite flag on the device: False leaves the EMA bit-equal; True gives
    the same bits as the plain update (a Python weight), so a finite run's EMA is unchanged by the flag."""
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    train.update_ema(ema, model, 0.999, torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    plain = torch.nn.Linear(4, 3)
    plain.load_state_dict(before)
    train.update_ema(plain, model, 0.999)
    train.update_ema(ema, model, 0.999, torch.tensor(True))
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in ema.state_dict().items())
