"""onnx_export.py: a student and the teacher's embedding path as ONNX with a dynamic uint8 input, equal to PyTorch
image by image and on the recognition benchmark, an int8 model that keeps the embedding, and nothing written over."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_export  # noqa: E402
import synth  # noqa: E402
from errors import CheckpointError, DataError  # noqa: E402
from student import Student, StudentConfig  # noqa: E402

pytestmark = pytest.mark.slow  # exports take ~10 s each


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> Path:
    """6 synthetic identities x 3 views: val_teacher.npy with its identity labels."""
    d = tmp_path_factory.mktemp("onnx_ids")
    synth.write_synthetic_identities(d, k=6, views=3, seed=3, first_id=100)
    return d


@pytest.fixture(scope="module")
def student_export(ids, tmp_path_factory) -> tuple[Path, dict]:
    """A random mobilenet_v3_small student (input 64) saved with save_pretrained, exported into its own folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx_student") / "student"
    student = Student(StudentConfig(pretrained=False, embed_dim=8, latent_dim=16, head_dim=16, input_size=64))
    student.eval().save_pretrained(folder)
    report = onnx_export.main([str(folder), "--data", str(ids / "val_teacher.npy"), "--calib",
                               str(ids / "train_teacher.npy")])
    return folder, report


def test_a_student_exports_beside_its_card_equal_to_pytorch_image_by_image_and_on_the_benchmark(student_export):
    folder, report = student_export
    assert {"README.md", "model.onnx", "model_int8.onnx", "onnx.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "onnx.json").read_text()) == json.loads(json.dumps(report))
    fp32 = report["fp32"]
    assert fp32["images"] == 18 and fp32["cosine_min"] >= onnx_export.COSINE_PARITY
    for k, v in fp32["pytorch"].items():  # rank-1, EER, TAR@FAR from the ONNX outputs: PyTorch's to 3 decimals
        assert (v is None and fp32["onnx"][k] is None) or round(v, 3) == round(fp32["onnx"][k], 3), k


def test_the_graph_takes_uint8_crops_with_a_dynamic_batch(student_export):
    folder, _ = student_export
    images = np.random.default_rng(0).integers(0, 256, (7, 128, 128, 3), dtype=np.uint8)
    whole = onnx_export.onnx_outputs(folder / "model.onnx", images, batch_size=7)
    ones = onnx_export.onnx_outputs(folder / "model.onnx", images, batch_size=1)
    for a, b in zip(whole, ones):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert whole[0].shape == (7, 8) and whole[1].shape == (7, 16)
    np.testing.assert_allclose(np.linalg.norm(whole[0], axis=1), 1.0, rtol=1e-5)  # the embedding is L2-normalised


def test_the_int8_model_is_smaller_and_keeps_the_embedding(student_export):
    folder, report = student_export
    assert report["bytes"]["model_int8.onnx"] < 0.4 * report["bytes"]["model.onnx"]
    assert report["int8"]["cosine_min"] > 0.95


def test_the_teachers_embedding_path_exports_and_nothing_is_written_over(tiny_run, ids, tmp_path):
    data = ["--data", str(ids / "val_teacher.npy")]
    with pytest.raises(CheckpointError, match="a checkpoint file; give --out FOLDER"):
        onnx_export.main([str(tiny_run.best), *data])
    report = onnx_export.main([str(tiny_run.best), "--out", str(tmp_path / "t"), *data])
    assert report["fp32"]["cosine_min"] >= onnx_export.COSINE_PARITY and "int8" not in report
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    with pytest.raises(DataError, match=r"holds model\.onnx, onnx\.json already \(never written over\)"):
        onnx_export.main([str(tiny_run.best), "--out", str(tmp_path / "t"), *data])
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()} == before


def test_the_edge_table_has_a_row_per_model_and_the_pixels_with_finite_figures_and_only_appends(
        tiny_run, ids, tmp_path, monkeypatch, capsys):
    """--table: the smallest student arch and the teacher exported and int8-quantised into OUT/<name>/, one row each
    and one for the pixels, finite numbers; the markdown file is appended to, a second run into OUT is refused."""
    torch.manual_seed(0)
    folder = tmp_path / "shufflenet"
    Student(StudentConfig(arch="shufflenet_v2_x0_5", pretrained=False, embed_dim=8, latent_dim=16, head_dim=16,
                          input_size=64)).eval().save_pretrained(folder)
    markdown = tmp_path / "BENCH.md"
    markdown.write_text("# earlier results\n")
    monkeypatch.setattr(onnx_export, "INT8_COSINE", 1.01)  # every int8 model below it: one warning line each
    args = [str(folder), str(tiny_run.best), "--table", "--out", str(tmp_path / "edge"), "--data",
            str(ids / "val_teacher.npy"), "--calib", str(ids / "train_teacher.npy"), "--runs", "3"]
    result = onnx_export.main([*args, "--markdown", str(markdown)])
    assert list(result["rows"]) == ["shufflenet_v2_x0_5", "teacher"]
    for name, row in result["rows"].items():
        assert {p.name for p in (tmp_path / "edge" / name).iterdir()} == set(onnx_export.FILES)
        assert row["fp32"]["cosine_min"] >= onnx_export.COSINE_PARITY
        assert all(np.isfinite(v) and v > 0 for v in row["latency_ms"].values())
        assert row["bytes"]["model_int8.onnx"] < row["bytes"]["model.onnx"]
    assert result["rows"]["shufflenet_v2_x0_5"]["params"] == sum(p.numel() for p in Student.from_pretrained(
        folder).parameters())
    lines = result["markdown"].splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| shufflenet_v2_x0_5", "| teacher",
                                                           "| raw pixels, centred"]
    assert "nan" not in result["markdown"] and "inf" not in result["markdown"]
    text = markdown.read_text()
    assert text.startswith("# earlier results\n") and text.endswith(result["markdown"]) and "--table" in text
    assert capsys.readouterr().err.count("warning: ") == 2
    with pytest.raises(DataError, match="holds model.onnx, model_int8.onnx, onnx.json already"):
        onnx_export.main([*args, "--markdown", str(markdown)])
    assert markdown.read_text() == text


def test_an_interrupted_export_leaves_no_file_and_the_folder_free(tmp_path):
    """staged: what an export wrote before Ctrl-C is removed with its temporary folder, so the rerun into the same
    --out is not refused; a clean end moves every file into place."""
    out = tmp_path / "onnx"
    with pytest.raises(KeyboardInterrupt):
        with onnx_export.staged(out) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(out.iterdir()) == []
    onnx_export.check_free(out)  # not refused
    with onnx_export.staged(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"whole")
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"whole"
