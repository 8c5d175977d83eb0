"""
Train a diffusion transformer. One loop for every setting.

    python train.py                                  # small model on the embedded shapes dataset (CPU)
    torchrun --nproc_per_node=8 train.py --dataset imagenet --res 256   # ImageNet from $IMAGENET_DIR,
                                                     # else data/imagenet/train, else --data-path

DDP under torchrun (NCCL on GPU, gloo on CPU; the *local* rank picks the GPU), bf16 autocast + TF32 on GPU,
fused attention through scaled_dot_product_attention, AdamW with warmup, gradient clipping, EMA, gradient
accumulation (--grad-accum: the global --batch whatever the GPUs) and activation checkpointing (--grad-ckpt),
atomic checkpoints that resume exactly (model, EMA, optimizer, step, data position, RNG states), a JSON-lines
log and sample grids. A run folder has one owner (a lock), Ctrl-C and a scheduler's SIGTERM finish the step
and write a checkpoint, and a resume continues the same run or says why it cannot. A flag comes from the
command line, else the recipes (--dataset shapes starts with its own), else its default, the paper's ImageNet
setting (config.py; --print-config shows each value's source). The flags and what the run learns from its
sources (config.Facts) are printed and stored in every checkpoint.
"""
import dataclasses
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from checkpoint import (
    CONFIG_VERSION,
    RunLock,
    WriteFailed,
    atomic_write,
    checkpoints_in,
    find_checkpoint,
    init_from,
    load_weights,
    read_init,
    stored_args,
    write_checkpoint,
    write_failure,
)
from conditioning import drop_flags
from config import (
    config_mismatch,
    get_args,
    learn_facts,
    make_autoencoder,
    make_diffusion,
    make_model,
    open_dataset,
    run_sampling,
    said,
    use_bf16,
    validate,
)
from data import EVENTS, SKIPPED, setup_distributed
from latents import Autoencoder
from model import count_params
from sample import checker_verdict, class_grid
from text import caption_features, text_features

# exit status after a preemption signal (EX_TEMPFAIL): a checkpoint was written, resume to continue
PREEMPTED = 75
# after Ctrl-C: the shell's status for a process ended by SIGINT (128 + 2), once the checkpoint is written
INTERRUPTED = 130

#################################################################################
#                           Data order that can resume                          #
#################################################################################

def epoch_indices(n, epoch, seed, rank, world, batch):
    """This rank's indices for one epoch: a seeded permutation, strided across ranks, whole batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = (n // world) // batch * batch
    if per_rank == 0:
        raise SystemExit(f"dataset of {n} images is smaller than one batch of {batch} on each of {world} "
                         "ranks")
    return perm[rank::world][:per_rank]


def loader_generator(args, epoch):
    """A DataLoader draws its workers' base seed from a generator when it starts an epoch; given none it takes
    the global RNG, which the model also uses (mDT masks, text padding noise), so a resume -- which starts a
    loader at another step -- would shift that stream. Its own generator keeps resumes exact."""
    return torch.Generator().manual_seed(args.seed * 100_003 + epoch)


def ignore_sigint(worker_id):
    """A loader worker leaves Ctrl-C to the training process, which finishes its step and writes a
    checkpoint (a worker ended by the signal would break the epoch with "worker exited unexpectedly")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches(dataset, args, rank, world, local_batch, epoch, position):
    """Yield (epoch, position_after, batch) forever, starting at `position` batches into `epoch`."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        yield from stream_batches(dataset, args, local_batch, epoch, position)
        return
    while True:
        dataset.set_epoch(epoch)
        idx = epoch_indices(len(dataset), epoch, args.seed, rank, world, local_batch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch,
                                             sampler=idx[position * local_batch:],
                                             num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                             drop_last=True, generator=loader_generator(args, epoch),
                                             worker_init_fn=ignore_sigint)
        for b in loader:
            position += 1
            yield epoch, position, b
        epoch, position = epoch + 1, 0


def stream_batches(dataset, args, local_batch, epoch, position):
    """The same for a streamed dataset (webdataset shards): it splits itself across ranks and workers, and its
    position is (samples drawn per worker, the worker of the next batch) -- different on every rank, so
    checkpoints keep one per rank. `position` None starts the epoch from the beginning."""
    workers = max(args.workers, 1)
    drawn, first = position if position is not None else (None, 0)
    while True:
        dataset.set_epoch(epoch, drawn, first)
        loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, num_workers=args.workers,
                                             drop_last=True, collate_fn=dataset.collate,
                                             pin_memory=torch.cuda.is_available(),
                                             generator=loader_generator(args, epoch),
                                             worker_init_fn=ignore_sigint)
        drawn, got = list(drawn or [0] * workers), 0
        for img, y, ctrl, captions, tag in loader:
            w, n = tag.tolist()
            drawn[w], first, got = n, (w + 1) % workers, got + 1
            yield epoch, (list(drawn), first), (img, y, ctrl, captions)
        if got == 0:
            counts = dict(zip(EVENTS, dataset.events.sum(0).tolist()))
            skipped = {k: counts[k] for k in SKIPPED if counts[k]}
            raise SystemExit(f"--dataset {args.dataset}: a whole epoch gave this rank no batch of "
                             f"{local_batch} (so far this process used {counts['ok']} samples and skipped "
                             f"{skipped or 'none'}); "
                             + ("check the shards' captions and images" if skipped and not counts["ok"] else
                                "use more (or fewer, larger) shards, fewer --workers or a smaller --batch"))
        epoch, drawn, first = epoch + 1, None, 0


#################################################################################
#                      Preemption and data-health accounting                    #
#################################################################################

class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM and most schedulers send before a kill) and Ctrl-C (SIGINT) set a flag;
    the loop finishes its step, every rank agrees through an all-reduce, one checkpoint is written and the run
    exits with status PREEMPTED (INTERRUPTED after Ctrl-C). A second Ctrl-C stops at once, without one."""

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

    def requested(self, world, device):
        flag = torch.tensor(float(self.signal is not None), device=device)
        if world > 1:  # a signal may reach one rank first: stop together or not at all
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def data_events(dataset, world, args):
    """Counts of skipped / converted images summed over ranks (and their workers); stop when too many are
    bad."""
    if not hasattr(dataset, "events"):
        return {}
    counts = dataset.events.sum(0)
    if world > 1:
        dist.all_reduce(counts)
    counts = dict(zip(EVENTS, counts.tolist()))
    skipped = sum(counts[k] for k in SKIPPED)
    seen = skipped + counts["ok"]
    if seen >= 100 and skipped > args.max_skip_rate * seen:
        raise SystemExit(f"{skipped} of {seen} images could not be used "
                         f"({ {k: counts[k] for k in SKIPPED} }), more than --max-skip-rate "
                         f"{args.max_skip_rate}: check --data-path")
    return {"data": {k: v for k, v in counts.items() if v}}


#################################################################################
#                       From a loader batch to the model                        #
#################################################################################

def model_inputs(batch, vae, latent, text_cache, encoder, gen, device):
    """A loader batch -> (x0, semantic input, control) on the device. Images go through the autoencoder as a
    posterior sample, as the SD VAE recipes train (a latent cache has drawn its own); captions are looked up
    in the text cache, or encoded batch by batch (a stream, or a caption set over --text-cache-gb)."""
    img, y, ctrl, captions = batch
    img, y, ctrl = img.to(device, non_blocking=True), y.to(device), ctrl.to(device)
    if text_cache is not None:
        y = text_cache.lookup(captions, device)  # (features (B, L, d), mask (B, L))
    elif encoder is not None:  # a stream, or captions too many to cache: the frozen encoder, now
        y = caption_features(encoder, captions, device)
    with torch.no_grad():
        x0 = img.float() if latent else vae.encode(img, generator=gen)
    return x0, y, ctrl


#################################################################################
#                          One optimisation step                                #
#################################################################################


def lr_at(step, args):
    """Linear warm-up, then constant or cosine decay to 10 % of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "cosine":
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    return args.lr


def ema_decay(step, args):
    """--ema-warmup on: min(ema, (1 + step) / (10 + step)) (0.1 at the first step, 0.5 at step 8, 0.99 at step
    890), so early averages are not dominated by the random initialisation (LDM's LitEma); off: --ema from the
    first step (DiT, PixArt-alpha, mDT-v2, which copy the weights into the EMA at the start, as train.main
    does)."""
    return min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup == "on" else args.ema


def make_optimizer(params, args, fused=False):
    """--optimizer adamw (torch's; `fused`: one kernel on GPU) or adan (mDT-v2's, from the adan-pytorch
    package, imported only here). --beta1/2/3 are the moment decays in the Adan paper's convention (mDT-v2:
    0.98, 0.92, 0.99); adan-pytorch takes one minus each."""
    if args.optimizer == "adan":
        from adan_pytorch import Adan

        return Adan(params, lr=args.lr, betas=(1 - args.beta1, 1 - args.beta2, 1 - args.beta3), eps=args.eps,
                    weight_decay=args.wd)
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             weight_decay=args.wd, fused=fused)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, every parameter in one fused call."""
    ema_p = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)


def checkpoint_blocks(model):
    """--grad-ckpt: activation checkpointing of every transformer block. Each block's forward is wrapped so
    that only its inputs are kept and its activations are recomputed in the backward pass: less memory for
    about one more forward. The weights and their names are untouched, so checkpoints and the EMA are the same
    either way."""
    if not hasattr(model, "blocks"):
        raise SystemExit("--grad-ckpt wraps model.blocks: this architecture has none (use --arch dit or mdt)")
    for block in model.blocks:
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)


def train_step(net, model, ema, opt, diffusion, micro_batches, gen, step, args, bf16, skip_non_finite=True):
    """One optimisation step on the micro-batches [(x0, y, ctrl), ...] of this rank (one, or --grad-accum of
    them): for each, condition dropout (for guidance) and the mean loss under bf16 autocast (or fp32), scaled
    by 1 / their number and backpropagated, so the gradients add up to those of the mean loss of the whole
    batch; then this step's learning rate, gradient clipping, the optimizer, the EMA. `net` is what runs the
    forward (the model, or its DDP / compiled wrapper); under DDP only the last micro-batch's backward
    all-reduces, the others accumulate locally. Noise, noise levels and dropout come from `gen`, drawn
    micro-batch by micro-batch. A non-finite gradient norm skips the update (skip_non_finite=False omits that
    check, a host read of a device value). Under DDP the gradients are averaged first, so a NaN on any rank is
    a NaN in every rank's norm and all ranks skip alike. -> (loss averaged over the micro-batches, grad norm,
    whether the weights were updated)"""
    n = len(micro_batches)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i, (x0, y, ctrl) in enumerate(micro_batches):
        sem_drop, ctrl_drop = drop_flags(x0.shape[0], args.p_drop_sem, args.p_drop_ctrl, gen, x0.device)
        sync = i == n - 1 or not hasattr(net, "no_sync")  # DDP: all-reduce once, with the last backward
        with nullcontext() if sync else net.no_sync():
            with torch.autocast(x0.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = diffusion.loss(net, x0, gen, y=y, ctrl=ctrl, ctrl_drop=ctrl_drop,
                                      sem_drop=sem_drop).mean()
            (loss / n).backward()
        total = total + loss.detach() / n
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else float("inf"))
    if skip_non_finite and not torch.isfinite(gnorm):
        opt.zero_grad(set_to_none=True)
        return total, gnorm, False
    opt.step()
    update_ema(ema, model, ema_decay(step, args))
    return total, gnorm, True


#################################################################################
#                     Loop state, run folder and checkpoints                    #
#################################################################################


@dataclass
class Progress:
    """What the loop carries from step to step; a checkpoint saves it with the weights."""

    # losses of the finite steps since the last log line, summed on the device (no sync)
    loss_sum: torch.Tensor
    step: int = 0
    epoch: int = 0
    position: object = 0  # batches into the epoch; a stream's: (samples drawn per worker, the next worker)
    n_acc: int = 0  # finite steps in loss_sum
    n_steps: int = 0  # steps since the last log line, for images/s
    t0: float = 0.0  # when the log window began
    bad_in_a_row: int = 0  # non-finite steps in a row ...
    bad_total: int = 0  # ... and in all
    last_ckpt: str = None


def count_step(loop, loss, updated, args, rank):
    """Add a step's loss to the log window, or count it as skipped; stop after --max-bad-steps skipped in a
    row."""
    if updated:
        loop.loss_sum += loss  # on the device: no host sync until the log line
        loop.n_acc, loop.bad_in_a_row = loop.n_acc + 1, 0
        return
    loop.bad_in_a_row, loop.bad_total = loop.bad_in_a_row + 1, loop.bad_total + 1
    if rank == 0:
        print(f"step {loop.step + 1}: non-finite loss or gradient, optimizer step skipped "
              f"({loop.bad_in_a_row} in a row, {loop.bad_total} in all)", flush=True)
    if loop.bad_in_a_row >= args.max_bad_steps:
        raise SystemExit(f"stopping: {loop.bad_in_a_row} non-finite steps in a row ending at step "
                         f"{loop.step + 1}; last good checkpoint: {loop.last_ckpt or 'none'}. Lower --lr or "
                         f"check the data, then --resume from that checkpoint")


def resume_point(args, rank):
    """(path, checkpoint) that --resume names, or (None, None) for a new run. Read before any work, so that a
    missing file or another config schema fails at once."""
    if not args.resume:
        return None, None
    path, ckpt = find_checkpoint(args.resume, args.out)
    if ckpt is None and rank == 0:
        print(f"--resume auto: no checkpoint under {args.out!r}, starting a new run")
    if ckpt is not None and ckpt.get("config_version") != CONFIG_VERSION:
        raise SystemExit(f"{path}: written by another version of this code (config schema "
                         f"{ckpt.get('config_version')}, this code reads {CONFIG_VERSION}): resume it with "
                         "the code that wrote it, or start a new run from its weights with --init-from "
                         f"{path}")
    missing = {"model", "opt", "gen", "torch_rng", "loss_window"} - set(ckpt or {})
    if ckpt is not None and missing:  # an export or a bare state dict holds weights, not a run to continue
        raise SystemExit(f"--resume {path}: weights only (no {', '.join(sorted(missing))}), not a training "
                         f"checkpoint; start a new run from them with --init-from {path}")
    return path, ckpt


def refuse_other_config(args, facts, ckpt_path, ckpt):
    """A resumed checkpoint must have been made with this configuration: checked once the data and the text
    encoder have told their facts (number of classes, text length), before a model, an autoencoder or a folder
    is made."""
    bad = config_mismatch(ckpt, args, facts) if ckpt is not None else None
    if bad:
        raise SystemExit(f"--resume {ckpt_path}: checkpoint was made with another configuration:\n  "
                         + "\n  ".join(bad)
                         + "\nresume with the same flags, or start a new run")


# flags a resume may change without a word: where things go, how often the loop reports, what it samples at
# the end (the rest is either compared by config_mismatch or named when it differs)
QUIET_ON_RESUME = ("resume", "out", "print_config", "sources", "recipe", "log_every", "ckpt_every",
                   "sample_every", "keep", "eval_per_class", "workers", "steps")


def check_resume(args, ckpt_path, ckpt, rank):
    """A resume continues the same run. The cosine schedule is laid over --steps, so another --steps would
    bend the learning rate between two steps: refused, with the way to train longer. A checkpoint at or past
    --steps has nothing left to train: refused. Any other flag that differs from the checkpoint's run is named
    (it takes effect from the resumed step)."""
    if ckpt is None:
        return
    saved, step = ckpt["args"], ckpt["step"]
    if step >= args.steps:
        raise SystemExit(f"--resume {ckpt_path}: the checkpoint is at step {step} and --steps {args.steps} "
                         "asks for no more: the run is finished. To train on, start a new run from it: "
                         f"--init-from {ckpt_path} --steps N (a schedule of its own)")
    if args.steps != saved["steps"] and "cosine" in (args.decay, saved["decay"]):
        was, now = lr_at(step, stored_args(saved)), lr_at(step, args)
        raise SystemExit(f"--resume {ckpt_path}: --steps {args.steps}, but the run's cosine schedule is laid "
                         f"over --steps {saved['steps']}: the learning rate would jump from {was:.3g} to "
                         f"{now:.3g} at step {step}. Resume with --steps {saved['steps']}, or train longer "
                         f"in a new run: --init-from {ckpt_path} --steps N")
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}" for k, v in vars(args).items()
               if k in saved and k not in QUIET_ON_RESUME and saved[k] != v]
    if args.steps != saved["steps"]:
        changed.append(f"--steps {saved['steps']} -> {args.steps} (the constant schedule continues)")
    if changed and rank == 0:
        print(f"resume: these flags differ from the checkpoint's run and take effect from step {step}: "
              + ", ".join(changed), flush=True)


def run_folder(args, ckpt_path, ckpt, rank, world, started):
    """(the run folder, its lock): the resumed checkpoint's folder -- locked before anything in it moves, then
    its later checkpoints and log lines set aside -- or a new one. Only rank 0 writes, so only rank 0 locks
    (lock None on the others). `started`: the time this process chose its checkpoint."""
    if ckpt is None:
        run_dir = new_run_dir(args, rank, world)
        return run_dir, RunLock(run_dir) if rank == 0 else None
    run_dir, lock, refused = os.path.dirname(ckpt_path), None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
            if not os.path.isfile(args.resume):  # auto or a folder: still the newest, now that it is ours?
                refuse_newer(run_dir, ckpt_path, started, lock)
            set_aside_later(ckpt_path)
            rewind_log(run_dir, ckpt["step"])
        except SystemExit as e:
            refused = str(e.code)
    if world > 1:  # a refusal on rank 0 stops every rank, not rank 0 alone while the others wait
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise SystemExit(refused)
    return run_dir, lock


def refuse_newer(run_dir, ckpt_path, started, lock):
    """--resume auto (or a folder) chose the newest checkpoint when this process started; a checkpoint that
    appeared since was written by a process that held the folder until now (a requeued job's predecessor,
    stopped by the scheduler while this one started). Resuming the older one would abandon it: refused."""
    later = [f for f in checkpoints_in(run_dir) if os.path.basename(f) > os.path.basename(ckpt_path)]
    newer = [f for f in later if os.stat(f).st_ctime >= started]  # a rename sets ctime: when it appeared
    if newer:
        lock.release()
        raise SystemExit(f"--resume: {newer[0]} was written while this process started (by another process "
                         f"that held {run_dir} until then); run the command again to resume from it")


def new_run_dir(args, rank, world):
    """A fresh numbered run folder under --out, made by rank 0 and told to the others."""
    run_dir = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        n = len(os.listdir(args.out))
        while True:  # mkdir is atomic: two runs started together never share a folder
            run_dir = os.path.join(args.out,
                                   f"{n:03d}-{args.dataset}-{args.model.replace('/', '-')}-{args.cond}")
            try:
                os.makedirs(run_dir)
                break
            except FileExistsError:
                n += 1
    if world > 1:
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return run_dir


def set_aside_later(ckpt_path):
    """Resuming an older checkpoint abandons the later ones: move them to abandoned/, out of the way of
    --resume auto and of pruning."""
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    later = [f for f in checkpoints_in(run_dir) if os.path.basename(f) > os.path.basename(ckpt_path)]
    if later:
        os.makedirs(os.path.join(run_dir, "abandoned"), exist_ok=True)
        for f in later:
            os.replace(f, os.path.join(run_dir, "abandoned", os.path.basename(f)))
        print(f"resume: moved {len(later)} later checkpoint(s) to {os.path.join(run_dir, 'abandoned')}")


def rewind_log(run_dir, step):
    """The log as it was at the checkpoint's step: lines of later steps (those a resume replays), and a line a
    kill cut short, move to abandoned/log-after-STEP.jsonl, so that every step appears once in log.jsonl and
    nothing is lost."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def kept(line):
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # half a line
            return False
    lines = [ln if ln.endswith("\n") else ln + "\n" for ln in lines]  # a last line without its newline
    keep, later = [ln for ln in lines if kept(ln)], [ln for ln in lines if not kept(ln)]
    if not later:
        return
    os.makedirs(os.path.join(run_dir, "abandoned"), exist_ok=True)
    with open(os.path.join(run_dir, "abandoned", f"log-after-{step:07d}.jsonl"), "a") as f:
        f.writelines(later)
    atomic_write(path, lambda f: f.write("".join(keep).encode()))
    print(f"resume: {len(later)} log line(s) after step {step} moved to abandoned/")


def cuda_rng_state(device):
    """This rank's CUDA RNG state, or None off the GPU. The model draws from the global RNG of its device (a
    text model's padding noise), so an exact resume needs the GPU's state as well as the CPU's."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore(ckpt, model, ema, opt, gen, loop, rank, stream, device):
    """Continue exactly where the checkpoint stopped: weights, optimizer, step, this rank's data position and
    noise stream, the global RNGs (CPU, and this rank's GPU), and the log window a preemption may have cut."""
    load_weights(model, ckpt["model"], "--resume")
    load_weights(ema, ckpt["ema"], "--resume")
    opt.load_state_dict(ckpt["opt"])
    loop.step, loop.epoch, loop.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    if stream:  # one position (and epoch) per rank
        loop.epoch, loop.position = ckpt["epoch"][rank], ckpt["position"][rank]
    gen.set_state(ckpt["gen"][rank])  # same world size: checked with the config
    torch.set_rng_state(ckpt["torch_rng"])
    cuda_rngs = ckpt.get("cuda_rng")  # one per rank; an older checkpoint has none, a CPU run's are None
    if cuda_rngs and cuda_rngs[rank] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rngs[rank], device)
    loop.loss_sum.fill_(ckpt["loss_window"][0])
    loop.n_acc, loop.n_steps = ckpt["loss_window"][1:]


def start_state(args, ckpt_path, ckpt, model, ema, opt, rank, stream, device):
    """(noise generator, loop progress): fresh from --seed, or restored from the checkpoint -- weights,
    optimizer, data position, RNG streams -- in that order, so a restored stream is never seeded over."""
    gen = torch.Generator(device).manual_seed(args.seed * 1000 + rank)  # noise, t and condition dropout
    loop = Progress(loss_sum=torch.zeros((), device=device), position=None if stream else 0)
    if ckpt is not None:
        restore(ckpt, model, ema, opt, gen, loop, rank, stream, device)
        loop.last_ckpt = ckpt_path
    return gen, loop


def save_checkpoint(run_dir, model, ema, opt, gen, loop, args, facts, rank, world, stream, device):
    """Gather every rank's noise stream, CUDA RNG state and data position, write ckpt-STEP.pt from rank 0 and
    keep the newest --keep. -> its path"""
    path = os.path.join(run_dir, f"ckpt-{loop.step:07d}.pt")
    gens, cuda_rngs, places = [gen.get_state()], [cuda_rng_state(device)], [(loop.epoch, loop.position)]
    if world > 1:
        gens, cuda_rngs, places = [None] * world, [None] * world, [None] * world
        dist.all_gather_object(gens, gen.get_state())
        dist.all_gather_object(cuda_rngs, cuda_rng_state(device))
        dist.all_gather_object(places, (loop.epoch, loop.position))
    if rank == 0:
        state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=loop.step,
                     epoch=[p[0] for p in places] if stream else loop.epoch,
                     position=[p[1] for p in places] if stream else loop.position, gen=gens,
                     torch_rng=torch.get_rng_state(), cuda_rng=cuda_rngs,
                     loss_window=(loop.loss_sum.item(), loop.n_acc, loop.n_steps), args=vars(args),
                     facts=dataclasses.asdict(facts), config_version=CONFIG_VERSION)
        write_checkpoint(path, state,
                         advice=f"the last good checkpoint is {loop.last_ckpt or 'none yet'}: free "
                         f"space, then continue with --resume {run_dir}")
        for f in [f for f in checkpoints_in(run_dir) if f != path][args.keep - 1 :]:
            os.remove(f)
    return path


#################################################################################
#                      Across ranks: the log line and checks                    #
#################################################################################


def all_mean(x, world):
    """x averaged over ranks, in place."""
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def log_record(loop, gnorm, dataset, args, world):
    """The log line of the steps since the last one (the loss averaged over them and over ranks), then a new
    window."""
    mean_loss = all_mean(loop.loss_sum / max(loop.n_acc, 1), world).item() if loop.n_acc else float("nan")
    rec = dict(step=loop.step, loss=mean_loss, lr=lr_at(loop.step - 1, args), grad_norm=gnorm.item(),
               img_per_s=loop.n_steps * args.batch / (time.time() - loop.t0), epoch=loop.epoch,
               skipped_steps=loop.bad_total, **data_events(dataset, world, args))
    loop.loss_sum.zero_()
    loop.n_acc, loop.n_steps, loop.t0 = 0, 0, time.time()
    return rec


def check_replicas(model, world, device, log, step):
    """DDP must keep the replicas identical; check it rather than trust it, and log the answer (rank 0:
    `log`)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])  # every rank decides alike: none hangs
    write_log(dict(step=step, replicas_identical=same), log)
    if not same:
        raise RuntimeError("model replicas diverged across ranks")


def finish_distributed(world):
    """Leave the process group together (a no-op in one process)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


#################################################################################
#                                 Training loop                                 #
#################################################################################


def setup(args):
    """Processes, seeds, precision: (rank, world, device, bf16). The seed gives every rank the same initial
    weights."""
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
    return rank, world, device, use_bf16(args.precision, device)


def build(args, facts, encoder, init, rank, device):
    """The model (fresh, or the weights of `init`, what --init-from names, for a new run), its EMA, the
    autoencoder and the optimizer."""
    model = make_model(args, facts).to(device)
    if args.grad_ckpt:
        checkpoint_blocks(model)
    if encoder is not None and args.text_null == "empty":
        model.y_embed.set_empty(*encoder.encode([""]))
    if init is not None:
        init_from(model, args.init_from, rank, init)
        # a resolution transfer: say what adapts to the new grid
        if rank == 0 and facts.res != facts.base_res:
            print(f"--init-from at {facts.res} px: positional embedding `{args.pos_mode}` from the "
                  f"{facts.base_res} px base grid, noise shift alpha {make_diffusion(args, facts).alpha:.3g} "
                  f"(--res-shift {args.res_shift})")
    ema = make_model(args, facts).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    try:  # the latent scale (and shift) the data was made with: sampling decodes with the same ones
        vae = make_autoencoder(facts).to(device)
    except (OSError, ValueError, ImportError) as e:  # no such folder or hub name, no network, no diffusers
        hub = Autoencoder.SD.get(facts.vae)
        where = (f"it is downloaded from the Hugging Face hub ({hub}) on first use and then cached; connect "
                 "once (or set HF_HOME to a copy)" if hub else "give a folder with a diffusers AutoencoderKL")
        if args.dataset == "latents":  # the cache chose it, and its latents need it for every sample grid
            raise SystemExit(f"the latent cache {args.data_path} was made with --vae {facts.vae}: could not "
                             f"load that autoencoder ({e}); {where}") from None
        raise SystemExit(f"{said(args, 'vae')}: could not load the autoencoder ({e}); {where}, or train in "
                         "pixel space with --vae none (as --recipe small does)") from None
    opt = make_optimizer(model.parameters(), args, fused=device.type == "cuda")
    return model, ema, vae, opt


def main(argv=None):
    # ---- setup: config, processes, seeds, precision; a --resume checkpoint is read first, to fail before any
    # work ---
    args = get_args(argv, description=__doc__)
    validate(args)
    rank, world, device, bf16 = setup(args)
    started = time.time()
    ckpt_path, ckpt = resume_point(args, rank)
    init = read_init(args.init_from) if args.init_from and ckpt is None else None  # a new run's weights

    # ---- data, its caption features, and what the sources tell (the run's facts)
    # -----------------------------------
    dataset = open_dataset(args, progress=rank == 0)
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    local_batch = args.batch // (world * args.grad_accum)  # one step = --grad-accum micro-batches per rank
    if not stream:  # say it now, not after a run folder was made for a run that cannot take a step
        epoch_indices(len(dataset), 0, args.seed, rank, world, local_batch)
    encoder, text_cache = text_features(dataset, args, device, rank, world)
    facts = learn_facts(args, dataset, encoder, ckpt, world, init)
    refuse_other_config(args, facts, ckpt_path, ckpt)
    check_resume(args, ckpt_path, ckpt, rank)

    # ---- model, EMA, autoencoder, optimizer, and then the run folder (a failure above leaves none behind)
    # ----------
    model, ema, vae, opt = build(args, facts, encoder, init, rank, device)
    del init  # its weights are in the model now
    run_dir, lock = run_folder(args, ckpt_path, ckpt, rank, world, started)
    preempt = None
    try:  # however the run ends, the folder is free again and Ctrl-C gets its usual meaning back
        gen, loop = start_state(args, ckpt_path, ckpt, model, ema, opt, rank, stream, device)
        if rank == 0:
            print(f"model {args.arch} {args.model} cond={args.cond}: {count_params(model) / 1e6:.2f} M "
                  "parameters")
            print(json.dumps(dict(vars(args), facts=dataclasses.asdict(facts))))
        diffusion = make_diffusion(args, facts)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        if args.compile:  # compile the DDP-wrapped module so DDP's bucketing sees the compiled graph
            net = torch.compile(net)

        # ---- training loop
        # --------------------------------------------------------------------------------------------
        log, bar = None, None
        if rank == 0:
            from tqdm import tqdm

            log = open(os.path.join(run_dir, "log.jsonl"), "a")
            bar = tqdm(total=args.steps, initial=loop.step, desc="train", dynamic_ncols=True)
        data = batches(dataset, args, rank, world, local_batch, loop.epoch, loop.position)
        latent, preempt = getattr(dataset, "is_latent", False), Preemption()
        model.train()
        loop.t0 = time.time()
        while loop.step < args.steps:
            micro = []
            for _ in range(args.grad_accum):
                loop.epoch, loop.position, batch = next(data)
                micro.append(model_inputs(batch, vae, latent, text_cache, encoder, gen, device))
            loss, gnorm, updated = train_step(net, model, ema, opt, diffusion, micro, gen, loop.step, args,
                                              bf16)
            count_step(loop, loss, updated, args, rank)
            loop.step, loop.n_steps = loop.step + 1, loop.n_steps + 1
            if bar is not None:
                bar.update(1)
            # the log line, a checkpoint, a preemption, a sample grid
            if loop.step % args.log_every == 0 or loop.step == args.steps:
                write_log(log_record(loop, gnorm, dataset, args, world), log, bar)
            stopping = preempt.requested(world, device)
            if loop.step % args.ckpt_every == 0 or loop.step == args.steps or stopping:
                loop.last_ckpt = save_checkpoint(run_dir, model, ema, opt, gen, loop, args, facts, rank,
                                                 world, stream, device)
            if stopping:
                stop_preempted(preempt, loop, run_dir, bar, log, world)
            if (args.sample_every > 0
                and loop.step % args.sample_every == 0
                and rank == 0
                and loop.step < args.steps):
                write_grid(ema, vae, args, facts, os.path.join(run_dir, f"samples-{loop.step:07d}.png"),
                           device, grid_prompts(args, facts, dataset, batch))
        preempt.restore()

        # ---- finish: replica check, a sample grid, and on shapes the checker's verdict
        # --------------------------------
        if bar is not None:
            bar.close()
        if world > 1:
            check_replicas(model, world, device, log, loop.step)
        if rank == 0:
            if args.sample_every >= 0:
                write_grid(ema, vae, args, facts, os.path.join(run_dir, "samples.png"), device,
                           grid_prompts(args, facts, dataset, batch))
            print(f"run folder: {run_dir}")
            if facts.source_dataset == "shapes" and args.eval_per_class > 0:
                write_eval(ema, vae, args, facts, os.path.join(run_dir, "eval.json"), device, loop.step)
            log.close()
    finally:
        if preempt is not None:
            preempt.restore()
        if lock is not None:
            lock.release()
    finish_distributed(world)
    return run_dir


def write_log(rec, log, bar=None):
    """A log line to log.jsonl, and its loss to the progress bar if there is one (rank 0; `log` None
    elsewhere)."""
    if log is not None:
        try:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        except OSError as e:
            raise WriteFailed(f"{write_failure(log.name, e)}. The last checkpoint holds the run: free space, "
                              f"then --resume {os.path.dirname(log.name)}") from None
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")


def stop_preempted(preempt, loop, run_dir, bar, log, world):
    """After a preemption's checkpoint: say how to continue, leave the process group, exit with PREEMPTED
    (INTERRUPTED after Ctrl-C)."""
    interrupted = preempt.signal == signal.SIGINT
    if bar is not None:
        bar.close()
        what = "stopped by Ctrl-C" if interrupted else f"preempted by signal {preempt.signal}"
        print(f"{what} at step {loop.step}: wrote {loop.last_ckpt}; continue with --resume {run_dir}")
        log.close()
    finish_distributed(world)
    raise SystemExit(INTERRUPTED if interrupted else PREEMPTED)


def grid_prompts(args, facts, dataset, batch, rows=4):
    """A text model's rows of a training grid: None for a shapes model (sample.class_grid asks with the shapes
    captions of its classes), else the first distinct captions of the data (of its last batch where the data
    cannot list them: a stream, a latent cache)."""
    if args.cond_type != "text" or facts.source_dataset == "shapes":
        return None
    try:
        captions = dataset.captions()
    except (AttributeError, NotImplementedError):  # a stream, a latent cache: the last batch's
        captions = batch[3]
    return list(dict.fromkeys(captions))[:rows]


def write_grid(ema, vae, args, facts, path, device, prompts=None):
    """A sample grid of the EMA model (sample.class_grid): a row per class or prompt, the flip off and on."""
    class_grid(ema, vae, args, facts, path, device, run_sampling(args), prompts=prompts)


def write_eval(ema, vae, args, facts, path, device, step):
    """The shapes checker's verdict on EMA samples (sample.checker_verdict, at the run's evaluation settings),
    printed and written to `path` (eval.json)."""
    res = checker_verdict(ema, vae, args, facts, args.eval_per_class, device, run_sampling(args))
    print("checker on EMA samples: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    record = dict(res, cfg_scale=args.cfg_scale, per_class=args.eval_per_class, step=step)
    atomic_write(path, lambda f: f.write(json.dumps(record).encode()))


if __name__ == "__main__":
    main()
