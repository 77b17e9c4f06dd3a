"""onnx_export.py: a student, the teacher's embedding path and a landmark model as ONNX with a dynamic uint8 input,
equal to PyTorch image by image and on the benchmark (recognition; NME / PCK), an int8 model that keeps the embedding
or the points, and nothing written over."""
import contextlib
import csv
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_export  # noqa: E402
import synth  # noqa: E402
from conftest import ROOT, assert_one_line_error  # noqa: E402
from data import read_landmarks, to_float, whole_landmarks  # noqa: E402
from errors import CheckpointError, DataError  # noqa: E402
import landmarker  # noqa: E402
from probe import landmark_scores  # noqa: E402
from student import Student, StudentConfig  # noqa: E402
from test_landmarker import lm_args  # noqa: E402

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
    """... and its first convolution, which reads the crop, stays float (its inputs come from no DequantizeLinear);
    the others run on quantised weights."""
    import onnx
    folder, report = student_export
    assert report["bytes"]["model_int8.onnx"] < 0.4 * report["bytes"]["model.onnx"]
    assert report["int8"]["cosine_min"] > 0.95
    graph = onnx.load(str(folder / "model_int8.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] not in dequantized and all(c.input[1] in dequantized for c in convs[1:])


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
        tiny_run, ids, tmp_path, monkeypatch, capsys, caplog):
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
    with caplog.at_level(logging.WARNING):
        result = onnx_export.main([*args, "--markdown", str(markdown)])
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]  # the teacher's 1-D norm scales
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


def test_an_int8_model_that_rounds_its_embedding_away_is_never_written_and_its_table_row_says_why(
        ids, tmp_path, monkeypatch):
    """quantize runs the int8 graph on the first calibration images: where its embedding is all zero and fp32's is
    not (a 10-epoch efficientnet_b0 lost 348 of 400 so), the export is one line naming the fix and writes nothing;
    in the edge table that model's int8 cells are "-", a note under the table says why and model.onnx is deployed."""
    real = onnx_export.onnx_outputs
    monkeypatch.setattr(onnx_export, "onnx_outputs", lambda path, images, **kw: tuple(
        np.zeros_like(o) if path.name == "int8.onnx" else o for o in real(path, images, **kw)))
    torch.manual_seed(0)
    folder = tmp_path / "student"
    Student(StudentConfig(pretrained=False, embed_dim=8, latent_dim=16, head_dim=16, input_size=64)).eval(
        ).save_pretrained(folder)
    before = sorted(p.name for p in folder.iterdir())
    common = ["--data", str(ids / "val_teacher.npy"), "--calib", str(ids / "train_teacher.npy")]
    with pytest.raises(DataError, match=r"model\.onnx: the int8 model's embedding is all zero for 18 of 18 "
                                        r"calibration images \(fp32: 0\); no model_int8\.onnx written: "
                                        r"--int8-float-ends keeps the head in float too$"):
        onnx_export.main([str(folder), *common])
    assert sorted(p.name for p in folder.iterdir()) == before
    result = onnx_export.main([str(folder), "--table", "--out", str(tmp_path / "edge"), *common, "--runs", "3"])
    row = result["markdown"].splitlines()[2].split(" | ")
    assert row[0] == "| mobilenet_v3_small" and row[3] == row[6] == row[11] == "-" and row[-1] == "model.onnx |"
    assert "- mobilenet_v3_small: no int8 model: the int8 model's embedding is all zero for 18 of 18" in \
        result["markdown"]
    assert sorted(p.name for p in (tmp_path / "edge" / "mobilenet_v3_small").iterdir()) == ["model.onnx", "onnx.json"]


def test_table_rows_of_one_architecture_are_named_by_what_their_paths_do_not_share():
    names = onnx_export.row_names([("mobilenet_v3_small", "runs/e20/ckpt/best.pt"), ("resnet18", "r/best.pt"),
                                   ("mobilenet_v3_small", "runs/in192/ckpt/best.pt"), ("teacher", "demo/best.pt")])
    assert names == ["mobilenet_v3_small-e20", "resnet18", "mobilenet_v3_small-in192", "teacher"]
    assert onnx_export.row_names([("teacher", "a/best.pt"), ("teacher", "a/best.pt")]) == ["teacher-1", "teacher-2"]


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


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export_into_the_folder(tmp_path):
    """SIGKILL skips staged's cleanup; the next check_free, which holds the folder's claim, removes what it left."""
    out = tmp_path / "onnx"
    (stale := out / ".onnx-export-abc123").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    (out / "notes.txt").write_text("the user's")
    onnx_export.check_free(out)
    onnx_export.release([out])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_invalid_images_beyond_max_invalid_are_one_line_naming_the_flag_the_command_has(ids, tmp_path):
    images = np.load(ids / "val_teacher.npy")
    images[:2] = 0  # 2 blank of 18: 11%
    np.save(bad := tmp_path / "val_teacher.npy", images)
    with pytest.raises(DataError, match=re.escape("more than the 5% allowed (--max-invalid)")):
        onnx_export.read_images(bad, 0.05)
    assert "--max-invalid" in onnx_export.get_parser().format_help()
    assert len(onnx_export.read_images(bad, 0.2)[0]) == 16


@pytest.fixture(scope="module")
def landmark_export(synth_dir, tmp_path_factory) -> SimpleNamespace:
    """A landmarker trained for 4 steps by landmarker.py (test_landmarker's CPU-sized run: mobilenet_v3_small at input
    64, so a resize inside the graph; its points already spread over the crop), its best.pt exported by the command
    with int8 calibrated on synth_dir's training ears; its printed lines kept. --no-augment: the 4 steps as this test's
    bounds were measured on (augmented steps give other points, int8's drift included)."""
    d = tmp_path_factory.mktemp("onnx_landmarker")
    landmarker.main(lm_args(synth_dir, d, "--epochs", "1", "--max-steps", "4", "--no-augment"))
    ckpt = d / "checkpoints" / "best.pt"
    args = [str(ckpt), "--out", str(d / "onnx"), "--data", str(synth_dir / "val_teacher.npy"), "--calib",
            str(synth_dir / "train_teacher.npy")]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        report = onnx_export.main(args)
    return SimpleNamespace(ckpt=ckpt, out=d / "onnx", args=args, report=report, printed=printed.getvalue(),
                           val=synth_dir / "val_teacher.npy")


def test_a_landmarker_exports_with_the_points_of_its_pytorch_readout_and_the_same_nme_and_pck(landmark_export):
    """The ONNX points are the PyTorch landmarker's own (its forward on the same crops) within LANDMARK_PARITY_PX,
    and NME / error / PCK@0.1 from them equal PyTorch's to 3 decimals, over the images with every landmark in the
    crop, scored against the CSV as probe.landmark_scores scores them."""
    r, out = landmark_export.report, landmark_export.out
    assert {p.name for p in out.iterdir()} == set(onnx_export.FILES)
    assert json.loads((out / "onnx.json").read_text()) == json.loads(json.dumps(r))
    images, ds = onnx_export.read_images(landmark_export.val, 0.05)
    points = read_landmarks(landmark_export.val)[1]  # (N, K, 2)
    rows = whole_landmarks(points, ds.keep)
    assert 0 < len(rows) and r["fp32"]["images"] == len(images) == 16
    with torch.no_grad():
        ref = landmarker.load_landmarker(landmark_export.ckpt)(to_float(torch.from_numpy(images).permute(0, 3, 1, 2)))
    got, = onnx_export.onnx_outputs(out / "model.onnx", images)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=onnx_export.LANDMARK_PARITY_PX)
    assert r["fp32"]["point_diff_px_max"] <= onnx_export.LANDMARK_PARITY_PX and r["fp32"]["scored_images"] == len(rows)
    true = torch.from_numpy(points[ds.keep[rows]])
    assert r["fp32"]["pytorch"] == pytest.approx(landmark_scores(ref[rows], true), rel=1e-6)
    for k, v in r["fp32"]["pytorch"].items():
        assert round(v, 3) == round(r["fp32"]["onnx"][k], 3), k
    assert "warning" not in landmark_export.printed


def test_the_landmark_graph_maps_uint8_crops_to_float_points_with_a_dynamic_batch(landmark_export):
    import onnxruntime as ort
    session = ort.InferenceSession(str(landmark_export.out / "model.onnx"), providers=["CPUExecutionProvider"])
    (image,), (landmarks,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, image.shape[1:]) == ("image", "tensor(uint8)", [128, 128, 3])
    assert (landmarks.name, landmarks.type, landmarks.shape[1:]) == ("landmarks", "tensor(float)", [8, 2])
    assert isinstance(image.shape[0], str) and landmarks.shape[0] == image.shape[0]  # the batch is symbolic
    images = np.random.default_rng(0).integers(0, 256, (7, 128, 128, 3), dtype=np.uint8)
    whole, = onnx_export.onnx_outputs(landmark_export.out / "model.onnx", images, batch_size=7)
    ones, = onnx_export.onnx_outputs(landmark_export.out / "model.onnx", images, batch_size=1)
    assert whole.shape == (7, 8, 2) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, ones, rtol=0, atol=1e-4)
    assert (whole > 0).all() and (whole < 128).all()  # soft-argmax over cell centres: inside the crop


def test_the_int8_landmarker_is_smaller_keeps_its_readout_in_float_and_reports_the_nme_change(landmark_export):
    import onnx
    r = landmark_export.report
    assert r["bytes"]["model_int8.onnx"] < 0.5 * r["bytes"]["model.onnx"]
    graph = onnx.load(str(landmark_export.out / "model_int8.onnx")).graph
    assert any(w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4 for w in graph.initializer)
    last_conv = max(i for i, n in enumerate(graph.node) if n.op_type == "Conv")  # the heatmap head
    readout = [n for n in graph.node[last_conv + 1:] if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert {"Softmax", "ReduceSum"} <= {n.op_type for n in readout}
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {o for n in readout for o in n.output}  # soft-argmax in float, the points too
    q = r["int8"]
    assert 0 < q["point_diff_px_mean"] < 2.0 and q["scored_images"] == r["fp32"]["scored_images"]
    change = q["onnx"]["nme"] - r["fp32"]["onnx"]["nme"]
    assert abs(change) < 0.02
    assert f"(NME {change:+.4f} against model.onnx)" in landmark_export.printed


@pytest.mark.parametrize("mean_px, warned", [(0.51, False), (3.0, True)])
def test_int8_landmarks_far_from_pytorchs_get_a_warning_line(tmp_path, capsys, mean_px, warned):
    report = {"bytes": {"model.onnx": 1e6, "model_int8.onnx": 3e5}, "fp32": {"point_diff_px_max": 1e-5,
              "point_diff_px_mean": 1e-6, "images": 4}, "int8": {"point_diff_px_max": 2 * mean_px,
                                                                  "point_diff_px_mean": mean_px}}
    onnx_export.print_landmark_report(report, tmp_path)
    err = capsys.readouterr().err
    assert (err == f"warning: {tmp_path / 'model_int8.onnx'}: its landmarks are 3.00 px from PyTorch's on average "
                   f"(> 1.0 px): deploy model.onnx\n") if warned else err == ""


def test_a_landmark_export_names_its_outputs_and_refuses_data_whose_landmarks_are_in_another_order(
        landmark_export, tmp_path):
    assert landmark_export.report["landmarks"][:2] == ["ear_canal", "tragus"]
    val = tmp_path / "val_teacher.npy"
    shutil.copy(landmark_export.val, val)
    rows = list(csv.reader(open(landmark_export.val.with_name("val_landmarks.csv"), newline="")))
    with open(tmp_path / "val_landmarks.csv", "w", newline="") as f:
        csv.writer(f).writerows([[r[0], r[3], r[4], r[1], r[2], *r[5:]] for r in rows])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'val_landmarks.csv'}: landmarks tragus, ear_canal")):
        onnx_export.main([str(landmark_export.ckpt), "--out", str(tmp_path / "o"), "--data", str(val)])
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_a_landmark_export_is_never_written_over_and_not_part_of_the_edge_table(landmark_export, tmp_path):
    before = {p.name: p.read_bytes() for p in landmark_export.out.iterdir()}
    with pytest.raises(DataError, match=r"holds model\.onnx, model_int8\.onnx, onnx\.json already"):
        onnx_export.main(landmark_export.args)
    assert {p.name: p.read_bytes() for p in landmark_export.out.iterdir()} == before
    table = [str(landmark_export.ckpt), "--table", "--out", str(tmp_path / "edge"), "--data",
             str(landmark_export.val), "--calib", str(landmark_export.val)]
    with pytest.raises(DataError, match=r"best\.pt: a landmark model \(landmarker\.py\); the edge table compares "
                                        r"recognition models"):
        onnx_export.main(table)
    assert not (tmp_path / "edge").exists()


def test_a_damaged_or_foreign_landmarker_is_one_line_naming_it(landmark_export, tmp_path):
    """Truncated (the command: exit 1, one line, no traceback), weights of another model, a config that cannot be
    built: each a CheckpointError naming the file, nothing written."""
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(landmark_export.ckpt.read_bytes()[:4096])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "onnx_export.py"), str(truncated), "--out", str(out), "--data",
                        str(landmark_export.val)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, str(truncated))
    ckpt = torch.load(landmark_export.ckpt, weights_only=True)
    for name, config, message in [("foreign.pt", {"landmarks": 5, "names": []}, "weights do not fit the model"),
                                  ("names.pt", {"landmarks": 5}, "landmark_config names 8 landmarks, its head 5"),
                                  ("arch.pt", {"arch": "vgg16"}, "its landmark_config cannot be built")]:
        torch.save({**ckpt, "landmark_config": {**ckpt["landmark_config"], **config}}, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}: {message}"):
            onnx_export.main([str(tmp_path / name), "--out", str(out), "--data", str(landmark_export.val)])
    assert not out.exists() or not list(out.iterdir())


def test_a_table_whose_markdown_file_cannot_be_written_is_refused_before_any_export(tmp_path):
    """--markdown in a missing folder, or a folder, is one DataError at the start: no model is read, nothing exported
    into --out (which a rerun would then find occupied)."""
    for bad in (tmp_path / "nodir" / "x.md", tmp_path):
        with pytest.raises(DataError, match=re.escape(f"--markdown {bad}: a folder, or in a folder that does not")):
            onnx_export.main([str(tmp_path / "student.pt"), "--table", "--out", str(tmp_path / "edge"), "--data",
                              str(tmp_path / "v.npy"), "--calib", str(tmp_path / "t.npy"), "--markdown", str(bad)])
        assert not (tmp_path / "edge").exists()
