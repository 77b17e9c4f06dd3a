"""Ship a model as ONNX: a student, or the teacher's embedding path (encoder and head, no decoder), with a dynamic
batch, checked against PyTorch image by image and on a recognition benchmark, and quantised to int8. A landmark
model (landmarker.py's best.pt) ships the same way, its points checked in pixels and by NME / PCK (docs/landmarks.md).

    python onnx_export.py demo/checkpoints_student/best.pt --out demo/onnx_student \\
        --data demo/identities/val_teacher.npy --calib demo/data/train_teacher.npy

writes OUT/model.onnx, OUT/model_int8.onnx (with --calib) and OUT/onnx.json (parity and benchmark figures), never
over an existing file. The graph takes what a deployer has:

    image      uint8 (B, 128, 128, 3), RGB, 0-255      (resizing and normalisation are inside the graph)
    embedding  float32 (B, E)   the L2-normalised identity embedding (cosine similarity compares two ears)
    mu         float32 (B, D)   the teacher's latent mean (a student's estimate of it)
    landmarks  float32 (B, K, 2)  a landmark model's only output: (x, y) in pixels of the 128 crop, as its PyTorch
                                  readout (probe.soft_argmax): pixel (i, j) covers [j, j + 1) x [i, i + 1)

Parity, the field's way (insightface's ONNX checks, timm's onnx utils): the cosine of every image's embedding
against PyTorch's (>= COSINE_PARITY), and rank-1, EER and TAR@FAR recomputed from the ONNX outputs (equal to
PyTorch's to 3 decimals). int8: onnxruntime's static quantisation, QDQ, per-channel weights, calibrated on training
ears (quantize_dynamic fails on this exporter's graphs: its shape inference meets the exporter's stale value_info);
the first convolution stays float (it reads the raw crop), --int8-float-ends keeps the head's linear layers in float
too (face recognition's habit: both ends). A
warning line says when the int8 embeddings fall below INT8_COSINE against fp32's (then deploy model.onnx).

The edge table (docs/students.md): every model exported into OUT/<name>/, its size, latency at batch 1 on one CPU
thread (PyTorch eager, onnxruntime fp32 and int8) and recognition figures on new identities, beside the pixels:

    python onnx_export.py STUDENT.pt ... TEACHER.pt --table --out edge --data demo/identities/val_teacher.npy \
        --calib demo/data/train_teacher.npy --markdown BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from cli import HelpFormatter, fraction, positive_int, safe_console
from data import EarDataset, landmarks_file, read_identities, read_landmarks, whole_landmarks
from errors import CheckpointError, DataError, OutputError
from files import atomic_write, check_output_dir, claim, release, save_json
from landmarker import LandmarkConfig, Landmarker, check_data_landmarks, load_landmarker
from probe import landmark_scores
from recognition import label_problem, recognition_metrics
from student import Student, is_student_folder, load_student
from checkpoints import load_model, read_checkpoint

if TYPE_CHECKING:
    import onnx

COSINE_PARITY = 0.9999  # every image's ONNX embedding against PyTorch's, fp32
LANDMARK_PARITY_PX = 1e-3  # every point of the ONNX landmarks against PyTorch's, fp32, in pixels of the 128 crop
INT8_COSINE = 0.98  # int8 against fp32, min over images: below it the int8 model is not the same embedding (warning)
# int8 landmarks against PyTorch's, mean over points, in pixels of the 128 crop: above it, a warning (the demo's student
# with all labels: 0.51 px, NME +0.0013, docs/landmarks.md)
INT8_LANDMARK_PX = 1.0
OPSET = 18
COLLAPSE_CHECK_IMAGES = 64  # calibration images on which quantize compares the int8 model's outputs with fp32's
FILES = ("model.onnx", "model_int8.onnx", "onnx.json")


class Deployable(nn.Module):
    """A model as a deployer runs it, on uint8 (B, 128, 128, 3) RGB: a student or a teacher -> (embedding (B, E),
    mu (B, D)); a landmarker -> (landmarks (B, K, 2),). The teacher runs its encoder and head only (its decoder is
    not part of the graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 128, 128) in [0, 1]
        if isinstance(self.model, Landmarker):
            return (self.model(x),)  # (B, K, 2)
        if isinstance(self.model, Student):
            out = self.model(x)
            return out["embed"], out["mu"]
        mu, _ = self.model.encode(x)  # (B, D)
        return self.model.embedding(mu), mu


def output_names(model: nn.Module) -> list[str]:
    """The graph's output names, in Deployable's order."""
    return ["landmarks"] if isinstance(model, Landmarker) else ["embedding", "mu"]


def load_any(path: str | Path) -> nn.Module:
    """A trained student, teacher or landmarker (checkpoint; a student or teacher also as a save_pretrained folder),
    in eval mode on the CPU. CheckpointError naming the file for anything else."""
    path = Path(path)
    if path.is_dir():
        return load_student(path) if is_student_folder(path) else load_model(path)[0]
    ckpt = read_checkpoint(path)
    if "landmark_config" in ckpt:
        return load_landmarker(path, ckpt=ckpt)
    return load_student(path, ckpt=ckpt) if "student_config" in ckpt else load_model(path, ckpt=ckpt)[0]


def export(model: nn.Module, path: Path) -> None:
    """torch.onnx.export (dynamo) of Deployable(model) with a dynamic batch, saved as one file (weights inside) and
    checked by onnx.checker."""
    import onnx
    example = torch.zeros(2, 128, 128, 3, dtype=torch.uint8)
    program = torch.onnx.export(Deployable(model).eval(), (example,), dynamo=True, opset_version=OPSET,
                                input_names=["image"], output_names=output_names(model),
                                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=65536)}},
                                verbose=False)
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())
    onnx.checker.check_model(str(path))


def quantize(fp32: Path, path: Path, calibration: np.ndarray, batch_size: int = 16, float_ends: bool = False) -> None:
    """Static int8 quantisation (onnxruntime, QDQ, per-channel int8 weights, uint8 activations) calibrated on
    `calibration` uint8 (N, 128, 128, 3) images. The nodes of float_nodes stay float (a landmark graph's readout;
    the first Conv; float_ends: every Gemm / MatMul too); normalisation scales are per tensor
    (norm_scales_per_tensor). onnxruntime's pre-processing runs without its symbolic shape inference, which fails on
    the resize of this exporter's graphs. QOperator and per-tensor weights measured no faster at batch 1 on one thread
    (BENCHMARKS.md, 2026-12-04). DataError when the result holds no int8 weight (never a float file named int8), or
    when its first output is all zero for more of the first COLLAPSE_CHECK_IMAGES calibration images than fp32's (a
    quantised range that rounds a whole output away: a 10-epoch efficientnet_b0 lost 348 of 400 embeddings so)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict | None:
            i = next(self.batches, None)
            return None if i is None else {"image": calibration[i:i + batch_size]}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        quantize_static(str(pre), str(Path(tmp) / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        nodes_to_exclude=float_nodes(graph, float_ends),
                        extra_options={"TensorQuantOverrides": norm_scales_per_tensor(graph)})
        weights = onnx.load(str(Path(tmp) / "int8.onnx")).graph.initializer
        if not any(w.data_type == onnx.TensorProto.INT8 and len(w.dims) > 1 for w in weights):
            raise DataError(f"{fp32}: quantisation left no int8 weight; no {path.name} written")
        first = calibration[:COLLAPSE_CHECK_IMAGES]  # an int8 graph can hold whole outputs at 0 (a range that
        zero = [int((np.abs(out.reshape(len(first), -1)).max(1) == 0).sum())  # rounds them away): never shipped
                for out in (onnx_outputs(f, first)[0] for f in (fp32, Path(tmp) / "int8.onnx"))]
        if zero[1] > zero[0]:
            raise DataError(f"{fp32}: the int8 model's {graph.output[0].name} is all zero for {zero[1]} of "
                            f"{len(first)} calibration images (fp32: {zero[0]}); no {path.name} written"
                            + ("" if float_ends else ": --int8-float-ends keeps the head in float too"))
        with atomic_write(path) as f:
            f.write((Path(tmp) / "int8.onnx").read_bytes())


def float_nodes(graph: onnx.GraphProto, float_ends: bool) -> list[str]:
    """The names of the nodes that quantize leaves in float: a landmark graph's soft-argmax readout (every node after
    its last Conv; in uint8 its probabilities round to steps of 1/255 and its points to ~0.5 px: the demo's
    landmarker measured NME 0.0285 -> 0.136, and 0.0298 with the readout in float); the first Conv, which reads the
    raw crop (in int8 the demo's 20-epoch mobilenet_v3_small lost 0.020 rank-1, with it in float 0.002, at the same
    file size); with float_ends every Gemm / MatMul as well."""
    nodes = list(graph.node)  # in topological order
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    names = [n.name for n in nodes[convs[-1] + 1:]] if graph.output[0].name == "landmarks" else []
    names += [nodes[i].name for i in convs[:1]]
    if float_ends:
        names += [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return names


def norm_scales_per_tensor(graph: onnx.GraphProto) -> dict[str, list[dict]]:
    """onnxruntime's TensorQuantOverrides that quantise the 1-D scale of each normalisation node (LayerNorm, and the
    InstanceNorm of an exported GroupNorm) per tensor: what per_channel=True does with them anyway (its channel axis
    for these nodes, 1, does not exist on a 1-D tensor), without a warning line for each."""
    norms = ("LayerNormalization", "InstanceNormalization", "BatchNormalization")
    rank1 = {w.name for w in graph.initializer if len(w.dims) == 1}
    return {n.input[1]: [{}] for n in graph.node if n.op_type in norms and n.input[1] in rank1}


def onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 64, threads: int = 0) -> tuple[np.ndarray, ...]:
    """onnxruntime (CPU) over uint8 (N, 128, 128, 3) images -> the graph's outputs, float32: (embedding (N, E), mu
    (N, D)), or a landmarker's (landmarks (N, K, 2),)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [session.run(None, {"image": images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate(parts) for parts in zip(*outs))


@torch.no_grad()
def torch_outputs(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, ...]:
    """PyTorch (CPU, fp32) over the same images -> Deployable's outputs: (embedding (N, E), mu (N, D)), or a
    landmarker's (landmarks (N, K, 2),)."""
    deploy = Deployable(model).eval()
    outs = [deploy(torch.from_numpy(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return tuple(torch.cat(parts).numpy() for parts in zip(*outs))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, E) arrays -> (N,)."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def read_images(path: Path, max_invalid: float) -> tuple[np.ndarray, EarDataset]:
    """The valid images of an ear file as uint8 (N, 128, 128, 3), the graph's input layout; DataError when more than
    `max_invalid` of them are invalid (EarDataset)."""
    ds = EarDataset(path, max_invalid=max_invalid)
    return np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))]), ds


def parity(ref: np.ndarray, emb: np.ndarray, labels: np.ndarray | None) -> dict:
    """An ONNX model's embeddings emb (N, E) against PyTorch's ref (N, E) of the same images: min and mean cosine,
    and (with labels (N,)) the recognition figures of both (recognition_metrics)."""
    c = cosines(ref, emb)
    out = {"images": len(emb), "cosine_min": float(c.min()), "cosine_mean": float(c.mean())}
    if labels is not None:
        keys = ("rank1", "rank5", "eer", "tar@far=0.01", "tar@far=0.001")
        out["pytorch"] = {k: recognition_metrics(ref, labels)[k] for k in keys}
        out["onnx"] = {k: recognition_metrics(emb, labels)[k] for k in keys}
    return out


def ort_latency_ms(path: Path, image: np.ndarray, runs: int) -> float:
    """Median wall time (ms) of onnxruntime (CPU, one intra- and one inter-op thread, sequential) on uint8 (1, 128,
    128, 3) `image`, after 5 untimed runs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return median_ms(lambda: session.run(None, {"image": image}), runs)


@torch.no_grad()
def torch_latency_ms(model: nn.Module, image: np.ndarray, runs: int) -> float:
    """Median wall time (ms) of PyTorch eager (CPU, fp32, one thread) on uint8 (1, 128, 128, 3) `image`."""
    deploy, x, threads = Deployable(model).eval(), torch.from_numpy(image), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return median_ms(lambda: deploy(x), runs)
    finally:
        torch.set_num_threads(threads)


def median_ms(run: Callable[[], object], runs: int) -> float:
    """Median over `runs` timed calls of run() (ms), after 5 untimed ones."""
    for _ in range(5):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def row_names(models: list[tuple[str, str]]) -> list[str]:
    """The edge table's row (and folder) names of (kind, path) pairs, kind a student's arch or "teacher": the kind,
    and where several models share it, "<kind>-<what their paths do not share>" (e20/ckpt/best.pt and
    in192/ckpt/best.pt: "-e20", "-in192"), or "-<position>" where that is empty or not unique."""
    names = [kind for kind, _ in models]
    for kind in set(names):
        same = [i for i, (k, _) in enumerate(models) if k == kind]
        if len(same) < 2:
            continue
        parts = [Path(models[i][1]).resolve().parts for i in same]
        head = len(os.path.commonprefix(parts))
        tail = len(os.path.commonprefix([p[head:][::-1] for p in parts]))
        marks = ["-".join(p[head:len(p) - tail]).replace(".", "_") for p in parts]
        unique = all(marks) and len(set(marks)) == len(marks)
        for n, (i, mark) in enumerate(zip(same, marks), start=1):
            names[i] = f"{kind}-{mark if unique else n}"
    return names


def edge_row(model: nn.Module, folder: Path, images: np.ndarray, labels: np.ndarray, calibration: np.ndarray,
             float_ends: bool, runs: int) -> dict:
    """One model of the edge table: exported into `folder` (model.onnx, model_int8.onnx, onnx.json: export, quantize,
    parity), its deployed parameters (a teacher without its decoder), MB on disk, latency at batch 1 on one thread
    (ms: PyTorch eager, onnxruntime fp32 and int8, on images[0]) and recognition figures of both ONNX files on
    `images` uint8 (N, 128, 128, 3) with `labels` (N,). A model that quantize refuses gets no int8 file: its
    report's "int8" is {"refused": the reason}."""
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder."))
    export(model, folder / "model.onnx")
    ref, fp32 = torch_outputs(model, images)[0], onnx_outputs(folder / "model.onnx", images)[0]  # (N, E) each
    report = {"fp32": parity(ref, fp32, labels)}
    try:
        quantize(folder / "model.onnx", folder / "model_int8.onnx", calibration, float_ends=float_ends)
    except DataError as e:
        report["int8"] = {"refused": str(e).removeprefix(f"{folder / 'model.onnx'}: ")}
    else:
        int8 = onnx_outputs(folder / "model_int8.onnx", images)[0]
        report["int8"] = {**parity(ref, int8, labels), "cosine_vs_fp32_min": float(cosines(fp32, int8).min())}
    one = images[:1]
    report["bytes"] = {f: os.path.getsize(folder / f) for f in FILES[:2] if (folder / f).exists()}
    report["latency_ms"] = {"pytorch": torch_latency_ms(model, one, runs),
                            "onnx_fp32": ort_latency_ms(folder / "model.onnx", one, runs)}
    if "refused" not in report["int8"]:
        report["latency_ms"]["onnx_int8"] = ort_latency_ms(folder / "model_int8.onnx", one, runs)
    report["params"] = params
    with open(folder / "onnx.json", "wb") as f:
        save_json(report)(f)
    return report


def edge_table(rows: dict[str, dict], pixels: dict) -> str:
    """Markdown of edge_row reports (name -> report) and the centred raw pixels' recognition_metrics: the int8
    columns are changes against the ONNX fp32 figures; "deploy" names the file to ship (int8 where it is faster and
    keeps the embedding: cosine against fp32 >= INT8_COSINE)."""
    lines = ["| model | params (M) | MB fp32 | MB int8 | ms PyTorch | ms ORT fp32 | ms ORT int8 | rank-1 | rank-5 | EER | "
             "TAR@FAR=1e-3 | int8 cos min | int8 Δrank-1 | int8 ΔEER | int8 ΔTAR | deploy |",
             "|" + "---|" * 16]
    notes = []
    for name, r in rows.items():
        f, ms = r["fp32"]["onnx"], r["latency_ms"]
        if "refused" in r["int8"]:  # no int8 file: its cells are "-", and a note under the table says why
            mb8, ms8, cos, delta, deploy = "-", "-", "-", ["-"] * 3, "model.onnx"
            notes.append(f"- {name}: no int8 model: {r['int8']['refused']}")
        else:
            q, c = r["int8"]["onnx"], r["int8"]["cosine_vs_fp32_min"]
            mb8, ms8, cos = f"{r['bytes']['model_int8.onnx'] / 1e6:.2f}", f"{ms['onnx_int8']:.2f}", f"{c:.4f}"
            delta = [fmt_delta(q[k], f[k]) for k in ("rank1", "eer", "tar@far=0.001")]
            deploy = "model_int8.onnx" if ms["onnx_int8"] < ms["onnx_fp32"] and c >= INT8_COSINE else "model.onnx"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['bytes']['model.onnx'] / 1e6:.2f} | {mb8} | "
                     f"{ms['pytorch']:.2f} | {ms['onnx_fp32']:.2f} | {ms8} | {fmt(f['rank1'])} | {fmt(f['rank5'])} | "
                     f"{fmt(f['eer'])} | {fmt(f['tar@far=0.001'])} | {cos} | {' | '.join(delta)} | {deploy} |")
    lines.append(f"| raw pixels, centred | - | - | - | - | - | - | {fmt(pixels['rank1'])} | {fmt(pixels['rank5'])} | "
                 f"{fmt(pixels['eer'])} | {fmt(pixels['tar@far=0.001'])} | - | - | - | - | - |")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def fmt_delta(new: float | None, old: float | None) -> str:
    return "-" if new is None or old is None else f"{new - old:+.3f}"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a student, the teacher's embedding path or a landmark model to "
                                            "ONNX (+ int8).", formatter_class=HelpFormatter)
    p.add_argument("model", nargs="+", help="a distill.py, train.py or landmarker.py checkpoint, or a "
                   "save_pretrained folder (with --table: several students or teachers)")
    p.add_argument("--out", default=None, help="folder for model.onnx, model_int8.onnx, onnx.json (default: the "
                   "model's folder when it is one, beside its model card); with --table, OUT/<arch or teacher>/")
    p.add_argument("--data", required=True, help="ear images (.npy) the parity is measured on; with identity labels "
                   "beside it (synth.py, data.py convert) rank-1 / EER / TAR@FAR are compared too, and for a landmark "
                   "model, with a landmarks CSV beside it, NME / PCK@0.1")
    p.add_argument("--calib", default=None, help="training ears (.npy) that calibrate the int8 model (none: no int8)")
    p.add_argument("--calib-images", type=positive_int, default=512, help="the first N of --calib")
    p.add_argument("--max-invalid", type=fraction, default=0.05, help="largest fraction of invalid images (NaN, out "
                   "of range, blank) --data or --calib may hold; they are left out, as in train.py")
    p.add_argument("--int8-float-ends", action="store_true", help="keep the head's linear layers in float in "
                   "model_int8.onnx too (its first convolution, and a landmark model's soft-argmax readout, always "
                   "are)")
    p.add_argument("--table", action="store_true", help="the edge table: every model's size, latency at batch 1 on "
                   "one thread and recognition on --data (labelled), beside the pixels; needs --out and --calib")
    p.add_argument("--runs", type=positive_int, default=200, help="timed runs per latency (--table; the median)")
    p.add_argument("--markdown", default=None, help="--table: append it to this file as a dated section")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = get_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.table:
        return table_main(args, argv)
    if len(args.model) > 1 or args.markdown:
        p.error("several models and --markdown are for --table")
    model_path = args.model[0]
    out = Path(args.out) if args.out else Path(model_path) if Path(model_path).is_dir() else None
    if out is None:
        raise CheckpointError(f"{model_path}: a checkpoint file; give --out FOLDER for the ONNX files")
    check_free(out)
    model = load_any(model_path)
    images, ds = read_images(Path(args.data), args.max_invalid)
    calibration = (read_images(Path(args.calib), args.max_invalid)[0][:args.calib_images] if args.calib
                   else None)  # read before writing
    head = {"model": str(model_path), "data": str(args.data)}
    if isinstance(model, Landmarker):
        points = read_points(ds, model.cfg)
        head["landmarks"] = list(model.cfg.names)  # output k's name (empty: a checkpoint from before names were kept)
        report = write_onnx(model, out, calibration, args.int8_float_ends,
                            lambda f: landmark_parity(model, f, images, points), head)
        print_landmark_report(report, out)
        return report
    labels = read_identities(ds.path, ds)
    if labels is not None and label_problem(labels) is not None:
        labels = None
    ref = torch_outputs(model, images)[0]  # (N, E)
    report = write_onnx(model, out, calibration, args.int8_float_ends,
                        lambda f: parity(ref, onnx_outputs(f, images)[0], labels), head)
    fp32 = report["fp32"]
    print(f"model.onnx: {report['bytes']['model.onnx'] / 1e6:.2f} MB, embedding cosine against PyTorch min "
          f"{fp32['cosine_min']:.6f} over {fp32['images']} images")
    if "onnx" in fp32:
        print("  PyTorch -> ONNX: " + ", ".join(f"{k} {fmt(fp32['pytorch'][k])} -> {fmt(fp32['onnx'][k])}"
                                               for k in fp32["onnx"]))
    if "int8" in report:
        q = report["int8"]
        print(f"model_int8.onnx: {report['bytes']['model_int8.onnx'] / 1e6:.2f} MB, cosine min {q['cosine_min']:.4f}"
              + (": " + ", ".join(f"{k} {fmt(q['onnx'][k])}" for k in q["onnx"]) if "onnx" in q else ""))
        warn_int8(out / "model_int8.onnx", q["cosine_min"])
    if fp32["cosine_min"] < COSINE_PARITY:
        print(f"warning: the ONNX embeddings differ from PyTorch's (cosine min {fp32['cosine_min']:.6f} < "
              f"{COSINE_PARITY})", file=sys.stderr)
    return report


def write_onnx(model: nn.Module, out: Path, calibration: np.ndarray | None, float_ends: bool,
               score: Callable[[Path], dict], head: dict) -> dict:
    """Into `out`, together (staged): model.onnx (export), model_int8.onnx (quantize, when `calibration` uint8 (N,
    128, 128, 3) is given) and onnx.json, the report: `head`, then {"fp32": score(model.onnx), "int8":
    score(model_int8.onnx), "bytes": each ONNX file's size} -> the report."""
    with staged(out) as tmp:
        export(model, tmp / "model.onnx")
        report = {**head, "fp32": score(tmp / "model.onnx")}
        if calibration is not None:
            quantize(tmp / "model.onnx", tmp / "model_int8.onnx", calibration, float_ends=float_ends)
            report["int8"] = score(tmp / "model_int8.onnx")
        report["bytes"] = {f: os.path.getsize(tmp / f) for f in FILES[:2] if (tmp / f).exists()}
        with open(tmp / "onnx.json", "wb") as f:
            save_json(report)(f)
    return report


def read_points(ds: EarDataset, cfg: LandmarkConfig) -> np.ndarray | None:
    """The true landmarks of ds's images (N, K, 2), (x, y) in pixels of the 128 crop, NaN outside it, from the CSV
    beside its file (data.read_landmarks), or None where there is none. DataError for a CSV that read_landmarks
    refuses, or one with other landmarks than the model's (cfg.names, in order; their count where a checkpoint
    predates the names)."""
    if not landmarks_file(ds.path).is_file():
        return None
    names, points = read_landmarks(ds.path)  # (N_total, K, 2)
    check_data_landmarks(names, cfg, ds.path, "the model")
    return points[ds.keep]


def landmark_parity(model: Landmarker, onnx_path: Path, images: np.ndarray, points: np.ndarray | None) -> dict:
    """The ONNX landmarks against PyTorch's on uint8 (N, 128, 128, 3) `images`: the max and mean distance (pixels of
    the 128 crop) between the two models' points, and with `points` (N, K, 2) (the truth, NaN outside the crop) the
    NME, error in pixels and PCK@0.1 of both (probe.landmark_scores) over the images with every landmark in the
    crop (data.whole_landmarks), as the landmarker's validation and the probe count them."""
    ref, = torch_outputs(model, images)  # (N, K, 2)
    out, = onnx_outputs(onnx_path, images)
    dist = np.linalg.norm(out - ref, axis=-1)  # (N, K) pixels
    report = {"images": len(images), "point_diff_px_max": float(dist.max()), "point_diff_px_mean": float(dist.mean())}
    rows = [] if points is None else whole_landmarks(points, np.arange(len(points)))
    if len(rows):
        true = torch.from_numpy(points[rows])  # (M, K, 2)
        report["scored_images"] = len(rows)
        report["pytorch"] = landmark_scores(torch.from_numpy(ref[rows]), true)
        report["onnx"] = landmark_scores(torch.from_numpy(out[rows]), true)
    return report


def print_landmark_report(report: dict, out: Path) -> None:
    """What a landmark export into `out` prints: each file's size and distance to PyTorch's points, the scores
    PyTorch -> ONNX (and int8's change in NME), and a warning line when the fp32 points differ by more than
    LANDMARK_PARITY_PX or int8's by more than INT8_LANDMARK_PX on average."""
    fp32 = report["fp32"]
    print(f"model.onnx: {report['bytes']['model.onnx'] / 1e6:.2f} MB, landmarks against PyTorch: max "
          f"{fp32['point_diff_px_max']:.6f} px, mean {fp32['point_diff_px_mean']:.6f} px over {fp32['images']} images")
    if "onnx" in fp32:
        print(f"  PyTorch -> ONNX on the {fp32['scored_images']} images with every landmark in the crop: "
              + ", ".join(f"{k} {fp32['pytorch'][k]:.4f} -> {fp32['onnx'][k]:.4f}" for k in fp32["onnx"]))
    if "int8" in report:
        q = report["int8"]
        print(f"model_int8.onnx: {report['bytes']['model_int8.onnx'] / 1e6:.2f} MB, landmarks against PyTorch: max "
              f"{q['point_diff_px_max']:.3f} px, mean {q['point_diff_px_mean']:.3f} px"
              + (": " + ", ".join(f"{k} {q['onnx'][k]:.4f}" for k in q["onnx"])
                 + f" (NME {q['onnx']['nme'] - fp32['onnx']['nme']:+.4f} against model.onnx)" if "onnx" in q else ""))
        if q["point_diff_px_mean"] > INT8_LANDMARK_PX:
            print(f"warning: {out / 'model_int8.onnx'}: its landmarks are {q['point_diff_px_mean']:.2f} px from "
                  f"PyTorch's on average (> {INT8_LANDMARK_PX} px): deploy model.onnx", file=sys.stderr)
    if fp32["point_diff_px_max"] > LANDMARK_PARITY_PX:
        print(f"warning: the ONNX landmarks differ from PyTorch's (max {fp32['point_diff_px_max']:.6f} px > "
              f"{LANDMARK_PARITY_PX} px)", file=sys.stderr)


def table_main(args: argparse.Namespace, argv: list[str]) -> dict:
    """--table: each model into OUT/<its arch, or teacher>/ (edge_row), the table printed and, with --markdown,
    appended there as a dated section -> {"rows": name -> report, "pixels": metrics, "markdown": the table}.
    DataError for no --out or --calib, unlabelled --data, or a folder holding the files already."""
    from eval import pixel_embeddings  # the pixels baseline of eval.py --identity
    if args.out is None or args.calib is None:
        raise DataError("--table needs --out FOLDER and --calib TRAINING.npy")
    if args.markdown and (Path(args.markdown).is_dir() or not Path(args.markdown).parent.is_dir()):
        raise DataError(f"--markdown {args.markdown}: a folder, or in a folder that does not exist: give a file to "
                        f"append the table to")
    loaded = []
    for path in args.model:
        model = load_any(path)
        if isinstance(model, Landmarker):
            raise DataError(f"{path}: a landmark model (landmarker.py); the edge table compares recognition models: "
                            f"export it without --table")
        loaded.append((model.cfg.arch if isinstance(model, Student) else "teacher", path, model))
    names = row_names([(kind, path) for kind, path, _ in loaded])
    models = {name: model for name, (_, _, model) in zip(names, loaded)}
    for name in models:
        check_free(Path(args.out) / name)
    images, ds = read_images(Path(args.data), args.max_invalid)
    labels = read_identities(ds.path, ds)
    if labels is None or (problem := label_problem(labels)):
        raise DataError(f"{args.data}: no identity labels to score" + (f" ({problem})" if labels is not None else ""))
    calibration = read_images(Path(args.calib), args.max_invalid)[0][:args.calib_images]
    rows = {}
    for name, model in models.items():
        with staged(Path(args.out) / name) as tmp:
            rows[name] = edge_row(model, tmp, images, labels, calibration, args.int8_float_ends, args.runs)
        if "refused" not in rows[name]["int8"]:
            warn_int8(Path(args.out) / name / "model_int8.onnx", rows[name]["int8"]["cosine_vs_fp32_min"])
    pixels = recognition_metrics(pixel_embeddings(ds), labels)
    text = edge_table(rows, pixels)
    section = (f"### {date.today()} - edge table: CPU, batch 1, one thread, {len(images)} images of "
               f"{len(np.unique(labels[labels >= 0]))} identities\n\n`python onnx_export.py {shlex.join(argv)}`\n\n"
               f"{text}")
    print("\n" + section)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n" + section)
    return {"rows": rows, "pixels": pixels, "markdown": text}


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder inside `out` (created) that the block writes its files into; they are moved into `out`
    together when the block ends cleanly, and the folder is removed on any exception (Ctrl-C too): a stopped export
    leaves no file behind."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out))
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp)
        release([out])


def check_free(out: Path) -> None:
    """DataError when `out` is not a folder that can be written or already holds one of FILES (never written over);
    claims it (files.claim: OutputError while another command works there)."""
    try:
        check_output_dir(out)
    except ValueError as e:
        raise DataError(f"--out {e}") from e
    claim(out)
    for stale in out.glob(".onnx-export-*"):  # a killed export's staging folder (none works here: out is claimed)
        shutil.rmtree(stale)
    if taken := [f for f in FILES if (out / f).exists()]:
        release([out])
        raise DataError(f"{out}: holds {', '.join(taken)} already (never written over): choose another --out")


def warn_int8(path: Path, cosine_min: float) -> None:
    """One warning line when the int8 embeddings drift from fp32's (cosine min < INT8_COSINE): deploy model.onnx."""
    if cosine_min < INT8_COSINE:
        print(f"warning: {path}: int8 embedding cosine min {cosine_min:.4f} < {INT8_COSINE} against fp32: deploy "
              f"model.onnx, or try --int8-float-ends", file=sys.stderr)


if __name__ == "__main__":
    safe_console()
    try:
        main()
    except (CheckpointError, DataError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: nothing was written (a model's files are moved into place together at its end)",
              file=sys.stderr)
        sys.exit(130)
