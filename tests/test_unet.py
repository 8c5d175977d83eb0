"""unet.py: the LDM-4-G baseline: shapes, zero output at init, training signal, conditioning routes, published
size."""
import pytest
import torch
import torch.nn.functional as F

from conditioning import make_control
from conftest import perturb
from model import ROUTES
from unet import UNET_CONDS, UNET_SIZES, Attention, build_unet

NUM_CLASSES = 10


def tiny(cond="xattn", **kw):
    return build_unet("XS", input_size=8, in_channels=4, num_classes=NUM_CLASSES, cond=cond, **kw)


def inputs(b=4, h=8, w=8):
    g = torch.Generator().manual_seed(1)
    ctrl = torch.stack([make_control(256 + 64 * i, 256, 8 * i, 0, i % 2, 256) for i in range(b)])
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    return torch.randn(b, 4, h, w, generator=g), torch.rand(b, generator=g), y, ctrl


@pytest.mark.parametrize("cond", UNET_CONDS)
def test_fresh_model_outputs_exactly_zero(cond):
    x, t, y, c = inputs()
    out = tiny(cond)(x, t, y, c)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("cond", UNET_CONDS)
def test_training_steps_reach_every_parameter(cond):
    """Zero-init means the first step only trains the output conv; within three steps every tensor has a
    gradient."""
    torch.manual_seed(0)
    model = tiny(cond)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, y, c = inputs()
    y[0] = NUM_CLASSES  # the null class and a dropped control also see gradient, as in guidance training
    drop = torch.tensor([True, False, False, False])
    target = torch.randn_like(x)
    for step in range(3):
        opt.zero_grad()
        out = model(x, t, y, c, drop)
        loss = F.mse_loss(out, target)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        if step == 0:
            with torch.no_grad():
                assert model(x, t, y, c, drop).abs().max() > 0  # one update and the output is no longer 0
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"no gradient reached {dead}"


def test_non_square_input_and_bad_sizes():
    model = perturb(build_unet("XS", input_size=8, num_classes=NUM_CLASSES, channel_mult=(1, 2, 2),
                               attention_ds=(2, 4)))  # downsampling 4: token maps 4 x 6 and 2 x 3
    x, t, y, c = inputs(b=2, h=8, w=12)
    out = model(x, t, y, c)
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(2, 4, 8, 10), t, y, c)
    with pytest.raises(ValueError, match="not divisible"):
        build_unet("XS", input_size=9)


def test_out_channels_default_and_override():
    assert tiny().out_channels == 4
    model = perturb(build_unet("XS", input_size=8, in_channels=4, out_channels=8))
    x, t, y, c = inputs(b=2)
    assert model(x, t, y, c).shape == (2, 8, 8, 8)


def test_class_changes_output_and_null_row_exists():
    model = perturb(tiny())
    assert model.y_embed.num_classes == NUM_CLASSES
    assert model.y_embed.table.num_embeddings == NUM_CLASSES + 1  # the last row is the null class
    x, t, _, c = inputs(b=1)
    with torch.no_grad():
        outs = [model(x, t, torch.tensor([k]), c) for k in (3, 5, NUM_CLASSES)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_gates_off_make_output_independent_of_control():
    off = {"size": "off", "crop": "off", "flip": "off"}
    x, t, y, c = inputs(b=2)
    c2 = torch.stack([make_control(640, 480, 37, 11, 1 - i, 512, aspect=0.75) for i in range(2)])
    with torch.no_grad():
        gated = perturb(tiny("ours", gates=off))
        assert torch.equal(gated(x, t, y, c), gated(x, t, y, c2))
        # the ungated route does read the control, so the check above means something
        additive = perturb(tiny("xattn"))
        assert not torch.allclose(additive(x, t, y, c), additive(x, t, y, c2))
        # a dropped control is the learned null: control no longer matters
        drop = torch.ones(2, dtype=torch.bool)
        assert torch.equal(additive(x, t, y, c, drop), additive(x, t, y, c2, drop))


def test_sdpa_attention_matches_plain_reference():
    torch.manual_seed(0)
    attn = Attention(dim=32, heads=4, context_dim=16)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 3, 16)
    heads = lambda z: z.view(2, z.shape[1], 4, 8).transpose(1, 2)  # (B, heads, L, 8)
    q, k, v = heads(attn.q(x)), heads(attn.k(ctx)), heads(attn.v(ctx))
    ref = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v
    ref = attn.out(ref.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(attn(x, ctx), ref, rtol=1e-5, atol=1e-5)


def test_the_unet_follows_the_routes_table():
    """UNET_CONDS comes from model.ROUTES (the routes with the semantic tokens as their only context and only
    control terms in the vector), and the embedding is e_t plus the route's adaLN terms."""
    assert UNET_CONDS == ("ours", "xattn")
    x, t, y, c = inputs()
    for cond in UNET_CONDS:
        model = perturb(tiny(cond))
        e_ctrl = model.c_embed(c)
        control = model.c_embed.gated(e_ctrl, t) if ROUTES[cond].gated else e_ctrl.sum(1)
        assert torch.equal(model.embedding(t, c), model.t_embed(t) + control)


def test_bad_options_name_the_choices():
    with pytest.raises(ValueError, match="ours"):
        tiny("adaln")
    with pytest.raises(ValueError, match="G4"):
        build_unet("XL")


def test_g4_matches_the_published_parameter_count():
    """LDM prints 'DiffusionWrapper has 400.92 M params.' for cin256-v2 (its UNet, without the class
    table)."""
    published = 400.92e6
    with torch.device("meta"):  # 400 M parameters, no memory
        ours = build_unet("G4")
        ldm = build_unet("G4", in_channels=3)  # the f = 4 VQ latents of the published model
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert abs(count(ours) - published) / published < 0.02
    unet_only = count(ldm) - count(ldm.c_embed) - count(ldm.y_embed)
    assert round(unet_only / 1e6, 2) == 400.92
    assert count(ldm.y_embed) == 1001 * 512  # LDM's ClassEmbedder(n_classes=1001, embed_dim=512)
    assert set(UNET_SIZES) >= {"G4", "S", "XS"}
