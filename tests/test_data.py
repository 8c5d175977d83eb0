"""data.py: the shapes dataset is deterministic and records its metadata; the checker reads real samples
right; image folders record the crop / flip they apply; bad paths fail with a clear message."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from build import build_dataset
from conditioning import CONTROL_SIGNALS, SIGNAL
from data import EVENTS, ImageFolderDataset, crop_flip, exif_turn, load_rgb
from shapes import (
    CANVAS_MARGIN,
    CHIRAL,
    SHAPE_NAMES,
    ShapesChecker,
    ShapesDataset,
    expected_position,
    size_group,
)


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(size=400, res=32, seed=3)


def test_shapes_deterministic_and_typed(shapes):
    again = ShapesDataset(size=20, res=32, seed=3)
    other = ShapesDataset(size=20, res=32, seed=4)
    img, label, ctrl, caption = shapes[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert ctrl.shape == (len(CONTROL_SIGNALS),)
    assert torch.equal(img, again[5][0]) and label == again[5][1] and torch.equal(ctrl, again[5][2])
    assert not all(torch.equal(shapes[i][0], other[i][0]) for i in range(20))
    assert SHAPE_NAMES[label] in caption


def test_shapes_metadata_ranges_and_balance(shapes):
    ctrl = torch.stack([shapes[i][2] for i in range(len(shapes))])
    labels = np.array([shapes[i][1] for i in range(len(shapes))])
    c = dict(zip(CONTROL_SIGNALS, ctrl.unbind(1)))
    max_off = round(32 * CANVAS_MARGIN) - 32
    assert c["crop_top"].min() >= 0 and c["crop_top"].max() <= max_off and c["crop_left"].max() <= max_off
    assert set(c["flip"].tolist()) == {0.0, 1.0}
    assert c["orig_h"].min() >= 16 and c["orig_h"].max() <= 64 and torch.equal(c["orig_h"], c["orig_w"])
    assert torch.all(c["res"] == 32) and torch.all(c["aspect"] == 1)
    assert len(set(labels)) == 10 and len(CHIRAL) >= 3


def test_augmentation_changes_with_epoch_only(shapes):
    a = shapes[7]
    assert torch.equal(a[0], shapes[7][0]) and torch.equal(a[2], shapes[7][2])  # same epoch, same crop
    draws = set()
    for e in range(8):
        shapes.set_epoch(e)
        draws.add(tuple(shapes[7][2].tolist()))
    shapes.set_epoch(0)
    assert len(draws) > 1


def test_checker_reads_dataset_images(shapes):
    checker = ShapesChecker()
    class_ok, orient_ok, n_chiral, errs, sharp, orig = 0, 0, 0, [], [], []
    for i in range(len(shapes)):
        img, label, ctrl, caption = shapes[i]
        m = checker(img)
        class_ok += m["label"] == label
        if SHAPE_NAMES[label] in CHIRAL:
            n_chiral += 1
            orient_ok += m["orientation"] == int(ctrl[SIGNAL["flip"]])
        else:
            assert m["orientation"] is None or m["label"] != label
        errs.append(np.hypot(*np.subtract(m["position"], expected_position(ctrl, 32))))
        sharp.append(m["sharpness"])
        orig.append(ctrl[SIGNAL["orig_h"]].item())
        assert m["colour"] in caption
    assert class_ok / len(shapes) >= 0.98
    assert orient_ok == n_chiral
    assert np.mean(errs) < 0.5 and np.max(errs) <= 2.0
    orig, sharp = np.array(orig), np.array(sharp)
    small = orig < 32 * CANVAS_MARGIN  # larger originals are downsampled: all equally sharp
    assert spearmanr(orig[small], sharp[small]).statistic > 0.6


def test_checker_sees_a_mirror(shapes):
    checker = ShapesChecker()
    i = next(i for i in range(len(shapes)) if SHAPE_NAMES[shapes[i][1]] in CHIRAL)
    img = shapes[i][0]
    a, b = checker(img), checker(img.flip(-1))
    assert a["label"] == b["label"] and a["orientation"] == 1 - b["orientation"]


def test_crop_flip_records_what_it_did():
    arr = np.arange(40 * 50 * 3, dtype=np.uint32).reshape(40, 50, 3) % 251
    img = Image.fromarray(arr.astype(np.uint8))
    seen_flip = set()
    for seed in range(20):
        out, ctrl = crop_flip(img, 32, np.random.default_rng(seed), margin=40 / 32)
        top, left, flip = (int(ctrl[SIGNAL[k]]) for k in ("crop_top", "crop_left", "flip"))
        ref = torch.from_numpy(arr[top:top + 32, left:left + 32].astype(np.uint8)).permute(2, 0, 1)
        assert torch.equal(out, ref.flip(-1) if flip else ref)
        assert ctrl[SIGNAL["orig_h"]] == 40 and ctrl[SIGNAL["orig_w"]] == 50 and ctrl[SIGNAL["res"]] == 32
        seen_flip.add(flip)
    assert seen_flip == {True, False}
    out, ctrl = crop_flip(img, 32, np.random.default_rng(0), margin=40 / 32, crop="center", hflip=False)
    assert tuple(int(ctrl[SIGNAL[k]]) for k in ("crop_top", "crop_left", "flip")) == (4, 9, 0)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for j, (h, w) in enumerate([(40, 60), (70, 50), (33, 33)]):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / cls / f"{j}.png")
    ds = build_dataset("folder", 32, str(tmp_path))
    assert len(ds) == 6 and ds.num_classes == 2
    img, label, ctrl, name = ds[1]
    assert img.shape == (3, 32, 32) and label == 0 and name == "cat"
    # the file's own size is the original size
    assert (ctrl[SIGNAL["orig_h"]].item(), ctrl[SIGNAL["orig_w"]].item()) == (70, 50)
    assert 0 <= ctrl[SIGNAL["crop_top"]] <= round(70 * 32 / 50) - 32 and ctrl[SIGNAL["crop_left"]] == 0


def test_image_folder_passes_over_hidden_names_like_a_dataset_copied_from_a_mac(tmp_path):
    """`._x.JPEG` resource forks beside every image and a `.ipynb_checkpoints/` folder are no images and no
    class: the labels stay those of the sorted class folders (DiT's), whatever else the copy carried."""
    rng = np.random.default_rng(0)
    for cls in ("n01", "n02"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3),
                                         dtype=np.uint8)).save(tmp_path / cls / f"{j}.JPEG")
            (tmp_path / cls / f"._{j}.JPEG").write_bytes(b"\x00\x05\x16\x07Mac OS X")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3),
                                     dtype=np.uint8)).save(tmp_path / cls / "sub" / "deep.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3),
                                 dtype=np.uint8)).save(tmp_path / ".ipynb_checkpoints" / "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "__MACOSX" / "n01").mkdir(parents=True)  # what unzipping a Mac's archive leaves
    (tmp_path / "__MACOSX" / "n01" / "._0.JPEG").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    ds = build_dataset("imagenet", 16, str(tmp_path))
    # images at any depth, as torchvision
    assert ds.classes == ["n01", "n02"] and ds.num_classes == 2 and len(ds) == 6
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert int(ds.events[:, EVENTS.index("unreadable")].sum()) == 0  # no resource fork was read
    (tmp_path / "n03").mkdir()
    with pytest.raises(FileNotFoundError, match="no images in the class folder"):
        build_dataset("imagenet", 16, str(tmp_path))


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A phone stores pixels as the sensor saw them and says in EXIF how to turn them: the image and the
    original size the control records are the ones a viewer shows."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high: left half red, right half blue
    stored[:, :20, 0], stored[:, 20:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    (tmp_path / "c").mkdir()
    Image.fromarray(stored).save(tmp_path / "c" / "photo.jpg", exif=exif, quality=95)
    img, _ = load_rgb(tmp_path / "c" / "photo.jpg")
    assert img.size == (20, 40)  # shown 20 wide, 40 high; the stored left half is now on top
    assert img.getpixel((10, 5))[0] > 200 and img.getpixel((10, 35))[2] > 200
    ctrl = build_dataset("folder", 16, str(tmp_path))[0][2]
    assert (ctrl[SIGNAL["orig_h"]].item(), ctrl[SIGNAL["orig_w"]].item()) == (40, 20)

    class BrokenExif:  # Pillow's EXIF parser has raised TypeError, KeyError, IndexError on malformed blocks
        def getexif(self):
            raise TypeError("bad EXIF")
    assert exif_turn(BrokenExif()) is None  # the pixels are kept as stored, the image is not lost


def test_image_folder_lists_what_torchvision_lists_in_the_same_order(tmp_path):
    """Labels and sample order as torchvision's ImageFolder (DiT's loader) gives them, nested folders
    included."""
    import torchvision
    for rel in ("c1/a/x.png", "c1/a-b/y.png", "c1/a/z/w.png", "c1/top.PNG", "c0/b.jpg", "c0/a.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (9, 9)).save(tmp_path / rel, format="PNG")
    ours, theirs = build_dataset("folder", 8, str(tmp_path)), torchvision.datasets.ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes and ours.samples == theirs.samples


def test_a_run_of_bad_files_is_stood_in_for_from_the_whole_dataset(tmp_path):
    """60 corrupt files in a row (a damaged class folder) among 120: every item still gives an image, and the
    same one again (a resume sees the same data)."""
    (tmp_path / "c").mkdir()
    rng = np.random.default_rng(0)
    for j in range(120):
        path = tmp_path / "c" / f"{j:03d}.png"
        if j < 60:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(path)
    ds = build_dataset("folder", 8, str(tmp_path))
    first = [ds[i][0] for i in range(60)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    assert int(ds.events[:, EVENTS.index("unreadable")].sum()) > 0  # the bad reads were counted


def test_bad_paths_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # imagenet without a path: the documented default folder, which is not there
    with pytest.raises(FileNotFoundError, match=r"--data-path 'data/imagenet/train' is not a directory"):
        build_dataset("imagenet", 32, None)
    with pytest.raises(ValueError, match="--dataset folder needs --data-path"):
        build_dataset("folder", 32, None)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataset(str(tmp_path / "missing"), 32)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("no-such-dataset", 32)


def test_size_corr_ties_the_original_size_to_the_class_group_and_leaves_the_rest_alone():
    res = 24
    plain = ShapesDataset(size=300, res=res, seed=5)
    same = ShapesDataset(size=300, res=res, seed=5, size_corr=0.0)
    assert all(torch.equal(plain[i][0], same[i][0]) for i in range(300))  # rho = 0 is exactly today's data
    full = ShapesDataset(size=300, res=res, seed=5, size_corr=1.0)
    for a, b in zip(plain.scenes, full.scenes):  # only the original size changes
        assert all(np.array_equal(a[k], b[k]) for k in a if k != "orig")
        assert res // 2 <= b["orig"] <= res if size_group(b["label"]) == 0 else res <= b["orig"] <= 2 * res
    half = ShapesDataset(size=2000, res=res, seed=5, size_corr=0.5)
    in_group = np.mean([(s["orig"] <= res) == (size_group(s["label"]) == 0) for s in half.scenes])
    assert 0.65 < in_group < 0.85  # 0.5 always in its group + 0.5 x about half by chance
    # the control records the size actually drawn, and the canvas is rendered from it
    _, label, ctrl, _ = full[0]
    assert ctrl[SIGNAL["orig_h"]] == full.scenes[0]["orig"]
