"""model.py: shapes, zero-init identity, the routes' conditioning (a route is one table row), positional
embeddings, attention masking. (mDT-v2's own behaviour: test_mdt.py.)"""
import pytest
import torch

from conditioning import CONTROL_GROUPS, SIGNAL, make_control
from config import get_args
from conftest import model_inputs, perturb, tiny_model
from mdt import MDTv2, build_mdt
from model import (
    CONDS,
    ROUTES,
    SIZES,
    DiffusionTransformer,
    JointBlock,
    Route,
    build_model,
    count_params,
    sincos_1d,
    sincos_2d,
)

ROUTES_AND_ARCHS = [(c, "dit") for c in CONDS] + [("adaln", "mdt"), ("ours", "mdt")]


@pytest.mark.parametrize("cond,arch", ROUTES_AND_ARCHS)
def test_forward_backward_shapes(cond, arch):
    """Every parameter gets a gradient (DDP requires it): in training mode mDT returns the unmasked and the
    masked prediction stacked, so the side block and the mask token are used too."""
    model = perturb(tiny_model(cond, arch))
    x, t, y, c = model_inputs()
    out = model(x, t, y, c, ctrl_drop=torch.tensor([True, False, False]))
    assert out.shape == ((6,) if arch == "mdt" else (3,)) + x.shape[1:]
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert model.eval()(x, t, y, c).shape == x.shape  # sampling: one unmasked pass


@pytest.mark.parametrize("cond,arch", ROUTES_AND_ARCHS)
def test_fresh_model_outputs_zero_and_adaln_zero_blocks_are_identity(cond, arch):
    model = tiny_model(cond, arch)
    x, t, y, c = model_inputs()
    assert torch.equal(model(x, t, y, c), torch.zeros(2 * 3 if arch == "mdt" else 3, *x.shape[1:]))
    cond_vector, ctx, _ = model.condition(t, y, c)
    tokens = torch.randn(3, 16, model.width)
    # PixArt-alpha init: random per-block offsets, but the cross-attention starts switched off
    if cond == "xattn":
        shared = model.t_block(cond_vector)
        for block in model.blocks:
            assert torch.equal(block(tokens, ctx, shared)[0], block(tokens, torch.randn_like(ctx), shared)[0])
        return
    for i, block in enumerate(model.blocks):
        out, ctx_out = block(tokens, ctx, cond_vector, skip=tokens)
        if block.skip is None:
            assert torch.equal(out, tokens)
        if ctx is not None and i < len(model.blocks) - 1:
            assert torch.equal(ctx_out, ctx)


def test_ours_keeps_semantics_out_of_adaln_and_gates_control():
    model = perturb(tiny_model("ours"))
    x, t, y, c = model_inputs()
    vector_a = model.condition(t, y, c)[0]
    vector_b = model.condition(t, (y + 1) % 10, c)[0]
    assert torch.equal(vector_a, vector_b)  # the class only reaches the model through tokens
    bigger = c.clone()
    bigger[:, SIGNAL["orig_h"]] = bigger[:, SIGNAL["orig_w"]] = 64
    ones, zeros = torch.ones(3), torch.zeros(3)
    # at pure noise the size gate is closed: changing the original size changes nothing
    assert torch.allclose(model.condition(ones, y, c)[0], model.condition(ones, y, bigger)[0], atol=1e-6)
    assert not torch.allclose(model.condition(zeros, y, c)[0], model.condition(zeros, y, bigger)[0])
    flipped = c.clone()
    flipped[:, SIGNAL["flip"]] = 1 - flipped[:, SIGNAL["flip"]]  # the flip gate is open everywhere
    assert not torch.allclose(model.condition(ones, y, c)[0], model.condition(ones, y, flipped)[0])


@pytest.mark.parametrize("cond", ["adaln", "mmdit"])
def test_baselines_add_semantics_into_adaln(cond):
    model = perturb(tiny_model(cond))
    x, t, y, c = model_inputs()
    assert not torch.equal(model.condition(t, y, c)[0], model.condition(t, (y + 1) % 10, c)[0])
    assert (model.condition(t, y, c)[1] is None) == (cond == "adaln")


def test_mmdit_embeds_the_pooled_vector_through_its_own_mlp():
    """SD3: adaLN = time embedding + MLP(pooled) (Linear -> SiLU -> Linear), here + the ungated control; adaln
    (DiT) adds the class embedding itself."""
    model = perturb(tiny_model("mmdit"))
    x, t, y, c = model_inputs()
    tokens, pooled = model.y_embed(y)
    mlp = model.pool_embed
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear]
    expected = model.t_embed(t) + model.c_embed(c).sum(1) + mlp[2](torch.nn.functional.silu(mlp[0](pooled)))
    torch.testing.assert_close(model.condition(t, y, c)[0], expected)
    assert not hasattr(tiny_model("adaln"), "pool_embed") and not hasattr(tiny_model("ours"), "pool_embed")


def test_xattn_is_adaln_single_with_cross_attention():
    """PixArt-alpha: one shared modulation MLP (blocks only hold a (6, D) offset table); the class reaches the
    model only through cross-attention; QK-norm off as published."""
    model = perturb(tiny_model("xattn"))
    assert all(not hasattr(b.img, "ada") and b.img.table.shape == (6, model.width) for b in model.blocks)
    assert all(b.cross is not None and b.ctx is None for b in model.blocks)
    assert isinstance(model.blocks[0].img.q_norm, torch.nn.Identity)
    x, t, y, c = model_inputs()
    assert torch.equal(model.condition(t, y, c)[0], model.condition(t, (y + 1) % 10, c)[0])
    assert not torch.allclose(model(x, t, y, c), model(x, t, (y + 1) % 10, c))


def test_unpatchify_is_dits_layout_and_ends_forward():
    """unpatchify lays the patches out as DiT's einsum 'nhwpqc->nchpwq' does (here on a non-square grid), and
    forward returns exactly unpatchify of the final layer's output."""
    model = perturb(tiny_model("ours"))
    p, C = model.patch, model.out_channels
    tokens = torch.randn(2, 2 * 3, p * p * C)  # a 2 x 3 grid of patches
    ref = torch.einsum("nhwpqc->nchpwq", tokens.reshape(2, 2, 3, p, p, C)).reshape(2, C, 2 * p, 3 * p)
    assert torch.equal(model.unpatchify(tokens, 2 * p, 3 * p), ref)
    final = []
    model.final.register_forward_hook(lambda m, i, o: final.append(o))
    x, t, y, c = model_inputs()
    assert torch.equal(model(x, t, y, c), model.unpatchify(final[0], *x.shape[-2:]))


def test_pos_embed_resample_and_extend():
    base = sincos_2d(64, 4, 4, 4, 4)
    big = sincos_2d(64, 8, 8, 4, 4, "resample").view(8, 8, 64)
    assert torch.allclose(big[::2, ::2].reshape(16, 64), base, atol=1e-6)  # even positions = the base grid
    ext = sincos_2d(64, 8, 8, 4, 4, "extend").view(8, 8, 64)
    assert torch.allclose(ext[:4, :4].reshape(16, 64), base, atol=1e-6)  # the base grid's corner is unchanged
    assert not torch.allclose(ext[4:, 4:], big[4:, 4:])
    # a non-square grid: one factor for both axes keeps the aspect ratio (2x the tokens -> positions /
    # sqrt(2))
    wide = sincos_2d(64, 4, 8, 4, 4, "resample").view(4, 8, 64)
    s = 2 ** -0.5
    # the column half of the features, integer positions
    row_pos = sincos_2d(64, 1, 8, 4, 4, "extend")[:, :32]
    assert torch.allclose(wide[0, :, :32], sincos_1d(32, torch.arange(8) * s).float(), atol=1e-6)
    assert torch.allclose(wide[:, 0, 32:], sincos_1d(32, torch.arange(4) * s).float(), atol=1e-6)
    assert not torch.allclose(wide[0, :, :32], row_pos)
    # no more tokens than the base: integer positions in both modes
    assert torch.allclose(sincos_2d(64, 2, 4, 4, 4, "resample"), sincos_2d(64, 2, 4, 4, 4, "extend"))


def test_non_square_and_larger_inputs():
    model = perturb(tiny_model("ours"))
    x, t, y, _ = model_inputs()
    for h, w in [(16, 32), (32, 16), (32, 32)]:
        c = torch.stack([make_control(h, w, 0, 0, 0, (h * w) ** 0.5, w / h)] * 3)
        assert model(torch.randn(3, 3, h, w), t, y, c).shape == (3, 3, h, w)
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(torch.randn(3, 3, 18, 16), t, y, c)


def test_padded_context_tokens_are_masked():
    block = JointBlock(32, 2)
    perturb(block)
    x, c, cond_vector = torch.randn(2, 9, 32), torch.randn(2, 4, 32), torch.randn(2, 32)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    c2 = c.clone()
    c2[~mask] = torch.randn(int((~mask).sum()), 32) * 10
    out1, _ = block(x, c, cond_vector, mask)
    out2, _ = block(x, c2, cond_vector, mask)
    assert torch.allclose(out1, out2, atol=1e-5)
    assert not torch.allclose(block(x, c, cond_vector)[0], block(x, c2, cond_vector)[0])


def test_joint_attention_matches_a_plain_reference():
    """SDPA over [context; image] equals softmax(q k^T / sqrt(d)) v written out by hand."""
    block = perturb(JointBlock(32, 2))
    x, c, cond_vector = torch.randn(2, 9, 32), torch.randn(2, 3, 32), torch.randn(2, 32)
    qi, ki, vi, img_modulation = block.img.pre_attention(x, cond_vector)
    qc, kc, vc, _ = block.ctx.pre_attention(c, cond_vector)
    q, k, v = torch.cat([qc, qi], 2), torch.cat([kc, ki], 2), torch.cat([vc, vi], 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    ref_x = block.img.post_attention(x, attn[:, :, 3:], img_modulation)
    assert torch.allclose(block(x, c, cond_vector)[0], ref_x, atol=1e-5)


def test_presets_and_bad_names(capsys):
    assert set(SIZES) >= {"XL", "L", "B", "S"}
    m = build_model("S/8", input_size=32, in_channels=4, num_classes=10)
    assert len(m.blocks) == 12 and m.width == 384 and count_params(m) > 1e6
    with pytest.raises(ValueError, match="unknown --model"):
        build_model("no-such-size/2")
    kw = dict(input_size=16, in_channels=3, num_classes=10)
    assert type(build_model("T/4", **kw)) is DiffusionTransformer
    assert type(build_mdt("T/4", **kw)) is MDTv2
    with pytest.raises(SystemExit) as refused:  # --arch picks the builder (build.make_model)
        get_args(["--arch", "no-such-arch"])
    assert refused.value.code == 2 and "invalid choice: 'no-such-arch'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown --cond"):
        tiny_model("no-such-route")
    with pytest.raises(ValueError, match="not divisible"):
        build_model("T/4", input_size=18, in_channels=3, num_classes=10)


#################################################################################
#                   A route is one row of ROUTES                                #
#################################################################################

def test_a_route_with_control_tokens_and_no_adaln_terms_is_one_table_row(monkeypatch):
    """A `concat`-style route, added as one row: the control groups' embeddings join the semantic tokens in
    the context, and the adaLN vector is the time embedding alone. It trains (every parameter gets a
    gradient) and samples, and the control reaches the image only through the tokens."""
    concat = Route("joint", ("semantic", "control"), True, "ada", (), "a test")
    monkeypatch.setitem(ROUTES, "probe-concat", concat)
    model = perturb(tiny_model("probe-concat"))
    x, t, y, c = model_inputs()
    cond_vector, ctx, mask = model.condition(t, y, c)
    assert torch.equal(cond_vector, model.t_embed(t)) and mask is None
    assert ctx.shape == (3, model.y_embed.tokens + len(CONTROL_GROUPS), model.width)
    assert torch.equal(ctx[:, -len(CONTROL_GROUPS):], model.c_embed(c))
    model(x, t, y, c, ctrl_drop=torch.tensor([True, False, False])).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    flipped = c.clone()
    flipped[:, SIGNAL["flip"]] = 1 - flipped[:, SIGNAL["flip"]]
    assert torch.equal(model.condition(t, y, flipped)[0], cond_vector)
    assert not torch.allclose(model.eval()(x, t, y, c), model(x, t, y, flipped))


def test_a_route_that_does_not_hold_together_is_refused(monkeypatch):
    """Terms outside the tables, context tokens with nothing to read them, or an attention with nothing to
    read, each say what is wrong."""
    bad = {"probe-term": Route("joint", ("no-such-term",), True, "ada", (), "a test"),
           "probe-unread": Route(None, ("semantic",), False, "ada", ("control",), "a test"),
           "probe-empty": Route("cross", (), False, "single", ("control",), "a test")}
    for name, route in bad.items():
        monkeypatch.setitem(ROUTES, name, route)
    with pytest.raises(ValueError, match="unknown terms.*no-such-term"):
        tiny_model("probe-term")
    for name in ("probe-unread", "probe-empty"):
        with pytest.raises(ValueError, match="need an attention"):
            tiny_model(name)
