"""The one optimisation loop of this repo: every model it trains runs through `train(objective, ...)`.

    train.py    the teacher: TeacherObjective (the VAE's terms, SupCon / NT-Xent)
    distill.py  a student: StudentObjective (the teacher's embedding and mu, on the fly)
    landmarker.py  a landmark student: LandmarkObjective (a student's trunk and a heatmap head, N labelled images)

The loop knows optimisation: processes and devices (torchrun, DDP), precision and autocast, gradient accumulation,
EMA, the non-finite skip and the divergence guard, signals, checkpoints written atomically, the metrics log, exact
resume. The objective knows the task (`Objective` below): it computes the loss of a micro-batch, views and
augmentation inside, validates, and says what it adds to a checkpoint. The loop never asks which objective runs.

Every random draw of training (epoch order, augmentation, reparameterisation noise) is a function of (seed, epoch,
sample index), so a resumed run, or a run on another number of GPUs, sees the same data and noise.

SIGINT / SIGTERM stop every process at the next optimizer step, after rank 0 has saved last.pt. torchrun passes a
SIGTERM on to its processes and kills them --shutdown-timeout seconds later (30 by default): where writing last.pt
takes longer, raise it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from cli import (float_range, fraction, non_negative, non_negative_int, positive, positive_int, progress, safe_console,
                 seed_int)
from data import EarDataset, ResumableSampler, fingerprint_change, make_loader, to_float
from errors import CheckpointError, ConfigError, DataError, TrainingError, WeightsUnavailableError
from files import atomic_write, check_output_dir, hold_folders, save_figure, save_json
from checkpoints import read_checkpoint
from hub import load_state
from inference import PRECISIONS, autocast, resolve_device, resolve_precision

SANE_GROWTH = 1000.0  # a weight tensor whose max |value| passes this x max(its initial one, 1) has diverged
RESUMABLE = "run (may change on --resume)"  # the title of the argument group of the flags a resume may change
DATA_PATHS = {"data_dir", "train_npy", "val_npy"}  # where the data lies may change on --resume (the same files moved,
# or a relative path from another folder): data_fingerprints refuses other content
STOP_SIGNALS: list[int] = []  # filled by the SIGINT / SIGTERM handlers that command() installs


class Objective(Protocol):
    """The task a run optimises. The entry point builds it (its model initialised from the run's seed); the loop
    trains `model` and never asks which objective it is."""
    model: nn.Module  # what the optimizer trains (its parameter_groups()), checkpoints keep and EMA averages
    score: str  # the validation value that picks best.pt, higher is better ("psnr", "agreement")
    score_text: str  # how the final line shows the best score, a format string ("PSNR {:.2f} dB")
    score_axis: dict[str, str]  # the loss curve's labels of the score panel ({"ylabel": ..., "title": ...})
    log_fields: tuple[str, ...]  # the names its loss and validate() log: metrics.csv's columns
    config: dict  # its model's config (asdict), printed and saved with the run
    data: Data  # the run's loaders and the sampler of its training order

    def loss(self, model: nn.Module, x: torch.Tensor, keys: torch.Tensor,
             epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch, under the run's autocast: x uint8 (B, 3, 128, 128) on the device, keys (B,) int64 the
        samples' indices in the training file -> (loss 0-dim, {name: detached 0-dim}). model: `self.model` as the
        loop runs it (DDP- or compile-wrapped)."""

    def validate(self, model: nn.Module, max_batches: int | None = None) -> dict[str, float]:
        """Means over the validation set (the first max_batches batches), model in eval mode (the EMA where kept);
        must hold `score`."""

    def state(self) -> dict:
        """What the objective adds to every checkpoint (its model's config, what a resume must check)."""

    def after_validation(self, model: nn.Module, step: int, log_dir: Path) -> None:
        """What it draws after each validation (rank 0), into log_dir."""

    def describe(self) -> list[str]:
        """Lines for the run's log: the parameter report, what is optimised."""

    def postfix(self, row: dict[str, float]) -> dict[str, float]:
        """Training logs of the progress bar's postfix, beside loss and img/s."""

    def memory_advice(self, resuming: bool) -> str:
        """The ways to save memory this objective has, beside a smaller batch (a clause of the out-of-memory
        error)."""


@dataclass
class Setup:
    """This process of the run: its rank of world, its device, the run's precision and autocast."""
    rank: int
    world: int
    device: torch.device
    precision: str = "fp32"  # a key of inference.PRECISIONS

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def autocast(self) -> AbstractContextManager:
        """The run's autocast (fp32: none at all)."""
        return autocast(self.device, PRECISIONS[self.precision])

    def log(self, *args, **kwargs) -> None:
        """print() on rank 0 only."""
        if self.master:
            print(*args, **kwargs)


@dataclass
class Data:
    """The run's data: training loader and sampler (its order, set each epoch), validation loader, steps per epoch."""
    train_ds: EarDataset
    val_ds: EarDataset
    sampler: torch.utils.data.Sampler  # with set_epoch(epoch, start) and n_used
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int


# -----------------------------------------------------------------------------
# the command line both entry points share

def add_run_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data, optimisation and run flags of every training command (train.py, distill.py). Returns the group of
    flags a resume may change (RESUMABLE), for the command's own such flags; every other flag comes from the
    checkpoint when resuming."""
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data", help="folder with train_teacher.npy and val_teacher.npy (it, "
                   "--train-npy and --val-npy may change on --resume: the same files moved, checked by fingerprint)")
    g.add_argument("--train-npy", default=None, help="training file (default DATA_DIR/train_teacher.npy)")
    g.add_argument("--val-npy", default=None, help="validation file (default DATA_DIR/val_teacher.npy)")
    g.add_argument("--max-invalid", type=fraction, default=0.05,
                   help="stop if more than this fraction of samples is bad")
    g.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (turns left ears into right ones)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=60, help="epochs; the learning-rate schedule spans them")
    g.add_argument("--lr", type=positive, default=3e-4,
                   help="peak learning rate (the encoder trains at lr * --encoder-lr-scale)")
    g.add_argument("--encoder-lr-scale", type=non_negative, default=0.1,
                   help="the encoder (a teacher's trainable blocks, a student's trunk) trains at lr * this")
    g.add_argument("--min-lr-ratio", type=fraction, default=0.01, help="cosine decays to lr * this")
    g.add_argument("--warmup-steps", type=non_negative_int, default=500, help="linear warm-up (optimizer steps)")
    g.add_argument("--weight-decay", type=non_negative, default=0.05, help="AdamW decay (not on norms and biases)")
    g.add_argument("--grad-clip", type=non_negative, default=1.0, help="max gradient norm (0: off; a negative value is "
                   "refused: it would reverse the update)")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--ema-decay", type=float_range(0, 1, hi_open=True), default=0.999,
                   help="EMA decay per optimizer step")
    g = p.add_argument_group("run")
    g.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="auto: bf16 where the GPU has it natively (compute capability >= 8), else fp16 + "
                        "GradScaler; fp32 on CPU")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of every random draw")
    g = p.add_argument_group(RESUMABLE)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from CKPT_DIR/last.pt, or from the given checkpoint")
    g.add_argument("--batch-size", type=positive_int, default=4, help="images per GPU per micro-step (on --resume: "
                   "with --accum-steps, keeping the global batch)")
    g.add_argument("--accum-steps", type=positive_int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--workers", type=non_negative_int, default=2, help="data loader worker processes per GPU")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda where there is a GPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the "
                   "model (minutes of compiling first; measured slower on CPU, see BENCHMARKS.md)")
    g.add_argument("--ckpt-dir", default="checkpoints", help="last.pt and best.pt go here")
    g.add_argument("--log-dir", default="logs", help="metrics.csv, TensorBoard events, figures")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps in total "
                   "(the schedule still spans --epochs)")
    g.add_argument("--save-every", type=positive_int, default=500, help="write last.pt every N optimizer steps")
    g.add_argument("--log-every", type=positive_int, default=10, help="log training metrics every N optimizer steps")
    g.add_argument("--max-nan", type=positive_int, default=5, help="stop after this many non-finite losses in a row")
    g.add_argument("--accept-changed-data", action="store_true", help="resume although a data file changed since "
                   "the checkpoint (the schedule and data order then follow the files as they are now)")
    return g



def resumable_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The names (dests) of the flags a resume may change: those of the RESUMABLE group, wherever they were added."""
    return {a.dest for g in parser._action_groups if g.title == RESUMABLE for a in g._group_actions}


def typed_flags(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> set[str]:
    """The names (dests) of the flags typed on the command line, even those typed at their default value."""
    untyped = object()  # argparse fills only the names a namespace lacks: what is still `untyped` was not given
    given = parser.parse_args(argv, argparse.Namespace(**{k: untyped for k in vars(args)}))
    return {k for k, v in vars(given).items() if v is not untyped}


def flag_name(dest: str) -> str:
    """An argparse dest as the flag a user types: "max_steps" -> "--max-steps"."""
    return "--" + dest.replace("_", "-")


# -----------------------------------------------------------------------------
# processes, devices, the run's settings

def setup_processes(parser: argparse.ArgumentParser, argv: list[str] | None) -> Setup:
    """This process: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (DDP over NCCL on GPUs, gloo on CPUs), else one
    process. The device from --device (--device cuda without a GPU: ConfigError), the precision from --precision
    (inference.resolve_precision); TF32 matmuls and convolutions on CUDA."""
    args = parser.parse_args(argv)
    try:
        kind = resolve_device(args.device).type
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if kind == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(kind)
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's per-op switches (allow_tf32 is the legacy API;
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # mixing the two raises); SSIM turns convs back to ieee
    return Setup(rank, world, device)


@dataclass
class Run:
    """What a run is, once its command line and (when resuming) its checkpoint are read."""
    args: argparse.Namespace  # the flags; when resuming the checkpoint's run config but for the resumable flags
    parser: argparse.ArgumentParser  # the command's, for the command line a diverged run advises
    script: str  # "train.py" or "distill.py"
    ckpt: dict | None = None  # the checkpoint resumed from, None for a new run
    ckpt_path: Path | None = None  # its file


def resolve_run(parser: argparse.ArgumentParser, script: str, argv: list[str] | None, setup: Setup) -> Run:
    """The run's settings from argv and, with --resume, the checkpoint: its run config wins but for the flags of the
    RESUMABLE group, and the global batch must stay. A new run never overwrites an earlier one; a resume never
    writes over another run's last.pt. CheckpointError / TrainingError naming the file otherwise. Sets
    setup.precision to the run's (inference.resolve_precision of its --precision)."""
    args = parser.parse_args(argv)
    ckpt_dir, log_dir = Path(args.ckpt_dir), Path(args.log_dir)
    if args.resume is None:
        check_output_dirs(args)
        check_new(args)  # again once the folders are held (start): a run started beside this one may have written
        setup.precision = resolve_precision(args.precision, setup.device)
        return Run(args, parser, script)

    resume_path = ckpt_dir / "last.pt" if args.resume == "auto" else Path(args.resume)
    ckpt = read_checkpoint(resume_path)  # missing / truncated / unsafe -> CheckpointError; never a silent fresh start
    if "run_config" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f"{resume_path}: holds model weights only (no optimizer state); cannot resume from it")
    saved, resumable = ckpt["run_config"], resumable_flags(parser) | DATA_PATHS
    changed = typed_flags(parser, argv, args)
    for k in sorted(changed - resumable):
        if k not in saved:
            setup.log(f"note: {flag_name(k)} ignored: the checkpoint predates it; resuming with its default")
        elif getattr(args, k) != saved[k]:
            setup.log(f"note: {flag_name(k)} {getattr(args, k)} ignored: resuming with the checkpoint's {saved[k]!r}")
    defaults = vars(parser.parse_args([]))  # for flags newer than the checkpoint
    args = argparse.Namespace(**{**defaults, **saved, **{k: getattr(args, k) for k in changed & resumable},
                                 "resume": args.resume, "accept_changed_data": args.accept_changed_data})  # this time
    moved = Path(args.ckpt_dir).resolve() != Path(saved["ckpt_dir"]).resolve()
    if moved and "log_dir" not in changed:  # a copy continued elsewhere logs beside its checkpoints, never into the
        args.log_dir = args.ckpt_dir  # original run's log folder
        setup.log(f"note: logging into --ckpt-dir {args.ckpt_dir} (the run's log folder is {saved['log_dir']}; "
                  f"--log-dir chooses another)")
    # another number of processes is fine if the global batch stays: the data order, the per-sample noise and
    # augmentation, the step count and the schedule are all functions of the global batch and sample indices
    was = (saved["batch_size"], ckpt["world_size"], saved["accum_steps"])
    now = (args.batch_size, setup.world, args.accum_steps)
    if math.prod(now) != math.prod(was):
        raise CheckpointError(
            f"{resume_path}: the run's global batch is {math.prod(was)} (batch size {was[0]} x {was[1]} "
            f"process(es) x {was[2]} accum steps), this command's is {math.prod(now)} ({now[0]} x {now[1]} x "
            f"{now[2]}); choose --batch-size and --accum-steps whose product with {setup.world} process(es) is "
            f"{math.prod(was)}")
    target = Path(args.ckpt_dir) / "last.pt"  # where this run will save: the checkpoint's own run folder by default
    if "ckpt_dir" not in changed and not target.exists() and target.parent.resolve() != resume_path.resolve().parent:
        raise TrainingError(f"{resume_path}: its run's folder {saved['ckpt_dir']} is not found from {Path.cwd()} (a "
                            f"run's folders are kept as given, relative to where it started): resume there, or pass "
                            f"--ckpt-dir and --log-dir to continue {resume_path} in other folders")
    check_output_dirs(args)
    if target.exists() and not target.samefile(resume_path):  # a copy, or an older last.pt of that run
        raise TrainingError(f"{resume_path}: resuming would write over {target}, another checkpoint (the run's "
                            f"own or an earlier copy's): pass --ckpt-dir and --log-dir to new folders to continue "
                            f"{resume_path} there")
    setup.precision = resolve_precision(args.precision, setup.device)
    return Run(args, parser, script, ckpt, resume_path)


def check_new(args: argparse.Namespace) -> None:
    """TrainingError if a new run's folders hold an earlier run's last.pt, best.pt or metrics.csv. An empty
    metrics.csv or one of only its header, beside no checkpoint, is a run stopped (killed) before its first log row:
    it holds nothing, and the new run writes it afresh (MetricsLog)."""
    last, best = Path(args.ckpt_dir) / "last.pt", Path(args.ckpt_dir) / "best.pt"
    metrics = Path(args.log_dir) / "metrics.csv"
    for f in (last, best):
        if f.exists():
            resume = f"continue it with --resume {last}, or " if last.exists() else ""
            raise TrainingError(f"{f} exists from an earlier run: {resume}choose another --ckpt-dir / --log-dir")
    if metrics.exists() and len(metrics.read_bytes().splitlines()) > 1:
        raise TrainingError(f"{metrics} holds the log of an earlier run (with no checkpoint in {args.ckpt_dir}): "
                            f"choose another --log-dir, or delete it if that run is of no use")


def check_output_dirs(args: argparse.Namespace) -> None:
    """TrainingError naming the flag if --ckpt-dir or --log-dir cannot be a folder to write in (files.check_output_dir),
    before the data, the model and the steps."""
    for flag, folder in (("--ckpt-dir", args.ckpt_dir), ("--log-dir", args.log_dir)):
        try:
            check_output_dir(folder)
        except ValueError as e:
            raise TrainingError(f"{flag} {e}") from e


def make_data(args: argparse.Namespace, setup: Setup, train_ds: EarDataset, val_ds: EarDataset,
              sampler: torch.utils.data.Sampler | None = None) -> Data:
    """The run's loaders: training in the order of `sampler` (default: a ResumableSampler shuffling the whole file),
    validation in file order. Steps per epoch are the sampler's positions over the global batch; a file too small
    for one optimizer step is a DataError naming it."""
    global_batch = args.batch_size * setup.world * args.accum_steps
    if sampler is None:
        if len(train_ds) < global_batch:
            raise DataError(f"{train_ds.path}: {len(train_ds)} usable samples, fewer than one optimizer step of "
                            f"{global_batch} (batch size x processes x accum steps)")
        sampler = ResumableSampler(len(train_ds), args.batch_size, args.seed, shuffle=True, rank=setup.rank,
                                   world_size=setup.world)
    val_sampler = ResumableSampler(len(val_ds), 1, args.seed, shuffle=False)
    return Data(train_ds, val_ds, sampler, make_loader(train_ds, args.batch_size, sampler, args.workers),
                make_loader(val_ds, args.batch_size, val_sampler, args.workers), sampler.n_used // global_batch)


def data_fingerprints(data: Data, run: Run, log: Callable[[str], None]) -> dict[str, dict]:
    """The run's data files' fingerprints (data.fingerprint), which its checkpoints keep. On resume each must equal
    the checkpoint's, else a DataError saying which file changed and how (--accept-changed-data: a note instead)."""
    now = {"train": data.train_ds.fingerprint(), "val": data.val_ds.fingerprint()}
    for split, ds in (("train", data.train_ds), ("val", data.val_ds)):
        saved = (run.ckpt or {}).get("data", {}).get(split)
        if saved is None or (change := fingerprint_change(saved, now[split])) is None:
            continue
        what = f"{ds.path}: changed since {run.ckpt_path} was saved ({change})"
        if not run.args.accept_changed_data:
            raise DataError(f"{what}; resuming would train on other data with another schedule: restore the file, "
                            f"start a new run, or pass --accept-changed-data")
        log(f"note: {what}; resuming on it (--accept-changed-data)")
    return now


def read_data(args: argparse.Namespace) -> tuple[EarDataset, EarDataset]:
    """The run's training and validation files (--train-npy / --val-npy, else DATA_DIR/{train,val}_teacher.npy)."""
    data_dir = Path(args.data_dir)
    return (EarDataset(args.train_npy or data_dir / "train_teacher.npy", max_invalid=args.max_invalid),
            EarDataset(args.val_npy or data_dir / "val_teacher.npy", max_invalid=args.max_invalid))


# -----------------------------------------------------------------------------
# the loop

def train(objective: Objective, run: Run, setup: Setup) -> None:
    """Optimise `objective` on this process (setup.rank of setup.world): set up, then the loop top to bottom."""
    args, data, device, log = run.args, objective.data, setup.device, setup.log
    ckpt_dir, log_dir = Path(args.ckpt_dir), Path(args.log_dir)
    global_batch = args.batch_size * setup.world * args.accum_steps  # images per optimizer step, all processes
    epoch_len = data.steps_per_epoch * global_batch  # samples of an epoch that are used (the remainder is dropped)
    total_steps = args.epochs * data.steps_per_epoch
    fingerprints = data_fingerprints(data, run, log)  # a resume over changed data stops here
    opt = Optimisation(objective.model, args, total_steps, setup)
    at = Position() if run.ckpt is None else opt.load(run.ckpt, run.ckpt_path, objective.score)
    saver = Saver(objective, opt, at, run, setup.world, fingerprints)  # a resumed state that is not good stops here
    end = min(total_steps, args.max_steps or total_steps)
    if at.step >= end:  # a resume at or past the run's end
        log(f"nothing to train: {run.ckpt_path} is at step {at.step} and the run ends at step {end} (--epochs "
            f"{args.epochs}" + (f", --max-steps {args.max_steps}" if args.max_steps else "") + "); nothing was written")
        return
    model = objective.model
    if args.compile:
        model.compile()  # in place: the same module and state-dict keys, its forward compiled on first call
    if setup.ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    with hold(run, setup):  # from here on rank 0 owns the run's checkpoint and log folders
        metrics = start(objective, run, setup, total_steps)  # the config printed; rank 0: config.json, metrics.csv
        if setup.master:  # sanity check, as the original did: two validation batches through model and loss
            val = objective.validate(opt.eval_model, max_batches=2)
            log("Sanity check (2 val batches): " + " ".join(f"{k} {v:.4g}" for k, v in val.items()))
            saver.check_start(opt.problem(val))

        model.train()
        nan_streak = 0
        done = False
        while not done and at.epoch < args.epochs:
            data.sampler.set_epoch(at.epoch, start=at.epoch_pos)
            batches = iter(data.train_loader)
            bar = progress(total=data.steps_per_epoch, initial=at.epoch_pos // global_batch, desc=f"epoch {at.epoch}",
                           disable=not setup.master)
            t0, imgs = time.time(), 0
            while at.epoch_pos < epoch_len:
                loss_sum = torch.zeros((), device=device)
                for micro in range(args.accum_steps):
                    x, keys = next(batches)  # uint8 (B, 3, 128, 128), int64 (B,) sample indices
                    x = x.to(device, non_blocking=True)
                    sync = micro == args.accum_steps - 1
                    with model.no_sync() if setup.ddp and not sync else nullcontext():
                        with setup.autocast():
                            loss, logs = objective.loss(model, x, keys, at.epoch)
                        opt.scaler.scale(loss / args.accum_steps).backward()
                    loss_sum += loss.detach()
                    imgs += len(keys) * setup.world
                # one host sync per optimizer step: a non-finite loss on any process skips the update everywhere, and
                # a stop request on any process stops all of them at this step
                flags = torch.stack([loss_sum, torch.tensor(float(bool(STOP_SIGNALS)), device=device)])
                if setup.ddp:
                    dist.all_reduce(flags)
                loss_total, stop_requests = flags.tolist()
                grad_norm = opt.step(math.isfinite(loss_total))
                nan_streak = 0 if math.isfinite(loss_total) else nan_streak + 1
                if nan_streak:
                    at.skipped += 1
                    log(f"\nwarning: non-finite loss at step {at.step}; update skipped ({nan_streak} in a row)")
                    if nan_streak >= args.max_nan:
                        bar.close()
                        raise saver.not_saved(f"{nan_streak} non-finite losses in a row")
                at.step += 1
                at.epoch_pos += global_batch
                bar.update(1)

                if at.step % args.log_every == 0 and setup.master:
                    dt = time.time() - t0
                    row = {k: v.item() for k, v in logs.items()}  # terms: rank 0's last micro-batch
                    row["loss"] = loss_total / (args.accum_steps * setup.world)  # mean over micro-batches and processes
                    row.update(step=at.step, epoch=at.epoch, split="train", lr=opt.optimizer.param_groups[-1]["lr"],
                               grad_norm=grad_norm.item(), skipped=at.skipped, img_per_s=imgs / dt,
                               time=int(time.time()))
                    metrics.write_row(row)
                    shown = {k: f"{v:.3f}" for k, v in objective.postfix(row).items()}
                    bar.set_postfix(loss=f"{row['loss']:.3f}", **shown, img_s=f"{imgs / dt:.1f}")
                    t0, imgs = time.time(), 0
                stop = stop_requests > 0 if setup.ddp else bool(STOP_SIGNALS)  # SIGINT / SIGTERM: save last.pt, exit
                done = args.max_steps is not None and at.step >= args.max_steps
                if setup.master and (stop or (at.step % args.save_every == 0 and not done and nan_streak == 0)):
                    saver.save_last(bar)
                if stop:
                    if setup.ddp:  # no process exits before rank 0's save is complete: torchrun, seeing one
                        dist.barrier()  # process end, signals the others and kills the rest 30 s later
                    bar.close()
                    log(f"stopped by signal at step {at.step}; saved {ckpt_dir / 'last.pt'} (continue with "
                        f"`{run.script} --resume {ckpt_dir / 'last.pt'}`)")
                    sys.exit(128 + STOP_SIGNALS[0] if STOP_SIGNALS else 1)
                if done:
                    break
            bar.close()
            trained_epoch = at.epoch
            if at.epoch_pos >= epoch_len:
                at.epoch, at.epoch_pos = at.epoch + 1, 0
            if setup.master:  # after every epoch, and at the last step of a run cut short by --max-steps
                val = objective.validate(opt.eval_model)
                metrics.write_row({"step": at.step, "epoch": trained_epoch, "split": "val", "time": int(time.time()),
                                   **val})
                log(f"val step {at.step}: " + " ".join(f"{k} {v:.4g}" for k, v in val.items()))
                if (problem := opt.problem(val)) is not None:
                    raise saver.not_saved(problem)
                if val[objective.score] > at.best:
                    at.best = val[objective.score]
                    saver.save_best()
                saver.save_last()
                objective.after_validation(opt.eval_model, at.step, log_dir)
                plot_curves(log_dir / "metrics.csv", log_dir / "loss_curve.png", objective.score, objective.score_axis)
            if setup.ddp:
                dist.barrier()
        if setup.master:
            log(f"done: {at.step} steps, best val {objective.score_text.format(at.best)}; checkpoints in {ckpt_dir}, "
                f"logs in {log_dir}")
            metrics.close()
    if setup.ddp:
        dist.destroy_process_group()


def start(objective: Objective, run: Run, setup: Setup, total_steps: int) -> MetricsLog | None:
    """Print the run's config and set-up; on rank 0 create its folders, write config.json and open the metrics log
    (None on other ranks)."""
    args, data, log = run.args, objective.data, setup.log
    global_batch = args.batch_size * setup.world * args.accum_steps
    log("Config:\n" + json.dumps({"run": vars(args), "model": objective.config, "precision": setup.precision,
                                  "device": str(setup.device), "world_size": setup.world}, indent=2))
    for line in objective.describe():
        log(line)
    log(f"Train samples: {data.train_ds.summary()}")
    log(f"Val samples:   {data.val_ds.summary()}")
    log(f"Steps per epoch: {data.steps_per_epoch:,} (global batch {global_batch}), "
        f"total {total_steps:,}" + (f", stopping at {args.max_steps:,}" if args.max_steps else ""))
    if not setup.master:
        return None
    Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(args.log_dir) / "config.json") as f:
        save_json({"run": vars(args), "model": objective.config})(f)
    return MetricsLog(Path(args.log_dir), objective.log_fields, log, fresh=run.ckpt is None)


@contextmanager
def hold(run: Run, setup: Setup) -> Iterator[None]:
    """Rank 0 owns the run's checkpoint and log folders while it lives (files.hold_folders): a second run into them
    is a TrainingError naming the holder. Holding them, a new run checks again that they hold no earlier run."""
    with ExitStack() as stack:
        if setup.master:
            try:
                stack.enter_context(hold_folders([run.args.ckpt_dir, run.args.log_dir],
                                                 f"{run.script} --ckpt-dir {run.args.ckpt_dir}"))
            except ValueError as e:
                raise TrainingError(str(e)) from None
            if run.ckpt is None:
                check_new(run.args)
        yield


def fit(make: Callable[[Run, Setup], Objective], run: Run, setup: Setup) -> None:
    """train(make(run, setup), run, setup), with CUDA's out-of-memory error, in building the objective or in training,
    as a TrainingError naming the ways out (a smaller batch, and make.memory_advice)."""
    try:
        train(make(run, setup), run, setup)
    except torch.OutOfMemoryError as e:
        b, k = run.args.batch_size, run.args.accum_steps
        raise TrainingError(f"out of GPU memory at --batch-size {b}. Use a smaller batch with --accum-steps to keep "
                            f"the global batch (e.g. --batch-size {max(1, b // 2)} --accum-steps {2 * k})"
                            + make.memory_advice(run.ckpt is not None)) from e


def command(main: Callable[[], None]) -> None:
    """Run an entry point's main() as a command: a console that prints any text, SIGINT / SIGTERM recorded in
    STOP_SIGNALS (the loop saves last.pt and exits at the next step), and the project's errors as one line on stderr,
    exit 1."""
    safe_console()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP_SIGNALS.append(signum))
    try:
        main()
    except (DataError, CheckpointError, ConfigError, WeightsUnavailableError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@torch.no_grad()
def mean_logs(model: nn.Module, loader: DataLoader, device: torch.device,
              logs: Callable[[torch.Tensor], dict[str, torch.Tensor]],
              max_batches: int | None = None) -> dict[str, float]:
    """The mean over a loader's images (the first max_batches batches) of each value that logs(x) returns for a batch
    x (B, 3, 128, 128) float in [0, 1] on `device` (0-dim tensors, batch means), with the model in eval mode."""
    was_training = model.training
    model.eval()
    sums, n = {}, 0
    for b, (x, _) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        x = to_float(x.to(device, non_blocking=True))  # (B, 3, 128, 128)
        for k, v in logs(x).items():
            sums[k] = sums.get(k, 0.0) + v.float() * len(x)
        n += len(x)
    model.train(was_training)
    return {k: (v / n).item() for k, v in sums.items()}


# -----------------------------------------------------------------------------
# the state the loop optimises, and what it saves

@dataclass
class Position:
    """Where the run is: optimizer steps done, the epoch and the samples of it consumed by all processes together,
    the best validation score so far, the updates skipped for non-finite losses."""
    step: int = 0
    epoch: int = 0
    epoch_pos: int = 0
    best: float = -math.inf
    skipped: int = 0


class Optimisation:
    """The model and what optimises it: fused AdamW (build_optimizer), the warm-up + cosine schedule (lr_factor), the
    GradScaler (fp16 only), the EMA (--ema), and each weight tensor's scale at initialisation (the divergence
    guard's reference: weights_problem)."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, total_steps: int, setup: Setup) -> None:
        self.model, self.grad_clip = model, args.grad_clip
        self.initial = weight_scales(model)  # on resume the same seeded initialisation
        self.optimizer = build_optimizer(model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, args.warmup_steps, total_steps, args.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.precision == "fp16")
        self.ema = None
        if args.ema:
            self.ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and drawn: the EMA where the run keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def step(self, finite: bool) -> torch.Tensor:
        """One optimizer step on the accumulated gradients (skipped where the loss was not finite), the schedule's
        step, gradients cleared -> the gradient norm before clipping (NaN when skipped)."""
        grad_norm = torch.tensor(math.nan)
        if finite:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def problem(self, val: dict[str, float] | None = None) -> str | None:
        """Why the state now is not worth saving, or None: a non-finite validation value (`val`; a PSNR of +inf is a
        perfect image), weights that are not finite or have diverged (weights_problem), the EMA's too."""
        bad = {k: v for k, v in (val or {}).items() if not math.isfinite(v) and not (k == "psnr" and v == math.inf)}
        if bad:
            return "non-finite validation values (" + " ".join(f"{k} {v}" for k, v in bad.items()) + ")"
        problem = weights_problem(weight_scales(self.model), self.initial)
        if problem is None and self.ema is not None:
            problem = weights_problem(weight_scales(self.ema.module), self.initial, "EMA weights")
        return problem

    def state(self, full: bool) -> dict:
        """The weights (and EMA's); with `full` everything else a resume needs."""
        state = {"model": self.model.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict())
            if self.ema is not None:
                state["ema_n_averaged"] = int(self.ema.n_averaged)
        return state

    def load(self, ckpt: dict, path: Path, score: str) -> Position:
        """Restore a last.pt (read_checkpoint's dict, cleared after: the tensors are freed) -> the run's position."""
        load_state(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            load_state(self.ema.module, ckpt["ema"], path)
            self.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        at = Position(ckpt["step"], ckpt["epoch"], ckpt["epoch_pos"], ckpt[f"best_{score}"], ckpt["skipped"])
        ckpt.clear()
        return at


class Saver:
    """last.pt and best.pt of a run, written only when the state is good (Optimisation.problem); a state that is not
    stops the run with a TrainingError naming the last good state and the command of a new run (restart_command)."""

    def __init__(self, objective: Objective, opt: Optimisation, at: Position, run: Run, world: int,
                 fingerprints: dict[str, dict]) -> None:
        self.objective, self.opt, self.at, self.run, self.world = objective, opt, at, run, world
        self.fingerprints = fingerprints  # of the data files (data_fingerprints)
        self.ckpt_dir = Path(run.args.ckpt_dir)
        self.last_good = None  # (file, step) of the last good state saved or resumed from
        if run.ckpt_path is not None:
            if (problem := opt.problem()) is not None:
                raise TrainingError(f"{run.ckpt_path} (step {at.step}): {problem}; it cannot be resumed. "
                                    f"{self.new_run()}")
            self.last_good = (run.ckpt_path, at.step)

    def state(self, full: bool) -> dict:
        """A checkpoint: the objective's part, the weights, the run config and position; with `full` (last.pt)
        everything a resume needs, best.pt the weights only."""
        at = self.at
        state = {**self.opt.state(full), **self.objective.state(), "run_config": vars(self.run.args),
                 "step": at.step, "epoch": at.epoch, "epoch_pos": at.epoch_pos, f"best_{self.objective.score}": at.best,
                 "data": self.fingerprints}
        if full:
            state.update(skipped=at.skipped, world_size=self.world)
        return state

    def save_last(self, bar: tqdm | None = None) -> None:
        """last.pt, if the state is good; else not_saved() (the epoch's progress `bar` closed first, so that the
        error is the last line printed)."""
        if (problem := self.opt.problem()) is not None:
            if bar is not None:
                bar.close()
            raise self.not_saved(problem)
        save_checkpoint(self.state(full=True), self.ckpt_dir / "last.pt")
        self.last_good = (self.ckpt_dir / "last.pt", self.at.step)

    def save_best(self) -> None:
        save_checkpoint(self.state(full=False), self.ckpt_dir / "best.pt")

    def check_start(self, problem: str | None) -> None:
        """The sanity check's verdict (Optimisation.problem of its values) -> a TrainingError before step 0."""
        if problem is None:
            return
        if self.run.ckpt_path is not None:
            raise TrainingError(f"sanity check of {self.run.ckpt_path} (step {self.at.step}): {problem}; it cannot "
                                f"be resumed. {self.new_run()}")
        raise TrainingError(f"sanity check before step 0: {problem} from the initial model; nothing was trained or "
                            f"saved. Check the data (python data.py check FILE) and, under fp16 or bf16, try "
                            f"--precision fp32")

    def not_saved(self, problem: str) -> TrainingError:
        """The error that stops a run whose state is not good, naming the last good state and a new run's command."""
        good = (f"{self.last_good[0]} (step {self.last_good[1]}) is the last good state" if self.last_good else
                "no checkpoint exists")
        return TrainingError(f"{problem} at step {self.at.step}; stopped without saving: {good}. {self.new_run()}")

    def new_run(self) -> str:
        """What to do instead: restart_command(), and why a resume would not help."""
        run = self.run
        once = {"resume", "accept_changed_data"}  # what applies to one command, not to the run
        overrides = ", ".join(flag_name(k) for k in sorted(resumable_flags(run.parser) - once))
        return (f"Start a new run with a lower learning rate in new folders: "
                f"`{restart_command(run.parser, run.script, run.args, self.world)}` (--resume keeps the run's --lr; "
                f"it may change only {overrides})")


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save through atomic_write: a crash mid-save leaves the previous file intact; an OSError (disk full,
    no permission) becomes a TrainingError naming the file."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:
        raise TrainingError(f"could not write {path} ({e.strerror or e}); the previous checkpoint is intact") from e


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """Fused AdamW over the model's parameter_groups(): the "encoder" group at lr * encoder_lr_scale, no weight decay
    on norms and biases (the tensors with fewer than 2 dims)."""
    groups = []
    for name, params in model.parameter_groups().items():
        lr = args.lr * (args.encoder_lr_scale if name == "encoder" else 1.0)
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), fused=True)  # one kernel (CPU too: 6x faster there)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to min_ratio at `total` optimizer steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def weight_scales(model: nn.Module) -> dict[str, float]:
    """max |value| of each parameter tensor of the model, by name (NaN where a tensor holds a NaN); one host sync."""
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.stack([p.detach().abs().max().float() for p in params]).tolist()))


def weights_problem(scales: dict[str, float], initial: dict[str, float], what: str = "weights") -> str | None:
    """Why weights whose weight_scales() are `scales` are not a state worth saving or resuming from, or None when they
    are sane: every value finite, and no tensor's max |value| above SANE_GROWTH x max(its max |value| at
    initialisation (`initial`), 1). Adam moves a weight by about lr per step at most, so at lr 3e-4 a weight needs
    over 3 million steps to grow by 1000: a sane run never comes near the bound, a diverged one (lr 1e8) passes it
    in one step. The floor of 1 lets tensors initialised at 0 (biases) grow to 1000. On resume `initial` is the seed's
    initialisation with a random backbone (a pretrained one is not loaded again): a pretrained weight is flagged only
    beyond 1000 x max(that random scale, 1)."""
    for name, m in scales.items():
        if not math.isfinite(m):
            return f"the {what} diverged ({name} holds non-finite values)"
        if m > SANE_GROWTH * max(initial[name], 1.0):
            return (f"the {what} diverged ({name} reached max |value| {m:.3g}, more than {SANE_GROWTH:g} x "
                    f"max(its initial {initial[name]:.3g}, 1))")
    return None


def restart_command(parser: argparse.ArgumentParser, script: str, args: argparse.Namespace, world: int) -> str:
    """The command of a new run that may work where this one diverged: the same flags, --lr a tenth of this run's (at
    most the default), gradient clipping on (the default) if it was off, and a --ckpt-dir and --log-dir that do not
    exist yet (a new run refuses to overwrite an earlier one). Other flags at their default are left out."""
    defaults = vars(parser.parse_args([]))
    lr = min(args.lr / 10, defaults["lr"])
    new = {"lr": float(f"{lr:.3g}"), "grad_clip": args.grad_clip or defaults["grad_clip"], "resume": None}
    for key in ("ckpt_dir", "log_dir"):
        path, n = f"{getattr(args, key)}_lr{new['lr']:g}", 1
        while Path(path).exists():
            n += 1
            path = f"{getattr(args, key)}_lr{new['lr']:g}_{n}"
        new[key] = path
    argv = []
    for k, default in defaults.items():
        v = new.get(k, getattr(args, k, default))
        if v is not None and v is not False and (v != default or k in new):  # --lr and --grad-clip always shown
            argv += [flag_name(k)] if v is True else [flag_name(k), str(v)]  # every boolean flag defaults to False
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    return shlex.join([*launcher, script, *argv])


# -----------------------------------------------------------------------------
# the metrics log and its figure

class MetricsLog:
    """LOG_DIR/metrics.csv (appended to when resuming; a new run's, fresh, replaces a header-only file: check_new)
    and, where tensorboard is installed, TensorBoard events. Its columns: the loop's (step, epoch, split, lr, loss),
    the objective's `fields`, then grad_norm, skipped, img_per_s, time."""

    def __init__(self, log_dir: Path, fields: tuple[str, ...], log: Callable[[str], None], fresh: bool) -> None:
        path = log_dir / "metrics.csv"
        new_csv = fresh or not path.exists()
        columns = ["step", "epoch", "split", "lr", "loss", *fields, "grad_norm", "skipped", "img_per_s", "time"]
        if not new_csv:  # a resume appends under the file's own header, which an earlier version may have written
            with open(path, newline="") as f:
                header = next(csv.reader(f), columns)
            if header != columns:
                log(f"note: {path} has the columns of an earlier version; appending under them (not logged: "
                    f"{', '.join(c for c in columns if c not in header) or 'nothing'})")
                columns = header
        self.csv_file = open(path, "w" if fresh else "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=columns, extrasaction="ignore")
        if new_csv:
            self.csv.writeheader()
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)
        except ImportError:
            log("note: tensorboard is not installed; logging to metrics.csv only")

    def write_row(self, row: dict) -> None:
        """One row (missing columns empty); every number but step / epoch / time also to TensorBoard as
        'split/name'."""
        self.csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.csv_file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch", "split", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.csv_file.close()


def plot_curves(csv_path: Path, png_path: Path, score: str, score_axis: dict[str, str]) -> None:
    """loss_curve.png: the loss, and the validation `score` that picks best.pt (score_axis: its ylabel and title)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        r = [row for row in rows if row["split"] == split and row["loss"]]
        if r:
            axes[0].plot([int(x["step"]) for x in r], [float(x["loss"]) for x in r], style, label=split)
        r = [row for row in rows if row["split"] == split and row.get(score)]
        if r:
            axes[1].plot([int(x["step"]) for x in r], [float(x[score]) for x in r], style, label=split)
    axes[0].set(xlabel="optimizer step", ylabel="loss", yscale="log", title="loss")
    axes[1].set(xlabel="optimizer step", **score_axis)
    for a in axes:
        if a.lines:  # a run stopped before its first log row has none
            a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(png_path) as f:
        save_figure(fig)(f)
