"""
train.py's training step as experiments.bench times it: train.train_step on a synthetic batch already on the
device, under one of two paths over the same model --

    fast       bf16 autocast where train.py uses it, PyTorch's SDPA dispatch, optional torch.compile, fused
               AdamW on GPU, optional activation checkpointing
    reference  fp32 (TF32 on GPU), the math SDPA backend, no compile, for-each AdamW

-- and the state the step reads, built as train.main builds it.
"""
import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from build import make_diffusion, make_model, sampling_control, use_bf16
from latents import latent_geometry
from train import checkpoint_blocks  # --grad-ckpt: the same wrapping as train.py's

ATTN = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

#################################################################################
#                                The two paths                                  #
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
    train_syncs: bool = False  # every step, the host reads train.main makes at its log steps


def resolve_compile(mode, device):
    """--compile auto: the whole model on GPU; off on CPU, where compiling takes minutes (CI, quick runs)."""
    if mode == "auto":
        return "model" if device.type == "cuda" else "off"
    return mode


def fast_path(bench, args, device):
    """The fast path as train.py runs on this device, with the speed options of the bench flags."""
    cuda = device.type == "cuda"
    return Path("fast", bf16=use_bf16(args.precision, device), attn=bench.attn,
                compile=resolve_compile(bench.compile, device), fused_adam=cuda, tf32=cuda,
                grad_ckpt=bench.grad_ckpt, train_syncs=bench.train_syncs)


def reference_path(bench, device):
    """The plain path: fp32 (TF32 on GPU unless --ref-fp32), math attention, no compile, for-each AdamW."""
    return Path("reference", attn="math", tf32=device.type == "cuda" and not bench.ref_fp32,
                train_syncs=bench.train_syncs)


def describe(path):
    """A path's settings in a few words, as the table prints them."""
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
#                    The step on a synthetic batch                              #
#################################################################################


def build(args, facts, device):
    """train.TrainState as train.main makes it (a plain model), its optimizer left to prepare."""
    torch.manual_seed(args.seed)
    model = make_model(args, facts).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    return train.TrainState(net=model, model=model, ema=ema, opt=None, diffusion=make_diffusion(args, facts),
                            gen=torch.Generator(device).manual_seed(args.seed))


def prepare(state, path, args):
    """Apply a path's options to a freshly built state: its precision, checkpointing, compilation, the
    optimizer."""
    state.bf16 = path.bf16
    model = state.model
    if path.grad_ckpt:
        checkpoint_blocks(model)
    if path.compile == "model":
        state.net = torch.compile(model)
    elif path.compile == "blocks":  # smaller graphs: compiles faster, one block's graph serves the others
        if not hasattr(model, "blocks"):
            raise SystemExit("--compile blocks compiles model.blocks: this architecture has none (use "
                             "--compile model)")
        for block in model.blocks:
            block.compile()
    state.opt = train.make_optimizer(model.parameters(), args, fused=path.fused_adam)
    return state


def semantic_batch(args, facts, batch, generator):
    """Labels (B,), or for --cond-type text a cached prompt's (features (B, L, d), mask (B, L)) -- as
    train.main looks them up in its text cache, so the text encoder is not run either; prompt lengths vary, so
    padding is done."""
    if args.cond_type != "text":
        return torch.randint(0, facts.num_classes, (batch,), generator=generator)
    length = facts.text_len
    valid = torch.randint(1, length + 1, (batch, 1), generator=generator)
    return (torch.randn(batch, length, facts.text_dim, generator=generator),
            torch.arange(length)[None] < valid)


def synthetic_batch(args, facts, batch, device, seed=0):
    """Latents (B, C, res/f, res/f), semantic input and control (B, S) of a training batch, on the device."""
    factor, channels = latent_geometry(facts.vae)
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, channels, facts.res // factor, facts.res // factor, generator=generator)
    y = semantic_batch(args, facts, batch, generator)
    y = tuple(v.to(device) for v in y) if isinstance(y, tuple) else y.to(device)
    ctrl = sampling_control(facts).expand(batch, -1)
    return x0.to(device), y, ctrl.to(device)


def train_step(state, batch, step, args, path):
    """train.train_step, the step train.main takes, on this path's model and optimizer. With a fused AdamW
    (the fast path on a GPU) it reads no device value on the host, so the CPU queues the next step while the
    GPU still runs this one; with the for-each AdamW (the reference path) train.optimizer_step reads the
    finite flag once a step, as train.main does with that optimizer. path.train_syncs adds, to every step,
    the two reads train.main makes only at its log and checkpoint steps: the finite flag, and the preemption
    flag that several ranks agree on (a flag tensor on the device, read back; the all-reduce itself left
    out)."""
    loss, _, finite = train.train_step(state, [batch], step, args)
    if path.train_syncs:
        bool(finite)
        bool(torch.tensor(0.0, device=loss.device).item())
    return loss
