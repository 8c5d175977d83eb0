"""
Steps against quality, two studies of the samplers at growing numbers of network evaluations (NFE).

    python -m experiments samplers --shapes-size 10000               # trains the DDPM model (4000 steps)
    python -m experiments samplers --shapes-size 10000 --assemble    # the table and figure from the records
    python -m experiments convergence --per-class 20 [--run RUN]     # the flow samplers, on the default run

`samplers`: the shapes checker's class and flip accuracy of a DDPM model -- the shapes recipe with DiT's
objective (`--objective ddpm --pred eps --learn-sigma`: eps and a learned variance on the linear betas) and
min-SNR-5 weighting (`--min-snr 5`), 4000 steps, a model that learned the classes --
sampled by every sampler of its objective at 5, 10, 20 and 50 NFE over 3 seeds of noise, and the distance of
40 fixed (noise, class) pairs to its ODE's solution. Each (model, sampler, NFE, noise seed) cell is a
committed record under docs/experiments/samplers_runs/ holding every sample's outcome; a cell pools its seeds'
samples, with a 95 % bootstrap interval (seeds, then samples).

`convergence`: the flow samplers (Euler, Heun, DPM++ 2M) on the default run's model (`python train.py`:
x-prediction, noise shift 3) at 5 .. 200 NFE, for several end points t_min (diffusion.time_grid) and the grid
before the end point was fixed: the distance of the same 40 pairs to a fine solve on the same grid, and the
checker's class accuracy. Records under docs/experiments/convergence_runs/.

NFE counts calls of the guided network (each runs the conditional and the unconditional branch in one batch):
Heun takes 2 per step but one on its last, so its NFE are odd (5, 9, 19, 49, 99, 199).
"""
import os
import time
from typing import NamedTuple

import torch

from build import load_model, make_diffusion
from config import run_sampling
from diffusion import FLOW_SAMPLERS, T_MIN
from shapes import EvalPlan, evaluate_shapes

from .common import (
    bootstrap,
    commit_record,
    committed_record,
    device_name,
    interval,
    pyplot,
    run,
    save_figure,
    save_table,
    shapes_run,
)

# (the flow model, the default run, is measured by `convergence` below, at its fixed end point)
# DiT's objective with min-SNR-5 weighting: a DDPM model that learns the shapes classes at this budget (4000
# steps: class accuracy 0.915), so the checker column says something (docs/samplers.md, last section: DiT's
# own weighting needs more than 10000 steps)
MODELS = {"ddpm (DiT's objective, min-SNR-5)": ["--objective", "ddpm", "--pred", "eps", "--learn-sigma",
                                                 "--min-snr", "5"]}
SAMPLERS = {"ddpm (DiT's objective, min-SNR-5)": ("ddim", "ddpm", "dpm++2m")}
NFES = (5, 10, 20, 50)
# the converged solution of each model's probability-flow ODE, which the deterministic samplers approach: its
# highest-order sampler at about 200 network evaluations
REFERENCE = {"ddpm (DiT's objective, min-SNR-5)": ("dpm++2m", 200)}
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
                                    ckpt_step=trained.loaded.step))


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


#################################################################################
#          The flow samplers' convergence, on the default run's model            #
#################################################################################
# python -m experiments convergence --per-class 20 [--run RUN]: each flow sampler's distance to a fine solve
# on the same grid, at 5 .. 200 NFE, for each end point of T_MINS; the checker's class accuracy beside it.

CONVERGENCE_NFES = (5, 10, 20, 50, 100, 200)
T_MINS = (0.0, 0.01, 0.02, 0.05)  # 0: the grid before the end point was fixed, whose last level moves
FINE = ("heun", 500)  # each grid's fine solve (999 network evaluations), which the distances are to
CHECKED = (0.0, T_MIN)  # the grids whose samples the checker grades at every NFE (and the fine solve: T_MIN)


def end_label(t_min):
    return "moving (before)" if t_min == 0 else f"{t_min:g}"


class DefaultModel:
    """The default run's model (`python train.py`): --run's folder, else trained once into --out; loaded
    on first need, so that committed records are assembled without it."""

    def __init__(self, options):
        self.options, self.trained = options, None

    def __call__(self):
        if self.trained is None:
            run_dir = self.options.run or run("shapes/train-py", [], self.options.out)
            self.trained = Trained("flow (default run)", load_model(run_dir, "cpu"), run_dir)
        return self.trained


def grid_distances(options, model, t_min):
    """The committed record of one end point: the RMS distance (pixels in [-1, 1]) of the ODE_PAIRS pairs
    (ode_pairs, seed 0) drawn by each flow sampler at each NFE of CONVERGENCE_NFES from the same pairs drawn
    by FINE on the same grid."""
    key = dict(model="default run", t_min=t_min, pairs=ODE_PAIRS, cfg_scale=options.cfg_scale,
               fine=list(FINE), nfes=list(CONVERGENCE_NFES))
    path = os.path.join(options.docs, "convergence_runs", f"distance-tmin{t_min:g}.json")
    record = committed_record(path, key)
    if options.assemble or record is not None:
        return record
    t0, trained = time.time(), model()
    at = lambda method, steps: run_sampling(trained.loaded.args, method=method, steps=steps,
                                            scale=options.cfg_scale, t_min=t_min)
    fine = ode_pairs(trained, at(*FINE), 0)
    rmse = {}
    for method in FLOW_SAMPLERS:
        for nfe in CONVERGENCE_NFES:
            steps, spent = steps_for(method, nfe)
            x = ode_pairs(trained, at(method, steps), 0)
            rmse.setdefault(method, {})[spent] = float((x - fine).pow(2).mean().sqrt())
    return commit_record(path, dict(key=key, rmse=rmse, measure_s=time.time() - t0,
                                    ckpt_step=trained.loaded.step))


def checker_cell(options, model, t_min, method, nfe):
    """The committed record of the checker's outcome on every sample of one (end point, sampler, NFE):
    --per-class seeds per class, each drawn with flip 0 and 1, at guidance --cfg-scale."""
    steps, spent = (FINE[1], 2 * FINE[1] - 1) if nfe == "fine" else steps_for(method, nfe)
    key = dict(model="default run", t_min=t_min, sampler=method, sample_steps=steps,
               per_class=options.per_class, cfg_scale=options.cfg_scale)
    path = os.path.join(options.docs, "convergence_runs", f"checker-tmin{t_min:g}-{method}-nfe{spent}.json")
    record = committed_record(path, key)
    if options.assemble or record is not None:
        return record
    t0, trained = time.time(), model()
    args, facts = trained.loaded.args, trained.loaded.facts
    sampling = run_sampling(args, method=method, steps=steps, scale=options.cfg_scale, t_min=t_min)
    res = evaluate_shapes(trained.loaded.model, make_diffusion(args, facts), args, facts,
                          EvalPlan(options.per_class, sampling, per_sample=True), "cpu")
    return commit_record(path, dict(key=key, nfe=spent, class_ok=res["per_sample"]["class_ok"],
                                    flip_ok=res["per_sample"]["flip_ok"], measure_s=time.time() - t0,
                                    ckpt_step=trained.loaded.step))


def distances_of(rows):
    return " / ".join(f"{r['rmse']:.4f}" for r in rows)


def convergence(options):
    model = DefaultModel(options)
    distances = {t: grid_distances(options, model, t) for t in T_MINS}
    cells = {(t, m, n): checker_cell(options, model, t, m, n)
             for t in CHECKED for m in FLOW_SAMPLERS for n in CONVERGENCE_NFES}
    fine = checker_cell(options, model, T_MIN, FINE[0], "fine")
    rows = []
    for t, record in distances.items():
        for m in FLOW_SAMPLERS:
            for n, (spent, d) in zip(CONVERGENCE_NFES, (record or {}).get("rmse", {}).get(m, {}).items()):
                cell = cells.get((t, m, n))
                rows.append(dict(t_min=t, sampler=m, nfe=int(spent), rmse=d,
                                 class_acc=bootstrap([cell["class_ok"]]) if cell else None,
                                 flip_acc=bootstrap([cell["flip_ok"]]) if cell else None))
    if not rows:
        return None
    md = ("| end point t_min | sampler | distance to the fine solve at 5 / 10 / 20 / 50 / 100 / 200 NFE | "
          "class acc at the same NFE |\n|---|---|---|---|\n")
    for t in T_MINS:
        for m in FLOW_SAMPLERS:
            mine = [r for r in rows if r["t_min"] == t and r["sampler"] == m]
            if not mine:
                continue
            acc = [f"{r['class_acc']['mean']:.3f}" for r in mine if r["class_acc"]]
            name = m + (f" ({' / '.join(str(r['nfe']) for r in mine)} NFE)" if m == "heun" else "")
            md += (f"| {end_label(t)} | {name} | {distances_of(mine)} | "
                   f"{' / '.join(acc) if len(acc) == len(mine) else '—'} |\n")
    fine_acc = bootstrap([fine["class_ok"]]) if fine else None
    measure_s = sum(r["measure_s"] for r in [*distances.values(), *cells.values(), fine] if r)
    md += (f"\n`python -m experiments convergence --per-class {options.per_class}`, on the default run's "
           "model (`python train.py`: shapes, XS/4, x-prediction, shift 3, 2000 steps), guidance "
           f"{options.cfg_scale:g}. Distance: the RMS pixel difference (values in [-1, 1]) of {ODE_PAIRS} "
           f"fixed (noise, class) pairs from the same pairs drawn by {FINE[0]} at {FINE[1]} steps "
           f"({2 * FINE[1] - 1} NFE) on the same grid (the same end point); 'moving (before)' is the grid "
           "before the end point was fixed (t_min 0: its last level is shift_time(1 / steps)). Class "
           f"accuracy: the shapes checker on {options.per_class} seeds per class x flip 0 / 1 "
           f"({options.per_class * 20} samples per cell, random crops); — where not measured. "
           + (f"The fine solve itself ({FINE[0]}, {FINE[1]} steps, t_min {T_MIN:g}): class accuracy "
              f"{interval(fine_acc)}. " if fine_acc else "")
           + f"95 % bootstrap intervals: convergence.json. Measuring took {measure_s / 60:.0f} min on "
           f"{device_name()}.\n")
    save_table(options, "convergence", dict(rows=rows, fine_class_acc=fine_acc), md)
    plot_convergence(os.path.join(options.docs, "convergence.png"), rows, fine_acc)
    return md


def plot_convergence(path, rows, fine_acc):
    """A panel per flow sampler: the distance to the fine solve against NFE (log-log), a line per end point
    (the moving one dashed); and the class accuracy against NFE, a line per (sampler, end point) graded."""
    plt = pyplot()
    panels = len(FLOW_SAMPLERS) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 3.6), dpi=100)
    for ax, method in zip(axes, FLOW_SAMPLERS):
        for i, t in enumerate(T_MINS):
            mine = [r for r in rows if r["sampler"] == method and r["t_min"] == t]
            if mine:
                ax.plot([r["nfe"] for r in mine], [r["rmse"] for r in mine], marker="o", color=f"C{i}",
                        ls="--" if t == 0 else "-", label=f"t_min {end_label(t)}")
        ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", title=method,
               ylabel="RMS distance to the fine solve")
    ax, lowest = axes[-1], 1.0
    for i, method in enumerate(FLOW_SAMPLERS):
        for t in CHECKED:
            mine = [r for r in rows if r["sampler"] == method and r["t_min"] == t and r["class_acc"]]
            if mine:
                ax.plot([r["nfe"] for r in mine], [r["class_acc"]["mean"] for r in mine], marker="o",
                        color=f"C{i}", ls="--" if t == 0 else "-", label=f"{method}, t_min {end_label(t)}")
                lowest = min([lowest] + [r["class_acc"]["mean"] for r in mine])
    if fine_acc:
        ax.axhline(fine_acc["mean"], color="k", lw=0.8, label=f"fine solve ({FINE[0]} {FINE[1]})")
    ax.set(xscale="log", xlabel="network evaluations (NFE)", ylabel="class accuracy",
           ylim=(max(0.0, lowest - 0.05), 1.0), title="shapes checker")
    for ax in axes:
        ax.set_xticks(CONVERGENCE_NFES, [str(n) for n in CONVERGENCE_NFES])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
