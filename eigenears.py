"""Eigenears: PCA of the ear teacher's latent means mu, and what the principal components encode.

    python eigenears.py                                              # checkpoints/best.pt on its run's data
    python eigenears.py --ckpt runs/sam/best.pt --ckpt runs/dinov2/best.pt --out eigenears_cmp   # side by side

PCA is fitted on the mu of the training split (--fit-data) and reported on both splits; the held-out (--data) split
also gives the PSNR of images decoded from their projection onto the top k components. Where a factors CSV sits
beside the data (X_teacher.npy -> X_factors.csv, written by `synth.py`), each PC score is correlated with each
generating factor and a ridge probe from mu to each factor is scored on the held-out split.

Writes OUT/summary.json, mean_ear.png, traversals.png, scree.png (and factors.png); with several checkpoints one
subfolder per checkpoint and a comparison table in OUT/summary.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli import HelpFormatter, positive_int  # noqa: E402
from data import EarDataset  # noqa: E402
from errors import DataError, OutputError  # noqa: E402
from files import check_output_dir, check_replace, save_figure, save_json, write_outputs  # noqa: E402
from inference import (add_inference_args, autocast, checkpoint_info, data_file, encode_dataset,  # noqa: E402
                       max_invalid, run_command, run_dataset, setup)
from losses import psnr  # noqa: E402
from checkpoints import load_model, read_checkpoint  # noqa: E402
from model import EarVAE  # noqa: E402
from synth import IDENTITY_COLUMN  # noqa: E402

CUMULATIVE_AT = (1, 5, 10, 50)  # numbers of PCs for the cumulative variance and the reconstruction PSNR
CLAIM = 0.60  # the original claim: the first 5 PCs explain more than 60% of the variance
DINOV2_FIRST5 = 0.388  # what the DINOv2 teacher had
N_TRAVERSALS = 8  # PCs shown in traversals.png
N_CORRELATED = 10  # PCs correlated with the generating factors
RIDGE = 1e-3  # probe regularisation, relative to the mean eigenvalue of the centred Gram matrix X^T X


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PCA of the ear teacher's latent means (eigenears).",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", action="append", default=None,
                   help="checkpoint written by train.py, or a directory written by eval.py --export / "
                        "checkpoints.export_model (it names no data: give --data and --fit-data); repeat to compare "
                        "several (default: checkpoints/best.pt)")
    p.add_argument("--data", default=None, help="held-out .npy the PCA is reported on (default: the run's val file)")
    p.add_argument("--fit-data", default=None, help=".npy the PCA and probes are fitted on (default: the run's "
                   "train file)")
    p.add_argument("--out", default="eigenears", help="folder for summary.json and the figures")
    p.add_argument("--force", action="store_true", help="replace the results of another checkpoint in --out (the "
                   "same checkpoint replaces its own without it)")
    p.add_argument("--n-components", type=positive_int, default=50,
                   help="PCs reported (capped at the number available)")
    add_inference_args(p)
    return p


# -----------------------------------------------------------------------------
# analysis (numpy, float64)

def pca(mu: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """PCA by SVD of the mean-centred data. mu (N, D), N >= 2 -> mean (D,), components (k, D) orthonormal rows in
    order of decreasing variance, variances (k,) (eigenvalues of the sample covariance, ddof 1) and the total
    variance (its trace). Only the r components of non-zero variance exist, r the numerical rank of the centred
    data (at most min(N - 1, D); numpy's `matrix_rank` tolerance): a direction of zero variance is arbitrary, so
    it would make the output depend on the row order. k=None or k > r: all r.

    A component's sign is arbitrary (the SVD may return v or -v, and which one changes with the order of the rows):
    each is flipped so that its loading of largest magnitude is positive, scikit-learn's `svd_flip` convention
    (u_based_decision=False, PCA's since 1.5). The same data in any row order then gives the same components, hence
    the same table, correlation signs and traversal figures."""
    x = np.asarray(mu, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"pca: expected mu (N, D) with N >= 2, got shape {x.shape}")
    mean = x.mean(0)  # (D,)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)  # s (min(N, D),), vt (min(N, D), D)
    r = int((s > s[0] * max(x.shape) * np.finfo(np.float64).eps).sum())  # numerical rank, <= min(N - 1, D)
    s, vt = s[:r], vt[:r]  # (r,), (r, D)
    vt *= np.sign(vt[np.arange(r), np.abs(vt).argmax(1)])[:, None]  # largest |loading| of each row > 0
    eig = s ** 2 / (len(x) - 1)
    return mean, vt[:k], eig[:k], float(eig.sum())


def effective_rank(eigenvalues: np.ndarray) -> float:
    """Participation ratio (sum l)^2 / sum l^2 of a spectrum: d for d equal eigenvalues, 1 for a single one."""
    lam = np.asarray(eigenvalues, np.float64)
    return float(lam.sum() ** 2 / np.square(lam).sum())


def explained_ratio(mu: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Fraction of the squared deviation of mu (N, D) from `mean` (D,) along each component (k, D) -> (k,). On the
    data the PCA was fitted to these are the eigenvalue ratios; on held-out data, how much of it the PCs capture."""
    x = np.asarray(mu, np.float64) - mean
    return np.square(x @ components.T).sum(0) / np.square(x).sum()


def project(mu: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """mean + projection of mu - mean onto the span of the components. mu (N, D), components (k, D) -> (N, D)."""
    x = np.asarray(mu, np.float64) - mean
    return mean + (x @ components.T) @ components


def read_factors(npy: Path, ds: EarDataset) -> tuple[list[str], np.ndarray] | None:
    """The generating factors of the kept samples of `ds` from the CSV beside its file (X_teacher.npy ->
    X_factors.csv; header = factor names, one row per sample of the file), or None when there is no such CSV or it
    names no factor. An `identity` column (synth.py --identities) is a label, not a generating factor: left out.
    -> (names, values float64 (len(ds), F))."""
    if not npy.name.endswith("_teacher.npy"):
        return None
    path = npy.with_name(npy.name[:-len("_teacher.npy")] + "_factors.csv")
    if not path.is_file():
        return None
    with open(path) as f:
        names = f.readline().strip().split(",")
    try:
        values = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)  # (n_total, F)
    except ValueError as e:
        raise DataError(f"{path}: not a numeric factors table ({e})") from e
    if values.shape != (ds.n_total, len(names)):
        raise DataError(f"{path}: {values.shape[0]} rows x {values.shape[1]} columns, expected one row per sample "
                        f"of {npy} ({ds.n_total}) and one column per header name ({len(names)})")
    factors = [i for i, name in enumerate(names) if name != IDENTITY_COLUMN]
    if not factors:
        return None
    return [names[i] for i in factors], values[np.ix_(ds.keep, factors)]


def factor_correlations(scores: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Pearson correlation of each PC score (N, P) with each factor (N, F) -> (P, F)."""
    p = scores.shape[1]
    return np.corrcoef(scores, factors, rowvar=False)[:p, p:]


def ridge_probe_r2(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
                   ridge: float = RIDGE) -> np.ndarray:
    """Linear probe: ridge regression (closed form, centred, lambda = ridge * trace(X^T X) / D) from x (N, D) to
    each target y (N, F) fitted on the fit split -> R^2 (F,) on the eval split (1 - SS_res / SS_tot about the
    eval mean; can be negative)."""
    xm, ym = x_fit.mean(0), y_fit.mean(0)
    x = x_fit - xm
    gram = x.T @ x  # (D, D)
    lam = ridge * np.trace(gram) / len(gram)
    w = np.linalg.solve(gram + lam * np.eye(len(gram)), x.T @ (y_fit - ym))  # (D, F)
    pred = (x_eval - xm) @ w + ym
    return 1.0 - np.square(y_eval - pred).sum(0) / np.square(y_eval - y_eval.mean(0)).sum(0)


# -----------------------------------------------------------------------------
# decoding (torch)

@torch.no_grad()
def decode(model: EarVAE, z: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """z (N, D) -> images float32 (N, 128, 128, 3) in [0, 1]; the decoder runs under autocast(device, dtype)."""
    with autocast(device, dtype):
        x = model.decode(torch.as_tensor(z, dtype=torch.float32, device=device)).float()  # (N, 3, 128, 128)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decoded_psnr(model: EarVAE, ds: EarDataset, codes: dict[str, np.ndarray], batch_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, workers: int = 0) -> dict[str, np.ndarray]:
    """PSNR of each image of ds against decode(codes[name][i]), for every set of codes (N, D), in one pass over the
    images; the decoder runs under autocast(device, dtype), the PSNR in float32. -> {name: (N,) float64}."""
    start = 0

    def decoded(x: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal start
        out = {}
        for name, z in codes.items():
            zb = torch.as_tensor(z[start:start + len(x)], dtype=torch.float32, device=device)  # (B, D)
            with autocast(device, dtype):
                recon = model.decode(zb)  # (B, 3, 128, 128)
            out[name] = psnr(recon.float(), x)  # (B,)
        start += len(x)
        return out

    res = run_dataset(decoded, ds, batch_size, device, workers, desc=f"decode {ds.path.name}")
    return {name: res[name].double().numpy() for name in codes}


# -----------------------------------------------------------------------------
# figures

def mean_figure(image: np.ndarray) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(3, 3.2))
    ax.imshow(image)
    ax.set_title("decoded mean mu")
    ax.axis("off")
    return fig


def traversal_figure(model: EarVAE, mean: np.ndarray, components: np.ndarray, variances: np.ndarray,
                     ratios: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> plt.Figure:
    """One row per PC j: decode(mean + a * sqrt(variance_j) * v_j) for a = -3..3."""
    steps = np.arange(-3, 4)
    z = mean + steps[None, :, None] * (np.sqrt(variances)[:, None, None] * components[:, None, :])  # (P, 7, D)
    images = decode(model, z.reshape(-1, len(mean)), device, dtype)  # (P * 7, H, W, 3)
    p = len(components)
    fig, axes = plt.subplots(p, len(steps), figsize=(1.4 * len(steps) + 0.8, 1.4 * p + 0.4), squeeze=False)
    for ax, img in zip(axes.flat, images):
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(p):
        axes[j, 0].set_ylabel(f"PC{j + 1}\n{100 * ratios[j]:.1f}%", fontsize=9)
    for c, a in enumerate(steps):
        axes[0, c].set_title(f"{a:+d} sd" if a else "mean", fontsize=9)
    fig.suptitle("mean + a * sqrt(eigenvalue) * PC")
    fig.tight_layout()
    return fig


def scree_figure(ratios: np.ndarray) -> plt.Figure:
    k = np.arange(1, len(ratios) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(k, 100 * ratios, color="tab:blue", label="per PC")
    ax.set(xlabel="principal component", ylabel="explained variance per PC (%)", title="scree (fit split)")
    ax2 = ax.twinx()
    ax2.plot(k, 100 * np.cumsum(ratios), "o-", color="tab:red", markersize=3, label="cumulative")
    ax2.axhline(100 * CLAIM, color="grey", linestyle="--", linewidth=1, label=f"claim: {100 * CLAIM:.0f}% in 5 PCs")
    ax2.set(ylabel="cumulative (%)", ylim=(0, 100))
    fig.legend(loc="center right", bbox_to_anchor=(0.85, 0.5))
    fig.tight_layout()
    return fig


def factors_figure(corr: np.ndarray, names: list[str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(0.6 * len(names) + 2, 0.45 * len(corr) + 1.5))
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(corr)), [f"PC{j + 1}" for j in range(len(corr))])
    for (j, f), r in np.ndenumerate(corr):
        ax.text(f, j, f"{r:.2f}", ha="center", va="center", fontsize=6, color="white" if abs(r) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Pearson r (held-out split)")
    ax.set_title("PC scores vs generating factors")
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# one checkpoint

def analyse(ckpt: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            summary: Path) -> tuple[dict, dict[str, plt.Figure]]:
    """Everything for one checkpoint, the model under autocast(device, dtype) -> (summary dict, {file name: figure}).
    An existing `summary` of other inputs is an OutputError before the work (files.check_replace; --force)."""
    content = read_checkpoint(ckpt)
    info = checkpoint_info(content)
    fit_path = data_file(args.fit_data, info, "train", ckpt, "--fit-data")
    eval_path = data_file(args.data, info, "val", ckpt, "--data")
    fit_ds, eval_ds = (EarDataset(path, max_invalid=max_invalid(args, info)) for path in (fit_path, eval_path))
    fit_factors, eval_factors = read_factors(fit_path, fit_ds), read_factors(eval_path, eval_ds)
    if fit_factors is not None and eval_factors is not None and fit_factors[0] != eval_factors[0]:
        raise DataError(f"{fit_path} and {eval_path}: their factor CSVs name different factors")
    for path, ds in ((fit_path, fit_ds), (eval_path, eval_ds)):
        if len(ds) < 2:
            raise DataError(f"{path}: {len(ds)} valid image(s): PCA needs at least 2")
    try:
        check_replace(summary, {"checkpoint": str(ckpt), "fit_data": str(fit_path), "eval_data": str(eval_path)},
                      args.force)
    except ValueError as e:
        raise OutputError(str(e)) from None
    model, cfg = load_model(ckpt, device, content)
    del content
    print(f"{ckpt}: fit {fit_path} {fit_ds.summary()}, eval {eval_path} {eval_ds.summary()}")
    mu_fit = encode_dataset(model, fit_ds, args.batch_size, device, dtype, args.workers)[0].double().numpy()  # (Nf, D)
    mu_eval = encode_dataset(model, eval_ds, args.batch_size, device, dtype, args.workers)[0].double().numpy()

    mean, components, variances, total = pca(mu_fit)  # every component: the effective rank needs all eigenvalues
    eval_variances = pca(mu_eval)[2]
    for path, v, n in ((fit_path, variances, len(mu_fit)), (eval_path, eval_variances, len(mu_eval))):
        if len(v) == 0:
            raise DataError(f"{path}: all {n} images have the same latent (copies of one image?): PCA finds no "
                            f"direction of variance")
    k = min(args.n_components, len(variances))
    ratios = {"fit": variances / total, "eval": explained_ratio(mu_eval, mean, components)}
    ks = sorted({min(c, len(variances)) for c in CUMULATIVE_AT})
    codes = {"full": mu_eval, **{f"{c}": project(mu_eval, mean, components[:c]) for c in ks}}
    recon = decoded_psnr(model, eval_ds, codes, args.batch_size, device, dtype, args.workers)

    s = {"checkpoint": str(ckpt), "step": info["step"], "fit_data": str(fit_path), "eval_data": str(eval_path),
         "n_fit": len(fit_ds), "n_eval": len(eval_ds), "latent_dim": cfg.latent_dim, "n_available": len(variances),
         "n_components": k,
         "explained_variance_ratio": {split: r[:k].tolist() for split, r in ratios.items()},
         "cumulative": {split: {f"{c}": float(r[:c].sum()) for c in ks} for split, r in ratios.items()},
         "effective_rank": {"fit": effective_rank(variances), "eval": effective_rank(eval_variances)},
         "recon_psnr": {name: float(v.mean()) for name, v in recon.items()}}
    s["claim_first5_over_60pct"] = bool(s["cumulative"]["fit"][f"{min(5, len(variances))}"] > CLAIM)

    t = min(N_TRAVERSALS, len(variances))
    figures = {"mean_ear.png": mean_figure(decode(model, mean[None], device, dtype)[0]),
               "traversals.png": traversal_figure(model, mean, components[:t], variances[:t], ratios["fit"], device,
                                                  dtype),
               "scree.png": scree_figure(ratios["fit"][:k])}

    s["factors"] = None
    if fit_factors is not None and eval_factors is not None:
        names, y_eval = eval_factors
        p = min(N_CORRELATED, len(variances))
        corr = factor_correlations((mu_eval - mean) @ components[:p].T, y_eval)  # (p, F)
        r2 = ridge_probe_r2(mu_fit, fit_factors[1], mu_eval, y_eval)  # (F,)
        s["factors"] = {"names": names, "correlation": corr.tolist(),
                        "top_factor": [names[f] for f in np.abs(corr).argmax(1)],
                        "probe_r2": dict(zip(names, r2.tolist())), "mean_probe_r2": float(r2.mean())}
        figures["factors.png"] = factors_figure(corr, names)
    return s, figures


def report(s: dict) -> str:
    """Console lines for one checkpoint's summary."""
    fit, ev = s["explained_variance_ratio"]["fit"], s["explained_variance_ratio"]["eval"]
    lines = [f"checkpoint {s['checkpoint']} (step {s['step']}), latent {s['latent_dim']}",
             f"  fit {s['fit_data']} ({s['n_fit']})   eval {s['eval_data']} ({s['n_eval']})",
             "   PC   fit %   cum %   eval %   cum %"]
    for j in range(min(10, len(fit))):
        lines.append(f"  {j + 1:3d}  {100 * fit[j]:6.2f}  {100 * sum(fit[:j + 1]):6.2f}   {100 * ev[j]:6.2f}  "
                     f"{100 * sum(ev[:j + 1]):6.2f}")
    if len(fit) > 10:
        lines.append(f"  ... ({len(fit)} PCs in summary.json)")
    for split in ("fit", "eval"):
        cum = "  ".join(f"{c} PC{'s' * (c != '1')} {100 * v:.1f}%" for c, v in s["cumulative"][split].items())
        lines.append(f"  cumulative ({split}): {cum}")
    first5 = s["cumulative"]["fit"].get("5")
    if first5 is not None:
        lines.append(f"  first 5 PCs: {100 * first5:.1f}% (claim > {100 * CLAIM:.0f}%: "
                     f"{'met' if s['claim_first5_over_60pct'] else 'not met'}; DINOv2 had {100 * DINOV2_FIRST5:.1f}%)")
    er = s["effective_rank"]
    lines.append(f"  effective rank: fit {er['fit']:.2f}, eval {er['eval']:.2f} (participation ratio)")
    lines.append("  recon PSNR (eval): " + "  ".join(
        f"{'full mu' if name == 'full' else name + ' PC' + 's' * (name != '1')} {v:.2f} dB"
        for name, v in s["recon_psnr"].items()))
    fa = s["factors"]
    if fa is None:
        lines.append("  factors: no X_factors.csv beside both data files; skipped")
    else:
        lines.append("   PC   top factor          r")
        for j, (name, row) in enumerate(zip(fa["top_factor"], fa["correlation"])):
            lines.append(f"  {j + 1:3d}   {name:<16} {row[fa['names'].index(name)]:+.2f}")
        lines.append("  probe R^2 (ridge, fit -> eval): " + ", ".join(
            f"{n} {v:.2f}" for n, v in fa["probe_r2"].items()) + f"; mean {fa['mean_probe_r2']:.3f}")
    return "\n".join(lines)


def comparison(summaries: dict[str, dict]) -> dict[str, list[float | None]]:
    """One row per measure, one value per checkpoint (column order of `summaries`)."""
    def cum(s: dict, c: int) -> float:
        return s["cumulative"]["fit"][f"{min(c, s['n_available'])}"]
    rows = {"PC1 %": lambda s: 100 * s["explained_variance_ratio"]["fit"][0],
            "first 5 %": lambda s: 100 * cum(s, 5), "first 10 %": lambda s: 100 * cum(s, 10),
            "effective rank": lambda s: s["effective_rank"]["fit"],
            "recon PSNR dB": lambda s: s["recon_psnr"]["full"],
            "mean probe R^2": lambda s: s["factors"]["mean_probe_r2"] if s["factors"] else None}
    return {name: [f(s) for s in summaries.values()] for name, f in rows.items()}


def comparison_table(columns: list[str], rows: dict[str, list[float | None]]) -> str:
    width = max(12, *(len(c) + 2 for c in columns))
    lines = [f"{'':<16}" + "".join(f"{c:>{width}}" for c in columns)]
    for name, values in rows.items():
        lines.append(f"{name:<16}" + "".join(f"{'n/a':>{width}}" if v is None else f"{v:>{width}.3f}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    ckpts = args.ckpt or ["checkpoints/best.pt"]
    try:
        check_output_dir(args.out)  # before the long work
    except ValueError as e:
        parser.error(f"--out {e}")
    device, dtype = setup(args, parser)

    stems = [Path(c).stem for c in ckpts]
    names = stems if len(set(stems)) == len(stems) else [f"{i}_{s}" for i, s in enumerate(stems)]
    out = Path(args.out)
    summaries, files = {}, {}
    for name, ckpt in zip(names, ckpts):
        folder = out if len(ckpts) == 1 else out / name
        s, figures = analyse(ckpt, args, device, dtype, folder / "summary.json")
        summaries[name] = s
        files[folder / "summary.json"] = save_json(s)
        files.update({folder / f: save_figure(fig) for f, fig in figures.items()})
        print(report(s))
    result = summaries[names[0]]
    if len(ckpts) > 1:
        rows = comparison(summaries)
        result = {"columns": names, "comparison": rows, "checkpoints": summaries}
        files[out / "summary.json"] = save_json(result)
        print(comparison_table(names, rows))
    write_outputs(files)
    print(f"wrote {len(files)} files to {out}")
    return result


if __name__ == "__main__":
    run_command(main, get_parser)
