"""experiments.bench: the fast path computes what the reference path computes (same loss, same gradients
within bf16 tolerance), activation checkpointing changes no gradient, compile stays off on CPU unless asked,
the peak probe is bounded in time, and the benchmark runs end to end on a CPU and writes every field of its
JSON line."""
import json

import pytest
import torch

from experiments import bench, hardware, timed_step

CPU = torch.device("cpu")
BENCH_TINY = ["--model", "T/4", "--res", "16", "--base-res", "16"]


def tiny(extra=(), batch=4):
    """A tiny model, its diffusion and a synthetic batch. adaLN-Zero makes a fresh model output exactly 0 with
    almost every gradient 0; the zero-initialised tensors get random values so that every weight takes part
    and the network's output moves the loss (about 5 against 3.2 for a zero output). No gradient clipping: the
    raw gradients compare."""
    _, args, facts = bench.get_args(BENCH_TINY + ["--batch", str(batch), "--clip", "0", *extra])
    state = timed_step.build(args, facts, CPU)
    with torch.no_grad():
        for p in state.model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return args, state, timed_step.synthetic_batch(args, facts, batch, CPU)


def loss_and_grad(state, args, data, path):
    """Loss and the flattened gradient of one training step (timed_step.train_step: train.train_step) under
    `path`, from the same noise every time; the update it makes is undone, so every call starts from the same
    weights."""
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    timed_step.prepare(state, path, args)  # a fresh optimizer
    state.gen = torch.Generator().manual_seed(0)
    with timed_step.numerics(path):
        loss = timed_step.train_step(state, data, 0, args, path)
    params = list(state.model.parameters())
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    state.model.load_state_dict(weights)
    return loss, grad


@pytest.mark.parametrize("flags", [["--cond", "ours"], ["--cond", "adaln"], ["--cond-type", "text"]])
def test_fast_bf16_matches_fp32_math_reference(flags):
    args, state, data = tiny(flags)
    ref_loss, ref_grad = loss_and_grad(state, args, data, timed_step.Path("reference", attn="math"))
    loss, grad = loss_and_grad(state, args, data, timed_step.Path("fast", bf16=True, attn="default"))
    assert torch.isclose(loss, ref_loss, rtol=1e-2), (loss, ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
    assert (grad - ref_grad).norm() < 0.05 * ref_grad.norm()


def test_sdpa_backends_agree_in_fp32():
    """bf16 off: PyTorch's default SDPA kernel and the math backend are the same computation to float
    rounding."""
    args, state, data = tiny()
    ref_loss, ref_grad = loss_and_grad(state, args, data, timed_step.Path("reference", attn="math"))
    loss, grad = loss_and_grad(state, args, data, timed_step.Path("fast", attn="default"))
    assert torch.isclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


def test_grad_checkpointing_changes_no_gradient():
    args, state, data = tiny()
    path = timed_step.Path("plain")
    loss, grad = loss_and_grad(state, args, data, path)
    timed_step.checkpoint_blocks(state.model)
    ckpt_loss, ckpt_grad = loss_and_grad(state, args, data, path)
    assert torch.equal(loss, ckpt_loss)
    torch.testing.assert_close(ckpt_grad, grad, rtol=1e-6, atol=1e-8)


def test_compile_is_optional_and_off_by_default_on_cpu():
    options, args, facts = bench.get_args(["--cond", "adaln"])
    assert options.compile == "auto" and timed_step.fast_path(options, args, CPU).compile == "off"
    assert timed_step.resolve_compile("auto", torch.device("cuda")) == "model"
    assert timed_step.fast_path(bench.get_args(["--compile", "blocks"])[0], args, CPU).compile == "blocks"
    # bench's own flags are taken out; the rest reaches train.py, presets filled
    assert (args.cond, args.model, args.res, args.batch, facts.num_classes) == ("adaln", "XS/4", 24, 64, 10)
    ref = timed_step.reference_path(options, CPU)
    assert (ref.attn, ref.compile, ref.bf16, ref.fused_adam) == ("math", "off", False, False)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    bench.main(BENCH_TINY + ["--batch", "4", "--steps", "2", "--warmup", "1", "--grad-ckpt",
                             "--find-max-batch",
                             "--sample-batch", "2", "--sample-steps", "2", "--peak-size", "128",
                             "--json", str(out)])
    text = capsys.readouterr().out
    assert "VAE is NOT run" in text and "process RSS" in text and "speed-up" in text
    rec = json.loads(out.read_text().splitlines()[-1])
    for key in ("device", "torch", "dataset", "model", "res", "batch", "flops_per_img", "flop_convention",
                "peak_tflops_measured_bf16", "peak_tflops_datasheet", "mem_kind", "speedup", "max_batch",
                "sample"):
        assert key in rec, key
    assert (rec["vae_run"] is False
            and rec["mem_kind"] == "process_peak_rss"
            and rec["peak_tflops_datasheet"] is None)
    assert rec["flops_per_img"] > 0 and rec["speedup"] > 0 and rec["max_batch"] is None  # no max batch on CPU
    for name in ("fast", "reference"):
        r = rec[name]
        for key in ("img_per_s", "step_ms", "tflops", "mfu", "peak_mem_gib"):
            assert r[key] > 0, (name, key)
        assert r["mfu_datasheet"] is None and r["host_syncs_per_step"] is None
    assert rec["fast"]["settings"]["grad_ckpt"] and rec["reference"]["settings"]["attn"] == "math"
    assert rec["sample"]["img_per_s"] > 0 and rec["sample"]["steps"] == 2


@pytest.mark.parametrize("limit_of_memory, start", [(100, 8), (100, 512), (5, 64), (0, 4), (10_000, 64)])
def test_max_batch_search(limit_of_memory, start):
    """--find-max-batch's search (its trials need a GPU; the search itself does not)."""
    tried = []
    fits = lambda b: tried.append(b) or b <= limit_of_memory
    found = bench.largest_fitting(fits, start, limit=4096)
    assert found == min(limit_of_memory, 4096) or limit_of_memory - found <= limit_of_memory // 32
    assert found <= limit_of_memory and len(tried) <= 20


@pytest.mark.slow
def test_out_of_memory_is_reported_and_the_run_goes_on(monkeypatch):
    real = bench.run_path

    def oom_on_fast_path(state, path, *rest):
        if path.name == "fast":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(state, path, *rest)

    monkeypatch.setattr(bench, "run_path", oom_on_fast_path)
    rec = bench.main(BENCH_TINY + ["--batch", "2", "--steps", "1", "--warmup", "0", "--peak-size", "64"])
    assert "out of memory at batch 2" in rec["fast"]["error"] and rec["speedup"] is None
    assert rec["reference"]["img_per_s"] > 0


def test_peak_probe_on_cpu_measures_the_runs_dtype():
    """On a CPU the probe times only the dtype the run computes in: fp32 unless --precision bf16 (a CPU
    without native bf16 takes seconds per bf16 matmul, and an fp32 run's MFU has nothing to do with it). A GPU
    probes both."""
    for flags, want in (([], (torch.float32,)), (["--precision", "bf16"], (torch.bfloat16,))):
        options, args, _ = bench.get_args(["--cond", "adaln", *flags])
        assert hardware.peak_dtypes(timed_step.fast_path(options, args, CPU).bf16, CPU) == want
    options, args, _ = bench.get_args(["--cond", "adaln"])
    gpu = torch.device("cuda")
    assert hardware.peak_dtypes(timed_step.fast_path(options, args, gpu).bf16, gpu) == (torch.bfloat16,
                                                                                        torch.float32)


class SlowMatmul:
    """A matmul on a fake clock: it computes nothing and moves the clock on by n^3 multiply-adds at `gflops`,
    from call number `stall_from` on 1000x slower (a neighbour took the core the second OpenMP thread waits
    on)."""

    def __init__(self, gflops, stall_from=None):
        self.now, self.rate, self.sizes, self.stall_from = 0.0, gflops * 1e9, [], stall_from

    def clock(self):
        return self.now

    def mm(self, a, b):
        self.sizes.append(a.shape[0])
        stalled = self.stall_from is not None and len(self.sizes) > self.stall_from
        self.now += 2 * a.shape[0] ** 3 / self.rate * (1000 if stalled else 1)
        return a


def test_peak_probe_is_bounded_in_time():
    # an AVX2 CPU without native bf16: one 1024^3 bf16 matmul in 2.5 s, where the old probe ran 2048^3 ones
    slow = SlowMatmul(2 * 1024**3 / 2.5 / 1e9)
    res = hardware.matmul_tflops(CPU, torch.bfloat16, 2048, hardware.ProbeLimits(trial_s=0.5, budget_s=10.0),
                                 mm=slow.mm, clock=slow.clock)
    # 1024^3 (2.5 s) would not fit in one 0.5 s trial: never run
    assert res["n"] == 512 and max(slow.sizes) == 512
    assert res["iters"] == 1 and res["trials"] == 3 and slow.now < 3  # 512^3 takes 0.31 s
    assert res["tflops"] == pytest.approx(slow.rate / 1e12)  # the fake's own rate, measured back
    # a fast device: the sizes double up to the largest asked for, each trial as many matmuls as fill 0.5 s
    fast = SlowMatmul(200.0)
    res = hardware.matmul_tflops(CPU, torch.float32, 2048, hardware.ProbeLimits(trial_s=0.5, budget_s=10.0),
                                 mm=fast.mm, clock=fast.clock)
    assert (res["n"], res["iters"], res["trials"]) == (2048, 5, 3) and fast.now < 2.5
    # a device slower than anything sized for: the smallest size, one matmul per trial, and the budget ends
    # the trials
    crawl = SlowMatmul(2 * 128**3 / 4.0 / 1e9)  # 4 s for 128^3
    res = hardware.matmul_tflops(CPU, torch.bfloat16, 2048, hardware.ProbeLimits(trial_s=0.5, budget_s=10.0),
                                 mm=crawl.mm, clock=crawl.clock)
    assert res["n"] == 128 and res["iters"] == 1 and res["trials"] == 1 and crawl.sizes == [128] * 3
    # sized on a quiet CPU (128^3 in 21 us, 1000 per trial at n = 128), then every matmul stalls: a trial ends
    # once it has taken 0.5 s, and the budget ends the probe (without the early end: 1000 x 21 ms per trial)
    stall = SlowMatmul(200.0, stall_from=2)
    res = hardware.matmul_tflops(CPU, torch.float32, 128, hardware.ProbeLimits(trial_s=0.5, budget_s=1.0),
                                 mm=stall.mm, clock=stall.clock)
    assert res["iters"] == 1000 and res["trials"] == 2 and len(stall.sizes) == 2 + 2 * 24 and stall.now < 1.1


@pytest.mark.parametrize("flag", ["--warmup", "--sample-batch", "--peak-size"])
def test_negative_counts_are_refused_before_any_work(flag):
    with pytest.raises(SystemExit, match="must be >= 0"):
        bench.get_args(BENCH_TINY + [flag, "-1"])


@pytest.mark.slow
def test_the_performance_report_runs_at_toy_size_on_cpu(tmp_path):
    """python -m experiments.report: every row of the GPU report, here at toy size, into one page."""
    from experiments import report
    out = report.main(["--out", str(tmp_path / "perf.md")])
    page = open(out).read()
    assert "they say nothing about a GPU" in page and "Measured matmul peak" in page
    for label, _, _ in report.ROWS:
        assert f"for: {label} | fast" in page, label
    assert page.count("| reference:") == 2 and "Sampling (" in page and "fast / reference" in page
