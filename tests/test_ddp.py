"""torchrun: 2 CPU processes (gloo) train like one process on the same global batch, and a run resumes on
another number of processes when the global batch stays the same."""
import subprocess
import sys

import torch

from conftest import ROOT, tiny_train_args
from model import build_model, tiny_config


def train(*args: str, procs: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    return subprocess.run([sys.executable, *launcher, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def with_batch(args: list[str], batch: int) -> list[str]:
    args = list(args)
    args[args.index("--batch-size") + 1] = str(batch)
    return args


def assert_same_training(a: dict, b: dict, steps: int) -> None:
    # Adam divides by sqrt(v): where a gradient is tiny, reduction-order rounding shows up in the update, so two runs
    # agree to rounding relative to how far the steps moved the weights from their shared initialisation
    assert a["step"] == b["step"] == steps and a["epoch_pos"] == b["epoch_pos"]
    torch.manual_seed(0)
    init = build_model(tiny_config()).state_dict()
    for k in a["model"]:
        moved = (a["model"][k].float() - init[k].float()).abs().max().item()
        diff = (a["model"][k].float() - b["model"][k].float()).abs().max().item()
        assert diff <= 0.05 * moved + 2e-5, (k, diff, moved)  # 2e-5: 2% of one step at lr 1e-3
    total_moved = sum((a["model"][k].float() - init[k].float()).abs().sum().item() for k in a["model"])
    total_diff = sum((a["model"][k].float() - b["model"][k].float()).abs().sum().item() for k in a["model"])
    assert total_diff < 1e-3 * total_moved, (total_diff, total_moved)
    for state in (a, b):  # both really trained: one Adam update of every trainable tensor per step
        assert all(int(v["step"]) == steps for v in state["optimizer"]["state"].values())


def test_two_processes_match_one_process_and_resume_on_one_process(synth_dir, tmp_path):
    # no contrastive term: InfoNCE compares the samples of a batch, so a split batch changes it by design
    common = ["--epochs", "2", "--contrastive-weight", "0"]
    one = with_batch(tiny_train_args(synth_dir, tmp_path / "one", *common), 8)
    two = with_batch(tiny_train_args(synth_dir, tmp_path / "two", *common), 4)  # per process: 2 x 4 = 8
    r = train(*one, "--max-steps", "4")
    assert r.returncode == 0, r.stderr
    r = train(*two, "--max-steps", "4", procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Train samples:") == 1  # only rank 0 prints and logs
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["epoch_pos"] == 32
    assert_same_training(a, b, steps=4)

    # the 2-process run goes on in 1 process: 4 x 1 x 2 accum steps keeps the global batch of 8. Step 10 crosses
    # the epoch boundary (8 steps of 8 per epoch), so the next epoch's order is checked too
    r = train(*one, "--max-steps", "10", "--resume")
    assert r.returncode == 0, r.stderr
    r = train(*two, "--max-steps", "10", "--resume", "--accum-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert b["world_size"] == 1 and b["run_config"]["accum_steps"] == 2 and b["epoch"] == 1
    assert_same_training(a, b, steps=10)


def test_resume_with_another_global_batch_is_refused_in_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(tiny_run.data_dir, run, "--resume", str(tiny_run.last), "--batch-size", "4")
    before = tiny_run.last.read_bytes()
    r = train(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "global batch is 8 (batch size 8 x 1 process(es) x 1 accum steps)" in r.stderr and "is 4" in r.stderr
    assert tiny_run.last.read_bytes() == before and not run.exists()
