"""Students: small torchvision CNNs that learn the teacher's identity embedding and `mu` (feature distillation).

    x (B, 3, 128, 128) in [0, 1]
      -> resize to input_size, ImageNet normalisation
      -> trunk: a torchvision classifier (ARCHS) without its pooling and classifier -> (B, C, h, w)
      -> global average pool (B, C) -> Linear(C, head_dim) + SiLU
      -> "embed": Linear -> L2-normalised (B, embed_dim)      the teacher's identity embedding (EarVAE.embed)
      -> "mu":    Linear -> (B, latent_dim)                    the teacher's posterior mean

`distill.py --teacher CKPT` trains one (loop.py's training loop with the student's objective: losses.DistillLoss
against teacher_targets on the same augmented images), `load_student(path)` loads it, `eval.py STUDENT.pt --identity`
measures it beside its teacher and the pixels.

`Student(StudentConfig(...))` builds one: the trunk from torchvision's ImageNet weights (through its cache, the
loading path of the perceptual loss's VGG16: weights.load_torchvision_weights), from a local state dict, or random on
purpose (pretrained=False); never a silent fallback. The config is stored with the weights: Student shares through
huggingface_hub's PyTorchModelHubMixin as the teacher does (save_pretrained(dir): config.json + model.safetensors +
README.md, from_pretrained(dir or hub id), push_to_hub; hub.SharedOnHub). losses.DistillLoss is the objective.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import read_checkpoint
from encoders import IMAGENET_MEAN, IMAGENET_STD
from errors import CheckpointError, ConfigError
from hub import (EXPORT_CARD, EXPORT_CONFIG, EXPORT_WEIGHTS, SharedOnHub, card_metadata, checkpoint_kind, config_problem,
                 load_state, metrics_table, read_folder_config, read_folder_weights)
from model import EarVAE, count
from weights import load_torchvision_weights

STUDENT_FORMAT = "ear-teacher-student/1"  # config.json's "format" in a saved student folder
HINT_PREFIX = "hint."  # the state-dict keys of a hint run's FitNets regressors (distill.HintStudent): trained
                      # with the student, not part of it (load_student leaves them out)

# torchvision builder name -> (the trunk of a model it built: every layer before global pooling, its channels)
ARCHS: dict[str, tuple[Callable[[nn.Module], nn.Module], int]] = {
    "mobilenet_v3_small": (lambda m: m.features, 576),
    "resnet18": (lambda m: nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4),
                 512),
    "efficientnet_b0": (lambda m: m.features, 1280),
    "shufflenet_v2_x0_5": (lambda m: nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5), 1024),
}  # students with SAM ViT-B's latent 1024 (head included): 1.37M, 11.6M, 4.63M, 0.90M parameters


@dataclass
class StudentConfig:
    MINIMA: ClassVar[dict[str, int]] = {"embed_dim": 1, "latent_dim": 1, "head_dim": 1, "input_size": 1}  # saved
    arch: str = "mobilenet_v3_small"  # torchvision builder, one of ARCHS: mobilenet_v3_small, resnet18,
                                      # efficientnet_b0, shufflenet_v2_x0_5 (the smallest: 0.90M with its head)
    weights: str = "imagenet"         # "imagenet": torchvision's IMAGENET1K_V1 (cached in $TORCH_HOME/hub/checkpoints),
                                      # or a local .safetensors / .pth state dict of the whole torchvision model
    pretrained: bool = True           # False: random trunk, chosen on purpose (--no-pretrained); never a fallback
    embed_dim: int = 128              # size of the teacher's identity embedding (EarVAE.embed), L2-normalised
    latent_dim: int = 1024            # size of the teacher's mu (VAEConfig.latent_dim)
    head_dim: int = 256               # width of the head's hidden layer
    input_size: int = 224             # side the ear crop (128 in this project) is resized to before the trunk


class Student(nn.Module, SharedOnHub, library_name="ear-teacher",
              tags=["ear-recognition", "biometrics", "knowledge-distillation", "image-feature-extraction"]):
    """A torchvision trunk and a small head to the teacher's embedding and mu (module docstring). Raises ConfigError
    for an unknown arch or sizes out of range, WeightsUnavailableError when pretrained weights cannot be loaded."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ConfigError(f"student arch must be one of {', '.join(map(repr, ARCHS))}, got {cfg.arch!r}")
        for name in ("embed_dim", "latent_dim", "head_dim", "input_size"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"student {name} must be >= 1, got {getattr(cfg, name)}")
        self.cfg = cfg
        trunk, channels = ARCHS[cfg.arch]
        self.trunk = trunk(build_torchvision(cfg))
        self.hidden = nn.Sequential(nn.Linear(channels, cfg.head_dim), nn.SiLU())
        self.to_embed = nn.Linear(cfg.head_dim, cfg.embed_dim)
        self.to_mu = nn.Linear(cfg.head_dim, cfg.latent_dim)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """x (B, 3, H, W) in [0, 1] (ear crops, 128 x 128 here) -> {"embed": (B, embed_dim) unit vectors, "mu": (B,
        latent_dim)}."""
        return self.outputs(self.trunk(self.preprocess(x)))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> (B, 3, S, S) resized to input_size S and ImageNet-normalised: the trunk's
        input."""
        return trunk_input(x, self.cfg.input_size, self.pixel_mean, self.pixel_std)

    def outputs(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trunk's last map (B, C, h, w) -> the head's {"embed": (B, embed_dim) unit vectors, "mu": (B,
        latent_dim)}."""
        h = self.hidden(feature.mean(dim=(2, 3)))  # (B, head_dim)
        return {"embed": F.normalize(self.to_embed(h), dim=1), "mu": self.to_mu(h)}

    def trunk_maps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """x (B, 3, H, W) in [0, 1] -> trunk_maps(self.trunk, ...) of its preprocessed input: {stride: (B, C_s, S /
        stride, S / stride)}."""
        return trunk_maps(self.trunk, self.preprocess(x))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder": the trunk (pretrained: distill.py gives it lr * encoder_lr_scale), "head": the head}, as
        EarVAE.parameter_groups."""
        return {"encoder": list(self.trunk.parameters()),
                "head": [p for m in (self.hidden, self.to_embed, self.to_mu) for p in m.parameters()]}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> the identity embedding (B, embed_dim), L2-normalised."""
        return self(x)["embed"]

    # -- sharing through huggingface_hub's mixin (hub.SharedOnHub)

    def hub_files(self, metrics: dict | None = None) -> tuple[dict, str]:
        """config.json ({"format": STUDENT_FORMAT, "student_config": StudentConfig}) and the README.md card."""
        return {"format": STUDENT_FORMAT, "student_config": asdict(self.cfg)}, student_card(self, metrics)

    @classmethod
    def from_folder(cls, folder: Path, map_location: str | torch.device = "cpu") -> Student:
        """A folder that save_pretrained wrote -> the student in eval mode (JSON and safetensors only). A missing
        file, bad JSON, another format, a config that does not fit StudentConfig or weights that do not fit it ->
        CheckpointError naming the file."""
        config = read_folder_config(folder, STUDENT_FORMAT, "Student.save_pretrained")
        problem = config_problem(config.get("student_config"), StudentConfig)
        if problem:
            raise CheckpointError(f"{folder / EXPORT_CONFIG}: student_config {problem}")
        cfg = StudentConfig(**config["student_config"])
        try:
            model = cls(replace(cfg, pretrained=False))  # the weights come from the folder, not from ImageNet
        except ConfigError as e:
            raise CheckpointError(f"{folder / EXPORT_CONFIG}: its student_config cannot be built ({e})") from e
        model.cfg = cfg  # as saved: a re-save still says where the trunk started
        load_state(model, read_folder_weights(folder), folder / EXPORT_WEIGHTS)
        return model.to(map_location).eval()


def load_student(path: str | Path, map_location: str | torch.device = "cpu", ckpt: dict | None = None) -> Student:
    """A trained student in eval mode, from a distill.py checkpoint (its EMA weights when the run kept them;
    `ckpt`: read_checkpoint(path)'s result when the caller has read it) or from a save_pretrained folder. A teacher's
    checkpoint, or a config or weights that do not fit -> CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        return Student.from_folder(path, map_location)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if "student_config" not in ckpt:
        whose, command = checkpoint_kind(ckpt)
        whose = f"{whose} checkpoint ({command})" if command == "landmarker.py" else "a teacher's checkpoint"
        raise CheckpointError(f"{path}: {whose}, not a student's (distill.py writes those)")
    if problem := config_problem(ckpt["student_config"], StudentConfig):
        raise CheckpointError(f"{path}: student_config {problem}")
    cfg = StudentConfig(**ckpt["student_config"])
    try:
        model = Student(replace(cfg, pretrained=False))  # the weights come from the checkpoint
    except ConfigError as e:
        raise CheckpointError(f"{path}: its student_config cannot be built ({e})") from e
    model.cfg = cfg
    weights = ckpt.get("ema") or ckpt["model"]
    load_state(model, {k: v for k, v in weights.items() if not k.startswith(HINT_PREFIX)}, path)
    return model.to(map_location).eval()


def is_student_folder(path: str | Path) -> bool:
    """Whether `path` is a folder that Student.save_pretrained wrote (its config.json says STUDENT_FORMAT)."""
    try:
        config = json.loads((Path(path) / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("format") == STUDENT_FORMAT


def trunk_input(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1] -> (B, 3, size, size): resized (bilinear, antialiased) where it is another size and
    normalised by mean, std (1, 3, 1, 1): a trunk's input (Student, landmarker.Landmarker)."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - mean) / std  # (B, 3, size, size)


@torch.no_grad()
def stride_channels(trunk: nn.Sequential, size: int) -> dict[int, int]:
    """{stride: channels} of trunk_maps at input `size`, from a blank batch of 2 in eval mode (the trunk's own mode
    is kept)."""
    was = trunk.training
    maps = trunk_maps(trunk.eval(), torch.zeros(2, 3, size, size))
    trunk.train(was)
    return {s: m.shape[1] for s, m in maps.items()}


def trunk_maps(trunk: nn.Sequential, h: torch.Tensor) -> dict[int, torch.Tensor]:
    """A trunk of ARCHS (an nn.Sequential) on its input h (B, 3, S, S) -> {stride: (B, C_s, S / stride, S / stride)}:
    its deepest map at each stride of the input, layer by layer, in order of stride; the last is the trunk's output.
    For mobilenet_v3_small at S = 128: strides 2, 4, 8, 16, 32 with 16, 16, 24, 48, 576 channels."""
    size, maps = h.shape[-1], {}
    for layer in trunk:
        h = layer(h)
        maps[round(size / h.shape[-1])] = h  # a deeper layer at the same stride replaces it
    return maps


@torch.no_grad()
def teacher_targets(teacher: EarVAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a student learns from the teacher, for x (B, 3, 128, 128) in [0, 1]: {"embed": (B, E) the identity
    embedding (EarVAE.embed), "mu": (B, latent_dim), "pyramid": the encoder's maps (encoder.features: {name: (B, C,
    g, g)}, for distill.py's FitNets hints)}. Encoder and head only: the decoder does not run."""
    pyramid = teacher.encoder.features(x)
    mu, _ = teacher.head(pyramid)  # (B, latent_dim)
    return {"embed": teacher.embedding(mu), "mu": mu, "pyramid": pyramid}


def build_torchvision(cfg: StudentConfig) -> nn.Module:
    """The whole torchvision model cfg.arch (its classifier included, so that a full state dict loads strictly):
    ImageNet or local weights when cfg.pretrained, random otherwise. WeightsUnavailableError when they cannot be
    loaded, saying what was tried and how to fix it."""
    from torchvision import models  # imported here: ~1 s that loading a saved student's config does not need
    model = models.get_model(cfg.arch, weights=None)
    if cfg.pretrained:
        imagenet = models.get_model_weights(cfg.arch).IMAGENET1K_V1
        fixes = (f"Fixes: (1) while online run `python -c \"import torchvision; torchvision.models.{cfg.arch}"
                 f"(weights='IMAGENET1K_V1')\"` to fill the cache, or copy {Path(imagenet.url).name} into "
                 f"$TORCH_HOME/hub/checkpoints/; (2) give a local {cfg.arch} state dict (.pth or .safetensors) as "
                 f"the student's weights (StudentConfig.weights; distill.py --student-weights PATH); (3) start from random weights on purpose: pretrained=False "
                 f"(--no-pretrained).")
        load_torchvision_weights(model, cfg.weights, imagenet, cfg.arch, "the student", fixes)
    return model


def student_card(model: Student, metrics: dict | None) -> str:
    """README.md of a saved student: what it is, its config, `metrics` when given, how to load it."""
    cfg = model.cfg
    total, _ = count(model)
    start = (f"initialised from {'ImageNet' if cfg.weights == 'imagenet' else f'`{cfg.weights}`'}"
             if cfg.pretrained else "trained from a random initialisation")
    lines = [
        card_metadata(type(model)), "# Ear student", "",
        f"A small ear model distilled from the ear-teacher VAE: torchvision's `{cfg.arch}` ({start}) on "
        f"RGB ear crops in [0, 1] (resized to {cfg.input_size}x{cfg.input_size}), with a head to "
        f"the teacher's L2-normalised identity embedding ({cfg.embed_dim}-d) and its latent mean `mu` "
        f"({cfg.latent_dim}-d). {total / 1e6:.2f}M parameters.", "",
        "## Config", "", "| field | value |", "|---|---|", *[f"| {k} | `{v}` |" for k, v in asdict(cfg).items()], "",
        *metrics_table(metrics),
        "## Load", "", "With this repository's `student.py` (JSON and safetensors only, nothing is unpickled):", "",
        "```python", "from student import Student", "",
        "student = Student.from_pretrained(\"path/to/this/directory\")  # or its hub id; eval mode, CPU",
        "out = student(x)  # x: (B, 3, 128, 128) in [0, 1] -> embed (B, embed_dim), mu (B, latent_dim)", "```", "",
        f"Files: `{EXPORT_CONFIG}` (format `{STUDENT_FORMAT}`), `{EXPORT_WEIGHTS}`, `{EXPORT_CARD}`.", ""]
    return "\n".join(lines)
