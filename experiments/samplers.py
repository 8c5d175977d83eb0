"""
Steps against quality: the shapes checker's class and flip accuracy of a flow model and a DDPM model, each
sampled by every sampler of its objective at 5, 10, 20 and 50 network evaluations (NFE), over 3 seeds of
noise.

    python -m experiments samplers --shapes-size 10000               # trains both models first (2000 steps)
    python -m experiments samplers --shapes-size 10000 --assemble    # the table and figure from the records

The flow model is the default run (`python train.py`: x-prediction, noise shift 3); the DDPM model the same
recipe with DiT's objective (`--objective ddpm --pred eps --learn-sigma`: eps and a learned variance on the
linear betas). NFE counts calls of the guided network (each runs the conditional and the unconditional branch
in one batch): Heun takes 2 per step but one on its last, so its NFE are odd (5, 9, 19, 49). Each (model,
sampler, NFE, noise seed) cell is a committed record under docs/experiments/samplers_runs/ holding every
sample's outcome; a cell pools its seeds' samples, with a 95 % bootstrap interval (seeds, then samples).
"""
import os
import time
from typing import NamedTuple

import torch

from build import load_model, make_diffusion
from checkpoint import read_checkpoint
from config import run_sampling
from shapes import EvalPlan, evaluate_shapes

from .common import (
    bootstrap,
    commit_record,
    committed_record,
    interval,
    last_ckpt,
    pyplot,
    save_figure,
    save_table,
    shapes_run,
)

MODELS = {"flow (default run)": [], "ddpm (DiT's objective)": ["--objective", "ddpm", "--pred", "eps",
                                                               "--learn-sigma"]}
SAMPLERS = {"flow (default run)": ("euler", "heun", "dpm++2m"),
            "ddpm (DiT's objective)": ("ddim", "ddpm", "dpm++2m")}
NFES = (5, 10, 20, 50)
# the converged solution of each model's probability-flow ODE, which the deterministic samplers approach: its
# highest-order sampler at about 200 network evaluations
REFERENCE = {"flow (default run)": ("heun", 100), "ddpm (DiT's objective)": ("dpm++2m", 200)}
ODE_PAIRS = 40  # (noise, class) pairs whose distance to the reference is measured, per noise seed


def steps_for(method, nfe):
    """Sampler steps that spend about `nfe` network evaluations, and the evaluations they spend."""
    if method == "heun":  # 2 per step, 1 on the last: 2 s - 1
        s = (nfe + 1) // 2
        return s, 2 * s - 1
    return nfe, nfe


class Trained(NamedTuple):
    """One model of MODELS as its cells read it: its name there, the model as build.load_model reads it from
    its run folder, and that folder."""
    name: str
    loaded: object  # build.TrainedModel
    run_dir: str


def ode_pairs(trained, sampling, seed):
    """The latents of ODE_PAIRS fixed (noise, class) pairs (classes in turn, the default control), drawn as
    `sampling` says."""
    from build import latent_shape, sampling_control
    from diffusion import generate, make_noise
    from text import semantic_input
    model, args, facts = trained.loaded.model, trained.loaded.args, trained.loaded.facts
    noise = make_noise([50_000 * (seed + 1) + i for i in range(ODE_PAIRS)], latent_shape(facts), "cpu")
    y = semantic_input(args, facts, [i % facts.num_classes for i in range(ODE_PAIRS)], "cpu")
    ctrl = sampling_control(facts).expand(ODE_PAIRS, -1)
    return generate(model.eval(), make_diffusion(args, facts), noise, y, ctrl, sampling)


def reference(options, trained, seed):
    """ode_pairs under REFERENCE, computed once per (model, seed) and kept in the run folder."""
    path = os.path.join(trained.run_dir, f"ode-reference-s{seed}.pt")
    if not os.path.exists(path):
        method, steps = REFERENCE[trained.name]
        sampling = run_sampling(trained.loaded.args, method=method, steps=steps, scale=options.cfg_scale)
        torch.save(ode_pairs(trained, sampling, seed), path)
    return torch.load(path, weights_only=True)


def ode_error(options, trained, sampling, seed):
    """RMS distance (pixels in [-1, 1]) of this sampling's ode_pairs to the reference; None for the ancestral
    sampler, whose fresh noise leaves the ODE."""
    if sampling.method == "ddpm":
        return None
    x = ode_pairs(trained, sampling, seed)
    return float((x - reference(options, trained, seed)).pow(2).mean().sqrt())


def cell(options, model_name, method, nfe, seed):
    """One committed record: the checker's outcome of every sample of one (model, sampler, NFE, noise
    seed)."""
    steps, spent = steps_for(method, nfe)
    key = dict(model=MODELS[model_name], steps=options.steps, shapes_size=options.shapes_size, sampler=method,
               sample_steps=steps, seed=seed, per_class=options.per_class, cfg_scale=options.cfg_scale)
    tag = f"{'flow' if model_name.startswith('flow') else 'ddpm'}-{method}-nfe{nfe}-s{seed}"
    path = os.path.join(options.docs, "samplers_runs", f"{tag}.json")
    record = committed_record(path, key)
    if options.assemble or (record is not None and "ode_rmse" in record):
        return record
    run_dir = shapes_run(options, MODELS[model_name], 0)
    trained = Trained(model_name, load_model(run_dir, "cpu"), run_dir)
    model, args, facts = trained.loaded.model, trained.loaded.args, trained.loaded.facts
    sampling = run_sampling(args, method=method, steps=steps, scale=options.cfg_scale)
    if record is not None:  # measured before the ODE error was: add it
        return commit_record(path, dict(record, ode_rmse=ode_error(options, trained, sampling, seed)))
    t0 = time.time()
    plan = EvalPlan(options.per_class, sampling, seed=10_000 * (seed + 1), per_sample=True)
    res = evaluate_shapes(model, make_diffusion(args, facts), args, facts, plan, "cpu")
    outcomes = res["per_sample"]
    return commit_record(path, dict(key=key, nfe=spent, class_ok=outcomes["class_ok"],
                                    flip_ok=outcomes["flip_ok"], measure_s=time.time() - t0,
                                    sampling=list(sampling),
                                    ode_rmse=ode_error(options, trained, sampling, seed),
                                    run=os.path.basename(run_dir),
                                    ckpt_step=read_checkpoint(last_ckpt(run_dir))["step"]))


def samplers(options):
    rows = []
    for model_name, methods in SAMPLERS.items():
        if not options.assemble:  # train the model once, before any of its cells
            shapes_run(options, MODELS[model_name], 0)
        for method in methods:
            for nfe in NFES:
                records = [r for r in (cell(options, model_name, method, nfe, s) for s in options.seeds) if r]
                if not records:
                    continue
                errors = [r.get("ode_rmse") for r in records]
                rows.append(dict(model=model_name, sampler=method, nfe=records[0]["nfe"], seeds=len(records),
                                 class_acc=bootstrap([r["class_ok"] for r in records]),
                                 flip_acc=bootstrap([r["flip_ok"] for r in records]),
                                 ode_rmse=None if None in errors else sum(errors) / len(errors),
                                 measure_s=sum(r["measure_s"] for r in records)))
    if not rows:
        return None
    md = ("| model | sampler | NFE | class acc | flip acc | distance to the ODE solution |\n"
          "|---|---|---|---|---|---|\n")
    for r in rows:
        ode = "—" if r["ode_rmse"] is None else f"{r['ode_rmse']:.4f}"
        md += (f"| {r['model']} | {r['sampler']} | {r['nfe']} | {interval(r['class_acc'])} | "
               f"{interval(r['flip_acc'])} | {ode} |\n")
    n_seeds = max(r["seeds"] for r in rows)
    md += (f"\n`python -m experiments samplers --seeds {','.join(map(str, options.seeds))} "
           f"--steps {options.steps} --shapes-size {options.shapes_size}`. Each model trained once "
           f"({options.steps} steps, seed 0), then sampled from {n_seeds} seeds of noise x "
           f"{options.per_class} per class x flip 0 / 1 (= {n_seeds * options.per_class * 20} samples per "
           f"cell, of which the chiral classes' {n_seeds * options.per_class * 8} grade the flip), guidance "
           f"{options.cfg_scale:g}, random crops; mean [95 % bootstrap interval, seeds then samples]. NFE: "
           "calls of the guided network. Distance to the ODE solution: the RMS pixel difference (values in "
           f"[-1, 1]) of {ODE_PAIRS} fixed (noise, class) pairs per seed from the same pairs drawn by the "
           "model's reference solver "
           f"({', '.join(f'{m}: {s} {n} steps' for m, (s, n) in REFERENCE.items())}), mean over seeds; — for "
           "the ancestral sampler, whose fresh noise leaves the ODE. Measuring took "
           f"{sum(r['measure_s'] for r in rows) / 60:.0f} min on one CPU thread.\n")
    save_table(options, "samplers", rows, md)
    plot_samplers(os.path.join(options.docs, "samplers.png"), rows)
    return md


def plot_samplers(path, rows):
    """Against NFE: a panel per (metric, model) -- class and flip accuracy with their 95 % intervals, and the
    distance to the ODE solution on a log scale -- a line per sampler."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    metrics = ("class_acc", "flip_acc", "ode_rmse")
    colour = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["sampler"] for r in rows))}
    fig, axes = plt.subplots(len(metrics), len(models), figsize=(4.2 * len(models), 9.0), dpi=100,
                             squeeze=False)
    for col, model_name in enumerate(models):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for method in dict.fromkeys(r["sampler"] for r in rows if r["model"] == model_name):
                mine = [r for r in rows if r["model"] == model_name and r["sampler"] == method]
                if metric == "ode_rmse":
                    mine = [r for r in mine if r["ode_rmse"] is not None]
                    if mine:
                        ax.plot([r["nfe"] for r in mine], [r["ode_rmse"] for r in mine], marker="o",
                                label=method, color=colour[method])
                    continue
                m = [r[metric] for r in mine]
                ax.errorbar([r["nfe"] for r in mine], [v["mean"] for v in m],
                            yerr=[[v["mean"] - v["lo"] for v in m], [v["hi"] - v["mean"] for v in m]],
                            marker="o", capsize=3, label=method, color=colour[method])
            label = "distance to the ODE solution" if metric == "ode_rmse" else metric.replace("_", " ")
            ax.set(xscale="log", xlabel="network evaluations (NFE)", ylabel=label, title=model_name)
            if metric == "ode_rmse":
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, 1.02)
            ax.set_xticks(NFES, [str(n) for n in NFES])
            ax.minorticks_off()
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    return save_figure(fig, path)
