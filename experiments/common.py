"""
What every experiment shares: running a variant once (train.py into its own folder), the committed per-run
records that let a table be assembled without training again, bootstrap statistics, tables and plots.
"""
import json
import os
import time

import numpy as np
import torch

import train
from checkpoint import atomic_write, checkpoints_in
from config import get_args
from diffusion import Sampling

#################################################################################
#                                Running variants                               #
#################################################################################

DOCS = os.path.join("docs", "experiments")


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} "
            f"thread{'s' * (torch.get_num_threads() > 1)})")


def run(name, argv, out):
    """Train `argv` into out/name (once); return the run folder."""
    folder = os.path.join(out, name)
    done = os.path.join(folder, "done.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            return json.load(f)["run_dir"]
    t0 = time.time()
    run_dir = train.main(argv + ["--out", folder])
    with open(done, "w", encoding="utf-8") as f:
        json.dump(dict(run_dir=run_dir, wall_s=time.time() - t0, argv=argv, device=device_name()), f)
    return run_dir


def run_info(run_dir):
    with open(os.path.join(os.path.dirname(run_dir), "done.json"), encoding="utf-8") as f:
        return json.load(f)


def last_ckpt(run_dir):
    return checkpoints_in(run_dir)[0]


def train_losses(run_dir):
    """{step: mean training loss over the --log-every steps before it}."""
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def measured(run_dir, key, fn):
    """fn() once per (run, measurement settings): the result is kept in the run folder."""
    path = os.path.join(run_dir, "measurements.json")
    cache = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    if key not in cache:
        t0 = time.time()
        cache[key] = dict(fn(), wall_s=time.time() - t0)
        atomic_write(path, lambda f: f.write(json.dumps(cache, indent=1).encode("utf-8")))
    return cache[key]


def run_flags(options, seed):
    """What every experiment run shares: shapes data, its seed, the loss-curve resolution, and no end-of-run
    work (the experiment measures it)."""
    return ["--dataset", "shapes", "--shapes-size", str(options.shapes_size), "--seed", str(seed),
            "--log-every", str(options.log_every), "--eval-per-class", "0", "--sample-every", "-1",
            "--ckpt-every", "100000"]


# How the tables name the routes of model.ROUTES, in the order they list them: each baseline with the
# published recipe it reproduces in brackets. A route without an entry is named by itself and listed last.
ROUTE_LABELS = {"ours": "ours", "adaln": "adaln (DiT)", "xattn": "xattn (PixArt-α)", "mmdit": "mmdit (SD3)"}


def route_variants(conds):
    """{table label: train.py flags} of these routes of model.ROUTES, in the tables' order. The route train.py
    runs by default takes no flag, so that its run folders and records keep their name ("default",
    flag_tag)."""
    default, order = get_args([]).cond, list(ROUTE_LABELS)
    ranked = sorted(conds, key=lambda cond: order.index(cond) if cond in order else len(order))
    return {ROUTE_LABELS.get(cond, cond): [] if cond == default else ["--cond", cond] for cond in ranked}


def evaluation_sampling(options, ctrl=0.0):
    """How every evaluation sample is drawn: --sample-steps Euler steps at semantic guidance --cfg-scale, and
    control guidance `ctrl`."""
    return Sampling(steps=options.sample_steps, scale=options.cfg_scale, ctrl=ctrl)


def flag_tag(flags):
    """A variant's flags as a name for its run folder and records: ["--cond", "adaln"] -> "cond-adaln"."""
    return "-".join(f.lstrip("-") for f in flags) or "default"


def shapes_run(options, flags, seed):
    """The run of one variant and seed: the shapes preset with the experiment's budget (same data and order
    for every variant of a seed)."""
    return run(f"shapes/{flag_tag(flags)}-{options.steps}st-s{seed}",
               run_flags(options, seed) + ["--steps", str(options.steps)] + flags, options.out)


#################################################################################
#                    Committed records: one JSON file per run                   #
#################################################################################


def committed_record(path, key):
    """The record committed at `path` (None when there is none), refused if it was measured with other
    settings."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record["key"] != key:
        raise SystemExit(f"{path} was measured with {record['key']}, not {key}: move it aside to remeasure")
    return record


def commit_record(path, record):
    """Write a run's record atomically (a stopped process leaves the old file or none, never half of one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(record).encode("utf-8")))
    return record


#################################################################################
#                                   Statistics                                  #
#################################################################################


def resampled_means(per_seed, rng, n):
    """n bootstrap means of per_seed, a list (seeds) of lists (pairs) of values: seeds drawn with replacement,
    then the pairs within each drawn seed."""
    arrays = [np.asarray(v, dtype=np.float64) for v in per_seed]
    stats = np.empty(n)
    for b in range(n):
        drawn = [arrays[i] for i in rng.integers(len(arrays), size=len(arrays))]
        stats[b] = np.mean(np.concatenate([v[rng.integers(len(v), size=len(v))] for v in drawn]))
    return stats


def bootstrap(per_seed, n=2000, seed=0):
    """per_seed: a list (seeds) of lists (pairs) of values -> mean, 95 % interval and the per-seed means."""
    lo, hi = np.percentile(resampled_means(per_seed, np.random.default_rng(seed), n), [2.5, 97.5])
    return dict(mean=float(np.mean(np.concatenate(per_seed))), lo=float(lo), hi=float(hi),
                per_seed=[float(np.mean(v)) for v in per_seed])


def bootstrap_difference(first, second, n=2000, seed=0):
    """mean(first) - mean(second) and its 95 % interval, each side resampled on its own (they are separate
    runs): an effect against its uncertainty, where two overlapping intervals would leave it open."""
    rng = np.random.default_rng(seed)
    lo, hi = np.percentile(resampled_means(first, rng, n) - resampled_means(second, rng, n), [2.5, 97.5])
    return dict(mean=float(np.mean(np.concatenate(first)) - np.mean(np.concatenate(second))), lo=float(lo),
                hi=float(hi))


def interval(m):
    return f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]" if "lo" in m else f"{m['mean']:.3f}"


def mean_spread(values):
    v = np.array(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def summarise(variants, columns):
    """variants: {name: [per-seed dict]} -> table rows with mean ± std over seeds per column (label ->
    key)."""
    rows = []
    for name, per_seed in variants.items():
        row = {"variant": name}
        for label, key in columns.items():
            row[label] = mean_spread([m[key] for m in per_seed])
        row["per_seed"] = per_seed
        rows.append(row)
    return rows


#################################################################################
#                                Tables and plots                               #
#################################################################################


def save_table(options, name, rows, md):
    """NAME.json (the rows) and NAME.md (the table, printed too) under --docs; returns the Markdown."""
    os.makedirs(options.docs, exist_ok=True)
    with open(os.path.join(options.docs, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(options.docs, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return md


def write_table(options, name, rows, columns, note):
    """rows: list of dicts (per variant: column -> str, and 'per_seed' -> raw numbers). Writes NAME.json and
    NAME.md under --docs; returns the Markdown."""
    md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for r in rows:
        md += "| " + " | ".join(str(r[c]) for c in columns) + " |\n"
    return save_table(options, name, rows, md + "\n" + note + "\n")


def budget_note(options, trains, measure_s, command):
    """The command, the machines and the time a table cost: `trains` the runs' run_info records, `measure_s`
    the seconds each measurement took."""
    train_s = sum(t["wall_s"] for t in trains)
    devices = sorted({t.get("device", "unknown") for t in trains})
    return (f"`{command}` -- {len(trains)} runs on {', '.join(devices)}; wall time: training "
            f"{train_s / 60:.0f} min in all ({train_s / len(trains):.0f} s per run), measuring "
            f"{sum(measure_s) / 60:.1f} min. Mean ± std over seeds {','.join(map(str, options.seeds))} (std "
            "over seeds, not a confidence interval).")


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the figures need matplotlib: pip install matplotlib (the tables are written "
                         "without it)")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Lay the figure out, write it to `path` and free it. -> path"""
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_curves(path, title, curves, ylabel="training loss"):
    """curves: {label: {step: value}} -> a line plot (log-scale y), 640 x 400 px."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, c in curves.items():
        steps = sorted(c)
        ax.plot(steps, [c[s] for s in steps], label=label, lw=1.5)
    ax.set(yscale="log", xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(path, title, rows, metrics, group="corr", group_label="rho = {:g}"):
    """rows (drift_rows): one panel per metric, a bar per variant and group (e.g. rho) with its 95 %
    interval."""
    if not rows:  # nothing committed for this table yet
        return None
    plt = pyplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = list(dict.fromkeys(r[group] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.4), dpi=100, squeeze=False)
    width = 0.8 / len(groups)
    for ax, metric in zip(axes[0], metrics):
        for j, g in enumerate(groups):
            cells = [next((r["metrics"][metric] for r in rows if r["variant"] == v and r[group] == g), None)
                     for v in variants]
            xs = [i + (j - (len(groups) - 1) / 2) * width for i, c in enumerate(cells) if c]
            m = [c["mean"] for c in cells if c]
            err = [[c["mean"] - c["lo"] for c in cells if c], [c["hi"] - c["mean"] for c in cells if c]]
            ax.bar(xs, m, width, yerr=err, capsize=3, label=group_label.format(g))
        ax.set_xticks(range(len(variants)), [v.split(" (")[0] for v in variants], rotation=30, fontsize=8)
        ax.set_title(metric, fontsize=9)
        top = max((r["metrics"][metric]["hi"] for r in rows), default=1.0)  # rates near 0 stay readable
        ax.set_ylim(0, 1 if "acc" in metric else min(1.0, max(0.05, 1.25 * top)))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_against(path, title, rows, key, metrics, xlabel):
    """rows: one per value of `key` (e.g. the control guidance scale) -> each metric's mean and 95 % band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    xs = [r[key] for r in rows]
    for metric in metrics:
        cells = [r["metrics"][metric] for r in rows]
        ax.plot(xs, [c["mean"] for c in cells], marker="o", label=metric)
        ax.fill_between(xs, [c["lo"] for c in cells], [c["hi"] for c in cells], alpha=0.2)
    ax.set(xlabel=xlabel, ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def mean_curve(per_seed):
    """The loss curve averaged over seeds (steps every seed logged)."""
    steps = set.intersection(*[set(m["curve"]) for m in per_seed])
    return {int(s): float(np.mean([m["curve"][s] for m in per_seed])) for s in sorted(steps)}
