"""
Benchmark the real training step: images/s per device, achieved TFLOP/s, MFU, peak memory, the largest batch
that fits, and the speed-up of the fast path over a plain reference path measured side by side in the same
run; optionally the sampling throughput. nanoGPT's bench.py in spirit: train.py's loop stripped down to what
costs time.

    python -m experiments.bench                                  # the shapes recipe: XS/4, 24 px, batch 64
    python -m experiments.bench --precision bf16 --no-reference  # the same with bf16 autocast (on CPU too)
    python -m experiments.bench --dataset imagenet --model XL/2 --res 256 --batch 32 --steps 20 --warmup 5
    python -m experiments.bench --dataset imagenet --model XL/2 --res 512 --batch 16 --grad-ckpt \
        --find-max-batch
    python -m experiments.bench --dataset imagenet --model XL/2 --res 256 --batch 32 --no-reference \
        --sample-batch 64
    python -m experiments.bench --cond-type text --text-encode       # + the text encoder's share of a step

The timed step is train.train_step itself, the step train.main takes: condition dropout, the diffusion loss
under autocast, backward, gradient clipping, AdamW, the EMA update. NOT timed: data loading, the autoencoder
and the text encoder. The latents (and prompt features) are synthetic tensors of the right shape already on
the device (the latent- and text-cache path), so the figures are an upper bound for training from caches and
say nothing about the VAE. One process on one device: no DDP gradient all-reduce. MFU divides by a measured
matmul peak (matmul_tflops, seconds long on any device): bf16 on GPU; on CPU the dtype the run computes in,
fp32 unless --precision bf16. Any train.py flag (--cond, --cond-type, --arch, --class-tokens, --vae,
--precision, ...) passes through to config.get_args; --batch is the batch on this one device (the presets'
--batch is a global batch: give one for imagenet).

Two paths over the same model and batch, one after the other:
    fast       bf16 autocast where train.py uses it (GPU; --precision bf16 forces it), PyTorch's SDPA dispatch
               (flash attention on GPU; --attn picks one kernel), torch.compile (--compile: whole model or per
               block; on by default on GPU, off on CPU), fused AdamW on GPU, no host sync inside the step;
               --grad-ckpt recomputes each block's activations in the backward pass to save memory
    reference  fp32 (TF32 matmuls on GPU, as train.py runs --precision fp32 there; --ref-fp32 for strict
               fp32), the math SDPA backend (attention as plain matmuls and a softmax), no compile, for-each
               AdamW
"""
import argparse
import copy
import gc
import json
import os
import platform
import resource
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from config import Facts, make_diffusion, make_model, run_sampling, sampling_control, use_bf16, validate
from config import get_args as train_args
from latents import latent_geometry
from shapes import ShapesDataset
from text import load_text_encoder
from train import checkpoint_blocks  # --grad-ckpt: the same wrapping as train.py's

ATTN = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
COMPILE = ("auto", "off", "model", "blocks")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), matched in this order
# against torch.cuda.get_device_name(): "NVIDIA H100 PCIe" must be tested before the plain "H100" of the SXM
# part.
DATASHEET_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
FLOP_CONVENTION = ("torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-accumulate; matmuls, "
                   "convolutions and attention only (elementwise ops, norms, softmax, optimizer and EMA not "
                   "counted); forward + backward, attention counted as math-backend matmuls (no recompute)")
PEAK_TRIAL_S = 0.5    # one timed trial of the peak matmul: long against timer noise, short on a slow CPU
PEAK_BUDGET_S = 10.0  # no trial of one dtype's probe starts after this many seconds (sizing included)


def get_args(argv=None):
    """(bench options, train.py's args, the run's facts as train.py would learn them from the data). Flags
    this parser does not know go to config.get_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # never swallow a train.py flag by its prefix
    a = p.add_argument
    a("--steps", type=int, default=20, help="timed optimizer steps per path")
    a("--warmup", type=int, default=5, help="untimed steps first (allocator, cuDNN/kernel choice, "
      "compilation)")
    a("--compile", default="auto", choices=COMPILE, help="fast path: torch.compile the whole model, each "
      "block, or not at all; auto = model on GPU, off on CPU (where compiling takes minutes)")
    a("--attn", default="default", choices=tuple(ATTN), help="fast path SDPA backend; default = PyTorch's "
      "dispatch (flash attention on GPU when the inputs allow it)")
    a("--grad-ckpt", action="store_true", help="fast path: activation checkpointing of every block (less "
      "memory, one more forward of each block in the backward pass)")
    a("--no-reference", dest="reference", action="store_false", help="skip the reference path")
    a("--ref-fp32", action="store_true", help="reference matmuls in strict fp32 on GPU (default TF32, as "
      "train.py)")
    a("--train-syncs", action="store_true", help="add the two host reads train.main makes every step (the "
      "finite-gradient check and the preemption flag) to both paths, to measure what they cost")
    a("--find-max-batch", action="store_true", help="GPU: search the largest batch the fast path fits in "
      "memory")
    a("--max-batch-limit", type=int, default=8192, help="stop the --find-max-batch search here")
    a("--sample-batch", type=int, default=0, help="also time sampling at this batch (0 = skip)")
    a("--text-encode", action="store_true", help="--cond-type text: also time the frozen text encoder on a "
      "batch of captions, what a caption set over --text-cache-gb costs each step, and its FLOPs")
    a("--peak-size", type=int, default=0, help="largest matrix size of the peak-FLOPs matmul (0 = 8192 on "
      "GPU, 2048 on CPU); the probe stops doubling from 128 where one matmul would take over 0.5 s")
    a("--json", default=None, help="append the result line to this file (default: print it as the last line)")
    bench, rest = p.parse_known_args(argv)
    args = train_args(rest)
    # the benchmark reads no images: validate everything else, so that a bad model / res / vae fails as in
    # train.py
    validate(argparse.Namespace(**{**vars(args), "dataset": "shapes", "data_path": None}))
    encoder = None
    if args.cond_type == "text":  # the model's text input size, as train.main reads it off the encoder
        encoder = load_text_encoder(args.text_encoder, "cpu", args.text_max_length)
    facts = Facts(res=args.res, vae=args.vae, base_res=args.base_res or args.res, source_dataset=args.dataset,
                  num_classes=ShapesDataset.num_classes if args.dataset == "shapes" else 1000,
                  text_dim=encoder and encoder.dim, text_len=encoder and encoder.max_length)
    for name in ("steps", "max_batch_limit"):
        if getattr(bench, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(bench, name)}")
    if bench.warmup < 0 or bench.sample_batch < 0 or bench.peak_size < 0:
        raise SystemExit("--warmup, --sample-batch and --peak-size must be >= 0")
    return bench, args, facts


#################################################################################
#                               The two paths                                   #
#################################################################################

@dataclass
class Path:
    """How a step runs: the numerics and the speed options. The model and the batch are the same for every
    path."""
    name: str
    bf16: bool = False         # bf16 autocast around the forward (the backward follows the forward's dtypes)
    attn: str = "default"      # SDPA backend (a key of ATTN)
    compile: str = "off"       # off | model | blocks
    fused_adam: bool = False   # one fused AdamW kernel (GPU) instead of for-each kernels
    tf32: bool = False         # fp32 matmuls and convolutions on TF32 tensor cores (GPU)
    grad_ckpt: bool = False    # recompute block activations in the backward pass
    train_syncs: bool = False  # the host reads train.main makes per step


def resolve_compile(mode, device):
    """--compile auto: the whole model on GPU; off on CPU, where compiling takes minutes (CI, quick runs)."""
    if mode == "auto":
        return "model" if device.type == "cuda" else "off"
    return mode


def fast_path(bench, args, device):
    cuda = device.type == "cuda"
    return Path("fast", bf16=use_bf16(args.precision, device), attn=bench.attn,
                compile=resolve_compile(bench.compile, device), fused_adam=cuda, tf32=cuda,
                grad_ckpt=bench.grad_ckpt, train_syncs=bench.train_syncs)


def reference_path(bench, device):
    return Path("reference", attn="math", tf32=device.type == "cuda" and not bench.ref_fp32,
                train_syncs=bench.train_syncs)


def describe(path):
    parts = ["bf16" if path.bf16 else ("fp32/tf32" if path.tf32 else "fp32"), f"sdpa {path.attn}",
             f"compile {path.compile}", "fused adamw" if path.fused_adam else "foreach adamw"]
    parts += (["grad-ckpt"] if path.grad_ckpt else []) + (["train syncs"] if path.train_syncs else [])
    return ", ".join(parts)


@contextmanager
def numerics(path):
    """TF32 and the SDPA backend for everything inside (forward and backward); restored on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = path.tf32
    try:
        with sdpa_kernel(ATTN[path.attn]) if ATTN[path.attn] is not None else nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


#################################################################################
#                 The training step: train.py's, on a synthetic batch           #
#################################################################################


def build(args, facts, device):
    """Model, EMA, optimizer state holder, diffusion and noise generator as train.main makes them (plain
    model)."""
    torch.manual_seed(args.seed)
    model = make_model(args, facts).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    return SimpleNamespace(model=model, net=model, ema=ema, opt=None, diffusion=make_diffusion(args, facts),
                           gen=torch.Generator(device).manual_seed(args.seed))


def prepare(state, path, args):
    """Apply a path's speed options to a freshly built state: checkpointing, compilation, the optimizer."""
    model = state.model
    if path.grad_ckpt:
        checkpoint_blocks(model)
    if path.compile == "model":
        state.net = torch.compile(model)
    # smaller graphs: compiles faster, and one block's graph serves all the others
    elif path.compile == "blocks":
        if not hasattr(model, "blocks"):
            raise SystemExit("--compile blocks compiles model.blocks: this architecture has none (use "
                             "--compile model)")
        for block in model.blocks:
            block.compile()
    state.opt = train.make_optimizer(model.parameters(), args, fused=path.fused_adam)
    return state


def semantic_batch(args, facts, batch, g):
    """Labels (B,), or for --cond-type text a cached prompt's (features (B, L, d), mask (B, L)) -- as
    train.main looks them up in its text cache, so the text encoder is not run either; prompt lengths vary, so
    padding is done."""
    if args.cond_type != "text":
        return torch.randint(0, facts.num_classes, (batch,), generator=g)
    L = facts.text_len
    valid = torch.randint(1, L + 1, (batch, 1), generator=g)
    return torch.randn(batch, L, facts.text_dim, generator=g), torch.arange(L)[None] < valid


def synthetic_batch(args, facts, batch, device, seed=0):
    """Latents (B, C, res/f, res/f), semantic input and control (B, S) of a training batch, on the device."""
    factor, channels = latent_geometry(facts.vae)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, channels, facts.res // factor, facts.res // factor, generator=g)
    y = semantic_batch(args, facts, batch, g)
    y = tuple(v.to(device) for v in y) if isinstance(y, tuple) else y.to(device)
    ctrl = sampling_control(facts).expand(batch, -1)
    return x0.to(device), y, ctrl.to(device)


def train_step(state, batch, step, args, path):
    """train.train_step, the step train.main takes, on this path's model and optimizer. It reads no device
    value on the host (unless path.train_syncs), so the CPU queues the next step while the GPU still runs this
    one."""
    loss, _, _ = train.train_step(state.net, state.model, state.ema, state.opt, state.diffusion, [batch],
                                  state.gen, step, args, path.bf16, skip_non_finite=path.train_syncs)
    if path.train_syncs:  # train.Preemption.requested on one process: a flag tensor copied in and read back
        bool(torch.tensor(0.0, device=loss.device).item())
    return loss


#################################################################################
#                         FLOPs, peaks, memory, syncs                           #
#################################################################################


def count_train_flops(args, facts, device, batch=2):
    """Model FLOPs of forward + backward per training image (FLOP_CONVENTION), counted over one training step
    of a model of its own (plain: no checkpointing, no compile; the optimizer and the EMA add no counted op).
    Counted in fp32 under the math SDPA backend, so attention is its matmuls once, without the score recompute
    of a fused backward: the count is the model's, not the kernels', which is what MFU divides by."""
    path = Path("flop count")
    state = prepare(build(args, facts, device), path, args)
    data = synthetic_batch(args, facts, batch, device)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        train_step(state, data, 0, args, path)
    return counter.get_total_flops() / batch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_dtypes(path, device):
    """The dtypes the peak probe times. GPU: bf16 (the MFU denominator) and fp32/TF32. CPU: only the one the
    run computes in, fp32 unless --precision bf16: a CPU without native bf16 (AVX2 only: no avx512_bf16 /
    amx_bf16 flag) emulates it at a fraction of its fp32 speed, and an fp32 run's MFU has nothing to do with
    that figure."""
    if device.type == "cuda":
        return torch.bfloat16, torch.float32
    return (torch.bfloat16,) if path.bf16 else (torch.float32,)


def matmul_tflops(device, dtype, n_max, trials=3, trial_s=PEAK_TRIAL_S, budget_s=PEAK_BUDGET_S, mm=torch.mm,
                  clock=time.perf_counter):
    """Achieved TFLOP/s of n x n x n matmuls in `dtype`, the best of `trials` timed trials of back-to-back
    matmuls: the practical peak of this device in this dtype (the best, because clocks and neighbours only
    ever slow it down).

    Bounded in time on any device: n doubles from 128 towards n_max only while one matmul of the next size (8x
    the work) is predicted to fit in one trial of `trial_s` seconds, each trial runs as many matmuls as fill
    it and ends early once it has taken `trial_s`, and no trial starts after `budget_s` (a fixed 2048^3 bf16
    probe sat for minutes on a CPU without native bf16, where one 1024^3 takes 2.5 s). `mm` and `clock` are
    seams for the tests. -> dict(tflops, n, iters, trials, seconds)"""
    start = clock()

    def timed(a, b, iters):
        """(matmuls run, seconds). The early end: on a shared CPU one small matmul can take 1000x its quiet
        time (an OpenMP thread waits for a descheduled sibling), so `iters` sized from one quiet call may run
        for minutes. On a GPU the clock reads enqueue time there, so it ends no later than it should."""
        synchronize(device)
        t0, k = clock(), 0
        while k < iters:
            mm(a, b)
            k += 1
            if clock() - t0 > trial_s:
                break
        synchronize(device)
        return k, clock() - t0

    n = min(128, n_max)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    # untimed: library start-up (cuBLAS handle, oneDNN kernels) would make 128^3 look slow and stop here
    mm(a, b)
    one = timed(a, b, 1)[1]
    while n < n_max and 8 * one <= trial_s:
        n = min(2 * n, n_max)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        one = timed(a, b, 1)[1]
    iters = max(1, min(1000, int(trial_s / one)))  # at most 1000: a small n on a GPU takes microseconds
    best, done = 0.0, 0
    while done < trials and (done == 0 or clock() - start < budget_s):
        k, dt = timed(a, b, iters)
        best = max(best, 2 * n**3 * k / dt / 1e12)
        done += 1
    return dict(tflops=best, n=n, iters=iters, trials=done, seconds=clock() - start)


def datasheet_tflops(device):
    """Dense bf16 datasheet peak of this GPU, or None (CPU, or a GPU not in DATASHEET_BF16_TFLOPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_TFLOPS if key in name), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    n = torch.get_num_threads()
    return f"CPU {name}, {n} thread{'s' if n > 1 else ''}"


def peak_memory_gib(device):
    """CUDA: the most memory tensors held since the last reset. CPU: the process's peak resident set size, a
    whole-process figure that only grows (Linux reports ru_maxrss in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_host_syncs(fn, device):
    """Synchronising CUDA calls made while fn runs (torch.cuda.set_sync_debug_mode); None on CPU, where every
    op is synchronous and the question does not arise."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def cpu_seconds():
    """(CPU seconds spent by all processes, by this one) so far; None off Linux. Over a timed window their
    difference is what other processes took from the cores, which on a shared CPU slows every op (OpenMP
    threads wait on a descheduled sibling) and explains a slow figure."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


#################################################################################
#                                Measurements                                   #
#################################################################################


def run_path(state, path, args, facts, bench, device, batch):
    """Warm up, then time `bench.steps` steps between two device synchronisations. -> dict of figures"""
    prepare(state, path, args)
    data = synthetic_batch(args, facts, batch, device)
    state.model.train()
    with numerics(path):
        for i in range(bench.warmup):
            train_step(state, data, i, args, path)
        syncs = count_host_syncs(lambda: train_step(state, data, bench.warmup, args, path), device)
        synchronize(device)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        for i in range(bench.steps):
            loss = train_step(state, data, bench.warmup + 1 + i, args, path)
        synchronize(device)
        dt, cpu1 = time.perf_counter() - t0, cpu_seconds()
    others = own_ms = None
    if device.type == "cpu" and cpu0 is not None:
        # fraction of all cores
        others = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (dt * os.cpu_count())
        own_ms = 1000 * (cpu1[1] - cpu0[1]) / bench.steps  # own CPU time: steadier than wall time when shared
    return dict(settings=asdict(path), img_per_s=bench.steps * batch / dt, step_ms=1000 * dt / bench.steps,
                peak_mem_gib=peak_memory_gib(device), host_syncs_per_step=syncs, cpu_busy_elsewhere=others,
                cpu_ms_per_step=own_ms, last_loss=float(loss))


def find_max_batch(args, facts, bench, path, device, start):
    """Largest batch whose fast-path step fits in GPU memory (largest_fitting). Each trial runs two steps: the
    optimizer state exists from the first."""
    state = prepare(build(args, facts, device), path, args)

    def fits(b):
        try:
            data = synthetic_batch(args, facts, b, device)
            with numerics(path):
                for i in range(2):
                    train_step(state, data, i, args, path)
            synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            # leaving the except block frees the traceback, and with it the activations of the failed step
            pass
        state.opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False

    # the caller frees the state's memory afterwards
    return largest_fitting(fits, start, bench.max_batch_limit)


def largest_fitting(fits, start, limit):
    """The largest b with fits(b), to within 1/32 below it (0 if none): double from `start` until a batch does
    not fit (or `limit` is reached), then bisect. Assumes that what fits, fits at every smaller batch too."""
    lo, hi, b = 0, None, start
    while hi is None or hi - lo > max(1, lo // 32):
        if fits(b):
            lo = b
        else:
            hi = b
        if hi is None and 2 * b > limit:
            break
        b = 2 * b if hi is None else (lo + hi) // 2
    return lo


def text_encode_cost(args, bench, device, batch):
    """The frozen encoder on `batch` shapes captions, as train.py runs it for a caption set over
    --text-cache-gb (text.caption_features: no_grad, bf16 on a GPU): ms per batch (median of --steps timed
    calls after --warmup) and FLOPs per caption."""
    from text import caption_features
    encoder = load_text_encoder(args.text_encoder, device, args.text_max_length)
    captions = ShapesDataset(size=batch, res=args.res, seed=1).captions()
    with FlopCounterMode(display=False) as counter:
        caption_features(encoder, captions, device)
    times = []
    for i in range(bench.warmup + bench.steps):
        synchronize(device)
        t0 = time.perf_counter()
        caption_features(encoder, captions, device)
        synchronize(device)
        if i >= bench.warmup:
            times.append(time.perf_counter() - t0)
    return dict(encoder=encoder.name, tokens=encoder.max_length, dim=encoder.dim, batch=batch,
                ms_per_batch=1000 * sorted(times)[len(times) // 2],
                gflops_per_caption=counter.get_total_flops() / batch / 1e9)


def sample_throughput(args, facts, bench, path, device):
    """Images/s of diffusion.generate: train.py's --sample-steps steps of its --sampler (a recipe's; else
    Euler, or DDIM for ddpm) with guidance at --cfg-scale (two network passes per step when it is not 1),
    under the fast path's precision, attention and compilation."""
    from diffusion import generate

    model = build(args, facts, device).model.eval().requires_grad_(False)
    net = model
    if path.compile == "model":
        net = torch.compile(model)
    elif path.compile == "blocks":
        for block in model.blocks:
            block.compile()
    B = bench.sample_batch
    noise, y, ctrl = synthetic_batch(args, facts, B, device, seed=1)
    diffusion = make_diffusion(args, facts)
    method = args.sampler or ("euler" if args.objective == "flow" else "ddim")
    run = lambda steps: generate(net, diffusion, noise, y, ctrl,
                                 run_sampling(args, method=method, steps=steps),
                                 batch=B)
    with numerics(path), torch.autocast(device.type, dtype=torch.bfloat16, enabled=path.bf16):
        run(2)  # warm-up (and compilation)
        synchronize(device)
        t0 = time.perf_counter()
        run(args.sample_steps)
        synchronize(device)
        dt = time.perf_counter() - t0
    return dict(batch=B, steps=args.sample_steps, sampler=method, cfg_scale=args.cfg_scale,
                precision="bf16" if path.bf16 else "fp32", compile=path.compile, img_per_s=B / dt,
                s_per_batch=dt)


#################################################################################
#                                    Report                                     #
#################################################################################


def main(argv=None):
    bench, args, facts = get_args(argv)
    device = (torch.device("cuda", torch.cuda.current_device())
              if torch.cuda.is_available()
              else torch.device("cpu"))
    batch, cuda = args.batch, device.type == "cuda"
    fast = fast_path(bench, args, device)
    factor, channels = latent_geometry(args.vae)
    latent = (channels, args.res // factor, args.res // factor)
    print(f"bench: {args.dataset} {args.arch} {args.model} cond={args.cond}, {args.res} px -> latents "
          f"{latent}, batch {batch} on {device_name(device)}, torch {torch.__version__}")
    print(f"  latents{' and prompt features' if args.cond_type == 'text' else ''} are synthetic and already "
          "on the device: no data loading, the VAE is NOT run (latent-cache path); one device, no DDP "
          "all-reduce")

    # ---- peaks: a measured matmul and the datasheet
    # ------------------------------------------------------------- progress lines flush: under a pipe or a
    # log file a slow phase would otherwise look like a hang
    n_max = bench.peak_size or (8192 if cuda else 2048)
    fp32 = "fp32/tf32" if cuda and not bench.ref_fp32 else "fp32"
    peaks = {}
    with numerics(Path("peak", tf32=cuda and not bench.ref_fp32)):
        for dtype in peak_dtypes(fast, device):
            name = "bf16" if dtype == torch.bfloat16 else fp32
            print(f"  probing peak matmul throughput ({name}, n <= {n_max}, ~{PEAK_BUDGET_S:g} s at most)...",
                  flush=True)
            peaks[name] = matmul_tflops(device, dtype, n_max)
    peak_name = "bf16" if "bf16" in peaks else fp32  # the MFU denominator: bf16 wherever it was probed
    peak = peaks[peak_name]["tflops"]
    sheet = datasheet_tflops(device)
    free(device)

    # ---- fast path (FLOPs counted first, on a plain model of their own)
    # -----------------------------------------
    print("  counting FLOPs of one training step...", flush=True)
    flops = count_train_flops(args, facts, device)
    free(device)
    state = build(args, facts, device)
    params = sum(p.numel() for p in state.model.parameters())
    print(f"  {params / 1e6:.2f} M parameters; {flops / 1e9:.4g} GFLOP per training image (forward + "
          "backward)")
    print(f"  FLOPs: {FLOP_CONVENTION}")
    probed = "; ".join(f"{k} {r['tflops']:.4g} TFLOP/s (n={r['n']}, best of {r['trials']} x {r['iters']} "
                       f"matmuls, {r['seconds']:.1f} s)"
                       for k, r in peaks.items())
    print(f"  matmul peak: {probed}; MFU divides by the {peak_name} figure; datasheet bf16 peak "
          f"{'n/a' if sheet is None else f'{sheet:g} TFLOP/s'}")

    def measure(state, path):
        """run_path plus the FLOP-based figures; an out-of-memory is reported in the row, and the run goes on
        (so that --find-max-batch still answers)."""
        print(f"  timing the {path.name} path ({bench.warmup} warm-up + {bench.steps} timed steps, batch "
              f"{batch})...", flush=True)
        try:
            res = run_path(state, path, args, facts, bench, device, batch)
        except torch.cuda.OutOfMemoryError:
            return dict(settings=asdict(path), error=f"out of memory at batch {batch}: lower --batch, add "
                        f"--grad-ckpt, or use --find-max-batch")
        res["tflops"] = flops * res["img_per_s"] / 1e12
        res["mfu"] = res["tflops"] / peak
        res["mfu_datasheet"] = None if sheet is None else res["tflops"] / sheet
        return res

    free(device)
    results = {"fast": measure(state, fast)}
    del state
    free(device)
    if bench.reference:
        results["reference"] = measure(build(args, facts, device), reference_path(bench, device))
        free(device)
    speedup = None
    if "error" not in results["fast"] and "error" not in results.get("reference", {"error": None}):
        speedup = results["fast"]["img_per_s"] / results["reference"]["img_per_s"]

    max_batch = None
    if bench.find_max_batch:
        if cuda:
            print("  searching the largest batch that fits...", flush=True)
            max_batch = find_max_batch(args, facts, bench, fast, device, batch)
            free(device)
        else:
            print("  --find-max-batch needs a GPU (a CPU swaps long before it runs out of memory): skipped")
    text_cost = None
    if bench.text_encode and args.cond_type == "text":
        print(f"  timing the text encoder ({args.text_encoder}, batch {batch})...", flush=True)
        text_cost = text_encode_cost(args, bench, device, batch)
    sampling = None
    if bench.sample_batch:
        print(f"  timing sampling ({args.sample_steps} steps, batch {bench.sample_batch})...", flush=True)
        sampling = sample_throughput(args, facts, bench, fast, device)
    free(device)

    # ---- table
    # ----------------------------------------------------------------------------------------------------
    mem = "peak mem GiB (CUDA max allocated)" if cuda else "peak mem GiB (process RSS)"
    print(f"\n{'path':<10} {'img/s':>9} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>7} {'MFU(sheet)':>10}  {mem}  "
          "settings")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<10} {r['error']}")
            continue
        print(f"{name:<10} {r['img_per_s']:>9.1f} {r['step_ms']:>9.2f} {r['tflops']:>9.4g} "
              f"{pct(r['mfu']):>7} {pct(r['mfu_datasheet']):>10}  {r['peak_mem_gib']:>{len(mem)}.2f}  "
              f"{describe(Path(**r['settings']))}")
    if speedup is not None:
        print(f"speed-up fast / reference: {speedup:.2f}x")
    busy = [r.get("cpu_busy_elsewhere") or 0.0 for r in results.values()]
    if max(busy) > 0.05:
        own = ", ".join(f"{k} {r['cpu_ms_per_step']:.1f}" for k, r in results.items()
                        if r.get("cpu_ms_per_step"))
        print(f"note: other processes kept {100 * max(busy):.0f}% of the CPU busy during the timed steps, "
              f"which slows these figures; rerun on an idle machine. CPU ms per step of this process: {own}")
    if results["fast"].get("host_syncs_per_step") is not None:
        print(f"host syncs in one fast step: {results['fast']['host_syncs_per_step']}")
    if max_batch is not None:
        print(f"largest batch that fits (fast path{', grad-ckpt' if fast.grad_ckpt else ''}): {max_batch} "
              f"(leave some headroom for fragmentation in a long run)")
    if text_cost and "error" not in results["fast"]:
        step = results["fast"]["step_ms"]
        text_cost["share_of_step"] = text_cost["ms_per_batch"] / (step + text_cost["ms_per_batch"])
        print(f"text encoder {text_cost['encoder']} ({text_cost['tokens']} tokens x {text_cost['dim']}): "
              f"{text_cost['ms_per_batch']:.1f} ms per batch of {batch} captions, "
              f"{text_cost['gflops_per_caption']:.4g} GFLOP per caption; encoded in the step it would be "
              f"{100 * text_cost['share_of_step']:.1f}% of a fast step ({step:.1f} ms + the encoder)")
    if sampling:
        print(f"sampling: {sampling['steps']} {sampling['sampler']} steps, cfg {sampling['cfg_scale']}, "
              f"batch {sampling['batch']}, {sampling['precision']}: {sampling['img_per_s']:.2f} img/s")

    rec = dict(
        device=device_name(device), torch=torch.__version__,
        dataset=args.dataset, arch=args.arch, model=args.model,
        cond=args.cond, res=args.res, latent=list(latent),
        vae_run=False, batch=batch, steps=bench.steps,
        warmup=bench.warmup, params=params, flops_per_img=flops,
        flop_convention=FLOP_CONVENTION, peak_tflops_measured=peak,
        peak_dtype=peak_name,
        # None: not probed
        peak_tflops_measured_bf16=peaks["bf16"]["tflops"] if "bf16" in peaks else None,
        matmul_tflops_fp32=peaks[fp32]["tflops"] if fp32 in peaks else None,
        peak_probe=peaks, peak_tflops_datasheet=sheet,
        mem_kind="cuda_max_memory_allocated" if cuda else "process_peak_rss",
        fast=results["fast"], reference=results.get("reference"),
        speedup=speedup, max_batch=max_batch, sample=sampling, text_encode=text_cost,
    )
    line = json.dumps(rec)
    if bench.json:
        with open(bench.json, "a") as f:
            f.write(line + "\n")
        print(f"result appended to {bench.json}")
    else:
        print(line)
    return rec


if __name__ == "__main__":
    main()
