"""Folders of ear photographs -> square 8-bit RGB crops, with nothing lost or bent silently (`data.py convert`).

    scan(src)            every entry under a folder: the image candidates (each real file once) and, for everything
                         else, why it is left out (broken symlink, FIFO, a second link to a file, unreadable folder)
    load_image(path)     any image Pillow opens -> uint8 (size, size, 3), the list of what changed its content
                         (bit depth, transparency, padding or cropping to square, upscaling, frames left out) and
                         the affine map it applied to the pixels' positions (orientation, square, resize)
    read_pts(path)       iBUG .pts landmarks -> (x, y) in the pixel coordinates of the photo as stored
    map_points(p, m)     points through such an affine map
    subject_of(rel)      the subject of an image: its first folder level(s) under the folder
    split_groups(keys)   train/val by groups (subjects), seeded, the val fraction met by images as closely as the
                         group sizes allow
    path_text(p)         a file name as text for CSVs and consoles, lossless for names that are not UTF-8

Pillow (https://pillow.readthedocs.io) reads every format; what it leaves to the caller is done here: 16-bit and
float pixels scaled to 8 bits, alpha composited, the square made by a stated rule.
"""
from __future__ import annotations

import hashlib
import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

SQUARE_RULES = ("pad", "reflect", "crop")
BACKGROUND = (124, 116, 104)  # ImageNet mean x 255: 0 after the encoders' normalisation, i.e. "no signal" to them
UPSCALE_NOTED = 2.0  # an image enlarged by more than this factor is counted as upscaled

# kinds of content change, in the order the summary lists them
BIT_DEPTH = "bit depth scaled to 8-bit"
TRANSPARENCY = "transparency composited on the background"
SQUARED = {"pad": "padded to square", "reflect": "reflected to square", "crop": "centre-cropped to square"}
UPSCALED = f"upscaled more than {UPSCALE_NOTED:g}x"
FRAMES = "first frame only"
CHANGE_KINDS = (BIT_DEPTH, TRANSPARENCY, *SQUARED.values(), UPSCALED, FRAMES)

# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose; 1: none)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


class UnusableImage(ValueError):
    """An image Pillow reads whose pixels have no known meaning as 8-bit RGB; str(e) says why."""


# ----------------------------------------------------------------------------------------------------------------
# file names

def path_text(path: str | os.PathLike) -> str:
    """A path as text any UTF-8 writer accepts, from which the exact name comes back (path_from_text): '%' is
    written '%25' and each byte that is not UTF-8 '%XX' (RFC 3986 percent-encoding of just those bytes). Python
    holds such bytes as the lone surrogates U+DC80..U+DCFF of os.fsdecode (PEP 383), which UTF-8 cannot encode.
    e.g. b'caf\\xe9/%1.png' -> 'caf%E9/%251.png'; 'Müller/1.png' stays as it is."""
    s = Path(path).as_posix() if not isinstance(path, str) else path
    return "".join("%25" if c == "%" else f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in s)


def path_from_text(text: str) -> str:
    """The inverse of path_text: the name as Python's os functions take it (os.fsdecode of the exact bytes)."""
    return os.fsdecode(urllib.parse.unquote_to_bytes(text))


# ----------------------------------------------------------------------------------------------------------------
# the entries of a folder

@dataclass
class Scan:
    files: list[Path] = field(default_factory=list)  # image candidates, relative to the folder, each real file once
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path relative to the folder, reason)


def scan(src: Path, exclude: Path | None = None) -> Scan:
    """Every entry under `src`, walked in sorted order: regular files become candidates, each real file once; all
    else is skipped with its reason. Symlinks to files or folders outside `src` are followed (a dataset assembled
    from links); a symlink into `src` is skipped, since what it points to is converted where it lies (no image in
    both splits, no loop). Also skipped: a broken symlink, a FIFO / socket / device, a second hard link to a file
    seen before, a folder that cannot be listed, and `exclude` (the output folder, when it lies inside `src`).
    Folders themselves are containers, not entries."""
    out = Scan()
    root = src.resolve()
    seen: dict[tuple[int, int], Path] = {}  # (device, inode) of files and folders taken -> their path
    st = os.stat(src)
    seen[(st.st_dev, st.st_ino)] = Path(".")
    excluded = None
    if exclude is not None and exclude.is_dir():
        st = os.stat(exclude)
        excluded = (st.st_dev, st.st_ino)

    def unlistable(e: OSError) -> None:
        out.skipped.append((Path(e.filename).relative_to(src), f"folder not readable ({e.strerror})"))

    def reason(path: Path, is_dir: bool) -> tuple[str | None, tuple[int, int] | None]:
        """(why `path` is left out or None, its (device, inode))."""
        try:
            st = os.stat(path)
        except OSError as e:
            if os.path.islink(path):
                return f"broken symlink (to {path_text(os.readlink(path))})", None
            return f"cannot stat it ({e.strerror})", None
        key = (st.st_dev, st.st_ino)
        if key == excluded:
            return "the output folder", key
        if os.path.islink(path) and path.resolve().is_relative_to(root):
            target = path_text(path.resolve().relative_to(root))
            return f"symlink to {target}{'/' if is_dir else ''} in this folder (read where it lies)", key
        if not is_dir and not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({_file_type(st.st_mode)})", key
        if key in seen:
            return f"the same {'folder' if is_dir else 'file'} as {path_text(seen[key])} (taken once)", key
        return None, key

    for folder, dirs, names in os.walk(src, onerror=unlistable, followlinks=True):
        here = Path(folder)
        rel_here = here.relative_to(src)
        kept = []
        for d in sorted(dirs):
            why, key = reason(here / d, is_dir=True)
            if why is None:
                seen[key] = rel_here / d
                kept.append(d)
            else:
                out.skipped.append((rel_here / d, why))
        dirs[:] = kept  # os.walk descends into these only, in this order
        for name in sorted(names):
            why, key = reason(here / name, is_dir=False)
            if why is None:
                seen[key] = rel_here / name
                out.files.append(rel_here / name)
            else:
                out.skipped.append((rel_here / name, why))
    return out


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown type"


# ----------------------------------------------------------------------------------------------------------------
# one image

def load_image(path: str | os.PathLike, size: int, square: str = "pad", background: tuple[int, int, int] = BACKGROUND
               ) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Read an image file (any format Pillow opens) -> (uint8 (size, size, 3) RGB, changes, to_output).

    In order: the first frame (an animation or multi-page file: FRAMES); the EXIF orientation applied (ORIENTATIONS,
    as PIL.ImageOps.exif_transpose); 8-bit RGB by the pixels' meaning: 16-bit values v -> round(v / 257) (0 -> 0,
    65535 -> 255), float pixels in [0, 1] -> x 255, 16-bit colour PNG/TIFF through Pillow, which keeps the high byte
    (BIT_DEPTH); grayscale repeated, palette, CMYK, YCbCr and LAB through Pillow's conversion; transparency (an alpha
    band, or a palette / grey / colour key) composited as rgb * a + background * (1 - a) (TRANSPARENCY); a
    non-square image made square by `square`: "pad" (centred on a square of `background`), "reflect" (mirrored at
    its edges, numpy.pad "reflect") or "crop" (the centre square) (SQUARED); resized with Pillow's bicubic filter
    (antialiased when shrinking), UPSCALED when enlarged by more than UPSCALE_NOTED.

    changes: (kind of CHANGE_KINDS, detail) for each of these that altered the content. to_output: float64 (3, 3),
    the affine map of positions that the orientation, the square and the resize applied: (x, y, 1) in pixels of the
    file as stored -> (x, y, 1) in pixels of the output, both with pixel (i, j) covering [j, j + 1) x [i, i + 1)
    (map_points). Raises UnusableImage (32-bit integer pixels, float pixels outside [0, 1], 16-bit colour PPM), and
    Pillow's errors for a file it cannot read (OSError, ValueError, EOFError, Image.DecompressionBombError)."""
    if square not in SQUARE_RULES:
        raise ValueError(f"square must be one of {SQUARE_RULES}, got {square!r}")
    changes: list[tuple[str, str]] = []
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            changes.append((FRAMES, f"of {frames}"))
        # before loading (which drops the tiles): how many bits the file stores per value
        maxval = max((t.args[1] for t in im.tile if im.format == "PPM" and isinstance(t.args, tuple)
                      and len(t.args) > 1 and isinstance(t.args[1], int)), default=255)  # PGM/PPM white level
        if im.mode == "RGB" and maxval > 255:
            raise UnusableImage("16-bit colour PPM: Pillow reads only the low byte of each value; save it as PNG "
                                "or TIFF")
        wide = maxval > 255 or any(";16" in _rawmode(t.args) for t in im.tile)
        im.load()  # the EXIF of a PNG may follow its pixels
        method = ORIENTATIONS.get(im.getexif().get(ExifTags.Base.Orientation, 1))
        to_output = _transpose_map(method, *im.size)
        if method is not None:
            im = im.transpose(method)  # a copy: keeps mode, info and palette
        rgb, alpha, depth = _to_rgb8(im, wide)
    if depth:
        changes.append((BIT_DEPTH, depth))
    if alpha is not None and alpha.min() < 255:
        a = alpha[..., None] / 255.0  # (h, w, 1)
        rgb = np.round(rgb * a + np.asarray(background, np.float64) * (1.0 - a)).astype(np.uint8)
        changes.append((TRANSPARENCY, f"{(alpha < 255).mean():.0%} of pixels not opaque"))
    h, w = rgb.shape[:2]
    if h != w:
        _, top, left = _square_box(h, w, square)
        rgb = _square(rgb, square, background)
        to_output = np.array([[1, 0, left], [0, 1, top], [0, 0, 1]]) @ to_output
        changes.append((SQUARED[square], f"{w}x{h}"))
    side = rgb.shape[0]
    if size / side > UPSCALE_NOTED:
        changes.append((UPSCALED, f"{size / side:.1f}x"))
    if side != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
        # Pillow's output pixel centre x + 0.5 samples the input at (x + 0.5) * side / size: a plain scaling
        to_output = np.diag([size / side, size / side, 1.0]) @ to_output
    return rgb, changes, to_output


def map_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Points (K, 2) of (x, y) through an affine map (3, 3) acting on (x, y, 1) -> float64 (K, 2)."""
    return points @ affine[:2, :2].T + affine[:2, 2]


def _transpose_map(method: Image.Transpose | None, w: int, h: int) -> np.ndarray:
    """The affine map (3, 3) of positions that Image.transpose(method) applies to a w x h image (None: the identity),
    in pixel coordinates with pixel (i, j) covering [j, j + 1) x [i, i + 1)."""
    t = Image.Transpose
    rows = {None: ((1, 0, 0), (0, 1, 0)),
            t.FLIP_LEFT_RIGHT: ((-1, 0, w), (0, 1, 0)),
            t.ROTATE_180: ((-1, 0, w), (0, -1, h)),
            t.FLIP_TOP_BOTTOM: ((1, 0, 0), (0, -1, h)),
            t.TRANSPOSE: ((0, 1, 0), (1, 0, 0)),
            t.ROTATE_270: ((0, -1, h), (1, 0, 0)),  # clockwise: the top-left corner goes to the top right
            t.TRANSVERSE: ((0, -1, h), (-1, 0, w)),
            t.ROTATE_90: ((0, 1, 0), (-1, 0, w))}[method]  # anticlockwise: the top-left corner goes to the bottom left
    return np.array([*rows, (0, 0, 1)], np.float64)


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """The landmarks of an iBUG .pts file (version 1, as the in-the-wild ear collections ship: 55 points per ear) ->
    float64 (K, 2): (x, y) in pixels of the photo as stored (before its EXIF orientation), with pixel (i, j) covering
    [j, j + 1) x [i, i + 1).

    The file: `version: 1`, `n_points: K`, `{`, K lines `x y`, `}`. Its coordinates are 1-based pixel centres, the
    centre of the top-left pixel being (1, 1): menpo, iBUG's own reader (menpo.io.input.landmark.pts_importer),
    subtracts 1 to get 0-based pixel centres (https://github.com/menpo/menpo). Here the centre of that pixel is
    (0.5, 0.5), so x - 0.5, y - 0.5.

    Raises ValueError naming the line and the reason for: a file that is not text, no or another version than 1,
    no n_points or n_points 0, no `{` or `}`, text after the `}`, a point line that is not two numbers, a coordinate
    that is not finite, a count of points other than n_points. A UTF-8 byte-order mark is read as none. OSError when
    the file cannot be read."""
    try:
        lines = Path(path).read_bytes().decode("utf-8-sig").splitlines()  # -sig: a byte-order mark is dropped
    except UnicodeDecodeError:
        raise ValueError("not a text file (an iBUG .pts is `version: 1`, `n_points: K`, `{`, K lines `x y`, `}`)"
                         ) from None
    numbered = [(k, line.strip()) for k, line in enumerate(lines, start=1) if line.strip()]
    header: dict[str, str] = {}
    while numbered and numbered[0][1] != "{":
        k, line = numbered.pop(0)
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"line {k}: {line[:40]!r} is not a `key: value` header line before `{{`")
        header[key.strip()] = value.strip()
    if header.get("version") != "1":
        raise ValueError(f"version {header.get('version', '(none)')!r}, expected `version: 1` before `{{`")
    if not header.get("n_points", "").isdigit() or int(header["n_points"]) == 0:
        raise ValueError(f"n_points {header.get('n_points', '(none)')!r}, expected `n_points: K` (K >= 1) before "
                         f"`{{`")
    if not numbered:
        raise ValueError("no `{` opening the points")
    end = next((i for i, (_, line) in enumerate(numbered) if line == "}"), None)
    if end is None:
        raise ValueError("no `}` closing the points (a truncated file?)")
    if end + 1 < len(numbered):
        k, line = numbered[end + 1]
        raise ValueError(f"line {k}: {line[:40]!r} after the `}}` that closes the points (line {numbered[end][0]})")
    body = numbered[1:end]  # (line number, 'x y')
    points = np.empty((len(body), 2))
    for row, (k, line) in enumerate(body):
        try:
            x, y = (float(v) for v in line.split())  # ValueError: not a number, or not two
        except ValueError:
            raise ValueError(f"line {k}: {line[:40]!r} is not two numbers `x y`") from None
        points[row] = x, y
        if not np.isfinite(points[row]).all():
            raise ValueError(f"line {k}: {line[:40]!r} is not a finite point")
    if len(points) != int(header["n_points"]):
        raise ValueError(f"{len(points)} points between `{{` and `}}`, but n_points: {header['n_points']}")
    return points - 0.5


def _rawmode(args: object) -> str:
    """The raw mode of a Pillow tile's decoder arguments ('' when it names none)."""
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _to_rgb8(im: Image.Image, wide: bool) -> tuple[np.ndarray, np.ndarray | None, str]:
    """-> (uint8 (h, w, 3), uint8 alpha (h, w) or None, what happened to the bit depth ('' if nothing)).
    wide: the file stores more than 8 bits per value (Pillow's raw mode or the PGM white level says so)."""
    if im.mode == "F":
        x = np.asarray(im, np.float64)
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        if not np.isfinite(x).all() or lo < 0 or hi > 1:
            raise UnusableImage(f"float pixels {lo:g}..{hi:g} (or not finite): only [0, 1] has a known meaning")
        g = np.round(x * 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), None, "32-bit float x 255"
    if im.mode == "I" or im.mode.startswith("I;16"):
        x = np.asarray(im).astype(np.int64)  # I;16 (PNG, TIFF) and 16-bit PGM (mode I, scaled by Pillow to 65535)
        if not (im.mode.startswith("I;16") or wide):
            raise UnusableImage(f"32-bit integer pixels ({x.min()}..{x.max()}): no known white level; save it as "
                                f"8- or 16-bit")
        if x.min() < 0 or x.max() > 65535:
            raise UnusableImage(f"integer pixels {x.min()}..{x.max()}, outside 16-bit 0..65535: no known black and "
                                f"white levels")
        g = np.round(x / 257.0).astype(np.uint8)  # (h, w)
        key = im.info.get("transparency")
        alpha = None if key is None else np.where(x == key, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), alpha, "16-bit / 257"
    depth = "16-bit: high byte (Pillow)" if wide else ""
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))  # palette / grey / colour keys and premultiplied alpha resolved
        return rgba[..., :3], rgba[..., 3], depth
    return np.asarray(im.convert("RGB")), None, depth


def _square(rgb: np.ndarray, rule: str, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 (h, w, 3) -> (s, s, 3), placed by _square_box: "pad" centres it on `background`, "reflect" mirrors its
    edges outwards, "crop" keeps the centre."""
    h, w = rgb.shape[:2]
    s, top, left = _square_box(h, w, rule)
    if rule == "crop":
        return rgb[-top:s - top, -left:s - left]
    if rule == "reflect":
        return np.pad(rgb, ((top, s - h - top), (left, s - w - left), (0, 0)), mode="reflect")
    out = np.empty((s, s, 3), np.uint8)
    out[:] = background
    out[top:top + h, left:left + w] = rgb
    return out


def _square_box(h: int, w: int, rule: str) -> tuple[int, int, int]:
    """(side s, top, left) of the square made of an h x w image: the image's top-left corner lands at (left, top) of
    the square (negative for "crop", which keeps the centre: s = min(h, w); else s = max(h, w))."""
    if rule == "crop":
        s = min(h, w)
        return s, -((h - s) // 2), -((w - s) // 2)
    s = max(h, w)
    return s, (s - h) // 2, (s - w) // 2


# ----------------------------------------------------------------------------------------------------------------
# subjects and the split

def subject_of(rel: Path, depth: int = 1) -> str:
    """The subject of an image at `rel` (relative to the converted folder): its first `depth` folder levels, as
    path_text ('s09' for s09/left/x.jpg at depth 1; 'site/s09' at depth 2); '' (unlabelled) when the image lies
    fewer than `depth` folders deep."""
    folders = rel.parts[:-1]
    return path_text("/".join(folders[:depth])) if len(folders) >= depth else ""


def split_groups(keys: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Train/val by group: images with the same key go to the same split. -> bool (N,), True = val.

    Groups are ordered by a seeded hash of their key (blake2b), so the split depends on the keys and the seed, not
    on the order of the list. The number of val images is the one closest to val_fraction * N (ties: fewer) among
    the totals some set of whole groups reaches, with at least one image in each split: an exact subset-sum over
    the groups of 2+ images (a bitset of reachable sums per suffix, https://en.wikipedia.org/wiki/Subset_sum_problem),
    topped up with single-image groups. Among the sets that reach it, groups earlier in hash order go to val first.
    Raises ValueError when fewer than 2 groups exist."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    if len(groups) < 2:
        raise ValueError(f"{len(groups)} group(s): a split needs at least 2")
    order = sorted(groups, key=lambda k: hashlib.blake2b(f"{seed}\0{k}".encode("utf-8", "surrogatepass"),
                                                         digest_size=16).digest())
    multi, single = [k for k in order if len(groups[k]) > 1], [k for k in order if len(groups[k]) == 1]
    n = len(keys)
    full = (1 << (n + 1)) - 1
    suffix = [1] * (len(multi) + 1)  # suffix[i]: bit s set <=> some subset of multi[i:] holds s images
    for i in range(len(multi) - 1, -1, -1):
        suffix[i] = (suffix[i + 1] | (suffix[i + 1] << len(groups[multi[i]]))) & full
    reach = np.unpackbits(np.frombuffer(suffix[0].to_bytes((n + 8) // 8, "little"), np.uint8),
                          bitorder="little")[:n + 1].astype(bool)  # (n + 1,)
    # totals reachable with up to len(single) single images on top: a window over reach
    c = np.concatenate([[0], np.cumsum(reach)])  # c[t + 1] = reachable sums <= t
    t_all = np.arange(n + 1)
    total_ok = c[t_all + 1] - c[np.maximum(t_all - len(single), 0)] > 0
    total_ok[[0, n]] = False  # both splits non-empty
    if not total_ok.any():
        raise ValueError("no split leaves images in both train and val")
    candidates = np.flatnonzero(total_ok)
    t = int(candidates[np.argmin(np.abs(candidates - val_fraction * n) + 1e-9 * candidates)])  # ties: fewer
    s = int(np.flatnonzero(reach[max(t - len(single), 0):t + 1])[-1]) + max(t - len(single), 0)  # most by subjects
    val = np.zeros(n, bool)
    for i, k in enumerate(multi):  # the hash-order-first subset of multi summing to s
        size = len(groups[k])
        if size <= s and (suffix[i + 1] >> (s - size)) & 1:
            val[groups[k]] = True
            s -= size
    for k in single[:t - int(val.sum())]:
        val[groups[k]] = True
    return val
