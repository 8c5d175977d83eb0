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
import os
from typing import NamedTuple

import numpy as np
import torch

from build import latent_shape, load_model, make_autoencoder, make_diffusion, sampling_control, use_bf16
from checkpoint import atomic_write, export_safetensors
from checks import (
    IMAGE_TYPES,
    OutputLock,
    above,
    at_least,
    check_output,
    end_point,
    job_tag,
    number_list,
    seed,
)
from conditioning import CONTROL_SIGNALS, SIGNAL, parse_gate
from config import check_sampling, run_sampling
from data import read_lines, setup_distributed, text_encoding
from ddpm import SAMPLERS, SPACINGS
from diffusion import CFG_SCHEDULES, Draw, Sampling, generate, make_noise
from latents import latent_geometry, to_uint8
from model import ROUTES
from shapes import EvalPlan, class_prompts, evaluate_shapes
from text import semantic_input

#################################################################################
#                                 Sample grids                                  #
#################################################################################


class GridLayout(NamedTuple):
    """What a grid shows: rows = classes (default the first ten), or prompts for a text model (default the
    shapes captions of those classes); columns = guidance scale (default the sampling's) x control variant
    (default flip 0 and 1) x noise seed."""

    classes: list = None
    seeds: tuple = (0, 1, 2, 3)
    controls: list = None
    cfg_scales: list = None
    prompts: list = None


def select_rows(y, idx):
    """Rows idx of labels or of a prompt's (features, mask)."""
    return tuple(v[idx] for v in y) if isinstance(y, tuple) else y[idx]


def default_prompts(facts, classes):
    """A text model's grid rows when no prompt is given: the shapes captions of the classes for a shapes
    model; any other model was trained on captions only its user knows, so it needs --prompt or --prompts."""
    if facts.source_dataset == "shapes":
        return class_prompts(classes)
    raise SystemExit(f"a text model trained on {facts.source_dataset} samples from prompts: give --prompt "
                     f"TEXT (repeatable) or --prompts FILE (one prompt per line)")


def class_grid(trained, sampling, path, layout=GridLayout(), progress=False):
    """Save an image grid (of the type `path` ends in) of `trained`'s samples as `layout` says, drawn as
    `sampling` (diffusion.Sampling) says. The same noise is reused across rows and control variants, so a
    change from column to column is caused by the condition alone."""
    from torchvision.utils import save_image
    model, args, facts = trained.model, trained.args, trained.facts
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    classes = list(range(min(facts.num_classes, 10))) if layout.classes is None else layout.classes
    prompts = layout.prompts
    if args.cond_type == "text" and not prompts:
        prompts = default_prompts(facts, classes)
    rows = prompts if prompts else classes
    controls = layout.controls
    if controls is None:  # show the flip: it is the control whose effect is easiest to see
        controls = [sampling_control(facts), sampling_control(facts)]
        controls[1][SIGNAL["flip"]] = 1.0
    cfg_scales = layout.cfg_scales or [sampling.scale]
    cols = list(itertools.product(cfg_scales, range(len(controls)), layout.seeds))
    noise = make_noise([s for _, _, s in cols], latent_shape(facts), device).repeat(len(rows), 1, 1, 1)
    # each cell's noise seed: it seeds a prompt's padding noise too
    seeds = [s for _, _, s in cols] * len(rows)
    labels = [0] * len(rows) * len(cols) if prompts else [c for c in classes for _ in cols]
    y = semantic_input(args, facts, labels, device, [p for p in prompts for _ in cols] if prompts else None)
    ctrl = torch.stack([controls[k] for _ in rows for _, k, _ in cols]).to(device)
    latents = torch.empty_like(noise)
    for scale in cfg_scales:  # guidance scale is a scalar per call: group the columns by it
        sel = torch.tensor([i for i, (g, _, _) in enumerate(cols * len(rows)) if g == scale], device=device)
        latents[sel] = generate(model, make_diffusion(args, facts), noise[sel], select_rows(y, sel),
                                ctrl[sel], sampling._replace(scale=scale),
                                Draw(progress=progress, seeds=[seeds[i] for i in sel.tolist()]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = trained.vae.decode(latents)
    # the image type the name says (checks.IMAGE_TYPES): PIL knows .jpg as JPEG
    kind = os.path.splitext(path)[1][1:].lower().replace("jpg", "jpeg") or "png"
    atomic_write(path,
                 lambda f: save_image(images, f, format=kind, nrow=len(cols), padding=1, pad_value=1.0))
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


class NpzJob(NamedTuple):
    """What --num-samples draws: how many, at which control vector, which labels (`equal` blocks per class
    or `random` from the seed), from which noise seeds (sample i: seed + i), in batches of `batch`, under bf16
    autocast or not; `record` is added to the settings written beside the samples."""

    num_samples: int
    control: torch.Tensor
    labels: str = "equal"
    seed: int = 0
    batch: int = 64
    bf16: bool = False
    record: dict = None


@torch.no_grad()
def sample_npz(trained, sampling, path, job, rank=0, world=1):
    """Write job.num_samples images of `trained` to `path` (.npz), drawn as `sampling` (diffusion.Sampling)
    says, and their settings to the same path .json.

    Sample i starts from the noise of seed `job.seed + i`, and global batch b (samples b * batch ...) is drawn
    by rank b % world: every image comes out of the same computation whatever the number of ranks or the batch
    size (the ancestral sampler's fresh noise and a text model's padding noise are seeded per sample, from
    seed + i). Each rank saves its batches to a part file next to `path` (so `path` must be
    on a file system every rank sees); rank 0 assembles them in order, holding N x H x W x 3 bytes (10 GB for
    50k at 256 px), writes `path` and its .json atomically (a full disk or a kill leaves the parts, never a
    partial file under the name), then removes the parts. The parts' and the assembled file's temporary names
    carry the job's tag (job_tag), so that no other job's files are ever read or replaced; that two jobs never
    write one `path` at all is OutputLock's part.
    """
    from tqdm import tqdm
    tag = job_tag(rank, world)  # first: every rank takes part in the broadcast before any sampling
    model, vae, args, facts = trained.model, trained.vae, trained.args, trained.facts
    num_samples, batch, seed = job.num_samples, job.batch, job.seed
    device = next(model.parameters()).device
    diffusion = make_diffusion(args, facts)
    y_all = fid_labels(num_samples, facts.num_classes, job.labels, seed)
    # a text model's prompt of sample i: its class's shape in colour i % 8, whatever batch it falls in
    prompts_all = class_prompts(y_all) if args.cond_type == "text" else None
    mine = range(rank * batch, num_samples, world * batch)
    # a rank may get none
    images, index = [np.zeros((0, facts.res, facts.res, 3), np.uint8)], [np.zeros(0, np.int64)]
    for start in tqdm(mine, desc="sampling", disable=rank != 0, dynamic_ncols=True):
        idx = np.arange(start, min(start + batch, num_samples))
        noise = make_noise(seed + idx, latent_shape(facts), device)
        ctrl = job.control.to(device).expand(len(idx), -1)
        prompts = [prompts_all[i] for i in idx] if prompts_all is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.bf16):
            x = generate(model, diffusion, noise, semantic_input(args, facts, y_all[idx], device, prompts),
                         ctrl, sampling, Draw(batch=batch, seed=seed + start, seeds=seed + idx))
        images.append(to_uint8(vae.decode(x)).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)
        index.append(idx)
    part = lambda r: f"{path[:-len('.npz')]}.{tag}.rank{r}.npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(part(rank), lambda f: np.savez(f, arr_0=np.concatenate(images), index=np.concatenate(index)))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        arr = np.zeros((num_samples, facts.res, facts.res, 3), np.uint8)
        for r in range(world):
            with np.load(part(r)) as z:
                arr[z["index"]] = z["arr_0"]
        settings = dict(job.record or {}, num_samples=num_samples, labels=job.labels, seed=seed, batch=batch,
                        sampler=sampling.method, steps=sampling.steps, spacing=sampling.spacing,
                        t_min=sampling.t_min if args.objective == "flow" else None,
                        cfg_scale=sampling.scale, cfg_schedule=sampling.schedule, cfg_power=sampling.power,
                        ctrl_scale=sampling.ctrl, interval=list(sampling.interval),
                        control=dict(zip(CONTROL_SIGNALS, job.control.tolist())),
                        precision="bf16" if job.bf16 else "fp32", vae=facts.vae, model=args.model,
                        cond=args.cond, res=facts.res, dataset=args.dataset, num_classes=facts.num_classes,
                        shift_alpha=diffusion.alpha, arch=args.arch, objective=args.objective,
                        world_size=world)
        # the samples whole under a temporary name first (a failure leaves an earlier pair as it was), then
        # the pair is swapped: an earlier .json never stays beside these samples
        settings_path = path[:-len(".npz")] + ".json"
        whole = f"{path}.{tag}.new"
        atomic_write(whole, lambda f: np.savez(f, arr_0=arr, labels=y_all))
        if os.path.exists(settings_path):
            os.remove(settings_path)
        os.replace(whole, path)
        atomic_write(settings_path, lambda f: f.write(json.dumps(settings, indent=1).encode()))
        for r in range(world):
            os.remove(part(r))
    return path


#################################################################################
#                                   CLI                                         #
#################################################################################

def npz_name(flags, sampling, control, base):
    """--num-samples' default file name: every sampling flag that changes the samples and is not at its
    default, so two runs of one checkpoint that differ in any of them never write over each other (the .json
    beside the file holds them all, and which checkpoint step made it). `sampling`: the resolved settings
    (a diffusion.Sampling)."""
    name = f"samples-{flags.num_samples}-cfg{sampling.scale:g}-{sampling.method}{sampling.steps}"
    for signal in CONTROL_SIGNALS:
        if control[SIGNAL[signal]] != base[SIGNAL[signal]]:
            name += f"-{signal.replace('_', '')}{control[SIGNAL[signal]].item():g}"
    lo, hi = sampling.interval
    schedule = f"{sampling.schedule}{sampling.power:g}"
    extras = dict(spacing=flags.spacing, tmin=None if flags.t_min is None else f"{flags.t_min:g}",
                  schedule=schedule if sampling.schedule != "constant" else None,
                  ctrl=f"{sampling.ctrl:g}" if sampling.ctrl else None,
                  interval=f"{lo:g}-{hi:g}" if (lo, hi) != (0, 1) else None,
                  labels=flags.labels if flags.labels != "equal" else None, seed=flags.seed or None,
                  precision=flags.precision if flags.precision != "auto" else None, vae=flags.vae)
    return name + "".join(f"-{k}{v}" for k, v in extras.items() if v is not None) + ".npz"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = p.add_argument
    flag("--ckpt", required=True, help="checkpoint file (.pt, or a .safetensors export) or run folder")
    flag("--export", default=None, help="write the EMA weights to this .safetensors file, the run's "
         "configuration as JSON in its metadata, and exit: --ckpt and train.py --init-from read it")
    flag("--out", default=None, help="a grid's image, .png, .jpg, .jpeg or .webp (default: <run "
         "folder>/grid.png), or the .npz of --num-samples (default: <run "
         "folder>/samples-N-cfgS-SAMPLERSTEPS.npz, plus every setting not at its default: -flip1-ctrl2)")
    flag("--classes", default=None, help="comma-separated class indices (default: the first 10)")
    flag("--prompt", action="append", default=None, help="text model: a prompt (one grid row); repeat for "
         "more rows")
    flag("--prompts", default=None, help="text model: a file of prompts, one per line")
    flag("--text-encoding", type=text_encoding, default="utf-8", help="the encoding of the --prompts file")
    flag("--seeds", default="0,1,2,3", help="comma-separated noise seeds, one grid column each")
    flag("--cfg-scale", default=None, help="semantic guidance scale(s), comma-separated (default: the run's "
         "train.py --cfg-scale, which its recipe sets)")
    flag("--steps", type=int, default=None, help="sampler steps (default: the run's --sample-steps)")
    flag("--sampler", default=None, choices=sorted({s for v in SAMPLERS.values() for s in v}),
         help="; ".join(f"{objective}: {' | '.join(names)}" for objective, names in SAMPLERS.items())
         + " (default: the run's --sampler, its recipe's, else the objective's first)")
    flag("--spacing", default=None, choices=SPACINGS, help="ddpm: which of the 1000 steps are visited "
         "(default: the run's --sample-spacing, else the sampler's own)")
    flag("--cfg-schedule", default=None, choices=CFG_SCHEDULES, help="the semantic scale along t (default: "
         "the run's --cfg-schedule)")
    flag("--cfg-power", type=float, default=None, help="power-cosine's exponent (default: the run's "
         "--cfg-power)")
    flag("--t-min", type=float, default=None, help="flow: the sampler's end point, the last noise level it "
         "evaluates (default: the run's train.py --t-min; 0: the grid whose end moves with --steps)")
    flag("--vae", default=None, help="decode with this autoencoder instead of the checkpoint's (e.g. sd-mse "
         "for DiT)")
    flag("--flip", default=None, help="flip values to sweep, e.g. 0,1")
    flag("--orig-size", default=None, help="original-size values (pixels) to sweep, e.g. 16,64")
    flag("--crop-offset", default=None, help="crop offsets (pixels, top = left) to sweep, e.g. 0,8")
    flag("--eval-per-class", type=int, default=0, help="shapes: run the checker on N samples per class")
    flag("--num-samples", type=int, default=0, help="write N samples as one .npz for fid.py (ranks share "
         "the work under torchrun); --out is then the .npz path")
    flag("--labels", default="equal", choices=("equal", "random"), help="--num-samples: N / classes per "
         "class in order, or uniform from --seed")
    flag("--seed", type=int, default=0, help="--num-samples: sample i starts from noise seed SEED + i")
    flag("--batch", type=int, default=64, help="--num-samples: images per forward pass")
    flag("--ctrl-scale", type=float, default=0.0, help="control guidance scale (0 = none)")
    flag("--interval", default="0,1", help="guide only while t is in LO,HI")
    flag("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="--num-samples: auto = bf16 "
         "autocast on GPU, fp32 on CPU")
    return p.parse_args(argv)


def check_numbers(flags):
    """The numbers and lists first, by the rules train.py's flags meet (config.py): a bad one fails here, not
    after the model is loaded or deep inside the sampler, and an empty list is refused, never read as the
    default."""
    at_least("--ctrl-scale", flags.ctrl_scale, 0, " (0 = no control guidance)")
    if flags.cfg_power is not None:
        above("--cfg-power", flags.cfg_power)
    if flags.t_min is not None:
        end_point("--t-min", flags.t_min)
    interval = number_list(flags.interval, "--interval")
    if len(interval) != 2:
        raise SystemExit(f"--interval: give two numbers LO,HI (guidance applies while LO <= t <= HI), got "
                         f"{flags.interval!r}")
    if not 0 <= interval[0] <= interval[1] <= 1:
        raise SystemExit(f"--interval {flags.interval}: need 0 <= LO <= HI <= 1 (t runs from 1, noise, to 0, "
                         "data)")
    scales = number_list(flags.cfg_scale, "--cfg-scale")
    for scale in scales or []:
        at_least("--cfg-scale", scale, 0, " (1 = no guidance)")
    for flag in ("steps", "batch"):
        if getattr(flags, flag) is not None:
            at_least(f"--{flag}", getattr(flags, flag), 1)
    for flag in ("num_samples", "eval_per_class"):  # 0 = not asked for
        at_least(f"--{flag.replace('_', '-')}", getattr(flags, flag), 0)
    seed("--seed", flags.seed)
    for value in number_list(flags.seeds, "--seeds", whole=True):
        seed("--seeds", value)
    number_list(flags.classes, "--classes", whole=True)  # their range is the model's: checked once loaded
    for flip in number_list(flags.flip, "--flip") or []:
        if flip not in (0, 1):
            raise SystemExit(f"--flip must be 0 or 1 (1 = mirrored), got {flip:g}")
    for size in number_list(flags.orig_size, "--orig-size") or []:
        above("--orig-size", size)
    for offset in number_list(flags.crop_offset, "--crop-offset") or []:
        at_least("--crop-offset", offset, 0)
    return scales, tuple(interval)


class Plan(NamedTuple):
    """What this call draws: the sampling (diffusion.Sampling), the guidance scales of a grid's columns, and
    the control vectors of its variants."""

    sampling: Sampling
    scales: list
    controls: list


def plan_of(flags, trained, scales, interval):
    """This call's Plan: the sampling flags where given, else the run's recorded settings (its recipe's);
    checked against the model's objective before any sampling."""
    args = trained.args
    over = dict(method=flags.sampler, steps=flags.steps, spacing=flags.spacing, schedule=flags.cfg_schedule,
                power=flags.cfg_power, t_min=flags.t_min)
    sampling = run_sampling(args, ctrl=flags.ctrl_scale, interval=interval,
                            **{k: v for k, v in over.items() if v is not None})
    sampling = sampling._replace(scale=(scales or [args.cfg_scale])[0])
    if sampling.method not in SAMPLERS[args.objective]:
        raise SystemExit(f"--sampler {sampling.method}: this model was trained with --objective "
                         f"{args.objective}; choose one of {SAMPLERS[args.objective]}")
    if flags.spacing and args.objective != "ddpm":
        raise SystemExit(f"--spacing {flags.spacing}: spaces the steps of a DDPM model; this one is a flow "
                         f"model, whose sampler walks its shifted time grid")
    # DDIM's integer stride fits only some step counts: say so before any sampling
    if args.objective == "ddpm":
        try:
            check_sampling(sampling, make_diffusion(args, trained.facts).num_steps)
        except ValueError as e:
            raise SystemExit(f"--steps {sampling.steps}: {e}") from None
    return Plan(sampling, scales or [sampling.scale], control_sweep(flags, trained.facts))


def control_sweep(flags, facts):
    """One control vector per combination of --flip, --orig-size and --crop-offset, from the sampling
    default."""
    flips, sizes = number_list(flags.flip, "--flip"), number_list(flags.orig_size, "--orig-size")
    offsets = number_list(flags.crop_offset, "--crop-offset")
    controls = []
    for flip, size, off in itertools.product(flips or [None], sizes or [None], offsets or [None]):
        control = sampling_control(facts)
        if flip is not None:
            control[SIGNAL["flip"]] = flip
        if size is not None:
            control[SIGNAL["orig_h"]] = control[SIGNAL["orig_w"]] = size
        if off is not None:
            control[SIGNAL["crop_top"]] = control[SIGNAL["crop_left"]] = off
        controls.append(control)
    return controls


# the sweep flag of each control group whose gate a run may have set `off`
SWEEPS = {"flip": "flip", "size": "orig_size", "crop": "crop_offset"}


def untrained_conditions(flags, plan, args):
    """One line for each condition this call asks for that the model never received in training: a control
    swept through a group whose gate was off (it never reached the network, so the samples cannot follow
    it), a mirrored sample from a model never shown a mirrored image, guidance away from a null condition
    that training never dropped to. The samples are still drawn: these are warnings, not errors."""
    said = []
    if ROUTES[args.cond].gated:  # the other routes add the control ungated: their --gate-* do nothing
        for group, dest in SWEEPS.items():
            spec, value = getattr(args, f"gate_{group}"), getattr(flags, dest)
            if value is not None and parse_gate(spec)[0] == "off":
                said.append(f"--{dest.replace('_', '-')} {value}: this model was trained with --gate-{group} "
                            f"{spec}, so the {group} control never reached the network and the samples "
                            "cannot follow it")
    if 1.0 in (number_list(flags.flip, "--flip") or []) and not args.hflip:
        said.append("--flip 1: this model was trained with --no-hflip, so it never saw a mirrored image")
    unguided = [f"{s:g}" for s in plan.scales if s != 1]
    if unguided and args.p_drop_sem == 0:
        said.append(f"guidance scale {','.join(unguided)}: this model was trained with --p-drop-sem 0, so "
                    "the unconditional prediction guidance pushes away from was never trained")
    if plan.sampling.ctrl and args.p_drop_ctrl == 0:
        said.append(f"--ctrl-scale {plan.sampling.ctrl:g}: this model was trained with --p-drop-ctrl 0, so "
                    "the prediction without control that control guidance pushes away from was never trained")
    return said


def read_prompts(flags, trained):
    """--prompt and --prompts, for a text model only."""
    prompts = list(flags.prompt or [])
    if flags.prompts:
        if not os.path.isfile(flags.prompts):
            raise SystemExit(f"--prompts {flags.prompts!r}: no such file")
        try:
            lines = read_lines(flags.prompts, flags.text_encoding, f"--prompts {flags.prompts}")
        except ValueError as e:  # not in --text-encoding: the file and line named
            raise SystemExit(str(e)) from None
        found = [line.strip() for line in lines if line.strip()]
        if not found:
            raise SystemExit(f"--prompts {flags.prompts!r}: the file holds no prompt (one per line)")
        prompts += found
    if prompts and trained.args.cond_type != "text":
        raise SystemExit("--prompt / --prompts need a text-conditional checkpoint (train.py --cond-type "
                         "text)")
    return prompts


#################################################################################
#                      The four modes: one function each                        #
#################################################################################


def export_mode(flags, trained):
    """--export: the EMA weights and the configuration as one .safetensors file."""
    export_safetensors(trained.model, vars(trained.args), dataclasses.asdict(trained.facts), trained.step,
                       flags.export)
    print(f"wrote {flags.export}")
    return flags.export


def checker_verdict(trained, per_class, sampling):
    """The shapes checker's accuracies (shapes.evaluate_shapes) of a shapes model's samples drawn as
    `sampling` says, decoded by its own autoencoder: train.py's end-of-run eval.json and --eval-per-class."""
    device = next(trained.model.parameters()).device
    plan = EvalPlan(per_class, sampling, progress=True)
    return evaluate_shapes(trained.model, make_diffusion(trained.args, trained.facts), trained.args,
                           trained.facts, plan, device, vae=trained.vae)


def eval_mode(flags, trained, plan):
    """--eval-per-class: the shapes checker's accuracies, printed as one JSON line."""
    if trained.facts.source_dataset != "shapes":
        raise SystemExit("--eval-per-class uses the shapes checker: it needs a checkpoint trained on shapes")
    if len(plan.scales) > 1:
        raise SystemExit("--eval-per-class grades one setting: give --cfg-scale one value")
    sampling = plan.sampling
    res = checker_verdict(trained, flags.eval_per_class, sampling)
    print(json.dumps(dict(res, cfg_scale=sampling.scale, cfg_schedule=sampling.schedule,
                          ctrl_scale=sampling.ctrl, interval=list(sampling.interval),
                          per_class=flags.eval_per_class, sampler=sampling.method, steps=sampling.steps,
                          spacing=sampling.spacing, t_min=sampling.t_min)))
    return res


def npz_mode(flags, trained, plan, rank, world):
    """--num-samples: one .npz (and its settings .json) for fid.py, the ranks sharing the work."""
    if len(plan.controls) > 1 or len(plan.scales) > 1:
        raise SystemExit("--num-samples draws one setting: give --cfg-scale, --flip, --orig-size and "
                         "--crop-offset one value each")
    if flags.prompt or flags.prompts:
        raise SystemExit("--num-samples draws its prompts from --labels (the shapes captions of each class); "
                         "--prompt / --prompts are for grids")
    facts = trained.facts
    if trained.args.cond_type == "text" and facts.source_dataset != "shapes":
        raise SystemExit(f"--num-samples on a text model trained on {facts.source_dataset}: this sampler "
                         f"only knows the shapes captions; write a grid with --prompts FILE instead")
    control = plan.controls[0]
    out = flags.out or os.path.join(os.path.dirname(trained.file),
                                    npz_name(flags, plan.sampling, control, sampling_control(facts)))
    check_output(out, (".npz",), input_files(flags, trained))  # the default name too (main checked --out)
    device = next(trained.model.parameters()).device
    job = NpzJob(flags.num_samples, control, flags.labels, flags.seed, flags.batch,
                 use_bf16(flags.precision, device), record=dict(ckpt=trained.file, ckpt_step=trained.step))
    with OutputLock(out, rank=rank, world=world):  # a second writer of `out` is refused before it samples
        sample_npz(trained, plan.sampling, out, job, rank, world)
    if rank == 0:
        print(f"wrote {out} and its settings {out[: -len('.npz')]}.json")
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def grid_mode(flags, trained, plan):
    """The default: an image grid of classes (or prompts) x guidance scales x control variants x seeds."""
    prompts = read_prompts(flags, trained)
    classes = number_list(flags.classes, "--classes", whole=True)
    if classes and not 0 <= min(classes) <= max(classes) < trained.facts.num_classes:
        raise SystemExit(f"--classes: the model knows classes 0..{trained.facts.num_classes - 1}")
    folder = os.path.dirname(os.path.abspath(flags.ckpt)) if os.path.isfile(flags.ckpt) else flags.ckpt
    out = flags.out or os.path.join(folder, "grid.png")
    check_output(out, IMAGE_TYPES, input_files(flags, trained))  # the default name too (main checked --out)
    seeds = number_list(flags.seeds, "--seeds", whole=True)
    layout = GridLayout(classes, seeds, plan.controls, plan.scales, prompts or None)
    class_grid(trained, plan.sampling, out, layout, progress=True)
    print(f"wrote {out}")
    return out


def input_files(flags, trained=None):
    """What this call reads, by flag (an output may be none of them): --ckpt (and the checkpoint file a run
    folder resolved to) and --prompts."""
    return {"--ckpt": flags.ckpt, "--ckpt's checkpoint": trained and trained.file, "--prompts": flags.prompts}


def check_outputs(flags):
    """What this call writes, checked before any work by checks.check_output: --export a .safetensors
    file, --num-samples' --out an .npz, a grid's --out an image (.png, .jpg, .jpeg or .webp)."""
    if flags.export:
        check_output(flags.export, (".safetensors",), input_files(flags), "--export")
    elif flags.out and not flags.eval_per_class:
        check_output(flags.out, (".npz",) if flags.num_samples else IMAGE_TYPES, input_files(flags))


def main(argv=None):
    flags = parse(argv)
    scales, interval = check_numbers(flags)
    check_outputs(flags)
    rank, world = 0, 1
    if flags.num_samples:  # torchrun: one process per GPU, the local rank picks it
        rank, world, device = setup_distributed()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_model(flags.ckpt, device, flag="--ckpt")
    if flags.export:
        return export_mode(flags, trained)
    plan = plan_of(flags, trained, scales, interval)
    for line in untrained_conditions(flags, plan, trained.args) if rank == 0 else []:
        print(f"warning: {line}", flush=True)
    facts = trained.facts
    if flags.vae:  # decode with another autoencoder of the same latent layout
        if latent_geometry(flags.vae) != latent_geometry(facts.vae):
            raise SystemExit(f"--vae {flags.vae}: its latent layout differs from the checkpoint's --vae "
                             f"{facts.vae}")
        facts = dataclasses.replace(facts, vae=flags.vae)
    trained = trained._replace(facts=facts, vae=make_autoencoder(facts).to(device))
    if flags.eval_per_class:
        return eval_mode(flags, trained, plan)
    if flags.num_samples:
        return npz_mode(flags, trained, plan, rank, world)
    return grid_mode(flags, trained, plan)


if __name__ == "__main__":
    main()
