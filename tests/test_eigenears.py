"""Tests for eigenears.py: pca() against numpy's SVD and covariance eigendecomposition, the effective rank and the
ridge probe on known cases, and the CLI on the tiny trained run (summary, figures, factor table against np.corrcoef,
comparison of two checkpoints, one-line errors)."""
import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import eigenears as eg
from conftest import (CLI_CASES, EARLIER, ROOT, assert_error_after_progress_bars, bad_inputs,
                      check_cli_error, run_out_of_memory)
from checkpoints import load_model, read_checkpoint
from data import EarDataset
from errors import DataError
from inference import DEFAULT_BATCH_SIZE
from synth import FACTORS, render_ears

FIGURES = ("mean_ear.png", "traversals.png", "scree.png", "factors.png")
BLANK = 5  # index of the blank (invalid) training sample in fit_file
N_FIT = 32  # training ears in fit_file (31 kept: 30 PCs, the rank of 31 centred latents; fewer than --n-components 50)


def anisotropic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) Gaussian data with well separated variances along a random rotation, and an offset mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * np.geomspace(10, 0.1, d)) @ q.T + rng.normal(size=d) * 5


def signed(vectors: np.ndarray) -> np.ndarray:
    """Rows (k, D) flipped so that each one's entry of largest magnitude is positive (scikit-learn's svd_flip with
    u_based_decision=False), written out independently of pca()."""
    out = vectors.copy()
    for row in out:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    return out


def test_pca_matches_svd_and_covariance_eigendecomposition():
    x = anisotropic(300, 12)
    mean, comps, var, total = eg.pca(x, 5)
    assert comps.shape == (5, 12)
    assert var.shape == (5,)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-12)
    eigval, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))  # ascending
    np.testing.assert_allclose(var, eigval[::-1][:5], rtol=1e-9)
    np.testing.assert_allclose(comps, signed(eigvec[:, ::-1][:, :5].T), atol=1e-6)  # signs by the convention too
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    np.testing.assert_allclose(var, s[:5] ** 2 / (len(x) - 1), rtol=1e-9)
    np.testing.assert_allclose(comps @ comps.T, np.eye(5), atol=1e-12)
    assert total == pytest.approx(np.trace(np.cov(x, rowvar=False)), rel=1e-12)
    np.testing.assert_allclose(var / total, eigval[::-1][:5] / eigval.sum(), rtol=1e-9)  # explained-variance ratios


def test_pca_signs_follow_the_largest_loading_so_row_order_does_not_matter():
    """The same data in another row order (reversed, shuffled) gives the same components, signs included, and each
    component's loading of largest magnitude is positive."""
    x = anisotropic(300, 12)
    comps = eg.pca(x)[1]
    for order in (np.arange(300)[::-1], np.random.default_rng(0).permutation(300)):
        np.testing.assert_allclose(eg.pca(x[order])[1], comps, atol=1e-9)
    assert np.all(comps[np.arange(len(comps)), np.abs(comps).argmax(1)] > 0)
    np.testing.assert_allclose(eg.pca(-x)[1], comps, atol=1e-9)  # mirrored data: the same axes, the same signs


def test_pca_with_fewer_samples_than_dimensions_returns_the_rank_of_the_centred_data():
    x = anisotropic(8, 20)
    mean, comps, var, total = eg.pca(x)
    assert comps.shape == (7, 20)  # centred data has rank n - 1: no arbitrary direction of zero variance
    assert var.shape == (7,) and var[-1] > 1e-6
    assert var.sum() == pytest.approx(total)
    np.testing.assert_allclose(eg.project(x, mean, comps), x, atol=1e-9)  # all components reconstruct exactly


def test_explained_ratio_on_the_fitted_data_equals_the_eigenvalue_ratios():
    x = anisotropic(200, 10)
    mean, comps, var, total = eg.pca(x)
    np.testing.assert_allclose(eg.explained_ratio(x, mean, comps), var / total, rtol=1e-9)


@pytest.mark.parametrize("spectrum, rank", [([1.0] * 7, 7.0), ([3.0, 0, 0, 0], 1.0), ([2.0, 1.0, 1.0], 16 / 6)])
def test_effective_rank_is_the_participation_ratio_of_a_known_spectrum(spectrum, rank):
    assert eg.effective_rank(np.array(spectrum)) == pytest.approx(rank)


def test_ridge_probe_r2_is_one_for_a_linear_target_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    x_fit, x_eval = rng.normal(size=(400, 6)), rng.normal(size=(200, 6))
    w = rng.normal(size=(6, 2))
    r2 = eg.ridge_probe_r2(x_fit, x_fit @ w + 3, x_eval, x_eval @ w + 3)
    np.testing.assert_allclose(r2, 1.0, atol=1e-4)
    r2 = eg.ridge_probe_r2(x_fit, rng.normal(size=(400, 2)), x_eval, rng.normal(size=(200, 2)))
    assert np.all(np.abs(r2) < 0.05), r2  # held-out noise: nothing to predict, and a small ridge does not overfit


def test_ridge_probe_r2_without_ridge_is_least_squares_with_an_intercept():
    rng = np.random.default_rng(1)
    x_fit, x_eval = rng.normal(size=(100, 5)), rng.normal(size=(60, 5))
    w = rng.normal(size=(5, 3))
    y_fit = x_fit @ w + 2 + rng.normal(size=(100, 3))  # noisy: R^2 well below 1
    y_eval = x_eval @ w + 2 + rng.normal(size=(60, 3))
    coef = np.linalg.lstsq(np.c_[x_fit, np.ones(100)], y_fit, rcond=None)[0]  # (6, 3)
    pred = np.c_[x_eval, np.ones(60)] @ coef
    expected = 1 - ((y_eval - pred) ** 2).sum(0) / ((y_eval - y_eval.mean(0)) ** 2).sum(0)
    assert np.all(expected < 0.95)
    np.testing.assert_allclose(eg.ridge_probe_r2(x_fit, y_fit, x_eval, y_eval, ridge=0.0), expected, rtol=1e-9)


@pytest.fixture(scope="module")
def fit_file(tiny_run, tmp_path_factory) -> Path:
    """The first N_FIT training ears with sample BLANK blanked (EarDataset drops it), and their factor CSV beside."""
    d = tmp_path_factory.mktemp("fit")
    arr = np.load(tiny_run.data_dir / "train_teacher.npy")[:N_FIT]
    arr[BLANK] = 0
    np.save(d / "fit_teacher.npy", arr)
    lines = (tiny_run.data_dir / "train_factors.csv").read_text().splitlines(keepends=True)
    (d / "fit_factors.csv").write_text("".join(lines[:1 + N_FIT]))
    return d / "fit_teacher.npy"


def test_factors_csv_rows_are_aligned_to_the_kept_samples(fit_file):
    ds = EarDataset(fit_file)
    names, values = eg.read_factors(fit_file, ds)
    table = np.loadtxt(fit_file.with_name("fit_factors.csv"), delimiter=",", skiprows=1)
    assert names == list(FACTORS)
    assert len(ds) == N_FIT - 1
    assert BLANK not in ds.keep
    np.testing.assert_array_equal(values, np.delete(table, BLANK, axis=0))


def test_identity_column_is_left_out_of_the_factors(tmp_path):
    """synth.py --identities adds an `identity` column: a label, not a factor to correlate or probe."""
    images, factors = render_ears(6, seed=0)
    images[2] = 0  # blank: EarDataset drops it, and read_factors its row
    np.save(tmp_path / "x_teacher.npy", images)
    ids = np.array([0, 0, 1, 1, 2, 2])
    np.savetxt(tmp_path / "x_factors.csv", np.column_stack([factors[:, :3], ids, factors[:, 3:]]), delimiter=",",
               fmt="%.4f", header=",".join([*FACTORS[:3], "identity", *FACTORS[3:]]), comments="")
    ds = EarDataset(tmp_path / "x_teacher.npy", max_invalid=0.5)
    names, values = eg.read_factors(tmp_path / "x_teacher.npy", ds)
    assert names == list(FACTORS)
    np.testing.assert_array_equal(values.astype(np.float32), np.delete(factors, 2, axis=0))  # 4 decimals: exact
    np.savetxt(tmp_path / "x_factors.csv", ids[:, None], fmt="%d", header="identity", comments="")
    assert eg.read_factors(tmp_path / "x_teacher.npy", ds) is None  # labels only: no factor table


@pytest.fixture(scope="module")
def latents(tiny_run, fit_file) -> SimpleNamespace:
    """Reference inputs of the analysis, without data.py or inference.py: mu (float64) of the kept fit samples and of
    the validation file from model.encode on the raw .npy, and their factors from the CSVs."""
    model, _ = load_model(tiny_run.best)

    def encode(npy: Path) -> np.ndarray:
        x = torch.from_numpy(np.load(npy)).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return model.encode(x)[0].double().numpy()

    keep = [i for i in range(N_FIT) if i != BLANK]
    val = tiny_run.data_dir / "val_teacher.npy"
    factors = {name: np.loadtxt(path, delimiter=",", skiprows=1) for name, path in
               (("fit", fit_file.with_name("fit_factors.csv")), ("eval", tiny_run.data_dir / "val_factors.csv"))}
    return SimpleNamespace(fit=encode(fit_file)[keep], eval=encode(val), y_fit=factors["fit"][keep],
                           y_eval=factors["eval"])


@pytest.fixture(scope="module")
def single(tiny_run, fit_file, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("eigen")
    summary = eg.main(["--ckpt", str(tiny_run.best), "--fit-data", str(fit_file), "--out", str(out),
                       "--workers", "0", "--device", "cpu", "--batch-size", "16"])
    return SimpleNamespace(out=out, summary=summary)


def test_summary_json_keys_and_figures_written(single):
    s = json.loads((single.out / "summary.json").read_text())
    assert s == single.summary
    assert {"checkpoint", "step", "fit_data", "eval_data", "n_fit", "n_eval", "latent_dim", "n_available",
            "n_components", "explained_variance_ratio", "cumulative", "effective_rank", "recon_psnr", "factors",
            "claim_first5_over_60pct"} <= set(s)
    n = N_FIT - 1
    assert s["n_fit"] == n
    assert s["n_eval"] == 16
    r = n - 1  # the rank of n centred latents
    assert s["n_available"] == r
    assert s["n_components"] == r  # capped
    for split in ("fit", "eval"):
        assert len(s["explained_variance_ratio"][split]) == r
        assert list(s["cumulative"][split]) == ["1", "5", "10", f"{r}"]
    assert s["cumulative"]["fit"][f"{r}"] == pytest.approx(1.0)  # every PC of the fit split: all its variance
    assert list(s["recon_psnr"]) == ["full", "1", "5", "10", f"{r}"]
    for name in FIGURES:
        assert (single.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variance_ratios_and_effective_rank_match_the_covariance_eigendecomposition(single, latents):
    """Against np.linalg.eigh of the covariance of independently computed mu (not pca()'s SVD): the fit ratios are
    its eigenvalue ratios, the eval ratios the share of the eval split's squared deviation from the fit mean along
    its eigenvectors, the effective ranks the participation ratios of both splits' spectra."""
    s = single.summary
    eigval, eigvec = np.linalg.eigh(np.cov(latents.fit, rowvar=False))  # ascending, (D,), (D, D)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    rank = len(latents.fit) - 1  # centred data of N samples: N - 1 non-zero eigenvalues, the rest an arbitrary basis
    fit = eigval[:s["n_components"]] / eigval.sum()
    dev = latents.eval - latents.fit.mean(0)  # (16, D)
    ev = np.square(dev @ eigvec[:, :rank]).sum(0) / np.square(dev).sum()
    np.testing.assert_allclose(s["explained_variance_ratio"]["fit"], fit, atol=1e-6)
    np.testing.assert_allclose(s["explained_variance_ratio"]["eval"][:rank], ev, atol=1e-6)
    for c in (1, 5, 10):
        assert s["cumulative"]["fit"][f"{c}"] == pytest.approx(fit[:c].sum(), abs=1e-6)
        assert s["cumulative"]["eval"][f"{c}"] == pytest.approx(ev[:c].sum(), abs=1e-6)
    lam_eval = np.linalg.eigvalsh(np.cov(latents.eval, rowvar=False))
    assert s["effective_rank"]["fit"] == pytest.approx(eigval.sum() ** 2 / np.square(eigval).sum(), rel=1e-5)
    assert s["effective_rank"]["eval"] == pytest.approx(lam_eval.sum() ** 2 / np.square(lam_eval).sum(), rel=1e-5)


def test_full_mu_psnr_equals_the_validation_psnr_logged_by_training(single, tiny_run):
    """Decoding the full mu of the run's validation file is the measurement train.py kept as best_psnr."""
    best = read_checkpoint(tiny_run.best)["best_psnr"]
    assert single.summary["recon_psnr"]["full"] == pytest.approx(best, abs=1e-4)


def test_factor_table_is_the_correlation_of_pc_scores_with_each_factor(single, latents):
    """One row per PC, one column per factor: Pearson r of the eval split's scores on the fit split's covariance
    eigenvectors (np.linalg.eigh, independent mu, signed by the largest loading) with the factors."""
    fa = single.summary["factors"]
    corr = np.array(fa["correlation"])
    assert fa["names"] == list(FACTORS)
    assert corr.shape == (10, len(FACTORS))
    eigvec = signed(np.linalg.eigh(np.cov(latents.fit, rowvar=False))[1][:, ::-1][:, :10].T).T  # (D, 10)
    scores = (latents.eval - latents.fit.mean(0)) @ eigvec  # (16, 10)
    expected = np.array([[np.corrcoef(scores[:, j], latents.y_eval[:, f])[0, 1] for f in range(len(FACTORS))]
                         for j in range(10)])
    np.testing.assert_allclose(corr, expected, atol=1e-5)
    assert fa["top_factor"] == [FACTORS[j] for j in np.abs(expected).argmax(1)]


def test_probe_r2_is_ridge_regression_from_fit_mu_scored_on_eval(single, latents):
    """Against the ridge solution by least squares on the augmented system [X; sqrt(lambda) I] (not the normal
    equations eigenears solves), lambda = RIDGE * trace(X^T X) / D for the centred fit mu X."""
    fa = single.summary["factors"]
    x = latents.fit - latents.fit.mean(0)  # (31, D)
    y = latents.y_fit - latents.y_fit.mean(0)  # (31, F)
    d = x.shape[1]
    lam = eg.RIDGE * np.square(x).sum() / d
    w = np.linalg.lstsq(np.r_[x, np.sqrt(lam) * np.eye(d)], np.r_[y, np.zeros((d, y.shape[1]))], rcond=None)[0]
    pred = (latents.eval - latents.fit.mean(0)) @ w + latents.y_fit.mean(0)  # (16, F)
    y_eval = latents.y_eval
    expected = 1 - np.square(y_eval - pred).sum(0) / np.square(y_eval - y_eval.mean(0)).sum(0)
    assert list(fa["probe_r2"]) == list(FACTORS)
    np.testing.assert_allclose(list(fa["probe_r2"].values()), expected, atol=1e-4)
    assert fa["mean_probe_r2"] == pytest.approx(expected.mean(), abs=1e-4)


def leaves(tree, prefix: str = "") -> dict:
    """{'a/b/0': value} for every leaf of nested dicts and lists."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    return {k: v for key, sub in items for k, v in leaves(sub, f"{prefix}/{key}" if prefix else f"{key}").items()}


def test_the_same_data_in_reverse_order_gives_the_same_table_and_figures(single, tiny_run, fit_file, tmp_path):
    """eigenears on a copy of both files (and their factor CSVs) with the rows reversed: the same summary (signs of
    the correlations included), the same printed table and, to within one 8-bit level, the same figures."""
    files = {}
    for name, npy in (("fit", fit_file), ("eval", tiny_run.data_dir / "val_teacher.npy")):
        np.save(tmp_path / f"{name}_teacher.npy", np.load(npy)[::-1])
        header, *rows = npy.with_name(npy.name.replace("_teacher.npy", "_factors.csv")).read_text().splitlines(True)
        (tmp_path / f"{name}_factors.csv").write_text(header + "".join(rows[::-1]))
        files[name] = tmp_path / f"{name}_teacher.npy"
    out = tmp_path / "out"
    s = eg.main(["--ckpt", str(tiny_run.best), "--fit-data", str(files["fit"]), "--data", str(files["eval"]),
                 "--out", str(out), "--workers", "0", "--device", "cpu", "--batch-size", "16"])
    ref = single.summary
    assert s["factors"]["top_factor"] == ref["factors"]["top_factor"]
    np.testing.assert_allclose(s["factors"]["correlation"], ref["factors"]["correlation"], atol=1e-5)
    flat, flat_ref = leaves(s), leaves(ref)
    assert flat.keys() == flat_ref.keys()
    assert ref["n_available"] == ref["n_fit"] - 1  # the rank of the centred fit data: no null direction reported
    for k, v in flat.items():  # float32 sums in another order: the correlations' 1e-5 (a misaligned row moves ~0.1)
        if k not in ("fit_data", "eval_data"):
            assert v == (pytest.approx(flat_ref[k], rel=1e-5, abs=1e-5) if isinstance(v, float) else flat_ref[k]), k
    assert eg.report(s).splitlines()[2:] == eg.report(ref).splitlines()[2:]  # all but the two lines naming files
    for name in FIGURES:
        a, b = plt.imread(out / name), plt.imread(single.out / name)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1 / 255 + 1e-6, name


def test_compare_mode_gives_one_column_per_checkpoint(tiny_run, tmp_path):
    """best.pt against a copy with perturbed head weights (the tiny run's last.pt holds the same weights as best.pt,
    so a table that repeated the first checkpoint would pass with it)."""
    ckpt = read_checkpoint(tiny_run.best)
    weights = ckpt["ema"] if ckpt.get("ema") else ckpt["model"]
    weights["head.fc.weight"] += 0.5 * torch.randn(weights["head.fc.weight"].shape,
                                                   generator=torch.Generator().manual_seed(0))
    torch.save(ckpt, tmp_path / "perturbed.pt")
    images = np.load(tiny_run.data_dir / "val_teacher.npy")
    factors = (tiny_run.data_dir / "val_factors.csv").read_text().splitlines(keepends=True)
    for name, rows in (("small_fit", slice(0, 8)), ("small_eval", slice(8, 12))):  # small: decoding dominates
        np.save(tmp_path / f"{name}_teacher.npy", images[rows])
        (tmp_path / f"{name}_factors.csv").write_text(factors[0] + "".join(factors[1:][rows]))
    out = tmp_path / "out"
    s = eg.main(["--ckpt", str(tiny_run.best), "--ckpt", str(tmp_path / "perturbed.pt"), "--out", str(out),
                 "--fit-data", str(tmp_path / "small_fit_teacher.npy"),
                 "--data", str(tmp_path / "small_eval_teacher.npy"), "--workers", "0", "--device", "cpu"])
    assert s == json.loads((out / "summary.json").read_text())
    assert s["columns"] == ["best", "perturbed"]
    assert list(s["comparison"]) == ["PC1 %", "first 5 %", "first 10 %", "effective rank", "recon PSNR dB",
                                     "mean probe R^2"]
    for c, col in enumerate(s["columns"]):
        one = s["checkpoints"][col]
        assert one == json.loads((out / col / "summary.json").read_text())
        first10 = one["cumulative"]["fit"]["7"]  # 8 fit images: 7 PCs (their rank), the first 10 are all of them
        assert [v[c] for v in s["comparison"].values()] == pytest.approx([
            100 * one["explained_variance_ratio"]["fit"][0], 100 * one["cumulative"]["fit"]["5"], 100 * first10,
            one["effective_rank"]["fit"], one["recon_psnr"]["full"], one["factors"]["mean_probe_r2"]])
        for name in FIGURES:
            assert (out / col / name).is_file()
    assert s["comparison"]["recon PSNR dB"][0] != s["comparison"]["recon PSNR dB"][1]


@pytest.mark.parametrize("rows", [[0], [3, 3, 3]])  # one image; copies of one image
def test_fit_data_without_two_different_images_is_a_data_error(tiny_run, tmp_path, rows):
    images = np.load(tiny_run.data_dir / "val_teacher.npy")
    np.save(tmp_path / "few_teacher.npy", images[rows])
    match = "1 valid image\\(s\\): PCA needs at least 2" if len(rows) == 1 else "all 3 images have the same latent"
    with pytest.raises(DataError, match=f"few_teacher.npy: {match}"):
        eg.main(["--ckpt", str(tiny_run.best), "--out", str(tmp_path / "out"), "--fit-data",
                 str(tmp_path / "few_teacher.npy"), "--workers", "0", "--device", "cpu"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_one_line_error_exit_1_earlier_output_untouched(case, tiny_run, tmp_path, monkeypatch, capsys):
    """The script's __main__ block run in this process (runpy): the same code as `python eigenears.py`, without
    another interpreter start (test_eval.py runs eval.py's in a subprocess)."""
    c = bad_inputs(tiny_run, tmp_path)[case]
    c.earlier = tmp_path / "out" / "summary.json"
    c.earlier.parent.mkdir()
    c.earlier.write_text(EARLIER)
    argv = ["--ckpt", str(c.ckpt), "--out", str(c.earlier.parent), "--device", "cpu", "--workers", "0",
            *(["--data", str(c.data)] if c.data else [])]
    monkeypatch.setattr(sys, "argv", ["eigenears.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "eigenears.py"), run_name="__main__")
    captured = capsys.readouterr()
    c.returncode, c.stdout, c.stderr = exit_info.value.code, captured.out, captured.err
    check_cli_error(c)


def test_out_of_memory_is_one_line_suggesting_half_the_batch_or_the_cpu(tiny_run, tmp_path):
    r = run_out_of_memory("eigenears.py", "--ckpt", str(tiny_run.best), "--out", str(tmp_path / "out"),
                          "--workers", "0")
    b = DEFAULT_BATCH_SIZE  # no --batch-size given: the default is named, and half of it suggested
    assert_error_after_progress_bars(r, f"error: out of GPU memory at --batch-size {b}. Use a smaller batch "
                                        f"(e.g. --batch-size {b // 2}) or --device cpu.")
    assert not (tmp_path / "out").exists()  # nothing written
