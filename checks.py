"""
What every command line's values must be, checked before any work, one rule each: numbers and lists (the same
quantity given to train.py, sample.py, encode.py or `python -m experiments` meets one rule and one message),
output paths (never over an input of the same command, a file of another kind, or the dataset), and one owner
for what a process writes (a run folder, an output file). Imports nothing of the project; fid.py keeps copies
of its own, since it stands alone.
"""
import math
import os
import re
import socket
import time
import zipfile

import torch

#################################################################################
#                 A command line's numbers and lists, one rule each             #
#################################################################################
# train.py (check_ranges), sample.py, encode.py and `python -m experiments` check their numbers with these, so
# that a quantity given to two of them (a batch, a seed, a guidance scale) meets one rule and one message.
# fid.py keeps a copy of its own: it imports nothing of the project.

SEED_LIMIT = 2 ** 32  # seeds are 0 .. 2**32 - 1 (numpy's legacy range; every generator here takes them)


def finite(flag, value):
    """One number of a flag, as a float; anything but a finite number ends the run with what was wrong."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SystemExit(f"{flag}: {value!r} is not a finite number")
    return number


def at_least(flag, value, low, note=""):
    """`value`, refused unless it is a finite number >= low; `note` says what the bound means."""
    if finite(flag, value) < low:
        raise SystemExit(f"{flag} must be >= {low}{note}, got {value}")
    return value


def above(flag, value, low=0):
    """`value`, refused unless it is a finite number > low."""
    if not finite(flag, value) > low:
        raise SystemExit(f"{flag} must be > {low}, got {value}")
    return value


def below(flag, value, high, note=""):
    """`value`, refused unless it is a finite number < high."""
    if not finite(flag, value) < high:
        raise SystemExit(f"{flag} must be < {high}{note}, got {value}")
    return value


def end_point(flag, value):
    """A flow sampler's end point (--t-min), refused outside [0, 1)."""
    return below(flag, at_least(flag, value, 0, " (0: the grid before the end point was fixed)"), 1,
                 " (1 is pure noise)")


def seed(flag, value):
    """A seed, refused outside 0 .. SEED_LIMIT - 1."""
    return below(flag, at_least(flag, value, 0), SEED_LIMIT)


def number_list(text, flag, whole=False):
    """A flag's comma-separated numbers (whole numbers where `whole`, else finite ones), or None when the flag
    is not given. An empty list is refused, never read as the flag's default: leaving the flag out is how a
    default is asked for."""
    if text is None:
        return None
    if not text.strip():
        raise SystemExit(f"{flag} {text!r}: an empty list; give comma-separated values, or leave the flag "
                         "out for its default")
    if not whole:
        return [finite(flag, v) for v in text.split(",")]
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag}: {text!r} is not a comma-separated list of whole numbers") from None


#################################################################################
#                      Output paths: one rule, before any work                  #
#################################################################################
# Every entry point checks what it will write with check_output before it does any work: the extension says
# what is written, and no output may replace an input of the same command, a file of another kind (a
# checkpoint, samples, weights) or lie in the dataset.

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")  # what a sample grid may be written as
# what an output of each extension holds: an existing file under its name must hold the same
KIND_OF = {**dict.fromkeys(IMAGE_TYPES, "image"), ".npz": "npz", ".safetensors": "safetensors",
           ".json": "text", ".jsonl": "text", ".md": "text"}
NOUNS = dict(image="an image", npz="an .npz", safetensors="a .safetensors file", text="a text file",
             checkpoint="a checkpoint", other="a file of another kind")


def file_kind(path):
    """What an existing file holds, from its first bytes: image, npz, checkpoint (torch.save's zip or
    pickle), safetensors, text, empty or other."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(b"PK"):  # a zip: numpy's arrays (.npy members) or torch.save's records (data.pkl)
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "other"
        return "checkpoint" if any(n.endswith("data.pkl") for n in names) else "npz"
    if head[:1] == b"\x80":  # a pickle: torch.save's format before PyTorch 1.6
        return "checkpoint"
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:  # a length, then a JSON header
        return "safetensors"
    return "other" if b"\0" in head else "text"


def inside(path, folder):
    """Whether `path` is `folder` or lies anywhere under it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def dataset_root(data_path):
    """What a --data-path reads: a folder or a file (a CSV, one shard) as named, or for a shard glob or brace
    range the folder it lists (the part before its first wildcard)."""
    root = re.split(r"[*?\[{]", data_path, maxsplit=1)[0]
    return data_path if root == data_path else os.path.dirname(root) or "."


def overlap(path, data, folder):
    """How an output `path` meets a dataset `data`: 'is', 'lies in', or (an output `folder` only) 'holds';
    None when they are apart."""
    if os.path.realpath(path) == os.path.realpath(data):
        return "is"
    if inside(path, data):
        return "lies in"
    return "holds" if folder and inside(data, path) else None


def check_output(path, kinds, inputs=None, flag="--out", datasets=None):
    """Refuse, before any work, an output that would lose data or be read as data. `kinds`: the extensions it
    may end in (what is written), or "folder" for a folder of outputs. It may be none of the command's
    `inputs` ({flag: path}) and may not be, lie in or (a folder) hold a dataset of `datasets` ({flag:
    --data-path}). A file already under its name must be of the kind written: never a checkpoint, samples or
    weights of another kind. The folder it goes in is made now (a folder that cannot be made fails before
    the work, not after it)."""
    for data_flag, data in (datasets or {}).items():
        root = dataset_root(data)
        how = overlap(path, root, kinds == "folder")
        if how:
            named = data_flag if root == data else f"{data_flag} {data}"
            raise SystemExit(f"{flag} {path}: {how} the dataset {root} ({named}): its files would be "
                             "overwritten or read as data; write outside it")
    for in_flag, given in (inputs or {}).items():
        if given and os.path.exists(given) and os.path.exists(path) and os.path.samefile(given, path):
            raise SystemExit(f"{flag} {path}: that is {in_flag}, an input of this command: writing it would "
                             "destroy it; choose another path")
    if kinds == "folder":
        if os.path.exists(path) and not os.path.isdir(path):
            raise SystemExit(f"{flag} {path}: a file, not a folder; name a folder (it is made if missing)")
    else:
        check_output_file(path, kinds, flag)
    folder = path if kinds == "folder" else os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"{flag} {path}: {folder} is a file, not a folder; choose another path")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{flag} {path}: the folder {folder} cannot be made ({e.strerror or e}); choose "
                         "another path") from None


def check_output_file(path, kinds, flag):
    """An output file's own checks (check_output): not a folder, an extension of `kinds`, and no file of
    another kind under its name."""
    kind = KIND_OF[kinds[0]]  # every extension of one output writes one kind
    if os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: a folder; name the file to write ({NOUNS[kind]}) in it")
    found = file_kind(path) if os.path.isfile(path) else "empty"
    if found not in ("empty", kind):
        raise SystemExit(f"{flag} {path}: the file there is {NOUNS[found]}, and this writes {NOUNS[kind]}: "
                         "writing would destroy it; choose another path, or move that file away first")
    if os.path.splitext(path)[1].lower() not in kinds:
        names = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
        raise SystemExit(f"{flag} {path}: writes {NOUNS[kind]}; end the path in {names}")


#################################################################################
#                      One owner: an advisory lock on a file                    #
#################################################################################


class OwnerLock:
    """An exclusive advisory lock (fcntl.flock) on the file `path`, with the holder's pid, host and start time
    written in it: a second process that asks for it is refused at once with `refusal(holder)`, the message
    that names what is in use and what to do. The OS frees the lock when its holder dies, however it dies, so
    a killed process never blocks the next. Advisory: it binds processes of this code; on NFS it holds within
    one host only. run.RunLock holds a run folder with it, sample.py an output it writes."""

    def __init__(self, path, refusal, remove_on_release=False):
        self.path, self.refusal, self.remove_on_release, self.file = path, refusal, remove_on_release, None

    def take(self):
        """Take the lock; None, or the refusal message when another process holds it."""
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock, and we say so
            print(f"warning: no file locking on this system; nothing stops a second process ({self.path})")
            return None
        while True:
            f = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not written its name yet"
                f.close()
                return self.refusal(holder)
            # a holder that removes the file as it lets go: hold the lock of the file under the name
            if os.path.exists(self.path) and os.path.samestat(os.stat(self.path), os.fstat(f.fileno())):
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f
        return None

    def release(self):
        if self.file is not None:
            import fcntl

            if self.remove_on_release:  # before unlocking: a process waiting on this file then finds it gone
                os.remove(self.path)
            # unlocked, not only closed: loader workers forked while it was held share it until they exit
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def from_rank0(value, world=1):
    """Rank 0's `value` on every rank (a collective: every rank calls it): what rank 0 alone decided (a
    folder's name, a refusal), so that every rank goes on, or stops, together."""
    if world > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def job_tag(rank=0, world=1):
    """A name unique to this sampling job and the same on each of its ranks: rank 0's host and process id."""
    return from_rank0(f"{socket.gethostname()}-{os.getpid()}", world)


class OutputLock:
    """The one writer of an output file: checks.OwnerLock on OUT.lock, taken by rank 0 before any sampling and
    held until the file and its .json are written, so that two jobs never mix their samples and settings; a
    second writer is refused at once, with the holder's pid, host and start time. A context manager."""

    def __init__(self, path, flag="--out", rank=0, world=1):
        self.lock = OwnerLock(f"{path}.lock", lambda holder: (
            f"{flag} {path}: another process is writing it ({holder}); two writers would mix their samples. "
            "Wait for it to end, or write to another path"), remove_on_release=True)
        refusal = from_rank0(self.lock.take() if rank == 0 else None, world)  # every rank stops if refused
        if refusal:
            raise SystemExit(refusal)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()
