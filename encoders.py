"""Backbone adapters: a transformers ViT (SAM's vision encoder, DINOv2) behind one interface, driven block by block
so that the frozen prefix runs under `torch.no_grad()` (no activations kept) and the hidden states of chosen blocks
come out as a multi-scale pyramid.

    load_backbone(cfg)          the transformers model: pretrained (safetensors, a one-line error when unreachable)
                                or random on purpose (cfg.pretrained False)
    Encoder                     the interface; one subclass per family (SamEncoder, Dinov2Encoder) in BACKBONES
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import ConfigError, WeightsUnavailableError

if TYPE_CHECKING:
    from model import VAEConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM and DINOv2 both normalise with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_backbone(cfg: VAEConfig) -> nn.Module:
    """The transformers backbone: pretrained from `cfg.weights`, or random from `cfg.encoder_config` (or the
    architecture's defaults, which are ViT-B for both) when `cfg.pretrained` is False."""
    family = encoder_class(cfg.encoder)
    config_cls, model_cls = family.transformers_classes()
    if cfg.attn_implementation not in family.attn_implementations:
        raise ConfigError(f"attn_implementation must be one of {family.attn_implementations} for encoder "
                          f"{cfg.encoder!r}, got {cfg.attn_implementation!r}")
    attn = "sdpa" if cfg.attn_implementation == "flex" else cfg.attn_implementation  # flex: swapped in by Encoder
    if not cfg.pretrained:
        # SamVisionConfig defaults to initializer_range=1e-10 (its weights are always loaded): a random start needs
        # a real scale, or every weight is ~0 and the encoder passes nothing to the VAE
        config = config_cls(**{"initializer_range": 0.02, **(cfg.encoder_config or {})})
        config._attn_implementation = attn
        return model_cls(config)
    if Path(cfg.weights).is_absolute() or cfg.weights.startswith((".", "~")):  # a path, never a hub id
        if not Path(cfg.weights).expanduser().is_dir():
            raise WeightsUnavailableError(f"{cfg.weights}: no such folder of {cfg.encoder} weights (the "
                                          f"save_pretrained layout: config.json + model.safetensors)")
    try:
        model, info = model_cls.from_pretrained(cfg.weights, attn_implementation=attn,
                                                use_safetensors=True, output_loading_info=True)
    except OSError as e:
        reason = str(e).strip().splitlines()[0].rstrip(".")
        if Path(cfg.weights).exists():  # a user's folder: the fix is in it, not on the hub
            raise WeightsUnavailableError(
                f"could not load {cfg.encoder} weights from the local directory {cfg.weights!r}: {reason}. It needs "
                f"the save_pretrained layout of a {model_cls.__name__} (config.json + model.safetensors); or pass "
                f"a hub id, or --no-pretrained to train from random initialisation on purpose.") from e
        raise WeightsUnavailableError(
            f"could not load {cfg.encoder} weights from {cfg.weights!r} (Hugging Face hub id, online or cached; "
            f"safetensors): {reason}. "
            f"Fixes: (1) while online, download them once: `hf download {cfg.weights}` "
            f"(or `huggingface-cli download {cfg.weights}`), then run with HF_HUB_OFFLINE=1; "
            f"(2) point at a local copy: --weights /path/to/dir (config.json + model.safetensors); "
            f"(3) train from random initialisation on purpose: --no-pretrained (pretrained=False)."
        ) from e
    if info["missing_keys"]:
        # transformers would initialise these at random and carry on; a half-random backbone is not pretrained
        raise WeightsUnavailableError(
            f"{cfg.weights!r} does not hold a complete {cfg.encoder} backbone: {len(info['missing_keys'])} weights "
            f"missing (e.g. {sorted(info['missing_keys'])[:3]}). Use the matching checkpoint, or --no-pretrained.")
    return model



class Encoder(nn.Module):
    """A ViT backbone behind one interface. Input (B, 3, image_size, image_size) in [0, 1]; `features(x)` returns
    the pyramid {"block{i}": (B, hidden, g, g) for i in feature_blocks, final_name: (B, C, g, g)} with
    g = input_size / patch_size (SAM ViT-B at 1024: 64). A backbone family is a subclass (SamEncoder,
    Dinov2Encoder) in BACKBONES, keyed by cfg.encoder: its transformers classes, which modules embed, are the
    blocks and end the backbone (`adopt`), its position embedding (`tokens`) and its hidden-state layout (`to_map`,
    `final_map`). Parameters are registered as embed / blocks / final (+ the family's own), whatever the family."""

    weights: str  # hub id of the family's pretrained backbone (tiny_config's default)
    tiny: dict  # encoder_config of tiny_config()
    final_name: str  # pyramid key of the final module's map
    attn_implementations: tuple[str, ...] = ("sdpa", "eager")  # transformers' kernels for VAEConfig

    def __init__(self, cfg: VAEConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        c = backbone.config
        self.patch_size = c.patch_size
        self.grid = cfg.input_size // c.patch_size
        if cfg.input_size % c.patch_size:
            raise ConfigError(f"input_size {cfg.input_size} is not a multiple of the patch size {c.patch_size}")
        if not 0 <= cfg.freeze_blocks <= c.num_hidden_layers:
            raise ConfigError(f"freeze_blocks must be in 0..{c.num_hidden_layers}, got {cfg.freeze_blocks}")
        bad = [i for i in cfg.feature_blocks if not 0 <= i < c.num_hidden_layers]
        if bad:
            raise ConfigError(f"feature_blocks {bad} out of range 0..{c.num_hidden_layers - 1}")
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.embed, self.blocks, self.final, final_channels = self.adopt(backbone)
        self.feature_channels = {f"block{i}": c.hidden_size for i in cfg.feature_blocks}
        self.feature_channels[self.final_name] = final_channels
        self.hidden_size = c.hidden_size
        if cfg.freeze_blocks > 0:
            for m in self.frozen_modules():
                m.requires_grad_(False)
            for p in self.frozen_extras():
                p.requires_grad_(False)

    # -- what a backbone family defines

    @staticmethod
    def transformers_classes() -> tuple[type, type]:
        """-> (config class, model class) in transformers."""
        raise NotImplementedError

    def adopt(self, backbone: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, int]:
        """Prepare `backbone` for self.cfg -> (embedding module, blocks, final module, final map's channels)."""
        raise NotImplementedError

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) -> the hidden states the first block takes, position embedding added."""
        raise NotImplementedError

    def to_map(self, h: torch.Tensor) -> torch.Tensor:
        """A block's hidden states -> (B, hidden, g, g)."""
        raise NotImplementedError

    def final_map(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's hidden states -> the final module's (B, C, g, g) map."""
        raise NotImplementedError

    def frozen_extras(self) -> list[nn.Parameter]:
        """Parameters outside embed and blocks that the frozen prefix includes."""
        return []

    # -- common

    def frozen_modules(self) -> list[nn.Module]:
        k = self.cfg.freeze_blocks
        return [self.embed, *self.blocks[:k]] if k > 0 else []

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        for m in self.frozen_modules():  # frozen modules stay in eval mode whatever the parent does
            m.eval()
        return self

    def _run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        block = self.blocks[i]
        if self.cfg.grad_checkpointing and self.training and i >= self.cfg.freeze_blocks:
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) in [0, 1] -> pyramid of (B, C, g, g) maps (see class docstring)."""
        x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std  # (B, 3, S, S)
        k = self.cfg.freeze_blocks
        out = {}
        with torch.no_grad() if k > 0 else nullcontext():
            h = self.tokens(x)
        for i in range(len(self.blocks)):
            with torch.no_grad() if i < k else nullcontext():
                h = self._run_block(i, h)
            if i in self.cfg.feature_blocks:
                out[f"block{i}"] = self.to_map(h)
        out[self.final_name] = self.final_map(h)
        return out


_TINY_VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, patch_size=8, image_size=128,
                 initializer_range=0.02)  # tiny_config's backbone: 4 blocks of width 64 at input 128


class SamEncoder(Encoder):
    """transformers' SamVisionModel: hidden states stay on the (B, g, g, C) grid; an absolute position embedding
    (interpolated once to g x g) is added after the patch projection; the neck ends it (B, 256, g, g)."""

    weights = "facebook/sam-vit-base"
    tiny = dict(_TINY_VIT, mlp_dim=256, output_channels=32, window_size=4, global_attn_indexes=[1, 3])
    final_name = "neck"
    attn_implementations = ("sdpa", "eager", "flex")

    @staticmethod
    def transformers_classes() -> tuple[type, type]:
        from transformers import SamVisionConfig, SamVisionModel
        return SamVisionConfig, SamVisionModel

    def adopt(self, backbone: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, int]:
        c, vit = backbone.config, backbone.vision_encoder
        if self.cfg.attn_implementation == "flex" and not c.use_rel_pos:
            raise ConfigError("attn_implementation 'flex' adds SAM's relative-position bias; this backbone "
                              "has none (use_rel_pos=False): use 'sdpa'")
        from attention import SamFlexAttention, SamSdpaAttention  # here: importing transformers' SAM takes seconds
        attention = {"sdpa": SamSdpaAttention, "flex": SamFlexAttention}.get(self.cfg.attn_implementation)
        if attention is not None:
            for layer in vit.layers:  # a subclass with the same parameters: only forward changes
                layer.attn.__class__ = attention
        if vit.pos_embed is not None and vit.pos_embed.shape[1] != self.grid:
            # absolute position embedding: interpolated once here; the relative position tables of the global
            # blocks are interpolated by transformers at every call (get_rel_pos)
            pe = vit.pos_embed.data.permute(0, 3, 1, 2)  # (1, C, G, G)
            pe = F.interpolate(pe, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
            vit.pos_embed = nn.Parameter(pe.permute(0, 2, 3, 1).contiguous())  # (1, g, g, C)
        self.pos_embed = vit.pos_embed
        return vit.patch_embed, vit.layers, vit.neck, c.output_channels

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed.projection(x).permute(0, 2, 3, 1)  # (B, g, g, C); bypasses the fixed-size check
        return h + self.pos_embed if self.pos_embed is not None else h

    def to_map(self, h: torch.Tensor) -> torch.Tensor:
        return h.permute(0, 3, 1, 2)  # (B, g, g, C) -> (B, C, g, g)

    def final_map(self, h: torch.Tensor) -> torch.Tensor:
        return self.final(h)  # (B, g, g, C) -> (B, 256, g, g)

    def frozen_extras(self) -> list[nn.Parameter]:
        return [self.pos_embed] if self.pos_embed is not None else []


class Dinov2Encoder(Encoder):
    """transformers' Dinov2Model: hidden states are (B, prefix + g*g, C) tokens, CLS (+ registers) first; the
    embeddings interpolate their position embedding at every call; a LayerNorm ends it."""

    weights = "facebook/dinov2-base"
    tiny = dict(_TINY_VIT, mlp_ratio=4)
    final_name = "norm"

    @staticmethod
    def transformers_classes() -> tuple[type, type]:
        from transformers import Dinov2Config, Dinov2Model
        return Dinov2Config, Dinov2Model

    def adopt(self, backbone: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, int]:
        c = backbone.config
        self.num_prefix = 1 + getattr(c, "num_register_tokens", 0)  # CLS (+ registers) come before patches
        backbone.embeddings.mask_token.requires_grad_(False)  # for masked pre-training only: never used here
        return backbone.embeddings, backbone.encoder.layer, backbone.layernorm, c.hidden_size

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)  # (B, prefix + g*g, C), position embedding interpolated by transformers

    def to_map(self, h: torch.Tensor) -> torch.Tensor:
        h = h[:, self.num_prefix:]  # drop CLS / register tokens
        return h.transpose(1, 2).reshape(h.shape[0], -1, self.grid, self.grid)  # (B, C, g, g)

    def final_map(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_map(self.final(h))


BACKBONES: dict[str, type[Encoder]] = {"sam": SamEncoder, "dinov2": Dinov2Encoder}  # VAEConfig.encoder -> family


def encoder_class(encoder: str) -> type[Encoder]:
    if encoder not in BACKBONES:
        raise ConfigError(f"encoder must be one of {', '.join(map(repr, BACKBONES))}, got {encoder!r}")
    return BACKBONES[encoder]
