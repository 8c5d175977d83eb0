"""
Encode a dataset once into a latent cache, on every rank in parallel, resuming where it stopped:

    torchrun --nproc_per_node=8 encode.py --dataset imagenet --data-path DIR --res 256 --vae sd-ema \
        --out CACHE
    torchrun --nproc_per_node=8 train.py --dataset latents --data-path CACHE

Running the SD VAE encoder on every training batch costs a large share of a DiT step; the cache pays it once.
Each item is stored as the posterior's moments of its crop and of the crop's mirror image (latents.py
describes the layout). A re-run with the same settings and as many processes keeps the complete shards and
encodes the rest; other settings are refused with the command that made the cache.
"""
import argparse
import codecs
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from build import SourceOptions, build_dataset, data_root
from checkpoint import atomic_write
from checks import at_least, check_output, from_rank0, seed
from conditioning import CONTROL_SIGNALS
from config import DATASETS, worker_count
from data import EVENTS, setup_distributed, text_encoding
from latents import CACHE_FORMAT, Autoencoder, encode_command, latent_geometry, shard_path

#################################################################################
#                                 Shard files                                   #
#################################################################################


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def shard_complete(path, start, stop):
    """Whether `path` is a readable shard holding items start..stop-1 (an atomic rename makes most checks
    moot, but a disk can still hand back a damaged file)."""
    if not os.path.exists(path):
        return False
    try:
        index = torch.load(path, mmap=True, weights_only=True)["index"]
        return len(index) == stop - start and int(index[0]) == start and int(index[-1]) == stop - 1
    except Exception as e:
        print(f"{path}: unreadable ({type(e).__name__}: {e}), encoding it again", flush=True)
        return False


def write_shard(path, start, mean, std, label, control, caption):
    """One shard file (latents.py's layout) with its per-channel sums, atomically; non-finite latents are
    refused."""
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


#################################################################################
#                    The cache's settings: written once, compared               #
#################################################################################


def cache_meta(args, dataset, vae, world):
    """meta.json of this cache: the settings that made it and its shard plan (through JSON, so that it
    compares equal to the file it is written to)."""
    factor, channels = latent_geometry(args.vae)
    n = len(dataset)
    return json.loads(json.dumps(dict(
        format=CACHE_FORMAT, dataset=args.dataset,
        data_path=os.path.abspath(args.data_path) if args.dataset != "shapes" else None,
        shapes_size=args.shapes_size if args.dataset == "shapes" else None, seed=args.seed, res=args.res,
        crop=args.crop, vae=os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae,
        scale=vae.scale, shift=vae.shift, dtype=args.dtype,
        latent_shape=[channels, args.res // factor, args.res // factor],
        # the captions' encoding by its codec's own name (utf8, UTF-8 and utf-8 are one codec)
        text_encoding=codecs.lookup(args.text_encoding).name if args.dataset == "captions" else None,
        num_items=n, num_classes=dataset.num_classes, control_signals=list(CONTROL_SIGNALS),
        shard_size=args.shard_size, num_shards=-(-n // args.shard_size), world=world)))


def agree_on_meta(meta, out, rank, world):
    """Rank 0 writes meta.json on the first run and compares it on every later one; every rank stops together
    when the folder holds another cache."""
    problem = None
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        meta_path = os.path.join(out, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                saved = json.load(f)
            # a cache from before meta.json recorded the captions' encoding: its encoding is unknown, so the
            # one given now is taken, as it was then
            saved.setdefault("text_encoding", meta["text_encoding"])
            diff = [f"{k}: cache {saved.get(k)!r} vs now {v!r}" for k, v in meta.items() if saved.get(k) != v]
            if diff:
                problem = (f"--out {out} holds a latent cache made with other settings:\n  "
                           + "\n  ".join(diff)
                           + "\nto finish that cache, re-run the command that made it with as many "
                           "processes:\n  " + encode_command(saved,
                                                             out) + "\nor give a new --out for a new cache")
        elif any(f.startswith("shard-") for f in os.listdir(out)):
            problem = (f"--out {out} holds shards but no meta.json to tell how they were made: give a new "
                       "--out")
        else:
            write_json(meta_path, meta)
    problem = from_rank0(problem, world)
    if problem:
        raise SystemExit(problem)


#################################################################################
#                     Encoding this rank's shards, then the statistics           #
#################################################################################


def encode_shards(dataset, vae, args, meta, mine, rank, device):
    """Encode the incomplete shards among `mine` (K = rank, rank + world, ...), each written as soon as its
    last batch is encoded (batches never straddle two shards)."""
    from tqdm import tqdm

    n, size = meta["num_items"], meta["shard_size"]
    span = lambda k: (k * size, min((k + 1) * size, n))
    path = lambda k: shard_path(args.out, k, meta)
    todo = [k for k in mine if not shard_complete(path(k), *span(k))]
    print(f"rank {rank}: {len(mine) - len(todo)} of {len(mine)} shards already complete, {len(todo)} to "
          "encode", flush=True)
    batches = [list(range(b, min(b + args.batch, stop)))
               for start, stop in map(span, todo)
               for b in range(start, stop, args.batch)]
    loader = (torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                          pin_memory=device.type == "cuda")
              if batches
              else [])
    dtype, parts = getattr(torch, args.dtype), []  # parts: the encoded batches of the shard being filled
    # (2B, ..) -> (B, 2, ..)
    pair = lambda z: None if z is None else torch.stack(z.chunk(2), dim=1).to("cpu", dtype)
    for idx, (img, label, ctrl, caption) in tqdm(zip(batches, loader), total=len(batches), desc="encoding",
                                                 disable=rank != 0, dynamic_ncols=True):
        img = img.to(device, non_blocking=True)
        mean, std = vae.posterior(torch.cat([img, img.flip(-1)]))  # the mirror image itself is encoded
        parts.append((pair(mean), pair(std), label, ctrl, list(caption)))
        k = idx[-1] // size
        start, stop = span(k)
        if idx[-1] == stop - 1:  # the shard's last batch
            means, stds, labels, ctrls, captions = zip(*parts)
            write_shard(path(k), start, torch.cat(means), None if stds[0] is None else torch.cat(stds),
                        torch.cat(labels), torch.cat(ctrls), sum(captions, []))
            parts = []
            print(f"rank {rank}: wrote {os.path.basename(path(k))} (items {start}..{stop - 1})",
                  flush=True)


def write_stats(dataset, args, meta, mine, rank, world, device):
    """Per-channel statistics over the whole dataset: every rank sums its shards, then an all-reduce; rank 0
    writes stats.json, which marks the cache finished, and prints them times the latent scale of `meta`."""
    channels = meta["latent_shape"][0]
    sums = (sum(torch.load(shard_path(args.out, k, meta), mmap=True, weights_only=True)["sums"] for k in mine)
            if mine
            else torch.zeros(3, channels, dtype=torch.float64))
    events = torch.zeros(len(EVENTS), dtype=torch.int64)
    if hasattr(dataset, "events"):
        events = dataset.events.sum(0)
    if world > 1:
        sums, events = sums.to(device), events.to(device)
        dist.all_reduce(sums)
        dist.all_reduce(events)
    if rank != 0:
        return
    count = meta["num_items"] * 2 * meta["latent_shape"][1] * meta["latent_shape"][2]  # values per channel
    mu, var_mean, mean_var = sums[0] / count, sums[1] / count - (sums[0] / count) ** 2, sums[2] / count
    stats = dict(
        count_per_channel=count, mean=mu.tolist(),
        std=(var_mean + mean_var).clamp(min=0).sqrt().tolist(),  # of a posterior sample
        std_of_mean=var_mean.clamp(min=0).sqrt().tolist(),
        bad_images_this_run={k: v for k, v in zip(EVENTS, events.tolist()) if v and k != "ok"},
    )
    write_json(os.path.join(args.out, "stats.json"), stats)
    scale = meta["scale"]
    scaled = ", ".join(f"{std * scale:.3f}" for std in stats["std"]) if isinstance(scale, float) else "-"
    print(f"latent cache {args.out}: {meta['num_items']} items x 2 orientations in {meta['num_shards']} "
          f"shards; per-channel std of the raw latents {[round(std, 3) for std in stats['std']]}, times the "
          f"scale {scale}: [{scaled}]", flush=True)


def check_numbers(args):
    """Every number in its range before any process group or file, by train.py's rules for the same flags
    (config.py)."""
    for flag in ("shard_size", "batch", "res", "shapes_size"):
        at_least(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
    worker_count(args.workers)
    seed("--seed", args.seed)


def encode_cache(args):
    """Encode `args.dataset` into a latent cache at `args.out` with every rank of the job; resumes a partial
    one."""
    check_numbers(args)
    # a long timeout: on a re-run the missing shards may all be one rank's, and the others wait
    rank, world, device = setup_distributed(timeout=timedelta(hours=12))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    factor = latent_geometry(args.vae)[0]
    if args.res % factor:
        raise SystemExit(f"--res {args.res} must be divisible by the autoencoder factor {factor}")
    # a cache inside its own data would be read as data (a class of .pt files) by the next listing
    data = data_root(args)
    check_output(args.out, "folder", datasets={"--data-path": data} if data else None)
    # hflip=False: the cache stores both orientations itself; crop and any seeded draw use epoch 0
    options = SourceOptions(size=args.shapes_size, progress=rank == 0, text_encoding=args.text_encoding)
    try:
        dataset = build_dataset(args.dataset, args.res, args.data_path, seed=args.seed, crop=args.crop,
                                hflip=False, options=options)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # a wrong path, a caption that does not decode
        raise SystemExit(f"--dataset {args.dataset}: {e}") from None
    vae = Autoencoder(args.vae).to(device)
    meta = cache_meta(args, dataset, vae, world)
    agree_on_meta(meta, args.out, rank, world)
    mine = list(range(rank, meta["num_shards"], world))
    encode_shards(dataset, vae, args, meta, mine, rank, device)
    write_stats(dataset, args, meta, mine, rank, world, device)
    if world > 1:
        dist.barrier()  # every rank returns only once the cache is finished
        dist.destroy_process_group()
    return args.out


#################################################################################
#                                      CLI                                      #
#################################################################################


def main(argv=None):
    """encode.py's flags, then the cache."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--dataset", default="imagenet", choices=[d for d in DATASETS if d not in ("latents", "webdataset")],
         help="a map-style dataset: imagenet | folder (ImageFolder trees) | captions | shapes (webdataset "
         "shards are a stream without indices, which the cache's shard plan needs)")
    flag("--data-path", default=None,
         help="ImageFolder root for imagenet / folder; caption folder or .csv for captions")
    flag("--shapes-size", type=int, default=10000, help="number of shapes images")
    flag("--res", type=int, default=256, help="pixel resolution of the crops")
    flag("--crop", default="center", choices=("center", "random"), help="crop policy; center (ADM / DiT) is "
         "the usual one for a cache, random draws one fixed crop per image from --seed")
    flag("--vae", default="sd-ema", help="sd-ema | sd-mse | a diffusers AutoencoderKL folder | none (pixels)")
    flag("--out", required=True, help="cache folder (a file system every rank sees)")
    flag("--seed", type=int, default=0, help="seed of random crops and of the shapes dataset")
    flag("--shard-size", type=int, default=2048,
         help="items per shard file (2048 at 256 px: 64 MB of fp16 moments)")
    flag("--dtype", default="float16", choices=("float16", "float32"), help="storage type of the moments")
    flag("--batch", type=int, default=64,
         help="images per encoder call on each rank (each also encoded mirrored)")
    flag("--workers", type=int, default=8, help="data-loader workers per rank")
    flag("--text-encoding", type=text_encoding, default="utf-8", help="captions: the encoding of the caption "
         "files (.txt, .csv); a file that does not decode in it is named with its line")
    return encode_cache(parser.parse_args(argv))


if __name__ == "__main__":
    main()
