"""Gradient accumulation and activation checkpointing change how a step is computed, not what it computes: one
step over N micro-batches (on one rank or several) equals one step over the whole batch, checkpointed blocks
give the same loss and gradients, and a run with --grad-accum resumes exactly."""
import os
import subprocess
import sys

import pytest
import torch

import train
from build import make_diffusion, make_model
from config import get_args
from conftest import ROOT, TINY, assert_resumed_exactly, facts_of
from diffusion import to_velocity
from shapes import shapes_default_control

#################################################################################
#              One step on fixed data, however it is split                      #
#################################################################################

B = 16  # TINY's global batch


class FixedDraws:
    """Each sample's dropout flags, noise level t and noise, drawn once for the whole batch and handed out in
    row order, whatever the micro-batches: train.py draws them micro-batch by micro-batch from its generator,
    which gives other values for another split, so a comparison across splits must hold them fixed.
    `drop_flags` stands in for train.drop_flags, `loss` for Diffusion.loss (the flow loss, the same formula,
    with these draws)."""

    def __init__(self, diffusion, seed=1, rows=slice(None)):
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(2, B, generator=g)
        self.sem, self.ctrl = (u[0] < 0.3)[rows], (u[1] < 0.3)[rows]
        self.t, self.noise = torch.rand(B, generator=g)[rows], torch.randn(B, 3, 16, 16, generator=g)[rows]
        self.pred, self.flag_row, self.loss_row = diffusion.pred, 0, 0

    def drop_flags(self, n, *args, **kwargs):
        rows = slice(self.flag_row, self.flag_row + n)
        self.flag_row += n
        return self.sem[rows], self.ctrl[rows]

    def loss(self, model, x0, generator=None, **cond):
        rows = slice(self.loss_row, self.loss_row + x0.shape[0])
        self.loss_row += x0.shape[0]
        t, noise = self.t[rows], self.noise[rows]
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = to_velocity(model(x_t, t, **cond), x_t, t, self.pred)
        return ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))


def fixed_batch():
    """A global batch of B images, labels and controls (the same for every caller)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, 3, 16, 16, generator=g), torch.randint(0, 10, (B,), generator=g),
            shapes_default_control(16).expand(B, -1).clone())


def step_on_fixed_batch(accum, rank=0, world=1, wrap=None):
    """The weights after one train.train_step from TINY's initial weights on this rank's share of
    fixed_batch(), cut into `accum` micro-batches, with FixedDraws. `wrap` turns the model into the net that
    runs the forward (DDP). The step is plain SGD at lr 1 without clipping: the weights move by exactly the
    gradient, so a wrongly scaled or half-synchronised one shows (AdamW's first step, about lr *
    sign(gradient), and clipping would hide a scale)."""
    args = get_args(TINY + ["--grad-accum", str(accum), "--lr", "1", "--warmup", "0", "--decay", "constant",
                            "--clip", "0"])
    facts = facts_of(args, world=world)
    torch.manual_seed(args.seed)
    model = make_model(args, facts)
    ema = make_model(args, facts).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    share = slice(rank * B // world, (rank + 1) * B // world)
    draws = FixedDraws(make_diffusion(args, facts), rows=share)
    micro = list(zip(*(part.chunk(accum) for part in (x[share] for x in fixed_batch()))))
    real_drop_flags, train.drop_flags = train.drop_flags, draws.drop_flags
    try:
        net = wrap(model) if wrap else model
        state = train.TrainState(net, model, ema, opt, draws, None)
        loss, _, updated = train.train_step(state, micro, 10, args)
    finally:
        train.drop_flags = real_drop_flags
    assert updated and draws.loss_row == B // world
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def initial_weights():
    args = get_args(TINY)
    torch.manual_seed(args.seed)
    return make_model(args, facts_of(args)).state_dict()


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_accumulated_step_equals_one_step_on_the_whole_batch():
    """One process: --grad-accum 4 (four micro-batches of 4) and --grad-accum 1 (one batch of 16) on the same
    data, with each sample's dropout, t and noise held fixed (FixedDraws), take the same step up to float
    rounding."""
    loss1, w1 = step_on_fixed_batch(1)
    loss4, w4 = step_on_fixed_batch(4)
    diff = max_diff(w1, w4)
    print(f"max |w(grad-accum 1) - w(grad-accum 4)| = {diff:.3g}; the step moved weights by up to "
          f"{max_diff(w1, initial_weights()):.3g}")
    assert max_diff(w1, initial_weights()) > 1e-2  # a step that moved: the comparison means something
    assert torch.isclose(loss1, loss4, rtol=1e-6) and diff < 1e-5, (loss1, loss4, diff)


# run under torchrun by the test below: 2 ranks x --grad-accum 2 on the same fixed batch, rank 0 saves the
# weights; the ranks leave the group together, as train.py's do (run.finish_distributed says why)
TWO_RANKS = """
import sys
sys.path[:0] = {paths!r}
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from run import finish_distributed
from test_accumulation import step_on_fixed_batch
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loss, weights = step_on_fixed_batch(2, rank, world, wrap=DDP)
dist.all_reduce(loss)
if rank == 0:
    torch.save((loss / world, weights), {out!r})
finish_distributed(world)
"""


@pytest.mark.slow
def test_two_ranks_accumulating_equal_one_rank(tmp_path):
    """2 gloo ranks x --grad-accum 2 (micro-batches of 4, gradients all-reduced once, with the last) take the
    same step as 1 rank x --grad-accum 4 on the same global batch of 16, draws held fixed as above."""
    script, out = tmp_path / "two_ranks.py", tmp_path / "weights.pt"
    script.write_text(TWO_RANKS.format(paths=[ROOT, os.path.join(ROOT, "tests")], out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
           str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss2, w2 = torch.load(out)
    loss1, w1 = step_on_fixed_batch(4)
    diff = max_diff(w1, w2)
    print(f"max |w(1 rank x grad-accum 4) - w(2 ranks x grad-accum 2)| = {diff:.3g}")
    assert torch.isclose(loss1, loss2, rtol=1e-6) and diff < 1e-5, (loss1, loss2, diff)


#################################################################################
#                          Activation checkpointing                             #
#################################################################################

def test_grad_ckpt_changes_neither_loss_nor_gradients():
    """train.checkpoint_blocks (--grad-ckpt, and bench.py's) recomputes each block in the backward pass: the
    same loss and gradients of a training step, from the same generator."""
    args = get_args(TINY + ["--grad-ckpt"])
    facts = facts_of(args)
    assert args.grad_ckpt

    def loss_and_grads(checkpointed):
        torch.manual_seed(0)
        model = make_model(args, facts)
        if checkpointed:
            train.checkpoint_blocks(model)
        ema = make_model(args, facts).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        state = train.TrainState(model, model, ema, opt, make_diffusion(args, facts),
                                 torch.Generator().manual_seed(0))
        loss, _, _ = train.train_step(state, [fixed_batch()], 0, args)
        return loss, [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert torch.equal(loss, ckpt_loss)
    for g, cg in zip(grads, ckpt_grads):
        torch.testing.assert_close(cg, g, rtol=1e-6, atol=1e-8)


#################################################################################
#                          Flags and exact resume                               #
#################################################################################

def test_bad_grad_accum_fails_fast():
    with pytest.raises(SystemExit, match=r"--batch 16 must be divisible by --grad-accum 3"):
        train.main(TINY + ["--grad-accum", "3"])
    with pytest.raises(SystemExit, match="--grad-accum must be >= 1"):
        train.main(TINY + ["--grad-accum", "0"])
    with pytest.raises(SystemExit, match="--grad-ckpt .* --arch unet"):
        train.main(["--arch", "unet", "--model", "XS", "--cond", "xattn", "--grad-ckpt"])


@pytest.mark.slow
def test_resume_with_grad_accum_is_exact(tmp_path):
    """Micro-batches of 4, two per step: the checkpoint's data position counts micro-batches, and a resume
    takes the same ones with the same draws; another --grad-accum is refused (it would read other data)."""
    flags = TINY + ["--grad-accum", "2", "--batch", "8", "--steps", "8", "--sample-every", "-1"]
    full = train.main(flags + ["--ckpt-every", "4", "--keep", "5", "--out", str(tmp_path / "a")])
    half = tmp_path / "b" / "run"
    half.mkdir(parents=True)
    state = torch.load(os.path.join(full, "ckpt-0000004.pt"), weights_only=False)
    assert state["position"] == 8 and state["args"]["grad_accum"] == 2
    torch.save(state, half / "ckpt-0000004.pt")
    with pytest.raises(SystemExit, match="grad_accum: checkpoint 2 vs now 1"):
        train.main(flags + ["--grad-accum", "1", "--resume", str(half), "--out", str(tmp_path / "b")])
    resumed = train.main(flags + ["--resume", str(half), "--out", str(tmp_path / "b")])
    assert_resumed_exactly(full, resumed, 4, 8)
