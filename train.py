"""Train the ear teacher (SAM-encoder VAE) on NPY ear crops: its command line and its objective; the optimisation
loop is loop.py's, shared with distill.py (which trains a student from a teacher this writes).

    python train.py --epochs 60 --batch-size 4                       # the original run (GPU, pretrained SAM)
    python train.py --tiny --no-pretrained --perceptual-weight 0 \\
        --data-dir demo/data --epochs 3                                # CPU-sized run on synthetic ears
    torchrun --nproc_per_node=4 train.py ...                           # DistributedDataParallel
    python train.py --resume                                           # continue checkpoints/last.pt

The objective: the VAE's terms (losses.VAELoss: centre-weighted L1, KL, perceptual, SSIM, edge) and a contrastive
term on the identity embedding, SupCon on P x K batches of identity-labelled images or NT-Xent between two views of
each image. Its reparameterisation noise is keyed by (seed, epoch, sample, view), as the augmentation is.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cli import HelpFormatter, int_range, non_negative, non_negative_int, positive, positive_int
from data import (UNLABELLED, AugConfig, EarDataset, IdentitySampler, augment, augment_points, missing_labels,
                  read_identities, sample_seed, to_float)
from errors import CheckpointError, ConfigError, DataError, TrainingError, WeightsUnavailableError  # noqa: F401
from files import atomic_write
from hub import checkpoint_kind
from losses import LossConfig, VAELoss, psnr, ssim
from model import (EarVAE, VAEConfig, build_model, config_from_checkpoint, dinov2_config, parameter_report,
                   sam_config, tiny_config)
import loop

DEFAULT_WEIGHTS = {"sam": sam_config().weights, "dinov2": dinov2_config().weights}
CONTRASTIVE_MODES = ("auto", "supcon", "nt-xent")
# the dense term's second view of each image: warped further than the training view, so that a point's feature must
# say what is there (a shift of less than a cell would be matched by position alone); its colour jittered as usual
DENSE_AUG = AugConfig(scale=0.25, translate=0.15, rotate=30.0)
DENSE_GRID = 16  # the dense term's points: the centres of a 16 x 16 grid of cells over the crop


def get_parser() -> argparse.ArgumentParser:
    """The teacher's flags (the model and loss defaults read from VAEConfig, its factories and LossConfig) and the
    run flags every training command shares (loop.add_run_flags)."""
    sam, dinov2, tiny, loss = sam_config(), dinov2_config(), tiny_config(), LossConfig()
    p = argparse.ArgumentParser(description="Train the SAM-encoder VAE ear teacher.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--encoder", choices=["sam", "dinov2"], default="sam", help="backbone")
    g.add_argument("--weights", default=None, help=f"hub id or local dir of the backbone (default: {sam.weights} "
                   f"or {dinov2.weights})")
    g.add_argument("--no-pretrained", action="store_true", help="random backbone initialisation (explicit)")
    g.add_argument("--tiny", action="store_true", help="tiny backbone and decoder: same code path, CPU speed")
    g.add_argument("--input-size", type=int_range(1, 4096), default=None, help="side the crop is resized to for the "
                   f"encoder (SAM: {sam.input_size} original, 512 or 256 for 4x / 16x fewer tokens; DINOv2: "
                   f"{dinov2.input_size})")
    g.add_argument("--freeze-blocks", type=non_negative_int, default=None, help=f"frozen first blocks of the "
                   f"pretrained backbone (default: {sam.freeze_blocks}, tiny {tiny.freeze_blocks}); with --no-pretrained "
                   f"0 unless given (on the demo, freezing 2 random blocks cost the probe 0.57x -> 0.69x: docs/probe.md)")
    g.add_argument("--latent-dim", type=positive_int, default=VAEConfig.latent_dim, help="latent size")
    g.add_argument("--identity-dims", type=non_negative_int, default=VAEConfig.identity_dims, help="the identity "
                   "embedding that the contrastive term trains is the first N entries of mu (L2-normalised); the rest "
                   "of mu is left to reconstruction. 0: all of mu; None: an eighth of --latent-dim (128 of 1024; all "
                   "of mu below 16)")
    g.add_argument("--embed-dim", type=non_negative_int, default=VAEConfig.embed_dim, help="0: the embedding is those "
                   "entries of mu; E > 0: an MLP head over them -> E (over all of mu it measured worse on the demo: "
                   "README)")
    g.add_argument("--dense-dim", type=non_negative_int, default=VAEConfig.dense_dim, help="0: the dense term acts on "
                   "the encoder's last map; D > 0: on a 1x1-conv MLP of it -> D channels (DenseCL's projection head)")
    g.add_argument("--attn", choices=["sdpa", "eager", "flex"], default="sdpa", help="attention implementation "
                   "(flex: SAM's relative-position bias inside a FlexAttention kernel; CUDA only, see BENCHMARKS.md)")
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
    g.add_argument("--dense-weight", type=non_negative, default=loss.dense, help="dense InfoNCE (PixContrast) "
                   "between the encoder's last map of each training view and of a second view warped further "
                   f"(rotation {DENSE_AUG.rotate:g} deg, shift {DENSE_AUG.translate:g}, zoom {DENSE_AUG.scale:g}), "
                   f"at the {DENSE_GRID}x{DENSE_GRID} cell centres of the crop: a point's feature must find the same "
                   "point among the image's others. Costs one more encoder pass per image; 0: off")
    g.add_argument("--center-weight", type=positive, default=loss.center_weight, help="pixel-loss weight at the crop "
                   "centre (border 1)")
    g.add_argument("--temperature", type=positive, default=loss.temperature, help="SupCon / NT-Xent temperature")
    g.add_argument("--vgg-weights", default=loss.vgg_weights, help="'imagenet' (torchvision) or a local VGG16 state "
                   "dict")
    resumable = loop.add_run_flags(p)
    resumable.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                           help="recompute trainable blocks in backward")
    return p


def model_config(args: argparse.Namespace) -> VAEConfig:
    """The VAEConfig a new run builds from the flags (the factories' defaults where a flag is not given); its ranges
    are checked where the model is built (VAEConfig.check). A dense head without the dense term is a ConfigError."""
    if args.dense_dim > 0 and args.dense_weight == 0:  # its parameters would get no gradient
        raise ConfigError(f"--dense-dim {args.dense_dim}: a dense projection head needs the dense term that trains "
                          f"it (--dense-weight > 0)")
    if args.tiny and not args.no_pretrained and args.weights is None:
        raise WeightsUnavailableError("--tiny has no published weights: add --no-pretrained (random tiny backbone) "
                                      "or --weights DIR of a tiny backbone")
    make = tiny_config if args.tiny else (sam_config if args.encoder == "sam" else dinov2_config)
    kw = dict(weights=args.weights or DEFAULT_WEIGHTS[args.encoder], pretrained=not args.no_pretrained,
              latent_dim=args.latent_dim, identity_dims=args.identity_dims, embed_dim=args.embed_dim,
              dense_dim=args.dense_dim, attn_implementation=args.attn,
              grad_checkpointing=args.grad_checkpointing)
    if args.input_size is not None:
        kw["input_size"] = args.input_size
    if args.freeze_blocks is not None:
        kw["freeze_blocks"] = args.freeze_blocks
    elif args.no_pretrained:  # frozen random blocks are fixed random features: a random backbone trains them all
        kw["freeze_blocks"] = 0
    return make(args.encoder, **kw) if args.tiny else make(**kw)


def loss_config(args: argparse.Namespace) -> LossConfig:
    """The loss flags of a run (the pixel weight has no flag: it is the unit the others are relative to)."""
    return LossConfig(kl=args.kl_weight, perceptual=args.perceptual_weight, ssim=args.ssim_weight,
                      edge=args.edge_weight, contrastive=args.contrastive_weight, dense=args.dense_weight,
                      center_weight=args.center_weight,
                      temperature=args.temperature, vgg_weights=args.vgg_weights)


def images_per_identity(args: argparse.Namespace) -> int | None:
    """K of supcon's P x K micro-batches: --images-per-identity, or the largest of 4, 3, 2 that divides --batch-size
    into P >= 2 identities; None where no K does (a batch of 2, 3, 5 or 7). SupCon's negatives are the batch's other
    identities, so a batch of one identity has none and its gradient is zero. An explicit K that divides no batch of
    2 identities is a ConfigError."""
    b, k = args.batch_size, args.images_per_identity
    if k is None:
        return next((k for k in (4, 3, 2) if b % k == 0 and b // k >= 2), None)
    if (b % k or b // k < 2) and args.resume:  # K is the run's, kept in its checkpoint
        raise ConfigError(f"--batch-size {b}: this run's SupCon batches hold K={k} images of each identity (its "
                          f"--images-per-identity, kept from the checkpoint), so the batch must be a multiple of {k} "
                          f"of at least {2 * k}; keep the global batch with --accum-steps")
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


@torch.no_grad()
def validate(model: EarVAE, loader, criterion: VAELoss, device: torch.device, autocast,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean of every loss term over the (clean, un-augmented) validation images, and PSNR and SSIM with mu as the
    code (loop.mean_logs)."""
    def logs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast:
            out = model(x)
            _, terms = criterion(out["recon"], x, out["mu"], out["logvar"])
        recon = out["recon"].float()
        return {**terms, "psnr": psnr(recon, x).mean(), "ssim_metric": ssim(recon, x).mean()}
    return loop.mean_logs(model, loader, device, logs, max_batches)


class TeacherObjective:
    """The teacher's task (loop.Objective): reconstruct each augmented ear through the VAE (losses.VAELoss) and pull
    its identity embedding together with its positives: SupCon on P x K batches of labelled identities, NT-Xent
    between two views of each image. best.pt is the best validation PSNR."""
    score, score_text = "psnr", "PSNR {:.2f} dB"
    score_axis = {"ylabel": "dB", "title": "validation PSNR"}
    log_fields = ("pixel", "kl", "perceptual", "ssim", "edge", "contrastive", "dense", "psnr", "ssim_metric")

    def __init__(self, run: loop.Run, setup: loop.Setup) -> None:
        args, device = run.args, setup.device
        if run.ckpt is None:
            cfg = model_config(args)
            pretrained = cfg.pretrained
        elif (kind := checkpoint_kind(run.ckpt))[1] != "train.py":  # a student's or a landmark model's run
            whose, again = kind
            raise CheckpointError(f"{run.ckpt_path}: {whose} run; continue it with {again} --resume {run.ckpt_path}")
        else:
            cfg = replace(config_from_checkpoint(run.ckpt), grad_checkpointing=args.grad_checkpointing)
            pretrained = run.ckpt["model_config"]["pretrained"]  # whether the backbone started pretrained
        if cfg.attn_implementation == "flex" and device.type != "cuda":
            raise ConfigError("--attn flex trains on CUDA only (PyTorch's FlexAttention has no CPU backward); "
                              "use --attn sdpa on this device")
        self.args, self.setup = args, setup

        # -- data: P x K batches of labelled images for SupCon (label_of_key: identity by index in the file)
        train_ds, val_ds = loop.read_data(args)
        self.mode, labels, self.why = contrastive_mode(args, train_ds, setup.world)
        sampler = None
        if self.mode == "supcon":
            try:
                sampler = IdentitySampler(labels, args.images_per_identity, args.batch_size, args.seed, setup.rank,
                                          setup.world, args.accum_steps)
            except ValueError as e:
                raise DataError(f"{train_ds.path}: --contrastive supcon: {e}") from e
            self.label_of_key = torch.full((train_ds.n_total,), UNLABELLED, dtype=torch.int64)
            self.label_of_key[torch.from_numpy(train_ds.keep)] = torch.from_numpy(labels)
        self.data = loop.make_data(args, setup, train_ds, val_ds, sampler)
        self.aug = AugConfig(hflip=args.hflip) if not args.no_augment else None
        if self.aug is not None and self.mode == "nt-xent":  # its positives are augmentations: they must keep the
            self.aug = self.aug.keeping_identity()  # identity
        self.views = 2 if self.mode == "nt-xent" else 1  # supcon: one view per image, its positives are other images

        # -- model and loss, initialised from the seed (under DDP rank 0's weights are broadcast)
        torch.manual_seed(args.seed)
        self.model = build_model(cfg).to(device)
        self.config = asdict(replace(self.model.cfg, pretrained=pretrained))
        self.criterion = VAELoss(**asdict(loss_config(args)), image_size=cfg.image_size).to(device)
        cell = cfg.image_size / DENSE_GRID  # the dense term's points (1, N, 2), (x, y) in pixels
        centres = (torch.arange(DENSE_GRID) + 0.5) * cell
        self.points = torch.cartesian_prod(centres, centres).flip(-1)[None].to(device)  # row-major (y, x) -> (x, y)
        self.grid_x = to_float(torch.stack([val_ds[i][0] for i in range(min(8, len(val_ds)))])).to(device)

    def loss(self, model: nn.Module, x: torch.Tensor, keys: torch.Tensor,
             epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x uint8 (B, 3, 128, 128) -> its views (views * B, 3, 128, 128), augmented in float32 outside the run's
        autocast, through the VAE with the samples' keyed noise -> VAELoss's (loss, logs). With the dense term, a
        further view of each image (DENSE_AUG, view index `views`) is encoded beside them, and the term compares the
        last maps of view 0 and of it at the grid points both warps carry."""
        args, views, size = self.args, self.views, x.shape[-1]
        dense_view = None
        with torch.autocast(x.device.type, enabled=False):
            if args.dense_weight > 0:
                dense_view = augment(x, keys, args.seed, epoch, DENSE_AUG, view=views)  # (B, 3, 128, 128)
            if self.aug is not None:
                x = torch.cat([augment(x, keys, args.seed, epoch, self.aug, view=v) for v in range(views)])
            else:
                x = to_float(x).repeat(views, 1, 1, 1)
        eps = torch.cat([keyed_normal(keys, args.seed, epoch, v, self.model.cfg.latent_dim) for v in range(views)])
        out = model(x, eps=eps.to(x.device, non_blocking=True), extra=dense_view)
        labels = self.label_of_key[keys].to(x.device) if self.mode == "supcon" else None
        dense = None
        if dense_view is not None:
            points = self.points.expand(len(keys), -1, -1)  # (B, N, 2) in the original crop
            p1 = points if self.aug is None else augment_points(points, size, keys, args.seed, epoch, self.aug)
            p2 = augment_points(points, size, keys, args.seed, epoch, DENSE_AUG, view=views)
            d1, d2 = out["dense"]  # the dense term's maps of x's views (views * B, C, g, g) and of the dense view
            dense = (d1[:len(keys)], d2, p1, p2)  # view 0's and the dense view's maps (B, C, g, g), their points
        return self.criterion(out["recon"], x, out["mu"], out["logvar"], views=views, embedding=out["embedding"],
                              labels=labels, dense=dense)

    def validate(self, model: nn.Module, max_batches: int | None = None) -> dict[str, float]:
        return validate(model, self.data.val_loader, self.criterion, self.setup.device, self.setup.autocast(),
                        max_batches)

    def state(self) -> dict:
        return {"model_config": self.config}

    def after_validation(self, model: nn.Module, step: int, log_dir: Path) -> None:
        save_grid(model, self.grid_x, log_dir / f"recon_step{step:07d}.png", self.setup.autocast())

    def describe(self) -> list[str]:
        parts = {"EarVAE": self.model, **({"PerceptualLoss": self.criterion} if self.args.perceptual_weight else {})}
        return [parameter_report(parts), "Contrastive term: " + contrastive_summary(
            self.mode, self.why, self.args, self.model.cfg, self.data.sampler)]

    def postfix(self, row: dict[str, float]) -> dict[str, float]:
        return {"ssim": 1 - row["ssim"]} if "ssim" in row else {}

    @staticmethod
    def memory_advice(resuming: bool) -> str:
        return (", --grad-checkpointing" + (" (both work with --resume)." if resuming else
                                            ", or a smaller --input-size (512 or 256)."))


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


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    setup = loop.setup_processes(parser, argv)
    run = loop.resolve_run(parser, "train.py", argv, setup)
    loop.fit(TeacherObjective, run, setup)


if __name__ == "__main__":
    loop.command(main)
