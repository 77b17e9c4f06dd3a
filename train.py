"""Train the ear teacher (SAM-encoder VAE) on NPY ear crops. One file, top to bottom:

    python train.py --epochs 60 --batch-size 4                       # the original run (GPU, pretrained SAM)
    python train.py --tiny --no-pretrained --perceptual-weight 0 \\
        --data-dir demo/data --epochs 3                                # CPU-sized run on synthetic ears
    torchrun --nproc_per_node=4 train.py ...                           # DistributedDataParallel
    python train.py --resume                                           # continue checkpoints/last.pt
    python train.py --teacher checkpoints/best.pt --ckpt-dir student   # distil a student from a trained teacher

Every random draw of training (epoch order, augmentation, reparameterisation noise) is a function of
(seed, epoch, sample index), so a resumed run, or a run on another number of GPUs, sees the same data and noise.
With --teacher the same loop trains a student (student.py: a small torchvision CNN) to reproduce a trained
teacher's identity embedding and mu (losses.DistillLoss), the frozen teacher computing its targets on the fly from
the same augmented images.

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
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cli import (float_range, fraction, int_range, non_negative, non_negative_int, positive, positive_int, progress,
                 safe_console, seed_int)
from data import (UNLABELLED, AugConfig, EarDataset, IdentitySampler, ResumableSampler, augment, make_loader,
                  missing_labels, read_identities, sample_seed, to_float)
from errors import CheckpointError, ConfigError, DataError, TrainingError, WeightsUnavailableError
from files import atomic_write, check_output_dir, save_figure, save_json
from inference import PRECISIONS, resolve_device, resolve_precision, autocast as inference_autocast
from losses import DistillConfig, DistillLoss, LossConfig, VAELoss, psnr, ssim
from checkpoints import load_model, read_checkpoint, weights_sha256
from hub import config_problem, load_state
from model import (EarVAE, VAEConfig, build_model, config_from_checkpoint, dinov2_config, parameter_report,
                   sam_config, tiny_config)
from student import ARCHS, Student, StudentConfig, teacher_targets

DEFAULT_WEIGHTS = {"sam": sam_config().weights, "dinov2": dinov2_config().weights}
# flags that may differ when resuming; every other flag comes from the checkpoint's run config
# (batch_size and accum_steps may change only together with the number of processes, keeping the global batch)
RESUME_OVERRIDES = {"resume", "max_steps", "workers", "log_every", "save_every", "max_nan", "ckpt_dir", "log_dir",
                    "device", "batch_size", "accum_steps", "compile", "grad_checkpointing", "teacher"}
SANE_GROWTH = 1000.0  # a weight tensor whose max |value| passes this x max(its initial one, 1) has diverged
CONTRASTIVE_MODES = ("auto", "supcon", "nt-xent")
# flags that set how a teacher is built and trained, refused with --teacher (a student run), and the student's flags,
# refused without it
TEACHER_FLAGS = {"encoder", "weights", "tiny", "input_size", "freeze_blocks", "latent_dim", "identity_dims",
                 "embed_dim", "attn", "grad_checkpointing", "kl_weight", "perceptual_weight", "ssim_weight",
                 "edge_weight", "contrastive_weight", "contrastive", "images_per_identity", "center_weight",
                 "temperature", "vgg_weights"}
STUDENT_FLAGS = {"student_arch", "student_weights", "student_input_size"}
STOP_SIGNALS: list[int] = []  # filled by the SIGINT / SIGTERM handlers installed under __main__
LOG_FIELDS = ["step", "epoch", "split", "lr", "loss", "pixel", "kl", "perceptual", "ssim", "edge", "contrastive",
              "psnr", "ssim_metric", "embed_cosine", "embed_l2", "mu_cosine", "mu_l2", "agreement", "grad_norm",
              "skipped", "img_per_s", "time"]


def get_parser() -> argparse.ArgumentParser:
    """Every flag; the model and loss defaults are read from VAEConfig, its factories and LossConfig."""
    sam, dinov2, tiny, loss = sam_config(), dinov2_config(), tiny_config(), LossConfig()
    p = argparse.ArgumentParser(description="Train the SAM-encoder VAE ear teacher.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data", help="folder with train_teacher.npy and val_teacher.npy")
    g.add_argument("--train-npy", default=None, help="training file (default DATA_DIR/train_teacher.npy)")
    g.add_argument("--val-npy", default=None, help="validation file (default DATA_DIR/val_teacher.npy)")
    g.add_argument("--max-invalid", type=fraction, default=0.05, help="stop if more than this fraction of samples is bad")
    g.add_argument("--workers", type=non_negative_int, default=2, help="data loader worker processes per GPU")
    g.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (turns left ears into right ones)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", choices=["sam", "dinov2"], default="sam", help="backbone")
    g.add_argument("--weights", default=None, help=f"hub id or local dir of the backbone (default: {sam.weights} "
                   f"or {dinov2.weights})")
    g.add_argument("--no-pretrained", action="store_true", help="random backbone initialisation (explicit)")
    g.add_argument("--tiny", action="store_true", help="tiny backbone and decoder: same code path, CPU speed")
    g.add_argument("--input-size", type=positive_int, default=None, help="side the crop is resized to for the encoder "
                   f"(SAM: {sam.input_size} original, 512 or 256 for 4x / 16x fewer tokens; DINOv2: "
                   f"{dinov2.input_size})")
    g.add_argument("--freeze-blocks", type=non_negative_int, default=None, help=f"frozen first blocks (default: "
                   f"{sam.freeze_blocks}, tiny {tiny.freeze_blocks})")
    g.add_argument("--latent-dim", type=positive_int, default=VAEConfig.latent_dim, help="latent size")
    g.add_argument("--identity-dims", type=non_negative_int, default=VAEConfig.identity_dims, help="the identity "
                   "embedding that the contrastive term trains is the first N entries of mu (L2-normalised); the rest "
                   "of mu is left to reconstruction. 0: all of mu; None: an eighth of --latent-dim (128 of 1024; all "
                   "of mu below 16)")
    g.add_argument("--embed-dim", type=non_negative_int, default=VAEConfig.embed_dim, help="0: the embedding is those "
                   "entries of mu; E > 0: an MLP head over them -> E (over all of mu it measured worse on the demo: "
                   "README)")
    g.add_argument("--attn", choices=["sdpa", "eager", "flex"], default="sdpa", help="attention implementation "
                   "(flex: SAM's relative-position bias inside a FlexAttention kernel; CUDA only, see BENCHMARKS.md)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute trainable blocks in backward (may be switched on or off when resuming)")
    g = p.add_argument_group("loss")
    g.add_argument("--kl-weight", type=non_negative, default=loss.kl, help="KL to N(0, I)")
    g.add_argument("--perceptual-weight", type=non_negative, default=loss.perceptual, help="VGG16 perceptual (0: no "
                   "VGG needed)")
    g.add_argument("--ssim-weight", type=non_negative, default=loss.ssim, help="1 - SSIM")
    g.add_argument("--edge-weight", type=non_negative, default=loss.edge, help="L1 of Sobel gradients")
    g.add_argument("--contrastive-weight", type=non_negative, default=loss.contrastive, help="the contrastive term "
                   "(--contrastive); 0: off")
    g.add_argument("--contrastive", choices=CONTRASTIVE_MODES, default="auto", help="supcon: SupCon on the identity "
                   "labels beside the training file (X_index.csv subject or X_factors.csv identity), batches of "
                   "--images-per-identity images per identity, one augmented view each; nt-xent: NT-Xent between two "
                   "views of each image, rotated and shifted but not zoomed or colour-jittered (size and skin tone are "
                   "identity; no labels needed); auto: supcon where the training file has "
                   "labels, else nt-xent")
    g.add_argument("--images-per-identity", type=int_range(2), default=None, help="K of the P x K batches of "
                   "supcon: each micro-batch holds batch-size / K >= 2 identities (the other identities are SupCon's "
                   "negatives). Default: the largest of 4, 3, 2 that divides --batch-size so (4 -> 2 x 2, 16 -> 4 x 4)")
    g.add_argument("--center-weight", type=positive, default=loss.center_weight, help="pixel-loss weight at the crop "
                   "centre (border 1)")
    g.add_argument("--temperature", type=positive, default=loss.temperature, help="SupCon / NT-Xent temperature")
    g.add_argument("--vgg-weights", default=loss.vgg_weights, help="'imagenet' (torchvision) or a local VGG16 state "
                   "dict")
    g = p.add_argument_group("distillation (--teacher: train a student instead of a teacher)")
    g.add_argument("--teacher", default=None, metavar="PATH", help="distil a student from this trained teacher (a "
                   "train.py checkpoint or an --export / save_pretrained folder): the student learns its identity "
                   "embedding and mu (cosine + L2) on the same data and augmentation; the teacher's model and loss "
                   "flags do not apply, --no-pretrained starts the student's trunk from random weights")
    g.add_argument("--student-arch", choices=list(ARCHS), default=StudentConfig.arch, help="the student's "
                   "torchvision trunk")
    g.add_argument("--student-weights", default=StudentConfig.weights, help="'imagenet' (torchvision's cache) or a "
                   "local state dict of the whole torchvision model")
    g.add_argument("--student-input-size", type=int_range(32, 1024), default=StudentConfig.input_size,
                   help="side the crop is resized to for the student")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=60, help="epochs; the learning-rate schedule spans them")
    g.add_argument("--batch-size", type=positive_int, default=4, help="images per GPU per micro-step")
    g.add_argument("--accum-steps", type=positive_int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=positive, default=3e-4, help="peak learning rate (head and decoder)")
    g.add_argument("--encoder-lr-scale", type=non_negative, default=0.1, help="encoder blocks train at lr * this")
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
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda where there is a GPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the "
                   "model (minutes of compiling first; measured slower on CPU, see BENCHMARKS.md)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of every random draw")
    g.add_argument("--ckpt-dir", default="checkpoints", help="last.pt and best.pt go here")
    g.add_argument("--log-dir", default="logs", help="metrics.csv, TensorBoard events, figures")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from CKPT_DIR/last.pt, or from the given checkpoint")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps in total "
                   "(the schedule still spans --epochs)")
    g.add_argument("--save-every", type=positive_int, default=500, help="write last.pt every N optimizer steps")
    g.add_argument("--log-every", type=positive_int, default=10, help="log training metrics every N optimizer steps")
    g.add_argument("--max-nan", type=positive_int, default=5, help="stop after this many non-finite losses in a row")
    return p


def model_config(args, teacher: EarVAE | None = None):
    """The model a new run builds: the teacher's VAEConfig from the flags, or with --teacher the student's
    StudentConfig, sized to the teacher's embedding and latent."""
    if teacher is not None:
        return StudentConfig(arch=args.student_arch, weights=args.student_weights, pretrained=not args.no_pretrained,
                             embed_dim=teacher.cfg.embedding_dim,
                             latent_dim=teacher.cfg.latent_dim, input_size=args.student_input_size)
    if args.tiny and not args.no_pretrained and args.weights is None:
        raise WeightsUnavailableError("--tiny has no published weights: add --no-pretrained (random tiny backbone) "
                                      "or --weights DIR of a tiny backbone")
    if (args.identity_dims or 0) > args.latent_dim:
        raise ConfigError(f"--identity-dims {args.identity_dims}: more than the latent's --latent-dim "
                          f"{args.latent_dim} entries (0: all of mu)")
    if args.identity_dims == 1:
        raise ConfigError("--identity-dims 1: one entry, L2-normalised, is +1 or -1 for every image and tells no "
                          "identity apart; give 2 or more (0: all of mu)")
    if args.embed_dim == 1:
        raise ConfigError("--embed-dim 1: one entry, L2-normalised, is +1 or -1 for every image and tells no "
                          "identity apart; give 2 or more (0: no head)")
    make = tiny_config if args.tiny else (sam_config if args.encoder == "sam" else dinov2_config)
    kw = dict(weights=args.weights or DEFAULT_WEIGHTS[args.encoder], pretrained=not args.no_pretrained,
              latent_dim=args.latent_dim, identity_dims=args.identity_dims, embed_dim=args.embed_dim,
              attn_implementation=args.attn,
              grad_checkpointing=args.grad_checkpointing)
    if args.input_size is not None:
        kw["input_size"] = args.input_size
    if args.freeze_blocks is not None:
        kw["freeze_blocks"] = args.freeze_blocks
    return make(args.encoder, **kw) if args.tiny else make(**kw)


def loss_config(args: argparse.Namespace) -> LossConfig:
    """The loss flags of a run (the pixel weight has no flag: it is the unit the others are relative to)."""
    return LossConfig(kl=args.kl_weight, perceptual=args.perceptual_weight, ssim=args.ssim_weight,
                      edge=args.edge_weight, contrastive=args.contrastive_weight, center_weight=args.center_weight,
                      temperature=args.temperature, vgg_weights=args.vgg_weights)


def images_per_identity(args: argparse.Namespace) -> int | None:
    """K of supcon's P x K micro-batches: --images-per-identity, or the largest of 4, 3, 2 that divides --batch-size
    into P >= 2 identities; None where no K does (a batch of 2, 3, 5 or 7). SupCon's negatives are the batch's other
    identities, so a batch of one identity has none and its gradient is zero. An explicit K that divides no batch of
    2 identities is a ConfigError."""
    b, k = args.batch_size, args.images_per_identity
    if k is None:
        return next((k for k in (4, 3, 2) if b % k == 0 and b // k >= 2), None)
    if b % k or b // k < 2:
        raise ConfigError(f"--images-per-identity {k}: --batch-size {b} must be a multiple of it holding at least 2 "
                          f"identities (SupCon's negatives are the other identities of the batch)")
    return k


def contrastive_mode(args: argparse.Namespace, train_ds: EarDataset,
                     world: int = 1) -> tuple[str, np.ndarray | None, str]:
    """The run's contrastive term -> ("off" | "supcon" | "nt-xent", the training file's identity labels (supcon) or
    None, why: a note for the log). --contrastive auto picks supcon when the file has labels (data.read_identities)
    with at least one identity of 2 images, the batch holds 2 identities (images_per_identity) and the identities
    fill a global batch of `world` processes (data.IdentitySampler), else nt-xent; on
    supcon args.images_per_identity is set to the K used (the checkpoint keeps it). --contrastive supcon without such
    labels is a DataError naming the files looked for, with too small a batch a ConfigError; an embedding head
    (--embed-dim) without the term is a ConfigError."""
    if args.contrastive_weight == 0:
        if args.embed_dim > 0:  # its parameters would get no gradient (and DDP stops on unused parameters)
            raise ConfigError(f"--embed-dim {args.embed_dim}: an embedding head needs the contrastive term that "
                              f"trains it (--contrastive-weight > 0)")
        return "off", None, ""
    if args.contrastive == "nt-xent":
        return "nt-xent", None, ""
    labels = read_identities(train_ds.path, train_ds)
    if labels is None:
        why = missing_labels(train_ds.path)
    elif not (np.bincount(labels[labels != UNLABELLED]) >= 2).any():
        why = "no identity has 2 images"
    elif (k := images_per_identity(args)) is None:
        why = (f"--batch-size {args.batch_size} cannot hold 2 identities of 2 images (SupCon needs a batch of 4 or "
               f"more: its negatives are the other identities)")
        if args.contrastive == "supcon":
            raise ConfigError(f"--contrastive supcon: {why}; or use --contrastive nt-xent")
    elif (n := len(np.unique(labels[labels != UNLABELLED]))) * k < (g := args.batch_size * args.accum_steps * world):
        # IdentitySampler would refuse
        why = f"{n} identit{'y' if n == 1 else 'ies'} x K={k} images do not fill one global batch of {g}"
    else:
        args.images_per_identity = k
        return "supcon", labels, ""
    if args.contrastive == "supcon":
        needs = "needs identity labels" if labels is None else "cannot train on its identity labels"
        raise DataError(f"{train_ds.path}: --contrastive supcon {needs}: {why}")
    return "nt-xent", None, f" (not SupCon: {why})" if labels is not None else ""


def contrastive_summary(mode: str, why: str, args: argparse.Namespace, cfg: VAEConfig, sampler) -> str:
    """One log line on the contrastive term of the run (why: contrastive_mode's note)."""
    if mode == "off":
        return "off (--contrastive-weight 0)"
    on = (f"on the first {cfg.identity_dims} of mu's {cfg.latent_dim} entries" if cfg.identity_dims else
          "on all of mu") + (f" through a head to {cfg.embed_dim}" if cfg.embed_dim else "")
    if mode == "nt-xent":
        views = "two views" if args.no_augment else "two views rotated and shifted (no zoom or colour jitter)"
        return (f"NT-Xent between {views} {on}, weight {args.contrastive_weight:g}, temperature "
                f"{args.temperature:g}{why}")
    short = f"; {sampler.n_short:,} with fewer than K images drawn with replacement" if sampler.n_short else ""
    return (f"SupCon on identity labels {on}, weight {args.contrastive_weight:g}, temperature {args.temperature:g}; "
            f"batches of {args.batch_size // args.images_per_identity} identities x K={args.images_per_identity} "
            f"images per process, {len(sampler.ids):,} identities{short}")


def keyed_normal(keys: torch.Tensor, seed: int, epoch: int, view: int, dim: int) -> torch.Tensor:
    """Reparameterisation noise (B, dim), each row a function of (seed, epoch, sample index, view) alone."""
    rows = []
    for k in keys.tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, k, view) ^ 0x5EED_E95)
        rows.append(torch.randn(dim, generator=g))
    return torch.stack(rows)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to min_ratio at `total` optimizer steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def weight_scales(model: torch.nn.Module) -> dict[str, float]:
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


def restart_command(args: argparse.Namespace, world: int) -> str:
    """The command of a new run that may work where this one diverged: the same flags, --lr a tenth of this run's (at
    most the default), gradient clipping on (the default) if it was off, and a --ckpt-dir and --log-dir that do not
    exist yet (a new run refuses to overwrite an earlier one). Other flags at their default are left out."""
    defaults = vars(get_parser().parse_args([]))
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
            flag = "--" + k.replace("_", "-")
            argv += [flag] if v is True else [flag, str(v)]  # every boolean flag of the parser defaults to False
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    return shlex.join([*launcher, "train.py", *argv])


@torch.no_grad()
def validate(model, loader, criterion, device, autocast, max_batches: int | None = None,
             teacher: EarVAE | None = None) -> dict[str, float]:
    """Mean of every loss term over the (clean, un-augmented) validation images, and PSNR and SSIM with mu as the
    code; for a student (teacher given) the distillation terms and its agreement with the teacher: the mean cosine
    of their identity embeddings."""
    was_training = model.training
    model.eval()
    sums, n = {}, 0
    for b, (x, _) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        x = to_float(x.to(device, non_blocking=True))  # (B, 3, 128, 128)
        with autocast:
            out = model(x)
            if teacher is not None:
                target = teacher_targets(teacher, x)
                _, logs = criterion(out, target)
            else:
                _, logs = criterion(out["recon"], x, out["mu"], out["logvar"])
        if teacher is not None:
            logs["agreement"] = F.cosine_similarity(out["embed"].float(), target["embed"].float()).mean()
        else:
            recon = out["recon"].float()
            logs = {**logs, "psnr": psnr(recon, x).mean(), "ssim_metric": ssim(recon, x).mean()}
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.float() * len(x)
        n += len(x)
    model.train(was_training)
    return {k: (v / n).item() for k, v in sums.items()}


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save through atomic_write: a crash mid-save leaves the previous file intact; an OSError (disk full,
    no permission) becomes a TrainingError naming the file."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:
        raise TrainingError(f"could not write {path} ({e.strerror or e}); the previous checkpoint is intact") from e


def save_grid(model, x: torch.Tensor, path: Path, autocast) -> None:
    """Inputs (top row) above reconstructions (bottom row) of a fixed validation batch x (N, 3, 128, 128), the
    forward under the run's autocast (in fp32 the 8-image forward at SAM input 1024 takes ~14 GiB more)."""
    from torchvision.utils import save_image
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        recon = model(x)["recon"]  # (N, 3, 128, 128), the autocast dtype
    model.train(was_training)
    with atomic_write(path) as f:
        save_image(torch.cat([x, recon.float()]).cpu(), f, format="png", nrow=len(x), padding=2)


def plot_curves(csv_path: Path, png_path: Path, score: str = "psnr") -> None:
    """loss_curve.png: the loss, and the validation score that picks best.pt (PSNR, or a student's agreement)."""
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
    axes[1].set(xlabel="optimizer step", **({"ylabel": "dB", "title": "validation PSNR"} if score == "psnr" else
                {"ylabel": "cosine", "title": "validation agreement with the teacher"}))
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(png_path) as f:
        save_figure(fig)(f)


class Run(NamedTuple):
    """What a run is, once its command line and (when resuming) its checkpoint are read."""
    args: argparse.Namespace  # the flags; when resuming the checkpoint's run config, but for RESUME_OVERRIDES
    cfg: VAEConfig  # the model to build
    pretrained: bool  # whether the run's backbone started from pretrained weights (kept in what it saves)
    ckpt: dict | None  # the checkpoint resumed from, None for a new run
    ckpt_path: Path | None  # its file
    teacher: EarVAE | None  # a student run's frozen teacher (on the CPU), None for a teacher's run
    teacher_sha256: str | None  # its weights' hash (checkpoints.weights_sha256), kept in the student's checkpoints


def resolve_run(parser: argparse.ArgumentParser, argv: list[str] | None, world: int, log) -> Run:
    """The run's settings from argv and, with --resume, the checkpoint: its model config and run config win, a few
    flags may change (RESUME_OVERRIDES), the global batch must stay. A new run never overwrites an earlier one."""
    args = parser.parse_args(argv)
    ckpt_dir, log_dir = Path(args.ckpt_dir), Path(args.log_dir)
    if args.resume is None:
        typed = typed_flags(parser, argv, args)
        if args.teacher is not None and typed & TEACHER_FLAGS:
            raise ConfigError(f"--teacher trains a student: {flag_names(typed & TEACHER_FLAGS)} set how a teacher is "
                              f"built or trained and do not apply (the student's flags are --student-*)")
        if args.teacher is None and typed & STUDENT_FLAGS:
            raise ConfigError(f"{flag_names(typed & STUDENT_FLAGS)} set the student of a distillation run: add "
                              f"--teacher CKPT (a trained teacher)")
        if args.teacher is not None and args.no_pretrained and "student_weights" in typed:
            raise ConfigError(f"--student-weights {args.student_weights} with --no-pretrained: the trunk starts "
                              f"random, so the weights would not be read; drop one of the two")
        if args.teacher is not None and args.batch_size < 2:
            raise ConfigError("--batch-size 1: a student's BatchNorm layers need 2 images or more per micro-batch in "
                              "training")
        check_output_dirs(args)
        for f in (ckpt_dir / "last.pt", ckpt_dir / "best.pt", log_dir / "metrics.csv"):
            if f.exists():
                raise TrainingError(f"{f} exists from an earlier run: pass --resume to continue it, "
                                    f"or choose another --ckpt-dir / --log-dir")
        teacher, teacher_sha256 = load_teacher(args.teacher) if args.teacher is not None else (None, None)
        cfg = model_config(args, teacher)
        return Run(args, cfg, cfg.pretrained, None, None, teacher, teacher_sha256)

    resume_path = ckpt_dir / "last.pt" if args.resume == "auto" else Path(args.resume)
    ckpt = read_checkpoint(resume_path)  # missing / truncated / unsafe -> CheckpointError; never a silent fresh start
    if "run_config" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f"{resume_path}: holds model weights only (no optimizer state); cannot resume from it")
    saved = ckpt["run_config"]
    changed = typed_flags(parser, argv, args)
    for k in sorted(changed - RESUME_OVERRIDES):
        flag = "--" + k.replace("_", "-")
        if k not in saved:
            log(f"note: {flag} ignored: the checkpoint predates it; resuming with its default")
        elif getattr(args, k) != saved[k]:
            log(f"note: {flag} {getattr(args, k)} ignored: resuming with the checkpoint's {saved[k]!r}")
    defaults = vars(parser.parse_args([]))  # for flags newer than the checkpoint
    args = argparse.Namespace(**{**defaults, **saved, "resume": args.resume,
                                 **{k: getattr(args, k) for k in changed & RESUME_OVERRIDES}})
    # another number of processes is fine if the global batch stays: the data order, the per-sample noise and
    # augmentation, the step count and the schedule are all functions of the global batch and sample indices
    was = (saved["batch_size"], ckpt["world_size"], saved["accum_steps"])
    now = (args.batch_size, world, args.accum_steps)
    if math.prod(now) != math.prod(was):
        raise CheckpointError(
            f"{resume_path}: the run's global batch is {math.prod(was)} (batch size {was[0]} x {was[1]} "
            f"process(es) x {was[2]} accum steps), this command's is {math.prod(now)} ({now[0]} x {now[1]} x "
            f"{now[2]}); choose --batch-size and --accum-steps whose product with {world} process(es) is "
            f"{math.prod(was)}")
    check_output_dirs(args)
    target = Path(args.ckpt_dir) / "last.pt"  # where this run will save: the checkpoint's own run folder by default
    if target.exists() and not target.samefile(resume_path):  # a copy, or an older last.pt of that run
        raise TrainingError(f"{resume_path}: resuming would write over {target}, another checkpoint (the run's "
                            f"own or an earlier copy's): pass --ckpt-dir and --log-dir to new folders to continue "
                            f"{resume_path} there")
    if "student_config" not in ckpt:
        if args.teacher is not None:
            raise ConfigError(f"--teacher: {resume_path} is a teacher's run; a student's run starts without --resume")
        cfg = replace(config_from_checkpoint(ckpt), grad_checkpointing=args.grad_checkpointing)
        return Run(args, cfg, ckpt["model_config"]["pretrained"], ckpt, resume_path, None, None)
    if problem := config_problem(ckpt["student_config"], StudentConfig):
        raise CheckpointError(f"{resume_path}: student_config {problem}")
    try:
        teacher, teacher_sha256 = load_teacher(args.teacher)
    except CheckpointError as e:
        raise CheckpointError(f"the teacher of {resume_path}: {e} (if it moved, give its new path: --resume "
                              f"--teacher PATH)") from e
    if teacher_sha256 != ckpt["teacher_sha256"]:
        raise CheckpointError(f"{args.teacher}: the teacher's weights are not those {resume_path} was distilled from "
                              f"(sha256 {teacher_sha256[:12]}..., was {ckpt['teacher_sha256'][:12]}...): resume "
                              f"with that teacher, or start a new run")
    cfg = replace(StudentConfig(**ckpt["student_config"]), pretrained=False)  # the weights come from the checkpoint
    return Run(args, cfg, ckpt["student_config"]["pretrained"], ckpt, resume_path, teacher, teacher_sha256)


def typed_flags(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> set[str]:
    """The names (dests) of the flags typed on the command line, even those typed at their default value."""
    untyped = object()  # argparse fills only the names a namespace lacks: what is still `untyped` was not given
    given = parser.parse_args(argv, argparse.Namespace(**{k: untyped for k in vars(args)}))
    return {k for k, v in vars(given).items() if v is not untyped}


def flag_names(dests: set[str]) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in sorted(dests))


def load_teacher(path: str) -> tuple[EarVAE, str]:
    """A student run's teacher: load_model(path) on the CPU (its EMA weights where its run kept them), frozen: eval
    mode, requires_grad False -> (teacher, weights_sha256). A missing, unreadable or unsafe file, or a student's, is a
    CheckpointError naming it."""
    teacher, _ = load_model(path)
    teacher.requires_grad_(False)
    return teacher, weights_sha256(teacher)


def check_output_dirs(args: argparse.Namespace) -> None:
    """TrainingError naming the flag if --ckpt-dir or --log-dir cannot be a folder to write in (files.check_output_dir),
    before the data, the model and the steps."""
    for flag, folder in (("--ckpt-dir", args.ckpt_dir), ("--log-dir", args.log_dir)):
        try:
            check_output_dir(folder)
        except ValueError as e:
            raise TrainingError(f"{flag} {e}") from e


def build_optimizer(model, args: argparse.Namespace) -> torch.optim.AdamW:
    """Fused AdamW over the model's parameter groups: the encoder at lr * encoder_lr_scale, no weight decay on norms
    and biases (the tensors with fewer than 2 dims)."""
    groups = []
    for name, params in model.parameter_groups().items():
        lr = args.lr * (args.encoder_lr_scale if name == "encoder" else 1.0)
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), fused=True)  # one kernel (CPU too: 6x faster there)


class MetricsLog:
    """LOG_DIR/metrics.csv (appended to when resuming) and, where tensorboard is installed, TensorBoard events."""

    def __init__(self, log_dir: Path, log) -> None:
        new_csv = not (log_dir / "metrics.csv").exists()
        self.csv_file = open(log_dir / "metrics.csv", "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=LOG_FIELDS)
        if new_csv:
            self.csv.writeheader()
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)
        except ImportError:
            log("note: tensorboard is not installed; logging to metrics.csv only")

    def write_row(self, row: dict) -> None:
        """One row of LOG_FIELDS (missing ones empty); every number but step / epoch / time also to TensorBoard
        as 'split/name'."""
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


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    device_flag = parser.parse_args(argv).device

    # -- processes and devices. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    try:
        kind = resolve_device(device_flag).type
    except ValueError as e:  # --device cuda without a GPU
        raise ConfigError(str(e)) from e
    if ddp:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if kind == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(kind)

    run = resolve_run(parser, argv, world, print if rank == 0 else (lambda *a, **k: None))
    try:
        run_training(run, device, rank, world)
    except torch.OutOfMemoryError as e:
        args = run.args
        raise TrainingError(
            f"out of GPU memory at --batch-size {args.batch_size}. Use a smaller batch with --accum-steps to keep "
            f"the global batch (e.g. --batch-size {max(1, args.batch_size // 2)} --accum-steps "
            f"{2 * args.accum_steps}), --grad-checkpointing"
            + (" (both work with --resume)." if args.resume else ", or a smaller --input-size (512 or 256).")) from e


def run_training(run: Run, device: torch.device, rank: int, world: int) -> None:
    """The run on this process (rank of world): set up, then the loop top to bottom."""
    args, cfg, pretrained, ckpt, resume_path, teacher, teacher_sha256 = run
    distill = teacher is not None  # a student run: the teacher's targets instead of the VAE's terms
    score = "agreement" if distill else "psnr"  # the validation figure that picks best.pt (higher is better)
    ddp, master = world > 1, rank == 0
    log = print if master else (lambda *a, **k: None)
    ckpt_dir, log_dir = Path(args.ckpt_dir), Path(args.log_dir)
    if not distill and cfg.attn_implementation == "flex" and device.type != "cuda":
        raise ConfigError("--attn flex trains on CUDA only (PyTorch's FlexAttention has no CPU backward); "
                          "use --attn sdpa on this device")

    # -- precision: bf16 autocast where the GPU has it natively, else fp16 + GradScaler; fp32 on CPU
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's per-op switches (allow_tf32 is the legacy API;
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # mixing the two raises); SSIM turns convs back to ieee
    dtype = PRECISIONS[precision]
    autocast = inference_autocast(device, dtype)  # fp32: no autocast at all

    # -- data
    data_dir = Path(args.data_dir)
    train_ds = EarDataset(args.train_npy or data_dir / "train_teacher.npy", max_invalid=args.max_invalid)
    val_ds = EarDataset(args.val_npy or data_dir / "val_teacher.npy", max_invalid=args.max_invalid)
    global_batch = args.batch_size * world * args.accum_steps  # images per optimizer step over all processes
    mode, train_labels, why = ("distill", None, "") if distill else contrastive_mode(args, train_ds, world)
    if mode == "supcon":  # P x K batches of labelled images; label_of_key: identity by original index in the file
        try:
            sampler = IdentitySampler(train_labels, args.images_per_identity, args.batch_size, args.seed, rank, world,
                                      args.accum_steps)
        except ValueError as e:
            raise DataError(f"{train_ds.path}: --contrastive supcon: {e}") from e
        label_of_key = torch.full((train_ds.n_total,), UNLABELLED, dtype=torch.int64)
        label_of_key[torch.from_numpy(train_ds.keep)] = torch.from_numpy(train_labels)
        steps_per_epoch = sampler.n_used // global_batch
    else:
        steps_per_epoch = len(train_ds) // global_batch
        if steps_per_epoch == 0:
            raise DataError(f"{train_ds.path}: {len(train_ds)} usable samples, fewer than one optimizer step of "
                            f"{global_batch} (batch size x processes x accum steps)")
        sampler = ResumableSampler(len(train_ds), args.batch_size, args.seed, shuffle=True, rank=rank,
                                   world_size=world)
    epoch_len = steps_per_epoch * global_batch  # samples of an epoch that are used (the remainder is dropped)
    total_steps = args.epochs * steps_per_epoch
    val_sampler = ResumableSampler(len(val_ds), 1, args.seed, shuffle=False)
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, args.batch_size, sampler, args.workers, pin)
    val_loader = make_loader(val_ds, args.batch_size, val_sampler, args.workers, pin)
    aug = AugConfig(hflip=args.hflip) if not args.no_augment else None
    if aug is not None and mode == "nt-xent":  # its positives are augmentations: they must keep the identity
        aug = aug.keeping_identity()
    views = 2 if mode == "nt-xent" else 1  # supcon: one augmented view per image, its positives are other images

    # -- model, loss, optimizer (initialisation from the seed; under DDP rank 0's weights are broadcast)
    torch.manual_seed(args.seed)
    model = (Student(cfg) if distill else build_model(cfg)).to(device)
    initial = weight_scales(model)  # each tensor's scale at initialisation (on resume the same seeded one)
    cfg = replace(model.cfg, pretrained=pretrained)
    if distill:
        teacher = teacher.to(device)
        criterion = DistillLoss(**asdict(DistillConfig())).to(device)
    else:
        criterion = VAELoss(**asdict(loss_config(args)), image_size=cfg.image_size).to(device)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_steps, total_steps, args.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = None
    if args.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
    step, epoch, epoch_pos, best_score, skipped = 0, 0, 0, -math.inf, 0
    last_good = None  # (file, step) of the last good state saved or resumed from
    if ckpt is not None:
        load_state(model, ckpt["model"], resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            load_state(ema.module, ckpt["ema"], resume_path)
            ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        step, epoch, epoch_pos = ckpt["step"], ckpt["epoch"], ckpt["epoch_pos"]
        best_score, skipped = ckpt[f"best_{score}"], ckpt["skipped"]
        ckpt.clear()  # frees the checkpoint's tensors (main's Run holds the same dict)
    raw_model = model
    if args.compile:
        model.compile()  # in place: the same module and state-dict keys, its forward compiled on first call
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = ema.module if ema is not None else raw_model

    # -- what is saved must be good: finite validation values, finite and sane weights (weights_problem)
    def state_problem(val: dict[str, float] | None = None) -> str | None:
        """Why the state now is not good, or None. val: validate()'s values (a PSNR of +inf is a perfect image)."""
        bad = {k: v for k, v in (val or {}).items() if not math.isfinite(v) and not (k == "psnr" and v == math.inf)}
        if bad:
            return "non-finite validation values (" + " ".join(f"{k} {v}" for k, v in bad.items()) + ")"
        problem = weights_problem(weight_scales(raw_model), initial)
        if problem is None and ema is not None:
            problem = weights_problem(weight_scales(ema.module), initial, "EMA weights")
        return problem

    def new_run() -> str:
        """What to do instead: restart_command(), and why a resume would not help."""
        overrides = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_OVERRIDES - {"resume"}))
        return (f"Start a new run with a lower learning rate in new folders: `{restart_command(args, world)}` "
                f"(--resume keeps the run's --lr; it may change only {overrides})")

    def not_saved(problem: str) -> TrainingError:
        """The error that stops a run whose state is not good, naming the last good state and a new run's command."""
        good = f"{last_good[0]} (step {last_good[1]}) is the last good state" if last_good else "no checkpoint exists"
        return TrainingError(f"{problem} at step {step}; stopped without saving: {good}. {new_run()}")

    if ckpt is not None:
        if (problem := state_problem()) is not None:
            raise TrainingError(f"{resume_path} (step {step}): {problem}; it cannot be resumed. {new_run()}")
        last_good = (resume_path, step)

    run_config = vars(args)
    log("Config:\n" + json.dumps({"run": run_config, "model": asdict(cfg), "precision": precision,
                                  "device": str(device), "world_size": world}, indent=2))
    if distill:
        log(parameter_report({"Student": raw_model, "EarVAE teacher (frozen)": teacher}))
    else:
        parts = {"EarVAE": raw_model, **({"PerceptualLoss": criterion} if args.perceptual_weight else {})}
        log(parameter_report(parts))
    log(f"Train samples: {train_ds.summary()}")
    log(f"Val samples:   {val_ds.summary()}")
    if distill:
        terms = ", ".join(f"{k} {w:g}" for k, w in criterion.weights.items() if w > 0)
        log(f"Distillation: {cfg.arch} student from the teacher {args.teacher} (weights sha256 "
            f"{teacher_sha256[:12]}...), targets computed on the fly from each augmented batch; terms {terms}")
    else:
        log(f"Contrastive term: {contrastive_summary(mode, why, args, cfg, sampler)}")
    log(f"Steps per epoch: {steps_per_epoch:,} (global batch {global_batch}), "
        f"total {total_steps:,}" + (f", stopping at {args.max_steps:,}" if args.max_steps else ""))

    if master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(log_dir / "config.json") as f:
            save_json({"run": run_config, "model": asdict(cfg)})(f)
        metrics = MetricsLog(log_dir, log)
        grid_x = to_float(torch.stack([val_ds[i][0] for i in range(min(8, len(val_ds)))])).to(device)

    def forward_loss(x: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch x (views * B, 3, 128, 128) of samples `keys` (B,) -> (loss, logs): the student against the
        teacher's targets for the same images, or the VAE's terms with the samples' keyed noise."""
        if distill:
            return criterion(model(x), teacher_targets(teacher, x))
        eps = torch.cat([keyed_normal(keys, args.seed, epoch, v, cfg.latent_dim) for v in range(views)])
        out = model(x, eps=eps.to(device, non_blocking=True))
        return criterion(out["recon"], x, out["mu"], out["logvar"], views=views, embedding=out["embedding"],
                         labels=label_of_key[keys].to(device) if mode == "supcon" else None)

    def checkpoint_state(full: bool) -> dict:
        state = {"model": raw_model.state_dict(), "run_config": run_config, "step": step, "epoch": epoch,
                 "epoch_pos": epoch_pos, f"best_{score}": best_score}
        if distill:
            state.update(student_config=asdict(cfg), teacher_sha256=teacher_sha256)
        else:
            state["model_config"] = asdict(cfg)
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        if full:  # best.pt keeps the weights only; last.pt everything needed to resume
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), skipped=skipped, world_size=world)
            if ema is not None:
                state["ema_n_averaged"] = int(ema.n_averaged)
        return state

    def save_last(bar: tqdm | None = None) -> None:
        """last.pt, if the state is good; else not_saved() (the epoch's progress `bar` closed first, so that the
        error is the last line printed)."""
        nonlocal last_good
        if (problem := state_problem()) is not None:
            if bar is not None:
                bar.close()
            raise not_saved(problem)
        save_checkpoint(checkpoint_state(full=True), ckpt_dir / "last.pt")
        last_good = (ckpt_dir / "last.pt", step)

    def validate_and_save(trained_epoch: int) -> None:
        nonlocal best_score
        val = validate(eval_model, val_loader, criterion, device, autocast, teacher=teacher)
        metrics.write_row({"step": step, "epoch": trained_epoch, "split": "val", "time": int(time.time()), **val})
        log(f"val step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in val.items()))
        if (problem := state_problem(val)) is not None:
            raise not_saved(problem)
        if val[score] > best_score:
            best_score = val[score]
            save_checkpoint(checkpoint_state(full=False), ckpt_dir / "best.pt")
        save_last()
        if not distill:  # a student has no reconstructions
            save_grid(eval_model, grid_x, log_dir / f"recon_step{step:07d}.png", autocast)
        plot_curves(log_dir / "metrics.csv", log_dir / "loss_curve.png", score)

    if master:  # sanity check, as the original did: two validation batches through model and loss
        val = validate(eval_model, val_loader, criterion, device, autocast, max_batches=2, teacher=teacher)
        log("Sanity check (2 val batches): " + " ".join(f"{k} {v:.4g}" for k, v in val.items()))
        if (problem := state_problem(val)) is not None:
            if ckpt is not None:
                raise TrainingError(f"sanity check of {resume_path} (step {step}): {problem}; it cannot be resumed. "
                                    f"{new_run()}")
            raise TrainingError(f"sanity check before step 0: {problem} from the initial model; nothing was "
                                f"trained or saved. Check the data (python data.py check FILE) and, under fp16 or "
                                f"bf16, try --precision fp32")

    # -- the loop. epoch_pos counts the samples of this epoch consumed by all processes together
    model.train()
    nan_streak = 0
    done = step >= total_steps or (args.max_steps is not None and step >= args.max_steps)
    while not done and epoch < args.epochs:
        sampler.set_epoch(epoch, start=epoch_pos)
        batches = iter(train_loader)
        bar = progress(total=steps_per_epoch, initial=epoch_pos // global_batch, desc=f"epoch {epoch}",
                       disable=not master)
        t0, imgs = time.time(), 0
        while epoch_pos < epoch_len:
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.accum_steps):
                x, keys = next(batches)  # uint8 (B, 3, 128, 128), int64 (B,) sample indices
                x = x.to(device, non_blocking=True)
                if aug is not None:
                    x = torch.cat([augment(x, keys, args.seed, epoch, aug, view=v) for v in range(views)])
                else:
                    x = to_float(x).repeat(views, 1, 1, 1)  # (views * B, 3, 128, 128)
                sync = micro == args.accum_steps - 1
                with model.no_sync() if ddp and not sync else nullcontext():
                    with autocast:
                        loss, logs = forward_loss(x, keys)
                    scaler.scale(loss / args.accum_steps).backward()
                loss_sum += loss.detach()
                imgs += len(keys) * world
            # one host sync per optimizer step: a non-finite loss on any process skips the update everywhere, and
            # a stop request on any process stops all of them at this step
            flags = torch.stack([loss_sum, torch.tensor(float(bool(STOP_SIGNALS)), device=device)])
            if ddp:
                dist.all_reduce(flags)
            loss_total, stop_requests = flags.tolist()
            if math.isfinite(loss_total):
                nan_streak = 0
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or math.inf)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update_parameters(raw_model)
            else:
                nan_streak += 1
                skipped += 1
                grad_norm = torch.tensor(math.nan)
                log(f"\nwarning: non-finite loss at step {step}; update skipped ({nan_streak} in a row)")
                if nan_streak >= args.max_nan:
                    bar.close()
                    raise not_saved(f"{nan_streak} non-finite losses in a row")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            epoch_pos += global_batch
            bar.update(1)

            if step % args.log_every == 0 and master:
                dt = time.time() - t0
                row = {k: v.item() for k, v in logs.items()}  # terms: rank 0's last micro-batch
                row["loss"] = loss_total / (args.accum_steps * world)  # mean over micro-batches and processes
                row.update(step=step, epoch=epoch, split="train", lr=optimizer.param_groups[-1]["lr"],
                           grad_norm=grad_norm.item(), skipped=skipped, img_per_s=imgs / dt, time=int(time.time()))
                metrics.write_row(row)
                shown = {"ssim": 1 - row["ssim"]} if "ssim" in row else {}
                if "embed_cosine" in row:
                    shown["cos"] = 1 - row["embed_cosine"]  # the student's agreement with the teacher
                bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{v:.3f}" for k, v in shown.items()},
                                img_s=f"{imgs / dt:.1f}")
                t0, imgs = time.time(), 0
            stop = stop_requests > 0 if ddp else bool(STOP_SIGNALS)  # SIGINT / SIGTERM: save last.pt, exit
            done = args.max_steps is not None and step >= args.max_steps
            if master and (stop or (step % args.save_every == 0 and not done and nan_streak == 0)):
                save_last(bar)
            if stop:
                if ddp:  # no process exits before rank 0's save is complete: torchrun, seeing one process end,
                    dist.barrier()  # signals the others and kills what still runs 30 s later (rank 0 mid-write)
                bar.close()
                log(f"stopped by signal at step {step}; saved {ckpt_dir / 'last.pt'} (continue with --resume)")
                sys.exit(128 + STOP_SIGNALS[0] if STOP_SIGNALS else 1)
            if done:
                break
        bar.close()
        trained_epoch = epoch
        if epoch_pos >= epoch_len:
            epoch, epoch_pos = epoch + 1, 0
        if master:  # after every epoch, and at the last step of a run cut short by --max-steps
            validate_and_save(trained_epoch)
        if ddp:
            dist.barrier()
    if master:
        best = f"PSNR {best_score:.2f} dB" if score == "psnr" else f"agreement with the teacher {best_score:.4f}"
        log(f"done: {step} steps, best val {best}; checkpoints in {ckpt_dir}, logs in {log_dir}")
        metrics.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    safe_console()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP_SIGNALS.append(signum))
    try:
        main()
    except (DataError, CheckpointError, ConfigError, WeightsUnavailableError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
