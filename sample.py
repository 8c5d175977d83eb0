"""
Sample from a checkpoint's EMA weights.

    python sample.py --ckpt runs/000-shapes-XS-4-ours --classes 0,6,7 --flip 0,1 --cfg-scale 1,3
    python sample.py --ckpt runs/000-shapes-XS-4-ours --eval-per-class 50      # the checker's accuracies (shapes)
    python sample.py --ckpt runs/000-shapes-XS-4-ours --export model.safetensors  # EMA weights + config, to share
    torchrun --nproc_per_node=8 sample.py --ckpt runs/001-imagenet-XL-2-ours --num-samples 50000 --cfg-scale 1.5
                                                                        # an .npz (+ .json of settings) for fid.py

A grid has one row per class and one column per (guidance scale, control variant, seed); the same noise is reused
across rows and control variants, so a column-to-column change is caused by the condition alone. The sampler is
diffusion.generate, the checker's evaluation shapes.evaluate_shapes, the files themselves are read by checkpoint.py.
"""
import argparse
import itertools
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch

from checkpoint import (CONFIG_VERSION, atomic_write, checkpoint_weights, dit_resolution, export_safetensors,
                        find_checkpoint, load_weights)
from conditioning import CONTROL_SIGNALS, SIGNAL
from config import get_args, latent_shape, make_diffusion, make_model, use_bf16
from data import default_control, setup_distributed
from diffusion import SAMPLERS, generate, make_noise, spaced_steps
from latents import Autoencoder, latent_geometry, to_uint8
from model import SIZES, from_dit, is_dit_state_dict
from shapes import evaluate_shapes, semantic_input


#################################################################################
#                                 Sample grids                                  #
#################################################################################


def take(y, idx):
    """Rows idx of labels or of a prompt's (features, mask)."""
    return tuple(v[idx] for v in y) if isinstance(y, tuple) else y[idx]


def class_grid(model, vae, args, path, device, classes=None, seeds=(0, 1, 2, 3), controls=None, cfg_scales=None,
               cfg_scale=1.0, steps=50, method=None, progress=False, prompts=None, ctrl_scale=0.0, interval=(0.0, 1.0)):
    """Save a PNG grid: rows = classes (or prompts, for a text model), columns = guidance scale x control variant x
    seed; ctrl_scale and interval go to the sampler (generate)."""
    from torchvision.utils import save_image
    was_training = model.training
    model.eval()
    classes = list(range(min(args.num_classes, 10))) if classes is None else classes
    rows = prompts if prompts else classes
    base = default_control(args.source_dataset, args.res)
    if controls is None:  # show the flip: it is the control whose effect is easiest to see
        controls = [base.clone(), base.clone()]
        controls[1][SIGNAL["flip"]] = 1.0
    cfg_scales = cfg_scales or [cfg_scale]
    cols = list(itertools.product(cfg_scales, range(len(controls)), seeds))
    noise = make_noise([s for _, _, s in cols], latent_shape(args), device).repeat(len(rows), 1, 1, 1)
    seeds = [s for _, _, s in cols] * len(rows)  # each cell's noise seed: it seeds a prompt's padding noise too
    if prompts:
        y = semantic_input(args, [0] * len(rows) * len(cols), device, [p for p in prompts for _ in cols])
    else:
        y = semantic_input(args, [c for c in classes for _ in cols], device)
    ctrl = torch.stack([controls[k] for _ in rows for _, k, _ in cols]).to(device)
    imgs = []
    for g in cfg_scales:  # guidance scale is a scalar per call: group the columns by it
        sel = torch.tensor([i for i, (gi, _, _) in enumerate(cols * len(rows)) if gi == g], device=device)
        imgs.append((sel, generate(model, make_diffusion(args), noise[sel], take(y, sel), ctrl[sel], g, ctrl_scale,
                                   steps=steps, method=method, interval=interval, progress=progress,
                                   seeds=[seeds[i] for i in sel.tolist()])))
    lat = torch.empty_like(noise)
    for sel, x in imgs:
        lat[sel] = x
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(vae.decode(lat), path, nrow=len(cols), padding=1, pad_value=1.0)
    model.train(was_training)
    return path


#################################################################################
#                        Large-scale sampling for FID                           #
#################################################################################
# One .npz in the ADM evaluation suite's format (uint8 N x H x W x 3 under arr_0, class labels under `labels`) and a
# JSON of every setting that made it, so that `fid.py REF samples.npz` can print them next to the number.

def fid_labels(n, num_classes, mode, seed):
    """Labels of samples 0..n-1: `equal` gives class k the consecutive block of about n / num_classes samples
    (exactly 50 each for 50k ImageNet samples), `random` draws them uniformly from `seed`."""
    if mode == "equal":
        return np.arange(n) * num_classes // n
    if mode == "random":
        return np.random.default_rng(seed).integers(0, num_classes, n)
    raise ValueError(f"unknown label mode {mode!r}; choose 'equal' or 'random'")


@torch.no_grad()
def sample_npz(model, vae, args, path, num_samples, control, labels="equal", seed=0, batch=64, cfg_scale=1.0,
               ctrl_scale=0.0, interval=(0.0, 1.0), steps=50, method=None, bf16=False, rank=0, world=1,
               record=None):
    """Write `num_samples` images to `path` (.npz) and their settings, with `record` added, to the same path .json.

    Sample i starts from the noise of seed `seed + i`, and global batch b (samples b * batch ...) is drawn by rank
    b % world: every image comes out of the same computation whatever the number of ranks (the ancestral sampler's
    fresh noise is seeded per batch, so it too; a text model's padding noise is seeded per sample, from seed + i).
    Each rank saves its batches to a part file next to `path` (so `path` must be on a file system every rank sees);
    rank 0 assembles them in order, holding N x H x W x 3 bytes (10 GB for 50k at 256 px), writes `path` and its
    .json atomically (a full disk or a kill leaves the parts, never a partial file under the name), then removes the
    parts.
    """
    from tqdm import tqdm
    device = next(model.parameters()).device
    diffusion = make_diffusion(args)
    method = method or SAMPLERS[args.objective][0]
    y_all = fid_labels(num_samples, args.num_classes, labels, seed)
    mine = range(rank * batch, num_samples, world * batch)
    images, index = [np.zeros((0, args.res, args.res, 3), np.uint8)], [np.zeros(0, np.int64)]  # a rank may get none
    for start in tqdm(mine, desc="sampling", disable=rank != 0, dynamic_ncols=True):
        idx = np.arange(start, min(start + batch, num_samples))
        noise = make_noise(seed + idx, latent_shape(args), device)
        ctrl = control.to(device).expand(len(idx), -1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = generate(model, diffusion, noise, semantic_input(args, y_all[idx], device), ctrl, cfg_scale,
                         ctrl_scale, steps=steps, method=method, interval=interval, batch=batch, seed=seed + start,
                         seeds=seed + idx)
        images.append(to_uint8(vae.decode(x)).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)
        index.append(idx)
    part = lambda r: f"{path[:-len('.npz')]}.rank{r}.npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(part(rank), lambda f: np.savez(f, arr_0=np.concatenate(images), index=np.concatenate(index)))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        arr = np.zeros((num_samples, args.res, args.res, 3), np.uint8)
        for r in range(world):
            with np.load(part(r)) as z:
                arr[z["index"]] = z["arr_0"]
        settings = dict(record or {}, num_samples=num_samples, labels=labels, seed=seed, batch=batch,
                        sampler=method, steps=steps, cfg_scale=cfg_scale, ctrl_scale=ctrl_scale,
                        interval=list(interval), control=dict(zip(CONTROL_SIGNALS, control.tolist())),
                        precision="bf16" if bf16 else "fp32", vae=args.vae, model=args.model, cond=args.cond,
                        res=args.res, dataset=args.dataset, num_classes=args.num_classes, shift_alpha=diffusion.alpha,
                        arch=args.arch, objective=args.objective,
                        world_size=world)
        # the samples whole under a temporary name first (a failure leaves an earlier pair as it was), then the pair
        # is swapped: an earlier .json never stays beside these samples
        settings_path = path[:-len(".npz")] + ".json"
        atomic_write(path + ".new", lambda f: np.savez(f, arr_0=arr, labels=y_all))
        if os.path.exists(settings_path):
            os.remove(settings_path)
        os.replace(path + ".new", path)
        atomic_write(settings_path, lambda f: f.write(json.dumps(settings, indent=1).encode()))
        for r in range(world):
            os.remove(part(r))
    return path


#################################################################################
#                         A model from a file                                   #
#################################################################################

def load_model(path, device, flag="--ckpt"):
    """(EMA model in eval mode, the run's config) from a checkpoint file or run folder of ours, an export of ours
    (.safetensors), or an official DiT file (the released state dicts, or a training checkpoint: its EMA)."""
    file, ckpt = find_checkpoint(path, flag=flag)
    state = checkpoint_weights(ckpt)
    if is_dit_state_dict(state):  # DiT's own recipe: eps + learned variance, adaLN, no QK-norm, SD VAE latents
        width, patch = state["x_embedder.proj.weight"].shape[0], state["x_embedder.proj.weight"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        size = next((s for s, (d, w, _) in SIZES.items() if (d, w) == (depth, width)), None)
        if size is None:
            raise SystemExit(f"{file}: a DiT of depth {depth} and width {width} matches none of our sizes")
        res = dit_resolution(state)
        args = get_args(["--dataset", "imagenet", "--recipe", "dit", "--model", f"{size}/{patch}", "--qk-norm", "off",
                         "--res", str(res), "--base-res", str(res)])  # + DiT's sampler: 250 DDPM steps at 1.5
        args.num_classes, args.ckpt_file, args.ckpt_step = state["y_embedder.embedding_table.weight"].shape[0] - 1, \
            os.path.abspath(file), None
        args.latent_scale = args.latent_shift = None  # the VAE's own (0.18215, as DiT trained)
        model = make_model(args)
        model.load_state_dict({**model.state_dict(), **from_dit(state, model.width)[0]})  # + our control MLPs' inputs
        return model.to(device).eval(), args
    if not isinstance(ckpt, dict) or "args" not in ckpt or "ema" not in ckpt:
        raise SystemExit(f"{flag} {file}: not a checkpoint of this project nor a DiT state dict")
    if ckpt.get("config_version") != CONFIG_VERSION:
        raise SystemExit(f"{file}: written by another version of this code (config schema "
                         f"{ckpt.get('config_version')}, this code reads {CONFIG_VERSION})")
    args = SimpleNamespace(**ckpt["args"], ckpt_file=os.path.abspath(file), ckpt_step=ckpt.get("step"))
    model = make_model(args)
    load_weights(model, ckpt["ema"], file)
    return model.to(device).eval(), args


#################################################################################
#                                   CLI                                         #
#################################################################################

def finite(flag, v):
    """One number of a flag; anything but a finite number ends the run with what was wrong."""
    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise SystemExit(f"{flag}: {v!r} is not a finite number")
    return x


def floats(s, flag):
    """A flag's comma-separated finite numbers, or None if it is unset."""
    return [finite(flag, v) for v in s.split(",")] if s else None


def npz_name(a, cfg_scale, control, base, default_sampler):
    """--num-samples' default file name: every sampling flag that changes the samples and is not at its default, so
    two runs of one checkpoint that differ in any of them never write over each other (the .json beside the file
    holds them all, and which checkpoint step made it)."""
    name = f"samples-{a.num_samples}-cfg{cfg_scale:g}-{a.sampler or default_sampler}{a.steps}"
    for signal in CONTROL_SIGNALS:
        if control[SIGNAL[signal]] != base[SIGNAL[signal]]:
            name += f"-{signal.replace('_', '')}{control[SIGNAL[signal]].item():g}"
    lo, hi = floats(a.interval, "--interval")
    extras = dict(ctrl=f"{a.ctrl_scale:g}" if a.ctrl_scale else None,
                  interval=f"{lo:g}-{hi:g}" if (lo, hi) != (0, 1) else None,
                  labels=a.labels if a.labels != "equal" else None, seed=a.seed or None,
                  batch=a.batch if a.batch != 64 else None,  # it seeds the ancestral sampler's noise per batch
                  precision=a.precision if a.precision != "auto" else None, vae=a.vae)
    return name + "".join(f"-{k}{v}" for k, v in extras.items() if v is not None) + ".npz"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file (.pt, or a .safetensors export) or run folder")
    p.add_argument("--export", default=None, help="write the EMA weights to this .safetensors file, the run's "
                                                 "configuration as JSON in its metadata, and exit: --ckpt and "
                                                 "train.py --init-from read it")
    p.add_argument("--out", default=None, help="PNG path (default: <run folder>/grid.png), or the .npz path of "
                                              "--num-samples (default: <run folder>/samples-N-cfgS-SAMPLERSTEPS"
                                              ".npz, plus every setting not at its default: -flip1-ctrl2-seed5)")
    p.add_argument("--classes", default=None, help="comma-separated class indices (default: the first 10)")
    p.add_argument("--prompt", action="append", default=None, help="text model: a prompt (one grid row); repeat the "
                                                                     "flag for more rows")
    p.add_argument("--prompts", default=None, help="text model: a file of prompts, one per line")
    p.add_argument("--seeds", type=int, default=4, help="noise seeds per cell")
    p.add_argument("--cfg-scale", default=None, help="semantic guidance scale(s), comma-separated (default: the "
                   "run's train.py --cfg-scale, which its recipe sets)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's --sample-steps)")
    p.add_argument("--sampler", default=None, choices=[s for v in SAMPLERS.values() for s in v],
                   help="flow: euler (default) | heun; ddpm: ddim (default) | ddpm (ancestral)")
    p.add_argument("--vae", default=None, help="decode with this autoencoder instead of the checkpoint's (e.g. "
                                              "sd-mse for a DiT file)")
    p.add_argument("--flip", default=None, help="flip values to sweep, e.g. 0,1")
    p.add_argument("--orig-size", default=None, help="original-size values (pixels) to sweep, e.g. 16,64")
    p.add_argument("--crop-offset", default=None, help="crop offsets (pixels, top = left) to sweep, e.g. 0,8")
    p.add_argument("--eval-per-class", type=int, default=0, help="shapes: run the checker on N samples per class")
    p.add_argument("--num-samples", type=int, default=0, help="write N samples as one .npz for fid.py (ranks share "
                                                                "the work under torchrun); --out is then the .npz path")
    p.add_argument("--labels", default="equal", choices=("equal", "random"),
                   help="--num-samples: N / classes per class in order, or uniform from --seed")
    p.add_argument("--seed", type=int, default=0, help="--num-samples: sample i starts from noise seed SEED + i")
    p.add_argument("--batch", type=int, default=64, help="--num-samples: images per forward pass")
    p.add_argument("--ctrl-scale", type=float, default=0.0, help="control guidance scale (0 = none)")
    p.add_argument("--interval", default="0,1", help="guide only while t is in LO,HI")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="--num-samples: auto = bf16 autocast on GPU, fp32 on CPU")
    a = p.parse_args(argv)
    # the numbers first: a bad one fails here, not after the model is loaded or deep inside the sampler
    scales = floats(a.cfg_scale, "--cfg-scale") if a.cfg_scale is not None else None
    flips, sizes = floats(a.flip, "--flip"), floats(a.orig_size, "--orig-size")
    offsets = floats(a.crop_offset, "--crop-offset")
    finite("--ctrl-scale", a.ctrl_scale)
    interval = floats(a.interval, "--interval")
    if interval is None or len(interval) != 2:
        raise SystemExit(f"--interval: give two numbers LO,HI (guidance applies while LO <= t <= HI), got "
                         f"{a.interval!r}")
    if not 0 <= interval[0] <= interval[1] <= 1:
        raise SystemExit(f"--interval {a.interval}: need 0 <= LO <= HI <= 1 (t runs from 1, noise, to 0, data)")
    for flag in ("steps", "seeds", "batch"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise SystemExit(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    for flag in ("num_samples", "eval_per_class"):  # 0 = not asked for
        if getattr(a, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if a.export and not a.export.endswith(".safetensors"):
        raise SystemExit(f"--export {a.export}: writes a .safetensors file; end the path in .safetensors")
    rank, world = 0, 1
    if a.num_samples:  # torchrun: one process per GPU, the local rank picks it
        rank, world, device = setup_distributed()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, args = load_model(a.ckpt, device, flag="--ckpt")
    if a.export:
        export_safetensors(model, args, a.export)
        print(f"wrote {a.export}")
        return a.export
    # the run's evaluation settings (its recipe's) where these flags are not given; a run from before they were
    # recorded: 50 steps of the objective's sampler at guidance 1.0, as sample.py's defaults then were
    recorded = hasattr(args, "sample_steps")
    a.steps = a.steps or (args.sample_steps if recorded else 50)
    a.sampler = a.sampler or (args.sampler if recorded else None)
    scales = scales or [args.cfg_scale if recorded else 1.0]
    if a.sampler and a.sampler not in SAMPLERS[args.objective]:
        raise SystemExit(f"--sampler {a.sampler}: this model was trained with --objective {args.objective}; choose "
                         f"one of {SAMPLERS[args.objective]}")
    if args.objective == "ddpm":  # DDIM's integer stride fits only some step counts: say so before any sampling
        try:
            spaced_steps(make_diffusion(args).num_steps, a.steps, a.sampler or SAMPLERS["ddpm"][0])
        except ValueError as e:
            raise SystemExit(f"--steps {a.steps}: {e}")
    if a.vae:
        if latent_geometry(a.vae) != latent_geometry(args.vae):
            raise SystemExit(f"--vae {a.vae}: its latent layout differs from the checkpoint's --vae {args.vae}")
        args.vae = a.vae
    vae = Autoencoder(args.vae, scale=args.latent_scale, shift=args.latent_shift).to(device)
    if a.eval_per_class:
        if args.source_dataset != "shapes":
            raise SystemExit("--eval-per-class uses the shapes checker: it needs a checkpoint trained on shapes")
        res = evaluate_shapes(model, make_diffusion(args), args, a.eval_per_class, device, cfg_scale=scales[0],
                              steps=a.steps, method=a.sampler, progress=True, vae=vae, ctrl_scale=a.ctrl_scale,
                              interval=tuple(interval))
        print(json.dumps(dict(res, cfg_scale=scales[0], ctrl_scale=a.ctrl_scale, interval=interval,
                              per_class=a.eval_per_class, steps=a.steps)))
        return res
    base = default_control(args.source_dataset, args.res)
    controls = []
    for flip, size, off in itertools.product(flips or [None], sizes or [None], offsets or [None]):
        c = base.clone()
        if flip is not None:
            c[SIGNAL["flip"]] = flip
        if size is not None:
            c[SIGNAL["orig_h"]] = c[SIGNAL["orig_w"]] = size
        if off is not None:
            c[SIGNAL["crop_top"]] = c[SIGNAL["crop_left"]] = off
        controls.append(c)
    if a.num_samples:
        if len(controls) > 1 or len(scales) > 1:
            raise SystemExit("--num-samples draws one setting: give --cfg-scale, --flip, --orig-size and "
                             "--crop-offset one value each")
        if a.prompt or a.prompts:
            raise SystemExit("--num-samples draws its prompts from --labels (the shapes captions of each class); "
                             "--prompt / --prompts are for grids")
        if getattr(args, "cond_type", "class") == "text" and args.source_dataset != "shapes":
            raise SystemExit(f"--num-samples on a text model trained on {args.source_dataset}: this sampler only "
                             f"knows the shapes captions; write a grid with --prompts FILE instead")
        out = a.out or os.path.join(os.path.dirname(args.ckpt_file), npz_name(a, scales[0], controls[0], base,
                                                                              SAMPLERS[args.objective][0]))
        if not out.endswith(".npz"):
            raise SystemExit(f"--out {out!r}: --num-samples writes an .npz; end the path in .npz")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # fails now, not after the sampling
        sample_npz(model, vae, args, out, a.num_samples, controls[0], a.labels, a.seed, a.batch, scales[0],
                   a.ctrl_scale, tuple(interval), a.steps, a.sampler, use_bf16(a.precision, device), rank,
                   world,
                   record=dict(ckpt=args.ckpt_file, ckpt_step=args.ckpt_step))
        if rank == 0:
            print(f"wrote {out} and its settings {out[:-len('.npz')]}.json")
        if world > 1:
            torch.distributed.destroy_process_group()
        return out
    prompts = list(a.prompt or [])
    if a.prompts:
        if not os.path.isfile(a.prompts):
            raise SystemExit(f"--prompts {a.prompts!r}: no such file")
        with open(a.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if prompts and getattr(args, "cond_type", "class") != "text":
        raise SystemExit("--prompt / --prompts need a text-conditional checkpoint (train.py --cond-type text)")
    classes = [int(c) for c in a.classes.split(",")] if a.classes else None
    if classes and not 0 <= min(classes) <= max(classes) < args.num_classes:
        raise SystemExit(f"--classes: the model knows classes 0..{args.num_classes - 1}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.ckpt)) if os.path.isfile(a.ckpt) else a.ckpt,
                                "grid.png")
    class_grid(model, vae, args, out, device, classes=classes, seeds=range(a.seeds), controls=controls,
               cfg_scales=scales, steps=a.steps, method=a.sampler, progress=True, prompts=prompts or None,
               ctrl_scale=a.ctrl_scale, interval=tuple(interval))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
