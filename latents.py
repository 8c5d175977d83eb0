"""
Latent space: the autoencoder that maps images to the diffusion space and back (pixels, or the Stable
Diffusion VAE), and the latent cache that holds a dataset encoded once (written by encode.py):

    torchrun --nproc_per_node=8 encode.py --dataset imagenet --data-path DIR --res 256 --vae sd-ema \
        --out CACHE
    python train.py --dataset latents --data-path CACHE       # reads it back as LatentCacheDataset

A cache item is the usual item tuple with a float latent (C, h, w) in place of the image (`dataset.is_latent`
tells the two apart).
"""
import json
import os
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

from conditioning import CONTROL_SIGNALS

#################################################################################
#                       Autoencoder (pixel or latent space)                     #
#################################################################################

def latent_geometry(name):
    """(downsampling factor, channels) of the diffusion space for `--vae NAME`, known before any weights load:
    pixels for `none`, the SD-family VAE layout (f = 8, 4 channels) otherwise."""
    return (1, 3) if name == "none" else (8, 4)


class Autoencoder(torch.nn.Module):
    """Maps uint8-range images to the diffusion space and back. `none`: pixels scaled to [-1, 1].
    `sd-ema` / `sd-mse` / a path to a diffusers AutoencoderKL folder: the Stable Diffusion VAE (f = 8, 4
    channels) via `diffusers`, an optional package imported only here.

    The diffusion space is `(z - shift) * scale` of a raw VAE latent z. `scale` defaults to the VAE config's
    `scaling_factor` (0.18215 for the SD VAE) and `shift` to its `shift_factor` (none for the SD VAE); either
    may be a per-channel list (a latent cache's statistics, see LatentCacheDataset). Training and decoding
    must use the same pair: a model trained on cached latents decodes with `Autoencoder(name,
    scale=cache.scale, shift=cache.shift)`.
    """

    SD = {"sd-ema": "stabilityai/sd-vae-ft-ema", "sd-mse": "stabilityai/sd-vae-ft-mse"}

    def __init__(self, name="none", scale=None, shift=None):
        super().__init__()
        self.name, self.vae = name, None
        if name != "none":
            try:
                from diffusers.models import AutoencoderKL
            except ImportError as e:
                raise ImportError(f"--vae {name} needs the optional package diffusers: pip install "
                                  "diffusers") from e
            # low_cpu_mem_usage=False: the VAE is small (84 M parameters), and it spares a warning without
            # `accelerate`
            self.vae = AutoencoderKL.from_pretrained(self.SD.get(name, name), low_cpu_mem_usage=False)
            self.vae.eval().requires_grad_(False)
            found = (2 ** (len(self.vae.config.block_out_channels) - 1), self.vae.config.latent_channels)
            if found != latent_geometry(name):  # the model was sized from latent_geometry: they must agree
                raise ValueError(f"--vae {name}: factor {found[0]} with {found[1]} channels; this code sizes "
                                 f"models for the SD layout {latent_geometry(name)}")
        if self.vae is None:
            own_scale, own_shift = 1.0, 0.0
        else:
            own_scale, own_shift = self.vae.config.scaling_factor, self.vae.config.get("shift_factor") or 0.0
        self.scale = own_scale if scale is None else scale
        self.shift = own_shift if shift is None else shift

    def _affine(self, z):
        """(scale, shift) as tensors that broadcast over (B, C, h, w): a float or one value per channel."""
        as_t = lambda v: torch.as_tensor(v, dtype=z.dtype, device=z.device).reshape(-1, 1, 1)
        return as_t(self.scale), as_t(self.shift)

    @torch.no_grad()
    def posterior(self, images):
        """uint8 (B, 3, H, W) -> the VAE posterior N(mean, std^2) of the raw (unscaled) latent, each float
        (B, C, H/f, W/f). In pixel space the map is deterministic: (pixels in [-1, 1], None)."""
        x = images.float() / 127.5 - 1.0
        if self.vae is None:
            return x, None
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    @torch.no_grad()
    def encode(self, images, generator=None):
        """uint8 (B, 3, H, W) -> float (B, C, H/f, W/f) in the diffusion space: the posterior mean, or a
        posterior sample (as SD and DiT train) when a generator is given."""
        mean, std = self.posterior(images)
        z = (mean
             if std is None or generator is None
             else mean
             + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype))
        return self.normalize(z)

    def normalize(self, z):
        """Raw latents -> the diffusion space."""
        scale, shift = self._affine(z)
        return (z - shift) * scale

    @torch.no_grad()
    def decode(self, z):
        """float latents in the diffusion space -> images in [0, 1]."""
        scale, shift = self._affine(z)
        z = z / scale + shift
        x = z if self.vae is None else self.vae.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(images01):
    """[0, 1] float (B, C, H, W) -> uint8 (B, C, H, W)."""
    return (images01 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


#################################################################################
#                  Latent cache: the layout encode.py writes                    #
#################################################################################
# Running the SD VAE encoder on every training batch costs a large share of a DiT step; the cache pays it
# once. Layout of CACHE_DIR (one shared file system for every rank):
#   meta.json   the settings that made the cache and its shard plan; compared on every re-run, a mismatch is
#               refused
#   shard-RRR-KKKKK.pt   shard K: items [K * shard_size, (K + 1) * shard_size) of the dataset, written by rank
#               R = K % world (so no two ranks ever write one file), a torch.save dict:
#       index    int64 (n,)              dataset index of each item
#       mean     dtype (n, 2, C, h, w)   posterior mean of the raw latent: [:, 0] the crop, [:, 1] its mirror
#                image
#       std      dtype (n, 2, C, h, w)   posterior std (absent in pixel space)
#       label    int64 (n,)
#       control  float32 (n, S)          control of the crop, CONTROL_SIGNALS order, flip = 0
#       caption  list of n str
#       sums     float64 (3, C)          per channel: sum of mean, of mean^2, of std^2 (for stats.json)
#   stats.json  per-channel statistics over the whole dataset; written last, so it marks a finished cache
# The posterior's moments are stored, not a sample of it: the reader draws a fresh sample each epoch, as SD
# and DiT train, for twice the disk of one fixed sample (fast-DiT's choice). The mirrored copy is the encoding
# of the mirrored image: the VAE does not commute with a flip, so a mirrored latent would be off the data
# distribution. The crop itself is fixed by the cache (`center`, the usual choice, or one seeded `random` crop
# per image).

CACHE_FORMAT = 1


def shard_name(k, world):
    return f"shard-{k % world:03d}-{k:05d}.pt"


def shard_path(cache_dir, k, meta):
    """Shard k of the cache in `cache_dir` whose meta.json is `meta` (named by the rank that encodes it)."""
    return os.path.join(cache_dir, shard_name(k, meta["world"]))


def encode_command(meta, out):
    """The command line that makes (or finishes) the cache described by `meta`."""
    launch = f"torchrun --nproc_per_node={meta['world']}" if meta["world"] > 1 else "python"
    data = (f" --data-path {meta['data_path']}" if meta["data_path"] else " --shapes-size "
            f"{meta['shapes_size']}")
    encoding = meta.get("text_encoding")  # named when the captions were read in another than utf-8
    text = f" --text-encoding {encoding}" if encoding not in (None, "utf-8") else ""
    return (f"{launch} encode.py --dataset {meta['dataset']}{data} --res {meta['res']} --vae {meta['vae']} "
            f"--crop {meta['crop']} --seed {meta['seed']} --shard-size {meta['shard_size']} --dtype "
            f"{meta['dtype']}{text} --out {out}")


#################################################################################
#                      Latent cache: the training dataset                       #
#################################################################################


def read_cache(cache_dir):
    """(meta, stats) of a finished latent cache; a missing or unfinished one fails with the command to run."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{cache_dir!r} is not a latent cache (no meta.json); make one with\n  "
                                "python encode.py --dataset imagenet --data-path DIR --res 256 --vae sd-ema "
                                f"--out {cache_dir}")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{cache_dir}: latent cache format {meta.get('format')}, this code reads "
                         f"{CACHE_FORMAT}")
    stats_path = os.path.join(cache_dir, "stats.json")
    missing = []
    for k in range(meta["num_shards"]):
        path = shard_path(cache_dir, k, meta)
        if not os.path.exists(path):
            missing.append(k)
        # a shard's zip directory sits at its end: a truncated shard fails here, at the cost of one small
        # read per shard, not at the first batch that needs it
        elif not zipfile.is_zipfile(path):
            raise RuntimeError(f"latent cache {cache_dir}: shard {os.path.basename(path)} is damaged "
                               "(truncated, or not a shard: no zip directory at its end); encode it again "
                               "(the command redoes only missing or damaged shards):\n  "
                               + encode_command(meta, cache_dir))
    if missing or not os.path.exists(stats_path):
        raise RuntimeError(f"latent cache {cache_dir} is unfinished ({len(missing)} of {meta['num_shards']} "
                           f"shards missing{'' if os.path.exists(stats_path) else ', no stats.json'}); "
                           "finish it with\n  " + encode_command(meta, cache_dir))
    with open(stats_path, encoding="utf-8") as f:
        return meta, json.load(f)


class LatentCacheDataset(Dataset):
    """The items of a latent cache (`python encode.py`): (latent float (C, h, w), label, control, caption).

    Per item and epoch, from (seed, epoch, index) as in the image datasets: the crop or its mirror image (flip
    recorded in control[SIGNAL["flip"]]), then a posterior sample (or the posterior mean with `sample=False`),
    returned in the diffusion space `(z - shift) * scale`. `norm`: `scale` uses the VAE's own factor (0.18215
    for the SD VAE, the DiT / SD recipe); `channel` uses the cache's per-channel mean and std. Decode samples
    with `Autoencoder(ds.vae, scale=ds.scale, shift=ds.shift)`.

    A flipped item keeps the crop offsets of the unflipped one: as in `crop_flip`, crop_top / crop_left are
    always measured in the unmirrored canvas and the mirror is applied after the crop. (The mirrored view,
    left' = canvas_w - res - left, carries the same information next to the flip flag; keeping one convention
    means the model sees the same control for the same pixels whether it trains from images or from this
    cache.)

    Shards are memory-mapped when first touched, never read whole: ImageNet-256 holds about 21 GB of fp16
    means and as much of stds, too much to copy into every rank; mapped pages sit in the OS page cache, shared
    by all ranks and loader workers of a node, and a random access costs one small read.
    """

    is_latent = True

    def __init__(self, cache_dir, seed=0, hflip=True, sample=True, norm="scale"):
        self.meta, self.stats = read_cache(cache_dir)
        self.cache_dir, self.seed, self.hflip, self.sample, self.epoch = cache_dir, seed, hflip, sample, 0
        meta = self.meta
        self.num_classes, self.res, self.vae = meta["num_classes"], meta["res"], meta["vae"]
        self.crop = meta["crop"]
        self.latent_shape = tuple(meta["latent_shape"])
        if norm == "scale":
            self.scale, self.shift = meta["scale"], meta["shift"]
        elif norm == "channel":
            self.scale, self.shift = [1.0 / std for std in self.stats["std"]], self.stats["mean"]
        else:
            raise ValueError(f"unknown latent normalisation {norm!r}; use 'scale' or 'channel'")
        view = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1)
        self._scale, self._shift = view(self.scale), view(self.shift)
        self._shards = {}  # shard number -> memory-mapped dict, opened by each process on first use

    def __len__(self):
        return self.meta["num_items"]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _shard(self, k):
        if k not in self._shards:
            path = shard_path(self.cache_dir, k, self.meta)
            try:
                self._shards[k] = torch.load(path, mmap=True, weights_only=True)
            except Exception as e:  # damaged after the cache was opened: name the file and the repair
                raise RuntimeError(f"latent cache shard {path} is unreadable ({type(e).__name__}: {e}); "
                                   "encode it again (the command redoes only missing or damaged shards):\n  "
                                   + encode_command(self.meta, self.cache_dir)) from None
        return self._shards[k]

    def __getitem__(self, i):
        k, o = divmod(i, self.meta["shard_size"])
        shard = self._shard(k)
        rng = np.random.default_rng([self.seed, self.epoch, i, 1])
        flip = int(self.hflip and rng.random() < 0.5)
        z = shard["mean"][o, flip].float()  # (C, h, w)
        if self.sample and "std" in shard:
            std = shard["std"][o, flip].float()
            z = z + std * torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))
        ctrl = shard["control"][o].clone()
        ctrl[CONTROL_SIGNALS.index("flip")] = flip
        return (z - self._shift) * self._scale, int(shard["label"][o]), ctrl, shard["caption"][o]
