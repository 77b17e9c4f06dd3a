"""The project's errors: each one a user can meet ends a script with one line (str(e)), never a traceback. Every
module imports them from here; this module imports nothing of the project's."""


class ConfigError(ValueError):
    """A model configuration that cannot be built (a user's flag out of range); str(e) names the value."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded. The message says what was tried and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit its model. str(e) names the file."""


class DataError(ValueError):
    """Bad data file or sample; str(e) is one line that starts with the file path and says the reason."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a checkpoint that cannot be written); str(e) says why."""


class OutputError(RuntimeError):
    """An output would replace results the user has from other inputs (files.check_replace); str(e) names them."""
