"""What the tests share: the project on the import path, torch kept to the two cores CI has, the `slow`
marker, the tiny training flags and log readers, tiny models with live conditioning paths, and a NaN-injecting
loss.

`python -m pytest -q -m "not slow" tests` is the fast inner loop (no training runs, subprocesses or torchrun);
CI runs everything."""
import io
import json
import os
import sys
import tarfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))

from conditioning import make_control  # noqa: E402  (importable only once ROOT is on the path)
from diffusion import Diffusion  # noqa: E402
from mdt import MDTv2  # noqa: E402
from model import build_model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, samples through a CLI, or starts processes (deselect "
                                       "with -m 'not slow')")


#################################################################################
#                           Tiny training runs                                  #
#################################################################################

# train.py flags for a run of a few seconds: a 2-block model at 16 px on 256 shapes images, a log line every
# step
TINY = ["--model", "T/4", "--res", "16", "--base-res", "16", "--shapes-size", "256", "--batch", "16",
        "--eval-per-class", "0", "--log-every", "1", "--warmup", "5"]


def records(run_dir):
    """Every line of a run's log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    """{step: loss} from a run's log."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def nan_loss(steps, real=Diffusion.loss):
    """Diffusion.loss, but NaN at these steps (1-based: one loss per training step), as a diverging run's
    would be; patched in by a test (or by a wrapper script for a subprocess) in place of Diffusion.loss."""
    calls = []

    def loss(self, *args, **kwargs):
        calls.append(None)
        out = real(self, *args, **kwargs)
        return out * float("nan") if len(calls) in steps else out
    return loss


#################################################################################
#                               Tiny models                                     #
#################################################################################

def tiny_model(cond="ours", arch="dit", **kw):
    """A 16 px, 10-class transformer: T/4, or the smallest mDT (one encoder block per half, two decoder
    blocks, the side block)."""
    kw = dict(dict(input_size=16, in_channels=3, num_classes=10), **kw)
    if arch == "mdt":
        return MDTv2(patch=4, depth=4, width=64, heads=2, cond=cond, **kw)
    return build_model("T/4", cond=cond, **kw)


def perturb(model, std=0.05):
    """Give every zero-initialised layer random weights, so conditioning paths are live."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def model_inputs(b=3, res=16):
    """(x, t, y, ctrl) for tiny_model: flip alternating over the batch."""
    ctrl = torch.stack([make_control(16, 16, 0, 0, i % 2, res) for i in range(b)])
    return torch.randn(b, 3, res, res), torch.rand(b), torch.randint(0, 10, (b,)), ctrl


#################################################################################
#                    Files and processes the tests make                         #
#################################################################################

def write_shard(path, samples):
    """A webdataset .tar shard. samples: (key, {extension: bytes}) in tar order."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def wait_for(predicate, timeout=120):
    """Poll `predicate` until it is true (for another process's progress); TimeoutError after `timeout` s."""
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


#################################################################################
#                    A DiT-shaped state dict (facebookresearch/DiT)             #
#################################################################################

def dit_pos_embed(dim, grid):
    """MAE / DiT 2-D sin-cos: the first half of the channels encodes the column (w) index, the second the
    row."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return torch.from_numpy(np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)).float()[None]


def random_dit_state_dict(depth=2, width=64, patch=2, channels=4, classes=10, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    D = width
    sd = {"x_embedder.proj.weight": r(D, channels, patch, patch), "x_embedder.proj.bias": r(D),
          "pos_embed": dit_pos_embed(D, grid), "t_embedder.mlp.0.weight": r(D, 256),
          "t_embedder.mlp.0.bias": r(D), "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(classes + 1, D),
          "final_layer.linear.weight": r(patch * patch * 2 * channels, D),
          "final_layer.linear.bias": r(patch * patch * 2 * channels),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D),
          "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    for i in range(depth):
        for name, shape in [("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("mlp.fc1", (4 * D, D)),
                            ("mlp.fc2", (D, 4 * D)), ("adaLN_modulation.1", (6 * D, D))]:
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = r(*shape), r(shape[0])
    return sd


def facts_of(args, num_classes=10, text_dim=None, text_len=None, **kw):
    """The SourceFacts train.py would learn for `args` from a dataset of `num_classes` classes (and a text
    encoder of this width and length), without opening any file: the flags' res, vae and base res."""
    from build import SourceFacts
    return SourceFacts(res=args.res, vae=args.vae, base_res=args.base_res or args.res,
                       source_dataset=args.dataset, num_classes=num_classes, text_dim=text_dim,
                       text_len=text_len, **kw)


def init_loads_every_tensor(flags, source, reference):
    """Build the model of train.py `flags + --init-from source`, load it as --init-from does, and check that
    every tensor loaded and equals the EMA weights of the checkpoint `reference`. Returns (args, facts,
    model)."""
    from build import make_model, read_source_facts
    from checkpoint import init_from, read_checkpoint
    from config import get_args
    args = get_args(flags + ["--init-from", source])

    class TenClasses:  # what read_source_facts reads off a dataset
        num_classes = 10
    facts = read_source_facts(args, TenClasses())
    model = make_model(args, facts)
    loaded, skipped, new = init_from(model, source)
    assert not skipped and not new and len(loaded) == len(model.state_dict())
    src = read_checkpoint(reference)["ema"]
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in src)
    return args, facts, model


def train_and_resume(flags, tmp_path, steps=8, half=4):
    """train.main(flags) for `steps` steps with a checkpoint every `half`, then the same command resumed from
    a copy of its step-`half` checkpoint in a folder of its own -> (the uninterrupted run, the resumed
    run)."""
    import shutil

    import train
    flags = flags + ["--ckpt-every", str(half), "--keep", "5", "--steps", str(steps)]
    full = train.main(flags + ["--out", str(tmp_path / "a")])
    copy = tmp_path / "b" / "run"
    copy.mkdir(parents=True)
    shutil.copy(os.path.join(full, f"ckpt-{half:07d}.pt"), copy)
    return full, train.main(flags + ["--resume", str(copy), "--out", str(tmp_path / "b")])


def assert_resumed_exactly(full, resumed, start, stop):
    """A run resumed at step `start` logged the same losses as the uninterrupted run `full` for steps
    start+1..stop, and ended with the same EMA weights."""
    from checkpoint import read_checkpoint
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(start + 1, stop + 1))
    assert all(a[s] == b[s] for s in b), (a, b)
    name = f"ckpt-{stop:07d}.pt"
    sa, sb = (read_checkpoint(os.path.join(run, name))["ema"] for run in (full, resumed))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
