"""Reference equivalence against diffusers, the published implementations of the baselines' parts: our `--cond
mmdit` model is SD3's `SD3Transformer2DModel`, our `--cond xattn` model is PixArt-alpha's
`PixArtTransformer2DModel`, the flow shift is `FlowMatchEulerDiscreteScheduler`'s, positional-embedding
resampling is `get_2d_sincos_pos_embed`'s interpolation, and the DDPM schedules are `DDPMScheduler`'s. Every
weight is perturbed away from its initialisation before it is mapped over, so no zero-initialised layer hides
a difference. Where we differ by design, the test says how."""
import math

import pytest
import torch

from conditioning import make_control
from ddpm import Chain, ddpm_betas
from diffusion import T_MIN, Sampling, shift_time, time_grid
from model import build_model, sincos_2d

diffusers = pytest.importorskip("diffusers")

WIDTH, HEADS, SIZE, PATCH, CHANNELS = 64, 2, 8, 2, 4


def perturbed(model, seed=0, std=0.1):
    """Every parameter and buffer of `model` replaced by its value plus Gaussian noise (a table of ones
    too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def silence_control(model):
    """Zero the control MLPs' output layers: the reference models have no control metadata, so e_ctrl must be
    0."""
    with torch.no_grad():
        for mlp in model.c_embed.mlps.values():
            mlp[2].weight.zero_()
            mlp[2].bias.zero_()
    return model


def split_qkv(state, prefix):
    """Our fused (3 D, D) qkv projection -> the three (D, D) ones, weights and biases."""
    w, b = state[f"{prefix}.qkv.weight"].chunk(3), state[f"{prefix}.qkv.bias"].chunk(3)
    return w, b


def swap_halves(t):
    """(shift, scale) rows -> (scale, shift): diffusers' AdaLayerNormContinuous reads its Linear the other way
    round."""
    a, b = t.chunk(2)
    return torch.cat([b, a])


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g)
    ctrl = torch.stack([make_control(8, 8, 0, 0, i % 2, 8) for i in range(batch)])
    return x, g, ctrl


#################################################################################
#                       --cond mmdit == SD3Transformer2DModel                   #
#################################################################################

def sd3_state_dict(ours, depth):
    """Our mmdit model's weights under SD3Transformer2DModel's names. The context embedder (SD3's Linear from
    the text encoder's width) is the identity: our class tokens are the context tokens themselves."""
    s, out = ours.state_dict(), {}
    out["pos_embed.proj.weight"], out["pos_embed.proj.bias"] = s["x_embed.weight"], s["x_embed.bias"]
    for a, b in (("timestep_embedder.linear_1", "t_embed.mlp.0"), ("timestep_embedder.linear_2",
                                                                   "t_embed.mlp.2"),
                 ("text_embedder.linear_1", "pool_embed.0"), ("text_embedder.linear_2", "pool_embed.2")):
        for kind in ("weight", "bias"):
            out[f"time_text_embed.{a}.{kind}"] = s[f"{b}.{kind}"]
    out["context_embedder.weight"], out["context_embedder.bias"] = torch.eye(WIDTH), torch.zeros(WIDTH)
    for i in range(depth):
        d, o = f"transformer_blocks.{i}", f"blocks.{i}"
        last = i == depth - 1
        out[f"{d}.norm1.linear.weight"], out[f"{d}.norm1.linear.bias"] = s[f"{o}.img.ada.1.weight"], \
            s[f"{o}.img.ada.1.bias"]
        ctx_w, ctx_b = s[f"{o}.ctx.ada.1.weight"], s[f"{o}.ctx.ada.1.bias"]
        out[f"{d}.norm1_context.linear.weight"] = swap_halves(ctx_w) if last else ctx_w
        out[f"{d}.norm1_context.linear.bias"] = swap_halves(ctx_b) if last else ctx_b
        for stream, names, norms in (("img", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")),
                                     ("ctx", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                      ("norm_added_q", "norm_added_k"))):
            w, b = split_qkv(s, f"{o}.{stream}")
            for name, wi, bi in zip(names, w, b):
                out[f"{d}.attn.{name}.weight"], out[f"{d}.attn.{name}.bias"] = wi, bi
            out[f"{d}.attn.{norms[0]}.weight"] = s[f"{o}.{stream}.q_norm.weight"]
            out[f"{d}.attn.{norms[1]}.weight"] = s[f"{o}.{stream}.k_norm.weight"]
        pairs = [("attn.to_out.0", "img.proj"), ("ff.net.0.proj", "img.mlp.0"), ("ff.net.2", "img.mlp.2")]
        if not last:  # the last block's context stream is pre-only: no output projection, no MLP
            pairs += [("attn.to_add_out", "ctx.proj"), ("ff_context.net.0.proj", "ctx.mlp.0"),
                      ("ff_context.net.2", "ctx.mlp.2")]
        for a, b in pairs:
            out[f"{d}.{a}.weight"], out[f"{d}.{a}.bias"] = s[f"{o}.{b}.weight"], s[f"{o}.{b}.bias"]
    out["norm_out.linear.weight"] = swap_halves(s["final.ada.1.weight"])
    out["norm_out.linear.bias"] = swap_halves(s["final.ada.1.bias"])
    out["proj_out.weight"], out["proj_out.bias"] = s["final.linear.weight"], s["final.linear.bias"]
    return out


def test_mmdit_route_equals_diffusers_sd3_transformer():
    depth = 2
    torch.manual_seed(0)
    ours = silence_control(perturbed(build_model("T/2", cond="mmdit", input_size=SIZE, in_channels=CHANNELS,
                                                 num_classes=10, class_tokens=3))).eval()
    ref = diffusers.SD3Transformer2DModel(
        sample_size=SIZE, patch_size=PATCH, in_channels=CHANNELS, num_layers=depth,
                                          attention_head_dim=WIDTH // HEADS,
        num_attention_heads=HEADS, joint_attention_dim=WIDTH, caption_projection_dim=WIDTH,
        pooled_projection_dim=WIDTH, out_channels=CHANNELS, pos_embed_max_size=None,
                                          qk_norm="rms_norm").eval()
    ref.load_state_dict(sd3_state_dict(ours, depth))  # strict: every tensor of the reference is set
    x, g, ctrl = inputs()
    t, y = torch.rand(3, generator=g), torch.tensor([0, 4, 9])
    with torch.no_grad():
        tokens, pooled = ours.y_embed(y)
        mine = ours(x, t, y, ctrl)
        theirs = ref(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                     # SD3's pipelines pass sigma x 1000, as our time embedder scales t
                     timestep=t * 1000).sample
    assert mine.abs().max() > 0.1  # a live network, not two zeros
    assert (mine - theirs).abs().max() < 1e-5


#################################################################################
#                     --cond xattn == PixArtTransformer2DModel                  #
#################################################################################

TEXT_DIM, TEXT_LEN = 48, 6


def pixart_state_dict(ours, depth):
    """Our xattn text model's weights under PixArtTransformer2DModel's names (its caption projection is our
    TextEmbedder's projection, its adaLN-single our t_block and per-block tables)."""
    s, out = ours.state_dict(), {}
    renames = [("pos_embed.proj", "x_embed"), ("adaln_single.emb.timestep_embedder.linear_1",
                                               "t_embed.mlp.0"),
               ("adaln_single.emb.timestep_embedder.linear_2", "t_embed.mlp.2"),
               ("adaln_single.linear", "t_block.1"),
               ("caption_projection.linear_1", "y_embed.proj.0"), ("caption_projection.linear_2",
                                                                   "y_embed.proj.2"),
               ("proj_out", "final.linear")]
    for a, b in renames:
        out[f"{a}.weight"], out[f"{a}.bias"] = s[f"{b}.weight"], s[f"{b}.bias"]
    out["scale_shift_table"] = s["final.table"]
    for i in range(depth):
        d, o = f"transformer_blocks.{i}", f"blocks.{i}"
        out[f"{d}.scale_shift_table"] = s[f"{o}.img.table"]
        w, b = split_qkv(s, f"{o}.img")
        for name, wi, bi in zip(("to_q", "to_k", "to_v"), w, b):
            out[f"{d}.attn1.{name}.weight"], out[f"{d}.attn1.{name}.bias"] = wi, bi
        kw, kb = s[f"{o}.cross.kv.weight"].chunk(2), s[f"{o}.cross.kv.bias"].chunk(2)
        out[f"{d}.attn2.to_k.weight"], out[f"{d}.attn2.to_v.weight"] = kw
        out[f"{d}.attn2.to_k.bias"], out[f"{d}.attn2.to_v.bias"] = kb
        for a, b in (("attn1.to_out.0", "img.proj"), ("attn2.to_q", "cross.q"),
                     ("attn2.to_out.0", "cross.proj"),
                     ("ff.net.0.proj", "img.mlp.0"), ("ff.net.2", "img.mlp.2")):
            out[f"{d}.{a}.weight"], out[f"{d}.{a}.bias"] = s[f"{o}.{b}.weight"], s[f"{o}.{b}.bias"]
    return out


def test_xattn_route_equals_diffusers_pixart_transformer():
    depth = 2
    torch.manual_seed(0)
    text = dict(text_dim=TEXT_DIM, max_length=TEXT_LEN, pad="zero", pad_noise=0.0, null="learned")
    ours = silence_control(perturbed(build_model("T/2", cond="xattn", input_size=SIZE, in_channels=CHANNELS,
                                                 out_channels=2 * CHANNELS, text=text))).eval()
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, in_channels=CHANNELS,
                                             out_channels=2 * CHANNELS,
        num_layers=depth, cross_attention_dim=WIDTH, sample_size=SIZE, patch_size=PATCH,
                                             caption_channels=TEXT_DIM,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                             use_additional_conditions=False,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000).eval()
    ref.load_state_dict(pixart_state_dict(ours, depth))
    x, g, ctrl = inputs()
    features = torch.randn(3, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.arange(TEXT_LEN)[None] < torch.tensor([[6], [3], [1]])  # prompts of 6, 3 and 1 tokens
    k = torch.tensor([0, 417, 999])  # DDPM steps; our network reads k / 1000
    with torch.no_grad():
        mine = ours(x, k.float() / 1000, (features, mask), ctrl)
        theirs = ref(x, encoder_hidden_states=features, timestep=k, encoder_attention_mask=mask.long(),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert mine.abs().max() > 0.1
    assert (mine - theirs).abs().max() < 1e-5


#################################################################################
#                       Schedules and positional embeddings                     #
#################################################################################

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift_equals_flow_match_euler_scheduler(shift):
    """SD3's shift of a sigma grid is ours, value for value: given our unshifted levels as its sigmas,
    diffusers' scheduler shifts them to our time grid (here the grid before the fixed end point, t_min = 0:
    N + 1 levels evenly from 1 to 0, whose last level before data is t = 1/N before the shift). Its default
    grid is ours with a fixed end point: N levels evenly (before the shift) from 1 down to a level that does
    not depend on N -- its smallest training sigma, the shifted t = 0.001, shifted once more (0.001 at shift
    1, 0.0089 at shift 3) -- then 0."""
    n = 50
    ours = time_grid(n, shift, t_min=0)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1].tolist())
    assert len(ref.sigmas) == len(ours) == n + 1
    assert (ours - ref.sigmas).abs().max() < 1e-6
    assert abs(time_grid(n, t_min=0)[-2].item() - 1 / n) < 1e-7
    for steps in (10, 50):
        default = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        default.set_timesteps(steps)
        end = float(default.sigmas[-2])
        assert end == pytest.approx(shift_time(shift_time(1e-3, shift), shift), rel=1e-6)
        assert (time_grid(steps, shift, t_min=end) - default.sigmas).abs().max() < 1e-6
    assert float(default.sigmas[-1]) == float(ours[-1]) == 0.0


@pytest.mark.parametrize("base, grid", [(4, 4), (4, 8), (3, 6), (8, 4)])
def test_resampled_positional_embedding_equals_diffusers_interpolation(base, grid):
    """Our `resample` on a square grid is diffusers' get_2d_sincos_pos_embed(base_size=base,
    interpolation_scale=1): positions scaled by base / grid. On a smaller grid we keep integer positions (no
    up-scaling), as `extend` does; diffusers would stretch those too, so that case is compared against
    base_size=grid."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ref = get_2d_sincos_pos_embed(WIDTH, grid, base_size=grid if grid < base else base,
                                  interpolation_scale=1.0, output_type="pt")
    ours = sincos_2d(WIDTH, grid, grid, base, base, "resample")
    assert (ours - ref.float()).abs().max() < 1e-5


def test_non_square_resampling_keeps_the_aspect_where_diffusers_stretches_each_axis():
    """By design: on a 4 x 16 grid over a 4 x 4 base we scale both axes by one factor, sqrt(16 / 64) = 0.5, so
    the image keeps its shape inside the trained positional range; diffusers' tuple grid scales each axis to
    the base size on its own (rows by 1, columns by 0.25). Our positions, fed to diffusers' own feature
    function, give ours."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid
    ours = sincos_2d(WIDTH, 4, 16, 4, 4, "resample")
    rows, cols = torch.meshgrid(torch.arange(4) * 0.5, torch.arange(16) * 0.5, indexing="ij")
    same_factor = get_2d_sincos_pos_embed_from_grid(WIDTH, torch.stack([cols, rows])[:, None],
                                                    output_type="pt")
    stretched = get_2d_sincos_pos_embed(WIDTH, (4, 16), base_size=4, interpolation_scale=1.0,
                                        output_type="pt")
    assert (ours - same_factor.float()).abs().max() < 1e-5
    assert (ours - stretched.float()).abs().max() > 0.1


@pytest.mark.parametrize("ours, theirs", [("linear", dict(beta_schedule="linear", beta_start=1e-4,
                                                          beta_end=0.02)),
                                          ("ldm", dict(beta_schedule="scaled_linear", beta_start=0.0015,
                                                       beta_end=0.0195))])
def test_ddpm_schedules_equal_ddpm_scheduler(ours, theirs):
    """DiT's linear and LDM's sqrt-linear betas, and the cumulative products every sampler reads. diffusers
    keeps them in float32, we in float64."""
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **theirs)
    betas = ddpm_betas(ours, 1000)
    assert (betas.float() - ref.betas).abs().max() < 1e-7
    assert (Chain(betas).alphas_cumprod.float() - ref.alphas_cumprod).abs().max() < 1e-6
    assert math.isclose(float(Chain(betas).alphas_cumprod[-1]), float(ref.alphas_cumprod[-1]), rel_tol=1e-4)


#################################################################################
#             DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler   #
#################################################################################
# A fixed denoiser, far from trivial: the exact prediction for Gaussian data N(0.3, 0.5^2) plus a nonlinear
# term, so both solvers see a prediction that changes along the path. Each loop records the x it hands the
# denoiser at every step; the two records must agree step by step.
MU, S = 0.3, 0.5


def dpm_scheduler(**kw):
    return diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                 beta_start=1e-4, beta_end=0.02, algorithm_type="dpmsolver++",
                                                 solver_order=2, final_sigmas_type="zero", **kw)


def ddpm_eps(x, k):
    """eps at (possibly fractional) steps k (B,) of the linear chain."""
    alphas_cumprod = Chain(ddpm_betas()).alphas_cumprod_at(k.double().tolist()).view(-1, 1, 1, 1)
    a, s = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    return (s * (x.double() - a * MU) / (a ** 2 * S ** 2 + s ** 2) + 0.05 * torch.tanh(x.double())).float()


@pytest.mark.parametrize("spacing", ["time", "logsnr", "ddim"])
@pytest.mark.parametrize("steps", [5, 10, 20, 25])
def test_ddpm_dpm_solver_equals_diffusers_step_by_step(spacing, steps):
    """Our grid is diffusers' (its timesteps; for logsnr, its use_lu_lambdas sigmas, whose timesteps it rounds
    for the network and we do not, so here the network is handed the rounded step on both sides), and every
    step's x agrees with its scheduler's, fed the same eps. diffusers keeps its levels in float32 (from a
    float32 product of the betas), whose rounding alone moves the result by up to 7e-5 at 5 log-SNR steps: we
    hand it our levels in float64."""
    from ddpm import DDPM, spaced_steps
    ref = dpm_scheduler(prediction_type="epsilon", use_lu_lambdas=spacing == "logsnr")
    ours_steps = spaced_steps(1000, steps, spacing, Chain(ddpm_betas()).alphas_cumprod)
    if spacing == "ddim":  # ADM's stride: handed to diffusers as custom timesteps
        ref.set_timesteps(timesteps=list(reversed(ours_steps)))
    else:
        ref.set_timesteps(steps)
    rounded = [round(k) for k in reversed(ours_steps)]
    assert ref.timesteps.tolist() == rounded
    levels = Chain(ddpm_betas()).alphas_cumprod_at(list(reversed(ours_steps)))
    sigmas = torch.cat([((1 - levels) / levels).sqrt(), torch.zeros(1, dtype=torch.float64)])
    # the same levels up to diffusers' float32 cumulative product of the betas: 8e-5 relative at step 0
    assert torch.allclose(ref.sigmas.double(), sigmas, rtol=2e-4)
    ref.sigmas = sigmas

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps))
    theirs, x = [], noise.double()
    for t in ref.timesteps:
        theirs.append(x)
        x = ref.step(ddpm_eps(x.float(), t.expand(2)).double(), t, x).prev_sample
    ours = []

    def predict(x, t):
        ours.append(x.double())
        k = t.double() * 1000
        return ddpm_eps(x, k.round() if spacing == "logsnr" else k)
    out = DDPM().sample(predict, noise, Sampling("dpm++2m", steps, spacing))
    assert len(ours) == len(theirs) == steps
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-5
    assert (out.double() - x).abs().max() < 1e-5


def flow_data(x, t):
    """D for flow x_t = (1 - t) x0 + t eps of Gaussian data, plus a nonlinear term."""
    t = t.double().view(-1, 1, 1, 1)
    a = 1 - t
    return (MU + a * S ** 2 / (a ** 2 * S ** 2 + t ** 2) * (x.double() - a * MU)
            + 0.05 * torch.tanh(x.double())).float()


@pytest.mark.parametrize("t_min", [0.0, T_MIN])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_flow_dpm_solver_equals_diffusers_in_sd3s_variables(shift, steps, t_min):
    """Our flow DPM++ 2M is SD3's reference sampler (sd3.5 sd3_impls.py sample_dpmpp_2m: lambda = -log t on
    x itself). That is diffusers' DPMSolverMultistepScheduler in its variance-preserving form with Karras
    sigmas equal to our t grid, after the change of variables x_vp = x / sqrt(1 + t^2) (where its alpha_t =
    1 / sqrt(1 + t^2) and lambda = -log t): fed the same data prediction, every step agrees. (diffusers' own
    flow setting, use_flow_sigmas, takes lambda = log((1 - t) / t) instead: another second-order method, not
    SD3's.) On the grid the test was written for (t_min = 0, the end moving with the steps) and on the
    default one, with the fixed end point."""
    from diffusion import Diffusion, time_grid
    ts = time_grid(steps, shift, t_min=t_min).double()
    ref = dpm_scheduler(prediction_type="sample")
    ref.set_timesteps(steps)  # only its count of steps is used: the levels are ours
    ref.sigmas = ts.clone()
    scale = lambda i: (1 + ts[i] ** 2).sqrt()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps))
    theirs, x = [], noise.double() / scale(0)
    for i, t in enumerate(ref.timesteps):
        theirs.append(x * scale(i))
        x = ref.step(flow_data((x * scale(i)).float(), ts[i].expand(2)).double(), t, x).prev_sample
    ours = []

    def predict(x, t):
        ours.append(x.double())
        return flow_data(x, t)
    out = Diffusion(pred="x", alpha=shift).sample(predict, noise, Sampling("dpm++2m", steps, t_min=t_min))
    assert len(ours) == len(theirs) == steps
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-5
    assert (out.double() - x * scale(steps)).abs().max() < 1e-5
