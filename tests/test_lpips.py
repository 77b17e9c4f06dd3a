"""Tests for losses.LPIPS: the `lpips` package's VGG LPIPS with its backbone loaded through losses.py's VGG16 path.
A random VGG16 `features` state dict stands in for the ImageNet weights (no network here); the reference is
lpips.LPIPS itself, built the way the package builds it, with those weights as its torchvision backbone."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path
from types import SimpleNamespace

import lpips
import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import LPIPS  # noqa: E402
from errors import WeightsUnavailableError  # noqa: E402


@pytest.fixture(scope="module")
def metric(vgg_file) -> LPIPS:
    return LPIPS(str(vgg_file))


def images(seed: int, b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_give_zero_and_different_images_a_positive_symmetric_distance(metric):
    x, y = images(0), images(1)
    assert metric(x, x).tolist() == [0.0, 0.0]
    d = metric(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32 and (d > 0).all()
    torch.testing.assert_close(metric(y, x), d)
    assert (metric(x, (x + 0.02).clamp(0, 1)) < d).all()  # a small change is closer than an unrelated image


def test_equals_lpips_package_built_with_the_same_vgg_weights(vgg_file, metric, monkeypatch):
    # The package's own route: lpips.pretrained_networks.vgg16 takes tv.vgg16(pretrained=True).features and
    # slices it; here tv.vgg16 hands it the file's weights, and the package loads its linear layers itself.
    state = torch.load(vgg_file, weights_only=True)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})

    def vgg16(pretrained):
        assert pretrained
        return SimpleNamespace(features=features)

    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", vgg16)
    reference = lpips.LPIPS(net="vgg", pnet_rand=False, verbose=False).eval()
    x, y = images(2), images(3)
    with torch.no_grad():
        expected = reference(x, y, normalize=True).flatten()  # normalize=True: inputs in [0, 1]
    torch.testing.assert_close(metric(x, y), expected, rtol=1e-5, atol=1e-7)
    for k, v in reference.state_dict().items():  # the trunk and the linear layers, tensor for tensor
        torch.testing.assert_close(metric.model.state_dict()[k], v, rtol=0, atol=0)


def test_network_is_frozen_in_eval_mode_and_returns_no_graph(metric):
    metric.train()
    assert metric.training and not any(m.training for m in metric.model.modules())
    assert all(not p.requires_grad for p in metric.parameters())
    x = images(4).requires_grad_(True)
    assert not metric(x, images(5)).requires_grad


def test_rejects_mismatched_shapes(metric):
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\), \(2, 3, 16, 16\)"):
        metric(images(0), images(1, size=16))


def test_imagenet_weights_offline_raise_actionable_error(offline_torch_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        LPIPS("imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(offline_torch_hub / "hub" / "checkpoints") in message
    assert "URLError" in message and "Temporary failure in name resolution" in message


def test_missing_weights_file_raises_naming_the_path(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="nope.pth"):
        LPIPS(str(tmp_path / "nope.pth"))
