"""
What the checkpoint checksum costs: an XL/2-sized training checkpoint (weights, EMA and both AdamW moments, as
train.py writes them) saved, CRC-checked (checkpoint.damaged_record, what read_checkpoint runs before it
loads) and loaded, each timed once on this machine.

    python -m experiments.checkpoint_cost                         # DiT-XL/2 (--cond adaln), about 11 GB
    python -m experiments.checkpoint_cost --cond ours --dir /scratch   # ours at XL/2, about 21 GB

The tensors are random (their values do not change the cost); the file goes under --dir and is removed after.
"""
import argparse
import os
import tempfile
import time

import torch

from build import SourceFacts, make_model
from checkpoint import damaged_record, write_checkpoint
from checks import check_output
from config import get_args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cond", default="adaln", help="the route of the XL/2 model whose shapes are used")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the file is written (and removed)")
    options = p.parse_args(argv)
    check_output(options.dir, "folder", flag="--dir")
    args = get_args(["--dataset", "imagenet", "--model", "XL/2", "--res", "256", "--cond", options.cond])
    facts = SourceFacts(res=256, vae=args.vae, base_res=256, source_dataset="imagenet", num_classes=1000)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in make_model(args, facts).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = lambda: {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    moments = lambda: {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn(s, generator=g),
                           "exp_avg_sq": torch.rand(s, generator=g)} for i, s in enumerate(shapes.values())}
    state = dict(model=weights(), ema=weights(), opt=dict(state=moments(), param_groups=[]), step=1)
    gib = 4 * sum(s.numel() for s in shapes.values()) * 4 / 2 ** 30
    path = os.path.join(options.dir, "checkpoint-cost.pt")
    try:
        t0 = time.perf_counter()
        write_checkpoint(path, state)
        saved = time.perf_counter() - t0
        size = os.path.getsize(path) / 2 ** 30
        del state  # room for the load
        t0 = time.perf_counter()
        assert damaged_record(path) is None
        checked = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=True)
        loaded = time.perf_counter() - t0
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"XL/2 --cond {options.cond}: {sum(s.numel() for s in shapes.values()) / 1e6:.1f} M parameters, a "
          f"training checkpoint of {size:.2f} GiB ({gib:.2f} GiB of tensors); save {saved:.1f} s (fsync "
          f"included), CRC check {checked:.1f} s ({checked / size:.2f} s/GiB), load {loaded:.1f} s; the "
          f"check costs {100 * checked / saved:.0f} % of a save and {100 * checked / loaded:.0f} % of a "
          f"load, and nothing at save time (torch.save computes the CRCs as it writes)")


if __name__ == "__main__":
    main()
