"""Weights in and out: every checkpoint is read with weights_only (a file whose unpickling would run code is
refused by every entry point, before it runs), a DiT training checkpoint loads its EMA, --base-res follows one
rule whatever the data source, sample.py checks its numbers and names its own flag, and `sample.py --export`
writes a .safetensors that every entry point reads back."""
import argparse
import dataclasses
import json
import os
import pathlib
import re

import pytest
import torch

import sample
import train
from build import load_model, make_diffusion, make_model, open_dataset, read_source_facts
from checkpoint import CONFIG_VERSION, find_checkpoint, from_dit, init_from, write_checkpoint
from config import get_args
from conftest import TINY, facts_of, init_loads_every_tensor, model_inputs, perturb, random_dit_state_dict
from latents import CACHE_FORMAT
from run import read_resume

_at = TINY.index("--base-res")
TINY_NO_BASE = TINY[:_at] + TINY[_at + 2:]  # --base-res left to its default


def our_checkpoint(path, flags=()):
    """A checkpoint of ours as train.py writes it (TINY config + `flags`, 10 classes), with random weights
    everywhere, so a model's output depends on every tensor."""
    args = get_args(TINY + list(flags))
    facts = facts_of(args)
    torch.manual_seed(0)
    model = perturb(make_model(args, facts))
    opt = torch.optim.AdamW(model.parameters())
    write_checkpoint(str(path), dict(model=model.state_dict(), ema=model.state_dict(), opt=opt.state_dict(),
                                     step=3, epoch=0, position=3, gen=[torch.Generator().get_state()],
                                     torch_rng=torch.get_rng_state(), loss_window=(0.5, 1, 1),
                                     args=vars(args),
                                     facts=dataclasses.asdict(facts), config_version=CONFIG_VERSION))
    return str(path)


#################################################################################
#                 A file that would run code is never unpickled                 #
#################################################################################

class RunsCode:
    """Unpickling this touches `marker`: any callable could stand in for Path.touch (os.system, ...)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class RunsShell:
    """Unpickling this runs a shell command: os.system, whose module torch blocks by name."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_auto_stops_at_a_checkpoint_that_would_run_a_shell_command(tmp_path):
    """A refusal of a blocked module is worded unlike a refused global; it must still stop --resume auto
    rather than be passed over as a damaged file (which would resume an older checkpoint without a word)."""
    run = tmp_path / "runs" / "000-run"
    run.mkdir(parents=True)
    our_checkpoint(run / "ckpt-0000003.pt")
    torch.save({"ema": {}, "step": RunsShell(tmp_path / "pwned")}, str(run / "ckpt-0000006.pt"))
    with pytest.raises(SystemExit, match="contains objects other than weights.*system"):
        find_checkpoint("auto", str(tmp_path / "runs"))
    assert not (tmp_path / "pwned").exists()


ONE_STEP = ["--steps", "1", "--sample-every", "-1"]  # should a refusal fail, the run is short
ENTRY_POINTS = {
    "train --resume": lambda f, out: train.main(TINY + ONE_STEP + ["--resume", f, "--out", out]),
    "train --resume auto": lambda f, out: train.main(TINY + ONE_STEP + ["--resume", "auto", "--out",
                                                                        os.path.dirname(os.path.dirname(f))]),
    "train --init-from": lambda f, out: train.main(TINY + ONE_STEP + ["--init-from", f, "--out", out]),
    "train --init-from, its base-res": lambda f, out: train.main(TINY_NO_BASE + ONE_STEP + ["--init-from", f,
                                                                                            "--out", out]),
    "sample --ckpt": lambda f, out: sample.main(["--ckpt", f]),
    "sample --ckpt FOLDER": lambda f, out: sample.main(["--ckpt", os.path.dirname(f)]),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_checkpoint_that_would_run_code_is_refused(entry, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "000-run").mkdir()  # a run folder (NNN-...): --resume auto looks in these only
    path = str(tmp_path / "000-run" / "ckpt-0000001.pt")
    torch.save({"ema": {"w": torch.zeros(2)}, "args": {"base_res": 16}, "config_version": CONFIG_VERSION,
                "step": RunsCode(marker)}, path)
    with pytest.raises(SystemExit) as refused:
        ENTRY_POINTS[entry](path, str(tmp_path / "runs"))
    message = str(refused.value)
    assert path in message and "contains objects other than weights" in message, message
    assert "not loaded" in message, message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unchecked read would have run it
    assert marker.exists()


def with_changed_pickle(path, out):
    """A copy of a torch.save zip whose pickle has one byte changed to an opcode that does not exist: what a
    bit flip or a bad copy leaves, damaged rather than dangerous."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in files if n.endswith("data.pkl"))
    files[name] = files[name][:2] + b"\xff" + files[name][3:]  # right after the protocol header
    with zipfile.ZipFile(out, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return str(out)


def test_init_from_warns_when_most_of_the_model_starts_from_scratch(tmp_path, capsys):
    path = our_checkpoint(tmp_path / "ckpt.pt")  # T/4
    same = get_args(TINY)
    init_from(make_model(same, facts_of(same)), path)
    assert "WARNING" not in capsys.readouterr().out
    wider = get_args(TINY + ["--model", "S/4"])  # another width: only shape-free tensors fit
    init_from(make_model(wider, facts_of(wider)), path)
    assert "WARNING only" in capsys.readouterr().out


def test_a_damaged_checkpoint_is_told_apart_from_an_unsafe_one(tmp_path, capsys):
    run = tmp_path / "runs" / "000-run"
    run.mkdir(parents=True)
    good = our_checkpoint(run / "ckpt-0000003.pt")
    damaged = with_changed_pickle(good, run / "ckpt-0000006.pt")  # newer, under a complete name
    # --resume auto falls back to the one before
    path, state = find_checkpoint("auto", str(tmp_path / "runs"))
    assert path == good and state["step"] == 3
    assert damaged in capsys.readouterr().out
    text = tmp_path / "log.jsonl"
    text.write_text('{"step": 1, "loss": 0.5}\n')
    for bad in (damaged, str(text)):
        for entry in ("sample --ckpt", "train --init-from"):
            with pytest.raises(SystemExit) as stopped:
                ENTRY_POINTS[entry](bad, str(tmp_path / "out"))
            message = str(stopped.value)
            assert bad in message and "damaged or not a checkpoint" in message, message
            assert "other than weights" not in message and "weights_only=False" not in message


#################################################################################
#                     A DiT training checkpoint: its EMA                        #
#################################################################################

DIT_FLAGS = ["--dataset", "imagenet", "--model", "T/2", "--cond", "adaln", "--qk-norm", "off", "--objective",
             "ddpm", "--learn-sigma", "--vae", "sd-ema", "--res",
             "64"]  # DiT's recipe, as load_model builds it


def dit_training_checkpoint(path):
    """DiT's train.py layout: {"model", "ema", "opt", "args"}, args an argparse.Namespace; model and EMA
    differ."""
    ema, raw = random_dit_state_dict(seed=0), random_dit_state_dict(seed=1)
    params = [torch.nn.Parameter(v.clone()) for v in raw.values()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    sum(p.sum() for p in params).backward()
    opt.step()
    dit_args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="DiT-T/2",
                                  image_size=64, num_classes=10, epochs=1400, global_batch_size=256,
                                  global_seed=0, vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    torch.save({"model": raw, "ema": ema, "opt": opt.state_dict(), "args": dit_args}, path)
    return ema


def test_a_dit_training_checkpoint_loads_its_ema(tmp_path):
    path = str(tmp_path / "0400000.pt")
    ema = dit_training_checkpoint(path)
    mapped = from_dit(ema, 64)[0]
    # --init-from: its base resolution is the DiT's (8 x 8 latents of a 64 px image), its EMA tensors load
    args = get_args(DIT_FLAGS + ["--init-from", path])
    facts = read_source_facts(args, TenClasses())
    assert facts.base_res == 64
    model = make_model(args, facts)
    loaded, skipped, new = init_from(model, path)
    assert not skipped and all(n.startswith("c_embed.mlps.") for n in new)
    assert all(torch.equal(model.state_dict()[k], mapped[k]) for k in loaded)
    # sample.py --ckpt: the DiT recipe from the file alone, with the EMA weights
    trained = load_model(path, "cpu")
    model, args, facts = trained.model, trained.args, trained.facts
    assert (args.model, args.cond, args.objective) == ("T/2", "adaln", "ddpm")
    assert (facts.res, facts.base_res) == (64, 64)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in mapped.items())


#################################################################################
#                      --base-res: one rule for every source                    #
#################################################################################


def fake_latent_cache(root, res, dataset="folder"):
    """What the cache reader opens of a finished cache: meta.json and stats.json (no shards needed for its
    facts)."""
    root.mkdir()
    (root / "meta.json").write_text(json.dumps(dict(format=CACHE_FORMAT, dataset=dataset, vae="none", res=res,
                                                    num_shards=0, world=1,
                                                    num_classes=10, crop="center", latent_shape=[3, res, res],
                                                    scale=1.0, shift=0.0, num_items=0, shard_size=1)))
    (root / "stats.json").write_text("{}")
    return str(root)


class TenClasses:
    """What read_source_facts reads off an image dataset of ten classes."""

    num_classes = 10


def test_base_res_is_the_training_resolution_from_scratch_and_the_source_s_otherwise(tmp_path):
    (tmp_path / "images").mkdir()
    folder = get_args(["--dataset", "folder", "--data-path", str(tmp_path / "images"), "--vae", "none",
                       "--res", "64"])
    cache = get_args(["--dataset", "latents", "--data-path", fake_latent_cache(tmp_path / "cache", 64)])
    on_folder = read_source_facts(folder, TenClasses())
    on_cache = read_source_facts(cache, open_dataset(cache))
    assert (on_folder.res, on_folder.base_res, on_cache.res, on_cache.base_res) == (64, 64, 64, 64)
    # the flags' defaults; the cache's own
    assert (cache.res, cache.vae, on_cache.vae) == (256, "sd-ema", "none")
    assert make_diffusion(folder, on_folder).alpha == make_diffusion(cache, on_cache).alpha == 1.0  # unscaled
    assert read_source_facts(get_args(["--res", "48"]), TenClasses()).base_res == 48
    # a transfer keeps its source's base; so does the resume of a transfer (its flags no longer name the
    # source)
    source = our_checkpoint(tmp_path / "ckpt-0000003.pt")  # TINY: 16 px

    def base_of(flags):  # as train.main resolves it: the checkpoint --resume names, then the facts
        args = get_args(TINY_NO_BASE + flags)
        resumed = getattr(read_resume(args, 0), 'ckpt', None)
        return read_source_facts(args, TenClasses(), None, resumed).base_res

    assert base_of(["--res", "32", "--init-from", source]) == 16
    assert base_of(["--res", "32", "--resume", source]) == 16
    assert base_of(["--res", "32", "--resume", str(tmp_path)]) == 16  # the run folder
    assert base_of(["--res", "32", "--base-res", "32", "--init-from", source]) == 32


@pytest.mark.slow
def test_a_transfer_reads_its_source_once(tmp_path, monkeypatch):
    """--init-from is read (and its CRCs checked) once, for its base resolution and its weights: an XL/2
    training checkpoint is 10 GiB."""
    import checkpoint
    source = our_checkpoint(tmp_path / "ckpt-0000003.pt")
    reads, real = [], checkpoint.damaged_record  # the CRC pass over every byte, at each read

    def counted(path):
        reads.append(path)
        return real(path)
    monkeypatch.setattr(checkpoint, "damaged_record", counted)
    run = train.main(TINY_NO_BASE + ["--res", "32", "--init-from", source, "--steps", "1", "--sample-every",
                                     "-1", "--out", str(tmp_path / "runs")])
    assert reads == [source]
    assert torch.load(find_checkpoint(run)[0], weights_only=False)["facts"]["base_res"] == 16


#################################################################################
#                        sample.py: flags checked, named                        #
#################################################################################


@pytest.mark.parametrize("flags, message",
                         [(["--cfg-scale", "nan"], "--cfg-scale: 'nan' is not a finite number"),
                          (["--cfg-scale", "1,inf"], "--cfg-scale: 'inf' is not a finite number"),
                          (["--cfg-scale", "two"], "--cfg-scale: 'two' is not a finite number"),
                          (["--steps", "0"], "--steps must be >= 1, got 0"),
                          (["--seeds", "0,x"],
                           "--seeds: '0,x' is not a comma-separated list of whole numbers"),
                          (["--seeds", "-1"], "--seeds must be >= 0, got -1"),
                          (["--cfg-scale", "-1"], "--cfg-scale must be >= 0 (1 = no guidance), got -1.0"),
                          (["--ctrl-scale", "nan"], "--ctrl-scale: nan is not a finite number"),
                          (["--interval", "0.5"], "--interval: give two numbers LO,HI"),
                          (["--interval", "0.8,0.2"], "--interval 0.8,0.2: need 0 <= LO <= HI <= 1"),
                          (["--interval", "0,1.5"], "--interval 0,1.5: need 0 <= LO <= HI <= 1"),
                          (["--flip", "0,x"], "--flip: 'x' is not a finite number"),
                          (["--num-samples", "-8"], "--num-samples must be >= 0, got -8"),
                          (["--eval-per-class", "-1"], "--eval-per-class must be >= 0, got -1"),
                          (["--classes", "-1"], "--classes: the model knows classes 0..9")])
def test_sample_flags_are_checked(flags, message, tmp_path):
    ckpt = our_checkpoint(tmp_path / "ckpt-0000003.pt")
    with pytest.raises(SystemExit, match=re.escape(message)):
        sample.main(["--ckpt", ckpt, "--steps", "1", "--seeds", "1", "--classes", "0", "--out",
                     str(tmp_path / "g.png")]
                    + flags)


def test_a_missing_ckpt_names_the_flag_given(tmp_path):
    with pytest.raises(SystemExit, match=r"^--ckpt '.*nope': no such checkpoint file or run folder"):
        sample.main(["--ckpt", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=r"^--resume '.*nope': no such checkpoint file or run folder"):
        train.main(TINY + ["--resume", str(tmp_path / "nope")])


#################################################################################
#                          .safetensors: out and back in                        #
#################################################################################


def export(tmp_path):
    """(a checkpoint of ours, its `sample.py --export`)."""
    (tmp_path / "run").mkdir()
    ckpt = our_checkpoint(tmp_path / "run" / "ckpt-0000003.pt")
    out = str(tmp_path / "model.safetensors")
    assert sample.main(["--ckpt", ckpt, "--export", out]) == out
    return ckpt, out


def test_export_loads_back_as_the_same_model_and_config(tmp_path):
    from safetensors import safe_open

    ckpt, exported = export(tmp_path)
    with safe_open(exported, "pt") as f:
        meta = f.metadata()
    assert set(meta) == {"format", "config", "facts", "config_version", "step", "tensor_crc32"}
    assert all(isinstance(json.loads(v), (dict, int, type(None))) for k, v in meta.items() if k != "format")
    trained_a = load_model(ckpt, "cpu")
    a, args_a, facts_a = trained_a.model, trained_a.args, trained_a.facts
    trained_b = load_model(exported, "cpu")
    b, args_b, facts_b = trained_b.model, trained_b.args, trained_b.facts
    file_b, step_b = trained_b.file, trained_b.step
    assert vars(args_a) == vars(args_b) and facts_a == facts_b
    assert file_b == os.path.abspath(exported) and step_b == 3
    x, t, y, ctrl = model_inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t, y, ctrl), b(x, t, y, ctrl))
    with pytest.raises(SystemExit, match="--export model.pt: .* end the path in .safetensors"):
        sample.main(["--ckpt", ckpt, "--export", "model.pt"])


def test_init_from_a_safetensors_loads_every_tensor(tmp_path, capsys):
    ckpt, exported = export(tmp_path)
    _, facts, model = init_loads_every_tensor(TINY_NO_BASE + ["--res", "32"], exported, ckpt)
    assert facts.base_res == 16 and model.base_grid == 16 // 4  # from the metadata, as from a .pt (patch 4)


@pytest.mark.slow
def test_sample_py_runs_from_an_export(tmp_path):
    _, exported = export(tmp_path)
    grid = sample.main(["--ckpt", exported, "--classes", "0,6", "--seeds", "1", "--steps", "2"])
    assert grid == os.path.join(str(tmp_path), "grid.png") and os.path.isfile(grid)
    res = sample.main(["--ckpt", exported, "--eval-per-class", "1", "--steps", "2"])
    assert set(res) == {"class_acc", "flip_acc", "mirrored", "crop_err"}
    npz = sample.main(["--ckpt", exported, "--num-samples", "2", "--steps", "2", "--batch", "2"])
    # the guidance the run recorded (train.py --cfg-scale, 2.0) is sample.py's default, from the export as
    # well
    assert npz == str(tmp_path / "samples-2-cfg2-euler2.npz") and os.path.isfile(npz)
    with open(npz[: -len(".npz")] + ".json") as f:
        assert json.load(f)["ckpt"] == os.path.abspath(exported)


def test_resume_from_an_export_is_refused_and_moves_nothing(tmp_path):
    """An export holds weights, not a run to continue: --resume must say so (and point to --init-from) before
    it touches the run folder it sits in."""
    ckpt, out = export(tmp_path)
    # sorts before ckpt-*: a resume would set those aside as later
    inside = tmp_path / "run" / "best.safetensors"
    os.replace(out, inside)
    with pytest.raises(SystemExit, match=r"weights only .*--init-from"):
        train.main(TINY + ["--steps", "4", "--resume", str(inside), "--out", str(tmp_path / "runs")])
    assert os.path.exists(ckpt) and not os.path.exists(tmp_path / "run" / "abandoned")


def test_a_ddim_step_count_no_stride_gives_is_refused_before_sampling(tmp_path):
    """A ddpm model samples with DDIM by default, whose integer stride fits only some step counts (ADM's
    ddimN)."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = our_checkpoint(run / "ckpt-0000003.pt",
                          ["--objective", "ddpm", "--pred", "eps", "--cond", "adaln"])
    with pytest.raises(SystemExit, match=r"--steps 37: .*36 or 38"):
        sample.main(["--ckpt", ckpt, "--steps", "37"])


@pytest.mark.parametrize("entry", ["sample --ckpt", "train --resume"])
def test_weights_that_do_not_fit_the_model_get_a_message(entry, tmp_path):
    """A checkpoint from a version of the code whose network had other tensors (here: SD3's pooled-vector MLP,
    which an older --cond mmdit lacked) says what differs instead of load_state_dict's traceback."""
    (tmp_path / "run").mkdir()
    # a run of 4 steps, resumed at step 3 with the same --steps (a resume keeps the schedule)
    path = our_checkpoint(tmp_path / "run" / "ckpt-0000003.pt", ["--cond", "mmdit", "--steps", "4"])
    ckpt = torch.load(path, weights_only=True)
    for key in ("model", "ema"):
        ckpt[key] = {k: v for k, v in ckpt[key].items() if not k.startswith("pool_embed.")}
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"do not fit the model.*Missing: pool_embed\.0\.weight"):
        if entry == "sample --ckpt":
            sample.main(["--ckpt", path])
        else:
            train.main(TINY + ["--steps", "4", "--sample-every", "-1", "--cond", "mmdit", "--resume", path,
                               "--out", str(tmp_path / "out")])


def test_a_file_in_torchs_old_non_zip_format_is_read_too(tmp_path):
    """torch.save before 1.6 (or with _use_new_zipfile_serialization=False) writes a format torch cannot
    memory-map: the --init-from / --resume look-ups that map a file read such a file whole instead of
    failing."""
    from checkpoint import base_res_of, dit_resolution, read_checkpoint

    state = random_dit_state_dict()
    path = str(tmp_path / "old.pt")
    torch.save(state, path, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(path, mmap=True)
    assert all(torch.equal(ckpt[k], v) for k, v in state.items())
    assert base_res_of(ckpt) == dit_resolution(state) == 64
