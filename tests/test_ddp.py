"""torchrun: 2 CPU processes (gloo) train like one process on the same global batch."""
import subprocess
import sys

import torch

from conftest import ROOT, tiny_train_args


def test_two_processes_match_one_process_on_the_same_global_batch(synth_dir, tmp_path):
    # no contrastive term: InfoNCE compares the samples of a batch, so a split batch changes it by design
    common = ["--epochs", "1", "--max-steps", "4", "--contrastive-weight", "0"]
    one = tiny_train_args(synth_dir, tmp_path / "one", *common)
    one[one.index("--batch-size") + 1] = "8"
    two = tiny_train_args(synth_dir, tmp_path / "two", *common)
    two[two.index("--batch-size") + 1] = "4"  # per process: 2 x 4 = the same global batch of 8
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *one], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *two], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Train samples:") == 1  # only rank 0 prints and logs
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["step"] == b["step"] == 4 and a["epoch_pos"] == b["epoch_pos"] == 32
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=1e-4, msg=k)
    for state in (a, b):  # both really trained: 4 Adam updates of every trainable tensor
        assert all(int(v["step"]) == 4 for v in state["optimizer"]["state"].values())
