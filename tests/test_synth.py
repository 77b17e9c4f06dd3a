"""Tests for synth.py: the synthetic ear renderer (determinism, factor ranges, contrast, speed), identities (shared
anatomy, varying nuisance), the files it writes and its CLI."""
import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error
from data import IMAGE_SIZE, read_landmarks, read_masks, validate
from synth import (ANATOMY, FACTOR_RANGES, FACTORS, LANDMARKS, NUISANCE, VIEW_JITTER, landmarks, main, masks,
                   render_ears, render_identities, write_synthetic, write_synthetic_identities)

# sha256 of train_factors.csv and val_factors.csv of `synth.py --n-train 3 --n-val 2 --seed 0`, written by synth.py
# before identities existed: the factor streams of the default mode must not change (the images follow from the
# factors and the noise stream; test_synth_cli_default_output_is_render_ears checks them against render_ears)
DEFAULT_FACTORS_SHA256 = {"train": "aca3ead7ddcd20faf8209d10345d8d14394cdc00153eb245213aa8c2974fbde1",
                          "val": "dfb73bacc4c766d502477acf917859c73fa437f873294d147dace2ef5524cece"}


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "synth.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_render_is_deterministic_for_a_seed_and_differs_between_seeds():
    a, fa = render_ears(6, seed=3)
    b, fb = render_ears(6, seed=3)
    c, fc = render_ears(6, seed=4)
    assert a.dtype == np.uint8
    assert a.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert fa.dtype == np.float32
    assert fa.shape == (6, len(FACTORS))
    assert a.tobytes() == b.tobytes()
    assert fa.tobytes() == fb.tobytes()
    assert not np.array_equal(fa, fc)
    assert (a != c).mean() > 0.5
    prefix, fp = render_ears(4, seed=3)  # image i does not depend on n
    assert prefix.tobytes() == a[:4].tobytes()
    assert np.array_equal(fp, fa[:4])


def test_factors_are_sampled_within_their_ranges():
    _, f = render_ears(200, seed=1, size=16)
    lo, hi = np.array(list(FACTOR_RANGES.values()), np.float32).T
    assert (f >= lo).all()
    assert (f <= hi).all()
    assert (f.max(0) - f.min(0) > 0.8 * (hi - lo)).all()  # each factor really varies


def test_images_vary_with_the_factors_and_are_not_blank():
    img, _ = render_ears(16, seed=2)
    keep, invalid = validate(img)
    assert len(keep) == 16
    assert img.reshape(16, -1).std(1).min() > 15  # real contrast in every image
    assert img.std(0).mean() > 15  # and between images


def test_render_speed():
    render_ears(8, seed=0)  # warm up
    t0 = time.perf_counter()
    render_ears(256, seed=1)
    rate = 256 / (time.perf_counter() - t0)
    print(f"render_ears: {rate:.0f} images/s")
    assert rate > 50


def test_write_synthetic_writes_images_and_factor_csvs(tmp_path):
    write_synthetic(tmp_path, n_train=10, n_val=4, seed=7)
    train, val = np.load(tmp_path / "train_teacher.npy"), np.load(tmp_path / "val_teacher.npy")
    assert train.shape == (10, 128, 128, 3)
    assert val.shape == (4, 128, 128, 3)
    assert train.dtype == np.uint8
    images, factors = render_ears(10, seed=7)
    assert np.array_equal(train, images)
    assert not np.array_equal(val, render_ears(4, seed=7)[0])  # val is a different stream of the seed
    for split, n in (("train", 10), ("val", 4)):
        lines = (tmp_path / f"{split}_factors.csv").read_text().splitlines()
        assert lines[0].split(",") == list(FACTORS)
        assert len(lines) == n + 1
    csv = np.loadtxt(tmp_path / "train_factors.csv", delimiter=",", skiprows=1, dtype=np.float32)
    assert np.array_equal(csv, factors)  # the CSV holds exactly the values used


def test_synth_cli_default_output_is_render_ears_and_unchanged(tmp_path):
    assert main(["--out", str(tmp_path), "--n-train", "3", "--n-val", "2"]) == 0
    images, factors = render_ears(3, seed=0)
    assert np.load(tmp_path / "train_teacher.npy").tobytes() == images.tobytes()
    for split in ("train", "val"):
        data = (tmp_path / f"{split}_factors.csv").read_bytes()
        assert data.splitlines()[0].decode().split(",") == list(FACTORS)  # no identity column
        assert hashlib.sha256(data).hexdigest() == DEFAULT_FACTORS_SHA256[split]


def test_synth_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 3 train + 2 val synthetic ears to {tmp_path / 'd'}/ (")
    assert np.load(tmp_path / "d" / "train_teacher.npy").shape == (3, 128, 128, 3)
    assert_one_line_error(run_cli("--out", "d", "--n-train", "3", "--n-val", "2", cwd=tmp_path),
                          "train_teacher.npy: already exists", "--force")
    assert main(["--out", str(tmp_path / "d"), "--n-train", "4", "--n-val", "2", "--force"]) == 0
    assert np.load(tmp_path / "d" / "train_teacher.npy").shape == (4, 128, 128, 3)




# ---------------------------------------------------------------------------------------------------------------
# identities

def test_views_of_an_identity_share_its_anatomy_and_differ_in_nuisance():
    k, v = 6, 4
    _, f, ids = render_identities(k, v, seed=3, size=16)
    assert f.shape == (k * v, len(FACTORS))
    assert ids.tolist() == [i for i in range(k) for _ in range(v)]  # identity-major
    lo, hi = np.array(list(FACTOR_RANGES.values()), np.float32).T
    assert (f >= lo).all()
    assert (f <= hi).all()
    col = {name: i for i, name in enumerate(FACTORS)}
    fixed = [col[name] for name in ANATOMY if name not in VIEW_JITTER]
    per_id = f.reshape(k, v, len(FACTORS))  # (K, V, F)
    assert (per_id[:, :, fixed] == per_id[:, :1, fixed]).all()  # same identity: equal anatomy
    for name, jitter in VIEW_JITTER.items():
        spread = np.ptp(per_id[:, :, col[name]], axis=1)  # (K,)
        assert (spread <= 2 * jitter + 1e-4).all()
        assert (spread > 0).all()  # but a view does shift it
    for i in range(k):  # different views: every nuisance factor differs
        nuisance = per_id[i][:, [col[name] for name in NUISANCE]]  # (V, N)
        for a in range(v):
            for b in range(a):
                assert (nuisance[a] != nuisance[b]).all()
    first_views = per_id[:, 0, fixed]  # (K, A): different identities differ in every anatomy factor
    assert all((first_views[a] != first_views[b]).all() for a in range(k) for b in range(a))


def test_identity_images_are_reproducible_and_image_j_does_not_depend_on_k():
    a, fa, ia = render_identities(5, 3, seed=7, size=32)
    b, fb, _ = render_identities(5, 3, seed=7, size=32)
    prefix, fp, ip = render_identities(2, 3, seed=7, size=32)
    assert a.dtype == np.uint8
    assert a.shape == (15, 32, 32, 3)
    assert a.tobytes() == b.tobytes()
    assert fa.tobytes() == fb.tobytes()
    assert prefix.tobytes() == a[:6].tobytes()
    assert np.array_equal(fp, fa[:6])
    assert np.array_equal(ip, ia[:6])
    other, fo, _ = render_identities(5, 3, seed=8, size=32)
    assert not np.array_equal(fo, fa)
    assert (other != a).mean() > 0.5


def test_views_of_one_identity_are_closer_in_pixels_than_views_of_different_identities():
    """The renderer really draws a person's ear the same way: the mean pixel distance between two views of one
    identity is below that between views of two identities, also with each image's mean colour removed (so it is
    not the shared skin tone alone). Measured at seed 0: ratios 0.32 and 0.84; independent ears grouped in fours
    (render_ears) give 0.93 and 0.99."""
    img, _, ids = render_identities(16, 4, seed=0, size=32)
    x = img.reshape(len(img), -1, 3).astype(np.float64)  # (N, P, 3)
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    other = ids[:, None] != ids[None]
    for y, bound in ((x, 0.5), (x - x.mean(1, keepdims=True), 0.95)):
        y = y.reshape(len(y), -1)
        d = ((y[:, None] - y[None]) ** 2).mean(-1)  # (N, N) mean squared pixel difference
        assert d[same].mean() < bound * d[other].mean()


def test_write_synthetic_identities_numbers_identities_apart_per_split(tmp_path):
    k, v = 3, 2
    write_synthetic_identities(tmp_path, k, v, seed=5)
    images, factors, ids = render_identities(k, v, seed=5)
    assert np.array_equal(np.load(tmp_path / "train_teacher.npy"), images)
    tables = {}
    for split in ("train", "val"):
        lines = (tmp_path / f"{split}_factors.csv").read_text().splitlines()
        assert lines[0].split(",") == [*FACTORS, "identity"]
        assert len(lines) == k * v + 1
        tables[split] = np.loadtxt(tmp_path / f"{split}_factors.csv", delimiter=",", skiprows=1)
        assert all(line.rsplit(",", 1)[1].isdigit() for line in lines[1:])  # ids are written as integers
    assert np.array_equal(tables["train"][:, :-1].astype(np.float32), factors)
    assert tables["train"][:, -1].tolist() == ids.tolist()  # 0..K-1
    assert tables["val"][:, -1].tolist() == (ids + k).tolist()  # K..2K-1: no id in both splits
    anatomy = [FACTORS.index(name) for name in ANATOMY if name not in VIEW_JITTER]
    train_ids, val_ids = tables["train"][::v, anatomy], tables["val"][::v, anatomy]
    assert not np.isin(val_ids, train_ids).any()  # val identities are other people (another random stream)


def test_synth_cli_identities_and_its_argument_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--identities", "2", "--views", "3", "--seed", "4",
                 "--first-identity", "10"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 6 train + 6 val synthetic ears (2 + 2 identities x 3 "
                                              f"views) to {tmp_path / 'd'}/ (")
    for split, ids in (("train", [10, 11]), ("val", [12, 13])):  # --first-identity 10: train 10..11, val 12..13
        table = np.loadtxt(tmp_path / "d" / f"{split}_factors.csv", delimiter=",", skiprows=1)
        assert table[:, -1].tolist() == np.repeat(ids, 3).tolist()
    images, _, _ = render_identities(2, 3, seed=4)
    assert np.load(tmp_path / "d" / "train_teacher.npy").tobytes() == images.tobytes()
    assert np.load(tmp_path / "d" / "val_teacher.npy").shape == (6, 128, 128, 3)
    assert main(["--out", str(tmp_path / "v"), "--identities", "2", "--views", "3", "--seed", "4",
                 "--val-identities", "1"]) == 0  # a smaller val split: 1 identity numbered after train's
    assert "6 train + 3 val synthetic ears (2 + 1 identities x 3 views)" in capsys.readouterr().out
    assert np.loadtxt(tmp_path / "v" / "val_factors.csv", delimiter=",", skiprows=1)[:, -1].tolist() == [2, 2, 2]
    assert np.load(tmp_path / "v" / "train_teacher.npy").tobytes() == images.tobytes()  # train unchanged
    mixed = "--n-train/--n-val: not with --identities (it renders K x --views images per split)"
    only = "--views, --val-identities, --first-identity: only with --identities"
    for argv, message in ((["--identities", "2", "--n-train", "5"], mixed),
                          (["--identities", "2", "--n-val", "5"], mixed),
                          (["--views", "3"], only), (["--first-identity", "3"], only),
                          (["--val-identities", "3"], only)):
        with pytest.raises(SystemExit) as e:  # argparse's usage and one error line, exit 2
            main(["--out", str(tmp_path / "e"), *argv])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")
    assert not (tmp_path / "e").exists()


# sha256 of render_ears(3, seed=0)'s images, before landmarks and masks existed: adding them changed no pixel
DEFAULT_IMAGES_SHA256 = "33b7884875b83697307cd94b9c3186e151d6555fa7cad884ce8d6ea861425273"


def test_landmarks_land_on_the_rendered_parts_and_the_images_are_unchanged():
    """Every part's pixel lies inside the ear's mask, every outline point on the mask's edge (its 3 x 3 pixels hold
    ear and background), the canal's pixel is darker than a ring around it; the images are those of before."""
    images, factors = render_ears(64, seed=3)
    points, mask = landmarks(factors), masks(factors)  # (64, K, 2), (64, 128, 128)
    assert points.shape == (64, len(LANDMARKS), 2) and mask.shape == (64, 128, 128) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and 0.1 < mask.mean() < 0.5
    col, row = np.floor(points[..., 0]).astype(int), np.floor(points[..., 1]).astype(int)  # (64, K)
    assert ((points >= 1) & (points < 127)).all()
    n = np.arange(64)[:, None]
    inside = mask[n, row, col]  # (64, K)
    on_edge = [LANDMARKS.index(name) for name in ("lobe_bottom", "helix_top", "helix_back")]
    assert inside[:, [k for k in range(len(LANDMARKS)) if k not in on_edge]].all()
    for k in on_edge:
        around = np.stack([mask[n[:, 0], row[:, k] + di, col[:, k] + dj] for di in (-1, 0, 1) for dj in (-1, 0, 1)])
        assert (around.min(0) == 0).all() and (around.max(0) == 1).all(), LANDMARKS[k]
    grey = images.astype(np.float64).mean(-1)  # (64, 128, 128)
    yy, xx = np.mgrid[:128, :128]
    canal = points[:, LANDMARKS.index("ear_canal")]  # (64, 2)
    for img, (cx, cy) in zip(grey, canal):
        r = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
        assert img[r < 1.5].mean() < img[(r > 6) & (r < 9)].mean() - 10
    assert hashlib.sha256(render_ears(3, seed=0)[0].tobytes()).hexdigest() == DEFAULT_IMAGES_SHA256


def test_write_synthetic_writes_landmarks_and_masks_that_data_reads_back(tmp_path):
    write_synthetic_identities(tmp_path, k=3, views=2, seed=5)
    images, factors, _ = render_identities(3, 2, 5)
    names, points = read_landmarks(tmp_path / "train_teacher.npy")
    assert names == list(LANDMARKS)
    assert np.abs(points - landmarks(factors)).max() <= 5e-4  # 3 decimals
    assert np.array_equal(read_masks(tmp_path / "train_teacher.npy"), masks(factors))
    assert np.array_equal(np.load(tmp_path / "train_teacher.npy"), images)
    assert read_landmarks(tmp_path / "val_teacher.npy")[1].shape == (6, len(LANDMARKS), 2)


def test_a_landmark_the_frame_cuts_off_is_written_empty_and_read_as_nan(tmp_path):
    """About 1 ear in 1,000 reaches past the frame (scale, elongation and offset at their ends): its landmark there is
    two empty fields, NaN once read, and no other landmark is lost."""
    lo, hi = np.array(list(FACTOR_RANGES.values())).T  # (F,), (F,): the factors as render_ears draws them
    factors = np.random.default_rng(0).uniform(lo, hi, (5000, len(FACTORS))).astype(np.float32)
    points = landmarks(factors)
    outside = ((points < 0) | (points > IMAGE_SIZE)).any(-1)  # (5000, K)
    cut = np.flatnonzero(outside.any(1))
    assert 1 <= len(cut) <= 20
    from data import save_landmarks
    np.save(tmp_path / "x_teacher.npy", np.zeros((len(cut), 128, 128, 3), np.uint8) + 100)
    with open(tmp_path / "x_landmarks.csv", "wb") as f:
        save_landmarks(LANDMARKS, points[cut])(f)
    _, read = read_landmarks(tmp_path / "x_teacher.npy")
    assert np.array_equal(np.isnan(read).any(-1), outside[cut])
    assert np.abs(read - points[cut])[~outside[cut]].max() <= 5e-4
