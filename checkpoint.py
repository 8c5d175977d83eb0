"""
A run on disk: checkpoints written atomically, found again (a file, a run folder, or the newest under --out), checked
against the run that resumes them, and read back as weights -- to resume, to start a fine-tune (--init-from), or to
sample (our files, or an official DiT one).

A checkpoint of ours is one torch.save dict: model, ema, opt (state dicts), step, epoch and position (where the data
order stands), gen and torch_rng (every rank's noise stream, the global RNG), loss_window (the log line's running
mean), args (the configuration, `vars(args)`) and config_version.
"""
import os
from types import SimpleNamespace

import torch

from config import ARCH_KEYS, CONFIG_VERSION, ORDER_KEYS, get_args, make_model
from model import SIZES, from_dit, is_dit_state_dict

#################################################################################
#                              Reading and writing                              #
#################################################################################


def read_checkpoint(path, mmap=False):
    """A checkpoint file's contents, on the CPU. Every checkpoint read goes through here."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def atomic_write(path, write):
    """write(f) to path.tmp, fsync, rename: a kill leaves no file or a complete one under `path`, never a partial."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, or a power loss could leave an empty file under the name
    os.replace(tmp, path)


def write_checkpoint(path, state):
    """torch.save, atomically: a kill mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f))

#################################################################################
#                                Finding one                                    #
#################################################################################


def checkpoints_in(folder):
    """Complete checkpoints of a run folder, newest first (a `.tmp` file is a write that never finished)."""
    names = sorted((f for f in os.listdir(folder) if f.startswith("ckpt-") and f.endswith(".pt")), reverse=True)
    return [os.path.join(folder, f) for f in names]


def load_latest(paths):
    """(path, state) of the first checkpoint in `paths` that loads; damaged files are reported and passed over."""
    for path in paths:
        try:
            return path, read_checkpoint(path)
        except Exception as e:  # a truncated or foreign file: fall back to the one before it
            print(f"resume: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})", flush=True)
    return None, None


def find_checkpoint(path, out="runs"):
    """Resolve --resume: a checkpoint file, a run folder (its newest complete checkpoint), or `auto` (the newest
    complete checkpoint of the newest run folder under --out that has one; None if there is none)."""
    if path == "auto":
        folders = sorted((os.path.join(out, d) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))),
                         reverse=True) if os.path.isdir(out) else []
        for folder in folders:
            found = load_latest(checkpoints_in(folder))
            if found[0]:
                return found
        return None, None
    if os.path.isdir(path):
        found = load_latest(checkpoints_in(path))
        if found[0] is None:
            raise SystemExit(f"--resume {path!r}: no complete ckpt-*.pt in that folder")
        return found
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {path!r}: no such checkpoint file or run folder")
    found = load_latest([path])
    if found[0] is None:
        raise SystemExit(f"--resume {path!r}: the file is not a readable checkpoint")
    return found


def config_mismatch(saved, args):
    """Human-readable list of architecture / data settings that differ between a checkpoint and this run."""
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(args, k, None)!r}"
            for k in ARCH_KEYS + ORDER_KEYS + (("workers",) if saved.get("dataset") == "webdataset" else ())
            if saved.get(k) != getattr(args, k, None)]  # a stream's position is per loader worker

#################################################################################
#                             Weights from a file                               #
#################################################################################


def checkpoint_weights(ckpt):
    """The weights to start or sample from: a checkpoint's EMA (ours, or a DiT training checkpoint), its model, or the
    file itself when it is a bare state dict (the published DiT files); None if it is none of these."""
    state = ckpt.get("ema", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    return state if isinstance(state, dict) else None


def init_from(model, path, rank=0):
    """Load every tensor of a checkpoint (ours: its EMA weights; or an official DiT file) whose name and shape match
    the model; print what was loaded, what was skipped (and why) and what is new. Returns the three name lists."""
    state = checkpoint_weights(read_checkpoint(path))
    if state is None:
        raise SystemExit(f"--init-from {path!r}: not a checkpoint of this project nor a DiT state dict")
    if is_dit_state_dict(state):
        if getattr(model, "cond", None) != "adaln" or model.out_channels != 2 * model.in_channels or any(
                not isinstance(b.img.q_norm, torch.nn.Identity) for b in model.blocks):
            raise SystemExit("--init-from: a DiT checkpoint needs --cond adaln --qk-norm off --objective ddpm "
                             "--learn-sigma (DiT predicts eps and a variance)")
        state, _ = from_dit(state, model.width)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape) if k in own else 'no such tensor'})"
               for k, v in state.items() if k not in loaded]
    new = [k for k in own if k not in state]
    model.load_state_dict({**own, **{k: state[k] for k in loaded}})
    if rank == 0:
        print(f"--init-from {path}: loaded {len(loaded)} tensors, skipped {len(skipped)}, new {len(new)}")
        for title, names in (("skipped", skipped), ("new (initialised)", new)):
            for name in names:
                print(f"  {title}: {name}")
    return loaded, skipped, new


def load_model(path, device):
    """(EMA model in eval mode, the run's config) from a checkpoint file or run folder of ours, or from an official
    DiT-XL/2 file."""
    file, ckpt = find_checkpoint(path)
    state = checkpoint_weights(ckpt)
    if is_dit_state_dict(state):  # DiT's own recipe: eps + learned variance, adaLN, no QK-norm, SD VAE latents
        width, patch = state["x_embedder.proj.weight"].shape[0], state["x_embedder.proj.weight"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        size = next((s for s, (d, w, _) in SIZES.items() if (d, w) == (depth, width)), None)
        if size is None:
            raise SystemExit(f"{file}: a DiT of depth {depth} and width {width} matches none of our sizes")
        res = int(round(state["pos_embed"].shape[1] ** 0.5)) * patch * 8  # tokens per side x patch x VAE factor
        args = get_args(["--dataset", "imagenet", "--model", f"{size}/{patch}", "--cond", "adaln", "--qk-norm", "off",
                         "--objective", "ddpm", "--learn-sigma", "--res", str(res), "--base-res", str(res)])
        args.num_classes, args.ckpt_file, args.ckpt_step = state["y_embedder.embedding_table.weight"].shape[0] - 1, \
            os.path.abspath(file), None
        args.latent_scale = args.latent_shift = None  # the VAE's own (0.18215, as DiT trained)
        model = make_model(args)
        model.load_state_dict({**model.state_dict(), **from_dit(state, model.width)[0]})  # + our control MLPs' inputs
        return model.to(device).eval(), args
    if ckpt.get("config_version") != CONFIG_VERSION:
        raise SystemExit(f"{file}: written by another version of this code (config schema "
                         f"{ckpt.get('config_version')}, this code reads {CONFIG_VERSION})")
    args = SimpleNamespace(**ckpt["args"], ckpt_file=os.path.abspath(file), ckpt_step=ckpt.get("step"))
    model = make_model(args)
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), args
