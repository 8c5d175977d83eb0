"""The baseline recipes: the published DiT checkpoint layout maps onto --cond adaln with identical outputs,
the XL/2 presets have the published parameter counts, and --init-from reports what it loaded, skipped and
initialised."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sample
import train
from build import load_model
from checkpoint import from_dit
from conftest import TINY, losses, random_dit_state_dict
from mdt import build_mdt
from model import DiffusionTransformer, build_model, count_params
from unet import build_unet

#################################################################################
#          An independent DiT forward, written from its published layout         #
#################################################################################


def dit_forward(sd, x, k, y, heads, patch=2):
    """DiT(x, t = integer step k, y): patchify + pos, t + y embedding, adaLN-Zero blocks, final layer,
    unpatchify."""
    B, C, H, W = x.shape
    D = sd["pos_embed"].shape[-1]
    ln = lambda h: F.layer_norm(h, (D,), eps=1e-6)
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = k.float()[:, None] * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                 sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t + sd["y_embedder.embedding_table.weight"][y]
    depth = len({n.split(".")[1] for n in sd if n.startswith("blocks.")})
    for i in range(depth):
        p = lambda n: (sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"])
        s1, sc1, g1, s2, sc2, g2 = F.linear(F.silu(c), *p("adaLN_modulation.1")).chunk(6, dim=1)
        N = h.shape[1]
        qkv = F.linear(mod(ln(h), s1, sc1), *p("attn.qkv")).reshape(B, N, 3, heads, D // heads)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ kk.transpose(-2, -1) * (D // heads) ** -0.5, dim=-1) @ v
        h = h + g1[:, None] * F.linear(a.transpose(1, 2).reshape(B, N, D), *p("attn.proj"))
        m = F.linear(F.gelu(F.linear(mod(ln(h), s2, sc2), *p("mlp.fc1")), approximate="tanh"), *p("mlp.fc2"))
        h = h + g2[:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(mod(ln(h), shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    gh, gw, co = H // patch, W // patch, out.shape[-1] // patch ** 2
    out = out.reshape(B, gh, gw, patch, patch, co)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, co, H, W)


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    k = torch.tensor([0, 417, 999])
    y = torch.tensor([3, 7, 10])  # 10 = the null class
    ctrl = torch.randn(3, 7, generator=g).abs() * 100  # anything: the mapped model must ignore it
    return x, k, y, ctrl


def test_dit_state_dict_maps_onto_adaln_with_identical_outputs():
    sd = random_dit_state_dict()
    model = DiffusionTransformer(input_size=8, patch=2, in_channels=4, out_channels=8, depth=2, width=64,
                                 heads=2, num_classes=10, cond="adaln", qk_norm=False).eval()
    mapped = from_dit(sd, 64)[0]
    assert set(model.state_dict()) - set(mapped) == {f"c_embed.mlps.{g}.0.{w}" for g in ("size", "crop",
                                                                                         "flip")
                                                     # kept from our initialisation
                                                     for w in ("weight", "bias")}
    model.load_state_dict({**model.state_dict(), **mapped})
    x, k, y, ctrl = dit_inputs()
    ref = dit_forward(sd, x, k, y, heads=2)
    out = model(x, k.float() / 1000, y, ctrl)
    assert out.shape == (3, 8, 8, 8)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    bad = dict(sd, pos_embed=sd["pos_embed"].flip(-1))
    with pytest.raises(ValueError, match="positional embedding"):
        from_dit(bad, 64)


@pytest.mark.slow
def test_dit_file_loads_through_init_from_and_sample(tmp_path, capsys):
    """An official-format .pt: --init-from maps it (and refuses a model it cannot match); sample.py builds the
    DiT recipe (adaln, no QK-norm, ddpm + learned sigma) from the file alone."""
    sd = random_dit_state_dict(depth=2, width=64, classes=1000)
    path = str(tmp_path / "DiT-T-2.pt")
    torch.save(sd, path)
    trained = load_model(path, "cpu")
    model, args, facts = trained.model, trained.args, trained.facts
    assert (args.model, args.cond, args.objective, args.learn_sigma) == ("T/2", "adaln", "ddpm", True)
    assert facts.res == 64
    x, k, y, ctrl = dit_inputs()
    assert torch.allclose(model(x, k.float() / 1000, y, ctrl), dit_forward(sd, x, k, y, heads=2), atol=1e-4)
    target = DiffusionTransformer(input_size=8, patch=2, in_channels=4, out_channels=8, depth=2, width=64,
                                  heads=2, num_classes=1000, cond="adaln", qk_norm=False)
    loaded, skipped, new = train.init_from(target, path)
    assert not skipped and len(loaded) + len(new) == len(target.state_dict())
    assert all(n.startswith("c_embed.mlps.") for n in new)  # only the control MLPs' input layers are DiT-less
    with pytest.raises(SystemExit, match="needs --cond adaln"):
        train.init_from(DiffusionTransformer(input_size=8, patch=2, in_channels=4, depth=2, width=64, heads=2,
                                             num_classes=1000, cond="ours"), path)


@pytest.mark.slow
def test_init_from_reports_loaded_skipped_and_new(tmp_path, capsys):
    """From an adaln checkpoint into an ours model: shared tensors load, the context streams are new."""
    src = build_model("T/4", input_size=16, in_channels=3, num_classes=10, cond="adaln")
    path = str(tmp_path / "ckpt.pt")
    torch.save({"ema": src.state_dict(), "model": src.state_dict()}, path)
    dst = build_model("T/4", input_size=16, in_channels=3, num_classes=10, cond="ours", class_tokens=2,
                      qk_norm=False)
    loaded, skipped, new = train.init_from(dst, path)
    assert "x_embed.weight" in loaded and "blocks.0.img.qkv.weight" in loaded
    assert any(s.startswith("y_embed.table.weight") for s in skipped)  # 1 token -> 2 tokens: shape differs
    assert any(n.startswith("blocks.0.ctx.") for n in new)
    assert torch.equal(dst.state_dict()["blocks.1.img.mlp.0.weight"],
                       src.state_dict()["blocks.1.img.mlp.0.weight"])
    out = capsys.readouterr().out
    assert "skipped: y_embed.table.weight" in out and "new (initialised): blocks.0.ctx" in out


#################################################################################
#                 XL/2 parameter counts against the published ones              #
#################################################################################
# Published: DiT-XL/2 675 M (DiT paper, Table 4; 675,129,632 in its code, counting the 0.3 M fixed positional
# embedding it stores as a parameter), PixArt-alpha-XL/2 611 M without the text encoder (PixArt-alpha paper).
# Our counts leave out the control embedder (4.1 M), which the published models do not have.

def xl2(build=build_model, **kw):
    with torch.device("meta"):
        m = build("XL/2", input_size=32, in_channels=4, num_classes=1000, **kw)
    return count_params(m) - count_params(m.c_embed)


def test_xl2_parameter_counts_match_the_published_ones():
    dit = xl2(cond="adaln", out_channels=8, qk_norm=False)
    # exactly DiT's count once its stored positional embedding is added
    assert dit + 256 * 1152 == 675_129_632
    pixart = xl2(cond="xattn", out_channels=8)
    # PixArt's caption projection (4096 -> 1152 -> 1152) takes the place of our class table (1001 x 1152)
    caption = 4096 * 1152 + 1152 + 1152 * 1152 + 1152
    assert abs(pixart - 1001 * 1152 + caption - 611e6) / 611e6 < 0.02
    assert abs(pixart - 611e6) / 611e6 < 0.02


def test_xl2_parameter_counts_are_the_ones_docs_baselines_quotes():
    """docs/baselines.md's table of parameter counts (without the control embedder) is this code's."""
    assert xl2(cond="adaln", out_channels=8, qk_norm=False) == 674_834_720
    assert xl2(cond="xattn", out_channels=8) == 605_961_248
    assert xl2(build_mdt, cond="adaln", out_channels=8) == 741_226_784
    assert xl2(cond="mmdit") == 1_329_561_232 and xl2(cond="ours") == 1_326_904_720
    with torch.device("meta"):
        unet = build_unet("G4", input_size=32, in_channels=4, num_classes=1000, cond="xattn")
    assert count_params(unet) == 403_298_948  # with the control embedder and the class table


#################################################################################
#          Every baseline recipe trains and samples through the same loop       #
#################################################################################

RECIPES = {name: ["--recipe", name] for name in ("dit", "pixart", "sd3", "mdt")}
RECIPES["ldm"] = ["--recipe", "ldm", "--model", "XS"]  # after TINY's transformer size: the UNet's smallest


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_each_baseline_trains_and_samples_with_guidance(recipe, tmp_path):
    if recipe == "mdt":
        pytest.importorskip("adan_pytorch")
    run = train.main(TINY + RECIPES[recipe] + ["--steps", "6", "--out", str(tmp_path), "--cfg-scale", "3",
                                               "--sample-steps", "4"])
    log = losses(run)
    assert len(log) == 6 and all(math.isfinite(v) for v in log.values())
    # a grid with guidance (two branches per step) and a control-guided npz (three branches) from the
    # checkpoint
    out = str(tmp_path / "grid.png")
    sample.main(["--ckpt", run, "--out", out, "--classes", "0,1", "--seeds", "1", "--steps", "3",
                 "--cfg-scale", "1,3"])
    npz = str(tmp_path / "s.npz")
    sample.main(["--ckpt", run, "--out", npz, "--num-samples", "3", "--steps", "2", "--cfg-scale", "2",
                 "--ctrl-scale", "1", "--batch", "2"])
    with np.load(npz) as z:
        assert z["arr_0"].shape == (3, 16, 16, 3)
