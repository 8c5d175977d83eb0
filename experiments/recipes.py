"""
Each published recipe (`train.py --recipe NAME`) on shapes at one budget, evaluated with its own sampler.

    python -m experiments recipes
"""
import config
from build import load_model, make_diffusion
from checkpoint import read_checkpoint, stored_args
from config import run_sampling
from shapes import EvalPlan, evaluate_shapes

from .common import (
    budget_note,
    last_ckpt,
    mean_spread,
    measured,
    run_info,
    shapes_run,
    train_losses,
    write_table,
)


def recipes(options):
    """`train.py --recipe NAME` for every recipe on shapes, at the experiment's budget and the preset's batch
    (the recipes' own batches are 4-16x larger), then the checker with the recipe's own sampler, steps and
    guidance."""
    rows, dirs, measurements = [], [], []
    for name in config.RECIPES:  # read at call time: a test may trim the table
        if options.variants and name not in options.variants:  # a subset, e.g. one process per recipe
            continue
        per_seed = []
        for seed in options.seeds:
            flags = ["--recipe", name, "--batch", "64"] + (["--model", "XS"] if name == "ldm" else [])
            run_dir = shapes_run(options, flags, seed)
            dirs.append(run_dir)

            def measure():
                trained = load_model(run_dir, "cpu")
                model, args, facts = trained.model, trained.args, trained.facts
                own = run_sampling(args)  # the recipe's sampler, steps and guidance
                grade = lambda: evaluate_shapes(model, make_diffusion(args, facts), args, facts,
                                                EvalPlan(options.per_class, own), "cpu")
                out = dict(grade(), sampler=own.method, sample_steps=own.steps, cfg_scale=own.scale,
                           cfg_schedule=own.schedule)
                # the trained weights too: at a short budget an EMA of 0.9999 is mostly the init
                model.load_state_dict(read_checkpoint(last_ckpt(run_dir))["model"])
                out["trained_class_acc"] = grade()["class_acc"]
                return out
            # the key names the recipe's sampling, so a measurement made with other settings is not reused
            own = run_sampling(stored_args(read_checkpoint(last_ckpt(run_dir))["args"]))
            m = measured(run_dir, f"recipe-eval-ema-and-trained-per_class{options.per_class}-{tuple(own)}",
                         measure)
            losses = train_losses(run_dir)
            measurements.append(m)
            per_seed.append(dict(m, seed=seed, run_dir=run_dir, train_loss=losses[max(losses)]))
        rows.append({"recipe": name, "train loss (last)": mean_spread([m["train_loss"] for m in per_seed]),
                     "class acc (EMA)": mean_spread([m["class_acc"] for m in per_seed]),
                     "class acc (trained weights)": mean_spread([m["trained_class_acc"] for m in per_seed]),
                     "flip acc (EMA)": mean_spread([m["flip_acc"] for m in per_seed]),
                     "evaluated with": f"{per_seed[0]['sampler']} {per_seed[0]['sample_steps']} steps, "
                                       f"guidance {per_seed[0]['cfg_scale']:g}", "per_seed": per_seed})
    subset = f" --variants {','.join(options.variants)}" if options.variants else ""
    command = (f"python -m experiments recipes{subset} --seeds {','.join(map(str, options.seeds))} --steps "
               f"{options.steps} --shapes-size {options.shapes_size} --per-class {options.per_class}")
    budget = budget_note(options, [run_info(d) for d in dirs], [m["wall_s"] for m in measurements], command)
    note = ("Each recipe as `train.py --recipe NAME --batch 64` (ldm: `--model XS`) on shapes: XS/4 at 24 "
            f"px (small: 32 px, its own), {options.steps} steps. {budget} "
            f"Checker on EMA samples (the ldm recipe has no EMA: its trained weights), {options.per_class} "
            "seeds per class x 2 flips, with each recipe's own evaluation sampler. The loss is each recipe's "
            "own objective (flow: velocity MSE; ddpm: eps MSE, + the VLB term with a learned variance, x "
            "min-SNR weights for mdt; mdt sums its masked and unmasked passes), so losses compare only "
            "within an objective.")
    note += (" At this budget the recipes' EMA decays (0.9999 without warm-up for dit, pixart, mdt) still "
             "hold mostly the initial weights and their 1000-step warm-ups (ours, pixart, sd3) have not "
             "ended, hence both columns: they show that each recipe runs as published, not how it ranks at "
             "convergence.")
    write_table(options, "recipes", rows, ["recipe", "train loss (last)", "class acc (EMA)",
                                           "class acc (trained weights)", "flip acc (EMA)", "evaluated with"],
                note)
    return rows
