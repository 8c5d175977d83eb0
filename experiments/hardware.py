"""
What the benchmark reads off the machine rather than the model: the device's name, its peak matmul
throughput (measured in the run, and the datasheet's), the peak memory a run held, the host synchronisations
a step makes, and the CPU time other processes took while it ran. experiments.bench divides by these figures
and prints them.
"""
import gc
import os
import platform
import resource
import time
import warnings
from typing import NamedTuple

import torch

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), matched in this order
# against torch.cuda.get_device_name(): "NVIDIA H100 PCIe" must be tested before the SXM part's plain "H100".
DATASHEET_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
PEAK_TRIAL_S = 0.5    # one timed trial of the peak matmul: long against timer noise, short on a slow CPU
PEAK_BUDGET_S = 10.0  # no trial of one dtype's probe starts after this many seconds (sizing included)


def synchronize(device):
    """Wait for the device's queued work (a no-op on CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    """Collect garbage and, on a GPU, return cached blocks and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device):
    """The GPU's name, or the CPU's model name with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''}"


#################################################################################
#                        The peak matmul throughput                             #
#################################################################################


class ProbeLimits(NamedTuple):
    """How long the peak probe may take: timed trials per dtype, seconds per trial, seconds in all."""
    trials: int = 3
    trial_s: float = PEAK_TRIAL_S
    budget_s: float = PEAK_BUDGET_S


def matmul_tflops(device, dtype, n_max, limits=ProbeLimits(), mm=torch.mm, clock=time.perf_counter):
    """Achieved TFLOP/s of n x n x n matmuls in `dtype`, the best of `limits.trials` timed trials of
    back-to-back matmuls: the practical peak of this device in this dtype (the best, because clocks and
    neighbours only ever slow it down).

    Bounded in time on any device: n doubles from 128 towards n_max only while one matmul of the next size (8x
    the work) is predicted to fit in one trial of `limits.trial_s` seconds, each trial runs as many matmuls as
    fill it and ends early once it has taken that long, and no trial starts after `limits.budget_s` (a fixed
    2048^3 bf16 probe sat for minutes on a CPU without native bf16, where one 1024^3 takes 2.5 s). `mm` and
    `clock` are seams for the tests. -> dict(tflops, n, iters, trials, seconds)"""
    start = clock()

    def timed(a, b, iters):
        """(matmuls run, seconds). The early end: on a shared CPU one small matmul can take 1000x its quiet
        time (an OpenMP thread waits for a descheduled sibling), so `iters` sized from one quiet call may run
        for minutes. On a GPU the clock reads enqueue time there, so it ends no later than it should."""
        synchronize(device)
        t0, done = clock(), 0
        while done < iters:
            mm(a, b)
            done += 1
            if clock() - t0 > limits.trial_s:
                break
        synchronize(device)
        return done, clock() - t0

    n = min(128, n_max)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    # untimed: library start-up (cuBLAS handle, oneDNN kernels) would make 128^3 look slow and stop here
    mm(a, b)
    one = timed(a, b, 1)[1]
    while n < n_max and 8 * one <= limits.trial_s:
        n = min(2 * n, n_max)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        one = timed(a, b, 1)[1]
    iters = max(1, min(1000, int(limits.trial_s / one)))  # at most 1000: a small n takes microseconds on GPU
    best, trials = 0.0, 0
    while trials < limits.trials and (trials == 0 or clock() - start < limits.budget_s):
        done, seconds = timed(a, b, iters)
        best = max(best, 2 * n**3 * done / seconds / 1e12)
        trials += 1
    return dict(tflops=best, n=n, iters=iters, trials=trials, seconds=clock() - start)


def datasheet_tflops(device):
    """Dense bf16 datasheet peak of this GPU, or None (CPU, or a GPU not in DATASHEET_BF16_TFLOPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_TFLOPS if key in name), None)


def peak_dtypes(bf16, device):
    """The dtypes the peak probe times. GPU: bf16 (the MFU denominator) and fp32/TF32. CPU: only the one the
    run computes in (bf16 under --precision bf16, else fp32): a CPU without native bf16 (AVX2 only: no
    avx512_bf16 / amx_bf16 flag) emulates it at a fraction of its fp32 speed, and an fp32 run's MFU has
    nothing to do with that figure."""
    if device.type == "cuda":
        return torch.bfloat16, torch.float32
    return (torch.bfloat16,) if bf16 else (torch.float32,)


class Peaks(NamedTuple):
    """The matmul peaks probed in one run and the datasheet's."""
    probed: dict             # dtype name ("bf16", "fp32" or "fp32/tf32") -> matmul_tflops' record
    mfu_dtype: str           # the probed dtype MFU divides by: bf16 wherever it was probed
    fp32_name: str           # the fp32 probe's name on this device ("fp32/tf32" where TF32 is on)
    datasheet: float | None  # the datasheet's dense bf16 TFLOP/s, None where unknown

    @property
    def tflops(self):
        """The TFLOP/s MFU divides by."""
        return self.probed[self.mfu_dtype]["tflops"]


#################################################################################
#                      Memory, host syncs and CPU time                          #
#################################################################################


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
        with open("/proc/stat", encoding="utf-8") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system
