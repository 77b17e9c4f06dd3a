"""Loading torchvision weights: ImageNet through torchvision's cache, or a local state dict, strictly and never
falling back to random weights. The perceptual loss's and LPIPS's VGG16 (losses.py) and the students' trunks
(student.py) load through it."""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from errors import WeightsUnavailableError
from files import torch_file_problem

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

# Errors torch.load / safetensors raise on a missing, unreadable, truncated or non-checkpoint file
# (a pickle of random bytes can fail with KeyError, EOFError, ValueError, UnpicklingError, ...).
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, SafetensorError)


def load_torchvision_weights(module: nn.Module, weights: str, imagenet: WeightsEnum, name: str, purpose: str,
                             fixes: str, select: Callable[[dict], dict] | None = None) -> None:
    """Load weights into a torchvision network `module` (built with weights=None), strictly.

    weights: "imagenet" is `imagenet` (a torchvision WeightsEnum member, e.g. VGG16_Weights.IMAGENET1K_V1), read
    with its get_state_dict: from $TORCH_HOME/hub/checkpoints, downloaded there once; any other string is a path to a
    local `.safetensors` or `.pth` (torch.load weights_only: no pickle runs) state dict. `select` maps the file's
    state dict to the module's keys (default: as it is). Raises WeightsUnavailableError, one line: "Could not load
    {name} weights for {purpose}: tried {source}; failed with {error}. {fixes}". It never falls back to random
    weights.
    """
    if weights == "imagenet":
        source = f"torchvision {type(imagenet).__name__}.{imagenet.name} from {imagenet.url} (cache dir " \
                 f"{os.path.join(torch.hub.get_dir(), 'checkpoints')})"
    else:
        source = f"local file {weights}"
    try:
        if weights == "imagenet":
            state = imagenet.get_state_dict(progress=False)
        elif Path(weights).suffix == ".safetensors":
            state = load_file(weights)
        elif problem := torch_file_problem(weights):
            raise ValueError(problem)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"the file holds a {type(state).__name__}, expected a {name} state dict")
        module.load_state_dict(select(state) if select is not None else state)
    except _LOAD_ERRORS as e:
        message = " ".join(str(e).split()).rstrip(".")
        if isinstance(e, pickle.UnpicklingError) and weights != "imagenet":  # not torch's advice (unsafe loading)
            message = "refused: the file holds Python objects, not only tensors (a pickle can run code)"
        message = message if len(message) <= 1000 else message[:1000] + " ..."  # key lists can be long
        raise WeightsUnavailableError(
            f"Could not load {name} weights for {purpose}: tried {source}; failed with "
            f"{type(e).__name__}: {message}. {fixes}") from e
