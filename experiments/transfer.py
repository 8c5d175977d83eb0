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


def transfer(a):
    variants = dict(TRANSFER, **(SCRATCH if a.scratch else {}))
    dirs, results = [], {v: [] for v in variants}
    for seed in a.seeds:
        base = run(f"transfer/base-32px-{a.base_steps}st-s{seed}",
                   run_flags(a, seed) + ["--res", "32", "--base-res", "32", "--steps", str(a.base_steps)],
                   a.out)
        dirs.append(base)
        for variant, flags in variants.items():
            init = [] if variant.startswith("from scratch") else ["--init-from", last_ckpt(base)]
            tag = re.sub(r"[^a-z]+", "-", variant.split(" (")[0]).strip("-")
            ft = run(f"transfer/ft-64px-{tag}-{a.base_steps}-{a.ft_steps}st-b{a.ft_batch}-s{seed}",
                     run_flags(a, seed) + ["--res", "64", "--base-res", "32", "--steps", str(a.ft_steps),
                                           "--warmup",
                                           str(a.ft_warmup), "--batch", str(a.ft_batch)] + flags + init,
                     a.out)
            dirs.append(ft)
            log = train_losses(ft)
            m = measured(ft, "heldout256x8-levels", lambda: split_levels(heldout_loss(ft, per_level=True)))
            results[variant].append(dict(m, seed=seed, train_last=log[max(log)], train_first=log[min(log)]))
    columns = {"held-out loss": "heldout", "held-out, t < 0.5": "heldout_low",
               "held-out, t > 0.5": "heldout_high",
               "train loss, first": "train_first", "train loss, last": "train_last"}
    rows = summarise(results, columns)
    command = (f"python -m experiments transfer --seeds {','.join(map(str, a.seeds))} --base-steps "
               f"{a.base_steps} --ft-steps {a.ft_steps} --ft-batch {a.ft_batch} --shapes-size "
               f"{a.shapes_size}")
    budget = budget_note(a, [run_info(d) for d in dirs], [m["wall_s"] for r in results.values() for m in r],
                         command)
    note = (f"32 -> 64 px. {budget} Shapes preset (XS/4, pixel space, x-prediction, "
            f"shift 3 at the 32 px base): {a.base_steps} steps at 32 px, then {a.ft_steps} steps of batch "
            f"{a.ft_batch} at 64 px (4x the tokens) per variant with the same seed and data order. `shift` "
            "scales the noise shift by sqrt(4) = 2 at 64 px; `no shift` keeps 3 (`--res-shift off`). "
            "Held-out loss: final weights, 256 unseen images x 8 fixed noise levels t = 1/16 .. 15/16 with "
            "fixed noise, in all and per half: one yardstick for every variant, not the sample quality the "
            f"shift aims at. Train loss: mean over the first and the last {a.log_every} steps (each on its "
            "own t distribution).")
    write_table(a, "transfer", rows, ["variant"] + list(columns), note)
    return results
