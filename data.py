"""
Data: the embedded `shapes` dataset and its checker, image folders (ImageNet layout), the augmentation that
*records* the control metadata it applies, and the autoencoder wrapper (pixel space or the SD VAE).

Every dataset returns `(image, label, control, caption)`:
    image    uint8 tensor (3, res, res)
    label    int class index
    control  float tensor (len(CONTROL_SIGNALS),) in raw units (pixels, 0/1 flag, ratio), see CONTROL_SIGNALS
    caption  str
The control vector is what the model's ControlEmbedder reads; each augmentation writes the values it actually used.
Randomness of an item depends only on (seed, epoch, index), so data order and augmentation survive a resume exactly.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

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
                orig=int(rng.integers(res // 2, 2 * res + 1)))


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


def shapes_caption(scene):
    return f"a {scene['colour']} {SHAPE_NAMES[scene['label']]}"


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
#                        Image folders (ImageNet layout)                        #
#################################################################################

# What can go wrong with an image file in a crawl, and what we do about it. The first three are skipped (another
# image takes the slot, so batches stay full and ranks stay in step); the rest are converted to 8-bit RGB and counted.
SKIPPED = ("unreadable", "truncated", "tiny")
CONVERTED = ("cmyk", "palette", "16bit", "alpha", "gray")
EVENTS = ("ok",) + SKIPPED + CONVERTED
MAX_WORKERS = 64  # data-loader workers per rank whose event counts are kept apart
MIN_SIDE = 8  # images smaller than this on either side carry no usable content at any training resolution


class BadImage(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def load_rgb(path):
    """Open an image as 8-bit RGB. Returns (image, conversion kind or None); raises BadImage(kind) for a skip."""
    from PIL import UnidentifiedImageError
    try:
        with Image.open(path) as f:
            f.load()  # decode now: truncated files fail here, not later in a worker
            mode, img = f.mode, f.copy()
    except (UnidentifiedImageError, ValueError) as e:
        raise BadImage("unreadable", f"{path}: {e}") from e
    except OSError as e:
        raise BadImage("truncated" if "truncated" in str(e) else "unreadable", f"{path}: {e}") from e
    if min(img.size) < MIN_SIDE:
        raise BadImage("tiny", f"{path}: {img.width}x{img.height} is smaller than {MIN_SIDE} px")
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


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` like torchvision's ImageFolder; random crop / flip record their control metadata.

    A bad file never crashes a run: it is counted in `events` (a shared-memory tensor, so data-loader workers add to
    it), reported once per kind, and replaced by another image chosen deterministically.
    """

    def __init__(self, root, res, seed=0, crop="random", hflip=True):
        import torchvision
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root!r} is not a directory; point it at a folder laid out as "
                                    "ROOT/<class_name>/<image files> (e.g. ImageNet's train/ folder)")
        self.folder = torchvision.datasets.ImageFolder(root)
        if len(self.folder) == 0:
            raise FileNotFoundError(f"no images found under {root!r}")
        self.res, self.seed, self.crop, self.hflip, self.epoch = res, seed, crop, hflip, 0
        self.num_classes = len(self.folder.classes)
        # one row per process (row 0: the main process, row k: loader worker k - 1), so no two processes ever add to
        # the same number and the counts stay exact; shared memory makes the workers' rows visible to the trainer
        self.events = torch.zeros(MAX_WORKERS + 1, len(EVENTS), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.folder)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _count(self, kind, message=None):
        worker = torch.utils.data.get_worker_info()
        self.events[0 if worker is None else worker.id + 1, EVENTS.index(kind)] += 1
        if kind not in _REPORTED and kind != "ok":
            _REPORTED.add(kind)
            print(f"data: {'skipping' if kind in SKIPPED else 'converting'} {kind} image ({message}); "
                  f"further {kind} images are counted in the log without a message", flush=True)

    def __getitem__(self, i):
        for attempt in range(50):
            j = (i + attempt * 7919) % len(self)  # a deterministic stand-in, so a resume sees the same data
            path, label = self.folder.samples[j]
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
            return img, label, ctrl, self.folder.classes[label]
        raise RuntimeError(f"50 bad images in a row around index {i} of {self.folder.root}: is the dataset corrupt?")


def folder_default_control(res):
    """Sampling default for natural images: the SDXL convention (original = target size, crop at 0, 0)."""
    return make_control(res, res, 0, 0, 0, res)


DATASETS = ("shapes", "imagenet", "folder")


def build_dataset(name, res, data_path=None, seed=0, size=10000, crop="random", hflip=True, progress=False):
    """Dataset by name; `imagenet` and `folder` both read an ImageFolder tree at `data_path`."""
    if name == "shapes":
        return ShapesDataset(size=size, res=res, seed=seed, crop=crop, hflip=hflip, progress=progress)
    if name in ("imagenet", "folder"):
        if data_path is None:
            raise ValueError(f"--dataset {name} needs --data-path DIR (an ImageFolder tree: DIR/<class>/<images>)")
        return ImageFolderDataset(data_path, res, seed=seed, crop=crop, hflip=hflip)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def default_control(name, res):
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
    `sd-ema` / `sd-mse` / a path: the Stable Diffusion VAE (f = 8, 4 channels, latents x 0.18215) via `diffusers`."""

    SD = {"sd-ema": "stabilityai/sd-vae-ft-ema", "sd-mse": "stabilityai/sd-vae-ft-mse"}

    def __init__(self, name="none", scale=0.18215):
        super().__init__()
        self.name, self.scale, self.vae = name, scale, None
        if name != "none":
            try:
                from diffusers.models import AutoencoderKL
            except ImportError as e:
                raise ImportError(f"--vae {name} needs the optional package diffusers: pip install diffusers") from e
            self.vae = AutoencoderKL.from_pretrained(self.SD.get(name, name)).eval().requires_grad_(False)
            found = (2 ** (len(self.vae.config.block_out_channels) - 1), self.vae.config.latent_channels)
            if found != latent_geometry(name):  # the model was sized from latent_geometry: they must agree
                raise ValueError(f"--vae {name}: factor {found[0]} with {found[1]} channels; this code sizes models "
                                 f"for the SD layout {latent_geometry(name)}")

    @torch.no_grad()
    def encode(self, images):
        """uint8 (B, 3, H, W) -> float (B, C, H/f, W/f); the VAE posterior mean."""
        x = images.float() / 127.5 - 1.0
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, z):
        """float latents -> images in [0, 1]."""
        x = z if self.vae is None else self.vae.decode(z / self.scale).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(images01):
    """[0, 1] float (B, C, H, W) -> uint8 (B, C, H, W)."""
    return (images01 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
