"""Tests for `data.py convert` on real photo folders (photos.py): every pixel format brought to 8-bit RGB by its
meaning, every skipped entry named, non-UTF-8 names kept, subject-disjoint splits, output folders that never mix
datasets; iBUG .pts landmarks moving with the pixels (EXIF orientation, squaring, resize) into the landmarks CSV,
bad ones named; `check` naming bad samples; eval / eigenears honouring the run's --max-invalid and warning about
identities seen in training; every writing command checking its output location first."""
import csv
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import eigenears as eg
import eval as ev
import synth
import train
from conftest import ROOT, assert_one_line_error
from data import main, read_landmarks
from errors import DataError, TrainingError
from photos import BACKGROUND, UPSCALED, load_image, map_points, path_from_text, path_text, read_pts, split_groups
from checkpoints import read_checkpoint


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def run_main(argv: list[str], capsys) -> SimpleNamespace:
    """data.main(argv) in this process (no interpreter start-up), as a completed process: returncode, stdout,
    stderr."""
    code = main(argv)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rows_by_path(out: Path) -> dict[str, tuple[np.ndarray, dict[str, str]]]:
    """{index path: (the converted image, its index row)} over both splits of a convert output."""
    found = {}
    for split in ("train", "val"):
        npy = np.load(out / f"{split}_teacher.npy")
        for r in read_csv(out / f"{split}_index.csv"):
            found[r["path"]] = (npy[int(r["index"])], r)
    return found


# ---------------------------------------------------------------------------------------------------------------
# pixel formats

def test_16_bit_ramp_is_scaled_not_clipped(tmp_path):
    k = np.arange(256).reshape(16, 16)
    ramp = np.clip(k * 257 + (k % 7 - 3) * 40, 0, 65535).astype(np.uint16)  # every 8-bit level, off by up to 120
    expected = np.round(ramp / 257.0).astype(np.uint8)  # 65535 -> 255; 257 k + r -> k for |r| < 128.5
    assert expected.min() == 0 and expected.max() == 255 and len(np.unique(expected)) == 256
    for name in ("ramp.png", "ramp.tif"):
        Image.fromarray(ramp).save(tmp_path / name)  # mode I;16: 16-bit grayscale PNG and TIFF
        assert Image.open(tmp_path / name).mode == "I;16"
        image, changes, _ = load_image(tmp_path / name, 16)  # 16 x 16: no resize
        for c in range(3):
            np.testing.assert_array_equal(image[..., c], expected)
        assert changes == [("bit depth scaled to 8-bit", "16-bit / 257")]


def test_float_tiff_in_unit_range_is_scaled_and_other_ranges_are_refused(tmp_path):
    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(x).save(tmp_path / "f.tif")
    image, _, _ = load_image(tmp_path / "f.tif", 8)
    np.testing.assert_array_equal(image[..., 1], np.round(x.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(x * 4000).save(tmp_path / "g.tif")
    with pytest.raises(ValueError, match=r"float pixels 0\.\.4000"):
        load_image(tmp_path / "g.tif", 8)


def test_transparency_is_composited_on_the_stated_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:] = (200, 50, 10, 255)  # right half opaque
    rgba[:, 3] = (200, 50, 10, 128)  # one column half transparent
    rgba[:, :3, :3] = (255, 255, 255)  # left columns: white under alpha 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    bg = np.array((0, 255, 0), np.float64)
    a = rgba[..., 3:] / 255.0
    expected = np.round(rgba[..., :3] * a + bg * (1 - a)).astype(np.uint8)
    image, changes, _ = load_image(tmp_path / "rgba.png", 8, background=(0, 255, 0))
    np.testing.assert_array_equal(image, expected)
    assert changes == [("transparency composited on the background", "50% of pixels not opaque")]

    # a palette PNG whose index 1 is transparent (tRNS): that band becomes the background, the rest its colours
    p = Image.new("P", (8, 8))
    p.putpalette([10, 20, 30, 250, 0, 0, 0, 0, 250])
    p.putdata([1 if y < 2 else 2 for y in range(8) for _ in range(8)])
    p.save(tmp_path / "palette.png", transparency=1)
    image, _, _ = load_image(tmp_path / "palette.png", 8)
    assert (image[:2] == BACKGROUND).all() and (image[2:] == (0, 0, 250)).all()


@pytest.mark.parametrize("mode, fmt", [("1", "png"), ("L", "png"), ("P", "gif"), ("CMYK", "tif"), ("LA", "png"),
                                       ("RGB", "bmp"), ("RGB", "webp"), ("YCbCr", "jpg")])
def test_8_bit_modes_convert_as_pillow_defines_them(tmp_path, mode, fmt):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"x.{fmt}"
    src.save(path, **({"lossless": True} if fmt == "webp" else {"quality": 100} if fmt == "jpg" else {}))
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))  # Pillow's own meaning of the mode (LA: alpha 255, nothing to blend)
    image, changes, _ = load_image(path, 12)
    np.testing.assert_array_equal(image, expected)
    assert changes == []


def test_animation_keeps_the_first_frame_and_says_so(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    image, changes, _ = load_image(tmp_path / "a.gif", 8)
    assert (image == (255, 0, 0)).all()
    assert changes == [("first frame only", "of 2")]


def test_square_rules_pad_reflect_crop_keep_the_image_and_invent_nothing(tmp_path):
    rng = np.random.default_rng(1)
    portrait = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)  # 20 wide, 40 high: an ear crop's 1:2
    Image.fromarray(portrait).save(tmp_path / "p.png")
    pad, changes, _ = load_image(tmp_path / "p.png", 40, "pad")
    np.testing.assert_array_equal(pad[:, 10:30], portrait)  # the whole crop, centred, untouched
    assert (pad[:, :10] == BACKGROUND).all() and (pad[:, 30:] == BACKGROUND).all()
    assert changes == [("padded to square", "20x40")]
    reflect, _, _ = load_image(tmp_path / "p.png", 40, "reflect")
    np.testing.assert_array_equal(reflect[:, 10:30], portrait)
    np.testing.assert_array_equal(reflect[:, 9::-1], portrait[:, 1:11])  # mirrored about the edge column
    crop, changes, _ = load_image(tmp_path / "p.png", 20, "crop")
    np.testing.assert_array_equal(crop, portrait[10:30])
    assert changes == [("centre-cropped to square", "20x40")]
    tiny = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))  # 8 x 6: 16x to 128
    tiny.save(tmp_path / "tiny.png")
    assert (UPSCALED, "16.0x") in load_image(tmp_path / "tiny.png", 128)[1]


# ---------------------------------------------------------------------------------------------------------------
# landmarks: iBUG .pts carried through every change to the pixels

def save_oriented(path: Path, pixels: np.ndarray, orientation: int) -> None:
    """A PNG of uint8 (h, w, 3) pixels as stored, with the EXIF orientation tag (1..8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def write_pts(path: Path, points: list[tuple[float, float]]) -> None:
    """An iBUG .pts file of (x, y) points, as written: 1-based pixel centres."""
    path.write_text(f"version: 1\nn_points: {len(points)}\n{{\n"
                    + "".join(f"{x:g} {y:g}\n" for x, y in points) + "}\n")


@pytest.mark.parametrize("square", ["pad", "reflect", "crop"])
def test_the_map_load_image_returns_moves_points_with_the_pixels_in_all_8_orientations(tmp_path, square):
    stored = np.zeros((10, 6, 3), np.uint8)  # 6 wide, 10 high as stored
    dots = [(1, 2), (4, 7), (3, 0), (0, 9)]  # (column, row) of single bright pixels
    for c, r in dots:
        stored[r, c] = 255
    centres = np.array(dots) + 0.5  # (x, y) of their centres, pixel (i, j) covering [j, j + 1) x [i, i + 1)
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.png"
        save_oriented(path, stored, orientation)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(path)))  # Pillow's reading of the tag
        side = 6 if square == "crop" else 10
        out, _, to_output = load_image(path, side, square, background=(0, 0, 0))  # no resize: pixels stay exact
        if square == "pad":
            h, w = upright.shape[:2]
            np.testing.assert_array_equal(out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w],
                                          upright)  # the pixel path is Pillow's exif_transpose
        placed = map_points(centres, to_output)  # (4, 2)
        assert (placed % 1 == 0.5).all()  # pixel centres go to pixel centres
        inside = ((placed >= 0) & (placed < side)).all(axis=1)
        assert inside.sum() >= (2 if square == "crop" else 4)
        cols, rows = placed[inside].astype(int).T
        assert (out[rows, cols] == 255).all(), orientation  # each point where its bright pixel went
        if square != "reflect":  # reflect mirrors the dots: more bright pixels than points
            assert (out[..., 0] == 255).sum() == inside.sum(), orientation


def test_pts_points_follow_rotation_padding_and_resize_into_the_landmarks_csv(tmp_path, capsys):
    src = tmp_path / "ears"
    (src / "s1").mkdir(parents=True)
    (src / "s2").mkdir()
    # s1/a: stored 384 wide x 192 high, EXIF 6 (shown turned 90 degrees clockwise: 192 x 384), padded by 96 columns
    # on each side to 384 x 384, shrunk 3x to 128
    a = np.zeros((192, 384, 3), np.uint8)
    dots_a = [(10, 4), (190, 100), (370, 190)]  # (column, row) as stored
    for c, r in dots_a:
        a[r, c] = 255
    save_oriented(src / "s1" / "a.png", a, 6)
    write_pts(src / "s1" / "a.pts", [(c + 1, r + 1) for c, r in dots_a])  # iBUG: 1-based pixel centres
    # by hand: centre (c + 0.5, r + 0.5) -> turned clockwise in a 192-high image (192 - (r + 0.5), c + 0.5) -> + 96
    # columns -> / 3
    expected_a = [((288 - r - 0.5) / 3, (c + 0.5) / 3) for c, r in dots_a]
    assert expected_a == [(94.5, 3.5), (62.5, 63.5), (32.5, 123.5)]
    b = np.zeros((128, 128, 3), np.uint8)  # s2/b: already 128 px, upright: points stay
    dots_b = [(0, 0), (127, 5), (60, 127)]
    for c, r in dots_b:
        b[r, c] = 255
    Image.fromarray(b).save(src / "s2" / "b.png")
    write_pts(src / "s2" / "b.pts", [(c + 1, r + 1) for c, r in dots_b])
    write_pts(src / "s2" / "lost.pts", dots_b)  # no image of that name
    expected_b = [(c + 0.5, r + 0.5) for c, r in dots_b]

    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--background", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 .pts landmark files read" in out and "landmarks: 3 points per image" in out
    assert read_csv(tmp_path / "out" / "skipped.csv") == [  # used .pts are not skipped entries; the lost one is
        {"path": "s2/lost.pts", "reason": "landmarks (.pts) of no converted image (none of the same name beside it, or "
                                          "it is skipped)"}]
    for split in ("train", "val"):
        npy = tmp_path / "out" / f"{split}_teacher.npy"
        names, points = read_landmarks(npy)  # the CSV round-trips through the reader
        assert names == ["p1", "p2", "p3"]
        images = np.load(npy)
        for row in read_csv(tmp_path / "out" / f"{split}_index.csv"):
            i = int(row["index"])
            expected = {"s1/a.png": expected_a, "s2/b.png": expected_b}[row["path"]]
            np.testing.assert_array_equal(points[i], np.float32(expected))
            brightest = np.argsort(images[i, ..., 0], axis=None)[-3:]  # the 3 brightest output pixels
            assert sorted(zip(*np.unravel_index(brightest, (128, 128)))) == sorted(
                (int(y), int(x)) for x, y in points[i])  # (row, column) of the pixel each point lies in


PTS_FAULTS = {  # case -> (content of s2/b.pts, fragment of the one-line error)
    "no brace": ("version: 1\nn_points: 3\n1 1\n2 2\n3 3\n", "line 3: '1 1' is not a `key: value` header line"),
    "not numbers": ("version: 1\nn_points: 3\n{\n1 1\n2 two\n3 3\n}\n", "line 5: '2 two' is not two numbers"),
    "nan": ("version: 1\nn_points: 3\n{\n1 1\nnan 2\n3 3\n}\n", "line 5: 'nan 2' is not a finite point"),
    "truncated": ("version: 1\nn_points: 3\n{\n1 1\n2 2\n", "no `}` closing the points"),
    "count": ("version: 1\nn_points: 2\n{\n1 1\n2 2\n}\n", "2 points, but s1/a.pts (the first .pts) has 3"),
    "short": ("version: 1\nn_points: 3\n{\n1 1\n2 2\n}\n", "2 points between `{` and `}`, but n_points: 3"),
    "text after": ("version: 1\nn_points: 3\n{\n1 1\n2 2\n3 3\n}\n# by hand\n",
                   "line 8: '# by hand' after the `}` that closes the points (line 7)"),
    "no points": ("version: 1\nn_points: 0\n{\n}\n", "n_points '0', expected `n_points: K` (K >= 1)"),
}


@pytest.mark.parametrize("case", PTS_FAULTS)
def test_a_bad_pts_is_a_one_line_error_naming_it(tmp_path, capsys, case):
    src = tmp_path / "ears"
    for s in ("s1", "s2"):
        (src / s).mkdir(parents=True)
    for rel in ("s1/a", "s2/b"):
        Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(src / f"{rel}.png")
    write_pts(src / "s1" / "a.pts", [(1, 1), (2, 2), (3, 3)])
    content, fragment = PTS_FAULTS[case]
    (src / "s2" / "b.pts").write_text(content)
    assert_one_line_error(run_main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "8"], capsys),
                          f"{src}/s2/b.pts: ", fragment)
    assert not (tmp_path / "out").exists()


def assert_last_line_error(proc: SimpleNamespace, *fragments: str) -> None:
    """A CLI failure found after the images were read: exit 1, no traceback, the progress lines, then one line
    'error: ...' holding each fragment."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), (fragments, last)
    assert sum(line.startswith("error") for line in proc.stderr.splitlines()) == 1


def test_images_without_pts_among_images_with_them_and_points_cut_off_are_named(tmp_path, capsys):
    src = tmp_path / "ears"
    for s in ("s1", "s2", "s3"):
        (src / s).mkdir(parents=True)
        Image.fromarray(np.full((20, 10, 3), 99, np.uint8)).save(src / s / "x.png")  # 10 wide, 20 high
    write_pts(src / "s1" / "x.pts", [(5, 1), (5, 20)])  # the top and bottom rows' centres
    write_pts(src / "s3" / "x.pts", [(5, 10), (5, 11)])
    assert_last_line_error(run_main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "8"], capsys),
                          f"{src}/s2/x.png: no landmarks s2/x.pts beside it, while 2 of the 3 images have theirs")
    write_pts(src / "s2" / "x.pts", [(5, 10), (5, 11)])
    # --square crop keeps rows 5..14: s1's top point (4.5, 0.5) goes to (4.5, -4.5) of 10 px, (57.6, -57.6) at 128
    assert_last_line_error(run_main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "8", "--square",
                                    "crop"], capsys),
                          f"{src}/s1/x.pts: point p1 lands at (57.6, -57.6), outside the 128 px crop of s1/x.png "
                          f"after --square crop (1 of 3 images have points outside it); --square pad keeps the whole")
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "8"]) == 0  # pad: all inside
    names, points = read_landmarks(tmp_path / "out" / "train_teacher.npy")
    assert names == ["p1", "p2"] and ((points >= 0) & (points <= 128)).all()
    Image.fromarray(np.full((20, 10, 3), 99, np.uint8)).save(src / "s3" / "x.jpg")  # x.pts would be whose?
    assert_last_line_error(run_main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "8", "--force"],
                                    capsys), f"{src}/s3/x.pts: the landmarks of two images (s3/x.jpg, s3/x.png)")


def test_read_pts_takes_ibug_one_based_pixel_centres(tmp_path):
    write_pts(tmp_path / "a.pts", [(1, 1), (10.25, 3)])
    np.testing.assert_array_equal(read_pts(tmp_path / "a.pts"), [[0.5, 0.5], [9.75, 2.5]])
    (tmp_path / "b.pts").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.pts").read_bytes())  # a UTF-8 byte-order mark
    np.testing.assert_array_equal(read_pts(tmp_path / "b.pts"), [[0.5, 0.5], [9.75, 2.5]])


def test_an_upper_case_pts_pairs_with_its_image_and_two_of_one_name_are_refused(tmp_path, capsys):
    src = tmp_path / "ears"
    for s in ("s1", "s2"):
        (src / s).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(src / s / "x.png")
    write_pts(src / "s1" / "x.PTS", [(1, 1), (8, 8)])
    write_pts(src / "s2" / "x.pts", [(2, 2), (7, 7)])
    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "8"]) == 0
    assert "2 .pts landmark files read" in capsys.readouterr().out
    assert not (tmp_path / "out" / "skipped.csv").read_text().strip().splitlines()[1:]  # nothing skipped
    write_pts(src / "s2" / "x.Pts", [(2, 2), (7, 7)])
    assert_last_line_error(run_main(["convert", str(src), "--out", str(tmp_path / "out2"), "--size", "8"], capsys),
                           f"{src}/s2/x.pts: a second landmarks file beside s2/x.Pts; one .pts per image")


# ---------------------------------------------------------------------------------------------------------------
# the folder: names, skipped entries, output folders

def test_non_utf8_names_round_trip_through_the_index(tmp_path):
    src = tmp_path / "photos"
    (src / "s1").mkdir(parents=True)
    names = [b"s1/\xff\xfe.png", "s1/Müller 50%.png".encode(), b"s1/plain.png", b"caf\xe9.png"]
    rng = np.random.default_rng(2)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.fsdecode(bytes(src) + b"/" + name),
                                                                              format="PNG")
    proc = run_cli("convert", "photos", "--out", "out", "--size", "8", cwd=tmp_path)  # the console prints them too
    assert proc.returncode == 0, proc.stderr
    found = rows_by_path(tmp_path / "out")
    assert sorted(found) == sorted(["s1/%FF%FE.png", "s1/Müller 50%25.png", "s1/plain.png", "caf%E9.png"])
    for text, (image, row) in found.items():
        raw = os.fsencode(path_from_text(text))
        assert raw in names
        np.testing.assert_array_equal(image, np.asarray(Image.open(os.fsdecode(bytes(src) + b"/" + raw))))
        assert row["subject"] == ("s1" if raw.startswith(b"s1/") else "")
    assert path_text(os.fsdecode(b"a%\xff")) == "a%25%FF"


def test_every_entry_is_converted_or_named_with_its_reason(tmp_path):
    src = tmp_path / "photos"
    (src / "s1").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    rng = np.random.default_rng(3)
    for p in (src / "s1" / "a.png", src / "s1" / "b.png", outside / "c.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
    (src / "broken.png").symlink_to("nowhere.png")
    (src / "inside.png").symlink_to(src / "s1" / "a.png")
    (src / "s1" / "loop").symlink_to(src)
    (src / "s2").symlink_to(outside)  # a subject folder linked from elsewhere: followed
    os.link(src / "s1" / "b.png", src / "s1" / "hard.png")
    os.mkfifo(src / "pipe")
    (src / "notes.txt").write_text("hi")
    Image.fromarray(np.zeros((4, 4), np.int32)).save(src / "deep.tif")  # 32-bit integers: no known white level

    assert main(["convert", str(src), "--out", str(src / "out"), "--size", "8", "--split-by", "image"]) == 0
    assert sorted(rows_by_path(src / "out")) == ["s1/a.png", "s1/b.png", "s2/c.png"]
    skipped = {r["path"]: r["reason"] for r in read_csv(src / "out" / "skipped.csv")}
    assert skipped == {
        "broken.png": "broken symlink (to nowhere.png)",
        "inside.png": "symlink to s1/a.png in this folder (read where it lies)",
        "s1/loop": "symlink to ./ in this folder (read where it lies)",
        "s1/hard.png": "the same file as s1/b.png (taken once)",
        "pipe": "not a regular file (FIFO)",
        "notes.txt": "not an image Pillow can read",
        "deep.tif": "32-bit integer pixels (0..0): no known white level; save it as 8- or 16-bit"}
    # run again: the output folder inside photos/ is named, not read; the earlier set is replaced (--force)
    assert main(["convert", str(src), "--out", str(src / "out"), "--size", "8", "--force"]) == 0
    assert {"path": "out", "reason": "the output folder"} in read_csv(src / "out" / "skipped.csv")


def test_only_bad_entries_is_a_one_line_error_counting_every_entry(tmp_path, capsys):
    src = tmp_path / "junk"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_text("not a jpeg")
    (src / "gone.png").symlink_to("missing.png")
    (src / "x.txt").write_text("x")
    proc = run_main(["convert", str(src), "--out", str(tmp_path / "out")], capsys)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {src}: 0 usable images (7 of 7 entries skipped); need at least 2"
    assert "skipped gone.png: broken symlink (to missing.png)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_fails_in_one_line_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "mu.npy").mkdir()
    assert_one_line_error(run_main(["convert", str(tmp_path / "photos"), "--out", str(taken)], capsys),
                          f"--out {taken}: exists and is not a folder")
    assert_one_line_error(run_main(["convert", str(tmp_path / "photos"), "--out", str(taken / "sub")], capsys),
                          f"--out {taken}/sub: {taken} is not a folder")
    for script_main, argv in ((synth.main, ["--out", str(taken)]),
                              (ev.main, ["missing.pt", "--out", str(taken)]),
                              (ev.main, ["missing.pt", "--export-latents", str(tmp_path / "mu.npy")]),
                              (eg.main, ["--ckpt", "missing.pt", "--out", str(taken)])):
        with pytest.raises(SystemExit) as e:  # parser errors: before the checkpoint is even read
            script_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{taken}: exists and is not a folder" in err or "mu.npy: is a folder, expected a file name" in err
    with pytest.raises(TrainingError, match=f"--log-dir {taken}: exists and is not a folder"):
        train.main(["--log-dir", str(taken), "--tiny", "--no-pretrained"])
    assert taken.read_text() == "mine\n"


def test_a_folder_never_mixes_two_datasets(tmp_path, capsys):
    src = tmp_path / "photos"
    for i in range(4):
        (src / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i + 20, np.uint8)).save(src / f"s{i % 2}" / f"{i}.png")
    (src / "s0" / "junk.txt").write_text("x")
    out = tmp_path / "data"
    assert synth.main(["--out", str(out), "--n-train", "4", "--n-val", "2"]) == 0
    capsys.readouterr()
    assert_one_line_error(run_main(["convert", str(src), "--out", str(out)], capsys),
                          "train_teacher.npy: already exists", "train_factors.csv", "--force")
    assert main(["convert", str(src), "--out", str(out), "--size", "16", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["skipped.csv", "train_index.csv", "train_teacher.npy",
                                                     "val_index.csv", "val_teacher.npy"]  # no stale factors CSV
    assert ("removed the earlier dataset's train_factors.csv, train_landmarks.csv, train_masks.npy, "
            "val_factors.csv, val_landmarks.csv, val_masks.npy (--force)") in capsys.readouterr().out
    assert synth.main(["--out", str(out), "--n-train", "4", "--n-val", "2"]) == 1  # refused
    assert synth.main(["--out", str(out), "--n-train", "4", "--n-val", "2", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train_factors.csv", "train_landmarks.csv", "train_masks.npy",
                                                     "train_teacher.npy", "val_factors.csv", "val_landmarks.csv",
                                                     "val_masks.npy", "val_teacher.npy"]


# ---------------------------------------------------------------------------------------------------------------
# subjects and the split

def brute_force_best(sizes: list[int], fraction: float) -> float:
    """The smallest |val images - fraction * N| over all splits of whole groups with both sides non-empty."""
    n = sum(sizes)
    sums = {sum(c) for r in range(1, len(sizes)) for c in itertools.combinations(sizes, r)}
    return min(abs(s - fraction * n) for s in sums if 0 < s < n)


def test_split_groups_keeps_groups_whole_and_meets_the_fraction_as_closely_as_possible():
    rng = np.random.default_rng(4)
    for trial in range(30):
        sizes = rng.integers(1, 9, rng.integers(2, 9)).tolist()
        keys = [f"g{g}" for g, size in enumerate(sizes) for _ in range(size)]
        fraction = float(rng.uniform(0.05, 0.6))
        val = split_groups(keys, fraction, seed=trial)
        for g in range(len(sizes)):
            assert len({val[i] for i, k in enumerate(keys) if k == f"g{g}"}) == 1  # wholly in one split
        assert abs(val.sum() - fraction * len(keys)) == pytest.approx(brute_force_best(sizes, fraction))
        order = rng.permutation(len(keys))  # the split depends on the keys, not their order
        np.testing.assert_array_equal(split_groups([keys[i] for i in order], fraction, seed=trial), val[order])


def test_convert_splits_by_subject_the_first_folder_level(tmp_path, capsys):
    src = tmp_path / "ears"
    sizes = {"s1": 5, "s2": 3, "s3": 4, "s4": 2, "s5": 6, "s6": 1}
    rng = np.random.default_rng(5)
    for s, n in sizes.items():
        for i in range(n):
            side = ("left", "right")[i % 2]  # nested: s1/left/0.png and s1/right/1.png are one subject
            (src / s / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / s / side / f"{i}.png")
    assert main(["convert", str(src), "--out", str(tmp_path / "a"), "--size", "8", "--val-fraction", "0.3"]) == 0
    out = capsys.readouterr()
    assert "6 subjects (folders at --subject-depth 1), 0 images without one" in out.out
    assert "split by subject (default)" in out.out
    train_s = {r["subject"] for r in read_csv(tmp_path / "a" / "train_index.csv")}
    val_s = {r["subject"] for r in read_csv(tmp_path / "a" / "val_index.csv")}
    assert train_s | val_s == set(sizes) and not train_s & val_s  # subject-disjoint
    n_val = len(read_csv(tmp_path / "a" / "val_index.csv"))
    assert abs(n_val - 0.3 * 21) == pytest.approx(brute_force_best(list(sizes.values()), 0.3))
    assert "warning" not in out.err

    # split by image: subjects leak, and convert says how many
    assert main(["convert", str(src), "--out", str(tmp_path / "b"), "--size", "8", "--split-by", "image"]) == 0
    train_s = {r["subject"] for r in read_csv(tmp_path / "b" / "train_index.csv")}
    val_s = {r["subject"] for r in read_csv(tmp_path / "b" / "val_index.csv")}
    shared = val_s & train_s
    assert shared  # 4 of 21 images by image: some subject of 2+ images is split (this seed)
    assert f"warning: {len(shared)} of {len(val_s)} val subjects also have images in train" in capsys.readouterr().err

    # --subject-depth 2: s1/left and s1/right are two subjects
    assert main(["convert", str(src), "--out", str(tmp_path / "c"), "--size", "8", "--subject-depth", "2"]) == 0
    subjects = {r["subject"] for split in ("train", "val") for r in read_csv(tmp_path / "c" / f"{split}_index.csv")}
    assert subjects == {f"{s}/{side}" for s, n in sizes.items() for side in ("left", "right")[:min(n, 2)]}


# ---------------------------------------------------------------------------------------------------------------
# check, eval and eigenears on a converted set

def test_check_names_bad_samples_with_their_source_images(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "s1").mkdir(parents=True)
    rng = np.random.default_rng(6)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "s1" / f"{i}.png")
    Image.new("I;16", (8, 8), 65535).save(src / "s1" / "white16.png")  # blank even when scaled right
    assert main(["convert", str(src), "--out", str(tmp_path / "o"), "--size", "8", "--split-by", "image",
                 "--val-fraction", "0.5"]) == 0
    split = next(s for s in ("train", "val") if any(r["path"] == "s1/white16.png"
                                                     for r in read_csv(tmp_path / "o" / f"{s}_index.csv")))
    row = next(r["index"] for r in read_csv(tmp_path / "o" / f"{split}_index.csv") if r["path"] == "s1/white16.png")
    capsys.readouterr()
    assert main(["check", str(tmp_path / "o" / f"{split}_teacher.npy")]) == 1
    out = capsys.readouterr()
    assert f"  #{row} blank s1/white16.png" in out.out.splitlines()
    assert f"#{row} blank s1/white16.png); more than the 5% allowed" in out.err


@pytest.fixture(scope="module")
def leaky_run(tiny_run, tmp_path_factory):
    """tiny_run's best.pt, its run config pointing at copies of its data with index CSVs (subjects: train a..h,
    val c, d, x, y) and a val file with 2 blank samples of 16 (12.5%), trained (as the run config says) with
    --max-invalid 0.2."""
    d = tmp_path_factory.mktemp("leaky")
    train_arr = np.load(tiny_run.data_dir / "train_teacher.npy")
    val_arr = np.load(tiny_run.data_dir / "val_teacher.npy")
    val_arr[[2, 9]] = 128
    np.save(d / "train_teacher.npy", train_arr)
    np.save(d / "val_teacher.npy", val_arr)
    train_subjects = [f"{'abcdefgh'[i % 8]}" for i in range(len(train_arr))]
    val_subjects = [("c", "d", "x", "y")[i % 4] for i in range(len(val_arr))]
    for split, subjects in (("train", train_subjects), ("val", val_subjects)):
        (d / f"{split}_index.csv").write_text("index,path,subject,changes\n" + "".join(
            f"{i},{s}/{i}.png,{s},\n" for i, s in enumerate(subjects)))
    ckpt = read_checkpoint(tiny_run.best)
    ckpt["run_config"] = {**ckpt["run_config"], "data_dir": str(d), "train_npy": None, "val_npy": None,
                          "max_invalid": 0.2}
    torch.save(ckpt, d / "best.pt")
    return d


class Reached(Exception):
    """Raised by a stand-in to show that a script got past loading its data."""


def test_eval_and_eigenears_honour_the_runs_max_invalid_and_name_the_bad_samples(leaky_run, capsys, monkeypatch):
    common = ["--workers", "0", "--device", "cpu", "--batch-size", "8"]
    ckpt = str(leaky_run / "best.pt")
    metrics = ev.main([ckpt, "--out", str(leaky_run / "eval"), "--identity", *common])
    assert metrics["n_invalid"] == 2  # 12.5% invalid: accepted under the run's 0.2
    assert metrics["train_overlap"]["shared"] == 2 and metrics["train_overlap"]["identities"] == 4  # c, d
    assert (f"  warning: 2 of 4 identities here also have images in the training data {leaky_run}/train_teacher.npy "
            f"(c, d): rank-1 and EER are not on unseen identities") in capsys.readouterr().out
    assert ev.card_metrics(metrics)["identities also in training"] == "2 of 4 (not subject-disjoint)"
    with pytest.raises(DataError, match=r"val_teacher.npy: 2 of 16 samples invalid \(blank 2: #2 blank x/2.png, "
                                        r"#9 blank d/9.png\); more than the 5% allowed"):
        ev.main([ckpt, "--out", str(leaky_run / "eval2"), "--max-invalid", "0.05", *common])

    def reached(*args, **kwargs):
        raise Reached
    monkeypatch.setattr(eg, "encode_dataset", reached)  # eigenears' first step after building both datasets
    with pytest.raises(Reached):
        eg.main(["--ckpt", ckpt, "--out", str(leaky_run / "eg"), *common])
    with pytest.raises(DataError, match=r"val_teacher.npy: 2 of 16 samples invalid"):
        eg.main(["--ckpt", ckpt, "--out", str(leaky_run / "eg"), "--max-invalid", "0.1", *common])
    with pytest.raises(SystemExit):
        eg.main(["--ckpt", ckpt, "--max-invalid", "1.5"])  # the same range check as train.py


def test_eval_does_not_judge_the_training_overlap_from_a_training_file_changed_since(leaky_run, tmp_path):
    """The checkpoint's fingerprint of its training file (loop.data_fingerprints) says whether the file eval reads
    is the one the run saw; another one tells nothing about the identities seen in training."""
    shutil.copytree(leaky_run, tmp_path / "run")
    np.save(tmp_path / "run" / "train_teacher.npy", np.load(leaky_run / "train_teacher.npy")[:48])
    ckpt = read_checkpoint(leaky_run / "best.pt")
    ckpt["run_config"] = {**ckpt["run_config"], "data_dir": str(tmp_path / "run")}
    torch.save(ckpt, tmp_path / "run" / "best.pt")
    metrics = ev.main([str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "eval"), "--identity",
                       "--workers", "0", "--device", "cpu", "--batch-size", "8"])
    overlap = metrics["train_overlap"]
    assert overlap["shared"] is None and overlap["card"] == "unknown"
    assert "train_teacher.npy changed since the run trained on it (3,145,856 -> 2,359,424 bytes" in overlap["note"]
