"""
The paper's comparative claims, reproduced at small scale on the embedded `shapes` dataset: every variant is trained
by train.py with the same budget, data and seeds, then measured the same way with the shapes checker. Tables
(Markdown + JSON) and figures (PNG) are written under docs/experiments/, and the results page docs/RESULTS.md is
rebuilt from them, so no number in it is typed by hand.

    python experiments.py routes      # --cond ours vs adaln vs xattn vs mmdit: accuracy, control, semantic drift
    python experiments.py gates       # control gates g(t): none vs cosine, per group
    python experiments.py padding     # text: noisy_replicate vs replicate vs zero padding
    python experiments.py transfer    # 32 -> 64 px: resample vs extend, with and without the noise-shift scaling
    python experiments.py figures     # size-sweep grid (ours vs adaln) and loss curves
    python experiments.py recipes     # each published recipe (train.py --recipe NAME) on shapes, its own sampler
    python experiments.py drift       # at convergence, class <-> size correlated data: routes, gates, --ctrl-scale
    python experiments.py padding-converged   # text padding at the same budget, 95 % intervals
    python experiments.py all         # routes, gates, padding, transfer, figures, then the results page
    python experiments.py results     # only the results page, from the tables already written

Defaults: seeds 0,1,2 and 800 steps per run (about 6 minutes per run on one CPU thread). A finished run is not
trained again and its measurements are kept in its folder (under --out), so an interrupted experiment continues where
it stopped, two experiments can run side by side in separate processes, and `all` after them only assembles. Delete a
run folder to redo it.

Semantic drift (the paper's Figure 2, measured): the same noise and class are sampled under several values of one
control (original size, or crop position) and the checker reads each image; the drift is the fraction of
(noise, class) pairs whose content -- the shape class, or its colour, which no condition fixes for a class model --
is not the same across the sweep. A disentangled model changes sharpness or position, not content.
"""
import argparse
import json
import os
import re
import time

import numpy as np
import torch

import train
from checkpoint import checkpoints_in, read_checkpoint
from conditioning import SIGNAL
from config import latent_shape, make_diffusion, make_model
from data import build_dataset, default_control
from diffusion import generate, make_noise, to_velocity
from latents import Autoencoder, to_uint8
from sample import load_model
from shapes import CANVAS_MARGIN, HELDOUT_TEMPLATES, SHAPE_NAMES, ShapesChecker, evaluate_shapes, semantic_input

DOCS = os.path.join("docs", "experiments")

#################################################################################
#                                 Running variants                              #
#################################################################################


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})"


def run(name, argv, out):
    """Train `argv` into out/name (once); return the run folder."""
    folder = os.path.join(out, name)
    done = os.path.join(folder, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["run_dir"]
    t0 = time.time()
    run_dir = train.main(argv + ["--out", folder])
    with open(done, "w") as f:
        json.dump(dict(run_dir=run_dir, wall_s=time.time() - t0, argv=argv, device=device_name()), f)
    return run_dir


def run_info(run_dir):
    with open(os.path.join(os.path.dirname(run_dir), "done.json")) as f:
        return json.load(f)


def last_ckpt(run_dir):
    return checkpoints_in(run_dir)[0]


def train_losses(run_dir):
    """{step: mean training loss over the --log-every steps before it}."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def measured(run_dir, key, fn):
    """fn() once per (run, measurement settings): the result is kept in the run folder."""
    path = os.path.join(run_dir, "measurements.json")
    cache = {}
    if os.path.exists(path):
        with open(path) as f:
            cache = json.load(f)
    if key not in cache:
        t0 = time.time()
        cache[key] = dict(fn(), wall_s=time.time() - t0)
        with open(path + ".tmp", "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(path + ".tmp", path)
    return cache[key]


#################################################################################
#                                   Measurements                                #
#################################################################################

SIZE_SWEEP = (0.5, 1.0, 2.0)  # original image side / training resolution: upscaled (blurry) .. downscaled (sharp),
# the range the shapes data covers; 2.0 is the sampling default


def size_controls(res, factors):
    """The shapes sampling default (centred, not mirrored) with the original size set to each factor x res."""
    controls = []
    for f in factors:
        c = default_control("shapes", res)
        c[SIGNAL["orig_h"]] = c[SIGNAL["orig_w"]] = round(f * res)
        controls.append(c)
    return controls


def content_drift(measurements, key):
    """measurements: per (noise, class) pair, the checker's readings of the images of one sweep. The fraction of pairs
    whose `key` (label, colour) is not the same in every image of the sweep."""
    return float(np.mean([len({m[key] for m in sweep}) > 1 for sweep in measurements]))


@torch.no_grad()
def drift(model, args, n, cfg_scale, steps, seed=20_000):
    """Sweep the size and the crop condition for n (noise, class) pairs; returns
    size_acc           fraction of pairs whose image at original size 2 res is sharper than at 0.5 res
    size_drift_class / size_drift_colour    content_drift over the size sweep
    crop_drift_class / crop_drift_colour    content_drift over crops at the top-left, centre and bottom-right"""
    res, vae = args.res, Autoencoder("none")
    base = default_control("shapes", res)  # centred, not mirrored, original size 2 res
    assert base[0] == SIZE_SWEEP[-1] * res
    controls = size_controls(res, SIZE_SWEEP)
    for offset in (0, round(res * CANVAS_MARGIN) - res):  # the two extreme crops; the centred one is controls[2]
        c = base.clone()
        c[SIGNAL["crop_top"]] = c[SIGNAL["crop_left"]] = offset
        controls.append(c)
    k = len(controls)
    labels = [i % args.num_classes for i in range(n)]
    noise = make_noise([seed + i for i in range(n)], latent_shape(args), "cpu").repeat_interleave(k, 0)
    y = semantic_input(args, [lab for lab in labels for _ in controls], "cpu")
    x = generate(model, make_diffusion(args), noise, y, torch.stack(controls * n), cfg_scale, steps=steps)
    meas = ShapesChecker()(to_uint8(vae.decode(x)))
    sweeps = [meas[i * k:(i + 1) * k] for i in range(n)]
    size = [s[:3] for s in sweeps]
    crop = [[s[3], s[2], s[4]] for s in sweeps]
    return dict(size_acc=float(np.mean([s[2]["sharpness"] > s[0]["sharpness"] for s in size])),
                size_drift_class=content_drift(size, "label"), size_drift_colour=content_drift(size, "colour"),
                crop_drift_class=content_drift(crop, "label"), crop_drift_colour=content_drift(crop, "colour"))


def checker_metrics(run_dir, a, with_drift=True):
    """The checker's accuracies (shapes.evaluate_shapes) and, for class models, the drift sweep, of a run's EMA."""
    key = f"per_class{a.per_class}-drift{a.drift_n * with_drift}-steps{a.sample_steps}-cfg{a.cfg_scale}"

    def measure():
        model, args = load_model(run_dir, "cpu")
        out = evaluate_shapes(model, make_diffusion(args), args, a.per_class, "cpu", cfg_scale=a.cfg_scale,
                              steps=a.sample_steps)
        if with_drift:
            out.update(drift(model, args, a.drift_n, a.cfg_scale, a.sample_steps))
        return out
    return measured(run_dir, key, measure)


@torch.no_grad()
def heldout_loss(run_dir, n=256, levels=8, seed=999, weights="model", null=False, per_level=False):
    """The velocity loss of a run's `weights` ("model": the final weights; "ema") on n images of a dataset the run
    never saw, at `levels` fixed noise levels t = (i + 0.5) / levels with fixed noise: the same inputs for every
    variant, so differences are the models'. A text model reads each image's caption in a wording it never saw in
    training (shapes.HELDOUT_TEMPLATES, in turn). null=True gives every image the null condition instead: the null
    loss minus the conditional one is how much the model uses the condition. per_level: the loss at each level."""
    ckpt = read_checkpoint(last_ckpt(run_dir))
    args = argparse.Namespace(**ckpt["args"])
    model = make_model(args)
    model.load_state_dict(ckpt[weights])
    model.eval()
    data = build_dataset("shapes", args.res, seed=seed, size=n)
    g = torch.Generator().manual_seed(seed)
    total = np.zeros(levels)
    for start in range(0, n, 64):
        idx = range(start, min(start + 64, n))
        items = [data[i] for i in idx]
        x0 = Autoencoder("none").encode(torch.stack([it[0] for it in items]))
        labels = [it[1] for it in items]
        prompts = [HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)].format(
            colour=data.scenes[i]["colour"], shape=SHAPE_NAMES[data.scenes[i]["label"]]) for i in idx]
        y = semantic_input(args, labels, "cpu", prompts)
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
    """Per-level held-out losses (t ascending) -> the mean, and the means over the cleaner and the noisier half."""
    half = len(losses) // 2
    return dict(heldout=float(np.mean(losses)), heldout_low=float(np.mean(losses[:half])),
                heldout_high=float(np.mean(losses[half:])))


def text_losses(run_dir):
    """Held-out-wording loss of a text model's EMA, and how much lower it is than with the null prompt."""
    caption, null = heldout_loss(run_dir, weights="ema"), heldout_loss(run_dir, weights="ema", null=True)
    return dict(caption_loss=caption, caption_gain=null - caption)


#################################################################################
#                                      Tables                                   #
#################################################################################

def mean_spread(values):
    v = np.array(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def save_table(a, name, rows, md):
    """NAME.json (the rows) and NAME.md (the table, printed too) under --docs; returns the Markdown."""
    os.makedirs(a.docs, exist_ok=True)
    with open(os.path.join(a.docs, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(a.docs, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return md


def write_table(a, name, rows, columns, note):
    """rows: list of dicts (per variant: column -> str, and 'per_seed' -> raw numbers). Writes NAME.json and NAME.md
    under --docs; returns the Markdown."""
    md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for r in rows:
        md += "| " + " | ".join(str(r[c]) for c in columns) + " |\n"
    return save_table(a, name, rows, md + "\n" + note + "\n")


def summarise(variants, columns):
    """variants: {name: [per-seed dict]} -> table rows with mean ± std over seeds per column (label -> key)."""
    rows = []
    for name, per_seed in variants.items():
        row = {"variant": name}
        for label, key in columns.items():
            row[label] = mean_spread([m[key] for m in per_seed])
        row["per_seed"] = per_seed
        rows.append(row)
    return rows


def budget_note(a, run_dirs, measurements, command):
    info = [run_info(r) for r in run_dirs]
    train_s, eval_s = sum(i["wall_s"] for i in info), sum(m["wall_s"] for m in measurements)
    devices = sorted({i.get("device", "unknown") for i in info})
    return (f"`{command}` -- {len(run_dirs)} runs on {', '.join(devices)}; wall time: training {train_s / 60:.0f} min "
            f"in all ({train_s / len(run_dirs):.0f} s per run), measuring {eval_s / 60:.1f} min. "
            f"Mean ± std over seeds {','.join(map(str, a.seeds))} (std over seeds, not a confidence interval).")


def class_command(a, experiment):
    variants = f" --variants '{','.join(a.variants)}'" if a.variants else ""
    return (f"python experiments.py {experiment}{variants} --seeds {','.join(map(str, a.seeds))} --steps {a.steps} "
            f"--shapes-size {a.shapes_size}")


#################################################################################
#                     The comparisons: routes, gates, padding                   #
#################################################################################

ROUTES = {"ours": [], "adaln (DiT)": ["--cond", "adaln"], "xattn (PixArt-α)": ["--cond", "xattn"],
          "mmdit (SD3)": ["--cond", "mmdit"]}
GATE_VARIANTS = {  # --cond ours throughout; the default gates only the size group
    "ungated": ["--gate-size", "none", "--gate-crop", "none", "--gate-flip", "none"],
    "size cosine (default)": [],
    "all cosine": ["--gate-size", "cosine", "--gate-crop", "cosine", "--gate-flip", "cosine"],
}
PADDINGS = {"noisy_replicate (default)": ["--cond-type", "text"],
            "replicate": ["--cond-type", "text", "--text-pad", "replicate"],
            "zero": ["--cond-type", "text", "--text-pad", "zero"]}
CLASS_COLUMNS = {"class acc": "class_acc", "flip acc": "flip_acc", "crop error (px)": "crop_err",
                 "size acc": "size_acc", "size drift: class": "size_drift_class",
                 "size drift: colour": "size_drift_colour", "crop drift: class": "crop_drift_class",
                 "crop drift: colour": "crop_drift_colour", "train loss (last)": "train_loss"}
TEXT_COLUMNS = {"class + colour acc": "class_colour_acc", "class acc": "class_acc", "colour acc": "colour_acc",
                "flip acc": "flip_acc", "held-out loss": "caption_loss", "null − caption loss": "caption_gain",
                "train loss (last)": "train_loss"}


def run_flags(a, seed):
    """What every experiment run shares: shapes data, its seed, the loss-curve resolution, and no end-of-run work
    (the experiment measures it)."""
    return ["--dataset", "shapes", "--shapes-size", str(a.shapes_size), "--seed", str(seed), "--log-every",
            str(a.log_every), "--eval-per-class", "0", "--sample-every", "-1", "--ckpt-every", "100000"]


def flag_tag(flags):
    """A variant's flags as a name for its run folder and records: ["--cond", "adaln"] -> "cond-adaln"."""
    return "-".join(f.lstrip("-") for f in flags) or "default"


def shapes_run(a, flags, seed):
    """The run of one variant and seed: the shapes preset with the experiment's budget (same data and order for
    every variant of a seed)."""
    return run(f"shapes/{flag_tag(flags)}-{a.steps}st-s{seed}", run_flags(a, seed) + ["--steps", str(a.steps)] + flags,
               a.out)


def compare(a, name, variants, columns, title, text=False):
    results, dirs = {}, []
    if a.variants:  # a subset, e.g. to split one comparison over two processes
        unknown = set(a.variants) - set(variants)
        if unknown:
            raise SystemExit(f"--variants {','.join(sorted(unknown))}: {name} has {', '.join(variants)}")
        variants = {v: f for v, f in variants.items() if v in a.variants}
    for variant, flags in variants.items():  # variant-major: a variant's seeds finish together
        results[variant] = []
        for seed in a.seeds:
            run_dir = shapes_run(a, flags, seed)
            dirs.append(run_dir)
            losses = train_losses(run_dir)
            m = checker_metrics(run_dir, a, with_drift=not text)
            if text:
                m = dict(m, **measured(run_dir, "text_losses256x8", lambda: text_losses(run_dir)))
            results[variant].append(dict(m, seed=seed, run_dir=run_dir, train_loss=losses[max(losses)],
                                         curve=losses))
    rows = summarise(results, columns)
    budget = budget_note(a, dirs, [m for r in results.values() for m in r], class_command(a, name))
    note = (f"{title} {budget} Shapes preset (XS/4, 24 px pixel space), "
            f"{a.steps} steps of batch 64 per run. Checker on EMA samples ({a.sample_steps} Euler steps, guidance "
            f"{a.cfg_scale}): {a.per_class} seeds per class, each drawn unmirrored and mirrored, random crops")
    note += (". Accuracies are on prompts in wordings the model never saw in training; held-out loss: the EMA's "
             "velocity loss on 256 unseen images x 8 fixed noise levels, captioned in those wordings; "
             "null − caption: the same with the null prompt, minus it (how much the caption is used)."
             if text else f"; drift over {a.drift_n} (noise, class) pairs, sizes {SIZE_SWEEP} x res, crops at the "
             "top-left, centre and bottom-right. Train loss: the mean over the last --log-every steps.")
    write_table(a, name, rows, ["variant"] + list(columns), note)
    return results


def routes(a):
    return compare(a, "routes", ROUTES, CLASS_COLUMNS, "Conditioning routes, same budget.")


def gates(a):
    return compare(a, "gates", GATE_VARIANTS, CLASS_COLUMNS, "Control gates g(t) of `--cond ours`.")


def padding(a):
    return compare(a, "padding", PADDINGS, TEXT_COLUMNS, "Text padding (`--cond-type text`, built-in encoder).",
                   text=True)


#################################################################################
#                 Each published recipe, as one command, on shapes              #
#################################################################################

def recipes(a):
    """`train.py --recipe NAME` for every recipe on shapes, at the experiment's budget and the preset's batch (the
    recipes' own batches are 4-16x larger), then the checker with the recipe's own sampler, steps and guidance."""
    from config import RECIPES
    rows, dirs, measurements = [], [], []
    for name in RECIPES:
        if a.variants and name not in a.variants:  # a subset, e.g. one process per recipe
            continue
        per_seed = []
        for seed in a.seeds:
            flags = ["--recipe", name, "--batch", "64"] + (["--model", "XS"] if name == "ldm" else [])
            run_dir = shapes_run(a, flags, seed)
            dirs.append(run_dir)

            def measure():
                model, args = load_model(run_dir, "cpu")
                grade = lambda: evaluate_shapes(model, make_diffusion(args), args, a.per_class, "cpu",
                                                cfg_scale=args.cfg_scale, steps=args.sample_steps, method=args.sampler)
                out = dict(grade(), sampler=args.sampler or ("euler" if args.objective == "flow" else "ddim"),
                           sample_steps=args.sample_steps, cfg_scale=args.cfg_scale)
                model.load_state_dict(read_checkpoint(last_ckpt(run_dir))["model"])  # the trained weights: at a
                out["trained_class_acc"] = grade()["class_acc"]  # short budget an EMA of 0.9999 is mostly the init
                return out
            m = measured(run_dir, f"recipe-eval-ema-and-trained-per_class{a.per_class}", measure)
            losses = train_losses(run_dir)
            measurements.append(m)
            per_seed.append(dict(m, seed=seed, run_dir=run_dir, train_loss=losses[max(losses)]))
        rows.append({"recipe": name, "train loss (last)": mean_spread([m["train_loss"] for m in per_seed]),
                     "class acc (EMA)": mean_spread([m["class_acc"] for m in per_seed]),
                     "class acc (trained weights)": mean_spread([m["trained_class_acc"] for m in per_seed]),
                     "flip acc (EMA)": mean_spread([m["flip_acc"] for m in per_seed]),
                     "evaluated with": f"{per_seed[0]['sampler']} {per_seed[0]['sample_steps']} steps, guidance "
                                       f"{per_seed[0]['cfg_scale']:g}", "per_seed": per_seed})
    subset = f" --variants {','.join(a.variants)}" if a.variants else ""
    command = (f"python experiments.py recipes{subset} --seeds {','.join(map(str, a.seeds))} --steps {a.steps} "
               f"--shapes-size {a.shapes_size} --per-class {a.per_class}")
    note = (f"Each recipe as `train.py --recipe NAME --batch 64` (ldm: `--model XS`) on shapes: XS/4 at 24 px (small: 32 px, its own), "
            f"{a.steps} steps. {budget_note(a, dirs, measurements, command)} Checker on EMA samples (the ldm "
            f"recipe has no EMA: its trained weights), {a.per_class} seeds per class x 2 flips, with each recipe's own "
            f"evaluation sampler. The loss is each recipe's own objective (flow: velocity MSE; ddpm: eps MSE, + the "
            f"VLB term with a learned variance, x min-SNR weights for mdt; mdt sums its masked and unmasked passes), so "
            f"losses compare only within an objective.")
    note += (" At this budget the recipes' EMA decays (0.9999 without warm-up for dit, pixart, mdt) still hold mostly "
             "the initial weights and their 1000-step warm-ups (ours, pixart, sd3) have not ended, hence both columns:"
             " they show that each recipe runs as published, not how it ranks at convergence.")
    write_table(a, "recipes", rows, ["recipe", "train loss (last)", "class acc (EMA)", "class acc (trained weights)",
                                     "flip acc (EMA)", "evaluated with"], note)
    return rows


#################################################################################
#            Drift at convergence, with class <-> size correlated data          #
#################################################################################
# The paper's Figure 2: on real data the original size correlates with the content, so a model that adds the size and
# the class into one embedding can change *what* it draws when only the size condition changes. Here every run is
# trained to the budget where `ours` reads >= 0.9 of its classes right (the default preset's 2000 steps), on shapes
# whose size is independent of the class (rho = 0) or correlated with it (--size-corr rho: even classes mostly small
# originals, odd ones mostly large). Each finished run's per-pair readings are written to a JSON file under
# docs/experiments/drift_runs/ (committed), so a comparison can be finished over several sessions or machines and a
# rerun only assembles; the intervals are a bootstrap over seeds and, within each, over (noise, class) pairs.

from shapes import size_group  # noqa: E402  (kept beside the experiment that uses it)

DRIFT_VARIANTS = dict(ROUTES)
DRIFT_GATES = {  # at high rho, --cond ours; the default gates only the size group
    "ungated": ["--gate-size", "none", "--gate-crop", "none", "--gate-flip", "none"],
    "size cosine (default)": [],
    "all cosine": ["--gate-size", "cosine", "--gate-crop", "cosine", "--gate-flip", "cosine"],
    "size linear": ["--gate-size", "linear"],
}
DRIFT_METRICS = {  # name -> what one (noise, class) pair contributes
    "class acc": "fraction of the pair's sweep images read as the requested class",
    "size acc": "1 if the image at original size 2 res is sharper than at 0.5 res",
    "class drift": "1 if the class read back is not the same at every size",
    "colour drift": "1 if the colour read back is not the same at every size",
    "pulled": "1 if, at the extreme size typical of the other class group, the image is read as a class of that group",
    "pulled (same-size base)": "1 if, at the extreme size typical of its own group, the image is read as a class of "
                               "the other group: the confusion rate without a push from the size condition",
}


@torch.no_grad()
def size_sweep_pairs(model, args, n, cfg_scale, steps, ctrl_scale=0.0, seed=20_000):
    """n (noise, class) pairs (classes in turn), each sampled at every original size of SIZE_SWEEP with the same noise,
    everything else at the sampling default; returns per pair the DRIFT_METRICS values (0 / 1 or a fraction)."""
    controls = size_controls(args.res, SIZE_SWEEP)
    k = len(controls)
    labels = [i % args.num_classes for i in range(n)]
    noise = make_noise([seed + i for i in range(n)], latent_shape(args), "cpu").repeat_interleave(k, 0)
    y = semantic_input(args, [lab for lab in labels for _ in controls], "cpu")
    x = generate(model, make_diffusion(args), noise, y, torch.stack(controls * n), cfg_scale, ctrl_scale, steps=steps)
    meas = ShapesChecker()(to_uint8(Autoencoder("none").decode(x)))
    pairs = []
    for i, c in enumerate(labels):
        sweep = meas[i * k:(i + 1) * k]  # small (0.5 res) .. large (2 res) original
        ends = {0: sweep[0], 1: sweep[-1]}  # the size group each extreme is typical of -> the reading there
        own, other = size_group(c), 1 - size_group(c)
        pairs.append({"class acc": float(np.mean([m["label"] == c for m in sweep])),
                      "size acc": float(sweep[-1]["sharpness"] > sweep[0]["sharpness"]),
                      "class drift": float(len({m["label"] for m in sweep}) > 1),
                      "colour drift": float(len({m["colour"] for m in sweep}) > 1),
                      "pulled": float(size_group(ends[other]["label"]) == other),
                      "pulled (same-size base)": float(size_group(ends[own]["label"]) == other)})
    return pairs


def resampled_means(per_seed, rng, n):
    """n bootstrap means of per_seed, a list (seeds) of lists (pairs) of values: seeds drawn with replacement, then
    the pairs within each drawn seed."""
    arrays = [np.asarray(v, dtype=np.float64) for v in per_seed]
    stats = np.empty(n)
    for b in range(n):
        drawn = [arrays[i] for i in rng.integers(len(arrays), size=len(arrays))]
        stats[b] = np.mean(np.concatenate([v[rng.integers(len(v), size=len(v))] for v in drawn]))
    return stats


def bootstrap(per_seed, n=2000, seed=0):
    """per_seed: a list (seeds) of lists (pairs) of values -> mean, 95 % interval and the per-seed means."""
    lo, hi = np.percentile(resampled_means(per_seed, np.random.default_rng(seed), n), [2.5, 97.5])
    return dict(mean=float(np.mean(np.concatenate(per_seed))), lo=float(lo), hi=float(hi),
                per_seed=[float(np.mean(v)) for v in per_seed])


def bootstrap_difference(first, second, n=2000, seed=0):
    """mean(first) - mean(second) and its 95 % interval, each side resampled on its own (they are separate runs):
    an effect against its uncertainty, where two overlapping intervals would leave it open."""
    rng = np.random.default_rng(seed)
    lo, hi = np.percentile(resampled_means(first, rng, n) - resampled_means(second, rng, n), [2.5, 97.5])
    return dict(mean=float(np.mean(np.concatenate(first)) - np.mean(np.concatenate(second))), lo=float(lo),
                hi=float(hi))


def committed_record(path, key):
    """The record committed at `path` (None when there is none), refused if it was measured with other settings."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record["key"] != key:
        raise SystemExit(f"{path} was measured with {record['key']}, not {key}: move it aside to remeasure")
    return record


def commit_record(path, record):
    """Write a run's record atomically (a stopped process leaves the old file or none, never half of one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return record


def drift_path(a, flags, corr, seed):
    return os.path.join(a.docs, "drift_runs", f"{flag_tag(flags)}-rho{corr:g}-{a.steps}st-s{seed}.json")


def drift_record(a, flags, corr, seed, scales=(0.0,)):
    """The committed measurements of one run (variant flags, rho, seed) at these control guidance scales, training
    and measuring what is missing (a scale not measured yet needs the run folder of this machine)."""
    path = drift_path(a, flags, corr, seed)
    key = dict(flags=flags, corr=corr, steps=a.steps, seed=seed, shapes_size=a.shapes_size, pairs=a.drift_pairs,
               sample_steps=a.sample_steps, cfg_scale=a.cfg_scale, per_class=a.per_class)
    record = committed_record(path, key)
    missing = [s for s in scales if record is None or str(s) not in record["ctrl_scales"]]
    if not missing:
        return record
    run_dir = shapes_run(a, flags + (["--size-corr", f"{corr:g}"] if corr else []), seed)  # trained once per folder
    model, args = load_model(run_dir, "cpu")
    t0 = time.time()
    if record is None:
        losses = train_losses(run_dir)
        record = dict(key=key, train=dict(run_info(run_dir), loss_last=losses[max(losses)]), ctrl_scales={},
                      eval=evaluate_shapes(model, make_diffusion(args), args, a.per_class, "cpu",
                                           cfg_scale=a.cfg_scale, steps=a.sample_steps))
    record["ctrl_scales"].update({str(s): size_sweep_pairs(model, args, a.drift_pairs, a.cfg_scale, a.sample_steps, s)
                                  for s in missing})
    record["measure_s"] = record.get("measure_s", 0) + time.time() - t0
    return commit_record(path, record)


def committed_seeds(a, flags, corr, scale):
    """--assemble: the seeds whose record at this scale is committed (nothing is trained or measured)."""
    paths = {s: drift_path(a, flags, corr, s) for s in a.seeds}
    def has(path):
        with open(path) as f:
            return str(scale) in json.load(f)["ctrl_scales"]
    return [s for s, p in paths.items() if os.path.exists(p) and has(p)]


def drift_rows(a, variants, corrs, scale=0.0):
    """One row per (variant, rho): every DRIFT_METRICS value at control guidance `scale`, with intervals. With
    --assemble, from the committed records alone (a row has the seeds that are there, or is left out)."""
    rows = []
    for corr in corrs:
        for variant, flags in variants.items():
            seeds = committed_seeds(a, flags, corr, scale) if a.assemble else a.seeds
            if not seeds:
                continue
            records = [drift_record(a, flags, corr, seed, [scale]) for seed in seeds]
            metrics = {m: bootstrap([[p[m] for p in r["ctrl_scales"][str(scale)]] for r in records])
                       for m in DRIFT_METRICS}
            metrics["checker class acc"] = dict(mean=float(np.mean([r["eval"]["class_acc"] for r in records])),
                                                per_seed=[r["eval"]["class_acc"] for r in records])
            rows.append(dict(variant=variant, corr=corr, steps=a.steps, seeds=seeds, ctrl_scale=scale,
                             metrics=metrics, train_s=[r["train"]["wall_s"] for r in records],
                             measure_s=[r["measure_s"] for r in records],
                             device=sorted({r["train"]["device"] for r in records})))
    return rows


def interval(m):
    return f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]" if "lo" in m else f"{m['mean']:.3f}"


def drift_table(a, name, rows, first, note):
    """rows -> NAME.json (the rows) and NAME.md (a table, intervals in brackets) under --docs."""
    names = ["checker class acc"] + list(DRIFT_METRICS)
    first = dict(first, seeds=lambda r: ",".join(map(str, r["seeds"])))
    md = "| " + " | ".join(list(first) + names) + " |\n|" + "---|" * (len(first) + len(names)) + "\n"
    for r in rows:
        md += "| " + " | ".join([str(f(r)) for f in first.values()] + [interval(r["metrics"][m]) for m in names]) + " |\n"
    def minutes(field):  # each run once, though several rows (control scales) may read it
        return sum({(r["variant"], r["corr"], s): t for r in rows for s, t in zip(r["seeds"], r[field])}.values()) / 60
    md += (f"\n{note} `{drift_command(a)}`; training {minutes('train_s'):.0f} min and measuring "
           f"{minutes('measure_s'):.0f} min of {', '.join(sorted({d for r in rows for d in r['device']}))} "
           f"for these rows (runs shared between tables counted in each). Mean over each row's seeds x "
           f"{a.drift_pairs} (noise, class) pairs each, [95 % bootstrap interval over seeds and pairs; with one seed, "
           f"over pairs only]; checker class acc: shapes.evaluate_shapes at the default control ({a.per_class} seeds "
           f"per class, x2 flips), mean of seeds. Sweep: original size {', '.join(f'{f:g}' for f in SIZE_SWEEP)} x res, same noise, "
           f"{a.sample_steps} Euler steps, guidance {a.cfg_scale}. " +
           " ".join(f"*{k}*: {v}." for k, v in DRIFT_METRICS.items()) + "\n")
    save_table(a, name, rows, md)
    return rows


def drift_command(a):
    subset = "".join(f" --{flag} '{','.join(v)}'" for flag, v in (("variants", a.variants),
                                                                   ("gate-variants", a.gate_variants)) if v)
    subset += " --assemble" if a.assemble else ""
    return (f"python experiments.py drift{subset} --seeds {','.join(map(str, a.seeds))} --steps {a.steps} --corrs "
            f"{','.join(f'{c:g}' for c in a.corrs)} --shapes-size {a.shapes_size} --drift-pairs {a.drift_pairs}")


def drift_experiment(a):
    """Routes at rho = 0 and high rho, then at the highest rho the gate schedules of ours and its control guidance."""
    routes = {v: f for v, f in DRIFT_VARIANTS.items() if not a.variants or v in a.variants}
    rows = drift_rows(a, routes, a.corrs)
    drift_table(a, "drift", rows, {"variant": lambda r: r["variant"], "rho": lambda r: f"{r['corr']:g}"},
                f"Semantic drift when only the size condition changes, {a.steps} steps per run.")
    shown = ["class acc", "size acc", "class drift", "colour drift", "pulled"]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    plot_bars(os.path.join(a.docs, "drift.png"), f"Only the size condition changes: {a.steps} steps, seeds "
              f"{','.join(map(str, seeds))} (per row: the table), means with 95 % bootstrap intervals", rows, shown)
    high = max(a.corrs)
    pair = {f"{v.split(' (')[0]}, rho {high:g}, seed {a.seeds[0]}": drift_record(a, DRIFT_VARIANTS[v], high,
                                                                              a.seeds[0])["train"]["run_dir"]
            for v in ("ours", "adaln (DiT)") if v in routes
            and (not a.assemble or a.seeds[0] in committed_seeds(a, DRIFT_VARIANTS[v], high, 0.0))}
    if len(pair) == 2 and all(os.path.isdir(d) for d in pair.values()):  # the run folders of this machine
        size_sweep_figure(a, pair, os.path.join(a.docs, "drift_size_sweep.png"))
    if a.variants and "ours" not in a.variants:
        return rows
    gates = {v: f for v, f in DRIFT_GATES.items() if not a.gate_variants or v in a.gate_variants}
    if len(gates) > 1:  # a comparison; --gate-variants with one name leaves the gates out
        gate_rows = drift_rows(a, gates, [high])
        drift_table(a, "drift_gates", gate_rows, {"gates of ours": lambda r: r["variant"]},
                    f"Gate schedules g(t) of `--cond ours` at rho = {high:g}.")
        plot_bars(os.path.join(a.docs, "drift_gates.png"), f"Gate schedules of ours, rho = {high:g}, {a.steps} steps "
                  "(seeds per row: the table), means with 95 % bootstrap intervals", gate_rows,
                  ["class acc", "class drift", "colour drift", "pulled"])
        drift_contrasts(a, rows, gate_rows)
    scales = [r for s in a.ctrl_scales for r in drift_rows(a, {"ours": []}, [high], s)]
    if not scales:
        return rows
    drift_table(a, "drift_ctrl_scale", scales, {"--ctrl-scale": lambda r: f"{r['ctrl_scale']:g}"},
                f"Control guidance scale of `--cond ours` at rho = {high:g} (size accuracy against drift).")
    plot_against(os.path.join(a.docs, "drift_ctrl_scale.png"), f"--cond ours at rho = {high:g}: control guidance",
                 scales, "ctrl_scale", ["size acc", "class drift", "colour drift", "pulled"], "--ctrl-scale")
    return rows


CONTRASTED = ("class drift", "colour drift", "pulled")


def drift_contrasts(a, rows, gate_rows):
    """Each route against `ours` at the same rho, each gate schedule against the default: the difference of the
    drift rates with its 95 % bootstrap interval (drift_contrasts.md / .json). A difference whose interval excludes
    0 is an effect these runs resolve."""
    def values(flags, row, metric):  # per seed, per pair, at control scale 0 (records are read, never trained)
        return [[p[metric] for p in drift_record(a, flags, row["corr"], s)["ctrl_scales"]["0.0"]]
                for s in row["seeds"]]
    pairs = [(r, DRIFT_VARIANTS[r["variant"]], base, []) for r in rows if r["variant"] != "ours"
             for base in rows if base["variant"] == "ours" and base["corr"] == r["corr"]]
    default = next((g for g in gate_rows if g["variant"] == "size cosine (default)"), None)
    pairs += [(g, DRIFT_GATES[g["variant"]], default, []) for g in gate_rows if default and g is not default]
    out = [dict(comparison=f"{r['variant']} − {base['variant']}", corr=r["corr"], seeds=[r["seeds"], base["seeds"]],
                metrics={m: bootstrap_difference(values(flags, r, m), values(base_flags, base, m)) for m in CONTRASTED})
           for r, flags, base, base_flags in pairs]
    md = "| comparison | rho | seeds | " + " | ".join(CONTRASTED) + " |\n|" + "---|" * (len(CONTRASTED) + 3) + "\n"
    for c in out:
        md += (f"| {c['comparison']} | {c['corr']:g} | {','.join(map(str, c['seeds'][0]))} vs "
               f"{','.join(map(str, c['seeds'][1]))} | " + " | ".join(interval(c["metrics"][m]) for m in CONTRASTED)
               + " |\n")
    md += (f"\nDifferences of drift rates (the first minus the second), each from the committed records of the tables "
           f"drift.md and drift_gates.md: `{drift_command(a)}`. [95 % bootstrap interval: each side resampled over "
           f"its own seeds, then pairs]; an interval that excludes 0 is a difference these runs resolve.\n")
    save_table(a, "drift_contrasts", out, md)
    return out


def padding_path(a, flags, seed):
    return os.path.join(a.docs, "padding_runs", f"{flag_tag(flags)}-{a.steps}st-s{seed}.json")


def padding_record(a, flags, seed):
    """The committed measurements of one text run at the drift budget: each checker sample's outcome on held-out
    wordings, and the held-out caption loss (text_losses), training and measuring it if missing."""
    path = padding_path(a, flags, seed)
    key = dict(flags=flags, steps=a.steps, seed=seed, shapes_size=a.shapes_size, per_class=a.per_class,
               sample_steps=a.sample_steps, cfg_scale=a.cfg_scale)
    record = committed_record(path, key)
    if record is not None:
        return record
    run_dir = shapes_run(a, flags, seed)
    model, args = load_model(run_dir, "cpu")
    t0 = time.time()
    losses = train_losses(run_dir)
    record = dict(key=key, train=dict(run_info(run_dir), loss_last=losses[max(losses)]),
                  eval=evaluate_shapes(model, make_diffusion(args), args, a.per_class, "cpu", cfg_scale=a.cfg_scale,
                                       steps=a.sample_steps, per_sample=True), losses=text_losses(run_dir))
    record["measure_s"] = time.time() - t0
    return commit_record(path, record)


def padding_converged(a):
    """Text padding at the drift budget (2000 steps, where shape words are learned), 3 seeds, 95 % intervals. With
    --assemble, from the committed records alone: each row has the seeds that are there, or is left out."""
    rows, both_right = [], {}  # variant -> per seed, per sample: shape and colour read right
    for variant, flags in PADDINGS.items():
        if a.variants and variant not in a.variants:
            continue
        seeds = [s for s in a.seeds if os.path.exists(padding_path(a, flags, s))] if a.assemble else a.seeds
        if not seeds:
            continue
        records = [padding_record(a, flags, seed) for seed in seeds]
        samples = [r["eval"]["per_sample"] for r in records]
        both_right[variant] = [np.logical_and(s["class_ok"], s["colour_ok"]) for s in samples]
        metrics = {"class + colour acc": bootstrap(both_right[variant]),
                   "class acc": bootstrap([s["class_ok"] for s in samples]),
                   "colour acc": bootstrap([s["colour_ok"] for s in samples]),
                   "null − caption loss": bootstrap([[r["losses"]["caption_gain"]] for r in records])}
        rows.append(dict(variant=variant, steps=a.steps, seeds=seeds, metrics=metrics,
                         train_s=[r["train"]["wall_s"] for r in records],
                         device=sorted({r["train"]["device"] for r in records})))
    default = next((v for v in both_right if "(default)" in v), None)
    for r in rows:  # the effect of each padding against the default's, with the interval of the difference
        if default and r["variant"] != default:
            r["vs_default"] = bootstrap_difference(both_right[r["variant"]], both_right[default])
    names = list(rows[0]["metrics"]) if rows else []
    md = "| padding | seeds | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2) + "\n"
    for r in rows:
        md += (f"| {r['variant']} | {','.join(map(str, r['seeds']))} | "
               + " | ".join(interval(r["metrics"][m]) for m in names) + " |\n")
    md += "".join(f"\n{r['variant']} − {default}, class + colour acc: {interval(r['vs_default'])}" for r in rows
                  if "vs_default" in r) + ("\n" if default and len(rows) > 1 else "")
    md += (f"\n`python experiments.py padding-converged{' --assemble' if a.assemble else ''} --seeds "
           f"{','.join(map(str, a.seeds))} --steps {a.steps} --shapes-size {a.shapes_size}`; training {sum(sum(r['train_s']) for r in rows) / 60:.0f} min. Mean "
           f"[95 % bootstrap interval over seeds, then samples]: {a.per_class} seeds per class x 2 flips on prompts "
           f"in wordings never seen in training; null − caption loss: per seed, so its interval is over seeds only.\n")
    save_table(a, "padding_converged", rows, md)
    return rows


#################################################################################
#                       32 -> 64 px resolution transfer                         #
#################################################################################

TRANSFER = {  # variant -> flags of the 64 px stage (all from the same 32 px model, except scratch)
    "resample + shift (paper)": ["--pos-mode", "resample"],
    "resample, no shift": ["--pos-mode", "resample", "--res-shift", "off"],
    "extend + shift": ["--pos-mode", "extend"],
    "extend, no shift": ["--pos-mode", "extend", "--res-shift", "off"],
}
SCRATCH = {"from scratch (resample + shift)": ["--pos-mode", "resample"]}  # with --scratch


def transfer(a):
    variants = dict(TRANSFER, **(SCRATCH if a.scratch else {}))
    dirs, results = [], {v: [] for v in variants}
    for seed in a.seeds:
        base = run(f"transfer/base-32px-{a.base_steps}st-s{seed}",
                   run_flags(a, seed) + ["--res", "32", "--base-res", "32", "--steps", str(a.base_steps)], a.out)
        dirs.append(base)
        for variant, flags in variants.items():
            init = [] if variant.startswith("from scratch") else ["--init-from", last_ckpt(base)]
            tag = re.sub(r"[^a-z]+", "-", variant.split(" (")[0]).strip("-")
            ft = run(f"transfer/ft-64px-{tag}-{a.base_steps}-{a.ft_steps}st-b{a.ft_batch}-s{seed}",
                     run_flags(a, seed) + ["--res", "64", "--base-res", "32", "--steps", str(a.ft_steps), "--warmup",
                                           str(a.ft_warmup), "--batch", str(a.ft_batch)] + flags + init, a.out)
            dirs.append(ft)
            log = train_losses(ft)
            m = measured(ft, "heldout256x8-levels", lambda: split_levels(heldout_loss(ft, per_level=True)))
            results[variant].append(dict(m, seed=seed, train_last=log[max(log)], train_first=log[min(log)]))
    columns = {"held-out loss": "heldout", "held-out, t < 0.5": "heldout_low", "held-out, t > 0.5": "heldout_high",
               "train loss, first": "train_first", "train loss, last": "train_last"}
    rows = summarise(results, columns)
    command = (f"python experiments.py transfer --seeds {','.join(map(str, a.seeds))} --base-steps {a.base_steps} "
               f"--ft-steps {a.ft_steps} --ft-batch {a.ft_batch} --shapes-size {a.shapes_size}")
    budget = budget_note(a, dirs, [m for r in results.values() for m in r], command)
    note = (f"32 -> 64 px. {budget} Shapes preset (XS/4, pixel space, x-prediction, "
            f"shift 3 at the 32 px base): {a.base_steps} steps at 32 px, then {a.ft_steps} steps of batch "
            f"{a.ft_batch} at 64 px (4x the tokens) per variant with the same seed and data order. `shift` scales "
            f"the noise shift by sqrt(4) = 2 at 64 px; `no shift` keeps 3 (`--res-shift off`). Held-out loss: final "
            f"weights, 256 unseen images x 8 fixed noise levels t = 1/16 .. 15/16 with fixed noise, in all and per "
            f"half: one yardstick for every variant, not the sample quality the shift aims at. "
            f"Train loss: mean over the first and the last {a.log_every} steps (each on its own t distribution).")
    write_table(a, "transfer", rows, ["variant"] + list(columns), note)
    return results


#################################################################################
#                                      Figures                                  #
#################################################################################
# Plots with matplotlib, an optional dependency imported only here (`pip install matplotlib`; in
# requirements-dev.txt for the tests); the sample grids are pasted together with PIL.

def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the figures need matplotlib: pip install matplotlib (the tables are written without it)")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path, title, curves, ylabel="training loss"):
    """curves: {label: {step: value}} -> a line plot (log-scale y), 640 x 400 px."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, c in curves.items():
        steps = sorted(c)
        ax.plot(steps, [c[s] for s in steps], label=label, lw=1.5)
    ax.set(yscale="log", xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(path, title, rows, metrics, group="corr", group_label="rho = {:g}"):
    """rows (drift_rows): one panel per metric, a bar per variant and group (e.g. rho) with its 95 % interval."""
    if not rows:  # nothing committed for this table yet
        return None
    plt = pyplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = list(dict.fromkeys(r[group] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.4), dpi=100, squeeze=False)
    width = 0.8 / len(groups)
    for ax, metric in zip(axes[0], metrics):
        for j, g in enumerate(groups):
            cells = [next((r["metrics"][metric] for r in rows if r["variant"] == v and r[group] == g), None)
                     for v in variants]
            xs = [i + (j - (len(groups) - 1) / 2) * width for i, c in enumerate(cells) if c]
            m = [c["mean"] for c in cells if c]
            err = [[c["mean"] - c["lo"] for c in cells if c], [c["hi"] - c["mean"] for c in cells if c]]
            ax.bar(xs, m, width, yerr=err, capsize=3, label=group_label.format(g))
        ax.set_xticks(range(len(variants)), [v.split(" (")[0] for v in variants], rotation=30, fontsize=8)
        ax.set_title(metric, fontsize=9)
        top = max((r["metrics"][metric]["hi"] for r in rows), default=1.0)  # rates near 0 stay readable
        ax.set_ylim(0, 1 if "acc" in metric else min(1.0, max(0.05, 1.25 * top)))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_against(path, title, rows, key, metrics, xlabel):
    """rows: one per value of `key` (e.g. the control guidance scale) -> each metric's mean and 95 % band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    xs = [r[key] for r in rows]
    for metric in metrics:
        cells = [r["metrics"][metric] for r in rows]
        ax.plot(xs, [c["mean"] for c in cells], marker="o", label=metric)
        ax.fill_between(xs, [c["lo"] for c in cells], [c["hi"] for c in cells], alpha=0.2)
    ax.set(xlabel=xlabel, ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def mean_curve(per_seed):
    """The loss curve averaged over seeds (steps every seed logged)."""
    steps = set.intersection(*[set(m["curve"]) for m in per_seed])
    return {int(s): float(np.mean([m["curve"][s] for m in per_seed])) for s in sorted(steps)}


@torch.no_grad()
def size_sweep_figure(a, run_dirs, path, classes=(0, 2, 5, 6, 7, 9), factors=(0.5, 0.7, 1.0, 1.4, 2.0),
                      seed=30_000, scale=3):
    """One panel per model (run_dirs: {label: run folder}); rows = classes, each with its own fixed noise;
    columns = the size condition (original side / res). Only the size condition changes along a row."""
    from PIL import Image, ImageDraw
    panels = []
    for label, run_dir in run_dirs.items():
        model, args = load_model(run_dir, "cpu")
        ctrl = size_controls(args.res, factors)
        noise = make_noise([seed + k for k in classes], latent_shape(args), "cpu")
        x = generate(model, make_diffusion(args), noise.repeat_interleave(len(factors), 0),
                     semantic_input(args, [k for k in classes for _ in factors], "cpu"),
                     torch.stack(ctrl * len(classes)), a.cfg_scale, steps=a.sample_steps)
        imgs = to_uint8(Autoencoder("none").decode(x)).permute(0, 2, 3, 1).numpy()
        r = args.res * scale
        panel = Image.new("RGB", (len(factors) * (r + 2), 18 + len(classes) * (r + 2)), "white")
        d = ImageDraw.Draw(panel)
        d.text((2, 2), label, fill="black")
        for i, im in enumerate(imgs):
            row, col = divmod(i, len(factors))
            panel.paste(Image.fromarray(im).resize((r, r), Image.NEAREST), (col * (r + 2), 18 + row * (r + 2)))
        panels.append(panel)
    foot = 16
    w = sum(p.width for p in panels) + 12 * (len(panels) - 1)
    fig = Image.new("RGB", (w, max(p.height for p in panels) + foot), "white")
    x = 0
    for p in panels:
        fig.paste(p, (x, 0))
        x += p.width + 12
    ImageDraw.Draw(fig).text((2, fig.height - foot + 2), "original size / res, left to right: "
                             + ", ".join(f"{f:g}" for f in factors) + " (same noise and class along each row)",
                             fill="black")
    fig.save(path)
    return path


def figures(a):
    """From the tables under --docs: the size sweep (first seed of ours vs adaln) and the loss curves (mean over
    seeds) of every comparison that has been run."""
    tables = {}
    for name in ("routes", "gates", "padding"):
        path = os.path.join(a.docs, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                tables[name] = {r["variant"]: r["per_seed"] for r in json.load(f)}
    pair = {v: tables["routes"][v][0]["run_dir"] for v in ("ours", "adaln (DiT)") if v in tables.get("routes", {})}
    if pair:
        size_sweep_figure(a, pair, os.path.join(a.docs, "size_sweep.png"))
    for name, table in tables.items():
        seeds = ",".join(str(m["seed"]) for m in next(iter(table.values())))
        plot_curves(os.path.join(a.docs, f"loss_{name}.png"), f"{name}: training loss, mean of seeds {seeds}",
                    {variant: mean_curve(per_seed) for variant, per_seed in table.items()})


#################################################################################
#                       The results page (docs/RESULTS.md)                      #
#################################################################################

BEGIN, END = "<!-- experiments:begin (written by experiments.py) -->", "<!-- experiments:end -->"
SECTIONS = (("routes", "Conditioning routes", ("size_sweep.png", "loss_routes.png")),
            ("gates", "Control gates", ("loss_gates.png",)),
            ("padding", "Text padding", ("loss_padding.png",)),
            ("transfer", "Resolution transfer, 32 → 64 px", ()),
            ("recipes", "Each published recipe, one command each", ()),
            ("drift", "Semantic drift at convergence, class-correlated sizes", ("drift.png", "drift_size_sweep.png")),
            ("drift_gates", "Gate schedules at high rho", ()),
            ("drift_ctrl_scale", "Control guidance at high rho", ("drift_ctrl_scale.png",)),
            ("padding_converged", "Text padding at 2000 steps", ()))


def update_results(a, page=os.path.join("docs", "RESULTS.md")):
    """Replace the block between BEGIN and END of the results page with every table and figure under --docs."""
    parts = []
    for name, title, pngs in SECTIONS:
        md = os.path.join(a.docs, f"{name}.md")
        if not os.path.exists(md):
            continue
        with open(md) as f:
            parts.append(f"#### {title}\n\n" + f.read().strip() + "\n")
        for png in pngs:
            if os.path.exists(os.path.join(a.docs, png)):
                rel = os.path.relpath(os.path.join(a.docs, png), os.path.dirname(os.path.abspath(page)) or ".")
                parts.append(f"![{png}]({rel})\n")
    with open(page) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: no results block ({BEGIN} ... {END}) to replace")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(page, "w") as f:
        f.write(head + BEGIN + "\n" + "\n".join(parts) + END + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("routes", "gates", "padding", "transfer", "drift", "padding-converged",
                                          "recipes", "figures", "results", "all"))
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--variants", type=lambda s: s.split(","), default=None, help="routes / gates / padding / drift / "
                   "recipes: only these variants (comma-separated names as in the tables)")
    p.add_argument("--steps", type=int, default=None, help="steps per run: routes / gates / padding 800, drift and "
                   "padding-converged 2000, recipes 300")
    p.add_argument("--corrs", default="0,0.9", type=lambda s: [float(v) for v in s.split(",")],
                   help="drift: class <-> size correlations rho of the data (train.py --size-corr)")
    p.add_argument("--drift-pairs", type=int, default=100, help="drift: (noise, class) pairs per run")
    p.add_argument("--assemble", action="store_true", help="drift / padding-converged: tables and figures from the "
                   "committed records alone; each row takes the seeds that are there (nothing is trained or measured)")
    p.add_argument("--ctrl-scales", default="0,1,2,3", type=lambda s: [float(v) for v in s.split(",")],
                   help="drift: control guidance scales measured on each run (0 = the sampling default)")
    p.add_argument("--gate-variants", type=lambda s: s.split(","), default=None, help="drift: only these gate "
                   "schedules (names as in the table; a single one leaves the gate comparison out)")
    p.add_argument("--log-every", type=int, default=25, help="steps per point of the loss curves")
    p.add_argument("--per-class", type=int, default=10, help="checker: seeds per class (each drawn twice)")
    p.add_argument("--drift-n", type=int, default=40, help="drift: (noise, class) pairs per sweep")
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps of every evaluation sample")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="semantic guidance of every evaluation sample")
    p.add_argument("--base-steps", type=int, default=400, help="transfer: steps at 32 px")
    p.add_argument("--ft-steps", type=int, default=60, help="transfer: steps at 64 px")
    p.add_argument("--ft-batch", type=int, default=32, help="transfer: batch at 64 px")
    p.add_argument("--ft-warmup", type=int, default=10, help="transfer: warm-up steps at 64 px")
    p.add_argument("--scratch", action="store_true", help="transfer: also train the 64 px model from scratch")
    p.add_argument("--shapes-size", type=int, default=4000, help="distinct training images")
    p.add_argument("--out", default=os.path.join("runs", "experiments"), help="run folders")
    p.add_argument("--docs", default=DOCS, help="where tables and figures are written")
    p.add_argument("--results", default=os.path.join("docs", "RESULTS.md"), help="the page whose results block is "
                   "rebuilt")
    a = p.parse_args(argv)
    a.steps = a.steps or {"drift": 2000, "padding-converged": 2000, "recipes": 300}.get(a.experiment, 800)
    experiments = dict(routes=routes, gates=gates, padding=padding, transfer=transfer)
    if a.experiment in experiments:
        experiments[a.experiment](a)
    elif a.experiment == "drift":  # not part of `all`: hours of CPU at its budget
        drift_experiment(a)
    elif a.experiment == "padding-converged":
        padding_converged(a)
    elif a.experiment == "recipes":
        recipes(a)
    elif a.experiment == "figures":
        figures(a)
    elif a.experiment == "all":
        for fn in experiments.values():
            fn(a)
        figures(a)
    update_results(a, a.results)


if __name__ == "__main__":
    main()
