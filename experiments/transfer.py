"""
Resolution transfer, 32 -> 64 px: positional embeddings resampled or extended, the noise shift scaled with the
token count or not, each fine-tuned from the same 32 px model.

    python -m experiments transfer
"""
import re

from .common import (
    budget_note,
    last_ckpt,
    measured,
    run,
    run_flags,
    run_info,
    summarise,
    train_losses,
    write_table,
)
from .measures import heldout_loss, split_levels

TRANSFER = {  # variant -> flags of the 64 px stage (all from the same 32 px model, except scratch)
    "resample + shift (paper)": ["--pos-mode", "resample"],
    "resample, no shift": ["--pos-mode", "resample", "--res-shift", "off"],
    "extend + shift": ["--pos-mode", "extend"],
    "extend, no shift": ["--pos-mode", "extend", "--res-shift", "off"],
}


SCRATCH = {"from scratch (resample + shift)": ["--pos-mode", "resample"]}  # with --scratch


def transfer(options):
    variants = dict(TRANSFER, **(SCRATCH if options.scratch else {}))
    dirs, results = [], {v: [] for v in variants}
    for seed in options.seeds:
        base = run(f"transfer/base-32px-{options.base_steps}st-s{seed}",
                   run_flags(options, seed) + ["--res", "32", "--base-res", "32",
                                               "--steps", str(options.base_steps)],
                   options.out)
        dirs.append(base)
        for variant, flags in variants.items():
            init = [] if variant.startswith("from scratch") else ["--init-from", last_ckpt(base)]
            tag = re.sub(r"[^a-z]+", "-", variant.split(" (")[0]).strip("-")
            name = f"ft-64px-{tag}-{options.base_steps}-{options.ft_steps}st-b{options.ft_batch}-s{seed}"
            fine_tune = ["--res", "64", "--base-res", "32", "--steps", str(options.ft_steps),
                         "--warmup", str(options.ft_warmup), "--batch", str(options.ft_batch)]
            ft = run(f"transfer/{name}", run_flags(options, seed) + fine_tune + flags + init, options.out)
            dirs.append(ft)
            log = train_losses(ft)
            m = measured(ft, "heldout256x8-levels", lambda: split_levels(heldout_loss(ft, per_level=True)))
            results[variant].append(dict(m, seed=seed, train_last=log[max(log)], train_first=log[min(log)]))
    columns = {"held-out loss": "heldout", "held-out, t < 0.5": "heldout_low",
               "held-out, t > 0.5": "heldout_high",
               "train loss, first": "train_first", "train loss, last": "train_last"}
    rows = summarise(results, columns)
    command = (f"python -m experiments transfer --seeds {','.join(map(str, options.seeds))} "
               f"--base-steps {options.base_steps} --ft-steps {options.ft_steps} "
               f"--ft-batch {options.ft_batch} --shapes-size {options.shapes_size}")
    budget = budget_note(options, [run_info(d) for d in dirs],
                         [m["wall_s"] for r in results.values() for m in r], command)
    note = (f"32 -> 64 px. {budget} Shapes preset (XS/4, pixel space, x-prediction, shift 3 at the 32 px "
            f"base): {options.base_steps} steps at 32 px, then {options.ft_steps} steps of batch "
            f"{options.ft_batch} at 64 px (4x the tokens) per variant with the same seed and data order. "
            "`shift` scales the noise shift by sqrt(4) = 2 at 64 px; `no shift` keeps 3 (`--res-shift off`). "
            "Held-out loss: final weights, 256 unseen images x 8 fixed noise levels t = 1/16 .. 15/16 with "
            "fixed noise, in all and per half: one yardstick for every variant, not the sample quality the "
            f"shift aims at. Train loss: mean over the first and the last {options.log_every} steps (each on "
            "its own t distribution).")
    write_table(options, "transfer", rows, ["variant"] + list(columns), note)
    return results
