"""
A run's configuration, in one layer a reader can follow: every flag of train.py with its default next to its
meaning (the defaults are the paper's ImageNet-256 setting), the recipes as dicts of overrides, and one rule
for a value:

    the command line, else the recipes (in order; a later one wins), else the flag's default

`--dataset shapes` starts the recipe chain with `shapes` (the CPU scale); `--recipe a,b` adds recipes after
it. `python train.py --print-config ...` shows every value and where it came from.

What a run learns from the sources it opens -- a latent cache's resolution and autoencoder, the dataset's
classes, the text encoder's width, a checkpoint's base resolution, the number of processes -- is not a flag:
it is resolved once, where the source is opened (learn_facts), and kept in `Facts`, apart from the flags,
which are never written to after parsing. A checkpoint stores both (`args` and `facts`), so sample.py rebuilds
the model from the file alone.

This file also holds the checks that fail before any work, and what a configuration builds: the dataset, the
model and the diffusion.
"""
import argparse
import dataclasses
import importlib.util
import json
import os

import torch
from torch.utils.data import IterableDataset

from checkpoint import ADDED_FACTS, base_res_of, read_init
from conditioning import DEFAULT_GATES, GATES, TEXT_NULLS, TEXT_PADS, parse_gate
from data import (
    MAX_WORKERS,
    CaptionFolderDataset,
    ImageFolderDataset,
    WebDatasetShards,
    folder_default_control,
)
from diffusion import (
    BETA_SCHEDULES,
    CFG_SCHEDULES,
    DEFAULT_SPACING,
    OBJECTIVES,
    SAMPLERS,
    SPACINGS,
    Diffusion,
    Sampling,
    check_spacing,
    noise_shift,
    spaced_steps,
)
from latents import Autoencoder, LatentCacheDataset, encode_command, latent_geometry
from model import ARCHS, CONDS, MODELS, POS_MODES, ROUTES, SIZES, build_model, mdt_decode_layers
from shapes import ShapesDataset, shapes_default_control
from unet import UNET_CONDS, UNET_SIZES, build_unet, unet_size

#################################################################################
#                        Recipes: dicts of overrides                            #
#################################################################################
# The published recipes, one flag each (README "The baselines" and docs/baselines.md give the source of every
# value). A recipe is how a model is trained, at any size: the model sizes stay the flags' (XL/2) or the scale
# recipe's (shapes, small: XS/4 on a CPU). Values no source publishes are ours and the docs say so.
RECIPES = {
    # the paper's own model and its shared setting: the flag defaults, stated whole so that they also hold
    # over a scale recipe (`--dataset shapes --recipe ours` trains with them at the CPU scale)
    "ours": dict(arch="dit", cond="ours", objective="flow", pred="v", optimizer="adamw", lr=1e-4, beta1=0.9,
                 beta2=0.95, eps=1e-8, wd=0.0, warmup=1000, decay="constant", clip=1.0, ema=0.9999,
                 ema_warmup="on", batch=256, sample_steps=50),
    # DiT (facebookresearch/DiT train.py, sample_ddp.py): eps + learned variance, plain AdamW, EMA from the
    # first step
    "dit": dict(arch="dit", cond="adaln", objective="ddpm", beta_schedule="linear", learn_sigma=True,
                pred="eps", optimizer="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, warmup=0,
                decay="constant", clip=0.0, ema=0.9999, ema_warmup="off", batch=256, sampler="ddpm",
                sample_steps=250, cfg_scale=1.5),
    # PixArt-alpha (configs/pixart_config/PixArt_xl2_img256_internal.py; scripts/inference.py samples with
    # DPM-Solver, 20 steps, time-uniform, guidance 4.5)
    "pixart": dict(arch="dit", cond="xattn", objective="ddpm", beta_schedule="linear", learn_sigma=True,
                   pred="eps", optimizer="adamw", lr=2e-5, beta1=0.9, beta2=0.999, eps=1e-10, wd=0.03,
                   warmup=1000, decay="constant", clip=0.01, ema=0.9999, ema_warmup="off", batch=256,
                   sampler="dpm++2m", sample_spacing="time", sample_steps=20, cfg_scale=4.5),
    # mDT-v2 (sail-sg/MDT scripts/image_train.py; image_sample.py: 250 ancestral steps, guidance 3.8 on the
    # power-cosine schedule, power 4): Adan, min-SNR-5 weighting, masked training
    "mdt": dict(arch="mdt", cond="adaln", objective="ddpm", beta_schedule="linear", learn_sigma=True,
                pred="eps", optimizer="adan", lr=3e-4, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, wd=0.0,
                warmup=0, decay="constant", clip=1.0, ema=0.9999, ema_warmup="off", batch=256, mask_ratio=0.3,
                min_snr=5.0, sampler="ddpm", sample_steps=250, cfg_scale=3.8, cfg_schedule="power-cosine",
                cfg_power=4.0),
    # LDM (CompVis/latent-diffusion configs/latent-diffusion/cin256-v2.yaml): UNet, sqrt-linear betas, no EMA
    "ldm": dict(arch="unet", cond="xattn", objective="ddpm", beta_schedule="ldm", learn_sigma=False,
                pred="eps", optimizer="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01, warmup=0,
                decay="constant", clip=0.0, ema=0.0, batch=256, sampler="ddim", sample_steps=250,
                cfg_scale=1.5),
    # SD3 (Esser et al. 2024): mmDiT, rectified flow with logit-normal t, QK-norm; sampled as
    # Stability-AI/sd3.5 sd3_infer.py's CONFIGS["sd3_medium"] does: DPM++ 2M, 50 steps, guidance 5.0
    "sd3": dict(arch="dit", cond="mmdit", objective="flow", pred="v", t_mean=0.0, t_std=1.0,
                optimizer="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, warmup=1000,
                decay="constant", clip=1.0, ema=0.9999, ema_warmup="on", batch=1024, sampler="dpm++2m",
                sample_steps=50, cfg_scale=5.0),
    # small images on a CPU in minutes (any folder, any resolution): pixel space, a small model, a high lr
    # with cosine decay, a short EMA, 4 class tokens (more attention mass for the label early in training),
    # x-prediction (the network outputs the clean image, easier for 48-value pixel patches than the velocity;
    # the loss stays on the velocity) and a noise shift of 3 (flat-coloured images keep their content at noise
    # levels where photos lose it)
    "small": dict(res=32, model="XS/4", vae="none", batch=64, lr=2e-3, steps=2000, warmup=100, decay="cosine",
                  ema=0.999, shift=3.0, pred="x", class_tokens=4, log_every=50, ckpt_every=1000,
                  sample_every=0, workers=0),
}
# the embedded dataset's own scale: `small` at 24 px, which converges in about ten minutes on 2 cores
RECIPES["shapes"] = dict(RECIPES["small"], res=24)
# the recipe a dataset's chain starts from (the others start from the flag defaults, the ImageNet setting)
DATASET_RECIPE = {"shapes": "shapes"}

#################################################################################
#                                  The flags                                    #
#################################################################################

DATASETS = ("shapes", "imagenet", "folder", "captions", "webdataset", "latents")
# what --data-path names for each dataset
DATA_PATHS = {"folder": "an ImageFolder tree DIR/<class>/<images>",
              "captions": "a folder of images, each with a same-stem .txt caption beside it, or a CSV file "
                          "with the header row image,caption",
              "webdataset": "a folder of .tar shards (NNNNN.jpg + NNNNN.txt per sample), a glob like "
                            "'cc12m/*.tar' or a brace range",
              "latents": "a cache folder made by encode.py"}
# `--dataset imagenet` without --data-path reads $IMAGENET_DIR, else this folder (relative to the working
# directory)
IMAGENET_DEFAULT = os.path.join("data", "imagenet", "train")


def recipe_names(text):
    """--recipe's value: comma-separated names of RECIPES."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose recipes among {', '.join(RECIPES)} "
                                         "(comma-separated)")
    return names


def gate_spec(text):
    """A --gate-* value: NAME or NAME:P1,P2 of conditioning.GATES, whose g(t) stays in [0, 1] for every t."""
    try:
        name, params = parse_gate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    g = GATES[name].fn(torch.linspace(0, 1, 101, dtype=torch.float64), *params)
    if not (torch.isfinite(g).all() and g.min() >= 0 and g.max() <= 1):
        raise argparse.ArgumentTypeError(f"gate {text!r}: g(t) must stay within [0, 1] for t in [0, 1] (it "
                                         f"reaches {g.min():.3g} .. {g.max():.3g}); {GATES[name].meaning}")
    return text


def parser(description=None):
    """train.py's flags; each default is the paper's ImageNet setting, and --help adds which recipes change
    it."""
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.dests, p.shown = [], {}  # every flag's name in args, in --help order, and its option

    def a(*names, **kw):
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        p.dests.append(dest)
        p.shown[dest] = names[0]  # how --print-config names it: --no-hflip for hflip
        by = [f"{r} {v[dest]}" for r, v in RECIPES.items() if dest in v and v[dest] != kw.get("default")]
        kw["help"] = kw.get("help", "") + (f" (default {kw.get('default')}" if "default" in kw else "") + \
            (f"; recipes: {', '.join(by)})" if by else (")" if "default" in kw else ""))
        p.add_argument(*names, **kw)

    gates = ", ".join(f"{n}: {g.meaning}" for n, g in GATES.items())
    routes = " | ".join(f"{n} ({r.source})" for n, r in ROUTES.items())
    # data
    a("--dataset", default="shapes", choices=DATASETS, help="shapes (embedded) | imagenet | folder | "
      "captions (image-caption pairs) | webdataset (.tar shards) | latents (a cache made by encode.py: its "
      "resolution and VAE)")
    a("--data-path", default=None, help="ImageFolder root for imagenet / folder (DIR/<class>/<images>); "
      "captions: a folder of images with .txt captions or a CSV file; webdataset: a folder of .tar shards, a "
      f"glob or a brace range (shards/{{00000..01242}}.tar); latents: the cache folder. imagenet: None = "
      f"$IMAGENET_DIR, else {IMAGENET_DEFAULT}")
    a("--res", type=int, default=256, help="training resolution in pixels (a latent cache: its own)")
    a("--crop", default="random", choices=("random", "center"), help="crop policy; crop offsets are recorded")
    a("--no-hflip", dest="hflip", action="store_false", default=True, help="disable random horizontal flips")
    a("--shapes-size", type=int, default=10000, help="shapes: number of distinct images")
    a("--size-corr", type=float, default=0.0, help="shapes: class <-> original-size correlation rho in [0, "
      "1]: with probability rho an even class is drawn small (res/2..res), an odd one large (res..2 res); 0 "
      "= independent")
    a("--vae", default="sd-ema", help="none (pixel space) | sd-ema | sd-mse | a diffusers AutoencoderKL path "
      "(a latent cache: its own)")
    # model
    a("--model", default="XL/2", help=f"size/patch: {', '.join(MODELS)}; --arch unet: "
      f"{', '.join(UNET_SIZES)}, or a "
      "transformer size for the UNet of its scale (unet.unet_size)")
    a("--arch", default="dit", choices=ARCHS + ("unet",),
      help="dit (transformer) | mdt (mDT-v2) | unet (LDM)")
    a("--cond", default="ours", choices=CONDS, help=f"conditioning route (model.ROUTES): {routes}")
    a("--qk-norm", default="auto", choices=("auto", "on", "off"),
      help="QK-norm; auto = as the route's recipe")
    a("--decode-layers", type=int, default=None, help="mdt: decoder blocks (None: 4 at depth >= 12 as "
      "MDTv2-XL/2; XS 2, T 0)")
    a("--mask-ratio", type=float, default=0.3, help="mdt: share of image tokens dropped in the masked pass "
      "(+ U[0, 0.2])")
    a("--class-tokens", type=int, default=1, help="context tokens per class label")
    a("--cond-type", default="class", choices=("class", "text"), help="semantic condition: class label or "
      "caption")
    a("--text-encoder", default="builtin", help="text: frozen encoder, `builtin` (no download) or a Hugging "
      "Face name / path (T5, CLIP, BERT-style; needs `pip install transformers`)")
    a("--text-max-length", type=int, default=None, help="text: tokens per prompt (None: builtin 16, HF "
      "min(77, the model's))")
    a("--text-pad", default="noisy_replicate", choices=TEXT_PADS, help="text: how padding slots are filled")
    a("--pad-noise", type=float, default=0.1, help="text: noisy_replicate noise std, x the prompt's feature "
      "std")
    a("--text-cache-gb", type=float, default=2.0, help="text: the caption features are encoded once into a "
      "cache file when they fit in this many GB (every rank holds it in RAM); else each batch's captions are "
      "encoded in the training step")
    a("--text-null", default="learned", choices=TEXT_NULLS, help="text: null prompt for guidance, a learned "
      "token sequence or the encoded empty string")
    a("--pos-mode", default="resample", choices=POS_MODES, help="positional embedding on grids beyond the "
      "base")
    for group, spec in DEFAULT_GATES.items():
        a(f"--gate-{group}", type=gate_spec, default=spec, help="routes that gate (ours): schedule g(t) of "
          f"the {group} control group, NAME or NAME:PARAMS, on the t the network reads (after the noise "
          f"shift); {gates}")
    # diffusion
    a("--objective", default="flow", choices=OBJECTIVES, help="flow (rectified flow, SD3) | ddpm (eps, 1000 "
      "steps)")
    a("--beta-schedule", default="linear", choices=BETA_SCHEDULES, help="ddpm: linear (DiT / ADM) | ldm")
    a("--learn-sigma", default=False, action=argparse.BooleanOptionalAction, help="ddpm: also learn the "
      "variance (DiT; trained by the VLB term)")
    a("--min-snr", type=float, default=0.0, help="ddpm: weight the eps loss by min(SNR, gamma) / SNR (0 = "
      "off)")
    a("--t-mean", type=float, default=0.0, help="flow: logit-normal mean of training t")
    a("--t-std", type=float, default=1.0, help="flow: logit-normal std of training t")
    a("--shift", type=float, default=1.0, help="flow: noise shift at the base resolution; alpha = shift * "
      "sqrt(tokens / base tokens)")
    a("--pred", default="v", choices=("v", "x", "eps"), help="network output. flow: v (velocity, SD3) or x "
      "(clean image, converted to v); ddpm: eps")
    a("--base-res", type=int, default=None, help="resolution whose token count has the noise shift --shift "
      "and defines the positional grid (None: --res; with --init-from the source checkpoint's, with --resume "
      "the run's)")
    a("--res-shift", default="on", choices=("on", "off"), help="scale the noise shift with the token count "
      "beyond --base-res (off: alpha = --shift at every resolution; the transfer ablation)")
    a("--p-drop-sem", type=float, default=0.1, help="probability of dropping the semantic condition "
      "(guidance)")
    a("--p-drop-ctrl", type=float, default=0.1,
      help="probability of dropping the control metadata (guidance)")
    # optimisation
    a("--recipe", type=recipe_names, default=None, help="published recipes, comma-separated: "
      f"{', '.join(RECIPES)}; "
      "each sets the flags it publishes, a later one winning; flags given here win over all")
    a("--print-config", action="store_true", help="print every value and where it came from, then exit")
    a("--batch", type=int, default=256, help="global batch size (split across ranks)")
    a("--steps", type=int, default=400_000, help="optimizer steps")
    a("--lr", type=float, default=1e-4, help="peak learning rate")
    a("--optimizer", default="adamw", choices=("adamw", "adan"), help="adamw | adan (mDT-v2; `pip install "
      "adan-pytorch`)")
    a("--beta1", type=float, default=0.9, help="first moment decay")
    a("--beta2", type=float, default=0.95, help="second moment decay (adan: of the gradient difference)")
    a("--beta3", type=float, default=0.99, help="adan: decay of the squared-gradient moment")
    a("--eps", type=float, default=1e-8, help="optimizer epsilon")
    a("--wd", type=float, default=0.0, help="decoupled weight decay")
    a("--warmup", type=int, default=1000, help="linear warm-up steps")
    a("--decay", default="constant", choices=("constant", "cosine"), help="learning-rate shape after warm-up "
      "(cosine ends at 10 %% of the peak)")
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: each rank runs --batch / "
      "(processes x N) images at a time and the step averages them, so the global batch stays --batch")
    a("--grad-ckpt", action="store_true", default=False, help="activation checkpointing of every transformer "
      "block (less memory, about one more forward)")
    a("--ema", type=float, default=0.9999, help="EMA decay (0: sample from the trained weights)")
    a("--ema-warmup", default="on", choices=("on", "off"), help="on: decay min(ema, (1 + step) / (10 + "
      "step)), so early averages are not dominated by the random initialisation; off: ema from the first "
      "step")
    # system
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 on GPU, fp32 on CPU")
    a("--compile", action="store_true", default=False, help="torch.compile the model")
    a("--workers", type=int, default=8, help="data-loader workers per rank")
    a("--seed", type=int, default=0, help="seed of the weights, the data order and the noise")
    a("--out", default="runs", help="folder for run folders")
    a("--resume", default=None,
      help="checkpoint file, run folder, or `auto` (newest complete checkpoint under --out)")
    a("--init-from", default=None, help="start from the weights of a checkpoint (ours, an official DiT .pt, "
      "or a `sample.py --export` .safetensors): every tensor whose name and shape match is loaded; the rest "
      "is reported")
    a("--log-every", type=int, default=100, help="steps between log lines")
    a("--ckpt-every", type=int, default=10_000, help="steps between checkpoints")
    a("--sample-every", type=int, default=10_000,
      help="steps between sample grids (0 = only at the end, -1 = none)")
    a("--keep", type=int, default=2, help="checkpoints kept in the run folder")
    a("--eval-per-class", type=int, default=20,
      help="shapes: checker evaluation samples per class at the end")
    a("--cfg-scale", type=float, default=2.0,
      help="semantic guidance scale of end-of-run samples and sample.py's")
    a("--cfg-schedule", default="constant", choices=CFG_SCHEDULES,
      help="the semantic guidance scale along t: "
      "constant, or power-cosine (mDT-v2: from 1 at noise up to --cfg-scale at the data)")
    a("--cfg-power", type=float, default=4.0, help="power-cosine's exponent (mDT-v2's scale_pow)")
    a("--sampler", default=None, choices=sorted({s for v in SAMPLERS.values() for s in v}), help="sampler of "
      "end-of-run samples and sample.py's: euler / heun / dpm++2m (flow), ddim / ddpm (ancestral) / dpm++2m "
      "(ddpm); None: the objective's first")
    a("--sample-steps", type=int, default=50,
      help="sampler steps of end-of-run samples and sample.py's (one network evaluation each; Heun's take "
      "two)")
    a("--sample-spacing", default=None, choices=SPACINGS, help="ddpm: which of the 1000 steps the sampler "
      "visits: ddim (ADM's integer stride), ddpm (ADM's even spacing), time (uniform, diffusers' linspace), "
      "logsnr (uniform in log-SNR; dpm++2m only); None: the sampler's own (ddim, ddpm, time)")
    # reliability
    a("--max-bad-steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    a("--max-skip-rate", type=float, default=0.05,
      help="stop if more than this fraction of images are unreadable")
    return p


UNSET = object()  # a flag the command line did not give


def get_args(argv=None, description=None):
    """The flags: each one from the command line, else the recipe chain, else its default. `args.sources` says
    which (flag -> "command line", "recipe NAME" or "default"); nothing else is ever written to `args`."""
    p = parser(description)
    dests = p.dests
    # argparse fills only the missing
    args = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, UNSET)))
    dataset = p.get_default("dataset") if args.dataset is UNSET else args.dataset
    chain = [DATASET_RECIPE[dataset]] if dataset in DATASET_RECIPE else []
    chain += args.recipe if args.recipe is not UNSET else []
    sources = {}
    for dest in dests:
        if getattr(args, dest) is not UNSET:
            sources[dest] = "command line"
            continue
        setter = next((r for r in reversed(chain) if dest in RECIPES[r]), None)
        setattr(args, dest, RECIPES[setter][dest] if setter else p.get_default(dest))
        sources[dest] = f"recipe {setter}" if setter else "default"
    args.recipe = chain
    args.sources = sources
    # one line per flag: its option, its value (a --no-X flag: whether it is on), its source
    if args.print_config:
        for dest in dests:
            if dest != "print_config":
                value = getattr(args, dest)
                value = not value if p.shown[dest].startswith("--no-") else value
                print(f"{p.shown[dest]:<20} {json.dumps(value):<24} # {sources[dest]}")
        raise SystemExit(0)
    return args


def given(args, key):
    """Whether the command line set this flag (a recipe's or the default value may yield to a source's)."""
    return args.sources.get(key) == "command line"


def said(args, key):
    """'--pred x (recipe shapes)': a flag's value and where it came from, for messages."""
    value = getattr(args, key)
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        shown = flag if value else f"--no-{key.replace('_', '-')}"
    else:
        shown = f"{flag} {value}"
    return f"{shown} ({args.sources.get(key, 'default')})"


#################################################################################
#                             Checks before any work                            #
#################################################################################

# Flags that act only in some runs: given on the command line for a run where they do nothing, they are named
# in a warning (validate). flag -> (when it acts, as a test of the args; what it is for).
ONLY_WHEN = {"decode_layers": (lambda a: a.arch == "mdt", "--arch mdt"),
             "mask_ratio": (lambda a: a.arch == "mdt", "--arch mdt"),
             "text_encoder": (lambda a: a.cond_type == "text", "--cond-type text"),
             "text_max_length": (lambda a: a.cond_type == "text", "--cond-type text"),
             "text_pad": (lambda a: a.cond_type == "text", "--cond-type text"),
             "pad_noise": (lambda a: a.cond_type == "text" and a.text_pad == "noisy_replicate",
                           "--text-pad noisy_replicate"),
             "text_null": (lambda a: a.cond_type == "text", "--cond-type text"),
             "text_cache_gb": (lambda a: a.cond_type == "text", "--cond-type text"),
             "class_tokens": (lambda a: a.cond_type == "class", "--cond-type class"),
             "beta_schedule": (lambda a: a.objective == "ddpm", "--objective ddpm"),
             "t_mean": (lambda a: a.objective == "flow", "--objective flow"),
             "t_std": (lambda a: a.objective == "flow", "--objective flow"),
             "shift": (lambda a: a.objective == "flow", "--objective flow"),
             "res_shift": (lambda a: a.objective == "flow", "--objective flow"),
             "sample_spacing": (lambda a: a.objective == "ddpm", "--objective ddpm"),
             "cfg_power": (lambda a: a.cfg_schedule == "power-cosine", "--cfg-schedule power-cosine"),
             "beta3": (lambda a: a.optimizer == "adan", "--optimizer adan"),
             "shapes_size": (lambda a: a.dataset == "shapes", "--dataset shapes")}


def needs_diffusers(vae, what, alternative=""):
    """An autoencoder is loaded through the optional package diffusers: say so before any work."""
    if vae != "none" and importlib.util.find_spec("diffusers") is None:
        raise SystemExit(f"{what} needs the optional package diffusers: pip install diffusers {alternative}"
                         .strip())


def check_resolution(model, arch, res, vae, pixels=True):
    """--res must tile into whole patches of the autoencoder's latent (or the UNet's total downsampling).
    `pixels`: whether to offer pixel space (--vae none) as a way out, which a latent cache has not."""
    patch = (2 ** (len(UNET_SIZES[unet_size(model)]["channel_mult"]) - 1)
             if arch == "unet"
             else int(model.split("/")[-1]))
    factor = latent_geometry(vae)[0]
    if res % (patch * factor):
        fits = max(1, res // (patch * factor)) * patch * factor
        hint = f"try --res {fits}" if pixels else f"encode a cache at --res {fits} or choose a smaller patch"
        if factor > 1 and pixels:
            hint += f", or train in pixel space with --vae none (--vae {vae} downsamples by {factor})"
        raise SystemExit(f"--res {res} must be divisible by patch {patch} x autoencoder factor {factor} = "
                         f"{patch * factor}; {hint}")


def validate(args):
    """Fail before any work with a message that says what to change (and where the value came from)."""
    if args.arch == "unet":
        if unet_size(args.model) is None:
            raise SystemExit(f"--arch unet: --model {args.model!r} is unknown; choose one of "
                             f"{', '.join(UNET_SIZES)} or a transformer size ({', '.join(MODELS)})")
        if args.cond not in UNET_CONDS:
            raise SystemExit("--arch unet conditions through cross-attention: use --cond xattn (LDM) or "
                             f"ours, not {said(args, 'cond')}")
        if args.cond_type == "text":
            raise SystemExit("--arch unet is the class-conditional LDM recipe here: use --cond-type class")
        if args.grad_ckpt:
            raise SystemExit("--grad-ckpt checkpoints transformer blocks: --arch unet has none (use --arch "
                             "dit or mdt)")
    elif args.model not in MODELS:
        raise SystemExit(f"--model {args.model!r} is unknown; choose one of {', '.join(MODELS)}")
    if args.dataset != "latents":  # a cache's resolution is known once it is opened (learn_facts)
        check_resolution(args.model, args.arch, args.res, args.vae)
    check_objective(args)
    check_routes(args)
    check_ranges(args)
    check_paths(args)
    if args.optimizer == "adan" and importlib.util.find_spec("adan_pytorch") is None:
        raise SystemExit("--optimizer adan (the mdt recipe) needs the Adan optimizer: pip install "
                         "adan-pytorch (or train with --optimizer adamw)")
    if args.dataset != "latents":  # a cache's autoencoder is checked once it is opened (open_dataset)
        needs_diffusers(args.vae, f"{said(args, 'vae')} (latent diffusion)", "(or train in pixel space "
                        "with --vae none)")
    if args.arch == "mdt":
        try:
            mdt_decode_layers(SIZES[args.model.split("/")[0]][0], args.decode_layers)
        except ValueError as e:
            raise SystemExit(f"{e} (--model {args.model})") from None
    for key, (acts, needs) in ONLY_WHEN.items():
        if given(args, key) and not acts(args):
            print(f"warning: --{key.replace('_', '-')} does nothing in this run: it acts with {needs}",
                  flush=True)


def check_objective(args):
    """What fits the objective: its prediction, variance, weighting and sampler (each named with its
    source)."""
    if (args.objective == "ddpm") != (args.pred == "eps"):
        fix = "--pred eps" if args.objective == "ddpm" else "--pred v (or x)"
        raise SystemExit(f"{said(args, 'pred')} does not fit {said(args, 'objective')}: ddpm predicts eps, "
                         f"flow predicts v or x; add {fix}")
    if args.learn_sigma and args.objective != "ddpm":
        raise SystemExit(f"{said(args, 'learn_sigma')} needs --objective ddpm; add --no-learn-sigma")
    if args.min_snr and args.objective != "ddpm":
        raise SystemExit(f"{said(args, 'min_snr')} weights the eps loss of --objective ddpm; add --min-snr 0")
    if args.sampler is not None and args.sampler not in SAMPLERS[args.objective]:
        raise SystemExit(f"{said(args, 'sampler')} does not fit {said(args, 'objective')}: choose one of "
                         f"{', '.join(SAMPLERS[args.objective])}")
    # DDIM's integer stride, a spacing the sampler cannot walk: say so now, not after training
    if args.objective == "ddpm" and args.sample_steps > 0:
        try:
            check_sampling(run_sampling(args), 1000)
        except ValueError as e:
            raise SystemExit(f"--sample-steps {args.sample_steps}: {e}") from None


def check_routes(args):
    """A gate schedule given for a route that adds its control ungated would do nothing: refused."""
    gated = ROUTES[args.cond].gated
    for group in DEFAULT_GATES:
        if given(args, f"gate_{group}") and not gated:
            raise SystemExit(f"--gate-{group}: --cond {args.cond} adds the control metadata ungated; the "
                             "gates act in the routes that gate "
                             f"({', '.join(n for n, r in ROUTES.items() if r.gated)})")


def check_ranges(args):
    """Every number in its range."""
    for name in ("batch", "steps", "res", "class_tokens", "log_every", "ckpt_every", "keep", "max_bad_steps",
                 "grad_accum", "sample_steps", "shapes_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("p_drop_sem", "p_drop_ctrl", "ema", "max_skip_rate", "beta1", "beta2", "beta3"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("lr", "shift", "t_std", "eps"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("warmup", "clip", "workers", "min_snr", "wd", "pad_noise", "eval_per_class",
                 "text_cache_gb"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.mask_ratio < 0.8:
        raise SystemExit(f"--mask-ratio must be in [0, 0.8) (0.2 is added at random), got {args.mask_ratio}")
    if not 0 <= args.size_corr <= 1 or (args.size_corr and args.dataset != "shapes"):
        raise SystemExit(f"--size-corr {args.size_corr}: a probability in [0, 1], for --dataset shapes only")
    if args.batch % args.grad_accum:
        raise SystemExit(f"--batch {args.batch} must be divisible by --grad-accum {args.grad_accum} (each "
                         f"step averages {args.grad_accum} equal micro-batches)")
    if args.workers > MAX_WORKERS:
        raise SystemExit(f"--workers {args.workers}: at most {MAX_WORKERS} per process")
    if args.cfg_scale < 0:
        raise SystemExit(f"--cfg-scale must be >= 0 (1 = no guidance), got {args.cfg_scale}")
    if not args.cfg_power > 0:
        raise SystemExit(f"--cfg-power must be > 0, got {args.cfg_power}")


def imagenet_dir(data_path):
    """--dataset imagenet's folder: --data-path, else $IMAGENET_DIR, else IMAGENET_DEFAULT."""
    return data_path or os.environ.get("IMAGENET_DIR") or IMAGENET_DEFAULT


def check_paths(args):
    """The data, the checkpoint to start from and the one to resume, before any work."""
    path = imagenet_dir(args.data_path) if args.dataset == "imagenet" else args.data_path
    if args.dataset == "imagenet" and not os.path.isdir(path):
        raise SystemExit(f"--dataset imagenet: no ImageNet train split at {path!r}. Set IMAGENET_DIR to it, "
                         f"put it at {IMAGENET_DEFAULT} (DIR/<class>/<images>), or pass --data-path DIR")
    if args.dataset not in ("shapes", "imagenet") and not path:
        raise SystemExit(f"--dataset {args.dataset} needs --data-path: {DATA_PATHS[args.dataset]}")
    if args.dataset == "captions" and not os.path.exists(path):
        raise SystemExit(f"--data-path {path!r}: no such folder or CSV file (--dataset captions reads a "
                         f"folder of images with .txt captions, or a CSV file of image,caption rows)")
    if args.dataset in ("folder", "latents") and not os.path.isdir(path):
        raise SystemExit(f"--data-path {path!r} does not exist or is not a directory")
    if args.init_from and not os.path.isfile(args.init_from):
        raise SystemExit(f"--init-from {args.init_from!r}: no such checkpoint file")
    # auto: the same command starts, then continues
    if args.init_from and args.resume and args.resume != "auto":
        raise SystemExit("--init-from starts a new run from other weights; --resume continues a run: give "
                         "one (or --resume auto, which starts from --init-from while the run has no "
                         "checkpoint yet)")
    if args.resume and args.resume != "auto" and not os.path.exists(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such checkpoint file or run folder (or use --resume "
                         "auto)")


#################################################################################
#                 What the sources say: opened once, kept apart                 #
#################################################################################


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a run learns from what it opens (learn_facts). Stored in every checkpoint beside the flags."""

    res: int  # the training resolution: --res, or a latent cache's own
    vae: str  # the autoencoder: --vae, or the one a latent cache was made with
    base_res: int  # --base-res, else a checkpoint's (--resume, --init-from), else res
    source_dataset: str  # what the images are: --dataset, or what a latent cache was made from
    num_classes: int  # the dataset's
    # where it was read: --data-path, or for imagenet the folder found ($IMAGENET_DIR, ...)
    data_path: str = None
    latent_scale: object = None  # a latent cache's (z - shift) * scale; None: the autoencoder's own
    latent_shift: object = None
    text_dim: int = None  # a text model's encoder: its width and tokens per prompt
    text_len: int = None
    world: int = 1  # processes the run trains with (a resume must keep them)
    data_size: int = None  # items in the dataset (None: a stream), a resume's check that the data is the same


def build_dataset(name, res, data_path=None, seed=0, size=10000, crop="random", hflip=True, progress=False,
                  size_corr=0.0):
    """A dataset by name: `imagenet` and `folder` read an ImageFolder tree, `captions` a folder of images with
    .txt captions or a CSV file of image,caption rows, `webdataset` .tar shards (a stream), `latents` a latent
    cache (its crop was fixed when it was made; `res` None: the cache's own, else it must be the cache's),
    `shapes` the embedded dataset (`size` images, `size_corr` its class <-> original-size correlation)."""
    if name == "shapes":
        return ShapesDataset(size=size, res=res, seed=seed, crop=crop, hflip=hflip, progress=progress,
                             size_corr=size_corr)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if data_path is None and name != "imagenet":
        raise ValueError(f"--dataset {name} needs --data-path: {DATA_PATHS[name]}")
    if name == "imagenet":
        return ImageFolderDataset(imagenet_dir(data_path), res, seed=seed, crop=crop, hflip=hflip)
    if name == "folder":
        return ImageFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip)
    if name == "captions":
        return CaptionFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip)
    if name == "webdataset":
        return WebDatasetShards(data_path, res, seed=seed, crop=crop, hflip=hflip)
    if name == "latents":
        ds = LatentCacheDataset(data_path, seed=seed, hflip=hflip)
        if res is not None and ds.res != res:
            raise ValueError(f"latent cache {data_path} holds {ds.res} px images, not --res {res}: train "
                             f"with --res {ds.res}, or encode a cache at {res} px into a new folder:\n  "
                             + encode_command(dict(ds.meta, res=res), "NEW_CACHE_DIR"))
        return ds


def open_dataset(args, progress=False):
    """train.py's dataset; a wrong path or an unfinished cache ends the run with what to do. A latent cache
    sets the resolution and the autoencoder: --res / --vae given on the command line must agree with it."""
    try:
        dataset = build_dataset(args.dataset,
                                args.res if given(args, "res") or args.dataset != "latents" else None,
                                args.data_path, seed=args.seed, size=args.shapes_size,
                                size_corr=args.size_corr, crop=args.crop, hflip=args.hflip, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"--dataset {args.dataset}: {e}") from None
    if getattr(dataset, "is_latent", False):  # what validate could not check before the cache was open
        if given(args, "vae") and args.vae != dataset.vae:
            raise SystemExit(f"--vae {args.vae}: the cache {args.data_path} holds {dataset.vae} latents")
        where = f"the latent cache {args.data_path} holds {dataset.res} px images of --vae {dataset.vae}"
        try:
            check_resolution(args.model, args.arch, dataset.res, dataset.vae, pixels=False)
        except SystemExit as e:
            raise SystemExit(f"{where}: {e.code}") from None
        needs_diffusers(dataset.vae, f"{where}; decoding them (the sample grids)")
    return dataset


def data_size(dataset):
    """Items in a dataset, or None for a stream (or anything else without a length)."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return None
    return len(dataset)


def learn_facts(args, dataset, encoder=None, resumed=None, world=1, init=None):
    """Facts of this run from its dataset, its text encoder, the checkpoint it resumes (`resumed`) or starts
    from (--init-from: `init`, its contents as checkpoint.read_init gave them, else opened here for its base
    resolution) and its number of processes."""
    latent = getattr(dataset, "is_latent", False)
    res, vae = (dataset.res, dataset.vae) if latent else (args.res, args.vae)
    base_res = args.base_res
    if base_res is None and resumed is not None:
        base_res = resumed["facts"]["base_res"]
    elif base_res is None and args.init_from:
        base_res = base_res_of(read_init(args.init_from) if init is None else init)
    return Facts(res=res, vae=vae, base_res=base_res or res,
                 source_dataset=dataset.meta["dataset"] if latent else args.dataset,
                 num_classes=dataset.num_classes,
                 data_path=imagenet_dir(args.data_path) if args.dataset == "imagenet" else args.data_path,
                 latent_scale=dataset.scale if latent else None,
                 latent_shift=dataset.shift if latent else None,
                 text_dim=encoder.dim if encoder is not None else None,
                 text_len=encoder.max_length if encoder is not None else None, world=world,
                 data_size=data_size(dataset))


# Flags that must agree between a checkpoint and the run that resumes it: the network's and the data's ...
ARCH_KEYS = ("model", "arch", "pred", "cond", "class_tokens", "pos_mode", "res_shift", "gate_size",
             "gate_crop", "gate_flip", "dataset", "objective", "learn_sigma", "beta_schedule", "qk_norm",
             "decode_layers", "cond_type", "text_encoder", "text_max_length", "text_pad", "pad_noise",
             "text_null")
# ... and those that the saved data position, noise streams and optimizer state depend on: changing them
# breaks an exact resume (another optimizer cannot read the saved moments). Every fact must agree too.
ORDER_KEYS = ("batch", "seed", "shapes_size", "size_corr", "grad_accum", "optimizer")


def config_mismatch(saved, args, facts):
    """Human-readable list of the settings that differ between a checkpoint (its stored `args` and `facts`)
    and this run."""
    # a stream's position
    keys = ARCH_KEYS + ORDER_KEYS + (("workers",) if args.dataset == "webdataset" else ())
    bad = [f"{k}: checkpoint {saved['args'].get(k)!r} vs now {getattr(args, k)!r}"
           for k in keys
           if saved["args"].get(k) != getattr(args, k)]
    now, was = dataclasses.asdict(facts), saved["facts"]
    return bad + [f"{k}: checkpoint {was.get(k)!r} vs now {v!r}"
                  for k, v in now.items()
                  if same_place(k, was.get(k)) != same_place(k, v)
                  and not (k in ADDED_FACTS and was.get(k) == ADDED_FACTS[k])]  # older: not recorded


def same_place(key, value):
    """A fact as compared on resume: a data path as an absolute path, so that `data/x` and `/home/me/data/x`
    given from the same folder are one dataset."""
    return os.path.abspath(value) if key == "data_path" and value else value


#################################################################################
#                        What a configuration builds                            #
#################################################################################


def latent_shape(facts):
    """(C, H, W) of the diffusion space: the model's input and the noise a sample starts from."""
    factor, channels = latent_geometry(facts.vae)
    return channels, facts.res // factor, facts.res // factor


def make_model(args, facts):
    """The network of this configuration, freshly initialised (from the global RNG)."""
    factor, channels = latent_geometry(facts.vae)
    common = dict(input_size=facts.res // factor, in_channels=channels,
                  out_channels=channels * (2 if args.learn_sigma else 1), num_classes=facts.num_classes,
                  class_tokens=args.class_tokens, cond=args.cond,
                  gates={"size": args.gate_size, "crop": args.gate_crop, "flip": args.gate_flip})
    if args.cond_type == "text":
        common["text"] = dict(text_dim=facts.text_dim, max_length=facts.text_len, pad=args.text_pad,
                              pad_noise=args.pad_noise, null=args.text_null)
    if args.arch == "unet":
        return build_unet(unet_size(args.model), **common)
    return build_model(args.model, arch=args.arch, pos_mode=args.pos_mode, base_size=facts.base_res // factor,
                       qk_norm={"auto": None, "on": True, "off": False}[args.qk_norm],
                       decode_layers=args.decode_layers, mask_ratio=args.mask_ratio, **common)


def make_autoencoder(facts):
    """The autoencoder between pixels and the diffusion space, with the latent scale (and shift) the data was
    made with: the VAE's own, or a latent cache's. Sampling decodes with the same."""
    return Autoencoder(facts.vae, scale=facts.latent_scale, shift=facts.latent_shift)


def make_diffusion(args, facts):
    """The objective, its noise-level shift at this resolution and its sampler settings."""
    alpha = noise_shift(args.shift, facts.res, facts.base_res) if args.res_shift == "on" else args.shift
    return Diffusion(args.objective, args.pred, alpha, args.t_mean, args.t_std, args.beta_schedule,
                     args.learn_sigma, min_snr=args.min_snr)


def run_sampling(args, **override):
    """The run's sampling settings (diffusion.Sampling) from its flags -- its recipe's sampler, steps, spacing
    and guidance -- with `override` replacing any of them."""
    own = Sampling(method=args.sampler, steps=args.sample_steps, spacing=args.sample_spacing,
                   scale=args.cfg_scale, schedule=args.cfg_schedule, power=args.cfg_power)
    own = own._replace(**override)
    # the sampler that a None stands for, named here once, so that every record says what was used
    method = own.method or SAMPLERS[args.objective][0]
    spacing = own.spacing or (DEFAULT_SPACING[method] if args.objective == "ddpm" else None)
    return own._replace(method=method, spacing=spacing)


def check_sampling(sampling, total=1000):
    """A ValueError, before any sampling, if the DDPM steps of `sampling` cannot be spaced (DDIM's integer
    stride fits only some counts) or its sampler cannot walk its spacing."""
    method, spacing = sampling.method, sampling.spacing
    if not 1 <= sampling.steps <= total:
        raise ValueError(f"sampling steps must be in 1..{total}, got {sampling.steps}")
    check_spacing(method, spacing)
    if spacing != "logsnr":
        spaced_steps(total, sampling.steps, spacing)


def sampling_control(facts):
    """The control a sample is drawn with unless a flag says otherwise: for a shapes model the shapes
    convention (sharp, centred crop, not mirrored), for every other the natural-image one (SDXL's: original =
    target size)."""
    if facts.source_dataset == "shapes":
        return shapes_default_control(facts.res)
    return folder_default_control(facts.res)


def use_bf16(precision, device):
    """--precision: bf16 autocast for `bf16`, and for `auto` on a GPU; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")
