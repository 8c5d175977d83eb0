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
matmul peak (experiments.hardware.matmul_tflops, seconds long on any device): bf16 on GPU; on CPU the dtype
the run computes in, fp32 unless --precision bf16. Any train.py flag (--cond, --cond-type, --arch,
--class-tokens, --vae, --precision, ...) passes through to config.get_args; --batch is the batch on this one
device (the presets' --batch is a global batch: give one for imagenet).

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
import json
import os
import time
from dataclasses import asdict
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from build import SourceFacts, make_diffusion
from checks import at_least, check_output
from config import get_args as train_args
from config import run_sampling, validate
from latents import latent_geometry
from shapes import ShapesDataset
from text import load_text_encoder

from .hardware import (
    PEAK_BUDGET_S,
    Peaks,
    count_host_syncs,
    cpu_seconds,
    datasheet_tflops,
    device_name,
    free,
    matmul_tflops,
    peak_dtypes,
    peak_memory_gib,
    synchronize,
)
from .timed_step import (
    ATTN,
    Path,
    build,
    describe,
    fast_path,
    numerics,
    prepare,
    reference_path,
    synthetic_batch,
    train_step,
)

COMPILE = ("auto", "off", "model", "blocks")
FLOP_CONVENTION = ("torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-accumulate; matmuls, "
                   "convolutions and attention only (elementwise ops, norms, softmax, optimizer and EMA not "
                   "counted); forward + backward, attention counted as math-backend matmuls (no recompute)")


def get_args(argv=None):
    """(bench options, train.py's args, the run's facts as train.py would learn them from the data). Flags
    this parser does not know go to config.get_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # never swallow a train.py flag by its prefix
    add = p.add_argument
    add("--steps", type=int, default=20, help="timed optimizer steps per path")
    add("--warmup", type=int, default=5, help="untimed steps first (allocator, cuDNN/kernel choice, "
        "compilation)")
    add("--compile", default="auto", choices=COMPILE, help="fast path: torch.compile the whole model, each "
        "block, or not at all; auto = model on GPU, off on CPU (where compiling takes minutes)")
    add("--attn", default="default", choices=tuple(ATTN), help="fast path SDPA backend; default = PyTorch's "
        "dispatch (flash attention on GPU when the inputs allow it)")
    add("--grad-ckpt", action="store_true", help="fast path: activation checkpointing of every block (less "
        "memory, one more forward of each block in the backward pass)")
    add("--no-reference", dest="reference", action="store_false", help="skip the reference path")
    add("--ref-fp32", action="store_true", help="reference matmuls in strict fp32 on GPU (default TF32, as "
        "train.py)")
    add("--train-syncs", action="store_true", help="add to every step of both paths the two host reads "
        "train.main makes at its log and checkpoint steps (the finite-gradient flag and the preemption "
        "flag), to measure what they cost")
    add("--find-max-batch", action="store_true", help="GPU: search the largest batch the fast path fits in "
        "memory")
    add("--max-batch-limit", type=int, default=8192, help="stop the --find-max-batch search here")
    add("--sample-batch", type=int, default=0, help="also time sampling at this batch (0 = skip)")
    add("--text-encode", action="store_true", help="--cond-type text: also time the frozen text encoder on a "
        "batch of captions, what a caption set over --text-cache-gb costs each step, and its FLOPs")
    add("--peak-size", type=int, default=0, help="largest matrix size of the peak-FLOPs matmul (0 = 8192 on "
        "GPU, 2048 on CPU); the probe stops doubling from 128 where one matmul would take over 0.5 s")
    add("--json", default=None, help="append the result line to this file (default: print it as the last "
        "line)")
    bench, rest = p.parse_known_args(argv)
    if bench.json:  # before any work: a line appended to a checkpoint or an .npz would spoil it
        check_output(bench.json, (".jsonl", ".json"), flag="--json")
    args = train_args(rest)
    # The benchmark reads no images: everything else is validated, so that a bad model, res or vae fails as
    # it does in train.py.
    validate(argparse.Namespace(**{**vars(args), "dataset": "shapes", "data_path": None}))
    for name, low in (("steps", 1), ("max_batch_limit", 1), ("warmup", 0), ("sample_batch", 0),
                      ("peak_size", 0)):  # 0: none, or the device's default size
        at_least(f"--{name.replace('_', '-')}", getattr(bench, name), low)
    return bench, args, source_facts(args)


def source_facts(args):
    """The facts train.py learns from its data, here without reading any: the embedded dataset's classes or
    ImageNet's 1000, and for --cond-type text the model's text input size as train.main reads it off the
    encoder."""
    encoder = None
    if args.cond_type == "text":
        encoder = load_text_encoder(args.text_encoder, "cpu", args.text_max_length)
    return SourceFacts(res=args.res, vae=args.vae, base_res=args.base_res or args.res,
                       source_dataset=args.dataset,
                       num_classes=ShapesDataset.num_classes if args.dataset == "shapes" else 1000,
                       text_dim=encoder and encoder.dim, text_len=encoder and encoder.max_length)


#################################################################################
#                         The FLOPs of a training image                         #
#################################################################################


def count_train_cost(args, facts, device, batch=2):
    """(model FLOPs of forward + backward per training image (FLOP_CONVENTION), parameters), counted over one
    training step of a model of its own (plain: no checkpointing, no compile; the optimizer and the EMA add no
    counted op). Counted in fp32 under the math SDPA backend, so attention is its matmuls once, without the
    score recompute of a fused backward: the count is the model's, not the kernels', which is what MFU divides
    by."""
    path = Path("flop count")
    state = prepare(build(args, facts, device), path, args)
    data = synthetic_batch(args, facts, batch, device)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        train_step(state, data, 0, args, path)
    return counter.get_total_flops() / batch, sum(p.numel() for p in state.model.parameters())


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
        seconds, cpu1 = time.perf_counter() - t0, cpu_seconds()
    others = own_ms = None
    if device.type == "cpu" and cpu0 is not None:
        # What other processes took, as a fraction of all cores; this process's own CPU time per step is
        # steadier than the wall time on a shared machine.
        others = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (seconds * os.cpu_count())
        own_ms = 1000 * (cpu1[1] - cpu0[1]) / bench.steps
    return dict(settings=asdict(path), img_per_s=bench.steps * batch / seconds,
                step_ms=1000 * seconds / bench.steps,
                peak_mem_gib=peak_memory_gib(device), host_syncs_per_step=syncs, cpu_busy_elsewhere=others,
                cpu_ms_per_step=own_ms, last_loss=float(loss))


def find_max_batch(args, facts, bench, path, device, start):
    """Largest batch whose fast-path step fits in GPU memory (largest_fitting). Each trial runs two steps: the
    optimizer state exists from the first."""
    state = prepare(build(args, facts, device), path, args)

    def fits(batch):
        try:
            data = synthetic_batch(args, facts, batch, device)
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
    """The largest batch with fits(batch), to within 1/32 below it (0 if none): double from `start` until a
    batch does not fit (or `limit` is reached), then bisect. Assumes that what fits, fits at every smaller
    batch too."""
    lo, hi, batch = 0, None, start
    while hi is None or hi - lo > max(1, lo // 32):
        if fits(batch):
            lo = batch
        else:
            hi = batch
        if hi is None and 2 * batch > limit:
            break
        batch = 2 * batch if hi is None else (lo + hi) // 2
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
    from diffusion import Draw, generate

    model = build(args, facts, device).model.eval().requires_grad_(False)
    net = model
    if path.compile == "model":
        net = torch.compile(model)
    elif path.compile == "blocks":
        for block in model.blocks:
            block.compile()
    batch = bench.sample_batch
    noise, y, ctrl = synthetic_batch(args, facts, batch, device, seed=1)
    diffusion = make_diffusion(args, facts)
    method = args.sampler or ("euler" if args.objective == "flow" else "ddim")
    draw = lambda steps: generate(net, diffusion, noise, y, ctrl,
                                  run_sampling(args, method=method, steps=steps), Draw(batch=batch))
    with numerics(path), torch.autocast(device.type, dtype=torch.bfloat16, enabled=path.bf16):
        draw(2)  # warm-up (and compilation)
        synchronize(device)
        t0 = time.perf_counter()
        draw(args.sample_steps)
        synchronize(device)
        seconds = time.perf_counter() - t0
    return dict(batch=batch, steps=args.sample_steps, sampler=method, cfg_scale=args.cfg_scale,
                precision="bf16" if path.bf16 else "fp32", compile=path.compile, img_per_s=batch / seconds,
                s_per_batch=seconds)


#################################################################################
#                       One benchmark, phase by phase                           #
#################################################################################


class Setup(NamedTuple):
    """What every phase of one benchmark reads."""
    bench: argparse.Namespace  # this script's own options
    args: argparse.Namespace   # train.py's
    facts: object              # what train.py would learn from its data (source_facts)
    device: torch.device

    @property
    def cuda(self):
        return self.device.type == "cuda"


class Extras(NamedTuple):
    """The optional measurements, None where not asked for (or, for the largest batch, not possible)."""
    max_batch: int | None
    text_encode: dict | None
    sample: dict | None


def announce(setup):
    """Print what is timed, at which size, on which device. -> the latent shape (C, H, W)"""
    args = setup.args
    factor, channels = latent_geometry(args.vae)
    latent = (channels, args.res // factor, args.res // factor)
    print(f"bench: {args.dataset} {args.arch} {args.model} cond={args.cond}, {args.res} px -> latents "
          f"{latent}, batch {args.batch} on {device_name(setup.device)}, torch {torch.__version__}")
    print(f"  latents{' and prompt features' if args.cond_type == 'text' else ''} are synthetic and already "
          "on the device: no data loading, the VAE is NOT run (latent-cache path); one device, no DDP "
          "all-reduce")
    return latent


def probe_peaks(setup, fast):
    """The matmul peak of each dtype peak_dtypes names, and the datasheet's. Every progress line is flushed:
    under a pipe or a log file a slow phase would otherwise look like a hang."""
    device = setup.device
    n_max = setup.bench.peak_size or (8192 if setup.cuda else 2048)
    tf32 = setup.cuda and not setup.bench.ref_fp32
    fp32_name = "fp32/tf32" if tf32 else "fp32"
    probed = {}
    with numerics(Path("peak", tf32=tf32)):
        for dtype in peak_dtypes(fast.bf16, device):
            name = "bf16" if dtype == torch.bfloat16 else fp32_name
            print(f"  probing peak matmul throughput ({name}, n <= {n_max}, ~{PEAK_BUDGET_S:g} s at most)...",
                  flush=True)
            probed[name] = matmul_tflops(device, dtype, n_max)
    peaks = Peaks(probed, "bf16" if "bf16" in probed else fp32_name, fp32_name, datasheet_tflops(device))
    free(device)
    return peaks


def model_cost(setup, peaks):
    """Count the FLOPs of one training image and the parameters, and print them beside the peaks. -> (FLOPs
    per image, parameters)"""
    print("  counting FLOPs of one training step...", flush=True)
    flops, params = count_train_cost(setup.args, setup.facts, setup.device)
    free(setup.device)
    print(f"  {params / 1e6:.2f} M parameters; {flops / 1e9:.4g} GFLOP per training image (forward + "
          "backward)")
    print(f"  FLOPs: {FLOP_CONVENTION}")
    probed = "; ".join(f"{k} {r['tflops']:.4g} TFLOP/s (n={r['n']}, best of {r['trials']} x {r['iters']} "
                       f"matmuls, {r['seconds']:.1f} s)"
                       for k, r in peaks.probed.items())
    sheet = "n/a" if peaks.datasheet is None else f"{peaks.datasheet:g} TFLOP/s"
    print(f"  matmul peak: {probed}; MFU divides by the {peaks.mfu_dtype} figure; datasheet bf16 peak "
          f"{sheet}")
    return flops, params


def measure_path(setup, state, path, flops, peaks):
    """run_path plus the FLOP-based figures; an out-of-memory is reported in the row, and the run goes on (so
    that --find-max-batch still answers)."""
    batch = setup.args.batch
    print(f"  timing the {path.name} path ({setup.bench.warmup} warm-up + {setup.bench.steps} timed steps, "
          f"batch {batch})...", flush=True)
    try:
        res = run_path(state, path, setup.args, setup.facts, setup.bench, setup.device, batch)
    except torch.cuda.OutOfMemoryError:
        return dict(settings=asdict(path), error=f"out of memory at batch {batch}: lower --batch, add "
                    "--grad-ckpt, or use --find-max-batch")
    res["tflops"] = flops * res["img_per_s"] / 1e12
    res["mfu"] = res["tflops"] / peaks.tflops
    res["mfu_datasheet"] = None if peaks.datasheet is None else res["tflops"] / peaks.datasheet
    return res


def time_paths(setup, fast, flops, peaks):
    """The fast path, then (unless --no-reference) the reference path, each on a model built afresh. -> {path
    name: its figures}"""
    args, facts, device = setup.args, setup.facts, setup.device
    state = build(args, facts, device)
    free(device)
    results = {"fast": measure_path(setup, state, fast, flops, peaks)}
    del state
    free(device)
    if setup.bench.reference:
        results["reference"] = measure_path(setup, build(args, facts, device),
                                            reference_path(setup.bench, device), flops, peaks)
        free(device)
    return results


def speed_up(results):
    """Fast over reference images/s; None without a reference path or where a path ran out of memory."""
    if "error" not in results["fast"] and "error" not in results.get("reference", {"error": None}):
        return results["fast"]["img_per_s"] / results["reference"]["img_per_s"]
    return None


def optional_measurements(setup, fast, results):
    """--find-max-batch (GPU only), --text-encode (with the encoder's share of a fast step) and
    --sample-batch, each when asked."""
    bench, args, facts, device = setup
    max_batch = text_cost = sampling = None
    if bench.find_max_batch:
        if setup.cuda:
            print("  searching the largest batch that fits...", flush=True)
            max_batch = find_max_batch(args, facts, bench, fast, device, args.batch)
            free(device)
        else:
            print("  --find-max-batch needs a GPU (a CPU swaps long before it runs out of memory): skipped")
    if bench.text_encode and args.cond_type == "text":
        print(f"  timing the text encoder ({args.text_encoder}, batch {args.batch})...", flush=True)
        text_cost = text_encode_cost(args, bench, device, args.batch)
        if "error" not in results["fast"]:
            encode_ms = text_cost["ms_per_batch"]
            text_cost["share_of_step"] = encode_ms / (results["fast"]["step_ms"] + encode_ms)
    if bench.sample_batch:
        print(f"  timing sampling ({args.sample_steps} steps, batch {bench.sample_batch})...", flush=True)
        sampling = sample_throughput(args, facts, bench, fast, device)
    free(device)
    return Extras(max_batch, text_cost, sampling)


def print_table(setup, results, speedup):
    """A line per path, the speed-up, and what else may have slowed the figures."""
    memory = f"peak mem GiB ({'CUDA max allocated' if setup.cuda else 'process RSS'})"
    print(f"\n{'path':<10} {'img/s':>9} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>7} {'MFU(sheet)':>10}  "
          f"{memory}  settings")
    percent = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<10} {r['error']}")
            continue
        print(f"{name:<10} {r['img_per_s']:>9.1f} {r['step_ms']:>9.2f} {r['tflops']:>9.4g} "
              f"{percent(r['mfu']):>7} {percent(r['mfu_datasheet']):>10}  "
              f"{r['peak_mem_gib']:>{len(memory)}.2f}  {describe(Path(**r['settings']))}")
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


def print_extras(setup, fast, results, extras):
    """The largest batch, the text encoder's cost and the sampling rate, where measured."""
    if extras.max_batch is not None:
        print(f"largest batch that fits (fast path{', grad-ckpt' if fast.grad_ckpt else ''}): "
              f"{extras.max_batch} (leave some headroom for fragmentation in a long run)")
    text = extras.text_encode
    if text and "share_of_step" in text:
        print(f"text encoder {text['encoder']} ({text['tokens']} tokens x {text['dim']}): "
              f"{text['ms_per_batch']:.1f} ms per batch of {setup.args.batch} captions, "
              f"{text['gflops_per_caption']:.4g} GFLOP per caption; encoded in the step it would be "
              f"{100 * text['share_of_step']:.1f}% of a fast step ({results['fast']['step_ms']:.1f} ms + the "
              "encoder)")
    if extras.sample:
        sample = extras.sample
        print(f"sampling: {sample['steps']} {sample['sampler']} steps, cfg {sample['cfg_scale']}, "
              f"batch {sample['batch']}, {sample['precision']}: {sample['img_per_s']:.2f} img/s")


def main(argv=None):
    setup = Setup(*get_args(argv), torch.device("cuda", torch.cuda.current_device())
                  if torch.cuda.is_available() else torch.device("cpu"))
    bench, args, _, device = setup
    fast = fast_path(bench, args, device)
    latent = announce(setup)
    peaks = probe_peaks(setup, fast)
    flops, params = model_cost(setup, peaks)
    results = time_paths(setup, fast, flops, peaks)
    speedup = speed_up(results)
    extras = optional_measurements(setup, fast, results)
    print_table(setup, results, speedup)
    print_extras(setup, fast, results, extras)
    record = dict(
        device=device_name(device), torch=torch.__version__, dataset=args.dataset, arch=args.arch,
        model=args.model, cond=args.cond, res=args.res, latent=list(latent), vae_run=False, batch=args.batch,
        steps=bench.steps, warmup=bench.warmup, params=params, flops_per_img=flops,
        flop_convention=FLOP_CONVENTION, peak_tflops_measured=peaks.tflops, peak_dtype=peaks.mfu_dtype,
        # None: not probed
        peak_tflops_measured_bf16=peaks.probed["bf16"]["tflops"] if "bf16" in peaks.probed else None,
        matmul_tflops_fp32=(peaks.probed[peaks.fp32_name]["tflops"] if peaks.fp32_name in peaks.probed
                            else None),
        peak_probe=peaks.probed, peak_tflops_datasheet=peaks.datasheet,
        mem_kind="cuda_max_memory_allocated" if setup.cuda else "process_peak_rss",
        fast=results["fast"], reference=results.get("reference"), speedup=speedup,
        max_batch=extras.max_batch, sample=extras.sample, text_encode=extras.text_encode,
    )
    line = json.dumps(record)
    if bench.json:
        with open(bench.json, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(f"result appended to {bench.json}")
    else:
        print(line)
    return record


if __name__ == "__main__":
    main()
