"""Evaluate a trained ear teacher: reconstruction quality on a .npy file of ear crops, against the original targets.

    python eval.py checkpoints/best.pt                               # the validation file of the run that made it
    python eval.py checkpoints/best.pt --data other.npy --out eval_other --export-latents mu.npy
    python eval.py checkpoints/best.pt --identity                    # + recognition, labels beside the data file
    python eval.py checkpoints/best.pt --lpips --export teacher      # + LPIPS, then export with these metrics
    python eval.py teacher --data data/val_teacher.npy               # an exported directory (it names no data)

Writes OUT/metrics.json (summary), OUT/per_image.csv (one row per image) and OUT/reconstructions.png (8 random,
8 best and 8 worst images by PSNR). The model is rebuilt from the checkpoint alone and encodes to mu (no sampling),
so two runs give the same numbers. Outputs are written only once the evaluation has succeeded. Invalid samples are
dropped up to the --max-invalid the run was trained with.

--identity adds identification (rank-1, rank-5, leave-one-out) and verification (EER, ROC AUC) from the cosine
similarity of the identity embedding model.embed(x) (recognition.py; mu itself unless the model has an embedding
head, then mu's figures are reported too, as "identity_mu"), with the identity labels of the CSV beside the data
file (data.read_identities: X_index.csv column subject, or X_factors.csv column identity), and OUT/retrieval.png
(queries and their top-5 matches); it says how many of those identities also have images in the run's training file
(a split by image, not by subject). Beside the teacher's figures it computes the same metrics for the trivial
baseline, the raw pixels of the same images centred on their mean image (metrics.json "identity_pixels", the console
and the model card). --lpips adds the LPIPS distance (VGG, v0.1) of each reconstruction. --export DIR then writes
checkpoints.export_model(CKPT, DIR) with these metrics in its model card.

A student's checkpoint (distill.py) or save_pretrained folder gives what applies to a student: its agreement
with its teacher (cosine of the identity embeddings per image, and of mu), the images/s of student and teacher
measured in the same run on the same device, and with --identity the recognition figures of the student beside the
teacher's and the pixels'. --export then writes the student's save_pretrained folder.

    python eval.py student/best.pt --data identities/val_teacher.npy --identity
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli import HelpFormatter  # noqa: E402
from data import (FINGERPRINT_SIDECARS, UNLABELLED, EarDataset, fingerprint, fingerprint_change,  # noqa: E402
                  missing_labels, open_npy, read_identities, shared_identities, to_float)
from errors import CheckpointError, DataError, OutputError  # noqa: E402
from files import (Writer, check_output_dir, check_output_file, check_replace, save_figure, save_json,  # noqa: E402
                   save_npy, write_outputs)
from inference import (add_inference_args, autocast, checkpoint_info, clock, data_file, max_invalid,  # noqa: E402
                       run_command, run_dataset, setup)
from losses import LPIPS, kl_divergence, psnr, ssim  # noqa: E402
from checkpoints import export_model, load_model, read_checkpoint, weights_sha256  # noqa: E402
from hub import EXPORT_CARD, EXPORT_CONFIG, EXPORT_WEIGHTS  # noqa: E402
from model import EarVAE, count  # noqa: E402
from recognition import FARS, label_problem, probe_ranks, recognition_metrics  # noqa: E402
from student import Student, is_student_folder, load_student, teacher_targets  # noqa: E402

TARGETS = {"psnr": 28.0, "ssim": 0.85}  # the original design's goals (dB, SSIM on [0, 1] RGB)
FIGURE_SEED = 0  # seed of the choice of the 8 random examples and of the retrieval queries
FIGURES = ("reconstructions.png", "retrieval.png")  # what a run may draw: one it does not is removed from --out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate an ear-teacher checkpoint: PSNR, SSIM, MAE, MSE, KL per image.",
                                formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="checkpoint written by train.py (best.pt or last.pt), or a directory written by "
                                "--export / checkpoints.export_model (then give --data)")
    p.add_argument("--data", default=None, help="uint8 .npy of ear crops (default: the run's validation file)")
    p.add_argument("--out", default="eval", help="folder for metrics.json, per_image.csv, reconstructions.png")
    p.add_argument("--force", action="store_true", help="replace the results of another checkpoint or other data in "
                   "--out (the same checkpoint and data replace their own without it)")
    p.add_argument("--export-latents", default=None, metavar="FILE.npy",
                   help="also save mu (N, latent_dim) float32 here and the kept samples' indices to FILE_index.npy")
    p.add_argument("--identity", action="store_true",
                   help="also identification (rank-1, rank-5) and verification (EER, ROC AUC) from the cosine "
                        "similarity of the identity embedding (model.embed), beside the centred raw pixels, with the "
                        "identity labels beside the data file (X_teacher.npy -> X_index.csv column subject, or "
                        "X_factors.csv column identity), and retrieval.png")
    p.add_argument("--lpips", action="store_true",
                   help="also the LPIPS distance (VGG, v0.1, lower is better) of each reconstruction to its input")
    p.add_argument("--vgg-weights", default=None, metavar="PATH",
                   help="VGG16 backbone of --lpips: a local .pth/.safetensors state dict (default: torchvision's "
                        "ImageNet VGG16 from $TORCH_HOME, as in training)")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="a student's teacher (checkpoint or exported folder) to compare it with (default: the teacher "
                        "its run distilled from; a student's save_pretrained folder does not name one)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="once the evaluation has succeeded, export the model to DIR (config.json, model.safetensors "
                        "and a README.md model card with these metrics; load with checkpoints.load_model(DIR))")
    add_inference_args(p)
    return p


# -----------------------------------------------------------------------------
# metrics

@torch.no_grad()
def per_image_metrics(model: EarVAE, ds: EarDataset, batch_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, workers: int = 0,
                      lpips: LPIPS | None = None) -> dict[str, np.ndarray]:
    """Reconstruct every kept image from its mu, the model under autocast(device, dtype), the metrics in float32.
    -> {"index": (N,) int64 original indices, "psnr", "ssim", "mae", "mse", "kl" (and "lpips" when an LPIPS
    module on `device` is given): (N,) float64 per image, "mu": (N, latent_dim) float32, "embedding": (N, E) float32
    the identity embedding model.embedding(mu)}; row i is the dataset's sample i."""
    def measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device, dtype):
            mu, logvar = model.encode(x)  # (B, D) each
            recon = model.decode(mu)  # (B, 3, 128, 128)
        mu, logvar, recon = mu.float(), logvar.float(), recon.float()
        diff = recon - x
        per_image = {"psnr": psnr(recon, x), "ssim": ssim(recon, x), "mae": diff.abs().mean(dim=(1, 2, 3)),
                     "mse": diff.square().mean(dim=(1, 2, 3)), "kl": kl_divergence(mu, logvar, reduction="none"),
                     "mu": mu, "embedding": model.embedding(mu)}
        if lpips is not None:
            per_image["lpips"] = lpips(recon, x)  # (B,) float32, computed outside autocast
        return per_image

    res = run_dataset(measure, ds, batch_size, device, workers, desc=f"evaluate {ds.path.name}")
    return {k: v.numpy() if k in ("index", "mu", "embedding") else v.numpy().astype(np.float64)
            for k, v in res.items()}


def pixel_embeddings(ds: EarDataset, chunk: int = 256) -> np.ndarray:
    """The trivial identity baseline: every kept image of `ds` as its raw pixels in [0, 1], flattened and centred on
    the mean image of the set -> (N, 3 * H * W) float32, row i the dataset's sample i. Cosine similarity of these
    rows is what a latent must beat to claim it knows more about identity than the pixels (issue 17)."""
    rows = [to_float(torch.stack([ds[i][0] for i in range(s, min(s + chunk, len(ds)))])).flatten(1).numpy()
            for s in range(0, len(ds), chunk)]  # each (c, 3 * H * W)
    pixels = np.concatenate(rows)  # (N, 3 * H * W)
    return pixels - pixels.mean(axis=0, dtype=np.float64).astype(np.float32)


def summarize(per_image: dict[str, np.ndarray]) -> dict:
    """Summary statistics of per_image_metrics()'s output: PSNR and SSIM mean, std (population), median, 5th
    percentile and whether the mean meets the original target; means of MAE, MSE, KL (and LPIPS when there)."""
    s = {}
    for k in ("psnr", "ssim"):
        v = per_image[k]
        s[k] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                "p5": float(np.percentile(v, 5)), "target": TARGETS[k], "meets_target": bool(v.mean() >= TARGETS[k])}
    s.update({k: float(per_image[k].mean()) for k in ("mae", "mse", "kl", "lpips") if k in per_image})
    return s


CSV_COLUMNS = ("index", "psnr", "ssim", "mae", "mse", "kl", "lpips", "agreement", "mu_cosine", "identity",
               "rank")  # those present are written


def save_csv(per_image: dict[str, np.ndarray]) -> Writer:
    """per_image.csv: one row per image: index in the file, psnr, ssim, mae, mse, kl (lpips with --lpips; full float
    precision) or a student's agreement and mu_cosine with its teacher, and with --identity the image's identity
    label (-1: unlabelled) and its rank (probe_ranks; 0: not a probe)."""
    cols = [k for k in CSV_COLUMNS if k in per_image]
    as_int = {k: np.issubdtype(per_image[k].dtype, np.integer) for k in cols}

    def write(f: io.BufferedWriter) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text)
        w.writerow(cols)
        w.writerows([int(per_image[k][r]) if as_int[k] else repr(float(per_image[k][r])) for k in cols]
                    for r in range(len(per_image["index"])))
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


def retrieval(mu: np.ndarray, labels: np.ndarray, ranks: np.ndarray, n: int = 6, k: int = 5,
              seed: int = FIGURE_SEED) -> dict[str, np.ndarray]:
    """Top-k retrieval by cosine similarity of the embeddings `mu` for n queries drawn (seeded) among the probes
    (ranks > 0: labelled, with another image of their identity). The gallery is every other labelled image. mu (N, D), labels (N,),
    ranks (N,) as probe_ranks -> {"query": (q,) rows, "match": (q, k) rows best first, "similarity": (q, k),
    "correct": (q, k) bool (same identity)}; rows index mu."""
    probes, gallery = np.flatnonzero(ranks > 0), np.flatnonzero(labels != UNLABELLED)
    query = np.sort(np.random.default_rng(seed).choice(probes, min(n, len(probes)), replace=False))  # (q,)
    emb = mu.astype(np.float64) / np.linalg.norm(mu.astype(np.float64), axis=1, keepdims=True)  # (N, D)
    s = emb[query] @ emb[gallery].T  # (q, G)
    s[gallery[None, :] == query[:, None]] = -np.inf  # a query does not retrieve itself
    order = np.argsort(-s, axis=1, kind="stable")[:, :min(k, len(gallery) - 1)]  # (q, k)
    match = gallery[order]
    return {"query": query, "match": match, "similarity": np.take_along_axis(s, order, axis=1),
            "correct": labels[match] == labels[query][:, None]}


def retrieval_figure(ds: EarDataset, per_image: dict[str, np.ndarray], found: dict[str, np.ndarray]) -> plt.Figure:
    """One row per query of retrieval()'s result: the query, then its matches best first, each framed green with a
    tick (same identity) or red with a cross, labelled with its cosine similarity, file index and identity."""
    q, k = found["match"].shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.6 * (k + 1), 1.9 * q), squeeze=False, layout="constrained")
    idx, ids = per_image["index"], per_image["identity"]

    def show(ax: plt.Axes, row: int) -> None:
        ax.imshow(ds[int(row)][0].permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"#{idx[row]} id {ids[row]}", fontsize=8)

    for r in range(q):
        qrow = found["query"][r]
        show(axes[r, 0], qrow)
        axes[r, 0].set_title(f"query (rank {per_image['rank'][qrow]})", fontsize=9)
        for c in range(k):
            ax, ok = axes[r, c + 1], bool(found["correct"][r, c])
            show(ax, found["match"][r, c])
            colour = "tab:green" if ok else "tab:red"
            ax.set_title(f"{'✓' if ok else '✗'} {found['similarity'][r, c]:.3f}", fontsize=9, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
    fig.suptitle(f"top-{k} matches by cosine similarity of the identity embedding (green: same identity)",
                 fontsize=10)
    return fig


def report(metrics: dict) -> str:
    """Console lines for metrics.json."""
    def vs_target(k: str, unit: str) -> str:
        m = metrics[k]
        return (f"{k.upper():<5}{m['mean']:.{2 if k == 'psnr' else 4}f}{unit} (target {m['target']:g}: "
                f"{'met' if m['meets_target'] else 'below'})   std {m['std']:.4g}, median {m['median']:.4g}, "
                f"5th percentile {m['p5']:.4g}")
    lines = [
        f"checkpoint {metrics['checkpoint']} (step {metrics['step']})",
        f"data       {metrics['data']} ({metrics['n_images']} images, {metrics['n_invalid']} invalid skipped)",
        vs_target("psnr", " dB"), vs_target("ssim", ""),
        f"MAE  {metrics['mae']:.5f}   MSE {metrics['mse']:.6f}   KL {metrics['kl']:.4g} (nats, mean per image)"]
    if "lpips" in metrics:
        lines.append(f"LPIPS {metrics['lpips']:.4f} (VGG v0.1, mean, lower is better; backbone "
                     f"{metrics['lpips_vgg_weights']})")
    if "identity" in metrics:
        m = metrics["identity"]
        lines += [
            f"identity   {m['n_images'] - m['n_unlabelled']} labelled images of {m['n_identities']} identities "
            f"({m['n_unlabelled']} unlabelled: left out); {m['n_probes']} probes ({m['n_single']} alone in their "
            f"identity: not probes)",
            f"  rank-1 {m['rank1']:.3f} (chance {m['chance_rank1']:.3f})   rank-5 {m['rank5']:.3f} "
            f"(chance {m['chance_rank5']:.3f})   leave-one-out, cosine similarity of the identity embedding",
            f"  verification EER {m['eer']:.3f}   ROC AUC {m['roc_auc']:.3f}   {tar_text(m)}   "
            f"({m['n_genuine_pairs']} genuine, {m['n_impostor_pairs']} impostor pairs)", *warning_lines(m)]
        if "identity_mu" in metrics:
            u = metrics["identity_mu"]
            lines.append(f"  all of mu, for comparison: rank-1 {u['rank1']:.3f}   rank-5 {u['rank5']:.3f}   "
                         f"EER {u['eer']:.3f}   ROC AUC {u['roc_auc']:.3f}")
        b = metrics["identity_pixels"]
        lines += [
            f"  baseline, centred raw pixels of the same images: rank-1 {b['rank1']:.3f}   rank-5 {b['rank5']:.3f}   "
            f"EER {b['eer']:.3f}   ROC AUC {b['roc_auc']:.3f}   {tar_text(b)}",
            f"  {'warning: ' if metrics['train_overlap']['shared'] else ''}{metrics['train_overlap']['note']}"]
    return "\n".join(lines)


def check_results(args: argparse.Namespace, data_path: Path) -> None:
    """OutputError where --out holds the results of another checkpoint or other data (files.check_replace), before
    the pass; --force replaces them."""
    try:
        check_replace(Path(args.out) / "metrics.json", {"checkpoint": str(args.ckpt), "data": str(data_path)},
                      args.force)
    except ValueError as e:
        raise OutputError(str(e)) from None


def tar_text(m: dict) -> str:
    """'TAR@FAR=1e-2 0.912  TAR@FAR=1e-3 0.801' of recognition_metrics' result (- where too few impostor pairs)."""
    return "  ".join(f"TAR@FAR={far:.0e} " + ("-" if m[f"tar@far={far:g}"] is None else f"{m[f'tar@far={far:g}']:.3f}")
                     for far in FARS)


def warning_lines(m: dict) -> list[str]:
    """recognition_metrics' warning of a collapsed embedding, as a report line (none without one)."""
    return [f"  warning: {m['warning']}: these figures describe no embedding"] if "warning" in m else []


def latent_files(export_latents: str) -> tuple[Path, Path]:
    """--export-latents FILE.npy -> (FILE.npy: mu, FILE_index.npy: the kept samples' indices)."""
    latents = Path(export_latents)
    return latents, latents.with_name(latents.stem + "_index.npy")


def write_results(args: argparse.Namespace, metrics: dict, per_image: dict[str, np.ndarray],
                  figures: dict[str, plt.Figure], report_text: str) -> None:
    """OUT/metrics.json, OUT/per_image.csv, the figures and (--export-latents) mu and its indices, written together
    (files.write_outputs); then an earlier evaluation's figure that this one did not draw is removed (it would sit
    beside these metrics as if it were theirs), and the report and the written files are printed."""
    out = Path(args.out)
    files = {out / "metrics.json": save_json(metrics), out / "per_image.csv": save_csv(per_image),
             **{out / name: save_figure(fig) for name, fig in figures.items()}}
    if args.export_latents is not None:
        latents, index = latent_files(args.export_latents)
        files[latents] = save_npy(per_image["mu"].astype(np.float32))
        files[index] = save_npy(per_image["index"].astype(np.int64))
    stale = [out / name for name in FIGURES if out / name not in files and (out / name).exists()]
    write_outputs(files, removes=stale)  # refused where they are the user's files (no earlier evaluation there)
    for path in stale:
        path.unlink()
    print(report_text)
    print(f"wrote {', '.join(str(p) for p in files)}" + (f"; removed the earlier {', '.join(p.name for p in stale)}"
                                                        if stale else ""))


def card_metrics(metrics: dict) -> dict[str, float | int | str]:
    """The flat table of metrics.json's headline numbers for the model card of --export."""
    card = {"data": Path(metrics["data"]).name, "images": metrics["n_images"],
            "PSNR (dB, mean)": metrics["psnr"]["mean"], "SSIM (mean)": metrics["ssim"]["mean"],
            "MAE (mean)": metrics["mae"], "MSE (mean)": metrics["mse"], "KL (nats, mean)": metrics["kl"]}
    if "lpips" in metrics:
        card["LPIPS (VGG v0.1, mean)"] = metrics["lpips"]
    if "identity" in metrics:
        m = metrics["identity"]
        card.update({"rank-1 (cosine of model.embed, leave-one-out)": m["rank1"], "rank-1 chance": m["chance_rank1"],
                     "rank-5": m["rank5"], "rank-5 chance": m["chance_rank5"], "verification EER": m["eer"],
                     "verification ROC AUC": m["roc_auc"], "identities": m["n_identities"], "probes": m["n_probes"],
                     "identities also in training": metrics["train_overlap"]["card"]})
        if "warning" in m:
            card["warning"] = m["warning"]
        if "identity_mu" in metrics:
            u = metrics["identity_mu"]
            card.update({"rank-1 of all of mu, for comparison": u["rank1"],
                         "verification EER of all of mu, for comparison": u["eer"]})
        b = metrics["identity_pixels"]
        card.update({"rank-1, baseline: centred raw pixels": b["rank1"], "rank-5, baseline: centred raw pixels":
                     b["rank5"], "verification EER, baseline: centred raw pixels": b["eer"],
                     "verification ROC AUC, baseline: centred raw pixels": b["roc_auc"]})
    return card


def training_overlap(train: Path | None, data: Path, trained_on: dict | None = None) -> dict:
    """Whether the identities of `data` also have images in the training file `train` (data.shared_identities): rank-1
    and EER on identities seen in training are not those of new ones. `trained_on`: the fingerprint the checkpoint
    kept of that file (data.fingerprint); a file changed since says nothing about what the run saw. -> {"train_data":
    str | None, "identities": int | None, "shared": int | None (None: unknown), "note": a console line, "card": the
    model card's value}."""
    changed = None
    if train is not None and trained_on is not None and train.is_file():  # the images; the CSVs beside may change
        images = lambda fp: {k: v for k, v in fp.items() if k not in FINGERPRINT_SIDECARS}  # noqa: E731
        changed = fingerprint_change(images(trained_on), images(fingerprint(train, open_npy(train))))
    found = None if train is None or changed else shared_identities(train, data)
    if found is None:
        why = ("the checkpoint names no training data (an export)" if train is None else
               f"{train} changed since the run trained on it ({changed})" if changed else
               f"{train} has no identity labels beside it, or labels of another kind")
        return {"train_data": None if train is None else str(train), "identities": None, "shared": None,
                "note": f"identities of the training data unknown ({why}): some here may have been seen in training",
                "card": "unknown"}
    names, shared = found
    if shared:
        examples = ", ".join(sorted(shared)[:5]) + (", ..." if len(shared) > 5 else "")
        note = (f"{len(shared)} of {len(names)} identities here also have images in the training data {train} "
                f"({examples}): rank-1 and EER are not on unseen identities (data.py convert --split-by subject)")
    else:
        note = f"none of the {len(names)} identities here has images in the training data {train} (subject-disjoint)"
    return {"train_data": str(train), "identities": len(names), "shared": len(shared), "note": note,
            "card": f"{len(shared)} of {len(names)}" + (" (not subject-disjoint)" if shared else "")}


def main(argv: list[str] | None = None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.export_latents is not None and not args.export_latents.endswith(".npy"):
        parser.error(f"--export-latents {args.export_latents}: expected a file name ending in .npy")
    if args.export_latents is not None:  # never over a file: it may be the data itself or earlier latents
        for path in latent_files(args.export_latents):
            if path.is_file():
                parser.error(f"--export-latents {args.export_latents}: {path} exists (it is never overwritten): "
                             f"delete it or choose another name")
    if args.vgg_weights is not None and not args.lpips:
        parser.error("--vgg-weights is the backbone of --lpips: add --lpips")
    outputs = [("--out", args.out, check_output_dir), ("--export", args.export, check_export_dir),
               ("--export-latents", args.export_latents, check_output_file)]
    for flag, path, check in outputs:  # before the long work
        try:
            if path is not None:
                check(path)
        except ValueError as e:
            parser.error(f"{flag} {e}")
    device, dtype = setup(args, parser)

    student_folder = is_student_folder(args.ckpt)
    ckpt = {"model": None, "run_config": None} if student_folder else read_checkpoint(args.ckpt)
    if "landmark_config" in ckpt:
        raise CheckpointError(f"{args.ckpt}: a landmark model's checkpoint (landmarker.py); eval.py measures teachers "
                              f"and students. Its NME and PCK: its run's metrics.csv, or onnx_export.py {args.ckpt} "
                              f"--out DIR --data VAL.npy")
    if student_folder or "student_config" in ckpt:
        if args.lpips:
            parser.error("--lpips measures reconstructions, and a student has none")
        return evaluate_student(args, ckpt, device, dtype)
    if args.teacher is not None:
        parser.error(f"--teacher: {args.ckpt} is a teacher; --teacher names a student's teacher")
    info = checkpoint_info(ckpt)
    data_path = data_file(args.data, info, "val", args.ckpt, "--data")
    ds = EarDataset(data_path, max_invalid=max_invalid(args, info))
    labels = read_identities(data_path, ds) if args.identity else None
    if args.identity and labels is None:
        raise DataError(f"{data_path}: --identity needs identity labels: {missing_labels(data_path)}")
    if labels is not None and (problem := label_problem(labels)):  # before the pass, not after it
        raise DataError(f"{data_path}: --identity: {problem}")
    vgg_weights = args.vgg_weights or "imagenet"
    lpips = LPIPS(vgg_weights).to(device) if args.lpips else None
    model, _ = load_model(args.ckpt, device, ckpt)
    del ckpt
    check_results(args, data_path)  # every input read: the last check before the pass
    print(f"{data_path}: {ds.summary()}")
    if labels is not None:
        n_unlabelled = int((labels == UNLABELLED).sum())
        print(f"identity labels: {len(labels) - n_unlabelled} of {len(labels)} images labelled, {n_unlabelled} "
              f"unlabelled (left out of recognition)")

    per_image = per_image_metrics(model, ds, args.batch_size, device, dtype, args.workers, lpips)
    metrics = {"n_images": len(ds), "n_invalid": ds.n_total - len(ds), "checkpoint": str(args.ckpt),
               "step": info["step"], "data": str(data_path), **summarize(per_image)}
    if lpips is not None:
        metrics["lpips_vgg_weights"] = vgg_weights
    figures = {"reconstructions.png": reconstruction_figure(model, ds, per_image, device, dtype)}
    if labels is not None:
        try:
            metrics["identity"] = recognition_metrics(per_image["embedding"], labels)
            per_image["rank"] = probe_ranks(per_image["embedding"], labels)
            if model.cfg.embed_dim or model.cfg.identity_dims not in (0, model.cfg.latent_dim):  # both reported
                metrics["identity_mu"] = recognition_metrics(per_image["mu"], labels)
            metrics["identity_pixels"] = recognition_metrics(pixel_embeddings(ds), labels)
        except ValueError as e:  # labels with nothing to identify, or embeddings without a cosine similarity
            raise DataError(f"{data_path}: --identity: {e}") from e
        metrics["train_overlap"] = training_overlap(info["train"], data_path, info["train_fingerprint"])
        per_image["identity"] = labels
        found = retrieval(per_image["embedding"], labels, per_image["rank"])
        figures["retrieval.png"] = retrieval_figure(ds, per_image, found)

    write_results(args, metrics, per_image, figures, report(metrics))
    if args.export is not None:
        written = export_model(args.ckpt, args.export, card_metrics(metrics))  # its three files together or none
        print(f"exported the model to {', '.join(str(p) for p in written)}")
    return metrics


def check_export_dir(path: str) -> None:
    """check_output_dir, and a folder holding any file an export writes (config.json, model.safetensors, README.md)
    is refused (ValueError): an export never replaces a model saved earlier, nor a user's README."""
    check_output_dir(path)
    if taken := [f for f in (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD) if (Path(path) / f).exists()]:
        raise ValueError(f"{path}: holds {', '.join(taken)} already (never written over: a saved model, or files of "
                         f"yours); export to a new folder")


# -----------------------------------------------------------------------------
# a student (distill.py)

@torch.no_grad()
def student_outputs(student: Student, teacher: EarVAE, ds: EarDataset, batch_size: int, device: torch.device,
                    dtype: torch.dtype, workers: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Student and teacher on every kept image of ds, both under autocast(device, dtype), batch by batch in turn.
    -> ({"index": (N,) int64, "agreement": (N,) cosine of the two identity embeddings, "mu_cosine": (N,) cosine of
    the two mu, "embedding": (N, E) the student's, "teacher_embedding": (N, E), "mu": (N, latent_dim) the student's},
    {"student": images/s, "teacher": images/s}: forward time alone (no data loading), after one untimed warm-up
    batch of each; the teacher's is encoder + head, what a student replaces)."""
    seconds, n = {"student": 0.0, "teacher": 0.0}, 0

    def compare(x: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal n
        with autocast(device, dtype):
            if n == 0:  # warm-up on the first batch: allocations and kernel choice are not what the speed is about
                student(x), teacher_targets(teacher, x)
            t0 = clock(device)
            s = student(x)
            t1 = clock(device)
            t = teacher_targets(teacher, x)
            t2 = clock(device)
        seconds["student"] += t1 - t0
        seconds["teacher"] += t2 - t1
        n += len(x)
        s_embed, t_embed, s_mu, t_mu = s["embed"].float(), t["embed"].float(), s["mu"].float(), t["mu"].float()
        return {"agreement": torch.nn.functional.cosine_similarity(s_embed, t_embed),
                "mu_cosine": torch.nn.functional.cosine_similarity(s_mu, t_mu), "embedding": s_embed,
                "teacher_embedding": t_embed, "mu": s_mu}

    res = {k: v.numpy() for k, v in run_dataset(compare, ds, batch_size, device, workers,
                                                desc=f"student and teacher on {ds.path.name}").items()}
    res["agreement"], res["mu_cosine"] = res["agreement"].astype(np.float64), res["mu_cosine"].astype(np.float64)
    return res, {k: n / v for k, v in seconds.items()}


def evaluate_student(args: argparse.Namespace, ckpt: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """eval.py on a student: agreement with its teacher, speed of both, and with --identity recognition beside the
    teacher and the pixels; OUT/metrics.json, OUT/per_image.csv (and OUT/retrieval.png) -> the metrics."""
    info = checkpoint_info(ckpt)
    teacher_path = args.teacher or (ckpt["run_config"] or {}).get("teacher")
    if teacher_path is None:
        raise CheckpointError(f"{args.ckpt}: a student's saved folder does not name its teacher: give --teacher")
    if args.teacher is None and not Path(teacher_path).exists():  # moved or deleted since distill.py ran
        raise CheckpointError(f"{teacher_path}: no such file or folder: the teacher {args.ckpt} was distilled from "
                              f"(its run recorded this path); give its new place with --teacher")
    data_path = data_file(args.data, info, "val", args.ckpt, "--data")
    ds = EarDataset(data_path, max_invalid=max_invalid(args, info))
    labels = read_identities(data_path, ds) if args.identity else None
    if args.identity and labels is None:
        raise DataError(f"{data_path}: --identity needs identity labels: {missing_labels(data_path)}")
    if labels is not None and (problem := label_problem(labels)):  # before the pass, not after it
        raise DataError(f"{data_path}: --identity: {problem}")
    student = load_student(args.ckpt, device, ckpt)  # a folder loads from its files, a checkpoint from ckpt
    teacher, _ = load_model(teacher_path, device)
    if ckpt.get("teacher_sha256") not in (None, weights_sha256(teacher)):
        raise CheckpointError(f"{teacher_path}: not the teacher {args.ckpt} was distilled from (its weights' sha256 "
                              f"differs from the one the checkpoint recorded)")
    del ckpt
    teacher_embed = teacher.cfg.embedding_dim
    if (student.cfg.embed_dim, student.cfg.latent_dim) != (teacher_embed, teacher.cfg.latent_dim):
        raise CheckpointError(f"{teacher_path}: not this student's teacher: its embedding and latent are "
                              f"{teacher_embed}-d and {teacher.cfg.latent_dim}-d, the student's "
                              f"{student.cfg.embed_dim}-d and {student.cfg.latent_dim}-d")
    check_results(args, data_path)  # every input read: the last check before the pass
    print(f"{data_path}: {ds.summary()}")

    per_image, speed = student_outputs(student, teacher, ds, args.batch_size, device, dtype, args.workers)
    a = per_image["agreement"]
    metrics = {"n_images": len(ds), "n_invalid": ds.n_total - len(ds), "checkpoint": str(args.ckpt),
               "step": info["step"], "data": str(data_path), "student": student.cfg.arch, "teacher": str(teacher_path),
               "agreement": {"mean": float(a.mean()), "median": float(np.median(a)), "p5": float(np.percentile(a, 5)),
                             "min": float(a.min())},
               "mu_cosine": float(per_image["mu_cosine"].mean()),
               "speed": {"device": str(device), "batch_size": args.batch_size,
                         "student_images_per_s": speed["student"], "teacher_images_per_s": speed["teacher"],
                         "ratio": speed["student"] / speed["teacher"], "student_params": count(student)[0],
                         "teacher_params": count(teacher)[0]}}
    figures = {}
    if labels is not None:
        try:
            metrics["identity"] = recognition_metrics(per_image["embedding"], labels)
            per_image["rank"] = probe_ranks(per_image["embedding"], labels)
            metrics["identity_teacher"] = recognition_metrics(per_image["teacher_embedding"], labels)
            metrics["identity_pixels"] = recognition_metrics(pixel_embeddings(ds), labels)
        except ValueError as e:
            raise DataError(f"{data_path}: --identity: {e}") from e
        metrics["train_overlap"] = training_overlap(info["train"], data_path, info["train_fingerprint"])
        per_image["identity"] = labels
        figures["retrieval.png"] = retrieval_figure(ds, per_image, retrieval(per_image["embedding"], labels,
                                                                             per_image["rank"]))
    write_results(args, metrics, per_image, figures, student_report(metrics))
    if args.export is not None:
        student.save_pretrained(args.export, model_card_kwargs={"metrics": student_card_metrics(metrics)})
        print(f"exported the student to {args.export}")
    return metrics


def student_report(metrics: dict) -> str:
    """Console lines for a student's metrics.json."""
    a, s = metrics["agreement"], metrics["speed"]
    lines = [
        f"checkpoint {metrics['checkpoint']} (step {metrics['step']}): a {metrics['student']} student of the teacher "
        f"{metrics['teacher']}",
        f"data       {metrics['data']} ({metrics['n_images']} images, {metrics['n_invalid']} invalid skipped)",
        f"agreement  cosine of student and teacher identity embeddings: mean {a['mean']:.4f}, median "
        f"{a['median']:.4f}, 5th percentile {a['p5']:.4f}, min {a['min']:.4f}; of mu: mean {metrics['mu_cosine']:.4f}",
        f"speed      on {s['device']}, batch {s['batch_size']}, forward only: student {s['student_images_per_s']:.1f} "
        f"images/s ({s['student_params'] / 1e6:.2f}M parameters), teacher {s['teacher_images_per_s']:.1f} images/s "
        f"({s['teacher_params'] / 1e6:.2f}M): {s['ratio']:.1f}x"]
    if "identity" in metrics:
        m = metrics["identity"]
        lines.append(f"identity   {m['n_images'] - m['n_unlabelled']} labelled images of {m['n_identities']} "
                     f"identities, {m['n_probes']} probes; leave-one-out, cosine similarity (chance rank-1 "
                     f"{m['chance_rank1']:.3f})")
        for name, key in (("student", "identity"), ("teacher", "identity_teacher"),
                          ("baseline, centred raw pixels", "identity_pixels")):
            m = metrics[key]
            lines.append(f"  {name + ':':<30} rank-1 {m['rank1']:.3f}   rank-5 {m['rank5']:.3f}   EER {m['eer']:.3f}"
                         f"   ROC AUC {m['roc_auc']:.3f}   {tar_text(m)}")
            lines += warning_lines(m)
        s, t = metrics["identity"], metrics["identity_teacher"]
        lines.append(f"  student / teacher: rank-1 {s['rank1'] / t['rank1']:.2f}x, EER {s['eer'] / t['eer']:.2f}x"
                     if t["rank1"] > 0 and t["eer"] > 0 else "  student / teacher: no ratio (a teacher figure is 0)")
        lines.append(f"  {'warning: ' if metrics['train_overlap']['shared'] else ''}{metrics['train_overlap']['note']}")
    return "\n".join(lines)


def student_card_metrics(metrics: dict) -> dict[str, float | int | str]:
    """The flat table of a student's headline numbers for its model card (--export)."""
    s = metrics["speed"]
    card = {"data": Path(metrics["data"]).name, "images": metrics["n_images"], "teacher": metrics["teacher"],
            "agreement with the teacher (cosine of identity embeddings, mean)": metrics["agreement"]["mean"],
            "agreement of mu (cosine, mean)": metrics["mu_cosine"],
            f"images/s on {s['device']} (batch {s['batch_size']})": s["student_images_per_s"],
            "teacher images/s, same run": s["teacher_images_per_s"]}
    if "identity" in metrics:
        for name, key in (("", "identity"), (", teacher", "identity_teacher"),
                          (", baseline: centred raw pixels", "identity_pixels")):
            m = metrics[key]
            card.update({f"rank-1{name}": m["rank1"], f"verification EER{name}": m["eer"]})
            if "warning" in m:
                card[f"warning{name}"] = m["warning"]
        card["identities also in training"] = metrics["train_overlap"]["card"]
    return card


if __name__ == "__main__":
    run_command(main, get_parser)
