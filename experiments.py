"""
Small-scale experiments on the embedded `shapes` dataset: every variant trained with the same budget and seeds by
train.py, then measured the same way. Tables (Markdown + JSON) are written under docs/experiments/, so every figure
in the README comes from a run of this script, never from typing.

    python experiments.py transfer                      # 32 -> 64 px: resample vs extend vs no shift vs from scratch
    python experiments.py transfer --seeds 0,1,2 --base-steps 1500 --ft-steps 300

A finished run is not trained again (its run folder under --out is reused), so an interrupted experiment continues
where it stopped; delete the folder to redo a run.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import train
from data import Autoencoder, build_dataset
from diffusion import to_velocity

#################################################################################
#                                 Running variants                              #
#################################################################################


def run(name, argv, out):
    """Train `argv` into out/name (once); return the run folder."""
    folder = os.path.join(out, name)
    done = os.path.join(folder, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["run_dir"]
    t0 = time.time()
    run_dir = train.main(argv + ["--out", folder])
    with open(done, "w") as f:
        json.dump(dict(run_dir=run_dir, wall_s=time.time() - t0, argv=argv), f)
    return run_dir


def last_ckpt(run_dir):
    return train.checkpoints_in(run_dir)[0]


def train_losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@torch.no_grad()
def heldout_loss(run_dir, n=256, levels=8, seed=999):
    """The velocity loss of the final weights (not the EMA: the fine-tuning runs are too short for an EMA of 0.999 to
    forget its start) on n images of a dataset the run never saw, at `levels` fixed noise levels t = (i + 0.5) / levels
    with fixed noise: the same inputs for every variant, so differences are the models'."""
    ckpt = torch.load(last_ckpt(run_dir), map_location="cpu", weights_only=False)
    args = argparse.Namespace(**ckpt["args"])
    model = train.make_model(args)
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = build_dataset("shapes", args.res, seed=seed, size=n)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, n, 64):
        items = [data[i] for i in range(start, min(start + 64, n))]
        x0 = Autoencoder("none").encode(torch.stack([it[0] for it in items]))
        y = torch.tensor([it[1] for it in items])
        ctrl = torch.stack([it[2] for it in items])
        for i in range(levels):
            t = torch.full((len(items),), (i + 0.5) / levels)
            noise = torch.randn(x0.shape, generator=g)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            pred = to_velocity(model(x_t, t, y, ctrl), x_t, t, args.pred)
            total += ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).sum().item()
    return total / (n * levels)


def write_table(name, rows, columns, note):
    """rows: list of dicts. Writes docs/experiments/NAME.json and NAME.md; returns the Markdown."""
    os.makedirs(os.path.join("docs", "experiments"), exist_ok=True)
    with open(os.path.join("docs", "experiments", f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for r in rows:
        md += "| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.4f}" for c in columns) + " |\n"
    md += "\n" + note + "\n"
    with open(os.path.join("docs", "experiments", f"{name}.md"), "w") as f:
        f.write(md)
    return md


def mean_spread(values):
    v = np.array(values, dtype=np.float64)
    return f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v.mean():.4f}"


#################################################################################
#                       32 -> 64 px resolution transfer                         #
#################################################################################

TRANSFER = {  # variant -> flags of the 64 px stage (all from the same 32 px model, except scratch); the shift ablation
    # (--res-shift off) belongs with the other comparisons of the paper's claims
    "resample + shift (paper)": ["--pos-mode", "resample"],
    "extend + shift": ["--pos-mode", "extend"],
    "from scratch (resample + shift)": ["--pos-mode", "resample"],
}


def transfer(a):
    common = ["--dataset", "shapes", "--eval-per-class", "0", "--base-res", "32", "--ckpt-every", "100000",
              "--shapes-size", str(a.shapes_size)]
    rows, t0 = [], time.time()
    results = {v: [] for v in TRANSFER}
    for seed in a.seeds:
        base = run(f"transfer/base-32px-s{seed}", common + ["--res", "32", "--steps", str(a.base_steps),
                                                            "--seed", str(seed)], a.out)
        for variant, flags in TRANSFER.items():
            init = [] if variant.startswith("from scratch") else ["--init-from", last_ckpt(base)]
            tag = variant.split(" (")[0].replace(" + ", "-").replace(", ", "-").replace(" ", "-")
            ft = run(f"transfer/ft-64px-{tag}-s{seed}", common + ["--res", "64", "--steps", str(a.ft_steps),
                                                                 "--warmup", str(a.ft_warmup), "--seed", str(seed)]
                     + flags + init, a.out)
            log = train_losses(ft)  # each entry: the mean over the --log-every (50) steps before it
            results[variant].append(dict(seed=seed, heldout=heldout_loss(ft), train_last=log[max(log)],
                                         train_first=log[min(log)]))
    for variant, rs in results.items():
        rows.append({"variant": variant, "held-out loss": mean_spread([r["heldout"] for r in rs]),
                     "train loss, last 50 steps": mean_spread([r["train_last"] for r in rs]),
                     "train loss, first 50 steps": mean_spread([r["train_first"] for r in rs])})
    note = (f"`python experiments.py transfer --seeds {','.join(map(str, a.seeds))} --base-steps {a.base_steps} "
            f"--ft-steps {a.ft_steps} --shapes-size {a.shapes_size}`: shapes preset (XS/4, pixel space, "
            f"x-prediction, shift 3 at the 32 px base), "
            f"{a.base_steps} steps at 32 px, then {a.ft_steps} steps at 64 px (4x the tokens) per variant with the "
            f"same seed and data order. Held-out loss: final weights, 256 unseen images x 8 fixed noise levels with "
            f"fixed noise. Mean ± std over seeds {a.seeds}. Wall time {time.time() - t0:.0f} s on {device_name()}.")
    print(write_table("transfer", rows, list(rows[0]), note))


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("transfer",))
    p.add_argument("--seeds", default="0", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--base-steps", type=int, default=1000, help="transfer: steps at 32 px")
    p.add_argument("--ft-steps", type=int, default=200, help="transfer: steps at 64 px")
    p.add_argument("--ft-warmup", type=int, default=20, help="transfer: warm-up steps at 64 px")
    p.add_argument("--shapes-size", type=int, default=4000, help="distinct training images")
    p.add_argument("--out", default=os.path.join("runs", "experiments"))
    a = p.parse_args(argv)
    {"transfer": transfer}[a.experiment](a)


if __name__ == "__main__":
    main()
