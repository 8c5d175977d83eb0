"""What users rely on, pinned where it could break unseen: DDPM's ancestral sampler drawing the data
distribution on data whose answer is known, to first order in the steps (the deterministic samplers' orders:
test_diffusion.py), and `--resume auto` choosing the newest run and, within it, the newest checkpoint, by
number. (The seeds and the layout of each sampling mode: test_pinned_sampling.py.)"""
import os
from types import SimpleNamespace

import torch
from test_diffusion import MU, S, gaussian_eps

from checkpoint import CONFIG_VERSION, find_checkpoint
from ddpm import DDPM
from diffusion import Sampling
from run import read_resume

#################################################################################
#          DDPM's ancestral sampler: the distribution of Gaussian data           #
#################################################################################


def test_ancestral_ddpm_sampler_draws_the_data_distribution_to_first_order():
    """DDPM's ancestral sampler is stochastic: what it must get right is the distribution. Each of 160 000
    pixels starts from the exact marginal at step 999 and is sampled with the exact eps: the samples' mean
    is MU (to its Monte-Carlo error, 0.0013) at every step count, and their std falls short of S by the
    sampler's discretisation alone (it draws with the posterior variance given the predicted x0, which
    leaves out the uncertainty of that prediction), a shortfall that halves as the steps double, approaching
    2 from below (0.056, 0.033, 0.017 over 50 -> 100 -> 200 steps: 1.71x, then 1.96x; 1.66-2.23x over three
    other draws; each shortfall known to about 0.001)."""
    ddpm = DDPM()
    last = ddpm.chain.alphas_cumprod[-1].float()
    z = torch.randn(1, 1, 400, 400, generator=torch.Generator().manual_seed(0))
    start = last.sqrt() * MU + (last * S ** 2 + 1 - last).sqrt() * z
    shortfall = []
    for n in (50, 100, 200):
        out = ddpm.sample(gaussian_eps(ddpm.chain), start.clone(), Sampling("ddpm", n),
                          generator=torch.Generator().manual_seed(n))
        assert abs(out.mean().item() - MU) < 0.005, (n, out.mean())
        shortfall.append(S - out.std().item())
    assert all(s > 0.005 for s in shortfall) and shortfall[-1] < 0.025, shortfall
    assert 1.4 < shortfall[0] / shortfall[1] < 2.6 and 1.4 < shortfall[1] / shortfall[2] < 2.6, shortfall


#################################################################################
#          --resume auto: the newest run, the newest checkpoint, by number       #
#################################################################################


def small_checkpoint(path, step, mtime=None):
    """A file that read_resume takes for a training checkpoint of `step` (the keys it checks, tiny tensors),
    written with modification time `mtime` (seconds since the epoch) when given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model={"w": torch.zeros(1)}, opt={}, gen=[], torch_rng=torch.zeros(1, dtype=torch.uint8),
                    loss_window=(0.0, 0, 0), step=step, config_version=CONFIG_VERSION), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


def resume_auto(out):
    """What `train.py --resume auto --out OUT` resumes from: (path, step), or None for a new run."""
    resumed = read_resume(SimpleNamespace(resume="auto", out=str(out)), rank=0)
    return None if resumed is None else (resumed.path, resumed.ckpt["step"])


def test_resume_auto_picks_the_highest_numbered_run_not_the_newest_file(tmp_path):
    """Run 002 is the newest by number; run 000's checkpoint and folder were touched last (a copy, a backup
    tool, a restore): auto still resumes run 002."""
    for number, step in ((0, 40), (1, 20), (2, 10)):
        run = tmp_path / f"{number:03d}-shapes-T-4-ours"
        small_checkpoint(run / f"ckpt-{step:07d}.pt", step, mtime=1_000_000 - number * 1000)
        os.utime(run, (2_000_000 - number * 1000,) * 2)  # the folder too: run 000's is the newest
    path, step = resume_auto(tmp_path)
    assert step == 10 and os.path.basename(os.path.dirname(path)) == "002-shapes-T-4-ours"
    assert find_checkpoint("auto", str(tmp_path))[0] == path


def test_resume_auto_picks_the_highest_step_in_a_run_not_the_newest_file(tmp_path):
    run = tmp_path / "000-shapes-T-4-ours"
    for step, mtime in ((4, 3_000), (8, 2_000), (12, 1_000)):  # the oldest step written last
        small_checkpoint(run / f"ckpt-{step:07d}.pt", step, mtime)
    assert resume_auto(tmp_path) == (str(run / "ckpt-0000012.pt"), 12)
    assert find_checkpoint(str(run))[0] == str(run / "ckpt-0000012.pt")  # --resume RUN, --ckpt RUN


def test_resume_auto_passes_over_a_newer_run_that_has_no_checkpoint_yet(tmp_path):
    """Run 003 was started (its folder made) and stopped before its first checkpoint: auto resumes the
    newest run that has one, its newest step; an unfinished write (.tmp) is no checkpoint."""
    small_checkpoint(tmp_path / "002-shapes-T-4-ours" / "ckpt-0000006.pt", 6)
    small_checkpoint(tmp_path / "002-shapes-T-4-ours" / "ckpt-0000003.pt", 3)
    small_checkpoint(tmp_path / "003-shapes-T-4-ours" / "ckpt-0000002.pt.123.tmp", 2)
    assert resume_auto(tmp_path) == (str(tmp_path / "002-shapes-T-4-ours" / "ckpt-0000006.pt"), 6)
    assert resume_auto(tmp_path / "no-such-folder") is None  # nothing to resume: a new run


def test_resume_auto_orders_runs_by_number_past_999(tmp_path):
    small_checkpoint(tmp_path / "999-shapes-T-4-ours" / "ckpt-0000050.pt", 50)
    small_checkpoint(tmp_path / "1000-shapes-T-4-ours" / "ckpt-0000010.pt", 10)
    assert resume_auto(tmp_path)[1] == 10


def test_resume_auto_orders_checkpoints_by_step_past_seven_digits(tmp_path):
    run = tmp_path / "000-shapes-T-4-ours"
    small_checkpoint(run / "ckpt-9999999.pt", 9_999_999)
    small_checkpoint(run / "ckpt-10000000.pt", 10_000_000)
    assert resume_auto(tmp_path)[1] == 10_000_000


def test_resume_auto_resumes_a_numbered_run_not_a_folder_of_another_name(tmp_path):
    small_checkpoint(tmp_path / "004-shapes-T-4-ours" / "ckpt-0000009.pt", 9)
    small_checkpoint(tmp_path / "backup" / "ckpt-0000002.pt", 2)
    assert resume_auto(tmp_path)[1] == 9
