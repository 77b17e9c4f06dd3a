"""Tests for data.py: file formats and validation, the CLI (check, convert), augmentation and sampling."""
import csv
import hashlib
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import data
from conftest import ROOT, Hostile, assert_one_line_error
from data import (IMAGE_SIZE, AugConfig, EarDataset, IdentitySampler, ResumableSampler, _colour, augment,
                  augment_points, main, make_loader, open_npy, to_float, validate)
from errors import DataError
from photos import BACKGROUND, load_image
from synth import render_ears


@pytest.fixture(scope="module")
def ears() -> np.ndarray:
    """uint8 (8, 128, 128, 3) synthetic ears."""
    return render_ears(8, seed=0)[0]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# NPY files and EarDataset

@pytest.mark.parametrize("fmt", ["nhwc_uint8", "nchw_uint8", "float16", "float32", "float64", "nchw_float32"])
def test_every_accepted_format_gives_the_same_uint8_sample(tmp_path, ears, fmt):
    arr = {"nhwc_uint8": ears, "nchw_uint8": ears.transpose(0, 3, 1, 2),
           "float16": (ears / 255).astype(np.float16), "float32": (ears / 255).astype(np.float32),
           "float64": ears / 255, "nchw_float32": (ears / 255).astype(np.float32).transpose(0, 3, 1, 2)}[fmt]
    np.save(tmp_path / "x.npy", arr)
    ds = EarDataset(tmp_path / "x.npy")
    assert len(ds) == len(ears)
    assert ds.n_total == len(ears)
    for i in range(len(ears)):
        x, k = ds[i]
        assert k == i
        assert x.dtype == torch.uint8
        assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(x, torch.from_numpy(ears[i]).permute(2, 0, 1), rtol=0, atol=0)


def test_grayscale_file_is_expanded_to_three_equal_channels(tmp_path, ears):
    gray = ears.mean(-1).round().astype(np.uint8)  # (N, H, W)
    np.save(tmp_path / "gray.npy", gray)
    x, _ = EarDataset(tmp_path / "gray.npy")[3]
    torch.testing.assert_close(x, torch.from_numpy(gray[3]).expand(3, -1, -1), rtol=0, atol=0)


def test_other_sizes_are_resized_like_pil_and_match_the_128px_render(tmp_path, ears):
    big = render_ears(8, seed=0, size=192)[0]  # the same ears rendered at 192 px (with their own sensor noise)
    np.save(tmp_path / "big.npy", big)
    ds = EarDataset(tmp_path / "big.npy")
    for i in range(len(ears)):
        x, _ = ds[i]
        assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert x.dtype == torch.uint8
        pil = np.array(Image.fromarray(big[i]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
        diff = (x.permute(1, 2, 0).int() - torch.from_numpy(pil).int()).abs()
        assert diff.max() <= 1, f"sample {i}: differs from PIL's bicubic by up to {diff.max()} levels"
        diff = (x.float() - torch.from_numpy(ears[i]).permute(2, 0, 1).float()).abs()
        assert diff.mean() < 2.5, f"sample {i}: mean abs difference from the 128 px render {diff.mean():.2f} levels"


def test_invalid_samples_are_dropped_and_counted_by_reason(tmp_path, ears):
    arr = np.concatenate([ears, ears, ears]).astype(np.float32) / 255  # (24, 128, 128, 3)
    arr[1, 5, 5, 0] = np.nan
    arr[2, 0, 0, 2] = np.inf
    arr[3, 9, 9, 1] = -np.inf
    arr[4, 60, 60, 0] = 1.5
    arr[5, 60, 60, 0] = -0.2
    arr[6] = 0.0
    arr[7] = 0.5
    arr[8] = 0.5 + np.random.default_rng(0).normal(0, 0.3 / 255, arr[8].shape)  # near-constant
    arr[9, 0, 0, 0] = 1.0 + 0.4 / 255  # within rounding of 255: still valid
    np.save(tmp_path / "bad.npy", arr)
    bad = {1, 2, 3, 4, 5, 6, 7, 8}

    keep, invalid = validate(np.load(tmp_path / "bad.npy", mmap_mode="r"), chunk=5)
    assert keep.dtype == np.int64
    assert keep.tolist() == [i for i in range(24) if i not in bad]
    assert invalid == {"non-finite": 3, "out of range": 2, "blank": 3}

    ds = EarDataset(tmp_path / "bad.npy", max_invalid=0.5)
    assert len(ds) == 16
    assert ds.n_total == 24
    assert ds.invalid == invalid
    assert ds.summary() == "16 (filtered 8 invalid: non-finite 3, out of range 2, blank 3)"
    ds.keep = np.tile(ds.keep[:4], 5)  # landmarker.py's epoch: N labelled images repeated
    assert ds.summary() == "20: 4 images 5 times (filtered 8 invalid: non-finite 3, out of range 2, blank 3)"
    ds.keep = keep
    assert {ds[i][1] for i in range(len(ds))}.isdisjoint(bad)

    blank_u8 = ears.copy()
    blank_u8[2] = 77
    np.save(tmp_path / "blank.npy", blank_u8)
    assert validate(np.load(tmp_path / "blank.npy"))[1] == {"non-finite": 0, "out of range": 0, "blank": 1}


def test_too_many_invalid_samples_raise_data_error_with_counts(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((1000, 16, 16, 3), dtype=np.float32)
    arr[:12, 3, 3, 1] = np.nan
    arr[12:312] = 0.25
    path = tmp_path / "many_bad.npy"
    np.save(path, arr)
    with pytest.raises(DataError) as e:
        EarDataset(path)
    assert str(e.value) == (f"{path}: 312 of 1,000 samples invalid (non-finite 12, blank 300: #0 non-finite, "
                            "#1 non-finite, #2 non-finite, 309 more (python data.py check lists all)); more than the "
                            "5% allowed (--max-invalid)")
    assert len(EarDataset(path, size=16, max_invalid=0.32)) == 688


def test_pickled_object_npy_is_refused_without_unpickling(tmp_path):
    marker, path = tmp_path / "was_unpickled", tmp_path / "hostile.npy"
    np.save(path, np.array([Hostile(marker), 1], dtype=object), allow_pickle=True)  # hostile
    with pytest.raises(DataError, match=re.escape(str(path))):
        open_npy(path)
    with pytest.raises(DataError, match=re.escape(str(path))):
        EarDataset(path)
    assert_one_line_error(run_cli("check", str(path), cwd=tmp_path), str(path))
    assert not marker.exists()
    # the payload is live: loading with pickles allowed runs it
    np.load(path, allow_pickle=True)  # hostile
    assert marker.exists()


@pytest.mark.parametrize("name, arr, reason", [
    ("rgba.npy", np.zeros((2, 16, 16, 4), np.uint8), "shape (2, 16, 16, 4) is not (N, H, W, 3), (N, 3, H, W) or "
                                                     "grayscale (N, H, W); RGBA? drop the alpha channel (x[..., :3])"),
    ("rgba_nchw.npy", np.zeros((2, 4, 16, 16), np.uint8), "RGBA? drop the alpha channel"),
    ("flat.npy", np.zeros((2, 16), np.uint8), "shape (2, 16)"),
    ("five_d.npy", np.zeros((2, 1, 16, 16, 3), np.uint8), "shape (2, 1, 16, 16, 3)"),
    ("wide.npy", np.zeros((2, 16, 24, 3), np.uint8), "16x24"),
    ("one_image.npy", np.zeros((32, 32, 3), np.uint8), "images are 32x3, expected square crops (`data.py convert` "
                                                     "pads photos to square); one image of shape (32, 32, 3)? an image "
                                                     "array has the count first: x[None] is (1, 32, 32, 3)"),
    ("empty.npy", np.zeros((0, 16, 16, 3), np.uint8), "no samples"),
    ("int16.npy", np.zeros((2, 16, 16, 3), np.int16), "dtype int16"),
    ("missing.npy", None, "file not found (`python synth.py --out "),
    ("text.npy", b"this is not an array\n", "not a .npy file"),
])
def test_bad_files_raise_data_error_naming_the_file(tmp_path, name, arr, reason):
    path = tmp_path / name
    if isinstance(arr, bytes):
        path.write_bytes(arr)
    elif arr is not None:
        np.save(path, arr)
    with pytest.raises(DataError) as e:
        open_npy(path)
    assert str(e.value).startswith(f"{path}: ")
    assert reason in str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_npy_raises_data_error(tmp_path, ears):
    path = tmp_path / "truncated.npy"
    np.save(path, ears)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError, match=re.escape(f"{path}: ")):
        open_npy(path)


def test_pickled_dataset_does_not_carry_the_data(tmp_path, ears):
    np.save(tmp_path / "x.npy", ears)
    ds = EarDataset(tmp_path / "x.npy")
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # workers started by spawn get the path, not 400 kB of images
    x, k = pickle.loads(blob)[5]
    assert k == 5
    assert torch.equal(x, ds[5][0])


def test_validate_15000_images_from_a_memmap_in_chunks(tmp_path, ears):  # its time is printed, not asserted
    path = tmp_path / "big.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(15_000, 128, 128, 3))
    for i in range(0, 15_000, len(ears)):
        arr[i:i + len(ears)] = ears[:15_000 - i]
    arr[777] = 0
    arr.flush()
    del arr
    t0 = time.perf_counter()
    keep, invalid = validate(open_npy(path))
    dt = time.perf_counter() - t0
    print(f"validate: 15,000 images in {dt:.2f} s")
    assert len(keep) == 14_999
    assert invalid["blank"] == 1


# ---------------------------------------------------------------------------------------------------------------
# CLI

@pytest.mark.slow
def test_check_cli_exit_codes_and_one_line_errors(tmp_path, ears, capsys):
    np.save(tmp_path / "good.npy", ears)
    proc = run_cli("check", "good.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "file:     good.npy", "samples:  8", "shape:    (8, 128, 128, 3) uint8 (NHWC)",
        f"values:   {ears.min()} .. {ears.max()} (finite values)",
        "invalid:  0 (non-finite 0, out of range 0, blank 0)", "verdict:  usable, 8 valid samples"]

    bad = ears.transpose(0, 3, 1, 2) / 255.0  # float64 NCHW
    bad[:2] = 0.5
    bad[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    assert_one_line_error(run_cli("check", "bad.npy", cwd=tmp_path),
                          "bad.npy: 3 of 8 samples invalid (non-finite 1, blank 2: #0 blank, #1 blank, "
                          "#2 non-finite)")
    assert main(["check", str(tmp_path / "bad.npy"), "--max-invalid", "0.375"]) == 0
    report = capsys.readouterr().out.splitlines()
    finite = bad[np.isfinite(bad)]
    assert report[2:] == [
        "shape:    (8, 3, 128, 128) float64 (NCHW)", f"values:   {finite.min():g} .. {finite.max():g} (finite values)",
        "invalid:  3 (non-finite 1, out of range 0, blank 2)", "  #0 blank", "  #1 blank", "  #2 non-finite",
        "verdict:  usable, 5 valid samples"]
    assert_one_line_error(run_cli("check", "missing.npy", cwd=tmp_path), "missing.npy: file not found")
    with pytest.raises(SystemExit) as e:  # argparse rejects the value
        main(["check", str(tmp_path / "good.npy"), "--max-invalid", "2"])
    assert e.value.code == 2


def test_convert_round_trip_pads_resizes_splits_and_lists_skipped_files(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "a" / "b").mkdir(parents=True)
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[25:75, 75:125] = 255  # a white 50 x 50 square in the middle of a black 200 x 100 image
    Image.fromarray(wide).save(src / "wide.png")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(90, 120), (128, 128), (300, 240), (64, 40), (128, 200), (77, 77), (150, 100)]):
        ext = [".png", ".jpg", ".JPEG", ".bmp", ".tif", ".webp", ".png"][i]
        folder = [src, src / "a", src / "a" / "b"][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}{ext}")
    Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(src / "a" / "gray.png")  # mode L
    (src / "a" / "x.png").write_text("not an image")
    (src / "a" / "b" / "empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("hello")

    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr()
    train, val = np.load(tmp_path / "out" / "train_teacher.npy"), np.load(tmp_path / "out" / "val_teacher.npy")
    assert train.dtype == np.uint8
    assert train.shape[1:] == (128, 128, 3)
    assert val.shape[1:] == (128, 128, 3)
    assert len(train) + len(val) == 9
    assert len(val) == 2  # round(9 * 0.25)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["skipped.csv", "train_index.csv",
                                                                     "train_teacher.npy", "val_index.csv",
                                                                     "val_teacher.npy"]
    for name in ("x.png", "empty.jpg", "notes.txt"):
        assert re.search(rf"skipped .*{re.escape(name)}: ", out.err), out.err
    assert sorted(read_index(tmp_path / "out" / "skipped.csv"), key=lambda r: r["path"]) == [
        {"path": "a/b/empty.jpg", "reason": "not an image Pillow can read"},
        {"path": "a/x.png", "reason": "not an image Pillow can read"},
        {"path": "notes.txt", "reason": "not an image Pillow can read"}]
    o = tmp_path / "out"
    n_val_subjects = len({r["subject"] for r in read_index(o / "val_index.csv")} - {""})
    assert out.out.splitlines()[-3:] == [  # a and a/b are one subject (a), 4 images lie directly in photos/
        f"converted 9 of 12 entries (3 skipped: {o}/skipped.csv); 1 subject (folders at --subject-depth 1), "
        f"4 images without one",
        f"split by image (default): train 7 images of 1 subject -> {o}/train_teacher.npy, val 2 images of "
        f"{n_val_subjects} subject{'s' * (n_val_subjects != 1)} (22.2%; --val-fraction 0.25) -> {o}/val_teacher.npy; "
        f"their sources in {o}/train_index.csv, {o}/val_index.csv",
        "content changes: padded to square 7 (background 124,116,104; each image's in the changes column of the "
        "index CSVs)"]

    # the aspect ratio is kept: the square stays square (64 x 64 after padding 200 x 100 to 200 x 200 -> 128)
    rows = {r["path"]: (split, int(r["index"])) for split in ("train", "val")
            for r in read_index(tmp_path / "out" / f"{split}_index.csv")}
    split, i = rows["wide.png"]
    square = {"train": train, "val": val}[split][i]
    ys, xs = np.nonzero(square.min(-1) > 200)
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1
    assert 30 <= ys.max() - ys.min() <= 34
    assert (square[:20] == BACKGROUND).all() and (square[-20:] == BACKGROUND).all()  # the padding, top and bottom

    again = run_cli("convert", "photos", "--out", "out", cwd=tmp_path)
    assert_one_line_error(again, "train_teacher.npy: already exists")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_text("nope")
    proc = run_cli("convert", "junk", "--out", "out2", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: junk: 0 usable images (1 of 1 entries skipped)")
    assert not (tmp_path / "out2").exists()


def read_index(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_convert_index_csvs_give_each_npy_rows_source_and_subject(tmp_path, capsys):
    src = tmp_path / "AWE"
    subjects = {"root.png": "", "top.jpg": "", "001/01.png": "001", "001/02.png": "001", "002/01.png": "002",
                "Doe, Jane/a,b.png": "Doe, Jane", "site/003/01.png": "site", "site/003/02.bmp": "site"}
    rng = np.random.default_rng(1)
    for name in subjects:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / name)
    (src / "001" / "notes.txt").write_text("skipped: no row")
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--size", "16", "--val-fraction", "0.25"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("converted 8 of 9 entries (1 skipped: ")
    listed = []
    for split in ("train", "val"):
        npy = np.load(out / f"{split}_teacher.npy")
        assert (out / f"{split}_index.csv").read_text().splitlines()[0] == "index,path,subject,changes"
        rows = read_index(out / f"{split}_index.csv")
        assert [int(r["index"]) for r in rows] == list(range(len(npy)))  # one row per row of the .npy
        for r in rows:
            image, changes, _ = load_image(src / r["path"], 16)
            assert np.array_equal(npy[int(r["index"])], image), r
            assert r["changes"] == "; ".join(f"{kind} ({detail})" for kind, detail in changes) != "", r
            assert r["subject"] == subjects[r["path"]], r
        listed += [r["path"] for r in rows]
    assert sorted(listed) == sorted(subjects)  # every image once, in train or val


def test_convert_refuses_to_overwrite_an_index_csv_and_force_rewrites_the_set(tmp_path):
    src = tmp_path / "photos"
    for i in range(4):
        (src / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), i * 50, np.uint8)).save(src / f"s{i % 2}" / f"{i}.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val_index.csv").write_text("earlier\n")
    assert_one_line_error(run_cli("convert", "photos", "--out", "out", "--size", "16", cwd=tmp_path),
                          "val_index.csv: already exists", "--force")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["val_index.csv"]  # nothing written
    assert (tmp_path / "out" / "val_index.csv").read_text() == "earlier\n"
    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--size", "16", "--force"]) == 0
    rows = read_index(tmp_path / "out" / "train_index.csv") + read_index(tmp_path / "out" / "val_index.csv")
    assert sorted((r["path"], r["subject"]) for r in rows) == [("s0/0.png", "s0"), ("s0/2.png", "s0"),
                                                              ("s1/1.png", "s1"), ("s1/3.png", "s1")]


def test_convert_split_is_reproducible_for_a_seed(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(10):
        Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(src / f"{i}.png")
    firsts = []
    for run in range(2):
        assert main(["convert", str(src), "--out", str(tmp_path / f"o{run}"), "--seed", "3", "--size", "16"]) == 0
        firsts.append(np.load(tmp_path / f"o{run}" / "val_teacher.npy"))
    assert np.array_equal(*firsts)
    assert firsts[0].shape == (2, 16, 16, 3)


# ---------------------------------------------------------------------------------------------------------------
# augmentation

@pytest.fixture(scope="module")
def batch(ears) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ears).permute(0, 3, 1, 2).contiguous(), torch.arange(100, 108)


def test_augment_depends_only_on_seed_epoch_key_and_view(batch):
    x, keys = batch
    cfg = AugConfig()
    a = augment(x, keys, seed=1, epoch=2, cfg=cfg)
    assert a.dtype == torch.float32
    assert a.shape == x.shape
    assert a.min() >= 0
    assert a.max() <= 1
    torch.testing.assert_close(augment(x, keys, seed=1, epoch=2, cfg=cfg), a, rtol=0, atol=0)
    # a sample's result does not depend on which batch it is in
    sub = augment(x[[5, 2]], keys[[5, 2]], seed=1, epoch=2, cfg=cfg)
    torch.testing.assert_close(sub, a[[5, 2]], rtol=0, atol=1e-6)
    for other in (dict(seed=1, epoch=3), dict(seed=2, epoch=2), dict(seed=1, epoch=2, view=1)):
        b = augment(x, keys, cfg=cfg, **other)
        assert ((b - a).abs().flatten(1).mean(1) > 1e-3).all(), other
    # the key, not the position in the batch, picks the parameters
    assert (augment(x, keys.flip(0), seed=1, epoch=2, cfg=cfg) - a).abs().flatten(1).mean(1).min() > 1e-3


def test_aug_config_rejects_impossible_ranges():
    with pytest.raises(ValueError, match="scale"):
        AugConfig(scale=1.0)
    with pytest.raises(ValueError):
        AugConfig(rotate=-5.0)


def test_augment_never_touches_the_global_rng(batch):
    x, keys = batch
    state = torch.get_rng_state()
    augment(x, keys, seed=0, epoch=0, cfg=AugConfig())
    assert torch.equal(state, torch.get_rng_state())


def test_augment_with_zero_config_is_identity(batch):
    x, keys = batch
    zero = AugConfig(scale=0, translate=0, rotate=0, brightness=0, contrast=0, saturation=0, hue=0, hflip=False)
    torch.testing.assert_close(augment(x, keys, seed=0, epoch=0, cfg=zero), to_float(x), rtol=0, atol=1 / 255)


def test_views_keeping_identity_keep_the_colour_and_the_size(batch):
    """AugConfig.keeping_identity (NT-Xent's views): a flat skin-coloured image keeps its colour, and a centred disc
    its area (no zoom), while the full config changes both."""
    keys = torch.arange(16)
    flat = torch.tensor([0.80, 0.58, 0.45]).view(1, 3, 1, 1).expand(16, 3, 64, 64)  # (16, 3, 64, 64)
    yy, xx = torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")
    disc = (xx**2 + yy**2 < 16**2).float().expand(16, 3, 64, 64)  # area 804 px, far from the border
    full, kept = AugConfig(), AugConfig().keeping_identity()
    assert (kept.rotate, kept.translate, kept.hflip) == (full.rotate, full.translate, full.hflip)
    torch.testing.assert_close(augment(flat, keys, 0, 0, kept), flat, rtol=0, atol=1e-6)
    assert (augment(flat, keys, 0, 0, full) - flat).abs().amax() > 0.05
    area = lambda cfg: augment(disc, keys, 0, 0, cfg)[:, 0].sum(dim=(1, 2))  # noqa: E731  (16,) pixels
    assert (area(kept) - disc[:, 0].sum(dim=(1, 2))).abs().amax() < 8  # rotation and shift: interpolation only
    assert (area(full) - disc[:, 0].sum(dim=(1, 2))).abs().amax() > 50  # zoom by up to 10%: area by up to 21%


def test_augment_accepts_uint8_and_float_alike(batch):
    x, keys = batch
    torch.testing.assert_close(augment(x, keys, 0, 0, AugConfig()), augment(to_float(x), keys, 0, 0, AugConfig()))


def test_hflip_mirrors_about_half_of_the_samples(batch):
    x, keys = batch
    keys = torch.arange(64)
    x = x[torch.arange(64) % len(x)]
    flip_only = AugConfig(scale=0, translate=0, rotate=0, brightness=0, contrast=0, saturation=0, hue=0, hflip=True)
    out, ref = augment(x, keys, 0, 0, flip_only), to_float(x)
    flipped = (out - ref.flip(-1)).abs().flatten(1).amax(1) < 1e-4
    assert (flipped | ((out - ref).abs().flatten(1).amax(1) < 1e-4)).all()
    assert 16 < flipped.sum() < 48


def test_colour_jitter_matches_torchvision(batch):
    x = to_float(batch[0][:3])
    b, c, s = torch.tensor([0.8, 1.0, 1.2]), torch.tensor([1.2, 0.85, 1.0]), torch.tensor([0.9, 1.15, 0.8])
    out = _colour(x, b, c, s, hue=torch.zeros(3))
    for i in range(3):
        ref = TF.adjust_brightness(x[i], b[i].item())
        ref = TF.adjust_contrast(ref, c[i].item())
        ref = TF.adjust_saturation(ref, s[i].item())
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


def test_hue_rotation_keeps_luma_and_changes_colour(batch):
    x = to_float(batch[0][:2]) * 0.8 + 0.1  # away from the clamp
    ones = torch.ones(2)
    out = _colour(x, ones, ones, ones, hue=torch.tensor([0.05, -0.05]))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((out * luma).sum(1), (x * luma).sum(1), rtol=0, atol=1e-4)
    assert (out - x).abs().mean() > 1e-3


GEOMETRY = dict(brightness=0, contrast=0, saturation=0, hue=0)  # no colour jitter: a dot's centroid is its position


def dots(points: torch.Tensor, size: int = IMAGE_SIZE, sigma: float = 1.5) -> torch.Tensor:
    """points (B, 2) in pixels (pixel centres at 0.5) -> float (B, 3, size, size): one Gaussian dot per image."""
    c = torch.arange(size) + 0.5  # (size,) pixel centres
    d2 = (c.view(1, 1, -1) - points[:, 0, None, None]) ** 2 + (c.view(1, -1, 1) - points[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))[:, None].expand(-1, 3, -1, -1)  # (B, 3, size, size)


def centroids(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) -> (B, 2) the brightness-weighted mean (x, y) of channel 0, in pixels."""
    w = x[:, 0]  # (B, H, W)
    c = torch.arange(x.shape[-1]) + 0.5
    return torch.stack([(w * c).sum((1, 2)), (w * c[:, None]).sum((1, 2))], 1) / w.sum((1, 2))[:, None]


@pytest.mark.parametrize("cfg", [AugConfig(scale=0.25, translate=0.05, rotate=30, **GEOMETRY),
                                 AugConfig(scale=0.1, translate=0.05, rotate=10, hflip=True, **GEOMETRY)],
                         ids=["zoom-rotate-shift", "default-geometry-and-flip"])
def test_augment_points_follow_the_pixels(cfg):
    """A dot at each of K points, each in its own image with the same key, lands where augment_points puts the point
    (the dot's centroid, to 0.05 px; the points stay 59 px or less from the centre, so no dot leaves the crop)."""
    points = torch.tensor([[33.7, 43.4], [64.4, 64.3], [89.5, 91.2], [51.9, 97.4]])  # (K, 2)
    k = len(points)
    for seed, epoch in ((0, 0), (3, 7)):
        keys = torch.arange(12) * 17  # (B,)
        moved = augment_points(points.expand(len(keys), k, 2), IMAGE_SIZE, keys, seed, epoch, cfg)  # (B, K, 2)
        x = augment(dots(points.repeat(len(keys), 1)), keys.repeat_interleave(k), seed, epoch, cfg)  # (B * K, ...)
        torch.testing.assert_close(centroids(x).view(-1, k, 2), moved, rtol=0, atol=0.05)
        assert (moved - points).norm(dim=-1).amax() > 4  # the augmentation did move them


def test_augment_points_without_augmentation_are_the_points_and_out_of_the_crop_are_nan():
    """A zero config keeps the points; a point moved out of the crop (coordinate < 0 or > size) comes back NaN, and a
    NaN point (outside before) stays NaN, while the centre never leaves."""
    points = torch.tensor([[1.0, 1.0], [64.0, 64.0], [126.0, 70.0], [float("nan"), float("nan")]])  # (K, 2)
    keys = torch.arange(64)
    zero = AugConfig(scale=0, translate=0, rotate=0, **GEOMETRY)
    same = augment_points(points.expand(64, 4, 2), IMAGE_SIZE, keys, 0, 0, zero)
    torch.testing.assert_close(same, points.expand(64, 4, 2), rtol=0, atol=1e-4, equal_nan=True)
    moved = augment_points(points.expand(64, 4, 2), IMAGE_SIZE, keys, 0, 0, AugConfig())  # (64, 4, 2)
    out = moved.isnan()
    assert (out[..., 0] == out[..., 1]).all() and out[:, 3].all() and not out[:, 1].any()
    assert 8 < out[:, 0, 0].sum() < 56 and out[:, 2, 0].any()  # a corner point leaves in about half the samples
    assert ((moved[~out] >= 0) & (moved[~out] <= IMAGE_SIZE)).all()
    with pytest.raises(ValueError, match=r"points \(B, K, 2\)"):
        augment_points(points, IMAGE_SIZE, keys[:4], 0, 0, AugConfig())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_on_gpu_matches_cpu(batch):
    x, keys = batch
    gpu = augment(x.cuda(), keys.cuda(), 0, 0, AugConfig())
    torch.testing.assert_close(gpu.cpu(), augment(x, keys, 0, 0, AugConfig()), rtol=0, atol=2e-3)
    points = 8 + 112 * torch.rand(len(keys), 8, 2, generator=torch.Generator().manual_seed(0))  # (B, 8, 2)
    moved = augment_points(points, IMAGE_SIZE, keys, 0, 0, AugConfig())
    torch.testing.assert_close(augment_points(points.cuda(), IMAGE_SIZE, keys.cuda(), 0, 0, AugConfig()).cpu(), moved,
                               rtol=0, atol=1e-3, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# sampling and loading

def test_sampler_drops_the_incomplete_global_batch_and_shuffles_per_epoch():
    s = ResumableSampler(103, batch_size=10, seed=0)
    order0 = list(s)
    assert len(s) == 100
    assert len(order0) == 100
    assert len(set(order0)) == 100
    assert set(order0) <= set(range(103))
    assert list(s) == order0
    s.set_epoch(1)
    assert list(s) != order0
    s.set_epoch(0)
    assert list(s) == order0
    assert list(ResumableSampler(103, batch_size=10, seed=0, shuffle=False)) == list(range(100))
    assert list(ResumableSampler(103, batch_size=10, seed=1)) != order0


def test_sampler_resumes_exactly_the_rest_of_the_epoch():
    s = ResumableSampler(250, batch_size=8, seed=5)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=80)
    assert list(s) == full[80:]
    assert len(s) == len(full) - 80
    with pytest.raises(ValueError, match="start"):
        s.set_epoch(3, start=len(full) + 8)


def test_two_ranks_cover_the_positions_of_one_rank_with_the_doubled_batch():
    single = ResumableSampler(250, batch_size=16, seed=5)
    ranks = [ResumableSampler(250, batch_size=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for start in (0, 64):
        single.set_epoch(2, start)
        for r in ranks:
            r.set_epoch(2, start)
        one, (r0, r1) = list(single), [list(r) for r in ranks]
        assert len(r0) == len(r1) == len(ranks[0]) == len(one) // 2
        assert [i for pair in zip(r0, r1) for i in pair] == one  # global position p goes to rank p % 2
        for b in range(len(r0) // 8):  # each global batch of 16 positions is split 8 + 8
            assert sorted(r0[8 * b:8 * b + 8] + r1[8 * b:8 * b + 8]) == sorted(one[16 * b:16 * b + 16])


# identities 0..29 with 1 to 7 images each (identity 5 has 1, 11 has 3: fewer than K = 4), unlabelled rows between
ID_LABELS = np.concatenate([np.full(1 + i % 7, i) for i in range(30)] + [np.full(3, -1)])[
    np.random.default_rng(0).permutation(sum(1 + i % 7 for i in range(30)) + 3)]


def test_identity_sampler_batches_hold_k_images_of_p_distinct_identities():
    s = IdentitySampler(ID_LABELS, images_per_identity=4, batch_size=8, seed=3)
    assert s.n_used == 30 * 4 // 8 * 8 == len(s) and s.n_short == sum(1 + i % 7 < 4 for i in range(30))
    for epoch in (0, 1):
        s.set_epoch(epoch)
        order = np.array(list(s))
        assert len(order) == s.n_used
        for batch in order.reshape(-1, 8):
            ids = ID_LABELS[batch]
            assert (ids >= 0).all()  # unlabelled rows are never drawn
            groups = ids.reshape(2, 4)  # P = 2 identities x K = 4 images, each identity's images together
            assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
            for g in batch.reshape(2, 4):  # distinct images unless the identity has fewer than K
                n = int((ID_LABELS == ID_LABELS[g[0]]).sum())  # the identity's images
                assert len(set(g.tolist())) == 4 if n >= 4 else len(set(g.tolist())) <= n
        seen = ID_LABELS[order].reshape(-1, 4)[:, 0]
        assert len(set(seen.tolist())) == len(seen)  # an epoch visits an identity once
    s.set_epoch(0)
    assert list(s) != order.tolist()  # another order in another epoch


def test_identity_sampler_resumes_exactly_the_rest_of_the_epoch():
    s = IdentitySampler(ID_LABELS, images_per_identity=2, batch_size=4, seed=5)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=16)
    assert list(s) == full[16:]
    assert len(s) == len(full) - 16
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        s.set_epoch(3, start=6)
    with pytest.raises(ValueError, match="multiple of the images per identity"):
        IdentitySampler(ID_LABELS, images_per_identity=4, batch_size=6, seed=5)
    with pytest.raises(ValueError, match="holding at least 2 identities"):  # one identity: no negatives
        IdentitySampler(ID_LABELS, images_per_identity=4, batch_size=4, seed=5)


@pytest.mark.parametrize("accum", [1, 2])
def test_identity_sampler_two_ranks_draw_the_global_batches_of_one_rank(accum):
    single = IdentitySampler(ID_LABELS, images_per_identity=2, batch_size=8, seed=5, accum_steps=accum)
    ranks = [IdentitySampler(ID_LABELS, images_per_identity=2, batch_size=4, seed=5, rank=r, world_size=2,
                             accum_steps=accum) for r in range(2)]
    g = 8 * accum  # global batch
    for start in (0, g):
        single.set_epoch(2, start)
        for r in ranks:
            r.set_epoch(2, start)
        one, (r0, r1) = list(single), [list(r) for r in ranks]
        assert len(r0) == len(r1) == len(ranks[0]) == len(one) // 2
        for b in range(len(one) // g):
            share = slice(g // 2 * b, g // 2 * (b + 1))
            assert sorted(r0[share] + r1[share]) == sorted(one[g * b:g * (b + 1)])  # the same global batch
            for micro in np.reshape(r0[share] + r1[share], (-1, 4)):  # every micro-batch holds whole identities
                assert (ID_LABELS[micro].reshape(2, 2) == ID_LABELS[micro].reshape(2, 2)[:, :1]).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_uint8_batches_in_sampler_order_without_touching_the_global_rng(tmp_path, ears, workers):
    np.save(tmp_path / "x.npy", np.concatenate([ears, ears]))
    ds = EarDataset(tmp_path / "x.npy")
    sampler = ResumableSampler(len(ds), batch_size=4, seed=0)
    loader = make_loader(ds, batch_size=4, sampler=sampler, workers=workers)
    state = torch.get_rng_state()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(loader)
        keys = torch.cat([k for _, k in batches])
        assert keys.tolist() == list(sampler)
        assert len(batches) == 4
        x, k = batches[0]
        assert x.dtype == torch.uint8
        assert x.shape == (4, 3, 128, 128)
        assert k.dtype == torch.int64
        assert torch.equal(x[0], ds[int(k[0])][0])
    assert torch.equal(state, torch.get_rng_state())


def test_fingerprint_hashes_a_small_file_whole_and_a_large_one_at_evenly_spaced_chunks(tmp_path, monkeypatch):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((40, 128, 128, 3), np.uint8))  # 1,966,208 bytes
    shape = np.zeros((40, 128, 128, 3), np.uint8)  # what the file holds: fingerprint reads shape and dtype from it
    fp = lambda: data.fingerprint(path, shape)  # noqa: E731
    raw = path.read_bytes()
    assert fp() == {"bytes": len(raw), "shape": [40, 128, 128, 3], "dtype": "uint8",
                    "sha256": hashlib.sha256(raw).hexdigest(), "labels": {}, "landmarks": {}}
    monkeypatch.setattr(data, "FINGERPRINT_WHOLE", 1 << 20)  # the file is now a large one: sampled
    chunk, n = 64 << 10, data.FINGERPRINT_CHUNKS
    reference = hashlib.sha256(b"".join(raw[o:o + chunk] for o in ((len(raw) - chunk) * i // (n - 1)
                                                                    for i in range(n)))).hexdigest()
    sampled = fp()
    assert sampled["sha256"] == reference
    for offset in (0, len(raw) - 1):  # the header's first byte and the file's last byte are both hashed
        changed = bytearray(raw)
        changed[offset] ^= 1
        path.write_bytes(bytes(changed))
        assert data.fingerprint_change(sampled, fp()) == "other content, same size and shape"
    np.save(path, shape := np.zeros((30, 128, 128, 3), np.uint8))
    assert data.fingerprint_change(sampled, fp()) == "1,966,208 -> 1,474,688 bytes, (40, 128, 128, 3) -> (30, 128, " \
                                                     "128, 3)"


def test_float_images_out_of_range_say_to_divide_by_255(tmp_path, ears):
    np.save(tmp_path / "x.npy", ears.astype(np.float32))  # 0-255 floats: every sample out of [0, 1]
    with pytest.raises(DataError, match=re.escape("float images are read in [0, 1]: divide 0-255 floats by 255")):
        EarDataset(tmp_path / "x.npy")
    np.save(tmp_path / "y.npy", ears.astype(np.float32) / 255)
    assert len(EarDataset(tmp_path / "y.npy")) == len(ears)


def test_fingerprint_covers_the_identity_labels_beside_the_file(tmp_path):
    """A resume must notice relabelled or deleted identities as it notices changed images (SupCon reads them)."""
    path = tmp_path / "x_teacher.npy"
    np.save(path, np.zeros((4, 16, 16, 3), np.uint8))
    labels = tmp_path / "x_factors.csv"
    labels.write_text("identity\n0\n0\n1\n1\n")
    arr = np.load(path, mmap_mode="r")
    before = data.fingerprint(path, arr)
    labels.write_text("identity\n0\n1\n0\n1\n")
    assert data.fingerprint_change(before, data.fingerprint(path, arr)) == "its identity labels x_factors.csv changed"
    labels.unlink()
    assert data.fingerprint_change(before, data.fingerprint(path, arr)) == "its identity labels x_factors.csv removed"


def test_fingerprint_covers_the_landmarks_beside_the_file_and_a_checkpoint_from_before_them_resumes(tmp_path):
    """A resumed landmarker must notice moved points; a checkpoint saved before landmarks were kept reports none."""
    path = tmp_path / "x_teacher.npy"
    np.save(path, np.zeros((2, 16, 16, 3), np.uint8))
    points = tmp_path / "x_landmarks.csv"
    points.write_text("index,canal_x,canal_y\n0,3.0,4.0\n1,5.0,6.0\n")
    arr = np.load(path, mmap_mode="r")
    before = data.fingerprint(path, arr)
    points.write_text("index,canal_x,canal_y\n0,3.0,4.0\n1,5.0,7.0\n")
    assert data.fingerprint_change(before, data.fingerprint(path, arr)) == "its landmarks x_landmarks.csv changed"
    old = {k: v for k, v in before.items() if k != "landmarks"}  # as checkpoints before this change kept it
    assert data.fingerprint_change(old, data.fingerprint(path, arr)) is None
    points.unlink()
    assert data.fingerprint_change(before, data.fingerprint(path, arr)) == "its landmarks x_landmarks.csv removed"


LANDMARK_CSV_CASES = {  # how the CSV is spoiled -> what the one line says (beside the file's name)
    "no file": (lambda lines: None, "no landmarks for train_teacher.npy"),
    "another header": (lambda lines: ["i,a_x,a_y", *lines[1:]], "line 1: the header is not index,<name>_x"),
    "a short row": (lambda lines: [*lines[:2], lines[2].rsplit(",", 1)[0], *lines[3:]], "line 3 has 16 fields"),
    "a missing row": (lambda lines: [lines[0], *lines[1:3], *lines[4:]], "no row for image 2 (1 of the 4 images"),
    "a row twice": (lambda lines: [*lines, lines[1]], "line 6: index 0 comes twice"),
    "an index of no image": (lambda lines: [*lines[:4], "9" + lines[4][1:]], "line 5: index 9 is not an image"),
    "NaN": (lambda lines: [lines[0], "0,nan" + lines[1][lines[1].index(",", 2):], *lines[2:]],
            "line 2 (image 0): ear_canal is not a finite number"),
    "a point outside the crop": (lambda lines: [*lines[:2], lines[2].replace(lines[2].split(",")[4], "128.5", 1),
                                                *lines[3:]], "line 3 (image 1): tragus ("),
    "a word": (lambda lines: [*lines[:2], "1,x" + lines[2][lines[2].index(",", 2):], *lines[3:]],
               "line 3: not an integer index and numbers"),
}


@pytest.mark.parametrize("case", LANDMARK_CSV_CASES)
def test_bad_landmarks_are_one_line_naming_the_file_and_row(tmp_path, case):
    from synth import write_synthetic
    write_synthetic(tmp_path, 4, 2, seed=0)
    npy, path = tmp_path / "train_teacher.npy", tmp_path / "train_landmarks.csv"
    names, points = data.read_landmarks(npy)
    assert points.shape == (4, 8, 2) and np.isfinite(points).all()
    spoil, message = LANDMARK_CSV_CASES[case]
    lines = spoil(path.read_text().splitlines())
    path.unlink()
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        data.read_landmarks(npy)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    assert case != "a point outside the crop" or "128.5) lies outside the 128 px image" in str(e.value)


def test_a_landmarks_csv_saved_with_a_byte_order_mark_reads_the_same(tmp_path):
    """Spreadsheets save "UTF-8 CSV" with a byte-order mark before the header: it is no part of "index"."""
    from synth import write_synthetic
    write_synthetic(tmp_path, 4, 2, seed=0)
    npy, path = tmp_path / "train_teacher.npy", tmp_path / "train_landmarks.csv"
    names, points = data.read_landmarks(npy)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    names_bom, points_bom = data.read_landmarks(npy)
    assert names_bom == names and np.array_equal(points_bom, points)


@pytest.mark.parametrize("case, masks, message", [
    ("no file", None, "no ear masks for train_teacher.npy"),
    ("another size", np.zeros((4, 64, 64), np.uint8), "uint8 (4, 64, 64); expected uint8 (4, 128, 128)"),
    ("another count", np.zeros((5, 128, 128), np.uint8), "uint8 (5, 128, 128); expected uint8 (4, 128, 128)"),
    ("a value 255", np.eye(128, dtype=np.uint8)[None].repeat(4, 0) * np.array([1, 1, 255, 1], np.uint8)[:, None, None],
     "mask 2 holds values other than 0 and 1 (max 255)"),
    ("floats", np.zeros((4, 128, 128), np.float32), "float32 (4, 128, 128)"),
])
def test_bad_masks_are_one_line_naming_the_file(tmp_path, case, masks, message):
    from synth import write_synthetic
    write_synthetic(tmp_path, 4, 2, seed=0)
    npy, path = tmp_path / "train_teacher.npy", tmp_path / "train_masks.npy"
    assert set(np.unique(data.read_masks(npy))) == {0, 1}
    path.unlink()
    if masks is not None:
        np.save(path, masks)
    with pytest.raises(DataError) as e:
        data.read_masks(npy)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_landmark_outside_the_crop_is_two_empty_fields_read_as_nan(tmp_path):
    """synth.py writes a landmark the frame cuts off as two empty fields; read_landmarks gives NaN for it, and one
    empty field of a pair is refused."""
    from synth import write_synthetic
    write_synthetic(tmp_path, 4, 2, seed=0)
    npy, path = tmp_path / "train_teacher.npy", tmp_path / "train_landmarks.csv"
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[13:15] = ["", ""]  # helix_top of image 2
    path.write_text("\n".join([*lines[:3], ",".join(fields), *lines[4:]]) + "\n")
    names, points = data.read_landmarks(npy)
    assert np.isnan(points[2, names.index("helix_top")]).all() and np.isfinite(np.delete(points, 6, 1)).all()
    assert np.isfinite(points[[0, 1, 3]]).all()
    fields[14] = "3.5"
    path.write_text("\n".join([*lines[:3], ",".join(fields), *lines[4:]]) + "\n")
    with pytest.raises(DataError, match=r"line 4: helix_top has one empty coordinate \(both empty: outside the crop\)"):
        data.read_landmarks(npy)


def test_a_csv_in_another_encoding_or_empty_is_one_line_naming_it(tmp_path):
    """A spreadsheet's UTF-16 or cp1252 CSV: DataError naming the file and the byte, not a UnicodeDecodeError."""
    path = tmp_path / "x_teacher.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "x_factors.csv").write_bytes("identity\n0\n1\n".encode("utf-16"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'x_factors.csv'}: not UTF-8 text (byte 0: b'\\xff'); "
                                                  f"save it as a UTF-8 CSV")):
        data.read_identities(path, EarDataset(path))
    (tmp_path / "x_landmarks.csv").write_bytes("index,caf\u00e9_x,caf\u00e9_y\n0,1,1\n1,2,2\n".encode("cp1252"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'x_landmarks.csv'}: not UTF-8 text (byte 9")):
        data.read_landmarks(path)
    (tmp_path / "x_factors.csv").write_bytes(b"\xef\xbb\xbfidentity\n0\n1\n")  # UTF-8 with a byte-order mark: read
    assert data.read_identities(path, EarDataset(path)).tolist() == [0, 1]
    (tmp_path / "x_factors.csv").write_bytes(b"")  # empty: truncated, not "no labels"
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'x_factors.csv'}: empty; a CSV starts with its header")):
        data.read_identities(path, EarDataset(path))


def test_a_landmark_named_twice_is_refused(tmp_path):
    path = tmp_path / "x_teacher.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "x_landmarks.csv").write_text("index,a_x,a_y,a_x,a_y\n0,1,1,2,2\n")
    with pytest.raises(DataError, match=re.escape("line 1: the landmark 'a' comes twice")):
        data.read_landmarks(path)
