"""What every command of the project shares on its command line and console: range-checked flag types, a console
that never fails on what it prints, and progress that suits a terminal or a log file.

    p.add_argument("--lr", type=float_range(0, lo_open=True))   # argparse refuses 0, -1, nan, inf, 'abc' in one line
    p.add_argument("--workers", type=non_negative_int)
    if __name__ == "__main__":
        safe_console()                                          # before anything is printed
    for x in progress(loader, desc="encode"):                  # a tqdm bar on a terminal, plain lines in a log
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between two progress lines in a log file (the first and the last line always come)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each flag's help, except where the help already says what the default is,
    or the default is None (a flag that is off or derived unless given): no second, contradicting default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# -----------------------------------------------------------------------------
# flag types: a value outside its range is argparse's one-line error (after the usage), exit 2

def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def int_range(lo: int | None = None, hi: int | None = None, multiple_of: int = 1) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (None: no bound) that is a multiple of `multiple_of`; anything else is an
    ArgumentTypeError naming the range, e.g. 'expected an integer >= 1, got 0'."""
    what = f"an integer {_interval(lo, hi, False, False)}"
    if multiple_of > 1:
        what += f", a multiple of {multiple_of}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi) or value % multiple_of:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the interval from lo to hi (None: no bound; *_open: the bound itself is
    excluded). NaN and infinities are refused whatever the bounds, e.g. 'expected a number > 0, got nan'."""
    what = f"a finite number {_interval(lo, hi, lo_open, hi_open)}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = int_range(1)  # counts: epochs, batch sizes, steps, images
non_negative_int = int_range(0)  # worker processes, warm-up steps, frozen blocks
seed_int = int_range(0, 2 ** 64 - 1)  # what numpy's SeedSequence and torch.manual_seed both take
fraction = float_range(0, 1)  # a share of something, both ends meaningful
non_negative = float_range(0)  # loss weights (0: the term is off), weight decay, --grad-clip (0: off)
positive = float_range(0, lo_open=True)  # learning rates, temperatures


# -----------------------------------------------------------------------------
# console

def safe_console() -> None:
    """Make stdout and stderr print any text: a character their encoding lacks (a path in Cyrillic on a cp1252
    Windows console, PYTHONIOENCODING=cp1252) is written as a backslash escape (\\u0443) instead of raising
    UnicodeEncodeError. Called first by every command's `__main__`."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; a replaced stream (a test's capture) is left as is
            stream.reconfigure(errors="backslashreplace")


# -----------------------------------------------------------------------------
# progress

class LogProgress(tqdm):
    """tqdm for a log file: no bar and no carriage return, but a plain line ('epoch 0:  50% 62/125 [01:02<01:01,
    1.01it/s, loss=0.07]') when the loop starts, at most every `interval` seconds, and when it ends."""

    def __init__(self, *args, interval: float = LOG_INTERVAL, **kwargs):
        self.interval, self._last_line = interval, -math.inf  # set before tqdm's __init__, which displays
        kwargs.update(ncols=0, dynamic_ncols=False, leave=True, mininterval=interval)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        closing = self.disable  # close() sets it before its last display, and then writes the newline itself
        now = self._time()
        if closing or now - self._last_line >= self.interval:
            self._last_line = now
            self.fp.write(self.__str__() + ("" if closing else "\n"))
            self.fp.flush()
        return True


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) when stderr is a terminal; otherwise (a log file, a pipe, a batch scheduler) a
    LogProgress, which writes plain lines every LOG_INTERVAL seconds instead of carriage-return frames."""
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return LogProgress(iterable, **kwargs)
