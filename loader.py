"""
How a training run reads its data: in an order that resumes to the batch, and from a loader batch to the
model's inputs on the device.

The order is a seeded permutation per epoch, strided across ranks, started at any batch of it -- so that a
resumed run sees exactly the batches the uninterrupted run would have seen. A streamed dataset (webdataset
shards) keeps its own position instead: samples drawn per loader worker, and the worker of the next batch.
train.py reads `batches(...)`; the position it yields is what a checkpoint stores (run.py).
"""
import signal
from typing import NamedTuple

import torch

from data import EVENTS, SKIPPED, NoUsableData
from text import caption_features


def epoch_indices(n, epoch, seed, proc, batch):
    """This rank's indices for one epoch: a seeded permutation, strided across ranks, whole batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = (n // proc.world) // batch * batch
    if per_rank == 0:
        raise SystemExit(f"dataset of {n} images is smaller than one batch of {batch} on each of "
                         f"{proc.world} ranks")
    return perm[proc.rank :: proc.world][:per_rank]


def loader_options(args, epoch, batch):
    """DataLoader settings shared by both kinds of data. The workers' base seed comes from a generator of
    the loader's own: given none it takes the global RNG, which the model also uses (mDT masks, text padding
    noise), so a resume -- which starts a loader at another step -- would shift that stream. A worker leaves
    Ctrl-C to the training process, which finishes its step and writes a checkpoint."""
    return dict(batch_size=batch, num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                drop_last=True, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch),
                worker_init_fn=ignore_sigint)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches(dataset, args, proc, batch, progress):
    """batches_in_order(...), where data that holds no usable image ends the run with one line, not a loader
    worker's traceback."""
    try:
        yield from batches_in_order(dataset, args, proc, batch, progress)
    except NoUsableData as e:  # from a worker: the message is its traceback, whose last line is ours
        raise SystemExit(str(e).strip().splitlines()[-1].split(f"{NoUsableData.__name__}: ")[-1]) from None


def batches_in_order(dataset, args, proc, batch, progress):
    """Yield (epoch, position after it, batch) forever, from where `progress` stands. A streamed dataset
    (webdataset shards) splits itself across ranks and workers; its position is (samples drawn per worker,
    the worker of the next batch) -- different on every rank, so checkpoints keep one per rank."""
    epoch, position = progress.epoch, progress.position
    if progress.streamed:
        yield from stream_batches(dataset, args, batch, epoch, position)
        return
    while True:
        dataset.set_epoch(epoch)
        idx = epoch_indices(len(dataset), epoch, args.seed, proc, batch)
        loader = torch.utils.data.DataLoader(dataset, sampler=idx[position * batch :],
                                             **loader_options(args, epoch, batch))
        for b in loader:
            position += 1
            yield epoch, position, b
        epoch, position = epoch + 1, 0


def stream_batches(dataset, args, batch, epoch, position):
    """batches() of a streamed dataset; `position` None starts the epoch from the beginning."""
    workers = max(args.workers, 1)
    drawn, first = position if position is not None else (None, 0)
    while True:
        dataset.set_epoch(epoch, drawn, first)
        loader = torch.utils.data.DataLoader(dataset, collate_fn=dataset.collate,
                                             **loader_options(args, epoch, batch))
        drawn, got = list(drawn or [0] * workers), 0
        for img, y, ctrl, captions, tag in loader:
            worker, drawn_by_worker = tag.tolist()
            drawn[worker], first, got = drawn_by_worker, (worker + 1) % workers, got + 1
            yield epoch, (list(drawn), first), (img, y, ctrl, captions)
        if got == 0:
            counts = dict(zip(EVENTS, dataset.events.sum(0).tolist()))
            skipped = {k: counts[k] for k in SKIPPED if counts[k]}
            raise SystemExit(f"--dataset {args.dataset}: a whole epoch gave this rank no batch of {batch} "
                             f"(so far this process used {counts['ok']} samples and skipped "
                             f"{skipped or 'none'}); "
                             + ("check the shards' captions and images" if skipped and not counts["ok"] else
                                "use more (or fewer, larger) shards, fewer --workers or a smaller --batch"))
        epoch, drawn, first = epoch + 1, None, 0


#################################################################################
#                       From a loader batch to the model                        #
#################################################################################


class Inputs(NamedTuple):
    """How a loader batch becomes the model's inputs: the autoencoder (or None on a latent cache, which
    drew its own posterior samples), and a text model's caption features (a cache, or the frozen encoder)."""

    vae: object
    text_cache: object
    encoder: object


def model_inputs(batch, inputs, gen, device):
    """A loader batch -> (x0, semantic input, control) on the device. Images go through the autoencoder as a
    posterior sample, as the SD VAE recipes train; captions are looked up in the text cache, or encoded batch
    by batch (a stream, or a caption set over --text-cache-gb)."""
    img, y, ctrl, captions = batch
    # non_blocking: from the loader's pinned memory a copy need not wait for the device
    img, y, ctrl = (v.to(device, non_blocking=True) for v in (img, y, ctrl))
    if inputs.text_cache is not None:
        y = inputs.text_cache.lookup(captions, device)  # (features (B, L, d), mask (B, L))
    elif inputs.encoder is not None:
        y = caption_features(inputs.encoder, captions, device)
    with torch.no_grad():
        x0 = img.float() if inputs.vae is None else inputs.vae.encode(img, generator=gen)
    return x0, y, ctrl
