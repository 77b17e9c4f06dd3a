"""SAM-encoder VAE for 128x128 ear crops.

    x (B, 3, 128, 128) in [0, 1]
      -> Encoder: resize to input_size, normalise, ViT (SAM ViT-B or DINOv2) -> pyramid of feature maps
      -> VAEHead: fuse the pyramid -> mu, logvar (B, latent_dim)
      -> z = mu + sigma * eps (training) or mu (eval)
      -> Decoder: z -> recon (B, 3, 128, 128) in [0, 1]   (no skip connections: the latent carries the whole image)

The backbones come from transformers (`SamVisionModel`, `Dinov2Model`); this file drives their blocks one by one so
that the frozen prefix runs under `torch.no_grad()` (no activations kept) and the hidden states of chosen blocks
can be returned as a multi-scale pyramid for students to distil from.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.utils.checkpoint import checkpoint
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention

from files import write_outputs

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # exp() of either end is finite in fp16 and fp32
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM and DINOv2 both normalise with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded. The message says what was tried and how to fix it."""


class ConfigError(ValueError):
    """A model configuration that cannot be built (a user's flag out of range); str(e) names the value."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit its model. str(e) names the file."""


# -----------------------------------------------------------------------------
# config

@dataclass
class VAEConfig:
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
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64, 32)  # per stage, 8x8 -> 16 -> 32 -> 64 -> 128
    image_size: int = 128                     # ear crop side, input and output
    attn_implementation: str = "sdpa"         # "sdpa" (fused kernels), "eager" (the original's) or "flex" (SAM only:
                                              # relative-position bias inside a FlexAttention kernel; CUDA to train)
    grad_checkpointing: bool = False          # recompute trainable blocks in backward: big batches in little memory


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
# backbones

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
    try:
        model, info = model_cls.from_pretrained(cfg.weights, attn_implementation=attn,
                                                use_safetensors=True, output_loading_info=True)
    except OSError as e:
        where = "local directory" if Path(cfg.weights).exists() else "Hugging Face hub id (online or cached)"
        reason = str(e).strip().splitlines()[0]
        raise WeightsUnavailableError(
            f"could not load {cfg.encoder} weights from {cfg.weights!r} ({where}, safetensors): {reason}. "
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


FLEX_RECOMPILE_LIMIT = 2  # compiles per call class: one with a dynamic batch, one more for a batch of 1
_compiled_flex: dict[tuple, Callable] = {}  # call class -> its own compiled flex_attention


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable,
                   score_tensors: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """torch's flex_attention: compiled on CUDA (a fused kernel, as transformers does it; compiled_flex_attention).
    Elsewhere uncompiled, i.e. torch's reference implementation, which materialises the scores: torch 2.14's
    compiled CPU kernel returned NaN or wrong values, or failed to build, once the shapes changed between calls
    (window and global blocks). q, k, v (B, heads, N, d); score_tensors: the tensors score_mod indexes by batch."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if not q.is_cuda or torch.compiler.is_compiling():  # inside --compile, inductor fuses it anyway
        return flex(q, k, v, score_mod=score_mod)
    return compiled_flex_attention(q, k, v, score_mod, score_tensors)


def compiled_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable,
                            score_tensors: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """flex_attention through one torch.compile per call class: everything dynamo guards on except the batch size
    (shapes after dim 0, dtype, device, grad mode, autocast). Dim 0 is marked dynamic, so a class compiles once
    (twice if it meets a batch of 1, which dynamo specialises): SAM ViT-B has 2 shape classes (window and global
    blocks) x grad / no-grad. Past dynamo's recompile limit a compiled function silently runs eager, which here
    materialises the (B, heads, N, N) scores; each class has its own limit (isolate_recompiles) and fullgraph=True
    makes hitting it raise instead."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    tensors = (q, k, v, *score_tensors)
    key = (q.device, q.dtype, torch.is_grad_enabled(), q.requires_grad, torch.is_autocast_enabled(q.device.type),
           *(tuple(t.shape[1:]) for t in tensors))
    if key not in _compiled_flex:
        _compiled_flex[key] = torch.compile(flex, fullgraph=True, recompile_limit=FLEX_RECOMPILE_LIMIT,
                                            isolate_recompiles=True)
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)  # the batch (x windows); left static where it is 1
    try:
        return _compiled_flex[key](q, k, v, score_mod=score_mod)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise RuntimeError(f"flex attention needed more than {FLEX_RECOMPILE_LIMIT} compiles for one call class "
                           f"{key} (see dynamo's 'last reason' above); running it eagerly instead would materialise "
                           f"the attention scores. Use attn_implementation 'sdpa' to go on") from e


class SamSdpaAttention(SamVisionSdpaAttention):
    """transformers' SAM SDPA attention (same parameters, same state-dict keys) whose dense relative-position mask
    (B * heads, H, W, H, W) is written once. transformers' einsums return the two small factors with permuted
    strides, so their broadcast sum comes out permuted too and the reshape to SDPA's (B, heads, N, N) mask copies
    it: two masks alive at once (SAM ViT-B at 1024, batch 4: 2 x 3 GiB per global block). Contiguous factors make
    the sum contiguous and the reshape a view."""

    def get_decomposed_rel_pos(self, query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                               q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
        (qh, qw), (kh, kw) = q_size, k_size
        rel_pos_h = self.get_rel_pos(qh, kh, rel_pos_h)  # (qh, kh, d)
        rel_pos_w = self.get_rel_pos(qw, kw, rel_pos_w)  # (qw, kw, d)
        q = query.reshape(query.shape[0], qh, qw, -1)  # (B * heads, qh, qw, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", q, rel_pos_h).contiguous()  # (B * heads, qh, qw, kh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", q, rel_pos_w).contiguous()  # (B * heads, qh, qw, kw)
        return rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B * heads, qh, qw, kh, kw), contiguous


class SamFlexAttention(SamVisionAttention):
    """transformers' SAM attention (same parameters, same state-dict keys) with the decomposed relative-position
    bias added to the scores inside a FlexAttention kernel (a score_mod) instead of SDPA's dense (B, heads, N, N)
    mask: the bias costs O(N * (H + W)) memory instead of O(N^2), and the kernel tiles like flash attention.
    PyTorch's FlexAttention has no backward on CPU: training with it needs CUDA; inference runs anywhere (on CPU
    without the fused kernel, see flex_attention)."""

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, None]:
        B, H, W, _ = hidden_states.shape  # (B, H, W, C): a window (B = batch x windows) or the whole grid
        heads = self.num_attention_heads
        qkv = self.qkv(hidden_states).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        # the two factors of the bias, as in transformers' get_decomposed_rel_pos (unscaled query)
        rel_pos_h = self.get_rel_pos(H, H, self.rel_pos_h)  # (H, H, d)
        rel_pos_w = self.get_rel_pos(W, W, self.rel_pos_w)  # (W, W, d)
        q_grid = q.reshape(B, heads, H, W, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_pos_h).reshape(B, heads, H * W, H)  # (B, heads, N, H)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_pos_w).reshape(B, heads, H * W, W)  # (B, heads, N, W)

        def score_mod(score, b, h, q_idx, kv_idx):  # key kv_idx sits at row kv_idx // W, column kv_idx % W
            return score + rel_h[b, h, q_idx, kv_idx // W] + rel_w[b, h, q_idx, kv_idx % W]

        out = flex_attention(q, k, v, score_mod, (rel_h, rel_w))  # (B, heads, N, d); SAM's attention dropout is 0
        out = out.transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(out), None


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


class EarVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, encoder: Encoder):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = VAEHead(encoder.feature_channels, cfg.fuse_channels, cfg.head_pool, cfg.latent_dim)
        self.decoder = Decoder(cfg.latent_dim, cfg.decoder_channels, cfg.image_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, 128, 128) in [0, 1] -> mu, logvar (B, latent_dim)."""
        return self.head(self.encoder.features(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> (B, 3, 128, 128) in [0, 1]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, 3, 128, 128) -> {"recon": (B, 3, 128, 128), "mu", "logvar", "z": (B, latent_dim)}. In training
        z = mu + sigma * eps, with eps (B, latent_dim) given (train.py keys it by sample) or drawn here."""
        mu, logvar = self.encode(x)
        if self.training:
            eps = torch.randn_like(mu) if eps is None else eps.to(mu)
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: {"encoder": the trainable ViT blocks + neck, "vae": head + decoder}."""
        return {"encoder": [p for p in self.encoder.parameters() if p.requires_grad],
                "vae": [p for m in (self.head, self.decoder) for p in m.parameters()]}


def build_model(cfg: VAEConfig) -> EarVAE:
    """Build from a config (pretrained backbone when cfg.pretrained). The returned model's cfg has encoder_config
    filled in, so the checkpoints it writes rebuild without the network."""
    backbone = load_backbone(cfg)
    cfg = replace(cfg, encoder_config=backbone.config.to_diff_dict())
    return EarVAE(cfg, encoder_class(cfg.encoder)(cfg, backbone))


# -----------------------------------------------------------------------------
# checkpoints (written by train.py) and exported models (written by export_model)

EXPORT_FORMAT = "ear-teacher-vae/1"  # config.json's "format": what wrote the directory, and which layout
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD = "config.json", "model.safetensors", "README.md"


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A train.py checkpoint file: torch.load with weights_only=True (a pickle in the file cannot run code), never
    retried without it. A directory is read as an export_model directory (read_export: no pickle at all).
    Any problem -> CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        return read_export(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a Python object it will not build
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = f"it asks to run {what.group(1)}" if what else "it holds Python objects, not only tensors"
        raise CheckpointError(f"{path}: refused: {detail} (a pickle can run code); only train.py checkpoints "
                              f"load") from e
    except Exception as e:  # anything else the parser raises on a damaged file (EOFError, IndexError, ...)
        reason = " ".join(str(e).split())[:160] or "no detail"
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not an ear-teacher checkpoint (expected keys 'model' and 'model_config')")
    return ckpt


def read_export(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """An export_model directory as a checkpoint-like dict, the keys load_model and eval's checkpoint_info read:
    {"model": state dict, "model_config": dict, "step": int | None, "weights": "ema" | "model"}. It has no
    "run_config" (an export does not name the training data). JSON and safetensors only: nothing is unpickled.
    A missing file, bad JSON, another format or a config that does not fit VAEConfig -> CheckpointError naming
    the file."""
    path = Path(path)
    config_path, weights_path = path / EXPORT_CONFIG, path / EXPORT_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing: an exported model directory holds {EXPORT_CONFIG} and "
                                  f"{EXPORT_WEIGHTS} (written by model.export_model)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path}: format {found!r}, expected {EXPORT_FORMAT!r} (written by "
                              f"model.export_model)")
    problem = _model_config_problem(config.get("model_config"))
    if problem:
        raise CheckpointError(f"{config_path}: model_config {problem}")
    step = config.get("step")
    if not (step is None or type(step) is int) or config.get("weights") not in ("ema", "model"):
        raise CheckpointError(f"{config_path}: step {step!r} / weights {config.get('weights')!r}: expected an "
                              f"integer or null / 'ema' or 'model'")
    try:
        state = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})") from e
    return {"model": state, "model_config": config["model_config"], "step": step, "weights": config["weights"]}


def _model_config_problem(d: object) -> str | None:
    """What is wrong with a JSON model config (missing fields take VAEConfig's defaults, as for a checkpoint),
    or None. Types follow the defaults: tuples are JSON lists of integers, encoder_config a dict or null."""
    if not isinstance(d, dict):
        return f"is a {type(d).__name__}, expected an object"
    defaults = {f.name: f.default for f in fields(VAEConfig)}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        return f"has unknown fields {unknown}"
    for name, value in d.items():
        default = defaults[name]
        if name == "encoder_config":
            ok = value is None or isinstance(value, dict)
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(type(v) is int for v in value)
        else:
            ok = type(value) is type(default)  # exact: a bool is not an int here
        if not ok:
            return f"field {name}={value!r}: expected a value like {default!r}"
    return None


def config_from_checkpoint(ckpt: dict) -> VAEConfig:
    d = dict(ckpt["model_config"])
    for k in ("feature_blocks", "decoder_channels"):
        d[k] = tuple(d[k])
    return replace(VAEConfig(**d), pretrained=False)  # the weights come from the checkpoint, not the hub


def load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """Strict load: a checkpoint of another configuration fails loudly instead of loading half."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(lines[1:3])[:300]})") from e


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               ckpt: dict | None = None) -> tuple[EarVAE, VAEConfig]:
    """Rebuild a trained model from a train.py checkpoint alone (config inside; EMA weights when the run kept
    them), or from an export_model directory (its weights, no pickle). `ckpt`: read_checkpoint(path)'s result
    when the caller has read it already, so it is not read twice."""
    if ckpt is None:
        ckpt = read_checkpoint(path, map_location)
    exported = Path(path).is_dir()
    try:
        model = build_model(config_from_checkpoint(ckpt))
    except (ValueError, TypeError) as e:  # ConfigError and what transformers' config classes raise
        where = Path(path) / EXPORT_CONFIG if exported else path
        raise CheckpointError(f"{where}: its model config cannot be built ({type(e).__name__}: {e})") from e
    load_state(model, ckpt.get("ema") or ckpt["model"], Path(path) / EXPORT_WEIGHTS if exported else path)
    return model.to(map_location).eval(), model.cfg


def export_model(model_or_ckpt: EarVAE | str | Path, out_dir: str | Path,
                 metrics: dict[str, float | int | str] | None = None) -> list[Path]:
    """Write a trained model for others to use, in the Hugging Face layout (no pickle):

        out_dir/config.json        {"format": EXPORT_FORMAT, "model_config": VAEConfig (encoder_config included),
                                    "step": training step or null, "weights": "ema" or "model"}
        out_dir/model.safetensors  the weights to use: the EMA weights when the checkpoint has them
        out_dir/README.md          a short model card: what it is, the config, `metrics` when given, how to load

    model_or_ckpt: a model (its current weights; step unknown), or the path of a train.py checkpoint or of another
    export. The three files are written together (files.write_outputs): a failure leaves out_dir as it was.
    load_model(out_dir) rebuilds the model. -> the written paths."""
    step, source = None, "model"
    if isinstance(model_or_ckpt, EarVAE):
        model = model_or_ckpt
    elif isinstance(model_or_ckpt, (str, Path)):
        ckpt = read_checkpoint(model_or_ckpt)
        step, source = ckpt.get("step"), ckpt.get("weights") or ("ema" if ckpt.get("ema") else "model")
        model, _ = load_model(model_or_ckpt, "cpu", ckpt)  # strict: only weights that fit their config leave
        del ckpt
    else:
        raise TypeError(f"export_model: got a {type(model_or_ckpt).__name__}, expected an EarVAE or a checkpoint path")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {"format": EXPORT_FORMAT, "model_config": asdict(model.cfg), "step": step, "weights": source}
    out = Path(out_dir)
    files = {out / EXPORT_CONFIG: lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()),
             out / EXPORT_WEIGHTS: lambda f: f.write(save(tensors, metadata={"format": "pt"})),
             out / EXPORT_CARD: lambda f: f.write(model_card(model, step, source, metrics).encode())}
    write_outputs(files)
    return list(files)


def model_card(model: EarVAE, step: int | None, weights: str, metrics: dict | None) -> str:
    """README.md of an export: a few lines on what the model is, its config, metrics and how to load it."""
    cfg, enc = model.cfg, model.cfg.encoder_config or {}
    total, _ = count(model)
    backbone = {"sam": "SAM ViT", "dinov2": "DINOv2 ViT"}[cfg.encoder]
    start = f"initialised from `{cfg.weights}`" if cfg.pretrained else "trained from a random initialisation"
    what = "the exponential moving average (EMA) of the training weights" if weights == "ema" else "the training weights"
    lines = [
        "# Ear-teacher VAE", "",
        f"A variational autoencoder for {cfg.image_size}x{cfg.image_size} RGB ear crops in [0, 1]: a {backbone} "
        f"encoder ({enc.get('num_hidden_layers', '?')} blocks of width {enc.get('hidden_size', '?')}, input "
        f"{cfg.input_size}x{cfg.input_size}, {start}), a VAE head to a {cfg.latent_dim}-d latent and a "
        f"convolutional decoder. The posterior mean `mu` is the ear embedding a student distils from; "
        f"`model.encoder.features(x)` returns the multi-scale pyramid (blocks {list(cfg.feature_blocks)}).", "",
        f"Weights: {what} at {f'step {step}' if step is not None else 'an unknown step'}; "
        f"{total / 1e6:.1f}M parameters.", "",
        "## Config", "", "| field | value |", "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in asdict(cfg).items() if k != "encoder_config"],
        f"| encoder_config | see `{EXPORT_CONFIG}` |", "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
                  ""]
    lines += ["## Load", "", "With this repository's `model.py` (JSON and safetensors only, nothing is unpickled):", "",
              "```python", "from model import load_model", "",
              "model, cfg = load_model(\"path/to/this/directory\")  # eval mode, CPU",
              "out = model(x)  # x: (B, 3, 128, 128) in [0, 1] -> recon (B, 3, 128, 128), mu, logvar, z (B, latent_dim)",
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

