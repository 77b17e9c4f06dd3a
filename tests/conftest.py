"""Shared fixtures and helpers: a small synthetic ear set, a tiny model trained on it (CPU, seconds), the bad inputs
every entry point must refuse in one line, and the check of such a refusal."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up would otherwise retry the network for ~30 s
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist runs one worker per core: one thread each, also in the
    os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses the tests start (torch reads it at import)

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


CLI_CASES = ["missing", "garbage", "hostile", "missing-data"]
EARLIER = '{"earlier": true}\n'  # an earlier run's output file, which a failed run must leave alone


def bad_inputs(tiny_run, d: Path) -> dict[str, SimpleNamespace]:
    """{case: (ckpt, data (None: the run's), named: the file the error must name, marker: created if a hostile
    pickle ran)} for every case of CLI_CASES."""
    marker = d / "pwned"
    garbage, hostile = d / "garbage.pt", d / "hostile.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    torch.save({"model": Hostile(marker), "model_config": {}}, hostile)
    cases = {"missing": (d / "missing.pt", None, d / "missing.pt"), "garbage": (garbage, None, garbage),
             "hostile": (hostile, None, hostile), "missing-data": (tiny_run.best, d / "none.npy", d / "none.npy")}
    return {k: SimpleNamespace(ckpt=c, data=x, named=n, marker=marker) for k, (c, x, n) in cases.items()}


def check_cli_error(r: SimpleNamespace) -> None:
    """A bad_inputs() case after the run (r.returncode, r.stdout, r.stderr; r.earlier: the earlier output file, alone
    in its folder): a one-line error naming the file, no pickle ran, the earlier output is untouched."""
    assert_one_line_error(r, str(r.named))
    assert "Traceback" not in r.stdout
    assert not r.marker.exists()
    assert r.earlier.read_text() == EARLIER
    assert sorted(p.name for p in r.earlier.parent.iterdir()) == [r.earlier.name]


def run_out_of_memory(script: str, *argv: str) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV` (run as __main__ by runpy) with EarVAE.encode raising torch.OutOfMemoryError, as CUDA does
    when a batch does not fit."""
    code = ("import runpy, sys, torch, model\n"
            "def boom(self, x):\n"
            "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 3.00 GiB')\n"
            "model.EarVAE.encode = boom\n"
            f"sys.argv = [{script!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


def assert_error_after_progress_bars(proc: subprocess.CompletedProcess, error: str) -> None:
    """Exit 1, no traceback, and stderr is the progress lines of the interrupted loop (plain lines, no carriage
    return: stderr is not a terminal) followed by exactly `error`."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "\r" not in proc.stderr
    *bars, last = proc.stderr.strip().splitlines()
    assert all(line.endswith(("it/s]", "s/it]")) for line in bars), proc.stderr
    assert last == error


TINY_LATENT = 64  # latent size of the tests' runs: 1.6M parameters instead of 13.8M, 23 MB checkpoints, not 165 MB


TWO_VIEWS = ("--contrastive-weight", "0.1")  # the seed's default: two augmented views per image and the NT-Xent term


def tiny_train_args(data_dir, run_dir, *extra: str) -> list[str]:
    """Flags of a tiny CPU run: random tiny backbone, no VGG (no weights here), no worker processes, a small latent,
    one view per image (no contrastive term: it doubles the images per step). `extra` comes last: it overrides."""
    return ["--tiny", "--no-pretrained", "--perceptual-weight", "0", "--data-dir", str(data_dir),
            "--ckpt-dir", str(Path(run_dir) / "checkpoints"), "--log-dir", str(Path(run_dir) / "logs"),
            "--batch-size", "8", "--workers", "0", "--warmup-steps", "2", "--log-every", "1", "--lr", "1e-3",
            "--latent-dim", str(TINY_LATENT), "--contrastive-weight", "0", *extra]


def build_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder made by build(folder) once per test session and shared read-only by the tests, also across
    pytest-xdist's worker processes: the first worker to ask builds it under a file lock, the others wait and reuse
    it (xdist's documented recipe). Tests that change such files copy them first."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (root / f"{name}.done").touch()
    return folder


SLOW_FIXTURES = {"tiny_run", "reference", "demo_log"}  # a training run or the demo, built once for the tests that ask


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that needs a training run (the shared tiny run, the resume references, the demo), beside
    those marked by hand (DDP, --compile, training subprocesses): `pytest -m "not slow"` is the inner loop's subset.
    Then run the slow ones first: xdist's workers share the fast tests at the end, so that no worker is left alone
    with a long test while the other is idle (the demo's smallest run and the compile test take ~50 s each)."""
    def tier(item) -> int:  # 0: marked slow by hand (subprocesses, DDP, compile), 1: a shared training run, 2: fast
        if item.get_closest_marker("slow") is not None:
            return 0
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
            return 1
        return 2
    items.sort(key=tier)  # stable: files and parameters keep their order within a tier


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """train_teacher.npy (64 ears), val_teacher.npy (16) and their factor CSVs."""
    return build_once(tmp_path_factory, "synth", lambda d: synth.write_synthetic(d, n_train=64, n_val=16, seed=0))


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained for 2 epochs (16 optimizer steps) on synth_dir with the contrastive term (two views):
    checkpoints/{last,best}.pt and logs/."""
    run = build_once(tmp_path_factory, "run",
                     lambda d: train.main(tiny_train_args(synth_dir, d, "--epochs", "2", *TWO_VIEWS)))
    return SimpleNamespace(data_dir=synth_dir, run_dir=run, ckpt_dir=run / "checkpoints", log_dir=run / "logs",
                           best=run / "checkpoints" / "best.pt", last=run / "checkpoints" / "last.pt")


@pytest.fixture
def offline_torch_hub(tmp_path, monkeypatch) -> Path:
    """Hermetic "offline" for torchvision weights: an empty TORCH_HOME (returned) and a download that fails at once the
    way urllib does without a network."""
    import urllib.error
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory) -> Path:
    """A random-init torchvision vgg16 `features.*` state dict saved as .pth (stands in for the ImageNet weights,
    which are not reachable here)."""
    from torchvision.models import vgg
    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path
