"""Faults a long run meets: kills during a checkpoint write, preemption signals, broken image files,
non-finite losses. Each test injects the fault and checks that no work is lost and the run continues (or
stops) cleanly. Faults inside train.py are injected by patching it from here, or for a subprocess from a
wrapper script (train_script)."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from build import build_dataset, data_fingerprint, shared_fingerprint
from checkpoint import CONFIG_VERSION, checkpoints_in, find_checkpoint
from config import get_args
from conftest import ROOT, TINY, facts_of, losses, nan_loss, records, wait_for
from data import EVENTS, count_event, event_table, load_rgb
from diffusion import Diffusion
from run import INTERRUPTED, PREEMPTED, Preemption, Resumed, RunLock, new_run_dir, resumed_folder


def only_run(out):
    (run,) = [os.path.join(out, d) for d in os.listdir(out)]
    return run


def train_script(tmp_path, patch):
    """A train.py that runs `patch` (Python source; the project and tests/ importable) before train.main:
    fault injection in another process."""
    script = tmp_path / "patched_train.py"
    paths = [ROOT, os.path.join(ROOT, "tests")]
    script.write_text(f"import sys\nsys.path[:0] = {paths!r}\nimport train\n{textwrap.dedent(patch)}\n"
                      f"train.main()\n")
    return str(script)


# ---------------------------------------------------------------- checkpoints ---

@pytest.mark.slow
def test_resume_auto_skips_partial_and_damaged_checkpoints(tmp_path):
    out = str(tmp_path)
    # a constant schedule, which a resume may extend (a cosine one is laid over --steps)
    run = train.main(TINY + ["--steps", "8", "--decay", "constant", "--ckpt-every", "4", "--keep", "5",
                             "--out", out])
    good = os.path.join(run, "ckpt-0000008.pt")
    with open(good, "rb") as f:
        head = f.read(200)
    with open(os.path.join(run, "ckpt-0000012.pt.tmp"), "wb") as f:  # a write that never finished
        f.write(head)
    with open(os.path.join(run, "ckpt-0000010.pt"), "wb") as f:  # a damaged file under a complete name
        f.write(head)
    path, state = find_checkpoint("auto", out)
    assert path == good and state["step"] == 8
    train.main(TINY + ["--steps", "10", "--decay", "constant", "--resume", "auto", "--out", out])
    assert [r["step"] for r in records(run) if "loss" in r][-2:] == [9, 10]


@pytest.mark.slow
def test_resuming_an_older_checkpoint_sets_later_ones_aside_and_prunes_right(tmp_path):
    run = train.main(TINY + ["--steps", "4", "--ckpt-every", "1", "--keep", "5", "--out", str(tmp_path)])
    train.main(TINY + ["--steps", "4", "--ckpt-every", "1", "--keep", "1", "--out", str(tmp_path),
                       "--resume", os.path.join(run, "ckpt-0000002.pt")])
    assert [os.path.basename(f) for f in checkpoints_in(run)] == ["ckpt-0000004.pt"]
    assert torch.load(os.path.join(run, "ckpt-0000004.pt"), weights_only=False)["step"] == 4
    assert sorted(os.listdir(os.path.join(run, "abandoned"))) == ["ckpt-0000003.pt", "ckpt-0000004.pt",
                                                                  "log-after-0000002.jsonl"]
    # the log as it was at step 2, then the resumed steps: each step once
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    with open(os.path.join(run, "abandoned", "log-after-0000002.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [3, 4]  # the first run's, kept


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--base-res", "32"], ["--batch", "8"], ["--seed", "1"]])
def test_resume_refuses_settings_that_break_exactness(tmp_path, flag):
    run = train.main(TINY + ["--steps", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=flag[0][2:].replace("-", "_") + ": checkpoint"):
        train.main(TINY + flag + ["--steps", "4", "--resume", run])  # argparse: the later flag wins


@pytest.mark.slow
def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    run = train.main(TINY + ["--steps", "2", "--resume", "auto", "--out", str(tmp_path)])
    assert sorted(losses(run)) == [1, 2]


@pytest.mark.slow
def test_sigkill_during_checkpointing_leaves_a_loadable_one(tmp_path, capsys):
    """The kill lands while the 4th checkpoint's temporary file is half written: the writer is patched to
    write half its bytes, say so, and wait to be killed. The resume removes that file, and says so."""
    out, writing = tmp_path / "runs", tmp_path / "writing"
    script = train_script(tmp_path, f"""
        import io
        import time

        import checkpoint
        real_write, calls = checkpoint.atomic_write, []
        def half_then_wait(path, write, *rest):
            calls.append(path)
            if len(calls) < 4:
                return real_write(path, write, *rest)
            def write_half(f):
                buf = io.BytesIO()
                write(buf)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                f.flush()
                open({str(writing)!r}, "w").close()
                time.sleep(600)
            real_write(path, write_half)
        checkpoint.atomic_write = half_then_wait
    """)
    cmd = [sys.executable, script] + TINY + ["--steps", "100000", "--decay", "constant", "--ckpt-every", "1",
                                             "--keep", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(writing.exists)
    finally:
        proc.kill()
        proc.wait()
    run = only_run(out)
    # killed in the middle of that write, to a temporary file of its own
    partial = os.path.join(run, f"ckpt-0000004.pt.{proc.pid}.tmp")
    assert os.path.getsize(partial) > 0
    for f in checkpoints_in(run):  # the write is atomic: every file under a complete name loads
        torch.load(f, weights_only=False)
    path, state = find_checkpoint(run)
    s = state["step"]
    assert s == 3  # the partial file is passed over
    capsys.readouterr()
    train.main(TINY + ["--steps", str(s + 2), "--decay", "constant", "--ckpt-every", "1", "--resume", "auto",
                       "--out", str(out)])
    assert [r["step"] for r in records(run) if "loss" in r][-2:] == [s + 1, s + 2]
    assert not os.path.exists(partial)
    assert ("resume: removed 1 unfinished checkpoint write(s) that a killed run left"
            in capsys.readouterr().out)


def test_unfinished_writes_are_removed_best_effort_and_a_folder_that_fails_stops_with_one_line(
        tmp_path, monkeypatch, capsys):
    """remove_unfinished_writes names a write it cannot remove and goes on; any other OSError while the
    resumed folder is set in order becomes the one refusal every rank raises."""
    import run as run_module
    for name in ("ckpt-0000004.pt.111.tmp", "ckpt-0000005.pt.222.tmp", "samples.png.333.tmp"):
        (tmp_path / name).write_bytes(b"x" * 1024)
    real_remove = os.remove

    def remove(path):
        if path.endswith(".111.tmp"):
            raise PermissionError(13, "Permission denied", path)
        real_remove(path)

    monkeypatch.setattr(run_module.os, "remove", remove)
    run_module.remove_unfinished_writes(str(tmp_path))
    out = capsys.readouterr().out
    assert "could not remove the unfinished checkpoint write" in out and "ckpt-0000004.pt.111.tmp" in out
    assert "removed 1 unfinished checkpoint write(s)" in out and "ckpt-0000005.pt.222.tmp" in out
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000004.pt.111.tmp", "samples.png.333.tmp"]

    def broken_log(run_dir, step):
        raise OSError(5, "Input/output error", os.path.join(run_dir, "log.jsonl"))

    monkeypatch.setattr(run_module, "rewind_log", broken_log)
    ckpt = os.path.join(str(tmp_path), "ckpt-0000003.pt")
    resumed = Resumed(ckpt, dict(step=3), 0.0)
    with pytest.raises(SystemExit, match=r"could not be prepared: \[Errno 5\] Input/output error"):
        run_module.resumed_folder(SimpleNamespace(resume=ckpt), resumed, 0, 1)


# ----------------------------------------------------------------- preemption ---

def signalled_run(tmp_path, sig):
    """A long train.py process sent `sig` after three log lines -> (its exit status, its output, the run
    folder, its only checkpoint, that checkpoint's step), once it has stopped."""
    cmd = [sys.executable, "train.py"] + TINY + ["--steps", "100000", "--ckpt-every", "100000", "--out",
                                                 str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: os.path.isdir(tmp_path) and os.listdir(tmp_path) and
             os.path.exists(os.path.join(only_run(tmp_path), "log.jsonl")) and
             len(records(only_run(tmp_path))) >= 3)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    run = only_run(tmp_path)
    (ckpt,) = checkpoints_in(run)
    return proc.returncode, out, run, ckpt, torch.load(ckpt, weights_only=False)["step"]


@pytest.mark.slow
def test_sigterm_single_process_checkpoints_and_exits_75(tmp_path):
    code, out, run, _, step = signalled_run(tmp_path, signal.SIGTERM)
    assert code == PREEMPTED, out[-2000:]
    assert "preempted by signal" in out and step == max(losses(run))


def torchrun(args, script="train.py", **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547", script]
    return subprocess.Popen(cmd + args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.mark.slow
def test_sigterm_under_torchrun_resumes_exactly(tmp_path):
    steps = ["--steps", "150", "--ckpt-every", "100000"]
    ref = torchrun(TINY + steps + ["--out", str(tmp_path / "ref")])
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    reference = losses(only_run(tmp_path / "ref"))

    cut = tmp_path / "cut"
    proc = torchrun(TINY + steps + ["--out", str(cut)], start_new_session=True)
    wait_for(lambda: os.path.isdir(cut) and os.listdir(cut) and
             os.path.exists(os.path.join(only_run(cut), "log.jsonl")) and len(records(only_run(cut))) >= 10)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the launcher and every rank get the signal
    out, _ = proc.communicate(timeout=120)
    run = only_run(cut)
    ckpts = checkpoints_in(run)
    assert len(ckpts) == 1, out[-3000:]  # one consistent checkpoint, written once by rank 0
    stopped = torch.load(ckpts[0], weights_only=False)["step"]
    assert 10 <= stopped < 150 and "preempted by signal" in out
    assert len(torch.load(ckpts[0], weights_only=False)["gen"]) == 2  # both ranks' noise streams

    again = torchrun(TINY + steps + ["--resume", run, "--out", str(cut)])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 151))
    assert all(resumed[s] == reference[s] for s in range(1, 151)), "resumed losses differ from the full run"


# ------------------------------------------------------------------- bad data ---


def broken_folder(root):
    """A dozen kinds of files a crawl contains, next to good images."""
    rng = np.random.default_rng(0)
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(20):
        Image.fromarray(rgb(24, 30)).save(good / f"{i}.png")
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_bytes(b"this is not an image")
    (bad / "noise.png").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    Image.fromarray(rgb(64, 64)).save(bad / "full.jpg", quality=90)
    data = (bad / "full.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(rgb(4, 4)).save(bad / "tiny.png")
    Image.fromarray(rgb(20, 20)).convert("CMYK").save(bad / "cmyk.jpg")
    Image.fromarray(rgb(20, 20)).convert("P").save(bad / "palette.png")
    Image.fromarray(rgb(20, 20)).convert("RGBA").save(bad / "alpha.png")
    Image.fromarray(rgb(20, 20)).convert("L").save(bad / "gray.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(bad / "deep.png")
    Image.fromarray(rgb(20, 20)).convert("1").save(bad / "bitmap.png")
    return root


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(tmp_path / "white.png")
    Image.fromarray(np.full((10, 10), 32896, np.uint16)).save(tmp_path / "mid.png")
    white, kind = load_rgb(tmp_path / "white.png")
    mid, _ = load_rgb(tmp_path / "mid.png")
    assert kind == "16bit" and np.asarray(white).min() == 255 and np.asarray(mid).max() == 128


@pytest.mark.slow
def test_broken_files_are_skipped_and_counted(tmp_path, capfd):
    root = broken_folder(tmp_path / "data")
    run = train.main(["--dataset", "folder", "--data-path", str(root), "--vae", "none", "--model", "T/4",
                      "--res", "16",
                      "--base-res", "16", "--batch", "8", "--steps", "6", "--workers", "2", "--max-skip-rate",
                      "0.5", "--log-every", "3", "--out", str(tmp_path / "runs")])
    counts = records(run)[-1]["data"]
    for kind in ("unreadable", "truncated", "tiny", "cmyk", "palette", "alpha", "gray", "16bit"):
        assert counts.get(kind, 0) >= 1, (kind, counts)
    assert counts["ok"] >= 6 * 8
    printed = capfd.readouterr().out  # reported by the loader workers: capture at the file-descriptor level
    assert "skipping truncated image" in printed and "converting cmyk image" in printed


def test_each_dataset_reports_its_own_first_bad_file_of_a_kind(capsys):
    # a second run in one process (a notebook, this test session) is told about its own bad files, not left
    # silent because an earlier run's dataset reported the kind
    for run in range(2):
        events = event_table()
        count_event(events, "truncated", "a.jpg: image file is truncated")
        count_event(events, "truncated", "b.jpg: image file is truncated")
        printed = capsys.readouterr().out
        assert printed.count("skipping truncated image (a.jpg") == 1, (run, printed)
        assert "b.jpg" not in printed
        assert events[0, EVENTS.index("truncated")] == 2 and events.sum() == 2  # both counted


@pytest.mark.slow
def test_too_many_broken_files_stop_the_run(tmp_path):
    root = broken_folder(tmp_path / "data")
    with pytest.raises(SystemExit, match="could not be used"):
        train.main(["--dataset", "folder", "--data-path", str(root), "--vae", "none", "--model", "T/4",
                    "--res", "16", "--base-res", "16", "--batch", "8", "--steps", "40", "--workers", "0",
                    "--max-skip-rate", "0.01", "--log-every", "5", "--out", str(tmp_path / "runs")])


@pytest.mark.slow
def test_a_folder_of_only_bad_images_ends_with_one_line_not_a_loader_traceback(tmp_path):
    """Every file unreadable: the loader workers' exception reaches the training process wrapped in their
    traceback; the run ends with its message alone."""
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "data" / cls)
        for i in range(6):
            (tmp_path / "data" / cls / f"{i}.png").write_text("not an image")
    cmd = [sys.executable, "train.py", "--dataset", "folder", "--data-path", str(tmp_path / "data"),
           "--recipe", "small", "--model", "T/4", "--res", "16", "--batch", "4", "--steps", "2",
           "--workers", "2", "--out", str(tmp_path / "runs")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"item \d+ of .*data and the 49 stand-ins drawn for it are all bad images .*check "
                     r"--data-path$", done.stderr, re.M), done.stderr[-3000:]


# ----------------------------------------------------------------- divergence ---


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(Diffusion, "loss", nan_loss({3}))
    run = train.main(TINY + ["--steps", "6", "--out", str(tmp_path)])
    recs = [r for r in records(run) if "loss" in r]
    assert recs[-1]["skipped_steps"] == 1 and recs[2]["loss"] is None and np.isfinite(recs[3]["loss"])
    state = torch.load(checkpoints_in(run)[0], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_on_all(tmp_path):
    script = train_script(
        tmp_path, """
        import os
        from diffusion import Diffusion
        from conftest import nan_loss
        if os.environ["RANK"] == "0":  # one rank's loss goes bad
            Diffusion.loss = nan_loss({2})
    """,
    )
    proc = torchrun(TINY + ["--steps", "5", "--out", str(tmp_path / "runs")], script=script)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    recs = records(only_run(tmp_path / "runs"))
    assert recs[-2]["skipped_steps"] == 1 and recs[-1]["replicas_identical"] is True


@pytest.mark.slow
def test_nan_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(Diffusion, "loss", nan_loss({4, 5, 6}))
    with pytest.raises(SystemExit, match=r"3 non-finite steps in a row by step 6 \(--max-bad-steps 3\); the "
                       r"last checkpoint is .*ckpt-0000003\.pt"):
        train.main(TINY + ["--steps", "10", "--ckpt-every", "3", "--max-bad-steps", "3", "--out",
                           str(tmp_path)])


# ------------------------------------------------------ one owner per run folder ---

@pytest.mark.slow
def test_a_second_process_on_a_running_folder_is_refused_and_a_killed_one_frees_it(tmp_path):
    """Two real processes: the second (`--resume auto` into the same --out, as a requeued job would) is
    refused with the first's pid and moves nothing; once the first is killed, the same command resumes."""
    out = str(tmp_path)
    flags = TINY + ["--decay", "constant", "--ckpt-every", "1", "--sample-every", "-1", "--out", out]
    first = subprocess.Popen([sys.executable, "train.py", *flags, "--steps", "100000"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.listdir(out) and len(checkpoints_in(only_run(out))) >= 2)
        run = only_run(out)
        second = subprocess.run([sys.executable, "train.py", *flags, "--steps", "100000", "--resume", "auto"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert f"is in use by another training process (pid {first.pid} on" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and not os.path.exists(os.path.join(run, "abandoned"))
    finally:
        first.kill()
        first.wait()
    step = find_checkpoint(run)[1]["step"]
    again = subprocess.run([sys.executable, "train.py", *flags, "--steps", str(step + 1), "--resume", "auto"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(losses(run)) == list(range(1, step + 2))  # every step once: the log was rewound


def test_a_checkpoint_written_while_a_resume_started_is_not_abandoned(tmp_path):
    """A requeued job chose the newest checkpoint; its predecessor then wrote a newer one and ended before
    the lock was free. Resuming the older one would move the newer to abandoned/: refused, nothing moved. A
    later checkpoint that was there when the job looked (a damaged one --resume auto passed over) is no
    reason to refuse, and neither is any later one when --resume names the file itself."""
    run = tmp_path / "run"
    run.mkdir()
    chosen = str(run / "ckpt-0000001.pt")
    for name in ("ckpt-0000001.pt", "ckpt-0000002.pt"):  # 2: damaged, passed over
        (run / name).write_bytes(b"x")
    time.sleep(0.05)  # file times come from a coarse clock
    resumed = Resumed(chosen, {"step": 1}, time.time())
    time.sleep(0.05)
    (run / "ckpt-0000003.pt").write_bytes(b"written since")
    with pytest.raises(SystemExit, match=r"ckpt-0000003.pt was written while this process started .*run the "
                       r"command again"):
        resumed_folder(SimpleNamespace(resume=str(run)), resumed, 0, 1)
    assert sorted(os.listdir(run)) == [".lock", "ckpt-0000001.pt", "ckpt-0000002.pt", "ckpt-0000003.pt"]
    os.remove(run / "ckpt-0000003.pt")  # the folder was given back: a second try locks it
    run_dir, lock = resumed_folder(SimpleNamespace(resume=str(run)), resumed, 0, 1)
    lock.release()
    assert os.listdir(run / "abandoned") == ["ckpt-0000002.pt"]
    (run / "ckpt-0000003.pt").write_bytes(b"written since")
    run_dir, lock = resumed_folder(SimpleNamespace(resume=chosen), resumed, 0, 1)
    lock.release()
    assert sorted(os.listdir(run / "abandoned")) == ["ckpt-0000002.pt", "ckpt-0000003.pt"]


def test_a_released_lock_frees_the_folder_while_forked_workers_live(tmp_path):
    """Loader workers forked while the lock was held share it: a release must unlock, not only close, or the
    folder stays taken (a notebook's next run, a test that resumes in the same process) until they exit."""
    lock = RunLock(str(tmp_path))
    child = os.fork()
    if child == 0:  # a loader worker: holds the inherited descriptor a while
        time.sleep(30)
        os._exit(0)
    try:
        lock.release()
        RunLock(str(tmp_path)).release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# ----------------------------------------------------------------------- Ctrl-C ---

@pytest.mark.slow
def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(tmp_path):
    code, out, run, ckpt, step = signalled_run(tmp_path, signal.SIGINT)
    assert code == INTERRUPTED, out[-2000:]
    assert "Ctrl-C: finishing this step and writing a checkpoint" in out and "Traceback" not in out
    assert step == max(losses(run)) and f"stopped by Ctrl-C at step {step}: wrote {ckpt}" in out


def test_a_second_ctrl_c_stops_at_once():
    preempt = Preemption()
    try:
        preempt._handler(signal.SIGINT, None)
        assert preempt.signal == signal.SIGINT  # the first: a flag, the loop checkpoints
        with pytest.raises(KeyboardInterrupt):
            preempt._handler(signal.SIGINT, None)
    finally:
        preempt.restore()


# --------------------------------------------------------- a resume is the same run ---

@pytest.mark.slow
def test_a_resume_refuses_to_bend_the_schedule_or_redo_a_finished_run_and_names_changed_flags(tmp_path,
                                                                                              capsys):
    run = train.main(TINY + ["--steps", "4", "--ckpt-every", "2", "--keep", "5", "--sample-every", "-1",
                             "--out", str(tmp_path)])
    half = os.path.join(run, "ckpt-0000002.pt")
    # resumed inside the warm-up (5 steps), where both schedules agree: named is the step where they part
    with pytest.raises(SystemExit, match=r"cosine schedule is laid over --steps \(4 in the run\): from "
                       r"step 6 the learning rate would be 0\.00155 instead of 0\.0002\. Resume with "
                       r"--steps 4, or train longer in a new run: --init-from"):
        train.main(TINY + ["--steps", "8", "--resume", half, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"at step 4 and --steps 4 asks for no more: the run is finished"):
        train.main(TINY + ["--steps", "4", "--resume", run, "--out", str(tmp_path)])
    capsys.readouterr()
    train.main(TINY + ["--steps", "4", "--lr", "1e-3", "--sample-every", "-1", "--resume", half, "--out",
                       str(tmp_path)])
    assert ("resume: these flags differ from the checkpoint's run and take effect from step 2: --lr 0.002 -> "
            "0.001") in capsys.readouterr().out


def test_a_resume_may_change_steps_when_every_step_left_keeps_its_rate(capsys):
    """Another --steps under a cosine schedule is refused only where it bends the rate of a step this run
    still trains: resumed at step 2 with --steps 8 and a 10-step warm-up, every step left lies in the
    warm-up, whether the run had 4 steps or 100, so the resume goes on and names the change; with an 8-step
    warm-up and --steps 12 the rates part one step after it, and the resume is refused at that step. A change
    of decay is named, not blamed on --steps."""
    def resume(steps, warmup, saved_steps=4, decay="cosine"):
        was = get_args(TINY + ["--steps", str(saved_steps), "--warmup", str(warmup), "--decay", decay])
        ckpt = dict(args=vars(was), facts=dataclasses.asdict(facts_of(was)), config_version=CONFIG_VERSION,
                    step=2)
        now = get_args(TINY + ["--steps", str(steps), "--warmup", str(warmup)])
        train.check_resume(now, facts_of(now), Resumed("run/ckpt-0000002.pt", ckpt, 0.0), train.lr_at)
        return capsys.readouterr().out

    for saved_steps in (4, 100):
        assert (f"--steps {saved_steps} -> 8 (every step left to train is in the warm-up, at the rate it had)"
                in resume(8, warmup=10, saved_steps=saved_steps))
    with pytest.raises(SystemExit, match=r"from step 9 the learning rate would be 0\.00174 instead of "):
        resume(12, warmup=8)
    assert "--decay 'constant' -> 'cosine'" in resume(8, warmup=10, saved_steps=100, decay="constant")


@pytest.mark.slow
def test_a_resume_with_other_data_is_refused(tmp_path):
    def folder(root, n):
        for cls in ("a", "b"):
            os.makedirs(root / cls, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((20, 20, 3), 25 * i, np.uint8)).save(root / cls / f"{i}.png")
        return str(root)
    one, two = folder(tmp_path / "one", 8), folder(tmp_path / "two", 8)
    flags = ["--dataset", "folder", "--recipe", "small", "--model", "T/4", "--res", "16", "--batch", "4",
             "--eval-per-class", "0", "--sample-every", "-1", "--steps", "3"]
    run = train.main(flags + ["--data-path", one, "--steps", "2", "--decay", "constant",
                              "--out", str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match="data_path: checkpoint .*one.* vs now .*two"):
        train.main(flags + ["--data-path", two, "--decay", "constant", "--resume", run])
    more = folder(tmp_path / "one", 10)  # two more images per class in the same folder
    with pytest.raises(SystemExit, match="data_size: checkpoint 16 vs now 20"):
        train.main(flags + ["--data-path", more, "--decay", "constant", "--resume", run])
    for cls in ("a", "b"):  # back to the 8 images each ...
        for i in (8, 9):
            os.remove(tmp_path / "one" / cls / f"{i}.png")
    # ... but one of them swapped for another picture under the same name: the same names, the same count
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "one" / "a" / "3.png")
    with pytest.raises(SystemExit, match="data_fingerprint: the training data changed since the checkpoint"):
        train.main(flags + ["--data-path", one, "--decay", "constant", "--resume", run])
    assert train.main(flags + ["--data-path", one, "--decay", "constant", "--resume", run,
                               "--accept-data-change"]) == run


def test_the_data_fingerprint_is_read_by_rank_0_and_a_file_gone_stops_with_one_line(tmp_path):
    """Rank 0 alone reads the files (another rank takes its answer, so here, in one process, it reads
    nothing); a file listed but gone by then ends the run with a message, not a traceback."""
    for i in range(3):
        os.makedirs(tmp_path / "a", exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    ds = build_dataset("folder", 16, str(tmp_path))
    assert shared_fingerprint(ds) == data_fingerprint(ds) is not None
    os.remove(tmp_path / "a" / "1.png")
    assert shared_fingerprint(ds, rank=1) is None
    gone = r"the training data could not be read for its fingerprint: .*1\.png'; check the files"
    with pytest.raises(SystemExit, match=gone):
        shared_fingerprint(ds)


# --------------------------------------------------------- damaged bytes, full disks ---

def test_changed_bytes_inside_a_checkpoint_are_reported_and_passed_over(tmp_path):
    """torch.load would read the changed bytes as weights; the CRC-32s the zip carries say they changed."""
    from checkpoint import UnreadableCheckpoint, read_checkpoint, write_checkpoint
    older, newer = str(tmp_path / "ckpt-0000001.pt"), str(tmp_path / "ckpt-0000002.pt")
    for path, step in ((older, 1), (newer, 2)):
        write_checkpoint(path, dict(model={"w": torch.randn(256, 256)}, step=step))
    data = bytearray(open(newer, "rb").read())
    at = data.index(b"data/0") + 4096  # well inside the tensor's bytes
    data[at:at + 100] = bytes(100)
    open(newer, "wb").write(data)
    with pytest.raises(UnreadableCheckpoint, match=r"damaged, record .*data/0 fails its CRC-32 check"):
        read_checkpoint(newer)
    path, state = find_checkpoint(str(tmp_path))  # --resume RUN / auto: the one before
    assert path == older and state["step"] == 1
    with pytest.raises(SystemExit, match="--ckpt: .*damaged, record"):
        find_checkpoint(newer, flag="--ckpt")


@pytest.mark.parametrize("error, cause", [
    (OSError(28, "No space left on device"), "no space left on the device"),
    # torch's own words for a short write, whose cause it does not give
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024. "
                  "PytorchStreamWriter failed writing file data/0: file write failed"),
     r"the write was cut short \(a full disk or a quota\?\)")])
def test_a_full_disk_says_which_file_and_what_to_do_and_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                                    error, cause):
    import checkpoint

    def fails(state, f):
        f.write(b"x" * 1000)  # part of it was written
        raise error
    monkeypatch.setattr(checkpoint.torch, "save", fails)
    path = str(tmp_path / "ckpt-0000002.pt")
    with pytest.raises(checkpoint.WriteFailed,
                       match=rf"could not write .*ckpt-0000002.pt: {cause}; .* GiB free there\. Nothing "
                       r"half-written was left; free space in .* \(or write elsewhere\); the last good "
                       r"checkpoint is ckpt-0000001.pt"):
        checkpoint.write_checkpoint(path, {}, advice="the last good checkpoint is ckpt-0000001.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error, cause, remedy", [
    (OSError(13, "Permission denied"), "permission denied", "make .* writable"),
    (OSError(30, "Read-only file system"), "read-only file system", "make .* writable"),
    # torch's short write on a device left with (nearly) nothing free: the full disk is the cause
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024"),
     "no space left on the device", "free space in")])
def test_a_write_that_fails_names_its_own_cause_and_remedy(tmp_path, monkeypatch, error, cause, remedy):
    """A read-only or unwritable folder is not told to free space; torch's "unexpected pos" on a full device
    is named as the full device it is."""
    import checkpoint

    def fails(state, f):
        raise error
    monkeypatch.setattr(checkpoint.torch, "save", fails)
    monkeypatch.setattr(checkpoint, "free_space", lambda path: 0)
    with pytest.raises(checkpoint.WriteFailed, match=rf": {cause}; 0.0 GiB free there\. Nothing half-written "
                       rf"was left; {remedy}"):
        checkpoint.write_checkpoint(str(tmp_path / "ckpt-0000001.pt"), {})


@pytest.mark.slow
def test_a_full_disk_at_the_first_checkpoint_does_not_advise_a_resume(tmp_path, monkeypatch):
    """The run has no checkpoint to resume from: the message says to run the command again."""
    import checkpoint

    def fails(state, f):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", fails)
    with pytest.raises(SystemExit, match=r"ckpt-0000002.pt: no space left on the device.*free space in .*; "
                       r"the run wrote no checkpoint before this one: then run the command again") as stop:
        train.main(TINY + ["--steps", "4", "--ckpt-every", "2", "--sample-every", "-1", "--out",
                           str(tmp_path)])
    assert "--resume" not in str(stop.value)


@pytest.mark.slow
def test_a_full_disk_during_training_ends_with_one_line_naming_the_checkpoint_to_resume(tmp_path,
                                                                                        monkeypatch):
    import checkpoint
    real, calls = checkpoint.torch.save, []

    def second_fails(state, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(state, f)
    monkeypatch.setattr(checkpoint.torch, "save", second_fails)
    with pytest.raises(SystemExit, match=r"could not write .*ckpt-0000004.pt: no space left on the device.* "
                       r"free space in .*; then continue with --resume .* \(the last good checkpoint is "
                       r".*ckpt-0000002.pt\)"):
        train.main(TINY + ["--steps", "6", "--ckpt-every", "2", "--sample-every", "-1", "--out",
                           str(tmp_path)])
    run = only_run(tmp_path)
    assert [os.path.basename(f) for f in checkpoints_in(run)] == ["ckpt-0000002.pt"]
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


@pytest.mark.slow
def test_an_autoencoder_that_cannot_be_downloaded_says_what_chose_it_and_how_to_train_without_it(tmp_path,
                                                                                                 monkeypatch):
    def offline(facts):
        raise OSError("stabilityai/sd-vae-ft-ema does not appear to have a file named config.json")
    import build
    monkeypatch.setattr(build, "make_autoencoder", offline)
    with pytest.raises(SystemExit, match=r"--vae sd-ema \(command line\): could not load .* downloaded from "
                       r"the Hugging Face hub \(stabilityai/sd-vae-ft-ema\).*--vae none"):
        train.main(["--model", "T/2", "--res", "16", "--batch", "2", "--steps", "1", "--shapes-size", "8",
                    "--vae", "sd-ema", "--eval-per-class", "0", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv, message",
                         [(["fid.py", "a.npz", "b.npz", "--batch", "0"], "--batch must be >= 1"),
                                           (["fid.py", "a.npz", "b.npz", "--k", "0"], "--k must be >= 1"),
                                           (["fid.py", "a.npz", "b.npz", "--splits", "0"],
                                            "--splits must be >= 1"),
                                           (["encode.py", "--out", "x", "--shard-size", "0"],
                                            "--shard-size must be >= 1"),
                                           (["encode.py", "--out", "x", "--res", "-8"], "--res must be >= 1"),
                                           (["encode.py", "--out", "x", "--workers", "-1"],
                                            "--workers must be >= 0")])
def test_counts_of_fid_and_encode_are_checked_before_any_work(argv, message, capsys):
    import encode
    import fid
    main = {"fid.py": fid.main, "encode.py": encode.main}[argv[0]]
    with pytest.raises(SystemExit) as e:
        main(argv[1:])
    assert message in str(e.value.code) + capsys.readouterr().err


def test_a_checkpoint_written_without_crcs_still_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes records with CRC 0: nothing to check, not
    damage."""
    from checkpoint import read_checkpoint
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes CRCs")
    path = str(tmp_path / "no-crc.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(64, 64)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(64, 64))


def test_a_new_run_is_numbered_after_the_highest_run_folder_whatever_else_lies_there(tmp_path):
    """run.new_run_dir numbers by the highest NNN- folder under --out: a stray file or folder of another name
    does not shift the number, and a gap is not filled (a deleted run's number is not given to another)."""
    for name in ("000-shapes-T-4-ours", "003-shapes-T-4-ours"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "old-runs").mkdir()
    args = SimpleNamespace(out=str(tmp_path), dataset="shapes", model="T/4", cond="ours")
    assert os.path.basename(new_run_dir(args, 0, 1)) == "004-shapes-T-4-ours"
    args.out = str(tmp_path / "new")
    assert os.path.basename(new_run_dir(args, 0, 1)) == "000-shapes-T-4-ours"
