"""
Sample from a checkpoint's EMA weights, in one of four modes:

    python sample.py --ckpt runs/000-shapes-XS-4-ours --classes 0,6,7 --flip 0,1 --cfg-scale 1,3  # a grid
    python sample.py --ckpt runs/000-shapes-XS-4-ours --eval-per-class 50     # the checker's accuracies
    python sample.py --ckpt runs/000-shapes-XS-4-ours --export model.safetensors  # EMA weights + config
    torchrun --nproc_per_node=8 sample.py --ckpt runs/001-latents-XL-2-ours --num-samples 50000 \
        --cfg-scale 1.5                                # an .npz (+ .json of its settings) for fid.py

A grid has one row per class (or prompt) and one column per (guidance scale, control variant, seed); the same
noise is reused across rows and control variants, so a column-to-column change is caused by the condition
alone. The sampler is diffusion.generate, the checker's evaluation shapes.evaluate_shapes, the files
themselves are read by checkpoint.py.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
from typing import NamedTuple

import numpy as np
import torch

from checkpoint import (
    CONFIG_VERSION,
    atomic_write,
    checkpoint_weights,
    dit_config,
    export_safetensors,
    find_checkpoint,
    load_weights,
    stored_args,
    with_dit_weights,
)
from conditioning import CONTROL_SIGNALS, SIGNAL
from config import (
    Facts,
    check_sampling,
    get_args,
    latent_shape,
    make_autoencoder,
    make_diffusion,
    make_model,
    run_sampling,
    sampling_control,
    use_bf16,
)
from data import setup_distributed
from diffusion import CFG_SCHEDULES, SAMPLERS, SPACINGS, generate, make_noise
from latents import latent_geometry, to_uint8
from shapes import class_prompts, evaluate_shapes
from text import semantic_input

#################################################################################
#                                 Sample grids                                  #
#################################################################################


def take(y, idx):
    """Rows idx of labels or of a prompt's (features, mask)."""
    return tuple(v[idx] for v in y) if isinstance(y, tuple) else y[idx]


def default_prompts(facts, classes):
    """A text model's grid rows when no prompt is given: the shapes captions of the classes for a shapes
    model; any other model was trained on captions only its user knows, so it needs --prompt or --prompts."""
    if facts.source_dataset == "shapes":
        return class_prompts(classes)
    raise SystemExit(f"a text model trained on {facts.source_dataset} samples from prompts: give --prompt "
                     f"TEXT (repeatable) or --prompts FILE (one prompt per line)")


def class_grid(model, vae, args, facts, path, device, sampling, classes=None, seeds=(0, 1, 2, 3),
               controls=None, cfg_scales=None, progress=False, prompts=None):
    """Save a PNG grid: rows = classes (or prompts, for a text model), columns = guidance scale (cfg_scales,
    default sampling's) x control variant x seed, drawn as `sampling` (diffusion.Sampling) says."""
    from torchvision.utils import save_image
    was_training = model.training
    model.eval()
    classes = list(range(min(facts.num_classes, 10))) if classes is None else classes
    if args.cond_type == "text" and not prompts:
        prompts = default_prompts(facts, classes)
    rows = prompts if prompts else classes
    if controls is None:  # show the flip: it is the control whose effect is easiest to see
        controls = [sampling_control(facts), sampling_control(facts)]
        controls[1][SIGNAL["flip"]] = 1.0
    cfg_scales = cfg_scales or [sampling.scale]
    cols = list(itertools.product(cfg_scales, range(len(controls)), seeds))
    noise = make_noise([s for _, _, s in cols], latent_shape(facts), device).repeat(len(rows), 1, 1, 1)
    # each cell's noise seed: it seeds a prompt's padding noise too
    seeds = [s for _, _, s in cols] * len(rows)
    labels = [0] * len(rows) * len(cols) if prompts else [c for c in classes for _ in cols]
    y = semantic_input(args, facts, labels, device, [p for p in prompts for _ in cols] if prompts else None)
    ctrl = torch.stack([controls[k] for _ in rows for _, k, _ in cols]).to(device)
    lat = torch.empty_like(noise)
    for g in cfg_scales:  # guidance scale is a scalar per call: group the columns by it
        sel = torch.tensor([i for i, (gi, _, _) in enumerate(cols * len(rows)) if gi == g], device=device)
        lat[sel] = generate(model, make_diffusion(args, facts), noise[sel], take(y, sel), ctrl[sel],
                            sampling._replace(scale=g), progress=progress,
                            seeds=[seeds[i] for i in sel.tolist()])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = vae.decode(lat)
    atomic_write(path,
                 lambda f: save_image(images, f, format="png", nrow=len(cols), padding=1, pad_value=1.0))
    model.train(was_training)
    return path


#################################################################################
#                        Large-scale sampling for FID                           #
#################################################################################
# One .npz in the ADM evaluation suite's format (uint8 N x H x W x 3 under arr_0, class labels under `labels`)
# and a JSON of every setting that made it, so that `fid.py REF samples.npz` can print them next to the
# number.

def fid_labels(n, num_classes, mode, seed):
    """Labels of samples 0..n-1: `equal` gives class k the consecutive block of about n / num_classes samples
    (exactly 50 each for 50k ImageNet samples), `random` draws them uniformly from `seed`."""
    if mode == "equal":
        return np.arange(n) * num_classes // n
    if mode == "random":
        return np.random.default_rng(seed).integers(0, num_classes, n)
    raise ValueError(f"unknown label mode {mode!r}; choose 'equal' or 'random'")


@torch.no_grad()
def sample_npz(model, vae, args, facts, path, num_samples, control, sampling, labels="equal", seed=0,
               batch=64, bf16=False, rank=0, world=1, record=None):
    """Write `num_samples` images to `path` (.npz), drawn as `sampling` (diffusion.Sampling) says, and their
    settings, with `record` added, to the same path .json.

    Sample i starts from the noise of seed `seed + i`, and global batch b (samples b * batch ...) is drawn by
    rank b % world: every image comes out of the same computation whatever the number of ranks (the ancestral
    sampler's fresh noise is seeded per batch, so it too; a text model's padding noise is seeded per sample,
    from seed + i). Each rank saves its batches to a part file next to `path` (so `path` must be on a file
    system every rank sees); rank 0 assembles them in order, holding N x H x W x 3 bytes (10 GB for 50k at 256
    px), writes `path` and its .json atomically (a full disk or a kill leaves the parts, never a partial file
    under the name), then removes the parts.
    """
    from tqdm import tqdm
    device = next(model.parameters()).device
    diffusion = make_diffusion(args, facts)
    y_all = fid_labels(num_samples, facts.num_classes, labels, seed)
    # a text model's prompt of sample i: its class's shape in colour i % 8, whatever batch it falls in
    prompts_all = class_prompts(y_all) if args.cond_type == "text" else None
    mine = range(rank * batch, num_samples, world * batch)
    # a rank may get none
    images, index = [np.zeros((0, facts.res, facts.res, 3), np.uint8)], [np.zeros(0, np.int64)]
    for start in tqdm(mine, desc="sampling", disable=rank != 0, dynamic_ncols=True):
        idx = np.arange(start, min(start + batch, num_samples))
        noise = make_noise(seed + idx, latent_shape(facts), device)
        ctrl = control.to(device).expand(len(idx), -1)
        prompts = [prompts_all[i] for i in idx] if prompts_all is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = generate(model, diffusion, noise, semantic_input(args, facts, y_all[idx], device, prompts),
                         ctrl, sampling, batch=batch, seed=seed + start, seeds=seed + idx)
        images.append(to_uint8(vae.decode(x)).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)
        index.append(idx)
    part = lambda r: f"{path[:-len('.npz')]}.rank{r}.npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(part(rank), lambda f: np.savez(f, arr_0=np.concatenate(images), index=np.concatenate(index)))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        arr = np.zeros((num_samples, facts.res, facts.res, 3), np.uint8)
        for r in range(world):
            with np.load(part(r)) as z:
                arr[z["index"]] = z["arr_0"]
        settings = dict(record or {}, num_samples=num_samples, labels=labels, seed=seed, batch=batch,
                        sampler=sampling.method, steps=sampling.steps, spacing=sampling.spacing,
                        cfg_scale=sampling.scale, cfg_schedule=sampling.schedule, cfg_power=sampling.power,
                        ctrl_scale=sampling.ctrl, interval=list(sampling.interval),
                        control=dict(zip(CONTROL_SIGNALS, control.tolist())),
                        precision="bf16" if bf16 else "fp32", vae=facts.vae, model=args.model, cond=args.cond,
                        res=facts.res, dataset=args.dataset, num_classes=facts.num_classes,
                        shift_alpha=diffusion.alpha, arch=args.arch, objective=args.objective,
                        world_size=world)
        # the samples whole under a temporary name first (a failure leaves an earlier pair as it was), then
        # the pair is swapped: an earlier .json never stays beside these samples
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


class Loaded(NamedTuple):
    """A model read from a file: its EMA weights in eval mode, the run's flags and facts, where it came
    from."""

    model: torch.nn.Module
    args: argparse.Namespace
    facts: Facts
    file: str
    step: int


def load_dit(file, state, dit, device):
    """An official DiT file (`dit`: its checkpoint.dit_config) as DiT's own recipe: eps + learned variance,
    adaLN, no QK-norm, SD VAE latents at the VAE's own scale (0.18215), and its sampler (250 DDPM steps at
    guidance 1.5)."""
    name, res, num_classes = dit
    args = get_args(["--dataset", "imagenet", "--recipe", "dit", "--model", name, "--qk-norm", "off", "--res",
                     str(res)])
    facts = Facts(res=res, vae=args.vae, base_res=res, source_dataset="imagenet", num_classes=num_classes)
    model = make_model(args, facts)
    model.load_state_dict(with_dit_weights(model, state))
    return Loaded(model.to(device).eval(), args, facts, os.path.abspath(file), None)


def load_model(path, device, flag="--ckpt"):
    """Loaded from a checkpoint file or run folder of ours, an export of ours (.safetensors), or an official
    DiT file (the released state dicts, or a training checkpoint: its EMA)."""
    file, ckpt = find_checkpoint(path, flag=flag)
    state = checkpoint_weights(ckpt)
    dit = dit_config(state) if state is not None else None
    if dit is not None:
        return load_dit(file, state, dit, device)
    if not isinstance(ckpt, dict) or "args" not in ckpt or "ema" not in ckpt:
        raise SystemExit(f"{flag} {file}: not a checkpoint of this project nor a DiT state dict")
    if ckpt.get("config_version") != CONFIG_VERSION:
        raise SystemExit(f"{file}: written by another version of this code (config schema "
                         f"{ckpt.get('config_version')}, this code reads {CONFIG_VERSION})")
    args, facts = stored_args(ckpt["args"]), Facts(**ckpt["facts"])
    model = make_model(args, facts)
    load_weights(model, ckpt["ema"], file)
    return Loaded(model.to(device).eval(), args, facts, os.path.abspath(file), ckpt.get("step"))


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


def ints(s, flag, low=0):
    """A flag's comma-separated whole numbers (each >= low unless low is None), or None if it is unset."""
    if not s:
        return None
    try:
        values = [int(v) for v in s.split(",")]
    except ValueError:
        raise SystemExit(f"{flag}: {s!r} is not a comma-separated list of whole numbers") from None
    if low is not None and min(values) < low:
        raise SystemExit(f"{flag}: every value must be >= {low}, got {s!r}")
    return values


def npz_name(a, s, control, base):
    """--num-samples' default file name: every sampling flag that changes the samples and is not at its
    default, so two runs of one checkpoint that differ in any of them never write over each other (the .json
    beside the file holds them all, and which checkpoint step made it). `s`: the resolved settings
    (a diffusion.Sampling)."""
    name = f"samples-{a.num_samples}-cfg{s.scale:g}-{s.method}{s.steps}"
    for signal in CONTROL_SIGNALS:
        if control[SIGNAL[signal]] != base[SIGNAL[signal]]:
            name += f"-{signal.replace('_', '')}{control[SIGNAL[signal]].item():g}"
    lo, hi = s.interval
    extras = dict(spacing=a.spacing,
                  schedule=f"{s.schedule}{s.power:g}" if s.schedule != "constant" else None,
                  ctrl=f"{s.ctrl:g}" if s.ctrl else None,
                  interval=f"{lo:g}-{hi:g}" if (lo, hi) != (0, 1) else None,
                  labels=a.labels if a.labels != "equal" else None, seed=a.seed or None,
                  # it seeds the ancestral sampler's noise per batch
                  batch=a.batch if a.batch != 64 else None,
                  precision=a.precision if a.precision != "auto" else None, vae=a.vae)
    return name + "".join(f"-{k}{v}" for k, v in extras.items() if v is not None) + ".npz"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint file (.pt, or a .safetensors export) or run folder")
    a("--export", default=None, help="write the EMA weights to this .safetensors file, the run's "
      "configuration as JSON in its metadata, and exit: --ckpt and train.py --init-from read it")
    a("--out", default=None, help="PNG path (default: <run folder>/grid.png), or the .npz path of "
      "--num-samples (default: <run folder>/samples-N-cfgS-SAMPLERSTEPS.npz, plus every setting not at its "
      "default: -flip1-ctrl2)")
    a("--classes", default=None, help="comma-separated class indices (default: the first 10)")
    a("--prompt", action="append", default=None, help="text model: a prompt (one grid row); repeat for more "
      "rows")
    a("--prompts", default=None, help="text model: a file of prompts, one per line")
    a("--seeds", default="0,1,2,3", help="comma-separated noise seeds, one grid column each")
    a("--cfg-scale", default=None, help="semantic guidance scale(s), comma-separated (default: the run's "
      "train.py --cfg-scale, which its recipe sets)")
    a("--steps", type=int, default=None, help="sampler steps (default: the run's --sample-steps)")
    a("--sampler", default=None, choices=sorted({s for v in SAMPLERS.values() for s in v}),
      help="flow: euler | heun | dpm++2m; ddpm: ddim | ddpm (ancestral) | dpm++2m; default: the run's "
      "--sampler (its recipe's; else euler / ddim)")
    a("--spacing", default=None, choices=SPACINGS, help="ddpm: which of the 1000 steps are visited (default: "
      "the run's --sample-spacing, else the sampler's own)")
    a("--cfg-schedule", default=None, choices=CFG_SCHEDULES, help="the semantic scale along t (default: the "
      "run's --cfg-schedule)")
    a("--cfg-power", type=float, default=None,
      help="power-cosine's exponent (default: the run's --cfg-power)")
    a("--vae", default=None, help="decode with this autoencoder instead of the checkpoint's (e.g. sd-mse for "
      "DiT)")
    a("--flip", default=None, help="flip values to sweep, e.g. 0,1")
    a("--orig-size", default=None, help="original-size values (pixels) to sweep, e.g. 16,64")
    a("--crop-offset", default=None, help="crop offsets (pixels, top = left) to sweep, e.g. 0,8")
    a("--eval-per-class", type=int, default=0, help="shapes: run the checker on N samples per class")
    a("--num-samples", type=int, default=0, help="write N samples as one .npz for fid.py (ranks share the "
      "work under torchrun); --out is then the .npz path")
    a("--labels", default="equal", choices=("equal", "random"), help="--num-samples: N / classes per class "
      "in order, or uniform from --seed")
    a("--seed", type=int, default=0, help="--num-samples: sample i starts from noise seed SEED + i")
    a("--batch", type=int, default=64, help="--num-samples: images per forward pass")
    a("--ctrl-scale", type=float, default=0.0, help="control guidance scale (0 = none)")
    a("--interval", default="0,1", help="guide only while t is in LO,HI")
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="--num-samples: auto = bf16 "
      "autocast on GPU, fp32 on CPU")
    return p.parse_args(argv)


def check_numbers(a):
    """The numbers first: a bad one fails here, not after the model is loaded or deep inside the sampler."""
    finite("--ctrl-scale", a.ctrl_scale)
    if a.cfg_power is not None and not finite("--cfg-power", a.cfg_power) > 0:
        raise SystemExit(f"--cfg-power must be > 0, got {a.cfg_power}")
    interval = floats(a.interval, "--interval")
    if interval is None or len(interval) != 2:
        raise SystemExit(f"--interval: give two numbers LO,HI (guidance applies while LO <= t <= HI), got "
                         f"{a.interval!r}")
    if not 0 <= interval[0] <= interval[1] <= 1:
        raise SystemExit(f"--interval {a.interval}: need 0 <= LO <= HI <= 1 (t runs from 1, noise, to 0, "
                         "data)")
    scales = floats(a.cfg_scale, "--cfg-scale")
    if scales and min(scales) < 0:
        raise SystemExit(f"--cfg-scale {a.cfg_scale}: a guidance scale is >= 0 (1 = no guidance)")
    for flag in ("steps", "batch"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise SystemExit(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    for flag in ("num_samples", "eval_per_class"):  # 0 = not asked for
        if getattr(a, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if a.export and not a.export.endswith(".safetensors"):
        raise SystemExit(f"--export {a.export}: writes a .safetensors file; end the path in .safetensors")
    ints(a.seeds, "--seeds")
    ints(a.classes, "--classes", low=None)  # their range is the model's: checked once it is loaded
    return scales, tuple(interval)


def settings_of(a, run, scales, interval):
    """This call's sampling (diffusion.Sampling: the flags where given, else the run's recorded settings, its
    recipe's) and the guidance scales of a grid's columns; checked against the model's objective before any
    sampling."""
    args = run.args
    over = dict(method=a.sampler, steps=a.steps, spacing=a.spacing, schedule=a.cfg_schedule,
                power=a.cfg_power)
    s = run_sampling(args, ctrl=a.ctrl_scale, interval=interval,
                     **{k: v for k, v in over.items() if v is not None})
    s = s._replace(scale=(scales or [args.cfg_scale])[0])
    if s.method not in SAMPLERS[args.objective]:
        raise SystemExit(f"--sampler {s.method}: this model was trained with --objective {args.objective}; "
                         f"choose one of {SAMPLERS[args.objective]}")
    if a.spacing and args.objective != "ddpm":
        raise SystemExit(f"--spacing {a.spacing}: spaces the steps of a DDPM model; this one is a flow "
                         f"model, whose sampler walks its shifted time grid")
    # DDIM's integer stride fits only some step counts: say so before any sampling
    if args.objective == "ddpm":
        try:
            check_sampling(s, make_diffusion(args, run.facts).num_steps)
        except ValueError as e:
            raise SystemExit(f"--steps {s.steps}: {e}") from None
    return s, scales or [s.scale]


def control_sweep(a, facts):
    """One control vector per combination of --flip, --orig-size and --crop-offset, from the sampling
    default."""
    flips, sizes = floats(a.flip, "--flip"), floats(a.orig_size, "--orig-size")
    offsets = floats(a.crop_offset, "--crop-offset")
    controls = []
    for flip, size, off in itertools.product(flips or [None], sizes or [None], offsets or [None]):
        c = sampling_control(facts)
        if flip is not None:
            c[SIGNAL["flip"]] = flip
        if size is not None:
            c[SIGNAL["orig_h"]] = c[SIGNAL["orig_w"]] = size
        if off is not None:
            c[SIGNAL["crop_top"]] = c[SIGNAL["crop_left"]] = off
        controls.append(c)
    return controls


def read_prompts(a, run):
    """--prompt and --prompts, for a text model only."""
    prompts = list(a.prompt or [])
    if a.prompts:
        if not os.path.isfile(a.prompts):
            raise SystemExit(f"--prompts {a.prompts!r}: no such file")
        with open(a.prompts) as f:
            found = [line.strip() for line in f if line.strip()]
        if not found:
            raise SystemExit(f"--prompts {a.prompts!r}: the file holds no prompt (one per line)")
        prompts += found
    if prompts and run.args.cond_type != "text":
        raise SystemExit("--prompt / --prompts need a text-conditional checkpoint (train.py --cond-type "
                         "text)")
    return prompts


#################################################################################
#                      The four modes: one function each                        #
#################################################################################


def export_mode(a, run):
    """--export: the EMA weights and the configuration as one .safetensors file."""
    export_safetensors(run.model, vars(run.args), dataclasses.asdict(run.facts), run.step, a.export)
    print(f"wrote {a.export}")
    return a.export


def checker_verdict(model, vae, args, facts, per_class, device, sampling):
    """The shapes checker's accuracies (shapes.evaluate_shapes) of a shapes model's samples drawn as
    `sampling` says, decoded by its own autoencoder: train.py's end-of-run eval.json and --eval-per-class."""
    return evaluate_shapes(model, make_diffusion(args, facts), args, facts, per_class, device, sampling,
                           progress=True, vae=vae)


def eval_mode(a, run, vae, s, scales, device):
    """--eval-per-class: the shapes checker's accuracies, printed as one JSON line."""
    if run.facts.source_dataset != "shapes":
        raise SystemExit("--eval-per-class uses the shapes checker: it needs a checkpoint trained on shapes")
    if len(scales) > 1:
        raise SystemExit("--eval-per-class grades one setting: give --cfg-scale one value")
    res = checker_verdict(run.model, vae, run.args, run.facts, a.eval_per_class, device, s)
    print(json.dumps(dict(res, cfg_scale=s.scale, cfg_schedule=s.schedule, ctrl_scale=s.ctrl,
                          interval=list(s.interval), per_class=a.eval_per_class, sampler=s.method,
                          steps=s.steps, spacing=s.spacing)))
    return res


def npz_mode(a, run, vae, s, scales, controls, rank, world, device):
    """--num-samples: one .npz (and its settings .json) for fid.py, the ranks sharing the work."""
    if len(controls) > 1 or len(scales) > 1:
        raise SystemExit("--num-samples draws one setting: give --cfg-scale, --flip, --orig-size and "
                         "--crop-offset one value each")
    if a.prompt or a.prompts:
        raise SystemExit("--num-samples draws its prompts from --labels (the shapes captions of each class); "
                         "--prompt / --prompts are for grids")
    if run.args.cond_type == "text" and run.facts.source_dataset != "shapes":
        raise SystemExit(f"--num-samples on a text model trained on {run.facts.source_dataset}: this sampler "
                         f"only knows the shapes captions; write a grid with --prompts FILE instead")
    out = a.out or os.path.join(os.path.dirname(run.file),
                                npz_name(a, s, controls[0], sampling_control(run.facts)))
    if not out.endswith(".npz"):
        raise SystemExit(f"--out {out!r}: --num-samples writes an .npz; end the path in .npz")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # fails now, not after the sampling
    sample_npz(run.model, vae, run.args, run.facts, out, a.num_samples, controls[0], s, a.labels, a.seed,
               a.batch, use_bf16(a.precision, device), rank, world,
               record=dict(ckpt=run.file, ckpt_step=run.step))
    if rank == 0:
        print(f"wrote {out} and its settings {out[: -len('.npz')]}.json")
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def grid_mode(a, run, vae, s, scales, controls, device):
    """The default: a PNG grid of classes (or prompts) x guidance scales x control variants x seeds."""
    prompts = read_prompts(a, run)
    classes = ints(a.classes, "--classes", low=None)
    if classes and not 0 <= min(classes) <= max(classes) < run.facts.num_classes:
        raise SystemExit(f"--classes: the model knows classes 0..{run.facts.num_classes - 1}")
    folder = os.path.dirname(os.path.abspath(a.ckpt)) if os.path.isfile(a.ckpt) else a.ckpt
    out = a.out or os.path.join(folder, "grid.png")
    class_grid(run.model, vae, run.args, run.facts, out, device, s, classes=classes,
               seeds=ints(a.seeds, "--seeds"), controls=controls, cfg_scales=scales, progress=True,
               prompts=prompts or None)
    print(f"wrote {out}")
    return out


def main(argv=None):
    a = parse(argv)
    scales, interval = check_numbers(a)
    rank, world = 0, 1
    if a.num_samples:  # torchrun: one process per GPU, the local rank picks it
        rank, world, device = setup_distributed()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_model(a.ckpt, device, flag="--ckpt")
    if a.export:
        return export_mode(a, run)
    s, scales = settings_of(a, run, scales, interval)
    if a.vae:  # decode with another autoencoder of the same latent layout
        if latent_geometry(a.vae) != latent_geometry(run.facts.vae):
            raise SystemExit(f"--vae {a.vae}: its latent layout differs from the checkpoint's --vae "
                             f"{run.facts.vae}")
        run = run._replace(facts=dataclasses.replace(run.facts, vae=a.vae))
    vae = make_autoencoder(run.facts).to(device)
    if a.eval_per_class:
        return eval_mode(a, run, vae, s, scales, device)
    controls = control_sweep(a, run.facts)
    if a.num_samples:
        return npz_mode(a, run, vae, s, scales, controls, rank, world, device)
    return grid_mode(a, run, vae, s, scales, controls, device)


if __name__ == "__main__":
    main()
