"""
Text padding at the drift budget (2000 steps, where shape words are learned), 3 seeds, 95 % intervals.

    python -m experiments padding-converged
"""
import os
import time

import numpy as np

from build import load_model, make_diffusion
from shapes import EvalPlan, evaluate_shapes

from .common import (
    bootstrap,
    bootstrap_difference,
    commit_record,
    committed_record,
    evaluation_sampling,
    flag_tag,
    interval,
    run_info,
    save_table,
    shapes_run,
    train_losses,
)
from .compare import PADDINGS
from .measures import text_losses


def padding_path(options, flags, seed):
    return os.path.join(options.docs, "padding_runs", f"{flag_tag(flags)}-{options.steps}st-s{seed}.json")


def padding_record(options, flags, seed):
    """The committed measurements of one text run at the drift budget: each checker sample's outcome on
    held-out wordings, and the held-out caption loss (text_losses), training and measuring it if missing."""
    path = padding_path(options, flags, seed)
    key = dict(flags=flags, steps=options.steps, seed=seed, shapes_size=options.shapes_size,
               per_class=options.per_class, sample_steps=options.sample_steps, cfg_scale=options.cfg_scale)
    record = committed_record(path, key)
    if record is not None:
        return record
    run_dir = shapes_run(options, flags, seed)
    trained = load_model(run_dir, "cpu")
    model, args, facts = trained.model, trained.args, trained.facts
    t0 = time.time()
    losses = train_losses(run_dir)
    record = dict(key=key, train=dict(run_info(run_dir), loss_last=losses[max(losses)]),
                  eval=evaluate_shapes(model, make_diffusion(args, facts), args, facts,
                                       EvalPlan(options.per_class, evaluation_sampling(options),
                                                per_sample=True), "cpu"),
                  losses=text_losses(run_dir))
    record["measure_s"] = time.time() - t0
    return commit_record(path, record)


def padding_converged(options):
    """Text padding at the drift budget (2000 steps, where shape words are learned), 3 seeds, 95 % intervals.
    With --assemble, from the committed records alone: each row has the seeds that are there, or is left
    out."""
    rows, both_right = [], {}  # variant -> per seed, per sample: shape and colour read right
    for variant, flags in PADDINGS.items():
        if options.variants and variant not in options.variants:
            continue
        seeds = options.seeds
        if options.assemble:
            seeds = [s for s in options.seeds if os.path.exists(padding_path(options, flags, s))]
        if not seeds:
            continue
        records = [padding_record(options, flags, seed) for seed in seeds]
        samples = [r["eval"]["per_sample"] for r in records]
        both_right[variant] = [np.logical_and(s["class_ok"], s["colour_ok"]) for s in samples]
        metrics = {"class + colour acc": bootstrap(both_right[variant]),
                   "class acc": bootstrap([s["class_ok"] for s in samples]),
                   "colour acc": bootstrap([s["colour_ok"] for s in samples]),
                   "null − caption loss": bootstrap([[r["losses"]["caption_gain"]] for r in records])}
        rows.append(dict(variant=variant, steps=options.steps, seeds=seeds, metrics=metrics,
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
    md += "".join(f"\n{r['variant']} − {default}, class + colour acc: {interval(r['vs_default'])}"
                  for r in rows
                  if "vs_default" in r) + ("\n" if default and len(rows) > 1 else "")
    md += (f"\n`python -m experiments padding-converged{' --assemble' if options.assemble else ''} --seeds "
           f"{','.join(map(str, options.seeds))} --steps {options.steps} "
           f"--shapes-size {options.shapes_size}`; training "
           f"{sum(sum(r['train_s']) for r in rows) / 60:.0f} min. Mean [95 % bootstrap interval over seeds, "
           f"then samples]: {options.per_class} seeds per class x 2 flips on prompts in wordings never seen "
           "in training; null − caption loss: per seed, so its interval is over seeds only.\n")
    save_table(options, "padding_converged", rows, md)
    return rows
