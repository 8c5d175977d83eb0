"""
A training run's life on disk, off the reading path of train.py: the run folder (made, numbered, owned),
resuming it exactly or refusing with the reason, its checkpoints and log, and stopping cleanly on a
scheduler's signal or Ctrl-C.

train.main makes these calls, in this order:

    resumed = read_resume(args, rank)            # the checkpoint --resume names, read before any work
    check_resume(args, facts, resumed, ...)      # the same run, or say why not
    run = open_run(args, resumed, proc)          # the folder: a new numbered one, or the resumed one, locked
    run.start(state, progress)                   # fresh state kept, or everything the checkpoint holds
    ... run.log(record) / run.stop_requested(...) / run.save(state, progress, ...) ...
    run.close()

A run folder has one owner: RunLock, an advisory lock held by the training process for the life of the run
and released by the OS when it dies, so that a second process on the same folder is refused, not
interleaved. The files themselves (atomic writes, checksums, safe loading) are checkpoint.py's.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from build import use_bf16
from checkpoint import (
    ADDED_FACTS,
    CONFIG_VERSION,
    WriteFailed,
    atomic_write,
    checkpoints_after,
    checkpoints_in,
    find_checkpoint,
    load_weights,
    non_finite_tensor,
    run_number,
    unfinished_checkpoint_writes,
    write_checkpoint,
    write_failure,
    write_remedy,
)
from checks import OwnerLock, from_rank0
from conditioning import parse_gate
from data import setup_distributed

# exit status after a preemption signal (EX_TEMPFAIL): a checkpoint was written, resume to continue
PREEMPTED = 75
# after Ctrl-C: the shell's status for a process ended by SIGINT (128 + 2), once the checkpoint is written
INTERRUPTED = 130

#################################################################################
#                      Resuming: the same run, or say why not                   #
#################################################################################

# Flags that must agree between a checkpoint and the run that resumes it: the network's and the data's
# (MODEL_AND_DATA_FLAGS), and those that the saved data position, noise streams and optimizer state depend on
# (EXACT_RESUME_FLAGS: changing them breaks an exact resume; another optimizer cannot read the saved moments).
# Every source fact must agree too.
MODEL_AND_DATA_FLAGS = ("model", "arch", "pred", "cond", "class_tokens", "pos_mode", "res_shift",
                        "gate_size", "gate_crop", "gate_flip", "dataset", "objective", "learn_sigma",
                        "beta_schedule", "qk_norm", "decode_layers", "cond_type", "text_encoder",
                        "text_max_length", "text_pad", "pad_noise", "text_null")
EXACT_RESUME_FLAGS = ("batch", "seed", "shapes_size", "size_corr", "grad_accum", "optimizer")
# Flags a resume may change without a word: where things go, how often the loop reports, what it samples at
# the end. The rest is either compared by config_mismatch or named when it differs.
FREE_ON_RESUME = ("resume", "out", "print_config", "sources", "recipe", "log_every", "ckpt_every",
                  "sample_every", "keep", "eval_per_class", "workers", "steps", "accept_data_change")


class Resumed(NamedTuple):
    """The checkpoint a run continues from: its path, its contents, and when this process chose it."""

    path: str
    ckpt: dict
    chosen_at: float


def read_resume(args, rank):
    """The Resumed checkpoint that --resume names, or None for a new run. Read before any work, so that a
    missing file or another config schema fails at once."""
    if not args.resume:
        return None
    chosen_at = time.time()
    path, ckpt = find_checkpoint(args.resume, args.out)
    if ckpt is None:
        if rank == 0:
            print(f"--resume auto: no checkpoint under {args.out!r}, starting a new run")
        return None
    if ckpt.get("config_version") != CONFIG_VERSION:
        raise SystemExit(f"{path}: written by another version of this code (config schema "
                         f"{ckpt.get('config_version')}, this code reads {CONFIG_VERSION}): resume it with "
                         "the code that wrote it, or start a new run from its weights with --init-from "
                         f"{path}")
    missing = {"model", "opt", "gen", "torch_rng", "loss_window"} - set(ckpt)
    if missing:  # an export or a bare state dict holds weights, not a run to continue
        raise SystemExit(f"--resume {path}: weights only (no {', '.join(sorted(missing))}), not a training "
                         f"checkpoint; start a new run from them with --init-from {path}")
    return Resumed(path, ckpt, chosen_at)


def comparable_setting(key, value):
    """A flag as compared on resume: a gate schedule as its name and parameters, however it was written
    (`cosine_pow`, `cosine_pow:2`, `cosine_pow:2.0` are one schedule)."""
    return parse_gate(value) if key.startswith("gate_") and isinstance(value, str) else value


def comparable_fact(key, value):
    """A source fact as compared on resume: a data path as an absolute path, so that `data/x` and
    `/home/me/data/x` given from the same folder are one dataset."""
    return os.path.abspath(value) if key == "data_path" and value else value


# what a resume on other data is told (config_mismatch)
DATA_CHANGED = ("data_fingerprint: the training data changed since the checkpoint (a file added, removed, "
                "renamed or changed, or a caption): resume on the same data, or give --accept-data-change to "
                "go on with this data (as many items as before: a changed data_size is refused either way)")


def config_mismatch(saved, args, facts):
    """Human-readable list of the settings that differ between a checkpoint (its stored `args` and `facts`)
    and this run."""
    # a stream's position is kept per loader worker
    keys = MODEL_AND_DATA_FLAGS + EXACT_RESUME_FLAGS + (("workers",) if args.dataset == "webdataset" else ())
    bad = [f"{k}: checkpoint {saved['args'].get(k)!r} vs now {getattr(args, k)!r}"
           for k in keys
           if comparable_setting(k, saved["args"].get(k)) != comparable_setting(k, getattr(args, k))]
    now, was = dataclasses.asdict(facts), saved["facts"]
    differ = [k for k, v in now.items()
              if comparable_fact(k, was.get(k)) != comparable_fact(k, v)
              # a fact added since the checkpoint's schema was not recorded: not compared
              and not (k in ADDED_FACTS and was.get(k) == ADDED_FACTS[k])]
    return bad + [DATA_CHANGED if k == "data_fingerprint" else
                  f"{k}: checkpoint {was.get(k)!r} vs now {now[k]!r}" for k in differ]


def check_resume(args, facts, resumed, lr_at, rank=0):
    """A resume continues the same run: made with this configuration (checked once the data and the text
    encoder have told their facts, before a model or a folder is made), and with steps left to train. The
    cosine schedule (`lr_at`, train.py's) is laid over --steps, so another --steps would bend the learning
    rate between two steps: refused, with the way to train longer, unless every step left to train keeps
    its rate (they all lie in the warm-up). Any other flag that differs from the checkpoint's run is named;
    it takes effect from the resumed step."""
    if resumed is None:
        return
    path, ckpt = resumed.path, resumed.ckpt
    bad = config_mismatch(ckpt, args, facts)
    if DATA_CHANGED in bad and getattr(args, "accept_data_change", False):
        bad.remove(DATA_CHANGED)
        if rank == 0:
            print(f"resume: the training data differs from the checkpoint's (fingerprint "
                  f"{ckpt['facts']['data_fingerprint']} -> {facts.data_fingerprint}); going on, as "
                  "--accept-data-change says", flush=True)
    if bad:
        raise SystemExit(f"--resume {path}: checkpoint was made with another configuration:\n  "
                         + "\n  ".join(bad) + "\nresume with the same flags, or start a new run")
    saved, step = ckpt["args"], ckpt["step"]
    if step >= args.steps:
        raise SystemExit(f"--resume {path}: the checkpoint is at step {step} and --steps {args.steps} asks "
                         "for no more: the run is finished. To train on, start a new run from it: "
                         f"--init-from {path} --steps N (a schedule of its own)")
    cosine = args.decay == "cosine"
    if args.steps != saved["steps"] and cosine:
        # what --steps alone changes (any other flag as now: a new --lr or --warmup is named below): the first
        # step left to train whose rate the checkpoint's --steps would have set otherwise
        was = argparse.Namespace(**{**vars(args), "steps": saved["steps"]})
        apart = next((s for s in range(step, args.steps) if lr_at(s, was) != lr_at(s, args)), None)
        if apart is not None:
            now, then = lr_at(apart, args), lr_at(apart, was)
            raise SystemExit(f"--resume {path}: --steps {args.steps}, but the cosine schedule is laid over "
                             f"--steps ({saved['steps']} in the run): from step {apart} the learning rate "
                             f"would be {now:.3g} instead of {then:.3g}. Resume with --steps "
                             f"{saved['steps']}, or train longer in a new run: --init-from {path} --steps N")
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}" for k, v in vars(args).items()
               if k in saved and k not in FREE_ON_RESUME
               and comparable_setting(k, saved[k]) != comparable_setting(k, v)]
    if args.steps != saved["steps"]:
        same = ("every step left to train is in the warm-up, at the rate it had" if cosine
                else "the constant schedule continues")
        changed.append(f"--steps {saved['steps']} -> {args.steps} ({same})")
    if changed and rank == 0:
        print(f"resume: these flags differ from the checkpoint's run and take effect from step {step}: "
              + ", ".join(changed), flush=True)


#################################################################################
#                      The run folder: one owner, numbered                      #
#################################################################################


class RunLock:
    """The run folder's owner: checks.OwnerLock on RUN/.lock, taken before the process touches anything in
    the folder and held until it ends. A second process on the same folder -- a requeued job while the old
    one still runs, two `--resume auto` -- is refused with the holder's pid, host and start time."""

    def __init__(self, run_dir):
        self.lock = OwnerLock(os.path.join(run_dir, ".lock"), lambda holder: (
            f"{run_dir} is in use by another training process ({holder}): two processes on one run folder "
            "would overwrite each other's checkpoints and log. Wait for it to end or stop it (a killed "
            "process frees the folder at once), or train into another --out"))
        refused = self.lock.take()
        if refused:
            raise SystemExit(refused)

    def release(self):
        self.lock.release()


def next_run_number(out):
    """One more than the highest number of a run folder under `out` (NNN-...), 0 for none: a stray file or
    folder of another name does not shift the numbering."""
    numbers = [run_number(name) for name in os.listdir(out)]
    return max((n for n in numbers if n is not None), default=-1) + 1


def new_run_dir(args, rank, world):
    """A fresh numbered run folder under --out, made by rank 0 and told to the others."""
    run_dir = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        number = next_run_number(args.out)
        while True:  # mkdir is atomic: two runs started together never share a folder
            run_dir = os.path.join(args.out,
                                   f"{number:03d}-{args.dataset}-{args.model.replace('/', '-')}-{args.cond}")
            try:
                os.makedirs(run_dir)
                break
            except FileExistsError:
                number += 1
    return from_rank0(run_dir, world)


def refuse_newer(run_dir, resumed, lock):
    """--resume auto (or a folder) chose the newest checkpoint when this process started; a checkpoint that
    appeared since was written by a process that held the folder until now (a requeued job's predecessor,
    stopped by the scheduler while this one started). Resuming the older one would abandon it: refused."""
    # a rename sets ctime
    newer = [f for f in checkpoints_after(run_dir, resumed.path) if os.stat(f).st_ctime >= resumed.chosen_at]
    if newer:
        lock.release()
        raise SystemExit(f"--resume: {newer[0]} was written while this process started (by another process "
                         f"that held {run_dir} until then); run the command again to resume from it")


def set_aside_later(ckpt_path):
    """Resuming an older checkpoint abandons the later ones: move them to abandoned/, out of the way of
    --resume auto and of pruning."""
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    later = checkpoints_after(run_dir, ckpt_path)
    if later:
        os.makedirs(os.path.join(run_dir, "abandoned"), exist_ok=True)
        for f in later:
            os.replace(f, os.path.join(run_dir, "abandoned", os.path.basename(f)))
        print(f"resume: moved {len(later)} later checkpoint(s) to {os.path.join(run_dir, 'abandoned')}")


def remove_unfinished_writes(run_dir):
    """Only the folder's owner writes checkpoints, so once the folder is ours a checkpoint write that a kill
    cut short (as large as a checkpoint) is nobody's: removed, and said. Best effort: one that cannot be
    removed is named and left, and the resume goes on."""
    removed, freed = [], 0
    for f in unfinished_checkpoint_writes(run_dir):
        try:
            size = os.path.getsize(f)
            os.remove(f)
        except OSError as e:
            print(f"resume: could not remove the unfinished checkpoint write {f} ({e}); remove it by hand")
            continue
        removed.append(os.path.basename(f))
        freed += size
    if removed:
        print(f"resume: removed {len(removed)} unfinished checkpoint write(s) that a killed run left "
              f"({freed / 2**20:.1f} MiB): {', '.join(removed)}")


def rewind_log(run_dir, step):
    """The log as it was at the checkpoint's step: lines of later steps (those a resume replays), and a line a
    kill cut short, move to abandoned/log-after-STEP.jsonl, so that every step appears once in log.jsonl and
    nothing is lost."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        # a last line cut short by a kill lacks its newline
        lines = [line if line.endswith("\n") else line + "\n" for line in f]

    def kept(line):
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # half a line
            return False
    keep, later = [ln for ln in lines if kept(ln)], [ln for ln in lines if not kept(ln)]
    if not later:
        return
    os.makedirs(os.path.join(run_dir, "abandoned"), exist_ok=True)
    with open(os.path.join(run_dir, "abandoned", f"log-after-{step:07d}.jsonl"), "a", encoding="utf-8") as f:
        f.writelines(later)
    atomic_write(path, lambda f: f.write("".join(keep).encode()))
    print(f"resume: {len(later)} log line(s) after step {step} moved to abandoned/")


def resumed_folder(args, resumed, rank, world):
    """(the resumed checkpoint's folder, its lock): locked before anything in it moves, then its later
    checkpoints and log lines set aside. Only rank 0 writes, so only rank 0 locks (None on the others); a
    refusal on rank 0 stops every rank, not rank 0 alone while the others wait."""
    run_dir, lock, refused = os.path.dirname(resumed.path), None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
            if not os.path.isfile(args.resume):  # auto or a folder: still the newest, now that it is ours?
                refuse_newer(run_dir, resumed, lock)
            set_aside_later(resumed.path)
            remove_unfinished_writes(run_dir)
            rewind_log(run_dir, resumed.ckpt["step"])
        except SystemExit as e:
            refused = str(e.code)
        except OSError as e:  # the folder cannot be set in order: every rank stops, not rank 0 alone
            refused = f"--resume {resumed.path}: the run folder {run_dir} could not be prepared: {e}"
            if lock is not None:
                lock.release()
                lock = None
    refused = from_rank0(refused, world)
    if refused:
        raise SystemExit(refused)
    return run_dir, lock


#################################################################################
#                      Signals: stop at a step boundary                         #
#################################################################################


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM and most schedulers send before a kill) and Ctrl-C (SIGINT) set a flag;
    the loop finishes its step, every rank agrees, one checkpoint is written and the run exits with status
    PREEMPTED (INTERRUPTED after Ctrl-C). A second Ctrl-C stops at once, without one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:  # the second Ctrl-C
            raise KeyboardInterrupt
        self.signal = signum
        if signum == signal.SIGINT:  # os.write: print() may not re-enter while the progress bar writes
            os.write(2, b"\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again stops at "
                        b"once, without one)\n")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


#################################################################################
#                      The open run: log, checkpoints, stop                     #
#################################################################################


class Process(NamedTuple):
    """This process's place in the job: its rank, the number of ranks, its device, bf16 autocast or not."""

    rank: int
    world: int
    device: torch.device
    bf16: bool


def setup_process(args):
    """This process in the job (torchrun's ranks, or one), the seed, TF32 on a GPU -> Process. The seed
    gives every rank the same initial weights."""
    rank, world, device = setup_distributed()
    if args.batch % (world * args.grad_accum):  # the global batch is the recipe's, whatever the processes
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world} x "
                         f"--grad-accum {args.grad_accum} = {world * args.grad_accum} (the micro-batch of "
                         "each rank is batch / (processes x grad-accum)); change --grad-accum or the number "
                         "of processes")
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Process(rank, world, device, use_bf16(args.precision, device))


def open_run(args, resumed, proc):
    """The Run this process trains into: the resumed checkpoint's folder, or a new numbered one under
    --out."""
    if resumed is None:
        run_dir = new_run_dir(args, proc.rank, proc.world)
        lock = RunLock(run_dir) if proc.rank == 0 else None
    else:
        run_dir, lock = resumed_folder(args, resumed, proc.rank, proc.world)
    return Run(run_dir, lock, proc, resumed)


class Run:
    """An open run folder: rank 0 holds its lock and writes its log and checkpoints; every rank takes part in
    the collective steps (saving gathers every rank's noise stream and data position). Signals are caught
    from here on; close() gives them and the folder back however the run ends."""

    def __init__(self, run_dir, lock, proc, resumed=None):
        self.dir, self.lock, self.proc, self.resumed = run_dir, lock, proc, resumed
        self.last_ckpt = resumed.path if resumed is not None else None
        log_path = os.path.join(run_dir, "log.jsonl")
        self.log_file = open(log_path, "a", encoding="utf-8") if proc.rank == 0 else None
        self.preemption = Preemption()

    def close(self):
        self.preemption.restore()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- the log
    def log(self, record):
        """One line of log.jsonl (rank 0; the other ranks write nothing)."""
        if self.log_file is None:
            return
        # strict JSON: a value that is not a finite number (a window of skipped steps has no mean loss): null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            self.log_file.write(json.dumps(record, allow_nan=False) + "\n")
            self.log_file.flush()
        except OSError as e:
            name = self.log_file.name
            raise WriteFailed(f"{write_failure(name, e)}; {write_remedy(name, e)}. The last checkpoint holds "
                              f"the run: then --resume {self.dir}") from None

    def check_replicas(self, model, step):
        """DDP must keep the replicas identical; check it rather than trust it, and log the answer."""
        if self.proc.world == 1:
            return
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(self.proc.device)
        gathered = [torch.zeros_like(sums) for _ in range(self.proc.world)]
        dist.all_gather(gathered, sums)
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])  # every rank decides alike: none hangs
        self.log(dict(step=step, replicas_identical=same))
        if not same:
            raise RuntimeError("model replicas diverged across ranks")

    # ---- stopping
    def stop_requested(self, at_sync_point):
        """Whether a signal asks the run to stop after this step. One process reads its own flag, a Python
        value, every step. Under torchrun a signal may reach one rank first, so the ranks agree through an
        all-reduce, which waits for the device: it runs only `at_sync_point` (the log and checkpoint steps,
        where the loop reads the device anyway), so a signal is acted on up to --log-every steps late."""
        if self.proc.world == 1:
            return self.preemption.signal is not None
        if not at_sync_point:
            return False
        flag = torch.tensor(float(self.preemption.signal is not None), device=self.proc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, step, bar=None):
        """After a preemption's checkpoint: say how to continue, leave the process group, exit with PREEMPTED
        (INTERRUPTED after Ctrl-C)."""
        interrupted = self.preemption.signal == signal.SIGINT
        if self.proc.rank == 0:
            if bar is not None:
                bar.close()
            what = "stopped by Ctrl-C" if interrupted else f"preempted by signal {self.preemption.signal}"
            print(f"{what} at step {step}: wrote {self.last_ckpt}; continue with --resume {self.dir}")
        finish_distributed(self.proc.world)
        raise SystemExit(INTERRUPTED if interrupted else PREEMPTED)

    def stop_diverged(self, in_a_row, step, args):
        """--max-bad-steps non-finite steps in a row (read at a log line): the weights are those of the last
        finite step, since a non-finite one changes nothing; say where to start again."""
        where = (f"the last checkpoint is {self.last_ckpt}: lower --lr or check the data, then --resume "
                 f"{self.last_ckpt}" if self.last_ckpt else
                 "no checkpoint was written yet: lower --lr or check the data and start again")
        raise SystemExit(f"stopping: {in_a_row} non-finite steps in a row by step {step} (--max-bad-steps "
                         f"{args.max_bad_steps}); {where}")

    # ---- checkpoints
    def start(self, state, progress):
        """Continue where the resumed checkpoint stopped (restore), or leave the fresh state as it is."""
        if self.resumed is not None:
            restore(self.resumed.ckpt, state, progress, self.proc, self.resumed.path)

    def save(self, state, progress, args, facts):
        """Gather every rank's noise stream, CUDA RNG state and data position, write ckpt-STEP.pt from rank 0
        and keep the newest --keep."""
        path = os.path.join(self.dir, f"ckpt-{progress.step:07d}.pt")
        device, world = self.proc.device, self.proc.world
        # weights a finite gradient still drove to NaN or infinity: no checkpoint to resume into the same fate
        finite = torch.stack([p.detach().isfinite().all() for p in state.model.parameters()]).all()
        if not finite:
            where = (f"the last good checkpoint is {self.last_ckpt}: resume it with a lower --lr"
                     if self.last_ckpt else "no checkpoint was written before: start again with a lower --lr")
            raise SystemExit(f"stopping at step {progress.step}: the weights hold NaN or infinite values "
                             f"(tensor {non_finite_tensor(state.model.state_dict())}); {where}")
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        gens, cuda_rngs, places = [state.gen.get_state()], [cuda_rng], [(progress.epoch, progress.position)]
        if world > 1:
            gens, cuda_rngs, places = [None] * world, [None] * world, [None] * world
            dist.all_gather_object(gens, state.gen.get_state())
            dist.all_gather_object(cuda_rngs, cuda_rng)
            dist.all_gather_object(places, (progress.epoch, progress.position))
        if self.proc.rank == 0:
            stream = progress.streamed
            ckpt = dict(model=state.model.state_dict(), ema=state.ema.state_dict(),
                        opt=state.opt.state_dict(), step=progress.step,
                        epoch=[p[0] for p in places] if stream else progress.epoch,
                        position=[p[1] for p in places] if stream else progress.position, gen=gens,
                        torch_rng=torch.get_rng_state(), cuda_rng=cuda_rngs,
                        loss_window=(progress.loss_sum.item(), int(progress.n_acc.item()), progress.n_steps),
                        args=vars(args), facts=dataclasses.asdict(facts), config_version=CONFIG_VERSION)
            write_checkpoint(path, ckpt, advice=(
                f"then continue with --resume {self.dir} (the last good checkpoint is {self.last_ckpt})"
                if self.last_ckpt else "the run wrote no checkpoint before this one: then run the command "
                "again (it starts the run anew)"))
            for f in [f for f in checkpoints_in(self.dir) if f != path][args.keep - 1 :]:
                os.remove(f)
        self.last_ckpt = path
        return path


def restore(ckpt, state, progress, proc, file="--resume"):
    """Continue exactly where a checkpoint stopped: weights, optimizer, step, this rank's data position and
    noise stream, the global RNGs (CPU, and this rank's GPU), the log window a preemption may have cut."""
    rank, device = proc.rank, proc.device
    load_weights(state.model, ckpt["model"], file, "model")
    load_weights(state.ema, ckpt["ema"], file, "EMA")
    state.opt.load_state_dict(ckpt["opt"])
    progress.step, progress.epoch, progress.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    if progress.streamed:  # a stream keeps one position (and epoch) per rank
        progress.epoch, progress.position = ckpt["epoch"][rank], ckpt["position"][rank]
    state.gen.set_state(ckpt["gen"][rank])  # same world size: checked with the config
    torch.set_rng_state(ckpt["torch_rng"])
    cuda_rngs = ckpt.get("cuda_rng")  # one per rank; an older checkpoint has none, a CPU run's are None
    if cuda_rngs and cuda_rngs[rank] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rngs[rank], device)
    progress.loss_sum.fill_(ckpt["loss_window"][0])
    progress.n_acc.fill_(ckpt["loss_window"][1])
    progress.n_steps = ckpt["loss_window"][2]


def finish_distributed(world):
    """Leave the process group together (a no-op in one process). Together matters: once a process has
    wrapped a model in DDP, torch keeps the process group alive past destroy_process_group (seen with torch
    2.14 and gloo), and a rank that exits while another is still in the group can abort at exit (SIGABRT,
    "terminate called without an active exception"), failing a job whose work is done."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
