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

from checkpoint import read_checkpoint
from config import make_diffusion, run_sampling
from sample import load_model
from shapes import evaluate_shapes

from .common import (
    bootstrap,
    commit_record,
    committed_record,
    interval,
    last_ckpt,
    pyplot,
    save_table,
    shapes_run,
)

MODELS = {"flow (default run)": [], "ddpm (DiT's objective)": ["--objective", "ddpm", "--pred", "eps",
                                                               "--learn-sigma"]}
SAMPLERS = {"flow (default run)": ("euler", "heun", "dpm++2m"),
            "ddpm (DiT's objective)": ("ddim", "ddpm", "dpm++2m")}
NFES = (5, 10, 20, 50)


def steps_for(method, nfe):
    """Sampler steps that spend about `nfe` network evaluations, and the evaluations they spend."""
    if method == "heun":  # 2 per step, 1 on the last: 2 s - 1
        s = (nfe + 1) // 2
        return s, 2 * s - 1
    return nfe, nfe


def cell(a, model_name, method, nfe, seed):
    """One committed record: the checker's outcome of every sample of one (model, sampler, NFE, noise
    seed)."""
    steps, spent = steps_for(method, nfe)
    key = dict(model=MODELS[model_name], steps=a.steps, shapes_size=a.shapes_size, sampler=method,
               sample_steps=steps, seed=seed, per_class=a.per_class, cfg_scale=a.cfg_scale)
    tag = f"{'flow' if model_name.startswith('flow') else 'ddpm'}-{method}-nfe{nfe}-s{seed}"
    path = os.path.join(a.docs, "samplers_runs", f"{tag}.json")
    record = committed_record(path, key)
    if record is not None or a.assemble:
        return record
    run_dir = shapes_run(a, MODELS[model_name], 0)
    model, args, facts, *_ = load_model(run_dir, "cpu")
    sampling = run_sampling(args, method=method, steps=steps, scale=a.cfg_scale)
    t0 = time.time()
    res = evaluate_shapes(model, make_diffusion(args, facts), args, facts, a.per_class, "cpu", sampling,
                          seed=10_000 * (seed + 1), per_sample=True)
    chiral = res["per_sample"]["flip_ok"]
    return commit_record(path,
                         dict(key=key, nfe=spent, class_ok=res["per_sample"]["class_ok"], flip_ok=chiral,
                                    measure_s=time.time() - t0, sampling=list(sampling),
                                    run=os.path.basename(run_dir),
                                    ckpt_step=read_checkpoint(last_ckpt(run_dir))["step"]))


def samplers(a):
    rows = []
    for model_name, methods in SAMPLERS.items():
        if not a.assemble:  # train the model once, before any of its cells
            shapes_run(a, MODELS[model_name], 0)
        for method in methods:
            for nfe in NFES:
                records = [r for r in (cell(a, model_name, method, nfe, s) for s in a.seeds) if r]
                if not records:
                    continue
                rows.append(dict(model=model_name, sampler=method, nfe=records[0]["nfe"], seeds=len(records),
                                 class_acc=bootstrap([r["class_ok"] for r in records]),
                                 flip_acc=bootstrap([r["flip_ok"] for r in records]),
                                 measure_s=sum(r["measure_s"] for r in records)))
    if not rows:
        return None
    md = "| model | sampler | NFE | class acc | flip acc |\n|---|---|---|---|---|\n"
    for r in rows:
        md += (f"| {r['model']} | {r['sampler']} | {r['nfe']} | {interval(r['class_acc'])} | "
               f"{interval(r['flip_acc'])} |\n")
    n_seeds = max(r["seeds"] for r in rows)
    md += (f"\n`python -m experiments samplers --seeds {','.join(map(str, a.seeds))} --steps {a.steps} "
           f"--shapes-size {a.shapes_size}`. Each model trained once ({a.steps} steps, seed 0), then sampled "
           f"from {n_seeds} seeds of noise x {a.per_class} per class x flip 0 / 1 (= "
           f"{n_seeds * a.per_class * 20} samples per cell, of which the chiral classes' "
           f"{n_seeds * a.per_class * 8} grade the flip), guidance {a.cfg_scale:g}, random crops; mean [95 % "
           f"bootstrap interval, seeds then samples]. NFE: calls of the guided network. Measuring took "
           f"{sum(r['measure_s'] for r in rows) / 60:.0f} min on one CPU thread.\n")
    save_table(a, "samplers", rows, md)
    plot_samplers(os.path.join(a.docs, "samplers.png"), rows)
    return md


def plot_samplers(path, rows):
    """Accuracy against NFE: a panel per (metric, model), a line per sampler with its 95 % interval."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), dpi=100, squeeze=False)
    for col, model_name in enumerate(models):
        for row, metric in enumerate(("class_acc", "flip_acc")):
            ax = axes[row][col]
            for method in dict.fromkeys(r["sampler"] for r in rows if r["model"] == model_name):
                mine = [r for r in rows if r["model"] == model_name and r["sampler"] == method]
                m = [r[metric] for r in mine]
                ax.errorbar([r["nfe"] for r in mine], [v["mean"] for v in m],
                            yerr=[[v["mean"] - v["lo"] for v in m], [v["hi"] - v["mean"] for v in m]],
                            marker="o", capsize=3, label=method)
            ax.set(xscale="log", ylim=(0, 1.02), xlabel="network evaluations (NFE)",
                   ylabel=metric.replace("_", " "), title=model_name)
            ax.set_xticks(NFES, [str(n) for n in NFES])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
