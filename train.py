"""
Train a diffusion transformer. One loop for every setting.

    python train.py                                  # small model on the embedded shapes dataset (CPU)
    torchrun --nproc_per_node=8 train.py --dataset imagenet --res 256   # ImageNet from $IMAGENET_DIR,
                                                     # else data/imagenet/train, else --data-path

DDP under torchrun (NCCL on GPU, gloo on CPU; the *local* rank picks the GPU), bf16 autocast + TF32 on GPU,
fused attention through scaled_dot_product_attention, AdamW with warmup, gradient clipping, EMA, gradient
accumulation (--grad-accum: the global --batch whatever the GPUs) and activation checkpointing (--grad-ckpt).
A flag comes from the command line, else the recipes (--dataset shapes starts with its own), else its default,
the paper's ImageNet setting (config.py; --print-config shows each value's source).

The run folder's life -- numbering, one owner, exact resume, checkpoints, the log, stopping on a signal --
is run.py's; this file calls it at a few named places (open_run, run.start, run.log, run.save, run.stop).
"""
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from build import (
    TrainedModel,
    check_sources,
    data_root,
    load_autoencoder,
    make_diffusion,
    make_model,
    open_dataset,
    read_source_facts,
)
from checkpoint import atomic_write, init_from, read_init
from checks import check_output
from conditioning import drop_flags
from config import get_args, run_sampling, validate
from data import image_health
from loader import Inputs, batches, epoch_indices, model_inputs
from model import count_params
from run import check_resume, finish_distributed, open_run, read_resume, setup_process
from sample import GridLayout, checker_verdict, class_grid
from text import text_features

#################################################################################
#                     Learning rate, EMA, optimizer                             #
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
    first step (DiT, PixArt-alpha, mDT-v2, which copy the weights into the EMA at the start, as build_state
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
def update_ema(ema, model, decay, finite=None):
    """ema <- decay * ema + (1 - decay) * model, every parameter in one fused call; `finite` (a bool on the
    device) False leaves the EMA as it is, without reading the flag on the host."""
    params = list(ema.parameters())
    weight = 1.0 - decay if finite is None else [(1.0 - decay) * finite.float()] * len(params)
    torch._foreach_lerp_(params, [p.detach() for p in model.parameters()], weight)


def checkpoint_blocks(model):
    """--grad-ckpt: activation checkpointing of every transformer block. Each block's forward is wrapped so
    that only its inputs are kept and its activations are recomputed in the backward pass: less memory for
    about one more forward. The weights and their names are untouched, so checkpoints and the EMA are the same
    either way."""
    if not hasattr(model, "blocks"):
        raise SystemExit("--grad-ckpt wraps model.blocks: this architecture has none (use --arch dit or mdt)")
    def recomputed(forward):
        return lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)
    for block in model.blocks:
        block.forward = recomputed(block.forward)


#################################################################################
#                          One optimisation step                                #
#################################################################################


@dataclass
class TrainState:
    """What a step changes: the model (and `net`, what runs its forward: the model, or its DDP / compiled
    wrapper), its EMA, the optimizer, and the noise generator; and how it computes (the objective, bf16)."""

    net: torch.nn.Module
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    diffusion: object
    gen: torch.Generator
    bf16: bool = False


def optimizer_step(opt, finite):
    """The update, skipped where the gradient is not finite. A fused optimizer takes the flag on the device,
    as torch's GradScaler passes it (`found_inf`), so the step never waits for the device; any other reads it
    here, which costs nothing on a CPU and one host sync per step on a GPU (only --optimizer adan, which has
    no fused kernel, meets that)."""
    if opt.defaults.get("fused"):
        # torch's own protocol between GradScaler and the fused optimizers; tests/test_formulas.py holds it
        opt.found_inf = (~finite).float()
        opt.step()
    elif finite:
        opt.step()


def train_step(state, micro_batches, step, args):
    """One optimisation step on this rank's micro-batches [(x0, y, ctrl), ...] (one, or --grad-accum of them):
    for each, condition dropout (for guidance) and the mean loss under bf16 autocast (or fp32), scaled by 1 /
    their number and backpropagated, so the gradients add up to those of the mean loss of the whole batch;
    then this step's learning rate, gradient clipping, the optimizer, the EMA. Under DDP only the last
    micro-batch's backward all-reduces. Noise, noise levels and dropout come from state.gen, drawn micro-batch
    by micro-batch. A non-finite gradient norm leaves the weights as they were (under DDP the gradients are
    averaged first, so every rank skips alike), and the EMA as it was.
    -> (loss averaged over the micro-batches, grad norm, finite), all on the device: no host sync."""
    num_micro = len(micro_batches)
    for group in state.opt.param_groups:
        group["lr"] = lr_at(step, args)
    state.opt.zero_grad(set_to_none=True)
    total = 0.0
    for i, (x0, y, ctrl) in enumerate(micro_batches):
        sem_drop, ctrl_drop = drop_flags(x0.shape[0], args.p_drop_sem, args.p_drop_ctrl, state.gen, x0.device)
        # DDP: all-reduce once, with the last backward
        sync = i == num_micro - 1 or not hasattr(state.net, "no_sync")
        with nullcontext() if sync else state.net.no_sync():
            with torch.autocast(x0.device.type, dtype=torch.bfloat16) if state.bf16 else nullcontext():
                loss = state.diffusion.loss(state.net, x0, state.gen, y=y, ctrl=ctrl, ctrl_drop=ctrl_drop,
                                            sem_drop=sem_drop).mean()
            (loss / num_micro).backward()
        total = total + loss.detach() / num_micro
    gnorm = torch.nn.utils.clip_grad_norm_(state.model.parameters(),
                                           args.clip if args.clip > 0 else float("inf"))
    finite = torch.isfinite(gnorm)
    optimizer_step(state.opt, finite)
    update_ema(state.ema, state.model, ema_decay(step, args), finite)
    return total, gnorm, finite


#################################################################################
#                     The loop's progress and its log line                      #
#################################################################################


@dataclass
class Progress:
    """Where the loop stands; a checkpoint saves it with the weights. The counters of the current log window
    stay on the device, so that a step never waits for it: they are read once per log line."""

    loss_sum: torch.Tensor  # losses of the finite steps since the last log line
    n_acc: torch.Tensor  # finite steps in loss_sum
    bad: torch.Tensor  # non-finite (skipped) steps since the last log line
    bad_run: torch.Tensor  # non-finite steps in a row, now
    longest_bad_run: torch.Tensor  # the longest such run since the last log line
    bad_total: int = 0  # skipped steps in all, counted at the log lines
    step: int = 0
    epoch: int = 0
    position: object = 0  # batches into the epoch; a stream's: (samples drawn per worker, the next worker)
    streamed: bool = False
    n_steps: int = 0  # steps since the last log line, for images/s
    t0: float = 0.0  # when the log window began

    @classmethod
    def fresh(cls, device, streamed):
        zero = lambda: torch.zeros((), device=device)
        return cls(zero(), zero(), zero(), zero(), zero(), streamed=streamed,
                   position=None if streamed else 0)

    def count(self, loss, finite):
        """Add a step to the log window, on the device."""
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.n_acc += finite
        self.bad += ~finite
        self.bad_run = (self.bad_run + 1) * ~finite
        self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_run)
        self.n_steps += 1


def log_record(progress, gnorm, args, run, dataset):
    """The log line of the steps since the last one (the loss averaged over them and over ranks), then a new
    window. Every device value of the window is read here, in one transfer. -> (the line, the longest run of
    non-finite steps in the window)"""
    world = run.proc.world
    mean = progress.loss_sum / progress.n_acc.clamp(min=1)
    if world > 1:
        torch.distributed.all_reduce(mean)
        mean /= world
    window = [mean, progress.n_acc, progress.bad, progress.bad_run, progress.longest_bad_run, gnorm.float()]
    mean, n_acc, bad, bad_run, longest, gnorm = torch.stack(window).tolist()
    progress.bad_total += int(bad)
    rec = dict(step=progress.step, loss=mean if n_acc else float("nan"), lr=lr_at(progress.step - 1, args),
               grad_norm=gnorm, img_per_s=progress.n_steps * args.batch / (time.time() - progress.t0),
               epoch=progress.epoch, skipped_steps=progress.bad_total,
               **image_health(dataset, args.max_skip_rate, world))
    for counter in (progress.loss_sum, progress.n_acc, progress.bad, progress.longest_bad_run):
        counter.zero_()
    progress.n_steps, progress.t0 = 0, time.time()
    if bad and run.proc.rank == 0:
        print(f"step {progress.step}: {int(bad)} step(s) with a non-finite loss or gradient since the last "
              f"log line, each left the weights as they were ({int(bad_run)} in a row now, "
              f"{progress.bad_total} in all)", flush=True)
    return rec, int(longest)


#################################################################################
#                                  Setup                                        #
#################################################################################


def build_state(args, facts, encoder, init, proc):
    """TrainState: the model (fresh, or the weights of `init`, what --init-from names, for a new run), its EMA
    (a copy of the model), the optimizer, the objective and the noise generator; and the autoencoder."""
    model = make_model(args, facts).to(proc.device)
    if args.grad_ckpt:
        checkpoint_blocks(model)
    if encoder is not None and args.text_null == "empty":
        model.y_embed.set_empty(*encoder.encode([""]))
    diffusion = make_diffusion(args, facts)
    if init is not None:
        init_from(model, args.init_from, proc.rank, init)
        if proc.rank == 0 and facts.res != facts.base_res:  # a resolution transfer: what adapts to the grid
            print(f"--init-from at {facts.res} px: positional embedding `{args.pos_mode}` from the "
                  f"{facts.base_res} px base grid, noise shift alpha {diffusion.alpha:.3g} (--res-shift "
                  f"{args.res_shift})")
    ema = make_model(args, facts).to(proc.device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    vae = load_autoencoder(args, facts).to(proc.device)
    opt = make_optimizer(model.parameters(), args, fused=proc.device.type == "cuda")
    net = model
    if proc.world > 1:
        net = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    if args.compile:  # compile the DDP-wrapped module so DDP's bucketing sees the compiled graph
        net = torch.compile(net)
    return TrainState(net, model, ema, opt, diffusion, noise_generator(args, proc), proc.bf16), vae


def noise_generator(args, proc):
    """The stream of noise, noise levels and condition dropout: one per rank, on its device."""
    return torch.Generator(proc.device).manual_seed(args.seed * 1000 + proc.rank)


#################################################################################
#                                 Training loop                                 #
#################################################################################


class Data(NamedTuple):
    """The training data: the dataset, its endless batches, how a batch becomes the model's inputs, and the
    autoencoder that decodes the samples of a grid."""

    dataset: object
    batches: object
    inputs: Inputs
    vae: object


def main(argv=None):
    # ---- setup: flags, processes; a --resume checkpoint is read first, to fail before any work
    args = get_args(argv, description=__doc__)
    validate(args)
    check_sources(args)  # build.py: the data, checkpoints and packages the flags name are on this machine
    if args.dataset != "shapes":  # run folders inside the data would be read as data (a class, a shard)
        data = data_root(args)
        check_output(args.out, "folder", flag="--out", datasets={"--data-path": data})
    proc = setup_process(args)  # run.py, from here to run.close(): the job's processes and the run folder
    resumed = read_resume(args, proc.rank)
    init = read_init(args.init_from) if args.init_from and resumed is None else None  # a new run's weights

    # ---- data, its caption features, and what the sources tell (the run's facts)
    dataset = open_dataset(args, progress=proc.rank == 0)
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    local_batch = args.batch // (proc.world * args.grad_accum)  # a step: --grad-accum micro-batches per rank
    if not streamed:  # say it now, not after a run folder was made for a run that cannot take a step
        epoch_indices(len(dataset), 0, args.seed, proc, local_batch)
    encoder, text_cache = text_features(dataset, args, proc.device, proc.rank, proc.world)
    facts = read_source_facts(args, dataset, encoder, resumed and resumed.ckpt, proc, init)
    check_resume(args, facts, resumed, lr_at, proc.rank)

    # ---- model, EMA, optimizer, autoencoder; then the run folder (a failure above leaves none behind)
    state, vae = build_state(args, facts, encoder, init, proc)
    del init  # its weights are in the model now
    # a latent cache drew its own posterior samples: nothing to encode, but grids still decode with `vae`
    inputs = Inputs(None if getattr(dataset, "is_latent", False) else vae, text_cache, encoder)
    run = open_run(args, resumed, proc)
    try:  # however the run ends, the folder is free again and Ctrl-C gets its usual meaning back
        progress = Progress.fresh(proc.device, streamed)
        run.start(state, progress)
        if proc.rank == 0:
            print(f"model {args.arch} {args.model} cond={args.cond}: {count_params(state.model) / 1e6:.2f} M "
                  "parameters")
            print(json.dumps(dict(vars(args), facts=dataclasses.asdict(facts))))
        data = Data(dataset, batches(dataset, args, proc, local_batch, progress), inputs, vae)
        last_batch = train(state, progress, run, data, args, facts)
        run.check_replicas(state.model, progress.step)
        if proc.rank == 0:
            trained = TrainedModel(state.ema, vae, args, facts, run.dir, progress.step)
            finish(trained, grid_prompts(args, facts, dataset, last_batch), run, args)
    finally:
        run.close()
    finish_distributed(proc.world)
    return run.dir


def train(state, progress, run, data, args, facts):
    """Steps until --steps: a log line every --log-every steps, a checkpoint every --ckpt-every (and at the
    end, and when a signal asks to stop), a sample grid every --sample-every. The log and checkpoint steps
    are the only ones that wait for the device. -> the last batch (a text model's grid may take its
    captions)"""
    bar = None
    if run.proc.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=progress.step, desc="train", dynamic_ncols=True)
    state.model.train()
    progress.t0 = time.time()
    while progress.step < args.steps:
        micro = []
        for _ in range(args.grad_accum):
            progress.epoch, progress.position, batch = next(data.batches)
            micro.append(model_inputs(batch, data.inputs, state.gen, run.proc.device))
        loss, gnorm, finite = train_step(state, micro, progress.step, args)
        progress.count(loss, finite)
        progress.step += 1
        step = progress.step
        if bar is not None:
            bar.update(1)
        log_step = step % args.log_every == 0 or step == args.steps
        ckpt_step = step % args.ckpt_every == 0 or step == args.steps
        if log_step:
            record, longest_bad_run = log_record(progress, gnorm, args, run, data.dataset)
            run.log(record)
            if longest_bad_run >= args.max_bad_steps:
                run.stop_diverged(longest_bad_run, step, args)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
        stopping = run.stop_requested(at_sync_point=log_step or ckpt_step)
        if ckpt_step or stopping:
            run.save(state, progress, args, facts)
        if stopping:
            run.stop(step, bar)
        grid_step = args.sample_every > 0 and step % args.sample_every == 0 and step < args.steps
        if grid_step and run.proc.rank == 0:
            write_grid(TrainedModel(state.ema, data.vae, args, facts, run.dir, step),
                       os.path.join(run.dir, f"samples-{step:07d}.png"),
                       grid_prompts(args, facts, data.dataset, batch))
    if bar is not None:
        bar.close()
    run.preemption.restore()  # what follows (a grid, the checker) is no step: Ctrl-C stops it as usual
    return batch


#################################################################################
#                      At the end: a sample grid and the checker                #
#################################################################################


def finish(trained, prompts, run, args):
    """Rank 0, after the last step: a sample grid of the EMA model, and on shapes the checker's verdict."""
    if args.sample_every >= 0:
        write_grid(trained, os.path.join(run.dir, "samples.png"), prompts)
    print(f"run folder: {run.dir}")
    if trained.facts.source_dataset == "shapes" and args.eval_per_class > 0:
        write_eval(trained, os.path.join(run.dir, "eval.json"), args)


def grid_prompts(args, facts, dataset, batch=None, rows=4):
    """A text model's rows of a grid: None for a shapes model (sample.class_grid asks with the shapes
    captions of its classes), else the first distinct captions of the data (of its last batch where the data
    cannot list them: a stream, a latent cache)."""
    if args.cond_type != "text" or facts.source_dataset == "shapes":
        return None
    try:
        captions = dataset.captions()
    except (AttributeError, NotImplementedError):  # a stream, a latent cache: the last batch's
        captions = batch[3]
    return list(dict.fromkeys(captions))[:rows]


def write_grid(trained, path, prompts=None):
    """A sample grid of the EMA model (sample.class_grid): a row per class or prompt, the flip off and on."""
    class_grid(trained, run_sampling(trained.args), path, GridLayout(prompts=prompts))


def write_eval(trained, path, args):
    """The shapes checker's verdict on EMA samples (sample.checker_verdict, at the run's evaluation settings),
    printed and written to `path` (eval.json)."""
    res = checker_verdict(trained, args.eval_per_class, run_sampling(args))
    print("checker on EMA samples: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    record = dict(res, cfg_scale=args.cfg_scale, per_class=args.eval_per_class, step=trained.step)
    atomic_write(path, lambda f: f.write(json.dumps(record).encode()))


if __name__ == "__main__":
    main()
