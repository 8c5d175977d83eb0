"""
The README's figure of the mechanism, drawn from the code so that it stays true to it: the control groups and
their signals (conditioning.CONTROL_GROUPS), the default gate of each group (DEFAULT_GATES), what the `ours`
route adds to the time embedding (model.ROUTES), and every gate schedule g(t) evaluated by conditioning.GATES.

    python -m experiments mechanism      # writes docs/mechanism.png
"""
import os

import torch

from conditioning import CONTROL_GROUPS, DEFAULT_GATES, GATES, gate
from model import ROUTES

from .common import pyplot

BOX = dict(boxstyle="round,pad=0.35", linewidth=1.0)
SEMANTIC, CONTROL, TIME, SHARED = "#dbe9f6", "#fde2c8", "#e3e3e3", "#e2f0d9"


def box(ax, x, y, text, colour, size=8.5):
    ax.text(x, y, text, ha="center", va="center", fontsize=size, bbox=dict(BOX, facecolor=colour))


def arrow(ax, start, end, colour="#555555"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color=colour, lw=1.2))


def diagram(ax):
    """The two paths into one block: semantic tokens into attention, control metadata into adaLN, gated by
    t."""
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    ax.axis("off")
    box(ax, 1.3, 9.0, "class label\nor prompt", SEMANTIC)
    box(ax, 1.3, 6.9, "image latents\n(B, C, H, W)", SHARED)
    box(ax, 4.0, 9.0, "context tokens\n(B, K, D)", SEMANTIC)
    box(ax, 4.0, 6.9, "patches + sin-cos\npositions (B, N, D)", SHARED)
    box(ax, 7.6, 8.0, "joint attention\n(one call over K + N\ntokens, QK-norm)", SHARED)
    arrow(ax, (2.2, 9.0), (3.0, 9.0))
    arrow(ax, (2.2, 6.9), (2.8, 6.9))
    arrow(ax, (5.0, 8.8), (6.5, 8.3))
    arrow(ax, (5.2, 7.1), (6.5, 7.7))
    groups = "\n".join(f"{g}: {', '.join(s)}" for g, s in CONTROL_GROUPS.items())
    box(ax, 1.6, 3.6, f"control metadata\n(as the augmentation\nrecorded it)\n\n{groups}", CONTROL, size=7.5)
    box(ax, 4.6, 4.6, "Fourier features\n-> one MLP per group\n= e_ctrl,k", CONTROL)
    gates = "\n".join(f"g_{g}(t) = {DEFAULT_GATES[g]}" for g in CONTROL_GROUPS)
    box(ax, 4.6, 2.6, f"x gate per group\n{gates}", CONTROL, size=7.5)
    box(ax, 1.6, 0.8, "noise level t\n(1 = noise, 0 = data)", TIME)
    box(ax, 4.6, 0.8, "sinusoid -> MLP\n= e_t", TIME)
    terms = " + ".join(ROUTES["ours"].adaln).replace("gated control", "sum_k g_k(t) e_ctrl,k")
    box(ax, 7.8, 3.0, f"adaLN vector\ne_t + {terms}\n-> shift, scale, gate\nof every block", SHARED, size=8)
    arrow(ax, (3.1, 4.2), (3.6, 4.5))
    arrow(ax, (4.6, 4.0), (4.6, 3.3))
    arrow(ax, (5.9, 2.7), (6.5, 2.9))
    arrow(ax, (2.8, 0.8), (3.7, 0.8))
    arrow(ax, (5.5, 1.0), (6.8, 2.3))
    arrow(ax, (2.6, 1.3), (3.9, 2.1), colour="#b26b00")  # t also drives the gates
    arrow(ax, (7.7, 4.1), (7.7, 6.9))
    ax.text(7.85, 5.5, "modulates", fontsize=7.5, color="#555555")
    ax.set_title("--cond ours: semantics through attention, control through gated adaLN", fontsize=10)


def schedules(ax):
    """Every gate schedule of conditioning.GATES along t, each group's default marked."""
    t = torch.linspace(0, 1, 201)
    defaults = {}
    for group, spec in DEFAULT_GATES.items():
        defaults.setdefault(spec, []).append(group)
    for name in GATES:
        label = f"{name}: {GATES[name].meaning}"
        if name in defaults:
            label += f"  (default of {', '.join(defaults[name])})"
        ax.plot(t, gate(name, t), lw=2.2 if name in defaults else 1.2, label=label)
    ax.set(xlim=(1, 0), ylim=(-0.03, 1.05), xlabel="t the network reads (1 = pure noise -> 0 = data)",
           ylabel="g(t)", title="gate schedules g(t) (conditioning.GATES)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left")


def mechanism(options):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), dpi=100,
                                      gridspec_kw=dict(width_ratios=[1.5, 1]))
    diagram(left)
    schedules(right)
    fig.tight_layout()
    path = os.path.join(os.path.dirname(options.docs.rstrip("/")), "mechanism.png")
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return path
