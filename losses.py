"""Losses and image metrics for the ear-teacher VAE.

`VAELoss` is the one training objective (taming-transformers style: named weights in the constructor, `forward`
returns `(loss, logs)` with detached 0-dim tensors). The functions below it are its terms and the eval metrics
(`psnr`, `ssim` match scikit-image). Every loss term is computed in float32, also when its inputs come from a
bf16/fp16 autocast region; only the frozen VGG of `PerceptualLoss` runs under the caller's autocast.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import LOGVAR_MAX, LOGVAR_MIN
from weights import load_torchvision_weights


@dataclass
class LossConfig:
    """The training objective's settings: the one place their defaults live (train.py's loss flags and bench.py
    read them). `VAELoss(**asdict(cfg), image_size=...)` builds the loss."""
    pixel: float = 1.0  # centre-weighted L1
    kl: float = 1e-6  # KL(q(z|x) || N(0, I)), summed over latent dims
    perceptual: float = 1.5  # VGG16 feature L1
    ssim: float = 0.6  # 1 - SSIM
    edge: float = 0.3  # L1 between Sobel gradients
    contrastive: float = 0.1  # SupCon on identity labels, or NT-Xent between two augmented views without them
    dense: float = 0.0  # dense InfoNCE between the encoder's last maps of two views at known correspondences
    center_weight: float = 3.0  # pixel-loss weight at the image centre relative to the corners
    temperature: float = 0.1  # SupCon / NT-Xent temperature
    vgg_weights: str = "imagenet"  # "imagenet" (torchvision) or a path to a local VGG16 state dict


class VAELoss(nn.Module):
    """Weighted sum of reconstruction, KL, perceptual, SSIM, edge, contrastive and dense terms (see LossConfig).

    A term whose weight is 0 is not computed and does not appear in the logs; with `perceptual == 0` the VGG is
    not even built (so no weights are needed).
    """

    def __init__(
        self,
        pixel: float = LossConfig.pixel,
        kl: float = LossConfig.kl,
        perceptual: float = LossConfig.perceptual,
        ssim: float = LossConfig.ssim,
        edge: float = LossConfig.edge,
        contrastive: float = LossConfig.contrastive,
        dense: float = LossConfig.dense,
        center_weight: float = LossConfig.center_weight,
        temperature: float = LossConfig.temperature,
        image_size: int = 128,  # H == W of recon/target; sizes the centre-weight map
        vgg_weights: str = LossConfig.vgg_weights,
    ) -> None:
        super().__init__()
        self.weights = {"pixel": pixel, "kl": kl, "perceptual": perceptual, "ssim": ssim, "edge": edge,
                        "contrastive": contrastive, "dense": dense}
        for name, w in self.weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"loss weight {name}={w}: expected a finite value >= 0")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"all loss weights are 0 ({self.weights}): nothing to train on")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: expected > 0")
        self.temperature = temperature
        self.image_size = image_size
        self.register_buffer("center_map", center_weight_map(image_size, center_weight), persistent=False)
        self.perceptual_loss = PerceptualLoss(vgg_weights) if perceptual > 0 else None

    def forward(
        self, recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, views: int = 1,
        labels: Tensor | None = None, embedding: Tensor | None = None,
        dense: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """recon, target: (N, 3, H, W) in [0, 1]; mu, logvar: (N, D). The contrastive term (weight > 0) acts on
        `embedding` (N, E) when given (the model's identity embedding, EarVAE.embed), else on mu:
        - labels (N,) int64 given: SupCon (supcon) with the images of the same identity as positives (-1: unlabelled,
          a negative only); any number of views, the labels covering every row;
        - no labels, views=2: the batch holds two augmented views of the same B = N / 2 images stacked as
          [view 0; view 1], and NT-Xent (nt_xent) pairs rows i and B + i;
        - no labels, views=1: the term is skipped.
        The dense term (weight > 0) acts on `dense` = (f1, f2, p1, p2) when given: dense_nce of two views' maps at
        their points (pixels of the image_size crop); without it (validation) the term is skipped.
        Every other term uses all N images.

        Returns (total, logs): total is the 0-dim weighted sum; logs maps 'loss' and each computed term to its
        detached, unweighted 0-dim float32 value.
        """
        size = (self.image_size, self.image_size)
        if recon.shape != target.shape or recon.shape[-2:] != size:
            raise ValueError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)}: expected equal shapes "
                             f"(B, 3, {self.image_size}, {self.image_size}) (image_size={self.image_size})")
        if views not in (1, 2):
            raise ValueError(f"views={views}: expected 1 or 2")
        recon, target = recon.float(), target.float()  # (B, 3, H, W)
        w = self.weights
        terms: dict[str, Tensor] = {}
        if w["pixel"] > 0:
            terms["pixel"] = (self.center_map * (recon - target).abs()).mean()
        if w["kl"] > 0:
            terms["kl"] = kl_divergence(mu, logvar)
        if self.perceptual_loss is not None:
            terms["perceptual"] = self.perceptual_loss(recon, target)
        if w["ssim"] > 0:
            terms["ssim"] = 1.0 - ssim(recon, target).mean()
        if w["edge"] > 0:
            terms["edge"] = (sobel(recon) - sobel(target)).abs().mean()
        z = mu if embedding is None else embedding  # (N, D) or (N, E)
        if w["contrastive"] > 0 and labels is not None:
            terms["contrastive"] = supcon(z, labels, self.temperature)
        elif w["contrastive"] > 0 and views == 2:
            terms["contrastive"] = nt_xent(*z.chunk(2), self.temperature)
        if w["dense"] > 0 and dense is not None:
            terms["dense"] = dense_nce(*dense, self.image_size, self.temperature)
        if not terms:
            raise ValueError("no loss term to compute: contrastive is the only weight > 0 but there are neither labels "
                             "nor two views")
        total = sum(w[name] * value for name, value in terms.items())
        logs = {"loss": total.detach(), **{name: value.detach() for name, value in terms.items()}}
        return total, logs


class PerceptualLoss(nn.Module):
    """L1 distance between frozen VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3), averaged over the 4 layers.

    `weights="imagenet"` loads torchvision's `VGG16_Weights.IMAGENET1K_V1` (cached under $TORCH_HOME/hub/checkpoints);
    any other string is a path to a local `.pth` or `.safetensors` file holding a full torchvision vgg16 state dict
    or only its `features.*` keys. Raises `WeightsUnavailableError` if the weights cannot be loaded; it never falls
    back to random weights. The VGG stays in eval mode with frozen parameters; gradients flow to `x`.
    """

    TAPS = (3, 8, 15, 22)  # indices of relu1_2, relu2_2, relu3_3, relu4_3 in vgg16.features

    def __init__(self, weights: str = "imagenet") -> None:
        super().__init__()
        from torchvision.models import vgg  # imported here: ~1 s that the metrics alone do not need
        features = vgg.make_layers(vgg.cfgs["D"])  # vgg16.features, randomly initialised until loaded below
        _load_vgg16_features(features, weights, "the perceptual loss",
                             "pass `--perceptual-weight 0` to train without the perceptual term")
        self.vgg = features[: self.TAPS[-1] + 1].to(memory_format=torch.channels_last)
        self.vgg.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Switch this module's mode but keep the frozen VGG in eval mode."""
        super().train(mode)
        self.vgg.eval()
        return self

    def _features(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, H, W) in [0, 1] -> the 4 tapped activations, (B, C_l, H_l, W_l)."""
        h = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        feats = []
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in self.TAPS:
                feats.append(h)
        return feats

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x: (B, 3, H, W) reconstruction, y: (B, 3, H, W) target (a constant: no gradient), both in [0, 1]
        -> 0-dim float32 loss."""
        with torch.no_grad():
            fy = self._features(y)
        fx = self._features(x)
        return torch.stack([(a.float() - b.float()).abs().mean() for a, b in zip(fx, fy)]).mean()


_FIXES = (
    "Fixes: (1) while online run `python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` "
    "to fill the cache, or copy vgg16-397923af.pth into $TORCH_HOME/hub/checkpoints/; "
    "(2) pass a local VGG16 state dict (.pth or .safetensors) with `--vgg-weights PATH`; "
)


def _load_vgg16_features(features: nn.Sequential, weights: str, purpose: str, without: str) -> None:
    """Load VGG16 weights ("imagenet" or a file path) into `features` (a fresh `vgg16.features`), strictly.

    Raises WeightsUnavailableError saying what was tried for `purpose` (e.g. "the perceptual loss"), why it failed
    and how to fix it; `without` is the last fix, how the caller's user does without the VGG (e.g. "pass
    `--perceptual-weight 0` to train without the perceptual term").
    """
    from torchvision.models import vgg
    # a full vgg16 state dict or only its features.* keys; anything else is reported by the strict load
    load_torchvision_weights(features, weights, vgg.VGG16_Weights.IMAGENET1K_V1, "VGG16", purpose,
                             f"{_FIXES}(3) {without}.",
                             select=lambda state: {k.removeprefix("features."): v for k, v in state.items()
                                                   if not k.startswith("classifier.")})


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB (inf for identical images); matches
    `skimage.metrics.peak_signal_noise_ratio`. x, y: (B, C, H, W) -> (B,) float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # half/bf16 inputs are cast up
    mse = (x.to(dtype) - y.to(dtype)).square().mean(dim=(1, 2, 3))  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity per image (11x11 Gaussian window, sigma 1.5, population covariance), differentiable.

    Matches `skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)`: skimage filters with reflect padding and then crops the
    5-pixel border before averaging, which is exactly a 'valid' convolution. x, y: (B, C, H, W), H, W >= 11
    -> (B,) float32 (float64 for float64 inputs).
    """
    if x.shape != y.shape or x.dim() != 4 or min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim inputs {tuple(x.shape)}, {tuple(y.shape)}: expected equal (B, C, H, W), H, W >= 11")
    B, C, H, W = x.shape
    sigma, radius = 1.5, 5  # radius = int(truncate * sigma + 0.5) with skimage's truncate = 3.5
    dtype = torch.promote_types(x.dtype, torch.float32)  # half/bf16 inputs are cast up
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()  # (11,)
    with torch.autocast(x.device.type, enabled=False), ieee_fp32_convs():
        x, y = x.to(dtype), y.to(dtype)
        stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
        n = stack.shape[1]
        stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)  # (B, 5C, H-10, W)
        stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)  # (B, 5C, H-10, W-10)
        ux, uy, uxx, uyy, uxy = stack.chunk(5, dim=1)  # each (B, C, H-10, W-10)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        return s.mean(dim=(1, 2, 3))  # (B,): mean over channels of per-channel means (all the same size)


@contextmanager
def ieee_fp32_convs():
    """cuDNN convolutions in full fp32 inside, the caller's setting restored after. SSIM's variances are differences
    of filtered squares (E[x^2] - E[x]^2): TF32's 10-bit mantissa moves the metric by up to 0.05 per image."""
    conv = torch.backends.cudnn.conv  # torch's current per-op TF32 switch (cudnn.allow_tf32 is the legacy one)
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


def center_weight_map(size: int, center_weight: float) -> Tensor:
    """Smooth centre-weighted map: a Gaussian bump (sigma = size / 4) rescaled so that its centre value is
    `center_weight` times its corner value, then normalised to mean 1. center_weight = 1 gives all ones.
    -> (1, 1, size, size) float32."""
    if size < 1 or center_weight <= 0:
        raise ValueError(f"center_weight_map(size={size}, center_weight={center_weight}): expected size >= 1, "
                         f"center_weight > 0")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g1 = torch.exp(-0.5 * (t / (size / 4)) ** 2)
    g = g1[:, None] * g1[None, :]  # (size, size), separable bump
    span = g.max() - g.min()
    g = (g - g.min()) / span if span > 0 else torch.zeros_like(g)  # 0 at the corners, 1 at the centre
    m = 1.0 + (center_weight - 1.0) * g
    return (m / m.mean()).float().view(1, 1, size, size)


def kl_divergence(mu: Tensor, logvar: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims; float32, logvar clamped to [LOGVAR_MIN, LOGVAR_MAX]
    so extreme values stay finite. mu, logvar: (B, D) -> reduction "mean": 0-dim mean over the batch (the loss
    term), "none": (B,) one value per sample (eval's per-image KL)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")
    mu, logvar = mu.float(), logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)  # (B,)
    return kl.mean() if reduction == "mean" else kl


def sobel(x: Tensor) -> Tensor:
    """Sobel gradients with replicate padding, float32. x: (B, C, H, W) -> (B, 2C, H, W), channel 2c is the
    x-gradient (right minus left) of input channel c and 2c + 1 its y-gradient (bottom minus top)."""
    C = x.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(C, 1, 1, 1)  # (2C, 1, 3, 3)
    with torch.autocast(x.device.type, enabled=False):
        return F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="replicate"), k, groups=C)


def supcon(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (SupCon, Khosla et al. 2020, eq. 2: L^sup_out), cosine similarity, float32; the
    positives mask of HobbitLong/SupContrast's SupConLoss (contrast_mode "all": every row is an anchor).

    z: (N, D) embeddings (L2-normalised here); labels: (N,) int64. Row p is a positive of anchor i when p != i and
    labels[p] == labels[i] >= 0; every other row a != i is in the denominator. UNLABELLED rows (label -1) are
    positives of no row (not even of each other) and serve as negatives only. Per anchor with P(i) positives:

        l_i = -1 / |P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) ),  s = cosine

    and the loss is the mean of l_i over the anchors that have at least one positive. Anchors without a positive (an
    identity alone in the batch, unlabelled rows) are left out explicitly: SupContrast divides by their zero count of
    positives (NaN; later versions clamp the count to 1, which adds 0). With no positive pair in the whole batch the
    loss is exactly 0, still attached to the graph. With labels = [0..B-1, 0..B-1] for two views of B images (each
    image's only positive is its other view) this is NT-Xent (nt_xent). -> 0-dim float32.
    """
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"supcon inputs {tuple(z.shape)}, labels {tuple(labels.shape)}: expected (N, D) and (N,)")
    n = z.shape[0]
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)  # (N, D)
        labels = labels.to(z.device)
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)  # (N, N)
        positive = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) & ~self_mask  # (N, N)
        logits = (z @ z.t() / temperature).masked_fill(self_mask, float("-inf"))  # (N, N), no self-contrast
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (N, N), -inf on the diagonal
        n_pos = positive.sum(dim=1)  # (N,)
        anchor = (n_pos > 0).float()  # (N,) 1 for the anchors with at least one positive
        per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / n_pos.clamp(min=1)  # (N,), 0 without one
        # masks, not boolean indexing or an `if`: no host sync, and one graph for torch.compile and fake tensors
        return (per_anchor * anchor).sum() / anchor.sum().clamp(min=1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) between two views, for training without identity labels: supcon with each
    image's other view as its only positive and the remaining 2B - 2 rows as negatives; symmetric in (z1, z2). For
    B == 1 there are no negatives and the loss is exactly 0 (still attached to the graph). z1, z2: (B, D) -> 0-dim
    float32."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent inputs {tuple(z1.shape)}, {tuple(z2.shape)}: expected equal (B, D)")
    image = torch.arange(z1.shape[0], device=z1.device)  # (B,)
    return supcon(torch.cat([z1, z2]), torch.cat([image, image]), temperature)


def point_features(maps: Tensor, points: Tensor, size: int) -> Tensor:
    """maps (B, C, h, w) of size x size images, points (B, N, 2) (x, y) in their pixels (centres at 0.5) -> the maps'
    bilinear sample at each point, L2-normalised: (B, N, C) float32. A NaN point reads the image centre (callers
    leave it out)."""
    u = (2.0 * points.float() / size - 1.0).nan_to_num(0.0)  # (B, N, 2) grid_sample's [-1, 1], align_corners=False
    q = F.grid_sample(maps.float(), u[:, :, None], mode="bilinear", align_corners=False)  # (B, C, N, 1)
    return F.normalize(q[..., 0].transpose(1, 2), dim=-1)


def dense_nce(f1: Tensor, f2: Tensor, p1: Tensor, p2: Tensor, size: int, temperature: float) -> Tensor:
    """Dense InfoNCE between two views of the same images at known correspondences: PixContrast (Xie et al., CVPR
    2021, "Propagate Yourself", sec. 3.1), the pixel-level contrast of VADeR (Pinheiro et al., NeurIPS 2020), with
    the exact correspondences of known warps in place of a distance threshold.

    f1, f2: (B, C, h, w) feature maps of view 1 and view 2 of B images; p1, p2: (B, N, 2) the same N points of each
    image in pixels of view 1 and of view 2 ((x, y), pixel centres at 0.5 of a size x size view: data.augment_points;
    NaN where a point is outside its view). Each point's feature in view 1 (bilinear sample, L2-normalised) must pick
    the same point among the image's N points in view 2, by softmax over cosine / temperature, and the other way
    round:

        l = 1/2 mean_i [ -log softmax_j(s12_ij / t)_i - log softmax_j(s21_ij / t)_i ],  s12 = cosine(q1_i, q2_j)

    over the points valid in both views, with the image's other valid points as the only negatives (a point NaN in
    either view takes no part). With no valid point the loss is exactly 0, still attached to the graph. -> 0-dim
    float32. ValueError for other shapes."""
    if f1.dim() != 4 or f1.shape[:2] != f2.shape[:2] or p1.shape != p2.shape or p1.dim() != 3 or \
            p1.shape[0] != f1.shape[0] or p1.shape[-1] != 2:
        raise ValueError(f"dense_nce inputs {tuple(f1.shape)}, {tuple(f2.shape)}, points {tuple(p1.shape)}, "
                         f"{tuple(p2.shape)}: expected maps (B, C, h, w) and points (B, N, 2)")
    b, n = p1.shape[:2]
    with torch.autocast(f1.device.type, enabled=False):
        valid = ~(p1.isnan().any(-1) | p2.isnan().any(-1))  # (B, N)

        s = point_features(f1, p1, size) @ point_features(f2, p2, size).transpose(1, 2) / temperature  # (B, N, N)
        target = torch.arange(n, device=f1.device).repeat(b)  # (B * N,)
        # invalid points leave the denominators (a finite fill: their own rows stay finite, and are weighted 0)
        out = valid[:, None, :]  # (B, 1, N) columns
        ce = [F.cross_entropy(m.masked_fill(~out, -1e4).flatten(0, 1), target, reduction="none")
              for m in (s, s.transpose(1, 2))]  # 2 x (B * N,)
        weight = valid.flatten().float()  # (B * N,)
        return ((ce[0] + ce[1]) * weight).sum() / (2 * weight.sum().clamp(min=1))


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018), the `lpips` package's VGG version v0.1: its calibrated linear layers
    (shipped inside the package, lpips/weights/v0.1/vgg.pth) on VGG16 features loaded like `PerceptualLoss`'s.

    `weights`: where the VGG16 backbone comes from, as for PerceptualLoss: "imagenet" (torchvision's cache) or a
    local .pth/.safetensors VGG16 state dict; WeightsUnavailableError when it cannot be loaded (never random). The
    whole network is frozen and in eval mode (no dropout); `forward` runs under no_grad (an eval metric).
    """

    def __init__(self, weights: str = "imagenet") -> None:
        super().__init__()
        import warnings

        import lpips  # imported here: the package pulls in torchvision models, which training does not need
        from torchvision.models import vgg
        features = vgg.make_layers(vgg.cfgs["D"])  # vgg16.features
        _load_vgg16_features(features, weights, "LPIPS", "evaluate without `--lpips`")
        with warnings.catch_warnings():  # lpips builds its random trunk with torchvision's deprecated `pretrained`
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            self.model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        # lpips loads its linear layers with strict=False: reload them strictly so that a mismatch cannot pass
        lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        lins = torch.load(lin_path, map_location="cpu", weights_only=True)  # {"lin0.model.1.weight": ..., ...}
        self.model.lins.load_state_dict({k.removeprefix("lin"): v for k, v in lins.items()}, strict=True)
        # its trunk: slice1..slice5, each a Sequential whose children keep their vgg16.features index as name
        # ("0", "2", ..., "28"), so "slice2.5.weight" is features "5.weight"; the strict load fails on any mismatch
        net = self.model.net
        state = features.state_dict()
        net.load_state_dict({f"{name}.{k}": state[k] for name, part in net.named_children()
                             for k in part.state_dict()}, strict=True)
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Keep the network in eval mode (its linear layers hold dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (B, 3, H, W) images in [0, 1] (rescaled here to the [-1, 1] that lpips expects) -> (B,) float32
        distances; 0 for identical images, symmetric in x and y."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS inputs {tuple(x.shape)}, {tuple(y.shape)}: expected equal (B, 3, H, W)")
        with torch.autocast(x.device.type, enabled=False):
            return self.model(2 * x.float() - 1, 2 * y.float() - 1).flatten()  # (B, 1, 1, 1) -> (B,)


# -----------------------------------------------------------------------------
# distillation of the teacher into a student (issue 20)

@dataclass
class DistillConfig:
    """The distillation objective's settings, the one place their defaults live. `DistillLoss(**asdict(cfg))` builds
    the loss."""
    embed_cosine: float = 1.0  # 1 - cosine between student and teacher identity embeddings
    embed_l2: float = 0.0  # MSE between the embeddings; both are unit vectors, where MSE = (2 - 2 cos) / E repeats
                           # the cosine term at a 2/E scale: off by default
    mu_cosine: float = 1.0  # 1 - cosine between student and teacher mu (the direction of the latent)
    mu_l2: float = 1.0  # MSE between the mu (its scale as well)
    hint: float = 0.0  # FitNets hints (Romero et al. 2015): MSE between the student's regressed trunk maps and the
                       # teacher's pyramid maps (distill.py --hint-weight); off by default
    embed_rkd: float = 0.0  # RKD's distance term (Park et al. 2019) on the identity embeddings: the batch's pairwise
                            # distances, each over their mean, matched by Huber loss (distill.py --rkd-weight); off


class DistillLoss(nn.Module):
    """Feature distillation of the teacher's outputs into a student, with the field's names (torchdistill): cosine
    and L2 (mean squared error) terms on the identity embedding and on `mu`, FitNets' `hint` term on maps, and RKD's
    distance term (`embed_rkd`) on the relations between the batch's embeddings.

    A term whose weight is 0 is not computed and not logged. Every term is float32, also for bf16/fp16 inputs.
    Teacher outputs are constants: they are detached here.
    """

    def __init__(
        self,
        embed_cosine: float = DistillConfig.embed_cosine,
        embed_l2: float = DistillConfig.embed_l2,
        mu_cosine: float = DistillConfig.mu_cosine,
        mu_l2: float = DistillConfig.mu_l2,
        hint: float = DistillConfig.hint,
        embed_rkd: float = DistillConfig.embed_rkd,
    ) -> None:
        super().__init__()
        self.weights = {"embed_cosine": embed_cosine, "embed_l2": embed_l2, "mu_cosine": mu_cosine, "mu_l2": mu_l2,
                        "hint": hint, "embed_rkd": embed_rkd}
        for name, w in self.weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"distillation weight {name}={w}: expected a finite value >= 0")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"all distillation weights are 0 ({self.weights}): nothing to learn")

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """student, teacher: {"embed": (B, E), "mu": (B, D), "hints": {stride: (B, C, h, w)}}, each key needed only
        by the terms with a weight > 0. The hint term is the mean over the student's strides of the MSE between its
        regressed map and the teacher's map of the same shape (FitNets' hint; distill.hint_targets makes them). The
        embed_rkd term is rkd_distance of the two (B, E) embeddings (B >= 2).

        Returns (total, logs): total is the 0-dim weighted sum; logs maps 'loss' and each computed term to its
        detached, unweighted 0-dim float32 value. A missing key or unequal shapes -> ValueError naming them.
        """
        w = self.weights
        terms: dict[str, Tensor] = {}
        for key in ("embed", "mu"):
            if not any(w[name] > 0 for name in w if name.startswith(f"{key}_")):
                continue
            if key not in student or key not in teacher:
                whose = "student" if key not in student else "teacher"
                raise ValueError(f"distillation of {key!r}: missing from the {whose}'s outputs")
            s, t = student[key].float(), teacher[key].detach().float()  # (B, E) or (B, D)
            if s.shape != t.shape or s.dim() != 2:
                raise ValueError(f"{key}: student {tuple(s.shape)}, teacher {tuple(t.shape)}: expected equal (B, N)")
            if w[f"{key}_cosine"] > 0:
                terms[f"{key}_cosine"] = 1.0 - F.cosine_similarity(s, t, dim=1).mean()
            if w[f"{key}_l2"] > 0:
                terms[f"{key}_l2"] = F.mse_loss(s, t)
            if key == "embed" and w["embed_rkd"] > 0:
                terms["embed_rkd"] = rkd_distance(s, t)
        if w["hint"] > 0:
            if "hints" not in student or "hints" not in teacher:
                whose = "student" if "hints" not in student else "teacher"
                raise ValueError(f"the hint term: 'hints' missing from the {whose}'s outputs")
            pairs = [(s.float(), teacher["hints"][k].detach().float()) for k, s in student["hints"].items()]
            for s, t in pairs:
                if s.shape != t.shape:
                    raise ValueError(f"hint: student map {tuple(s.shape)}, teacher map {tuple(t.shape)}: expected equal")
            terms["hint"] = sum(F.mse_loss(s, t) for s, t in pairs) / len(pairs)
        total = sum(w[name] * value for name, value in terms.items())
        logs = {"loss": total.detach(), **{name: value.detach() for name, value in terms.items()}}
        return total, logs


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD's distance-wise loss (Park et al., "Relational Knowledge Distillation", CVPR 2019; the authors' code,
    lenscloth/RKD metric/loss.py RkdDistance): every pair's Euclidean distance in the batch, divided by the mean over
    the distinct pairs, student against teacher by Huber loss (smooth L1, beta 1) over the B x B matrix, diagonal
    included (zero in both). It teaches the student the teacher's geometry of the batch, not each point: who is
    near whom, at the teacher's relative scale.

    student, teacher: (B, E), B >= 2 (the teacher's is a constant). Returns a 0-dim float32 tensor. A batch whose
    teacher (or student) points all coincide -> ValueError (no scale to divide by).
    """
    if student.shape[0] < 2:
        raise ValueError(f"rkd_distance needs 2 or more embeddings in the batch, got {student.shape[0]}")
    off = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)  # (B, B) the distinct pairs

    def relative(e: Tensor) -> Tensor:
        d = torch.cdist(e.float(), e.float()).masked_fill(~off, 0)  # (B, B) Euclidean distances, 0 on the diagonal
        scale = d[off].mean()
        if not scale > 0:
            raise ValueError("rkd_distance: every embedding of the batch is the same point")
        return d / scale

    with torch.no_grad():
        t = relative(teacher.detach())
    return F.smooth_l1_loss(relative(student), t)
