"""
What is measured on a trained run of the shapes dataset: the checker's accuracies, the semantic drift of a
size or crop sweep (the paper's Figure 2: the same noise and class under several values of one control, read
back by the checker; a disentangled model changes sharpness or position, not content), and held-out losses.
"""

import numpy as np
import torch

from build import (
    SourceFacts,
    SourceOptions,
    build_dataset,
    latent_shape,
    load_model,
    make_diffusion,
    make_model,
)
from checkpoint import read_checkpoint, stored_args
from conditioning import SIGNAL
from diffusion import Sampling, generate, make_noise, to_velocity
from latents import Autoencoder, to_uint8
from shapes import (
    CANVAS_MARGIN,
    HELDOUT_TEMPLATES,
    SHAPE_NAMES,
    EvalPlan,
    ShapesChecker,
    evaluate_shapes,
    shapes_default_control,
)
from text import semantic_input

from .common import evaluation_sampling, last_ckpt, measured

# original image side / training resolution: upscaled (blurry) .. downscaled (sharp), the range the shapes
# data covers; 2.0 is the sampling default
SIZE_SWEEP = (0.5, 1.0, 2.0)


def size_controls(res, factors):
    """The shapes sampling default (centred, not mirrored) with the original size set to each factor x res."""
    controls = []
    for f in factors:
        c = shapes_default_control(res)
        c[SIGNAL["orig_h"]] = c[SIGNAL["orig_w"]] = round(f * res)
        controls.append(c)
    return controls


def content_drift(measurements, key):
    """measurements: per (noise, class) pair, the checker's readings of the images of one sweep. The fraction
    of pairs whose `key` (label, colour) is not the same in every image of the sweep."""
    return float(np.mean([len({m[key] for m in sweep}) > 1 for sweep in measurements]))


@torch.no_grad()
def drift(model, args, facts, n, cfg_scale, steps, seed=20_000):
    """Sweep the size and the crop condition for n (noise, class) pairs; returns
    size_acc           fraction of pairs whose image at original size 2 res is sharper than at 0.5 res
    size_drift_class / size_drift_colour    content_drift over the size sweep
    crop_drift_class / crop_drift_colour    content_drift over crops at the top-left, centre and
    bottom-right"""
    res, vae = facts.res, Autoencoder("none")
    base = shapes_default_control(res)  # centred, not mirrored, original size 2 res
    assert base[0] == SIZE_SWEEP[-1] * res
    controls = size_controls(res, SIZE_SWEEP)
    # the two extreme crops; the centred one is controls[2]
    for offset in (0, round(res * CANVAS_MARGIN) - res):
        c = base.clone()
        c[SIGNAL["crop_top"]] = c[SIGNAL["crop_left"]] = offset
        controls.append(c)
    k = len(controls)
    labels = [i % facts.num_classes for i in range(n)]
    noise = make_noise([seed + i for i in range(n)], latent_shape(facts), "cpu").repeat_interleave(k, 0)
    y = semantic_input(args, facts, [lab for lab in labels for _ in controls], "cpu")
    x = generate(model, make_diffusion(args, facts), noise, y, torch.stack(controls * n),
                 Sampling(steps=steps, scale=cfg_scale))
    meas = ShapesChecker()(to_uint8(vae.decode(x)))
    sweeps = [meas[i * k:(i + 1) * k] for i in range(n)]
    size = [s[:3] for s in sweeps]
    crop = [[s[3], s[2], s[4]] for s in sweeps]
    return dict(size_acc=float(np.mean([s[2]["sharpness"] > s[0]["sharpness"] for s in size])),
                size_drift_class=content_drift(size, "label"),
                size_drift_colour=content_drift(size, "colour"),
                crop_drift_class=content_drift(crop, "label"),
                crop_drift_colour=content_drift(crop, "colour"))


def checker_metrics(run_dir, options, with_drift=True):
    """The checker's accuracies (shapes.evaluate_shapes) and, for class models, the drift sweep, of a run's
    EMA."""
    key = (f"per_class{options.per_class}-drift{options.drift_n * with_drift}-steps{options.sample_steps}"
           f"-cfg{options.cfg_scale}")

    def measure():
        trained = load_model(run_dir, "cpu")
        model, args, facts = trained.model, trained.args, trained.facts
        plan = EvalPlan(options.per_class, evaluation_sampling(options))
        out = evaluate_shapes(model, make_diffusion(args, facts), args, facts, plan, "cpu")
        if with_drift:
            out.update(drift(model, args, facts, options.drift_n, options.cfg_scale, options.sample_steps))
        return out
    return measured(run_dir, key, measure)


@torch.no_grad()
def heldout_loss(run_dir, n=256, levels=8, seed=999, weights="model", null=False, per_level=False):
    """The velocity loss of a run's `weights` ("model": the final weights; "ema") on n images of a dataset the
    run never saw, at `levels` fixed noise levels t = (i + 0.5) / levels with fixed noise: the same inputs for
    every variant, so differences are the models'. A text model reads each image's caption in a wording it
    never saw in training (shapes.HELDOUT_TEMPLATES, in turn). null=True gives every image the null condition
    instead: the null loss minus the conditional one is how much the model uses the condition. per_level: the
    loss at each level."""
    ckpt = read_checkpoint(last_ckpt(run_dir))
    args, facts = stored_args(ckpt["args"]), SourceFacts(**ckpt["facts"])
    model = make_model(args, facts)
    model.load_state_dict(ckpt[weights])
    model.eval()
    data = build_dataset("shapes", facts.res, seed=seed, options=SourceOptions(size=n))
    g = torch.Generator().manual_seed(seed)
    total = np.zeros(levels)
    for start in range(0, n, 64):
        idx = range(start, min(start + 64, n))
        items = [data[i] for i in idx]
        x0 = Autoencoder("none").encode(torch.stack([it[0] for it in items]))
        labels = [it[1] for it in items]
        prompts = [HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)].format(
            colour=data.scenes[i]["colour"], shape=SHAPE_NAMES[data.scenes[i]["label"]]) for i in idx]
        y = semantic_input(args, facts, labels, "cpu", prompts)
        ctrl = torch.stack([it[2] for it in items])
        drop = torch.full((len(items),), null)
        for i in range(levels):
            t = torch.full((len(items),), (i + 0.5) / levels)
            noise = torch.randn(x0.shape, generator=g)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            pred = to_velocity(model(x_t, t, y, ctrl, sem_drop=drop), x_t, t, args.pred)
            total[i] += ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).sum().item()
    return (total / n).tolist() if per_level else float(total.sum() / (n * levels))


def split_levels(losses):
    """Per-level held-out losses (t ascending) -> the mean, and the means over the cleaner and the noisier
    half."""
    half = len(losses) // 2
    return dict(heldout=float(np.mean(losses)), heldout_low=float(np.mean(losses[:half])),
                heldout_high=float(np.mean(losses[half:])))


def text_losses(run_dir):
    """Held-out-wording loss of a text model's EMA, and how much lower it is than with the null prompt."""
    caption, null = heldout_loss(run_dir, weights="ema"), heldout_loss(run_dir, weights="ema", null=True)
    return dict(caption_loss=caption, caption_gain=null - caption)
