"""torchrun: 2 CPU processes (gloo) train like one process on the same global batch, and a run resumes on
another number of processes when the global batch stays the same, also after a SIGTERM."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_py
from conftest import ROOT, TINY_LATENT, tiny_train_args
from model import build_model, tiny_config

pytestmark = pytest.mark.slow  # every test here starts torchrun or a training process


def train(*args: str, procs: int = 1) -> subprocess.CompletedProcess:
    """train.py in a new process, or under torchrun in `procs` processes."""
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
    init = build_model(tiny_config(latent_dim=TINY_LATENT)).state_dict()
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
    # no contrastive term (tiny_train_args): InfoNCE compares the samples of a batch, so a split batch changes it
    common = ["--epochs", "2"]
    one = with_batch(tiny_train_args(synth_dir, tmp_path / "one", *common), 8)
    two = with_batch(tiny_train_args(synth_dir, tmp_path / "two", *common), 4)  # per process: 2 x 4 = 8
    train_py.main([*one, "--max-steps", "4"])  # the 1-process runs in this process: no interpreter to start
    r = train(*two, "--max-steps", "4", procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Train samples:") == 1  # only rank 0 prints and logs
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["epoch_pos"] == 32
    assert_same_training(a, b, steps=4)

    # the 2-process run goes on in 1 process: 4 x 1 x 2 accum steps keeps the global batch of 8. Step 10 crosses
    # the epoch boundary (8 steps of 8 per epoch), so the next epoch's order is checked too
    train_py.main([*one, "--max-steps", "10", "--resume"])
    train_py.main([*two, "--max-steps", "10", "--resume", "--accum-steps", "2"])
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



# run by torchrun in place of train.py: rank 0's torch.save takes 2 s more, and each rank records when its save
# ended and when it exited (time.time() in RUN/saved, RUN/exit{RANK})
SLOW_SAVE = """\
import atexit, os, runpy, sys, time
from pathlib import Path
import torch
run_dir, root = Path(sys.argv[1]), sys.argv[2]
atexit.register(lambda: (run_dir / f"exit{os.environ['RANK']}").write_text(repr(time.time())))
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):  # a 1.6 GB checkpoint on a slow disk
    real_save(obj, f, *args, **kwargs)
    time.sleep(2)
    (run_dir / "saved").write_text(repr(time.time()))
torch.save = slow_save
sys.path.insert(0, root)
sys.argv = [f"{root}/train.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_to_torchrun_saves_a_complete_checkpoint_before_any_process_exits(synth_dir, tmp_path):
    """torchrun forwards a SIGTERM to every worker and kills what still runs --shutdown-timeout (30 s) later; when
    one worker exits first it stops the others and kills them 30 s later. So every rank waits for rank 0's save."""
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    args = with_batch(tiny_train_args(synth_dir, run, "--epochs", "1"), 4)  # 2 processes x 4: global batch 8
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "slow_save.py"), str(run), str(ROOT), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and max(train_steps(run), default=0) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the launching shell's process group: torchrun (workers have their own)
    _, err = proc.communicate(timeout=120)
    assert "Sending process" in err and "closing signal SIGTERM" in err  # torchrun forwarded it
    saved = float((run / "saved").read_text())
    for rank in (0, 1):
        assert float((run / f"exit{rank}").read_text()) >= saved, rank  # no process exited during the save
    assert not (run / "checkpoints/last.pt.tmp").exists()
    last = torch.load(run / "checkpoints/last.pt", weights_only=True)
    stopped = max(train_steps(run))
    assert 2 <= last["step"] == stopped < 8 and last["world_size"] == 2  # saved at the step every rank stopped at

    # the run goes on from there (one process, 4 x 2 accum steps: the same global batch)
    train_py.main([*args, "--resume", "--accum-steps", "2", "--max-steps", str(stopped + 2)])
    assert train_steps(run) == list(range(1, stopped + 3))  # each step once: none redone, none missing
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == stopped + 2


def train_steps(run) -> list[int]:
    """Training steps logged in RUN/logs/metrics.csv, in order."""
    path = run / "logs/metrics.csv"
    return [int(r["step"]) for r in csv.DictReader(open(path)) if r["split"] == "train"] if path.exists() else []
