"""
Sample-quality metrics: FID as the ADM evaluation suite computes it, plus Inception Score, improved precision
/ recall and (for text-to-image) CLIP score.

    python fid.py VIRTUAL_imagenet256_labeled.npz runs/000-imagenet-XL-2-ours/samples-50000-cfg1.5-euler50.npz
    python fid.py REF SAMPLE --is --pr                            # + Inception Score, precision and recall
    python fid.py /data/imagenet/val --save-stats val_stats.npz   # cache a reference set's statistics
    torchrun --nproc_per_node=8 fid.py REF SAMPLE                 # features on 8 GPUs, same numbers

REF and SAMPLE are each a folder of images (searched recursively), an .npz of uint8 images (N, H, W, 3) under
`arr_0` (the ADM format, what `sample.py --num-samples` writes) or an .npz of statistics (`mu`, `sigma`). When
SAMPLE has a sidecar JSON of its sampler settings (samples.npz -> samples.json), the settings are printed next
to the numbers and everything is written to samples.metrics.json, so every FID stays traceable to what made
it.

Numbers are comparable with the ADM suite (guided-diffusion/evaluations) and torch-fidelity because every step
follows the TensorFlow graph they use: Inception-v3 with the 2015-12-05 weights (pytorch-fid's port), TF1's
bilinear resize to 299 x 299, the graph's (x - 128) / 128 input scaling, fp32 features (TF32 off) and float64
statistics.

A number that is computable but weak is printed with a `caution:` line under it (and kept in the result JSON):
fewer images than the 2048 feature dimensions, images smaller than 32 px. Statistics that give no number at
all (NaN, a sigma that is not a covariance) are refused, naming the file.

This file stands alone: it imports nothing of the project, so it can be copied next to any model's samples (as
the ADM suite's evaluator.py is used).
"""
import argparse
import codecs
import io
import json
import os
import struct
import zipfile
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

#################################################################################
#                   Inception-v3 as the FID graph computes it                   #
#################################################################################
# The FID network is TensorFlow's 2015 Inception graph, not torchvision's Inception-v3: its pool branches
# average over real pixels only (TF's avg_pool ignores the zero padding), and the last block max-pools where
# the paper average-pools. We take torchvision's network and swap in those four block variants, as pytorch-fid
# does, so the state dict keeps torchvision's names and the published weights load as they are.


def tf_pool(x, kind):
    """The 3 x 3, stride 1, 'SAME' pool of a pool branch: `avg` counts real pixels only, `max` pads with
    -inf."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """Mixed_5b..5d: torchvision's InceptionA with the TF average pool."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_pool(x, "avg"))
        return torch.cat([b1, b5, b3, bp], 1)


class FIDInceptionC(InceptionC):
    """Mixed_6b..6e: torchvision's InceptionC with the TF average pool."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(tf_pool(x, "avg"))
        return torch.cat([b1, b7, b7d, bp], 1)


class FIDInceptionE(InceptionE):
    """Mixed_7b (pool `avg`, the TF average pool) and Mixed_7c (pool `max`: the graph max-pools here)."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        bp = self.branch_pool(tf_pool(x, self.pool))
        return torch.cat([b1, b3, b3d, bp], 1)


def build_inception():
    """torchvision's Inception-v3 (no aux head, 1008-way fc) with the FID blocks; weights left
    uninitialised."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                          num_classes=1008)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, pool="avg")
    net.Mixed_7c = FIDInceptionE(2048, pool="max")
    return net


# Up to the global average pool, in the graph's order.
TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
         "maxpool2",
         "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c")


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W) of any size -> pool3 features (N, 2048) and logits (N, 1008).

    The logits are pool3 @ fc.weight.T *without* the bias: the quantity the original Inception Score code, the
    ADM suite and torch-fidelity all feed to the softmax.
    """

    def __init__(self):
        super().__init__()
        self.net = build_inception().eval().requires_grad_(False)

    def forward(self, images):
        x = resize_bilinear_tf1(images.float(), 299)  # (N, 3, 299, 299) in [0, 255]
        x = (x - 128) / 128  # the graph's Sub / Mul; pytorch-fid's x / 127.5 - 1 is off by up to 1/128
        for name in TRUNK:
            x = getattr(self.net, name)(x)  # -> (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        return pool, pool @ self.net.fc.weight.T


def weights_file(path=None):
    """The FID weights: `path`, or the published file, downloaded once (sha256-checked) into torch hub's
    cache."""
    if path is not None:
        if not os.path.isfile(path):
            raise SystemExit(f"--inception {path!r}: no such file; download {FID_WEIGHTS_URL} or omit "
                             "--inception to fetch it into torch hub's cache")
        return path
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, path, hash_prefix="6726825d", progress=True)
    return path


def load_inception(path):
    """InceptionFeatures with the state dict in `path`; any other layout fails with the keys that differ.

    The published file has no BatchNorm `num_batches_tracked` counters (it was converted from the TF graph);
    they are ignored on both sides.
    """
    model = InceptionFeatures()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable PyTorch state dict ({type(e).__name__}); download the FID "
                         f"weights from {FID_WEIGHTS_URL}") from e
    kept = lambda k: not k.endswith("num_batches_tracked")
    want = {k: tuple(v.shape) for k, v in model.net.state_dict().items() if kept(k)}
    got = {k: v for k, v in state.items() if kept(k)} if isinstance(state, dict) else {}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = [f"{k} {tuple(got[k].shape)} (expected {want[k]})"
              for k in want
              if k in got and tuple(got[k].shape) != want[k]]
    if missing or unexpected or shapes:
        raise SystemExit(f"{path} is not the FID Inception-v3 state dict "
                         f"(pt_inception-2015-12-05-6726825d.pth): {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} "
                         f"wrong shapes {shapes[:3]}. Download the right file from {FID_WEIGHTS_URL}, or "
                         "omit --inception to fetch it automatically")
    model.net.load_state_dict(got, strict=False)
    return model


#################################################################################
#                      TensorFlow-compatible resize                             #
#################################################################################
# The ADM suite resizes inside the TF graph with TF1's tf.image.resize_bilinear(align_corners=False): output
# pixel i reads source coordinate i * in / out, with no half-pixel offset. torch's F.interpolate uses
# half-pixel centres, (i + 0.5) in / out - 0.5, so the two images are shifted by (in / out - 1) / 2 source
# pixels against each other and differ by tens of grey levels at edges; FID is known to be sensitive to such
# resizing differences (Parmar et al., clean-fid, 2022). We reproduce TF's arithmetic: float32 coordinates,
# the same floor / ceil, the same two-step lerp.


def tf1_source_pixels(n_in, n_out):
    """For each output index: the two source indices and the weight of the second, as TF1 computes them."""
    src = np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))
    lo = np.floor(src)
    hi = np.minimum(np.ceil(src), n_in - 1)
    return (torch.from_numpy(lo.astype(np.int64)), torch.from_numpy(hi.astype(np.int64)),
            torch.from_numpy(src - lo))


def resize_bilinear_tf1(x, size):
    """float (N, C, H, W) -> (N, C, size, size), TF1 resize_bilinear(align_corners=False), as an index/weight
    gather."""
    y0, y1, wy = (t.to(x.device) for t in tf1_source_pixels(x.shape[2], size))
    x0, x1, wx = (t.to(x.device) for t in tf1_source_pixels(x.shape[3], size))
    rows0, rows1 = x[:, :, y0], x[:, :, y1]  # (N, C, size, W)
    top = rows0[..., x0] + (rows0[..., x1] - rows0[..., x0]) * wx
    bottom = rows1[..., x0] + (rows1[..., x1] - rows1[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]  # (N, C, size, size)


#################################################################################
#                 Inputs: image folders, image .npz, statistics .npz            #
#################################################################################


class FolderImages(torch.utils.data.Dataset):
    """Every .png / .jpg / .jpeg / .webp under `root`, recursively, in sorted path order: uint8 (3, H, W)."""

    def __init__(self, root):
        self.paths = sorted(os.path.join(d, f)
                            for d, _, files in os.walk(root)
                            for f in files
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise SystemExit(f"{root!r}: no {'/'.join(IMAGE_EXTENSIONS)} files in this folder or below it; "
                             "point at the folder that holds the images, or pass an .npz")

    def __len__(self):
        return len(self.paths)

    def smallest_size(self):
        """(H, W) of the image with the shortest side, from the files' headers (no pixel is decoded)."""
        sizes = []
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    sizes.append(im.size[::-1])
            except (OSError, ValueError):  # extraction has already named an unreadable file
                continue
        return min(sizes, key=min, default=(0, 0))

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as e:  # skipping it would quietly make the statistics of another set
            raise ValueError(f"{self.paths[i]}: not a readable image ({e}); every image of the folder counts "
                             f"in the statistics, so replace or remove it and run again") from None


class NpzImages(torch.utils.data.Dataset):
    """`arr_0` of an ADM-style .npz (uint8, N x H x W x 3) as uint8 (3, H, W) items, without loading it whole.

    np.savez stores members uncompressed, so the array is one run of bytes in the file and is memory-mapped
    (50k ImageNet-256 samples are 9.8 GB, once per rank). Compressed archives are read into memory instead.
    """

    def __init__(self, path):
        self.path, self.array, self.offset = path, None, None
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("arr_0.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                with open(path, "rb") as f:
                    f.seek(info.header_offset)
                    name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # zip local file header
                    f.seek(info.header_offset + 30 + name_len + extra_len)
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0
                                   if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    self.shape, fortran, self.dtype = read_header(f)
                    self.offset = f.tell()
            else:
                self.array = np.load(path)["arr_0"]
                self.shape, fortran, self.dtype = self.array.shape, False, self.array.dtype
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3 or fortran:
            nchw = len(self.shape) == 4 and self.shape[1] == 3
            hint = " (channels first? transpose to N x H x W x 3)" if nchw else ""
            raise SystemExit(f"{path}: arr_0 is {self.dtype} {self.shape}; FID reads uint8 images of shape "
                             f"N x H x W x 3 in [0, 255]{hint}")

    def __len__(self):
        return self.shape[0]

    def smallest_size(self):
        """(H, W) of every image of the array."""
        return self.shape[1], self.shape[2]

    def __getitem__(self, i):
        if self.array is None:  # mapped lazily so that data-loader workers open their own map
            self.array = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)


class Input(NamedTuple):
    """REF or SAMPLE as read: stats = (mu, sigma) when the file has them, images = a Dataset or None."""
    stats: tuple | None
    images: torch.utils.data.Dataset | None


def open_input(path):
    """The Input of REF or SAMPLE.

    ADM reference batches (VIRTUAL_imagenet256_labeled.npz) hold both; FID then uses their mu / sigma, and the
    images only serve the metrics that need features (precision / recall).
    """
    if os.path.isdir(path):
        return Input(None, FolderImages(path))
    if not os.path.isfile(path):
        raise SystemExit(f"{path!r}: no such file or folder; give a folder of images, an .npz of images "
                         "(arr_0) or an .npz of statistics (mu, sigma)")
    if not path.endswith(".npz"):
        raise SystemExit(f"{path!r}: not a folder or an .npz; put single images in a folder")
    try:
        with np.load(path) as z:
            keys = set(z.files)
            stats = ((z["mu"].astype(np.float64), z["sigma"].astype(np.float64))
                     if {"mu", "sigma"} <= keys
                     else None)
        images = NpzImages(path) if "arr_0" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise SystemExit(f"{path}: not a readable .npz ({type(e).__name__}: {e}); a copy cut short? (a "
                         "stopped sample.py leaves its .HOST-PID.rankN.npz parts, never a partial file under "
                         "the final name)") from None
    if stats is None and images is None:
        raise SystemExit(f"{path}: an .npz needs `arr_0` (uint8 images N x H x W x 3) or `mu` and `sigma` "
                         f"(statistics from --save-stats); this one holds {sorted(keys)}")
    if stats is not None and (stats[0].ndim != 1 or stats[1].shape != (len(stats[0]),) * 2):
        raise SystemExit(f"{path}: mu {stats[0].shape} and sigma {stats[1].shape} do not fit (D,) and (D, D)")
    if stats is not None:
        check_covariance(path, *stats)
    return Input(stats, images)


def write_whole(path, write):
    """write(f) to `path` whole or not at all: a temporary file of this process's own (two processes writing
    one name never share one), fsync, then a rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename
    except BaseException:  # a full disk: no half-written file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def save_stats(path, mu, sigma):
    """mu and sigma as an .npz at `path`, written whole or not at all, which fid.py reads back as REF or
    SAMPLE."""
    write_whole(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


class Process(NamedTuple):
    """Where this process computes: its rank among `world` ranks, and its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")


def setup_distributed():
    """This Process under torchrun or alone; the LOCAL rank picks the GPU (the global rank is wrong on every
    node but the first)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(rank, world, device)


#################################################################################
#                     Feature extraction across ranks                           #
#################################################################################


def gather_strided(x, n, world):
    """Rank r holds rows r, r + world, ... of n: pad to equal length, all-gather, interleave, trim. (n, ...)
    on CPU."""
    per = -(-n // world)
    padded = torch.zeros(per, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # row j * world + r = parts[r][j]
    return torch.stack(parts, 1).reshape(per * world, *x.shape[1:])[:n].cpu()


@torch.no_grad()
def extract(model, images, batch=50, workers=0, process=Process(), desc="features"):
    """Pool features (N, 2048) and logits (N, 1008), float32 numpy in dataset order, on every rank.

    Rank r of `process.world` embeds images r, r + world, ...; the shards are gathered back, so the result is
    a single-process run's. TF32 (a 10-bit mantissa in convolutions and matmuls) is switched off meanwhile:
    the reference numbers are fp32.
    """
    from tqdm import tqdm

    rank, world, device = process
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        shard = torch.utils.data.Subset(images, range(rank, len(images), world))
        loader = torch.utils.data.DataLoader(shard, batch_size=batch, num_workers=workers, collate_fn=list)
        pools, logits = [torch.zeros(0, 2048, device=device)], [torch.zeros(0, 1008, device=device)]
        for imgs in tqdm(loader, desc=desc, disable=rank != 0, dynamic_ncols=True):
            if all(im.shape == imgs[0].shape for im in imgs):
                out = [model(torch.stack(imgs).to(device))]
            else:  # a folder of mixed sizes: each image is resized on its own
                out = [model(im[None].to(device)) for im in imgs]
            pools += [o[0] for o in out]
            logits += [o[1] for o in out]
        pool, logit = torch.cat(pools), torch.cat(logits)
        if world > 1:
            pool, logit = gather_strided(pool, len(images), world), gather_strided(logit, len(images), world)
        return pool.float().cpu().numpy(), logit.float().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


#################################################################################
#                      Statistics and the Frechet distance                      #
#################################################################################


def statistics(features, chunk=4096):
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, summed in float64 chunk by chunk (a
    float64 copy of 50k x 2048 features would be 800 MB)."""
    n, d = features.shape
    if n < 2:
        raise SystemExit(f"statistics need at least 2 images, got {n}")
    total, outer = np.zeros(d), np.zeros((d, d))
    for i in range(0, n, chunk):
        x = np.asarray(features[i : i + chunk], dtype=np.float64)
        total += x.sum(0)
        outer += x.T @ x
    if not (np.isfinite(total).all() and np.isfinite(outer).all()):
        raise SystemExit("the Inception features hold NaN or inf, so no FID can be computed from them; check "
                         "the weights file (--inception), or omit it to use the published one")
    mu = total / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def psd_eigenvalues(w):
    """Eigenvalues of a symmetric PSD matrix with those below its rounding noise (d * eps * largest) set to 0:
    the square root would turn a 1e-16 rounding residue into 1e-8, summed over every empty direction."""
    return np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0), w, 0.0)


def sqrtm_psd(a):
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(psd_eigenvalues(w))) @ v.T


# A covariance is symmetric with eigenvalues >= 0; rounding leaves negative ones of about d * eps times the
# largest variance (float32 statistics: ~1e-6 of it). A stored sigma far outside that is no covariance, and no
# FID comes out of it: the ADM suite, pytorch-fid and clean-fid refuse likewise when sqrtm's imaginary part
# exceeds 1e-3. (Statistics computed here are covariances by construction.)
COVARIANCE_TOLERANCE = 1e-4


def check_covariance(path, mu, sigma):
    """Stored statistics FID can use: finite, sigma symmetric and positive semi-definite within
    COVARIANCE_TOLERANCE of its largest variance; anything else is refused, naming the file."""
    again = "compute them again from the images (fid.py IMAGES --save-stats OUT.npz)"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise SystemExit(f"{path}: mu / sigma hold NaN or inf, so no FID can be computed from them; {again}")
    scale = max(np.abs(np.diagonal(sigma)).max(), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > COVARIANCE_TOLERANCE * scale:
        raise SystemExit(f"{path}: sigma is not symmetric, so it is not a covariance; {again}")
    lowest = np.linalg.eigvalsh(sigma).min()
    if lowest < -COVARIANCE_TOLERANCE * scale:
        raise SystemExit(f"{path}: sigma has the eigenvalue {lowest:.3g} (largest variance {scale:.3g}), so "
                         f"it is not a covariance and no FID can be computed; {again}")


#################################################################################
#                   What makes an FID less than it claims                       #
#################################################################################
# Two things leave the number computable but weak, and both are said next to it (and kept in the result JSON)
# rather than refused, as the ADM suite, pytorch-fid and clean-fid print a warning and still give the number:
# - fewer images than the 2048 feature dimensions: the covariance is singular (rank N - 1), and FID is biased
#   upward, strongly so for small sets (Chong & Forsyth, "Effectively Unbiased FID", 2020); FIDs over
#   different counts do not compare (papers use 50 000 samples; pytorch-fid's README calls 2048 required);
# - images far smaller than Inception's 299 x 299 input: upsampled 10x and more, their features describe the
#   interpolation more than the images; 32 px (CIFAR-10) is the smallest size FID is commonly reported at.
SMALLEST_SIDE = 32


def covariance_rank(sigma):
    """The numerical rank of a covariance (its eigenvalues above rounding noise)."""
    return int((psd_eigenvalues(np.linalg.eigvalsh(sigma)) > 0).sum())


def cautions(side, data, stats):
    """What weakens FID over one input (`side`: REF or SAMPLE; `data` its Input as read, `stats` its (mu,
    sigma)), one line each: too few images for the feature dimensions, or images far smaller than
    Inception's input."""
    said, dims = [], len(stats[0])
    if data.stats is None and len(data.images) < dims:  # statistics computed here, from the images
        said.append(f"{side} has {len(data.images)} images, fewer than the {dims} feature dimensions: its "
                    "covariance is singular and FID is biased upward; compare FIDs only over equal counts "
                    f"(50 000 is the usual one, {dims} the least pytorch-fid asks for)")
    elif data.stats is not None and (rank := covariance_rank(stats[1])) < dims:
        said.append(f"{side}'s stored covariance has rank {rank} of {dims}: it comes from fewer images than "
                    "feature dimensions, so FID is biased upward; compare FIDs only over equal counts "
                    "(50 000 is the usual one)")
    if data.images is not None and data.stats is None:
        h, w = data.images.smallest_size()
        if min(h, w) < SMALLEST_SIDE:
            said.append(f"{side} has images of {h} x {w} px, upsampled {299 / max(min(h, w), 1):.0f}x to "
                        "Inception's 299 x 299: the features describe the interpolation more than the images "
                        f"(FID is seldom reported below {SMALLEST_SIDE} px, CIFAR-10's size); compare FIDs "
                        "only at equal sizes")
    return said


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    S1 S2 is similar to A S2 A with A = S1^1/2, which is symmetric PSD, so tr((S1 S2)^1/2) = sum sqrt(eig(A S2
    A)) with real, non-negative eigenvalues. The usual scipy.linalg.sqrtm of the non-symmetric product (TTUR,
    ADM, pytorch-fid) returns NaN or complex values when the product is singular (fewer images than 2048) and
    then needs an eps * I offset and a discarded imaginary part; this form needs neither and agrees with sqrtm
    where sqrtm works.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SystemExit(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    a = sqrtm_psd(sigma1)
    m = a @ sigma2 @ a
    tr_sqrt = np.sqrt(psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


#################################################################################
#                    Inception Score, precision and recall                      #
#################################################################################


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on `splits` consecutive equal splits; (mean, std) over the splits.

    As the ADM suite and torch-fidelity: the softmax runs over all 1008 outputs of the unbiased logits, and
    50k samples make ten splits of 5000 (ADM's split size). No shuffling first, as ADM (torch-fidelity
    shuffles).
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if len(logits) < splits:
        raise SystemExit(f"Inception Score with {splits} splits needs at least {splits} images, got "
                         f"{len(logits)}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * len(log_p) // splits : (i + 1) * len(log_p) // splits]
        log_py = torch.logsumexp(part, 0) - np.log(len(part))  # log of the split's marginal p(y)
        scores.append(torch.exp((part.exp() * (part - log_py)).sum(1).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def squared_distances(a, b):
    """(len(a), len(b)) squared Euclidean distances, |a|^2 + |b|^2 - 2 a.b clipped at 0 (as the ADM suite)."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T).clamp_(min=0)


def knn_radii(feats, k, chunk):
    """Squared distance of each point to its k-th nearest neighbour, itself excluded."""
    return torch.cat([squared_distances(feats[i : i + chunk], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), chunk)])


@torch.no_grad()
def precision_recall(ref, sample, k=3, chunk=1024, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 as in the ADM suite.

    The manifold of a set is the union of balls around its points reaching each point's k-th neighbour.
    Precision = fraction of samples inside the reference manifold; recall = fraction of references inside the
    sample manifold. Distances go `chunk` rows at a time, so 50k x 50k never sits in memory (ADM computes them
    in float16 with a float32 fallback; we use float32, which can flip a point lying exactly on a ball's
    surface).
    """
    ref = torch.as_tensor(ref, dtype=torch.float32, device=device)
    sample = torch.as_tensor(sample, dtype=torch.float32, device=device)
    if min(len(ref), len(sample)) <= k:
        raise SystemExit(f"precision / recall with k = {k} need more than {k} images on each side")
    r_ref, r_sample = knn_radii(ref, k, chunk), knn_radii(sample, k, chunk)
    in_ref = torch.zeros(len(sample), dtype=torch.bool, device=device)
    in_sample = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(sample), chunk):
        d = squared_distances(sample[i : i + chunk], ref)  # (chunk, N_ref)
        in_ref[i : i + chunk] = (d <= r_ref[None]).any(1)
        in_sample |= (d <= r_sample[i : i + chunk, None]).any(0)
    return in_ref.double().mean().item(), in_sample.double().mean().item()


#################################################################################
#                         CLIP score (text-to-image)                            #
#################################################################################


@torch.no_grad()
def clip_score(images, prompts, model_path, batch=50, device="cpu"):
    """100 x mean over images of max(cos(CLIP image embedding, CLIP text embedding), 0) (Hessel et al. 2021
    with w = 100, the torchmetrics convention). Needs `transformers` and a CLIP checkpoint (a local path or a
    hub name)."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:
        raise SystemExit("--clip needs the optional package transformers: pip install transformers") from e
    if len(prompts) != len(images):
        raise SystemExit(f"--prompts has {len(prompts)} lines for {len(images)} images; give one prompt per "
                         "image")
    model = CLIPModel.from_pretrained(model_path).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    scores = []
    for i in range(0, len(images), batch):
        imgs = [images[j].permute(1, 2, 0).numpy() for j in range(i, min(i + batch, len(images)))]
        inputs = processor(text=prompts[i : i + batch], images=imgs, return_tensors="pt", padding=True,
                           truncation=True).to(device)
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"]),
                          dim=-1)
        scores.append((img * txt).sum(-1).clamp(min=0))
    return 100 * torch.cat(scores).mean().item()


#################################################################################
#                       Text in, results out: checked first                     #
#################################################################################
# The rules of the project's other entry points (data.py's text files, checks.check_output), copied:
# fid.py imports nothing of the project.


def text_encoding(name):
    """--text-encoding's value (an argparse type): the name of an encoding Python knows."""
    try:
        codecs.lookup(name)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown text encoding {name!r}; e.g. utf-8, latin-1, cp1252, "
                                         "utf-16") from None
    return name


def read_lines(path, encoding="utf-8"):
    """A text file's lines (split as open() splits them), decoded in `encoding`; bytes that do not decode end
    the run with the file, the line and the flag that chooses another encoding."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SystemExit(f"--prompts {path}, line {line}: byte 0x{data[e.start]:02x} is not {encoding} text; "
                         "name the file's encoding with --text-encoding (e.g. --text-encoding latin-1)"
                         ) from None
    return [line.rstrip("\n") for line in io.StringIO(text, newline=None)]


def holds_kind(path, ext):
    """Whether an existing file is empty or of the kind `ext` names: an .npz (a zip of arrays, not
    torch.save's zip of records), or text for .json."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head or ext == ".json":
        return b"\0" not in head
    try:
        with zipfile.ZipFile(path) as z:
            return not any(name.endswith("data.pkl") for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def output_problem(path, ext, inputs, flag):
    """Why `path` may not be written as `flag`'s output, or None: it must end in `ext` (.npz or .json), be
    none of the command's `inputs` ({flag: path}) and lie in no folder of images among them, and a file
    already under its name must be of the kind written (an .npz; text for .json). Its folder is made."""
    noun = "an .npz" if ext == ".npz" else "a JSON file"
    for in_flag, given in inputs.items():
        if not given or not os.path.exists(given):
            continue
        if os.path.isdir(given) and os.path.realpath(path).startswith(os.path.realpath(given) + os.sep):
            return (f"{flag} {path}: lies in {in_flag} {given}, a folder of images this command reads; "
                    "write outside it")
        if os.path.exists(path) and os.path.samefile(given, path):
            return (f"{flag} {path}: that is {in_flag}, an input of this command: writing it would destroy "
                    "it; choose another path")
    if os.path.isfile(path) and not holds_kind(path, ext):
        return (f"{flag} {path}: the file there is not {noun}: writing would destroy it; choose another "
                "path, or move that file away first")
    if not path.lower().endswith(ext):
        return f"{flag} {path}: writes {noun}; end the path in {ext}"
    if os.path.isdir(path):
        return f"{flag} {path}: a folder; name the file to write ({noun}) in it"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: its folder cannot be made ({e.strerror or e}); choose another path"
    return None


def check_outputs(args, parser):
    """--save-stats (an .npz) and --out (a JSON file), checked by output_problem before any work."""
    inputs = {"REF": args.ref, "SAMPLE": args.sample, "--inception": args.inception, "--clip": args.clip,
              "--prompts": args.prompts,
              "SAMPLE's settings": args.sample[: -len(".npz")] + ".json"
              if args.sample and args.sample.endswith(".npz") else None}
    for flag, path, ext in (("--save-stats", args.save_stats, ".npz"), ("--out", args.out, ".json")):
        problem = path and output_problem(path, ext, inputs, flag)
        if problem:
            parser.error(problem)


#################################################################################
#                                   CLI                                         #
#################################################################################


def get_args(argv=None):
    """The command line, its counts and combinations checked before any work."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="reference: image folder, .npz of images (arr_0) or of statistics (mu, sigma)")
    p.add_argument("sample", nargs="?",
                   help="samples, the same kinds (omit with --save-stats to only cache REF)")
    p.add_argument("--inception", default=None,
                   help="FID weights file (default: download into torch hub's cache)")
    p.add_argument("--batch", type=int, default=50, help="images per forward pass and rank")
    p.add_argument("--workers", type=int, default=4, help="image-decoding workers per rank")
    p.add_argument("--save-stats", default=None, metavar="OUT.npz",
                   help="write REF's mu / sigma to this file")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score of SAMPLE")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--pr", action="store_true", help="also improved precision / recall (needs REF images)")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall")
    p.add_argument("--clip", default=None, metavar="MODEL", help="also CLIP score with this CLIP checkpoint")
    p.add_argument("--prompts", default=None, help="text file, one prompt per SAMPLE image (for --clip)")
    p.add_argument("--text-encoding", type=text_encoding, default="utf-8",
                   help="the encoding of the --prompts file")
    p.add_argument("--out", default=None,
                   help="result JSON (default: SAMPLE.metrics.json when SAMPLE has a sidecar JSON of its "
                   "settings)")
    args = p.parse_args(argv)
    for flag, low in (("batch", 1), ("workers", 0), ("splits", 1), ("k", 1)):
        if getattr(args, flag) < low:
            p.error(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if args.sample is None and args.save_stats is None:
        p.error("give SAMPLE, or --save-stats OUT to only compute REF's statistics")
    if args.clip and not args.prompts:
        p.error("--clip needs --prompts FILE (one prompt per sample image)")
    check_outputs(args, p)
    if args.clip:
        read_lines(args.prompts, args.text_encoding)  # one that does not decode fails now, not after the work
    return args


def check_counts(args, ref, sample):
    """--splits and --k against the images there are, before any feature is computed (inception_score and
    precision_recall would refuse them only afterwards)."""
    if args.inception_score and len(sample.images) < args.splits:
        raise SystemExit(f"Inception Score with {args.splits} splits needs at least {args.splits} images, "
                         f"got {len(sample.images)} in SAMPLE; give --splits {len(sample.images)} or fewer")
    if args.pr and min(len(ref.images), len(sample.images)) <= args.k:
        raise SystemExit(f"precision / recall with k = {args.k} need more than {args.k} images on each side, "
                         f"got {len(ref.images)} (REF) and {len(sample.images)} (SAMPLE)")


def inception_weights(path, process):
    """The FID weights file: `path` (--inception), or downloaded by rank 0 while the others wait. A failure on
    rank 0 is sent to every rank, so that none hangs."""
    error = None
    if process.rank == 0:
        try:
            path = weights_file(path)
        except (SystemExit, OSError, RuntimeError) as e:
            error = str(e)
    if process.world > 1:
        box = [path, error]
        dist.broadcast_object_list(box, src=0)
        path, error = box
    if error:
        raise SystemExit(error)
    return path


def inception_features(args, inputs, need, process):
    """({side: (pool features, logits)} for each side of `inputs` whose features are needed, the weights file
    used), or ({}, None) where stored statistics are enough."""
    if not any(need.values()):
        return {}, None
    weights = inception_weights(args.inception, process)
    model = load_inception(weights).to(process.device)
    return {side: extract(model, inputs[side].images, args.batch, args.workers, process, desc=side)
            for side in ("ref", "sample") if need[side]}, weights


def sample_metrics(args, ref_stats, sample, feats, weights, device):
    """FID of SAMPLE (its statistics already in sample.stats, main's) against REF's statistics, the metrics
    --is / --pr / --clip ask for, and SAMPLE's sampler settings from its sidecar JSON where it has one."""
    res = dict(fid=frechet_distance(*sample.stats, *ref_stats), ref=os.path.abspath(args.ref),
               sample=os.path.abspath(args.sample),
               num_samples=len(sample.images) if sample.images is not None else None,
               inception_weights=os.path.abspath(weights) if weights is not None else None)
    if args.inception_score:
        res["inception_score"], res["inception_score_std"] = inception_score(feats["sample"][1], args.splits)
    if args.pr:
        res["precision"], res["recall"] = precision_recall(feats["ref"][0], feats["sample"][0], args.k,
                                                           device=device)
    if args.clip:
        prompts = read_lines(args.prompts, args.text_encoding)
        res["clip_score"] = clip_score(sample.images, prompts, args.clip, args.batch, device)
    sidecar = args.sample[: -len(".npz")] + ".json"
    if args.sample.endswith(".npz") and os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:  # JSON is UTF-8
            res["settings"] = json.load(f)
    return res


def report(args, res):
    """Print the metrics (with the sampler settings beside them) and write the result JSON where asked, or
    next to a SAMPLE that has settings."""
    print("  ".join(f"{k} {res[k]:.4f}"
                    for k in ("fid", "inception_score", "precision", "recall", "clip_score")
                    if k in res))
    for line in res.get("cautions", []):  # right under the number they qualify
        print(f"caution: {line}")
    if "settings" in res:
        print("settings: " + json.dumps(res["settings"]))
    out = args.out or (args.sample[: -len(".npz")] + ".metrics.json" if "settings" in res else None)
    if out:
        write_whole(out, lambda f: f.write((json.dumps(res, indent=1) + "\n").encode()))
        print(f"wrote {out}")


def main(argv=None):
    args = get_args(argv)
    process = setup_distributed()
    # both inputs are read before any network work, so that a bad path fails at once
    ref = open_input(args.ref)
    sample = open_input(args.sample) if args.sample else Input(None, None)
    if args.pr and ref.images is None:
        raise SystemExit(f"--pr compares features: REF {args.ref!r} holds statistics only; give its images")
    if (args.pr or args.inception_score or args.clip) and sample.images is None:
        raise SystemExit(f"--is / --pr / --clip need SAMPLE images; {args.sample!r} holds statistics only")
    check_counts(args, ref, sample)
    # FID prefers stored statistics; features only where they are missing or another metric needs them
    need = {"ref": ref.stats is None or args.pr,
            "sample": args.sample is not None and (sample.stats is None or args.inception_score or args.pr)}
    feats, weights = inception_features(args, {"ref": ref, "sample": sample}, need, process)
    res = None
    if process.rank == 0:
        ref_stats = ref.stats if ref.stats is not None else statistics(feats["ref"][0])
        said = cautions("REF", ref, ref_stats)
        if args.save_stats:
            save_stats(args.save_stats, *ref_stats)
            print(f"wrote {args.save_stats} (statistics of {args.ref})")
        if args.sample:
            sample_stats = sample.stats if sample.stats is not None else statistics(feats["sample"][0])
            said += cautions("SAMPLE", sample, sample_stats)
            res = sample_metrics(args, ref_stats, sample._replace(stats=sample_stats), feats, weights,
                                 process.device)
            res["cautions"] = said
            report(args, res)
        else:
            print("".join(f"caution: {line}\n" for line in said), end="")
    if process.world > 1:  # no barrier: the other ranks need not wait for rank 0's metrics
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
