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

Readers: image folders (ImageNet layout) and image-caption pairs (a folder or a CSV file). The datasets built
on this file -- CC12M-style webdataset tar shards, streamed (shards.py), the embedded `shapes` (shapes.py) and
a latent cache (latents.py) -- and the choice of one by name (build.build_dataset) stand above it.
"""
import argparse
import codecs
import io
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

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
SKIPPED = ("unreadable", "truncated", "tiny", "empty_caption", "undecodable_caption")
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


class NoUsableData(Exception):
    """An item and every stand-in drawn for it were bad: the data, not one file, is broken. Raised in a loader
    worker, it reaches the training process wrapped in the worker's traceback; the loop reports its last
    line alone (loader.batches)."""


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
        pixels = np.asarray(img, dtype=np.float64)
        pixels = pixels / 257.0 if mode != "I" or pixels.max() > 255 else pixels
        img, kind = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB"), "16bit"
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
        what = dict(empty_caption="an item with an empty caption",
                    undecodable_caption="an item whose caption does not decode").get(kind, f"{kind} image")
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
        raise NoUsableData(f"item {i} of {self.where} and the 49 stand-ins drawn for it are all bad images "
                           "(unreadable, truncated or too small): check --data-path")


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


def text_encoding(name):
    """--text-encoding's value (an argparse type): the name of an encoding Python knows."""
    try:
        codecs.lookup(name)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown text encoding {name!r}; e.g. utf-8, latin-1, cp1252, "
                                         "utf-16") from None
    return name


def decode_text(data, where, encoding="utf-8"):
    """The bytes of a text file (`where` names it) as a str in `encoding`. Bytes that do not decode are a
    ValueError naming the file, the line and the flag that chooses another encoding: never mojibake, never a
    character silently replaced."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{where}, line {line}: byte 0x{data[e.start]:02x} is not {encoding} text; name the "
                         "file's encoding with --text-encoding (e.g. --text-encoding latin-1)") from None


def read_text(path, encoding="utf-8", where=None):
    """A whole text file as a str, decoded as decode_text says (`where`: how messages name it)."""
    with open(path, "rb") as f:
        return decode_text(f.read(), where or path, encoding)


def read_lines(path, encoding="utf-8", where=None):
    """A text file's lines (read_text), split as open() splits them (any of \\n, \\r\\n, \\r), without their
    line ends."""
    return [line.rstrip("\n") for line in io.StringIO(read_text(path, encoding, where), newline=None)]


def read_caption(data, where, encoding="utf-8"):
    """A caption from the bytes of a .txt file (decode_text), without the surrounding whitespace and
    newlines."""
    return decode_text(data, where, encoding).strip()


def caption_folder_pairs(root, encoding="utf-8"):
    """(image path, caption) of every image under `root`, at any depth, in sorted order (every rank lists the
    same); the caption is the same-stem .txt (or .TXT) file beside the image, "" when there is none."""
    pairs = []
    for folder, images, files in image_files(root):
        texts = {os.path.splitext(f)[0]: f for f in files if os.path.splitext(f)[1].lower() == ".txt"}
        for f in images:
            caption, stem = "", os.path.splitext(f)[0]
            if stem in texts:
                caption = read_text(os.path.join(folder, texts[stem]), encoding).strip()
            pairs.append((os.path.join(folder, f), caption))
    return pairs


def caption_csv_pairs(path, encoding="utf-8"):
    """(image path, caption) of every row of a CSV file whose header row names (at least) the columns
    image,caption; image paths are relative to the CSV file's folder (absolute ones stay as they are)."""
    import csv

    base = os.path.dirname(os.path.abspath(path))
    text = read_text(path, encoding)
    # a spreadsheet's UTF-8 byte-order mark must not become part of the first column's name
    with io.StringIO(text[1:] if text.startswith("\ufeff") else text, newline="") as f:
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
    or webdataset shards), in `text_encoding`: a file that does not decode in it stops the listing with a
    ValueError naming the file and the line (decode_text).
    """

    num_classes = 1

    def __init__(self, root, res, seed=0, crop="random", hflip=True, text_encoding="utf-8"):
        if not root or not os.path.exists(root):
            raise FileNotFoundError(f"--data-path {root!r} does not exist; point it at a folder of images, "
                                    "each with a same-stem .txt caption beside it, or at a CSV file with "
                                    "columns image,caption")
        if os.path.isdir(root):
            pairs = caption_folder_pairs(root, text_encoding)
        elif root.lower().endswith(".csv"):
            pairs = caption_csv_pairs(root, text_encoding)
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
# Every entry point (train.py, sample.py, encode.py, fid.py) starts its processes with
# setup_distributed; the readers split their work by data_rank.


def image_health(dataset, max_skip_rate, world=1):
    """The log line's counts of skipped and converted images, summed over ranks (and their loader workers);
    stop the run when more than `max_skip_rate` of the images seen could not be used."""
    if not hasattr(dataset, "events"):
        return {}
    counts = dataset.events.sum(0)
    if world > 1:
        dist.all_reduce(counts)
    counts = dict(zip(EVENTS, counts.tolist()))
    skipped = sum(counts[k] for k in SKIPPED)
    seen = skipped + counts["ok"]
    if seen >= 100 and skipped > max_skip_rate * seen:
        raise SystemExit(f"{skipped} of {seen} images could not be used "
                         f"({ {k: counts[k] for k in SKIPPED} }), more than --max-skip-rate {max_skip_rate}: "
                         "check --data-path")
    return {"data": {k: v for k, v in counts.items() if v}}


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
#                      The control a sample is drawn with                       #
#################################################################################


def folder_default_control(res):
    """Sampling default for natural images: the SDXL convention (original = target size, crop at 0, 0)."""
    return make_control(res, res, 0, 0, 0, res)
