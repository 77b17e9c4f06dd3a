"""Tests for synth.py: the synthetic ear renderer (determinism, factor ranges, contrast, speed), the files it writes
and its CLI."""
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, assert_one_line_error
from data import IMAGE_SIZE, validate
from synth import FACTOR_RANGES, FACTORS, main, render_ears, write_synthetic


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


def test_synth_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 3 train + 2 val synthetic ears to {tmp_path / 'd'}/ (")
    assert np.load(tmp_path / "d" / "train_teacher.npy").shape == (3, 128, 128, 3)
    assert_one_line_error(run_cli("--out", "d", "--n-train", "3", "--n-val", "2", cwd=tmp_path),
                          "train_teacher.npy: already exists", "--force")
    assert main(["--out", str(tmp_path / "d"), "--n-train", "4", "--n-val", "2", "--force"]) == 0
    assert np.load(tmp_path / "d" / "train_teacher.npy").shape == (4, 128, 128, 3)


