"""
The comparisons at one budget (800 steps per run): the conditioning routes, the control gates of `ours`, text
padding. Each run's measurements are a committed record (docs/experiments/NAME_runs/), so a new variant trains
only itself.

    python -m experiments routes      # every route of model.ROUTES (--cond): accuracy, control, drift
    python -m experiments gates       # the control gates g(t) of ours: ungated, the default, all cosine
    python -m experiments padding     # text: noisy_replicate vs replicate vs zero padding
"""
import os

from model import ROUTES

from .common import (
    budget_note,
    commit_record,
    committed_record,
    flag_tag,
    route_variants,
    run_info,
    shapes_run,
    summarise,
    train_losses,
    write_table,
)
from .measures import SIZE_SWEEP, checker_metrics, text_losses

# Every route of model.ROUTES: a new route enrols itself, and trains only itself (its own records).
COMPARED_ROUTES = route_variants(ROUTES)

# Gate schedules of conditioning.GATES on --cond ours; the default gates only the size group.
GATE_VARIANTS = {
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


TEXT_COLUMNS = {"class + colour acc": "class_colour_acc", "class acc": "class_acc",
                "colour acc": "colour_acc", "flip acc": "flip_acc", "held-out loss": "caption_loss",
                "null − caption loss": "caption_gain", "train loss (last)": "train_loss"}


def class_command(options, experiment):
    variants = f" --variants '{','.join(options.variants)}'" if options.variants else ""
    return (f"python -m experiments {experiment}{variants} --seeds {','.join(map(str, options.seeds))} "
            f"--steps {options.steps} --shapes-size {options.shapes_size}")


def compare_record(options, name, flags, seed, text=False):
    """The committed record of one run of a comparison -- its checker measurements (and for text its held-out
    losses), the last training loss and the loss curve -- trained and measured only when it is missing
    (docs/experiments/NAME_runs/), so that a new variant trains only itself."""
    path = os.path.join(options.docs, f"{name}_runs", f"{flag_tag(flags)}-{options.steps}st-s{seed}.json")
    key = dict(flags=flags, steps=options.steps, seed=seed, shapes_size=options.shapes_size,
               per_class=options.per_class, drift_n=0 if text else options.drift_n,
               sample_steps=options.sample_steps, cfg_scale=options.cfg_scale, log_every=options.log_every)
    record = committed_record(path, key)
    if record is not None:
        return record
    run_dir = shapes_run(options, flags, seed)
    losses = train_losses(run_dir)
    m = checker_metrics(run_dir, options, with_drift=not text)
    if text:
        m = dict(m, **text_losses(run_dir))
    measured = dict(m, seed=seed, run_dir=run_dir, train_loss=losses[max(losses)], curve=losses)
    return commit_record(path, dict(key=key, train=run_info(run_dir), measured=measured))


def compare(options, name, variants, columns, title, text=False):
    """One table: every variant at every seed (from its record), mean +- std over seeds per column."""
    if options.variants:  # a subset, e.g. to split one comparison over two processes
        unknown = set(options.variants) - set(variants)
        if unknown:
            raise SystemExit(f"--variants {','.join(sorted(unknown))}: {name} has {', '.join(variants)}")
        variants = {v: f for v, f in variants.items() if v in options.variants}
    records = {v: [compare_record(options, name, flags, seed, text) for seed in options.seeds]
               for v, flags in variants.items()}
    rows = summarise({v: [r["measured"] for r in rs] for v, rs in records.items()}, columns)
    every = [r for rs in records.values() for r in rs]
    budget = budget_note(options, [r["train"] for r in every], [r["measured"]["wall_s"] for r in every],
                         class_command(options, name))
    note = (f"{title} {budget} Shapes recipe (XS/4, 24 px pixel space), "
            f"{options.steps} steps of batch 64 per run. Checker on EMA samples ({options.sample_steps} "
            f"Euler steps, guidance {options.cfg_scale}): {options.per_class} seeds per class, each drawn "
            "unmirrored and mirrored, random crops")
    note += (". Accuracies are on prompts in wordings the model never saw in training; held-out loss: the "
             "EMA's velocity loss on 256 unseen images x 8 fixed noise levels, captioned in those wordings; "
             "null − caption: the same with the null prompt, minus it (how much the caption is used)."
             if text
             else f"; drift over {options.drift_n} (noise, class) pairs, sizes {SIZE_SWEEP} x res, crops "
             "at the top-left, centre and bottom-right. Train loss: the mean over the last --log-every "
             "steps.")
    write_table(options, name, rows, ["variant"] + list(columns), note)
    return records


def routes(options):
    return compare(options, "routes", COMPARED_ROUTES, CLASS_COLUMNS, "Conditioning routes, same budget.")


def gates(options):
    return compare(options, "gates", GATE_VARIANTS, CLASS_COLUMNS, "Control gates g(t) of `--cond ours`.")


def padding(options):
    return compare(options, "padding", PADDINGS, TEXT_COLUMNS,
                   "Text padding (`--cond-type text`, built-in encoder).", text=True)
