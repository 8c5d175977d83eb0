"""sample.py --num-samples: an ADM-style .npz with the requested labels and a JSON of its settings, and the same
file from two ranks as from one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY

import fid
import sample
import train

pytestmark = pytest.mark.slow  # every test here samples from a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train.main(TINY + ["--steps", "2"] + ["--out", str(tmp_path_factory.mktemp("runs"))])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A text model (noisy_replicate padding) whose every weight is shaken, so that its padding noise shows in the
    pixels (after a step or two of training it would not)."""
    from checkpoint import checkpoints_in
    from sample import load_model
    run = train.main(TINY + ["--cond-type", "text", "--steps", "1", "--sample-every", "-1", "--out",
                             str(tmp_path_factory.mktemp("text"))])
    (path,) = checkpoints_in(run)
    model, _ = load_model(run, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = torch.load(path, weights_only=False)
    ckpt["ema"] = model.state_dict()
    torch.save(ckpt, path)
    return run


def npz_args(run, out, *extra):
    return ["--ckpt", run, "--num-samples", "7", "--steps", "2", "--batch", "3", "--cfg-scale", "2", "--flip", "1",
            "--seed", "5", "--out", str(out), *extra]


def test_npz_holds_images_labels_and_settings(run, tmp_path):
    out = sample.main(npz_args(run, tmp_path / "s.npz"))
    with np.load(out) as z:
        assert set(z.files) == {"arr_0", "labels"}
        assert z["arr_0"].shape == (7, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert z["labels"].tolist() == [0, 1, 2, 4, 5, 7, 8]  # `equal`: 10 classes over 7 samples, in order
        arr = z["arr_0"]
    with open(tmp_path / "s.json") as f:
        settings = json.load(f)
    assert settings["ckpt"].endswith(".pt") and settings["ckpt_step"] == 2
    assert {k: settings[k] for k in ("num_samples", "labels", "seed", "sampler", "steps", "cfg_scale", "ctrl_scale",
                                     "interval", "precision", "vae")} == dict(
        num_samples=7, labels="equal", seed=5, sampler="euler", steps=2, cfg_scale=2.0, ctrl_scale=0.0,
        interval=[0.0, 1.0], precision="fp32", vae="none")
    assert settings["control"]["flip"] == 1.0
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # the per-rank parts are gone
    _, images = fid.open_input(out)  # what fid.py reads back: the same pixels, channels first
    assert len(images) == 7 and all(torch.equal(images[i], torch.from_numpy(arr[i]).permute(2, 0, 1)) for i in range(7))
    again = sample.main(npz_args(run, tmp_path / "r.npz", "--labels", "random"))
    with np.load(again) as z:
        labels = z["labels"]
    assert labels.tolist() == sample.fid_labels(7, 10, "random", 5).tolist()  # drawn from --seed, recorded
    assert labels.min() >= 0 and labels.max() < 10 and labels.tolist() != [0, 1, 2, 4, 5, 7, 8]


def test_two_ranks_write_the_same_npz_as_one(run, tmp_path):
    one = sample.main(npz_args(run, tmp_path / "one.npz"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29612", "sample.py",
           *npz_args(run, tmp_path / "two.npz")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(one) as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["arr_0"], b["arr_0"])
    with open(tmp_path / "two.json") as f:
        assert json.load(f)["world_size"] == 2


def test_a_text_model_gives_the_same_npz_again_and_from_two_ranks(text_run, tmp_path):
    """The padding noise of a prompt is its sample's own (seeded by the sample's seed): neither the global RNG nor
    the split over ranks changes a pixel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: this shaken model's pixels also feel the last bits of a matmul
    try:
        one = sample.main(npz_args(text_run, tmp_path / "one.npz"))
        torch.manual_seed(123)  # other use of the global RNG in between
        torch.randn(1000)
        again = sample.main(npz_args(text_run, tmp_path / "again.npz"))
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613", "sample.py",
           *npz_args(text_run, tmp_path / "two.npz")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(one) as a, np.load(again) as b, np.load(tmp_path / "two.npz") as c:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_0"], c["arr_0"])
