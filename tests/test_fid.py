"""fid.py: the Frechet distance against known answers, the FID network's layout against the published weights
file, the TF1 resize against a plain loop, inputs that round-trip, two ranks equal to one, IS / precision /
recall on cases with a known answer, and bad input that says what to fix. Random Inception weights only: no
downloads."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

import fid
from conftest import ROOT

#################################################################################
#                              Frechet distance                                 #
#################################################################################


def random_cov(rng, d, n=None):
    """A covariance estimated from n Gaussian samples (rank n - 1 when n <= d); well conditioned by
    default."""
    x = rng.standard_normal((n or 4 * d, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return np.cov(x, rowvar=False), x


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    d = 64
    mu = rng.standard_normal(d)
    s1, _ = random_cov(rng, d)
    s2, _ = random_cov(rng, d)
    assert abs(fid.frechet_distance(mu, s1, mu, s1)) < 1e-6
    shift = rng.standard_normal(d)
    assert fid.frechet_distance(mu, s1, mu + shift, s1) == pytest.approx((shift ** 2).sum(), rel=1e-9)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)  # commuting covariances: a closed form
    assert fid.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(
        ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-9)
    # where scipy's sqrtm of the product works, the two formulations agree
    ref = np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(mu, s1, mu, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_rank_deficient_is_finite_and_exact():
    """Fewer samples than dimensions: S = X^T X / (n - 1), so tr((S1 S2)^1/2) is the nuclear norm of X1 X2^T
    over sqrt((n1 - 1)(n2 - 1)) -- an independent float64 reference from two small centred data matrices."""
    rng = np.random.default_rng(1)
    d = 96
    s1, x1 = random_cov(rng, d, n=20)
    s2, x2 = random_cov(rng, d, n=30)
    x1, x2 = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_sqrt = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(19 * 29)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float) and np.isfinite(got)
    assert got == pytest.approx(ref, rel=1e-8)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_statistics_match_numpy_in_float64():
    feats = np.random.default_rng(2).standard_normal((1000, 16)).astype(np.float32) + 3
    mu, sigma = fid.statistics(feats, chunk=64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


#################################################################################
#                          The network and its weights                          #
#################################################################################

def published_layout(state):
    """(name -> shape) as in pt_inception-2015-12-05-6726825d.pth: no BatchNorm counters, no aux head."""
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def test_network_has_the_published_weights_layout():
    net = fid.build_inception()
    layout = published_layout(net.state_dict())
    # 94 conv + BatchNorm units (conv weight; BN weight, bias, running mean, running var) and the fc weight
    # and bias
    assert len(layout) == 94 * 5 + 2
    assert not any(k.startswith("AuxLogits") for k in layout)
    assert layout["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert layout["Conv2d_1a_3x3.bn.running_var"] == (32,)
    assert layout["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert layout["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert layout["Mixed_7b.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert layout["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert layout["fc.weight"] == (1008, 2048) and layout["fc.bias"] == (1008,)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    # the TF pool branches: average over real pixels only, and a max pool in the last block
    assert [type(net.Mixed_5b).__name__, type(net.Mixed_6b).__name__, net.Mixed_7b.pool,
            net.Mixed_7c.pool] == \
        ["FIDInceptionA", "FIDInceptionC", "avg", "max"]
    ones = torch.ones(1, 1, 4, 4)
    assert torch.equal(fid.tf_pool(ones, "avg"), ones)  # zero padding would darken the border to 4/9 and 6/9


def random_weights():
    """A random state dict in the published file's layout, He-initialised so features are of order 1."""
    torch.manual_seed(0)
    net = fid.build_inception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "random-inception.pth")
    torch.save(random_weights(), path)
    return path


def test_weights_round_trip_and_wrong_keys_fail(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    model = fid.load_inception(fid.weights_file(weights))
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in state.items())
    state["Mixed_7c.branch_pool.conv.weights"] = state.pop("Mixed_7c.branch_pool.conv.weight")
    bad = str(tmp_path / "bad.pth")
    torch.save(state, bad)
    with pytest.raises(SystemExit, match=r"not the FID Inception.*1 missing keys "
                                         r"\['Mixed_7c.branch_pool.conv.weight'\].*1 unexpected keys "
                       r"\['Mixed_7c.branch_pool.conv.weights'\]"):
        fid.load_inception(bad)
    with pytest.raises(SystemExit, match="no such file"):
        fid.weights_file(str(tmp_path / "nope.pth"))


#################################################################################
#                          TensorFlow-compatible resize                         #
#################################################################################

def tf1_resize_loop(img, size):
    """The legacy TF1 formula pixel by pixel: src = dst * (in / out) in float32, lo = floor(src),
    hi = min(lo + 1, in - 1), then lerp along x and along y in float64."""
    c, h, w = img.shape
    sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
    out = np.zeros((c, size, size))
    for i in range(size):
        y = float(np.float32(i) * sy)
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, h - 1), y - y0
        for j in range(size):
            x = float(np.float32(j) * sx)
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, w - 1), x - x0
            top = (1 - dx) * img[:, y0, x0] + dx * img[:, y0, x1]
            bottom = (1 - dx) * img[:, y1, x0] + dx * img[:, y1, x1]
            out[:, i, j] = (1 - dy) * top + dy * bottom
    return out


@pytest.mark.parametrize("size_in", [32, 512])
def test_tf1_resize_matches_a_plain_loop_and_not_torch(size_in):
    img = torch.randint(0, 256, (1, 3, size_in, size_in)).float()
    ours = fid.resize_bilinear_tf1(img, 299)
    assert ours.shape == (1, 3, 299, 299)
    np.testing.assert_allclose(ours[0].double().numpy(), tf1_resize_loop(img[0].double().numpy(), 299),
                               atol=2e-3)
    half_pixel = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    assert (ours - half_pixel).abs().max() > 10  # grey levels: the convention matters


#################################################################################
#              Inputs round-trip, and two ranks give one rank's numbers         #
#################################################################################

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three 24 px images as an ADM-style .npz (with a sidecar JSON of settings) and as PNGs in nested
    folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    arr[:, 8:16, 8:16] = rng.integers(0, 256, (3, 1, 1, 3), dtype=np.uint8)  # a flat square: some structure
    np.savez(root / "samples.npz", arr_0=arr, labels=np.arange(3))
    with open(root / "samples.json", "w") as f:
        json.dump(dict(sampler="euler", steps=2, cfg_scale=1.5), f)
    for i, im in enumerate(arr):
        (root / "png" / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / "png" / f"sub{i % 2}" / f"{i:03d}.png")
    return root, arr


@pytest.fixture(scope="module")
def npz_features(images, weights):
    """Features and logits of the .npz images, one process."""
    root, _ = images
    return fid.extract(fid.load_inception(weights), fid.open_input(str(root / "samples.npz"))[1])


def test_folder_and_npz_give_identical_features_and_stats_round_trip(images, weights, npz_features, tmp_path):
    root, arr = images
    _, from_npz = fid.open_input(str(root / "samples.npz"))
    _, from_png = fid.open_input(str(root / "png"))
    order = [0, 2, 1]  # sorted paths: sub0/000, sub0/002, sub1/001
    assert len(from_npz) == len(from_png) == 3
    assert all(torch.equal(from_npz[i], torch.from_numpy(arr[i]).permute(2, 0, 1)) for i in range(3))
    assert all(torch.equal(from_png[k], from_npz[i]) for k, i in enumerate(order))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=arr)  # not memory-mappable: read whole instead
    _, from_zip = fid.open_input(str(tmp_path / "compressed.npz"))
    assert all(torch.equal(from_zip[i], from_npz[i]) for i in range(3))
    f_npz, logits = npz_features
    assert f_npz.shape == (3, 2048) and logits.shape == (3, 1008) and np.isfinite(f_npz).all()
    assert 0.01 < f_npz.std() < 100  # He-initialised random weights: features of order 1, not vanishing
    f_png, _ = fid.extract(fid.load_inception(weights), from_png)
    np.testing.assert_array_equal(f_png, f_npz[order])
    mu, sigma = fid.statistics(f_npz)
    fid.save_stats(tmp_path / "stats.npz", mu, sigma)
    (mu2, sigma2), no_images = fid.open_input(str(tmp_path / "stats.npz"))
    assert no_images is None and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)


@pytest.mark.slow
def test_cli_records_settings_and_two_ranks_equal_one(images, weights, npz_features, tmp_path):
    root, arr = images
    npz = str(root / "samples.npz")
    mu, sigma = fid.statistics(npz_features[0])
    # an ADM-style reference batch: images and their statistics; FID uses the statistics, --pr the images
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=arr, mu=mu, sigma=sigma)
    res = fid.main([ref, npz, "--inception", weights, "--workers", "0", "--is", "--splits", "3", "--pr",
                    "--k", "2"])
    assert abs(res["fid"]) < 1e-6 and res["precision"] == res["recall"] == 1.0
    assert res["inception_score"] >= 1.0
    with open(root / "samples.metrics.json") as f:
        written = json.load(f)
    assert (written["settings"] == dict(sampler="euler", steps=2,
                                        cfg_scale=1.5) and written["fid"] == res["fid"])
    # two ranks under torchrun (gloo): each embeds a strided shard (2 and 1 images), gathered back in order
    two = str(tmp_path / "two.npz")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611",
           "fid.py", npz, "--save-stats", two, "--inception", weights, "--workers", "0", "--batch", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(two) as b:
        np.testing.assert_allclose(b["mu"], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["sigma"], sigma, rtol=1e-4, atol=1e-5 * np.abs(sigma).max())


#################################################################################
#                   Inception Score, precision and recall                       #
#################################################################################


def test_inception_score_known_answers():
    same = np.tile(np.random.default_rng(4).standard_normal(1008), (100, 1))
    assert fid.inception_score(same) == pytest.approx((1.0, 0.0), abs=1e-9)
    confident = np.zeros((100, 1008))
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # each split: 10 equally likely classes, each sure
    assert fid.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)


def precision_recall_loop(ref, sample, k):
    """Plain reference: full distance matrices, a point is covered by a ball reaching its owner's k-th
    neighbour."""
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
    r_ref, r_sample = np.sort(d(ref, ref), 1)[:, k], np.sort(d(sample, sample), 1)[:, k]
    precision = np.mean([(d(s[None], ref)[0] <= r_ref).any() for s in sample])
    recall = np.mean([(d(r[None], sample)[0] <= r_sample).any() for r in ref])
    return precision, recall


def test_precision_recall():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((60, 8)).astype(np.float32)
    assert fid.precision_recall(ref, ref) == (1.0, 1.0)
    assert fid.precision_recall(ref, ref + 100) == (0.0, 0.0)
    sample = (rng.standard_normal((50, 8)) + 1.0).astype(np.float32)
    got = fid.precision_recall(ref, sample, k=3, chunk=7)  # chunks that do not divide either set
    assert got == pytest.approx(precision_recall_loop(ref.astype(np.float64), sample.astype(np.float64), 3))
    assert 0 < got[0] < 1 and 0 < got[1] < 1


#################################################################################
#                         Bad input says what to fix                            #
#################################################################################


def test_bad_inputs_fail_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file or folder"):
        fid.open_input(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match=r"needs `arr_0`.*or `mu` and `sigma`.*holds \['images'\]"):
        fid.open_input(str(tmp_path / "other.npz"))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(SystemExit, match="channels first"):
        fid.open_input(str(tmp_path / "nchw.npz"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no .png/.jpg/.jpeg/.webp files"):
        fid.open_input(str(tmp_path / "empty"))
    np.savez(tmp_path / "whole.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:300])  # a copy cut short
    with pytest.raises(SystemExit, match="cut.npz: not a readable .npz"):
        fid.open_input(str(tmp_path / "cut.npz"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    _, folder = fid.open_input(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match="0.png: not a readable image.*replace or remove it"):
        folder[0]
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "broken"), "--save-stats", str(tmp_path / "st")])
    assert "end the path in .npz" in capsys.readouterr().err
    fid.save_stats(tmp_path / "stats.npz", np.zeros(4), np.eye(4))
    with pytest.raises(SystemExit, match="--pr compares features"):
        fid.main([str(tmp_path / "stats.npz"), str(tmp_path / "stats.npz"), "--pr"])
    same = fid.main([str(tmp_path / "stats.npz"), str(tmp_path / "stats.npz")])
    assert same["fid"] == pytest.approx(0, abs=1e-9)
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install transformers"):
            fid.clip_score([], [], "clip")


#################################################################################
#          FID you can trust: weak numbers said, impossible ones refused        #
#################################################################################


def image_npz(path, n, size, seed=0):
    """An ADM-style .npz of n random uint8 images of size x size px."""
    rng = np.random.default_rng(seed)
    np.savez(path, arr_0=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return str(path)


def test_fid_over_fewer_images_than_feature_dimensions_says_so_next_to_the_number(weights, tmp_path, capsys):
    """3 images of 32 px: the covariance is singular, which the ADM suite / pytorch-fid / clean-fid print a
    warning for and still score; so does fid.py, under the number and in the result JSON."""
    ref, sample = image_npz(tmp_path / "ref.npz", 3, 32), image_npz(tmp_path / "sample.npz", 3, 32, seed=1)
    out = str(tmp_path / "metrics.json")
    res = fid.main([ref, sample, "--inception", weights, "--workers", "0", "--out", out])
    printed = capsys.readouterr().out.splitlines()
    few = "has 3 images, fewer than the 2048 feature dimensions: its covariance is singular and FID is biased"
    assert printed[0].startswith("fid ") and np.isfinite(res["fid"])
    assert printed[1] == f"caution: REF {few}" + printed[1].split("biased", 1)[1]
    assert printed[2].startswith(f"caution: SAMPLE {few}")
    assert not any("px" in line for line in printed)  # 32 px is not too small
    with open(out) as f:
        assert json.load(f)["cautions"] == res["cautions"] == [p[len("caution: "):] for p in printed[1:3]]


def test_stored_statistics_of_few_images_say_so(tmp_path, capsys):
    """A statistics file says nothing of its image count; the rank of its covariance does."""
    rng = np.random.default_rng(6)
    low, _ = random_cov(rng, 96, n=20)  # rank 19
    full, _ = random_cov(rng, 96)
    np.savez(tmp_path / "low.npz", mu=np.zeros(96), sigma=low)
    np.savez(tmp_path / "full.npz", mu=np.zeros(96), sigma=full)
    res = fid.main([str(tmp_path / "full.npz"), str(tmp_path / "low.npz")])
    assert res["cautions"] == ["SAMPLE's stored covariance has rank 19 of 96: it comes from fewer images "
                               "than feature dimensions, so FID is biased upward; compare FIDs only over "
                               "equal counts (50 000 is the usual one)"]
    assert "caution: SAMPLE's stored covariance has rank 19 of 96" in capsys.readouterr().out
    assert fid.main([str(tmp_path / "full.npz"), str(tmp_path / "full.npz")])["cautions"] == []


def test_fid_over_images_far_smaller_than_inceptions_input_says_so(weights, tmp_path, capsys):
    ref = image_npz(tmp_path / "tiny.npz", 3, 1)  # 1 x 1 px: each image is one colour after the resize
    res = fid.main([ref, ref, "--inception", weights, "--workers", "0"])
    tiny = [line for line in res["cautions"] if "px" in line]
    assert [line.split(":")[0] for line in tiny] == [
        f"{side} has images of 1 x 1 px, upsampled 299x to Inception's 299 x 299"
        for side in ("REF", "SAMPLE")]
    assert "below 32 px" in tiny[0] and "caution: SAMPLE has images of 1 x 1 px" in capsys.readouterr().out
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (40, 12)).save(folder / "a.png")  # a folder: the smallest side of any file counts
    Image.new("RGB", (64, 64)).save(folder / "b.png")
    assert fid.open_input(str(folder)).images.smallest_size() == (12, 40)


def test_statistics_that_are_no_covariance_are_refused(tmp_path):
    """What cannot give an FID at all is refused, naming the file (the reference tools raise when sqrtm's
    imaginary part passes 1e-3); a float32 covariance of few images, rounding and all, still loads."""
    rng = np.random.default_rng(7)
    sigma, _ = random_cov(rng, 64, n=20)
    cases = {"nan": (np.full(64, np.nan), sigma, "mu / sigma hold NaN or inf"),
             "asymmetric": (np.zeros(64), sigma + np.triu(np.ones((64, 64)), 1), "sigma is not symmetric"),
             "negative": (np.zeros(64), sigma - 2 * np.eye(64) * np.diagonal(sigma).max(),
                          "so it is not a covariance and no FID can be computed")}
    for name, (mu, s, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=s)
        with pytest.raises(SystemExit, match=f"{name}.npz: .*{re.escape(message)}.*--save-stats"):
            fid.open_input(str(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "f32.npz", mu=np.zeros(64, np.float32), sigma=sigma.astype(np.float32))
    assert fid.open_input(str(tmp_path / "f32.npz")).stats is not None
    with pytest.raises(SystemExit, match="Inception features hold NaN or inf.*--inception"):
        fid.statistics(np.full((3, 4), np.nan, np.float32))


def test_is_splits_and_pr_k_are_checked_against_the_images_before_any_feature(tmp_path, monkeypatch):
    npz = image_npz(tmp_path / "three.npz", 3, 8)
    monkeypatch.setattr(fid, "inception_features", lambda *a: pytest.fail("features computed first"))
    with pytest.raises(SystemExit, match="Inception Score with 10 splits needs at least 10 images, got 3 in "
                                         "SAMPLE; give --splits 3 or fewer"):
        fid.main([npz, npz, "--is"])
    with pytest.raises(SystemExit, match=r"precision / recall with k = 3 need more than 3 images on each "
                                         r"side, got 3 \(REF\) and 3 \(SAMPLE\)"):
        fid.main([npz, npz, "--pr"])
