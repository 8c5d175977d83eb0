"""--recipe: each published recipe is one flag whose values --print-config shows; the command line beats the recipe,
which beats the dataset's preset; no recipe on ImageNet is the paper's shared setting. The pieces recipes switch on
(Adan, min-SNR weighting, the EMA without warm-up, the run's evaluation sampler) do what they say, and every training
command the README shows parses and starts."""
import json
import math
import os
import re
import shlex

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, assert_resumed_exactly, losses
from PIL import Image

import sample
import train
from config import DEFAULTS, PRESETS, RECIPES, get_args
from diffusion import Diffusion


def print_config(argv, capsys):
    with pytest.raises(SystemExit) as e:
        get_args(argv + ["--print-config"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


#################################################################################
#                  What a recipe sets, and what wins over it                    #
#################################################################################

@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_shows_every_value_the_recipe_sets(recipe, capsys):
    config = print_config(["--dataset", "imagenet", "--recipe", recipe], capsys)
    assert config["recipe"] == recipe
    for key, value in RECIPES[recipe].items():  # keys are the flag names as --help lists them
        assert config[key.replace("_", "-")] == value, key
    assert "print-config" not in config and "beta2" in config and "grad-accum" in config


def test_command_line_beats_recipe_beats_preset_beats_defaults(capsys):
    config = print_config(["--dataset", "shapes", "--recipe", "dit", "--lr", "3e-4"], capsys)
    assert config["lr"] == 3e-4  # the command line
    assert config["beta2"] == 0.999 and config["ema"] == 0.9999 and config["batch"] == 256  # the recipe
    assert config["model"] == "XS/4" and config["res"] == 24 and config["vae"] == "none"  # the shapes preset
    assert config["mask-ratio"] == DEFAULTS["mask_ratio"]  # nobody set it
    assert print_config(["--dataset", "shapes", "--recipe", "ldm"], capsys)["model"] == "XS"  # the UNet's own size
    assert print_config(["--dataset", "imagenet", "--recipe", "ldm"], capsys)["model"] == "G4"


def test_no_recipe_on_imagenet_is_the_papers_shared_setting_and_shapes_is_the_small_recipe(capsys):
    plain = print_config(["--dataset", "imagenet"], capsys)
    ours = print_config(["--dataset", "imagenet", "--recipe", "ours"], capsys)
    assert {k: v for k, v in plain.items() if k != "recipe"} == {k: v for k, v in ours.items() if k != "recipe"}
    assert (plain["optimizer"], plain["lr"], plain["beta1"], plain["beta2"], plain["wd"]) == \
        ("adamw", 1e-4, 0.9, 0.95, 0.0)
    # the shapes preset as it was before recipes existed: `small` at 24 px
    assert PRESETS["shapes"] == dict(res=24, model="XS/4", batch=64, lr=2e-3, steps=2000, warmup=100, ema=0.999,
                                     decay="cosine", vae="none", shift=3.0, pred="x", class_tokens=4, log_every=50,
                                     ckpt_every=1000, sample_every=0, workers=0)
    assert {k: v for k, v in RECIPES["small"].items() if k != "res"} == \
        {k: v for k, v in PRESETS["shapes"].items() if k != "res"}


def test_another_objective_or_arch_than_the_recipes_takes_what_fits_it(capsys):
    flow = print_config(["--dataset", "shapes", "--recipe", "dit", "--objective", "flow"], capsys)
    assert (flow["pred"], flow["sampler"], flow["learn-sigma"]) == ("x", None, False)  # the preset's, the defaults
    assert flow["beta2"] == 0.999  # the rest of the recipe stays
    ddpm = print_config(["--dataset", "imagenet", "--recipe", "sd3", "--objective", "ddpm"], capsys)
    assert ddpm["pred"] == "eps" and ddpm["cond"] == "mmdit"
    assert print_config(["--recipe", "small", "--arch", "unet"], capsys)["model"] == "XS"
    assert print_config(["--arch", "unet", "--model", "S"], capsys)["model"] == "S"


def test_resume_with_another_optimizer_or_an_unusable_sampler_is_refused():
    from config import config_mismatch, validate
    saved = vars(get_args(TINY))
    del saved["optimizer"]  # a checkpoint from before the flag: it trained with AdamW
    assert config_mismatch(saved, get_args(TINY)) == []
    assert config_mismatch(saved, get_args(TINY + ["--optimizer", "adan"])) == \
        ["optimizer: checkpoint 'adamw' vs now 'adan'"]
    with pytest.raises(SystemExit, match="--sample-steps 37: .*stride"):  # DDIM's stride, before training
        validate(get_args(TINY + ["--recipe", "ldm", "--model", "XS", "--sample-steps", "37"]))


def test_a_recipe_that_needs_a_package_not_installed_says_which(monkeypatch):
    import importlib.util

    from config import validate
    args = get_args(TINY + ["--recipe", "mdt"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "adan_pytorch" else
                        real(name, *a))
    with pytest.raises(SystemExit, match="pip install adan-pytorch"):
        validate(args)
    with pytest.raises(SystemExit, match="--sampler heun does not fit --objective ddpm"):
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
    torch.testing.assert_close(step / step[0].abs(), -torch.sign(g), atol=1e-3, rtol=0)  # same size everywhere


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
    plain, weighted = Diffusion("ddpm"), Diffusion("ddpm", min_snr=5.0)
    a = plain.loss(model, x0, torch.Generator().manual_seed(1))
    b = weighted.loss(model, x0, torch.Generator().manual_seed(1))
    k = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))  # the loss's first draw
    snr = plain.chain.ab[k] / (1 - plain.chain.ab[k])
    torch.testing.assert_close(b, a * (snr.clamp(max=5.0) / snr).float())
    assert (snr < 5).any() and (snr > 5).any()  # both sides of gamma were drawn


@pytest.mark.parametrize("warmup, first, later", [("on", 0.1, 0.5), ("off", 0.9999, 0.9999)])
def test_ema_warmup(warmup, first, later):
    args = get_args(TINY + ["--ema", "0.9999", "--ema-warmup", warmup])
    assert train.ema_decay(0, args) == pytest.approx(first) and train.ema_decay(8, args) == pytest.approx(later)
    assert train.ema_decay(10 ** 7, args) == pytest.approx(0.9999)


def test_sample_py_defaults_to_the_runs_evaluation_settings(tmp_path, monkeypatch):
    run = train.main(TINY + ["--recipe", "dit", "--steps", "1", "--sample-every", "-1", "--sample-steps", "4",
                             "--out", str(tmp_path)])
    seen = {}

    def fake_grid(model, vae, args, path, device, cfg_scales=None, steps=None, method=None, **kw):
        seen.update(cfg_scales=cfg_scales, steps=steps, method=method)
    monkeypatch.setattr(sample, "class_grid", fake_grid)
    sample.main(["--ckpt", run])
    assert seen == dict(cfg_scales=[1.5], steps=4, method="ddpm")  # the dit recipe's sampler and guidance
    sample.main(["--ckpt", run, "--steps", "2", "--sampler", "ddim", "--cfg-scale", "1"])
    assert seen == dict(cfg_scales=[1.0], steps=2, method="ddim")
    # a run from before the evaluation settings were recorded samples as sample.py then did: 50 steps at 1.0
    path = os.path.join(run, sorted(f for f in os.listdir(run) if f.startswith("ckpt-"))[-1])
    ckpt = torch.load(path, weights_only=True)
    for key in ("sample_steps", "sampler", "recipe"):
        del ckpt["args"][key]
    torch.save(ckpt, path)
    sample.main(["--ckpt", run])
    assert seen == dict(cfg_scales=[1.0], steps=50, method=None)


#################################################################################
#                  Every training command of the README starts                  #
#################################################################################

def readme_train_commands():
    """Each `python train.py ...` / `torchrun ... train.py ...` line of the README's code blocks, continuation lines
    joined and comments dropped."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
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
    assert "python train.py" in COMMANDS and "torchrun --nproc_per_node=8 train.py --dataset imagenet --res 256" \
        in COMMANDS
    assert all(any(f"--recipe {r}" in c for c in COMMANDS) for r in RECIPES)


def image_folder(root, n=12, res=32):
    rng = np.random.default_rng(0)
    for i in range(n):
        os.makedirs(os.path.join(root, f"c{i % 2}"), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(os.path.join(root, f"c{i % 2}",
                                                                                              f"{i}.png"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_training_command_parses_and_starts(command, tmp_path, capsys):
    argv = shlex.split(command)
    argv = argv[argv.index("train.py") + 1:]
    config = print_config(argv, capsys)  # every command parses, on any machine
    if "--print-config" in argv or not command.startswith("python train.py") or config["dataset"] not in ("shapes", "folder"):
        return  # GPUs and data that are not here: parsing is what can be checked
    if config["dataset"] == "folder":  # the user's own images: a small folder of them
        argv[argv.index("--data-path") + 1] = image_folder(str(tmp_path / "images"))
    run = train.main(argv + ["--steps", "1", "--batch", "8", "--shapes-size", "32", "--eval-per-class", "0",
                             "--sample-every", "-1", "--log-every", "1", "--out", str(tmp_path / "runs")])
    assert math.isfinite(losses(run)[1])
