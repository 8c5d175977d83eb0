"""The latent cache: the autoencoder wrapper round-trips, the cache holds exactly what the wrapper gives for
each crop and for its mirror image, two ranks split the work without overlap, and a re-run redoes only what is
missing. Everything runs on a tiny random diffusers AutoencoderKL with the SD layout (f = 8, 4 channels): no
download."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import encode
import latents
from build import build_dataset, data_files, data_fingerprint
from conditioning import CONTROL_SIGNALS
from conftest import ROOT
from latents import Autoencoder, LatentCacheDataset, shard_name

diffusers = pytest.importorskip("diffusers")  # a test dependency only (requirements-dev.txt)

RES, N = 32, 11  # 10 good images + 1 unreadable file (its slot is filled by another image, as in training)
FLIP = CONTROL_SIGNALS.index("flip")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """SD layout (4 blocks: f = 8; 4 latent channels) at 8 channels a block, random weights."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=RES)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for j, (h, w) in enumerate([(40, 60), (70, 50), (33, 33), (32, 48), (50, 50)]):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{j}.png")
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    return str(root)


def encode_args(vae, folder, out, *extra):
    return ["--dataset", "folder", "--data-path", folder, "--res", str(RES), "--vae", vae, "--out", out,
            "--shard-size", "3", "--batch", "2", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def cache(tiny_vae, folder, tmp_path_factory):
    """A one-process cache: 11 items in shards of 3 (3 + 3 + 3 + 2)."""
    return encode.main(encode_args(tiny_vae, folder, str(tmp_path_factory.mktemp("cache"))))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def shards(cache_dir):
    meta = load_json(os.path.join(cache_dir, "meta.json"))
    return [torch.load(os.path.join(cache_dir, shard_name(k, meta["world"])), weights_only=True)
            for k in range(meta["num_shards"])]


def close(a, b):  # the cache stores fp16
    return torch.allclose(a.float(), b.float(), rtol=2e-3, atol=2e-3)


def test_autoencoder_round_trip(tiny_vae, monkeypatch):
    ae = Autoencoder(tiny_vae)
    img = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8)
    mean, std = ae.posterior(img)
    z = ae.encode(img)
    assert z.shape == mean.shape == std.shape == (2, 4, RES // 8, RES // 8)
    assert ae.scale == 0.18215 and torch.allclose(z, mean * 0.18215)  # the VAE config's scaling factor
    sample = ae.encode(img, generator=torch.Generator().manual_seed(0))  # a posterior sample, reproducible
    assert torch.equal(sample, ae.encode(img, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(sample, z)
    x = ae.decode(z)
    assert x.shape == (2, 3, RES, RES) and x.min() >= 0 and x.max() <= 1
    # per-channel normalisation (a cache's statistics) is inverted exactly when decoding
    other = Autoencoder(tiny_vae, scale=[0.5, 1.0, 2.0, 4.0], shift=[0.1, -0.2, 0.3, 0.0])
    assert torch.allclose(other.encode(img), (mean - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(-1, 1, 1))
                          * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(-1, 1, 1))
    assert torch.allclose(other.decode(other.encode(img)), x, atol=1e-5)
    pixels = Autoencoder("none")
    assert torch.allclose(pixels.decode(pixels.encode(img)), img.float() / 255, atol=1e-6)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)  # as if diffusers were not installed
    with pytest.raises(ImportError, match="pip install diffusers"):
        Autoencoder("sd-ema")


def test_cache_holds_the_encoding_of_each_crop_and_of_its_mirror_image(cache, tiny_vae, folder):
    ae = Autoencoder(tiny_vae)
    source = build_dataset("folder", RES, folder, crop="center", hflip=False)
    items = shards(cache)
    assert [len(s["label"]) for s in items] == [3, 3, 3, 2]
    imgs, labels, ctrls, captions = zip(*[source[i] for i in range(N)])
    imgs = torch.stack(imgs)
    # (2N, C, h, w): the crops, then their mirror images
    mean, std = ae.posterior(torch.cat([imgs, imgs.flip(-1)]))
    stored = {k: torch.cat([s[k] for s in items]) for k in ("index", "mean", "std", "label", "control")}
    assert torch.equal(stored["index"], torch.arange(N))
    assert close(stored["mean"], torch.stack(mean.chunk(2), 1))
    assert close(stored["std"], torch.stack(std.chunk(2), 1))
    # what is stored for the flip is the mirror image encoded, not the latent mirrored
    assert not close(stored["mean"][:, 1], stored["mean"][:, 0].flip(-1))
    assert stored["label"].tolist() == list(labels) and torch.equal(stored["control"], torch.stack(ctrls))
    assert sum((s["caption"] for s in items), []) == list(captions)

    # the reader returns the same latents, scaled, with the flip it picked recorded in the control
    ds = LatentCacheDataset(cache, seed=0, sample=False)
    assert (ds.num_classes, ds.res, ds.vae, ds.scale, ds.is_latent) == (2, RES, tiny_vae, 0.18215, True)
    expected = ae.encode(torch.stack([imgs[4], imgs[4].flip(-1)]))  # item 4 as it is, and mirrored
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        z, label, ctrl, _ = ds[4]
        flip = int(ctrl[FLIP])
        assert close(z, expected[flip]) and label == labels[4]
        # crop offsets stay those of the unmirrored canvas, as crop_flip records them; only the flag changes
        assert torch.equal(torch.cat([ctrl[:FLIP], ctrl[FLIP + 1:]]),
                           torch.cat([ctrls[4][:FLIP], ctrls[4][FLIP + 1:]]))
        seen.add(flip)
    assert seen == {0, 1}
    assert load_json(os.path.join(cache, "stats.json"))["bad_images_this_run"] == {"unreadable": 1}


def test_reader_draws_posterior_samples_from_seed_epoch_and_index(cache):
    ds, again = LatentCacheDataset(cache, seed=0), LatentCacheDataset(cache, seed=0)
    mean = LatentCacheDataset(cache, seed=0, sample=False)
    assert len(ds) == N
    a = ds[5]
    assert torch.equal(a[0], again[5][0]) and torch.equal(a[2], again[5][2])  # the same (seed, epoch, index)
    assert a[0].shape == (4, RES // 8, RES // 8) and a[0].dtype == torch.float32
    assert not torch.allclose(a[0], mean[5][0])  # a sample, not the mean
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a[0])
    unflipped = LatentCacheDataset(cache, seed=0, hflip=False)
    assert all(unflipped[i][2][FLIP] == 0 for i in range(N))
    # per-channel normalisation: the cache's statistics, undone by the autoencoder built from the same numbers
    chan = LatentCacheDataset(cache, seed=0, sample=False, norm="channel")
    stats = load_json(os.path.join(cache, "stats.json"))
    assert chan.shift == stats["mean"] and np.allclose(chan.scale, [1 / s for s in stats["std"]])
    raw = mean[5][0] / 0.18215
    assert torch.allclose(chan[5][0], (raw - torch.tensor(chan.shift).view(-1, 1, 1))
                          * torch.tensor(chan.scale).view(-1, 1, 1), atol=1e-5)


def test_build_dataset_latents_checks_the_resolution(cache):
    ds = build_dataset("latents", RES, data_path=cache, seed=3)
    assert isinstance(ds, LatentCacheDataset) and ds.seed == 3
    with pytest.raises(ValueError, match=f"holds {RES} px images, not --res 64: train with --res {RES}"):
        build_dataset("latents", 64, data_path=cache)
    with pytest.raises(ValueError, match="needs --data-path"):
        build_dataset("latents", RES)
    with pytest.raises(FileNotFoundError, match=r"not a latent cache[\s\S]*\n  python encode.py"):
        build_dataset("latents", RES, data_path=os.path.dirname(cache))


def test_a_caption_cache_records_the_encoding_its_captions_were_read_in(tiny_vae, tmp_path):
    """Captions written in cp1252 (curly quotes; latin-1 reads the same bytes as control characters): the
    cache holds them as cp1252 reads them and its meta.json says so, and finishing it with another
    --text-encoding is refused with the command that made it, which names the encoding (another spelling of
    the same codec is the same encoding; a cache from before meta.json held the key takes the one given)."""
    root = tmp_path / "pairs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_bytes(b"a \x93quoted\x94 square " + str(i).encode())
    out = str(tmp_path / "cache")

    def encode_captions(encoding):
        return encode.main(["--dataset", "captions", "--data-path", str(root), "--res", str(RES), "--vae",
                            tiny_vae, "--out", out, "--batch", "2", "--workers", "0", "--text-encoding",
                            encoding])

    encode_captions("cp1252")
    assert load_json(os.path.join(out, "meta.json"))["text_encoding"] == "cp1252"
    assert sorted(sum((s["caption"] for s in shards(out)), [])) == [f"a \u201cquoted\u201d square {i}"
                                                                     for i in range(3)]
    with pytest.raises(SystemExit, match=r"text_encoding: cache 'cp1252' vs now 'iso8859-1'[\s\S]*"
                                         r"--text-encoding cp1252 --out"):
        encode_captions("latin-1")  # named by its codec's own name
    encode_captions("CP1252")  # another spelling of the same codec
    # a cache whose meta.json predates the key: the encoding given now is taken, whichever it is
    meta = load_json(os.path.join(out, "meta.json"))
    del meta["text_encoding"]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    encode_captions("latin-1")


def test_the_fingerprint_of_a_cache_is_its_files_not_the_folders_listing(cache, tmp_path):
    """A resume compares the data's fingerprint: of a latent cache, its meta.json, stats.json and the shards
    meta.json names (on a finished cache, the folder's whole listing, as before, so older checkpoints still
    match). A killed writer's stray .tmp file or any other file beside them changes nothing; a changed shard
    changes it."""
    out = str(tmp_path / "cache")
    shutil.copytree(cache, out)
    ds = build_dataset("latents", RES, data_path=out)
    assert data_files(ds) == sorted(os.path.join(out, f) for f in os.listdir(out))
    before = data_fingerprint(ds)
    for stray in ("shard-000-00001.pt.4242.tmp", "notes.txt"):
        (tmp_path / "cache" / stray).write_bytes(b"left behind")
    assert data_fingerprint(build_dataset("latents", RES, data_path=out)) == before
    first, second = (os.path.join(out, shard_name(k, ds.meta["world"])) for k in (0, 1))
    shutil.copyfile(second, first)
    assert data_fingerprint(build_dataset("latents", RES, data_path=out)) != before


def test_a_damaged_shard_is_named_when_the_cache_is_opened(cache, tmp_path):
    """Truncated on disk: the cache refuses to open, naming the shard and the command that repairs it, and
    train.py says so in one line (no traceback)."""
    out = str(tmp_path / "cache")
    shutil.copytree(cache, out)
    with open(os.path.join(out, shard_name(2, 1)), "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match=r"shard shard-000-00002.pt is damaged .*redoes only[\s\S]*python "
                       r"encode.py"):
        LatentCacheDataset(out)
    from build import open_dataset
    from config import get_args
    with pytest.raises(SystemExit,
                       match="--dataset latents: latent cache .* shard shard-000-00002.pt is damaged"):
        open_dataset(get_args(["--dataset", "latents", "--data-path", out]))


def test_a_cache_is_checked_against_the_model_and_diffusers_when_it_is_opened(cache, monkeypatch):
    """What validate cannot know before the cache is open: its resolution against the model's patch (with a
    way out that a cache has: no --vae none), and that decoding its latents needs diffusers."""
    from build import open_dataset
    from config import get_args
    assert open_dataset(get_args(["--dataset", "latents", "--data-path", cache, "--model", "T/4"])).res == RES
    with pytest.raises(SystemExit, match=rf"the latent cache .* holds {RES} px images of --vae .*: --res "
                       rf"{RES} must be divisible by patch 8 x autoencoder factor 8 = 64; encode a cache at "
                       r"--res 64 or choose a smaller patch$"):
        open_dataset(get_args(["--dataset", "latents", "--data-path", cache, "--model", "T/8"]))
    import build
    real = build.importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None if name == "diffusers"
                        else real(name))
    with pytest.raises(SystemExit, match=r"the latent cache .*; decoding them \(the sample grids\) needs the "
                       r"optional package diffusers: pip install diffusers$"):
        open_dataset(get_args(["--dataset", "latents", "--data-path", cache, "--model", "T/4"]))


def test_rerun_redoes_only_missing_or_damaged_shards_and_refuses_other_settings(cache, tiny_vae, folder,
                                                                                tmp_path, capsys):
    out = str(tmp_path / "cache")
    shutil.copytree(cache, out)
    names = [shard_name(k, 1) for k in range(4)]
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in names}
    os.remove(os.path.join(out, names[1]))
    with pytest.raises(RuntimeError, match="unfinished .1 of 4 shards missing.*\n  python encode.py"):
        LatentCacheDataset(out)
    with open(os.path.join(out, names[2]), "r+b") as f:  # damaged on disk under a complete name
        f.truncate(100)
    capsys.readouterr()
    encode.main(encode_args(tiny_vae, folder, out))
    log = capsys.readouterr().out
    assert "2 of 4 shards already complete, 2 to encode" in log
    assert [line.split()[3] for line in log.splitlines() if " wrote " in line] == names[1:3]
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in (names[0], names[3])} == \
        {f: before[f] for f in (names[0], names[3])}
    for a, b in zip(shards(out), shards(cache)):
        assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["index"], b["index"])
    with pytest.raises(SystemExit, match=r"res: cache 32 vs now 64[\s\S]*--res 32"):
        encode.main(encode_args(tiny_vae, folder, out, "--res", "64"))  # argparse: the later flag wins
    with pytest.raises(SystemExit, match="crop: cache 'center' vs now 'random'"):
        encode.main(encode_args(tiny_vae, folder, out, "--crop", "random"))


@pytest.mark.slow
def test_two_ranks_write_disjoint_shards_that_cover_the_dataset_once(cache, tiny_vae, folder, tmp_path):
    out = str(tmp_path / "cache2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "encode.py",
           *encode_args(tiny_vae, folder, out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    files = sorted(f for f in os.listdir(out) if f.startswith("shard-"))
    # shard K by rank K % 2, named after both
    assert files == ["shard-000-00000.pt", "shard-000-00002.pt", "shard-001-00001.pt", "shard-001-00003.pt"]
    items = shards(out)
    index = torch.cat([s["index"] for s in items])
    assert sorted(index.tolist()) == list(range(N))
    source = build_dataset("folder", RES, folder, crop="center", hflip=False)
    assert torch.cat([s["label"] for s in items]).tolist() == [source[i][1] for i in index.tolist()]
    for a, b in zip(items, shards(cache)):  # the same numbers as one process wrote
        assert close(a["mean"], b["mean"]) and close(a["std"], b["std"])
    one, two = (load_json(os.path.join(d, "stats.json")) for d in (cache, out))
    assert np.allclose(one["std"], two["std"], rtol=1e-3) and np.allclose(one["mean"], two["mean"], atol=1e-3)
    assert two["bad_images_this_run"] == {"unreadable": 1}  # counted on one rank, summed over both
    assert len(LatentCacheDataset(out)) == N
    with pytest.raises(SystemExit, match=r"world: cache 2 vs now 1[\s\S]*torchrun --nproc_per_node=2 "
                       r"encode.py"):
        encode.main(encode_args(tiny_vae, folder, out))


@pytest.mark.slow
def test_training_reads_the_cache_and_sampling_decodes_with_its_scale(cache, tiny_vae, tmp_path):
    """--dataset latents takes resolution and VAE from the cache; the checkpoint records the latent scale that
    sample.py decodes with."""
    import sample
    import train
    from checkpoint import checkpoints_in
    run = train.main(["--dataset", "latents", "--data-path", cache, "--model", "T/2", "--batch", "4",
                      "--steps", "3",
                      "--workers", "0", "--log-every", "1", "--out", str(tmp_path), "--cfg-scale", "1.5"])
    ckpt = torch.load(checkpoints_in(run)[0], weights_only=False)
    facts = ckpt["facts"]
    assert (facts["res"], facts["vae"], facts["source_dataset"]) == (RES, tiny_vae, "folder")
    assert (ckpt["args"]["res"], ckpt["args"]["vae"]) == (256, "sd-ema")  # the flags as given: their defaults
    assert facts["latent_scale"] == latents.Autoencoder(tiny_vae).scale
    out = str(tmp_path / "grid.png")
    sample.main(["--ckpt", run, "--classes", "0,1", "--seeds", "0", "--steps", "2", "--out", out])
    assert Image.open(out).size == (1 + (RES + 1), 1 + 2 * (RES + 1))  # one seed, one control; two classes
    with pytest.raises(SystemExit, match="holds"):
        train.main(["--dataset", "latents", "--data-path", cache, "--vae", "none", "--steps", "1"])


@pytest.mark.slow
def test_a_text_model_trains_on_a_cache_and_draws_its_grids_from_the_cached_captions(cache, tmp_path, capsys):
    """A cache cannot list its captions up front: they are encoded batch by batch, and the sample grids ask
    with the captions of the last batch (the folder's class names) -- the grid used to ask the cache for a
    caption list and end the run with a traceback."""
    import train
    run = train.main(["--dataset", "latents", "--data-path", cache, "--model", "T/2", "--batch", "4",
                      "--cond-type", "text", "--text-encoder", "builtin", "--steps", "2", "--sample-every",
                      "1", "--sample-steps", "2", "--workers", "0", "--out", str(tmp_path)])
    assert "cannot list its captions; encoding them batch by batch" in capsys.readouterr().out
    assert Image.open(os.path.join(run, "samples-0000001.png")).size == Image.open(
        os.path.join(run, "samples.png")).size


@pytest.mark.slow
def test_a_shapes_model_in_latent_space_is_checked_on_decoded_pixels(tiny_vae, tmp_path):
    """The checker reads pixels: a shapes run in latent space decodes its samples with its own autoencoder at
    the end-of-run evaluation (it used to decode latents as if they were pixels, and failed)."""
    import train
    run = train.main(["--vae", tiny_vae, "--model", "T/2", "--res", str(RES), "--base-res", str(RES),
                      "--batch", "4",
                      "--shapes-size", "8", "--steps", "1", "--workers", "0", "--sample-every", "-1",
                      "--eval-per-class", "1", "--sample-steps", "2", "--out", str(tmp_path)])
    with open(os.path.join(run, "eval.json")) as f:
        res = json.load(f)
    assert 0 <= res["class_acc"] <= 1 and res["per_class"] == 1
