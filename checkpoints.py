"""Checkpoints (written by train.py) and exported models (written by export_model): reading them safely, rebuilding
the model, and writing an export for others to use.

    read_checkpoint(path)       a train.py .pt (torch.load weights_only) or an export directory (model.read_export:
                                JSON + safetensors)
    load_model(path)            -> (EarVAE in eval mode, VAEConfig), from either, with no other input
    export_model(ckpt, dir)     config.json + model.safetensors + README.md model card, written together or not at all
                                (the layout of EarVAE.save_pretrained: hub.py, model.py)
    weights_sha256(model)       a hash of the weights, equal exactly when they are bit-identical

Every problem with a file is a CheckpointError naming it. Nothing here ever unpickles Python objects.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

from errors import CheckpointError
from files import torch_file_problem
from hub import write_pretrained
from model import EarVAE, VAEConfig, read_export, rebuild_model


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A train.py checkpoint file: torch.load with weights_only=True (a pickle in the file cannot run code), never
    retried without it. A directory is read as an export_model directory (read_export: no pickle at all).
    Any problem -> CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        return read_export(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if problem := torch_file_problem(path):
        raise CheckpointError(f"{path}: {problem}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a Python object it will not build
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = f"it asks to run {what.group(1)}" if what else "it holds Python objects, not only tensors"
        raise CheckpointError(f"{path}: refused: {detail} (a pickle can run code); only the checkpoints "
                              f"train.py, distill.py and landmarker.py write load") from e
    except Exception as e:  # anything else the parser raises on a damaged file (EOFError, IndexError, ...)
        reason = " ".join(str(e).split()).split(". ")[0][:160] or "no detail"  # the first sentence (torch's zip
        # reader adds an apology and a bug-report request)
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {reason})") from e
    configs = ("model_config", "student_config", "landmark_config")  # a teacher's, a student's, a landmarker's
    if not isinstance(ckpt, dict) or "model" not in ckpt or not any(k in ckpt for k in configs):
        raise CheckpointError(f"{path}: not an ear-teacher checkpoint (expected keys 'model' and 'model_config', or "
                              f"'student_config' for a student, 'landmark_config' for a landmarker)")
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               ckpt: dict | None = None) -> tuple[EarVAE, VAEConfig]:
    """Rebuild a trained model from a train.py checkpoint alone (config inside; EMA weights when the run kept
    them), or from an export_model directory (its weights, no pickle). `ckpt`: read_checkpoint(path)'s result
    when the caller has read it already, so it is not read twice."""
    if ckpt is None:
        ckpt = read_checkpoint(path, map_location)
    if "student_config" in ckpt:
        raise CheckpointError(f"{path}: a student's checkpoint (distill.py), not a teacher's: evaluate it with "
                              f"eval.py, load it with student.load_student")
    model = rebuild_model(ckpt, path, map_location)
    return model, model.cfg


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's state dict: every tensor's name, dtype, shape and bytes in name order. Two models
    hash equal exactly when their weights are bit-identical, whatever file they were read from; train.py keeps a
    distillation run's teacher hash to refuse resuming against another teacher."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_model(model_or_ckpt: EarVAE | str | Path, out_dir: str | Path,
                 metrics: dict[str, float | int | str] | None = None) -> list[Path]:
    """Write a trained model for others to use, in the Hugging Face layout (no pickle):

        out_dir/config.json        {"format": model.EXPORT_FORMAT, "model_config": VAEConfig (encoder_config included),
                                    "step": training step or null, "weights": "ema" or "model"}
        out_dir/model.safetensors  the weights to use: the EMA weights when the checkpoint has them
        out_dir/README.md          a short model card: what it is, the config, `metrics` when given, how to load

    model_or_ckpt: a model (its current weights; step unknown), or the path of a train.py checkpoint or of another
    export. The three files are written together (files.write_outputs): a failure leaves out_dir as it was.
    load_model(out_dir) rebuilds the model. -> the written paths."""
    step, source = None, "model"
    if isinstance(model_or_ckpt, EarVAE):
        model = model_or_ckpt
    elif isinstance(model_or_ckpt, (str, Path)):
        ckpt = read_checkpoint(model_or_ckpt)
        step, source = ckpt.get("step"), ckpt.get("weights") or ("ema" if ckpt.get("ema") else "model")
        model, _ = load_model(model_or_ckpt, "cpu", ckpt)  # strict: only weights that fit their config leave
        del ckpt
    else:
        raise TypeError(f"export_model: got a {type(model_or_ckpt).__name__}, expected an EarVAE or a checkpoint path")
    return write_pretrained(model, out_dir, *model.hub_files(metrics, step, source))
