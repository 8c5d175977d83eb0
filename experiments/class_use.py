"""
Where a trained model uses its class, and where its objective spends its training loss, by noise level.

    python -m experiments.class_use RUN [RUN ...] [--names A,B,...] [--images 256] [--json FILE]

Each RUN is a run folder or checkpoint (its EMA weights). On a grid of noise levels, measured in log-SNR
(x_t = a x0 + s eps, log-SNR = log(a^2 / s^2): flow's a = 1 - t, s = t; DDPM's a^2 = alpha_bar_k), with the
same `--images` held-out images and the same draw of noise at every level and for every run:

- class gain: the error of the network's clean-image prediction with the class dropped (the null class) over
  its error with the true class, minus 1, at the bin's centre; 0 where the network ignores the class there.
- loss share: the fraction of the run's training loss drawn from the levels in the bin: over sub-bins a
  quarter as wide, the density of the noise levels training draws (flow: the shifted logit-normal t; DDPM:
  the step k, uniform) times the run's own per-sample loss at the sub-bin's centre (`prediction_loss`, as
  train.py computes it, with the class given; a learned variance's term left out, since it trains the
  variance only; mDT: its unmasked prediction), summed and normalised over the bins.

The images enter the run's diffusion space as the posterior mean (training draws a sample; in pixel space the
two are the same), with the dataset's default crop and flip. A model whose loss spends little of itself where
the class decides the image, and whose class gain is about 0 there, has not learned to use the class: the
measurement behind docs/samplers.md's DiT-objective section.
"""
import argparse
import copy
import json
import math

import torch

from build import load_autoencoder, load_model, make_diffusion
from diffusion import Noised, sample_t, to_data
from shapes import ShapesDataset

EDGES = [-10.0 + 2.0 * i for i in range(11)]  # log-SNR bins, 2 wide, from -10 (noise) to 10 (data)
SUB = 4  # sub-bins per bin for the loss share
DRAWS = 200_000  # flow: training noise levels drawn to estimate their density per bin


def is_ddpm(diffusion):
    return diffusion.objective == "ddpm"


def level_density(diffusion, edges=EDGES):
    """The share of training noise levels in each log-SNR bin between `edges` (len(edges) - 1,)."""
    if is_ddpm(diffusion):
        alphas_cumprod = diffusion.chain_on("cpu").alphas_cumprod.double()
        log_snr = torch.log(alphas_cumprod / (1 - alphas_cumprod))  # one per step k, drawn uniformly
    else:
        t = sample_t(DRAWS, diffusion.t_mean, diffusion.t_std, diffusion.alpha,
                     torch.Generator().manual_seed(0)).double().clamp(1e-12, 1 - 1e-12)
        log_snr = 2 * torch.log((1 - t) / t)
    counts = torch.histogram(log_snr.clamp(edges[0], edges[-1]).float(), torch.tensor(edges)).hist
    return (counts / counts.sum()).tolist()


def noised_at(diffusion, x0, noise, log_snr):
    """The training draw (Noised) of x0 and noise at the level nearest `log_snr` (DDPM: the nearest step)."""
    B = x0.shape[0]
    if is_ddpm(diffusion):
        chain = diffusion.chain_on(x0.device)
        levels = torch.log(chain.alphas_cumprod / (1 - chain.alphas_cumprod))
        k = torch.full((B,), int((levels - log_snr).abs().argmin()), dtype=torch.long)
        return Noised(chain.q_sample(x0, k, noise), k.float() / diffusion.num_steps, noise, k)
    t = torch.full((B,), 1.0 / (1.0 + math.exp(log_snr / 2)))  # (1 - t) / t = exp(log_snr / 2)
    return Noised((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, t, noise)


def clean_prediction(diffusion, out, noised):
    """The clean image implied by the network output (B, C, H, W), in fp32."""
    C = noised.x_t.shape[1]
    if is_ddpm(diffusion):
        return diffusion.chain_on(out.device).predict_x0(noised.x_t.float(), noised.step, out[:, :C].float())
    return to_data(out, noised.x_t, noised.t, diffusion.pred)


def measure(trained, pixels, labels, ctrl, generator):
    """One run's (a build.TrainedModel) rows: per bin, its centre's log-SNR, its density, loss share and class
    gain. pixels: uint8 (B, 3, H, W); generator: the noise's, seeded alike for every run."""
    images = load_autoencoder(trained.args, trained.facts).encode(pixels)  # (B, C, h, w), the posterior mean
    diffusion = make_diffusion(trained.args, trained.facts)
    diffusion = getattr(diffusion, "diffusion", diffusion)  # mDT: the objective its MaskedDiffusion wraps
    objective = copy.copy(diffusion)
    if is_ddpm(objective):
        objective.learn_sigma = False  # the eps loss only: the variance term does not train the mean
    noise = torch.randn(images.shape, generator=generator)
    C = images.shape[1]

    @torch.no_grad()
    def predict(noised, drop=False):  # (B, C, h, w): the network's output, its data channels
        sem_drop = torch.full_like(labels, drop, dtype=torch.bool)
        return trained.model(noised.x_t, noised.t, y=labels, ctrl=ctrl, sem_drop=sem_drop).float()[:, :C]

    def loss_at(log_snr):
        noised = noised_at(diffusion, images, noise, log_snr)
        return float(objective.prediction_loss(predict(noised), images, noised).mean())

    width = (EDGES[1] - EDGES[0]) / SUB
    fine = [EDGES[0] + width * j for j in range(SUB * (len(EDGES) - 1) + 1)]
    fine_density = level_density(diffusion, fine)
    weighted = [d * loss_at(lo + width / 2) for d, lo in zip(fine_density, fine)]
    total, rows = sum(weighted), []
    for i in range(len(EDGES) - 1):
        centre = (EDGES[i] + EDGES[i + 1]) / 2
        noised = noised_at(diffusion, images, noise, centre)
        err = lambda out: float(((clean_prediction(diffusion, out, noised) - images) ** 2).mean())
        share = sum(weighted[SUB * i:SUB * (i + 1)]) / total
        gain = err(predict(noised, drop=True)) / err(predict(noised)) - 1
        density = sum(fine_density[SUB * i:SUB * (i + 1)])  # EDGES are every SUB-th of the fine edges
        rows.append(dict(log_snr=centre, density=density, loss_share=share, class_gain=gain))
    noisy = [r for r in rows if r["log_snr"] < 0]  # SNR < 1: more noise than image
    return dict(step=trained.step, objective=diffusion.objective, pred=diffusion.pred,
                min_snr=getattr(diffusion, "min_snr", 0.0), levels=rows,
                loss_share_below_snr_1=sum(r["loss_share"] for r in noisy))


def held_out_shapes(n, res):
    """n shapes images none of the runs trained on (another seed than training's 0): uint8 pixels (n, 3, res,
    res), labels (n,), control (n, S)."""
    data = ShapesDataset(size=n, res=res, seed=1)
    items = [data[i] for i in range(n)]
    pixels = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = torch.tensor([int(item[1]) for item in items])
    return pixels, labels, torch.stack([torch.as_tensor(item[2]) for item in items]).float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("runs", nargs="+", help="run folders or checkpoints")
    p.add_argument("--names", default=None, help="comma-separated: what to call each run in the output "
                   "(default: its path)")
    p.add_argument("--images", type=int, default=256, help="held-out images (and noises) per level")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args(argv)
    names = args.names.split(",") if args.names else args.runs
    if len(names) != len(args.runs):
        p.error(f"--names: {len(names)} names for {len(args.runs)} runs")
    trained = [load_model(path, "cpu") for path in args.runs]
    res = trained[0].facts.res
    if any(t.facts.res != res for t in trained):
        p.error(f"the runs differ in resolution ({sorted({t.facts.res for t in trained})}): measure each "
                "resolution on its own")
    pixels, labels, ctrl = held_out_shapes(args.images, res)
    results = []
    for name, run in zip(names, trained):
        noise = torch.Generator().manual_seed(0)  # the same noise for every run
        results.append(dict(run=name, **measure(run, pixels, labels, ctrl, noise)))
    print("log-SNR " + " ".join(f"{r['log_snr']:>6.0f}" for r in results[0]["levels"]))
    for run in results:
        weighting = f" min-snr {run['min_snr']:g}" if run["min_snr"] else ""
        name = f"{run['objective']}/{run['pred']}{weighting}"
        print(f"{run['run']}\n{name}  (loss share at SNR < 1: {run['loss_share_below_snr_1']:.3f})")
        for key in ("loss_share", "class_gain"):
            print(f"  {key:<10} " + " ".join(f"{r[key]:6.3f}" for r in run["levels"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(images=args.images, edges=EDGES, runs=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
