"""
The performance report: one command that measures what a GPU user asks first -- does the fast path work here,
and how fast is it -- and writes it as one Markdown page.

    python -m experiments.report --out docs/perf.md      # on a GPU: XL/2, about 6 minutes on one H100 / H200
    python -m experiments.report --out /tmp/perf.md      # on a CPU: the same rows at toy size, under a minute

Each row is one experiments.bench run (its own docstring says what is timed and what is not): the measured
matmul peak, training images/s, achieved TFLOP/s, MFU and peak memory of the fast path beside the plain
reference path and their ratio, for XL/2 at 256 px with `--cond ours` and `adaln`; XL/2 at 512 px with and
without `--grad-ckpt`; and sampling images/s (50 Euler steps with guidance, bf16). On a CPU every row runs at
toy size (T/4, 16 and 32 px, a few steps), which is how the command is tested before a GPU is at hand; those
figures say nothing about a GPU. Progress is printed as it goes; the page is written at the end, with the
device, torch and CUDA versions and every row's exact bench command.
"""
import argparse
import os
import platform
import time

import torch

from checks import check_output

from . import bench
from .timed_step import Path, describe

# (row, bench flags on a GPU, the same row's flags on a CPU at toy size)
GPU = ["--dataset", "imagenet", "--model", "XL/2", "--steps", "10", "--warmup", "3"]
CPU = ["--model", "T/4", "--batch", "8", "--steps", "2", "--warmup", "1", "--peak-size", "256"]
ROWS = (
    ("XL/2 256 px, ours", GPU + ["--res", "256", "--batch", "128", "--cond", "ours", "--sample-batch", "64",
                                 "--sample-steps", "50"],
     CPU + ["--res", "16", "--cond", "ours", "--sample-batch", "8", "--sample-steps", "4"]),
    ("XL/2 256 px, adaln (DiT)", GPU + ["--res", "256", "--batch", "128", "--cond", "adaln"],
     CPU + ["--res", "16", "--cond", "adaln"]),
    ("XL/2 512 px, ours", GPU + ["--res", "512", "--batch", "32", "--cond", "ours", "--no-reference"],
     CPU + ["--res", "32", "--cond", "ours", "--no-reference"]),
    ("XL/2 512 px, ours, --grad-ckpt", GPU + ["--res", "512", "--batch", "32", "--cond", "ours",
                                             "--grad-ckpt", "--no-reference"],
     CPU + ["--res", "32", "--cond", "ours", "--grad-ckpt", "--no-reference"]),
)


def row_lines(label, rec):
    """Markdown table lines of one bench record: a line per path."""
    lines = []
    for name in ("fast", "reference"):
        r = rec.get(name)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {label} | {name} | {rec['batch']} | {r['error']} | | | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        ratio = f"{rec['speedup']:.2f}x" if name == "fast" and rec.get("speedup") else ""
        lines.append(f"| {label} | {name}: {describe(Path(**r['settings']))} | {rec['batch']} | "
                     f"{r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['tflops']:.4g} | {mfu} | "
                     f"{r['peak_mem_gib']:.2f} | {ratio} |")
    return lines


def report(out, rows=ROWS):
    cuda = torch.cuda.is_available()
    t0 = time.time()
    records = []
    for label, gpu_flags, cpu_flags in rows:
        flags = gpu_flags if cuda else cpu_flags
        if not cuda:  # name what actually ran
            label = f"toy T/4 {flags[flags.index('--res') + 1]} px, for: {label}"
        print(f"== {label}: python -m experiments.bench {' '.join(flags)}", flush=True)
        records.append((label, flags, bench.main(flags)))
    device = records[0][2]["device"]
    peak = records[0][2]["peak_probe"]
    lines = [
        "# Performance report", "",
        f"`python -m experiments.report --out {out}` on {device} ({platform.machine()}), torch "
        f"{torch.__version__}, CUDA {torch.version.cuda if cuda else 'none'}; "
        f"{(time.time() - t0) / 60:.1f} min. " + ("" if cuda else "A CPU runs every row at toy size (T/4, 16 "
                                                   "and 32 px): these figures test the command, they say "
                                                   "nothing about a GPU."), "",
        "Measured matmul peak: " + "; ".join(f"{k} {v['tflops']:.4g} TFLOP/s (n = {v['n']})"
                                             for k, v in peak.items()) + ". MFU divides the achieved TFLOP/s "
        "(FLOPs counted by FlopCounterMode, forward + backward) by it.", "",
        "| row | path | batch | img/s | step ms | TFLOP/s | MFU | peak mem GiB | fast / reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _, rec in records:
        lines += row_lines(label, rec)
    lines.append("")
    for label, _, rec in records:
        if rec.get("sample"):
            sample = rec["sample"]
            lines.append(f"Sampling ({label}): {sample['steps']} {sample['sampler']} steps, guidance "
                         f"{sample['cfg_scale']:g}, batch {sample['batch']}, {sample['precision']}: "
                         f"{sample['img_per_s']:.2f} images/s.")
    lines += ["", "Each row's command:", ""]
    lines += [f"- {label}: `python -m experiments.bench {' '.join(flags)}`" for label, flags, _ in records]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out} ({(time.time() - t0) / 60:.1f} min)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("docs", "perf.md"), help="the Markdown page to write")
    out = p.parse_args(argv).out
    check_output(out, (".md",))
    return report(out)


if __name__ == "__main__":
    main()
