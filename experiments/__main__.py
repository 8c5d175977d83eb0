"""
python -m experiments NAME: run one of the paper's comparisons at small scale (experiments/__init__.py lists
them).
"""
import argparse
import os

from checks import at_least, check_output, number_list, seed

from . import __doc__ as OVERVIEW
from .common import DOCS
from .compare import gates, padding, routes
from .drift import drift_experiment
from .figures import figures
from .mechanism import mechanism
from .padding import padding_converged
from .recipes import recipes
from .results import update_results
from .samplers import convergence, samplers
from .transfer import transfer

EXPERIMENTS = {"routes": routes, "gates": gates, "padding": padding, "transfer": transfer,
               "drift": drift_experiment,
               "padding-converged": padding_converged, "recipes": recipes, "figures": figures,
               "mechanism": mechanism, "samplers": samplers, "convergence": convergence}


def check_outputs(options):
    """Where the experiments write, checked before any work (checks.check_output): --out and --docs are
    folders, --results an existing Markdown page (its results block is rebuilt)."""
    check_output(options.out, "folder", flag="--out")
    check_output(options.docs, "folder", flag="--docs")
    check_output(options.results, (".md",), flag="--results")
    if not os.path.isfile(options.results):
        raise SystemExit(f"--results {options.results}: no such page; name the Markdown page whose results "
                         "block is rebuilt (default docs/RESULTS.md)")


def names(text, flag):
    """A comma-separated list of names, or None when the flag is not given; an empty list or name is refused
    (it would select no variant and run nothing)."""
    if text is not None and not all(v.strip() for v in text.split(",")):
        raise SystemExit(f"{flag} {text!r}: an empty name; give comma-separated names as in the tables, or "
                         "leave the flag out for every variant")
    return text.split(",") if text is not None else None


def check_numbers(options):
    """Every number and list before any run, by train.py's and sample.py's rules for the same quantities
    (config.py); the lists are parsed in place."""
    options.seeds = [seed("--seeds", v) for v in number_list(options.seeds, "--seeds", whole=True)]
    options.variants = names(options.variants, "--variants")
    options.gate_variants = names(options.gate_variants, "--gate-variants")
    options.corrs = number_list(options.corrs, "--corrs")
    for corr in options.corrs:  # each is a run's train.py --size-corr
        if not 0 <= corr <= 1:
            raise SystemExit(f"--corrs: {corr:g} is not a probability in [0, 1] (train.py --size-corr)")
    options.ctrl_scales = [at_least("--ctrl-scales", v, 0, " (0 = no control guidance)")
                           for v in number_list(options.ctrl_scales, "--ctrl-scales")]
    at_least("--cfg-scale", options.cfg_scale, 0, " (1 = no guidance)")
    if options.steps is not None:  # None: the experiment's own budget
        at_least("--steps", options.steps, 1)
    for name in ("drift_pairs", "log_every", "per_class", "drift_n", "sample_steps", "base_steps", "ft_steps",
                 "ft_batch", "shapes_size"):
        at_least(f"--{name.replace('_', '-')}", getattr(options, name), 1)
    at_least("--ft-warmup", options.ft_warmup, 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=tuple(EXPERIMENTS) + ("results", "all"))
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--variants", default=None, help="routes / gates / padding / "
                   "drift / recipes: only these variants (comma-separated names as in the tables)")
    p.add_argument("--steps", type=int, default=None, help="steps per run: routes / gates / padding 800, "
                   "drift and padding-converged 2000, recipes 300, samplers 4000")
    p.add_argument("--corrs", default="0,0.9",
                   help="drift: class <-> size correlations rho of the data (train.py --size-corr)")
    p.add_argument("--drift-pairs", type=int, default=100, help="drift: (noise, class) pairs per run")
    p.add_argument("--assemble", action="store_true",
                   help="drift / padding-converged / samplers / convergence: tables and figures "
                   "from the committed records alone; each row takes the seeds that are there (nothing is "
                   "trained or measured)")
    p.add_argument("--ctrl-scales", default="0,1,2,3",
                   help="drift: control guidance scales measured on each run (0 = the sampling default)")
    p.add_argument("--gate-variants", default=None, help="drift: only these "
                   "gate schedules (names as in the table; a single one leaves the gate comparison out)")
    p.add_argument("--log-every", type=int, default=25, help="steps per point of the loss curves")
    p.add_argument("--per-class", type=int, default=10, help="checker: seeds per class (each drawn twice)")
    p.add_argument("--drift-n", type=int, default=40, help="drift: (noise, class) pairs per sweep")
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps of every evaluation sample")
    p.add_argument("--cfg-scale", type=float, default=2.0,
                   help="semantic guidance of every evaluation sample")
    p.add_argument("--base-steps", type=int, default=400, help="transfer: steps at 32 px")
    p.add_argument("--ft-steps", type=int, default=60, help="transfer: steps at 64 px")
    p.add_argument("--ft-batch", type=int, default=32, help="transfer: batch at 64 px")
    p.add_argument("--ft-warmup", type=int, default=10, help="transfer: warm-up steps at 64 px")
    p.add_argument("--scratch", action="store_true", help="transfer: also train the 64 px model from scratch")
    p.add_argument("--shapes-size", type=int, default=4000, help="distinct training images")
    p.add_argument("--run", default=None, help="convergence: the default run's folder (`python train.py`), "
                   "if trained already; else it is trained into --out")
    p.add_argument("--out", default=os.path.join("runs", "experiments"), help="run folders")
    p.add_argument("--docs", default=DOCS, help="where tables and figures are written")
    p.add_argument("--results", default=os.path.join("docs", "RESULTS.md"), help="the page whose results "
                   "block is rebuilt")
    options = p.parse_args(argv)
    check_numbers(options)
    check_outputs(options)
    options.steps = options.steps or {"drift": 2000, "padding-converged": 2000, "recipes": 300,
                          "samplers": 4000}.get(options.experiment, 800)
    if options.experiment == "all":  # not drift, padding-converged and recipes: hours of CPU at their budgets
        for name in ("routes", "gates", "padding", "transfer", "figures"):
            EXPERIMENTS[name](options)
    elif options.experiment != "results":
        EXPERIMENTS[options.experiment](options)
    update_results(options, options.results)

if __name__ == "__main__":
    main()
