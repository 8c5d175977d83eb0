"""
A run on disk: checkpoints written atomically, found again (a file, a run folder, or the newest under --out),
checked against the run that resumes them, and read back as weights -- to resume, to start a fine-tune
(--init-from), or to sample (our files, an official DiT one, or a .safetensors export).

A checkpoint of ours is one torch.save dict: model, ema, opt (state dicts), step, epoch and position (where
the data order stands), gen, torch_rng and cuda_rng (every rank's noise stream, the global CPU RNG, every
rank's CUDA RNG or None), loss_window (the log line's running mean), args (the flags, `vars(args)`), facts
(what the run learned from its sources, build.SourceFacts) and config_version.

Every checkpoint carries a checksum of its tensor data: torch.save writes a CRC-32 of every record into the
zip it makes, and read_checkpoint verifies them all before it loads anything (torch.load does not), so a
changed byte is a damaged file, never a silently wrong weight. Every write is atomic (a temporary file, fsync,
rename), and a write that fails -- a full disk, no permission -- says which file, why, and what to do.

A run folder's life -- its lock, resuming it, preemption -- is run.py's; this file knows only files.

Reading a file never runs code from it. Unpickling can call any function the file names, so a .pt is read with
weights_only=True: only tensors, numbers, strings, lists, tuples, dicts and None are built, plus the one class
allow-listed in SAFE_GLOBALS; a file holding anything else is refused before any of it is built. A
.safetensors file (`sample.py --ckpt RUN --export model.safetensors`) holds no pickle at all: the EMA weights,
and in its metadata the configuration as JSON; it reads back as {ema, args, facts, config_version, step}, so
it goes wherever a checkpoint goes.
"""
import argparse
import errno
import json
import math
import os
import pickle
import re
import zipfile
import zlib

import torch

from conditioning import CONTROL_GROUPS
from model import SIZES, sincos_2d

CONFIG_VERSION = 3  # the schema of the stored configuration (3: flags and facts apart); another is refused
# flags added since schema 3, each with the value that does what the code did before the flag existed: a
# checkpoint that lacks one reads it so (stored_args)
ADDED_FLAGS = dict(cfg_schedule="constant", cfg_power=4.0, sample_spacing=None, text_cache_gb=2.0,
                   accept_data_change=False, t_min=0.0)
# facts added since schema 3: a checkpoint that lacks one (None here) is not compared on it
ADDED_FACTS = dict(data_size=None, data_fingerprint=None)


def stored_args(saved):
    """A checkpoint's stored flags (a dict) as a namespace, the ADDED_FLAGS it predates filled in."""
    return argparse.Namespace(**{**ADDED_FLAGS, **saved})

#################################################################################
#                              Reading and writing                              #
#################################################################################


# What weights_only may build besides plain data: DiT's training checkpoints ({model, ema, opt, args}) keep
# their flags as an argparse.Namespace. Nothing broader: every class listed here is one whose unpickling we
# trust.
SAFE_GLOBALS = [argparse.Namespace]


class UnreadableCheckpoint(Exception):
    """A file torch.load cannot read back (truncated, bytes changed, another kind of file): --resume passes
    over it to the checkpoint before; where a file was named, the caller says so and stops."""


# What torch's weights-only unpickler says of bytes that are no valid pickle; anything else it refuses (a
# global, a class, a function to call) is treated as a file that would run code, so a doubt stops the run
# instead of skipping
DAMAGED = (r"Unsupported operand|String is too long|unsupported persistent id|Can only append to "
           r"lists|pickle data")


def unpickling_reason(message):
    """The line of torch's refusal that names what it met (the rest is a page of advice around it)."""
    if "WeightsUnpickler error: " in message:
        message = message.split("WeightsUnpickler error: ")[-1]
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in message.split("\n") if line.strip()]
    return next((line for line in lines if not line.startswith(advice)), lines[0] if lines else "")


def damaged_record(path):
    """The first record of a zip checkpoint whose bytes fail their CRC-32 (None: every record is intact), or
    the zip's own error. A read of the whole file: about 0.5 s per GiB on a 2-core CPU, a tenth of a load."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                # a record stored without a CRC (torch.serialization.set_crc32_options(False)) is not checked
                if info.CRC == 0 and info.file_size:
                    continue
                try:
                    with z.open(info) as f:  # reading to the end checks the CRC
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
        return None
    except Exception as e:  # a damaged directory: zipfile raises whatever the bytes provoke
        return f"the zip itself is unreadable ({type(e).__name__}: {e})"


def read_checkpoint(path, mmap=False):
    """A checkpoint file's contents, on the CPU; a .safetensors file as {ema, args, facts, config_version,
    step}. Every checkpoint read goes through here, and none runs code (see the module docstring); a zip
    checkpoint's CRC-32s are checked first."""
    if path.endswith(".safetensors"):
        try:
            return read_safetensors(path)
        except Exception as e:  # safetensors' own error for a header or length that does not add up
            why = f"{type(e).__name__}: {e}"
            raise UnreadableCheckpoint(f"{path}: damaged or not a safetensors file ({why})") from None
    # torch maps only the zip format; an old (pre-1.6) file is read whole
    is_zip = zipfile.is_zipfile(path)
    bad = damaged_record(path) if is_zip else None
    if bad is not None:
        what = bad if bad.startswith("the zip") else f"record {bad} fails its CRC-32 check"
        raise UnreadableCheckpoint(f"{path}: damaged, {what} (its bytes changed after it was written)")
    mmap = mmap and is_zip
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # weights_only met something it may not build, and built none of it
        reason = unpickling_reason(str(e))
        if re.match(DAMAGED, reason):  # a byte that is no pickle opcode: damaged, not dangerous
            raise UnreadableCheckpoint(f"{path}: damaged or not a checkpoint ({reason})") from None
        raise SystemExit(f"{path}: contains objects other than weights "
                         f"({reason.split(' was not an allowed')[0]}), so it was not loaded: unpickling them "
                         "could run code. If you trust the file, load it with "
                         "torch.load(weights_only=False) and torch.save its state dicts alone") from None
    except Exception as e:  # a truncated zip, a changed byte, a text file: torch's error names what broke
        raise UnreadableCheckpoint(f"{path}: damaged or not a checkpoint ({type(e).__name__}: {e})") from None


class WriteFailed(SystemExit):
    """A write that did not happen (a full disk, no permission, a read-only file system): its message names
    the file, the cause and what to do; nothing half-written was left."""


# what stops a write, as one cause: a full device, or one that refuses to be written
SPACE, PERMISSION = "space", "permission"
CAUSES = {errno.ENOSPC: ("no space left on the device", SPACE), errno.EDQUOT: ("disk quota exceeded", SPACE),
          errno.EACCES: ("permission denied", PERMISSION), errno.EPERM: ("permission denied", PERMISSION),
          errno.EROFS: ("read-only file system", PERMISSION)}


def free_space(path):
    """Bytes free to this user in the folder `path` goes to, or None where that cannot be told."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def write_cause(path, e):
    """(the cause of a failed write of `path`, its kind: SPACE, PERMISSION or None). torch buries ENOSPC in a
    RuntimeError, or stops at a short write ("unexpected pos", "file write failed") without a cause: when
    the device is then (nearly) full, that is the cause."""
    code, text = getattr(e, "errno", None), str(e)
    if code is None and ("ENOSPC" in text or "No space left" in text):
        code = errno.ENOSPC
    if code in CAUSES:
        return CAUSES[code]
    if "file write failed" in text or "unexpected pos" in text:  # torch's short write: it does not say why
        free = free_space(path)
        if free is not None and free < 2 ** 26:  # under 64 MiB left: the write met the end of the device
            return CAUSES[errno.ENOSPC]
        return "the write was cut short (a full disk or a quota?)", SPACE
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0]}", None


def write_failure(path, e):
    """One line for a failed write of `path`: the cause and the free space where it was going."""
    cause, _ = write_cause(path, e)
    free = free_space(path)
    return f"could not write {path}: {cause}" + (f"; {free / 2 ** 30:.1f} GiB free there" if free is not None
                                                  else "")


def write_remedy(path, e):
    """What frees the way for the write that failed with `e`: space, or a folder that may be written."""
    kind = write_cause(path, e)[1]
    folder = os.path.dirname(os.path.abspath(path))
    if kind == SPACE:
        return f"free space in {folder} (or write elsewhere)"
    if kind == PERMISSION:
        return f"make {folder} writable (or write elsewhere)"
    return "fix that (or write elsewhere)"


def atomic_write(path, write, advice="then run the command again"):
    """write(f) to path.PID.tmp, fsync, rename: a kill leaves no file or a complete one under `path`, never a
    partial. The temporary name is this process's own, so two processes writing one name never write into
    the same file: each renames a complete one, and the last rename wins. A failed write removes the partial
    file and raises WriteFailed with `advice`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            # on disk before the rename, or a power loss could leave an empty file under the name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk: no half-written file left to fill it further
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteFailed(f"{write_failure(path, e)}. Nothing half-written was left; "
                          f"{write_remedy(path, e)}; {advice}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_checkpoint(path, state, advice="then run the command again"):
    """torch.save, atomically: a kill mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f), advice)


#################################################################################
#                      .safetensors: weights to share                           #
#################################################################################
# safetensors is an optional dependency (pip install safetensors), imported only here.


def safetensors_module(what):
    """The safetensors package (safe_open, and torch.save for tensors); without it, say how to get it."""
    try:
        import safetensors.torch
    except ImportError:
        raise SystemExit(f"{what} needs the optional package safetensors: pip install safetensors") from None
    return safetensors


def export_safetensors(model, args, facts, step, path):
    """Write the model's weights to `path`, the configuration (flags and facts, dicts) as JSON in the file's
    metadata (which holds strings only): the file alone rebuilds the model (build.load_model) and starts a
    fine-tune (init_from)."""
    save = safetensors_module(f"--export {path}").torch.save
    metadata = dict(
        format="pt",  # what other readers of PyTorch safetensors files expect
        config=json.dumps(args), facts=json.dumps(facts),
        config_version=json.dumps(CONFIG_VERSION), step=json.dumps(step),
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata["tensor_crc32"] = json.dumps({k: tensor_crc32(v) for k, v in tensors.items()})
    atomic_write(path, lambda f: f.write(save(tensors, metadata)))


def tensor_crc32(tensor):
    """CRC-32 of a tensor's bytes, as an export records it for each of its tensors."""
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def check_tensor_crcs(path, tensors, meta):
    """An export of ours records each tensor's CRC-32 (`tensor_crc32`): a tensor whose bytes changed since is
    named and the file refused. A file without them (another program's, or an export from before they were
    recorded) is read with a one-line note that nothing checks its bytes."""
    if "tensor_crc32" not in meta:
        print(f"note: {path} records no checksums of its tensors; its bytes are not checked")
        return
    recorded = json.loads(meta["tensor_crc32"])
    for name, tensor in tensors.items():
        if recorded.get(name) != tensor_crc32(tensor):
            raise SystemExit(f"{path}: tensor {name} does not match the checksum the export recorded (the "
                             "file was changed or damaged since it was written): export it again from its "
                             "checkpoint (sample.py --ckpt RUN --export FILE)")


def read_safetensors(path):
    """An export as {ema, args, facts, config_version, step}; a .safetensors without our configuration as the
    bare state dict it is (like the published DiT .pt files)."""
    safe_open = safetensors_module(f"reading {path}").safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    check_tensor_crcs(path, tensors, meta)
    if "config" not in meta:
        return tensors
    # a foreign file may carry a `config` key and nothing else
    read = lambda key: json.loads(meta.get(key, "null"))
    return dict(ema=tensors, args=read("config"), facts=read("facts"), config_version=read("config_version"),
                step=read("step"))


#################################################################################
#                                Finding one                                    #
#################################################################################


def checkpoint_step(path):
    """The step of a checkpoint file named ckpt-STEP.pt, or None for any other name (a `.tmp` file is a write
    that never finished)."""
    found = re.fullmatch(r"ckpt-(\d+)\.pt", os.path.basename(path))
    return int(found.group(1)) if found else None


def unfinished_checkpoint_writes(folder):
    """The ckpt-STEP.pt.PID.tmp files of `folder`: checkpoint writes that never finished (atomic_write's
    temporary files, left by a kill)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if re.fullmatch(r"ckpt-\d+\.pt\.\d+\.tmp", f))


def run_number(name):
    """The number of a run folder named NNN-..., or None for a folder of any other name (not a run)."""
    found = re.match(r"(\d+)-", os.path.basename(name))
    return int(found.group(1)) if found else None


def checkpoints_in(folder):
    """Complete checkpoints of a run folder, newest (highest step) first, by number: ckpt-10000000.pt comes
    after ckpt-9999999.pt."""
    steps = {f: checkpoint_step(f) for f in os.listdir(folder)}
    return [os.path.join(folder, f) for f in sorted((f for f in steps if steps[f] is not None),
                                                     key=steps.get, reverse=True)]


def checkpoints_after(folder, ckpt_path):
    """The complete checkpoints of `folder` at a later step than `ckpt_path`, newest first; none when that
    file's name carries no step."""
    step = checkpoint_step(ckpt_path)
    return [] if step is None else [f for f in checkpoints_in(folder) if checkpoint_step(f) > step]


def load_latest(paths):
    """(path, state) of the first checkpoint in `paths` that loads; damaged files are reported and passed over
    (a file that is refused as unsafe is not damaged: its SystemExit stops the search)."""
    for path in paths:
        try:
            return path, read_checkpoint(path)
        except UnreadableCheckpoint as e:  # a truncated or foreign file: fall back to the one before it
            print(f"resume: skipping it, {e}", flush=True)
    return None, None


def find_checkpoint(path, out="runs", flag="--resume"):
    """Resolve --resume (or sample.py's --ckpt: `flag` names it in messages): a checkpoint file, a run folder
    (its newest complete checkpoint), or `auto` (the newest complete checkpoint of the highest-numbered run
    folder under --out that has one; None if there is none)."""
    if path == "auto":  # the run folders (NNN-...), highest number first: 1000-... after 999-...
        runs = [os.path.join(out, d) for d in (os.listdir(out) if os.path.isdir(out) else [])
                if os.path.isdir(os.path.join(out, d)) and run_number(d) is not None]
        folders = sorted(runs, key=run_number, reverse=True)
        for folder in folders:
            found = load_latest(checkpoints_in(folder))
            if found[0]:
                return found
        return None, None
    if os.path.isdir(path):
        found = load_latest(checkpoints_in(path))
        if found[0] is None:
            raise SystemExit(f"{flag} {path!r}: no complete ckpt-*.pt in that folder")
        return found
    if not os.path.isfile(path):
        raise SystemExit(f"{flag} {path!r}: no such checkpoint file or run folder")
    try:
        return path, read_checkpoint(path)
    except UnreadableCheckpoint as e:
        raise SystemExit(f"{flag}: {e}") from None


#################################################################################
#                             Weights from a file                               #
#################################################################################


def checkpoint_weights(ckpt):
    """The weights to start or sample from: a checkpoint's EMA (ours, or a DiT training checkpoint), its
    model, or the file itself when it is a bare state dict (the published DiT files); None if it is none of
    these."""
    state = ckpt.get("ema", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    return state if isinstance(state, dict) else None


def non_finite_tensor(state):
    """The name of the first floating-point tensor of a state dict that holds a NaN or an infinity, or None.
    A CRC sees changed bytes; this sees weights a diverged run wrote with intact bytes."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def refuse_non_finite(state, file, what):
    """Stop with one line when the weights `state` of `file` are not all finite."""
    name = non_finite_tensor(state)
    if name is not None:
        raise SystemExit(f"{file}: its {what} tensor {name} holds NaN or infinite values (the run had "
                         "diverged when it was written): use an earlier checkpoint of the run, or start "
                         "again with a lower --lr")


def load_weights(model, state, file, what="weights"):
    """model.load_state_dict(state), or a message when the weights do not fit the model the file's
    configuration builds: a checkpoint written by a version of this code whose network had other tensors."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
             for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise SystemExit(f"{file}: its weights do not fit the model its configuration builds with this code "
                         f"(written by another version?). Missing: {', '.join(missing) or 'none'}; not in "
                         f"the model: {', '.join(unexpected) or 'none'}; other shapes: "
                         f"{', '.join(wrong) or 'none'}. Sample it with the code that trained it, or start a "
                         f"new run from it with --init-from, which loads what matches")
    refuse_non_finite(state, file, what)
    model.load_state_dict(state)


def dit_resolution(state):
    """The image size a DiT state dict was trained at: tokens per side x patch x the SD VAE's factor 8."""
    return int(round(state["pos_embed"].shape[1] ** 0.5)) * state["x_embedder.proj.weight"].shape[-1] * 8


def dit_config(state):
    """What an official DiT state dict says of its model: (our size name such as 'XL/2', the image size it was
    trained at, its number of classes); None for any other state dict."""
    if not is_dit_state_dict(state):
        return None
    width, patch = state["x_embedder.proj.weight"].shape[0], state["x_embedder.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    size = next((s for s, (d, w, _) in SIZES.items() if (d, w) == (depth, width)), None)
    if size is None:
        raise SystemExit(f"a DiT of depth {depth} and width {width} matches none of our sizes "
                         f"({', '.join(SIZES)})")
    return f"{size}/{patch}", dit_resolution(state), state["y_embedder.embedding_table.weight"].shape[0] - 1


def with_dit_weights(model, state):
    """The model's state dict with every tensor of a DiT state dict mapped in (from_dit): our control
    MLPs' first layers keep the model's own values."""
    return {**model.state_dict(), **from_dit(state, model.width)[0]}


def base_res_of(ckpt):
    """The base resolution of a checkpoint's model (get_args's default --base-res for --init-from and
    --resume): ours stores it, a DiT's is the size it was trained at; None when the file does not say (another
    model's state dict)."""
    state = checkpoint_weights(ckpt)
    if is_dit_state_dict(state):
        return dit_resolution(state)
    saved = ckpt.get("facts") if isinstance(ckpt, dict) else None
    return saved.get("base_res") if isinstance(saved, dict) else None


def read_init(path):
    """The file --init-from names, memory-mapped where it can be (a training checkpoint's optimizer state is
    never paged in): read once, for its base resolution and its weights."""
    try:
        return read_checkpoint(path, mmap=True)
    except UnreadableCheckpoint as e:
        raise SystemExit(f"--init-from: {e}") from None


def init_from(model, path, rank=0, contents=None):
    """Load every tensor of a checkpoint (ours, .pt or .safetensors: its EMA weights; an official DiT file, or
    a DiT training checkpoint's EMA) whose name and shape match the model; print what was loaded, what was
    skipped (and why) and what is new. `contents`: the file as read_init read it, if it was. Returns the
    three name lists."""
    state = checkpoint_weights(read_init(path) if contents is None else contents)
    if state is None:
        raise SystemExit(f"--init-from {path!r}: not a checkpoint of this project nor a DiT state dict")
    if is_dit_state_dict(state):
        if (getattr(model, "cond", None) != "adaln"
            or model.out_channels != 2 * model.in_channels
            or any(not isinstance(b.img.q_norm, torch.nn.Identity) for b in model.blocks)):
            raise SystemExit("--init-from: a DiT checkpoint needs --cond adaln --qk-norm off --objective "
                             "ddpm --learn-sigma (DiT predicts eps and a variance)")
        state, _ = from_dit(state, model.width)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape) if k in own else 'no such tensor'})"
               for k, v in state.items()
               if k not in loaded]
    new = [k for k in own if k not in state]
    refuse_non_finite({k: state[k] for k in loaded}, f"--init-from {path}", "weight")
    model.load_state_dict({**own, **{k: state[k] for k in loaded}})
    if rank == 0:
        print(f"--init-from {path}: loaded {len(loaded)} tensors, skipped {len(skipped)}, new {len(new)}")
        for title, names in (("skipped", skipped), ("new (initialised)", new)):
            for name in names:
                print(f"  {title}: {name}")
        share = sum(own[k].numel() for k in loaded) / max(1, sum(v.numel() for v in own.values()))
        if share < 0.5:  # a transfer keeps the backbone; this is mostly a new network
            print(f"--init-from: WARNING only {share:.0%} of the model's weights came from {path}; most of "
                  f"it starts from scratch. Do --model, --arch and --cond match the checkpoint's?")
    return loaded, skipped, new


#################################################################################
#                 Published weights: the official DiT                           #
#################################################################################
# The official DiT models.py names its tensors differently; the computation is the same as ours with
# cond="adaln", qk_norm off and 8 output channels (eps + learned variance). The fixed positional embedding is
# not a parameter here: it is recomputed (same formula) and checked against the file's. Our control embedder
# has no counterpart: its output layers are zeroed, so the mapped model ignores the control metadata and
# computes exactly what DiT computes.

DIT_NAMES = [("x_embedder.proj.", "x_embed."), ("t_embedder.mlp.", "t_embed.mlp."),
             ("y_embedder.embedding_table.", "y_embed.table."),
             ("final_layer.adaLN_modulation.", "final.ada."), ("final_layer.linear.", "final.linear."),
             (".attn.qkv.", ".img.qkv."), (".attn.proj.", ".img.proj."), (".mlp.fc1.", ".img.mlp.0."),
             (".mlp.fc2.", ".img.mlp.2."), (".adaLN_modulation.", ".img.ada.")]


def is_dit_state_dict(state):
    """Whether `state` is an official DiT state dict (its patch embedding and final layer by DiT's names)."""
    return (isinstance(state, dict) and "x_embedder.proj.weight" in state
            and "final_layer.linear.weight" in state)


def from_dit(state, width):
    """An official DiT state dict -> (our state dict, the DiT grid size). Unknown names raise. Only the
    control MLPs' first layers are left out: they keep the model's own initialisation (zeroing both layers
    would leave the branch without a gradient forever, should the model be fine-tuned with control
    metadata)."""
    out = {}
    for name, tensor in state.items():
        if name == "pos_embed":
            continue
        new = next((name.replace(theirs, ours, 1) for theirs, ours in DIT_NAMES if theirs in name), None)
        if new is None:
            raise ValueError(f"unexpected tensor {name!r} in the DiT checkpoint")
        out[new] = tensor
    grid = int(round(math.sqrt(state["pos_embed"].shape[1])))
    expected = sincos_2d(width, grid, grid, grid, grid)
    if not torch.allclose(state["pos_embed"].reshape(-1, width).float(), expected, atol=1e-5):
        raise ValueError("the DiT checkpoint's positional embedding is not the standard sin-cos one")
    for group in CONTROL_GROUPS:  # silence the control branch DiT never had
        for kind in ("weight", "bias"):
            ref = out.get(f"t_embed.mlp.2.{kind}")
            shape = (width, width) if kind == "weight" else (width,)
            out[f"c_embed.mlps.{group}.2.{kind}"] = torch.zeros(shape, dtype=ref.dtype)
    out["c_embed.null"] = torch.zeros(len(CONTROL_GROUPS), width, dtype=out["t_embed.mlp.2.weight"].dtype)
    return out, grid
