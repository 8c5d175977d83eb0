"""The CUDA path, on a GPU only (`pytest -m gpu`; skipped, and counted as skipped, where CUDA is absent): a
bf16 training step agrees with the fp32 step, SDPA dispatches to a fused kernel (flash or cuDNN unmasked, a
masked kernel for padded text), torch.compile agrees with eager, fused AdamW with for-each AdamW, a resume on
CUDA continues the uninterrupted losses, a 1-process torchrun with NCCL trains, and bf16 sampling gives finite
images."""
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import ROOT, TINY, assert_resumed_exactly, losses, train_and_resume
from experiments import bench, timed_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU)")]
GPU = torch.device("cuda") if torch.cuda.is_available() else None
SMALL = ["--model", "S/2", "--res", "32", "--base-res", "32", "--clip", "0"]


def gpu_state(extra=(), batch=8):
    """A small model on the GPU with every zero-initialised tensor given random values (so the whole network
    takes part), and a synthetic batch: bench's build, as train.py builds it."""
    _, args, facts = bench.get_args(SMALL + ["--batch", str(batch), *extra])
    state = timed_step.build(args, facts, GPU)
    with torch.no_grad():
        for p in state.model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return args, facts, state, timed_step.synthetic_batch(args, facts, batch, GPU)


def step_loss(state, args, data, path):
    """The loss of one training step under `path`, from the same weights and noise every call."""
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    timed_step.prepare(state, path, args)
    state.gen = torch.Generator(GPU).manual_seed(0)
    with timed_step.numerics(path):
        loss = timed_step.train_step(state, data, 0, args, path)
    state.model.load_state_dict(weights)
    return float(loss)


@pytest.mark.parametrize("cond", ["ours", "adaln"])
def test_bf16_step_matches_the_fp32_step(cond):
    args, _, state, data = gpu_state(["--cond", cond])
    ref = step_loss(state, args, data, timed_step.Path("fp32", attn="math"))
    fast = step_loss(state, args, data, timed_step.Path("fast", bf16=True, fused_adam=True))
    assert torch.isfinite(torch.tensor(fast)) and abs(fast - ref) < 2e-2 * abs(ref), (fast, ref)


def test_sdpa_uses_a_fused_kernel_unmasked_and_a_masked_kernel_for_padded_text():
    """Restricted to flash + cuDNN, the class model's attention must still run (no fallback to math); the text
    model's padded prompts (a boolean mask) must run on the memory-efficient or cuDNN kernel."""
    args, _, state, data = gpu_state(["--cond", "ours"])
    x, y, ctrl = data
    t = torch.full((x.shape[0],), 0.5, device=GPU)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            assert torch.isfinite(state.model(x, t, y=y, ctrl=ctrl)).all()
        targs, _, tstate, tdata = gpu_state(["--cond-type", "text"])
        tx, ty, tctrl = tdata
        assert not ty[1].all()  # some prompts are padded
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            assert torch.isfinite(tstate.model(tx, t, y=ty, ctrl=tctrl)).all()


def test_compiled_model_matches_eager():
    args, _, state, data = gpu_state(["--cond", "ours"])
    x, y, ctrl = data
    t = torch.full((x.shape[0],), 0.3, device=GPU)
    model = state.model.eval()
    with torch.no_grad():
        eager = model(x, t, y=y, ctrl=ctrl)
        compiled = torch.compile(model)(x, t, y=y, ctrl=ctrl)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_fused_adamw_equals_foreach_adamw():
    args, _, state, data = gpu_state(["--cond", "adaln"])
    start = {k: v.clone() for k, v in state.model.state_dict().items()}
    after = {}
    for fused in (False, True):
        state.model.load_state_dict(start)
        path = timed_step.Path("fp32", fused_adam=fused)
        timed_step.prepare(state, path, args)
        state.gen = torch.Generator(GPU).manual_seed(0)
        for step in range(3):
            timed_step.train_step(state, data, step, args, path)
        after[fused] = torch.cat([p.detach().flatten() for p in state.model.parameters()])
    torch.testing.assert_close(after[True], after[False], rtol=1e-5, atol=1e-6)


def test_resume_on_cuda_continues_the_uninterrupted_losses(tmp_path):
    """train.py on the GPU, bf16: the CUDA noise generator is saved and restored with the checkpoint."""
    full, resumed = train_and_resume(TINY + ["--sample-every", "-1"], tmp_path)
    assert_resumed_exactly(full, resumed, 4, 8)


def test_one_process_torchrun_with_nccl_trains(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29631",
           "train.py", *TINY, "--steps", "2", "--sample-every", "-1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(losses(str(run))) == [1, 2]


def test_bf16_sampling_gives_finite_images():
    from build import make_diffusion
    from diffusion import Sampling, generate
    args, facts, state, data = gpu_state(["--cond", "ours"])
    x, y, ctrl = data
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = generate(state.model.eval(), make_diffusion(args, facts), torch.randn_like(x), y, ctrl,
                       Sampling(steps=10, scale=2.0))
    assert out.shape == x.shape and torch.isfinite(out).all()


DIT_OBJECTIVE = ["--objective", "ddpm", "--pred", "eps", "--learn-sigma", "--min-snr", "5"]


@pytest.mark.parametrize("flags", [[], DIT_OBJECTIVE, ["--arch", "mdt"]], ids=["flow", "ddpm", "mdt"])
def test_the_steps_between_two_log_lines_make_no_host_sync(tmp_path, monkeypatch, flags):
    """train.main on the GPU with CUDA's sync debug mode set to "error" from the first log line to the second:
    any host read of a device value in those steps (an .item(), a blocking copy, a data-dependent branch)
    raises. The log lines and checkpoints are where the loop reads the device, on purpose."""
    import train

    real_log_record, logged = train.log_record, []

    def log_record(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)  # the log line itself reads the window: allowed
        record, longest_bad_run = real_log_record(*args, **kwargs)
        logged.append(record["step"])
        if len(logged) == 1:
            torch.cuda.set_sync_debug_mode("error")  # every step until the next log line
        return record, longest_bad_run
    monkeypatch.setattr(train, "log_record", log_record)
    try:
        train.main(TINY + flags + ["--steps", "8", "--log-every", "4", "--ckpt-every", "1000",
                                   "--sample-every", "-1", "--out", str(tmp_path)])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logged == [4, 8]
