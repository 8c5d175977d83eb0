"""
Figures from the committed tables: the size-sweep grid (ours against adaln) and the loss curves of every
comparison. Plots with matplotlib, an optional dependency imported only here (common.pyplot); the sample grids
are pasted together with PIL.

    python -m experiments figures
"""
import json
import os

import torch

from build import latent_shape, load_model, make_diffusion
from diffusion import generate, make_noise
from latents import Autoencoder, to_uint8
from text import semantic_input

from .common import ROUTE_LABELS, evaluation_sampling, mean_curve, plot_curves
from .measures import size_controls


@torch.no_grad()
def size_sweep_figure(options, run_dirs, path, classes=(0, 2, 5, 6, 7, 9), factors=(0.5, 0.7, 1.0, 1.4, 2.0),
                      seed=30_000, scale=3):
    """One panel per model (run_dirs: {label: run folder}); rows = classes, each with its own fixed noise;
    columns = the size condition (original side / res). Only the size condition changes along a row."""
    from PIL import Image, ImageDraw
    panels = []
    for label, run_dir in run_dirs.items():
        trained = load_model(run_dir, "cpu")
        model, args, facts = trained.model, trained.args, trained.facts
        ctrl = size_controls(facts.res, factors)
        noise = make_noise([seed + k for k in classes], latent_shape(facts), "cpu")
        x = generate(model, make_diffusion(args, facts), noise.repeat_interleave(len(factors), 0),
                     semantic_input(args, facts, [k for k in classes for _ in factors], "cpu"),
                     torch.stack(ctrl * len(classes)), evaluation_sampling(options))
        imgs = to_uint8(Autoencoder("none").decode(x)).permute(0, 2, 3, 1).numpy()
        r = facts.res * scale
        panel = Image.new("RGB", (len(factors) * (r + 2), 18 + len(classes) * (r + 2)), "white")
        d = ImageDraw.Draw(panel)
        d.text((2, 2), label, fill="black")
        for i, im in enumerate(imgs):
            row, col = divmod(i, len(factors))
            panel.paste(Image.fromarray(im).resize((r, r), Image.NEAREST),
                        (col * (r + 2), 18 + row * (r + 2)))
        panels.append(panel)
    foot = 16
    w = sum(p.width for p in panels) + 12 * (len(panels) - 1)
    fig = Image.new("RGB", (w, max(p.height for p in panels) + foot), "white")
    x = 0
    for p in panels:
        fig.paste(p, (x, 0))
        x += p.width + 12
    ImageDraw.Draw(fig).text((2, fig.height - foot + 2), "original size / res, left to right: "
                             + ", ".join(f"{f:g}" for f in factors)
                             + " (same noise and class along each row)", fill="black")
    fig.save(path)
    return path


def figures(options):
    """From the tables under --docs: the size sweep (first seed of ours vs adaln) and the loss curves (mean
    over seeds) of every comparison that has been run."""
    tables = {}
    for name in ("routes", "gates", "padding"):
        path = os.path.join(options.docs, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                tables[name] = {r["variant"]: r["per_seed"] for r in json.load(f)}
    routes = tables.get("routes", {})
    pair = {v: routes[v][0]["run_dir"] for v in (ROUTE_LABELS["ours"], ROUTE_LABELS["adaln"]) if v in routes}
    if len(pair) == 2 and all(os.path.isdir(d) for d in pair.values()):  # the run folders of this machine
        size_sweep_figure(options, pair, os.path.join(options.docs, "size_sweep.png"))
    for name, table in tables.items():
        seeds = ",".join(str(m["seed"]) for m in next(iter(table.values())))
        plot_curves(os.path.join(options.docs, f"loss_{name}.png"),
                    f"{name}: training loss, mean of seeds {seeds}",
                    {variant: mean_curve(per_seed) for variant, per_seed in table.items()})
