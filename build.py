"""
What a configuration builds: the dataset, the model, the autoencoder and the diffusion of a run, from its
flags (config.py) and from what the run learns from the sources it opens.

What a run learns from its sources -- a latent cache's resolution and autoencoder, the dataset's classes, the
text encoder's width, a checkpoint's base resolution, the number of processes -- is not a flag: it is read
once, where the source is opened (read_source_facts), and kept in `SourceFacts`, apart from the flags, which
are never written to after parsing. A checkpoint stores both (`args` and `facts`), so sample.py rebuilds the
model from the file alone.
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import os
import random
from typing import NamedTuple

import torch
from torch.utils.data import IterableDataset

from checkpoint import (
    CONFIG_VERSION,
    base_res_of,
    checkpoint_weights,
    dit_config,
    find_checkpoint,
    load_weights,
    read_init,
    stored_args,
    with_dit_weights,
)
from checks import from_rank0
from config import (
    DATA_PATHS,
    DATASETS,
    IMAGENET_DEFAULT,
    check_resolution,
    describe_flag,
    get_args,
    set_on_command_line,
)
from data import CaptionFolderDataset, ImageFolderDataset, folder_default_control
from ddpm import DDPM
from diffusion import Diffusion, noise_shift
from latents import Autoencoder, LatentCacheDataset, encode_command, latent_geometry, shard_path
from mdt import MaskedDiffusion, build_mdt
from model import build_model
from shapes import ShapesDataset, shapes_default_control
from shards import WebDatasetShards
from unet import build_unet, unet_size

#################################################################################
#                      What this machine must hold                              #
#################################################################################


def needs_diffusers(vae, what, alternative=""):
    """An autoencoder is loaded through the optional package diffusers: say so before any work."""
    if vae != "none" and importlib.util.find_spec("diffusers") is None:
        raise SystemExit(f"{what} needs the optional package diffusers: pip install diffusers {alternative}"
                         .strip())


def imagenet_dir(data_path):
    """--dataset imagenet's folder: --data-path, else $IMAGENET_DIR, else IMAGENET_DEFAULT."""
    return data_path or os.environ.get("IMAGENET_DIR") or IMAGENET_DEFAULT


def data_root(args):
    """Where --dataset reads from: --data-path (for imagenet, imagenet_dir's default when it is unset)."""
    return imagenet_dir(args.data_path) if args.dataset == "imagenet" else args.data_path


def check_sources(args):
    """What this machine must hold for the run, before any work: the data, the checkpoint to start from and
    the one to resume, the optional packages the flags ask for."""
    check_packages(args)
    path = data_root(args)
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
    if args.resume and args.resume != "auto" and not os.path.exists(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such checkpoint file or run folder (or use --resume "
                         "auto)")


def check_packages(args):
    """The optional packages this run needs: Adan, and diffusers for an autoencoder."""
    if args.optimizer == "adan" and importlib.util.find_spec("adan_pytorch") is None:
        raise SystemExit("--optimizer adan (the mdt recipe) needs the Adan optimizer: pip install "
                         "adan-pytorch (or train with --optimizer adamw)")
    if args.dataset != "latents":  # a cache's autoencoder is checked once it is opened (build.open_dataset)
        needs_diffusers(args.vae, f"{describe_flag(args, 'vae')} (latent diffusion)", "(or train in pixel "
                        "space with --vae none)")


#################################################################################
#                 What the sources say: opened once, kept apart                 #
#################################################################################


@dataclasses.dataclass(frozen=True)
class SourceFacts:
    """What a run learns from what it opens (read_source_facts). Stored in every checkpoint beside the
    flags."""

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
    data_fingerprint: str = None  # its files' names, sampled content (data_fingerprint); None: shapes


class SourceOptions(NamedTuple):
    """What some sources need besides a path: the embedded dataset's size and class <-> original-size
    correlation (--shapes-size, --size-corr) and whether it shows a progress bar while it renders; the
    encoding of a caption source's text files (--text-encoding)."""

    size: int = 10000
    size_corr: float = 0.0
    progress: bool = False
    text_encoding: str = "utf-8"


def build_dataset(name, res, data_path=None, seed=0, crop="random", hflip=True, options=SourceOptions()):
    """A dataset by name: `imagenet` and `folder` read an ImageFolder tree, `captions` a folder of images with
    .txt captions or a CSV file of image,caption rows, `webdataset` .tar shards (a stream), `latents` a latent
    cache (its crop was fixed when it was made; `res` None: the cache's own, else it must be the cache's),
    `shapes` the embedded dataset; `options` (SourceOptions) what the shapes and caption sources need."""
    if name == "shapes":
        return ShapesDataset(size=options.size, res=res, seed=seed, crop=crop, hflip=hflip,
                             progress=options.progress, size_corr=options.size_corr)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if data_path is None and name != "imagenet":
        raise ValueError(f"--dataset {name} needs --data-path: {DATA_PATHS[name]}")
    if name == "imagenet":
        return ImageFolderDataset(imagenet_dir(data_path), res, seed=seed, crop=crop, hflip=hflip)
    if name == "folder":
        return ImageFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip)
    if name == "captions":
        return CaptionFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip,
                                    text_encoding=options.text_encoding)
    if name == "webdataset":
        return WebDatasetShards(data_path, res, seed=seed, crop=crop, hflip=hflip,
                                text_encoding=options.text_encoding)
    if name == "latents":
        cache = LatentCacheDataset(data_path, seed=seed, hflip=hflip)
        if res is not None and cache.res != res:
            raise ValueError(f"latent cache {data_path} holds {cache.res} px images, not --res {res}: train "
                             f"with --res {cache.res}, or encode a cache at {res} px into a new folder:\n  "
                             + encode_command(dict(cache.meta, res=res), "NEW_CACHE_DIR"))
        return cache


def open_dataset(args, progress=False):
    """train.py's dataset; a wrong path or an unfinished cache ends the run with what to do. A latent cache
    sets the resolution and the autoencoder: --res / --vae given on the command line must agree with it."""
    res = args.res if set_on_command_line(args, "res") or args.dataset != "latents" else None
    try:
        options = SourceOptions(size=args.shapes_size, size_corr=args.size_corr, progress=progress,
                                text_encoding=args.text_encoding)
        dataset = build_dataset(args.dataset, res, args.data_path, seed=args.seed, crop=args.crop,
                                hflip=args.hflip, options=options)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"--dataset {args.dataset}: {e}") from None
    if getattr(dataset, "is_latent", False):  # what validate could not check before the cache was open
        if set_on_command_line(args, "vae") and args.vae != dataset.vae:
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


def data_files(dataset):
    """The files a dataset reads, in its own order: images, latent-cache shards or webdataset shards; None for
    the embedded dataset, which its flags make."""
    if hasattr(dataset, "_record"):  # an image folder or image-caption pairs: one file per item
        return [dataset._record(j)[0] for j in range(len(dataset))]
    if hasattr(dataset, "shards"):  # webdataset
        return list(dataset.shards)
    if hasattr(dataset, "cache_dir"):  # a latent cache: its metadata and the shards its meta.json names (not
        # the folder's listing: a stray file there, such as a killed writer's .tmp, is no change of the data;
        # for a clean cache the two are the same list, so only a checkpoint fingerprinted while a stray file
        # sat there sees a change, once: --accept-data-change)
        where, meta = dataset.cache_dir, dataset.meta
        return sorted([os.path.join(where, "meta.json"), os.path.join(where, "stats.json")]
                      + [shard_path(where, k, meta) for k in range(meta["num_shards"])])
    return None


def data_fingerprint(dataset, sampled=64, seed=0):
    """A cheap fingerprint of the training data's content: every file's name, the size and bytes of a seeded
    sample of `sampled` files (their first and last MiB for larger files), and a caption set's text. Resume
    compares it: it catches a file added, removed or renamed, any change of the captions, and a file replaced
    or changed among those sampled (in a small dataset, all of them); a change to an unsampled file of a large
    one can pass. None for the embedded dataset, which its flags make."""
    files = data_files(dataset)
    if files is None:
        return None
    digest = hashlib.sha256()
    root = os.path.commonpath(files) if files else ""
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
    picked = sorted(random.Random(seed).sample(range(len(files)), min(sampled, len(files))))
    for j in picked:
        with open(files[j], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(str(size).encode() + f.read(2 ** 20))
            if size > 2 ** 21:  # a shard: its head and its tail
                f.seek(-2 ** 20, os.SEEK_END)
                digest.update(f.read())
    if hasattr(dataset, "captions") and hasattr(dataset, "_record"):
        digest.update("\0".join(dataset.captions()).encode())
    return digest.hexdigest()[:16]


def shared_fingerprint(dataset, rank=0, world=1):
    """data_fingerprint as rank 0 reads it, on every rank; a file it cannot read stops every rank together,
    with one message (not rank 0 alone, while the others wait for its answer)."""
    fingerprint, error = None, None
    if rank == 0:
        try:
            fingerprint = data_fingerprint(dataset)
        except OSError as e:
            error = f"the training data could not be read for its fingerprint: {e}; check the files and rerun"
    fingerprint, error = from_rank0((fingerprint, error), world)
    if error:
        raise SystemExit(error)
    return fingerprint


def read_source_facts(args, dataset, encoder=None, resumed=None, proc=None, init=None):
    """SourceFacts of this run from its dataset, its text encoder, the checkpoint it resumes (`resumed`) or
    starts from (--init-from: `init`, its contents as checkpoint.read_init gave them, else opened here for its
    base resolution) and its processes (`proc`, run.Process; None: one). Rank 0 alone reads the data's
    fingerprint and tells the others, so that every rank judges a resume by the same one."""
    rank, world = (proc.rank, proc.world) if proc is not None else (0, 1)
    latent = getattr(dataset, "is_latent", False)
    res, vae = (dataset.res, dataset.vae) if latent else (args.res, args.vae)
    base_res = args.base_res
    if base_res is None and resumed is not None:
        base_res = resumed["facts"]["base_res"]
    elif base_res is None and args.init_from:
        base_res = base_res_of(read_init(args.init_from) if init is None else init)
    data_path = data_root(args)
    return SourceFacts(res=res, vae=vae, base_res=base_res or res,
                       source_dataset=dataset.meta["dataset"] if latent else args.dataset,
                       num_classes=dataset.num_classes, data_path=data_path,
                       latent_scale=dataset.scale if latent else None,
                       latent_shift=dataset.shift if latent else None,
                       text_dim=encoder.dim if encoder is not None else None,
                       text_len=encoder.max_length if encoder is not None else None, world=world,
                       data_size=data_size(dataset),
                       data_fingerprint=shared_fingerprint(dataset, rank, world))


#################################################################################
#                         The network and its objective                         #
#################################################################################


def latent_shape(facts):
    """(C, H, W) of the diffusion space: the model's input and the noise a sample starts from."""
    factor, channels = latent_geometry(facts.vae)
    return channels, facts.res // factor, facts.res // factor


def make_model(args, facts):
    """The network of this configuration, freshly initialised (from the global RNG)."""
    factor, channels = latent_geometry(facts.vae)
    shared = dict(input_size=facts.res // factor, in_channels=channels,
                  out_channels=channels * (2 if args.learn_sigma else 1), num_classes=facts.num_classes,
                  class_tokens=args.class_tokens, cond=args.cond,
                  gates={"size": args.gate_size, "crop": args.gate_crop, "flip": args.gate_flip})
    if args.cond_type == "text":
        shared["text"] = dict(text_dim=facts.text_dim, max_length=facts.text_len, pad=args.text_pad,
                              pad_noise=args.pad_noise, null=args.text_null)
    if args.arch == "unet":
        return build_unet(unet_size(args.model), **shared)
    shared.update(pos_mode=args.pos_mode, base_size=facts.base_res // factor,
                  qk_norm={"auto": None, "on": True, "off": False}[args.qk_norm])
    if args.arch == "mdt":
        return build_mdt(args.model, decode_layers=args.decode_layers, mask_ratio=args.mask_ratio, **shared)
    return build_model(args.model, **shared)


def make_autoencoder(facts):
    """The autoencoder between pixels and the diffusion space, with the latent scale (and shift) the data was
    made with: the VAE's own, or a latent cache's. Sampling decodes with the same."""
    return Autoencoder(facts.vae, scale=facts.latent_scale, shift=facts.latent_shift)


def load_autoencoder(args, facts):
    """make_autoencoder for a training run, or one message that says where the autoencoder comes from and how
    to do without it."""
    try:
        return make_autoencoder(facts)
    except (OSError, ValueError, ImportError) as e:  # no such folder or hub name, no network, no diffusers
        hub = Autoencoder.SD.get(facts.vae)
        where = (f"it is downloaded from the Hugging Face hub ({hub}) on first use and then cached; connect "
                 "once (or set HF_HOME to a copy)" if hub else "give a folder with a diffusers AutoencoderKL")
        if args.dataset == "latents":  # the cache chose it, and its latents need it for every sample grid
            raise SystemExit(f"the latent cache {args.data_path} was made with --vae {facts.vae}: could not "
                             f"load that autoencoder ({e}); {where}") from None
        raise SystemExit(f"{describe_flag(args, 'vae')}: could not load the autoencoder ({e}); {where}, or "
                         "train in pixel space with --vae none (as --recipe small does)") from None


def make_diffusion(args, facts):
    """The objective, its noise-level shift at this resolution and its sampler settings."""
    alpha = noise_shift(args.shift, facts.res, facts.base_res) if args.res_shift == "on" else args.shift
    if args.objective == "ddpm":
        diffusion = DDPM(args.pred, args.beta_schedule, args.learn_sigma, min_snr=args.min_snr, alpha=alpha)
    else:
        diffusion = Diffusion(args.pred, alpha, args.t_mean, args.t_std)
    # mDT-v2 trains on two predictions of one draw, the unmasked and the masked one (mdt.py)
    return MaskedDiffusion(diffusion) if args.arch == "mdt" else diffusion


#################################################################################
#                       What a sample is drawn with                             #
#################################################################################


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


#################################################################################
#                         A trained model and its file                          #
#################################################################################


class TrainedModel(NamedTuple):
    """A model to sample from, with what made it: its (EMA) weights, the autoencoder its latents decode with,
    the run's flags and facts, and where it came from (a file or run folder, and its step; None where not
    known)."""

    model: torch.nn.Module
    vae: object
    args: argparse.Namespace
    facts: SourceFacts
    file: str = None
    step: int = None


def load_dit(file, state, dit, device):
    """A TrainedModel from an official DiT file (`dit`: its checkpoint.dit_config), as DiT's own recipe: eps
    + learned variance, adaLN, no QK-norm, SD VAE latents at the VAE's own scale (0.18215), and its sampler
    (250 DDPM steps at guidance 1.5)."""
    name, res, num_classes = dit
    args = get_args(["--dataset", "imagenet", "--recipe", "dit", "--model", name, "--qk-norm", "off", "--res",
                     str(res)])
    facts = SourceFacts(res=res, vae=args.vae, base_res=res, source_dataset="imagenet",
                        num_classes=num_classes)
    model = make_model(args, facts)
    model.load_state_dict(with_dit_weights(model, state))
    return TrainedModel(model.to(device).eval(), None, args, facts, os.path.abspath(file))


def load_model(path, device, flag="--ckpt"):
    """A TrainedModel (its autoencoder not loaded yet: None) from a checkpoint file or run folder of ours, an
    export of ours (.safetensors), or an official DiT file (the released state dicts, or a training
    checkpoint: its EMA)."""
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
    args, facts = stored_args(ckpt["args"]), SourceFacts(**ckpt["facts"])
    model = make_model(args, facts)
    load_weights(model, ckpt["ema"], file, "EMA")
    return TrainedModel(model.to(device).eval(), None, args, facts, os.path.abspath(file), ckpt.get("step"))
