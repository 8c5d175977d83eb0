"""
The results page (docs/RESULTS.md): the block between its markers is rebuilt from the tables and figures under
docs/experiments/, so no number in it is typed by hand.

    python -m experiments results
"""
import os

BEGIN, END = "<!-- experiments:begin (written by python -m experiments) -->", "<!-- experiments:end -->"


SECTIONS = (("routes", "Conditioning routes", ("size_sweep.png", "loss_routes.png")),
            ("gates", "Control gates", ("loss_gates.png",)),
            ("padding", "Text padding", ("loss_padding.png",)),
            ("transfer", "Resolution transfer, 32 → 64 px", ()),
            ("recipes", "Each published recipe, one command each", ()),
            ("drift", "Semantic drift at convergence, class-correlated sizes",
             ("drift.png", "drift_size_sweep.png")),
            ("drift_gates", "Gate schedules at high rho", ()),
            ("drift_ctrl_scale", "Control guidance at high rho", ("drift_ctrl_scale.png",)),
            ("padding_converged", "Text padding at 2000 steps", ()),
            ("samplers", "Samplers: steps against quality", ("samplers.png",)),
            ("convergence", "Flow samplers: convergence to one answer", ("convergence.png",)))


def update_results(options, page=os.path.join("docs", "RESULTS.md")):
    """Replace the block between BEGIN and END of the results page with every table and figure under
    --docs."""
    parts = []
    for name, title, pngs in SECTIONS:
        md = os.path.join(options.docs, f"{name}.md")
        if not os.path.exists(md):
            continue
        with open(md, encoding="utf-8") as f:
            parts.append(f"#### {title}\n\n" + f.read().strip() + "\n")
        for png in pngs:
            if os.path.exists(os.path.join(options.docs, png)):
                rel = os.path.relpath(os.path.join(options.docs, png),
                                      os.path.dirname(os.path.abspath(page)) or ".")
                parts.append(f"![{png}]({rel})\n")
    with open(page, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: no results block ({BEGIN} ... {END}) to replace")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(page, "w", encoding="utf-8") as f:
        f.write(head + BEGIN + "\n" + "\n".join(parts) + END + tail)
