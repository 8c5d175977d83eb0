"""
Data: the embedded `shapes` dataset and its checker, image folders (ImageNet layout), image-caption pairs (a folder
or CSV file, and CC12M-style webdataset tar shards, streamed), the augmentation that *records* the control metadata it
applies, the autoencoder wrapper (pixel space or the SD VAE), and the latent cache.

Every image dataset returns `(image, label, control, caption)`:
    image    uint8 tensor (3, res, res)
    label    int class index
    control  float tensor (len(CONTROL_SIGNALS),) in raw units (pixels, 0/1 flag, ratio), see CONTROL_SIGNALS
    caption  str
The control vector is what the model's ControlEmbedder reads; each augmentation writes the values it actually used.
Randomness of an item depends only on (seed, epoch, index), so data order and augmentation survive a resume exactly
(for the streamed shards: on (seed, epoch, shard, position in the shard)). A bad item (unreadable image, empty caption)
never stops a run: it is skipped and counted in `dataset.events`.

The latent cache encodes a dataset once through the VAE, on every rank in parallel, resuming where it stopped:
    torchrun --nproc_per_node=8 data.py --encode --dataset imagenet --data-path DIR --res 256 --vae sd-ema --out CACHE
and `build_dataset("latents", 256, data_path=CACHE)` reads it back: the same tuple with a float latent (C, h, w) in
place of the image (`dataset.is_latent` tells the two apart).
"""
import argparse
import io
import json
import os
import tarfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate

# Order of the control vector. Units: pixels, except flip (0/1) and aspect (target width / height).
#   orig_h, orig_w : size of the image before it was resized to the training canvas (small = upsampled = blurry)
#   crop_top/left  : offset of the training crop inside the resized canvas
#   flip           : 1 if the crop was mirrored left-right
#   aspect         : aspect ratio (w / h) of the training image
#   res            : training resolution sqrt(h * w)
CONTROL_SIGNALS = ("orig_h", "orig_w", "crop_top", "crop_left", "flip", "aspect", "res")


def make_control(orig_h, orig_w, crop_top, crop_left, flip, res, aspect=1.0):
    """A control vector in CONTROL_SIGNALS order."""
    return torch.tensor([orig_h, orig_w, crop_top, crop_left, float(flip), aspect, res], dtype=torch.float32)


#################################################################################
#                Augmentation that records what it did                          #
#################################################################################

def crop_flip(img, res, rng, margin=1.0, crop="random", hflip=True, orig_size=None):
    """Resize the short side to round(res * margin), crop res x res, maybe mirror; return (uint8 CHW, control).

    `orig_size` (h, w) overrides the recorded original size (the shapes dataset renders small and upsamples, so the
    file size is not the size the content was made at). Crop policy: `random` (SDXL style) or `center` (ADM style).
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
#                     The embedded `shapes` dataset                             #
#################################################################################
# Each image: one coloured shape on a dark gradient background. The scene is rendered at a random "original"
# resolution, resized to a canvas of 1.25 x res (so small originals come out blurry), then randomly cropped to res and
# maybe mirrored. The shape sits at the canvas centre, so its position in the crop is set by the crop offset; four of
# the ten shapes are chiral, so a mirror is visible. Thus every control signal has a measurable effect:
#   original size -> sharpness, crop -> position, flip -> orientation.

def _circle(u, v):
    return u ** 2 + v ** 2 <= 1.0


def _square(u, v):
    return (abs(u) <= 0.85) & (abs(v) <= 0.85)


def _triangle(u, v):  # apex up, symmetric under a left-right mirror
    return (v <= 0.9) & (abs(u) <= 0.95 * (v + 0.9) / 1.8)


def _plus(u, v):
    return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))


def _diamond(u, v):
    return abs(u) + abs(v) <= 1.0


def _tee(u, v):
    return ((v >= -0.95) & (v <= -0.45) & (abs(u) <= 0.95)) | ((abs(u) <= 0.25) & (abs(v) <= 0.95))


def _ell(u, v):  # chiral: stem on the left, foot to the right
    return ((u >= -0.9) & (u <= -0.35) & (abs(v) <= 0.95)) | ((v >= 0.4) & (v <= 0.95) & (abs(u) <= 0.9))


def _wedge(u, v):  # chiral: right angle at the bottom left
    return (u >= -0.9) & (v <= 0.9) & (v >= u)


def _zed(u, v):  # chiral: Z tetromino, its mirror is an S
    return (((v >= -0.7) & (v <= 0.0) & (u >= -1.0) & (u <= 0.33)) |
            ((v >= 0.0) & (v <= 0.7) & (u >= -0.33) & (u <= 1.0)))


def _flag(u, v):  # chiral: pole on the left, flag to the right at the top
    return ((u >= -0.9) & (u <= -0.45) & (abs(v) <= 0.95)) | ((u >= -0.45) & (u <= 0.9) & (v >= -0.95) & (v <= -0.05))


SHAPES = [("circle", _circle), ("square", _square), ("triangle", _triangle), ("plus", _plus),
          ("diamond", _diamond), ("tee", _tee), ("ell", _ell), ("wedge", _wedge), ("zed", _zed), ("flag", _flag)]
SHAPE_NAMES = [name for name, _ in SHAPES]
CHIRAL = {"ell", "wedge", "zed", "flag"}
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (240, 220, 40),
           "magenta": (230, 50, 220), "cyan": (40, 220, 230), "orange": (250, 140, 30), "white": (240, 240, 240)}
COLOUR_NAMES = list(COLOURS)
CANVAS_MARGIN = 1.25  # canvas = 1.25 x res, so the crop can move by a quarter of the image


def render_shape(shape_fn, size, half_extent, supersample=4):
    """Coverage in [0, 1] of a shape centred in a size x size image, anti-aliased by supersampling."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample - size / 2  # pixel centres relative to the image centre
    v, u = np.meshgrid(coords / half_extent, coords / half_extent, indexing="ij")
    inside = shape_fn(u, v).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def shapes_scene(index, res, seed):
    """Deterministic scene parameters of item `index`."""
    rng = np.random.default_rng([seed, index])
    return dict(label=int(rng.integers(len(SHAPES))), colour=COLOUR_NAMES[rng.integers(len(COLOURS))],
                bg=rng.uniform(0.0, 0.3, size=3), bg_grad=rng.uniform(-0.08, 0.08, size=(2, 3)),
                extent=rng.uniform(0.20, 0.27),  # shape half-extent as a fraction of the canvas
                orig=int(rng.integers(res // 2, 2 * res + 1)),
                template=int(rng.integers(len(CAPTION_TEMPLATES))),  # drawn last: earlier draws stay as they were
                filler=[(int(rng.integers(8)), FILLER_WORDS[rng.integers(len(FILLER_WORDS))])
                        for _ in range(rng.integers(3))])


def render_canvas(scene, res):
    """The canvas (PIL, 1.25 res square) of a scene: rendered at the scene's original size, then resized."""
    size = scene["orig"]
    alpha = render_shape(SHAPES[scene["label"]][1], size, scene["extent"] * size)[..., None]
    ramp = (np.arange(size) / max(size - 1, 1) - 0.5)
    bg = (scene["bg"] + ramp[:, None, None] * scene["bg_grad"][0] + ramp[None, :, None] * scene["bg_grad"][1])
    fg = np.array(COLOURS[scene["colour"]], dtype=np.float32) / 255.0
    img = (1 - alpha) * bg + alpha * fg
    img = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    canvas = round(res * CANVAS_MARGIN)
    return img.resize((canvas, canvas), Image.BILINEAR)


# Caption wordings: a text model trains on the first list and is evaluated on the second, which it never saw, so the
# checker measures whether it reads the colour and shape words rather than memorising whole captions.
CAPTION_TEMPLATES = ("a {colour} {shape}", "a {shape} in {colour}", "{colour} {shape}",
                     "a picture of a {colour} {shape}",
                     "the {shape} is {colour}", "one {colour} {shape} on a dark background")
HELDOUT_TEMPLATES = ("an image showing a {colour} {shape}", "{shape}, coloured {colour}")
# 0-2 of these words are inserted at random places in a training caption, so the model learns that words other than
# the colour and the shape carry nothing (none of them appears in the held-out wordings).
FILLER_WORDS = ("small", "big", "simple", "drawing", "photo", "render", "centred", "flat", "scene", "graphic", "icon",
                "plain", "clean", "little", "bright", "vivid", "sharp", "tiny", "large", "single", "cute", "neat",
                "bold", "basic", "digital", "figure", "art", "sketch", "sticker", "logo", "symbol", "with", "and",
                "here", "just", "nice", "old", "new", "toy", "card")


def shapes_caption(scene):
    words = CAPTION_TEMPLATES[scene["template"]].format(colour=scene["colour"],
                                                        shape=SHAPE_NAMES[scene["label"]]).split()
    for pos, word in scene.get("filler", []):
        words.insert(pos % (len(words) + 1), word)
    return " ".join(words)


class ShapesDataset(Dataset):
    """Procedural coloured shapes with labels, captions and the control metadata of how each image was made.

    Canvases are rendered once at construction (deterministic from `seed`); crop and flip are drawn per epoch.
    """

    num_classes = len(SHAPES)

    def __init__(self, size=10000, res=32, seed=0, crop="random", hflip=True, progress=False):
        self.res, self.seed, self.crop, self.hflip, self.epoch = res, seed, crop, hflip, 0
        self.scenes = [shapes_scene(i, res, seed) for i in range(size)]
        it = self.scenes
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="rendering shapes", leave=False)
        self.canvases = [render_canvas(s, res) for s in it]

    def __len__(self):
        return len(self.scenes)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def captions(self):
        """Every item's caption, in order (for the text-feature cache)."""
        return [shapes_caption(s) for s in self.scenes]

    def __getitem__(self, i):
        scene = self.scenes[i]
        rng = np.random.default_rng([self.seed, self.epoch, i, 1])
        img, ctrl = crop_flip(self.canvases[i], self.res, rng, margin=CANVAS_MARGIN, crop=self.crop,
                              hflip=self.hflip, orig_size=(scene["orig"], scene["orig"]))
        return img, scene["label"], ctrl, shapes_caption(scene)


def shapes_default_control(res):
    """Control used for sampling when none is given: sharp (original 2 x res), centred crop, not mirrored."""
    offset = (round(res * CANVAS_MARGIN) - res) // 2
    return make_control(2 * res, 2 * res, offset, offset, 0, res)


#################################################################################
#                      The shapes checker                                       #
#################################################################################
# Reads an image back into (class, orientation, position, sharpness, colour) with no learned parts:
# segment the shape against the background colour, normalise its bounding box, and match templates of every class
# in both orientations. Tested on the dataset's own images before it judges generated ones.

_TEMPLATE = 24


def _normalise_mask(mask):
    """Crop a float mask to its bounding box and resize it to _TEMPLATE x _TEMPLATE."""
    ys, xs = np.nonzero(mask > 0.5)
    if len(ys) == 0:
        return np.zeros((_TEMPLATE, _TEMPLATE), np.float32)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray((box * 255).astype(np.uint8)).resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _templates():
    """(num_classes, 2, T, T): each shape, canonical and mirrored."""
    out = np.zeros((len(SHAPES), 2, _TEMPLATE, _TEMPLATE), np.float32)
    for k, (_, fn) in enumerate(SHAPES):
        t = _normalise_mask(render_shape(fn, 64, 29.0))
        out[k, 0], out[k, 1] = t, t[:, ::-1]
    return out


class ShapesChecker:
    """Measure what a shapes image shows. `__call__` takes uint8 (N, 3, H, W) or (3, H, W) and returns a list of dicts:
    label, orientation (0 canonical, 1 mirrored, None for symmetric shapes), match (template agreement in [0, 1]),
    position (row, col of the bounding-box centre in pixels), sharpness (steepest normalised edge step per pixel) and colour.
    """

    def __init__(self):
        self.templates = _templates()
        self.palette = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32) / 255.0

    def measure(self, img):
        from scipy import ndimage
        x = img.permute(1, 2, 0).numpy().astype(np.float32) / 255.0 if torch.is_tensor(img) else img
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        bg = np.median(border, axis=0)
        dist = np.linalg.norm(x - bg, axis=-1)
        level = np.percentile(dist, 99) + 1e-6
        fg = dist > 0.5 * level
        lab, n = ndimage.label(fg)
        if n > 1:  # keep the largest blob: generated images may carry specks
            fg = lab == (np.argmax(ndimage.sum(fg, lab, range(1, n + 1))) + 1)
        soft = np.clip(dist / level, 0, 1)
        mask = _normalise_mask(np.where(ndimage.binary_dilation(fg, iterations=1), soft, 0.0))
        score = 1.0 - np.abs(self.templates - mask).mean(axis=(2, 3))  # (classes, 2)
        label = int(np.argmax(score.max(axis=1)))
        chiral = SHAPE_NAMES[label] in CHIRAL
        orientation = int(np.argmax(score[label])) if chiral else None
        ys, xs = np.nonzero(fg)  # the bounding-box centre: every shape is centred on its box
        position = ((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2) if len(ys) else (float("nan"),) * 2
        gy, gx = np.gradient(soft)
        grad = np.sort(np.hypot(gx, gy).ravel())[-max(4, fg.sum() // 8):]  # the steepest edge pixels
        core = ndimage.binary_erosion(fg, iterations=1)
        colour = x[core if core.any() else fg].mean(axis=0) if fg.any() else bg
        return dict(label=label, orientation=orientation, match=float(score.max()), position=position,
                    sharpness=float(grad.mean()),
                    colour=COLOUR_NAMES[int(np.argmin(((self.palette - colour) ** 2).sum(-1)))])

    def __call__(self, images):
        if images.ndim == 3:
            return self.measure(images)
        return [self.measure(im) for im in images]


def expected_position(control, res):
    """Where the shape centre should land (row, col) in a res x res crop given a control vector."""
    canvas = round(res * CANVAS_MARGIN)
    row = canvas / 2 - control[2].item() - 0.5
    col = canvas / 2 - control[3].item() - 0.5
    if control[4].item() > 0.5:
        col = res - 1 - col
    return row, col


#################################################################################
#            Image files that may be bad: skip, count, stand in                 #
#################################################################################

# What can go wrong with an item in a crawl, and what we do about it. The skipped kinds are replaced (another item
# takes the slot, so batches stay full and ranks stay in step); the converted ones become 8-bit RGB. Both are counted.
SKIPPED = ("unreadable", "truncated", "tiny", "empty_caption")
CONVERTED = ("cmyk", "palette", "16bit", "alpha", "gray")
EVENTS = ("ok",) + SKIPPED + CONVERTED
MAX_WORKERS = 64  # data-loader workers per rank whose event counts are kept apart
MIN_SIDE = 8  # images smaller than this on either side carry no usable content at any training resolution
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


class BadImage(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def load_rgb(path, name=None):
    """Open an image (a path or a binary file object; `name` labels the latter in messages) as 8-bit RGB.
    Returns (image, conversion kind or None); raises BadImage(kind) for a skip."""
    from PIL import UnidentifiedImageError
    name = path if name is None else name
    try:
        with Image.open(path) as f:
            f.load()  # decode now: truncated files fail here, not later in a worker
            mode, img = f.mode, f.copy()
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


_REPORTED = set()  # kinds already reported by this process


def event_table():
    """Counts of EVENTS, one row per process (row 0: the main process, row k: loader worker k - 1), so no two processes
    ever add to the same number and the counts stay exact; shared memory makes the workers' rows visible to the
    trainer, which sums the rows (and the ranks)."""
    return torch.zeros(MAX_WORKERS + 1, len(EVENTS), dtype=torch.int64).share_memory_()


def count_event(events, kind, message=None):
    """Add one `kind` to this process's row of `events`; the first of each kind is reported with its message."""
    worker = torch.utils.data.get_worker_info()
    events[0 if worker is None else worker.id + 1, EVENTS.index(kind)] += 1
    if kind not in _REPORTED and kind != "ok":
        _REPORTED.add(kind)
        what = "an item with an empty caption" if kind == "empty_caption" else f"{kind} image"
        print(f"data: {'skipping' if kind in SKIPPED else 'converting'} {what} ({message}); "
              f"further {kind} items are counted in the log without a message", flush=True)


class ImageFileDataset(Dataset):
    """Base of the map-style datasets that read one image file per item: a subclass lists its items, sets
    `num_classes` and says what item j is through `_record(j)` -> (path, label, caption).

    A bad file never crashes a run: it is counted in `events` (see event_table), reported once per kind, and replaced
    by another item chosen deterministically, so batches stay full and a resume sees the same data.
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
            j = (i + attempt * 7919) % len(self)  # a deterministic stand-in, so a resume sees the same data
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
        raise RuntimeError(f"50 bad images in a row around index {i} of {self.where}: is the dataset corrupt?")


#################################################################################
#                        Image folders (ImageNet layout)                        #
#################################################################################

class ImageFolderDataset(ImageFileDataset):
    """`root/<class>/<image>` like torchvision's ImageFolder; the caption is the class folder's name. Random crop /
    flip record their control metadata; bad files are skipped and counted (ImageFileDataset)."""

    def __init__(self, root, res, seed=0, crop="random", hflip=True):
        import torchvision
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root!r} is not a directory; point it at a folder laid out as "
                                    "ROOT/<class_name>/<image files> (e.g. ImageNet's train/ folder)")
        self.folder = torchvision.datasets.ImageFolder(root)
        if len(self.folder) == 0:
            raise FileNotFoundError(f"no images found under {root!r}")
        super().__init__(res, seed, crop, hflip, where=root)
        self.num_classes = len(self.folder.classes)

    def __len__(self):
        return len(self.folder)

    def _record(self, j):
        path, label = self.folder.samples[j]
        return path, label, self.folder.classes[label]


#################################################################################
#                  Image-caption pairs: a folder or a CSV file                  #
#################################################################################

def read_caption(data):
    """A caption from the bytes of a .txt file: UTF-8 (a stray bad byte becomes U+FFFD instead of losing the item),
    without the surrounding whitespace and newlines."""
    return data.decode("utf-8", errors="replace").strip()


def caption_folder_pairs(root):
    """(image path, caption) of every image under `root`, at any depth, in sorted order (every rank lists the same);
    the caption is the same-stem .txt file beside the image, "" when there is none."""
    pairs = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        names = set(files)
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            caption = ""
            if stem + ".txt" in names:
                with open(os.path.join(folder, stem + ".txt"), "rb") as t:
                    caption = read_caption(t.read())
            pairs.append((os.path.join(folder, f), caption))
    return pairs


def caption_csv_pairs(path):
    """(image path, caption) of every row of a CSV file whose header row names (at least) the columns image,caption;
    image paths are relative to the CSV file's folder (absolute ones stay as they are)."""
    import csv
    base = os.path.dirname(os.path.abspath(path))
    # utf-8-sig: a spreadsheet's byte-order mark must not become part of the first column's name
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a caption CSV must start with a header row naming the columns image,caption "
                             f"(its first row is {reader.fieldnames})")
        return [(os.path.join(base, (row["image"] or "").strip()), (row["caption"] or "").strip()) for row in reader]


class CaptionFolderDataset(ImageFileDataset):
    """Image-caption pairs from a folder (every image with a same-stem .txt caption beside it, at any depth) or from a
    CSV file with the header row `image,caption`. Items (image, 0, control, caption): one class, since text models
    ignore the label; control and randomness (seed, epoch, index) as in ImageFolderDataset.

    An item whose caption is empty, whitespace only, or (in a folder) missing is dropped when the list is built: it
    never gets an index, so no epoch spends a read on it and `captions()` holds real captions only. The number is
    printed (by rank 0) and kept in `dropped`, not in `events`: events count reads, and a one-off count of the listing
    mixed into them would distort the skip rate the trainer checks. Unreadable images show only when read: they are
    skipped, counted and stood in for as in ImageFolderDataset. Captions are read once, at construction (one small
    file per image in a folder: for millions of images prefer a CSV, or webdataset shards).
    """

    num_classes = 1

    def __init__(self, root, res, seed=0, crop="random", hflip=True):
        if not root or not os.path.exists(root):
            raise FileNotFoundError(f"--data-path {root!r} does not exist; point it at a folder of images, each with a "
                                    "same-stem .txt caption beside it, or at a CSV file with columns image,caption")
        if os.path.isdir(root):
            pairs = caption_folder_pairs(root)
        elif root.lower().endswith(".csv"):
            pairs = caption_csv_pairs(root)
        else:
            raise ValueError(f"--data-path {root!r}: give a folder of images with .txt captions, or a .csv file")
        kept = [(path, caption) for path, caption in pairs if caption]
        if not kept:
            raise FileNotFoundError(f"no image with a non-empty caption in {root!r} ({len(pairs)} images listed)")
        self.paths, self.texts = [p for p, _ in kept], [c for _, c in kept]
        self.dropped = {"empty_caption": len(pairs) - len(kept)}
        if self.dropped["empty_caption"] and data_rank()[0] == 0:
            print(f"data: {root}: left out {self.dropped['empty_caption']} of {len(pairs)} images whose caption is "
                  "empty or missing", flush=True)
        super().__init__(res, seed, crop, hflip, where=root)

    def __len__(self):
        return len(self.paths)

    def captions(self):
        """Every item's caption, in order (for the text-feature cache)."""
        return list(self.texts)

    def _record(self, j):
        return self.paths[j], 0, self.texts[j]


#################################################################################
#               Image-caption pairs: webdataset tar shards, streamed            #
#################################################################################
# CC12M-style shards (as img2dataset writes them): each .tar holds samples NNNNN.jpg + NNNNN.txt (+ .json and others,
# ignored), the files of one sample next to each other. A tar is read front to back, never seeked, so shards may sit
# on slow network storage and need no index; the price is that items have no index: the dataset is a stream
# (IterableDataset) and the work is split by whole shards:
#   epoch order   a permutation of the shards drawn from (seed, epoch), the same on every rank
#   rank r        reads shards order[r::world]; its loader worker w reads those [w::workers]
# so each sample is read once per epoch, by exactly one (rank, worker). Each worker passes its samples through a
# seeded shuffle buffer (webdataset's .shuffle(n)), so a batch is not simply a run of neighbours in one tar.
# With fewer shards than ranks x workers some workers get nothing to read (a rank with no shard at all is an error),
# and with a shard count that is not a multiple of the ranks, or shards of unequal size, ranks come to the end of an
# epoch at different times. Use at least ranks x workers shards, better many more (CC12M as img2dataset writes it:
# about 1,100 shards of 10,000).

def data_rank(rank=None, world=None):
    """(rank, world) of this process: from torch.distributed if it is initialised, else torchrun's RANK / WORLD_SIZE,
    else (0, 1). An explicit argument wins (tests emulate ranks this way)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        found = dist.get_rank(), dist.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank, world = found[0] if rank is None else rank, found[1] if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of 0..{world - 1}")
    return rank, world


def list_shards(path_or_glob):
    """Sorted .tar shards: those in a folder, those a glob pattern matches (webdataset's brace ranges such as
    {00000..01242} are not expanded), or one .tar file."""
    import glob
    p = path_or_glob
    if not p:
        raise ValueError("--dataset webdataset needs --data-path: a folder of .tar shards or a glob like 'cc12m/*.tar'")
    if os.path.isdir(p):
        shards = glob.glob(os.path.join(glob.escape(p), "*.tar"))
    elif any(c in p for c in "*?["):
        shards = glob.glob(p)
    elif os.path.isfile(p):
        shards = [p]
    else:
        raise FileNotFoundError(f"--data-path {p!r}: no such folder or file (give a folder of .tar shards or a glob)")
    shards = sorted(s for s in shards if s.endswith(".tar") and os.path.isfile(s))
    if not shards:
        raise FileNotFoundError(f"--data-path {p!r}: no .tar files there")
    return shards


def tar_samples(path):
    """(key, {extension: bytes}) of every sample of a webdataset tar, in tar order. As in webdataset, a file's key is
    its path up to the first dot of its name (`00042.jpg` -> `00042`, extension `jpg`), and consecutive files sharing
    a key make one sample."""
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


def shuffled(items, size, rng):
    """Items in a random order drawn through a buffer of `size` (a stream cannot be permuted whole); 0 or 1: as they
    come."""
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
    """Image-caption samples streamed from webdataset tar shards, split across ranks and loader workers (see above).
    Items (image, 0, control, caption) as in CaptionFolderDataset; the randomness of a sample's crop and flip comes
    from (seed, epoch, shard, position in the shard), whichever worker reads it.

    A sample with an unreadable image, or an empty or missing caption, is skipped and counted in `events` (one row per
    loader worker, as in ImageFolderDataset); the stream just goes on, so batches stay full. A shard that breaks off
    inside a file (a truncated tar) counts one `unreadable` and the rest of it is left out (a break inside a header
    looks to tarfile like the end of the archive: nothing to count).

    Resume: use `collate` as the loader's collate_fn. It appends (worker, drawn) to every batch: which worker made it
    and how many samples that worker had taken from its shuffle buffer by then. A trainer keeps the latest `drawn` of
    each worker and the worker after the last batch's; `set_epoch(epoch, drawn, first_worker)` then makes each worker
    skip that many samples (read, not decoded) and has `first_worker` deliver the first batch. The loader deals batches
    round-robin over the workers that still have data (in order, its default), so the rest of the epoch comes out as
    it would have: the same batches in the same order, also once some workers have run dry. This needs the same
    ranks and workers (they decide who reads which shard) and the same shuffle_buffer.

    `captions()` cannot be answered without reading every shard, so it raises: the text-feature cache needs a
    map-style dataset (--dataset captions) or a cache made beforehand.
    """

    num_classes = 1

    def __init__(self, path_or_glob, res, seed=0, crop="random", hflip=True, shuffle_buffer=1000, rank=None,
                 world=None):
        self.shards = list_shards(path_or_glob)
        self.rank, self.world = data_rank(rank, world)  # read now, in the trainer: loader workers have no process group
        if len(self.shards) < self.world:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} ranks: a rank reads whole shards, so "
                             f"each needs one at least (better: at least ranks x loader workers)")
        self.res, self.seed, self.crop, self.hflip, self.shuffle_buffer = res, seed, crop, hflip, shuffle_buffer
        self.epoch, self.skip, self.first_worker = 0, None, 0
        self._worker, self._drawn = 0, 0  # set in each loader worker as it reads, for collate
        self.events = event_table()

    def set_epoch(self, epoch, drawn=None, first_worker=0):
        """Read `epoch` next; resuming, `drawn[w]` (from `collate`) fast-forwards worker w that far, and the loader's
        first batch comes from worker `first_worker` (the one after the last batch's)."""
        self.epoch, self.first_worker = epoch, first_worker
        self.skip = None if drawn is None else [int(n) for n in drawn]

    def captions(self):
        raise RuntimeError("webdataset shards are streamed, so their captions are only known once every shard is "
                           "read: the text-feature cache needs a map-style dataset (--dataset captions: a folder or a "
                           "CSV of the same pairs) or a precomputed cache")

    def shard_plan(self, epoch, worker=0, workers=1):
        """The shards (indices into `self.shards`) that this rank's loader worker `worker` reads in `epoch`."""
        order = np.random.default_rng([self.seed, epoch, 3]).permutation(len(self.shards))
        return order[self.rank::self.world][worker::workers].tolist()

    def collate(self, items):
        """The default collation of `items` plus a fifth entry, int64 (worker, samples drawn): the stream's position.
        It runs in the worker that read the items, right after the last of them."""
        return (*default_collate(items), torch.tensor([self._worker, self._drawn]))

    def _samples(self, plan):
        """(shard index, position in the shard, key, files) of every sample of the shards in `plan`."""
        for k in plan:
            try:
                for p, (key, files) in enumerate(tar_samples(self.shards[k])):
                    yield k, p, key, files
            except (tarfile.TarError, OSError, EOFError) as e:
                count_event(self.events, "unreadable", f"{self.shards[k]}: {e}; the rest of this shard is left out")

    def _item(self, k, p, key, files):
        """The item of one sample, or None (counted) when it must be skipped."""
        where = f"{self.shards[k]}:{key}"
        caption = read_caption(files["txt"]) if "txt" in files else ""
        if not caption:
            count_event(self.events, "empty_caption", f"{where}.txt {'is empty' if 'txt' in files else 'is missing'}")
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
        # the loader deals batches out round-robin from its worker 0: renumbering makes `first_worker` deliver first
        worker = 0 if info is None else (info.id + self.first_worker) % workers
        plan = self.shard_plan(self.epoch, worker, workers)
        if not plan and self.rank == 0 and worker == len(self.shard_plan(self.epoch)):  # the first idle worker says so
            print(f"data: {len(self.shards)} shards for {self.world} ranks x {workers} loader workers: some workers "
                  "have no shard to read this epoch; use at least ranks x workers shards", flush=True)
        if self.skip is not None and len(self.skip) != workers:
            raise ValueError(f"resuming a stream read by {len(self.skip)} loader workers with {workers}: use the "
                             "same number of workers (they decide who reads which shard)")
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
#                              Datasets by name                                 #
#################################################################################

def folder_default_control(res):
    """Sampling default for natural images: the SDXL convention (original = target size, crop at 0, 0)."""
    return make_control(res, res, 0, 0, 0, res)


DATASETS = ("shapes", "imagenet", "folder", "captions", "webdataset", "latents")


def build_dataset(name, res, data_path=None, seed=0, size=10000, crop="random", hflip=True, progress=False):
    """Dataset by name; `imagenet` and `folder` both read an ImageFolder tree at `data_path`, `captions` a folder of
    images with .txt captions or a CSV file of image,caption rows there, `webdataset` a folder (or glob) of .tar shards
    (a stream: an IterableDataset), `latents` a latent cache (its crop was fixed when it was made: `crop` does not
    apply)."""
    if name == "latents":
        if data_path is None:
            raise ValueError("--dataset latents needs --data-path CACHE_DIR (a cache made by python data.py --encode)")
        ds = LatentCacheDataset(data_path, seed=seed, hflip=hflip)
        if ds.res != res:
            raise ValueError(f"latent cache {data_path} holds {ds.res} px images, not --res {res}: train with --res "
                             f"{ds.res}, or encode a cache at {res} px into a new folder:\n  "
                             + encode_command(dict(ds.meta, res=res), "NEW_CACHE_DIR"))
        return ds
    if name == "shapes":
        return ShapesDataset(size=size, res=res, seed=seed, crop=crop, hflip=hflip, progress=progress)
    if name in ("imagenet", "folder"):
        if data_path is None:
            raise ValueError(f"--dataset {name} needs --data-path DIR (an ImageFolder tree: DIR/<class>/<images>)")
        return ImageFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip)
    if name == "captions":
        if data_path is None:
            raise ValueError("--dataset captions needs --data-path: a folder of images, each with a same-stem .txt "
                             "caption beside it, or a CSV file with the header row image,caption")
        return CaptionFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip)
    if name == "webdataset":
        if data_path is None:
            raise ValueError("--dataset webdataset needs --data-path: a folder of .tar shards (NNNNN.jpg + NNNNN.txt "
                             "per sample) or a glob like 'cc12m/*.tar'")
        return WebDatasetShards(data_path, res, seed=seed, crop=crop, hflip=hflip)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def default_control(name, res):
    """Control used for sampling when none is given: the shapes convention, or the natural-image one for every other
    dataset (folders, caption pairs, shards)."""
    return shapes_default_control(res) if name == "shapes" else folder_default_control(res)


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


def _atomic_write(path, write):
    """write(f) to path.tmp, fsync, rename: a kill leaves no file or a complete one under `path`, never a partial."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path, obj):
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _distributed():
    """(rank, world, device) under torchrun or in one process; the LOCAL rank picks the GPU, as in train.py."""
    import torch.distributed as dist
    from datetime import timedelta
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:  # a long timeout: on a re-run the missing shards may all be one rank's, and the others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=12))
    return rank, world, device


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
    _atomic_write(path, lambda f: torch.save(shard, f))


def encode_command(meta, out):
    """The command line that makes (or finishes) the cache described by `meta`."""
    launch = f"torchrun --nproc_per_node={meta['world']}" if meta["world"] > 1 else "python"
    data = f" --data-path {meta['data_path']}" if meta["data_path"] else f" --shapes-size {meta['shapes_size']}"
    return (f"{launch} data.py --encode --dataset {meta['dataset']}{data} --res {meta['res']} --vae {meta['vae']} "
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
        raise FileNotFoundError(f"{cache_dir!r} is not a latent cache (no meta.json); make one with\n  python data.py "
                                f"--encode --dataset imagenet --data-path DIR --res 256 --vae sd-ema --out {cache_dir}")
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
    """The items of a latent cache (`python data.py --encode`): (latent float (C, h, w), label, control, caption).

    Per item and epoch, from (seed, epoch, index) as in the image datasets: the crop or its mirror image (flip
    recorded in control[4]), then a posterior sample (or the posterior mean with `sample=False`), returned in the
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
