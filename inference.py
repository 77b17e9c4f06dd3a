"""Run a trained ear teacher over a dataset: the device, the data files of the run that wrote a checkpoint, the
dataset in file order, and its latent means. eval.py and eigenears.py both build on these.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from data import EarDataset, ResumableSampler, make_loader, to_float
from model import CheckpointError, EarVAE


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a GPU is a ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def checkpoint_info(ckpt: dict) -> dict:
    """The checkpoint's step and the default data files of the run that wrote it (None without a run config):
    {"step": int | None, "train": Path | None, "val": Path | None}. ckpt: read_checkpoint()'s result."""
    run = ckpt.get("run_config") or {}
    files = {"train": None, "val": None}
    if "data_dir" in run:
        files = {s: Path(run.get(f"{s}_npy") or Path(run["data_dir"]) / f"{s}_teacher.npy") for s in files}
    return {"step": ckpt.get("step"), **files}


def data_file(given: str | None, info: dict, split: str, ckpt_path: str | Path) -> Path:
    """`given`, else the run's file of `split` ("train" or "val") from checkpoint_info()."""
    if given is not None:
        return Path(given)
    if info[split] is None:
        raise CheckpointError(f"{ckpt_path}: holds no run config naming its {split} file; give the data file")
    return info[split]


def batches(ds: EarDataset, batch_size: int, device: torch.device, workers: int,
            desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The dataset in order with a tqdm bar: yields x (B, 3, 128, 128) float in [0, 1] on `device` and the samples'
    original indices in the file (B,) int64."""
    sampler = ResumableSampler(len(ds), 1, seed=0, shuffle=False)  # batch_size 1: no sample is dropped
    loader = make_loader(ds, batch_size, sampler, workers, device.type == "cuda")
    for x, index in tqdm(loader, desc=desc, total=len(loader), dynamic_ncols=True):
        yield to_float(x.to(device, non_blocking=True)), index


@torch.no_grad()
def encode_dataset(model: EarVAE, ds: EarDataset, batch_size: int, device: torch.device,
                   workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> mu (N, latent_dim) float32 on the CPU and the original indices (N,) int64 of the N kept samples."""
    mus, indices = [], []
    for x, index in batches(ds, batch_size, device, workers, desc=f"encode {ds.path.name}"):
        mus.append(model.encode(x)[0].float().cpu())  # (B, D)
        indices.append(index)
    return torch.cat(mus), torch.cat(indices)
