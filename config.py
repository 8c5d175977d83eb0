"""
A run's configuration, in one layer a reader can follow: every flag of train.py with its default next to its
meaning (the defaults are the paper's ImageNet-256 setting), the recipes as dicts of overrides, and one rule
for a value:

    the command line, else the recipes (in order; a later one wins), else the flag's default

`--dataset shapes` starts the recipe chain with `shapes` (the CPU scale); `--recipe a,b` adds recipes after
it. `python train.py --print-config ...` checks the flags as training does, then shows every value and where
it came from.

This file also holds the checks that fail before any work. What a configuration builds (the dataset, the
model, the diffusion) and what a run learns from the sources it opens are build.py's.
"""
import argparse
import functools
import json
import os

import torch

from checks import above, at_least, end_point, finite, seed
from conditioning import DEFAULT_GATES, GATES, TEXT_NULLS, TEXT_PADS, parse_gate
from data import MAX_WORKERS, text_encoding
from ddpm import BETA_SCHEDULES, DEFAULT_SPACING, OBJECTIVES, SAMPLERS, SPACINGS, check_spacing, spaced_steps
from diffusion import CFG_SCHEDULES, T_MIN, Sampling
from latents import latent_geometry
from mdt import ARCHS, mdt_decode_layers
from model import CONDS, MODELS, POS_MODES, ROUTES, SIZES
from text import check_text_length
from unet import UNET_CONDS, UNET_SIZES, unet_size

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
    # Stability-AI/sd3.5 sd3_infer.py's CONFIGS["sd3_medium"] does: DPM++ 2M, 50 steps, guidance 5.0, its
    # grid (get_sigmas) from t = 1 down to sd3_impls.py's ModelSamplingDiscreteFlow.sigma_min, the shifted
    # t = 0.001 (at sd3_medium's shift 1: 0.001), then 0
    "sd3": dict(arch="dit", cond="mmdit", objective="flow", pred="v", t_mean=0.0, t_std=1.0,
                optimizer="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, warmup=1000,
                decay="constant", clip=1.0, ema=0.9999, ema_warmup="on", batch=1024, sampler="dpm++2m",
                sample_steps=50, cfg_scale=5.0, t_min=0.001),
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
    """A --gate-* value: NAME or NAME:P1,P2 of conditioning.GATES, whose g(t) stays in [0, 1] for every t.
    A NAME whose schedule has parameters comes back as NAME:P1,P2 with their defaults written out, so that the
    run's configuration says which schedule it trained with."""
    try:
        name, params = parse_gate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    values = GATES[name].fn(torch.linspace(0, 1, 101, dtype=torch.float64), *params)
    if not (torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise argparse.ArgumentTypeError(f"gate {text!r}: g(t) must stay within [0, 1] for t in [0, 1] (it "
                                         f"reaches {values.min():.3g} .. {values.max():.3g}); "
                                         f"{GATES[name].meaning}")
    if params and ":" not in text:
        return f"{name}:{','.join(repr(float(v)) for v in params)}"
    return text


def add_flag(p, group, *names, **kw):
    """One flag of `p` in the --help section `group`. Its help gains its default and the recipes that change
    it; its name in args goes to `p.dests` (in --help order) and the option as written to `p.options`
    (--print-config names `hflip` as --no-hflip)."""
    dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
    p.dests.append(dest)
    p.options[dest] = names[0]
    if "default" in kw:
        changed_by = [f"{r} {v[dest]}" for r, v in RECIPES.items() if dest in v and v[dest] != kw["default"]]
        kw["help"] += f" (default {kw['default']}" + (f"; recipes: {', '.join(changed_by)})" if changed_by
                                                      else ")")
    group.add_argument(*names, **kw)


def flag_group(p, title):
    """add_flag for the --help section `title`."""
    return functools.partial(add_flag, p, p.add_argument_group(title))


def recipe_flags(p):
    """Which recipes the values come from, and a look at the result."""
    flag = flag_group(p, "recipes")
    flag("--recipe", type=recipe_names, default=None, help="published recipes, comma-separated: "
         f"{', '.join(RECIPES)}; each sets the flags it publishes, a later one winning; flags given here win "
         "over all")
    flag("--print-config", action="store_true", help="check the flags as training does (not the data paths "
         "or the optional packages, which belong to the machine that trains), then print every value and "
         "where it came from, and exit")


def data_flags(p):
    """What the images are and how an item is drawn from them."""
    flag = flag_group(p, "data")
    flag("--dataset", default="shapes", choices=DATASETS, help="shapes (embedded) | imagenet | folder | "
         "captions (image-caption pairs) | webdataset (.tar shards) | latents (a cache made by encode.py: "
         "its resolution and VAE)")
    flag("--data-path", default=None, help="ImageFolder root for imagenet / folder (DIR/<class>/<images>);"
         " captions: a folder of images with .txt captions or a CSV file; webdataset: a folder of .tar "
         "shards, a glob or a brace range (shards/{00000..01242}.tar); latents: the cache folder. imagenet: "
         f"None = $IMAGENET_DIR, else {IMAGENET_DEFAULT}")
    flag("--res", type=int, default=256, help="training resolution in pixels (a latent cache: its own)")
    flag("--crop", default="random", choices=("random", "center"), help="crop policy; crop offsets are "
         "recorded")
    flag("--no-hflip", dest="hflip", action="store_false", default=True, help="disable random horizontal "
         "flips")
    flag("--shapes-size", type=int, default=10000, help="shapes: number of distinct images")
    flag("--size-corr", type=float, default=0.0, help="shapes: class <-> original-size correlation rho in "
         "[0, 1]: with probability rho an even class is drawn small (res/2..res), an odd one large (res..2 "
         "res); 0 = independent")
    flag("--vae", default="sd-ema", help="none (pixel space) | sd-ema | sd-mse | a diffusers AutoencoderKL "
         "path (a latent cache: its own)")
    flag("--text-encoding", type=text_encoding, default="utf-8", help="captions / webdataset: the encoding "
         "of the caption files (.txt, .csv); a file that does not decode in it is named with its line")


def model_flags(p):
    """The network: its size, architecture and conditioning route."""
    flag = flag_group(p, "model")
    routes = " | ".join(f"{n} ({r.source})" for n, r in ROUTES.items())
    flag("--model", default="XL/2", help=f"size/patch: {', '.join(MODELS)}; --arch unet: "
         f"{', '.join(UNET_SIZES)}, or a transformer size for the UNet of its scale (unet.unet_size)")
    flag("--arch", default="dit", choices=ARCHS + ("unet",), help="dit (transformer) | mdt (mDT-v2) | unet "
         "(LDM)")
    flag("--cond", default="ours", choices=CONDS, help=f"conditioning route (model.ROUTES): {routes}")
    flag("--qk-norm", default="auto", choices=("auto", "on", "off"), help="QK-norm; auto = as the route's "
         "recipe")
    flag("--decode-layers", type=int, default=None, help="mdt: decoder blocks (None: 4 at depth >= 12 as "
         "MDTv2-XL/2; XS 2, T 0)")
    flag("--mask-ratio", type=float, default=0.3, help="mdt: share of image tokens dropped in the masked "
         "pass (+ U[0, 0.2])")
    flag("--pos-mode", default="resample", choices=POS_MODES, help="positional embedding on grids beyond the "
         "base")


def conditioning_flags(p):
    """The semantic condition (class or caption), the control gates and the dropout that guidance needs."""
    flag = flag_group(p, "conditioning")
    gates = ", ".join(f"{n}: {g.meaning}" for n, g in GATES.items())
    flag("--class-tokens", type=int, default=1, help="context tokens per class label")
    flag("--cond-type", default="class", choices=("class", "text"), help="semantic condition: class label "
         "or caption")
    flag("--text-encoder", default="builtin", help="text: frozen encoder, `builtin` (no download) or a "
         "Hugging Face name / path (T5, CLIP, BERT-style; needs `pip install transformers`)")
    flag("--text-max-length", type=int, default=None, help="text: tokens per prompt (None: builtin 16, HF "
         "min(77, the model's))")
    flag("--text-pad", default="noisy_replicate", choices=TEXT_PADS, help="text: how padding slots are "
         "filled")
    flag("--pad-noise", type=float, default=0.1, help="text: noisy_replicate noise std, x the prompt's "
         "feature std")
    flag("--text-cache-gb", type=float, default=2.0, help="text: the caption features are encoded once "
         "into a cache file when they fit in this many GB (every rank holds it in RAM); else each batch's "
         "captions are encoded in the training step")
    flag("--text-null", default="learned", choices=TEXT_NULLS, help="text: null prompt for guidance, a "
         "learned token sequence or the encoded empty string")
    for group, spec in DEFAULT_GATES.items():
        flag(f"--gate-{group}", type=gate_spec, default=gate_spec(spec), help="routes that gate (ours): "
             f"schedule g(t) of the {group} control group, NAME or NAME:PARAMS (stored as NAME:PARAMS), on "
             f"the t the network reads (after the noise shift); {gates}")
    flag("--p-drop-sem", type=float, default=0.1, help="probability of dropping the semantic condition "
         "(guidance)")
    flag("--p-drop-ctrl", type=float, default=0.1, help="probability of dropping the control metadata "
         "(guidance)")


def objective_flags(p):
    """The diffusion objective: flow or DDPM, what the network predicts, and the noise levels it trains on."""
    flag = flag_group(p, "objective")
    flag("--objective", default="flow", choices=OBJECTIVES, help="flow (rectified flow, SD3) | ddpm (eps, "
         "1000 steps)")
    flag("--beta-schedule", default="linear", choices=BETA_SCHEDULES, help="ddpm: linear (DiT / ADM) | ldm")
    flag("--learn-sigma", default=False, action=argparse.BooleanOptionalAction, help="ddpm: also learn the "
         "variance (DiT; trained by the VLB term)")
    flag("--min-snr", type=float, default=0.0, help="ddpm: weight the eps loss by min(SNR, gamma) / SNR (0 "
         "= off)")
    flag("--t-mean", type=float, default=0.0, help="flow: logit-normal mean of training t")
    flag("--t-std", type=float, default=1.0, help="flow: logit-normal std of training t")
    flag("--shift", type=float, default=1.0, help="flow: noise shift at the base resolution; alpha = shift * "
         "sqrt(tokens / base tokens)")
    flag("--pred", default="v", choices=("v", "x", "eps"), help="network output. flow: v (velocity, SD3) or "
         "x (clean image, converted to v); ddpm: eps")
    flag("--base-res", type=int, default=None, help="resolution whose token count has the noise shift "
         "--shift and defines the positional grid (None: --res; with --init-from the source checkpoint's, "
         "with --resume the run's)")
    flag("--res-shift", default="on", choices=("on", "off"), help="scale the noise shift with the token "
         "count beyond --base-res (off: alpha = --shift at every resolution; the transfer ablation)")


def optimisation_flags(p):
    """The optimizer, its learning-rate shape, the batch and the EMA."""
    flag = flag_group(p, "optimisation")
    flag("--batch", type=int, default=256, help="global batch size (split across ranks)")
    flag("--steps", type=int, default=400_000, help="optimizer steps")
    flag("--lr", type=float, default=1e-4, help="peak learning rate")
    flag("--optimizer", default="adamw", choices=("adamw", "adan"), help="adamw | adan (mDT-v2; `pip "
         "install adan-pytorch`)")
    flag("--beta1", type=float, default=0.9, help="first moment decay")
    flag("--beta2", type=float, default=0.95, help="second moment decay (adan: of the gradient difference)")
    flag("--beta3", type=float, default=0.99, help="adan: decay of the squared-gradient moment")
    flag("--eps", type=float, default=1e-8, help="optimizer epsilon")
    flag("--wd", type=float, default=0.0, help="decoupled weight decay")
    flag("--warmup", type=int, default=1000, help="linear warm-up steps")
    flag("--decay", default="constant", choices=("constant", "cosine"), help="learning-rate shape after "
         "warm-up (cosine ends at 10 %% of the peak)")
    flag("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    flag("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: each rank runs --batch "
         "/ (processes x N) images at a time and the step averages them, so the global batch stays --batch")
    flag("--grad-ckpt", action="store_true", default=False, help="activation checkpointing of every "
         "transformer block (less memory, about one more forward)")
    flag("--ema", type=float, default=0.9999, help="EMA decay (0: sample from the trained weights)")
    flag("--ema-warmup", default="on", choices=("on", "off"), help="on: decay min(ema, (1 + step) / (10 + "
         "step)), so early averages are not dominated by the random initialisation; off: ema from the first "
         "step")


def sampling_flags(p):
    """How the run's end-of-run samples (and sample.py's, by default) are drawn."""
    flag = flag_group(p, "sampling")
    by_objective = "; ".join(f"{objective}: {' / '.join(names)}" for objective, names in SAMPLERS.items())
    flag("--cfg-scale", type=float, default=2.0, help="semantic guidance scale of end-of-run samples and "
         "sample.py's")
    flag("--cfg-schedule", default="constant", choices=CFG_SCHEDULES, help="the semantic guidance scale "
         "along t: constant, or power-cosine (mDT-v2: from 1 at noise up to --cfg-scale at the data)")
    flag("--cfg-power", type=float, default=4.0, help="power-cosine's exponent (mDT-v2's scale_pow)")
    flag("--sampler", default=None, choices=sorted({s for names in SAMPLERS.values() for s in names}),
         help=f"sampler of end-of-run samples and sample.py's, by objective ({by_objective}; ddpm's ddpm is "
         "ancestral sampling); None: the objective's first")
    flag("--sample-steps", type=int, default=50, help="sampler steps of end-of-run samples and sample.py's "
         "(one network evaluation each; Heun's take two)")
    flag("--sample-spacing", default=None, choices=SPACINGS, help="ddpm: which of the 1000 steps the "
         "sampler visits: ddim (ADM's integer stride), ddpm (ADM's even spacing), time (uniform, diffusers' "
         "linspace), logsnr (uniform in log-SNR; dpm++2m only); None: the sampler's own "
         f"({', '.join(f'{method}: {spacing}' for method, spacing in DEFAULT_SPACING.items())})")
    flag("--t-min", type=float, default=T_MIN, help="flow: the last noise level the sampler evaluates, the "
         "same at every step count; its last step returns the data prediction there (docs/samplers.md). 0: "
         "the grid before this flag, whose last level moves with --sample-steps")


def run_flags(p):
    """The machine, the run folder, what the loop writes and when, and when it gives up."""
    flag = flag_group(p, "run")
    flag("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 on GPU, fp32 on "
         "CPU")
    flag("--compile", action="store_true", default=False, help="torch.compile the model")
    flag("--workers", type=int, default=8, help="data-loader workers per rank")
    flag("--seed", type=int, default=0, help="seed of the weights, the data order and the noise")
    flag("--out", default="runs", help="folder for run folders")
    flag("--resume", default=None, help="checkpoint file, run folder, or `auto` (newest complete checkpoint "
         "under --out)")
    flag("--init-from", default=None, help="start from the weights of a checkpoint (ours, an official DiT "
         ".pt, or a `sample.py --export` .safetensors): every tensor whose name and shape match is loaded; "
         "the rest is reported")
    flag("--log-every", type=int, default=100, help="steps between log lines")
    flag("--ckpt-every", type=int, default=10_000, help="steps between checkpoints")
    flag("--sample-every", type=int, default=10_000, help="steps between sample grids (0 = only at the end, "
         "-1 = none)")
    flag("--keep", type=int, default=2, help="checkpoints kept in the run folder")
    flag("--eval-per-class", type=int, default=20, help="shapes: checker evaluation samples per class at the "
         "end")
    flag("--accept-data-change", action="store_true", default=False, help="--resume on training data whose "
         "fingerprint (file names, sizes, sampled content) differs from the checkpoint's: go on, saying so "
         "(refused without it)")
    flag("--max-bad-steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    flag("--max-skip-rate", type=float, default=0.05, help="stop if more than this fraction of images are "
         "unreadable")


def parser(description=None):
    """train.py's flags, in --help sections; each default is the paper's ImageNet setting, and --help adds
    which recipes change it."""
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.dests, p.options = [], {}
    for add_group in (recipe_flags, data_flags, model_flags, conditioning_flags, objective_flags,
                      optimisation_flags, sampling_flags, run_flags):
        add_group(p)
    return p


UNSET = object()  # a flag the command line did not give


def get_args(argv=None, description=None):
    """The flags: each one from the command line, else the recipe chain, else its default. `args.sources` says
    which (flag -> "command line", "recipe NAME" or "default"); nothing else is ever written to `args`. With
    --print-config: checks them (validate, without the machine's checks), prints them and exits."""
    p = parser(description)
    # argparse fills in only the flags that are missing from the namespace: UNSET marks every flag missing
    args = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(p.dests, UNSET)))
    dataset = p.get_default("dataset") if args.dataset is UNSET else args.dataset
    chain = [DATASET_RECIPE[dataset]] if dataset in DATASET_RECIPE else []
    chain += args.recipe if args.recipe is not UNSET else []
    sources = {}
    for dest in p.dests:
        if getattr(args, dest) is not UNSET:
            sources[dest] = "command line"
            continue
        recipe = next((r for r in reversed(chain) if dest in RECIPES[r]), None)
        setattr(args, dest, RECIPES[recipe][dest] if recipe else p.get_default(dest))
        sources[dest] = f"recipe {recipe}" if recipe else "default"
    args.recipe = chain
    args.sources = sources
    if args.print_config:
        validate(args)
        print_config(args, p.options)
        raise SystemExit(0)
    return args


def print_config(args, options):
    """One line per flag: its option, its value (a --no-X flag: whether it is on) and its source."""
    for dest, option in options.items():
        if dest != "print_config":
            value = getattr(args, dest)
            value = not value if option.startswith("--no-") else value
            print(f"{option:<20} {json.dumps(value):<24} # {args.sources[dest]}")


def set_on_command_line(args, key):
    """Whether the command line set this flag (a recipe's or the default value may yield to a source's)."""
    return args.sources.get(key) == "command line"


def describe_flag(args, key):
    """'--pred x (recipe shapes)': a flag's value and where it came from, for messages."""
    value = getattr(args, key)
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        shown = flag if value else f"--no-{key.replace('_', '-')}"
    else:
        shown = f"{flag} {value}"
    return f"{shown} ({args.sources.get(key, 'default')})"


#################################################################################
#                            Checks before any work                             #
#################################################################################

# Flags that act only in some runs: set on the command line for a run where they do nothing, they are named in
# a warning (validate). The setting they act with -> (whether a run has it, as a test of the args; the flags).
FLAGS_ACTING_ONLY_WITH = {
    "--arch mdt": (lambda args: args.arch == "mdt", ("decode_layers", "mask_ratio")),
    "--cond-type text": (lambda args: args.cond_type == "text",
                         ("text_encoder", "text_max_length", "text_pad", "text_null", "text_cache_gb")),
    "--text-pad noisy_replicate": (lambda args: args.cond_type == "text"
                                   and args.text_pad == "noisy_replicate", ("pad_noise",)),
    "--cond-type class": (lambda args: args.cond_type == "class", ("class_tokens",)),
    "--objective ddpm": (lambda args: args.objective == "ddpm", ("beta_schedule", "sample_spacing")),
    "--objective flow": (lambda args: args.objective == "flow", ("t_mean", "t_std", "shift", "res_shift")),
    "--cfg-schedule power-cosine": (lambda args: args.cfg_schedule == "power-cosine", ("cfg_power",)),
    "--optimizer adan": (lambda args: args.optimizer == "adan", ("beta3",)),
    "--dataset shapes": (lambda args: args.dataset == "shapes", ("shapes_size",)),
    "--dataset captions or webdataset": (lambda args: args.dataset in ("captions", "webdataset"),
                                         ("text_encoding",)),
}


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
    """Fail before any work with a message that says what to change (and where the value came from). What
    this machine must hold -- the data, the checkpoints named, the optional packages -- is checked apart
    (build.check_sources), since a configuration is often printed away from where it trains."""
    check_model(args)
    if args.dataset != "latents":  # a cache's resolution is known once it is opened (build.open_dataset)
        check_resolution(args.model, args.arch, args.res, args.vae)
    check_objective(args)
    check_routes(args)
    check_ranges(args)
    # --resume auto with --init-from is the same command that first starts a run, then continues it
    if args.init_from and args.resume and args.resume != "auto":
        raise SystemExit("--init-from starts a new run from other weights; --resume continues a run: give "
                         "one (or --resume auto, which starts from --init-from while the run has no "
                         "checkpoint yet)")
    if args.arch == "mdt":
        try:
            mdt_decode_layers(SIZES[args.model.split("/")[0]][0], args.decode_layers)
        except ValueError as e:
            raise SystemExit(f"{e} (--model {args.model})") from None
    for setting, (has_it, keys) in FLAGS_ACTING_ONLY_WITH.items():
        for key in keys:
            if set_on_command_line(args, key) and not has_it(args):
                print(f"warning: --{key.replace('_', '-')} does nothing in this run: it acts with {setting}",
                      flush=True)


def check_model(args):
    """A size the architecture has, and a route and features it supports."""
    if args.arch == "unet":
        if unet_size(args.model) is None:
            raise SystemExit(f"--arch unet: --model {args.model!r} is unknown; choose one of "
                             f"{', '.join(UNET_SIZES)} or a transformer size ({', '.join(MODELS)})")
        if args.cond not in UNET_CONDS:
            raise SystemExit("--arch unet conditions through cross-attention: use --cond "
                             f"{' or '.join(UNET_CONDS)}, not {describe_flag(args, 'cond')}")
        if args.cond_type == "text":
            raise SystemExit("--arch unet is the class-conditional LDM recipe here: use --cond-type class")
        if args.grad_ckpt:
            raise SystemExit("--grad-ckpt checkpoints transformer blocks: --arch unet has none (use --arch "
                             "dit or mdt)")
    elif args.model not in MODELS:
        raise SystemExit(f"--model {args.model!r} is unknown; choose one of {', '.join(MODELS)}")


def check_objective(args):
    """What fits the objective: its prediction, variance, weighting and sampler (each named with its
    source)."""
    if (args.objective == "ddpm") != (args.pred == "eps"):
        fix = "--pred eps" if args.objective == "ddpm" else "--pred v (or x)"
        raise SystemExit(f"{describe_flag(args, 'pred')} does not fit {describe_flag(args, 'objective')}: "
                         f"ddpm predicts eps, flow predicts v or x; add {fix}")
    if args.learn_sigma and args.objective != "ddpm":
        raise SystemExit(f"{describe_flag(args, 'learn_sigma')} needs --objective ddpm; add --no-learn-sigma")
    if args.min_snr and args.objective != "ddpm":
        raise SystemExit(f"{describe_flag(args, 'min_snr')} weights the eps loss of --objective ddpm; add "
                         "--min-snr 0")
    if args.sampler is not None and args.sampler not in SAMPLERS[args.objective]:
        raise SystemExit(f"{describe_flag(args, 'sampler')} does not fit {describe_flag(args, 'objective')}: "
                         f"choose one of {', '.join(SAMPLERS[args.objective])}")
    # DDIM's integer stride, a spacing the sampler cannot walk: say so now, not after training
    if args.objective == "ddpm" and args.sample_steps > 0:
        try:
            check_sampling(run_sampling(args), 1000)
        except ValueError as e:
            raise SystemExit(f"--sample-steps {args.sample_steps}: {e}") from None


def check_routes(args):
    """A gate schedule set for a route that adds its control ungated would do nothing: refused."""
    gated = ROUTES[args.cond].gated
    for group in DEFAULT_GATES:
        if set_on_command_line(args, f"gate_{group}") and not gated:
            raise SystemExit(f"--gate-{group}: --cond {args.cond} adds the control metadata ungated; the "
                             "gates act in the routes that gate "
                             f"({', '.join(n for n, r in ROUTES.items() if r.gated)})")


def worker_count(value):
    """--workers: 0 (load in the main process) up to MAX_WORKERS, whose event counts data.py keeps apart."""
    if at_least("--workers", value, 0) > MAX_WORKERS:
        raise SystemExit(f"--workers {value}: at most {MAX_WORKERS} per process")
    return value


def check_ranges(args):
    """Every number in its range, by the rules sample.py, encode.py and the experiments share."""
    flag = lambda name: f"--{name.replace('_', '-')}"
    for name in ("batch", "steps", "res", "class_tokens", "log_every", "ckpt_every", "keep", "max_bad_steps",
                 "grad_accum", "sample_steps", "shapes_size"):  # counts and sizes
        at_least(flag(name), getattr(args, name), 1)
    for name in ("base_res", "decode_layers"):  # None: derived (mdt.mdt_decode_layers checks the layers)
        if getattr(args, name) is not None:
            at_least(flag(name), getattr(args, name), 1 if name == "base_res" else 0)
    for name in ("p_drop_sem", "p_drop_ctrl", "ema", "max_skip_rate", "beta1", "beta2", "beta3"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("lr", "shift", "t_std", "eps", "cfg_power"):
        above(flag(name), getattr(args, name))
    for name in ("warmup", "clip", "min_snr", "wd", "pad_noise", "eval_per_class", "text_cache_gb"):
        at_least(flag(name), getattr(args, name), 0)
    finite("--t-mean", args.t_mean)
    end_point("--t-min", args.t_min)
    at_least("--cfg-scale", args.cfg_scale, 0, " (1 = no guidance)")
    at_least("--sample-every", args.sample_every, -1, " (0 = only at the end, -1 = none)")
    seed("--seed", args.seed)
    worker_count(args.workers)
    check_text_length(args.text_max_length)
    if not 0 <= args.mask_ratio < 0.8:
        raise SystemExit(f"--mask-ratio must be in [0, 0.8) (0.2 is added at random), got {args.mask_ratio}")
    if not 0 <= args.size_corr <= 1 or (args.size_corr and args.dataset != "shapes"):
        raise SystemExit(f"--size-corr {args.size_corr}: a probability in [0, 1], for --dataset shapes only")
    if args.batch % args.grad_accum:
        raise SystemExit(f"--batch {args.batch} must be divisible by --grad-accum {args.grad_accum} (each "
                         f"step averages {args.grad_accum} equal micro-batches)")


#################################################################################
#                     The run's sampling, from its flags                        #
#################################################################################


def run_sampling(args, **override):
    """The run's sampling settings (diffusion.Sampling) from its flags -- its recipe's sampler, steps, spacing
    and guidance -- with `override` replacing any of them."""
    own = Sampling(method=args.sampler, steps=args.sample_steps, spacing=args.sample_spacing,
                   scale=args.cfg_scale, schedule=args.cfg_schedule, power=args.cfg_power, t_min=args.t_min)
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
