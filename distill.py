"""Distil a student from a trained ear teacher: its command line and its objective; the optimisation loop is
loop.py's, shared with train.py.

    python distill.py --teacher checkpoints/best.pt --ckpt-dir student --log-dir student_logs
    python distill.py --teacher demo/checkpoints/best.pt --no-pretrained --student-input-size 128 ...  # CPU-sized
    python distill.py --resume student/last.pt                           # continue (the teacher's hash is checked)

The student (student.py: a small torchvision CNN with a head) learns the teacher's identity embedding and mu
(losses.DistillLoss: cosine + L2, torchdistill's names) on the teacher's training data and augmentation, the frozen
teacher computing its targets on the fly from each augmented batch (student.teacher_targets, under no_grad). best.pt
is the student that agrees best with the teacher on the validation images (mean cosine of their embeddings).

--hint-weight W adds FitNets' hints (Romero et al. 2015; torchdistill's `hint` with a regressor): the student's
trunk maps at strides 8 and 16 of its input each pass through a 1x1-conv regressor to the channels of a teacher
map, and their MSE to it is a loss term (hint_targets: the teacher's first pyramid map for stride 8, its last (the
neck) for stride 16, each resized to the student's grid). The regressors train with the student (HintStudent) and
are left out when it is loaded for use (student.load_student), so a hint-trained student deploys as any other.

--rkd-weight W adds RKD's distance term (Park et al. 2019; losses.rkd_distance): the student matches the teacher's
pairwise distances between the batch's identity embeddings, each over its mean, the relations that rank-1 and EER
read, where the cosine term matches each embedding on its own.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import HelpFormatter, int_range, non_negative
from data import AugConfig, ResumableSampler, augment, make_loader, to_float
from errors import CheckpointError, ConfigError, DataError, TrainingError, WeightsUnavailableError  # noqa: F401
from checkpoints import load_model, weights_sha256
from hub import checkpoint_kind, config_problem
from losses import DistillConfig, DistillLoss
from model import EarVAE, parameter_report
from student import ARCHS, Student, StudentConfig, stride_channels, teacher_targets
import loop

PRECISE_BN_IMAGES = 1024  # the first training images, un-augmented, that precise_bn averages over


def get_parser() -> argparse.ArgumentParser:
    """The student's flags (defaults from StudentConfig) and the run flags every training command shares
    (loop.add_run_flags)."""
    p = argparse.ArgumentParser(description="Distil a small student from a trained ear teacher.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("student")
    g.add_argument("--student-arch", choices=list(ARCHS), default=StudentConfig.arch, help="the student's "
                   "torchvision trunk")
    g.add_argument("--student-weights", default=StudentConfig.weights, help="'imagenet' (torchvision's cache) or a "
                   "local state dict of the whole torchvision model")
    g.add_argument("--no-pretrained", action="store_true", help="start the student's trunk from random weights "
                   "(explicit)")
    g.add_argument("--student-input-size", type=int_range(32, 1024), default=StudentConfig.input_size,
                   help="side the crop is resized to for the student")
    g.add_argument("--hint-weight", type=non_negative, default=DistillConfig.hint, help="FitNets hints: weight of "
                   "the MSE between the student's trunk maps at strides 8 and 16 (each through a trained 1x1-conv "
                   "regressor) and the teacher's first and last pyramid maps on the same grids (0: off)")
    g.add_argument("--rkd-weight", type=non_negative, default=DistillConfig.embed_rkd, help="RKD's distance term: "
                   "weight of the Huber loss between the batch's pairwise distances of student and teacher identity "
                   "embeddings, each over its mean (0: off)")
    resumable = loop.add_run_flags(p)
    resumable.add_argument("--teacher", default=None, metavar="PATH", help="the trained teacher (a train.py "
                           "checkpoint or an export / save_pretrained folder); needed for a new run, and on --resume "
                           "where it moved (its weights' hash is checked)")
    return p


@torch.no_grad()
def teacher_hint_channels(teacher: EarVAE) -> dict[int, int]:
    """{stride: channels} of the teacher maps hint_targets gives each student stride, from one blank image."""
    maps = hint_targets(teacher.encoder.features(torch.zeros(1, 3, 128, 128)), {s: 1 for s in HINT_STRIDES})
    return {s: m.shape[1] for s, m in maps.items()}


def load_teacher(path: str) -> tuple[EarVAE, str]:
    """A student run's teacher: load_model(path) on the CPU (its EMA weights where its run kept them), frozen: eval
    mode, requires_grad False -> (teacher, weights_sha256). A missing, unreadable or unsafe file, or a student's, is a
    CheckpointError naming it."""
    teacher, _ = load_model(path)
    teacher.requires_grad_(False)
    return teacher, weights_sha256(teacher)


def student_run(run: loop.Run) -> tuple[StudentConfig, bool, EarVAE, str]:
    """The student to build, whether its trunk started pretrained, and the frozen teacher with its weights' hash: from
    the flags for a new run, from the checkpoint when resuming (its teacher must have the same weights). ConfigError
    for flags that contradict each other, CheckpointError for a teacher's checkpoint or another teacher."""
    args, ckpt, path = run.args, run.ckpt, run.ckpt_path
    if ckpt is None:
        if args.teacher is None:
            raise ConfigError("--teacher PATH is needed: the trained teacher (a train.py checkpoint or an export "
                              "folder) the student learns from")
        if args.no_pretrained and args.student_weights != StudentConfig.weights:
            raise ConfigError(f"--student-weights {args.student_weights} with --no-pretrained: the trunk starts "
                              f"random, so the weights would not be read; drop one of the two")
        if args.batch_size < 2:
            raise ConfigError("--batch-size 1: a student's BatchNorm layers need 2 images or more per micro-batch in "
                              "training")
        teacher, sha256 = load_teacher(args.teacher)
        cfg = StudentConfig(arch=args.student_arch, weights=args.student_weights, pretrained=not args.no_pretrained,
                            embed_dim=teacher.cfg.embedding_dim, latent_dim=teacher.cfg.latent_dim,
                            input_size=args.student_input_size)
        return cfg, cfg.pretrained, teacher, sha256
    if "student_config" not in ckpt:
        whose, again = checkpoint_kind(ckpt)
        raise CheckpointError(f"{path}: {whose} run, not a student's; continue it with {again} --resume {path}")
    if problem := config_problem(ckpt["student_config"], StudentConfig):
        raise CheckpointError(f"{path}: student_config {problem}")
    try:
        teacher, sha256 = load_teacher(args.teacher)
    except CheckpointError as e:
        raise CheckpointError(f"the teacher of {path}: {e} (if it moved, give its new path: --resume --teacher "
                              f"PATH)") from e
    if sha256 != ckpt["teacher_sha256"]:
        raise CheckpointError(f"{args.teacher}: the teacher's weights are not those {path} was distilled from "
                              f"(sha256 {sha256[:12]}..., was {ckpt['teacher_sha256'][:12]}...): resume with that "
                              f"teacher, or start a new run")
    cfg = replace(StudentConfig(**ckpt["student_config"]), pretrained=False)  # the weights come from the checkpoint
    return cfg, ckpt["student_config"]["pretrained"], teacher, sha256


@torch.no_grad()
def precise_bn(model: nn.Module, loader, device: torch.device, autocast) -> None:
    """Recompute the running mean and variance of every BatchNorm layer of `model` as the exact averages over the
    loader's images ((B, 3, 128, 128) uint8 batches), the rest of the model in eval mode: "precise BN" (Wu & Johnson,
    "Rethinking 'Batch' in BatchNorm", 2021; fvcore's update_bn_stats). torchvision's students keep running statistics
    with momentum 0.01, which after a short run are still their initial values: in eval mode every image then gets
    nearly the same embedding."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    for x, _ in loader:
        with autocast:
            model(to_float(x.to(device, non_blocking=True)))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


HINT_STRIDES = (8, 16)  # the student's trunk strides that learn a teacher map (hint_targets says which)


class HintStudent(Student):
    """A student with FitNets' regressors: `hint` ({str(stride): 1x1 conv from the trunk's channels at that stride to
    the teacher map's}), trained with it by the loop's optimizer, its state-dict keys under student.HINT_PREFIX
    ("hint."). forward adds "hints": {stride: (B, C_teacher, S / stride, S / stride)} to Student's outputs. teacher_channels:
    {stride: channels} of hint_targets' maps."""

    def __init__(self, cfg: StudentConfig, teacher_channels: dict[int, int]) -> None:
        super().__init__(cfg)
        channels = stride_channels(self.trunk, cfg.input_size)  # {stride: the trunk's channels there}
        missing = [s for s in HINT_STRIDES if s not in channels]
        if missing:
            raise ConfigError(f"--hint-weight: the {cfg.arch} trunk at input {cfg.input_size} has no map at stride "
                              f"{missing} (it has {sorted(channels)})")
        self.hint = nn.ModuleDict({str(s): nn.Conv2d(channels[s], teacher_channels[s], 1)  # keys "hint.8...":
                                   for s in HINT_STRIDES})  # under HINT_PREFIX

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """x (B, 3, H, W) in [0, 1] -> Student's {"embed", "mu"} and "hints": {stride: (B, C_t, S / stride, S /
        stride)} the regressed trunk maps."""
        maps = self.trunk_maps(x)  # {stride: (B, C_s, S / stride, S / stride)}
        out = self.outputs(maps[max(maps)])
        return {**out, "hints": {s: self.hint[str(s)](maps[s]) for s in HINT_STRIDES}}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Student's groups, the regressors in "head"."""
        groups = super().parameter_groups()
        return {**groups, "head": groups["head"] + list(self.hint.parameters())}


def hint_targets(pyramid: dict[str, torch.Tensor], grids: dict[int, int]) -> dict[int, torch.Tensor]:
    """The teacher's maps the student's strides learn: pyramid (encoder.features: {name: (B, C, g, g)}, in order) ->
    {8: its first map, 16: its last (the neck)}, each put on the student's grid at that stride (grids: {stride:
    side}): average pooled when larger (the tiny teacher's 16x16 neck to 8x8 at student input 128), bilinear when
    smaller, as it is when equal."""
    maps = list(pyramid.values())
    out = {}
    for stride, m in zip(HINT_STRIDES, (maps[0], maps[-1])):
        g = grids[stride]
        if m.shape[-1] > g:
            m = F.adaptive_avg_pool2d(m, g)
        elif m.shape[-1] < g:
            m = F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False)
        out[stride] = m  # (B, C, g, g)
    return out


class StudentObjective:
    """A student's task (loop.Objective): reproduce the frozen teacher's identity embedding and mu for the same
    augmented images (losses.DistillLoss). best.pt is the best validation agreement: the mean cosine of the two
    embeddings."""
    score, score_text = "agreement", "agreement with the teacher {:.4f}"
    score_axis = {"ylabel": "cosine", "title": "validation agreement with the teacher"}
    log_fields = ("embed_cosine", "embed_l2", "mu_cosine", "mu_l2", "hint", "embed_rkd", "agreement")

    def __init__(self, run: loop.Run, setup: loop.Setup) -> None:
        args, device = run.args, setup.device
        cfg, pretrained, teacher, self.teacher_sha256 = student_run(run)
        self.args, self.setup = args, setup
        self.data = loop.make_data(args, setup, *loop.read_data(args))
        self.aug = AugConfig(hflip=args.hflip) if not args.no_augment else None
        first = ResumableSampler(min(len(self.data.train_ds), PRECISE_BN_IMAGES), 1, args.seed, shuffle=False)
        self.bn_loader = make_loader(self.data.train_ds, args.batch_size, first, args.workers)
        torch.manual_seed(args.seed)  # the student's initialisation (under DDP rank 0's weights are broadcast)
        if args.hint_weight > 0:  # the regressors are drawn after the student: its initial weights stay the same
            self.model = HintStudent(cfg, teacher_hint_channels(teacher)).to(device)
        else:
            self.model = Student(cfg).to(device)
        self.config = asdict(replace(self.model.cfg, pretrained=pretrained))
        self.teacher = teacher.to(device)
        config = replace(DistillConfig(), hint=args.hint_weight, embed_rkd=args.rkd_weight)
        self.criterion = DistillLoss(**asdict(config)).to(device)

    def targets(self, x: torch.Tensor, out: dict) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """teacher_targets for x (B, 3, 128, 128) and, where the student's outputs `out` have hints, the teacher's
        maps on their grids (hint_targets)."""
        target = teacher_targets(self.teacher, x)
        if "hints" in out:
            target["hints"] = hint_targets(target["pyramid"], {s: m.shape[-1] for s, m in out["hints"].items()})
        return target

    def loss(self, model: nn.Module, x: torch.Tensor, keys: torch.Tensor,
             epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x uint8 (B, 3, 128, 128), augmented in float32 outside the run's autocast -> the student's outputs against
        the teacher's for the same images: DistillLoss's (loss, logs)."""
        with torch.autocast(x.device.type, enabled=False):
            x = augment(x, keys, self.args.seed, epoch, self.aug, view=0) if self.aug is not None else to_float(x)
        out = model(x)
        return self.criterion(out, self.targets(x, out))

    @torch.no_grad()
    def validate(self, model: nn.Module, max_batches: int | None = None) -> dict[str, float]:
        """The distillation terms on the clean validation images and `agreement`: the mean cosine of the student's
        and the teacher's identity embeddings, after precise_bn (the statistics eval mode and every saved student
        use)."""
        precise_bn(model, self.bn_loader, self.setup.device, self.setup.autocast())

        def logs(x: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.setup.autocast():
                out = model(x)
                target = self.targets(x, out)
                _, terms = self.criterion(out, target)
            return {**terms, "agreement": F.cosine_similarity(out["embed"].float(), target["embed"].float()).mean()}
        return loop.mean_logs(model, self.data.val_loader, self.setup.device, logs, max_batches)

    def state(self) -> dict:
        return {"student_config": self.config, "teacher_sha256": self.teacher_sha256}

    def after_validation(self, model: nn.Module, step: int, log_dir: Path) -> None:
        """A student draws nothing: it has no reconstructions."""

    def describe(self) -> list[str]:
        terms = ", ".join(f"{k} {w:g}" for k, w in self.criterion.weights.items() if w > 0)
        return [parameter_report({"Student": self.model, "EarVAE teacher (frozen)": self.teacher}),
                f"Distillation: {self.model.cfg.arch} student from the teacher {self.args.teacher} (weights sha256 "
                f"{self.teacher_sha256[:12]}...), targets computed on the fly from each augmented batch; terms {terms}"]

    def postfix(self, row: dict[str, float]) -> dict[str, float]:
        return {"cos": 1 - row["embed_cosine"]} if "embed_cosine" in row else {}  # its agreement with the teacher

    @staticmethod
    def memory_advice(resuming: bool) -> str:
        return "." if resuming else ", or a smaller --student-input-size."


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    setup = loop.setup_processes(parser, argv)
    run = loop.resolve_run(parser, "distill.py", argv, setup)
    loop.fit(StudentObjective, run, setup)


if __name__ == "__main__":
    loop.command(main)
