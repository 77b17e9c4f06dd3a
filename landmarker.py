"""Train a landmark student: a student's trunk and a heatmap head, end to end on N labelled images; the optimisation
loop is loop.py's, shared with train.py and distill.py.

    python landmarker.py --student student/best.pt --labels 50 --ckpt-dir lm50 --log-dir lm50_logs
    python landmarker.py --scratch --student-arch mobilenet_v3_small --labels 50 ...   # the same trunk, random
    python landmarker.py --resume lm50/last.pt                                           # continue

The model (Landmarker): the trunk of a distill.py student (--student PATH: its weights; --scratch: the same
architecture from a random initialisation), whose maps at strides 8 and 16 of its input (the second upsampled to the
first's grid) go through a 1x1 convolution to one heatmap logit per landmark, read out by soft-argmax
(probe.soft_argmax) to (x, y) in pixels of the 128 crop. It trains on the first --labels training images that have
every landmark in the crop (data.read_landmarks: X_landmarks.csv beside X.npy), the loss the mean point distance in
pixels. The labelled images are augmented as the teacher's are (data.AugConfig: zoom, shift, rotation, colour
jitter) and their landmarks moved with the pixels (data.augment_points); a landmark the augmentation moves out of the
crop is left out of that image's loss. --no-augment trains on the images as they are; --hflip is refused (a flip
turns a left ear into a right one). An epoch is the N images repeated --epoch-images // N times (at least once), so
that an epoch is about the same number of steps whatever N is.

--consistency-weight W adds equivariance consistency on unlabelled images (the equivariant landmark transformation
of Honari et al., "Improving Landmark Localization with Semi-Supervised Learning", CVPR 2018): each step also draws
a batch of the training images, labels unread, predicts their landmarks on the image as it is and on a warped copy
(data.augment with AugConfig's zoom, shift, rotation and colour), and adds W x the mean distance in pixels between the
second prediction and the first moved by the same warp (data.augment_points). The draw comes from (seed, epoch, the
labelled batch's keys), so a resumed run draws the same images. A step costs about 3x the forward passes.

Validation: NME (the point error over the square root of the landmarks' box area), the error in pixels and PCK@0.1
on the val images with every landmark in the crop (probe.landmark_scores, the probe's metrics). The loop keeps the
highest score as best.pt, so the score is `neg_nme` = -NME: best.pt is the lowest NME.

load_landmarker(path) loads best.pt or last.pt for use (onnx_export.py ships it as ONNX).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import read_checkpoint
from cli import HelpFormatter, int_range, non_negative, positive_int
from data import (AugConfig, ResumableSampler, augment, augment_points, check_landmark_names, landmarks_file,
                  make_loader, read_landmarks, sample_seed, to_float, whole_landmarks)
from distill import PRECISE_BN_IMAGES, precise_bn
from encoders import IMAGENET_MEAN, IMAGENET_STD
from errors import CheckpointError, ConfigError, DataError
from hub import checkpoint_kind, config_problem, load_state
from model import parameter_report
from probe import landmark_scores, soft_argmax
from student import ARCHS, StudentConfig, build_torchvision, load_student, stride_channels, trunk_input, trunk_maps
import loop


@dataclass
class LandmarkConfig:
    MINIMA: ClassVar[dict[str, int]] = {"input_size": 32, "landmarks": 1}
    arch: str = "mobilenet_v3_small"  # the trunk: one of student.ARCHS
    input_size: int = 128  # side the crop is resized to before the trunk (a student's: its own)
    landmarks: int = 8  # K heatmaps: a new run takes its training data's K (synth.LANDMARKS: 8)
    init: str = "scratch"  # the distill.py checkpoint the trunk started from, or "scratch" (random)
    names: tuple[str, ...] = ()  # output k's landmark: the training CSV's names in column order (() before kept)


class Landmarker(nn.Module):
    """A student trunk and a heatmap head (module docstring). trunk: a trained student's (Student.trunk), or None for
    a random one of cfg.arch. ConfigError for an unknown arch or a trunk without maps at strides 8 and 16."""

    def __init__(self, cfg: LandmarkConfig, trunk: nn.Sequential | None = None) -> None:
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(map(repr, ARCHS))}, got {cfg.arch!r}")
        self.cfg = cfg
        if trunk is None:
            trunk = ARCHS[cfg.arch][0](build_torchvision(StudentConfig(arch=cfg.arch, pretrained=False)))
        self.trunk = trunk
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        channels = stride_channels(self.trunk, cfg.input_size)  # {stride: the trunk's channels there}
        if 8 not in channels or 16 not in channels:
            raise ConfigError(f"the {cfg.arch} trunk at input {cfg.input_size} has no maps at strides 8 and 16 (it "
                              f"has {sorted(channels)})")
        self.head = nn.Conv2d(channels[8] + channels[16], cfg.landmarks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] (128 x 128 ear crops) -> landmarks (B, K, 2), (x, y) in pixels of the 128 crop."""
        return soft_argmax(self.heatmaps(x).float())

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> heatmap logits (B, K, S / 8, S / 8)."""
        maps = trunk_maps(self.trunk, trunk_input(x, self.cfg.input_size, self.pixel_mean, self.pixel_std))
        fine, coarse = maps[8], maps[16]  # (B, C8, g, g), (B, C16, g / 2, g / 2)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([fine, coarse], 1))  # (B, K, g, g)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder": the trunk (lr * encoder_lr_scale), "head": the heatmap head}."""
        return {"encoder": list(self.trunk.parameters()), "head": list(self.head.parameters())}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a landmark student: a student's trunk and a heatmap head on N "
                                            "labelled images.", formatter_class=HelpFormatter)
    g = p.add_argument_group("landmarker")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--student", default=None, metavar="PATH", help="a distill.py checkpoint whose trunk starts "
                       "the model (its arch and input size)")
    start.add_argument("--scratch", action="store_true", help="start from a random trunk of --student-arch")
    g.add_argument("--student-arch", choices=list(ARCHS), default=None, help="the trunk with --scratch (default: "
                   f"{LandmarkConfig.arch}; --student PATH brings its own)")
    g.add_argument("--student-input-size", type=int_range(32, 1024), default=None,
                   help=f"side the crop is resized to, with --scratch (default: {LandmarkConfig.input_size})")
    g.add_argument("--labels", type=positive_int, default=None, help="train on the first N training images with "
                   "every landmark in the crop (default: all of them)")
    g.add_argument("--epoch-images", type=positive_int, default=1000, help="an epoch is the N images repeated "
                   "EPOCH_IMAGES // N times, at least once (validation runs after each epoch)")
    g.add_argument("--consistency-weight", type=non_negative, default=0.0, help="weight of the equivariance "
                   "consistency on a batch of unlabelled training images each step (0: off; about 3x the step's "
                   "compute; docs/landmarks.md)")
    loop.add_run_flags(p)
    return p


def landmark_config(run: loop.Run) -> tuple[LandmarkConfig, nn.Sequential | None]:
    """The model to build and its trunk: a student's (--student), a random one (--scratch), or on resume the
    checkpoint's config (its weights come from the checkpoint). ConfigError for contradicting flags, CheckpointError
    for a checkpoint of another kind."""
    args, ckpt = run.args, run.ckpt
    if ckpt is not None:
        return checkpoint_config(ckpt, run.ckpt_path), None
    if args.hflip:
        raise ConfigError("--hflip: a flip turns a left ear into a right one; landmarker.py augments without it")
    if args.batch_size < 2:
        raise ConfigError("--batch-size 1: the trunk's BatchNorm layers need 2 images or more per micro-batch")
    if args.scratch:
        return LandmarkConfig(arch=args.student_arch or LandmarkConfig.arch,
                              input_size=args.student_input_size or LandmarkConfig.input_size), None
    if args.student_arch is not None or args.student_input_size is not None:
        raise ConfigError("--student-arch / --student-input-size are for --scratch: --student PATH brings its "
                          "trunk's own")
    student = load_student(args.student)
    return LandmarkConfig(arch=student.cfg.arch, input_size=student.cfg.input_size, init=str(args.student)), \
        student.trunk.train()


def checkpoint_config(ckpt: dict, path: str | Path) -> LandmarkConfig:
    """The LandmarkConfig of a checkpoint (read_checkpoint's dict). CheckpointError naming `path` when it holds none
    (another kind of run) or one that does not fit LandmarkConfig."""
    if "landmark_config" not in ckpt:
        whose, command = checkpoint_kind(ckpt)
        raise CheckpointError(f"{path}: {whose} checkpoint ({command}), not a landmarker.py run")
    if problem := config_problem(ckpt["landmark_config"], LandmarkConfig):
        raise CheckpointError(f"{path}: landmark_config {problem}")
    cfg = LandmarkConfig(**ckpt["landmark_config"])
    if cfg.names and len(cfg.names) != cfg.landmarks:
        raise CheckpointError(f"{path}: landmark_config names {len(cfg.names)} landmarks, its head {cfg.landmarks}")
    return replace(cfg, names=tuple(cfg.names))


def check_data_landmarks(names: list[str], cfg: LandmarkConfig, npy: Path, model: str) -> None:
    """DataError naming npy's landmarks CSV when its landmark names (data.read_landmarks) are not the outputs of the
    model of `cfg`: cfg.names in that order, or their count where a checkpoint predates the names. `model` names the
    model in the message."""
    if cfg.names:
        check_landmark_names(names, cfg.names, npy, model)
    elif len(names) != cfg.landmarks:
        raise DataError(f"{landmarks_file(npy)}: {len(names)} landmarks, {model} has {cfg.landmarks}")


def load_landmarker(path: str | Path, map_location: str | torch.device = "cpu",
                    ckpt: dict | None = None) -> Landmarker:
    """A trained landmark model in eval mode from a landmarker.py checkpoint (best.pt, last.pt; its EMA weights when
    the run kept them; `ckpt`: read_checkpoint(path)'s result when the caller has read it). It maps x (B, 3, 128,
    128) in [0, 1] to landmarks (B, K, 2) in pixels of the 128 crop. A missing, damaged or foreign file, a config
    that cannot be built or weights that do not fit it -> CheckpointError naming the file."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    cfg = checkpoint_config(ckpt, path)
    try:
        model = Landmarker(cfg)  # a random trunk: the weights come from the checkpoint
    except ConfigError as e:
        raise CheckpointError(f"{path}: its landmark_config cannot be built ({e})") from e
    load_state(model, ckpt.get("ema") or ckpt["model"], path)
    return model.to(map_location).eval()


def point_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """pred (B, K, 2), true (B, K, 2) in pixels, NaN for a landmark outside the crop -> the mean distance (pixels)
    over the landmarks in it (NaN when there is none: the loop skips that step). The NaN are zeroed before the
    distance, not only masked after it: a NaN inside norm's backward would reach every gradient."""
    inside = ~true.isnan().any(-1)  # (B, K)
    return (pred - true.nan_to_num()).norm(dim=-1)[inside].mean()


class LandmarkObjective:
    """The landmark task (loop.Objective): mean point distance in pixels on the labelled training images, augmented
    with their landmarks unless --no-augment; best.pt is the lowest validation NME (score neg_nme = -NME)."""
    score, score_text = "neg_nme", "-NME {:.4f}"
    score_axis = {"ylabel": "-NME", "title": "validation -NME (higher is better)"}
    log_fields = ("point", "consistency", "nme", "error_px", "pck", "neg_nme")

    def __init__(self, run: loop.Run, setup: loop.Setup) -> None:
        args, device = run.args, setup.device
        cfg, trunk = landmark_config(run)
        self.args, self.setup = args, setup
        self.aug = AugConfig() if not args.no_augment else None
        self.warp = AugConfig()  # the consistency's warps (--consistency-weight), --no-augment or not
        train_ds, val_ds = loop.read_data(args)
        (names, train_points), (val_names, val_points) = read_landmarks(train_ds.path), read_landmarks(val_ds.path)
        check_landmark_names(val_names, names, val_ds.path, f"the training data's {landmarks_file(train_ds.path).name}")
        rows = whole_landmarks(train_points, train_ds.keep)[:args.labels]
        if args.labels is not None and len(rows) < args.labels:
            raise DataError(f"{train_ds.path}: {len(rows)} valid images with every landmark in the crop, fewer than "
                            f"--labels {args.labels}")
        if run.ckpt is None:  # a new run: one heatmap per landmark of the data (synth's 8, iBUG's 55, ...)
            cfg = replace(cfg, landmarks=train_points.shape[1], names=tuple(names))
        else:  # a resume: the model's outputs are these landmarks (the val CSV's are the same, checked above)
            check_data_landmarks(names, cfg, train_ds.path, f"the model ({run.ckpt_path})")
        self.n_labels = len(rows)
        repeats = max(1, args.epoch_images // len(rows))
        self.pool = copy.copy(train_ds)  # every valid training image, labels unread: the consistency's draws
        train_ds.keep = np.tile(train_ds.keep[rows], repeats)  # the N labelled images, `repeats` times an epoch
        val_ds.keep = val_ds.keep[whole_landmarks(val_points, val_ds.keep)]
        self.data = loop.make_data(args, setup, train_ds, val_ds)
        first = ResumableSampler(min(len(rows), PRECISE_BN_IMAGES), 1, args.seed, shuffle=False)
        self.bn_loader = make_loader(train_ds, args.batch_size, first, args.workers)
        self.train_points = torch.from_numpy(train_points).to(device)  # (N_total, K, 2), by file index
        self.val_points = torch.from_numpy(val_points).to(device)
        torch.manual_seed(args.seed)  # the head's (and a scratch trunk's) initialisation
        self.model = Landmarker(cfg, trunk).to(device)
        self.config = asdict(cfg)

    def loss(self, model: nn.Module, x: torch.Tensor, keys: torch.Tensor,
             epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x uint8 (B, 3, 128, 128), keys (B,) file indices -> the mean distance (pixels) between the predicted and
        the labelled landmarks (point_loss), both augmented alike in float32 outside the run's autocast; with
        --consistency-weight W, + W x consistency()."""
        true = self.train_points[keys.to(x.device)]  # (B, K, 2)
        if self.aug is None:
            x = to_float(x)
        else:
            with torch.autocast(x.device.type, enabled=False):
                x = augment(x, keys, self.args.seed, epoch, self.aug)
            true = augment_points(true, x.shape[-1], keys, self.args.seed, epoch, self.aug)  # NaN: out of the crop
        loss = point_loss(model(x), true)  # model(x): (B, K, 2)
        logs = {"point": loss.detach()}
        if self.args.consistency_weight:
            consistency = self.consistency(model, keys, epoch)
            loss = loss + self.args.consistency_weight * consistency
            logs["consistency"] = consistency.detach()
        return loss, {"loss": loss.detach(), **logs}

    def consistency(self, model: nn.Module, keys: torch.Tensor, epoch: int) -> torch.Tensor:
        """Equivariance consistency (Honari et al. 2018) on len(keys) training images drawn from (seed, epoch, keys):
        the mean distance (pixels) between the landmarks predicted on a warped copy of each and those predicted on
        the image, moved by the same warp (NaN where the warp moves a point out of the crop: left out). Gradients
        flow through both predictions."""
        g = torch.Generator().manual_seed(sample_seed(self.args.seed, epoch, *keys.tolist()))
        draw = torch.randint(len(self.pool), (len(keys),), generator=g)  # (B,) positions in the pool
        warps = torch.randint(1 << 62, (len(keys),), generator=g)  # (B,) each draw's own warp: augment's sample key
        x = torch.stack([self.pool[int(i)][0] for i in draw]).to(self.setup.device)  # (B, 3, 128, 128)
        with torch.autocast(x.device.type, enabled=False):
            warped = augment(x, warps, self.args.seed, epoch, self.warp)
        pred = model(torch.cat([to_float(x), warped]))  # (2B, K, 2): as it is, then warped
        moved = augment_points(pred[:len(x)], x.shape[-1], warps, self.args.seed, epoch, self.warp)  # (B, K, 2)
        return point_loss(pred[len(x):], moved)

    @torch.no_grad()
    def validate(self, model: nn.Module, max_batches: int | None = None) -> dict[str, float]:
        """probe.landmark_scores over the val images (the first max_batches batches) and neg_nme, model in eval mode
        after precise_bn (distill.precise_bn: the statistics every saved model uses)."""
        precise_bn(model, self.bn_loader, self.setup.device, self.setup.autocast())
        was = model.training
        model.eval()
        pred, true = [], []
        for b, (x, keys) in enumerate(self.data.val_loader):
            if max_batches is not None and b >= max_batches:
                break
            with self.setup.autocast():
                pred.append(model(to_float(x.to(self.setup.device))).float())  # (B, K, 2)
            true.append(self.val_points[keys.to(self.setup.device)])
        model.train(was)
        scores = landmark_scores(torch.cat(pred), torch.cat(true))
        return {**scores, "neg_nme": -scores["nme"]}

    def state(self) -> dict:
        return {"landmark_config": self.config}

    def after_validation(self, model: nn.Module, step: int, log_dir: Path) -> None:
        """Nothing drawn."""

    def describe(self) -> list[str]:
        cfg = self.model.cfg
        return [parameter_report({"Landmarker": self.model}),
                f"Landmarks: {cfg.arch} trunk at input {cfg.input_size} from {cfg.init}, heatmap head on strides 8 "
                f"and 16, soft-argmax; trained on the first {self.n_labels} labelled images, "
                f"{'not augmented' if self.aug is None else 'augmented with their landmarks (no flip)'}"
                + (f"; equivariance consistency on {len(self.pool):,} unlabelled training images, weight "
                   f"{self.args.consistency_weight:g}" if self.args.consistency_weight else "")]

    def postfix(self, row: dict[str, float]) -> dict[str, float]:
        return {}

    @staticmethod
    def memory_advice(resuming: bool) -> str:
        return "."


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume is None and args.student is None and not args.scratch:  # before any folder is looked at
        raise ConfigError("--student PATH (a distill.py checkpoint) or --scratch (a random trunk) is needed")
    setup = loop.setup_processes(parser, argv)
    run = loop.resolve_run(parser, "landmarker.py", argv, setup)
    loop.fit(LandmarkObjective, run, setup)


if __name__ == "__main__":
    loop.command(main)
