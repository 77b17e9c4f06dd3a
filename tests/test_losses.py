"""Tests for losses.py: metrics against scikit-image, KL against torch.distributions, SupCon and NT-Xent against
direct references, the dense InfoNCE against a per-point loop and the augmentation's own warps, and the VAELoss /
PerceptualLoss contracts (frozen VGG, weight loading, (loss, logs))."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import skimage.filters
import skimage.metrics
import skimage.transform
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch.distributions import Normal, kl_divergence as torch_kl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import (PerceptualLoss, VAELoss, center_weight_map, dense_nce, kl_divergence, nt_xent, psnr,  # noqa: E402
                    sobel, ssim, supcon)
from errors import WeightsUnavailableError  # noqa: E402
from conftest import Hostile  # noqa: E402

TERMS = ("pixel", "kl", "perceptual", "ssim", "edge", "contrastive")


def to_nchw(images: list[np.ndarray]) -> torch.Tensor:
    """list of (H, W, C) float arrays -> (B, C, H, W) float64 tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1)


def photo_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Real photographs cropped to a square and resized to 128x128, each with a noisy and a blurred 'reconstruction'."""
    rng = np.random.default_rng(0)
    pairs = []
    for name in ("astronaut", "chelsea", "coffee"):
        img = getattr(skimage.data, name)().astype(np.float64) / 255.0
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        img = np.clip(skimage.transform.resize(img, (128, 128), anti_aliasing=True), 0, 1)
        noisy = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        blurred = skimage.filters.gaussian(img, sigma=1.0, channel_axis=-1)
        pairs += [(f"{name}-noise", img, noisy), (f"{name}-blur", img, blurred)]
    return pairs


# ---------------------------------------------------------------------------------------------- psnr / ssim

def test_psnr_and_ssim_match_skimage_per_image_on_random_images():
    rng = np.random.default_rng(0)
    a = [rng.random((128, 128, 3)) for _ in range(3)]
    b = [np.clip(x + rng.normal(0, s, x.shape), 0, 1) for x, s in zip(a, (0.02, 0.1, 0.3))]
    x, y = to_nchw(a).float(), to_nchw(b).float()
    ref_psnr = [skimage.metrics.peak_signal_noise_ratio(p, q, data_range=1) for p, q in zip(a, b)]
    ref_ssim = [skimage_ssim(p, q) for p, q in zip(a, b)]
    assert psnr(x, y).shape == ssim(x, y).shape == (3,)
    torch.testing.assert_close(psnr(x, y).double(), torch.tensor(ref_psnr, dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(ssim(x, y).double(), torch.tensor(ref_ssim, dtype=torch.float64), rtol=0, atol=1e-3)


def test_psnr_and_ssim_match_skimage_per_image_on_real_photos():
    names, a, b = zip(*photo_pairs())
    x, y = to_nchw(list(a)).float(), to_nchw(list(b)).float()
    ref_psnr = torch.tensor([skimage.metrics.peak_signal_noise_ratio(p, q, data_range=1) for p, q in zip(a, b)])
    ref_ssim = torch.tensor([skimage_ssim(p, q) for p, q in zip(a, b)])
    assert ref_ssim.min() < 0.9  # the pairs are far enough apart to test something
    torch.testing.assert_close(psnr(x, y).double(), ref_psnr.double(), rtol=0, atol=1e-3, msg=str(names))
    torch.testing.assert_close(ssim(x, y).double(), ref_ssim.double(), rtol=0, atol=1e-3, msg=str(names))


def test_ssim_convolves_without_tf32_and_restores_the_callers_setting(monkeypatch):
    """TF32 moves SSIM by up to 0.05 per image: every convolution inside ssim sees cuDNN's conv precision 'ieee',
    and the caller's 'tf32' (train.py turns TF32 on) is back after, also when ssim raises."""
    conv, conv2d = torch.backends.cudnn.conv, F.conv2d
    seen, fail = [], []

    def spy(*args, **kwargs):
        seen.append(conv.fp32_precision)
        if fail:
            raise RuntimeError("a failing convolution")
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    _, a, b = photo_pairs()[0]
    x, y = to_nchw([a]).float(), to_nchw([b]).float()
    previous, conv.fp32_precision = conv.fp32_precision, "tf32"
    try:
        value = ssim(x, y)
        assert seen == ["ieee", "ieee"] and conv.fp32_precision == "tf32"
        fail.append(True)
        with pytest.raises(RuntimeError, match="a failing convolution"):
            ssim(x, y)
        assert seen[-1] == "ieee" and conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision = previous
    assert abs(value.item() - skimage_ssim(a, b)) < 1e-3


def test_identical_images_give_ssim_one_and_psnr_inf():
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    assert torch.equal(psnr(x, x), torch.full((2,), float("inf")))


def test_ssim_gradient_matches_finite_differences():
    x = torch.rand(1, 2, 14, 13, dtype=torch.float64)
    y = torch.rand(1, 2, 14, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ssim(x, t), (y,))


def test_psnr_and_ssim_are_float32_under_bf16_autocast():
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, p = ssim(x.bfloat16(), y.bfloat16()), psnr(x.bfloat16(), y.bfloat16())
    assert s.dtype == p.dtype == torch.float32
    torch.testing.assert_close(s, ssim(x.bfloat16().float(), y.bfloat16().float()))  # no bf16 inside
    torch.testing.assert_close(p, psnr(x.bfloat16().float(), y.bfloat16().float()))


# ---------------------------------------------------------------------------------------------- kl

def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(4, 16), torch.randn(4, 16)
    ref = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(kl_divergence(mu, logvar), ref)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_kl_is_finite_with_finite_grads_for_extreme_logvar(autocast):
    mu = torch.randn(2, 8, requires_grad=True)
    logvar = torch.tensor([[1e4] * 8, [-1e4] * 8], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kl = kl_divergence(mu.bfloat16() if autocast else mu, logvar.bfloat16() if autocast else logvar)
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    kl.backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()


# ---------------------------------------------------------------------------------------------- SupCon, NT-Xent

def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR NT-Xent written out: row i's positive is its other view, the diagonal (self-similarity) excluded."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z.shape[0]
    b = n // 2
    losses = []
    for i in range(n):
        logits = torch.stack([z[i] @ z[j] / temperature for j in range(n) if j != i])
        others = [j for j in range(n) if j != i]
        positive = others.index((i + b) % n)
        losses.append(-torch.log_softmax(logits, 0)[positive])
    return torch.stack(losses).mean()


def test_nt_xent_matches_reference():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(nt_xent(z1, z2, 0.1), reference_nt_xent(z1, z2, 0.1))
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), reference_nt_xent(z1, z2, 0.5))


def test_nt_xent_is_symmetric_in_its_views():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(nt_xent(z1, z2, 0.1), nt_xent(z2, z1, 0.1))


def test_nt_xent_is_lower_for_matching_views():
    z1 = torch.randn(8, 16)
    assert nt_xent(z1, z1 + 0.01 * torch.randn(8, 16), 0.1) < nt_xent(z1, torch.randn(8, 16), 0.1)


def test_nt_xent_is_zero_with_intact_graph_for_batch_of_one():
    z1, z2 = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = nt_xent(z1, z2, 0.1)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def reference_supcon(z: torch.Tensor, labels: list[int], temperature: float) -> torch.Tensor:
    """Khosla et al. 2020, eq. 2 (L^sup_out) written out anchor by anchor: positives are the other rows with the same
    label >= 0, the denominator every other row; anchors without a positive are left out of the mean."""
    z = F.normalize(z.double(), dim=1)
    n = len(labels)
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i] and labels[i] >= 0]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / temperature) for a in range(n) if a != i)
        losses.append(-sum(torch.log(torch.exp(z[i] @ z[p] / temperature) / denominator) for p in positives)
                      / len(positives))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("labels", [
    [0, 0, 0, 1, 1, 2, 2, 2, 2],  # several positives per anchor, identities of 3, 2 and 4 images
    [0, 0, 1, 1, 1, 7],  # identity 7 alone in the batch: an anchor without positives, a negative for the others
    [3, -1, 3, -1, 5, 5, -1, 5],  # unlabelled rows: negatives only, not positives of each other
])
def test_supcon_matches_brute_force_reference(labels):
    z = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(len(labels)))
    for t in (0.1, 0.5):
        torch.testing.assert_close(supcon(z, torch.tensor(labels), t).double(), reference_supcon(z, labels, t))


def test_supcon_leaves_out_anchors_without_positives():
    z = torch.randn(5, 6, requires_grad=True)
    with_single = supcon(z, torch.tensor([0, 0, 1, 1, 9]), 0.1)  # row 4 alone: a negative, not an anchor
    assert torch.isfinite(with_single)
    with_single.backward()
    assert torch.isfinite(z.grad).all() and z.grad[4].abs().sum() > 0  # its gradient comes as a negative
    none = supcon(z, torch.tensor([0, 1, 2, -1, -1]), 0.1)  # no positive pair at all
    assert none.item() == 0.0 and none.requires_grad


def test_supcon_with_each_images_other_view_as_its_only_positive_is_nt_xent():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    image = torch.arange(6)
    torch.testing.assert_close(supcon(torch.cat([z1, z2]), torch.cat([image, image]), 0.2),
                               reference_nt_xent(z1, z2, 0.2))


# ---------------------------------------------------------------------------------------------- centre map, sobel

def test_center_weight_map_has_mean_one_centre_corner_ratio_and_symmetry():
    for size in (128, 127):
        m = center_weight_map(size, 3.0)
        assert m.shape == (1, 1, size, size)
        torch.testing.assert_close(m.mean(), torch.tensor(1.0))
        torch.testing.assert_close(m.max() / m[0, 0, 0, 0], torch.tensor(3.0))
        torch.testing.assert_close(m[0, 0, size // 2, size // 2], m.max())
        torch.testing.assert_close(m, m.flip(-1))
        torch.testing.assert_close(m, m.flip(-2))
        torch.testing.assert_close(m, m.transpose(-1, -2))


def test_center_weight_map_of_one_is_all_ones():
    torch.testing.assert_close(center_weight_map(64, 1.0), torch.ones(1, 1, 64, 64))


def test_sobel_of_constant_is_zero():
    out = sobel(torch.full((2, 3, 16, 16), 0.7))
    assert out.shape == (2, 6, 16, 16)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)


def test_sobel_of_horizontal_ramp_is_x_gradient_only():
    ramp = torch.arange(16.0).expand(1, 1, 16, 16) / 16  # increases to the right
    out = sobel(torch.cat([ramp, 2 * ramp], dim=1))  # (1, 4, 16, 16): gx, gy per channel
    interior = out[..., 1:-1, 1:-1]
    torch.testing.assert_close(interior[:, 0], torch.full((1, 14, 14), 8 / 16))  # (1+2+1) * 2 steps of 1/16
    torch.testing.assert_close(interior[:, 2], torch.full((1, 14, 14), 16 / 16))
    assert out[:, 1].abs().max() == 0  # no y-gradient
    assert out[:, 3].abs().max() == 0


# ---------------------------------------------------------------------------------------------- PerceptualLoss

def test_perceptual_loss_loads_full_vgg16_state_dict_and_matches_reference_features(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.vgg16().eval()
    path = tmp_path / "vgg16_full.pth"
    torch.save(ref.state_dict(), path)
    loss_fn = PerceptualLoss(str(path))
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)

    def taps(img):
        h = (img - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        out = []
        for i in range(23):
            h = ref.features[i](h)
            if i in (3, 8, 15, 22):  # relu1_2, relu2_2, relu3_3, relu4_3
                out.append(h.clone())
        return out

    with torch.no_grad():
        expected = torch.stack([(a - b).abs().mean() for a, b in zip(taps(x), taps(y))]).mean()
    torch.testing.assert_close(loss_fn(x, y), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_perceptual_loss_uses_exactly_the_weights_in_the_file(vgg_file, tmp_path, fmt):
    state = torch.load(vgg_file, weights_only=True)
    path = vgg_file
    if fmt == "safetensors":
        path = tmp_path / "vgg16_features.safetensors"
        save_file(state, path)
    vgg = PerceptualLoss(str(path)).vgg
    assert len(vgg) == 23
    for k, v in vgg.state_dict().items():
        torch.testing.assert_close(v, state[f"features.{k}"], rtol=0, atol=0)


def test_perceptual_vgg_is_frozen_and_stays_in_eval_mode(vgg_file):
    loss = VAELoss(vgg_weights=str(vgg_file))
    loss.train()
    assert loss.training and loss.perceptual_loss.training
    assert not loss.perceptual_loss.vgg.training
    assert not any(m.training for m in loss.perceptual_loss.vgg.modules())
    assert all(not p.requires_grad for p in loss.perceptual_loss.parameters())
    assert set(dict(loss.named_buffers())) >= {"center_map", "perceptual_loss.mean", "perceptual_loss.std"}
    assert not any(k.endswith(("center_map", ".mean", ".std")) for k in loss.state_dict())  # non-persistent


def test_perceptual_gradient_reaches_input_but_not_vgg(vgg_file):
    loss_fn = PerceptualLoss(str(vgg_file))
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss_fn(x, torch.rand(1, 3, 32, 32)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())


def test_imagenet_weights_offline_raise_actionable_error(offline_torch_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        PerceptualLoss("imagenet")
    message = str(info.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(offline_torch_hub / "hub" / "checkpoints") in message
    assert "URLError" in message and "Temporary failure in name resolution" in message
    assert "--vgg-weights" in message and "--perceptual-weight 0" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_missing_weights_file_raises_naming_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsUnavailableError, match="nope.pth") as info:
        PerceptualLoss(str(path))
    assert "--perceptual-weight 0" in str(info.value)


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "text.pth", "empty.pth"])
def test_garbage_weights_file_raises_naming_the_path(tmp_path, name):
    path = tmp_path / name
    content = {"text.pth": b"not a checkpoint\n", "empty.pth": b""}
    path.write_bytes(content.get(name, np.random.default_rng(0).bytes(4096)))
    with pytest.raises(WeightsUnavailableError, match=name) as info:
        PerceptualLoss(str(path))
    if name != "garbage.safetensors":  # the .pth files are told apart from torch.save's zip by their first bytes
        assert "not a PyTorch file" in str(info.value)
    assert "weights_only" not in str(info.value)


def test_weights_file_with_python_objects_is_refused_without_running_them(tmp_path):
    path = tmp_path / "hostile.pth"
    torch.save({"features.0.weight": Hostile(tmp_path / "MARKER")}, path)
    with pytest.raises(WeightsUnavailableError, match="hostile.pth") as info:
        PerceptualLoss(str(path))
    assert "refused: the file holds Python objects" in str(info.value)
    assert "weights_only" not in str(info.value) and len(str(info.value)) < 700
    assert not (tmp_path / "MARKER").exists()


def test_wrong_state_dict_raises_naming_the_path(tmp_path):
    path = tmp_path / "vgg11.pth"
    torch.save(torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"]).state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="vgg11.pth"):
        PerceptualLoss(str(path))


# ---------------------------------------------------------------------------------------------- VAELoss

def vae_inputs(batch: int = 2, dim: int = 16, size: int = 128):
    """A two-view batch as train.py builds it: [view 0; view 1] of `batch` images stacked (N = 2 * batch)."""
    torch.manual_seed(0)
    target = torch.rand(2 * batch, 3, size, size)
    recon = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    mu0 = torch.randn(batch, dim)
    mu = torch.cat([mu0, mu0 + 0.1 * torch.randn(batch, dim)]).requires_grad_(True)
    logvar = torch.randn(2 * batch, dim, requires_grad=True)
    return recon, target, mu, logvar


def test_vae_loss_all_terms_finite_with_grads_to_recon_and_mu(vgg_file):
    recon, target, mu, logvar = vae_inputs()
    total, logs = VAELoss(vgg_weights=str(vgg_file))(recon, target, mu, logvar, views=2)
    assert set(logs) == {"loss", *TERMS}
    assert all(torch.isfinite(v) for v in logs.values())
    total.backward()
    for t in (recon, mu, logvar):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert (mu.grad[:2].abs().sum(1) > 0).all() and (mu.grad[2:].abs().sum(1) > 0).all()  # both views


def test_vae_loss_logs_are_detached_0dim_and_total_is_weighted_sum(vgg_file):
    weights = dict(pixel=1.0, kl=1e-3, perceptual=1.5, ssim=0.6, edge=0.3, contrastive=0.1)
    recon, target, mu, logvar = vae_inputs()
    total, logs = VAELoss(**weights, vgg_weights=str(vgg_file))(recon, target, mu, logvar, views=2)
    assert all(v.dim() == 0 and not v.requires_grad and v.grad_fn is None for v in logs.values())
    assert total.dim() == 0 and total.requires_grad
    torch.testing.assert_close(total.detach(), sum(weights[k] * logs[k] for k in TERMS))
    torch.testing.assert_close(logs["loss"], total.detach())


def test_vae_loss_terms_match_their_references():
    recon, target, mu, logvar = vae_inputs()
    _, logs = VAELoss(perceptual=0, center_weight=1.0)(recon, target, mu, logvar, views=2)
    torch.testing.assert_close(logs["pixel"], F.l1_loss(recon, target).detach())
    kl = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(logs["kl"], kl.detach())
    a, b = (t.detach().permute(0, 2, 3, 1).double().numpy() for t in (recon, target))
    ref_ssim = np.mean([skimage_ssim(p, q) for p, q in zip(a, b)])
    assert abs(logs["ssim"].item() - (1 - ref_ssim)) < 1e-4
    # Sobel: scipy's (unnormalised [1, 2, 1] x [-1, 0, 1], 'nearest' = replicate border) per channel and direction
    grads = [[scipy.ndimage.sobel(img, axis=axis, mode="nearest") for img in t.reshape(-1, 128, 128) for axis in (1, 0)]
             for t in (recon.detach().double().numpy(), target.double().numpy())]
    assert abs(logs["edge"].item() - np.mean(np.abs(np.stack(grads[0]) - np.stack(grads[1])))) < 1e-5
    torch.testing.assert_close(logs["contrastive"], reference_nt_xent(mu[:2], mu[2:], 0.1).detach())


def test_vae_loss_center_weight_emphasises_central_errors():
    target = torch.zeros(1, 3, 128, 128)
    centre, corner = target.clone(), target.clone()
    centre[..., 60:68, 60:68] = 1
    corner[..., :8, :8] = 1
    loss = VAELoss(kl=0, perceptual=0, ssim=0, edge=0, contrastive=0, center_weight=3.0)
    mu = logvar = torch.zeros(1, 4)
    ratio = loss(centre, target, mu, logvar)[1]["pixel"] / loss(corner, target, mu, logvar)[1]["pixel"]
    assert 2.5 < ratio < 3.0


@pytest.mark.parametrize("term", TERMS)
def test_vae_loss_zero_weight_term_is_absent(term):
    recon, target, mu, logvar = vae_inputs()
    # vgg_weights points nowhere: building PerceptualLoss would raise, so perceptual=0 must not build it
    weights = {"perceptual": 0.0, term: 0.0}
    loss = VAELoss(**weights, vgg_weights="/nonexistent/vgg16.pth")
    assert loss.perceptual_loss is None
    total, logs = loss(recon, target, mu, logvar, views=2 if term != "contrastive" else 1)
    assert term not in logs and "perceptual" not in logs
    assert set(logs) == {"loss", *(t for t in TERMS if t not in weights)}
    total.backward()


def test_vae_loss_skips_contrastive_without_second_view():
    recon, target, mu, logvar = vae_inputs()
    _, logs = VAELoss(perceptual=0)(recon, target, mu, logvar)
    assert "contrastive" not in logs and "kl" in logs
    with pytest.raises(ValueError, match="views=3"):
        VAELoss(perceptual=0)(recon, target, mu, logvar, views=3)


def test_vae_loss_is_float32_and_finite_under_bf16_autocast(vgg_file):
    recon, target, mu, logvar = vae_inputs(batch=2, size=64)
    loss = VAELoss(image_size=64, vgg_weights=str(vgg_file))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, logs = loss(recon.bfloat16(), target, mu.bfloat16(), logvar.bfloat16() * 1e4, views=2)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    assert all(torch.isfinite(v) for v in logs.values())
    total.backward()
    assert torch.isfinite(recon.grad).all() and torch.isfinite(mu.grad).all()


def test_vae_loss_rejects_wrong_image_size_and_bad_weights():
    recon, target, mu, logvar = vae_inputs(size=64)
    with pytest.raises(ValueError, match="image_size=128"):
        VAELoss(perceptual=0)(recon, target, mu, logvar)
    with pytest.raises(ValueError, match="kl=-1"):
        VAELoss(perceptual=0, kl=-1)


# -- dense InfoNCE (PixContrast)

def reference_dense_nce(f1, f2, cells1, cells2, valid, t):
    """Per image, per valid point, in float64: the features read at the points' cells, cross-entropy both ways."""
    total, count = 0.0, 0
    for b in range(f1.shape[0]):
        idx = [i for i in range(len(valid[b])) if valid[b][i]]
        q1 = F.normalize(torch.stack([f1[b, :, r, c] for r, c in cells1[b]]).double(), dim=1)[idx]
        q2 = F.normalize(torch.stack([f2[b, :, r, c] for r, c in cells2[b]]).double(), dim=1)[idx]
        s = q1 @ q2.t() / t  # (n, n)
        for i in range(len(idx)):
            total += -(torch.log_softmax(s[i], 0)[i] + torch.log_softmax(s[:, i], 0)[i]).item() / 2
            count += 1
    return total / max(count, 1)


def cell_points(cells, size, g):
    """(row, col) cells of a g x g map -> their centres in pixels (x, y) of a size x size image."""
    return torch.tensor([[[(c + 0.5) * size / g, (r + 0.5) * size / g] for r, c in img] for img in cells])


def test_dense_nce_matches_a_per_point_reference_and_leaves_nan_points_out():
    """At cell centres the bilinear sample is the cell's feature: the loss equals a loop over images and points;
    a point NaN in either view is neither an anchor nor a negative (the loss is the one without it)."""
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    cells1 = [[(0, 0), (1, 2), (3, 3), (2, 1), (0, 3)], [(3, 0), (1, 1), (2, 2), (0, 1), (1, 3)]]
    cells2 = [[(1, 1), (0, 2), (3, 0), (2, 3), (1, 0)], [(0, 0), (3, 3), (2, 1), (1, 2), (3, 1)]]
    p1, p2 = cell_points(cells1, 32, 4), cell_points(cells2, 32, 4)
    p1[0, 2, 0] = float("nan")  # image 0's point 2 outside view 1, image 1's point 4 outside view 2
    p2[1, 4] = float("nan")
    valid = [[True, True, False, True, True], [True, True, True, True, False]]
    for t in (0.1, 0.5):
        got = dense_nce(f1, f2, p1, p2, 32, t)
        assert got.item() == pytest.approx(reference_dense_nce(f1, f2, cells1, cells2, valid, t), rel=1e-5)
    keep = [[0, 1, 3, 4], [0, 1, 2, 3]]  # the same points without the NaN ones: each image keeps 4
    torch.testing.assert_close(dense_nce(f1, f2, torch.stack([p1[b, k] for b, k in enumerate(keep)]),
                                         torch.stack([p2[b, k] for b, k in enumerate(keep)]), 32, 0.1),
                               dense_nce(f1, f2, p1, p2, 32, 0.1))


def test_dense_nce_finds_points_through_the_augmentations_warp():
    """Maps that move with the pixels (a random feature image through augment's own warp, centred so that cosines
    tell points apart) score far below chance (log N) at the points augment_points gives, and far above it at the
    unmoved points or with the two views' points swapped: the term's correspondences are the augmentation's."""
    from data import AugConfig, augment, augment_points
    from train import DENSE_AUG
    g = torch.Generator().manual_seed(0)
    feats = F.avg_pool2d(torch.rand(2, 3, 64, 64, generator=g), 3, 1, 1)  # (B, 3, 64, 64), a smooth random image
    keys = torch.tensor([3, 11])
    view = lambda cfg, v: augment(feats, keys, 0, 0, replace(cfg, brightness=0, contrast=0, saturation=0, hue=0),
                                  v) - 0.5  # noqa: E731
    f1, f2 = view(AugConfig(), 0), view(DENSE_AUG, 1)
    centres = (torch.arange(8) + 0.5) * 8
    points = torch.cartesian_prod(centres, centres)[None].expand(2, -1, -1)  # (2, 64, 2)
    p1, p2 = augment_points(points, 64, keys, 0, 0, AugConfig()), augment_points(points, 64, keys, 0, 0, DENSE_AUG, 1)
    assert p2.isnan().any() and not p2.isnan().all()  # the strong warp moves some points out of the view
    moved, unmoved = dense_nce(f1, f2, p1, p2, 64, 0.1), dense_nce(f1, f2, points, points, 64, 0.1)
    assert moved < 0.5 * np.log(64) and unmoved > np.log(64) and dense_nce(f1, f2, p2, p1, 64, 0.1) > np.log(64)


def test_dense_nce_without_a_valid_point_is_zero_with_its_graph_and_bad_shapes_are_refused():
    f = torch.randn(1, 4, 4, 4, requires_grad=True)
    p = torch.full((1, 3, 2), float("nan"))
    loss = dense_nce(f, f, p, p, 32, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert f.grad is not None and not f.grad.any()
    with pytest.raises(ValueError, match="expected maps"):
        dense_nce(f, f, p[0], p[0], 32, 0.1)


def test_vae_loss_adds_the_dense_term_only_when_given_its_maps():
    crit = VAELoss(perceptual=0, dense=0.5)
    x, mu = torch.rand(2, 3, 128, 128), torch.randn(2, 8)
    f = torch.randn(2, 4, 16, 16)
    p = torch.rand(2, 5, 2) * 128
    _, logs = crit(x, x, mu, torch.zeros_like(mu))
    assert "dense" not in logs  # validation: no second view
    total, logs = crit(x, x, mu, torch.zeros_like(mu), dense=(f, f.flip(-1), p, p))
    torch.testing.assert_close(logs["dense"], dense_nce(f, f.flip(-1), p, p, 128, 0.1))
    torch.testing.assert_close(total, sum(w * logs[k] for k, w in crit.weights.items() if k in logs))
