"""Tests for eval.py on the tiny trained run: output files, metrics against scikit-image on the model's own
reconstructions, exported latents against model.encode, determinism, and one-line CLI errors that never clobber."""
import csv
import json
import pickle
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import skimage.metrics
import torch

import eval as ev
from conftest import (CLI_CASES, EARLIER, ROOT, Hostile, assert_error_after_progress_bars, bad_inputs,
                      check_cli_error, run_out_of_memory)
from data import EarDataset
from inference import autocast, checkpoint_info, resolve_precision
from model import load_model, read_checkpoint

BLANK = 3  # index of the blank (invalid) sample in the file built by holey_file


@pytest.fixture(scope="module")
def holey_file(tiny_run, tmp_path_factory) -> Path:
    """The 16 validation ears plus 5 training ears, with sample BLANK set to a constant grey: EarDataset drops it
    (1 of 21 < 5%), so kept indices and file indices differ."""
    val = np.load(tiny_run.data_dir / "val_teacher.npy")
    train = np.load(tiny_run.data_dir / "train_teacher.npy")
    arr = np.concatenate([val, train[:5]])
    arr[BLANK] = 128
    path = tmp_path_factory.mktemp("holey") / "holey_teacher.npy"
    np.save(path, arr)
    return path


@pytest.fixture(scope="module")
def runs(tiny_run, holey_file, tmp_path_factory) -> SimpleNamespace:
    """eval.main twice on holey_file, the first time with --export-latents."""
    d = tmp_path_factory.mktemp("eval")
    common = ["--workers", "0", "--device", "cpu", "--batch-size", "8"]
    ev.main([str(tiny_run.best), "--data", str(holey_file), "--out", str(d / "a"),
             "--export-latents", str(d / "mu.npy"), *common])
    ev.main([str(tiny_run.best), "--data", str(holey_file), "--out", str(d / "b"), *common])
    return SimpleNamespace(dir=d, a=d / "a", b=d / "b", mu=d / "mu.npy", index=d / "mu_index.npy")


@pytest.fixture(scope="module")
def reference(tiny_run, holey_file) -> SimpleNamespace:
    """The model's own outputs on the kept samples of holey_file, read straight from the .npy (no data.py):
    x, recon (N, 3, 128, 128) float32 and mu (N, D), for the file indices `keep`."""
    model, _ = load_model(tiny_run.best)
    arr = np.load(holey_file)
    keep = np.array([i for i in range(len(arr)) if i != BLANK])
    x = torch.from_numpy(arr[keep]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        out = model(x)
    return SimpleNamespace(keep=keep, x=x, recon=out["recon"], mu=out["mu"])


def read_csv(path: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(open(path)))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_outputs_written_one_csv_row_per_kept_image_and_a_valid_png(runs, reference):
    metrics = json.loads((runs.a / "metrics.json").read_text())
    assert set(metrics) == {"n_images", "n_invalid", "checkpoint", "step", "data", "psnr", "ssim", "mae", "mse", "kl"}
    for k in ("psnr", "ssim"):
        assert set(metrics[k]) == {"mean", "std", "median", "p5", "target", "meets_target"}
    assert metrics["psnr"]["target"] == 28
    assert metrics["ssim"]["target"] == 0.85
    assert metrics["step"] == 16
    assert metrics["n_invalid"] == 1
    table = read_csv(runs.a / "per_image.csv")
    assert list(table) == ["index", "psnr", "ssim", "mae", "mse", "kl"]
    assert metrics["n_images"] == len(table["index"]) == len(reference.keep) == 20
    np.testing.assert_array_equal(table["index"], reference.keep)  # the blank sample is filtered, indices kept
    png = runs.a / "reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[:2] == (1400, 1300)  # 9 rows x 8 columns: figsize (13, 14) at dpi 100


def test_default_data_is_the_validation_file_of_the_run_that_made_the_checkpoint(tiny_run):
    info = checkpoint_info(read_checkpoint(tiny_run.best))
    assert info["val"] == tiny_run.data_dir / "val_teacher.npy"
    assert info["train"] == tiny_run.data_dir / "train_teacher.npy"
    assert info["step"] == 16


def test_per_image_psnr_ssim_equal_scikit_image_on_the_models_reconstructions(runs, reference):
    table = read_csv(runs.a / "per_image.csv")
    x = reference.x.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    r = reference.recon.permute(0, 2, 3, 1).numpy()
    sk_psnr = [skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1) for a, b in zip(x, r)]
    sk_ssim = [skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                     use_sample_covariance=False, data_range=1) for a, b in zip(x, r)]
    np.testing.assert_allclose(table["psnr"], sk_psnr, atol=1e-3)
    np.testing.assert_allclose(table["ssim"], sk_ssim, atol=1e-3)
    np.testing.assert_allclose(table["mae"], np.abs(r - x).mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(table["mse"], np.square(r - x).mean(axis=(1, 2, 3)), atol=1e-6)


def test_summary_statistics_are_those_of_per_image_csv(runs):
    """Against Python's statistics module on the CSV columns: mean, population std, median, and the 5th percentile
    by linear interpolation between order statistics (quantiles 'inclusive', cut point 1 of 20)."""
    metrics = json.loads((runs.a / "metrics.json").read_text())
    table = read_csv(runs.a / "per_image.csv")
    for k, target in (("psnr", 28.0), ("ssim", 0.85)):
        v = table[k].tolist()
        got = metrics[k]
        assert got["mean"] == pytest.approx(statistics.fmean(v), rel=1e-9)
        assert got["std"] == pytest.approx(statistics.pstdev(v), rel=1e-9)
        assert got["median"] == pytest.approx(statistics.median(v), rel=1e-9)
        assert got["p5"] == pytest.approx(statistics.quantiles(v, n=20, method="inclusive")[0], rel=1e-9)
        assert got["p5"] < got["median"]  # 20 distinct values: the 5th percentile lies below the median
        assert got["meets_target"] == (statistics.fmean(v) >= target)
    for k in ("mae", "mse", "kl"):
        assert metrics[k] == pytest.approx(statistics.fmean(table[k].tolist()), rel=1e-9)


def test_exported_latents_are_model_encode_mu_of_the_kept_samples(runs, reference):
    mu, index = np.load(runs.mu, allow_pickle=False), np.load(runs.index, allow_pickle=False)
    assert mu.dtype == np.float32
    assert index.dtype == np.int64
    assert mu.shape == tuple(reference.mu.shape)
    assert index.shape == (len(reference.keep),)
    np.testing.assert_array_equal(index, reference.keep)
    np.testing.assert_allclose(mu, reference.mu.numpy(), atol=1e-5, rtol=1e-5)


def test_kl_column_is_the_per_image_gaussian_kl(runs, reference, tiny_run):
    model, _ = load_model(tiny_run.best)
    with torch.no_grad():
        mu, logvar = model.encode(reference.x)
    q = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu.double()), torch.ones_like(mu.double()))
    kl = torch.distributions.kl_divergence(q, p).sum(-1)  # (N,)
    np.testing.assert_allclose(read_csv(runs.a / "per_image.csv")["kl"], kl.numpy(), rtol=1e-4)


def test_two_runs_write_identical_metrics(runs):
    for name in ("metrics.json", "per_image.csv"):
        assert (runs.a / name).read_bytes() == (runs.b / name).read_bytes()


# -----------------------------------------------------------------------------
# precision and memory

@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, native_bf16, expected):
    """A GPU that only emulates bf16 (is_bf16_supported() is True by default there) gets fp16; the CPU gets fp32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or
                        including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32


def test_bf16_forward_pass_metrics_are_computed_in_float32_on_its_outputs(tiny_run, holey_file, reference):
    """Under bf16 autocast the model's outputs change (the autocast is on), but every metric is the float64
    scikit-image value of those bf16 outputs (within fp32 rounding), not a bf16 computation of it."""
    model, _ = load_model(tiny_run.best)
    got = ev.per_image_metrics(model, EarDataset(holey_file), 8, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        outs = [(model.decode(mu).double(), mu.double(), logvar.double())
                for mu, logvar in (model.encode(x) for x in reference.x.contiguous().split(8))]  # eval's batches
    recon, mu, logvar = (torch.cat(t) for t in zip(*outs))
    assert got["mu"].dtype == np.float32
    assert got["psnr"].dtype == np.float64
    np.testing.assert_array_equal(got["mu"], mu.float().numpy())  # contiguous input as eval's: the same kernels
    assert np.abs(got["mu"] - reference.mu.numpy()).max() > 1e-3  # bf16 rounding: the model did not run in fp32
    x, r = reference.x.double().permute(0, 2, 3, 1).numpy(), recon.permute(0, 2, 3, 1).numpy()
    sk_psnr = [skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1) for a, b in zip(x, r)]
    sk_ssim = [skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                     use_sample_covariance=False, data_range=1) for a, b in zip(x, r)]
    np.testing.assert_allclose(got["psnr"], sk_psnr, atol=1e-4)
    np.testing.assert_allclose(got["ssim"], sk_ssim, atol=1e-5)
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)  # (N,) float64 from the bf16 mu, logvar
    np.testing.assert_allclose(got["kl"], kl.numpy(), rtol=1e-6)


def test_out_of_memory_is_one_line_suggesting_half_the_batch_or_the_cpu(tiny_run, tmp_path):
    r = run_out_of_memory("eval.py", str(tiny_run.best), "--out", str(tmp_path / "out"), "--batch-size", "6",
                          "--workers", "0")
    assert_error_after_progress_bars(r, "error: out of GPU memory at --batch-size 6. Use a smaller batch "
                                        "(e.g. --batch-size 3) or --device cpu.")
    assert not (tmp_path / "out").exists()  # nothing written


# -----------------------------------------------------------------------------
# CLI errors

@pytest.fixture(scope="module")
def cli_errors(tiny_run, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """`python eval.py CKPT [--data FILE] --out OUT` for every bad input, with an earlier OUT/metrics.json in place;
    the processes run at once (each interpreter start costs seconds of imports)."""
    d = tmp_path_factory.mktemp("eval_cli")
    cases = bad_inputs(tiny_run, d)
    procs = {}
    for case, c in cases.items():
        c.earlier = d / f"out_{case}" / "metrics.json"
        c.earlier.parent.mkdir()
        c.earlier.write_text(EARLIER)
        argv = [str(c.ckpt), "--out", str(c.earlier.parent), *(["--data", str(c.data)] if c.data else [])]
        procs[case] = subprocess.Popen([sys.executable, str(ROOT / "eval.py"), *argv], cwd=d,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, c in cases.items():
        c.stdout, c.stderr = procs[case].communicate(timeout=120)
        c.returncode = procs[case].returncode
    return cases


def test_hostile_checkpoint_payload_really_runs_when_unpickled(tmp_path):
    """Control for the CLI test: the marker is created by an unsafe load, so its absence there means something."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Hostile(marker)))
    assert marker.exists()


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_checkpoint_one_line_error_exit_1_earlier_output_untouched(cli_errors, case):
    check_cli_error(cli_errors[case])
