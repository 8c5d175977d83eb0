"""
Latent space: the autoencoder that maps images to the diffusion space and back (pixels, or the Stable Diffusion VAE),
and the latent cache that encodes a dataset once, on every rank in parallel, resuming where it stopped:

    torchrun --nproc_per_node=8 latents.py --encode --dataset imagenet --data-path DIR --res 256 --vae sd-ema --out CACHE

`build_dataset("latents", 256, data_path=CACHE)` (data.py) reads it back as `LatentCacheDataset`: the usual item tuple
with a float latent (C, h, w) in place of the image (`dataset.is_latent` tells the two apart).
"""
import argparse
import json
import os
from datetime import timedelta

import numpy as np
import torch
from torch.utils.data import Dataset

from checkpoint import atomic_write
from conditioning import CONTROL_SIGNALS
from data import DATASETS, EVENTS, build_dataset, setup_distributed

#################################################################################
#                       Autoencoder (pixel or latent space)                     #
#################################################################################

def latent_geometry(name):
    """(downsampling factor, channels) of the diffusion space for `--vae NAME`, known before any weights load:
    pixels for `none`, the SD-family VAE layout (f = 8, 4 channels) otherwise."""
    return (1, 3) if name == "none" else (8, 4)


class Autoencoder(torch.nn.Module):
    """Maps uint8-range images to the diffusion space and back. `none`: pixels scaled to [-1, 1].
    `sd-ema` / `sd-mse` / a path to a diffusers AutoencoderKL folder: the Stable Diffusion VAE (f = 8, 4 channels)
    via `diffusers`, an optional package imported only here.

    The diffusion space is `(z - shift) * scale` of a raw VAE latent z. `scale` defaults to the VAE config's
    `scaling_factor` (0.18215 for the SD VAE) and `shift` to its `shift_factor` (none for the SD VAE); either may be a
    per-channel list (a latent cache's statistics, see LatentCacheDataset). Training and decoding must use the same
    pair: a model trained on cached latents decodes with `Autoencoder(name, scale=cache.scale, shift=cache.shift)`.
    """

    SD = {"sd-ema": "stabilityai/sd-vae-ft-ema", "sd-mse": "stabilityai/sd-vae-ft-mse"}

    def __init__(self, name="none", scale=None, shift=None):
        super().__init__()
        self.name, self.vae = name, None
        if name != "none":
            try:
                from diffusers.models import AutoencoderKL
            except ImportError as e:
                raise ImportError(f"--vae {name} needs the optional package diffusers: pip install diffusers") from e
            # low_cpu_mem_usage=False: the VAE is small (84 M parameters), and it spares a warning without `accelerate`
            self.vae = AutoencoderKL.from_pretrained(self.SD.get(name, name), low_cpu_mem_usage=False)
            self.vae.eval().requires_grad_(False)
            found = (2 ** (len(self.vae.config.block_out_channels) - 1), self.vae.config.latent_channels)
            if found != latent_geometry(name):  # the model was sized from latent_geometry: they must agree
                raise ValueError(f"--vae {name}: factor {found[0]} with {found[1]} channels; this code sizes models "
                                 f"for the SD layout {latent_geometry(name)}")
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
        """uint8 (B, 3, H, W) -> float (B, C, H/f, W/f) in the diffusion space: the posterior mean, or a posterior
        sample (as SD and DiT train) when a generator is given."""
        mean, std = self.posterior(images)
        z = mean if std is None or generator is None else \
            mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
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
#                Latent cache: encode a dataset once, on every rank             #
#################################################################################
# Running the SD VAE encoder on every training batch costs a large share of a DiT step; the cache pays it once.
# Layout of CACHE_DIR (one shared file system for every rank):
#   meta.json   the settings that made the cache and its shard plan; compared on every re-run, a mismatch is refused
#   shard-RRR-KKKKK.pt   shard K: items [K * shard_size, (K + 1) * shard_size) of the dataset, written by rank
#               R = K % world (so no two ranks ever write one file), a torch.save dict:
#       index    int64 (n,)              dataset index of each item
#       mean     dtype (n, 2, C, h, w)   posterior mean of the raw latent: [:, 0] the crop, [:, 1] its mirror image
#       std      dtype (n, 2, C, h, w)   posterior std (absent in pixel space)
#       label    int64 (n,)
#       control  float32 (n, S)          control of the crop, CONTROL_SIGNALS order, flip = 0
#       caption  list of n str
#       sums     float64 (3, C)          per channel: sum of mean, of mean^2, of std^2 (for stats.json)
#   stats.json  per-channel statistics over the whole dataset; written last, so it marks a finished cache
# The posterior's moments are stored, not a sample of it: the reader draws a fresh sample each epoch, as SD and DiT
# train, for twice the disk of one fixed sample (fast-DiT's choice). The mirrored copy is the encoding of the
# mirrored image: the VAE does not commute with a flip, so a mirrored latent would be off the data distribution.
# The crop itself is fixed by the cache (`center`, the usual choice, or one seeded `random` crop per image).

CACHE_FORMAT = 1


def shard_name(k, world):
    return f"shard-{k % world:03d}-{k:05d}.pt"


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _distributed():
    """setup_distributed with a long timeout: on a re-run the missing shards may all be one rank's, and the others
    wait."""
    return setup_distributed(timeout=timedelta(hours=12))


def _shard_complete(path, start, stop):
    """Whether `path` is a readable shard holding items start..stop-1 (an atomic rename makes most checks moot,
    but a disk can still hand back a damaged file)."""
    if not os.path.exists(path):
        return False
    try:
        index = torch.load(path, mmap=True, weights_only=True)["index"]
        return len(index) == stop - start and int(index[0]) == start and int(index[-1]) == stop - 1
    except Exception as e:
        print(f"{path}: unreadable ({type(e).__name__}: {e}), encoding it again", flush=True)
        return False


def _write_shard(path, start, mean, std, label, control, caption):
    if not torch.isfinite(mean).all() or (std is not None and not torch.isfinite(std).all()):
        bad = start + torch.nonzero(~torch.isfinite(mean).flatten(1).all(1)).flatten()
        raise RuntimeError(f"{path}: non-finite latents (items {bad.tolist()[:10]}); a VAE that overflows in "
                           "--dtype float16 needs --dtype float32")
    dims = (0, 1, 3, 4)  # all but the channel
    m = mean.double()  # statistics of the stored (rounded) values: exactly what the reader will return
    var = std.double() ** 2 if std is not None else torch.zeros_like(m)
    shard = dict(index=torch.arange(start, start + len(label)), mean=mean, label=label, control=control,
                 caption=caption, sums=torch.stack([m.sum(dims), (m * m).sum(dims), var.sum(dims)]))
    if std is not None:
        shard["std"] = std
    atomic_write(path, lambda f: torch.save(shard, f))


def encode_command(meta, out):
    """The command line that makes (or finishes) the cache described by `meta`."""
    launch = f"torchrun --nproc_per_node={meta['world']}" if meta["world"] > 1 else "python"
    data = f" --data-path {meta['data_path']}" if meta["data_path"] else f" --shapes-size {meta['shapes_size']}"
    return (f"{launch} latents.py --encode --dataset {meta['dataset']}{data} --res {meta['res']} --vae {meta['vae']} "
            f"--crop {meta['crop']} --seed {meta['seed']} --shard-size {meta['shard_size']} --dtype {meta['dtype']} "
            f"--out {out}")


def encode_cache(args):
    """Encode `args.dataset` into a latent cache at `args.out` with every rank of the job; resumes a partial one."""
    import torch.distributed as dist
    from tqdm import tqdm
    rank, world, device = _distributed()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    factor, channels = latent_geometry(args.vae)
    if args.res % factor:
        raise SystemExit(f"--res {args.res} must be divisible by the autoencoder factor {factor}")
    if args.shard_size <= 0 or args.batch <= 0:
        raise SystemExit("--shard-size and --batch must be positive")
    # hflip=False: the cache stores both orientations itself; crop and any seeded draw use epoch 0
    dataset = build_dataset(args.dataset, args.res, args.data_path, seed=args.seed, size=args.shapes_size,
                            crop=args.crop, hflip=False, progress=rank == 0)
    vae = Autoencoder(args.vae).to(device)
    n, size = len(dataset), args.shard_size
    num_shards = -(-n // size)
    meta = json.loads(json.dumps(dict(  # through JSON, so it compares equal to the file it is written to
        format=CACHE_FORMAT, dataset=args.dataset,
        data_path=os.path.abspath(args.data_path) if args.dataset != "shapes" else None,
        shapes_size=args.shapes_size if args.dataset == "shapes" else None, seed=args.seed, res=args.res,
        crop=args.crop, vae=os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae, scale=vae.scale,
        shift=vae.shift, dtype=args.dtype, latent_shape=[channels, args.res // factor, args.res // factor],
        num_items=n, num_classes=dataset.num_classes, control_signals=list(CONTROL_SIGNALS), shard_size=size,
        num_shards=num_shards, world=world)))

    # ---- settings: written by rank 0 on the first run, compared on every later one; all ranks agree to stop ----
    problem = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        meta_path = os.path.join(args.out, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                saved = json.load(f)
            diff = [f"{k}: cache {saved.get(k)!r} vs now {v!r}" for k, v in meta.items() if saved.get(k) != v]
            if diff:
                problem = (f"--out {args.out} holds a latent cache made with other settings:\n  " + "\n  ".join(diff) +
                           "\nto finish that cache, re-run the command that made it with as many processes:\n  "
                           + encode_command(saved, args.out) + "\nor give a new --out for a new cache")
        elif any(f.startswith("shard-") for f in os.listdir(args.out)):
            problem = f"--out {args.out} holds shards but no meta.json to tell how they were made: give a new --out"
        else:
            _write_json(meta_path, meta)
    if world > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise SystemExit(problem)

    # ---- this rank's shards: K = rank, rank + world, ...; a complete one is kept --------------------------------
    span = lambda k: (k * size, min((k + 1) * size, n))
    path = lambda k: os.path.join(args.out, shard_name(k, world))
    mine = list(range(rank, num_shards, world))
    todo = [k for k in mine if not _shard_complete(path(k), *span(k))]
    print(f"rank {rank}: {len(mine) - len(todo)} of {len(mine)} shards already complete, {len(todo)} to encode",
          flush=True)
    # batches never straddle two shards, so a shard is written as soon as its last batch is encoded
    batches = [list(range(b, min(b + args.batch, stop))) for start, stop in map(span, todo)
               for b in range(start, stop, args.batch)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=device.type == "cuda") if batches else []
    dtype, parts = getattr(torch, args.dtype), []  # parts: the encoded batches of the shard being filled
    pair = lambda z: None if z is None else torch.stack(z.chunk(2), dim=1).to("cpu", dtype)  # (2B, ..) -> (B, 2, ..)
    for idx, (img, label, ctrl, caption) in tqdm(zip(batches, loader), total=len(batches), desc="encoding",
                                                 disable=rank != 0, dynamic_ncols=True):
        img = img.to(device, non_blocking=True)
        mean, std = vae.posterior(torch.cat([img, img.flip(-1)]))  # the mirror image itself is encoded
        parts.append((pair(mean), pair(std), label, ctrl, list(caption)))
        k = idx[-1] // size
        start, stop = span(k)
        if idx[-1] == stop - 1:  # the shard's last batch
            means, stds, labels, ctrls, captions = zip(*parts)
            _write_shard(path(k), start, torch.cat(means), None if stds[0] is None else torch.cat(stds),
                         torch.cat(labels), torch.cat(ctrls), sum(captions, []))
            parts = []
            print(f"rank {rank}: wrote {shard_name(k, world)} (items {start}..{stop - 1})", flush=True)

    # ---- per-channel statistics over the whole dataset: every rank sums its shards, then all-reduce -----------
    sums = sum(torch.load(path(k), mmap=True, weights_only=True)["sums"] for k in mine) if mine else \
        torch.zeros(3, channels, dtype=torch.float64)
    events = dataset.events.sum(0) if hasattr(dataset, "events") else torch.zeros(len(EVENTS), dtype=torch.int64)
    if world > 1:
        sums, events = sums.to(device), events.to(device)
        dist.all_reduce(sums)
        dist.all_reduce(events)
    if rank == 0:
        count = n * 2 * meta["latent_shape"][1] * meta["latent_shape"][2]  # values per channel: items x 2 x h x w
        mu, var_mean, mean_var = sums[0] / count, sums[1] / count - (sums[0] / count) ** 2, sums[2] / count
        stats = dict(count_per_channel=count, mean=mu.tolist(),
                     std=(var_mean + mean_var).clamp(min=0).sqrt().tolist(),  # of a posterior sample
                     std_of_mean=var_mean.clamp(min=0).sqrt().tolist(),
                     bad_images_this_run={k: v for k, v in zip(EVENTS, events.tolist()) if v and k != "ok"})
        _write_json(os.path.join(args.out, "stats.json"), stats)
        scaled = ", ".join(f"{s * vae.scale:.3f}" for s in stats["std"]) if isinstance(vae.scale, float) else "-"
        print(f"latent cache {args.out}: {n} items x 2 orientations in {num_shards} shards; per-channel std of "
              f"the raw latents {[round(s, 3) for s in stats['std']]}, times the scale {vae.scale}: [{scaled}]",
              flush=True)
    if world > 1:
        dist.barrier()  # every rank returns only once the cache is finished
        dist.destroy_process_group()
    return args.out


#################################################################################
#                      Latent cache: the training dataset                       #
#################################################################################

def read_cache(cache_dir):
    """(meta, stats) of a finished latent cache; a missing or unfinished one fails with the command to run."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{cache_dir!r} is not a latent cache (no meta.json); make one with\n  python "
                                f"latents.py --encode --dataset imagenet --data-path DIR --res 256 --vae sd-ema --out "
                                f"{cache_dir}")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{cache_dir}: latent cache format {meta.get('format')}, this code reads {CACHE_FORMAT}")
    missing = [k for k in range(meta["num_shards"])
               if not os.path.exists(os.path.join(cache_dir, shard_name(k, meta["world"])))]
    stats_path = os.path.join(cache_dir, "stats.json")
    if missing or not os.path.exists(stats_path):
        raise RuntimeError(f"latent cache {cache_dir} is unfinished ({len(missing)} of {meta['num_shards']} shards "
                           f"missing{'' if os.path.exists(stats_path) else ', no stats.json'}); finish it with\n  "
                           + encode_command(meta, cache_dir))
    with open(stats_path) as f:
        return meta, json.load(f)


class LatentCacheDataset(Dataset):
    """The items of a latent cache (`python latents.py --encode`): (latent float (C, h, w), label, control, caption).

    Per item and epoch, from (seed, epoch, index) as in the image datasets: the crop or its mirror image (flip
    recorded in control[SIGNAL["flip"]]), then a posterior sample (or the posterior mean with `sample=False`), returned in the
    diffusion space `(z - shift) * scale`. `norm`: `scale` uses the VAE's own factor (0.18215 for the SD VAE,
    the DiT / SD recipe); `channel` uses the cache's per-channel mean and std. Decode samples with
    `Autoencoder(ds.vae, scale=ds.scale, shift=ds.shift)`.

    A flipped item keeps the crop offsets of the unflipped one: as in `crop_flip`, crop_top / crop_left are always
    measured in the unmirrored canvas and the mirror is applied after the crop. (The mirrored view, left' =
    canvas_w - res - left, carries the same information next to the flip flag; keeping one convention means the
    model sees the same control for the same pixels whether it trains from images or from this cache.)

    Shards are memory-mapped when first touched, never read whole: ImageNet-256 holds about 21 GB of fp16 means and as
    much of stds, too much to copy into every rank; mapped pages sit in the OS page cache, shared by all ranks and
    loader workers of a node, and a random access costs one small read.
    """

    is_latent = True

    def __init__(self, cache_dir, seed=0, hflip=True, sample=True, norm="scale"):
        self.meta, self.stats = read_cache(cache_dir)
        self.cache_dir, self.seed, self.hflip, self.sample, self.epoch = cache_dir, seed, hflip, sample, 0
        m = self.meta
        self.num_classes, self.res, self.vae, self.crop = m["num_classes"], m["res"], m["vae"], m["crop"]
        self.latent_shape = tuple(m["latent_shape"])
        if norm == "scale":
            self.scale, self.shift = m["scale"], m["shift"]
        elif norm == "channel":
            self.scale, self.shift = [1.0 / s for s in self.stats["std"]], self.stats["mean"]
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
            path = os.path.join(self.cache_dir, shard_name(k, self.meta["world"]))
            self._shards[k] = torch.load(path, mmap=True, weights_only=True)
        return self._shards[k]

    def __getitem__(self, i):
        k, o = divmod(i, self.meta["shard_size"])
        shard = self._shard(k)
        rng = np.random.default_rng([self.seed, self.epoch, i, 1])
        flip = int(self.hflip and rng.random() < 0.5)
        z = shard["mean"][o, flip].float()  # (C, h, w)
        if self.sample and "std" in shard:
            z = z + shard["std"][o, flip].float() * torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))
        ctrl = shard["control"][o].clone()
        ctrl[CONTROL_SIGNALS.index("flip")] = flip
        return (z - self._shift) * self._scale, int(shard["label"][o]), ctrl, shard["caption"][o]


#################################################################################
#                                    CLI                                        #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--encode", action="store_true", required=True, help="encode a dataset into a latent cache (the only mode)")
    a("--dataset", default="imagenet", choices=[d for d in DATASETS if d not in ("latents", "webdataset")],
      help="a map-style dataset build_dataset knows: imagenet | folder (ImageFolder trees) | captions | shapes "
      "(webdataset shards are a stream without indices, which the cache's shard plan needs)")
    a("--data-path", default=None, help="ImageFolder root for imagenet / folder; caption folder or .csv for captions")
    a("--shapes-size", type=int, default=10000, help="number of shapes images")
    a("--res", type=int, default=256, help="pixel resolution of the crops")
    a("--crop", default="center", choices=("center", "random"), help="crop policy; center (ADM / DiT) is the usual "
      "one for a cache, random draws one fixed crop per image from --seed")
    a("--vae", default="sd-ema", help="sd-ema | sd-mse | a diffusers AutoencoderKL folder | none (pixels)")
    a("--out", required=True, help="cache folder (a file system every rank sees)")
    a("--seed", type=int, default=0, help="seed of random crops and of the shapes dataset")
    a("--shard-size", type=int, default=2048, help="items per shard file (2048 at 256 px: 64 MB of fp16 moments)")
    a("--dtype", default="float16", choices=("float16", "float32"), help="storage type of the moments")
    a("--batch", type=int, default=64, help="images per encoder call on each rank (each also encoded mirrored)")
    a("--workers", type=int, default=8, help="data-loader workers per rank")
    return encode_cache(p.parse_args(argv))


if __name__ == "__main__":
    main()
