"""Image-caption pairs: a folder of images with .txt captions or a CSV file (data.py), and webdataset tar
shards read as a stream (shards.py). Bad items (unreadable image, empty caption) are skipped and counted
without breaking a batch; the shards are split over ranks and loader workers so that every sample is read
exactly once per epoch."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from build import SourceFacts, build_dataset, sampling_control
from conditioning import CONTROL_SIGNALS, SIGNAL
from conftest import write_shard
from data import EVENTS, CaptionFolderDataset, folder_default_control
from shards import WebDatasetShards

RES = 8


def image_bytes(seed, fmt="JPEG", size=32):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def truncated_jpeg(seed):
    data = image_bytes(seed)
    return data[: len(data) // 2]


def counts(ds):
    return dict(zip(EVENTS, ds.events.sum(0).tolist()))


# --------------------------------------------------------------- folder / CSV ---

GOOD = ["a red circle", "a blue square", "two words, with a comma", "the fourth", "ünïcode caption"]


def caption_folder(root):
    """5 good pairs at two depths, 1 truncated image, 3 images whose caption is empty, blank or missing."""
    write = lambda rel, data: (root / rel).parent.mkdir(parents=True,
                                                        exist_ok=True) or (root / rel).write_bytes(data)
    for i, caption in enumerate(GOOD):
        stem = f"a/img{i}" if i < 3 else f"b/c/img{i}"
        write(stem + (".jpg" if i % 2 else ".png"), image_bytes(i, "JPEG" if i % 2 else "PNG"))
        write(stem + ".txt", f"  {caption}\n".encode())
    write("b/broken.jpg", truncated_jpeg(9))
    write("b/broken.txt", b"the broken one")
    write("b/empty.png", image_bytes(10, "PNG"))
    write("b/empty.txt", b"")
    write("b/blank.png", image_bytes(11, "PNG"))
    write("b/blank.txt", b"  \n\t")
    write("b/nocaption.png", image_bytes(12, "PNG"))
    write("notes.txt", b"a caption without an image is no item")
    return root


def caption_csv(root):
    """The same pairs as a CSV file next to an images/ folder."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = ['image,caption']
    for i, caption in enumerate(GOOD):
        (images / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
        rows.append(f'images/{i}.png,"{caption}"')
    (images / "broken.jpg").write_bytes(truncated_jpeg(9))
    (images / "other.png").write_bytes(image_bytes(10, "PNG"))
    rows += ["images/broken.jpg,the broken one", "images/other.png,", 'images/other.png,"   "',
             "images/other.png"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "pairs.csv"


@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_caption_pairs_skip_and_count_bad_items_and_keep_batches_full(tmp_path, layout):
    path = caption_folder(tmp_path / "data") if layout == "folder" else caption_csv(tmp_path / "data")
    ds = build_dataset("captions", RES, str(path), seed=3)
    assert isinstance(ds, CaptionFolderDataset) and ds.num_classes == 1
    # empty, blank and missing captions never become items; the broken image does (it shows only when read)
    assert len(ds) == 6 and ds.dropped == {"empty_caption": 3}
    assert sorted(ds.captions()) == sorted(GOOD + ["the broken one"])

    img, label, ctrl, caption = ds[ds.captions().index("a blue square")]
    assert img.dtype == torch.uint8 and img.shape == (3, RES,
                                                      RES) and label == 0 and caption == "a blue square"
    assert ctrl.shape == (len(CONTROL_SIGNALS),) and ctrl[SIGNAL["res"]] == RES
    same = ds[1]
    # (seed, epoch, index) decide the crop
    assert torch.equal(same[0], ds[1][0]) and torch.equal(same[2], ds[1][2])
    assert len({tuple(ds.set_epoch(e) or ds[1][2].tolist()) for e in range(8)}) > 1

    ds.events.zero_()
    ds.set_epoch(0)
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert [len(b[3]) for b in batches] == [3, 3]  # the broken image's slot is filled by another item
    seen = [c for b in batches for c in b[3]]
    assert "the broken one" not in seen and set(seen) <= set(GOOD)
    assert all(torch.equal(b[1], torch.zeros(3, dtype=torch.long)) for b in batches)
    c = counts(ds)  # counted in the workers' rows of the shared table
    assert c["truncated"] + c["unreadable"] == 1 and c["ok"] == 6 and c["empty_caption"] == 0


def test_caption_folder_passes_over_hidden_names_reads_any_case_and_lists_a_linked_folder_once(tmp_path):
    """What a folder copied from a Mac or a notebook holds: `._x` resource forks beside each file (binary, no
    image, no caption), `.ipynb_checkpoints/` copies, an upper-case .JPG / .TXT pair, and a link back up the
    tree."""
    root = tmp_path / "data"
    (root / "a" / ".ipynb_checkpoints").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(image_bytes(0, "PNG"))
    (root / "a" / "x.txt").write_text("a caption")
    (root / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    (root / "a" / "._x.txt").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    (root / "a" / ".ipynb_checkpoints" / "x-checkpoint.png").write_bytes(image_bytes(1, "PNG"))
    (root / "a" / ".ipynb_checkpoints" / "x-checkpoint.txt").write_text("a copy")
    (root / "B.JPG").write_bytes(image_bytes(2))
    (root / "B.TXT").write_text("shouted")
    os.symlink("..", root / "a" / "up")  # a loop: data/a/up -> data
    ds = build_dataset("captions", RES, str(root))
    assert sorted(ds.captions()) == ["a caption", "shouted"] and ds.dropped == {"empty_caption": 0}
    assert all(ds[i][0].shape == (3, RES, RES) for i in range(len(ds)))


def test_caption_paths_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="needs --data-path"):
        build_dataset("captions", RES, None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("captions", RES, str(tmp_path / "nowhere"))
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="or a .csv file"):
        build_dataset("captions", RES, str(tmp_path / "list.txt"))
    (tmp_path / "a.png").write_bytes(image_bytes(0, "PNG"))
    (tmp_path / "headless.csv").write_text("a.png,a caption\n")
    with pytest.raises(ValueError, match="header row naming the columns image,caption"):
        build_dataset("captions", RES, str(tmp_path / "headless.csv"))
    (tmp_path / "blank.csv").write_text("image,caption\na.png,\n")
    with pytest.raises(FileNotFoundError, match="no image with a non-empty caption"):
        build_dataset("captions", RES, str(tmp_path / "blank.csv"))
    for name in ("captions", "webdataset"):  # natural images: SDXL's sampling convention
        facts = SourceFacts(res=16, vae="none", base_res=16, source_dataset=name, num_classes=1)
        assert torch.equal(sampling_control(facts), folder_default_control(16))


# --------------------------------------------------------------- tar shards ---

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 shards of 3 samples; caption 'shard K sample P' names each sample."""
    root = tmp_path_factory.mktemp("shards")
    for k in range(8):
        write_shard(root / f"{k:05d}.tar", [(f"{k * 3 + p:05d}", {"jpg": image_bytes(k * 3 + p),
                                                                    "txt": f"shard {k} sample {p}".encode(),
                                                                    "json": b"{}"}) for p in range(3)])
    return str(root)


ALL = {f"shard {k} sample {p}" for k in range(8) for p in range(3)}


def read_rank(path, rank, world, epoch, workers=2):
    ds = WebDatasetShards(path, RES, seed=1, shuffle_buffer=4, rank=rank, world=world)
    ds.set_epoch(epoch)
    batches = list(DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=ds.collate))
    for img, label, ctrl, caption, position in batches:
        assert img.dtype == torch.uint8 and img.shape[1:] == (3, RES,
                                                              RES) and ctrl.shape[1] == len(CONTROL_SIGNALS)
        assert torch.all(label == 0)
    return [c for b in batches for c in b[3]]


def test_shards_split_over_ranks_and_workers_read_every_sample_once(shards):
    order = {}
    for epoch in (0, 1):
        per_rank = [read_rank(shards, rank, 2, epoch) for rank in (0, 1)]
        assert [len(r) for r in per_rank] == [12, 12]  # 4 shards of 3 per rank
        everything = per_rank[0] + per_rank[1]
        # each sample once, on one (rank, worker)
        assert len(everything) == len(ALL) and set(everything) == ALL
        order[epoch] = everything
    assert order[0] != order[1]  # shard order and shuffle buffer are drawn per epoch
    assert read_rank(shards, 0, 2, 0) == order[0][:12]  # ... and from (seed, epoch) only


def test_stream_resumes_where_collate_says(tmp_path):
    for k, n in enumerate([3, 9, 2, 7, 5, 1, 8]):  # uneven shards: one worker runs dry long before the other
        write_shard(tmp_path / f"{k}.tar", [(f"{p:04d}", {"png": image_bytes(p, "PNG", 8),
                                                          "txt": f"{k}-{p}".encode()})
                                            for p in range(n)])

    def run(drawn=None, first_worker=0):
        ds = WebDatasetShards(str(tmp_path), RES, seed=0, shuffle_buffer=3, rank=0, world=1)
        ds.set_epoch(2, drawn, first_worker)
        return list(DataLoader(ds, batch_size=2, num_workers=2, drop_last=True, collate_fn=ds.collate))

    full = run()
    workers = [b[4][0].item() for b in full]
    # the last batches come from one worker, the other is dry
    assert len(full) == 17 and len(set(workers[-4:])) == 1
    for stop in range(1, len(full)):
        drawn = [0, 0]
        for batch in full[:stop]:
            worker, n = batch[4].tolist()
            drawn[worker] = n
        rest = run(drawn, first_worker=(workers[stop - 1] + 1) % 2)
        assert len(rest) == len(full) - stop
        for a, b in zip(rest, full[stop:]):
            assert a[3] == b[3] and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    ds = WebDatasetShards(str(tmp_path), RES, rank=0, world=1)
    ds.set_epoch(2, [3, 4])
    with pytest.raises(ValueError, match="same number of workers"):
        next(iter(ds))  # read in this process: one worker, not the two the positions came from


def test_bad_samples_in_shards_are_skipped_and_counted(tmp_path):
    good = lambda i: {"jpg": image_bytes(i), "txt": f"good {i}".encode()}
    write_shard(tmp_path / "0.tar", [("a0", good(0)), ("a1", {"jpg": truncated_jpeg(1), "txt": b"cut"}),
                                     ("a2", good(2))])
    # img2dataset also writes the caption into the .json: read when the .txt is missing or empty
    json_only = {"jpg": image_bytes(10), "json": b'{"caption": " from json ", "url": "u"}'}
    empty_txt = {"jpg": image_bytes(12), "txt": b"", "json": b'{"caption": "json, .txt empty"}'}
    write_shard(tmp_path / "1.tar", [("b0", good(3)), ("b1", {"jpg": image_bytes(4), "txt": b" \n"}),
                                     ("b2", {"jpg": image_bytes(5)}), ("b3", good(6)), ("b4", json_only),
                                     ("b5", {"jpg": image_bytes(11), "json": b'{"url": "u"}'}),
                                     ("b6", empty_txt)])
    write_shard(tmp_path / "2.tar", [("c0", good(7)), ("c1", good(8)), ("c2", good(9))])
    with tarfile.open(tmp_path / "2.tar") as tar:
        cut = tar.getmember("c1.jpg").offset_data + 100
    # the shard breaks off inside c1.jpg
    (tmp_path / "2.tar").write_bytes((tmp_path / "2.tar").read_bytes()[:cut])
    ds = build_dataset("webdataset", RES, str(tmp_path / "*.tar"), seed=0)
    assert isinstance(ds, WebDatasetShards) and ds.num_classes == 1
    seen = [c for b in DataLoader(ds, batch_size=1, num_workers=2) for c in b[3]]
    assert sorted(seen) == ["from json", "good 0", "good 2", "good 3", "good 6", "good 7", "json, .txt empty"]
    c = counts(ds)
    assert c["truncated"] == 1 and c["empty_caption"] == 3 and c["unreadable"] == 1 and c["ok"] == 7


def test_shard_paths_and_ranks_fail_clearly(tmp_path, shards, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_dataset("webdataset", RES, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        build_dataset("webdataset", RES, str(tmp_path))
    with pytest.raises(ValueError, match="needs --data-path"):
        build_dataset("webdataset", RES, None)
    # webdataset's ranges
    ranged = WebDatasetShards(os.path.join(shards, "{00001..00003}.tar"), RES, rank=0, world=1)
    assert [os.path.basename(s) for s in ranged.shards] == ["00001.tar", "00002.tar", "00003.tar"]
    with pytest.raises(FileNotFoundError, match="1 of the 3 shards it names do not exist, e.g. .*00008.tar"):
        WebDatasetShards(os.path.join(shards, "{00006..00008}.tar"), RES, rank=0, world=1)
    assert len(WebDatasetShards(os.path.join(shards, "{00002..00002}.tar"), RES, rank=0, world=1).shards) == 1
    with pytest.raises(FileNotFoundError, match="names no shard"):
        WebDatasetShards(os.path.join(shards, "{00002..00001}.tar"), RES, rank=0, world=1)
    with pytest.raises(ValueError, match="8 shards cannot feed 9 ranks"):
        WebDatasetShards(shards, RES, rank=0, world=9)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = WebDatasetShards(os.path.join(shards, "*.tar"), RES)
    assert (ds.rank, ds.world) == (1, 2) and len(ds.shards) == 8
    with pytest.raises(NotImplementedError, match="only known once every shard is read"):
        ds.captions()


def test_shards_without_captions_stop_training_with_the_reason(tmp_path):
    """Shards whose samples all lack a caption (the captions went into another column): the trainer says so,
    not that the shards are too few."""
    import train
    write_shard(tmp_path / "0.tar", [(f"k{i}", {"jpg": image_bytes(i),
                                                "json": b'{"url": "u"}'}) for i in range(4)])
    flags = ["--dataset", "webdataset", "--data-path", str(tmp_path / "0.tar"), "--cond-type", "text",
             "--model", "T/4",
             "--res", "16", "--base-res", "16", "--vae", "none", "--batch", "2", "--workers", "0", "--steps",
             "1", "--sample-every", "0", "--out", str(tmp_path / "runs")]
    with pytest.raises(SystemExit, match=r"used 0 samples and skipped \{'empty_caption': 4\}.*check the "
                       r"shards' capt"):
        train.main(flags)


@pytest.mark.slow
def test_text_model_trains_on_streamed_shards_and_resumes_exactly(shards, tmp_path):
    """train.py on --dataset webdataset (captions encoded batch by batch): the per-worker stream position is
    saved, and a resumed run's losses equal the uninterrupted run's."""
    from conftest import assert_resumed_exactly, train_and_resume
    flags = ["--dataset", "webdataset", "--data-path", shards, "--cond-type", "text", "--model", "T/4",
             "--res", "16", "--vae", "none",
             "--base-res", "16", "--batch", "4", "--workers", "2", "--log-every", "1", "--warmup", "2",
             "--lr", "1e-3", "--sample-every", "0", "--cfg-scale", "1"]
    # 6 batches an epoch: 8 steps cross one
    full, resumed = train_and_resume(flags, tmp_path)
    assert_resumed_exactly(full, resumed, 4, 8)


def test_captions_too_many_to_cache_are_encoded_in_the_training_step(tmp_path):
    """A caption set whose features exceed --text-cache-gb writes no feature file: each batch's captions are
    encoded in the training step, and the losses equal the cached path's (both round the features to fp16)."""
    import glob

    import train
    from conftest import losses
    folder = caption_folder(tmp_path / "pairs")
    flags = ["--dataset", "captions", "--data-path", str(folder), "--cond-type", "text", "--model", "T/4",
             "--res", "16", "--base-res", "16", "--vae", "none", "--batch", "2", "--workers", "0", "--steps",
             "4", "--log-every", "1", "--warmup", "2", "--lr", "1e-3", "--sample-every", "-1"]
    cached = train.main(flags + ["--out", str(tmp_path / "cached")])
    assert glob.glob(str(tmp_path / "cached" / "text-cache-*.pt"))
    # 5 captions x 16 tokens x (2 x 64 + 1) bytes = 10 kB: over 1e-6 GB
    streamed = train.main(flags + ["--text-cache-gb", "1e-6", "--out", str(tmp_path / "streamed")])
    assert not glob.glob(str(tmp_path / "streamed" / "text-cache-*.pt"))
    assert losses(streamed) == losses(cached) and len(losses(cached)) == 4
