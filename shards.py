"""
Image-caption pairs streamed from webdataset tar shards (CC12M as img2dataset writes it): the shard list, the
tar reader, the shuffle buffer, and the stream that splits its shards across ranks and loader workers and can
resume in the middle of an epoch. Items are data.py's `(image, label, control, caption)`; bad samples are
skipped and counted as data.py counts them.
"""
import io
import os
import tarfile

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate

from data import (
    IMAGE_EXTENSIONS,
    BadImage,
    count_event,
    crop_flip,
    data_rank,
    event_table,
    load_rgb,
    read_caption,
)

#################################################################################
#               Image-caption pairs: webdataset tar shards, streamed            #
#################################################################################
# CC12M-style shards (as img2dataset writes them): each .tar holds samples NNNNN.jpg + NNNNN.txt (+ .json and
# others, ignored), the files of one sample next to each other. A tar is read front to back, never seeked, so
# shards may sit on slow network storage and need no index; the price is that items have no index: the dataset
# is a stream (IterableDataset) and the work is split by whole shards:
#   epoch order   a permutation of the shards drawn from (seed, epoch), the same on every rank
#   rank r        reads shards order[r::world]; its loader worker w reads those [w::workers]
# so each sample is read once per epoch, by exactly one (rank, worker). Each worker passes its samples through
# a seeded shuffle buffer (webdataset's .shuffle(n)), so a batch is not simply a run of neighbours in one tar.
# With fewer shards than ranks x workers some workers get nothing to read (a rank with no shard at all is an
# error), and with a shard count that is not a multiple of the ranks, or shards of unequal size, ranks come to
# the end of an epoch at different times. Use at least ranks x workers shards, better many more (CC12M as
# img2dataset writes it: about 1,100 shards of 10,000).


def brace_ranges(pattern):
    """webdataset's shard ranges, expanded: 'cc12m/{00000..00002}.tar' -> ['cc12m/00000.tar',
    'cc12m/00001.tar', 'cc12m/00002.tar'] (zero-padded to the first number's width); a pattern without a range
    stays as it is."""
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m is None:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    head, tail = pattern[: m.start()], pattern[m.end() :]
    # and further ranges
    return [x for i in range(lo, hi + 1) for x in brace_ranges(f"{head}{i:0{width}d}{tail}")]


def list_shards(path_or_glob):
    """Sorted .tar shards: those in a folder, those a glob pattern matches, those a webdataset brace range
    names (`shards/{00000..01242}.tar`; every one must exist), or one .tar file."""
    import glob

    p = path_or_glob
    if not p:
        raise ValueError("--dataset webdataset needs --data-path: a folder of .tar shards or a glob like "
                         "'cc12m/*.tar'")
    named = brace_ranges(p)
    if not named:
        raise FileNotFoundError(f"--data-path {p!r}: the brace range names no shard (write it {{low..high}})")
    if named != [p]:
        missing = [s for s in named if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"--data-path {p!r}: {len(missing)} of the {len(named)} shards it names "
                                    f"do not exist, e.g. {missing[0]!r}")
        shards = named
    elif os.path.isdir(p):
        shards = glob.glob(os.path.join(glob.escape(p), "*.tar"))
    elif any(c in p for c in "*?["):
        shards = glob.glob(p)
    elif os.path.isfile(p):
        shards = [p]
    else:
        raise FileNotFoundError(f"--data-path {p!r}: no such folder or file (give a folder of .tar shards, a "
                                "glob or a brace range like 'cc12m/{00000..01242}.tar')")
    shards = sorted(s for s in shards if s.endswith(".tar") and os.path.isfile(s))
    if not shards:
        raise FileNotFoundError(f"--data-path {p!r}: no .tar files there")
    return shards


def tar_samples(path):
    """(key, {extension: bytes}) of every sample of a webdataset tar, in tar order. As in webdataset, a file's
    key is its path up to the first dot of its name (`00042.jpg` -> `00042`, extension `jpg`), and consecutive
    files sharing a key make one sample."""
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # a stream: read in order, never seeked
        for member in tar:
            folder, name = os.path.split(member.name)
            stem, _, ext = name.partition(".")
            if not member.isfile() or not stem:  # folders, links, macOS `._` files
                continue
            if os.path.join(folder, stem) != key:
                if files:
                    yield key, files
                key, files = os.path.join(folder, stem), {}
            files[ext.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


def sample_caption(files, where, encoding="utf-8"):
    """A webdataset sample's caption: its .txt (in `encoding`; a ValueError naming `where` if it does not
    decode), else (missing or empty) the "caption" field of its .json (img2dataset writes both); "" when
    neither has one."""
    caption = read_caption(files["txt"], f"{where}.txt", encoding) if "txt" in files else ""
    if caption or "json" not in files:
        return caption
    import json

    try:
        meta = json.loads(files["json"])
    except ValueError:
        return ""
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption.strip() if isinstance(caption, str) else ""


def shuffled(items, size, rng):
    """Items in a random order drawn through a buffer of `size` (a stream cannot be permuted whole); 0 or 1:
    as they come."""
    buffer, size = [], max(size, 1)
    for x in items:
        if len(buffer) < size:
            buffer.append(x)
            continue
        i = int(rng.integers(size))
        buffer[i], x = x, buffer[i]
        yield x
    yield from (buffer[i] for i in rng.permutation(len(buffer)))


class WebDatasetShards(IterableDataset):
    """Image-caption samples streamed from webdataset tar shards, split across ranks and loader workers (see
    above). Items (image, 0, control, caption) as in data.CaptionFolderDataset; the randomness of a sample's
    crop and flip comes from (seed, epoch, shard, position in the shard), whichever worker reads it.

    A sample with an unreadable image, or an empty, missing or undecodable caption (not `text_encoding`), is
    skipped and counted in `events` (one row per loader worker, as in data.ImageFolderDataset; the first of
    each kind is printed with its file); the stream just goes on, so batches stay full. A
    shard that breaks off inside a file (a truncated tar) counts one `unreadable` and the rest of it is left
    out (a break inside a header looks to tarfile like the end of the archive: nothing to count).

    Resume: use `collate` as the loader's collate_fn. It appends (worker, drawn) to every batch: which worker
    made it and how many samples that worker had taken from its shuffle buffer by then. A trainer keeps the
    latest `drawn` of each worker and the worker after the last batch's; `set_epoch(epoch, drawn,
    first_worker)` then makes each worker skip that many samples (read, not decoded) and has `first_worker`
    deliver the first batch. The loader deals batches round-robin over the workers that still have data (in
    order, its default), so the rest of the epoch comes out as it would have: the same batches in the same
    order, also once some workers have run dry. This needs the same ranks and workers (they decide who reads
    which shard) and the same shuffle_buffer.

    `captions()` cannot be answered without reading every shard, so it raises: the text-feature cache needs a
    map-style dataset (--dataset captions) or a cache made beforehand.
    """

    num_classes = 1

    def __init__(self, path_or_glob, res, seed=0, crop="random", hflip=True, shuffle_buffer=1000, rank=None,
                 world=None, text_encoding="utf-8"):
        self.shards = list_shards(path_or_glob)
        # read now, in the trainer: loader workers have no process group
        self.rank, self.world = data_rank(rank, world)
        if len(self.shards) < self.world:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} ranks: a rank reads whole "
                             f"shards, so each needs one at least (better: at least ranks x loader workers)")
        self.res, self.seed, self.crop, self.hflip = res, seed, crop, hflip
        self.shuffle_buffer, self.text_encoding = shuffle_buffer, text_encoding
        self.epoch, self.skip, self.first_worker = 0, None, 0
        self._worker, self._drawn = 0, 0  # set in each loader worker as it reads, for collate
        self.events = event_table()

    def set_epoch(self, epoch, drawn=None, first_worker=0):
        """Read `epoch` next; resuming, `drawn[w]` (from `collate`) fast-forwards worker w that far, and the
        loader's first batch comes from worker `first_worker` (the one after the last batch's)."""
        self.epoch, self.first_worker = epoch, first_worker
        self.skip = None if drawn is None else [int(n) for n in drawn]

    def captions(self):
        raise NotImplementedError("webdataset shards are streamed, so their captions are only known once "
                                  "every shard is read (train.py encodes each batch's captions as it comes)")

    def shard_plan(self, epoch, worker=0, workers=1):
        """The shards (indices into `self.shards`) that this rank's loader worker `worker` reads in
        `epoch`."""
        order = np.random.default_rng([self.seed, epoch, 3]).permutation(len(self.shards))
        return order[self.rank :: self.world][worker::workers].tolist()

    def collate(self, items):
        """The default collation of `items` plus a fifth entry, int64 (worker, samples drawn): the stream's
        position. It runs in the worker that read the items, right after the last of them."""
        return (*default_collate(items), torch.tensor([self._worker, self._drawn]))

    def _samples(self, plan):
        """(shard index, position in the shard, key, files) of every sample of the shards in `plan`."""
        for k in plan:
            try:
                for p, (key, files) in enumerate(tar_samples(self.shards[k])):
                    yield k, p, key, files
            except (tarfile.TarError, OSError, EOFError) as e:
                count_event(self.events, "unreadable",
                            f"{self.shards[k]}: {e}; the rest of this shard is left out")

    def _item(self, k, p, key, files):
        """The item of one sample, or None (counted) when it must be skipped."""
        where = f"{self.shards[k]}:{key}"
        try:
            caption = sample_caption(files, where, self.text_encoding)
        except ValueError as e:  # a stream is not stopped for one caption: counted, and the first one said
            count_event(self.events, "undecodable_caption", str(e))
            return None
        if not caption:
            why = "an empty .txt" if "txt" in files else "no .txt"
            why += ", no caption in the .json" if "json" in files else ""
            count_event(self.events, "empty_caption", f"{where}: {why}")
            return None
        ext = next((e for e in files if "." + e in IMAGE_EXTENSIONS), None)
        if ext is None:
            count_event(self.events, "unreadable", f"{where}: no image among {sorted(files)}")
            return None
        try:
            img, kind = load_rgb(io.BytesIO(files[ext]), name=f"{where}.{ext}")
        except BadImage as e:
            count_event(self.events, e.kind, str(e))
            return None
        if kind:
            count_event(self.events, kind, f"{where}.{ext}")
        count_event(self.events, "ok")
        rng = np.random.default_rng([self.seed, self.epoch, k, p, 1])
        img, ctrl = crop_flip(img, self.res, rng, crop=self.crop, hflip=self.hflip)
        return img, 0, ctrl, caption

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = 1 if info is None else info.num_workers
        # the loader deals batches out round-robin from its worker 0: renumbering makes `first_worker` deliver
        # first
        worker = 0 if info is None else (info.id + self.first_worker) % workers
        plan = self.shard_plan(self.epoch, worker, workers)
        # the first idle worker says so
        if not plan and self.rank == 0 and worker == len(self.shard_plan(self.epoch)):
            print(f"data: {len(self.shards)} shards for {self.world} ranks x {workers} loader workers: some "
                  "workers have no shard to read this epoch; use at least ranks x workers shards", flush=True)
        if self.skip is not None and len(self.skip) != workers:
            raise ValueError(f"resuming a stream read by {len(self.skip)} loader workers with {workers}: use "
                             "the same number of workers (they decide who reads which shard)")
        skip = self.skip[worker] if self.skip is not None else 0
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 2])
        self._worker, self._drawn = worker, 0
        for k, p, key, files in shuffled(self._samples(plan), self.shuffle_buffer, rng):
            self._drawn += 1
            if self._drawn <= skip:  # used before the checkpoint: read, never decoded
                continue
            item = self._item(k, p, key, files)
            if item is not None:
                yield item
