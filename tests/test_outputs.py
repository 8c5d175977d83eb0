"""Nothing lost, nothing silent, around a run: every entry point checks what it writes before any work (an
extension that says what is written; never one of its inputs, a checkpoint, a file of another kind, or a place
inside the dataset), temporary and part files are a process's or a job's own, two writers of one --num-samples
file never mix, and every text file is read in a named encoding (a file that does not decode is named with its
line and the flag that chooses another)."""
import io
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import checks
import encode
import fid
import sample
import train
from build import SourceOptions, build_dataset, open_dataset
from checkpoint import checkpoints_in
from checks import check_output
from config import get_args
from conftest import ROOT, TINY, wait_for, write_shard
from data import EVENTS
from shards import WebDatasetShards

LATIN1 = "un café crème\nà la carte\n".encode("latin-1")  # é (0xe9) is no UTF-8 sequence of its own


def png_bytes(seed=0, size=16):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_folder(root, classes=("a", "b"), per_class=2):
    """root/<class>/<j>.png: the smallest ImageFolder tree."""
    for cls in classes:
        os.makedirs(root / cls, exist_ok=True)
        for j in range(per_class):
            (root / cls / f"{j}.png").write_bytes(png_bytes(j))
    return root


def a_checkpoint(path):
    torch.save({"ema": {"w": torch.zeros(2)}}, path)
    return str(path)


def refusal(capsys, call):
    """The message of an argparse refusal (exit status 2, the message on stderr)."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------ 1. output paths, one rule ---


def test_a_grid_out_must_be_an_image_type(tmp_path):
    ckpt = a_checkpoint(tmp_path / "ckpt-0000002.pt")
    for name in ("grid.pt", "grid.npz", "grid.txt", "grid"):
        with pytest.raises(SystemExit, match=rf"--out .*{name}: writes an image; end the path in \.png, "
                           r"\.jpg, \.jpeg or \.webp"):
            sample.main(["--ckpt", ckpt, "--out", str(tmp_path / name)])


def test_a_grid_over_an_existing_npz_or_checkpoint_is_refused(tmp_path):
    """The issue's two cases: a PNG written over a samples .npz and over a ckpt-*.pt, by their own names or
    renamed to an image's."""
    ckpt = a_checkpoint(tmp_path / "ckpt-0000002.pt")
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((1, 4, 4, 3), np.uint8))
    other = a_checkpoint(tmp_path / "ckpt-0000001.pt")
    os.replace(tmp_path / "samples.npz", tmp_path / "looks-like.png")
    with pytest.raises(SystemExit, match="the file there is an .npz, and this writes an image: writing would "
                       "destroy it"):
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "looks-like.png")])
    with pytest.raises(SystemExit, match="the file there is a checkpoint, and this writes an image"):
        sample.main(["--ckpt", ckpt, "--out", other])
    os.replace(other, tmp_path / "also.jpg")
    with pytest.raises(SystemExit, match="the file there is a checkpoint"):
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "also.jpg")])


def test_num_samples_out_must_be_an_npz_and_no_checkpoint(tmp_path):
    ckpt = a_checkpoint(tmp_path / "ckpt-0000002.pt")
    with pytest.raises(SystemExit, match=r"--out .*s\.png: writes an \.npz; end the path in \.npz"):
        sample.main(["--ckpt", ckpt, "--num-samples", "4", "--out", str(tmp_path / "s.png")])
    with pytest.raises(SystemExit, match="that is --ckpt, an input of this command"):
        sample.main(["--ckpt", ckpt, "--num-samples", "4", "--out", ckpt])


def test_export_must_be_safetensors_and_not_its_own_checkpoint(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # a safetensors header holding nothing
    with pytest.raises(SystemExit, match=r"--export .*model\.safetensors: that is --ckpt, an input"):
        sample.main(["--ckpt", str(weights), "--export", str(weights)])
    ckpt = a_checkpoint(tmp_path / "ckpt-0000002.pt")
    with pytest.raises(SystemExit, match=r"--export .*model\.pt: the file there is a checkpoint"):
        sample.main(["--ckpt", ckpt, "--export", a_checkpoint(tmp_path / "model.pt")])


def test_an_output_that_is_the_prompts_file_is_refused(tmp_path):
    ckpt = a_checkpoint(tmp_path / "ckpt-0000002.pt")
    prompts = tmp_path / "prompts.png"
    prompts.write_text("a red circle\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="that is --prompts, an input of this command"):
        sample.main(["--ckpt", ckpt, "--prompts", str(prompts), "--out", str(prompts)])


def test_an_output_folder_is_made_or_said_in_one_line(tmp_path):
    """A missing folder is made before any work (sample.py always did); one that cannot be made -- a file
    stands in its path -- is one line, before any work."""
    check_output(str(tmp_path / "new" / "deeper" / "grid.png"), checks.IMAGE_TYPES)
    assert (tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    ckpt = a_checkpoint(tmp_path / "ckpt-0000002.pt")
    with pytest.raises(SystemExit, match=r"--out .*a-file/grid\.png: .*a-file is a file, not a folder; "
                       "choose another path"):
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "a-file" / "grid.png")])
    with pytest.raises(SystemExit, match=r"--out .*a-file/deeper/grid\.png: the folder .*a-file/deeper "
                       r"cannot be made \(Not a directory\); choose another path"):
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "a-file" / "deeper" / "grid.png")])
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(SystemExit, match="folder.png: a folder; name the file to write"):
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "folder.png")])


def test_fid_outputs_are_npz_and_json_and_never_an_input(tmp_path, capsys):
    ref, smp = tmp_path / "ref.npz", tmp_path / "samples.npz"
    for path in (ref, smp):
        np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    err = refusal(capsys, lambda: fid.get_args([str(ref), "--save-stats", str(ref)]))
    assert f"--save-stats {ref}: that is REF, an input of this command" in err
    err = refusal(capsys, lambda: fid.get_args([str(ref), str(smp), "--save-stats", str(smp)]))
    assert "--save-stats" in err and "that is SAMPLE, an input of this command" in err
    err = refusal(capsys, lambda: fid.get_args([str(ref), str(smp), "--out", str(tmp_path / "r.npz")]))
    assert "writes a JSON file; end the path in .json" in err
    (tmp_path / "samples.json").write_text("{}", encoding="utf-8")
    err = refusal(capsys, lambda: fid.get_args([str(ref), str(smp), "--out", str(tmp_path / "samples.json")]))
    assert "that is SAMPLE's settings, an input" in err
    folder = image_folder(tmp_path / "images")
    err = refusal(capsys, lambda: fid.get_args([str(folder), "--save-stats", str(folder / "a" / "s.npz")]))
    assert "lies in REF" in err and "a folder of images this command reads" in err
    a_checkpoint(tmp_path / "stats.npz")
    err = refusal(capsys, lambda: fid.get_args([str(ref), "--save-stats", str(tmp_path / "stats.npz")]))
    assert "the file there is not an .npz" in err


def test_fid_refuses_save_stats_over_its_own_ref(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    err = refusal(capsys, lambda: fid.main([str(ref), "--save-stats", str(ref)]))
    assert f"--save-stats {ref}: that is REF, an input of this command: writing it would destroy it" in err
    with np.load(ref) as z:
        assert set(z.files) == {"mu", "sigma"}


def test_train_out_that_is_holds_or_lies_in_the_dataset_is_refused(tmp_path):
    """`--out` equal to the dataset folder used to train on the run folder as a class."""
    data = image_folder(tmp_path / "data")
    flags = ["--dataset", "folder", "--data-path", str(data), "--vae", "none", "--model", "T/4", "--res",
             "16"]
    for out, how in ((data, "is"), (data / "runs", "lies in"), (tmp_path, "holds")):
        with pytest.raises(SystemExit, match=rf"--out {out}: {how} the dataset {data} \(--data-path\): its "
                           "files would be overwritten or read as data; write outside it"):
            train.main(flags + ["--out", str(out)])
    assert sorted(os.listdir(data)) == ["a", "b"]  # nothing was made in it


def test_train_out_in_a_csv_or_shard_dataset_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "0.tar", [("k0", {"png": png_bytes(), "txt": b"a caption"})])
    flags = ["--dataset", "webdataset", "--data-path", str(tmp_path / "shards" / "*.tar"), "--cond-type",
             "text", "--vae", "none", "--model", "T/4", "--res", "16"]
    with pytest.raises(SystemExit, match=r"lies in the dataset .*shards \(--data-path .*\*\.tar\)"):
        train.main(flags + ["--out", str(tmp_path / "shards" / "runs")])


def test_encode_out_inside_the_data_is_refused(tmp_path):
    data = image_folder(tmp_path / "data")
    with pytest.raises(SystemExit, match=rf"--out {data / 'cache'}: lies in the dataset {data}"):
        encode.main(["--dataset", "folder", "--data-path", str(data), "--vae", "none", "--res", "16", "--out",
                     str(data / "cache")])
    assert sorted(os.listdir(data)) == ["a", "b"]


def test_experiment_outputs_are_checked_before_any_work(tmp_path):
    from experiments import report
    from experiments.__main__ import main as experiments
    base = ["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    with pytest.raises(SystemExit, match=r"--results .*page\.txt: writes a text file; end the path in \.md"):
        experiments(["results", "--results", str(tmp_path / "page.txt")] + base)
    with pytest.raises(SystemExit, match=r"--results .*no-such-page\.md: no such page"):
        experiments(["results", "--results", str(tmp_path / "no-such-page.md")] + base)
    (tmp_path / "runs-file").write_text("", encoding="utf-8")
    with pytest.raises(SystemExit, match="--out .*runs-file: a file, not a folder"):
        experiments(["results", "--out", str(tmp_path / "runs-file")])
    with pytest.raises(SystemExit, match=r"--out .*perf\.png: writes a text file; end the path in \.md"):
        report.main(["--out", str(tmp_path / "perf.png")])


# ------------------------------------------------------- 2. temporary and part files of their own ---


def test_atomic_write_uses_a_temporary_file_of_its_own_that_checkpoints_in_passes_over(tmp_path):
    path = str(tmp_path / "ckpt-0000001.pt")
    seen = []

    def write(f):
        seen.append(os.path.basename(f.name))
        assert checkpoints_in(str(tmp_path)) == []  # a write in progress is no checkpoint
        torch.save({"step": 1}, f)
    checkpoint.atomic_write(path, write)
    assert seen == [f"ckpt-0000001.pt.{os.getpid()}.tmp"]
    assert os.listdir(tmp_path) == ["ckpt-0000001.pt"]


def test_a_job_tag_names_the_host_and_the_process():
    assert checks.job_tag() == f"{socket.gethostname()}-{os.getpid()}"


def test_a_second_writer_of_one_output_is_refused_with_the_holder(tmp_path):
    out = str(tmp_path / "s.npz")
    with checks.OutputLock(out):
        assert open(out + ".lock", encoding="utf-8").read().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(SystemExit, match=rf"--out {out}: another process is writing it \(pid "
                           rf"{os.getpid()} on .*\); two writers would mix their samples"):
            checks.OutputLock(out)
    assert not os.path.exists(out + ".lock")  # let go and cleaned up
    with checks.OutputLock(out):  # free again
        pass


# -------------------------------------------------------------------------- 3. text inputs ---


def test_a_latin1_caption_file_fails_with_its_name_line_and_the_flag_and_reads_with_it(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    (tmp_path / "img.txt").write_bytes(LATIN1)
    with pytest.raises(ValueError, match=r"img\.txt, line 1: byte 0xe9 is not utf-8 text; name the file's "
                       r"encoding with --text-encoding \(e\.g\. --text-encoding latin-1\)"):
        build_dataset("captions", 16, str(tmp_path))
    ds = build_dataset("captions", 16, str(tmp_path), options=SourceOptions(text_encoding="latin-1"))
    assert ds.captions() == ["un café crème\nà la carte"]


def test_a_latin1_caption_csv_names_its_line(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    (tmp_path / "pairs.csv").write_bytes("image,caption\nimg.png,plain\nimg.png,crème\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"pairs\.csv, line 3: byte 0xe8 is not utf-8 text"):
        build_dataset("captions", 16, str(tmp_path / "pairs.csv"))
    ds = build_dataset("captions", 16, str(tmp_path / "pairs.csv"),
                       options=SourceOptions(text_encoding="cp1252"))
    assert ds.captions() == ["plain", "crème"]


def test_train_reads_captions_in_the_text_encoding_it_is_given(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    (tmp_path / "img.txt").write_bytes(LATIN1)
    flags = ["--dataset", "captions", "--data-path", str(tmp_path), "--cond-type", "text", "--vae", "none"]
    with pytest.raises(SystemExit, match=r"--dataset captions: .*img\.txt, line 1: .*--text-encoding"):
        open_dataset(get_args(flags))
    assert open_dataset(get_args(flags + ["--text-encoding", "latin-1"])).captions()[0].startswith("un café")


def test_a_shard_caption_that_does_not_decode_is_skipped_counted_and_named(tmp_path, capsys):
    """A stream is not stopped for one caption: it is skipped and counted like an unreadable image (a shard of
    nothing else stops at --max-skip-rate), and the first one is named with the flag."""
    write_shard(tmp_path / "0.tar", [("k0", {"png": png_bytes(0), "txt": LATIN1}),
                                     ("k1", {"png": png_bytes(1), "txt": b"plain"})])
    ds = WebDatasetShards(str(tmp_path / "0.tar"), 16)
    assert [caption for _, _, _, caption in ds] == ["plain"]
    assert ds.events[:, EVENTS.index("undecodable_caption")].sum() == 1
    out = capsys.readouterr().out
    assert "data: skipping an item whose caption does not decode" in out and "0.tar:k0.txt, line 1" in out
    assert "--text-encoding" in out
    ds = WebDatasetShards(str(tmp_path / "0.tar"), 16, text_encoding="latin-1")
    assert sorted(caption for _, _, _, caption in ds) == ["plain", "un café crème\nà la carte"]


def test_sample_prompts_file_in_latin1_fails_with_its_line_and_reads_with_the_flag(tmp_path):
    from argparse import Namespace
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n" + "a café\n".encode("latin-1"))
    trained = Namespace(args=Namespace(cond_type="text"))
    flags = sample.parse(["--ckpt", "unused", "--prompts", str(prompts)])
    with pytest.raises(SystemExit, match=rf"--prompts {prompts}, line 2: byte 0xe9 is not utf-8 text; name "
                       "the file's encoding with --text-encoding"):
        sample.read_prompts(flags, trained)
    flags = sample.parse(["--ckpt", "unused", "--prompts", str(prompts), "--text-encoding", "latin-1"])
    assert sample.read_prompts(flags, trained) == ["a red circle", "a café"]


def test_fid_prompts_in_latin1_fail_before_any_work(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("un café\n".encode("latin-1"))
    args = ["a.npz", "b.npz", "--clip", "no-such-model", "--prompts", str(prompts)]
    with pytest.raises(SystemExit, match=rf"--prompts {prompts}, line 1: byte 0xe9 is not utf-8 text"):
        fid.get_args(args)
    assert fid.read_lines(str(prompts), "latin-1") == ["un café"]


def test_an_unknown_text_encoding_is_refused_by_every_entry_point(capsys):
    for call in (lambda: get_args(["--text-encoding", "no-such-encoding"]),
                 lambda: sample.parse(["--ckpt", "x", "--text-encoding", "no-such-encoding"]),
                 lambda: fid.get_args(["a.npz", "b.npz", "--text-encoding", "no-such-encoding"]),
                 lambda: encode.main(["--out", "x", "--text-encoding", "no-such-encoding"])):
        assert "unknown text encoding 'no-such-encoding'" in refusal(capsys, call)


def test_every_text_file_the_code_opens_names_its_encoding():
    """Python's default is the locale's encoding: a text open() without one reads differently per machine."""
    import re
    unnamed = []
    for folder in (ROOT, os.path.join(ROOT, "experiments")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if (re.search(r"(?<![\w.])open\((?!\))", line) and "encoding=" not in line
                                and not re.search(r"\"[rwa]b\"|\"a\+b\"", line)):
                            unnamed.append(f"{name}:{i}: {line.strip()}")
    assert unnamed == []


# ------------------------------------------------------------------- 4. commands that exist ---


def test_no_comment_names_a_command_that_does_nothing():
    """data.py named `python latents.py --encode`, which does nothing and exits 0; encode.py makes caches."""
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".md")):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                assert "latents.py --encode" not in f.read(), name


# ------------------------------------------------------------ slow: a trained run, real processes ---


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train.main(TINY + ["--steps", "1", "--sample-every", "-1", "--out",
                              str(tmp_path_factory.mktemp("runs"))])


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("g.png", "PNG"), ("g.jpg", "JPEG"), ("g.jpeg", "JPEG"),
                                        ("g.webp", "WEBP")])
def test_a_grid_is_written_in_the_type_its_name_says(run, tmp_path, name, kind):
    out = sample.main(["--ckpt", run, "--classes", "0", "--seeds", "0", "--steps", "1", "--out",
                       str(tmp_path / name)])
    with Image.open(out) as im:
        assert im.format == kind


@pytest.mark.slow
def test_two_writers_of_one_npz_never_mix_the_second_is_refused_at_once(run, tmp_path):
    """Two real `sample.py --num-samples` processes with one --out: the first holds the file from before its
    sampling to its .json; the second stops at once, in one line naming the holder, and leaves the first's
    samples and settings whole and of one piece."""
    out, started, go = tmp_path / "s.npz", tmp_path / "started", tmp_path / "go"
    script = tmp_path / "held_writer.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        import sample
        real = sample.sample_npz
        def held(*args, **kwargs):  # hold the output (the lock is taken) until the test says go
            open({str(started)!r}, "w").close()
            while not os.path.exists({str(go)!r}):
                time.sleep(0.05)
            return real(*args, **kwargs)
        sample.sample_npz = held
        sample.main(sys.argv[1:])
    """), encoding="utf-8")
    args = ["--ckpt", run, "--num-samples", "5", "--steps", "1", "--batch", "2", "--out", str(out)]
    first = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: started.exists() or first.poll() is not None, timeout=300)
        assert first.poll() is None, first.communicate()
        second = subprocess.run([sys.executable, "sample.py", *args, "--seed", "7"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"--out {out}: another process is writing it (pid {first.pid} on {socket.gethostname()}, since "
            + second.stderr.split("since ")[1].split(")")[0] + "); two writers would mix their samples. Wait "
            "for it to end, or write to another path")
        go.touch()
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        first.kill()
        first.wait()
    with np.load(out) as z:
        assert z["arr_0"].shape == (5, 16, 16, 3)
    settings = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert settings["num_samples"] == 5 and settings["seed"] == 0  # the first writer's, not the second's 7
    assert sorted(os.listdir(tmp_path)) == ["go", "held_writer.py", "s.json", "s.npz", "started"]
