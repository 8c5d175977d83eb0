"""
The embedded `shapes` dataset: coloured shapes whose every conditioning signal can be read back from a
generated image.

    scene     class (ten shapes, four chiral), colour, original resolution, caption wording
    render    the scene at its original resolution, resized to a canvas of 1.25 x res (small originals come
              out blurry), then crop_flip (data.py) crops res x res and maybe mirrors, recording what it did
    checker   segments the shape and matches templates: class, orientation, position, sharpness, colour
    evaluate  samples from a model and grades them with the checker (class, flip, mirrored-pair and crop
              accuracy)

Items are `(image uint8 (3, res, res), label, control, caption)` like every dataset in data.py.
"""
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from conditioning import SIGNAL, make_control
from data import crop_flip
from diffusion import Draw, Sampling, generate, make_noise
from latents import Autoencoder, latent_geometry, to_uint8
from text import semantic_input

#################################################################################
#                     The embedded `shapes` dataset                             #
#################################################################################
# Each image: one coloured shape on a dark gradient background. The scene is rendered at a random "original"
# resolution, resized to a canvas of 1.25 x res (so small originals come out blurry), then randomly cropped to
# res and maybe mirrored. The shape sits at the canvas centre, so its position in the crop is set by the crop
# offset; four of the ten shapes are chiral, so a mirror is visible. Thus every control signal has a
# measurable effect:
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
    return (((u >= -0.9) & (u <= -0.45) & (abs(v) <= 0.95)) |
            ((u >= -0.45) & (u <= 0.9) & (v >= -0.95) & (v <= -0.05)))


SHAPES = [("circle", _circle), ("square", _square), ("triangle", _triangle), ("plus", _plus),
          ("diamond", _diamond), ("tee", _tee), ("ell", _ell), ("wedge", _wedge), ("zed", _zed),
          ("flag", _flag)]
SHAPE_NAMES = [name for name, _ in SHAPES]
CHIRAL = {"ell", "wedge", "zed", "flag"}
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (240, 220, 40),
           "magenta": (230, 50, 220), "cyan": (40, 220, 230), "orange": (250, 140, 30),
           "white": (240, 240, 240)}
COLOUR_NAMES = list(COLOURS)
CANVAS_MARGIN = 1.25  # canvas = 1.25 x res, so the crop can move by a quarter of the image


def render_shape(shape_fn, size, half_extent, supersample=4):
    """Coverage in [0, 1] of a shape centred in a size x size image, anti-aliased by supersampling."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample - size / 2  # pixel centres relative to the image centre
    v, u = np.meshgrid(coords / half_extent, coords / half_extent, indexing="ij")
    inside = shape_fn(u, v).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


# Correlated metadata (--size-corr rho, default 0). On real data the original size correlates with the
# content, which is what lets a model that adds size and class in one embedding confuse them. With probability
# rho a scene's original side is drawn from its class group's half of the range: even classes mostly small
# originals (res / 2 .. res), odd classes mostly large ones (res .. 2 res); otherwise from the whole range as
# at rho = 0.
SIZE_GROUPS = ("small", "large")


def size_group(label):
    """The original-size group a class is correlated with under --size-corr: 0 small (even classes), 1 large
    (odd)."""
    return label % 2


def shapes_scene(index, res, seed, size_corr=0.0):
    """Deterministic scene parameters of item `index`."""
    rng = np.random.default_rng([seed, index])
    scene = dict(
        label=int(rng.integers(len(SHAPES))), colour=COLOUR_NAMES[rng.integers(len(COLOURS))],
        bg=rng.uniform(0.0, 0.3, size=3), bg_grad=rng.uniform(-0.08, 0.08, size=(2, 3)),
        extent=rng.uniform(0.20, 0.27),  # shape half-extent as a fraction of the canvas
        orig=int(rng.integers(res // 2, 2 * res + 1)),
        # drawn last: earlier draws stay as they were
        template=int(rng.integers(len(CAPTION_TEMPLATES))),
        filler=[(int(rng.integers(8)), FILLER_WORDS[rng.integers(len(FILLER_WORDS))])
                for _ in range(rng.integers(3))],
    )
    if size_corr > 0:  # its own stream: at rho = 0 every scene is exactly as without the flag
        corr = np.random.default_rng([seed, index, 2])
        if corr.random() < size_corr:
            lo, hi = (res // 2, res) if size_group(scene["label"]) == 0 else (res, 2 * res)
            scene["orig"] = int(corr.integers(lo, hi + 1))
    return scene


def render_canvas(scene, res):
    """The canvas (PIL, 1.25 res square) of a scene: rendered at the scene's original size, then resized."""
    size = scene["orig"]
    alpha = render_shape(SHAPES[scene["label"]][1], size, scene["extent"] * size)[..., None]
    ramp = np.arange(size) / max(size - 1, 1) - 0.5
    bg = scene["bg"] + ramp[:, None, None] * scene["bg_grad"][0] + ramp[None, :, None] * scene["bg_grad"][1]
    fg = np.array(COLOURS[scene["colour"]], dtype=np.float32) / 255.0
    img = (1 - alpha) * bg + alpha * fg
    img = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    canvas = round(res * CANVAS_MARGIN)
    return img.resize((canvas, canvas), Image.BILINEAR)


# Caption wordings: a text model trains on the first list and is evaluated on the second, which it never saw,
# so the checker measures whether it reads the colour and shape words rather than memorising whole captions.
CAPTION_TEMPLATES = ("a {colour} {shape}", "a {shape} in {colour}", "{colour} {shape}",
                     "a picture of a {colour} {shape}", "the {shape} is {colour}",
                     "one {colour} {shape} on a dark background")
HELDOUT_TEMPLATES = ("an image showing a {colour} {shape}", "{shape}, coloured {colour}")
# 0-2 of these words are inserted at random places in a training caption, so the model learns that words other
# than the colour and the shape carry nothing (none of them appears in the held-out wordings).
FILLER_WORDS = ("small", "big", "simple", "drawing", "photo", "render", "centred", "flat", "scene", "graphic",
                "icon", "plain", "clean", "little", "bright", "vivid", "sharp", "tiny", "large", "single",
                "cute", "neat", "bold", "basic", "digital", "figure", "art", "sketch", "sticker", "logo",
                "symbol", "with", "and", "here", "just", "nice", "old", "new", "toy", "card")


def shapes_caption(scene):
    words = (CAPTION_TEMPLATES[scene["template"]]
             .format(colour=scene["colour"], shape=SHAPE_NAMES[scene["label"]])
             .split())
    for pos, word in scene.get("filler", []):
        words.insert(pos % (len(words) + 1), word)
    return " ".join(words)


class ShapesDataset(Dataset):
    """Procedural coloured shapes with labels, captions and the control metadata of how each image was made.

    Canvases are rendered once at construction (deterministic from `seed`); crop and flip are drawn per epoch.
    """

    num_classes = len(SHAPES)

    def __init__(self, size=10000, res=32, seed=0, crop="random", hflip=True, progress=False, size_corr=0.0):
        self.res, self.seed, self.crop, self.hflip, self.epoch = res, seed, crop, hflip, 0
        self.scenes = [shapes_scene(i, res, seed, size_corr) for i in range(size)]
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
# segment the shape against the background colour, normalise its bounding box, and match templates of every
# class in both orientations. Tested on the dataset's own images before it judges generated ones.

_TEMPLATE = 24


def _normalise_mask(mask):
    """Crop a float mask to its bounding box and resize it to _TEMPLATE x _TEMPLATE."""
    ys, xs = np.nonzero(mask > 0.5)
    if len(ys) == 0:
        return np.zeros((_TEMPLATE, _TEMPLATE), np.float32)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
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
    """Measure what a shapes image shows. `__call__` takes uint8 (N, 3, H, W) or (3, H, W) and returns a list
    of dicts: label, orientation (0 canonical, 1 mirrored, None for symmetric shapes), match (template
    agreement in [0, 1]), position (row, col of the bounding-box centre in pixels), sharpness (steepest
    normalised edge step per pixel) and colour.
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
        grad = np.sort(np.hypot(gx, gy).ravel())[-max(4, fg.sum() // 8) :]  # the steepest edge pixels
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
    row = canvas / 2 - control[SIGNAL["crop_top"]].item() - 0.5
    col = canvas / 2 - control[SIGNAL["crop_left"]].item() - 0.5
    if control[SIGNAL["flip"]].item() > 0.5:
        col = res - 1 - col
    return row, col


#################################################################################
#                     Evaluating a model with the checker                       #
#################################################################################


def class_prompts(labels):
    """A text model's default prompt for each class label of a shapes grid: its shape in the colours in turn
    ("a red circle", "a green ell", ...)."""
    return [f"a {COLOUR_NAMES[i % len(COLOUR_NAMES)]} {SHAPE_NAMES[k]}" for i, k in enumerate(labels)]


class EvalPlan(NamedTuple):
    """What evaluate_shapes draws: `per_class` seeds per class from `seed` on (each drawn with flip 0 and 1),
    sampled as `sampling` (diffusion.Sampling) says; `per_sample` adds each sample's outcome to the result,
    `progress` shows the sampler's progress bar."""

    per_class: int
    sampling: Sampling
    seed: int = 10_000
    per_sample: bool = False
    progress: bool = False


@torch.no_grad()
def evaluate_shapes(model, diffusion, args, facts, plan, device, vae=None):
    """Checker accuracies of the samples that `plan` (EvalPlan) draws.

    class_acc  measured class == requested class
    flip_acc   on chiral classes: measured orientation == requested flip (a wrong class counts as wrong)
    mirrored   on chiral classes: fraction of (flip 0, flip 1) pairs of the same seed that both come out right
    crop_err   mean distance (pixels) between the shape centre and where the crop condition puts it
    A text model is asked with prompt wordings it never saw in training (HELDOUT_TEMPLATES, in turn) for a
    colour (in turn) and a shape, and also gets
    colour_acc           measured colour == requested colour
    class_colour_acc     both right
    plan.per_sample adds each sample's outcome (class_ok, and colour_ok for text; flip_ok of the chiral ones)
    under "per_sample". `vae` decodes the samples (the run's autoencoder; pixels when None).
    """
    per_class, seed = plan.per_class, plan.seed
    was_training = model.training
    model.eval()
    vae = vae or Autoencoder("none")
    checker = ShapesChecker()
    res = facts.res
    base = shapes_default_control(res)
    rng = np.random.default_rng(seed)
    rows = []  # (class, flip, seed, control, colour, prompt)
    for k in range(facts.num_classes):
        for j in range(per_class):
            cropped = base.clone()
            cropped[SIGNAL["crop_top"]], cropped[SIGNAL["crop_left"]] = rng.integers(  # a random crop
                0, round(res * CANVAS_MARGIN) - res + 1, size=2
            )
            colour = COLOUR_NAMES[(k + j) % len(COLOUR_NAMES)]
            prompt = HELDOUT_TEMPLATES[j % len(HELDOUT_TEMPLATES)].format(colour=colour, shape=SHAPE_NAMES[k])
            for flip in (0, 1):
                control = cropped.clone()
                control[SIGNAL["flip"]] = flip
                rows.append((k, flip, seed + k * per_class + j, control, colour, prompt))
    factor, channels = latent_geometry(facts.vae)
    noise = make_noise([r[2] for r in rows], (channels, res // factor, res // factor), device)
    y = semantic_input(args, facts, [r[0] for r in rows], device, [r[5] for r in rows])
    ctrl = torch.stack([r[3] for r in rows]).to(device)
    x = generate(model, diffusion, noise, y, ctrl, plan.sampling,
                 Draw(progress=plan.progress, seed=seed, seeds=[r[2] for r in rows]))
    measured = checker(to_uint8(vae.decode(x)).cpu())
    model.train(was_training)
    class_ok = np.array([m["label"] == r[0] for m, r in zip(measured, rows)])
    chiral = np.array([SHAPE_NAMES[r[0]] in CHIRAL for r in rows])
    flip_ok = np.array([m["label"] == r[0] and m["orientation"] == r[1] for m, r in zip(measured, rows)])
    pairs = flip_ok.reshape(-1, 2).all(axis=1)[chiral.reshape(-1, 2)[:, 0]]
    err = [np.hypot(*(np.subtract(m["position"], expected_position(r[3], res))))
           for m, r in zip(measured, rows)]
    found = np.isfinite(err)  # a sample where the checker finds no shape has no position
    out = dict(class_acc=float(class_ok.mean()), flip_acc=float(flip_ok[chiral].mean()),
               mirrored=float(pairs.mean()), crop_err=float(np.nanmean(err)) if found.any() else float("nan"))
    if args.cond_type == "text":
        colour_ok = np.array([m["colour"] == r[4] for m, r in zip(measured, rows)])
        out.update(colour_acc=float(colour_ok.mean()), class_colour_acc=float((colour_ok & class_ok).mean()))
        if plan.per_sample:  # for intervals over samples
            out["per_sample"] = dict(class_ok=class_ok.tolist(), colour_ok=colour_ok.tolist())
    elif plan.per_sample:
        out["per_sample"] = dict(class_ok=class_ok.tolist())
    if plan.per_sample:  # the chiral samples' flip outcomes, in order
        out["per_sample"]["flip_ok"] = flip_ok[chiral].tolist()
    return out
