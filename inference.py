"""Run a trained ear teacher over a dataset: the device and precision, the data files of the run that wrote a
checkpoint, a model over the dataset in file order (run_dataset), and its latent means. eval.py and eigenears.py both
build on these.

Inference runs under autocast (bf16 where the GPU has it natively, else fp16 on CUDA; fp32 on the CPU); whatever
is measured from the model's outputs is computed in float32 from `.float()` copies of them.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from cli import fraction, non_negative_int, positive_int, progress, safe_console
from data import EarDataset, ResumableSampler, make_loader, to_float
from errors import CheckpointError, DataError, OutputError, WeightsUnavailableError
from model import EarVAE

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH_SIZE = 16  # ~8.6 GiB at SAM input 1024 in bf16 (bench.py's estimate): fits 12-24 GB GPUs
DEFAULT_MAX_INVALID = 0.05  # train.py's default --max-invalid


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """--batch-size, --precision, --device, --workers and --max-invalid, the same for every script that runs a
    checkpoint."""
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images per forward pass. At SAM input 1024 in bf16 the peak is ~4.6 GiB at 8, ~8.6 GiB at "
                        "16 and ~16.4 GiB at 32 (fake-tensor estimate, BENCHMARKS.md; in fp32 about twice): 16 fits "
                        "GPUs of 12 to 24 GB with room to spare")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="autocast dtype of the forward passes; auto: bf16 where the GPU has it natively, else fp16 on "
                        "CUDA, fp32 on CPU. Metrics are computed in fp32 either way")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--workers", type=non_negative_int, default=2, help="data loader worker processes")
    p.add_argument("--max-invalid", type=fraction, default=None,
                   help="largest fraction of invalid samples (NaN, out of range, blank) a data file may hold, as in "
                        f"train.py (default: the value the run was trained with, else {DEFAULT_MAX_INVALID})")


def setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[torch.device, torch.dtype]:
    """The device and autocast dtype of add_inference_args' --device and --precision, printed as one line (e.g.
    'device cuda, torch.bfloat16 autocast, batch size 16'). --device cuda without a GPU is a parser error (exit 2)."""
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    dtype = PRECISIONS[resolve_precision(args.precision, device)]
    print(f"device {device}, {dtype} {'(no autocast)' if dtype == torch.float32 else 'autocast'}, "
          f"batch size {args.batch_size}")
    return device, dtype


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a GPU is a ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def resolve_precision(requested: str, device: torch.device) -> str:
    """The autocast precision of a run (a key of PRECISIONS): `requested` unless it is "auto", which means bf16
    where the current CUDA device computes it natively (compute capability >= 8), else fp16, and fp32 off CUDA.
    Emulated bf16 (V100, T4: torch.cuda.is_bf16_supported() is True there by default) is slower than fp16. An
    explicit half precision on the CPU is kept: torch autocasts there too."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to `dtype` on `device`; float32 -> no autocast at all."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def out_of_memory_error(batch_size: int) -> str:
    """The one-line error for torch.OutOfMemoryError in a script with add_inference_args' flags."""
    smaller = f"a smaller batch (e.g. --batch-size {batch_size // 2}) or " if batch_size > 1 else ""
    return f"error: out of GPU memory at --batch-size {batch_size}. Use {smaller}--device cpu."


def run_command(main: Callable[[], object], get_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """The `__main__` of eval.py, eigenears.py and probe.py: main() under a safe console; what a user can cause (a
    bad checkpoint, data file or output folder, weights out of reach, out of GPU memory) is one line and exit 1, an
    interrupt one line and exit 130 (these commands write their results together at the end)."""
    safe_console()
    try:
        main()
    except (CheckpointError, DataError, OutputError, WeightsUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError:
        print(out_of_memory_error(get_parser().parse_args().batch_size), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: nothing was written (results are written together at the end)", file=sys.stderr)
        sys.exit(130)


def checkpoint_info(ckpt: dict) -> dict:
    """The checkpoint's step, the default data files of the run that wrote it and the invalid-sample threshold it was
    trained with (None without a run config): {"step": int | None, "train": Path | None, "val": Path | None,
    "max_invalid": float | None}. ckpt: read_checkpoint()'s result."""
    run = ckpt.get("run_config") or {}
    files = {"train": None, "val": None}
    if "data_dir" in run:
        files = {s: Path(run.get(f"{s}_npy") or Path(run["data_dir"]) / f"{s}_teacher.npy") for s in files}
    return {"step": ckpt.get("step"), **files, "max_invalid": run.get("max_invalid"),
            "train_fingerprint": (ckpt.get("data") or {}).get("train")}


def max_invalid(args: argparse.Namespace, info: dict) -> float:
    """add_inference_args' --max-invalid, else the run's (checkpoint_info), else DEFAULT_MAX_INVALID."""
    for value in (args.max_invalid, info["max_invalid"]):
        if value is not None:
            return value
    return DEFAULT_MAX_INVALID


def data_file(given: str | None, info: dict, split: str, ckpt_path: str | Path, flag: str) -> Path:
    """`given`, else the run's file of `split` ("train" or "val") from checkpoint_info(); CheckpointError naming the
    command-line `flag` that gives it when the checkpoint does not name one (an export), DataError when the file it
    names is not there (a relative path is read from the current folder, not the one the run started in)."""
    if given is not None:
        return Path(given)
    if info[split] is None:
        raise CheckpointError(f"{ckpt_path}: holds no run config naming its {split} file; give it with {flag}")
    path = info[split]
    if not path.exists():
        where = f" (from {Path.cwd()}: run this where the run started, or" if not path.is_absolute() else " ("
        raise DataError(f"{path}: file not found, the {split} file of the run that wrote {ckpt_path}{where} give "
                        f"the file with {flag})")
    return path


@torch.no_grad()
def run_dataset(fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], ds: EarDataset, batch_size: int,
                device: torch.device, workers: int, desc: str) -> dict[str, torch.Tensor]:
    """fn over every kept sample of ds in file order, batch by batch, with cli.progress labelled `desc` (a bar, or
    lines in a log file). fn(x): x (B, 3, 128, 128) float in [0, 1] on `device` -> {name: (B, ...)}: it runs the
    model (under autocast where it wants one) and measures what the caller asks for. -> {"index": (N,) int64 the
    samples' original indices in the file, name: (N, ...) fn's outputs concatenated on the CPU}; row i is the
    dataset's sample i."""
    sampler = ResumableSampler(len(ds), 1, seed=0, shuffle=False)  # batch_size 1: no sample is dropped
    loader = make_loader(ds, batch_size, sampler, workers)
    out: dict[str, list[torch.Tensor]] = {"index": []}
    for x, index in progress(loader, desc=desc, total=len(loader)):
        outputs = fn(to_float(x.to(device, non_blocking=True)))
        if "index" in outputs:
            raise ValueError("run_dataset: fn returned an output named 'index', the name of the samples' indices")
        for k, v in outputs.items():
            out.setdefault(k, []).append(v.cpu())
        out["index"].append(index)
    return {k: torch.cat(v) for k, v in out.items()}


def encode_dataset(model: EarVAE, ds: EarDataset, batch_size: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> mu (N, latent_dim) float32 on the CPU and the original indices (N,) int64 of the N kept samples; the
    encoder runs under autocast(device, dtype)."""
    def encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device, dtype):
            mu = model.encode(x)[0]  # (B, D)
        return {"mu": mu.float()}

    out = run_dataset(encode, ds, batch_size, device, workers, desc=f"encode {ds.path.name}")
    return out["mu"], out["index"]
