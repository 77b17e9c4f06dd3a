"""SAM-encoder VAE for 128x128 ear crops.

    x (B, 3, 128, 128) in [0, 1]
      -> Encoder: resize to input_size, normalise, ViT (SAM ViT-B or DINOv2) -> pyramid of feature maps
      -> VAEHead: fuse the pyramid -> mu, logvar (B, latent_dim)
      -> z = mu + sigma * eps (training) or mu (eval)
      -> Decoder: z -> recon (B, 3, 128, 128) in [0, 1]   (no skip connections: the latent carries the whole image)
      mu[:, :identity_dims] -> L2-normalised: the identity embedding (EarVAE.embed) the contrastive term trains

Where each part lives (imports run down this list, never back up):
    checkpoints.py  read_checkpoint, load_model, export_model: train.py's checkpoint files and exports
    model.py        VAEConfig and its factories, VAE head, decoder, EarVAE, build_model, the parameter report; what
                    EarVAE saves and reads (config.json, model card: hub_files, from_folder, read_export, rebuild_model)
    hub.py          SharedOnHub (huggingface_hub's PyTorchModelHubMixin: save_pretrained / from_pretrained /
                    push_to_hub) and the saved folder layout it shares with student.Student
    encoders.py     the backbone adapters (SAM, DINOv2 from transformers), load_backbone
    attention.py    SAM attention kernels (SDPA with the bias written once, FlexAttention)
    errors.py       ConfigError, WeightsUnavailableError, CheckpointError, ...
Each name is imported from the module that defines it (`from checkpoints import load_model`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders import Encoder, encoder_class, load_backbone
from errors import CheckpointError, ConfigError
from hub import (EXPORT_CARD, EXPORT_CONFIG, EXPORT_WEIGHTS, SharedOnHub, card_metadata, checkpoint_kind, config_problem,
                 load_state, metrics_table, read_folder_config, read_folder_weights)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # exp() of either end is finite in fp16 and fp32
EXPORT_FORMAT = "ear-teacher-vae/1"  # config.json's "format" in a saved teacher folder: what wrote it, which layout


# -----------------------------------------------------------------------------
# config

@dataclass
class VAEConfig:
    MINIMA: ClassVar[dict[str, int]] = {  # the smallest value of each size and index a saved config may hold
        "input_size": 1, "freeze_blocks": 0, "feature_blocks": 0, "fuse_channels": 1, "head_pool": 1,
        "latent_dim": 1, "identity_dims": 0, "embed_dim": 0, "dense_dim": 0, "decoder_channels": 1, "image_size": 1}
    encoder: str = "sam"                      # "sam" (SAM ViT-B vision encoder) or "dinov2"
    weights: str = "facebook/sam-vit-base"    # hub id or local directory (save_pretrained layout) of the backbone
    pretrained: bool = True                   # False: random backbone (explicit; never a silent fallback)
    encoder_config: dict | None = None        # backbone's transformers config; filled at build so checkpoints rebuild offline
    input_size: int = 1024                    # side the 128x128 crop is resized to (SAM: 1024 = original, 512, 256)
    freeze_blocks: int = 6                    # patch/pos embedding and the first N blocks are frozen (0: train all)
    feature_blocks: tuple[int, ...] = (2, 5, 8, 11)  # blocks whose hidden states join the pyramid (SAM's global blocks)
    fuse_channels: int = 256                  # channels of the fused pyramid in the VAE head
    head_pool: int = 8                        # fused map is pooled to head_pool x head_pool before the linear to mu/logvar
    latent_dim: int = 1024
    identity_dims: int | None = None          # the identity embedding (EarVAE.embed) reads the first N entries of
                                              # mu, the rest is free for the nuisance (0: all of mu; None: an eighth,
                                              # or all of mu where an eighth is under 2)
    embed_dim: int = 0                        # identity embedding: 0 = those entries of mu, L2-normalised;
                                              # E > 0: an MLP head over them -> E (SimCLR's projection head)
    dense_dim: int = 0                        # the dense term's map: 0 = the encoder's last map itself; D > 0: a
                                              # 1x1-conv MLP of it -> D channels (DenseCL's dense projection head)
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64, 32)  # per stage, 8x8 -> 16 -> 32 -> 64 -> 128
    image_size: int = 128                     # ear crop side, input and output
    attn_implementation: str = "sdpa"         # "sdpa" (fused kernels), "eager" (the original's) or "flex" (SAM only:
                                              # relative-position bias inside a FlexAttention kernel; CUDA to train)
    grad_checkpointing: bool = False          # recompute trainable blocks in backward: big batches in little memory

    def __post_init__(self):
        if self.identity_dims is None:  # resolved here, so a saved config holds the number
            self.identity_dims = self.latent_dim // 8 if self.latent_dim >= 16 else 0

    def check(self) -> None:
        """ConfigError naming the field if the identity embedding would be empty or meaningless: identity_dims outside
        0 or 2..latent_dim, embed_dim outside 0 or >= 2 (one entry, L2-normalised, is +1 or -1 for every image)."""
        one = ": one entry, L2-normalised, is +1 or -1 for every image and tells no identity apart"
        if not 0 <= self.identity_dims <= self.latent_dim or self.identity_dims == 1:
            raise ConfigError(f"identity_dims must be 0 or in 2..latent_dim ({self.latent_dim}), got "
                              f"{self.identity_dims}" + (one if self.identity_dims == 1 else ""))
        if self.embed_dim < 0 or self.embed_dim == 1:
            raise ConfigError(f"embed_dim must be 0 (no head) or >= 2, got {self.embed_dim}"
                              + (one if self.embed_dim == 1 else ""))
        if self.dense_dim < 0 or self.dense_dim == 1:
            raise ConfigError(f"dense_dim must be 0 (no head) or >= 2, got {self.dense_dim}: one channel, "
                              f"L2-normalised, is +1 or -1 at every point and tells no point apart")

    @property
    def embedding_dim(self) -> int:
        """E, the size of the identity embedding EarVAE.embed returns."""
        return self.embed_dim or self.identity_dims or self.latent_dim


def sam_config(**overrides) -> VAEConfig:
    """The original design: SAM ViT-B at 1024, first 6 of 12 blocks frozen, latent 1024."""
    return VAEConfig(**overrides)


def dinov2_config(**overrides) -> VAEConfig:
    """The previous backbone, DINOv2-base, behind the same interface (patch 14: 224 -> 16x16 tokens)."""
    kw = dict(encoder="dinov2", weights="facebook/dinov2-base", input_size=224)
    return VAEConfig(**{**kw, **overrides})


def tiny_config(encoder: str = "sam", **overrides) -> VAEConfig:
    """Same code path, seconds on a CPU: 4 blocks of width 64 at input 128 (16x16 tokens), small decoder."""
    family = encoder_class(encoder)
    kw = dict(encoder=encoder, weights=family.weights, pretrained=False, encoder_config=dict(family.tiny),
              input_size=128, freeze_blocks=2, feature_blocks=(1, 3), fuse_channels=32, head_pool=8,
              decoder_channels=(128, 128, 64, 32, 16))
    return VAEConfig(**{**kw, **overrides})



# -----------------------------------------------------------------------------
# VAE head and decoder

def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        # convs without bias (as in ResNets): every path ends in a GroupNorm, which subtracts a per-channel constant
        # again, so such a bias has a ~0 gradient that Adam would amplify into noise
        self.body = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  group_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VAEHead(nn.Module):
    """Pyramid -> (mu, logvar). Each map is projected to `fuse` channels (1x1), resized to the finest grid and
    summed, mixed by a 3x3 conv, average-pooled to pool x pool, and mapped linearly to 2 * latent_dim."""

    def __init__(self, in_channels: dict[str, int], fuse: int, pool: int, latent_dim: int):
        super().__init__()
        # no biases before GroupNorm (the norm removes them; see ResBlock)
        self.proj = nn.ModuleDict({k: nn.Conv2d(c, fuse, 1, bias=False) for k, c in in_channels.items()})
        self.mix = nn.Sequential(group_norm(fuse), nn.SiLU(), nn.Conv2d(fuse, fuse, 3, padding=1, bias=False),
                                 group_norm(fuse), nn.SiLU())
        self.pool = pool
        self.fc = nn.Linear(fuse * pool * pool, 2 * latent_dim)
        self.to(memory_format=torch.channels_last)  # convs run NHWC (faster on CPU and GPU tensor cores)

    def forward(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = max(f.shape[-1] for f in feats.values())
        x = sum(F.interpolate(self.proj[k](f), size=size) if f.shape[-1] != size else self.proj[k](f)
                for k, f in feats.items())  # (B, fuse, g, g)
        x = F.adaptive_avg_pool2d(self.mix(x), self.pool)  # (B, fuse, pool, pool)
        mu, logvar = self.fc(x.flatten(1)).chunk(2, dim=1)  # (B, D) each
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z (B, D) -> image (B, 3, S, S) in [0, 1]: linear to an s0 x s0 map, then per stage nearest-upsample x2,
    3x3 conv and a residual block (GroupNorm + SiLU); s0 = S / 2 ** (stages - 1)."""

    def __init__(self, latent_dim: int, channels: tuple[int, ...], image_size: int):
        super().__init__()
        self.s0 = image_size // 2 ** (len(channels) - 1)
        if self.s0 * 2 ** (len(channels) - 1) != image_size:
            raise ConfigError(f"image_size {image_size} is not {len(channels)} - 1 doublings of an integer")
        self.fc = nn.Linear(latent_dim, channels[0] * self.s0 ** 2)
        layers = [ResBlock(channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                       ResBlock(c_out)]
        layers += [group_norm(channels[-1]), nn.SiLU(), nn.Conv2d(channels[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)  # convs run NHWC (faster on CPU and GPU tensor cores)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], -1, self.s0, self.s0)  # (B, C0, s0, s0)
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.net(x))  # (B, 3, S, S)


class EarVAE(nn.Module, SharedOnHub, library_name="ear-teacher",
             tags=["ear-recognition", "biometrics", "vae", "sam", "image-feature-extraction"]):
    """The teacher. Shared through huggingface_hub's PyTorchModelHubMixin (hub.SharedOnHub): save_pretrained(dir)
    writes config.json + model.safetensors + README.md (the export_model layout: hub_files), from_pretrained(dir or
    hub id) rebuilds it (from_folder), and push_to_hub(repo_id) uploads what save_pretrained writes."""

    def __init__(self, cfg: VAEConfig, encoder: Encoder):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = VAEHead(encoder.feature_channels, cfg.fuse_channels, cfg.head_pool, cfg.latent_dim)
        self.decoder = Decoder(cfg.latent_dim, cfg.decoder_channels, cfg.image_size)
        cfg.check()
        d, e = cfg.identity_dims or cfg.latent_dim, cfg.embed_dim
        self.embed_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, e)) if e > 0 else None
        c = encoder.feature_channels[encoder.final_name]
        self.dense_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, cfg.dense_dim, 1)) \
            if cfg.dense_dim > 0 else None  # trained by the dense term only (train.py --dense-dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, 128, 128) in [0, 1] -> mu, logvar (B, latent_dim)."""
        return self.head(self.encoder.features(x))

    def embedding(self, mu: torch.Tensor) -> torch.Tensor:
        """mu (B, latent_dim) -> the identity embedding (B, E = cfg.embedding_dim), unit L2 norm: the first
        cfg.identity_dims entries of mu (all of mu when 0), or the head's output over them (E = cfg.embed_dim). Its
        cosine similarity is what the contrastive term trains and what recognition (eval.py --identity) compares.
        Only those entries are pulled together per identity; the rest of mu keeps what reconstruction needs and
        identity does not decide (skin tone, hair, light): on the demo, SupCon on 128 of 1024 entries gave rank-1
        0.845 at 31.1 dB against 0.695 at 29.1 dB on all of mu (BENCHMARKS.md, "Identity")."""
        e = mu[:, :self.cfg.identity_dims] if self.cfg.identity_dims else mu
        return F.normalize((e if self.embed_head is None else self.embed_head(e)).float(), dim=1)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 128, 128) in [0, 1] -> the identity embedding (B, E), unit L2 norm, float32 (see `embedding`).
        The module's mode is the caller's: call it on a model in eval mode (load_model returns one)."""
        return self.embedding(self.encode(x)[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> (B, 3, 128, 128) in [0, 1]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, 3, 128, 128) -> {"recon": (B, 3, 128, 128), "mu", "logvar", "z": (B, latent_dim), "embedding":
        (B, E) the identity embedding of mu, "features": x's pyramid {name: (B, C, g, g)}}. In training
        z = mu + sigma * eps, with eps (B, latent_dim) given (train.py keys it by sample) or drawn here. extra
        (B2, 3, 128, 128): images that are only encoded, in the same encoder pass (the dense term's views, train.py);
        out["dense"] = ((B, C, g, g), (B2, C, g, g)) is the dense term's maps of x and of extra: the last map, or its
        dense_head's projection (C = cfg.dense_dim)."""
        feats = self.encoder.features(x if extra is None else torch.cat([x, extra]))
        out = {}
        if extra is not None:
            last = feats[self.encoder.final_name]  # (B + B2, C, g, g)
            dense = last if self.dense_head is None else self.dense_head(last)
            out["dense"] = (dense[:len(x)], dense[len(x):])
            feats = {k: f[:len(x)] for k, f in feats.items()}
        mu, logvar = self.head(feats)
        if self.training:
            eps = torch.randn_like(mu) if eps is None else eps.to(mu)
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z, "embedding": self.embedding(mu),
                "features": feats, **out}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: {"encoder": the trainable ViT blocks + neck, "vae": head + decoder (+ embedding
        head, dense head)}."""
        heads = (self.head, self.decoder, self.embed_head, self.dense_head)
        return {"encoder": [p for p in self.encoder.parameters() if p.requires_grad],
                "vae": [p for m in heads if m is not None for p in m.parameters()]}

    # -- sharing through huggingface_hub's mixin (hub.SharedOnHub)

    def hub_files(self, metrics: dict | None = None, step: int | None = None,
                  weights: str = "model") -> tuple[dict, str]:
        """config.json ({"format": EXPORT_FORMAT, "model_config": VAEConfig, "step", "weights"}) and the README.md
        model card; step: training step or None, weights: "ema" or "model" (which of the checkpoint's weights the
        model holds)."""
        config = {"format": EXPORT_FORMAT, "model_config": asdict(self.cfg), "step": step, "weights": weights}
        return config, model_card(self, step, weights, metrics)

    @classmethod
    def from_folder(cls, folder: Path, map_location: str | torch.device = "cpu") -> EarVAE:
        """A folder that save_pretrained / export_model wrote -> the model in eval mode on map_location (JSON and
        safetensors only: read_export, rebuild_model); CheckpointError naming the file otherwise."""
        return rebuild_model(read_export(folder, map_location), folder, map_location)



def build_model(cfg: VAEConfig) -> EarVAE:
    """Build from a config (pretrained backbone when cfg.pretrained). The returned model's cfg has encoder_config
    filled in, so the checkpoints it writes rebuild without the network."""
    cfg.check()  # before the backbone is loaded (a download, for a hub id)
    backbone = load_backbone(cfg)
    cfg = replace(cfg, encoder_config=backbone.config.to_diff_dict())
    return EarVAE(cfg, encoder_class(cfg.encoder)(cfg, backbone))


def rebuild_model(ckpt: dict, path: str | Path, map_location: str | torch.device = "cpu") -> EarVAE:
    """The model a checkpoint describes, in eval mode on map_location: its model_config rebuilt offline
    (config_from_checkpoint), then its EMA weights where it has them, else its weights, loaded strictly. ckpt:
    checkpoints.read_checkpoint's result, or read_export's for a folder; path: the file or folder it was read from,
    for the messages. A config that cannot be built or weights that do not fit -> CheckpointError naming the file."""
    exported = Path(path).is_dir()
    if "model_config" not in ckpt:  # another command's run: say whose
        whose, command = checkpoint_kind(ckpt)
        whose = f"{whose} checkpoint ({command})" if command != "train.py" else "no model_config"
        raise CheckpointError(f"{path}: {whose}, not a teacher's (train.py writes those)")
    try:
        model = build_model(config_from_checkpoint(ckpt))
    except (ValueError, TypeError) as e:  # ConfigError and what transformers' config classes raise
        where = Path(path) / EXPORT_CONFIG if exported else path
        raise CheckpointError(f"{where}: its model config cannot be built ({type(e).__name__}: {e})") from e
    load_state(model, ckpt.get("ema") or ckpt["model"], Path(path) / EXPORT_WEIGHTS if exported else path)
    return model.to(map_location).eval()


def config_from_checkpoint(ckpt: dict) -> VAEConfig:
    """The VAEConfig a checkpoint's model_config describes (hub.config_problem's checks: ConfigError naming the
    field), pretrained off: the weights come from the checkpoint."""
    if problem := config_problem(ckpt["model_config"], VAEConfig):
        raise ConfigError(f"model_config {problem}")
    d = dict(ckpt["model_config"])
    for k in ("feature_blocks", "decoder_channels"):
        d[k] = tuple(d[k])
    d.setdefault("identity_dims", 0)  # saved before the field existed, when the embedding was all of mu
    return replace(VAEConfig(**d), pretrained=False)  # the weights come from the checkpoint, not the hub


def read_export(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """An export_model / save_pretrained directory as a checkpoint-like dict, the keys load_model and eval's
    checkpoint_info read: {"model": state dict, "model_config": dict, "step": int | None, "weights": "ema" |
    "model"}. It has no "run_config" (an export does not name the training data). JSON and safetensors only: nothing
    is unpickled. A missing file, bad JSON, another format or a config that does not fit VAEConfig -> CheckpointError
    naming the file."""
    path = Path(path)
    config = read_folder_config(path, EXPORT_FORMAT, "checkpoints.export_model")
    config_path = path / EXPORT_CONFIG
    problem = config_problem(config.get("model_config"), VAEConfig)
    if problem:
        raise CheckpointError(f"{config_path}: model_config {problem}")
    step = config.get("step")
    if not (step is None or type(step) is int) or config.get("weights") not in ("ema", "model"):
        raise CheckpointError(f"{config_path}: step {step!r} / weights {config.get('weights')!r}: expected an "
                              f"integer or null / 'ema' or 'model'")
    state = read_folder_weights(path, map_location)
    return {"model": state, "model_config": config["model_config"], "step": step, "weights": config["weights"]}



# -----------------------------------------------------------------------------
# the model card of a saved teacher (README.md beside config.json and model.safetensors)

def embedding_source(cfg: VAEConfig) -> str:
    """What model.embed reads, in words for the model card."""
    src = f"the first {cfg.identity_dims} entries of mu" if cfg.identity_dims else "mu"
    return f"an MLP head over {src} to {cfg.embed_dim} dimensions" if cfg.embed_dim else (
        src if cfg.identity_dims else "mu itself")


def model_card(model: EarVAE, step: int | None, weights: str, metrics: dict | None) -> str:
    """README.md of an export: a few lines on what the model is, its config, metrics and how to load it."""
    cfg, enc = model.cfg, model.cfg.encoder_config or {}
    total, _ = count(model)
    backbone = {"sam": "SAM ViT", "dinov2": "DINOv2 ViT"}[cfg.encoder]
    start = f"initialised from `{cfg.weights}`" if cfg.pretrained else "trained from a random initialisation"
    what = "the exponential moving average (EMA) of the training weights" if weights == "ema" else "the training weights"
    lines = [
        card_metadata(type(model)), "# Ear-teacher VAE", "",
        f"A variational autoencoder for {cfg.image_size}x{cfg.image_size} RGB ear crops in [0, 1]: a {backbone} "
        f"encoder ({enc.get('num_hidden_layers', '?')} blocks of width {enc.get('hidden_size', '?')}, input "
        f"{cfg.input_size}x{cfg.input_size}, {start}), a VAE head to a {cfg.latent_dim}-d latent and a "
        f"convolutional decoder. The posterior mean `mu` is the ear embedding a student distils from; "
        f"`model.embed(x)` is the identity embedding (unit L2 norm, compared by cosine similarity: "
        f"{embedding_source(cfg)}); "
        f"`model.encoder.features(x)` returns the multi-scale pyramid (blocks {list(cfg.feature_blocks)}).", "",
        f"Weights: {what} at {f'step {step}' if step is not None else 'an unknown step'}; "
        f"{total / 1e6:.1f}M parameters.", "",
        "## Config", "", "| field | value |", "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in asdict(cfg).items() if k != "encoder_config"],
        f"| encoder_config | see `{EXPORT_CONFIG}` |", "",
    ]
    lines += metrics_table(metrics)
    lines += ["## Load", "",
              "With this repository's `model.py` and `checkpoints.py` (JSON and safetensors only, nothing is "
              "unpickled):",
              "",
              "```python", "from checkpoints import load_model", "from model import EarVAE", "",
              "model = EarVAE.from_pretrained(\"path/to/this/directory\")  # or its hub id; eval mode, CPU",
              "model, cfg = load_model(\"path/to/this/directory\")  # the same, with its VAEConfig",
              "out = model(x)  # x: (B, 3, 128, 128) in [0, 1] -> recon (B, 3, 128, 128), mu, logvar, z (B, latent_dim)",
              "e = model.embed(x)  # (B, E) identity embedding, unit L2 norm: compare by cosine similarity",
              "```", "",
              f"Files: `{EXPORT_CONFIG}` (format `{EXPORT_FORMAT}`), `{EXPORT_WEIGHTS}`, `{EXPORT_CARD}`.", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# parameter report

def count(module: nn.Module) -> tuple[int, int]:
    """-> (total, trainable) parameters, each counted once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_report(parts: dict[str, nn.Module]) -> str:
    """The seed's table: totals, then one line per part. parts e.g. {"EarVAE": model, "PerceptualLoss": loss}."""
    def m(n: int) -> str:
        return f"{n / 1e6:.1f}M"
    totals = [count(p) for p in parts.values()]
    total, trainable = sum(t for t, _ in totals), sum(t for _, t in totals)
    pct = lambda n: f"{100 * n / max(total, 1):.1f}%"
    lines = [f"Total params:     {m(total)}",
             f"Trainable params: {m(trainable)} ({pct(trainable)})",
             f"Frozen params:    {m(total - trainable)} ({pct(total - trainable)})", "", "Breakdown:"]
    for (name, part), (t, tr) in zip(parts.items(), totals):
        lines.append(f"  - {name + ':':<18} {m(t):>7} ({m(tr)} trainable)")
        if isinstance(part, EarVAE):
            for sub in ("encoder", "head", "decoder"):
                st, str_ = count(getattr(part, sub))
                lines.append(f"      {sub + ':':<14} {m(st):>7} ({m(str_)} trainable)")
    return "\n".join(lines)
