"""
Semantic drift at convergence, with class <-> size correlated data.

    python -m experiments drift       # routes, gate schedules and --ctrl-scale at 2000 steps, rho 0 and 0.9

The paper's Figure 2: on real data the original size correlates with the content, so a model that adds the
size and the class into one embedding can change *what* it draws when only the size condition changes. Here
every run is trained to the budget where `ours` reads >= 0.9 of its classes right (the default recipe's 2000
steps), on shapes whose size is independent of the class (rho = 0) or correlated with it (--size-corr rho:
even classes mostly small originals, odd ones mostly large). Each finished run's per-pair readings are written
to a JSON file under docs/experiments/drift_runs/ (committed), so a comparison can be finished over several
sessions or machines and a rerun only assembles; the intervals are a bootstrap over seeds and, within each,
over (noise, class) pairs.
"""
import json
import os
import time

import numpy as np
import torch

from build import latent_shape, load_model, make_diffusion
from diffusion import generate, make_noise
from latents import Autoencoder, to_uint8
from shapes import EvalPlan, ShapesChecker, evaluate_shapes, size_group
from text import semantic_input

from .common import (
    ROUTE_LABELS,
    bootstrap,
    bootstrap_difference,
    commit_record,
    committed_record,
    evaluation_sampling,
    flag_tag,
    interval,
    plot_against,
    plot_bars,
    route_variants,
    run_info,
    save_table,
    shapes_run,
    train_losses,
)
from .figures import size_sweep_figure
from .measures import SIZE_SWEEP, size_controls

# The routes of model.ROUTES the drift tables measure, a subset named here: a new route does not enrol itself
# in hours of training at this budget. To measure one, add its name (tests/test_experiments.py holds each name
# to model.ROUTES).
DRIFT_ROUTES = ("ours", "adaln", "xattn", "mmdit")
DRIFT_VARIANTS = route_variants(DRIFT_ROUTES)

# Gate schedules of conditioning.GATES at high rho, on --cond ours; the default gates only the size group.
DRIFT_GATES = {
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
    "pulled": "1 if, at the extreme size typical of the other class group, the image is read as a class of "
                 "that group",
    "pulled (same-size base)": "1 if, at the extreme size typical of its own group, the image is read as a "
                               "class of the other group: the confusion rate without a push from the size "
                 "condition",
}


@torch.no_grad()
def size_sweep_pairs(model, args, facts, n, sampling, seed=20_000):
    """n (noise, class) pairs (classes in turn), each sampled as `sampling` says (its steps and guidance
    scales) at every original size of SIZE_SWEEP with the same noise, everything else at the sampling default;
    returns per pair the DRIFT_METRICS values (0 / 1 or a fraction)."""
    controls = size_controls(facts.res, SIZE_SWEEP)
    k = len(controls)
    labels = [i % facts.num_classes for i in range(n)]
    noise = make_noise([seed + i for i in range(n)], latent_shape(facts), "cpu").repeat_interleave(k, 0)
    y = semantic_input(args, facts, [lab for lab in labels for _ in controls], "cpu")
    x = generate(model, make_diffusion(args, facts), noise, y, torch.stack(controls * n), sampling)
    readings = ShapesChecker()(to_uint8(Autoencoder("none").decode(x)))
    pairs = []
    for i, c in enumerate(labels):
        sweep = readings[i * k:(i + 1) * k]  # small (0.5 res) .. large (2 res) original
        ends = {0: sweep[0], 1: sweep[-1]}  # the size group each extreme is typical of -> the reading there
        own, other = size_group(c), 1 - size_group(c)
        pairs.append({"class acc": float(np.mean([m["label"] == c for m in sweep])),
                      "size acc": float(sweep[-1]["sharpness"] > sweep[0]["sharpness"]),
                      "class drift": float(len({m["label"] for m in sweep}) > 1),
                      "colour drift": float(len({m["colour"] for m in sweep}) > 1),
                      "pulled": float(size_group(ends[other]["label"]) == other),
                      "pulled (same-size base)": float(size_group(ends[own]["label"]) == other)})
    return pairs


def drift_path(options, flags, corr, seed):
    return os.path.join(options.docs, "drift_runs",
                        f"{flag_tag(flags)}-rho{corr:g}-{options.steps}st-s{seed}.json")


def drift_record(options, flags, corr, seed, scales=(0.0,)):
    """The committed measurements of one run (variant flags, rho, seed) at these control guidance scales,
    training and measuring what is missing (a scale not measured yet needs the run folder of this machine)."""
    path = drift_path(options, flags, corr, seed)
    key = dict(flags=flags, corr=corr, steps=options.steps, seed=seed, shapes_size=options.shapes_size,
               pairs=options.drift_pairs, sample_steps=options.sample_steps, cfg_scale=options.cfg_scale,
               per_class=options.per_class)
    record = committed_record(path, key)
    missing = [s for s in scales if record is None or str(s) not in record["ctrl_scales"]]
    if not missing:
        return record
    # trained once per folder
    run_dir = shapes_run(options, flags + (["--size-corr", f"{corr:g}"] if corr else []), seed)
    trained = load_model(run_dir, "cpu")
    model, args, facts = trained.model, trained.args, trained.facts
    t0 = time.time()
    if record is None:
        losses = train_losses(run_dir)
        record = dict(key=key, train=dict(run_info(run_dir), loss_last=losses[max(losses)]), ctrl_scales={},
                      eval=evaluate_shapes(model, make_diffusion(args, facts), args, facts,
                                           EvalPlan(options.per_class, evaluation_sampling(options)), "cpu"))
    record["ctrl_scales"].update({str(s): size_sweep_pairs(model, args, facts, options.drift_pairs,
                                                           evaluation_sampling(options, ctrl=s))
                                  for s in missing})
    record["measure_s"] = record.get("measure_s", 0) + time.time() - t0
    return commit_record(path, record)


def committed_seeds(options, flags, corr, scale):
    """--assemble: the seeds whose record at this scale is committed (nothing is trained or measured)."""
    paths = {s: drift_path(options, flags, corr, s) for s in options.seeds}
    def has(path):
        with open(path, encoding="utf-8") as f:
            return str(scale) in json.load(f)["ctrl_scales"]
    return [s for s, p in paths.items() if os.path.exists(p) and has(p)]


def drift_rows(options, variants, corrs, scale=0.0):
    """One row per (variant, rho): every DRIFT_METRICS value at control guidance `scale`, with intervals. With
    --assemble, from the committed records alone (a row has the seeds that are there, or is left out)."""
    rows = []
    for corr in corrs:
        for variant, flags in variants.items():
            seeds = committed_seeds(options, flags, corr, scale) if options.assemble else options.seeds
            if not seeds:
                continue
            records = [drift_record(options, flags, corr, seed, [scale]) for seed in seeds]
            metrics = {m: bootstrap([[p[m] for p in r["ctrl_scales"][str(scale)]] for r in records])
                       for m in DRIFT_METRICS}
            accs = [r["eval"]["class_acc"] for r in records]
            metrics["checker class acc"] = dict(mean=float(np.mean(accs)), per_seed=accs)
            rows.append(dict(variant=variant, corr=corr, steps=options.steps, seeds=seeds, ctrl_scale=scale,
                             metrics=metrics, train_s=[r["train"]["wall_s"] for r in records],
                             measure_s=[r["measure_s"] for r in records],
                             device=sorted({r["train"]["device"] for r in records})))
    return rows


def drift_table(options, name, rows, first, note):
    """rows -> NAME.json (the rows) and NAME.md (a table, intervals in brackets) under --docs."""
    names = ["checker class acc"] + list(DRIFT_METRICS)
    first = dict(first, seeds=lambda r: ",".join(map(str, r["seeds"])))
    md = "| " + " | ".join(list(first) + names) + " |\n|" + "---|" * (len(first) + len(names)) + "\n"
    for r in rows:
        md += ("| "
               + " | ".join([str(f(r)) for f in first.values()] + [interval(r["metrics"][m]) for m in names])
               + " |\n")

    def minutes(field):  # each run once, though several rows (control scales) may read it
        per_run = {(r["variant"], r["corr"], s): t for r in rows for s, t in zip(r["seeds"], r[field])}
        return sum(per_run.values()) / 60

    md += (f"\n{note} `{drift_command(options)}`; training {minutes('train_s'):.0f} min and measuring "
           f"{minutes('measure_s'):.0f} min of {', '.join(sorted({d for r in rows for d in r['device']}))} "
           f"for these rows (runs shared between tables counted in each). Mean over each row's seeds x "
           f"{options.drift_pairs} (noise, class) pairs each, [95 % bootstrap interval over seeds and pairs; "
           "with one seed, over pairs only]; checker class acc: shapes.evaluate_shapes at the default "
           f"control ({options.per_class} seeds per class, x2 flips), mean of seeds. Sweep: original size "
           f"{', '.join(f'{f:g}' for f in SIZE_SWEEP)} x res, same noise, {options.sample_steps} Euler "
           f"steps, guidance {options.cfg_scale}. "
           + " ".join(f"*{k}*: {v}." for k, v in DRIFT_METRICS.items()) + "\n")
    save_table(options, name, rows, md)
    return rows


def drift_command(options):
    subset = "".join(f" --{flag} '{','.join(v)}'"
                     for flag, v in (("variants", options.variants), ("gate-variants", options.gate_variants))
                     if v)
    subset += " --assemble" if options.assemble else ""
    return (f"python -m experiments drift{subset} --seeds {','.join(map(str, options.seeds))} "
            f"--steps {options.steps} --corrs {','.join(f'{c:g}' for c in options.corrs)} "
            f"--shapes-size {options.shapes_size} --drift-pairs {options.drift_pairs}")


def drift_experiment(options):
    """Routes at rho = 0 and high rho, then at the highest rho the gate schedules of ours and its control
    guidance."""
    routes = {v: f for v, f in DRIFT_VARIANTS.items() if not options.variants or v in options.variants}
    rows = drift_rows(options, routes, options.corrs)
    drift_table(options, "drift", rows,
                {"variant": lambda r: r["variant"], "rho": lambda r: f"{r['corr']:g}"},
                f"Semantic drift when only the size condition changes, {options.steps} steps per run.")
    shown = ["class acc", "size acc", "class drift", "colour drift", "pulled"]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    plot_bars(os.path.join(options.docs, "drift.png"),
              f"Only the size condition changes: {options.steps} steps, seeds {','.join(map(str, seeds))} "
              "(per row: the table), means with 95 % bootstrap intervals", rows, shown)
    high = max(options.corrs)
    first = options.seeds[0]
    shown = [v for v in (ROUTE_LABELS["ours"], ROUTE_LABELS["adaln"]) if v in routes
             and (not options.assemble or first in committed_seeds(options, DRIFT_VARIANTS[v], high, 0.0))]
    pair = {f"{v.split(' (')[0]}, rho {high:g}, seed {first}":
            drift_record(options, DRIFT_VARIANTS[v], high, first)["train"]["run_dir"] for v in shown}
    if len(pair) == 2 and all(os.path.isdir(d) for d in pair.values()):  # the run folders of this machine
        size_sweep_figure(options, pair, os.path.join(options.docs, "drift_size_sweep.png"))
    if options.variants and "ours" not in options.variants:
        return rows
    gates = {v: f for v, f in DRIFT_GATES.items() if not options.gate_variants or v in options.gate_variants}
    if len(gates) > 1:  # a comparison; --gate-variants with one name leaves the gates out
        gate_rows = drift_rows(options, gates, [high])
        drift_table(options, "drift_gates", gate_rows, {"gates of ours": lambda r: r["variant"]},
                    f"Gate schedules g(t) of `--cond ours` at rho = {high:g}.")
        plot_bars(os.path.join(options.docs, "drift_gates.png"), f"Gate schedules of ours, rho = {high:g}, "
                  f"{options.steps} steps "
                  "(seeds per row: the table), means with 95 % bootstrap intervals", gate_rows,
                  ["class acc", "class drift", "colour drift", "pulled"])
        drift_contrasts(options, rows, gate_rows)
    scales = [r for s in options.ctrl_scales for r in drift_rows(options, {"ours": []}, [high], s)]
    if not scales:
        return rows
    drift_table(options, "drift_ctrl_scale", scales, {"--ctrl-scale": lambda r: f"{r['ctrl_scale']:g}"},
                f"Control guidance scale of `--cond ours` at rho = {high:g} (size accuracy against drift).")
    plot_against(os.path.join(options.docs, "drift_ctrl_scale.png"),
                 f"--cond ours at rho = {high:g}: control guidance", scales, "ctrl_scale",
                 ["size acc", "class drift", "colour drift", "pulled"], "--ctrl-scale")
    return rows


CONTRASTED = ("class drift", "colour drift", "pulled")


def drift_contrasts(options, rows, gate_rows):
    """Each route against `ours` at the same rho, each gate schedule against the default: the difference of
    the drift rates with its 95 % bootstrap interval (drift_contrasts.md / .json). A difference whose interval
    excludes 0 is an effect these runs resolve."""

    # per seed, per pair, at control scale 0 (records are read, never trained)
    def values(flags, row, metric):
        return [[p[metric] for p in drift_record(options, flags, row["corr"], s)["ctrl_scales"]["0.0"]]
                for s in row["seeds"]]

    pairs = [(r, DRIFT_VARIANTS[r["variant"]], base, [])
             for r in rows
             if r["variant"] != "ours"
             for base in rows
             if base["variant"] == "ours" and base["corr"] == r["corr"]]
    default = next((g for g in gate_rows if g["variant"] == "size cosine (default)"), None)
    pairs += [(g, DRIFT_GATES[g["variant"]], default, []) for g in gate_rows if default and g is not default]
    out = [dict(comparison=f"{r['variant']} − {base['variant']}", corr=r["corr"],
                seeds=[r["seeds"], base["seeds"]], metrics={m: bootstrap_difference(values(flags, r, m),
                                                 values(base_flags, base, m)) for m in CONTRASTED})
           for r, flags, base, base_flags in pairs]
    md = ("| comparison | rho | seeds | "
          + " | ".join(CONTRASTED)
          + " |\n|"
          + "---|" * (len(CONTRASTED) + 3)
          + "\n")
    for c in out:
        md += (f"| {c['comparison']} | {c['corr']:g} | {','.join(map(str, c['seeds'][0]))} vs "
               f"{','.join(map(str, c['seeds'][1]))} | "
               + " | ".join(interval(c["metrics"][m]) for m in CONTRASTED)
               + " |\n")
    md += ("\nDifferences of drift rates (the first minus the second), each from the committed records of "
           f"the tables drift.md and drift_gates.md: `{drift_command(options)}`. [95 % bootstrap interval: "
           "each side resampled over its own seeds, then pairs]; an interval that excludes 0 is a difference "
           "these runs resolve.\n")
    save_table(options, "drift_contrasts", out, md)
    return out
