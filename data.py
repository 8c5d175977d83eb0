"""
Data: what a training example is, and the readers of real data.

Every image dataset returns `(image, label, control, caption)`:
    image    uint8 tensor (3, res, res)
    label    int class index
    control  float tensor (len(CONTROL_SIGNALS),) in raw units (pixels, 0/1 flag, ratio), see conditioning.py
    caption  str
The control vector is what the model's ControlEmbedder reads; `crop_flip` writes the values it actually used.
Randomness of an item depends only on (seed, epoch, index), so data order and augmentation survive a resume
exactly (for the streamed shards: on (seed, epoch, shard, position in the shard)). A bad item (unreadable
image, empty caption) never stops a run: it is skipped and counted in `dataset.events`.

Readers: image folders (ImageNet layout), image-caption pairs (a folder or a CSV file), CC12M-style webdataset
tar shards (streamed). The datasets built on this file -- the embedded `shapes` (shapes.py) and a latent cache
(latents.py) -- and the choice of one by name (config.build_dataset) stand above it.
"""
import io
import os
import tarfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate

from conditioning import make_control

#################################################################################
#                Augmentation that records what it did                          #
#################################################################################

def crop_flip(img, res, rng, margin=1.0, crop="random", hflip=True, orig_size=None):
    """Resize the short side to round(res * margin), crop res x res, maybe mirror; return (uint8 CHW,
    control).

    `orig_size` (h, w) overrides the recorded original size (the shapes dataset renders small and upsamples,
    so the file size is not the size the content was made at). Crop policy: `random` (SDXL style) or `center`
    (ADM style).
    """
    orig_h, orig_w = orig_size if orig_size is not None else (img.height, img.width)
    short = round(res * margin)
    if min(img.size) != short:
        scale = short / min(img.size)
        img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))),
                         Image.BICUBIC, reducing_gap=None)
    max_top, max_left = img.height - res, img.width - res
    if crop == "random":
        top, left = int(rng.integers(0, max_top + 1)), int(rng.integers(0, max_left + 1))
    elif crop == "center":
        top, left = max_top // 2, max_left // 2
    else:
        raise ValueError(f"unknown crop policy {crop!r}; use 'random' or 'center'")
    img = img.crop((left, top, left + res, top + res))
    flip = bool(hflip and rng.random() < 0.5)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr, make_control(orig_h, orig_w, top, left, flip, res)


#################################################################################
#            Image files that may be bad: skip, count, stand in                 #
#################################################################################

# What can go wrong with an item in a crawl, and what we do about it. The skipped kinds are replaced (another
# item takes the slot, so batches stay full and ranks stay in step); the converted ones become 8-bit RGB. Both
# are counted.
SKIPPED = ("unreadable", "truncated", "tiny", "empty_caption")
CONVERTED = ("cmyk", "palette", "16bit", "alpha", "gray")
EVENTS = ("ok",) + SKIPPED + CONVERTED
MAX_WORKERS = 64  # data-loader workers per rank whose event counts are kept apart
MIN_SIDE = 8  # images smaller than this on either side carry no usable content at any training resolution
# torchvision's
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright
EXIF_TURNS = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
              6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}


def exif_turn(img):
    """How to turn a photo upright: a phone stores the pixels as the sensor saw them and says in EXIF how to
    turn them. None when there is nothing to do, or the EXIF block is malformed (the pixels are kept as
    stored)."""
    try:
        return EXIF_TURNS.get(img.getexif().get(0x0112))
    # Pillow's EXIF parser raises many kinds on a broken block; the pixels themselves are fine
    except Exception:
        return None


def load_rgb(path, name=None):
    """Open an image (a path or a binary file object; `name` labels the latter in messages) as 8-bit RGB.
    Returns (image, conversion kind or None); raises BadImage(kind) for a skip."""
    from PIL import UnidentifiedImageError
    name = path if name is None else name
    try:
        with Image.open(path) as f:
            f.load()  # decode now: truncated files fail here, not later in a worker
            mode, img, turn = f.mode, f.copy(), exif_turn(f)
        # upright, as a viewer shows it (and the original size recorded is the one people see)
        if turn is not None:
            img = img.transpose(turn)
    except (UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage("unreadable", f"{name}: {e}") from e
    except OSError as e:
        # "image file is truncated" from a file, "Truncated File Read" from bytes in memory
        raise BadImage("truncated" if "truncated" in str(e).lower() else "unreadable", f"{name}: {e}") from e
    if min(img.size) < MIN_SIDE:
        raise BadImage("tiny", f"{name}: {img.width}x{img.height} is smaller than {MIN_SIDE} px")
    kind = None
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: rescale instead of clipping at 255
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if mode != "I" or a.max() > 255 else a
        img, kind = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB"), "16bit"
    elif mode == "CMYK":
        kind = "cmyk"
    elif mode in ("P", "PA"):
        kind = "palette"
    elif mode in ("RGBA", "LA"):
        kind = "alpha"
    elif mode in ("L", "1"):
        kind = "gray"
    return img.convert("RGB"), kind


def event_table():
    """Counts of EVENTS, one row per process (row 0: the main process, row k: loader worker k - 1), so no two
    processes ever add to the same number and the counts stay exact; shared memory makes the workers' rows
    visible to the trainer, which sums the rows (and the ranks)."""
    return torch.zeros(MAX_WORKERS + 1, len(EVENTS), dtype=torch.int64).share_memory_()


def count_event(events, kind, message=None):
    """Add one `kind` to this process's row of `events`; the first of each kind in that row is reported with
    its message. The row is the whole record of what was reported, so each dataset (a second run in one
    notebook, say) reports its own first bad file of a kind."""
    worker = torch.utils.data.get_worker_info()
    row, col = 0 if worker is None else worker.id + 1, EVENTS.index(kind)
    events[row, col] += 1
    if kind != "ok" and events[row, col] == 1:
        what = "an item with an empty caption" if kind == "empty_caption" else f"{kind} image"
        print(f"data: {'skipping' if kind in SKIPPED else 'converting'} {what} ({message}); "
              f"further {kind} items are counted in the log without a message", flush=True)


def hidden(name):
    """Names a listing passes over: dot-files and dot-folders (macOS `._x.jpg` resource forks, `.DS_Store`,
    `.ipynb_checkpoints/`, `.git/`) and the `__MACOSX/` folder a Mac's zip file unpacks to, which are never
    images or classes of a dataset."""
    return name.startswith(".") or name == "__MACOSX"


def image_files(root):
    """[(folder, image file names, every visible file name of that folder)] under `root` at any depth, sorted
    by folder path and name as torchvision's ImageFolder sorts them (every rank lists the same), without
    hidden names; a folder reached twice through symbolic links is listed once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        files = sorted(f for f in files if not hidden(f))
        found.append((folder, [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS],
                      files))
    return sorted(found)


class ImageFileDataset(Dataset):
    """Base of the map-style datasets that read one image file per item: a subclass lists its items, sets
    `num_classes` and says what item j is through `_record(j)` -> (path, label, caption).

    A bad file never crashes a run: it is counted in `events` (see event_table), reported once per kind, and
    replaced by another item chosen deterministically, so batches stay full and a resume sees the same data.
    """

    def __init__(self, res, seed, crop, hflip, where):
        self.res, self.seed, self.crop, self.hflip, self.epoch, self.where = res, seed, crop, hflip, 0, where
        self.events = event_table()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _count(self, kind, message=None):
        count_event(self.events, kind, message)

    def __getitem__(self, i):
        for attempt in range(50):
            # item i, else a stand-in drawn from (seed, epoch, i, attempt): the same after a resume, and from
            # the whole dataset, so a run of bad files (a corrupt class folder) is left within a few draws
            stand_in = np.random.default_rng([self.seed, self.epoch, i, attempt, 4])
            j = i if attempt == 0 else int(stand_in.integers(len(self)))
            path, label, caption = self._record(j)
            try:
                img, kind = load_rgb(path)
            except BadImage as e:
                self._count(e.kind, str(e))
                continue
            if kind:
                self._count(kind, path)
            self._count("ok")
            rng = np.random.default_rng([self.seed, self.epoch, j, 1])
            img, ctrl = crop_flip(img, self.res, rng, crop=self.crop, hflip=self.hflip)
            return img, label, ctrl, caption
        raise RuntimeError(f"item {i} of {self.where} and 49 stand-ins drawn for it are all bad: is the data "
                           "corrupt?")


#################################################################################
#                        Image folders (ImageNet layout)                        #
#################################################################################

class ImageFolderDataset(ImageFileDataset):
    """`root/<class>/<image>` as torchvision's ImageFolder reads it (class k: the k-th folder name in sorted
    order, as DiT's labels; images at any depth below it), but hidden names are no class and no image. The
    caption is the class folder's name. Random crop / flip record their control metadata; bad files are
    skipped and counted (ImageFileDataset)."""

    def __init__(self, root, res, seed=0, crop="random", hflip=True):
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root!r} is not a directory; point it at a folder laid out "
                                    "as ROOT/<class_name>/<image files> (e.g. ImageNet's train/ folder)")
        self.classes = sorted(d for d in os.listdir(root)
                              if not hidden(d) and os.path.isdir(os.path.join(root, d)))
        splits = {"train", "val", "valid", "validation", "test"}
        # the dataset's root, not a split: its classes would be splits
        if self.classes and set(self.classes) <= splits:
            raise FileNotFoundError(f"--data-path {root!r} holds the folders {self.classes}, which name "
                                    "splits, not classes: point it at one split, e.g. "
                                    f"{os.path.join(root, 'train')}")
        self.samples = [(os.path.join(folder, f), label)
                        for label, c in enumerate(self.classes)
                        for folder, images, _ in image_files(os.path.join(root, c))
                        for f in images]
        empty = sorted(set(self.classes) - {self.classes[label] for _, label in self.samples})
        # an empty class would still take a label and shift nothing, but is a mistake
        if not self.classes or empty:
            raise FileNotFoundError(f"--data-path {root!r}: no images in the class folder(s) {empty[:5]}"
                                    if empty
                                    else f"--data-path {root!r}: no class folders; lay it out as "
                                    "ROOT/<class>/<images>")
        super().__init__(res, seed, crop, hflip, where=root)
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.samples)

    def _record(self, j):
        path, label = self.samples[j]
        return path, label, self.classes[label]


#################################################################################
#                  Image-caption pairs: a folder or a CSV file                  #
#################################################################################


def read_caption(data):
    """A caption from the bytes of a .txt file: UTF-8 (a stray bad byte becomes U+FFFD instead of losing the
    item), without the surrounding whitespace and newlines."""
    return data.decode("utf-8", errors="replace").strip()


def caption_folder_pairs(root):
    """(image path, caption) of every image under `root`, at any depth, in sorted order (every rank lists the
    same); the caption is the same-stem .txt (or .TXT) file beside the image, "" when there is none."""
    pairs = []
    for folder, images, files in image_files(root):
        texts = {os.path.splitext(f)[0]: f for f in files if os.path.splitext(f)[1].lower() == ".txt"}
        for f in images:
            caption, stem = "", os.path.splitext(f)[0]
            if stem in texts:
                with open(os.path.join(folder, texts[stem]), "rb") as t:
                    caption = read_caption(t.read())
            pairs.append((os.path.join(folder, f), caption))
    return pairs


def caption_csv_pairs(path):
    """(image path, caption) of every row of a CSV file whose header row names (at least) the columns
    image,caption; image paths are relative to the CSV file's folder (absolute ones stay as they are)."""
    import csv

    base = os.path.dirname(os.path.abspath(path))
    # utf-8-sig: a spreadsheet's byte-order mark must not become part of the first column's name
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a caption CSV must start with a header row naming the columns "
                             f"image,caption (its first row is {reader.fieldnames})")
        return [(os.path.join(base, (row["image"] or "").strip()), (row["caption"] or "").strip())
                for row in reader]


class CaptionFolderDataset(ImageFileDataset):
    """Image-caption pairs from a folder (every image with a same-stem .txt caption beside it, at any depth)
    or from a CSV file with the header row `image,caption`. Items (image, 0, control, caption): one class,
    since text models ignore the label; control and randomness (seed, epoch, index) as in ImageFolderDataset.

    An item whose caption is empty, whitespace only, or (in a folder) missing is dropped when the list is
    built: it never gets an index, so no epoch spends a read on it and `captions()` holds real captions only.
    The number is printed (by rank 0) and kept in `dropped`, not in `events`: events count reads, and a
    one-off count of the listing mixed into them would distort the skip rate the trainer checks. Unreadable
    images show only when read: they are skipped, counted and stood in for as in ImageFolderDataset. Captions
    are read once, at construction (one small file per image in a folder: for millions of images prefer a CSV,
    or webdataset shards).
    """

    num_classes = 1

    def __init__(self, root, res, seed=0, crop="random", hflip=True):
        if not root or not os.path.exists(root):
            raise FileNotFoundError(f"--data-path {root!r} does not exist; point it at a folder of images, "
                                    "each with a same-stem .txt caption beside it, or at a CSV file with "
                                    "columns image,caption")
        if os.path.isdir(root):
            pairs = caption_folder_pairs(root)
        elif root.lower().endswith(".csv"):
            pairs = caption_csv_pairs(root)
        else:
            raise ValueError(f"--data-path {root!r}: give a folder of images with .txt captions, or a .csv "
                             "file")
        kept = [(path, caption) for path, caption in pairs if caption]
        if not kept:
            raise FileNotFoundError(f"no image with a non-empty caption in {root!r} ({len(pairs)} images "
                                    "listed)")
        self.paths, self.texts = [p for p, _ in kept], [c for _, c in kept]
        self.dropped = {"empty_caption": len(pairs) - len(kept)}
        if self.dropped["empty_caption"] and data_rank()[0] == 0:
            print(f"data: {root}: left out {self.dropped['empty_caption']} of {len(pairs)} images whose "
                  "caption is empty or missing", flush=True)
        super().__init__(res, seed, crop, hflip, where=root)

    def __len__(self):
        return len(self.paths)

    def captions(self):
        """Every item's caption, in order (for the text-feature cache)."""
        return list(self.texts)

    def _record(self, j):
        return self.paths[j], 0, self.texts[j]


#################################################################################
#                 Ranks: which process of a torchrun job reads what             #
#################################################################################
# Every entry point (train.py, sample.py, latents.py --encode, fid.py) starts its processes with
# setup_distributed; the readers split their work by data_rank.


def setup_distributed(timeout=None):
    """(rank, world, device) under torchrun or in one process. The LOCAL rank picks the GPU: the global rank
    is wrong on every node but the first. `timeout`: how long a collective waits for the other ranks (None:
    PyTorch's)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world, device


def data_rank(rank=None, world=None):
    """(rank, world) of this process: from torch.distributed if it is initialised, else torchrun's RANK /
    WORLD_SIZE, else (0, 1). An explicit argument wins (tests emulate ranks this way)."""
    if dist.is_available() and dist.is_initialized():
        found = dist.get_rank(), dist.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank, world = found[0] if rank is None else rank, found[1] if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of 0..{world - 1}")
    return rank, world


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


def sample_caption(files):
    """A webdataset sample's caption: its .txt, else (missing or empty) the "caption" field of its .json
    (img2dataset writes both); "" when neither has one."""
    caption = read_caption(files["txt"]) if "txt" in files else ""
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
    above). Items (image, 0, control, caption) as in CaptionFolderDataset; the randomness of a sample's crop
    and flip comes from (seed, epoch, shard, position in the shard), whichever worker reads it.

    A sample with an unreadable image, or an empty or missing caption, is skipped and counted in `events` (one
    row per loader worker, as in ImageFolderDataset); the stream just goes on, so batches stay full. A shard
    that breaks off inside a file (a truncated tar) counts one `unreadable` and the rest of it is left out (a
    break inside a header looks to tarfile like the end of the archive: nothing to count).

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
                 world=None):
        self.shards = list_shards(path_or_glob)
        # read now, in the trainer: loader workers have no process group
        self.rank, self.world = data_rank(rank, world)
        if len(self.shards) < self.world:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} ranks: a rank reads whole "
                             f"shards, so each needs one at least (better: at least ranks x loader workers)")
        self.res, self.seed, self.crop, self.hflip = res, seed, crop, hflip
        self.shuffle_buffer = shuffle_buffer
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
        caption = sample_caption(files)
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


#################################################################################
#                      The control a sample is drawn with                       #
#################################################################################


def folder_default_control(res):
    """Sampling default for natural images: the SDXL convention (original = target size, crop at 0, 0)."""
    return make_control(res, res, 0, 0, 0, res)
