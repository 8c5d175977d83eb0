"""
A run's configuration: the flags of train.py (bench.py passes them on), each dataset's preset for the flags left
unset, the checks that fail before any work (and those a resume repeats against its checkpoint), and what a
configuration builds: the model and the diffusion. Every checkpoint stores its configuration (`vars(args)`), so sample.py rebuilds the
same model from the file alone.

    python train.py --help          # a flag marked (shapes X, imagenet Y) takes that preset's value when left unset
"""
import argparse
import importlib.util
import json
import os

from checkpoint import UnreadableCheckpoint, base_res_of, find_checkpoint, read_checkpoint
from conditioning import DEFAULT_GATES, GATES, TEXT_NULLS, TEXT_PADS
from data import DATASETS, MAX_WORKERS
from diffusion import BETA_SCHEDULES, OBJECTIVES, SAMPLERS, Diffusion, noise_shift, spaced_steps
from latents import latent_geometry, read_cache
from model import ARCHS, CONDS, MODELS, POS_MODES, SIZES, build_model, mdt_decode_layers

# Per-dataset presets for the flags left unset; every dataset but shapes takes imagenet's. imagenet follows the
# ImageNet-256 recipe (the README's recipe table, row `ours`). shapes is the `small` recipe below at 24 px, which
# converges in about ten minutes on 2 cores: pixel space, a higher lr and a short EMA, a noise shift of 3 (flat-coloured
# toy images keep their content at noise levels where photos lose it), 4 class tokens (more attention mass for the label
# early in training), and x-prediction (the network outputs the clean image, which is easier for 48-value pixel patches
# than the velocity; the loss is still on the velocity).
PRESETS = {
    "imagenet": dict(res=256, model="XL/2", batch=256, lr=1e-4, steps=400_000, warmup=1000, ema=0.9999,
                     decay="constant", vae="sd-ema", shift=1.0, pred="v", class_tokens=1,
                     log_every=100, ckpt_every=10_000, sample_every=10_000, workers=8),
}
PRESETS["folder"] = PRESETS["imagenet"]

# The published recipes, one flag each (`--recipe NAME`; README "The baselines" gives the source of every value).
# What a recipe sets wins over the dataset's preset; a flag given on the command line wins over both. Values that no
# source publishes are ours and say so in the README. Model sizes stay the dataset preset's (XL/2 for ImageNet, XS/4 on
# CPU): a recipe is how a model is trained, at any size. `python train.py --recipe NAME --print-config` shows the result.
RECIPES = {
    # the paper's own model and its shared setting: what runs with no recipe on imagenet / folder
    "ours": dict(arch="dit", cond="ours", objective="flow", pred="v", optimizer="adamw", lr=1e-4, beta1=0.9,
                 beta2=0.95, eps=1e-8, wd=0.0, warmup=1000, decay="constant", clip=1.0, ema=0.9999, ema_warmup="on",
                 batch=256, sample_steps=50),
    # DiT (facebookresearch/DiT train.py, sample_ddp.py): eps + learned variance, plain AdamW, EMA from the first step
    "dit": dict(arch="dit", cond="adaln", objective="ddpm", beta_schedule="linear", learn_sigma=True, pred="eps",
                optimizer="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, warmup=0, decay="constant",
                clip=0.0, ema=0.9999, ema_warmup="off", batch=256, sampler="ddpm", sample_steps=250, cfg_scale=1.5),
    # PixArt-alpha (configs/pixart_config/PixArt_xl2_img256_internal.py, scripts/inference.py)
    "pixart": dict(arch="dit", cond="xattn", objective="ddpm", beta_schedule="linear", learn_sigma=True, pred="eps",
                   optimizer="adamw", lr=2e-5, beta1=0.9, beta2=0.999, eps=1e-10, wd=0.03, warmup=1000,
                   decay="constant", clip=0.01, ema=0.9999, ema_warmup="off", batch=256, sampler="ddpm",
                   sample_steps=100, cfg_scale=4.5),
    # mDT-v2 (sail-sg/MDT scripts/image_train.py, image_sample.py): Adan, min-SNR-5 weighting, masked training
    "mdt": dict(arch="mdt", cond="adaln", objective="ddpm", beta_schedule="linear", learn_sigma=True, pred="eps",
                optimizer="adan", lr=3e-4, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, wd=0.0, warmup=0,
                decay="constant", clip=1.0, ema=0.9999, ema_warmup="off", batch=256, mask_ratio=0.3, min_snr=5.0,
                sampler="ddpm", sample_steps=250, cfg_scale=1.5),
    # LDM (CompVis/latent-diffusion configs/latent-diffusion/cin256-v2.yaml): UNet, sqrt-linear betas, no EMA
    "ldm": dict(arch="unet", cond="xattn", objective="ddpm", beta_schedule="ldm", learn_sigma=False, pred="eps",
                optimizer="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01, warmup=0, decay="constant",
                clip=0.0, ema=0.0, batch=256, sampler="ddim", sample_steps=250, cfg_scale=1.5),
    # SD3 (Esser et al. 2024): mmDiT, rectified flow with logit-normal t, QK-norm
    "sd3": dict(arch="dit", cond="mmdit", objective="flow", pred="v", t_mean=0.0, t_std=1.0, optimizer="adamw",
                lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, warmup=1000, decay="constant", clip=1.0,
                ema=0.9999, ema_warmup="on", batch=1024, sampler="euler", sample_steps=50, cfg_scale=5.0),
    # small images on a CPU in minutes (the `shapes` preset at any resolution, any folder): pixel space, a small
    # model, a high lr with cosine decay, a short EMA, x-prediction and a noise shift of 3
    "small": dict(res=32, model="XS/4", vae="none", batch=64, lr=2e-3, steps=2000, warmup=100, decay="cosine",
                  ema=0.999, shift=3.0, pred="x", class_tokens=4, log_every=50, ckpt_every=1000, sample_every=0,
                  workers=0),
}
PRESETS["shapes"] = dict(RECIPES["small"], res=24)
# Every flag a recipe or a preset may set, when neither does: the paper's choices and the ImageNet recipe's.
DEFAULTS = dict(arch="dit", cond="ours", objective="flow", beta_schedule="linear", learn_sigma=False, qk_norm="auto",
                t_mean=0.0, t_std=1.0, optimizer="adamw", beta1=0.9, beta2=0.95, beta3=0.99, eps=1e-8, wd=0.0,
                clip=1.0, ema_warmup="on", min_snr=0.0, mask_ratio=0.3, p_drop_sem=0.1, sampler=None,
                sample_steps=50, cfg_scale=2.0)

# `--dataset imagenet` without --data-path reads $IMAGENET_DIR, else this folder (relative to the working directory)
IMAGENET_DEFAULT = os.path.join("data", "imagenet", "train")

# Config keys that must agree between a checkpoint and the run that resumes it.
ARCH_KEYS = ("model", "arch", "pred", "cond", "class_tokens", "pos_mode", "res", "base_res", "res_shift", "vae",
             "num_classes", "gate_size", "gate_crop", "gate_flip", "dataset", "objective", "learn_sigma",
             "beta_schedule", "qk_norm", "decode_layers", "cond_type", "text_encoder", "text_max_length", "text_pad",
             "pad_noise", "text_null")
# ... and those that the saved data position, noise streams and optimizer state depend on: changing them breaks an
# exact resume (another optimizer cannot read the saved moments).
ORDER_KEYS = ("batch", "seed", "shapes_size", "size_corr", "world", "grad_accum", "optimizer")
# ... the value an older checkpoint, saved before the key existed, ran with
ADDED_KEYS = {"grad_accum": 1, "size_corr": 0.0, "optimizer": "adamw"}

#################################################################################
#                                  The flags                                    #
#################################################################################


def preset(key):
    """' (shapes 24, imagenet 256)': the presets' values of a flag, shown in --help after what it means."""
    return f" (shapes {PRESETS['shapes'][key]}, imagenet {PRESETS['imagenet'][key]})"


def default(key):
    """' (default 0.95; recipes: dit 0.999, ...)': a recipe-set flag's value without a recipe, and each recipe's."""
    set_by = [f"{name} {r[key]}" for name, r in RECIPES.items() if key in r and r[key] != DEFAULTS.get(key)]
    return f" (default {DEFAULTS[key]}" + (f"; recipes: {', '.join(set_by)})" if set_by else ")")


def get_args(argv=None, description=None):
    """Parse train.py's flags and fill the ones left unset from the dataset's preset."""
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--dataset", default="shapes", choices=DATASETS, help="shapes (embedded, default) | imagenet | folder | "
      "captions (image-caption pairs) | webdataset (.tar shards) | latents (a cache made by `latents.py --encode`; "
      "takes its source dataset's preset, resolution and VAE)")
    a("--data-path", default=None, help="ImageFolder root for imagenet / folder (one split: DIR/<class>/<images>); "
      "captions: a folder of images with .txt captions or a CSV file; webdataset: a folder of .tar shards, a glob or "
      "a brace range (shards/{00000..01242}.tar); "
      f"the cache folder for latents. imagenet: default $IMAGENET_DIR, else {IMAGENET_DEFAULT}")
    a("--res", type=int, help="training resolution in pixels" + preset("res"))
    a("--crop", default="random", choices=("random", "center"), help="crop policy; crop offsets are recorded")
    a("--no-hflip", dest="hflip", action="store_false", help="disable random horizontal flips")
    a("--shapes-size", type=int, default=10000, help="number of distinct shapes images")
    a("--size-corr", type=float, default=0.0, help="shapes: class <-> original-size correlation rho in [0, 1]: with "
      "probability rho an even class is drawn small (res/2..res), an odd one large (res..2 res); 0 = independent")
    a("--vae", help="none (pixel space) | sd-ema | sd-mse | a diffusers AutoencoderKL path" + preset("vae"))
    # model
    a("--model", help=f"size/patch preset: {', '.join(MODELS)}; --arch unet: G4, S, XS" + preset("model"))
    a("--arch", choices=ARCHS + ("unet",), help="dit (transformer) | mdt (mDT-v2) | unet (LDM; its own sizes G4, S, "
      "XS: XS when the preset's model is XS/4, else G4)" + default("arch"))
    a("--cond", choices=CONDS, help="conditioning route: ours (disentangled, the paper's) | adaln (DiT) | xattn "
      "(PixArt-alpha) | mmdit (SD3)" + default("cond"))
    a("--qk-norm", choices=("auto", "on", "off"), help="QK-norm; auto = as the route's recipe (on for ours / mmdit, "
      "off for adaln / xattn)" + default("qk_norm"))
    a("--decode-layers", type=int, default=None, help="mdt: decoder blocks (default 4 at depth >= 12 as "
      "MDTv2-XL/2; XS 2, T 0)")
    a("--mask-ratio", type=float, help="mdt: fraction of image tokens dropped in the masked pass (plus U[0, 0.2])"
      + default("mask_ratio"))
    a("--class-tokens", type=int, help="context tokens per class label" + preset("class_tokens"))
    a("--cond-type", default="class", choices=("class", "text"), help="semantic condition: class label or caption")
    a("--text-encoder", default="builtin", help="text: frozen encoder, `builtin` (no download) or a Hugging Face "
      "name / path (T5, CLIP, BERT-style; needs `pip install transformers`)")
    a("--text-max-length", type=int, default=None, help="text: tokens per prompt (builtin 16, HF min(77, model's))")
    a("--text-pad", default="noisy_replicate", choices=TEXT_PADS, help="text: how padding slots are filled")
    a("--pad-noise", type=float, default=0.1, help="text: noisy_replicate noise std, x the prompt's feature std")
    a("--text-null", default="learned", choices=TEXT_NULLS, help="text: null prompt for guidance, a learned token "
      "sequence or the encoded empty string")
    a("--pos-mode", default="resample", choices=POS_MODES, help="positional embedding on grids beyond the base")
    for group, gate in DEFAULT_GATES.items():
        a(f"--gate-{group}", default=gate, choices=GATES, help=f"schedule g(t) of the {group} control group")
    # diffusion
    a("--objective", choices=OBJECTIVES, help="flow (rectified flow, SD3) | ddpm (eps, 1000 steps, DiT / LDM)"
      + default("objective"))
    a("--beta-schedule", choices=BETA_SCHEDULES, help="ddpm: linear (DiT / ADM) | ldm" + default("beta_schedule"))
    a("--learn-sigma", action=argparse.BooleanOptionalAction, help="ddpm: also learn the variance (DiT; trained by "
      "the VLB term)" + default("learn_sigma"))
    a("--min-snr", type=float, help="ddpm: weight the eps loss by min(SNR, gamma) / SNR (mDT-v2's gamma 5; 0 = off)"
      + default("min_snr"))
    a("--t-mean", type=float, help="logit-normal mean of training t" + default("t_mean"))
    a("--t-std", type=float, help="logit-normal std of training t" + default("t_std"))
    a("--shift", type=float, help="noise shift at the base resolution; alpha = shift * sqrt(tokens / base tokens)"
      + preset("shift"))
    a("--pred", choices=("v", "x", "eps"), help="network output. flow: v (velocity, SD3) or x (clean image, converted "
      "to v); ddpm: eps (the default there)" + preset("pred"))
    a("--base-res", type=int, help="resolution whose token count has the noise shift --shift and defines the "
      "positional grid (default: --res, a model's own grid; with --init-from the source checkpoint's, with --resume "
      "the run's)")
    a("--res-shift", default="on", choices=("on", "off"), help="scale the noise shift with the token count beyond "
      "--base-res (off: alpha = --shift at every resolution; the transfer ablation)")
    a("--p-drop-sem", type=float, help="probability of dropping the semantic condition (guidance)"
      + default("p_drop_sem"))
    a("--p-drop-ctrl", type=float, default=0.1, help="probability of dropping the control metadata (guidance)")
    # optimisation
    a("--recipe", choices=tuple(RECIPES), help="a published recipe: sets the flags it publishes (objective, route, "
      "optimizer, EMA, batch, evaluation sampler); flags given here still win. README: The baselines")
    a("--print-config", action="store_true", help="print the resolved flags as one JSON object and exit")
    a("--batch", type=int, help="global batch size (split across ranks)" + preset("batch"))
    a("--steps", type=int, help="optimizer steps" + preset("steps"))
    a("--lr", type=float, help="peak learning rate" + preset("lr"))
    a("--optimizer", choices=("adamw", "adan"), help="adamw | adan (mDT-v2; needs `pip install adan-pytorch`)"
      + default("optimizer"))
    a("--beta1", type=float, help="first moment decay" + default("beta1"))
    a("--beta2", type=float, help="second moment decay (adan: of the gradient difference)" + default("beta2"))
    a("--beta3", type=float, help="adan: decay of the squared-gradient moment" + default("beta3"))
    a("--eps", type=float, help="optimizer epsilon" + default("eps"))
    a("--wd", type=float, help="decoupled weight decay" + default("wd"))
    a("--warmup", type=int, help="linear warm-up steps" + preset("warmup"))
    a("--decay", choices=("constant", "cosine"), help="learning-rate shape after warm-up" + preset("decay"))
    a("--clip", type=float, help="gradient-norm clip (0 = off)" + default("clip"))
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: each rank runs --batch / "
      "(processes x N) images at a time and the step averages them, so the global batch stays --batch")
    a("--grad-ckpt", action="store_true", help="activation checkpointing of every transformer block (less memory, "
      "about one more forward)")
    a("--ema", type=float, help="EMA decay (0: sample from the trained weights)" + preset("ema"))
    a("--ema-warmup", choices=("on", "off"), help="on: decay min(ema, (1 + step) / (10 + step)), so early averages "
      "are not dominated by the random initialisation; off: ema from the first step" + default("ema_warmup"))
    # system
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 on GPU, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, help="data-loader workers per rank" + preset("workers"))
    a("--seed", type=int, default=0)
    a("--out", default="runs", help="folder for run folders")
    a("--resume", default=None, help="checkpoint file, run folder, or `auto` (newest complete checkpoint under --out)")
    a("--init-from", default=None, help="start from the weights of a checkpoint (ours, an official DiT .pt, or a "
      "`sample.py --export` .safetensors): every tensor whose name and shape match is loaded; the rest is reported")
    a("--log-every", type=int, help="steps between log lines" + preset("log_every"))
    a("--ckpt-every", type=int, help="steps between checkpoints" + preset("ckpt_every"))
    a("--sample-every", type=int, help="steps between sample grids (0 = only at the end, -1 = none)"
      + preset("sample_every"))
    a("--keep", type=int, default=2, help="checkpoints kept in the run folder")
    a("--eval-per-class", type=int, default=20, help="shapes: checker evaluation samples per class at the end")
    a("--cfg-scale", type=float, help="semantic guidance scale of end-of-run samples and, by default, of sample.py"
      + default("cfg_scale"))
    a("--sampler", choices=sorted({s for v in SAMPLERS.values() for s in v}), help="sampler of end-of-run samples "
      "and sample.py's default: euler / heun (flow), ddim / ddpm (ddpm); default: the objective's first")
    a("--sample-steps", type=int, help="sampler steps of end-of-run samples and sample.py's default"
      + default("sample_steps"))
    # reliability
    a("--max-bad-steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    a("--max-skip-rate", type=float, default=0.05, help="stop if more than this fraction of images are unreadable")
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}  # on the command line
    if args.base_res is None and (args.init_from or args.resume):  # a transfer keeps its base, a resumed run its own
        if args.init_from and os.path.isfile(args.init_from):  # a missing file: validate says so
            try:
                args.base_res = base_res_of(read_checkpoint(args.init_from, mmap=True))
            except UnreadableCheckpoint as e:
                raise SystemExit(f"--init-from: {e}") from None
        elif args.resume == "auto" or (args.resume and os.path.exists(args.resume)):
            args.base_res = base_res_of(find_checkpoint(args.resume, args.out, mmap=True)[1])
    if args.dataset == "imagenet" and args.data_path is None:  # the documented place; validate says if it is empty
        args.data_path = os.environ.get("IMAGENET_DIR") or IMAGENET_DEFAULT
    args.source_dataset = args.dataset  # what the images are: for a latent cache, what it was made from
    if args.dataset == "latents" and args.data_path and os.path.isdir(args.data_path):
        meta = read_cache(args.data_path)[0]
        args.source_dataset = meta["dataset"]
        if args.vae is not None and args.vae != meta["vae"]:
            raise SystemExit(f"--vae {args.vae}: the cache {args.data_path} holds {meta['vae']} latents")
        args.vae, args.res = meta["vae"], args.res or meta["res"]
    recipe = dict(RECIPES.get(args.recipe, {}))
    if args.objective is not None and args.objective != recipe.get("objective", args.objective):
        for k in ("pred", "sampler", "learn_sigma", "min_snr", "beta_schedule"):  # the recipe's objective's own
            recipe.pop(k, None)
    preset_name = "shapes" if args.source_dataset == "shapes" else "imagenet"
    for k, v in recipe.items():  # the recipe where the command line left a flag unset (a latent cache set vae, res)
        if getattr(args, k) is None:
            setattr(args, k, v)
    if (args.objective or DEFAULTS["objective"]) == "ddpm" and args.pred is None:
        args.pred = "eps"  # the only output a ddpm model has here
    for k, v in {**DEFAULTS, **PRESETS[preset_name]}.items():  # then the dataset's preset, then the defaults
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.arch == "unet" and "model" not in given and args.model in MODELS:  # the UNet has sizes of its own:
        args.model = "XS" if args.model == "XS/4" else "G4"  # XS in place of the CPU presets' XS/4, else LDM's G4
    if args.base_res is None:  # from scratch, whatever the data source: the model's own grid is its base
        args.base_res = args.res
    if args.print_config:
        print(json.dumps({k.replace("_", "-"): v for k, v in vars(args).items()
                          if k not in ("print_config", "source_dataset")}, indent=1))
        raise SystemExit(0)
    return args


def config_mismatch(saved, args):
    """Human-readable list of architecture / data settings that differ between a checkpoint and this run."""
    return [f"{k}: checkpoint {saved.get(k, ADDED_KEYS.get(k))!r} vs now {getattr(args, k, None)!r}"
            for k in ARCH_KEYS + ORDER_KEYS + (("workers",) if saved.get("dataset") == "webdataset" else ())
            if saved.get(k, ADDED_KEYS.get(k)) != getattr(args, k, None)]  # a stream's position is per loader worker


def validate(args):
    """Fail before any work with a message that says what to change."""
    if args.arch == "unet":
        from unet import UNET_SIZES
        if args.model not in UNET_SIZES:
            raise SystemExit(f"--arch unet: --model {args.model!r} is unknown; choose one of {', '.join(UNET_SIZES)}")
        patch = 2 ** (len(UNET_SIZES[args.model]["channel_mult"]) - 1)  # the total downsampling of the UNet
        if args.cond not in ("ours", "xattn"):
            raise SystemExit("--arch unet conditions through cross-attention: use --cond xattn (LDM) or ours")
        if args.cond_type == "text":
            raise SystemExit("--arch unet is the class-conditional LDM recipe here: use --cond-type class")
    elif args.model not in MODELS:
        raise SystemExit(f"--model {args.model!r} is unknown; choose one of {', '.join(MODELS)}")
    else:
        patch = int(args.model.split("/")[-1])
    factor = latent_geometry(args.vae)[0]
    if args.res % (patch * factor):
        raise SystemExit(f"--res {args.res} must be divisible by patch {patch} x autoencoder factor {factor} "
                         f"= {patch * factor}; try --res {args.res // (patch * factor) * patch * factor}")
    if (args.objective == "ddpm") != (args.pred == "eps"):
        raise SystemExit(f"--pred {args.pred} does not fit --objective {args.objective}: ddpm predicts eps, flow "
                         f"predicts v or x")
    if args.learn_sigma and args.objective != "ddpm":
        raise SystemExit("--learn-sigma needs --objective ddpm")
    if args.min_snr and args.objective != "ddpm":
        raise SystemExit("--min-snr weights the eps loss of --objective ddpm")
    if args.sampler is not None and args.sampler not in SAMPLERS[args.objective]:
        raise SystemExit(f"--sampler {args.sampler} does not fit --objective {args.objective}: choose one of "
                         f"{', '.join(SAMPLERS[args.objective])}")
    if args.objective == "ddpm" and args.sample_steps > 0:  # DDIM's integer stride: say so now, not after training
        try:
            spaced_steps(1000, args.sample_steps, args.sampler or SAMPLERS["ddpm"][0])
        except ValueError as e:
            raise SystemExit(f"--sample-steps {args.sample_steps}: {e}")
    if args.optimizer == "adan":
        if importlib.util.find_spec("adan_pytorch") is None:  # mDT-v2's optimizer: an optional dependency
            raise SystemExit("--optimizer adan (the mdt recipe) needs the Adan optimizer: pip install adan-pytorch "
                             "(or train with --optimizer adamw)")
    if args.vae not in (None, "none") and importlib.util.find_spec("diffusers") is None:
        raise SystemExit(f"--vae {args.vae} (latent diffusion) needs the optional package diffusers: pip install "
                         f"diffusers (or train in pixel space with --vae none)")
    if args.init_from and not os.path.isfile(args.init_from):
        raise SystemExit(f"--init-from {args.init_from!r}: no such checkpoint file")
    if args.init_from and args.resume and args.resume != "auto":  # auto: the same command starts, then continues
        raise SystemExit("--init-from starts a new run from other weights; --resume continues a run: give one (or "
                         "--resume auto, which starts from --init-from while the run has no checkpoint yet)")
    if args.arch == "mdt":
        try:
            mdt_decode_layers(SIZES[args.model.split("/")[0]][0], args.decode_layers)
        except ValueError as e:
            raise SystemExit(f"{e} (--model {args.model})")
    if not 0 <= args.mask_ratio < 0.8:
        raise SystemExit(f"--mask-ratio must be in [0, 0.8) (0.2 is added at random), got {args.mask_ratio}")
    if not 0 <= args.size_corr <= 1 or (args.size_corr and args.dataset != "shapes"):
        raise SystemExit(f"--size-corr {args.size_corr}: a probability in [0, 1], for --dataset shapes only")
    if args.dataset != "shapes" and not args.data_path:
        raise SystemExit(f"--dataset {args.dataset} needs --data-path DIR (an ImageFolder tree DIR/<class>/<images>, "
                         f"or for latents a cache folder made by `python latents.py --encode`)")
    if args.dataset == "imagenet" and not os.path.isdir(args.data_path):
        raise SystemExit(f"--dataset imagenet: no ImageNet train split at {args.data_path!r}. Set IMAGENET_DIR to "
                         f"it, put it at {IMAGENET_DEFAULT} (DIR/<class>/<images>), or pass --data-path DIR")
    if args.dataset == "captions" and args.data_path and not os.path.exists(args.data_path):
        raise SystemExit(f"--data-path {args.data_path!r}: no such folder or CSV file (--dataset captions reads a "
                         f"folder of images with .txt captions, or a CSV file of image,caption rows)")
    elif args.dataset not in ("captions", "webdataset") and args.data_path and not os.path.isdir(args.data_path):
        raise SystemExit(f"--data-path {args.data_path!r} does not exist or is not a directory")  # shards: a glob too
    for name in ("batch", "steps", "res", "class_tokens", "log_every", "ckpt_every", "keep", "max_bad_steps",
                 "grad_accum", "sample_steps"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("p_drop_sem", "p_drop_ctrl", "ema", "max_skip_rate", "beta1", "beta2", "beta3"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("lr", "shift", "t_std", "eps"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.batch % args.grad_accum:
        raise SystemExit(f"--batch {args.batch} must be divisible by --grad-accum {args.grad_accum} (each step "
                         f"averages {args.grad_accum} equal micro-batches)")
    if args.grad_ckpt and args.arch == "unet":
        raise SystemExit("--grad-ckpt checkpoints transformer blocks: --arch unet has none (use --arch dit or mdt)")
    if args.warmup < 0 or args.clip < 0 or args.workers < 0 or args.min_snr < 0:
        raise SystemExit("--warmup, --clip, --workers and --min-snr must be >= 0")
    if args.workers > MAX_WORKERS:
        raise SystemExit(f"--workers {args.workers}: at most {MAX_WORKERS} per process")
    if args.resume and args.resume != "auto" and not os.path.exists(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such checkpoint file or run folder (or use --resume auto)")

#################################################################################
#                        What a configuration builds                            #
#################################################################################


def latent_shape(args):
    """(C, H, W) of the diffusion space: the model's input and the noise a sample starts from."""
    factor, channels = latent_geometry(args.vae)
    return channels, args.res // factor, args.res // factor


def make_model(args):
    """The network of this configuration, freshly initialised (from the global RNG)."""
    factor, channels = latent_geometry(args.vae)
    input_size, base = args.res // factor, args.base_res // factor
    common = dict(input_size=input_size, in_channels=channels, out_channels=channels * (2 if args.learn_sigma else 1),
                  num_classes=args.num_classes, class_tokens=args.class_tokens, cond=args.cond,
                  gates={"size": args.gate_size, "crop": args.gate_crop, "flip": args.gate_flip})
    if args.cond_type == "text":
        common["text"] = dict(text_dim=args.text_dim, max_length=args.text_max_length, pad=args.text_pad,
                              pad_noise=args.pad_noise, null=args.text_null)
    if args.arch == "unet":
        from unet import build_unet
        return build_unet(args.model, **common)
    return build_model(args.model, arch=args.arch, pos_mode=args.pos_mode, base_size=base,
                       qk_norm={"auto": None, "on": True, "off": False}[args.qk_norm],
                       decode_layers=args.decode_layers, mask_ratio=args.mask_ratio, **common)


def make_diffusion(args):
    """The objective, its noise-level shift at this resolution and its sampler settings."""
    alpha = noise_shift(args.shift, args.res, args.base_res) if args.res_shift == "on" else args.shift
    return Diffusion(args.objective, args.pred, alpha, args.t_mean, args.t_std, args.beta_schedule, args.learn_sigma,
                     min_snr=getattr(args, "min_snr", 0.0))  # a checkpoint from before the flag: none


def use_bf16(precision, device):
    """--precision: bf16 autocast for `bf16`, and for `auto` on a GPU; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")
