"""Weights that are what they claim: a checkpoint whose weights hold NaN (bytes intact, so its CRCs pass) is
refused by resume, sampling and --init-from, naming the tensor; training that meets non-finite weights stops
with the true last good checkpoint; log.jsonl stays strict JSON; an export's tensors carry checksums that are
verified on load."""
import json
import os

import pytest
import torch
from test_checkpoints import our_checkpoint

import sample
import train
from build import load_model
from checkpoint import export_safetensors, read_checkpoint, read_safetensors, write_checkpoint
from conftest import TINY


def poisoned(tmp_path, name="ckpt-0000003.pt"):
    """A checkpoint of ours whose EMA and model hold one NaN in a block's weight: a diverged run's file."""
    path = our_checkpoint(tmp_path / name)
    ckpt = read_checkpoint(path)
    tensor = next(k for k in ckpt["ema"] if k.startswith("blocks.0.") and k.endswith("weight"))
    for part in ("ema", "model"):
        ckpt[part][tensor].view(-1)[0] = float("nan")
    write_checkpoint(path, ckpt)
    return path, tensor


def test_a_non_finite_checkpoint_is_refused_by_resume_sampling_and_init_from(tmp_path):
    path, tensor = poisoned(tmp_path)
    message = rf"{tensor} holds NaN or infinite values .*earlier checkpoint"
    with pytest.raises(SystemExit, match=message):
        load_model(path, "cpu")
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ckpt", path, "--classes", "0", "--seeds", "0", "--steps", "1",
                     "--out", str(tmp_path / "grid.png")])
    with pytest.raises(SystemExit, match=message):
        train.main(TINY + ["--resume", path, "--out", str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match=rf"--init-from .*{tensor} holds NaN"):
        train.main(TINY + ["--steps", "1", "--init-from", path, "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.slow
def test_training_that_meets_non_finite_weights_stops_at_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A finite gradient can still drive a weight to infinity: no checkpoint is written of such weights, and
    the stop names the last good one (or says there is none)."""
    real, calls = train.optimizer_step, []

    def blows_up_at_step_3(opt, finite):
        real(opt, finite)
        calls.append(None)
        if len(calls) == 3:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    monkeypatch.setattr(train, "optimizer_step", blows_up_at_step_3)
    with pytest.raises(SystemExit, match=r"stopping at step 4: the weights hold NaN or infinite values "
                       r"\(tensor .*\); the last good checkpoint is .*ckpt-0000002.pt: resume it"):
        train.main(TINY + ["--steps", "6", "--ckpt-every", "2", "--sample-every", "-1", "--out",
                           str(tmp_path / "a")])
    calls.clear()
    with pytest.raises(SystemExit, match=r"no checkpoint was written before: start again"):
        train.main(TINY + ["--steps", "6", "--ckpt-every", "4", "--sample-every", "-1", "--out",
                           str(tmp_path / "b")])
    run = tmp_path / "a" / os.listdir(tmp_path / "a")[0]
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["ckpt-0000002.pt"]


def test_the_log_stays_strict_json_when_a_window_has_no_finite_loss(tmp_path):
    """run.Run.log writes null for a value that is not a finite number: a strict JSON reader reads every
    line."""
    from run import Process, Run
    run = Run(str(tmp_path), None, Process(0, 1, torch.device("cpu"), False))
    try:
        run.log(dict(step=3, loss=float("nan"), grad_norm=float("inf"), lr=1e-4))
    finally:
        run.close()
    line = (tmp_path / "log.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record == dict(step=3, loss=None, grad_norm=None, lr=1e-4)


def test_an_export_checks_its_tensors_and_a_foreign_file_is_read_with_a_note(tmp_path, capsys):
    pytest.importorskip("safetensors")
    ckpt = read_checkpoint(our_checkpoint(tmp_path / "ckpt-0000003.pt"))
    model = torch.nn.Linear(4, 3)
    export = str(tmp_path / "model.safetensors")
    export_safetensors(model, ckpt["args"], ckpt["facts"], 3, export)
    assert set(read_safetensors(export)["ema"]) == {"weight", "bias"}
    assert "records no checksums" not in capsys.readouterr().out
    # one tensor's bytes changed in place, the file otherwise intact
    data = bytearray(open(export, "rb").read())
    weight = model.weight.detach().contiguous().numpy().tobytes()
    at = bytes(data).index(weight)
    data[at] ^= 0xFF
    open(export, "wb").write(data)
    with pytest.raises(SystemExit, match=r"model.safetensors: tensor weight does not match the checksum"):
        read_safetensors(export)
    # another program's file: no checksums to check, said in one line
    from safetensors.torch import save_file
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    assert set(read_safetensors(foreign)) == {"w"}
    assert "foreign.safetensors records no checksums of its tensors" in capsys.readouterr().out
