"""Ship a model as ONNX: a student, or the teacher's embedding path (encoder and head, no decoder), with a dynamic
batch, checked against PyTorch image by image and on a recognition benchmark, and quantised to int8.

    python onnx_export.py demo/checkpoints_student/best.pt --out demo/onnx_student \\
        --data demo/identities/val_teacher.npy --calib demo/data/train_teacher.npy

writes OUT/model.onnx, OUT/model_int8.onnx (with --calib) and OUT/onnx.json (parity and benchmark figures), never
over an existing file. The graph takes what a deployer has:

    image      uint8 (B, 128, 128, 3), RGB, 0-255      (resizing and normalisation are inside the graph)
    embedding  float32 (B, E)   the L2-normalised identity embedding (cosine similarity compares two ears)
    mu         float32 (B, D)   the teacher's latent mean (a student's estimate of it)

Parity, the field's way (insightface's ONNX checks, timm's onnx utils): the cosine of every image's embedding
against PyTorch's (>= COSINE_PARITY), and rank-1, EER and TAR@FAR recomputed from the ONNX outputs (equal to
PyTorch's to 3 decimals). int8: onnxruntime's static quantisation, QDQ, per-channel weights, calibrated on training
ears (quantize_dynamic fails on this exporter's graphs: its shape inference meets the exporter's stale value_info).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cli import positive_int, safe_console
from data import EarDataset, read_identities
from errors import CheckpointError, DataError
from files import atomic_write, check_output_dir, save_json
from recognition import label_problem, recognition_metrics
from student import Student, is_student_folder, load_student
from checkpoints import load_model, read_checkpoint

COSINE_PARITY = 0.9999  # every image's ONNX embedding against PyTorch's, fp32
OPSET = 18
FILES = ("model.onnx", "model_int8.onnx", "onnx.json")


class Deployable(nn.Module):
    """A student or a teacher as a deployer runs it: uint8 (B, 128, 128, 3) RGB -> (embedding (B, E), mu (B, D)).
    The teacher runs its encoder and head only (its decoder is not part of the graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 128, 128) in [0, 1]
        if isinstance(self.model, Student):
            out = self.model(x)
            return out["embed"], out["mu"]
        mu, _ = self.model.encode(x)  # (B, D)
        return self.model.embedding(mu), mu


def load_any(path: str | Path) -> nn.Module:
    """A trained student or teacher (checkpoint or save_pretrained folder), in eval mode on the CPU."""
    path = Path(path)
    if path.is_dir():
        return load_student(path) if is_student_folder(path) else load_model(path)[0]
    ckpt = read_checkpoint(path)
    return load_student(path, ckpt=ckpt) if "student_config" in ckpt else load_model(path, ckpt=ckpt)[0]


def export(model: nn.Module, path: Path) -> None:
    """torch.onnx.export (dynamo) of Deployable(model) with a dynamic batch, saved as one file (weights inside) and
    checked by onnx.checker."""
    import onnx
    example = torch.zeros(2, 128, 128, 3, dtype=torch.uint8)
    program = torch.onnx.export(Deployable(model).eval(), (example,), dynamo=True, opset_version=OPSET,
                                input_names=["image"], output_names=["embedding", "mu"],
                                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=65536)}},
                                verbose=False)
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())
    onnx.checker.check_model(str(path))


def quantize(fp32: Path, path: Path, calibration: np.ndarray, batch_size: int = 16) -> None:
    """Static int8 quantisation (onnxruntime, QDQ, per-channel int8 weights, uint8 activations) calibrated on
    `calibration` uint8 (N, 128, 128, 3) images. onnxruntime's pre-processing runs without its symbolic shape
    inference, which fails on the resize of this exporter's graphs."""
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
        quantize_static(str(pre), str(Path(tmp) / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        with atomic_write(path) as f:
            f.write((Path(tmp) / "int8.onnx").read_bytes())


def onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 64, threads: int = 0) -> tuple[np.ndarray, ...]:
    """onnxruntime (CPU) over uint8 (N, 128, 128, 3) images -> (embedding (N, E), mu (N, D)) float32."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [session.run(None, {"image": images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate(parts) for parts in zip(*outs))


@torch.no_grad()
def torch_outputs(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, ...]:
    """PyTorch (CPU, fp32) over the same images -> (embedding (N, E), mu (N, D))."""
    deploy = Deployable(model).eval()
    outs = [deploy(torch.from_numpy(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return tuple(torch.cat(parts).numpy() for parts in zip(*outs))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, E) arrays -> (N,)."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def read_images(path: Path) -> tuple[np.ndarray, EarDataset]:
    """The valid images of an ear file as uint8 (N, 128, 128, 3), the graph's input layout."""
    ds = EarDataset(path)
    return np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))]), ds


def parity(model: nn.Module, onnx_path: Path, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """The ONNX model against PyTorch on the same images: min and mean cosine of the embeddings, and (with labels)
    the recognition figures of both (recognition_metrics)."""
    ref, _ = torch_outputs(model, images)
    emb, _ = onnx_outputs(onnx_path, images)
    c = cosines(ref, emb)
    out = {"images": len(images), "cosine_min": float(c.min()), "cosine_mean": float(c.mean())}
    if labels is not None:
        keys = ("rank1", "rank5", "eer", "tar@far=0.01", "tar@far=0.001")
        out["pytorch"] = {k: recognition_metrics(ref, labels)[k] for k in keys}
        out["onnx"] = {k: recognition_metrics(emb, labels)[k] for k in keys}
    return out


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a student or the teacher's embedding path to ONNX (+ int8).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a distill.py or train.py checkpoint, or a save_pretrained folder")
    p.add_argument("--out", default=None, help="folder for model.onnx, model_int8.onnx, onnx.json (default: the "
                   "model's folder when it is one, beside its model card)")
    p.add_argument("--data", required=True, help="ear images (.npy) the parity is measured on; with identity labels "
                   "beside it (synth.py, data.py convert) rank-1 / EER / TAR@FAR are compared too")
    p.add_argument("--calib", default=None, help="training ears (.npy) that calibrate the int8 model (none: no int8)")
    p.add_argument("--calib-images", type=positive_int, default=512, help="the first N of --calib")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model) if Path(args.model).is_dir() else None
    if out is None:
        raise CheckpointError(f"{args.model}: a checkpoint file; give --out FOLDER for the ONNX files")
    try:
        check_output_dir(out)
    except ValueError as e:
        raise DataError(f"--out {e}") from e
    if taken := [f for f in FILES if (out / f).exists()]:
        raise DataError(f"{out}: holds {', '.join(taken)} already (never written over): choose another --out")
    model = load_any(args.model)
    images, ds = read_images(Path(args.data))
    calibration = read_images(Path(args.calib))[0][:args.calib_images] if args.calib else None  # read before writing
    labels = read_identities(ds.path, ds)
    if labels is not None and label_problem(labels) is not None:
        labels = None
    out.mkdir(parents=True, exist_ok=True)
    export(model, out / "model.onnx")
    report = {"model": str(args.model), "data": str(args.data), "fp32": parity(model, out / "model.onnx", images,
                                                                                labels)}
    if calibration is not None:
        quantize(out / "model.onnx", out / "model_int8.onnx", calibration)
        report["int8"] = parity(model, out / "model_int8.onnx", images, labels)
    report["bytes"] = {f: os.path.getsize(out / f) for f in FILES[:2] if (out / f).exists()}
    with atomic_write(out / "onnx.json") as f:
        save_json(report)(f)
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
    if fp32["cosine_min"] < COSINE_PARITY:
        print(f"warning: the ONNX embeddings differ from PyTorch's (cosine min {fp32['cosine_min']:.6f} < "
              f"{COSINE_PARITY})", file=sys.stderr)
    return report


if __name__ == "__main__":
    safe_console()
    try:
        main()
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
