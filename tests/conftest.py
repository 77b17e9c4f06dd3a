"""Shared fixtures: a small synthetic ear set and a tiny model trained on it (CPU, seconds)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up would otherwise retry the network for ~30 s

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synth  # noqa: E402
import train  # noqa: E402


class Hostile:
    """Unpickling this runs code: it would create `marker`. Tests check that no entry point ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))  # hostile


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A CLI failure as the project promises it: exit 1, one line on stderr starting 'error: ' and holding each
    fragment, no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tiny_train_args(data_dir, run_dir, *extra: str) -> list[str]:
    """Flags of a tiny CPU run: random tiny backbone, no VGG (no weights here), no worker processes."""
    return ["--tiny", "--no-pretrained", "--perceptual-weight", "0", "--data-dir", str(data_dir),
            "--ckpt-dir", str(Path(run_dir) / "checkpoints"), "--log-dir", str(Path(run_dir) / "logs"),
            "--batch-size", "8", "--workers", "0", "--warmup-steps", "2", "--log-every", "1", "--lr", "1e-3",
            *extra]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """train_teacher.npy (64 ears), val_teacher.npy (16) and their factor CSVs."""
    d = tmp_path_factory.mktemp("synth")
    synth.write_synthetic(d, n_train=64, n_val=16, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained for 2 epochs (16 optimizer steps) on synth_dir: checkpoints/{last,best}.pt and logs/."""
    run = tmp_path_factory.mktemp("run")
    train.main(tiny_train_args(synth_dir, run, "--epochs", "2"))
    return SimpleNamespace(data_dir=synth_dir, run_dir=run, ckpt_dir=run / "checkpoints", log_dir=run / "logs",
                           best=run / "checkpoints" / "best.pt", last=run / "checkpoints" / "last.pt")
