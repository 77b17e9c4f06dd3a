"""Tests for eval.py on the tiny trained run: output files, metrics against scikit-image on the model's own
reconstructions, exported latents against model.encode, determinism, one-line CLI errors that never clobber, and
--identity (against recognition.py on the model's own mu), --lpips (against losses.LPIPS) and --export (the exported
directory evaluates and analyses as the checkpoint does)."""
import csv
import json
import pickle
import runpy
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

import eigenears as eg
import eval as ev
from conftest import (CLI_CASES, EARLIER, ROOT, Hostile, assert_error_after_progress_bars, assert_one_line_error,
                      bad_inputs, check_cli_error, run_out_of_memory)
from checkpoints import load_model, read_checkpoint
from data import EarDataset
from errors import DataError
from inference import autocast, checkpoint_info
from losses import LPIPS
from recognition import probe_ranks, recognition_metrics

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
    x, recon (N, 3, 128, 128) float32, mu (N, D) and embedding (N, E): mu's first identity_dims entries (E = D / 8, the
    default), L2-normalised, for the file indices `keep`."""
    model, _ = load_model(tiny_run.best)
    arr = np.load(holey_file)
    keep = np.array([i for i in range(len(arr)) if i != BLANK])
    x = torch.from_numpy(arr[keep]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        out = model(x)
    k = model.cfg.identity_dims
    assert 0 < k < out["mu"].shape[1]
    embedding = torch.nn.functional.normalize(out["mu"][:, :k], dim=1)
    return SimpleNamespace(keep=keep, x=x, recon=out["recon"], mu=out["mu"], embedding=embedding)


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


# -----------------------------------------------------------------------------
# --identity, --lpips, --export: one run with all three on a labelled copy of holey_file

# identity of each row of holey_file (21 rows; row BLANK is dropped): -1 unlabelled; identities 1 (its other image is
# the blank one), 5 and 7 have one kept image each, so they are not probes
IDS = [0, 0, 0, 1, 1, -1, 2, 2, 2, 3, 3, 3, 4, 4, -1, 5, 6, 6, 6, 7, -1]


@pytest.fixture(scope="module")
def labelled(holey_file, tmp_path_factory) -> Path:
    """A copy of holey_file as ears_teacher.npy with ears_factors.csv beside it (synth.py's identity mode: factor
    columns and an identity column)."""
    d = tmp_path_factory.mktemp("labelled")
    path = d / "ears_teacher.npy"
    path.write_bytes(holey_file.read_bytes())
    (d / "ears_factors.csv").write_text("scale,identity\n" + "".join(f"0.5,{i}\n" for i in IDS))
    return path


@pytest.fixture(scope="module")
def full(tiny_run, labelled, vgg_file, tmp_path_factory) -> SimpleNamespace:
    """eval.main with --identity --lpips --vgg-weights --export on `labelled`."""
    d = tmp_path_factory.mktemp("full")
    metrics = ev.main([str(tiny_run.best), "--data", str(labelled), "--out", str(d / "out"), "--identity", "--lpips",
                       "--vgg-weights", str(vgg_file), "--export", str(d / "teacher"),
                       "--workers", "0", "--device", "cpu", "--batch-size", "8"])
    return SimpleNamespace(out=d / "out", export=d / "teacher", metrics=metrics)


def kept_labels(reference) -> np.ndarray:
    return np.array(IDS, dtype=np.int64)[reference.keep]


def approx(metrics: dict, rel: float) -> dict:
    """pytest.approx of each number of a recognition_metrics dict; None (a TAR@FAR too few pairs measure) as is."""
    return {k: v if v is None or isinstance(v, str) else pytest.approx(v, rel=rel) for k, v in metrics.items()}


def test_identity_metrics_are_those_of_the_embedding_with_all_of_mu_beside_them(full, reference):
    metrics = json.loads((full.out / "metrics.json").read_text())
    got = metrics["identity"]
    assert got == approx(recognition_metrics(reference.embedding.numpy(), kept_labels(reference)), rel=1e-6)
    mu = metrics["identity_mu"]  # the embedding reads part of mu: all of mu is reported too
    assert mu == approx(recognition_metrics(reference.mu.numpy(), kept_labels(reference)), rel=1e-9)
    assert f"all of mu, for comparison: rank-1 {mu['rank1']:.3f}" in ev.report(full.metrics)
    assert got["n_unlabelled"] == 3  # rows 5, 14, 20
    assert got["n_single"] == 3  # identities 1, 5, 7
    assert got["n_probes"] == 14


def test_per_image_csv_gains_identity_and_rank_columns(full, reference):
    table = read_csv(full.out / "per_image.csv")
    assert list(table) == ["index", "psnr", "ssim", "mae", "mse", "kl", "lpips", "identity", "rank"]
    np.testing.assert_array_equal(table["index"], reference.keep)
    np.testing.assert_array_equal(table["identity"], kept_labels(reference))
    np.testing.assert_array_equal(table["rank"], probe_ranks(reference.embedding.numpy(), kept_labels(reference)))


def test_report_counts_unlabelled_images_and_prints_chance_beside_rank_1(full):
    text = ev.report(full.metrics)
    m = full.metrics["identity"]
    assert "17 labelled images of 8 identities (3 unlabelled: left out); 14 probes (3 alone" in text
    assert f"rank-1 {m['rank1']:.3f} (chance {m['chance_rank1']:.3f})" in text


def test_retrieval_is_the_top_5_by_cosine_similarity_among_other_labelled_images(full, reference):
    mu, labels = reference.mu.numpy().astype(np.float64), kept_labels(reference)
    ranks = probe_ranks(mu, labels)
    found = ev.retrieval(mu, labels, ranks)
    assert len(set(found["query"].tolist())) == 6
    unit = mu / np.linalg.norm(mu, axis=1, keepdims=True)
    for r, q in enumerate(found["query"]):
        assert ranks[q] > 0  # a probe: another image of its identity is in the gallery
        others = sorted((j for j in range(len(labels)) if j != q and labels[j] != -1), key=lambda j: -unit[q] @ unit[j])
        assert found["match"][r].tolist() == others[:5]
        np.testing.assert_allclose(found["similarity"][r], [unit[q] @ unit[j] for j in others[:5]], rtol=1e-12)
        assert found["correct"][r].tolist() == [labels[j] == labels[q] for j in others[:5]]
    again = ev.retrieval(mu, labels, ranks)
    np.testing.assert_array_equal(again["query"], found["query"])  # seeded
    png = full.out / "retrieval.png"
    assert matplotlib.image.imread(png).shape[:2] == (1140, 960)  # 6 rows x 6 columns: figsize (9.6, 11.4) at dpi 100


def test_lpips_column_is_lpips_of_each_reconstruction_and_its_mean_in_metrics(full, reference, vgg_file):
    table = read_csv(full.out / "per_image.csv")
    rows = [0, 5, 11, 19]  # a few rows: the VGG is the slow part
    expected = LPIPS(str(vgg_file))(reference.recon[rows], reference.x[rows]).numpy()  # (4,)
    np.testing.assert_allclose(table["lpips"][rows], expected, rtol=1e-4, atol=1e-6)
    assert np.ptp(expected) > 1e-3  # images differ: a column of the wrong rows would not match
    metrics = json.loads((full.out / "metrics.json").read_text())
    assert metrics["lpips"] == pytest.approx(statistics.fmean(table["lpips"].tolist()), rel=1e-9)
    assert metrics["lpips_vgg_weights"] == str(vgg_file)


def test_vgg_weights_without_lpips_is_a_usage_error(tiny_run, vgg_file, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main([str(tiny_run.best), "--vgg-weights", str(vgg_file)])
    assert e.value.code == 2
    assert "--vgg-weights is the backbone of --lpips: add --lpips" in capsys.readouterr().err


def test_export_card_holds_the_evaluated_metrics(full, tiny_run):
    assert sorted(p.name for p in full.export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((full.export / "config.json").read_text())
    assert config["step"] == 16
    card = (full.export / "README.md").read_text()
    m = full.metrics
    for row in (f"| PSNR (dB, mean) | {m['psnr']['mean']:.4g} |", f"| LPIPS (VGG v0.1, mean) | {m['lpips']:.4g} |",
                f"| rank-1 chance | {m['identity']['chance_rank1']:.4g} |", "| images | 20 |",
                "| data | ears_teacher.npy |"):
        assert row in card


def test_eval_of_the_exported_directory_gives_the_same_per_image_metrics(full, labelled, tmp_path):
    metrics = ev.main([str(full.export), "--data", str(labelled), "--out", str(tmp_path), "--workers", "0",
                       "--device", "cpu", "--batch-size", "8"])
    assert metrics["step"] == 16
    assert metrics["psnr"]["mean"] == pytest.approx(full.metrics["psnr"]["mean"], rel=1e-6)
    got, expected = read_csv(tmp_path / "per_image.csv"), read_csv(full.out / "per_image.csv")
    for k in ("psnr", "ssim", "kl"):
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6)


def test_eigenears_on_the_exported_directory_equals_eigenears_on_the_checkpoint(full, tiny_run, tmp_path):
    """Compare mode, the export beside the checkpoint it came from, on small files (decoding the traversals
    dominates the time)."""
    images = np.load(tiny_run.data_dir / "val_teacher.npy")
    for name, rows in (("small_fit", slice(0, 8)), ("small_eval", slice(8, 12))):
        np.save(tmp_path / f"{name}_teacher.npy", images[rows])
    s = eg.main(["--ckpt", str(full.export), "--ckpt", str(tiny_run.best), "--out", str(tmp_path / "out"),
                 "--fit-data", str(tmp_path / "small_fit_teacher.npy"),
                 "--data", str(tmp_path / "small_eval_teacher.npy"), "--workers", "0", "--device", "cpu"])
    assert s["columns"] == ["teacher", "best"]
    from_dir, from_pt = s["checkpoints"]["teacher"], s["checkpoints"]["best"]
    assert from_dir["checkpoint"] == str(full.export)
    assert from_dir.keys() == from_pt.keys()
    assert from_dir["step"] == from_pt["step"] == 16
    np.testing.assert_allclose(from_dir["explained_variance_ratio"]["fit"], from_pt["explained_variance_ratio"]["fit"],
                               rtol=1e-5)
    assert from_dir["recon_psnr"] == pytest.approx(from_pt["recon_psnr"], rel=1e-6)

def run_script(script: str, argv: list[str], monkeypatch, capsys) -> SimpleNamespace:
    """`python SCRIPT ARGV` in this process (runpy: the script's own __main__ block) -> returncode, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=e.value.code, stdout=captured.out, stderr=captured.err)


def earlier_output(d: Path) -> Path:
    out = d / "out"
    out.mkdir()
    (out / "metrics.json").write_text(EARLIER)
    return out


def assert_untouched(out: Path) -> None:
    assert (out / "metrics.json").read_text() == EARLIER
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_identity_without_labels_is_one_line_naming_the_files_looked_for(tiny_run, holey_file, tmp_path,
                                                                         monkeypatch, capsys):
    out = earlier_output(tmp_path)
    r = run_script("eval.py", [str(tiny_run.best), "--data", str(holey_file), "--identity", "--out", str(out),
                               "--export", str(out / "teacher"), "--workers", "0", "--device", "cpu"],
                   monkeypatch, capsys)
    assert_one_line_error(r, f"{holey_file}: --identity needs identity labels",
                          f"{holey_file.with_name('holey_index.csv')} does not exist",
                          f"{holey_file.with_name('holey_factors.csv')} does not exist")
    assert_untouched(out)  # no outputs and no export


@pytest.mark.parametrize("which", ["data", "index"])
def test_export_latents_never_writes_over_a_file(tiny_run, holey_file, tmp_path, monkeypatch, capsys, which):
    """Not the data evaluated, not earlier latents or their _index.npy: refused before the work, nothing written."""
    data = tmp_path / "ears_teacher.npy"
    data.write_bytes(holey_file.read_bytes())
    target = data if which == "data" else tmp_path / "mu.npy"
    if which == "index":
        (tmp_path / "mu_index.npy").write_text(EARLIER)
    r = run_script("eval.py", [str(tiny_run.best), "--data", str(data), "--export-latents", str(target), "--out",
                               str(tmp_path / "out"), "--workers", "0", "--device", "cpu"], monkeypatch, capsys)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    existing = data if which == "data" else tmp_path / "mu_index.npy"
    assert f"--export-latents {target}: {existing} exists (it is never overwritten)" in r.stderr
    assert data.read_bytes() == holey_file.read_bytes() and not (tmp_path / "out").exists()
    assert which == "data" or (tmp_path / "mu_index.npy").read_text() == EARLIER


def test_identity_labels_with_nothing_to_identify_fail_before_the_pass(tiny_run, holey_file, tmp_path, monkeypatch):
    """synth.py --views 1: every identity has one image, so there is no probe; said before the images are encoded."""
    path = tmp_path / "single_teacher.npy"
    path.write_bytes(holey_file.read_bytes())
    (tmp_path / "single_factors.csv").write_text("identity\n" + "".join(f"{i}\n" for i in range(len(IDS))))
    monkeypatch.setattr(ev, "per_image_metrics", lambda *a, **k: pytest.fail("the pass over the images ran"))
    with pytest.raises(DataError, match=rf"{path}: --identity: all \d+ labelled images have distinct identities"):
        ev.main([str(tiny_run.best), "--data", str(path), "--identity", "--out", str(tmp_path / "out"),
                 "--workers", "0", "--device", "cpu"])
    assert not (tmp_path / "out").exists()


def test_lpips_offline_is_one_line_with_eval_fixes_not_training_ones(tiny_run, tmp_path, monkeypatch, capsys,
                                                                     offline_torch_hub):
    out = earlier_output(tmp_path)
    r = run_script("eval.py", [str(tiny_run.best), "--lpips", "--out", str(out), "--workers", "0", "--device", "cpu"],
                   monkeypatch, capsys)
    assert_one_line_error(r, "Could not load VGG16 weights for LPIPS", str(offline_torch_hub / "hub" /
                          "checkpoints"), "URLError", "--vgg-weights PATH", "evaluate without `--lpips`")
    assert "--perceptual-weight" not in r.stderr
    assert_untouched(out)


@pytest.mark.parametrize("script", ["eval.py", "eigenears.py"])
def test_exported_directory_without_data_flags_is_one_line_error(full, holey_file, script, tmp_path, monkeypatch,
                                                                 capsys):
    """An export names no data files: eval needs --data, eigenears --fit-data (and --data)."""
    out = earlier_output(tmp_path)
    if script == "eval.py":
        argv, missing, flag = [str(full.export)], "val", "--data"
    else:
        argv, missing, flag = ["--ckpt", str(full.export), "--data", str(holey_file)], "train", "--fit-data"
    r = run_script(script, [*argv, "--out", str(out), "--workers", "0", "--device", "cpu"], monkeypatch, capsys)
    assert_one_line_error(r, f"{full.export}: holds no run config naming its {missing} file; give it with {flag}")
    assert_untouched(out)


def test_pixel_baseline_equals_recognition_metrics_on_the_centred_pixels(full, reference):
    pixels = reference.x.flatten(1).numpy().astype(np.float64)  # (N, 3 * 128 * 128), read without data.py
    expected = recognition_metrics(pixels - pixels.mean(axis=0), kept_labels(reference))
    got = json.loads((full.out / "metrics.json").read_text())["identity_pixels"]
    assert got == approx(expected, rel=1e-6)
    assert got["rank1"] != pytest.approx(recognition_metrics(pixels, kept_labels(reference))["rank1"]) or \
        got["eer"] != pytest.approx(recognition_metrics(pixels, kept_labels(reference))["eer"])  # centring matters
    card = (full.export / "README.md").read_text()
    assert f"| rank-1, baseline: centred raw pixels | {got['rank1']:.4g} |" in card
    assert f"baseline, centred raw pixels of the same images: rank-1 {got['rank1']:.3f}" in ev.report(full.metrics)


def test_results_of_another_checkpoint_or_data_are_never_replaced_without_force(tiny_run, tmp_path):
    """One rule for every command that writes results (files.check_replace): eval.py and eigenears.py refuse an --out
    holding another checkpoint's results, naming them, before any work; the same inputs, or --force, replace."""
    from errors import OutputError
    out, common = tmp_path / "out", ["--workers", "0", "--batch-size", "8"]
    ev.main([str(tiny_run.best), "--out", str(out), *common])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=rf"^{out / 'metrics.json'}: holds the results of checkpoint "
                                          rf"{tiny_run.best}, data .*val_teacher\.npy: pass --force to replace"):
        ev.main([str(tiny_run.last), "--out", str(out), *common])
    with pytest.raises(OutputError, match="holds the results of checkpoint"):
        ev.main([str(tiny_run.best), "--out", str(out), "--data", str(tiny_run.data_dir / "train_teacher.npy"),
                 *common])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    ev.main([str(tiny_run.best), "--out", str(out), *common])  # the same inputs again: its own results
    ev.main([str(tiny_run.last), "--out", str(out), "--force", *common])
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(tiny_run.last)
    eg.main(["--ckpt", str(tiny_run.best), "--out", str(tmp_path / "eig"), "--workers", "0"])
    with pytest.raises(OutputError, match="summary.json: holds the results of checkpoint"):
        eg.main(["--ckpt", str(tiny_run.last), "--out", str(tmp_path / "eig"), "--workers", "0"])
