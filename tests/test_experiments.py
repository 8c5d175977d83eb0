"""python -m experiments: the drift measure on models whose behaviour is known, and a whole comparison at toy
size from training to the results page, assembled again from its committed records alone."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import experiments.__main__ as experiments
from build import SourceFacts, make_diffusion
from checkpoint import checkpoints_in
from conditioning import SIGNAL
from config import get_args
from conftest import facts_of
from diffusion import Sampling
from experiments import common, compare, drift, measures, padding, report, results, samplers, transfer
from latents import Autoencoder, to_uint8
from model import ROUTES
from shapes import COLOURS, SHAPES, render_shape

#################################################################################
#                        content_drift and drift                                #
#################################################################################


def test_content_drift_counts_sweeps_whose_content_changes():
    sweeps = [[{"label": 1}, {"label": 1}, {"label": 1}],  # stable
              [{"label": 1}, {"label": 2}, {"label": 1}],  # changed once
              [{"label": 3}, {"label": 3}, {"label": 4}]]  # changed at the end
    assert measures.content_drift(sweeps, "label") == pytest.approx(2 / 3)
    assert measures.content_drift(sweeps[:1], "label") == 0.0


class PaintModel(torch.nn.Module):
    """An x-predicting stand-in that paints a fixed red shape. When the size condition says "upscaled from
    less than 2 x res" it paints a square instead of a circle (`size_changes_class`) or a blurred circle
    (`size_blurs`). The sampler's last Euler step lands exactly on the x-prediction, so the samples are these
    paintings."""

    def __init__(self, res, size_changes_class=False, size_blurs=False):
        super().__init__()
        self.res, self.size_changes_class, self.size_blurs = res, size_changes_class, size_blurs
        self.images = {}
        for k in (0, 1):  # circle, square
            alpha = torch.from_numpy(render_shape(SHAPES[k][1], res, 0.3 * res))[None]
            fg = torch.tensor(COLOURS["red"], dtype=torch.float32).view(3, 1, 1) / 255
            self.images[k] = Autoencoder("none").encode(to_uint8((alpha * fg + (1 - alpha) * 0.1)[None]))[0]

    def forward(self, x, t, y, ctrl, ctrl_drop=None, sem_drop=None):
        small = ctrl[:, SIGNAL["orig_h"]] < 2 * self.res
        out = torch.stack([self.images[int(i)] for i in (small & self.size_changes_class).long()])
        if self.size_blurs:
            blurred = torch.nn.functional.avg_pool2d(out, 5, stride=1, padding=2, count_include_pad=False)
            out = torch.where(small.view(-1, 1, 1, 1), blurred, out)
        return out


@pytest.mark.parametrize("behaviour", ["ignores size", "size changes class", "size blurs"])
def test_drift_measures_content_change_and_sharpness_under_the_size_condition(behaviour):
    args = get_args(["--dataset", "shapes"])
    model = PaintModel(args.res, behaviour == "size changes class", behaviour == "size blurs")
    out = measures.drift(model, args, facts_of(args), n=4, cfg_scale=2.0, steps=3)
    assert out["size_drift_class"] == (1.0 if behaviour == "size changes class" else 0.0)
    # the crop never changes the painting
    assert out["crop_drift_class"] == 0.0 and out["crop_drift_colour"] == 0.0
    assert out["size_drift_colour"] == 0.0
    assert out["size_drift_class"] == 0.0 or behaviour == "size changes class"
    # the same circle: sharper at 2 x res only when small ones are blurred
    if behaviour != "size changes class":
        assert out["size_acc"] == (1.0 if behaviour == "size blurs" else 0.0)


def test_size_sweep_pairs_reads_drift_and_the_pull_toward_a_size_group():
    args = get_args(["--dataset", "shapes"])
    facts = facts_of(args)
    # small originals (0.5 and 1 x res) paint a square (class 1, the large-size group), 2 x res a circle
    # (class 0)
    pairs = drift.size_sweep_pairs(PaintModel(args.res, size_changes_class=True), args, facts, n=4,
                                   sampling=Sampling(steps=3, scale=2.0))
    assert [p["class drift"] for p in pairs] == [1.0] * 4 and [p["colour drift"] for p in pairs] == [0.0] * 4
    assert [p["class acc"] for p in pairs] == [1 / 3, 2 / 3, 0.0, 0.0]  # classes 0, 1, 2, 3 in turn
    # the push goes against the groups: never toward the typical group, always out of one's own
    assert [p["pulled"] for p in pairs] == [0.0] * 4
    assert [p["pulled (same-size base)"] for p in pairs] == [1.0] * 4
    steady = drift.size_sweep_pairs(PaintModel(args.res, size_blurs=True), args, facts, n=2,
                                    sampling=Sampling(steps=3, scale=2.0))
    assert all(p["class drift"] == 0.0 and p["size acc"] == 1.0 for p in steady)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(0)
    few = [list(rng.random(10) < 0.3) for _ in range(3)]
    many = [list(rng.random(1000) < 0.3) for _ in range(3)]
    a, b = common.bootstrap(few), common.bootstrap(many)
    for m, data in ((a, few), (b, many)):
        assert m["lo"] <= m["mean"] <= m["hi"]
        assert m["mean"] == pytest.approx(np.mean(np.concatenate(data)))
        assert m["per_seed"] == pytest.approx([np.mean(v) for v in data])
    assert b["hi"] - b["lo"] < a["hi"] - a["lo"]
    assert common.bootstrap([[1.0, 1.0], [1.0]]) == dict(mean=1.0, lo=1.0, hi=1.0, per_seed=[1.0, 1.0])


def test_bootstrap_difference_resolves_a_real_gap_and_not_noise():
    rng = np.random.default_rng(0)
    draw = lambda p: [list((rng.random(100) < p).astype(float)) for _ in range(3)]
    low, same, high = draw(0.1), draw(0.1), draw(0.3)
    gap = common.bootstrap_difference(high, low)
    assert gap["mean"] == pytest.approx(np.mean(np.concatenate(high)) - np.mean(np.concatenate(low)))
    assert 0 < gap["lo"] <= gap["mean"] <= gap["hi"]  # 0.3 against 0.1 over 300 pairs: resolved
    noise = common.bootstrap_difference(same, low)
    assert noise["lo"] < 0 < noise["hi"]  # the same rate twice: the interval holds 0
    flipped = common.bootstrap_difference(low, high)
    assert flipped["mean"] == pytest.approx(-gap["mean"]) and flipped["hi"] < 0


@pytest.mark.slow
def test_drift_commits_each_run_and_a_rerun_only_assembles(tmp_path, monkeypatch):
    monkeypatch.setattr(drift, "DRIFT_VARIANTS", {"ours": [], "adaln (DiT)": ["--cond", "adaln"]})
    monkeypatch.setattr(drift, "DRIFT_GATES",
                        {"size cosine (default)": [], "ungated": ["--gate-size", "none"]})
    argv = ["drift", "--seeds", "0,1", "--steps", "2", "--corrs", "0,1", "--per-class", "1", "--drift-pairs",
            "3", "--ctrl-scales", "0,2", "--sample-steps", "2", "--shapes-size", "64", "--out",
            str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--results", str(tmp_path / "none.md")]
    (tmp_path / "none.md").write_text(f"{results.BEGIN}\n{results.END}\n")
    experiments.main(argv)
    rows = json.loads((tmp_path / "docs" / "drift.json").read_text())
    assert [(r["variant"], r["corr"]) for r in rows] == [("ours", 0), ("adaln (DiT)", 0), ("ours", 1),
                                                         ("adaln (DiT)", 1)]
    for r in rows:
        assert r["seeds"] == [0, 1] and r["steps"] == 2
        for m in drift.DRIFT_METRICS:
            assert r["metrics"][m]["lo"] <= r["metrics"][m]["mean"] <= r["metrics"][m]["hi"]
            assert len(r["metrics"][m]["per_seed"]) == 2
    runs = sorted(p.name for p in (tmp_path / "docs" / "drift_runs").iterdir())
    assert len(runs) == 2 * 2 * 2 + 2  # routes x rho x seeds, and the ungated gates at rho 1
    record = json.loads((tmp_path / "docs" / "drift_runs" / "cond-adaln-rho1-2st-s1.json").read_text())
    assert set(record["ctrl_scales"]) == {"0.0"} and len(record["ctrl_scales"]["0.0"]) == 3
    ours = json.loads((tmp_path / "docs" / "drift_runs" / "default-rho1-2st-s1.json").read_text())
    # the control-guidance sweep: ours at the highest rho only
    assert set(ours["ctrl_scales"]) == {"0.0", "2.0"}
    scales = json.loads((tmp_path / "docs" / "drift_ctrl_scale.json").read_text())
    assert [r["ctrl_scale"] for r in scales] == [0.0, 2.0]
    contrasts = json.loads((tmp_path / "docs" / "drift_contrasts.json").read_text())
    assert [(c["comparison"], c["corr"]) for c in contrasts] == [
        ("adaln (DiT) − ours", 0), ("adaln (DiT) − ours", 1), ("ungated − size cosine (default)", 1)]
    row = lambda variant, corr: next(r for r in rows if (r["variant"], r["corr"]) == (variant, corr))
    colour = lambda variant, corr: np.mean(row(variant, corr)["metrics"]["colour drift"]["per_seed"])
    gap = contrasts[1]["metrics"]["colour drift"]["mean"]
    assert gap == pytest.approx(colour("adaln (DiT)", 1) - colour("ours", 1))
    # bars, curves, grid
    for png in ("drift.png", "drift_gates.png", "drift_ctrl_scale.png", "drift_size_sweep.png"):
        assert Image.open(tmp_path / "docs" / png).size[0] > 300
    # the run folders are gone (another machine): the committed records are enough, nothing trains again
    import shutil
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(drift, "shapes_run", lambda *a: pytest.fail("trained again"))
    experiments.main(argv)
    # the same rows; only ours at rho 1 took longer to measure in all (its control scales came after the first
    # table)
    same = lambda rows: [{k: v for k, v in r.items() if k != "measure_s"} for r in rows]
    assert same(json.loads((tmp_path / "docs" / "drift.json").read_text())) == same(rows)
    # a record of other settings is not silently mixed in
    with pytest.raises(SystemExit, match="measured with"):
        experiments.main([v if v != "3" else "4" for v in argv])
    # --assemble: a seed nobody has run yet is left out of its rows instead of being trained
    seven = list(argv)
    seven[seven.index("--seeds") + 1] = "0,1,7"
    experiments.main(seven + ["--assemble"])
    assembled = json.loads((tmp_path / "docs" / "drift.json").read_text())
    assert [r["seeds"] for r in assembled] == [[0, 1]] * 4
    assert [r["metrics"] for r in assembled] == [r["metrics"] for r in rows]
    assert "--assemble" in (tmp_path / "docs" / "drift.md").read_text()


#################################################################################
#              The variants an experiment runs are the model's own              #
#################################################################################


def variant_tables():
    """{where it is written: {variant: train.py flags}} for every list of variants an experiment runs."""
    return {"experiments/compare.py COMPARED_ROUTES": compare.COMPARED_ROUTES,
            "experiments/compare.py GATE_VARIANTS": compare.GATE_VARIANTS,
            "experiments/compare.py PADDINGS": compare.PADDINGS,
            "experiments/drift.py DRIFT_VARIANTS": drift.DRIFT_VARIANTS,
            "experiments/drift.py DRIFT_GATES": drift.DRIFT_GATES,
            "experiments/samplers.py MODELS": samplers.MODELS,
            "experiments/transfer.py TRANSFER": transfer.TRANSFER}


def test_every_variant_is_a_configuration_train_py_accepts():
    """Each route, gate schedule, padding or other value a variant names is one of config's choices (for
    routes and gates: model.ROUTES and conditioning.GATES), so a renamed or removed one fails here; the
    performance report's rows pass through experiments.bench."""
    from experiments import bench
    tables = {**{where: (table, get_args) for where, table in variant_tables().items()},
              "experiments/report.py ROWS": ({label: cpu for label, _, cpu in report.ROWS}, bench.get_args)}
    for where, (table, parse) in tables.items():
        for variant, flags in table.items():
            try:
                parse(flags)
            except SystemExit as e:
                pytest.fail(f"{where}: variant {variant!r} runs {flags}, which train.py refuses ({e}); "
                            "change that line to a value train.py has")


def test_the_routes_comparison_runs_every_route_and_drift_a_named_subset():
    runs = [get_args(flags).cond for flags in compare.COMPARED_ROUTES.values()]
    assert sorted(runs) == sorted(ROUTES), "experiments/compare.py COMPARED_ROUTES must cover model.ROUTES"
    assert list(compare.COMPARED_ROUTES) == [common.ROUTE_LABELS[c] for c in ("ours", "adaln", "xattn",
                                                                             "mmdit")]
    for name in drift.DRIFT_ROUTES:
        assert name in ROUTES, (f"experiments/drift.py DRIFT_ROUTES names {name!r}, which model.ROUTES does "
                                "not have: rename or remove it on that line")
    for name in common.ROUTE_LABELS:
        assert name in ROUTES, (f"experiments/common.py ROUTE_LABELS names {name!r}, which model.ROUTES does "
                                "not have: rename or remove its entry")
    # the route train.py runs by default keeps its records' name ("default"): no flag
    assert compare.COMPARED_ROUTES["ours"] == []
    assert drift.DRIFT_VARIANTS["adaln (DiT)"] == ["--cond", "adaln"]


def test_a_new_route_enrols_in_the_routes_comparison_but_not_in_drift(monkeypatch):
    monkeypatch.setitem(ROUTES, "ours_again", ROUTES["ours"])
    variants = common.route_variants(ROUTES)
    assert list(variants)[-1] == "ours_again" and variants["ours_again"] == ["--cond", "ours_again"]
    assert "ours_again" not in common.route_variants(drift.DRIFT_ROUTES)


def test_the_default_gate_variants_are_the_default_gates():
    """The variants labelled "(default)" run no gate flag, so their label holds only while conditioning's
    DEFAULT_GATES are what it says: the size group cosine, the others ungated."""
    from conditioning import DEFAULT_GATES
    assert DEFAULT_GATES == {"size": "cosine", "crop": "none", "flip": "none"}, (
        "conditioning.DEFAULT_GATES changed: rename the \"size cosine (default)\" variants of "
        "experiments/compare.py GATE_VARIANTS and experiments/drift.py DRIFT_GATES")
    for table in (compare.GATE_VARIANTS, drift.DRIFT_GATES):
        assert table["size cosine (default)"] == []


#################################################################################
#                      A comparison end to end at toy size                      #
#################################################################################

@pytest.mark.slow
def test_routes_trains_measures_and_writes_tables_figures_and_results_page(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "COMPARED_ROUTES", {"ours": [], "adaln (DiT)": ["--cond", "adaln"]})
    page = tmp_path / "RESULTS.md"
    page.write_text(f"# x\n\n{results.BEGIN}\nold text\n{results.END}\n\nkept\n")
    argv = ["routes", "--seeds", "0,1", "--steps", "2", "--log-every", "1", "--per-class", "1", "--drift-n",
            "2", "--sample-steps", "2", "--shapes-size", "64", "--out", str(tmp_path / "runs"), "--docs",
            str(tmp_path / "docs"), "--results", str(page)]
    experiments.main(argv)
    rows = json.loads((tmp_path / "docs" / "routes.json").read_text())
    assert [r["variant"] for r in rows] == ["ours", "adaln (DiT)"]
    for r in rows:
        assert [m["seed"] for m in r["per_seed"]] == [0, 1]
        accs = [m["class_acc"] for m in r["per_seed"]]
        assert r["class acc"] == f"{np.mean(accs):.3f} ± {np.std(accs):.3f}"  # the table is the measurement
        assert all(0 <= m["size_drift_class"] <= 1 for m in r["per_seed"])
    md = (tmp_path / "docs" / "routes.md").read_text()
    assert "python -m experiments routes --seeds 0,1 --steps 2" in md
    assert f"4 runs on {common.device_name()}" in md
    text = page.read_text()
    assert "old text" not in text and "| ours |" in text and text.endswith("kept\n")

    # a second call trains nothing and measures nothing again: the same numbers come back from the run folders
    stamp = {p: os.path.getmtime(p) for p in (tmp_path / "runs").rglob("*.pt")}
    experiments.main(argv)
    assert json.loads((tmp_path / "docs" / "routes.json").read_text()) == rows
    assert stamp == {p: os.path.getmtime(p) for p in (tmp_path / "runs").rglob("*.pt")}
    assert len(list((tmp_path / "docs" / "routes_runs").iterdir())) == 4  # one committed record per run

    # a new variant trains only itself: the others come from their records
    trained = []
    real_run = compare.shapes_run
    monkeypatch.setattr(compare, "shapes_run", lambda a, flags,
                        seed: trained.append(flags) or real_run(a, flags, seed))
    monkeypatch.setattr(compare, "COMPARED_ROUTES",
                        {**compare.COMPARED_ROUTES, "xattn (PixArt-α)": ["--cond", "xattn"]})
    experiments.main(argv)
    assert trained == [["--cond", "xattn"]] * 2
    assert json.loads((tmp_path / "docs" / "routes.json").read_text())[:2] == rows

    # figures from the tables: the size sweep (two panels of 6 classes x 5 sizes, 3x upscaled) and the loss
    # curves
    experiments.main(["figures"] + argv[1:])
    w, h = Image.open(tmp_path / "docs" / "size_sweep.png").size
    assert (w, h) == (2 * 5 * (72 + 2) + 12, 18 + 6 * (72 + 2) + 16)
    assert Image.open(tmp_path / "docs" / "loss_routes.png").size == (640, 400)
    assert "size_sweep.png" in page.read_text()
    curve = common.mean_curve(rows[0]["per_seed"])
    assert sorted(curve) == [1, 2]
    assert curve[2] == pytest.approx(np.mean([m["curve"]["2"] for m in rows[0]["per_seed"]]))


@pytest.mark.slow
def test_padding_measures_text_models_on_held_out_wordings(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "PADDINGS", {"zero": ["--cond-type", "text", "--text-pad", "zero"]})
    page = tmp_path / "RESULTS.md"
    page.write_text(f"{results.BEGIN}\n{results.END}\n")
    experiments.main(["padding", "--seeds", "0", "--steps", "2", "--per-class", "1", "--sample-steps", "2",
                      "--shapes-size", "64", "--out", str(tmp_path / "runs"), "--docs",
                      str(tmp_path / "docs"), "--results", str(page)])
    (row,) = json.loads((tmp_path / "docs" / "padding.json").read_text())
    m = row["per_seed"][0]
    assert 0 <= m["colour_acc"] <= 1 and np.isfinite(m["caption_loss"])
    assert m["caption_gain"] != 0.0  # the null prompt is a different input from the held-out captions
    assert "size_drift_class" not in m  # no drift sweep for text models
    assert row["null − caption loss"] == f"{m['caption_gain']:.3f}"


@pytest.mark.slow
def test_transfer_fine_tunes_each_variant_from_one_base_and_splits_the_held_out_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "TRANSFER", {k: v for k, v in transfer.TRANSFER.items() if "resample" in k})
    page = tmp_path / "RESULTS.md"
    page.write_text(f"{results.BEGIN}\n{results.END}\n")
    experiments.main(["transfer", "--seeds", "0", "--base-steps", "2", "--ft-steps", "2", "--ft-batch", "4",
                      "--ft-warmup",
                      "1", "--log-every", "1", "--shapes-size", "128", "--out", str(tmp_path / "runs"),
                      "--docs", str(tmp_path / "docs"), "--results", str(page)])
    table = json.loads((tmp_path / "docs" / "transfer.json").read_text())
    rows = {r["variant"]: r["per_seed"][0] for r in table}
    assert list(rows) == ["resample + shift (paper)", "resample, no shift"]
    for m in rows.values():
        assert m["heldout"] == pytest.approx((m["heldout_low"] + m["heldout_high"]) / 2)
    alphas = {}
    for run in (tmp_path / "runs" / "transfer").glob("ft-*/0*"):
        ckpt = torch.load(checkpoints_in(str(run))[0], weights_only=False)
        args, facts = argparse.Namespace(**ckpt["args"]), SourceFacts(**ckpt["facts"])
        assert (facts.res, facts.base_res) == (64, 32)  # the base grid comes from the 32 px checkpoint
        alphas[args.res_shift] = make_diffusion(args, facts).alpha
    # shift 3 x sqrt(4 x the tokens) vs 3
    assert alphas == {"on": pytest.approx(6.0), "off": pytest.approx(3.0)}


@pytest.mark.slow
def test_recipes_trains_each_recipe_and_evaluates_with_its_own_sampler(tmp_path, monkeypatch):
    import config

    monkeypatch.setattr(config, "RECIPES",
                        {**config.RECIPES,
                         **{k: dict(config.RECIPES[k], sample_steps=4) for k in ("dit", "ldm")}})
    (tmp_path / "R.md").write_text(f"{results.BEGIN}\n{results.END}\n")
    experiments.main(["recipes", "--variants", "dit,ldm", "--seeds", "0", "--steps", "2", "--per-class", "1",
                      "--shapes-size", "64", "--out", str(tmp_path / "runs"), "--docs",
                      str(tmp_path / "docs"), "--results", str(tmp_path / "R.md")])
    rows = json.loads((tmp_path / "docs" / "recipes.json").read_text())
    assert [r["recipe"] for r in rows] == ["dit", "ldm"]
    assert rows[0]["evaluated with"] == "ddpm 4 steps, guidance 1.5"  # each recipe's sampler and guidance
    assert rows[1]["evaluated with"] == "ddim 4 steps, guidance 1.5"
    m = rows[1]["per_seed"][0]
    assert 0 <= m["class_acc"] <= 1 and 0 <= m["trained_class_acc"] <= 1 and np.isfinite(m["train_loss"])
    assert "| dit |" in (tmp_path / "R.md").read_text()


@pytest.mark.slow
def test_padding_converged_commits_per_sample_outcomes_with_intervals(tmp_path, monkeypatch):
    monkeypatch.setattr(padding, "PADDINGS", {"zero": ["--cond-type", "text", "--text-pad", "zero"]})
    argv = ["padding-converged", "--seeds", "0,1", "--steps", "2", "--per-class", "1", "--sample-steps", "2",
            "--shapes-size", "64", "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"),
            "--results", str(tmp_path / "R.md")]
    (tmp_path / "R.md").write_text(f"{results.BEGIN}\n{results.END}\n")
    experiments.main(argv)
    (row,) = json.loads((tmp_path / "docs" / "padding_converged.json").read_text())
    record = json.loads((tmp_path / "docs" / "padding_runs" / "cond-type-text-text-pad-zero-2st-s1.json")
                        .read_text())
    outcomes = record["eval"]["per_sample"]
    assert len(outcomes["class_ok"]) == len(outcomes["colour_ok"]) == 10 * 1 * 2  # classes x seeds x flips
    assert np.mean(outcomes["colour_ok"]) == pytest.approx(record["eval"]["colour_acc"])
    m = row["metrics"]["class + colour acc"]
    assert m["lo"] <= m["mean"] <= m["hi"] and len(m["per_seed"]) == 2
    monkeypatch.setattr(padding, "shapes_run", lambda *a: pytest.fail("trained again"))
    experiments.main(argv)  # the committed records are enough
    assert json.loads((tmp_path / "docs" / "padding_converged.json").read_text()) == [row]
    experiments.main(argv + ["--assemble", "--seeds", "0,1,2"])  # seed 2 has no record: the row keeps 0 and 1
    (assembled,) = json.loads((tmp_path / "docs" / "padding_converged.json").read_text())
    assert assembled["seeds"] == [0, 1] and assembled["metrics"] == row["metrics"]
    assert "--assemble --seeds 0,1,2" in (tmp_path / "docs" / "padding_converged.md").read_text()
    # against the default: here the same runs under two names, so the difference is 0 and its interval holds
    # it
    monkeypatch.setattr(padding, "PADDINGS",
                        {"noisy_replicate (default)": padding.PADDINGS["zero"],
                         "zero": padding.PADDINGS["zero"]})
    experiments.main(argv + ["--assemble"])
    default, zero = json.loads((tmp_path / "docs" / "padding_converged.json").read_text())
    assert "vs_default" not in default and zero["vs_default"]["mean"] == 0
    assert zero["vs_default"]["lo"] <= 0 <= zero["vs_default"]["hi"]
    assert ("zero − noisy_replicate (default), class + colour acc: 0.000 ["
            in (tmp_path / "docs" / "padding_converged.md").read_text())


@pytest.mark.slow
def test_convergence_measures_each_end_point_against_a_fine_solve_on_its_own_grid(tmp_path, monkeypatch):
    """experiments convergence on a 2-step run: a record per end point and per graded cell; Heun at the fine
    solve's own step count is at distance 0 from it (the same grid, the same end point); a rerun with the run
    folder gone only assembles."""
    import train
    run_dir = train.main(["--steps", "2", "--shapes-size", "64", "--eval-per-class", "0", "--sample-every",
                          "-1", "--out", str(tmp_path / "runs")])
    monkeypatch.setattr(samplers, "T_MINS", (0.0, 0.05))
    monkeypatch.setattr(samplers, "CHECKED", (0.0, 0.05))
    monkeypatch.setattr(samplers, "T_MIN", 0.05)
    monkeypatch.setattr(samplers, "CONVERGENCE_NFES", (2, 3))
    monkeypatch.setattr(samplers, "FINE", ("heun", 2))  # 3 network evaluations: Heun's cell at 3 NFE
    argv = ["convergence", "--per-class", "1", "--run", run_dir, "--docs", str(tmp_path / "docs"),
            "--results", str(tmp_path / "R.md")]
    (tmp_path / "R.md").write_text(f"{results.BEGIN}\n{results.END}\n")
    experiments.main(argv)
    table = json.loads((tmp_path / "docs" / "convergence.json").read_text())
    rows = {(r["t_min"], r["sampler"], r["nfe"]): r for r in table["rows"]}
    assert sorted({k[0] for k in rows}) == [0.0, 0.05] and len(rows) == 2 * 3 * 2
    for (t_min, method, nfe), r in rows.items():
        assert (r["rmse"] == 0) == (method == "heun" and nfe == 3), (t_min, method, nfe, r["rmse"])
        assert 0 <= r["class_acc"]["lo"] <= r["class_acc"]["mean"] <= r["class_acc"]["hi"] <= 1
    assert 0 <= table["fine_class_acc"]["mean"] <= 1
    # a distance record per end point, a checker record per graded cell (the fine solve's is Heun's at 3 NFE)
    assert len(os.listdir(tmp_path / "docs" / "convergence_runs")) == 2 + 2 * 3 * 2
    assert Image.open(tmp_path / "docs" / "convergence.png").size[0] > 300
    assert "#### Flow samplers: convergence" in (tmp_path / "R.md").read_text()
    import shutil
    shutil.rmtree(tmp_path / "runs")
    experiments.main(argv)  # the committed records are enough: no model is loaded
    assert json.loads((tmp_path / "docs" / "convergence.json").read_text()) == table
