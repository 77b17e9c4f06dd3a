"""Probe the teacher's pyramid: how much of the ear's anatomy its frozen features carry (Probe3D's protocol).

    python probe.py checkpoints/best.pt                  # heads fitted on the run's train split, scored on its val split
    python probe.py demo/checkpoints/best.pt --out demo/probe

The teacher stays frozen. Each of three feature sources - the trained teacher's pyramid (`encoder.features`), the
same architecture at random initialisation, and the raw pixels (8x8 patches) - is put on one 16x16 grid, and small
heads are fitted on it with the same budget and seed:

- linear: a 1x1 convolution of the last map; multi-scale: a 1x1 convolution of all pyramid maps stacked
  (DINOv2's linear and multi-scale linear heads; pixels have one map, so one head). Each predicts a heatmap per
  landmark, read out by soft-argmax, and the ear mask's logit, upsampled bilinearly to 128x128.
- landmarks: NME (mean point error over the square root of the landmarks' bounding-box area, the field's box
  normalisation), the mean error in pixels of the 128x128 crop and PCK@0.1 (points within 0.1 of the box's longer
  side, the PCK convention); mask: IoU of the thresholded logit.
- correspondence, training-free: each landmark's feature in one image (bilinear sample), its nearest neighbour
  (cosine) in the other image's maps upsampled bilinearly to 64x64, PCK@0.1 of that image's landmark box (Probe3D,
  El Banani et al., CVPR 2024).

Beside them, the trivial baseline: the training split's mean landmarks and mean mask for every image. Landmarks and
masks come from the files beside the images (`X_landmarks.csv`, `X_masks.npy`, written by synth.py; see
docs/data.md). Writes OUT/probe.json and OUT/probe.md; prints the table.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_model, read_checkpoint
from cli import HelpFormatter, positive_int, seed_int
from data import (EarDataset, check_landmark_names, landmarks_file, read_landmarks, read_masks, to_float,
                  whole_landmarks)
from errors import DataError, OutputError
from files import check_output_dir, check_replace, save_json, save_text, write_outputs
from inference import (add_inference_args, autocast, checkpoint_info, data_file, max_invalid, run_command,
                       setup)
from losses import point_features
from model import build_model

GRID = 16  # every source's maps are put on this grid (8 px cells of the 128x128 crop)
CELL = 128 / GRID  # pixels per cell
PCK_AT = 0.1  # a point is correct within this fraction of the landmark box's longer side
LR = 3e-2  # Adam, for every head
MATCH_UPSAMPLE = 4  # correspondence searches the other image's maps upsampled to 64x64 (2 px cells)
PIXEL_PATCH = 128 // GRID  # the pixels' patches: 8x8x3 = 192 values per cell


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="teacher checkpoint written by train.py")
    p.add_argument("--fit-data", default=None, help=".npy the heads are fitted on (default: the run's train file)")
    p.add_argument("--data", default=None, help=".npy the heads are scored on (default: the run's val file)")
    p.add_argument("--fit-images", type=positive_int, default=1000, help="first N valid images of --fit-data")
    p.add_argument("--images", type=positive_int, default=400, help="first N valid images of --data")
    p.add_argument("--steps", type=positive_int, default=600, help="Adam steps of each head")
    p.add_argument("--probe-batch", type=positive_int, default=64, help="images per head step")
    p.add_argument("--seed", type=seed_int, default=0, help="the random-init encoder, the heads and the pairs")
    p.add_argument("--out", default="probe", help="folder for probe.json and probe.md")
    p.add_argument("--force", action="store_true", help="replace the results of another checkpoint or data in --out")
    add_inference_args(p)
    return p


# -----------------------------------------------------------------------------
# features on one grid

def to_grid(m: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) -> (B, C, GRID, GRID): averaged over cells when g > GRID, bilinear when g < GRID."""
    if m.shape[-1] == GRID:
        return m
    if m.shape[-1] > GRID:
        return F.adaptive_avg_pool2d(m, GRID)
    return F.interpolate(m, size=(GRID, GRID), mode="bilinear", align_corners=False)


def pixel_maps(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x (B, 3, 128, 128) in [0, 1] -> {"pixels": (B, 192, GRID, GRID)}: each cell's 8x8x3 pixels."""
    return {"pixels": F.pixel_unshuffle(x, PIXEL_PATCH)}


@torch.no_grad()
def extract(maps, images: torch.Tensor, batch_size: int, device: torch.device,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """maps(x) -> {name: (B, C, g, g)} over uint8 images (N, 3, 128, 128), batch by batch under autocast ->
    {name: (N, C, GRID, GRID) float32 on the CPU}."""
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size].to(device))  # (B, 3, 128, 128)
        with autocast(device, dtype):
            feats = maps(x)
        for k, m in feats.items():
            out.setdefault(k, []).append(to_grid(m.float()).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def standardise(fit: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel of (N, C, G, G) maps centred and scaled by the fit set's statistics (so one learning rate suits
    every source)."""
    mean = fit.mean(dim=(0, 2, 3), keepdim=True)
    std = fit.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (fit - mean) / std, (test - mean) / std


# -----------------------------------------------------------------------------
# heads and metrics

def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Heatmap logits (B, K, G, G) -> expected positions (B, K, 2) (x, y) in pixels of the 128x128 crop, over the
    cell centres."""
    b, k, g, _ = logits.shape
    p = logits.flatten(2).softmax(-1).view(b, k, g, g)
    centres = (torch.arange(g, dtype=p.dtype, device=p.device) + 0.5) * (128 / g)  # (G,)
    return torch.stack([(p.sum(2) * centres).sum(-1), (p.sum(3) * centres).sum(-1)], -1)


def box_size(points: torch.Tensor) -> torch.Tensor:
    """(N, K, 2) -> (N,) sqrt of the area of each image's landmark bounding box, in pixels (at least 1)."""
    wh = points.amax(1) - points.amin(1)  # (N, 2)
    return (wh[:, 0] * wh[:, 1]).clamp_min(1.0).sqrt()


def box_side(points: torch.Tensor) -> torch.Tensor:
    """(N, K, 2) -> (N,) the longer side of each image's landmark bounding box, in pixels (at least 1)."""
    return (points.amax(1) - points.amin(1)).amax(-1).clamp_min(1.0)


def pck(pred: torch.Tensor, true: torch.Tensor) -> float:
    """pred, true (N, K, 2) pixels -> the fraction of points within PCK_AT of true's box_side."""
    return ((pred - true).norm(dim=-1) <= PCK_AT * box_side(true)[:, None]).float().mean().item()


def landmark_scores(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """pred, true (N, K, 2) pixels -> {"nme": the error over box_size, "error_px": in pixels, "pck"}."""
    err = (pred - true).norm(dim=-1)  # (N, K)
    return {"nme": (err / box_size(true)[:, None]).mean().item(), "error_px": err.mean().item(),
            "pck": pck(pred, true)}


def mask_iou(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Boolean masks (N, 128, 128) -> mean IoU over images (an image where both are empty counts 1)."""
    inter = (pred & true).flatten(1).sum(1).float()
    union = (pred | true).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean().item()


def fit_head(fit: torch.Tensor, points: torch.Tensor, masks: torch.Tensor, test: torch.Tensor, steps: int,
             batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 convolution from standardised maps (N, C, G, G) to K landmark heatmaps and one mask logit, fitted with
    Adam for `steps` steps on random batches: loss = mean point distance in cells + the mask's binary cross-entropy
    at 128x128. -> for `test` (M, C, G, G): landmarks (M, K, 2) in pixels and masks (M, 128, 128) bool."""
    g = torch.Generator().manual_seed(seed)
    k = points.shape[1]
    head = nn.Conv2d(fit.shape[1], k + 1, 1)
    with torch.no_grad():  # seeded initialisation, independent of the global RNG
        bound = 1 / math.sqrt(fit.shape[1])
        head.weight.uniform_(-bound, bound, generator=g)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=LR)

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = head(x)  # (B, K + 1, G, G)
        mask = F.interpolate(out[:, k:], size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
        return soft_argmax(out[:, :k]), mask  # (B, K, 2), (B, 128, 128) logits

    for _ in range(steps):
        i = torch.randint(len(fit), (min(batch_size, len(fit)),), generator=g)
        pts, mask = predict(fit[i])
        loss = (pts - points[i]).norm(dim=-1).mean() / CELL + F.binary_cross_entropy_with_logits(mask, masks[i].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pts, mask = predict(test)
    return pts, mask > 0


def correspondence_pck(maps: torch.Tensor, points: torch.Tensor, seed: int, chunk: int = 32) -> float:
    """Training-free keypoint transfer. maps (N, C, G, G), points (N, K, 2) pixels. Each image i is paired with
    image perm[i] (a derangement from `seed`); each landmark's feature in i (bilinear sample, L2-normalised) finds
    its nearest position (cosine) in the other image's maps upsampled MATCH_UPSAMPLE times, whose centre is the
    prediction -> pck() against the other image's points. `chunk` images at a time (memory)."""
    n = len(maps)
    perm = (torch.arange(n) + 1 + torch.randint(n - 1, (1,), generator=torch.Generator().manual_seed(seed))) % n
    src = point_features(maps, points, 128)  # (N, K, C)
    g = maps.shape[-1] * MATCH_UPSAMPLE
    best = []
    for i in range(0, n, chunk):
        other = F.interpolate(maps[perm[i:i + chunk]], size=(g, g), mode="bilinear", align_corners=False)
        other = F.normalize(other.flatten(2), dim=1)  # (b, C, g*g)
        best.append(torch.einsum("nkc,ncp->nkp", src[i:i + chunk], other).argmax(-1))  # (b, K)
    best = torch.cat(best)  # (N, K)
    pred = torch.stack([best % g, best // g], -1).float().add(0.5).mul(128 / g)  # (N, K, 2)
    return pck(pred, points[perm])


def probe_source(fit_maps: dict[str, torch.Tensor], test_maps: dict[str, torch.Tensor], data: dict,
                 args: argparse.Namespace) -> list[dict]:
    """One source's rows: a linear head on its last map and, with more than one map, a multi-scale head on all of
    them; its correspondence PCK (on all maps, standardised) in each."""
    names = list(fit_maps)
    fit_all, test_all = standardise(torch.cat([fit_maps[k] for k in names], 1), torch.cat([test_maps[k] for k in names], 1))
    corr = correspondence_pck(test_all, data["test_points"], args.seed)
    heads = {"linear": standardise(fit_maps[names[-1]], test_maps[names[-1]])}
    if len(names) > 1:
        heads["multi-scale"] = (fit_all, test_all)
    rows = []
    for head, (fit, test) in heads.items():
        pts, mask = fit_head(fit, data["fit_points"], data["fit_masks"], test, args.steps, args.probe_batch, args.seed)
        rows.append({"head": head, "channels": fit.shape[1], **landmark_scores(pts, data["test_points"]),
                     "mask_iou": mask_iou(mask, data["test_masks"]), "correspondence_pck": corr})
    return rows


def mean_baseline(data: dict) -> dict:
    """Every test image given the fit split's mean landmarks and its mean mask (> 0.5)."""
    pts = data["fit_points"].mean(0, keepdim=True).expand_as(data["test_points"])
    mask = (data["fit_masks"].float().mean(0) > 0.5).expand_as(data["test_masks"])
    return {"head": "-", "channels": 0, **landmark_scores(pts, data["test_points"]),
            "mask_iou": mask_iou(mask, data["test_masks"]), "correspondence_pck": None}


# -----------------------------------------------------------------------------
# data, the whole probe, the table

def load_split(path: Path, n: int, max_bad: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The first n valid images of an .npy whose landmarks all lie in the crop, with their landmarks and masks ->
    uint8 (n, 3, 128, 128), float32 (n, K, 2) pixels, bool (n, 128, 128), the landmarks' names; how many images
    before them had a landmark outside the crop (NaN) is printed. DataError (from data.read_landmarks / read_masks)
    where they are missing or bad, or fewer than 2 images are left."""
    ds = EarDataset(path, max_invalid=max_bad)
    names, points = read_landmarks(path)  # (N_total, K, 2)
    masks = read_masks(path)  # (N_total, 128, 128)
    rows = whole_landmarks(points, ds.keep)[:n]  # positions in ds
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} valid image(s) with every landmark in the crop; the probe needs 2")
    if cut := int(rows[-1]) + 1 - len(rows):  # the images before the last one taken that were left out
        print(f"{path}: left out {cut} image(s) with a landmark outside the crop")
    images = torch.stack([ds[int(i)][0] for i in rows])
    keep = ds.keep[rows]
    return images, torch.from_numpy(points[keep]), torch.from_numpy(masks[keep]).bool(), names


def run_probe(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    content = read_checkpoint(args.ckpt)
    info = checkpoint_info(content)
    fit_path = data_file(args.fit_data, info, "train", args.ckpt, "--fit-data")
    test_path = data_file(args.data, info, "val", args.ckpt, "--data")
    bad = max_invalid(args, info)
    fit_images, fit_points, fit_masks, fit_names = load_split(fit_path, args.fit_images, bad)
    test_images, test_points, test_masks, test_names = load_split(test_path, args.images, bad)
    check_landmark_names(test_names, fit_names, test_path, f"the fit data's {landmarks_file(fit_path).name}")
    out = Path(args.out) / "probe.json"
    inputs = {"checkpoint": str(args.ckpt), "fit_data": str(fit_path), "data": str(test_path),
              "fit_images": args.fit_images, "images": args.images, "steps": args.steps,
              "probe_batch": args.probe_batch, "seed": args.seed}  # what the figures depend on
    try:
        check_replace(out, inputs, args.force)
    except ValueError as e:
        raise OutputError(str(e)) from None
    teacher, cfg = load_model(args.ckpt, device, content)
    del content
    torch.manual_seed(args.seed)
    random_init = build_model(replace(cfg, pretrained=False)).to(device).eval()
    data = {"fit_points": fit_points, "fit_masks": fit_masks, "test_points": test_points, "test_masks": test_masks}

    rows = {"mean of the fit split": [mean_baseline(data)]}
    sources = {"teacher": teacher.encoder.features, "random-init encoder": random_init.encoder.features,
               "pixels": pixel_maps}
    for name, maps in sources.items():
        fit_maps = extract(maps, fit_images, args.batch_size, device, dtype)
        test_maps = extract(maps, test_images, args.batch_size, device, dtype)
        rows[name] = probe_source(fit_maps, test_maps, data, args)
        print(f"probed {name}")
    return {**inputs, "step": info["step"], "n_fit": len(fit_images), "n_test": len(test_images),
            "landmarks": test_points.shape[1], "grid": GRID, "rows": rows,
            **targets(rows)}


def targets(rows: dict) -> dict:
    """The issue's targets for the teacher: linear landmark NME at most 0.6x the random-init encoder's, and
    correspondence PCK at least 2x the pixels'."""
    lin = {name: next(r for r in rs if r["head"] == "linear") for name, rs in rows.items() if name != "mean of the fit split"}
    nme_ratio = lin["teacher"]["nme"] / lin["random-init encoder"]["nme"]
    corr_ratio = lin["teacher"]["correspondence_pck"] / max(lin["pixels"]["correspondence_pck"], 1e-9)
    return {"nme_vs_random_init": nme_ratio, "correspondence_vs_pixels": corr_ratio}


def table(result: dict) -> str:
    lines = ["| features | head | landmark NME | error (px of 128) | PCK@0.1 | mask IoU | correspondence PCK@0.1 |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in result["rows"].items():
        for r in rs:
            corr = "-" if r["correspondence_pck"] is None else f"{r['correspondence_pck']:.3f}"
            lines.append(f"| {name} | {r['head']} | {r['nme']:.3f} | {r['error_px']:.2f} | {r['pck']:.3f} | "
                         f"{r['mask_iou']:.3f} | {corr} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    return (f"{result['checkpoint']} (step {result['step']}): heads fitted on {result['n_fit']} images of "
            f"{result['fit_data']}, scored on {result['n_test']} of {result['data']}; {result['landmarks']} landmarks, "
            f"{result['grid']}x{result['grid']} grid, {result['steps']} Adam steps, seed {result['seed']}\n\n"
            f"{table(result)}\n\n"
            f"teacher's linear NME / random-init's: {result['nme_vs_random_init']:.2f} (target <= 0.6: "
            f"{'met' if result['nme_vs_random_init'] <= 0.6 else 'missed'}); correspondence PCK / pixels': "
            f"{result['correspondence_vs_pixels']:.2f} (target >= 2: "
            f"{'met' if result['correspondence_vs_pixels'] >= 2 else 'missed'})" + beaten(result["rows"]))


def beaten(rows: dict) -> str:
    """A line when the trivial baseline (the fit split's mean) beats every feature source's best landmark NME."""
    mean = rows["mean of the fit split"][0]["nme"]
    best = min(r["nme"] for name, rs in rows.items() if name != "mean of the fit split" for r in rs)
    return (f"\nthe fit split's mean landmarks ({mean:.3f}) beat every probe (best NME {best:.3f}): these features "
            f"locate the parts no better than their average position" if best >= mean else "")


def main(argv: list[str] | None = None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out)  # before the long work
    except ValueError as e:
        parser.error(f"--out {e}")
    device, dtype = setup(args, parser)
    result = run_probe(args, device, dtype)
    text = report(result)
    print(text)
    out = Path(args.out)
    write_outputs({out / "probe.json": save_json(result), out / "probe.md": save_text(text)})
    print(f"wrote {out / 'probe.json'}, {out / 'probe.md'}")
    return result


if __name__ == "__main__":
    run_command(main, get_parser)
