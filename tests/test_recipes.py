"""--recipe: each published recipe is one flag whose values --print-config shows with where each came from;
the command line beats the recipes (the dataset's own first), which beat the flag defaults, the paper's
ImageNet setting; a value that does not fit is refused with its source named. The pieces recipes switch on
(Adan, min-SNR weighting, the EMA without warm-up, the run's evaluation sampler) do what they say, and every
training command the README and docs/ show parses and starts."""
import dataclasses
import glob
import json
import math
import os
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from conditioning import GATES, parse_gate
from config import RECIPES, get_args
from conftest import ROOT, TINY, assert_resumed_exactly, facts_of, losses
from ddpm import DDPM
from unet import unet_size


def print_config(argv, capsys):
    """--print-config's lines, as {flag: value} (a --no-X flag under its own name) and {flag: where it came
    from}; the warnings about flags that do nothing in the run, which come first, are left out."""
    with pytest.raises(SystemExit) as e:
        get_args(argv + ["--print-config"])
    assert e.value.code == 0
    values, sources = {}, {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("warning: "):
            continue
        option, rest = line.split(None, 1)
        value, source = rest.rsplit(" # ", 1)
        values[option[2:]], sources[option[2:]] = json.loads(value), source.strip()
    return values, sources


#################################################################################
#                  What a recipe sets, and what wins over it                    #
#################################################################################

@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_shows_every_value_the_recipe_sets_and_where_it_came_from(recipe, capsys):
    config, source = print_config(["--dataset", "imagenet", "--recipe", recipe], capsys)
    assert config["recipe"] == [recipe] and source["recipe"] == "command line"
    for key, value in RECIPES[recipe].items():  # keys are the flag names as --help lists them
        assert config[key.replace("_", "-")] == value, key
        assert source[key.replace("_", "-")] == f"recipe {recipe}", key
    assert "print-config" not in config and "beta2" in config and "grad-accum" in config


def test_command_line_beats_the_recipes_which_beat_the_defaults(capsys):
    config, source = print_config(["--dataset", "shapes", "--recipe", "dit", "--lr", "3e-4"], capsys)
    assert (config["lr"], source["lr"]) == (3e-4, "command line")
    assert config["beta2"] == 0.999 and config["ema"] == 0.9999 and config["batch"] == 256  # the later recipe
    assert source["beta2"] == source["ema"] == source["batch"] == "recipe dit"
    assert (config["model"], config["res"], config["vae"]) == ("XS/4", 24, "none")  # the dataset's own recipe
    assert source["model"] == source["res"] == source["vae"] == "recipe shapes"
    assert config["recipe"] == ["shapes", "dit"]
    assert (config["mask-ratio"], source["mask-ratio"]) == (0.3, "default")  # nobody set it
    # the same --model builds the UNet of its scale: LDM's G4 on ImageNet's XL/2, the XS UNet on shapes' XS/4
    shapes, _ = print_config(["--dataset", "shapes", "--recipe", "ldm"], capsys)
    imagenet, _ = print_config(["--dataset", "imagenet", "--recipe", "ldm"], capsys)
    assert (unet_size(shapes["model"]), unet_size(imagenet["model"])) == ("XS", "G4")
    assert unet_size("S") == "S" and unet_size("nope/3") is None


def test_the_flag_defaults_are_the_papers_imagenet_setting_and_shapes_is_the_small_recipe(capsys):
    plain, plain_source = print_config(["--dataset", "imagenet"], capsys)
    ours, _ = print_config(["--dataset", "imagenet", "--recipe", "ours"], capsys)
    drop_recipe = lambda config: {k: v for k, v in config.items() if k != "recipe"}
    assert drop_recipe(plain) == drop_recipe(ours)
    assert set(plain_source.values()) == {"default", "command line"}  # no recipe on ImageNet: the defaults
    assert (plain["optimizer"], plain["lr"], plain["beta1"], plain["beta2"], plain["wd"]) == \
        ("adamw", 1e-4, 0.9, 0.95, 0.0)
    assert (plain["model"], plain["res"], plain["batch"], plain["ema"], plain["vae"]) == \
        ("XL/2", 256, 256, 0.9999, "sd-ema")
    # the shapes recipe as it was before recipes existed: `small` at 24 px
    assert RECIPES["shapes"] == dict(res=24, model="XS/4", batch=64, lr=2e-3, steps=2000, warmup=100,
                                     ema=0.999,
                                     decay="cosine", vae="none", shift=3.0, pred="x", class_tokens=4,
                                     log_every=50, ckpt_every=1000, sample_every=0, workers=0)
    assert {k: v for k, v in RECIPES["small"].items() if k != "res"} == \
        {k: v for k, v in RECIPES["shapes"].items() if k != "res"}


def test_another_objective_than_the_recipes_is_refused_with_what_to_change(capsys):
    from config import validate
    with pytest.raises(SystemExit, match=r"--pred eps \(recipe dit\) does not fit --objective flow \(command "
                       r"line\)"):
        validate(get_args(["--dataset", "shapes", "--recipe", "dit", "--objective", "flow"]))
    with pytest.raises(SystemExit, match=r"--learn-sigma \(recipe dit\) needs --objective ddpm; add "
                       r"--no-learn-sigma"):
        validate(get_args(["--dataset", "shapes", "--recipe", "dit", "--objective", "flow", "--pred", "x"]))
    with pytest.raises(SystemExit, match=r"--sampler ddpm \(recipe dit\) does not fit --objective flow"):
        validate(get_args(["--dataset", "shapes", "--recipe", "dit", "--objective", "flow", "--pred", "x",
                           "--no-learn-sigma"]))
    flow = ["--dataset", "shapes", "--recipe", "dit", "--objective", "flow", "--pred", "x",
            "--no-learn-sigma", "--sampler", "euler"]
    validate(get_args(flow))
    assert print_config(flow, capsys)[0]["beta2"] == 0.999  # the rest of the recipe stays
    with pytest.raises(SystemExit, match=r"--pred v \(recipe sd3\) does not fit --objective ddpm \(command "
                       r"line\)"):
        validate(get_args(["--dataset", "imagenet", "--recipe", "sd3", "--objective", "ddpm"]))
    with pytest.raises(SystemExit, match=r"--pred x \(recipe shapes\) does not fit --objective ddpm"):
        validate(get_args(["--objective", "ddpm"]))


def test_a_gate_for_a_route_that_does_not_gate_is_refused_and_a_flag_without_effect_is_named(capsys):
    from config import validate
    with pytest.raises(SystemExit, match=r"--gate-size: --cond adaln adds the control metadata ungated"):
        validate(get_args(["--cond", "adaln", "--gate-size", "linear"]))
    validate(get_args(["--cond", "adaln"]))  # the default gates are not a choice the user made
    validate(get_args(["--gate-size", "cosine_pow:4", "--mask-ratio", "0.5"]))
    warned = capsys.readouterr().out
    assert "warning: --mask-ratio does nothing in this run: it acts with --arch mdt" in warned
    for bad in ("no-such-gate", "cosine_pow:1,2"):  # argparse: an unknown schedule, or the wrong parameters
        with pytest.raises(SystemExit):
            get_args(["--gate-size", bad])
    for bad in ("cosine_pow:-2", "cosine_pow:nan"):  # g(t) far above 1 at pure noise; not a number at all
        with pytest.raises(SystemExit):
            get_args(["--gate-size", bad])
        assert f"gate {bad!r}: g(t) must stay within [0, 1]" in capsys.readouterr().err
    assert get_args(["--gate-size", "cosine_pow:0.5"]).gate_size == "cosine_pow:0.5"


def test_a_gates_parameters_are_recorded_also_when_left_to_their_defaults(capsys):
    """A run's configuration says which schedule it trained with, whether or not its parameter was written
    out: a later change of the default power would otherwise change what a stored run means."""
    args = get_args(["--gate-size", "cosine_pow", "--gate-crop", "linear"])
    assert (args.gate_size, args.gate_crop, args.gate_flip) == ("cosine_pow:2.0", "linear", "none")
    assert parse_gate(args.gate_size) == parse_gate("cosine_pow") == ("cosine_pow", (2.0,))
    assert print_config(["--gate-size", "cosine_pow"], capsys)[0]["gate-size"] == "cosine_pow:2.0"
    # every schedule given by its name alone is stored with all of its parameters written out
    for name, schedule in GATES.items():
        stored = get_args(["--gate-size", name]).gate_size
        assert parse_gate(stored) == (name, schedule.params)
        assert (":" in stored) == bool(schedule.params)


def test_print_config_refuses_what_training_refuses_with_the_same_message(capsys):
    """--print-config checks the flags first: a value training refuses prints training's message and exits
    non-zero, and no configuration is printed."""
    from config import validate
    for bad in (["--lr", "-1"], ["--objective", "ddpm"], ["--cond", "adaln", "--gate-size", "linear"]):
        with pytest.raises(SystemExit) as training:
            validate(get_args(bad))
        with pytest.raises(SystemExit) as printing:
            get_args(bad + ["--print-config"])
        assert printing.value.code == training.value.code and isinstance(printing.value.code, str)
        assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match=r"--lr must be > 0, got -1.0"):
        get_args(["--lr", "-1", "--print-config"])
    # what belongs to the machine that trains is not checked: a configuration for data kept elsewhere prints
    missing = print_config(["--dataset", "folder", "--data-path", "/no/such/folder", "--vae", "none"], capsys)
    assert missing[0]["data-path"] == "/no/such/folder"


def test_resume_with_another_optimizer_or_an_unusable_sampler_is_refused():
    from config import validate
    from run import config_mismatch

    args = get_args(TINY)
    saved = dict(args=vars(args), facts=dataclasses.asdict(facts_of(args)))
    assert config_mismatch(saved, get_args(TINY), facts_of(args)) == []
    assert config_mismatch(saved, get_args(TINY + ["--optimizer", "adan"]),
                           facts_of(args)) == ["optimizer: checkpoint 'adamw' vs now 'adan'"]
    assert config_mismatch(saved, args,
                           facts_of(args, num_classes=3)) == ["num_classes: checkpoint 10 vs now 3"]
    # a data path given relative, then absolute, from the same folder is the same data; another is not
    relative = dict(args=vars(args), facts=dataclasses.asdict(facts_of(args, data_path="data/x")))
    assert config_mismatch(relative, args, facts_of(args, data_path=os.path.abspath("data/x"))) == []
    assert config_mismatch(relative, args, facts_of(args, data_path="data/y")) == [
        "data_path: checkpoint 'data/x' vs now 'data/y'"]
    with pytest.raises(SystemExit, match="--sample-steps 37: .*stride"):  # DDIM's stride, before training
        validate(get_args(TINY + ["--recipe", "ldm", "--model", "XS", "--sample-steps", "37"]))


def test_recipes_sample_as_their_papers_publish(capsys):
    """PixArt-alpha's scripts/inference.py (DPM-Solver, 20 time-uniform steps, 4.5), SD3's sd3_infer.py
    sd3_medium (DPM++ 2M, 50 steps, 5.0), mDT-v2's image_sample.py (250 ancestral steps, 3.8 on the
    power-cosine schedule, power 4), DiT's sample_ddp.py (250 ancestral steps, 1.5)."""
    from config import run_sampling, validate
    published = dict(pixart=("dpm++2m", 20, "time", 4.5, "constant"),
                     sd3=("dpm++2m", 50, None, 5.0, "constant"),
                     mdt=("ddpm", 250, "ddpm", 3.8, "power-cosine"),
                     dit=("ddpm", 250, "ddpm", 1.5, "constant"))  # a DDPM recipe's unset spacing is named
    for name, (method, steps, spacing, scale, schedule) in published.items():
        s = run_sampling(get_args(["--recipe", name]))
        assert (s.method, s.steps, s.spacing, s.scale, s.schedule) == (method, steps, spacing, scale,
                                                                       schedule)
    assert run_sampling(get_args(["--recipe", "mdt"])).power == 4.0
    # a spacing the sampler cannot walk, or a power for no schedule
    with pytest.raises(SystemExit, match="logsnr spacing visits fractional steps"):
        validate(get_args(TINY + ["--recipe", "dit", "--sampler", "ddim", "--sample-spacing", "logsnr"]))
    validate(get_args(TINY + ["--cfg-power", "2"]))
    warning = "--cfg-power does nothing in this run: it acts with --cfg-schedule power-cosine"
    assert warning in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--cfg-power must be > 0"):
        validate(get_args(TINY + ["--cfg-schedule", "power-cosine", "--cfg-power", "0"]))


def test_a_recipe_that_needs_a_package_not_installed_says_which(monkeypatch):
    import importlib.util

    from build import check_sources
    from config import validate

    args = get_args(TINY + ["--recipe", "mdt"])
    real = importlib.util.find_spec
    without_adan = lambda name, *a: None if name == "adan_pytorch" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", without_adan)
    with pytest.raises(SystemExit, match="pip install adan-pytorch"):
        check_sources(args)
    with pytest.raises(SystemExit, match=r"--sampler heun \(command line\) does not fit --objective ddpm "
                       r"\(recipe dit\)"):
        validate(get_args(TINY + ["--recipe", "dit", "--sampler", "heun"]))


#################################################################################
#                  The pieces the recipes switch on                             #
#################################################################################


def test_adan_takes_mdts_betas_in_the_papers_convention():
    pytest.importorskip("adan_pytorch")
    args = get_args(TINY + ["--recipe", "mdt"])
    w = torch.nn.Parameter(torch.ones(3))
    opt = train.make_optimizer([w], args)
    assert type(opt).__name__ == "Adan" and opt.param_groups[0]["betas"] == pytest.approx((0.02, 0.08, 0.01))
    assert opt.param_groups[0]["lr"] == 3e-4
    g = torch.tensor([1.0, -2.0, 0.5])
    for _ in range(3):  # a steady gradient: Adan's steps approach lr * sign(g), moving against the gradient
        w.grad = g.clone()
        opt.step()
    step = w.detach() - 1
    assert (torch.sign(step) == -torch.sign(g)).all() and (step.abs() <= 3 * 3e-4).all()
    # same size everywhere
    torch.testing.assert_close(step / step[0].abs(), -torch.sign(g), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_the_mdt_recipe_trains_with_adan_and_resumes_exactly(tmp_path):
    pytest.importorskip("adan_pytorch")
    flags = TINY + ["--recipe", "mdt", "--steps", "6", "--sample-every", "-1"]
    full = train.main(flags + ["--ckpt-every", "3", "--keep", "5", "--out", str(tmp_path / "a")])
    half = tmp_path / "b" / "run"
    half.mkdir(parents=True)
    os.link(os.path.join(full, "ckpt-0000003.pt"), half / "ckpt-0000003.pt")
    resumed = train.main(flags + ["--resume", str(half), "--out", str(tmp_path / "b")])
    assert_resumed_exactly(full, resumed, 3, 6)


def test_min_snr_weights_the_eps_loss_by_min_snr_gamma_over_snr():
    torch.manual_seed(0)
    x0 = torch.randn(64, 3, 4, 4)
    model = lambda x, t, **c: torch.zeros_like(x)  # the eps loss is then |noise|^2, whatever k
    plain, weighted = DDPM(), DDPM(min_snr=5.0)
    a = plain.loss(model, x0, torch.Generator().manual_seed(1))
    b = weighted.loss(model, x0, torch.Generator().manual_seed(1))
    k = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))  # the loss's first draw
    snr = plain.chain.alphas_cumprod[k] / (1 - plain.chain.alphas_cumprod[k])
    torch.testing.assert_close(b, a * (snr.clamp(max=5.0) / snr).float())
    assert (snr < 5).any() and (snr > 5).any()  # both sides of gamma were drawn


@pytest.mark.parametrize("warmup, first, later", [("on", 0.1, 0.5), ("off", 0.9999, 0.9999)])
def test_ema_warmup(warmup, first, later):
    args = get_args(TINY + ["--ema", "0.9999", "--ema-warmup", warmup])
    assert train.ema_decay(0, args) == pytest.approx(first)
    assert train.ema_decay(8, args) == pytest.approx(later)
    assert train.ema_decay(10**7, args) == pytest.approx(0.9999)


def test_sample_py_defaults_to_the_runs_evaluation_settings(tmp_path, monkeypatch):
    run = train.main(TINY
                     + ["--recipe", "dit", "--steps", "1", "--sample-every", "-1", "--sample-steps", "4",
                        "--out", str(tmp_path)])
    seen = {}

    def fake_grid(trained, sampling, path, layout=sample.GridLayout(), **kw):
        seen.update(cfg_scales=layout.cfg_scales, steps=sampling.steps, method=sampling.method,
                    schedule=sampling.schedule)

    monkeypatch.setattr(sample, "class_grid", fake_grid)
    sample.main(["--ckpt", run])
    # the dit recipe's sampler and guidance
    assert seen == dict(cfg_scales=[1.5], steps=4, method="ddpm", schedule="constant")
    sample.main(["--ckpt", run, "--steps", "2", "--sampler", "ddim", "--cfg-scale", "1", "--cfg-schedule",
                 "power-cosine"])
    assert seen == dict(cfg_scales=[1.0], steps=2, method="ddim", schedule="power-cosine")
    # a checkpoint of another configuration schema is refused with what to do, not misread
    path = os.path.join(run, sorted(f for f in os.listdir(run) if f.startswith("ckpt-"))[-1])
    ckpt = torch.load(path, weights_only=True)
    torch.save(dict(ckpt, config_version=2), path)
    with pytest.raises(SystemExit, match="written by another version of this code .config schema 2"):
        sample.main(["--ckpt", run])


#################################################################################
#                  Every training command of the README starts                  #
#################################################################################


def readme_train_commands():
    """Each `python train.py ...` / `torchrun ... train.py ...` line of the code blocks of the README and the
    pages under docs/, continuation lines joined and comments dropped."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    blocks = []
    for page in pages:
        with open(page) as f:
            blocks += re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.match(r"(python|torchrun)\b.*\btrain\.py\b", line) and "&&" not in line:
                commands.append(line)
            elif "&& python train.py" in line:
                commands.append(line.split("&& ", 1)[1])
    return commands


COMMANDS = readme_train_commands()


def test_the_readme_shows_the_commands_this_test_runs():
    assert len(COMMANDS) >= 10
    assert ("python train.py" in COMMANDS
            and "torchrun --nproc_per_node=8 train.py --dataset imagenet --res 256" in COMMANDS)
    assert all(any(f"--recipe {r}" in c for c in COMMANDS) for r in RECIPES)


def image_folder(root, n=12, res=32):
    rng = np.random.default_rng(0)
    for i in range(n):
        os.makedirs(os.path.join(root, f"c{i % 2}"), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(os.path.join(root,
                                                                                               f"c{i % 2}",
                                                                                               f"{i}.png"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_training_command_parses_and_starts(command, tmp_path, capsys):
    argv = shlex.split(command)
    argv = argv[argv.index("train.py") + 1 :]
    config, _ = print_config(argv, capsys)  # every command parses, on any machine
    if ("--print-config" in argv
        or not command.startswith("python train.py")
        or config["dataset"] not in ("shapes", "folder")):
        return  # GPUs and data that are not here: parsing is what can be checked
    if config["dataset"] == "folder":  # the user's own images: a small folder of them
        argv[argv.index("--data-path") + 1] = image_folder(str(tmp_path / "images"))
    run = train.main(argv
                     + ["--steps", "1", "--batch", "8", "--shapes-size", "32", "--eval-per-class", "0",
                        "--sample-every", "-1", "--log-every", "1", "--out", str(tmp_path / "runs")])
    assert math.isfinite(losses(run)[1])
