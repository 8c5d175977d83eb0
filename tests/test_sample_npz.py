"""sample.py --num-samples: an ADM-style .npz with the requested labels and a JSON of its settings, and the
same file from two ranks as from one."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import checks
import fid
import sample
import train
from checkpoint import WriteFailed
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # every test here samples from a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train.main(TINY + ["--steps", "2"] + ["--out", str(tmp_path_factory.mktemp("runs"))])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A text model (noisy_replicate padding) whose every weight is shaken, so that its padding noise shows in
    the pixels (after a step or two of training it would not)."""
    from build import load_model
    from checkpoint import checkpoints_in
    run = train.main(TINY + ["--cond-type", "text", "--steps", "1", "--sample-every", "-1", "--out",
                             str(tmp_path_factory.mktemp("text"))])
    (path,) = checkpoints_in(run)
    model = load_model(run, "cpu").model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = torch.load(path, weights_only=False)
    ckpt["ema"] = model.state_dict()
    torch.save(ckpt, path)
    return run


def npz_args(run, out, *extra):
    return ["--ckpt", run, "--num-samples", "7", "--steps", "2", "--batch", "3", "--cfg-scale", "2", "--flip",
            "1", "--seed", "5", "--out", str(out), *extra]


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
    assert {k: settings[k] for k in ("num_samples", "labels", "seed", "sampler", "steps", "cfg_scale",
                                     "ctrl_scale", "interval", "precision", "vae")} == dict(
        num_samples=7, labels="equal", seed=5, sampler="euler", steps=2, cfg_scale=2.0, ctrl_scale=0.0,
        interval=[0.0, 1.0], precision="fp32", vae="none")
    assert settings["control"]["flip"] == 1.0
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # the per-rank parts are gone
    _, images = fid.open_input(out)  # what fid.py reads back: the same pixels, channels first
    assert len(images) == 7 and all(torch.equal(images[i],
                                                torch.from_numpy(arr[i]).permute(2, 0, 1)) for i in range(7))
    again = sample.main(npz_args(run, tmp_path / "r.npz", "--labels", "random"))
    with np.load(again) as z:
        labels = z["labels"]
    assert labels.tolist() == sample.fid_labels(7, 10, "random", 5).tolist()  # drawn from --seed, recorded
    assert labels.min() >= 0 and labels.max() < 10 and labels.tolist() != [0, 1, 2, 4, 5, 7, 8]


def test_npz_makes_its_folder_names_its_settings_and_a_failed_write_loses_nothing(run, tmp_path, monkeypatch):
    out = sample.main(npz_args(run, tmp_path / "new" / "deeper" / "s.npz"))  # a folder that is not there yet
    assert os.path.isfile(out) and os.path.isfile(tmp_path / "new" / "deeper" / "s.json")
    args = npz_args(run, "unused", "--ctrl-scale", "1.5", "--interval", "0.20, 1.0")
    named = sample.main(args[:args.index("--out")] + args[args.index("--out") + 2:])  # the default name
    # --batch changes no sample (each has its own seeds), so it is not in the name
    assert os.path.basename(named) == "samples-7-cfg2-euler2-flip1-ctrl1.5-interval0.2-1-seed5.npz"
    os.remove(named)  # keep the run folder as the other tests expect it
    os.remove(named[:-len(".npz")] + ".json")
    # an earlier run's pair under this name
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((1, 16, 16, 3), np.uint8))
    (tmp_path / "f.json").write_text('{"cfg_scale": 9}')
    real_savez = np.savez
    def full_disk(f, **arrays):
        if "labels" in arrays:  # the assembled file: the disk is full
            raise OSError(28, "No space left on device")
        real_savez(f, **arrays)
    monkeypatch.setattr(sample.np, "savez", full_disk)
    tag = checks.job_tag()  # this process's: the parts and the assembled file are named for the job
    with pytest.raises(WriteFailed, match=rf"f\.npz\.{re.escape(tag)}\.new: no space left on the device.*"
                       "Nothing half-written"):
        sample.main(npz_args(run, tmp_path / "f.npz"))
    with np.load(tmp_path / "f.npz") as z:  # the earlier pair as it was, no partial file beside it
        assert len(z["arr_0"]) == 1
    assert json.loads((tmp_path / "f.json").read_text()) == {"cfg_scale": 9}
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".new"))]
    with np.load(tmp_path / f"f.{tag}.rank0.npz") as z:  # every sample is still on disk
        assert z["arr_0"].shape == (7, 16, 16, 3) and sorted(z["index"].tolist()) == list(range(7))


def test_prompts_are_refused_with_num_samples(run, tmp_path):
    with pytest.raises(SystemExit, match="--prompt"):
        sample.main(npz_args(run, tmp_path / "p.npz", "--prompt", "a red circle"))


@pytest.mark.parametrize("mode", ["grid", "eval"])
def test_ctrl_scale_and_interval_reach_the_sampler(run, tmp_path, monkeypatch, mode):
    import diffusion
    import shapes
    seen = []
    def spy(*args, **kwargs):
        sampling = args[5] if len(args) > 5 else kwargs["sampling"]
        seen.append((sampling.ctrl, sampling.interval))
        return diffusion.generate(*args, **kwargs)
    monkeypatch.setattr(sample, "generate", spy)
    monkeypatch.setattr(shapes, "generate", spy)
    what = ["--out", str(tmp_path / "g.png")] if mode == "grid" else ["--eval-per-class", "1"]
    sample.main(["--ckpt", run, "--steps", "2", "--seeds", "1", "--ctrl-scale", "2", "--interval", "0.1,0.9",
                 *what])
    assert seen and all(s == (2.0, (0.1, 0.9)) for s in seen), seen


def test_two_ranks_write_the_same_npz_as_one(run, tmp_path):
    one = sample.main(npz_args(run, tmp_path / "one.npz"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29612",
           "sample.py", *npz_args(run, tmp_path / "two.npz")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(one) as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["arr_0"], b["arr_0"])
    with open(tmp_path / "two.json") as f:
        assert json.load(f)["world_size"] == 2


def test_a_text_model_gives_the_same_npz_again_and_from_two_ranks(text_run, tmp_path):
    """The padding noise of a prompt is its sample's own (seeded by the sample's seed): neither the global RNG
    nor the split over ranks changes a pixel."""
    threads = torch.get_num_threads()
    # as each rank runs: this shaken model's pixels also feel the last bits of a matmul
    torch.set_num_threads(1)
    try:
        one = sample.main(npz_args(text_run, tmp_path / "one.npz"))
        torch.manual_seed(123)  # other use of the global RNG in between
        torch.randn(1000)
        again = sample.main(npz_args(text_run, tmp_path / "again.npz"))
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613",
           "sample.py", *npz_args(text_run, tmp_path / "two.npz")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(one) as a, np.load(again) as b, np.load(tmp_path / "two.npz") as c:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_0"], c["arr_0"])


def test_a_text_models_prompt_of_each_sample_does_not_depend_on_the_batch(text_run, tmp_path, monkeypatch):
    """Sample i asks with its class's shape in colour i % 8, whichever batch it falls in (it used to take the
    colour from its place in the batch, so --batch changed the prompts)."""
    from shapes import COLOUR_NAMES
    asked, real = [], sample.semantic_input

    def recording(args, facts, labels, device, prompts=None):
        asked.extend(prompts)
        return real(args, facts, labels, device, prompts)
    monkeypatch.setattr(sample, "semantic_input", recording)
    by_batch = {}
    for batch in ("3", "7"):
        args = npz_args(text_run, tmp_path / f"b{batch}.npz")
        args[args.index("--batch") + 1] = batch
        asked.clear()
        sample.main(args)
        by_batch[batch] = list(asked)
    assert by_batch["3"] == by_batch["7"] and len(by_batch["7"]) == 7
    assert [p.split()[1] for p in by_batch["7"]] == [COLOUR_NAMES[i % len(COLOUR_NAMES)] for i in range(7)]
