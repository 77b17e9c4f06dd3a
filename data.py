"""Data for the ear teacher: .npy image files, augmentation on the device and resumable loading (synthetic ears:
synth.py).

    open_npy / validate / EarDataset  memory-mapped (N, H, W, 3) | (N, 3, H, W) | (N, H, W) uint8 or float 0-1 files
                                    -> uint8 (3, 128, 128) samples; bad samples (NaN, inf, out of range, blank) dropped
    read_identities                 identity labels of the kept samples from the CSV beside the file (X_index.csv
                                    column subject, or X_factors.csv column identity); shared_identities: those of
                                    a val file that also have images in a train file
    read_landmarks / read_masks     landmarks (X_landmarks.csv, pixels; save_landmarks writes it) and ear masks
                                    (X_masks.npy) of every image
    dataset_files / write_dataset   a folder holds one dataset: its .npy files and CSVs are replaced as one set
    AugConfig / augment             batched geometric + colour jitter on the batch's device; sample i's parameters
                                    depend only on (seed, epoch, key_i, view), so a resumed run repeats them exactly
    ResumableSampler / make_loader  epoch order from (seed, epoch), resumable mid-epoch, split across DDP ranks
    IdentitySampler                 P identities x K images per batch (for SupCon), as resumable and rank-split

CLI:
    python data.py check data/train_teacher.npy       # names the bad samples (and their source images)
    python data.py convert ~/ear_photos --out data    # photos.py: any Pillow format, split by subject, iBUG .pts
                                                      # landmarks carried into X_landmarks.csv
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from cli import HelpFormatter, float_range, fraction, int_range, progress, safe_console, seed_int
from errors import DataError, OutputError
from files import Writer, check_output_dir, claim, release, save_npy, write_outputs
from photos import (BACKGROUND, CHANGE_KINDS, SQUARE_RULES, UnusableImage, load_image, map_points, path_text,
                    read_pts, scan, split_groups, subject_of)

IMAGE_SIZE = 128

INVALID_REASONS = ("non-finite", "out of range", "blank")
BLANK_STD = 2.0 / 255  # a sample whose pixel std (all channels, [0, 1] scale) is below this is blank
RANGE_TOLERANCE = 0.5 / 255  # float samples may exceed [0, 1] by this much (they still round into 0..255)


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
        if path.exists():
            raise DataError(f"{path}: not a file")
        raise DataError(f"{path}: file not found (`python synth.py --out {path.parent}` writes synthetic ears there; "
                        f"`python data.py convert PHOTOS --out {path.parent}` converts a folder of photos)")
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
        rgba = arr.ndim == 4 and 4 in (arr.shape[1], arr.shape[3])
        raise DataError(f"{path}: shape {arr.shape} is not (N, H, W, 3), (N, 3, H, W) or grayscale (N, H, W)"
                        + ("; RGBA? drop the alpha channel (x[..., :3]) or convert the photos with `python data.py "
                           "convert`" if rgba else ""))
    if arr.shape[0] == 0:
        raise DataError(f"{path}: no samples (shape {arr.shape})")
    if h != w:
        single = arr.ndim == 3 and arr.shape[2] == 3 and arr.shape[0] == arr.shape[1]  # (H, W, 3): read as N, H, W
        one = (f"; one image of shape {arr.shape}? an image array has the count first: x[None] is (1, "
               f"{', '.join(map(str, arr.shape))})" if single else "")
        raise DataError(f"{path}: images are {h}x{w}, expected square crops (`data.py convert` pads photos to square)"
                        + one)
    return layout


def invalid_reasons(arr: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Why each sample of an image array (any layout open_npy accepts) is unusable, reading `chunk` samples at a time.

    -> int8 (N,): 0 for a valid sample, else 1 + the index in INVALID_REASONS of the first reason that applies:
    'non-finite' (NaN or inf), 'out of range' (outside [0, 1], float data only) and 'blank' (pixel std below
    BLANK_STD: a constant or near-constant image)."""
    is_float = arr.dtype != np.uint8
    unit = 1.0 if is_float else 255.0
    reason = np.zeros(len(arr), np.int8)
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
    return reason


def validate(arr: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, dict[str, int]]:
    """Find the usable samples of an image array (invalid_reasons) -> (keep, invalid): keep int64 (K,) the indices of
    the valid samples; invalid {reason: count} for every reason of INVALID_REASONS (an invalid sample counts once,
    under its first reason)."""
    reason = invalid_reasons(arr, chunk)
    return np.flatnonzero(reason == 0), _counts(reason)


def _counts(reason: np.ndarray) -> dict[str, int]:
    counts = np.bincount(reason, minlength=len(INVALID_REASONS) + 1)
    return {name: int(counts[k + 1]) for k, name in enumerate(INVALID_REASONS)}


def _check_invalid(path: Path, reason: np.ndarray, max_invalid: float) -> None:
    """DataError if more than max_invalid of the samples (or all of them) are invalid; it names the first few
    (index and, where an index CSV is beside the file, source image). reason: invalid_reasons() of the file."""
    invalid, n_total = _counts(reason), len(reason)
    n_bad = sum(invalid.values())
    if n_bad > max_invalid * n_total or n_bad == n_total:
        lines = bad_samples(path, reason)
        named = ", ".join(lines[:3]) + (f", {n_bad - 3:,} more (python data.py check lists all)" if n_bad > 3 else "")
        if invalid["out of range"]:  # only float data is out of range
            named += "; float images are read in [0, 1]: divide 0-255 floats by 255, or save uint8"
        if n_bad > max_invalid * n_total:
            raise DataError(f"{path}: {n_bad:,} of {n_total:,} samples invalid ({_reasons(invalid)}: {named}); more "
                            f"than the {max_invalid * 100:g}% allowed (--max-invalid)")
        raise DataError(f"{path}: all {n_total:,} samples invalid ({_reasons(invalid)}: {named})")


def bad_samples(path: Path, reason: np.ndarray, limit: int | None = None) -> list[str]:
    """'#3 blank s01/x.png' for each invalid sample (the first `limit`), with its source image where the file's index
    CSV (X_index.csv, written by `data.py convert`) has one row per sample."""
    bad = np.flatnonzero(reason)[:limit]
    sources = _sources(path, len(reason))
    return [f"#{i} {INVALID_REASONS[reason[i] - 1]}" + (f" {sources[i]}" if sources else "") for i in bad]


def _sources(npy: Path, n_total: int) -> list[str] | None:
    """The `path` column of the index CSV beside `npy` (path_text of each sample's source image), None without one or
    when its row count is not the file's."""
    paths = _read_column(sidecar(npy, "index"), "path")
    return paths if paths is not None and len(paths) == n_total else None


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
        reason = invalid_reasons(self._arr)  # int8 (N,)
        self.keep, self.invalid = np.flatnonzero(reason == 0), _counts(reason)  # int64 (K,), {reason: count}
        _check_invalid(self.path, reason, max_invalid)

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

    def fingerprint(self) -> dict:
        """What identifies the file's content, cheaply (data.fingerprint): {"bytes", "shape", "dtype", "sha256"}."""
        return fingerprint(self.path, self._arr)

    def summary(self) -> str:
        """e.g. '12,023 (filtered 0 invalid)', '9,990 (filtered 10 invalid: blank 10)', or where `keep` repeats
        images (landmarker.py's epochs of N labels) '1,000: 50 images 20 times (filtered 0 invalid)'."""
        n_bad, unique = sum(self.invalid.values()), len(np.unique(self.keep))
        times = f": {unique:,} images {len(self) // unique} times" if unique < len(self) else ""
        return f"{len(self):,}{times} (filtered {n_bad:,} invalid{': ' + _reasons(self.invalid) if n_bad else ''})"

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver get the path, not a pickled copy of the whole memmap
        return {**self.__dict__, "_arr": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arr = open_npy(self.path)


FINGERPRINT_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones at FINGERPRINT_CHUNKS places
FINGERPRINT_CHUNKS = 64  # chunks of 64 KiB, evenly spaced from the first byte to the last


def fingerprint(path: str | os.PathLike, arr: np.ndarray) -> dict:
    """A data file's identity: {"bytes": its size, "shape": arr's shape, "dtype": arr's dtype, "sha256": of the
    whole file up to FINGERPRINT_WHOLE bytes, else of its header and FINGERPRINT_CHUNKS evenly spaced chunks of 64
    KiB (the first and last included): ~4 MiB read whatever the size, "labels": {the identity CSV beside it: its
    sha256}, "landmarks": {the landmarks CSV beside it: its sha256}}. Equal fingerprints: the same file for any
    realistic edit (rows removed, added, replaced or reordered change the size or the sampled bytes)."""
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FINGERPRINT_WHOLE:
            h.update(f.read())
        else:
            for i in range(FINGERPRINT_CHUNKS):
                f.seek((size - (64 << 10)) * i // (FINGERPRINT_CHUNKS - 1))
                h.update(f.read(64 << 10))
    npy = Path(path)
    return {"bytes": size, "shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": h.hexdigest(),
            "labels": _sha256s(csv for csv, _ in identity_files(npy)),  # a resume's SupCon batches read them
            "landmarks": _sha256s([landmarks_file(npy)])}  # a resumed landmarker's targets


def _sha256s(paths) -> dict[str, str]:
    """{name: sha256 of its bytes} of those of `paths` that exist."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


FINGERPRINT_SIDECARS = {"labels": "identity labels", "landmarks": "landmarks"}  # fingerprint's keys of the CSVs
# beside the file (-> their words in fingerprint_change), apart from the images


def fingerprint_change(saved: dict, now: dict) -> str | None:
    """How a data file changed between two fingerprints ('98,304,128 -> 73,728,128 bytes, (2000, 128, 128, 3) ->
    (1500, 128, 128, 3)', 'other content, same size and shape', 'its identity labels X_factors.csv changed'), or
    None where they are equal."""
    if saved == now:
        return None
    parts = [f"{saved[k]:,} -> {now[k]:,} bytes" if k == "bytes" else f"{tuple(saved[k])} -> {tuple(now[k])}"
             if k == "shape" else f"{saved[k]} -> {now[k]}" for k in ("bytes", "shape", "dtype") if saved[k] != now[k]]
    if not parts and saved["sha256"] != now["sha256"]:
        parts.append("other content, same size and shape")
    for key, what in FINGERPRINT_SIDECARS.items():
        new = now.get(key, {})
        old = saved.get(key, new)  # checkpoints from before this key was kept: no change to report
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                parts.append(f"its {what} {name} " + ("removed" if name not in new else "added" if name not in old
                                                      else "changed"))
    return ", ".join(parts) or None


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
    found = _identity_column(npy)
    if found is None:
        return None
    path, column, values = found
    if len(values) != ds.n_total:
        raise DataError(f"{path}: {len(values):,} rows, expected one per sample of {npy} ({ds.n_total:,})")
    labels = _subject_codes(values) if column == "subject" else _integer_labels(values, path, column)
    return labels[ds.keep]


def shared_identities(train_npy: Path, val_npy: Path) -> tuple[set[str], set[str]] | None:
    """(identities of val_npy, those of them that also have images in train_npy), by name (a subject of X_index.csv,
    an integer of X_factors.csv's identity column; unlabelled rows left out). None when either file has no identity
    CSV, or the two label in different CSV kinds (the names would not compare). Every row counts, invalid samples'
    too: a subject is in a split if any of its images is."""
    names = []
    for npy in (val_npy, train_npy):
        found = _identity_column(npy)
        if found is None:
            return None
        path, column, values = found
        if column == "identity":
            values = [str(v) for v in _integer_labels(values, path, column).tolist()]
        names.append((column, {v for v in values if v not in ("", str(UNLABELLED))}))
    (val_kind, val), (train_kind, train) = names
    return (val, val & train) if val_kind == train_kind else None


def missing_labels(npy: Path) -> str:
    """Why read_identities(npy) returned None, one clause per CSV of identity_files(npy): it does not exist, or it has
    no such column."""
    return "; ".join(f"{path} does not exist" if not path.is_file() else f"{path} has no {column!r} column"
                     for path, column in identity_files(npy))


def _identity_column(npy: Path) -> tuple[Path, str, list[str]] | None:
    """(CSV, column, its values) of the first CSV of identity_files(npy) that exists with its column, else None."""
    for path, column in identity_files(npy):
        values = _read_column(path, column)
        if values is not None:
            return path, column, values
    return None


def csv_rows(path: Path) -> list[list[str]]:
    """The rows of CSV `path` (header first), read as UTF-8; a byte-order mark before the header (a spreadsheet's) is
    dropped. DataError naming the file and the byte for text in another encoding (UTF-16, cp1252)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as "
                        f"a UTF-8 CSV") from None


def _read_column(path: Path, column: str) -> list[str] | None:
    """The values of `column` in CSV `path` (header + rows), None when the file or the column does not exist; an
    empty file or a row whose field count is not the header's -> DataError naming the file (and line)."""
    if not path.is_file():
        return None
    rows = csv_rows(path)
    if not rows:  # a truncated file, not one without the column
        raise DataError(f"{path}: empty; a CSV starts with its header line")
    if column not in rows[0]:
        return None
    header, rows = rows[0], rows[1:]
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
    return [row[header.index(column)] for row in rows]


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
# landmarks and masks

def landmarks_file(npy: Path) -> Path:
    """X_teacher.npy -> X_landmarks.csv: header index, <name>_x, <name>_y, ...; one row per image."""
    return sidecar(npy, "landmarks")


def check_landmark_names(names: list[str] | tuple[str, ...], expected: list[str] | tuple[str, ...], npy: Path,
                         other: str) -> None:
    """DataError naming npy's landmarks CSV when its landmark names (read_landmarks) are not `expected`, in that
    order: `other` says whose those are (another CSV, a model). Points are matched by position, so a CSV with the
    same landmarks in another order would be scored against the wrong ones."""
    if list(names) != list(expected):
        raise DataError(f"{landmarks_file(npy)}: landmarks {', '.join(names)}; {other} has {', '.join(expected)}: "
                        f"the same names in the same column order are needed")


def masks_file(npy: Path) -> Path:
    """X_teacher.npy -> X_masks.npy: uint8 (N, 128, 128), 1 on the ear, 0 elsewhere."""
    return npy.with_name(f"{npy.stem.removesuffix('_teacher')}_masks.npy")


def save_landmarks(names: Sequence[str], points: np.ndarray) -> Writer:
    """The landmarks CSV that read_landmarks reads: header index, <name>_x, <name>_y for each of `names`; one row per
    image of points (n, len(names), 2), (x, y) in pixels of the 128 px image, 3 decimals; a landmark outside the crop
    (synthetic ears cut by the frame: about 1 image in 1,000) as two empty fields."""
    inside = ((points >= 0) & (points <= IMAGE_SIZE)).all(-1)  # (n, K)
    header = ",".join(["index", *(f"{name}_{axis}" for name in names for axis in "xy")])
    rows = [",".join([str(i), *(f"{x:.3f},{y:.3f}" if ok else "," for (x, y), ok in zip(p, keep))])
            for i, (p, keep) in enumerate(zip(points.tolist(), inside))]
    return lambda f: f.write(("\n".join([header, *rows]) + "\n").encode())


def read_landmarks(npy: Path) -> tuple[list[str], np.ndarray]:
    """The landmarks of every image of `npy` from landmarks_file(npy) -> (names, float32 (N, K, 2)): (x, y) in pixels
    of the 128 px image, pixel (i, j) covering [j, j + 1) x [i, i + 1) (synth.LANDMARKS for synthetic ears); NaN
    for a landmark outside the crop, which the CSV gives as two empty fields.

    The CSV's header is `index` then the pairs <name>_x, <name>_y; its rows hold each index 0..N-1 once (any order).
    DataError naming the file (and its line) for: no file, another header, a row of another length, an index that is
    not an image of `npy` or comes twice, a missing row, a value that is not a finite number (NaN included) or one
    empty field of a pair, a point outside the image [0, 128]. Nothing is guessed."""
    path = landmarks_file(npy)
    if not path.is_file():
        raise DataError(f"{path}: no landmarks for {npy.name} (synth.py writes them; a landmarks CSV has the header "
                        f"index,<name>_x,<name>_y,...)")
    n = len(open_npy(npy))
    rows = csv_rows(path)
    header = rows[0] if rows else []
    names = [h.removesuffix("_x") for h in header[1::2]]
    if (len(header) < 3 or len(header) % 2 == 0 or header[0] != "index"
            or header[1:] != [f"{name}_{axis}" for name in names for axis in "xy"]):
        raise DataError(f"{path}: line 1: the header is not index,<name>_x,<name>_y,... ({','.join(header)[:80]!r})")
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: line 1: the landmark {twice!r} comes twice; each landmark is one pair of columns")
    points = np.full((n, len(names), 2), np.nan, np.float32)
    seen = np.zeros(n, bool)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
        empty = np.array([v.strip() == "" for v in row[1:]]).reshape(-1, 2)  # (K, 2): outside the crop
        if (half := empty.any(1) & ~empty.all(1)).any():
            raise DataError(f"{path}: line {line}: {names[int(np.argmax(half))]} has one empty coordinate (both "
                            f"empty: outside the crop)")
        try:
            i = int(row[0])
            values = np.array([0.0 if v.strip() == "" else float(v) for v in row[1:]])  # (2K,); empty: NaN below
        except ValueError:
            raise DataError(f"{path}: line {line}: not an integer index and numbers ({','.join(row)[:80]!r})") from None
        if not 0 <= i < n:
            raise DataError(f"{path}: line {line}: index {i} is not an image of {npy.name} (0..{n - 1})")
        if seen[i]:
            raise DataError(f"{path}: line {line}: index {i} comes twice")
        if not np.isfinite(values).all():
            raise DataError(f"{path}: line {line} (image {i}): {names[int(np.argmin(np.isfinite(values))) // 2]} is "
                            f"not a finite number")
        if (outside := (values < 0) | (values > IMAGE_SIZE)).any():
            k = int(np.argmax(outside)) // 2
            raise DataError(f"{path}: line {line} (image {i}): {names[k]} ({values[2 * k]:g}, {values[2 * k + 1]:g}) "
                            f"lies outside the {IMAGE_SIZE} px image")
        seen[i] = True
        values[empty.ravel()] = np.nan
        points[i] = values.reshape(-1, 2)
    if not seen.all():
        raise DataError(f"{path}: no row for image {int(np.argmin(seen))} ({int((~seen).sum())} of the {n} images of "
                        f"{npy.name} have none)")
    return names, points


def whole_landmarks(points: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """points (N_total, K, 2) from read_landmarks (NaN outside the crop), keep (n,) a dataset's file indices -> the
    positions (m,) in `keep` whose image has every landmark in the crop."""
    return np.flatnonzero(~np.isnan(points[keep]).any((1, 2)))


def read_masks(npy: Path) -> np.ndarray:
    """The ear mask of every image of `npy` from masks_file(npy) -> uint8 (N, 128, 128), 0 or 1 (memory-mapped).
    DataError naming the file for: no file, not a plain .npy, another dtype or shape than (N, 128, 128) with N the
    images', a value other than 0 and 1."""
    path, n = masks_file(npy), len(open_npy(npy))
    if not path.is_file():
        raise DataError(f"{path}: no ear masks for {npy.name} (synth.py writes them: uint8 (N, 128, 128), 1 on the ear)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a plain .npy array ({e})") from e
    if arr.dtype not in (np.uint8, np.bool_) or arr.shape != (n, IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: {arr.dtype} {tuple(arr.shape)}; expected uint8 ({n}, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                        f"one mask per image of {npy.name}")
    if arr.dtype == np.uint8 and (bad := np.flatnonzero(arr.reshape(n, -1).max(1) > 1)).size:
        raise DataError(f"{path}: mask {bad[0]} holds values other than 0 and 1 (max {arr[bad[0]].max()})")
    return arr.view(np.uint8)


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

    def keeping_identity(self) -> AugConfig:
        """This config without zoom and colour jitter: the views of NT-Xent (train.py without identity labels).
        NT-Xent's only positive is another augmentation of the same image, so the embedding learns to ignore whatever
        the augmentation changes; the size of the ear in the crop and its skin tone are identity (synth.ANATOMY),
        pose (rotation) and framing (shift) are not. Measured on the demo (BENCHMARKS.md): rank-1 0.217 -> 0.280."""
        return replace(self, scale=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


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
    augment_points with the same arguments moves points with the pixels. ValueError for other shapes.
    """
    if x.ndim != 4 or x.shape[1] != 3 or keys.shape != (x.shape[0],):
        raise ValueError(f"expected x (B, 3, H, W) and keys (B,), got {tuple(x.shape)} and {tuple(keys.shape)}")
    theta, colour = augment_params(keys, seed, epoch, cfg, view, x.device)  # (B, 2, 3), (B, 4)
    x = to_float(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _colour(x, *colour.unbind(1))


def augment_params(keys: torch.Tensor, seed: int, epoch: int, cfg: AugConfig, view: int = 0,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters augment draws for keys (B,) -> theta float32 (B, 2, 3), the affine map from output to input
    coordinates normalised to [-1, 1] (F.affine_grid, align_corners=False), and colour float32 (B, 4): the
    brightness, contrast and saturation factors and the hue rotation in turns (_colour). On `device`; sample i's
    come only from (seed, epoch, keys[i], view)."""
    gens = [torch.Generator().manual_seed(sample_seed(seed, epoch, k, view)) for k in keys.tolist()]
    p = torch.stack([torch.rand(_N_AUG_PARAMS, generator=g) for g in gens]).to(device)  # (B, 9) uniform [0, 1)
    sym = 2.0 * p - 1.0  # (B, 9) uniform [-1, 1)
    zoom = 1.0 + cfg.scale * sym[:, 0]  # (B,)
    angle = torch.deg2rad(cfg.rotate * sym[:, 1])
    shift = 2.0 * cfg.translate * sym[:, 2:4]  # (B, 2), in normalised [-1, 1] coordinates
    flip = torch.where(p[:, 4] < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones_like(zoom)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3): output -> input coords
    colour = torch.stack([1.0 + cfg.brightness * sym[:, 5], 1.0 + cfg.contrast * sym[:, 6],
                          1.0 + cfg.saturation * sym[:, 7], cfg.hue * sym[:, 8]], 1)  # (B, 4)
    return theta, colour


def augment_points(points: torch.Tensor, size: int, keys: torch.Tensor, seed: int, epoch: int, cfg: AugConfig,
                   view: int = 0) -> torch.Tensor:
    """Where augment with the same (keys, seed, epoch, cfg, view) moves the points of size x size images.

    points: float (B, K, 2), (x, y) in pixels of the image with pixel centres at 0.5, 1.5, ... (read_landmarks's
    convention; normalised u = 2 p / size - 1 under align_corners=False), NaN for a point outside it. Returns float32
    (B, K, 2) on points.device: each point through the inverse of augment's theta, NaN where it was NaN or where the
    augmentation moves it outside the image (a coordinate below 0 or above size, read_landmarks's bounds).
    ValueError for other shapes.
    """
    if points.ndim != 3 or points.shape[-1] != 2 or keys.shape != (points.shape[0],):
        raise ValueError(f"expected points (B, K, 2) and keys (B,), got {tuple(points.shape)} and "
                         f"{tuple(keys.shape)}")
    theta = augment_params(keys, seed, epoch, cfg, view, points.device)[0]  # (B, 2, 3)
    a, t = theta[:, :, :2], theta[:, :, 2]  # (B, 2, 2), (B, 2): u_in = a @ u_out + t
    u_in = 2.0 * points.float() / size - 1.0  # (B, K, 2) normalised
    u_out = torch.linalg.solve(a, (u_in - t[:, None]).transpose(1, 2)).transpose(1, 2)  # (B, K, 2)
    out = (u_out + 1.0) * size / 2.0  # (B, K, 2) pixels
    outside = ((out < 0) | (out > size)).any(-1, keepdim=True)  # (B, K, 1); NaN compares False, stays NaN
    return out.masked_fill(outside, float("nan"))


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


class IdentitySampler(Sampler[int]):
    """P identities x K images per batch (re-identification's batch, deep-person-reid's RandomIdentitySampler), for
    SupCon: every image of a batch has K - 1 positives.

    labels: (N,) int64 identity of each dataset sample (UNLABELLED rows are never drawn). An epoch visits every
    identity once, in the order torch.randperm from a generator seeded by (seed, epoch), and takes K of its images:
    drawn without replacement from a generator seeded by (seed, epoch, identity); an identity with fewer than K images
    is drawn WITH replacement (its images repeat within its group; their augmentations then repeat too). The epoch is
    the groups in that order, n_used = (identities * K) // global_batch * global_batch positions (the incomplete
    last global batch dropped): with more than K images per identity, an epoch sees K of each identity's images.

    Global batch s is positions [s * G, (s + 1) * G), G = batch_size * world_size * accum_steps; rank r yields its
    contiguous share [s * G + r * batch_size * accum_steps, ...), so each of its micro-batches holds batch_size / K
    whole identities, and the union over ranks is the same global batch whatever the number of processes. After
    set_epoch(epoch, start) iteration begins at global position `start`, a multiple of G (samples of this epoch
    already consumed over all ranks). len() is what this rank yields.
    """

    def __init__(self, labels: np.ndarray, images_per_identity: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, accum_steps: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        k = images_per_identity
        if k < 2 or batch_size % k or batch_size // k < 2:
            raise ValueError(f"batch size {batch_size} per process: expected a multiple of the images per identity "
                             f"K={k} >= 2 holding at least 2 identities (each micro-batch holds whole identities, and "
                             f"SupCon's negatives are the other ones)")
        labels = np.asarray(labels)
        ids = np.unique(labels[labels != UNLABELLED])  # (I,) sorted
        self.members = [np.flatnonzero(labels == i) for i in ids]  # dataset indices of each identity
        self.ids, self.k, self.seed, self.rank, self.world_size = ids, k, seed, rank, world_size
        self.share = batch_size * accum_steps  # positions per rank per optimizer step
        self.global_batch = self.share * world_size
        self.n_used = len(ids) * k // self.global_batch * self.global_batch
        if self.n_used == 0:
            raise ValueError(f"{len(ids)} labelled identities x K={k} images is less than one global batch of "
                             f"{self.global_batch} ({batch_size} x {world_size} processes x {accum_steps} accum steps)")
        self.n_short = sum(len(m) < k for m in self.members)  # identities drawn with replacement
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.n_used or start % self.global_batch:
            raise ValueError(f"start must be a multiple of the global batch {self.global_batch} in "
                             f"[0, {self.n_used}], got {start}")
        self.epoch, self.start = epoch, start

    def epoch_order(self) -> torch.Tensor:
        """The epoch's n_used dataset indices, global batch after global batch (every rank's share) -> (n_used,)."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0x1D))
        groups = []
        for i in torch.randperm(len(self.ids), generator=g).tolist():
            members = torch.from_numpy(self.members[i])
            gi = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0x1D, int(self.ids[i])))
            pick = (torch.randperm(len(members), generator=gi)[:self.k] if len(members) >= self.k else
                    torch.randint(len(members), (self.k,), generator=gi))
            groups.append(members[pick])
        return torch.cat(groups)[:self.n_used]

    def __iter__(self):
        order = self.epoch_order().view(-1, self.world_size, self.share)  # (steps, ranks, share)
        first = self.start // self.global_batch
        return iter(order[first:, self.rank].flatten().tolist())

    def __len__(self) -> int:
        return (self.n_used - self.start) // self.world_size


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int) -> DataLoader:
    """Batches of (uint8 images (B, 3, H, W), original indices int64 (B,)) in the sampler's order.

    Workers make no random draws (augmentation happens on the device), so what they return is deterministic; their
    seeds come from a private generator, so iterating never consumes the global RNG. Memory is not pinned: with
    persistent workers, pinning made every process wait 5 s per worker at exit (pytorch/pytorch#81794; on an H200,
    train.py sat ~100 s after `done` with 8 workers), and a batch of uint8 crops (4 x 49 kB) gains nothing from it.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator(), worker_init_fn=_own_session)


def _own_session(worker_id: int) -> None:
    """Workers leave the trainer's process group: Ctrl-C or `kill -- -PGID` then reach the trainer alone, which
    finishes its step (fetching what it still needs from the workers), saves and stops them. (Ignoring the signals
    instead would block the SIGTERM with which Python ends daemon processes at exit.)"""
    os.setsid()


# ----------------------------------------------------------------------------------------------------------------
# files and CLI

SPLITS = ("train", "val")
SIDECAR_KINDS = ("index", "factors", "landmarks")  # CSVs beside a split's .npy: convert's index, synth.py's factors
                                                   # and landmarks
SKIPPED_CSV = "skipped.csv"  # convert: every entry of the source folder that is not in the .npy files, and why
PTS = ".pts"  # convert: iBUG landmarks beside an image of the same name (s01/3.png -> s01/3.pts)


def dataset_files(out: Path) -> list[Path]:
    """The files of a dataset that exist in folder `out`: {train,val}_teacher.npy, their sidecar CSVs (index,
    factors, landmarks), masks and skipped.csv. A folder holds one dataset: convert and synth.py write these as one
    set."""
    names = [p for split in SPLITS for npy in [out / f"{split}_teacher.npy"]
             for p in (npy, *(sidecar(npy, kind) for kind in SIDECAR_KINDS), masks_file(npy))] + [out / SKIPPED_CSV]
    return [p for p in names if p.exists() or p.is_symlink()]


def refuse_dataset(out: Path, force: bool) -> None:
    """DataError unless `out` can take a new dataset: it holds none of dataset_files(), or `force` (the new set then
    replaces all of them, write_dataset). Claims `out` first (files.claim: OutputError while another command works
    on results there)."""
    claim(out)
    existing = dataset_files(out)
    if existing and not force:
        release([out])
        raise DataError(f"{existing[0]}: already exists ({out} holds a dataset: "
                        f"{', '.join(p.name for p in existing)}); pass --force to replace the whole set")


def write_dataset(out: Path, files: dict[Path, Writer]) -> list[Path]:
    """Write a dataset's files together (files.write_outputs), then delete the dataset files of `out` that they do
    not replace (another dataset's index or factors CSV would describe other images). -> the deleted paths."""
    stale = [p for p in dataset_files(out) if p not in files]
    write_outputs(files)
    for p in stale:
        p.unlink()
    return stale


def _cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    arr = open_npy(path)
    reason = invalid_reasons(arr)
    keep, invalid = np.flatnonzero(reason == 0), _counts(reason)
    lo, hi = _value_range(arr)
    n_bad = sum(invalid.values())
    print(f"file:     {path}")
    print(f"samples:  {len(arr):,}")
    print(f"shape:    {arr.shape} {arr.dtype} ({_layout(arr, path)})")
    print(f"values:   {lo:g} .. {hi:g} (finite values)")
    print(f"invalid:  {n_bad:,} ({', '.join(f'{k} {v:,}' for k, v in invalid.items())})")
    for line in bad_samples(path, reason, CHECK_LISTED):
        print(f"  {line}")
    if n_bad > CHECK_LISTED:
        print(f"  ... {n_bad - CHECK_LISTED:,} more")
    _check_invalid(path, reason, args.max_invalid)
    print(f"verdict:  usable, {len(keep):,} valid samples")
    return 0


CHECK_LISTED = 50  # invalid samples `check` names one per line


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
        raise DataError(f"{path_text(src)}: {'not a directory' if src.exists() else 'no such folder'}")
    try:
        check_output_dir(out)
    except ValueError as e:
        raise DataError(f"--out {path_text(str(e))}") from e
    refuse_dataset(out, args.force)
    found = scan(src, exclude=out)
    n_entries = len(found.files) + len(found.skipped)
    pts = _read_all_pts(src, [rel for rel in found.files if rel.suffix.lower() == PTS])  # {rel: (K, 2)}
    photos = [rel for rel in found.files if rel not in pts]
    images = np.empty((len(photos), args.size, args.size, 3), np.uint8)  # filled front to back
    loaded, changes, maps = [], [], []  # of each filled row: its source relative to src, changes, position map
    skipped = list(found.skipped)
    for rel in progress(photos, desc="convert", unit="img"):
        try:
            images[len(loaded)], changed, to_output = load_image(src / rel, args.size, args.square, args.background)
        except UnidentifiedImageError:
            skipped.append((rel, "not an image Pillow can read"))
        except UnusableImage as e:
            skipped.append((rel, str(e)))
        except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:  # named below, not hidden
            skipped.append((rel, f"unreadable: {_printable(str(e))}"))
        else:
            loaded.append(rel)
            changes.append(changed)
            maps.append(to_output)
    pts_of = _pts_of(src, loaded, pts)  # {image: its .pts}
    used = set(pts_of.values())
    skipped += [(rel, "landmarks (.pts) of no converted image (none of the same name beside it, or it is skipped)")
                for rel in pts if rel not in used]
    skipped.sort(key=lambda item: item[0].parts)
    for rel, reason in skipped:
        print(f"skipped {path_text(rel)}: {reason}", file=sys.stderr)
    n_ok = len(loaded)
    if n_ok < 2:
        raise DataError(f"{path_text(src)}: {n_ok} usable images ({len(skipped):,} of {n_entries:,} entries "
                        f"skipped); need at least 2")
    points = _photo_landmarks(src, loaded, maps, pts, pts_of, args.size, args.square) if used else None  # (n_ok, K, 2)

    subjects = [subject_of(rel, args.subject_depth) for rel in loaded]
    named = sorted(set(subjects) - {""})
    split_by = args.split_by or ("subject" if len(named) >= 2 else "image")
    keys = [s if split_by == "subject" and s else "\0" + path_text(rel) for s, rel in zip(subjects, loaded)]
    try:
        val = split_groups(keys, args.val_fraction, args.seed)  # bool (n_ok,)
    except ValueError as e:
        raise DataError(f"{path_text(src)}: --split-by {split_by}: {len(named)} subject(s) at --subject-depth "
                        f"{args.subject_depth} and {subjects.count('')} image(s) without one: {e}; use --split-by "
                        f"image or another --subject-depth") from e

    files, npys = {}, {}
    for split, rows in (("train", np.flatnonzero(~val)), ("val", np.flatnonzero(val))):
        npys[split] = npy = out / f"{split}_teacher.npy"
        files[npy] = save_npy(images[rows])
        files[sidecar(npy, "index")] = _save_index([(loaded[i], subjects[i], changes[i]) for i in rows])
        if points is not None:
            files[landmarks_file(npy)] = save_landmarks([f"p{k + 1}" for k in range(points.shape[1])], points[rows])
    files[out / SKIPPED_CSV] = _save_skipped(skipped)
    removed = write_dataset(out, files)

    in_split = {split: {subjects[i] for i in np.flatnonzero(mask)} - {""} for split, mask in
                (("train", ~val), ("val", val))}
    shared = in_split["val"] & in_split["train"]
    n_val = int(val.sum())
    print(f"converted {n_ok:,} of {n_entries:,} entries ({len(skipped):,} skipped: {out / SKIPPED_CSV}"
          f"{f'; {len(used):,} .pts landmark files read' if used else ''}); "
          f"{_n(len(named), 'subject')} (folders at --subject-depth {args.subject_depth}), "
          f"{_n(subjects.count(''), 'image')} without one")
    print(f"split by {split_by}{'' if args.split_by else ' (default)'}: train {_n(n_ok - n_val, 'image')} of "
          f"{_n(len(in_split['train']), 'subject')} -> {npys['train']}, val {_n(n_val, 'image')} of "
          f"{_n(len(in_split['val']), 'subject')} ({n_val / n_ok:.1%}; --val-fraction {args.val_fraction:g}) -> "
          f"{npys['val']}; their sources in {sidecar(npys['train'], 'index')}, {sidecar(npys['val'], 'index')}")
    if points is not None:
        print(f"landmarks: {points.shape[1]} points per image from the .pts beside it, carried through the "
              f"orientation, --square {args.square} and the resize -> {landmarks_file(npys['train'])}, "
              f"{landmarks_file(npys['val'])}")
    counts = {kind: sum(kind in {k for k, _ in c} for c in changes) for kind in CHANGE_KINDS}
    print(f"content changes: {', '.join(f'{kind} {n:,}' for kind, n in counts.items() if n) or 'none'} (background "
          f"{','.join(map(str, args.background))}; each image's in the changes column of the index CSVs)")
    if removed:
        print(f"removed the earlier dataset's {', '.join(p.name for p in removed)} (--force)")
    if shared:
        print(f"warning: {len(shared):,} of {len(in_split['val']):,} val subjects also have images in train "
              f"({', '.join(sorted(shared)[:5])}{', ...' if len(shared) > 5 else ''}): identity metrics on val would "
              f"not be on unseen subjects; --split-by subject keeps each subject in one split", file=sys.stderr)
    return 0


def _n(count: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _read_all_pts(src: Path, files: list[Path]) -> dict[Path, np.ndarray]:
    """Every .pts of the folder, before any image is decoded -> {path relative to src: float64 (K, 2), photos.read_pts}.
    DataError naming the file for one that cannot be read or parsed, or whose point count is not the first's."""
    found: dict[Path, np.ndarray] = {}
    for rel in files:
        try:
            found[rel] = read_pts(src / rel)
        except OSError as e:
            raise DataError(f"{path_text(src / rel)}: cannot read it ({e.strerror})") from e
        except ValueError as e:
            raise DataError(f"{path_text(src / rel)}: not an iBUG .pts file: {e}") from e
        first = next(iter(found))
        if len(found[rel]) != len(found[first]):
            raise DataError(f"{path_text(src / rel)}: {len(found[rel])} points, but {path_text(first)} (the first "
                            f".pts) has {len(found[first])}; every image's .pts must hold the same points")
    return found


def _pts_of(src: Path, loaded: list[Path], pts: dict[Path, np.ndarray]) -> dict[Path, Path]:
    """{image: the .pts beside it} for those of `loaded` that have one: the same name with the suffix .pts in any
    case (s01/3.png -> s01/3.pts or s01/3.PTS). DataError when two .pts share a name (3.pts and 3.PTS)."""
    by_name: dict[Path, Path] = {}
    for rel in pts:
        if (other := by_name.setdefault(rel.with_suffix(""), rel)) != rel:
            raise DataError(f"{path_text(src / rel)}: a second landmarks file beside {path_text(other)}; one .pts "
                            f"per image")
    return {rel: by_name[rel.with_suffix("")] for rel in loaded if rel.with_suffix("") in by_name}


def _photo_landmarks(src: Path, loaded: list[Path], maps: list[np.ndarray], pts: dict[Path, np.ndarray],
                     pts_of: dict[Path, Path], size: int, square: str) -> np.ndarray:
    """The landmarks of each converted image in pixels of its crop at 128 px (read_landmarks' frame, whatever --size)
    -> float64 (n, K, 2), rounded to the CSV's 3 decimals. loaded: the images; maps: their (3, 3) position maps from
    the stored photo to the `size` px crop (photos.load_image); pts: _read_all_pts; pts_of: _pts_of. DataError when
    an image has no .pts while others have (naming the first), when two images share one .pts, or when points leave
    the crop (naming the first image and counting them)."""
    missing = [rel for rel in loaded if rel not in pts_of]
    if missing:
        raise DataError(f"{path_text(src / missing[0])}: no landmarks {path_text(missing[0].with_suffix(PTS))} beside "
                        f"it, while {len(loaded) - len(missing):,} of the {len(loaded):,} images have theirs "
                        f"({len(missing):,} without); give every image a .pts, or none")
    owner: dict[Path, Path] = {}
    for rel in loaded:
        if (other := owner.setdefault(pts_of[rel], rel)) != rel:
            raise DataError(f"{path_text(src / pts_of[rel])}: the landmarks of two images ({path_text(other)},"
                            f" {path_text(rel)}); one .pts per image, of the same name")
    to_128 = np.diag([IMAGE_SIZE / size, IMAGE_SIZE / size, 1.0])
    points = np.round(np.stack([map_points(pts[pts_of[rel]], to_128 @ m) for rel, m in zip(loaded, maps)]),
                      3)
    outside = ((points < 0) | (points > IMAGE_SIZE)).any(axis=2)  # (n, K)
    if outside.any():
        i, k = np.argwhere(outside)[0]
        raise DataError(f"{path_text(src / pts_of[loaded[i]])}: point p{k + 1} lands at ({points[i, k, 0]:g}, "
                        f"{points[i, k, 1]:g}), outside the {IMAGE_SIZE} px crop of {path_text(loaded[i])} after "
                        f"--square {square} ({int(outside.any(axis=1).sum()):,} of {len(loaded):,} images have points "
                        f"outside it){'; --square pad keeps the whole photo' if square == 'crop' else ''}")
    return points


def _printable(text: str) -> str:
    """Text any console can print: the undecodable bytes of a file name in it (lone surrogates) as \\udcXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _save_index(rows: list[tuple[Path, str, list[tuple[str, str]]]]) -> Writer:
    """The index CSV of a converted split (csv module quoting: paths may hold commas): header
    `index,path,subject,changes`, one row per row of the split's .npy: the row, the source image relative to the
    converted folder (photos.path_text: '%' as %25, bytes that are not UTF-8 as %XX), its subject and what changed
    its content ('kind (detail)' joined by '; ', photos.load_image)."""
    def write(f: io.BufferedWriter) -> None:
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(("index", "path", "subject", "changes"))
        w.writerows((i, path_text(rel), subject, "; ".join(f"{kind} ({detail})" for kind, detail in changed))
                    for i, (rel, subject, changed) in enumerate(rows))
        f.write(text.getvalue().encode())
    return write


def _save_skipped(skipped: list[tuple[Path, str]]) -> Writer:
    """skipped.csv: header `path,reason`, one row per entry of the source folder left out (path as in the index)."""
    def write(f: io.BufferedWriter) -> None:
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(("path", "reason"))
        w.writerows((path_text(rel), reason) for rel, reason in skipped)
        f.write(text.getvalue().encode())
    return write


def _rgb(s: str) -> tuple[int, int, int]:
    """'R,G,B' (each 0-255) or one grey level -> (R, G, B)."""
    try:
        values = [int(v) for v in s.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"expected R,G,B or one grey level, each 0-255, got {s!r}")
    return tuple(values)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ear-teacher data: checks and conversion.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter

    p = sub.add_parser("check", help="report on an image .npy file; exit 0 if usable for training, else 1",
                       formatter_class=fmt)
    p.add_argument("file", help="the .npy file")
    p.add_argument("--max-invalid", type=fraction, default=0.05,
                   help="largest fraction of invalid samples that still counts as usable")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("convert", help="convert a folder of ear crops (any format Pillow reads) to train/val .npy",
                       formatter_class=fmt)
    p.add_argument("image_dir", help="folder searched recursively for images (symlinks followed); every entry that "
                   "is not converted is named with its reason. iBUG landmarks X.pts beside an image X.png (the "
                   "in-the-wild ear collections) are carried through the orientation, squaring and resize into "
                   "{train,val}_landmarks.csv; every image needs one, or none")
    p.add_argument("--out", required=True, help="output folder for {train,val}_teacher.npy, {train,val}_index.csv "
                   "(each row's source image, subject and content changes), {train,val}_landmarks.csv (with .pts "
                   "files: points p1..pN in pixels of the 128 px crop) and skipped.csv (entries left out, why)")
    p.add_argument("--size", type=int_range(8), default=IMAGE_SIZE, help="output image size in pixels")
    p.add_argument("--square", choices=SQUARE_RULES, default="pad",
                   help="how a non-square image becomes square: pad (centred on --background: the whole ear kept, "
                        "nothing invented), reflect (mirrored at its edges) or crop (the centre square: loses the top "
                        "and bottom of a portrait crop)")
    p.add_argument("--background", type=_rgb, default=BACKGROUND, metavar="R,G,B",
                   help="colour of the padding and behind transparent pixels (default: the ImageNet mean, which the "
                        "encoder's normalisation maps to 0)")
    p.add_argument("--split-by", choices=("subject", "image"), default=None,
                   help="subject: every subject's images in one split (ear recognition protocols need this); image: "
                        "images split one by one (default: subject when there are 2+ subject folders)")
    p.add_argument("--subject-depth", type=int_range(1), default=1,
                   help="folder levels under IMAGE_DIR that name the subject: 1 for DIR/s09/left/x.jpg -> s09, "
                        "2 for DIR/site/s09/x.jpg -> site/s09")
    p.add_argument("--val-fraction", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.2,
                   help="fraction of the images for val (met as closely as whole subjects allow)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split")
    p.add_argument("--force", action="store_true", help="replace the dataset already in --out (all its files: "
                   ".npy, index, factors, landmarks and skipped CSVs, masks)")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    safe_console()
    sys.exit(main())
