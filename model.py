"""SAM-encoder VAE for 128x128 ear crops. (Work in progress: shared pieces first.)"""
from __future__ import annotations

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # exp() of either end is finite in fp16 and fp32


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded. The message says what was tried and how to fix it."""
