"""Evaluate a trained ear teacher: reconstruction quality on a .npy file of ear crops, against the original targets.

    python eval.py checkpoints/best.pt                               # the validation file of the run that made it
    python eval.py checkpoints/best.pt --data other.npy --out eval_other --export-latents mu.npy

Writes OUT/metrics.json (summary), OUT/per_image.csv (one row per image) and OUT/reconstructions.png (8 random,
8 best and 8 worst images by PSNR). The model is rebuilt from the checkpoint alone and encodes to mu (no sampling),
so two runs give the same numbers. Outputs are written only once the evaluation has succeeded.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import DataError, EarDataset, to_float  # noqa: E402
from files import Writer, save_figure, save_json, save_npy, write_outputs  # noqa: E402
from inference import (add_inference_args, autocast, batches, checkpoint_info, data_file,  # noqa: E402
                       out_of_memory_error, resolve_device, resolve_precision)
from losses import kl_divergence, psnr, ssim  # noqa: E402
from model import CheckpointError, EarVAE, WeightsUnavailableError, load_model, read_checkpoint  # noqa: E402

TARGETS = {"psnr": 28.0, "ssim": 0.85}  # the original design's goals (dB, SSIM on [0, 1] RGB)
FIGURE_SEED = 0  # seed of the choice of the 8 random examples


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate an ear-teacher checkpoint: PSNR, SSIM, MAE, MSE, KL per image.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="checkpoint written by train.py (best.pt or last.pt)")
    p.add_argument("--data", default=None, help="uint8 .npy of ear crops (default: the run's validation file)")
    p.add_argument("--out", default="eval", help="folder for metrics.json, per_image.csv, reconstructions.png")
    p.add_argument("--export-latents", default=None, metavar="FILE.npy",
                   help="also save mu (N, latent_dim) float32 here and the kept samples' indices to FILE_index.npy")
    add_inference_args(p)
    return p


# -----------------------------------------------------------------------------
# metrics

@torch.no_grad()
def per_image_metrics(model: EarVAE, ds: EarDataset, batch_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, workers: int = 0) -> dict[str, np.ndarray]:
    """Reconstruct every kept image from its mu, the model under autocast(device, dtype), the metrics in float32.
    -> {"index": (N,) int64 original indices, "psnr", "ssim", "mae", "mse", "kl": (N,) float64 per image,
    "mu": (N, latent_dim) float32}; row i is the dataset's sample i."""
    out: dict[str, list] = {k: [] for k in ("index", "psnr", "ssim", "mae", "mse", "kl", "mu")}
    for x, index in batches(ds, batch_size, device, workers, desc=f"evaluate {ds.path.name}"):
        with autocast(device, dtype):
            mu, logvar = model.encode(x)  # (B, D) each
            recon = model.decode(mu)  # (B, 3, 128, 128)
        mu, logvar, recon = mu.float(), logvar.float(), recon.float()
        diff = recon - x
        per_image = {"psnr": psnr(recon, x), "ssim": ssim(recon, x), "mae": diff.abs().mean(dim=(1, 2, 3)),
                     "mse": diff.square().mean(dim=(1, 2, 3)), "kl": kl_divergence(mu, logvar, reduction="none"),
                     "mu": mu}
        for k, v in per_image.items():
            out[k].append(v.cpu())
        out["index"].append(index)
    res = {k: torch.cat(v).numpy() for k, v in out.items()}
    return {k: v if k in ("index", "mu") else v.astype(np.float64) for k, v in res.items()}


def summarize(per_image: dict[str, np.ndarray]) -> dict:
    """Summary statistics of per_image_metrics()'s output: PSNR and SSIM mean, std (population), median, 5th
    percentile and whether the mean meets the original target; means of MAE, MSE and KL."""
    s = {}
    for k in ("psnr", "ssim"):
        v = per_image[k]
        s[k] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                "p5": float(np.percentile(v, 5)), "target": TARGETS[k], "meets_target": bool(v.mean() >= TARGETS[k])}
    s.update({k: float(per_image[k].mean()) for k in ("mae", "mse", "kl")})
    return s


def save_csv(per_image: dict[str, np.ndarray]) -> Writer:
    """per_image.csv: one row per image (index in the file, psnr, ssim, mae, mse, kl), full float precision."""
    cols = ("psnr", "ssim", "mae", "mse", "kl")

    def write(f: io.BufferedWriter) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text)
        w.writerow(("index",) + cols)
        w.writerows([int(i), *(repr(float(per_image[k][r])) for k in cols)] for r, i in enumerate(per_image["index"]))
        text.detach()  # flushes; the caller closes f
    return write


# -----------------------------------------------------------------------------
# figures and report

@torch.no_grad()
def reconstruction_figure(model: EarVAE, ds: EarDataset, per_image: dict[str, np.ndarray], device: torch.device,
                          dtype: torch.dtype = torch.float32, n: int = 8) -> plt.Figure:
    """Rows of n examples (random with a fixed seed, best and worst by PSNR), each shown as input above output above
    a heat map of the mean absolute difference over RGB, labelled with its index in the file and its PSNR. The
    outputs are decoded from per_image_metrics()'s mu, under autocast(device, dtype) as there."""
    order = np.argsort(-per_image["psnr"], kind="stable")  # best first
    n = min(n, len(order))
    groups = {"random": np.random.default_rng(FIGURE_SEED).choice(len(order), n, replace=False),
              "best": order[:n], "worst": order[::-1][:n]}
    rows = [(name, i) for name, pos in groups.items() for i in pos]
    x = to_float(torch.stack([ds[int(i)][0] for _, i in rows]))  # (3n, 3, 128, 128)
    mu = torch.from_numpy(per_image["mu"][[i for _, i in rows]]).to(device)  # (3n, D), no second encoder pass
    with autocast(device, dtype):
        recon = model.decode(mu).float()  # (3n, 3, 128, 128)
    x, recon = x.permute(0, 2, 3, 1).cpu().numpy(), recon.permute(0, 2, 3, 1).cpu().numpy()  # (3n, H, W, 3)
    err = np.abs(recon - x).mean(-1)  # (3n, H, W)
    vmax = max(float(err.max()), 1e-6)  # one colour scale for every heat map

    fig, axes = plt.subplots(9, n, figsize=(1.5 * n + 1.0, 14), squeeze=False, layout="constrained")
    for j, (name, i) in enumerate(rows):
        g, c = divmod(j, n)
        top, mid, bot = axes[3 * g, c], axes[3 * g + 1, c], axes[3 * g + 2, c]
        top.imshow(x[j])
        mid.imshow(recon[j].clip(0, 1))
        im = bot.imshow(err[j], cmap="magma", vmin=0, vmax=vmax)
        bot.set_xlabel(f"#{per_image['index'][i]}: {per_image['psnr'][i]:.1f} dB", fontsize=8)
        if c == 0:
            for ax, what in ((top, "input"), (mid, "output"), (bot, "|diff|")):
                ax.set_ylabel(f"{name}\n{what}" if what == "input" else what, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label="mean |output - input| over RGB")
    fig.suptitle(f"{n} random, {n} best and {n} worst reconstructions by PSNR")
    return fig


def report(metrics: dict) -> str:
    """Console lines for metrics.json."""
    def vs_target(k: str, unit: str) -> str:
        m = metrics[k]
        return (f"{k.upper():<5}{m['mean']:.{2 if k == 'psnr' else 4}f}{unit} (target {m['target']:g}: "
                f"{'met' if m['meets_target'] else 'below'})   std {m['std']:.4g}, median {m['median']:.4g}, "
                f"5th percentile {m['p5']:.4g}")
    return "\n".join([
        f"checkpoint {metrics['checkpoint']} (step {metrics['step']})",
        f"data       {metrics['data']} ({metrics['n_images']} images, {metrics['n_invalid']} invalid skipped)",
        vs_target("psnr", " dB"), vs_target("ssim", ""),
        f"MAE  {metrics['mae']:.5f}   MSE {metrics['mse']:.6f}   KL {metrics['kl']:.4g} (nats, mean per image)"])


def main(argv: list[str] | None = None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.export_latents is not None and not args.export_latents.endswith(".npy"):
        parser.error(f"--export-latents {args.export_latents}: expected a file name ending in .npy")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected >= 1")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    dtype = resolve_precision(args.precision, device)

    ckpt = read_checkpoint(args.ckpt)
    info = checkpoint_info(ckpt)
    data_path = data_file(args.data, info, "val", args.ckpt)
    ds = EarDataset(data_path)
    model, _ = load_model(args.ckpt, device, ckpt)
    del ckpt
    print(f"{data_path}: {ds.summary()}")
    print(f"device {device}, {dtype} {'(no autocast)' if dtype == torch.float32 else 'autocast'}, "
          f"batch size {args.batch_size}")

    per_image = per_image_metrics(model, ds, args.batch_size, device, dtype, args.workers)
    metrics = {"n_images": len(ds), "n_invalid": ds.n_total - len(ds), "checkpoint": str(args.ckpt),
               "step": info["step"], "data": str(data_path), **summarize(per_image)}
    fig = reconstruction_figure(model, ds, per_image, device, dtype)

    out = Path(args.out)
    files = {out / "metrics.json": save_json(metrics), out / "per_image.csv": save_csv(per_image),
             out / "reconstructions.png": save_figure(fig)}
    if args.export_latents is not None:
        latents = Path(args.export_latents)
        files[latents] = save_npy(per_image["mu"].astype(np.float32))
        files[latents.with_name(latents.stem + "_index.npy")] = save_npy(per_image["index"].astype(np.int64))
    write_outputs(files)
    print(report(metrics))
    print(f"wrote {', '.join(str(p) for p in files)}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError, WeightsUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError:
        print(out_of_memory_error(get_parser().parse_args().batch_size), file=sys.stderr)
        sys.exit(1)
