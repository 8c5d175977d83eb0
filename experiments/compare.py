"""
The comparisons at one budget (800 steps per run): the conditioning routes, the control gates of `ours`, text
padding. Each run's measurements are a committed record (docs/experiments/NAME_runs/), so a new variant trains
only itself.

    python -m experiments routes      # --cond ours vs adaln vs xattn vs mmdit: accuracy, control, drift
    python -m experiments gates       # control gates g(t): none vs cosine, per group
    python -m experiments padding     # text: noisy_replicate vs replicate vs zero padding
"""
import os

from .common import (
    budget_note,
    commit_record,
    committed_record,
    flag_tag,
    run_info,
    shapes_run,
    summarise,
    train_losses,
    write_table,
)
from .measures import SIZE_SWEEP, checker_metrics, text_losses

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


TEXT_COLUMNS = {"class + colour acc": "class_colour_acc", "class acc": "class_acc",
                "colour acc": "colour_acc", "flip acc": "flip_acc", "held-out loss": "caption_loss",
                "null − caption loss": "caption_gain", "train loss (last)": "train_loss"}


def class_command(a, experiment):
    variants = f" --variants '{','.join(a.variants)}'" if a.variants else ""
    return (f"python -m experiments {experiment}{variants} --seeds {','.join(map(str, a.seeds))} --steps "
            f"{a.steps} --shapes-size {a.shapes_size}")


def compare_record(a, name, flags, seed, text=False):
    """The committed record of one run of a comparison -- its checker measurements (and for text its held-out
    losses), the last training loss and the loss curve -- trained and measured only when it is missing
    (docs/experiments/NAME_runs/), so that a new variant trains only itself."""
    path = os.path.join(a.docs, f"{name}_runs", f"{flag_tag(flags)}-{a.steps}st-s{seed}.json")
    key = dict(flags=flags, steps=a.steps, seed=seed, shapes_size=a.shapes_size, per_class=a.per_class,
               drift_n=0 if text else a.drift_n, sample_steps=a.sample_steps, cfg_scale=a.cfg_scale,
               log_every=a.log_every)
    record = committed_record(path, key)
    if record is not None:
        return record
    run_dir = shapes_run(a, flags, seed)
    losses = train_losses(run_dir)
    m = checker_metrics(run_dir, a, with_drift=not text)
    if text:
        m = dict(m, **text_losses(run_dir))
    measured = dict(m, seed=seed, run_dir=run_dir, train_loss=losses[max(losses)], curve=losses)
    return commit_record(path, dict(key=key, train=run_info(run_dir), measured=measured))


def compare(a, name, variants, columns, title, text=False):
    """One table: every variant at every seed (from its record), mean +- std over seeds per column."""
    if a.variants:  # a subset, e.g. to split one comparison over two processes
        unknown = set(a.variants) - set(variants)
        if unknown:
            raise SystemExit(f"--variants {','.join(sorted(unknown))}: {name} has {', '.join(variants)}")
        variants = {v: f for v, f in variants.items() if v in a.variants}
    records = {v: [compare_record(a, name, flags, seed, text) for seed in a.seeds]
               for v, flags in variants.items()}
    rows = summarise({v: [r["measured"] for r in rs] for v, rs in records.items()}, columns)
    every = [r for rs in records.values() for r in rs]
    budget = budget_note(a, [r["train"] for r in every], [r["measured"]["wall_s"] for r in every],
                         class_command(a, name))
    note = (f"{title} {budget} Shapes recipe (XS/4, 24 px pixel space), "
            f"{a.steps} steps of batch 64 per run. Checker on EMA samples ({a.sample_steps} Euler steps, "
            f"guidance {a.cfg_scale}): {a.per_class} seeds per class, each drawn unmirrored and mirrored, "
            "random crops")
    note += (". Accuracies are on prompts in wordings the model never saw in training; held-out loss: the "
             "EMA's velocity loss on 256 unseen images x 8 fixed noise levels, captioned in those wordings; "
             "null − caption: the same with the null prompt, minus it (how much the caption is used)."
             if text
             else f"; drift over {a.drift_n} (noise, class) pairs, sizes {SIZE_SWEEP} x res, crops "
             "at the top-left, centre and bottom-right. Train loss: the mean over the last --log-every "
             "steps.")
    write_table(a, name, rows, ["variant"] + list(columns), note)
    return records


def routes(a):
    return compare(a, "routes", ROUTES, CLASS_COLUMNS, "Conditioning routes, same budget.")


def gates(a):
    return compare(a, "gates", GATE_VARIANTS, CLASS_COLUMNS, "Control gates g(t) of `--cond ours`.")


def padding(a):
    return compare(a, "padding", PADDINGS, TEXT_COLUMNS,
                   "Text padding (`--cond-type text`, built-in encoder).", text=True)
