"""End to end: training lowers the loss, resume continues exactly, DDP keeps replicas identical, sampling
works, and bad input fails fast with a message that says what to fix."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
import train
from build import SourceFacts, load_model, make_diffusion
from config import get_args
from conftest import ROOT, TINY, assert_resumed_exactly, facts_of, init_loads_every_tensor, losses
from diffusion import Sampling, generate, make_noise
from run import Process, Run, restore
from shapes import shapes_default_control


@pytest.mark.slow
def test_loss_falls(tmp_path):
    run = train.main(TINY + ["--steps", "60", "--lr", "3e-3", "--out", str(tmp_path), "--ckpt-every", "1000"])
    log = losses(run)
    first = sum(log[s] for s in range(1, 11)) / 10
    last = sum(log[s] for s in range(51, 61)) / 10
    assert last < 0.7 * first
    for f in ("ckpt-0000060.pt", "samples.png", "log.jsonl"):
        assert os.path.exists(os.path.join(run, f))


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    full = train.main(TINY + ["--steps", "8", "--ckpt-every", "4", "--keep", "5", "--out",
                              str(tmp_path / "a")])
    half = tmp_path / "b" / "run"
    half.mkdir(parents=True)
    state = torch.load(os.path.join(full, "ckpt-0000004.pt"), weights_only=False)
    assert state.pop("cuda_rng") == [None]  # a CPU run has no CUDA RNG to keep ...
    # ... and a checkpoint without the key (an older one) still resumes
    torch.save(state, half / "ckpt-0000004.pt")
    resumed = train.main(TINY + ["--steps", "8", "--resume", str(half), "--out", str(tmp_path / "b")])
    assert_resumed_exactly(full, resumed, 4, 8)


def test_checkpoint_keeps_each_ranks_cuda_rng(tmp_path, monkeypatch):
    """On a GPU the checkpoint holds the CUDA RNG state of the rank's own device next to the CPU's, and
    restore puts it back on that device; a checkpoint without it (older, or from a CPU run) restores the rest.
    Faked here: this machine may have no GPU."""
    from types import SimpleNamespace
    got, put = {"cuda:0": torch.tensor([1, 2], dtype=torch.uint8)}, []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: got[str(device)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: put.append((state, str(device))))
    model = torch.nn.Linear(2, 2)
    state = SimpleNamespace(model=model, ema=torch.nn.Linear(2, 2), opt=torch.optim.AdamW(model.parameters()),
                            gen=torch.Generator())
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    progress = train.Progress.fresh(cpu, streamed=False)
    progress.step = 3
    facts = SourceFacts(res=16, vae="none", base_res=16, source_dataset="shapes", num_classes=10)
    run = Run(str(tmp_path), None, Process(0, 1, cuda, False))
    try:
        path = run.save(state, progress, SimpleNamespace(keep=2), facts)
    finally:
        run.close()
    ckpt = torch.load(path, weights_only=False)
    assert torch.equal(ckpt["cuda_rng"][0], got["cuda:0"])
    assert torch.equal(ckpt["torch_rng"], torch.get_rng_state())
    restore(ckpt, state, train.Progress.fresh(cpu, False), Process(0, 1, cuda, False))
    assert len(put) == 1 and torch.equal(put[0][0], got["cuda:0"]) and put[0][1] == "cuda:0"
    # older; CPU run
    for old in ({k: v for k, v in ckpt.items() if k != "cuda_rng"}, dict(ckpt, cuda_rng=[None])):
        resumed = train.Progress.fresh(cpu, False)
        restore(old, state, resumed, Process(0, 1, cuda, False))
        assert resumed.step == 3 and len(put) == 1
    # a GPU checkpoint on the CPU
    restore(ckpt, state, progress, Process(0, 1, cpu, False))
    assert len(put) == 1


@pytest.mark.slow
def test_resume_refuses_another_config(tmp_path):
    run = train.main(TINY + ["--steps", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"model: checkpoint 'T/4' vs now 'T/8'"):
        train.main(TINY[:1] + ["T/8"] + TINY[2:] + ["--steps", "4", "--resume", run])


def test_bad_arguments_fail_fast(tmp_path, capsys):
    with pytest.raises(SystemExit, match="needs --data-path"):
        train.main(["--dataset", "folder"])
    with pytest.raises(SystemExit, match="divisible by patch 4"):
        train.main(TINY + ["--res", "18"])
    with pytest.raises(SystemExit, match="does not exist"):
        train.main(["--dataset", "folder", "--data-path", str(tmp_path / "nope")])
    # before any data is made
    with pytest.raises(SystemExit, match=r"--decode-layers 3: depth 2 .*--model T/4"):
        train.main(TINY + ["--arch", "mdt", "--decode-layers", "3"])
    with pytest.raises(SystemExit):
        train.main(["--cond", "no-such-route"])
    assert "invalid choice: 'no-such-route'" in capsys.readouterr().err


def image_folder(root, classes=("a", "b", "c"), per_class=6):
    """An ImageFolder tree root/<class>/<j>.jpg of random images of random sizes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            size = (int(rng.integers(16, 40)), int(rng.integers(16, 40)))
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / cls / f"{j}.jpg")
    return root


@pytest.mark.slow
def test_trains_on_an_image_folder(tmp_path):
    image_folder(tmp_path / "data")
    run = train.main(["--dataset", "folder", "--data-path", str(tmp_path / "data"), "--vae", "none",
                      "--model", "T/4",
                      "--res", "16", "--base-res", "16", "--batch", "8", "--steps", "3", "--workers", "0",
                      "--out", str(tmp_path / "runs")])
    ckpt = torch.load(os.path.join(run, "ckpt-0000003.pt"), weights_only=False)
    assert ckpt["facts"]["num_classes"] == 3 and len(losses(run)) >= 1
    assert os.path.exists(os.path.join(run, "samples.png"))


@pytest.mark.slow
def test_imagenet_is_found_at_IMAGENET_DIR_or_says_where_to_put_it(tmp_path, monkeypatch):
    """`train.py --dataset imagenet` with no --data-path: $IMAGENET_DIR, else data/imagenet/train; neither
    there fails before any work, naming every way to point at the data."""
    monkeypatch.chdir(tmp_path)  # no data/imagenet/train here
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    with pytest.raises(SystemExit) as failed:
        train.main(["--dataset", "imagenet"])
    message = str(failed.value)
    assert all(s in message for s in ("'data/imagenet/train'", "Set IMAGENET_DIR", "--data-path")), message
    monkeypatch.setenv("IMAGENET_DIR", str(image_folder(tmp_path / "imagenet", classes=("n01", "n02"))))
    run = train.main(["--dataset", "imagenet", "--vae", "none", "--model", "T/4", "--res", "16", "--base-res",
                      "16", "--batch", "8", "--steps", "1", "--workers", "0", "--sample-every", "-1", "--out",
                      str(tmp_path / "runs")])
    ckpt = torch.load(os.path.join(run, "ckpt-0000001.pt"), weights_only=False)
    assert ckpt["facts"]["data_path"] == str(tmp_path / "imagenet") and ckpt["facts"]["num_classes"] == 2
    assert ckpt["args"]["data_path"] is None  # the flag as given; the folder found is a fact


def test_data_paths_are_checked_as_each_dataset_reads_them(tmp_path):
    """A captions CSV file and a glob of shards are valid paths; an ImageNet root holding train/ and val/, a
    missing caption file and a dataset smaller than one batch are refused before a run folder exists."""
    from build import check_sources
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,a cat\n")
    shards = tmp_path / "shards" / "*.tar"
    for dataset, path in (("captions", tmp_path / "pairs.csv"), ("webdataset", shards)):
        # does not raise
        check_sources(get_args(["--dataset", dataset, "--data-path", str(path), "--vae", "none"]))
    with pytest.raises(SystemExit, match="no such folder or CSV file"):
        check_sources(get_args(["--dataset", "captions", "--data-path", str(tmp_path / "missing.csv"),
                                "--vae", "none"]))
    for split in ("train", "val"):
        image_folder(tmp_path / "imagenet" / split, classes=("n01", "n02"), per_class=1)
    runs = tmp_path / "runs"
    tiny = ["--vae", "none", "--model", "T/4", "--res", "16", "--base-res", "16", "--workers", "0", "--out",
            str(runs)]
    with pytest.raises(SystemExit, match="name splits, not classes") as stopped:
        train.main(["--dataset", "imagenet", "--data-path", str(tmp_path / "imagenet"), *tiny])
    assert os.path.join(str(tmp_path / "imagenet"), "train") in str(stopped.value)
    with pytest.raises(SystemExit, match="smaller than one batch"):
        train.main(["--dataset", "folder", "--data-path", str(tmp_path / "imagenet" / "val"), "--batch", "8",
                    *tiny])
    assert not runs.exists() or not os.listdir(runs)  # nothing left behind to shift the next run's number


def test_resume_auto_goes_with_init_from_and_a_named_resume_does_not(tmp_path):
    ckpt = tmp_path / "base.pt"
    ckpt.write_bytes(b"")  # check_sources only looks for the file
    args = get_args(TINY + ["--init-from", str(ckpt), "--resume", "auto", "--out", str(tmp_path / "runs")])
    from build import check_sources
    from config import validate
    validate(args)  # the README's fine-tune: the same command starts from --init-from, then continues
    check_sources(args)
    args.resume = str(tmp_path / "runs" / "000-run")
    with pytest.raises(SystemExit, match="give one"):
        validate(args)


@pytest.mark.slow
def test_torchrun_two_processes_keep_replicas_identical(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "train.py"] + TINY + ["--steps", "6", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    with open(os.path.join(run, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert records[-1]["replicas_identical"] is True


@pytest.mark.slow
def test_sampling_from_a_checkpoint(tmp_path):
    run = train.main(TINY + ["--steps", "3", "--out", str(tmp_path)])
    trained = load_model(run, "cpu")
    model, args, facts = trained.model, trained.args, trained.facts
    noise = make_noise([0, 1], (3, 16, 16), "cpu")
    y = torch.tensor([0, 1])
    ctrl = torch.stack([shapes_default_control(16)] * 2)
    diffusion = make_diffusion(args, facts)
    x = generate(model, diffusion, noise, y, ctrl, Sampling(steps=4, scale=2.0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    again = generate(model, diffusion, noise, y, ctrl, Sampling(steps=4, scale=2.0))
    assert torch.equal(x, again)
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", run, "--classes", "0,6", "--flip", "0,1", "--cfg-scale", "1,3", "--seeds", "0,1",
                 "--steps", "3", "--out", str(out)])
    from PIL import Image
    img = Image.open(out)
    assert img.size == (1 + 8 * 17, 1 + 2 * 17)  # 2 scales x 2 flips x 2 seeds columns, 2 rows, 1 px padding
    res = sample.main(["--ckpt", run, "--eval-per-class", "1", "--steps", "3"])
    # a 3-step model: the figures mean nothing
    assert set(res) == {"class_acc", "flip_acc", "mirrored", "crop_err"}
    assert all(isinstance(v, float) for v in res.values())


@pytest.mark.slow
def test_resolution_transfer_loads_every_tensor_and_resamples_positions(tmp_path, capsys):
    """16 -> 32 px (4x the tokens): every tensor loads (the positional embedding is not a parameter: it is
    recomputed on the larger grid, resampled so its even positions are the base grid's), and the noise shift
    doubles."""
    run = train.main(TINY + ["--steps", "2", "--out", str(tmp_path / "a")])
    ckpt = os.path.join(run, "ckpt-0000002.pt")
    big, facts, model = init_loads_every_tensor(TINY + ["--res", "32"], ckpt, ckpt)
    base, grid = model.pos_embed(4, 4, "cpu"), model.pos_embed(8, 8, "cpu").view(8, 8, -1)
    assert torch.allclose(grid[::2, ::2].reshape(16, -1), base, atol=1e-6)
    small = get_args(TINY)
    assert make_diffusion(big, facts).alpha == 2 * make_diffusion(small, facts_of(small)).alpha
    unshifted = get_args(TINY + ["--res", "32", "--res-shift", "off"])
    assert make_diffusion(unshifted, facts).alpha == make_diffusion(small, facts_of(small)).alpha
    # the same through train.main: it fine-tunes and says what adapted
    train.main(TINY + ["--res", "32", "--init-from", ckpt, "--steps", "2", "--out", str(tmp_path / "b")])
    said = capsys.readouterr().out
    assert "positional embedding `resample` from the 16 px base grid, noise shift alpha 6" in said
