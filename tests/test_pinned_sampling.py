"""What users rely on when they sample, pinned: in every mode (diffusion.generate, a grid, --num-samples,
--eval-per-class) a sample's seed alone decides its noise, so a seed gives the same image whatever else is
drawn beside it, in any order or batch size, and two seeds give two images; and in a grid every class or
prompt has its own row and every (guidance scale, control variant, seed) its own column. Tiny models built by
build.make_model, untrained but with every zero-initialised layer shaken (conftest.perturb), so nothing
trains here. (Each sampler's order of accuracy: test_pinned.py.)"""
import numpy as np
import pytest
import torch
from PIL import Image

import sample
import shapes
from build import TrainedModel, latent_shape, make_diffusion, make_model, sampling_control
from conditioning import SIGNAL, padding_noise
from config import get_args
from conftest import TINY, facts_of, perturb
from diffusion import Draw, Sampling, generate, make_noise
from latents import Autoencoder
from text import semantic_input

DDPM = ["--objective", "ddpm", "--pred", "eps"]
# (flags, sampler): every sampler of both objectives; the ancestral one (ddpm) draws fresh noise each step
DETERMINISTIC = [([], "euler"), ([], "heun"), ([], "dpm++2m"), (DDPM, "ddim"), (DDPM, "dpm++2m")]
ANCESTRAL = (DDPM, "ddpm")


class KeepLatents(Autoencoder):
    """Pixel space (optionally scaled, so a DDPM model's wide outputs still land inside [0, 1]) that keeps
    every batch of latents it decodes."""

    def __init__(self, scale=None):
        super().__init__("none", scale=scale)
        self.seen = []

    def decode(self, z):
        """Keep z, then decode it as pixel space does."""
        self.seen.append(z.detach().clone())
        return super().decode(z)


def tiny(flags=(), vae_scale=None, num_classes=10, wrap=None):
    """A TrainedModel of TINY + flags with every layer live (perturb), decoding through KeepLatents; `wrap`
    puts a module around the network."""
    args = get_args(TINY + list(flags))
    text = dict(text_dim=64, text_len=16) if args.cond_type == "text" else {}
    facts = facts_of(args, num_classes=num_classes, **text)
    torch.manual_seed(0)
    model = perturb(make_model(args, facts)).eval()
    return TrainedModel(wrap(model) if wrap else model, KeepLatents(vae_scale), args, facts)


def close(a, b):
    """Equal up to the last bits a matmul's batch size may change (relative to the samples' scale)."""
    return (a - b).abs().max() <= 1e-5 * b.abs().max()


#################################################################################
#                     diffusion.generate: a seed is its sample's                 #
#################################################################################


@pytest.mark.parametrize("flags,method", DETERMINISTIC)
def test_generate_gives_a_seed_the_same_image_in_any_batch(flags, method):
    """Five samples, two of them the same (label, control, seed), drawn together in chunks of 3, each alone,
    and in reverse order in one chunk, with both guidances on (three branches per step): every way gives each
    sample the same image; a sample differing only in its seed differs."""
    trained = tiny(flags)
    diffusion = make_diffusion(trained.args, trained.facts)
    seeds, labels = [3, 8, 1, 3, 8], torch.tensor([2, 2, 7, 2, 5])
    ctrl = torch.stack([sampling_control(trained.facts)] * 5)
    ctrl[2, SIGNAL["flip"]] = 1.0
    sampling = Sampling(method=method, steps=4, scale=2.5, ctrl=0.5)
    noise_of = lambda order: make_noise([seeds[i] for i in order], latent_shape(trained.facts), "cpu")
    draw = lambda order, batch: generate(trained.model, diffusion, noise_of(order), labels[order],
                                         ctrl[order], sampling, Draw(batch=batch))
    together = draw([0, 1, 2, 3, 4], 3)
    alone = torch.cat([draw([i], 1) for i in range(5)])
    backwards = draw([4, 3, 2, 1, 0], 5).flip(0)
    assert close(together, alone) and close(backwards, alone)
    assert close(together[0], together[3])  # the same seed, label and control twice in one batch
    assert not close(together[0], together[1])  # another seed


def test_the_ancestral_samplers_fresh_noise_comes_from_the_draws_seed():
    """DDPM's ancestral sampler draws fresh noise at every step: from Draw.seed, so the same call gives the
    same images whatever the global RNG did between, and another Draw.seed other images from the same
    start."""
    trained = tiny(ANCESTRAL[0])
    diffusion = make_diffusion(trained.args, trained.facts)
    noise = make_noise([3, 8], latent_shape(trained.facts), "cpu")
    labels, ctrl = torch.tensor([2, 7]), torch.stack([sampling_control(trained.facts)] * 2)
    draw = lambda seed: generate(trained.model, diffusion, noise, labels, ctrl,
                                 Sampling(method="ddpm", steps=5, scale=2.0), Draw(seed=seed))
    torch.manual_seed(1)
    first = draw(5)
    torch.manual_seed(2)
    torch.randn(100)
    assert torch.equal(draw(5), first)
    assert not close(draw(6), first)


#################################################################################
#                  A grid: the same cell whatever else is on it                  #
#################################################################################


def grid_cells(trained, tmp_path, method, layout):
    """{(class, guidance scale, flip, seed): latents} of the grid sample.class_grid draws for `layout` (its
    controls: flip 0 and 1 unless given), each cell as the grid lays it out (rows x columns)."""
    controls = layout.controls
    if controls is None:
        controls = [sampling_control(trained.facts), sampling_control(trained.facts)]
        controls[1][SIGNAL["flip"]] = 1.0
        layout = layout._replace(controls=controls)
    trained.vae.seen.clear()
    sample.class_grid(trained, Sampling(method=method, steps=5), str(tmp_path / "g.png"), layout)
    (latents,) = trained.vae.seen
    cols = [(scale, int(control[SIGNAL["flip"]]), seed)
            for scale in layout.cfg_scales for control in controls for seed in layout.seeds]
    cells = [(k, *col) for k in layout.classes for col in cols]
    return dict(zip(cells, latents))


@pytest.mark.parametrize("flags,method", [([], "euler"), (DDPM, "ddim"),
                                          ANCESTRAL])
def test_a_grid_cell_is_the_same_whatever_else_the_grid_holds(flags, method, tmp_path):
    """Classes 3, 6 x scales 1, 3 x flips 0, 1 x seeds 4, 1, 7, and classes 6, 3 x scale 3 x flip 1 x seeds 7,
    2, 1: the four cells both grids hold are the same in both; a cell's seed makes it differ from its row's
    other cells."""
    trained = tiny(flags, vae_scale=200.0)  # the DDPM model's wide outputs inside [0, 1]
    big = grid_cells(trained, tmp_path, method, sample.GridLayout([3, 6], (4, 1, 7), None, [1.0, 3.0]))
    flip1 = sampling_control(trained.facts)
    flip1[SIGNAL["flip"]] = 1.0
    small = grid_cells(trained, tmp_path, method, sample.GridLayout([6, 3], (7, 2, 1), [flip1], [3.0]))
    both = big.keys() & small.keys()
    assert len(both) == 4 and all(close(big[cell], small[cell]) for cell in both), sorted(both)
    assert not close(big[(6, 3.0, 1, 7)], big[(6, 3.0, 1, 4)]) and not close(small[(6, 3.0, 1, 2)],
                                                                                small[(6, 3.0, 1, 7)])


#################################################################################
#             A grid: each class or prompt a row, each seed a column             #
#################################################################################
# CellCoder stands in for the network: a one-step Euler sample of it is an image whose bands spell out what
# the network was asked, read back from the saved PNG. Each value is a code c (1..16) drawn as the grey level
# c / 16, which a PNG keeps exactly.
BANDS = ("row", "seed", "flip", "scale|pad")  # 4-pixel bands, top to bottom; the last one halved


class CellCoder(torch.nn.Module):
    """The raw output whose one-step Euler sample shows, for each sample: the row (the class, or the index
    of its prompt among `prompts`), its noise (the index of the seed in `seeds` whose noise it starts from),
    its flip, the guidance (1/16 in the conditional branch, 0 in the unconditional one, so the guided
    image shows scale / 16) and, for a text model, the seed of its padding noise."""

    def __init__(self, pred, res, seeds, prompts=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # class_grid finds the device through it
        self.pred, self.seeds, self.prompts = pred, list(seeds), prompts
        self.noises = make_noise(self.seeds, (3, res, res), "cpu")
        if prompts:  # each prompt's features and padding noise, as the grid will hand them over
            self.features = semantic_input(*prompts)
            self.padding = padding_noise(self.seeds, 16, self.features[0].shape[-1])

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        """The image as codes for one Euler step from t = 1 (x is then the starting noise)."""
        nearest = lambda table, rows: torch.cdist(rows.flatten(1), table.flatten(1)).argmin(1)
        codes = torch.zeros(x.shape[0], 5)
        codes[:, 1] = nearest(self.noises, x) + 1
        codes[:, 2] = ctrl[:, SIGNAL["flip"]] + 1
        codes[:, 3] = 1.0 if sem_drop is None else (~sem_drop).float()
        if self.prompts:
            codes[:, 0] = nearest(self.features[0], y[0]) + 1
            codes[:, 4] = nearest(self.padding, y[2]) + 1
        else:
            codes[:, 0] = y.float() + 1
        grey = codes / 16
        image = torch.empty_like(x)
        for band in range(3):
            image[:, :, 4 * band:4 * band + 4] = grey[:, band].view(-1, 1, 1, 1)
        image[:, :, 12:, :8], image[:, :, 12:, 8:] = grey[:, 3:4, None, None], grey[:, 4:5, None, None]
        target = 2 * image - 1  # pixel space: [0, 1] as [-1, 1]
        return target if self.pred == "x" else x - target  # the velocity that one step takes to it


def read_grid(path, rows, cols, res=16):
    """The codes of each cell of a saved grid (1 px padding), row by row: (row, seed, flip, scale, pad)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255 * 16
    assert pixels.shape == (1 + rows * (res + 1), 1 + cols * (res + 1), 3)
    cells = []
    for r in range(rows):
        for c in range(cols):
            cell = pixels[1 + r * (res + 1):(r + 1) * (res + 1), 1 + c * (res + 1):(c + 1) * (res + 1)]
            regions = [cell[0:4], cell[4:8], cell[8:12], cell[12:, :8], cell[12:, 8:]]
            assert all(np.ptp(region) < 0.5 for region in regions)  # one code per region, none smeared
            cells.append(tuple(int(round(region.mean())) for region in regions))
    return cells


@pytest.mark.parametrize("text", [False, True], ids=["classes", "prompts"])
def test_each_row_is_its_class_or_prompt_and_each_column_its_scale_control_and_seed(text, tmp_path):
    """Classes 7, 2, 5 (or three prompts) against 2 guidance scales x 2 control variants x 3 seeds given out
    of order: row r is the r-th class or prompt, column c the c-th (scale, control, seed) of their product, in
    every one of the 36 cells; a text model's padding noise is its cell's seed's."""
    flags = ["--cond-type", "text"] if text else []
    args = get_args(TINY + flags)
    facts = facts_of(args, text_dim=64, text_len=16) if text else facts_of(args)
    seeds, scales = (9, 0, 4), [1.0, 4.0]
    rows = ["a red circle", "a big cyan diamond", "a small green ell"] if text else [7, 2, 5]
    prompts = (args, facts, [0] * 3, "cpu", rows) if text else None
    model = CellCoder(args.pred, facts.res, seeds, prompts)
    controls = [sampling_control(facts) for _ in range(2)]
    controls[0][SIGNAL["flip"]] = 1.0  # the mirrored variant first
    layout = sample.GridLayout(None if text else rows, seeds, controls, scales, rows if text else None)
    path = sample.class_grid(TrainedModel(model, Autoencoder("none"), args, facts),
                             Sampling(method="euler", steps=1), str(tmp_path / "grid.png"), layout)
    cols = [(scale, flip, seed) for scale in scales for flip in (1, 0) for seed in seeds]
    found = read_grid(path, len(rows), len(cols))
    want = [(r + 1 if text else rows[r] + 1, seeds.index(seed) + 1, flip + 1, scale,
             seeds.index(seed) + 1 if text else 0)
            for r in range(len(rows)) for scale, flip, seed in cols]
    assert found == want


#################################################################################
#                --num-samples: sample i starts from seed + i                    #
#################################################################################


def npz_of(trained, path, num_samples, seed, batch, method="euler", rank=0, world=1):
    """The uint8 images sample.sample_npz writes for this job (flip 0, one guidance scale)."""
    job = sample.NpzJob(num_samples, sampling_control(trained.facts), "equal", seed, batch)
    sample.sample_npz(trained, Sampling(method=method, steps=3, scale=2.0), str(path), job, rank, world)
    with np.load(path) as z:
        return z["arr_0"].astype(int)


def test_npz_sample_i_is_seed_plus_i_whatever_the_batch_size(tmp_path):
    """One class, so that every sample asks the same: the images of --seed 4 in batches of 2 are those of
    --seed 4 in one batch of 5, and sample i + 1 of --seed 4 is sample i of --seed 5 (to the last grey level,
    which a matmul's batch size may tip); every seed's image is its own."""
    trained = tiny(num_classes=1)
    by_two = npz_of(trained, tmp_path / "a.npz", 5, seed=4, batch=2)
    at_once = npz_of(trained, tmp_path / "b.npz", 5, seed=4, batch=5)
    shifted = npz_of(trained, tmp_path / "c.npz", 4, seed=5, batch=3)
    assert np.abs(by_two - at_once).max() <= 1 and np.abs(by_two[1:] - shifted).max() <= 1
    assert all(np.abs(by_two[i] - by_two[j]).mean() > 5 for i in range(5) for j in range(i))


def test_npz_ancestral_samples_are_the_same_from_one_rank_as_from_two(tmp_path, monkeypatch):
    """Global batch b is drawn by rank b % world, its fresh noise seeded by the batch: two ranks write the
    images of one, to the bit, with DDPM's ancestral sampler too. The ranks run here one after the other in
    this process (rank 1 first, so its part is there when rank 0 gathers), their collective calls
    stood down."""
    trained = tiny(ANCESTRAL[0], vae_scale=200.0)
    one = npz_of(trained, tmp_path / "one.npz", 7, seed=3, batch=2, method="ddpm")
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda box, src=0: None)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    job = sample.NpzJob(7, sampling_control(trained.facts), "equal", 3, 2)
    sampling = Sampling(method="ddpm", steps=3, scale=2.0)
    sample.sample_npz(trained, sampling, str(tmp_path / "two.npz"), job, rank=1, world=2)
    two = npz_of(trained, tmp_path / "two.npz", 7, seed=3, batch=2, method="ddpm", rank=0, world=2)
    assert np.array_equal(one, two) and 20 < one.mean() < 235  # grey levels, not all clipped
    again = npz_of(trained, tmp_path / "again.npz", 7, seed=4, batch=2, method="ddpm")
    assert all(np.abs(again[i] - one[i]).mean() > 5 for i in range(7))  # another --seed: another image


#################################################################################
#              --eval-per-class: each row's noise is its seed's                  #
#################################################################################


class ControlBlind(torch.nn.Module):
    """The network, told the same (zero) control whatever it is asked: a flip pair then differs only by its
    noise."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, ctrl, **kw):
        """The network's output for control zero."""
        return self.model(x, t, y, torch.zeros_like(ctrl), **kw)


def eval_draw(trained, method, monkeypatch):
    """(the seeds, the noise and the controls shapes.evaluate_shapes hands diffusion.generate, the latents it
    decodes) for one sample per class through sample.checker_verdict, 3 steps at guidance 2."""
    handed = {}

    def spy(model, diffusion, noise, y, ctrl, sampling, draw):
        handed.update(seeds=list(draw.seeds), noise=noise, ctrl=ctrl)
        return generate(model, diffusion, noise, y, ctrl, sampling, draw)
    monkeypatch.setattr(shapes, "generate", spy)
    trained.vae.seen.clear()
    sample.checker_verdict(trained, 1, Sampling(method=method, steps=3, scale=2.0))
    (latents,) = trained.vae.seen
    return handed["seeds"], handed["noise"], handed["ctrl"], latents


@pytest.mark.parametrize("flags,method", [([], "euler"), (DDPM, "ddim"),
                                          ANCESTRAL])
def test_eval_draws_each_flip_pair_from_one_seed_of_its_own(flags, method, monkeypatch):
    """Each (class, sample) has a seed no other shares; its flip 0 and flip 1 rows start from that seed's
    noise and differ in nothing but the flip, so that `mirrored` compares the same sample mirrored: told
    the same control, the network draws both the same image."""
    trained = tiny(flags, vae_scale=200.0, wrap=ControlBlind)
    seeds, noise, ctrl, latents = eval_draw(trained, method, monkeypatch)
    assert len(seeds) == 20 and len(set(seeds)) == 10 and all(seeds.count(seed) == 2 for seed in seeds)
    assert torch.equal(noise, make_noise(seeds, latent_shape(trained.facts), "cpu"))
    for seed in set(seeds):
        a, b = [i for i, s in enumerate(seeds) if s == seed]
        others = [k for k in range(ctrl.shape[1]) if k != SIGNAL["flip"]]
        assert torch.equal(ctrl[a, others], ctrl[b, others]) and {ctrl[a, SIGNAL["flip"]].item(),
                                                                   ctrl[b, SIGNAL["flip"]].item()} == {0, 1}
        assert close(latents[a], latents[b]), seed


@pytest.mark.parametrize("flags,method", [([], "euler"), ANCESTRAL])
def test_eval_draws_the_same_samples_whatever_the_global_rng(flags, method, monkeypatch):
    trained = tiny(flags, vae_scale=200.0)
    torch.manual_seed(1)
    first = eval_draw(trained, method, monkeypatch)[3]
    torch.manual_seed(2)
    torch.randn(100)
    assert torch.equal(eval_draw(trained, method, monkeypatch)[3], first)
