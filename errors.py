"""Temporary: the project's error classes in one place (being moved here from their modules)."""
from checkpoints import CheckpointError  # noqa: F401
from data import DataError  # noqa: F401
from encoders import ConfigError, WeightsUnavailableError  # noqa: F401


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a checkpoint that cannot be written); str(e) says why."""
