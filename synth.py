"""Synthetic ears: procedural lateral ear photographs with known generating factors, for training and for checking
what the teacher's latent space encodes (eigenears.py correlates its principal components with the factors).

    render_ears                 n ears -> uint8 images (n, S, S, 3) and their factors (n, len(FACTORS)),
                                deterministic per seed
    render_identities           K identities x V views: the same ANATOMY in every view of an identity, the other
                                factors drawn afresh per view -> images, factors and the identity of each image
    landmarks / masks           the anatomical LANDMARKS (pixels) and the ear's mask of each image, exact from the
                                renderer's geometry
    write_synthetic             {train,val}_teacher.npy, _factors.csv, _landmarks.csv and _masks.npy in a folder
                                (data.py reads them)
    write_synthetic_identities  the same files from render_identities, with an `identity` column in the CSVs

CLI:
    python synth.py --out data --n-train 2000 --n-val 200 --seed 0
    python synth.py --out data --identities 200 --views 10 --seed 0    # 200 x 10 images per split
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from cli import HelpFormatter, non_negative_int, positive_int, safe_console, seed_int
from data import IMAGE_SIZE, landmarks_file, masks_file, refuse_dataset, save_landmarks, write_dataset
from errors import DataError, OutputError
from files import Writer, check_output_dir, save_npy

# Generating factors of the synthetic ears, each sampled uniformly in its range (CSV column order).
# Ear units: the ear spans about y in [-0.9, 0.9] at scale 1, where the crop spans [-1, 1].
FACTOR_RANGES: dict[str, tuple[float, float]] = {
    "scale": (0.8, 0.97),         # ear size relative to the crop
    "rotation": (-15.0, 15.0),    # degrees, counter-clockwise
    "elongation": (0.8, 1.25),    # height / width stretch at constant area
    "lobe_size": (0.0, 1.0),      # 0 small lobe .. 1 large lobe
    "lobe_attached": (0.0, 1.0),  # 0 free (hanging) lobe .. 1 lobe attached to the cheek
    "helix_width": (0.06, 0.14),  # width of the outer rim, ear units
    "concha_depth": (0.3, 1.0),   # depth (and darkness) of the bowl around the ear canal
    "skin_tone": (0.0, 1.0),      # 0 light .. 1 dark
    "light_angle": (0.0, 180.0),  # degrees in the image plane: 0 from the face side, 90 from above, 180 from behind
    "x_offset": (-0.05, 0.05),    # ear shift, fraction of the crop width (towards the face)
    "y_offset": (-0.05, 0.05),    # ear shift, fraction of the crop height (up)
    "hair": (0.0, 1.0),           # how far the hair behind and above the ear reaches towards it
    "blur": (0.3, 1.0),           # Gaussian blur sigma in pixels of a 128 px image
    "noise": (0.0, 2.0),          # sensor noise std in 8-bit levels
}
FACTORS: tuple[str, ...] = tuple(FACTOR_RANGES)

# Identities (render_identities): what a person's ear is, fixed for the identity and drawn once over the factor's
# range: the shape of the ear, the skin tone and the ear's size.
ANATOMY: tuple[str, ...] = ("elongation", "lobe_size", "lobe_attached", "helix_width", "concha_depth", "skin_tone",
                            "scale")
# Anatomy that a view still shifts a little, uniformly by up to +- this, clipped to the factor's range: the skin tone
# with the white balance and exposure, the ear's size in the crop with the distance to the camera.
VIEW_JITTER: dict[str, float] = {"skin_tone": 0.05, "scale": 0.02}
# How a photograph sees the ear, drawn afresh over the whole range for every view: pose (rotation), light, framing
# (offsets), hair, optics (blur, noise).
NUISANCE: tuple[str, ...] = tuple(name for name in FACTORS if name not in ANATOMY)
IDENTITY_COLUMN = "identity"  # the factors CSV's column of identity ids (written by write_synthetic_identities only)

# Anatomical landmarks, exact from the renderer's geometry after pose, scale and offset, in this order in the
# landmarks CSV: the centres of four parts (ear units: x towards the face, y up, before pose), then the lobe's centre
# and three points where the ear's outline (the mask's edge) crosses a line through the ear.
_PARTS: dict[str, tuple[float, float]] = {
    "ear_canal": (0.2, -0.1),          # the canal, the darkest spot of the concha
    "tragus": (0.31, -0.12),           # the bump in front of the canal
    "antitragus": (-0.1, -0.32),       # the bump below the antihelix, behind and below the canal
    "triangular_fossa": (0.0, 0.47),   # the dip between the two crura of the antihelix
}
LANDMARKS: tuple[str, ...] = (*_PARTS,
                              "lobe_centre",   # the centre of the lobe's ellipse
                              "lobe_bottom",   # the outline straight below the lobe's centre (ear's down)
                              "helix_top",     # the outline straight above the upper ear's centre
                              "helix_back")    # the outline straight behind the upper ear's centre
_TOP_CENTRE, _TOP_B = (-0.05, 0.12), 0.74  # the upper ear's egg: centre and vertical semi-axis, ear units

_SKIN = np.array([[0.95, 0.78, 0.68], [0.80, 0.58, 0.45], [0.45, 0.30, 0.22]], np.float32)  # skin_tone 0, .5, 1
_HAIR = np.array([0.16, 0.11, 0.08], np.float32)
_EAR_TINT = np.array([1.0, 0.93, 0.9], np.float32)  # the ear is a little redder than the cheek
_RENDER_CHUNK = 32  # images rendered at once (keeps the float32 temporaries small)
N_TRAIN, N_VAL, VIEWS = 2000, 200, 10  # CLI defaults: images per split; views per identity (with --identities)


# ----------------------------------------------------------------------------------------------------------------
# synthetic ears

def render_ears(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Render n synthetic right ears (lateral view, face to the right) with random factors.

    Returns images uint8 (n, size, size, 3) and factors float32 (n, len(FACTORS)) in FACTORS order. Deterministic
    for (n, seed, size); image i does not depend on n (the first k of n images are the k images of render_ears(k)).
    """
    return _render(n, seed, size)


def render_identities(k: int, views: int, seed: int | list[int],
                      size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render `views` views of each of k synthetic identities: every view of an identity has its ANATOMY factors
    (skin_tone and scale shifted by up to VIEW_JITTER), and draws the NUISANCE factors over their whole range.

    Returns images uint8 (k*views, size, size, 3), factors float32 (k*views, len(FACTORS)) in FACTORS order and
    identities int64 (k*views,) in 0..k-1, identity-major: rows i*views .. (i+1)*views - 1 are identity i.
    Deterministic for (k, views, seed, size); for a given `views`, image j does not depend on k.
    """
    if k < 0 or views < 1:
        raise ValueError(f"k must be >= 0 and views >= 1, got {k} and {views}")
    anatomy_seq, view_seq, noise_seq = np.random.SeedSequence(seed).spawn(3)
    lo, hi = np.array(list(FACTOR_RANGES.values())).T  # (F,), (F,)
    factors = np.repeat(np.random.default_rng(anatomy_seq).uniform(lo, hi, (k, len(FACTORS))), views, 0)  # (kV, F)
    u = np.random.default_rng(view_seq).random((k * views, len(FACTORS)))  # (kV, F), one draw per view and factor
    nuisance = [FACTORS.index(name) for name in NUISANCE]
    factors[:, nuisance] = lo[nuisance] + u[:, nuisance] * (hi - lo)[nuisance]
    for name, jitter in VIEW_JITTER.items():
        c = FACTORS.index(name)
        factors[:, c] = np.clip(factors[:, c] + (2.0 * u[:, c] - 1.0) * jitter, lo[c], hi[c])
    factors = np.round(factors, 4).astype(np.float32)  # as in _render: the CSV holds exactly the values used
    images = _draw(factors, np.random.default_rng(noise_seq), size)
    return images, factors, np.repeat(np.arange(k), views)


def write_synthetic(out_dir: str | os.PathLike, n_train: int, n_val: int, seed: int) -> None:
    """Write out_dir/{train,val}_teacher.npy (uint8 (N, 128, 128, 3)), {train,val}_factors.csv (header FACTORS,
    one row per image), _landmarks.csv (LANDMARKS) and _masks.npy (uint8 (N, 128, 128)), all of them or none
    (data.write_dataset: another dataset's files in out_dir are removed). Train is render_ears(n_train, seed); val
    comes from a different random stream of the seed."""
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train} and {n_val}")
    out_dir = Path(out_dir)
    files = {}
    for split, n, entropy in (("train", n_train, seed), ("val", n_val, [seed, 1])):
        images, factors = _render(n, entropy, IMAGE_SIZE)
        files[out_dir / f"{split}_teacher.npy"] = save_npy(images)
        files[out_dir / f"{split}_factors.csv"] = _save_factors(factors)
        files.update(_annotations(out_dir, split, factors))
    write_dataset(out_dir, files)


def write_synthetic_identities(out_dir: str | os.PathLike, k: int, views: int, seed: int,
                               first_id: int = 0, val_k: int | None = None) -> None:
    """Write out_dir/{train,val}_teacher.npy (uint8 (k*views and val_k*views, 128, 128, 3)) and
    {train,val}_factors.csv (header FACTORS + `identity`), _landmarks.csv and _masks.npy, all or none
    (data.write_dataset). Train is
    render_identities(k, views, seed) with identities first_id..first_id+k-1; val holds val_k (default k) other
    identities, from a different random stream of the seed, numbered first_id+k..first_id+k+val_k-1 (no id in both
    splits). Sets rendered with other seeds are other identities: give them disjoint numbers (first_id) so that
    eval.py does not count them as seen in training. ValueError for k or val_k < 1 or first_id < 0."""
    val_k = k if val_k is None else val_k
    if k < 1 or val_k < 1 or first_id < 0:
        raise ValueError(f"k and val_k must be >= 1 and first_id >= 0, got {k}, {val_k}, {first_id}")
    out_dir = Path(out_dir)
    files = {}
    for split, n, entropy, first in (("train", k, seed, first_id), ("val", val_k, [seed, 1], first_id + k)):
        images, factors, identities = render_identities(n, views, entropy, IMAGE_SIZE)
        files[out_dir / f"{split}_teacher.npy"] = save_npy(images)
        files[out_dir / f"{split}_factors.csv"] = _save_factors(factors, identities + first)
        files.update(_annotations(out_dir, split, factors))
    write_dataset(out_dir, files)


def _annotations(out_dir: Path, split: str, factors: np.ndarray) -> dict[Path, Writer]:
    """The split's landmarks CSV and masks .npy (data.landmarks_file, data.masks_file) of the ears with `factors`."""
    npy = out_dir / f"{split}_teacher.npy"
    return {landmarks_file(npy): save_landmarks(LANDMARKS, landmarks(factors)),
            masks_file(npy): save_npy(masks(factors))}


def _save_factors(factors: np.ndarray, identities: np.ndarray | None = None) -> Writer:
    """The factors CSV: header FACTORS, one row per image, 4 decimals (the factors have 4 decimals); with identities
    (n,) a last column IDENTITY_COLUMN of integers."""
    if identities is None:
        return lambda f: np.savetxt(f, factors, fmt="%.4f", delimiter=",", header=",".join(FACTORS), comments="")
    table = np.column_stack([factors.astype(np.float64), identities])  # (n, F + 1); ids exact in float64
    return lambda f: np.savetxt(f, table, fmt=["%.4f"] * len(FACTORS) + ["%d"], delimiter=",",
                                header=",".join([*FACTORS, IDENTITY_COLUMN]), comments="")


def _render(n: int, entropy: int | list[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """render_ears for the random stream np.random.SeedSequence(entropy); the factors and the sensor noise come from
    two independent children of it (so image i does not depend on n)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    factor_seq, noise_seq = np.random.SeedSequence(entropy).spawn(2)
    lo, hi = np.array(list(FACTOR_RANGES.values())).T  # (F,), (F,)
    # rounded to 4 decimals so that the CSV holds exactly the values used
    factors = np.round(np.random.default_rng(factor_seq).uniform(lo, hi, (n, len(FACTORS))), 4).astype(np.float32)
    return _draw(factors, np.random.default_rng(noise_seq), size), factors


def _draw(factors: np.ndarray, noise_rng: np.random.Generator, size: int) -> np.ndarray:
    """Images uint8 (n, size, size, 3) of the ears with factors float32 (n, len(FACTORS)): shaded, blurred, and with
    sensor noise drawn from noise_rng in image order (so image i does not depend on n)."""
    n = len(factors)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(0, n, _RENDER_CHUNK):
        f = {name: factors[i:i + _RENDER_CHUNK, k] for k, name in enumerate(FACTORS)}
        img = _render_chunk(f, size)  # (m, S, S, 3) float32 in about [0, 1]
        for j, sigma in enumerate(f["blur"] * (size / IMAGE_SIZE)):
            ndimage.gaussian_filter(img[j], (sigma, sigma, 0.0), output=img[j], mode="nearest", truncate=3.0)
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * (f["noise"] / 255)[:, None, None, None]
        images[i:i + len(img)] = np.clip(np.rint(img * 255), 0, 255)
    return images


def _render_chunk(f: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Shade a batch of ears from a height field built from their parts (before blur and noise).

    f: factor name -> (n,) float32. Returns float32 (n, size, size, 3), RGB in about [0, 1].
    """
    col = lambda k: f[k][:, None, None]  # noqa: E731  (n,) -> (n, 1, 1), broadcasts against the (n, S, S) grids
    u, v = _grid(size)  # (1, 1, S), (1, S, 1)
    x, y = _to_ear(f, u, v)  # (n, S, S), (n, S, S)
    rot = np.deg2rad(col("rotation"))
    scale = col("scale")
    lobe, attached = col("lobe_size"), col("lobe_attached")
    hw, depth = col("helix_width"), col("concha_depth")

    # outline: an egg-shaped upper ear (wider at the top) smoothly joined to the lobe; an attached lobe sits further
    # forward and merges into the cheek
    top_a = _top_a(y)
    lobe_c, lobe_ab = _lobe(lobe, attached)
    lobe_d = _ellipse_dist(x, y, *lobe_c, *lobe_ab)
    d = _smin(_ellipse_dist(x, y, *_TOP_CENTRE, top_a, _TOP_B), lobe_d, 0.12)  # signed distance, negative inside
    t = -d  # depth inside the outline
    ear = _smoothstep(0.01, -0.01, d)

    # the front of the ear (and the lobe, when attached) joins the face without a visible edge
    front = _smoothstep(0.2, 0.4, x) * _smoothstep(0.45, 0.2, y)
    front = np.maximum(front, attached * _smoothstep(-0.05, 0.15, x) * _smoothstep(-0.35, -0.5, y))
    edge_w = 0.025 + 0.15 * front
    plate = 0.06 * _smoothstep(-0.5 * edge_w, edge_w, t)  # the ear stands off the head

    # helix: rounded rim along the outline from the front top, over the top and down the back into the lobe,
    # curling into the concha at the front (the crus of the helix)
    helix_on = (1.0 - _sector(x, y, -0.05, 0.05, -40.0, 55.0, 20.0)) * _smoothstep(-0.75, -0.4, y)
    helix = 0.06 * _ridge(t - 0.5 * hw, 0.5 * hw) * helix_on
    crus_d, along = _segment(x, y, (0.27, 0.22), (0.02, 0.04))
    crus = 0.05 * _ridge(crus_d, 0.045) * (1.0 - 0.7 * along) * _smoothstep(0.0, -0.06, d)

    # antihelix, the Y inside the rim: a ridge around the back and top of the concha (stem and inferior crus) with
    # the superior crus forking off towards the top; the groove between it and the helix is the scapha, the dip
    # between the crura the triangular fossa
    anti_d = _ellipse_dist(x, y, 0.02, -0.02, 0.32, 0.35)
    antihelix = 0.05 * _ridge(anti_d, 0.06) * _sector(x, y, 0.02, -0.02, 150.0, 90.0, 25.0)
    sup_d, along = _segment(x, y, (-0.2, 0.23), (-0.05, 0.68))
    superior = 0.045 * _ridge(sup_d, 0.055) * (1.0 - 0.5 * along)
    fossa = _blob(x, y, *_PARTS["triangular_fossa"], 0.17, 0.08)

    # concha: the bowl inside the antihelix with the ear canal at its front, guarded by the tragus (in front) and the
    # antitragus (below the antihelix); the lobe is a soft dome
    bowl = _smoothstep(0.04, -0.12, _ellipse_dist(x, y, 0.07, -0.06, 0.22, 0.27))
    canal = _ridge(np.hypot(x - _PARTS["ear_canal"][0], y - _PARTS["ear_canal"][1]), 0.07)
    tragus = 0.05 * _blob(x, y, *_PARTS["tragus"], 0.09, 0.15)
    antitragus = 0.045 * _blob(x, y, *_PARTS["antitragus"], 0.14, 0.09)
    lobe_dome = 0.04 * _smoothstep(0.0, -0.15, lobe_d)

    height = (plate + helix + np.maximum(np.maximum(antihelix, superior), crus) + tragus + antitragus + lobe_dome
              - 0.12 * depth * bowl - 0.08 * canal - 0.012 * fossa)  # (n, S, S), ear units
    height = (height - 0.05 * (u * u + v * v) / scale) * scale  # on a gently curved head; -> image units

    # Lambertian shading of the height field, light from light_angle in the image plane, 45 degrees up
    gy, gx = np.gradient(height, axis=(1, 2))
    gx *= size / 2.0  # d height / d u
    gy *= -size / 2.0  # d height / d v (rows go down)
    light = np.deg2rad(col("light_angle"))
    lambert = (0.71 - 0.7 * (gx * np.cos(light) + gy * np.sin(light))) / np.sqrt(gx * gx + gy * gy + 1.0)
    shade = 0.35 + 0.75 * np.maximum(lambert, 0.0)

    # cast shadow of the ear on the head (the outline seen from the light), occlusion in the folds and around the ear
    sx, sy = 0.06 * np.cos(light - rot), 0.06 * np.sin(light - rot)
    shadow_d = _smin(_ellipse_dist(x + sx, y + sy, *_TOP_CENTRE, top_a, _TOP_B),  # the ear seen from (x, y) towards
                     _ellipse_dist(x + sx, y + sy, *lobe_c, *lobe_ab), 0.12)  # the light
    behind = (1.0 - ear) * (1.0 - front)
    shade *= (1.0 - 0.4 * _smoothstep(0.04, -0.04, shadow_d) * behind) * (1.0 - 0.45 * depth * bowl)
    shade *= (1.0 - 0.85 * canal) * (1.0 - 0.25 * _ridge(np.maximum(d, 0.0), 0.06) * behind)

    # albedo: skin (a little redder on the ear), hair behind and above the ear
    skin = np.stack([np.interp(f["skin_tone"], [0.0, 0.5, 1.0], _SKIN[:, k]) for k in range(3)], -1)  # (n, 3)
    hair = _smoothstep(-0.1, 0.1, 0.8 * y - 0.6 * x - 1.4 + 0.7 * col("hair")) * (1.0 - ear)  # (n, S, S)
    albedo = skin[:, None, None, :].astype(np.float32) * (1.0 + (_EAR_TINT - 1.0) * ear[..., None])  # (n, S, S, 3)
    albedo += (_HAIR - albedo) * hair[..., None]
    return albedo * shade[..., None]


def landmarks(factors: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The LANDMARKS of the ears with factors float32 (n, len(FACTORS)) -> float32 (n, len(LANDMARKS), 2): (x, y) in
    pixels of the size x size image, pixel (i, j) covering [j, j + 1) x [i, i + 1). Parts are exact; outline points
    are bisected on the renderer's signed distance to 1e-9 ear units."""
    f = {name: factors[:, k].astype(np.float64) for k, name in enumerate(FACTORS)}  # (n,) each
    n, lobe, attached = len(factors), f["lobe_size"], f["lobe_attached"]
    (lobe_x, lobe_y), _ = _lobe(lobe, attached)
    top = (np.full(n, _TOP_CENTRE[0]), np.full(n, _TOP_CENTRE[1]))
    points = [*((np.full(n, px), np.full(n, py)) for px, py in _PARTS.values()), (lobe_x, lobe_y),
              _crossing(lobe_x, lobe_y, (0.0, -1.0), lobe, attached), _crossing(*top, (0.0, 1.0), lobe, attached),
              _crossing(*top, (-1.0, 0.0), lobe, attached)]
    x, y = np.stack([p[0] for p in points], 1), np.stack([p[1] for p in points], 1)  # (n, K) ear units
    col = lambda k: f[k][:, None]  # noqa: E731  (n,) -> (n, 1)
    scale, el, rot = col("scale"), np.sqrt(col("elongation")), np.deg2rad(col("rotation"))
    px, py = x * scale / el, y * el * scale  # the inverse of _to_ear: unstretch, unrotate, shift
    u = np.cos(rot) * px - np.sin(rot) * py + 2.0 * col("x_offset")
    v = np.sin(rot) * px + np.cos(rot) * py + 2.0 * col("y_offset")
    return np.stack([(u + 1.0) * (size / 2), (1.0 - v) * (size / 2)], -1).astype(np.float32)


def masks(factors: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The ear's mask of each image: uint8 (n, size, size), 1 where the pixel's centre lies inside the ear's outline
    (the renderer's signed distance < 0, where its ear weight passes 0.5), 0 elsewhere."""
    out = np.empty((len(factors), size, size), np.uint8)
    u, v = _grid(size)
    for i in range(0, len(factors), _RENDER_CHUNK):
        f = {name: factors[i:i + _RENDER_CHUNK, k] for k, name in enumerate(FACTORS)}
        x, y = _to_ear(f, u, v)  # (m, S, S)
        out[i:i + len(x)] = _outline(x, y, f["lobe_size"][:, None, None], f["lobe_attached"][:, None, None]) < 0
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in image coordinates, x right and y up in [-1, 1]: float32 (1, 1, S), (1, S, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    return c[None, None, :], -c[None, :, None]


def _to_ear(f: dict[str, np.ndarray], u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates (_grid) -> ear coordinates of each ear of f (factor -> (n,)): x towards the face, y up,
    shifted, rotated and unstretched -> (n, S, S), (n, S, S)."""
    col = lambda k: f[k][:, None, None]  # noqa: E731
    scale, el = col("scale"), np.sqrt(col("elongation"))
    rot = np.deg2rad(col("rotation"))
    cr, sr = np.cos(rot), np.sin(rot)
    pu, pv = u - 2.0 * col("x_offset"), v - 2.0 * col("y_offset")
    return (cr * pu + sr * pv) * (el / scale), (-sr * pu + cr * pv) / (el * scale)


def _top_a(y: np.ndarray) -> np.ndarray:
    """Horizontal semi-axis of the upper ear at height y: an egg, wider at the top."""
    return 0.5 + 0.06 * np.clip(y - 0.12, -0.7, 0.7)


def _lobe(lobe: np.ndarray, attached: np.ndarray) -> tuple[tuple, tuple]:
    """The lobe's ellipse, centre (x, y) and semi-axes (a, b): an attached lobe sits further forward and up."""
    return (-0.02 + 0.1 * attached, -0.46 - 0.16 * lobe + 0.06 * attached), (0.17 + 0.1 * lobe, 0.15 + 0.13 * lobe)


def _outline(x: np.ndarray, y: np.ndarray, lobe: np.ndarray, attached: np.ndarray) -> np.ndarray:
    """Signed distance to the ear's outline, negative inside: the upper ear's egg smoothly joined to the lobe."""
    lobe_c, lobe_ab = _lobe(lobe, attached)
    return _smin(_ellipse_dist(x, y, *_TOP_CENTRE, _top_a(y), _TOP_B), _ellipse_dist(x, y, *lobe_c, *lobe_ab), 0.12)


def _crossing(x: np.ndarray, y: np.ndarray, direction: tuple[float, float], lobe: np.ndarray,
              attached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the outline crosses the ray from (x, y) (n,), inside the ear, along `direction`: bisection over 2 ear
    units (the ear spans less than 2), 41 halvings -> (n,), (n,)."""
    lo, hi = np.zeros_like(x), np.full_like(x, 2.0)
    for _ in range(41):
        mid = 0.5 * (lo + hi)
        inside = _outline(x + mid * direction[0], y + mid * direction[1], lobe, attached) < 0
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    t = 0.5 * (lo + hi)
    return x + t * direction[0], y + t * direction[1]


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """0 at e0, 1 at e1, cubic in between (e0 > e1 gives the falling step)."""
    t = np.clip((x - e0) * (1.0 / (e1 - e0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ridge(d: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Gaussian ridge profile: 1 on the centre line (d = 0), falling off with the distance d."""
    return np.exp(-(d * d) / (width * width))


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum of two signed distances (a smooth union of the shapes) with blend radius k."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Smooth bump, 1 at (cx, cy), 0 outside the ellipse with semi-axes a, b."""
    return _smoothstep(1.0, 0.0, ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)


def _ellipse_dist(x: np.ndarray, y: np.ndarray, cx, cy, a, b) -> np.ndarray:
    """Approximate signed distance to the ellipse ((x-cx)/a)^2 + ((y-cy)/b)^2 = 1, negative inside. Exact on the axes
    and to first order at the boundary. The parameters may be arrays that broadcast against x."""
    dx, dy = (x - cx) / a, (y - cy) / b
    q = np.sqrt(dx * dx + dy * dy)
    grad = np.sqrt((dx / a) ** 2 + (dy / b) ** 2) / np.maximum(q, 1e-6)  # |grad q|, in [1/max(a,b), 1/min(a,b)]
    return (q - 1.0) / np.clip(grad, 1.0 / np.maximum(a, b), 1.0 / np.minimum(a, b))


def _segment(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]):
    """-> (distance to the segment p0-p1, position of the nearest point along it: 0 at p0 .. 1 at p1)."""
    bx, by = p1[0] - p0[0], p1[1] - p0[1]
    px, py = x - p0[0], y - p0[1]
    along = np.clip((px * bx + py * by) * (1.0 / (bx * bx + by * by)), 0.0, 1.0)
    return np.hypot(px - along * bx, py - along * by), along


def _sector(x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float, half: float, soft: float):
    """1 where the direction from (cx, cy) is within `half` degrees of `angle`, fading to 0 over +-`soft` degrees."""
    dx, dy = x - cx, y - cy
    a = math.radians(angle)
    cos = (dx * math.cos(a) + dy * math.sin(a)) / (np.sqrt(dx * dx + dy * dy) + 1e-6)
    return _smoothstep(math.cos(math.radians(half + soft)), math.cos(math.radians(half - soft)), cos)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Render synthetic ears with known factors, landmarks and masks: "
                                "OUT/{train,val}_teacher.npy, _factors.csv, _landmarks.csv and _masks.npy.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="data", help="output directory")
    # SUPPRESS: absent from args unless given, so that giving them with --identities is an error
    p.add_argument("--n-train", type=positive_int, default=argparse.SUPPRESS,
                   help=f"number of training images (default: {N_TRAIN}; not with --identities)")
    p.add_argument("--n-val", type=positive_int, default=argparse.SUPPRESS,
                   help=f"number of validation images (default: {N_VAL}; not with --identities)")
    p.add_argument("--identities", type=positive_int, metavar="K",
                   help="instead of independent ears, K identities per split (train ids 0..K-1, val K..2K-1), each "
                   "seen --views times: the anatomy factors fixed per identity, the nuisance factors drawn per view")
    p.add_argument("--views", type=positive_int, default=argparse.SUPPRESS, metavar="V",
                   help=f"images per identity (default: {VIEWS}; only with --identities)")
    p.add_argument("--val-identities", type=positive_int, default=argparse.SUPPRESS, metavar="KV",
                   help="identities of the val split (default: K; only with --identities): a smaller val split "
                   "makes every epoch's validation cheaper")
    p.add_argument("--first-identity", type=non_negative_int, default=argparse.SUPPRESS, metavar="N",
                   help="number of the first identity (train N..N+K-1, val N+K..N+2K-1; default 0; only with "
                   "--identities): sets rendered with another seed are other identities, give them other numbers")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (train and val use separate streams)")
    p.add_argument("--force", action="store_true", help="replace the dataset already in --out (all its files: .npy, "
                   "factors, landmarks, index and skipped CSVs, masks)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    given = vars(args)
    if args.identities is not None and ("n_train" in given or "n_val" in given):
        p.error("--n-train/--n-val: not with --identities (it renders K x --views images per split)")
    if args.identities is None and ("views" in given or "first_identity" in given or "val_identities" in given):
        p.error("--views, --val-identities, --first-identity: only with --identities")
    out = Path(args.out)
    try:
        check_output_dir(out)
    except ValueError as e:
        p.error(f"--out {e}")
    try:
        refuse_dataset(out, args.force)
        t0 = time.perf_counter()
        if args.identities is None:
            n_train, n_val = given.get("n_train", N_TRAIN), given.get("n_val", N_VAL)
            write_synthetic(out, n_train, n_val, args.seed)
            what = f"{n_train:,} train + {n_val:,} val synthetic ears"
        else:
            views = given.get("views", VIEWS)
            val_k = given.get("val_identities", args.identities)
            write_synthetic_identities(out, args.identities, views, args.seed, given.get("first_identity", 0), val_k)
            n_train, n_val = args.identities * views, val_k * views
            what = (f"{n_train:,} train + {n_val:,} val synthetic ears ({args.identities:,} + {val_k:,} identities "
                    f"x {views:,} views)")
    except (DataError, FileNotFoundError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    print(f"wrote {what} to {out}/ ({(n_train + n_val) / dt:,.0f} images/s): {{train,val}}_teacher.npy, "
          f"_factors.csv, _landmarks.csv, _masks.npy")
    return 0


if __name__ == "__main__":
    safe_console()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: nothing was written (the files are written together at the end)", file=sys.stderr)
        sys.exit(130)
