"""Data for the ear teacher: .npy image files, augmentation on the device and resumable loading (synthetic ears:
synth.py).

    open_npy / validate / EarDataset  memory-mapped (N, H, W, 3) | (N, 3, H, W) | (N, H, W) uint8 or float 0-1 files
                                    -> uint8 (3, 128, 128) samples; bad samples (NaN, inf, out of range, blank) dropped
    read_identities                 identity labels of the kept samples from the CSV beside the file (X_index.csv
                                    column subject, or X_factors.csv column identity)
    AugConfig / augment             batched geometric + colour jitter on the batch's device; sample i's parameters
                                    depend only on (seed, epoch, key_i, view), so a resumed run repeats them exactly
    ResumableSampler / make_loader  epoch order from (seed, epoch), resumable mid-epoch, split across DDP ranks

CLI:
    python data.py check data/train_teacher.npy
    python data.py convert ~/ear_photos --out data
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from cli import float_range, fraction, int_range, progress, safe_console, seed_int
from files import Writer, save_npy, write_outputs

IMAGE_SIZE = 128

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INVALID_REASONS = ("non-finite", "out of range", "blank")
BLANK_STD = 2.0 / 255  # a sample whose pixel std (all channels, [0, 1] scale) is below this is blank
RANGE_TOLERANCE = 0.5 / 255  # float samples may exceed [0, 1] by this much (they still round into 0..255)


class DataError(ValueError):
    """Bad data file or sample; str(e) is one line that starts with the file path and says the reason."""


# ----------------------------------------------------------------------------------------------------------------
# NPY files

def open_npy(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an image .npy file (read-only, never unpickling anything) and check its dtype and shape.

    Accepts (N, H, W, 3), (N, 3, H, W) and grayscale (N, H, W) with H == W, as uint8 0-255 or float16/32/64 0-1.
    A missing file, a non-.npy file, an object (pickled) array or a bad dtype or shape raises DataError naming the
    file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'not a file' if path.exists() else 'file not found'}")
    with open(path, "rb") as fh:
        if fh.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            raise DataError(f"{path}: not a .npy file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:  # object dtype (pickled data), corrupt header, truncated data
        if "object" in str(e).lower():
            raise DataError(f"{path}: refused: it holds Python objects (a pickle, which could run code when "
                            f"loaded); save plain uint8 or float arrays") from e
        raise DataError(f"{path}: cannot memory-map it as a plain numeric array ({e})") from e
    if arr.dtype != np.uint8 and arr.dtype not in (np.float16, np.float32, np.float64):
        raise DataError(f"{path}: dtype {arr.dtype} not supported; expected uint8 (0-255) or float16/32/64 (0-1)")
    _layout(arr, path)
    return arr


def _layout(arr: np.ndarray, path: Path) -> str:
    """'NHWC', 'NCHW' or 'NHW' for a valid image array; DataError otherwise."""
    if arr.ndim == 4 and arr.shape[3] == 3:
        layout, h, w = "NHWC", arr.shape[1], arr.shape[2]
    elif arr.ndim == 4 and arr.shape[1] == 3:
        layout, h, w = "NCHW", arr.shape[2], arr.shape[3]
    elif arr.ndim == 3:
        layout, h, w = "NHW", arr.shape[1], arr.shape[2]
    else:
        raise DataError(f"{path}: shape {arr.shape} is not (N, H, W, 3), (N, 3, H, W) or grayscale (N, H, W)")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: no samples (shape {arr.shape})")
    if h != w:
        raise DataError(f"{path}: images are {h}x{w}, expected square crops (`data.py convert` pads photos to square)")
    return layout


def validate(arr: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, dict[str, int]]:
    """Find the usable samples of an image array (any layout open_npy accepts), reading `chunk` samples at a time.

    Returns (keep, invalid): keep int64 (K,) the indices of the valid samples; invalid {reason: count} for every
    reason of INVALID_REASONS: 'non-finite' (NaN or inf), 'out of range' (outside [0, 1], float data only) and
    'blank' (pixel std below BLANK_STD: a constant or near-constant image). An invalid sample counts once, under
    the first reason that applies.
    """
    is_float = arr.dtype != np.uint8
    unit = 1.0 if is_float else 255.0
    reason = np.zeros(len(arr), np.int8)  # index into ("valid",) + INVALID_REASONS
    for i in range(0, len(arr), chunk):
        x = np.asarray(arr[i:i + chunk]).reshape(min(chunk, len(arr) - i), -1)  # (m, P)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf statistics of non-finite samples are not used
            mean = x.sum(axis=1, dtype=np.float64) / x.shape[1]  # float64 accumulation, no full-size temporary
            var = np.einsum("ij,ij->i", x, x, dtype=np.float64) / x.shape[1] - mean * mean
            r = np.where(var < (BLANK_STD * unit) ** 2, 3, 0)
            if is_float:
                outside = (x.min(axis=1) < -RANGE_TOLERANCE) | (x.max(axis=1) > 1.0 + RANGE_TOLERANCE)
                r = np.where(~np.isfinite(x).all(axis=1), 1, np.where(outside, 2, r))
        reason[i:i + len(x)] = r
    counts = np.bincount(reason, minlength=len(INVALID_REASONS) + 1)
    return np.flatnonzero(reason == 0), {name: int(counts[k + 1]) for k, name in enumerate(INVALID_REASONS)}


def _check_invalid(path: Path, n_total: int, invalid: dict[str, int], max_invalid: float) -> None:
    """DataError if more than max_invalid of the samples (or all of them) are invalid."""
    n_bad = sum(invalid.values())
    if n_bad > max_invalid * n_total:
        raise DataError(f"{path}: {n_bad:,} of {n_total:,} samples invalid ({_reasons(invalid)}); more than the "
                        f"{max_invalid * 100:g}% allowed (--max-invalid)")
    if n_bad == n_total:
        raise DataError(f"{path}: all {n_total:,} samples invalid ({_reasons(invalid)})")


def _reasons(invalid: dict[str, int]) -> str:
    """'non-finite 12, blank 300': the reasons with a non-zero count."""
    return ", ".join(f"{name} {count:,}" for name, count in invalid.items() if count)


class EarDataset(Dataset):
    """The valid samples of an image .npy file as (uint8 (3, size, size) tensor, original index in the file).

    The file is memory-mapped and validated once; __getitem__ reads only its sample. Float samples are converted to
    uint8 (rounded), grayscale is repeated to 3 channels, other sizes are resized (bicubic, antialiased).
    """

    def __init__(self, path: str | os.PathLike, size: int = IMAGE_SIZE, max_invalid: float = 0.05):
        self.path = Path(path)
        self.size = size
        self._arr = open_npy(self.path)
        self.layout = _layout(self._arr, self.path)
        self.n_total = len(self._arr)
        self.keep, self.invalid = validate(self._arr)  # int64 (K,), {reason: count}
        _check_invalid(self.path, self.n_total, self.invalid, max_invalid)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        k = int(self.keep[i])
        is_float = self._arr.dtype != np.uint8
        x = torch.from_numpy(np.array(self._arr[k], dtype=np.float32 if is_float else np.uint8))  # copy of one sample
        if self.layout == "NHWC":
            x = x.permute(2, 0, 1)  # (3, H, W)
        elif self.layout == "NHW":
            x = x.expand(3, -1, -1)  # (3, H, W)
        if is_float or x.shape[-1] != self.size:
            x = x.float() * (255.0 if is_float else 1.0)
            if x.shape[-1] != self.size:
                x = F.interpolate(x[None], size=(self.size, self.size), mode="bicubic", antialias=True,
                                  align_corners=False)[0]
            x = x.round().clamp(0, 255).to(torch.uint8)
        return x.contiguous(), k

    def summary(self) -> str:
        """e.g. '12,023 (filtered 0 invalid)' or '9,990 (filtered 10 invalid: blank 10)'."""
        n_bad = sum(self.invalid.values())
        return f"{len(self):,} (filtered {n_bad:,} invalid{': ' + _reasons(self.invalid) if n_bad else ''})"

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver get the path, not a pickled copy of the whole memmap
        return {**self.__dict__, "_arr": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arr = open_npy(self.path)


# ----------------------------------------------------------------------------------------------------------------
# identity labels

UNLABELLED = -1  # label of a sample whose identity is unknown (recognition.py drops it)
IDENTITY_SIDECARS = (("index", "subject"), ("factors", "identity"))  # (CSV kind, column), in the order they are read


def sidecar(npy: Path, kind: str) -> Path:
    """The CSV of `kind` beside an image file: X_teacher.npy -> X_{kind}.csv (a name without _teacher: X.npy ->
    X_{kind}.csv)."""
    return npy.with_name(f"{npy.stem.removesuffix('_teacher')}_{kind}.csv")


def identity_files(npy: Path) -> list[tuple[Path, str]]:
    """(CSV path, column) that read_identities looks for, in order: X_index.csv's `subject` (written by
    `data.py convert`: the photo's folder name, empty = unknown), then X_factors.csv's `identity` (synth.py)."""
    return [(sidecar(npy, kind), column) for kind, column in IDENTITY_SIDECARS]


def read_identities(npy: Path, ds: EarDataset) -> np.ndarray | None:
    """The identity label of each kept sample of `ds` (read from `npy`) -> int64 (len(ds),), UNLABELLED (-1) where
    unknown; None when no CSV of identity_files(npy) exists with its column (the first one that does is used).

    X_index.csv: subjects (strings) become integer codes in sorted order, an empty subject is UNLABELLED.
    X_factors.csv: the identity column holds integers (-1 = unknown). Either CSV has one row per sample of the file
    (ds.n_total, invalid ones included); a wrong row count or a bad value -> DataError naming the file."""
    for path, column in identity_files(npy):
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows or column not in rows[0]:
            continue
        header, rows = rows[0], rows[1:]
        for line, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise DataError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
        if len(rows) != ds.n_total:
            raise DataError(f"{path}: {len(rows):,} rows, expected one per sample of {npy} ({ds.n_total:,})")
        values = [row[header.index(column)] for row in rows]
        labels = _subject_codes(values) if column == "subject" else _integer_labels(values, path, column)
        return labels[ds.keep]
    return None


def _subject_codes(subjects: list[str]) -> np.ndarray:
    """Subject names -> int64 codes in sorted order of the names; "" -> UNLABELLED."""
    names = np.array(sorted({s for s in subjects if s}))
    codes = np.full(len(subjects), UNLABELLED, dtype=np.int64)
    known = np.array([s != "" for s in subjects], dtype=bool)
    if known.any():
        codes[known] = np.searchsorted(names, np.array([s for s in subjects if s]))
    return codes


def _integer_labels(values: list[str], path: Path, column: str) -> np.ndarray:
    """Integer strings ("3", or "3.0000" as np.savetxt writes them) -> int64; anything else or below UNLABELLED ->
    DataError naming the file, line and column."""
    labels = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if not (x.is_integer() and x >= UNLABELLED):
            raise DataError(f"{path}: line {i + 2}, column {column}: {v!r} is not an integer identity >= "
                            f"{UNLABELLED} ({UNLABELLED} = unknown)")
        labels[i] = int(x)
    return labels


# ----------------------------------------------------------------------------------------------------------------
# augmentation

@dataclass
class AugConfig:
    scale: float = 0.1  # random zoom in [1 - scale, 1 + scale]
    translate: float = 0.05  # random shift up to this fraction of the image size, per axis
    rotate: float = 10.0  # random rotation in [-rotate, rotate] degrees
    brightness: float = 0.2  # multiply by a factor in [1 - brightness, 1 + brightness]
    contrast: float = 0.2  # blend with the mean grey, factor in [1 - contrast, 1 + contrast]
    saturation: float = 0.2  # blend with the greyscale image, factor in [1 - saturation, 1 + saturation]
    hue: float = 0.02  # rotate the hue by up to this fraction of a full turn
    hflip: bool = False  # off by default: a flip turns a left ear into a right one

    def __post_init__(self):
        if not 0 <= self.scale < 1 or min(self.translate, self.rotate, self.brightness, self.contrast,
                                           self.saturation, self.hue) < 0:
            raise ValueError(f"AugConfig needs 0 <= scale < 1 and the other ranges >= 0, got {self}")


_N_AUG_PARAMS = 9  # uniform draws per sample, the same number whatever the config, so each keeps its meaning


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) 0-255 -> float32 [0, 1]; a float tensor (already [0, 1]) is only cast to float32."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"expected a uint8 or float image tensor, got {x.dtype}")
    return x.float()


def augment(x: torch.Tensor, keys: torch.Tensor, seed: int, epoch: int, cfg: AugConfig, view: int = 0) -> torch.Tensor:
    """Random zoom / shift / rotation (/ flip) and colour jitter, batched on x.device.

    x: uint8 or float (B, 3, H, W), square, on any device. keys: int64 (B,), the samples' original indices.
    Returns float32 (B, 3, H, W) in [0, 1]. Sample i's parameters come only from (seed, epoch, keys[i], view): the
    result does not depend on the batch it is in, a resumed run draws the same augmentations, and the global RNG is
    never touched. view=0 and view=1 give two different views of each sample (for the contrastive loss).
    """
    if x.ndim != 4 or x.shape[1] != 3 or keys.shape != (x.shape[0],):
        raise ValueError(f"expected x (B, 3, H, W) and keys (B,), got {tuple(x.shape)} and {tuple(keys.shape)}")
    gens = [torch.Generator().manual_seed(sample_seed(seed, epoch, k, view)) for k in keys.tolist()]
    p = torch.stack([torch.rand(_N_AUG_PARAMS, generator=g) for g in gens]).to(x.device)  # (B, 9) uniform [0, 1)
    sym = 2.0 * p - 1.0  # (B, 9) uniform [-1, 1)
    x = to_float(x)

    zoom = 1.0 + cfg.scale * sym[:, 0]  # (B,)
    angle = torch.deg2rad(cfg.rotate * sym[:, 1])
    shift = 2.0 * cfg.translate * sym[:, 2:4]  # (B, 2), in normalised [-1, 1] coordinates
    flip = torch.where(p[:, 4] < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones_like(zoom)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3): output -> input coords
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return _colour(x, 1.0 + cfg.brightness * sym[:, 5], 1.0 + cfg.contrast * sym[:, 6],
                   1.0 + cfg.saturation * sym[:, 7], cfg.hue * sym[:, 8])


def _colour(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
            hue: torch.Tensor) -> torch.Tensor:
    """Per-sample colour jitter of float (B, 3, H, W) in [0, 1]; factors (B,). Brightness, contrast and saturation
    follow torchvision's adjust_* (blend and clamp); hue rotates the chroma plane of YIQ by hue turns (keeps luma)."""
    f = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731  (B,) -> (B, 1, 1, 1)
    gray = lambda t: torch.einsum("c,bchw->bhw", torch.tensor(_GRAY, device=t.device), t)[:, None]  # noqa: E731
    x = (f(brightness) * x).clamp(0, 1)
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (f(contrast) * x + (1 - f(contrast)) * mean).clamp(0, 1)
    x = (f(saturation) * x + (1 - f(saturation)) * gray(x)).clamp(0, 1)  # gray(x): (B, 1, H, W)
    a = 2 * math.pi * hue  # (B,)
    rot = torch.zeros(len(a), 3, 3, device=x.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    yiq = torch.tensor(_RGB_TO_YIQ, device=x.device)
    m = torch.linalg.inv(yiq) @ rot @ yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (not imported: it costs 1 s at startup)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def sample_seed(*values: int) -> int:
    """A 64-bit seed hashed from non-negative integers (numpy's SeedSequence), for a private torch.Generator."""
    return int(np.random.SeedSequence(values).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------------------------------------------
# loading

class ResumableSampler(Sampler[int]):
    """Epoch order torch.randperm(n) from a generator seeded by (seed, epoch) (identity when shuffle=False).

    The first n // (batch_size * world_size) * (batch_size * world_size) positions are used (the incomplete last
    global batch is dropped). After set_epoch(epoch, start) iteration begins at global position `start` (samples of
    this epoch already consumed, counted over all ranks) and rank r yields positions start + r,
    start + r + world_size, ...: each global batch of batch_size * world_size consecutive positions is split across
    the ranks. len() is what this rank yields.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if n < batch_size * world_size:
            raise ValueError(f"{n} samples is less than one global batch ({batch_size} x {world_size} ranks)")
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.n_used = n // (batch_size * world_size) * (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.n_used or start % self.world_size:
            raise ValueError(f"start must be a multiple of world_size={self.world_size} in [0, {self.n_used}], "
                             f"got {start}")
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return iter(order[self.start + self.rank:self.n_used:self.world_size].tolist())

    def __len__(self) -> int:
        return (self.n_used - self.start) // self.world_size


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int, pin_memory: bool) -> DataLoader:
    """Batches of (uint8 images (B, 3, H, W), original indices int64 (B,)) in the sampler's order.

    Workers make no random draws (augmentation happens on the device), so what they return is deterministic; their
    seeds come from a private generator, so iterating never consumes the global RNG.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, generator=torch.Generator(), worker_init_fn=_own_session)


def _own_session(worker_id: int) -> None:
    """Workers leave the trainer's process group: Ctrl-C or `kill -- -PGID` then reach the trainer alone, which
    finishes its step (fetching what it still needs from the workers), saves and stops them. (Ignoring the signals
    instead would block the SIGTERM with which Python ends daemon processes at exit.)"""
    os.setsid()


# ----------------------------------------------------------------------------------------------------------------
# files and CLI

def refuse_overwrite(paths: list[Path], force: bool) -> None:
    for path in paths:
        if path.exists() and not force:
            raise DataError(f"{path}: already exists; pass --force to overwrite")


def _load_image(path: Path, size: int) -> np.ndarray:
    """Read an image file (PIL) -> uint8 (size, size, 3) RGB: EXIF-rotated, padded to square by repeating the edge
    pixels (the aspect ratio is kept and nothing is cropped), resized (bicubic, antialiased)."""
    with Image.open(path) as im:
        a = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # (h, w, 3)
    h, w = a.shape[:2]
    top, left = (max(h, w) - h) // 2, (max(h, w) - w) // 2
    a = np.pad(a, ((top, max(h, w) - h - top), (left, max(h, w) - w - left), (0, 0)), mode="edge")
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))


def _cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    arr = open_npy(path)
    keep, invalid = validate(arr)
    lo, hi = _value_range(arr)
    n_bad = sum(invalid.values())
    print(f"file:     {path}")
    print(f"samples:  {len(arr):,}")
    print(f"shape:    {arr.shape} {arr.dtype} ({_layout(arr, path)})")
    print(f"values:   {lo:g} .. {hi:g} (finite values)")
    print(f"invalid:  {n_bad:,} ({', '.join(f'{k} {v:,}' for k, v in invalid.items())})")
    _check_invalid(path, len(arr), invalid, args.max_invalid)
    print(f"verdict:  usable, {len(keep):,} valid samples")
    return 0


def _value_range(arr: np.ndarray, chunk: int = 1024) -> tuple[float, float]:
    """(min, max) over the finite values of an array, read `chunk` samples at a time ((nan, nan) if none)."""
    lo, hi = math.inf, -math.inf
    for i in range(0, len(arr), chunk):
        x = np.asarray(arr[i:i + chunk])
        if arr.dtype != np.uint8:
            x = x[np.isfinite(x)]
        if x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return (lo, hi) if lo <= hi else (math.nan, math.nan)


def _cmd_convert(args: argparse.Namespace) -> int:
    src, out = Path(args.image_dir), Path(args.out)
    if not src.is_dir():
        raise DataError(f"{src}: not a directory")
    targets = {split: (out / f"{split}_teacher.npy", out / f"{split}_index.csv") for split in ("train", "val")}
    refuse_overwrite([path for pair in targets.values() for path in pair], args.force)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    images = np.empty((len(files), args.size, args.size, 3), np.uint8)  # filled front to back, only valid images
    loaded, skipped = [], []  # loaded: the source of each filled row of images, relative to src
    for path in progress(files, desc="convert", unit="img"):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((path, f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"))
            continue
        try:
            images[len(loaded)] = _load_image(path, args.size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # reported below and counted, not hidden
            skipped.append((path, f"unreadable: {e}"))
            continue
        loaded.append(path.relative_to(src))
    n_ok = len(loaded)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if n_ok < 2:
        raise DataError(f"{src}: {n_ok} usable images ({len(skipped)} of {len(files)} files skipped); need at least 2")
    order = np.random.default_rng(args.seed).permutation(n_ok)
    n_val = min(max(1, round(n_ok * args.val_fraction)), n_ok - 1)
    outputs = {}
    for (npy, index), rows in zip(targets.values(), (order[n_val:], order[:n_val])):  # train, val
        outputs[npy] = save_npy(images[rows])
        outputs[index] = _save_index([loaded[i] for i in rows])
    write_outputs(outputs)
    subjects = {_subject(path) for path in loaded} - {""}
    n_unlabelled = sum(_subject(path) == "" for path in loaded)
    (train, train_index), (val, val_index) = targets["train"], targets["val"]
    print(f"converted {n_ok:,} images ({len(skipped):,} skipped) of {len(subjects):,} subjects ({n_unlabelled:,} "
          f"unlabelled): {train} {n_ok - n_val:,}, {val} {n_val:,}; their sources in {train_index}, {val_index}")
    return 0


def _subject(path: Path) -> str:
    """The subject of an image at `path` (relative to the converted folder): its parent folder, AWE-style
    DIR/<subject>/<image>; '' (unlabelled) for an image directly in the folder."""
    return "" if path.parent == Path(".") else path.parent.as_posix()


def _save_index(paths: list[Path]) -> Writer:
    """The index CSV of a converted split (csv module quoting: paths may hold commas): header `index,path,subject`,
    one row per row of the split's .npy: the row, the source image relative to the converted folder, its subject."""
    def write(f: io.BufferedWriter) -> None:
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(("index", "path", "subject"))
        w.writerows((i, path.as_posix(), _subject(path)) for i, path in enumerate(paths))
        f.write(text.getvalue().encode())
    return write


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ear-teacher data: checks and conversion.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("check", help="report on an image .npy file; exit 0 if usable for training, else 1",
                       formatter_class=fmt)
    p.add_argument("file", help="the .npy file")
    p.add_argument("--max-invalid", type=fraction, default=0.05,
                   help="largest fraction of invalid samples that still counts as usable")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("convert", help="convert a folder of ear crops (JPEG/PNG/BMP/TIFF/WebP) to train/val .npy",
                       formatter_class=fmt)
    p.add_argument("image_dir", help="folder searched recursively for images")
    p.add_argument("--out", required=True, help="output directory for {train,val}_teacher.npy and "
                   "{train,val}_index.csv (each row's source image and subject: its folder)")
    p.add_argument("--size", type=int_range(8), default=IMAGE_SIZE, help="output image size in pixels")
    p.add_argument("--val-fraction", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.2,
                   help="fraction of images for val")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the shuffle before the split")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    safe_console()
    sys.exit(main())
