"""
Train a diffusion transformer. One loop for every setting.

    python train.py                                               # small model on the embedded shapes dataset (CPU)
    torchrun --nproc_per_node=8 train.py --dataset imagenet --res 256 --data-path /data/imagenet/train

DDP under torchrun (NCCL on GPU, gloo on CPU; the *local* rank picks the GPU), bf16 autocast + TF32 on GPU, fused
attention through scaled_dot_product_attention, AdamW with warmup, gradient clipping, EMA, atomic checkpoints that
resume exactly (model, EMA, optimizer, step, data position, RNG states), a JSON-lines log and sample grids.
Flags left unset take the dataset's preset (PRESETS below); every flag is printed and stored in the checkpoint.
"""
import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conditioning import DEFAULT_GATES, GATES, TEXT_NULLS, TEXT_PADS, drop_flags
from data import DATASETS, MAX_WORKERS, build_dataset
from diffusion import BETA_SCHEDULES, OBJECTIVES, Diffusion, noise_shift
from latents import Autoencoder, latent_geometry, read_cache
from model import ARCHS, CONDS, MODELS, POS_MODES, build_model, count_params
from text import TextCache, load_text_encoder

CONFIG_VERSION = 2
PREEMPTED = 75  # exit status after a preemption signal (EX_TEMPFAIL): a checkpoint was written, resume to continue

# Per-dataset recipes for the flags left unset. imagenet/folder follow the ImageNet-256 recipe (SPEC.md). shapes is
# a small CPU preset that converges in about ten minutes on 2 cores: 24 px pixel space, a higher lr and a short EMA,
# a noise shift of 3 (flat-coloured toy images keep their content at noise levels where photos lose it), 4 class
# tokens (more attention mass for the label early in training), and x-prediction (the network outputs the clean
# image, which is easier for 48-value pixel patches than the velocity; the loss is still on the velocity).
PRESETS = {
    "shapes": dict(res=24, model="XS/4", batch=64, lr=2e-3, steps=2000, warmup=100, ema=0.999, decay="cosine",
                   vae="none", base_res=24, shift=3.0, pred="x", class_tokens=4, log_every=50, ckpt_every=1000,
                   sample_every=0, workers=0),
    "imagenet": dict(res=256, model="XL/2", batch=256, lr=1e-4, steps=400_000, warmup=1000, ema=0.9999,
                     decay="constant", vae="sd-ema", base_res=256, shift=1.0, pred="v", class_tokens=1, log_every=100, ckpt_every=10_000,
                     sample_every=10_000, workers=8),
}
PRESETS["folder"] = PRESETS["imagenet"]

# Config keys that must agree between a checkpoint and the run that resumes it.
ARCH_KEYS = ("model", "arch", "pred", "cond", "class_tokens", "pos_mode", "res", "base_res", "res_shift", "vae",
             "num_classes", "gate_size", "gate_crop", "gate_flip", "dataset", "objective", "learn_sigma",
             "beta_schedule", "qk_norm", "decode_layers", "cond_type", "text_encoder", "text_max_length", "text_pad",
             "pad_noise", "text_null")
# ... and those that the saved data position and noise streams depend on: changing them breaks an exact resume.
ORDER_KEYS = ("batch", "seed", "shapes_size", "world")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--dataset", default="shapes", choices=DATASETS, help="shapes (embedded, default) | imagenet | folder | "
      "latents (a cache made by `latents.py --encode`; takes its source dataset's preset, resolution and VAE)")
    a("--data-path", default=None, help="ImageFolder root for imagenet / folder; the cache folder for latents")
    a("--res", type=int, help="training resolution in pixels (shapes 24, imagenet 256)")
    a("--crop", default="random", choices=("random", "center"), help="crop policy; crop offsets are recorded")
    a("--no-hflip", dest="hflip", action="store_false", help="disable random horizontal flips")
    a("--shapes-size", type=int, default=10000, help="number of distinct shapes images")
    a("--vae", help="none (pixel space) | sd-ema | sd-mse | a diffusers AutoencoderKL path")
    # model
    a("--model", help=f"size/patch preset: {', '.join(MODELS)}; --arch unet: G4, S, XS")
    a("--arch", default="dit", choices=ARCHS + ("unet",), help="dit (transformer) | mdt (mDT-v2) | unet (LDM)")
    a("--cond", default="ours", choices=CONDS, help="conditioning route: ours (disentangled, the paper's) | adaln "
      "(DiT) | xattn (PixArt-alpha) | mmdit (SD3)")
    a("--qk-norm", default="auto", choices=("auto", "on", "off"), help="QK-norm; auto = as the route's recipe "
      "(on for ours / mmdit, off for adaln / xattn)")
    a("--decode-layers", type=int, default=None, help="mdt: decoder blocks (default 4 at depth >= 12 as "
      "MDTv2-XL/2; XS 2, T 0)")
    a("--mask-ratio", type=float, default=0.3, help="mdt: fraction of image tokens dropped in the masked pass "
      "(plus U[0, 0.2])")
    a("--class-tokens", type=int, help="context tokens per class label (imagenet 1, shapes 4)")
    a("--cond-type", default="class", choices=("class", "text"), help="semantic condition: class label or caption")
    a("--text-encoder", default="builtin", help="text: frozen encoder, `builtin` (no download) or a Hugging Face "
      "name / path (T5, CLIP, BERT-style; needs `pip install transformers`)")
    a("--text-max-length", type=int, default=None, help="text: tokens per prompt (builtin 16, HF min(77, model's))")
    a("--text-pad", default="noisy_replicate", choices=TEXT_PADS, help="text: how padding slots are filled")
    a("--pad-noise", type=float, default=0.1, help="text: noisy_replicate noise std, x the prompt's feature std")
    a("--text-null", default="learned", choices=TEXT_NULLS, help="text: null prompt for guidance, a learned token "
      "sequence or the encoded empty string")
    a("--pos-mode", default="resample", choices=POS_MODES, help="positional embedding on grids beyond the base")
    for group, default in DEFAULT_GATES.items():
        a(f"--gate-{group}", default=default, choices=GATES, help=f"schedule g(t) of the {group} control group")
    # diffusion
    a("--objective", default="flow", choices=OBJECTIVES, help="flow (rectified flow, SD3) | ddpm (eps, 1000 steps, "
      "DiT / LDM)")
    a("--beta-schedule", default="linear", choices=BETA_SCHEDULES, help="ddpm: linear (DiT / ADM) | ldm")
    a("--learn-sigma", action="store_true", help="ddpm: also learn the variance (DiT; trained by the VLB term)")
    a("--t-mean", type=float, default=0.0, help="logit-normal mean of training t")
    a("--t-std", type=float, default=1.0, help="logit-normal std of training t")
    a("--shift", type=float, help="noise shift at the base resolution; alpha = shift * sqrt(tokens / base tokens)")
    a("--pred", choices=("v", "x", "eps"), help="network output. flow: v (velocity, SD3) or x (clean image, converted "
      "to v); ddpm: eps (the default there)")
    a("--base-res", type=int, help="resolution whose token count has shift 1 and defines the positional grid "
      "(default: the preset's, or with --init-from the source checkpoint's)")
    a("--res-shift", default="on", choices=("on", "off"), help="scale the noise shift with the token count beyond "
      "--base-res (off: alpha = --shift at every resolution; the transfer ablation)")
    a("--p-drop-sem", type=float, default=0.1, help="probability of dropping the semantic condition (guidance)")
    a("--p-drop-ctrl", type=float, default=0.1, help="probability of dropping the control metadata (guidance)")
    # optimisation
    a("--batch", type=int, help="global batch size (split across ranks)")
    a("--steps", type=int, help="optimizer steps")
    a("--lr", type=float, help="peak learning rate")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--wd", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup", type=int, help="linear warm-up steps")
    a("--decay", choices=("constant", "cosine"), help="learning-rate shape after warm-up")
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    a("--ema", type=float, help="EMA decay")
    # system
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 on GPU, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, help="data-loader workers per rank")
    a("--seed", type=int, default=0)
    a("--out", default="runs", help="folder for run folders")
    a("--resume", default=None, help="checkpoint file, run folder, or `auto` (newest complete checkpoint under --out)")
    a("--init-from", default=None, help="start from the weights of a checkpoint (ours or an official DiT .pt): every "
      "tensor whose name and shape match is loaded; the rest is reported")
    a("--log-every", type=int)
    a("--ckpt-every", type=int)
    a("--sample-every", type=int, help="steps between sample grids (0 = only at the end, -1 = none)")
    a("--keep", type=int, default=2, help="checkpoints kept in the run folder")
    a("--eval-per-class", type=int, default=20, help="shapes: checker evaluation samples per class at the end")
    a("--cfg-scale", type=float, default=2.0, help="semantic guidance scale for end-of-run samples")
    # reliability
    a("--max-bad-steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    a("--max-skip-rate", type=float, default=0.05, help="stop if more than this fraction of images are unreadable")
    a("--debug-nan-steps", default="", help="fault injection for tests: comma-separated steps whose loss is NaN")
    args = p.parse_args(argv)
    if args.objective == "ddpm" and args.pred is None:
        args.pred = "eps"
    if args.init_from and args.base_res is None and os.path.isfile(args.init_from):  # a transfer keeps its base
        saved = torch.load(args.init_from, map_location="cpu", weights_only=False, mmap=True)
        args.base_res = saved.get("args", {}).get("base_res") if isinstance(saved, dict) else None
    args.source_dataset = args.dataset  # what the images are: for a latent cache, what it was made from
    if args.dataset == "latents" and args.data_path and os.path.isdir(args.data_path):
        meta = read_cache(args.data_path)[0]
        args.source_dataset = meta["dataset"]
        if args.vae is not None and args.vae != meta["vae"]:
            raise SystemExit(f"--vae {args.vae}: the cache {args.data_path} holds {meta['vae']} latents")
        args.vae, args.res = meta["vae"], args.res or meta["res"]
        args.base_res = args.base_res or meta["res"]
    for k, v in PRESETS["shapes" if args.source_dataset == "shapes" else "imagenet"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


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
    if args.init_from and not os.path.isfile(args.init_from):
        raise SystemExit(f"--init-from {args.init_from!r}: no such checkpoint file")
    if args.init_from and args.resume:
        raise SystemExit("--init-from starts a new run from other weights; --resume continues a run: give one")
    if not 0 <= args.mask_ratio < 0.8:
        raise SystemExit(f"--mask-ratio must be in [0, 0.8) (0.2 is added at random), got {args.mask_ratio}")
    if args.dataset != "shapes" and not args.data_path:
        raise SystemExit(f"--dataset {args.dataset} needs --data-path DIR (an ImageFolder tree DIR/<class>/<images>, "
                         f"or for latents a cache folder made by `python latents.py --encode`)")
    if args.data_path and not os.path.isdir(args.data_path):
        raise SystemExit(f"--data-path {args.data_path!r} does not exist or is not a directory")
    for name in ("batch", "steps", "res", "class_tokens", "log_every", "ckpt_every", "keep", "max_bad_steps"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("p_drop_sem", "p_drop_ctrl", "ema", "max_skip_rate"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("lr", "shift", "t_std"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0 or args.clip < 0 or args.workers < 0:
        raise SystemExit("--warmup, --clip and --workers must be >= 0")
    if args.resume and args.resume != "auto" and not os.path.exists(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such checkpoint file or run folder (or use --resume auto)")


#################################################################################
#                              Distributed set-up                               #
#################################################################################

def setup_distributed():
    """(rank, world, device). The LOCAL rank picks the GPU: the global rank is wrong on every node but the first."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_mean(x, world):
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


#################################################################################
#                           Data order that can resume                          #
#################################################################################

def epoch_indices(n, epoch, seed, rank, world, batch):
    """This rank's indices for one epoch: a seeded permutation, strided across ranks, whole batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = (n // world) // batch * batch
    if per_rank == 0:
        raise SystemExit(f"dataset of {n} images is smaller than one batch of {batch} on each of {world} ranks")
    return perm[rank::world][:per_rank]


def loader_generator(args, epoch):
    """A DataLoader draws its workers' base seed from a generator when it starts an epoch; given none it takes the
    global RNG, which the model also uses (mDT masks, text padding noise), so a resume -- which starts a loader at
    another step -- would shift that stream. Its own generator keeps resumes exact."""
    return torch.Generator().manual_seed(args.seed * 100_003 + epoch)


def batches(dataset, args, rank, world, local_batch, epoch, position):
    """Yield (epoch, position_after, batch) forever, starting at `position` batches into `epoch`."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        yield from stream_batches(dataset, args, local_batch, epoch, position)
        return
    while True:
        dataset.set_epoch(epoch)
        idx = epoch_indices(len(dataset), epoch, args.seed, rank, world, local_batch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=idx[position * local_batch:],
                                             num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                             drop_last=True, generator=loader_generator(args, epoch))
        for b in loader:
            position += 1
            yield epoch, position, b
        epoch, position = epoch + 1, 0


def stream_batches(dataset, args, local_batch, epoch, position):
    """The same for a streamed dataset (webdataset shards): it splits itself across ranks and workers, and its position
    is (samples drawn per worker, the worker of the next batch) -- different on every rank, so checkpoints keep one
    per rank. `position` None starts the epoch from the beginning."""
    workers = max(args.workers, 1)
    drawn, first = position if position is not None else (None, 0)
    while True:
        dataset.set_epoch(epoch, drawn, first)
        loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, num_workers=args.workers,
                                             drop_last=True, collate_fn=dataset.collate,
                                             pin_memory=torch.cuda.is_available(),
                                             generator=loader_generator(args, epoch))
        drawn, got = list(drawn or [0] * workers), 0
        for img, y, ctrl, captions, tag in loader:
            w, n = tag.tolist()
            drawn[w], first, got = n, (w + 1) % workers, got + 1
            yield epoch, (list(drawn), first), (img, y, ctrl, captions)
        if got == 0:
            raise SystemExit(f"--dataset {args.dataset}: a whole epoch gave this rank no batch of {local_batch}; use "
                             f"more (or fewer, larger) shards, fewer --workers or a smaller --batch")
        epoch, drawn, first = epoch + 1, None, 0


#################################################################################
#                      Preemption and data-health accounting                    #
#################################################################################

class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM and most schedulers send before a kill) set a flag; the loop finishes its step,
    every rank agrees through an all-reduce, one checkpoint is written and the run exits with status PREEMPTED."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        self.signal = signum

    def requested(self, world, device):
        flag = torch.tensor(float(self.signal is not None), device=device)
        if world > 1:  # a signal may reach one rank first: stop together or not at all
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def data_events(dataset, world, args):
    """Counts of skipped / converted images summed over ranks (and their workers); stop when too many are bad."""
    from data import EVENTS, SKIPPED
    if not hasattr(dataset, "events"):
        return {}
    counts = dataset.events.sum(0)
    if world > 1:
        dist.all_reduce(counts)
    counts = dict(zip(EVENTS, counts.tolist()))
    skipped = sum(counts[k] for k in SKIPPED)
    seen = skipped + counts["ok"]
    if seen >= 100 and skipped > args.max_skip_rate * seen:
        raise SystemExit(f"{skipped} of {seen} images could not be used ({ {k: counts[k] for k in SKIPPED} }), more "
                         f"than --max-skip-rate {args.max_skip_rate}: check --data-path")
    return {"data": {k: v for k, v in counts.items() if v}}


#################################################################################
#                                 Checkpoints                                   #
#################################################################################

def save_checkpoint(path, state):
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, or a power loss could leave an empty file under the name
    os.replace(tmp, path)


def checkpoints_in(folder):
    """Complete checkpoints of a run folder, newest first (a `.tmp` file is a write that never finished)."""
    names = sorted((f for f in os.listdir(folder) if f.startswith("ckpt-") and f.endswith(".pt")), reverse=True)
    return [os.path.join(folder, f) for f in names]


def load_latest(paths):
    """(path, state) of the first checkpoint in `paths` that loads; damaged files are reported and passed over."""
    for path in paths:
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file: fall back to the one before it
            print(f"resume: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})", flush=True)
    return None, None


def find_checkpoint(path, out="runs"):
    """Resolve --resume: a checkpoint file, a run folder (its newest complete checkpoint), or `auto` (the newest
    complete checkpoint of the newest run folder under --out that has one; None if there is none)."""
    if path == "auto":
        folders = sorted((os.path.join(out, d) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))),
                         reverse=True) if os.path.isdir(out) else []
        for folder in folders:
            found = load_latest(checkpoints_in(folder))
            if found[0]:
                return found
        return None, None
    if os.path.isdir(path):
        found = load_latest(checkpoints_in(path))
        if found[0] is None:
            raise SystemExit(f"--resume {path!r}: no complete ckpt-*.pt in that folder")
        return found
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {path!r}: no such checkpoint file or run folder")
    found = load_latest([path])
    if found[0] is None:
        raise SystemExit(f"--resume {path!r}: the file is not a readable checkpoint")
    return found


def config_mismatch(saved, args):
    """Human-readable list of architecture / data settings that differ between a checkpoint and this run."""
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(args, k, None)!r}"
            for k in ARCH_KEYS + ORDER_KEYS + (("workers",) if saved.get("dataset") == "webdataset" else ())
            if saved.get(k) != getattr(args, k, None)]  # a stream's position is per loader worker


def lr_at(step, args):
    """Linear warm-up, then constant or cosine decay to 10 % of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "cosine":
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    return args.lr


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_p = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)


def make_model(args):
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


def text_cache_for(dataset, encoder, args, rank, world):
    """The dataset's caption features, encoded once by rank 0 into --out and read by every rank; None for a streamed
    dataset, which cannot list its captions up front (its captions are then encoded batch by batch)."""
    try:
        captions = dataset.captions()
    except (AttributeError, NotImplementedError, RuntimeError):
        if rank == 0:
            print(f"--cond-type text: {args.dataset} cannot list its captions; encoding them batch by batch")
        return None
    name = "".join(ch if ch.isalnum() else "-" for ch in f"{args.dataset}-{args.res}-{args.seed}-{encoder.name}")
    path = os.path.join(args.out, f"text-cache-{name}-{encoder.max_length}.pt")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        TextCache.build(captions, encoder, path)
    if world > 1:
        dist.barrier()
    return TextCache.load(path)


def make_diffusion(args):
    """The objective, its noise-level shift at this resolution and its sampler settings."""
    alpha = noise_shift(args.shift, args.res, args.base_res) if args.res_shift == "on" else args.shift
    return Diffusion(args.objective, args.pred, alpha, args.t_mean,
                     args.t_std, args.beta_schedule, args.learn_sigma)


def checkpoint_weights(ckpt):
    """The weights to start or sample from: a checkpoint's EMA (ours, or a DiT training checkpoint), its model, or the
    file itself when it is a bare state dict (the published DiT files); None if it is none of these."""
    state = ckpt.get("ema", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    return state if isinstance(state, dict) else None


def init_from(model, path, rank=0):
    """Load every tensor of a checkpoint (ours: its EMA weights; or an official DiT file) whose name and shape match
    the model; print what was loaded, what was skipped (and why) and what is new. Returns the three name lists."""
    from model import from_dit, is_dit_state_dict
    state = checkpoint_weights(torch.load(path, map_location="cpu", weights_only=False))
    if state is None:
        raise SystemExit(f"--init-from {path!r}: not a checkpoint of this project nor a DiT state dict")
    if is_dit_state_dict(state):
        if getattr(model, "cond", None) != "adaln" or model.out_channels != 2 * model.in_channels or any(
                not isinstance(b.img.q_norm, torch.nn.Identity) for b in model.blocks):
            raise SystemExit("--init-from: a DiT checkpoint needs --cond adaln --qk-norm off --objective ddpm "
                             "--learn-sigma (DiT predicts eps and a variance)")
        state, _ = from_dit(state, model.width)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape) if k in own else 'no such tensor'})"
               for k, v in state.items() if k not in loaded]
    new = [k for k in own if k not in state]
    model.load_state_dict({**own, **{k: state[k] for k in loaded}})
    if rank == 0:
        print(f"--init-from {path}: loaded {len(loaded)} tensors, skipped {len(skipped)}, new {len(new)}")
        for title, names in (("skipped", skipped), ("new (initialised)", new)):
            for name in names:
                print(f"  {title}: {name}")
    return loaded, skipped, new


#################################################################################
#                                 Training loop                                 #
#################################################################################

def main(argv=None):
    args = get_args(argv)
    validate(args)
    rank, world, device = setup_distributed()
    if args.workers > MAX_WORKERS:
        raise SystemExit(f"--workers {args.workers}: at most {MAX_WORKERS} per process")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world}")
    local_batch = args.batch // world
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # ---- resume: read the checkpoint first so that a mismatch fails before any work --------------------------
    ckpt = None
    if args.resume:
        ckpt_path, ckpt = find_checkpoint(args.resume, args.out)
        if ckpt is None and rank == 0:
            print(f"--resume auto: no checkpoint under {args.out!r}, starting a new run")
        if ckpt is not None and ckpt.get("config_version") != CONFIG_VERSION:
            raise SystemExit(f"{ckpt_path}: config schema {ckpt.get('config_version')} != {CONFIG_VERSION}")
    try:
        dataset = build_dataset(args.dataset, args.res, args.data_path, seed=args.seed, size=args.shapes_size,
                                crop=args.crop, hflip=args.hflip, progress=rank == 0)
    except (ValueError, FileNotFoundError) as e:  # a wrong path or an unfinished cache: say what to do
        raise SystemExit(f"--dataset {args.dataset}: {e}")
    latent = getattr(dataset, "is_latent", False)
    args.num_classes, args.world = dataset.num_classes, world
    encoder, text_cache = None, None
    if args.cond_type == "text":  # encode every caption once; training only looks features up
        encoder = load_text_encoder(args.text_encoder, device, args.text_max_length)
        args.text_dim, args.text_max_length = encoder.dim, encoder.max_length
        text_cache = text_cache_for(dataset, encoder, args, rank, world)
    if ckpt is not None:
        bad = config_mismatch(ckpt["args"], args)
        if bad:
            raise SystemExit(f"--resume {ckpt_path}: checkpoint was made with another configuration:\n  "
                             + "\n  ".join(bad) + "\nresume with the same flags, or start a new run")
        run_dir = os.path.dirname(ckpt_path)
        later = [f for f in checkpoints_in(run_dir) if os.path.basename(f) > os.path.basename(ckpt_path)]
        if later and rank == 0:  # a timeline we are not continuing: keep it out of --resume auto and of pruning
            os.makedirs(os.path.join(run_dir, "abandoned"), exist_ok=True)
            for f in later:
                os.replace(f, os.path.join(run_dir, "abandoned", os.path.basename(f)))
            print(f"resume: moved {len(later)} later checkpoint(s) to {os.path.join(run_dir, 'abandoned')}")
    else:
        run_dir = None
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            n = len(os.listdir(args.out))
            while True:  # mkdir is atomic: two runs started together never share a folder
                run_dir = os.path.join(args.out, f"{n:03d}-{args.dataset}-{args.model.replace('/', '-')}-{args.cond}")
                try:
                    os.makedirs(run_dir)
                    break
                except FileExistsError:
                    n += 1
        if world > 1:
            box = [run_dir]
            dist.broadcast_object_list(box, src=0)
            run_dir = box[0]

    # ---- model, EMA, optimizer -------------------------------------------------------------------------------
    model = make_model(args).to(device)
    if encoder is not None and args.text_null == "empty":
        model.y_embed.set_empty(*encoder.encode([""]))
    if args.init_from and ckpt is None:
        init_from(model, args.init_from, rank)
        if rank == 0 and args.res != args.base_res:  # a resolution transfer: say what adapts to the new grid
            print(f"--init-from at {args.res} px: positional embedding `{args.pos_mode}` from the {args.base_res} px "
                  f"base grid, noise shift alpha {make_diffusion(args).alpha:.3g} (--res-shift {args.res_shift})")
    ema = make_model(args).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    # the latent scale (and shift) the data was made with; sampling decodes with the same ones
    vae = Autoencoder(args.vae, **(dict(scale=dataset.scale, shift=dataset.shift) if latent else {})).to(device)
    args.latent_scale, args.latent_shift = vae.scale, vae.shift
    saved = (ckpt["args"].get("latent_scale"), ckpt["args"].get("latent_shift")) if ckpt is not None else None
    if saved is not None and saved != (vae.scale, vae.shift):
        raise SystemExit(f"--resume: the checkpoint's latents were scaled by {ckpt['args'].get('latent_scale')} "
                         f"(shift {ckpt['args'].get('latent_shift')}), this data by {vae.scale} (shift {vae.shift})")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.wd,
                            fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(args.seed * 1000 + rank)  # noise, t and condition dropout
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    step, epoch, position = 0, 0, (None if stream else 0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, epoch, position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        if stream:  # one position (and epoch) per rank
            epoch, position = ckpt["epoch"][rank], ckpt["position"][rank]
        gen.set_state(ckpt["gen"][rank])  # same world size: checked with the config above
        torch.set_rng_state(ckpt["torch_rng"])
    if rank == 0:
        print(f"model {args.arch} {args.model} cond={args.cond}: {count_params(model) / 1e6:.2f} M parameters")
        print(json.dumps(vars(args)))
    diffusion = make_diffusion(args)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:  # compile the DDP-wrapped module so DDP's bucketing sees the compiled graph
        net = torch.compile(net)

    log = open(os.path.join(run_dir, "log.jsonl"), "a") if rank == 0 else None
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    data = batches(dataset, args, rank, world, local_batch, epoch, position)
    preempt = Preemption()
    nan_steps = {int(s) for s in args.debug_nan_steps.split(",")} if args.debug_nan_steps else set()
    loss_sum, n_acc, n_steps, t0 = torch.zeros((), device=device), 0, 0, time.time()
    bad_in_a_row, bad_total, last_ckpt = 0, 0, (ckpt_path if ckpt is not None else None)
    if ckpt is not None:  # a preemption can fall between log lines: continue the same averaging window
        loss_sum.fill_(ckpt["loss_window"][0])
        n_acc, n_steps = ckpt["loss_window"][1:]
    model.train()
    while step < args.steps:
        epoch, position, (img, y, ctrl, captions) = next(data)
        img, y, ctrl = img.to(device, non_blocking=True), y.to(device), ctrl.to(device)
        if text_cache is not None:
            y = text_cache.lookup(captions, device)  # (features (B, L, d), mask (B, L))
        elif encoder is not None:
            y = tuple(v.to(device) for v in encoder.encode(list(captions)))
        with torch.no_grad():  # a posterior sample, as the SD VAE recipes train (the cache samples its own)
            x0 = img.float() if latent else vae.encode(img, generator=gen)
        sem_drop, ctrl_drop = drop_flags(x0.shape[0], args.p_drop_sem, args.p_drop_ctrl, gen, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast:
            loss = diffusion.loss(net, x0, gen, y=y, ctrl=ctrl, ctrl_drop=ctrl_drop, sem_drop=sem_drop).mean()
        if step + 1 in nan_steps and rank == 0:  # fault injection for tests: one rank's loss goes bad
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else float("inf"))
        # DDP has averaged the gradients, so a NaN on any rank is a NaN in every rank's norm: all ranks agree
        if torch.isfinite(gnorm):
            opt.step()
            update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))
            loss_sum += loss.detach()  # summed on the device: no host sync until the log line
            n_acc += 1
            bad_in_a_row = 0
        else:
            opt.zero_grad(set_to_none=True)
            bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
            if rank == 0:
                print(f"step {step + 1}: non-finite loss or gradient, optimizer step skipped "
                      f"({bad_in_a_row} in a row, {bad_total} in all)", flush=True)
            if bad_in_a_row >= args.max_bad_steps:
                raise SystemExit(f"stopping: {bad_in_a_row} non-finite steps in a row ending at step {step + 1}; "
                                 f"last good checkpoint: {last_ckpt or 'none'}. Lower --lr or check the data, then "
                                 f"--resume from that checkpoint")
        step, n_steps = step + 1, n_steps + 1
        if bar is not None:
            bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = all_mean(loss_sum / max(n_acc, 1), world).item() if n_acc else float("nan")
            dt = time.time() - t0
            rec = dict(step=step, loss=mean_loss, lr=lr_at(step - 1, args), grad_norm=gnorm.item(),
                       img_per_s=n_steps * args.batch / dt,
                       epoch=epoch, skipped_steps=bad_total, **data_events(dataset, world, args))
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            loss_sum.zero_()
            n_acc, n_steps, t0 = 0, 0, time.time()
        stopping = preempt.requested(world, device)
        if step % args.ckpt_every == 0 or step == args.steps or stopping:
            last_ckpt = os.path.join(run_dir, f"ckpt-{step:07d}.pt")
            gens, places = [gen.get_state()], [(epoch, position)]
            if world > 1:
                gens, places = [None] * world, [None] * world
                dist.all_gather_object(gens, gen.get_state())
                dist.all_gather_object(places, (epoch, position))
            if rank == 0:
                state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                             epoch=[p[0] for p in places] if stream else epoch,
                             position=[p[1] for p in places] if stream else position,
                             gen=gens, torch_rng=torch.get_rng_state(),
                             loss_window=(loss_sum.item(), n_acc, n_steps),
                             args=vars(args), config_version=CONFIG_VERSION)
                save_checkpoint(last_ckpt, state)
                for f in [f for f in checkpoints_in(run_dir) if f != last_ckpt][args.keep - 1:]:
                    os.remove(f)
        if stopping:
            if rank == 0:
                bar.close()
                print(f"preempted by signal {preempt.signal}: wrote {last_ckpt}; continue with --resume {run_dir}")
                log.close()
            preempt.restore()
            if world > 1:
                dist.barrier()
                dist.destroy_process_group()
            raise SystemExit(PREEMPTED)
        if args.sample_every > 0 and step % args.sample_every == 0 and rank == 0 and step < args.steps:
            write_grid(ema, vae, args, os.path.join(run_dir, f"samples-{step:07d}.png"), device)
    preempt.restore()
    if bar is not None:
        bar.close()
    if world > 1:  # DDP must keep the replicas identical; check it rather than trust it
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])  # every rank decides alike: none hangs
        if rank == 0:
            log.write(json.dumps(dict(step=step, replicas_identical=same)) + "\n")
            log.flush()
        if not same:
            raise RuntimeError("model replicas diverged across ranks")

    # ---- end of run: a sample grid, and on shapes the checker's verdict ---------------------------------------
    if rank == 0:
        if args.sample_every >= 0:
            write_grid(ema, vae, args, os.path.join(run_dir, "samples.png"), device)
        print(f"run folder: {run_dir}")
        if args.source_dataset == "shapes" and args.eval_per_class > 0:
            from sample import evaluate_shapes
            res = evaluate_shapes(ema, args, args.eval_per_class, device, cfg_scale=args.cfg_scale, progress=True)
            print("checker on EMA samples: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
            with open(os.path.join(run_dir, "eval.json"), "w") as f:
                json.dump(dict(res, cfg_scale=args.cfg_scale, per_class=args.eval_per_class, step=step), f)
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def write_grid(ema, vae, args, path, device):
    from sample import class_grid
    class_grid(ema, vae, args, path, device, cfg_scale=args.cfg_scale)


if __name__ == "__main__":
    main()
