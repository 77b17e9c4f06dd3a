"""torchrun: 2 CPU processes (gloo) train like one process on the same global batch."""
import subprocess
import sys

import torch

from conftest import ROOT, tiny_train_args
from model import build_model, tiny_config


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
    # Adam divides by sqrt(v): where a gradient is tiny, reduction-order rounding shows up in the update, so the
    # two runs agree to rounding relative to how far the 4 steps moved the weights from their shared initialisation
    torch.manual_seed(0)
    init = build_model(tiny_config()).state_dict()
    for k in a["model"]:
        moved = (a["model"][k].float() - init[k].float()).abs().max().item()
        diff = (a["model"][k].float() - b["model"][k].float()).abs().max().item()
        assert diff <= 0.05 * moved + 2e-5, (k, diff, moved)  # 2e-5: 2% of one step at lr 1e-3
    total_moved = sum((a["model"][k].float() - init[k].float()).abs().sum().item() for k in a["model"])
    total_diff = sum((a["model"][k].float() - b["model"][k].float()).abs().sum().item() for k in a["model"])
    assert total_diff < 1e-3 * total_moved, (total_diff, total_moved)
    for state in (a, b):  # both really trained: 4 Adam updates of every trainable tensor
        assert all(int(v["step"]) == 4 for v in state["optimizer"]["state"].values())
