"""
The paper's comparative claims, reproduced at small scale on the embedded `shapes` dataset: every variant is
trained by train.py with the same budget, data and seeds, then measured the same way with the shapes checker.
Tables (Markdown + JSON) and figures (PNG) are written under docs/experiments/, and the results page
docs/RESULTS.md is rebuilt from them, so no number in it is typed by hand. One file per experiment, over
common.py (runs, records, statistics, tables, plots) and measures.py (what is measured on a run):

    python -m experiments routes      # every route of model.ROUTES (--cond): accuracy, control, drift
    python -m experiments gates       # the control gates g(t) of ours: ungated, the default, all cosine
    python -m experiments padding     # text: noisy_replicate vs replicate vs zero padding
    python -m experiments transfer    # 32 -> 64 px: resample vs extend, with and without the shift scaling
    python -m experiments figures     # size-sweep grid (ours vs adaln) and loss curves
    python -m experiments recipes     # each published recipe (train.py --recipe NAME) on shapes
    python -m experiments drift       # at convergence, class <-> size correlated data: routes, gates
    python -m experiments padding-converged   # text padding at the drift budget, 95 % intervals
    python -m experiments samplers    # each DDPM sampler at 5 .. 50 network evaluations
    python -m experiments convergence # flow samplers: distance to a fine solve at 5 .. 200 NFE, by end point
    python -m experiments mechanism   # the README's figure of the mechanism, drawn from the code
    python -m experiments all         # routes, gates, padding, transfer, figures, then the results page
    python -m experiments results     # only the results page, from the tables already written
    python -m experiments.bench       # the training step timed (bench.py's own docstring)
    python -m experiments.report      # experiments.bench's GPU rows, written as one page
    python -m experiments.checkpoint_cost   # what the checkpoint checksum costs at XL/2
    python -m experiments.class_use RUN ...  # by noise level: where a model uses its class, where its loss is

Defaults: seeds 0,1,2 and 800 steps per run (about 6 minutes per run on one CPU thread). Each finished run's
measurements are a committed record (docs/experiments/*_runs/*.json): a table is assembled from them, and only
a run without a record is trained, so an interrupted experiment continues where it stopped, two experiments
can run side by side in separate processes, and a new variant trains only itself. The run folders themselves
(under --out) are the machine's: delete one to train it again.
"""
