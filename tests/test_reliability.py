"""Fault injection: nothing saved is lost, nothing unsafe is loaded, a resumed run is the same run.

Each test names the guarantee it checks (README, "What the tool guarantees")."""
import csv
import errno
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import loop
import train
from checkpoints import read_checkpoint
from data import EarDataset
from conftest import EARLIER, ROOT, TWO_VIEWS, Hostile, build_once, tiny_train_args
from errors import CheckpointError, DataError, TrainingError

STEPS = 6  # of 8 in the schedule (2 epochs x 4 steps of small_synth_dir): runs end mid-epoch, after an epoch's end


def run_cli(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def states_equal(a: dict, b: dict) -> None:
    """Bit-identical model, optimizer, scheduler and scaler state, and the same loop position."""
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"] and a["scaler"] == b["scaler"]
    assert (a["step"], a["epoch"], a["epoch_pos"]) == (b["step"], b["epoch"], b["epoch_pos"])


def train_losses(log_dir: Path) -> dict[int, str]:
    return {int(r["step"]): r["loss"] for r in csv.DictReader(open(log_dir / "metrics.csv")) if r["split"] == "train"}


@pytest.fixture(scope="session")
def small_synth_dir(tmp_path_factory) -> Path:
    """32 training ears (4 steps of 8 per epoch) and 8 val ears: the resume tests' runs at half synth_dir's cost."""
    import synth
    return build_once(tmp_path_factory, "small_synth", lambda d: synth.write_synthetic(d, n_train=32, n_val=8, seed=0))


@pytest.fixture(scope="module", params=[1, 2], ids=["accum1", "accum2"])
def reference(request, small_synth_dir, tmp_path_factory):
    """An uninterrupted run of STEPS optimizer steps (with 1 and with 2 micro-steps per step)."""
    accum = request.param
    extra = ["--epochs", "2", "--max-steps", str(STEPS), "--accum-steps", str(accum), "--batch-size", str(8 // accum),
             *TWO_VIEWS]  # both views' augmentation and noise must resume exactly too
    run = build_once(tmp_path_factory, f"ref_accum{accum}",
                     lambda d: train.main(tiny_train_args(small_synth_dir, d, *extra)))
    return run, extra


# 2. resume equivalence --------------------------------------------------------------------------------------------

def test_stop_and_resume_in_a_new_process_equals_one_uninterrupted_run(reference, small_synth_dir, tmp_path):
    """Stop after step 3 (mid-epoch), resume in a new process: the same run bit for bit. With 1 micro-step the resume
    names the checkpoint alone (`train.py --resume RUN/checkpoints/last.pt`) from another directory: it continues
    in the run's own folders with the run's settings (a changed --lr is ignored, said so) and writes nothing to the
    current directory; with 2 it repeats the run's flags and adds --resume."""
    ref_run, extra = reference
    first = [a if a != str(STEPS) else "3" for a in extra]  # stop after step 3: mid-epoch
    train.main(tiny_train_args(small_synth_dir, tmp_path, *first))  # here; the resume below is the new process
    if extra[extra.index("--accum-steps") + 1] == "1":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(tmp_path / "checkpoints/last.pt"),
                            "--max-steps", str(STEPS), "--lr", "0.5"], capture_output=True, text=True, cwd=elsewhere,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert "--lr 0.5 ignored" in r.stdout
        assert not any(elsewhere.iterdir())  # nothing written to ./checkpoints or ./logs of the current directory
    else:
        r = run_cli("train.py", *tiny_train_args(small_synth_dir, tmp_path, *extra, "--resume"))
        assert r.returncode == 0, r.stderr
    a = torch.load(ref_run / "checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    states_equal(a, b)
    assert train_losses(ref_run / "logs") == train_losses(tmp_path / "logs")


# 3. SIGTERM / SIGINT ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reference, sig", [(1, signal.SIGINT), (2, signal.SIGTERM)], indirect=["reference"],
                         ids=["accum1-SIGINT", "accum2-SIGTERM"])  # each signal and each accumulation once (pairwise)
def test_signal_saves_at_the_next_step_boundary_and_resume_is_the_same_run(reference, small_synth_dir, tmp_path, sig):
    ref_run, extra = reference
    args = [sys.executable, str(ROOT / "train.py"), *tiny_train_args(small_synth_dir, tmp_path, *extra)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = 2 + os.getpid() % 2  # "a random step" (2 or 3) that is reproducible from the test log
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "logs/metrics.csv").exists() and max(train_losses(tmp_path / "logs"), default=0) >= target:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    stopped = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert target <= stopped["step"] < STEPS
    assert max(train_losses(tmp_path / "logs")) == stopped["step"]  # saved at the step it finished
    train.main(tiny_train_args(small_synth_dir, tmp_path, *extra, "--resume"))  # in this process
    states_equal(torch.load(ref_run / "checkpoints/last.pt", weights_only=True),
                 torch.load(tmp_path / "checkpoints/last.pt", weights_only=True))


# 1 and 10. crashes and failures during a save ---------------------------------------------------------------------

def test_exception_inside_the_write_keeps_the_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(tiny_run.last.read_bytes())
    before = target.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("simulated crash in the middle of torch.save")
    monkeypatch.setattr(loop.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.save_checkpoint({"model": {}}, target)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["step"] == 16


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES], ids=["no-space", "no-permission"])
def test_failed_save_is_reported_and_the_previous_checkpoint_stays(tiny_run, tmp_path, monkeypatch, err):
    target = tmp_path / "last.pt"
    target.write_bytes(tiny_run.last.read_bytes())
    before = target.read_bytes()

    def failing_save(obj, f):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(loop.torch, "save", failing_save)
    with pytest.raises(TrainingError, match=re.escape(str(target)) + ".*" + os.strerror(err)):
        loop.save_checkpoint({"model": {}}, target)
    assert target.read_bytes() == before and not (tmp_path / "last.pt.tmp").exists()


def test_killed_process_during_a_save_leaves_the_previous_checkpoint(tiny_run, tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(tiny_run.last.read_bytes())
    before = target.read_bytes()
    script = (
        "import sys, time, torch; sys.path.insert(0, sys.argv[1]); import loop\n"
        "real = torch.save\n"
        "def slow(obj, f):\n"
        "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "loop.torch.save = slow\n"
        "loop.save_checkpoint({'model': {}}, __import__('pathlib').Path(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["step"] == 16


# 4 and 5. bad and malicious checkpoints ---------------------------------------------------------------------------

def bad_checkpoints(tiny_run, d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = {"empty": d / "empty.pt", "garbage": d / "garbage.pt", "truncated": d / "truncated.pt",
             "malicious": d / "malicious.pt", "weights-only": d / "weights.pt"}
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(os.urandom(4096))
    good = tiny_run.last.read_bytes()
    files["truncated"].write_bytes(good[: len(good) // 2])
    torch.save({"model": {}, "model_config": {}, "x": Hostile(d / "MARKER")}, files["malicious"])
    torch.save({"model": {}, "model_config": {}}, files["weights-only"])
    return files


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "malicious", "weights-only"])
def test_bad_checkpoint_given_to_resume_fails_in_one_line_and_overwrites_nothing(tiny_run, tmp_path, kind):
    bad = bad_checkpoints(tiny_run, tmp_path / "bad")[kind]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.pt").write_bytes(tiny_run.last.read_bytes())
    before = (run / "checkpoints/last.pt").read_bytes()
    r = run_cli("train.py", *tiny_train_args(tiny_run.data_dir, run, "--resume", str(bad)))
    assert_one_line_error(r, str(bad))
    if kind == "truncated":  # the reader's first sentence, without torch's apology cut off mid-sentence
        assert "unreadable or truncated checkpoint (" in r.stderr and "miniz" not in r.stderr, r.stderr
    assert not (tmp_path / "bad/MARKER").exists()  # the pickle's payload never ran
    assert (run / "checkpoints/last.pt").read_bytes() == before
    assert not (run / "logs").exists()  # training never started from scratch


@pytest.mark.slow
def test_resuming_a_copy_never_writes_over_its_run_folders_other_checkpoint(tiny_run, tmp_path):
    """A copy of last.pt names the run's folders, where another last.pt lies: refused; given new folders it resumes."""
    copy = tmp_path / "backup.pt"
    copy.write_bytes(tiny_run.last.read_bytes())
    before = {p: p.read_bytes() for p in (tiny_run.last, tiny_run.best, tiny_run.log_dir / "metrics.csv")}
    r = run_cli("train.py", "--resume", str(copy), "--workers", "0")
    assert_one_line_error(r, f"{copy}: resuming would write over {tiny_run.last}", "pass --ckpt-dir and --log-dir")
    assert all(p.read_bytes() == b for p, b in before.items())
    new = tmp_path / "continued"
    r = run_cli("train.py", "--resume", str(copy), "--workers", "0", "--ckpt-dir", str(new / "checkpoints"),
                "--log-dir", str(new / "logs"))
    assert r.returncode == 0, r.stderr  # the run had finished its 16 steps: nothing to train, nothing written
    assert f"nothing to train: {copy} is at step 16 and the run ends at step 16 (--epochs 2); nothing was written" \
        in r.stdout
    assert not (new / "logs/metrics.csv").exists() and all(p.read_bytes() == b for p, b in before.items())


def test_a_run_with_relative_folders_resumed_from_elsewhere_is_refused_and_not_forked(synth_dir, tmp_path,
                                                                                         monkeypatch):
    """Its folders are kept as given: from another folder they would be new ones, a second copy of the run."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train.main(tiny_train_args(synth_dir, "run", "--epochs", "1", "--max-steps", "2"))
    last = tmp_path / "a" / "run" / "checkpoints" / "last.pt"
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(TrainingError, match=re.escape(f"{last}: its run's folder run/checkpoints is not found from "
                                                      f"{tmp_path / 'b'}")):
        train.main(["--resume", str(last), "--max-steps", "3"])
    assert list((tmp_path / "b").iterdir()) == []
    monkeypatch.chdir(tmp_path / "a")
    train.main(["--resume", str(last), "--max-steps", "3"])
    assert torch.load(last, weights_only=True)["step"] == 3


def test_a_run_whose_data_moved_resumes_from_the_new_place_and_only_on_the_same_files(synth_dir, tmp_path):
    shutil.copytree(synth_dir, before := tmp_path / "d1")
    train.main(tiny_train_args(before, tmp_path / "run", "--epochs", "1", "--max-steps", "2"))
    before.rename(moved := tmp_path / "d2")
    resume = ["--resume", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--max-steps", "3"]
    with pytest.raises(DataError, match=re.escape(f"{before / 'train_teacher.npy'}: file not found")):
        train.main(resume)
    other = np.load(moved / "val_teacher.npy")
    np.save(tmp_path / "other_val.npy", other[::-1].copy())  # the same images in another order: other data
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'other_val.npy'}: changed since")):
        train.main([*resume, "--data-dir", str(moved), "--val-npy", str(tmp_path / "other_val.npy")])
    train.main([*resume, "--data-dir", str(moved)])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_a_copy_resumed_into_a_new_ckpt_dir_logs_there_and_never_touches_the_runs_log_folder(synth_dir, tmp_path):
    train.main(tiny_train_args(synth_dir, tmp_path / "run", "--epochs", "1", "--max-steps", "2"))
    logs = tmp_path / "run" / "logs"
    before = {p: p.read_bytes() for p in logs.iterdir() if p.is_file()}
    copy = tmp_path / "backup" / "copy.pt"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "run" / "checkpoints" / "last.pt").read_bytes())
    train.main(["--resume", str(copy), "--max-steps", "3", "--ckpt-dir", str(tmp_path / "new")])
    assert {p: p.read_bytes() for p in logs.iterdir() if p.is_file()} == before
    assert {"config.json", "metrics.csv", "last.pt"} <= {p.name for p in (tmp_path / "new").iterdir()}
    assert torch.load(tmp_path / "new" / "last.pt", weights_only=True)["step"] == 3


HOLD = ("import sys, time; sys.path.insert(0, sys.argv[1]); from files import hold_folders\n"
        "with hold_folders([sys.argv[2]], 'a test holder'):\n"
        "    print('held', flush=True); time.sleep(120)\n")


def test_a_folder_a_live_process_holds_is_refused_naming_it_and_free_again_after_a_sigkill(synth_dir, tmp_path):
    """A run owns its folders while it lives (files.hold_folders); the OS frees them when it dies, even by SIGKILL."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(tmp_path / "checkpoints")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = tiny_train_args(synth_dir, tmp_path, "--epochs", "1", "--max-steps", "1")
        with pytest.raises(TrainingError, match=f"^--ckpt-dir {tmp_path / 'checkpoints'}: in use by a test holder "
                                                      rf"\(pid {holder.pid}, since "):
            train.main(args)
        assert not (tmp_path / "checkpoints" / "last.pt").exists() and not (tmp_path / "logs").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    train.main(args)  # the next run starts without a manual step
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 1


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_one_runs_and_the_other_is_refused(synth_dir, tmp_path):
    """Started side by side, both pass the early check for an earlier run; the folder lock lets one through."""
    args = [sys.executable, str(ROOT / "train.py"), *tiny_train_args(synth_dir, tmp_path, "--epochs", "1")]
    procs = [subprocess.Popen([*args, "--seed", str(seed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 1], results
    assert_one_line_error(SimpleNamespace(returncode=1, stderr=results[1][1]), "in use by train.py --ckpt-dir")
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == list(range(1, 9))  # one run's rows only


@pytest.mark.slow
def test_a_resume_over_changed_data_stops_naming_the_file_unless_accepted(synth_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    train.main(tiny_train_args(data, tmp_path, "--epochs", "2", "--max-steps", "3"))
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    x = np.load(data / "train_teacher.npy")
    np.save(data / "train_teacher.npy", x[:48])  # 16 rows fewer: 6 steps an epoch instead of 8
    resume = tiny_train_args(data, tmp_path, "--resume")
    with pytest.raises(DataError, match=re.escape(f"{data / 'train_teacher.npy'}: changed since {last} was "
                                                        f"saved (3,145,856 -> 2,359,424 bytes, (64, 128, 128, 3) -> "
                                                        f"(48, 128, 128, 3)); resuming would train on other data")):
        train.main(resume)
    assert last.read_bytes() == before
    x[5] = 255 - x[5]  # same size and shape, one image changed
    np.save(data / "train_teacher.npy", x)
    with pytest.raises(DataError, match="other content, same size and shape"):
        train.main(resume)
    train.main([*resume, "--accept-changed-data", "--max-steps", "4"])
    saved = torch.load(last, weights_only=True)
    assert saved["step"] == 4 and saved["run_config"]["accept_changed_data"] is True
    assert saved["data"]["train"] == EarDataset(data / "train_teacher.npy").fingerprint()
    np.save(data / "train_teacher.npy", x[:56])
    with pytest.raises(DataError, match="changed since"):  # the acceptance was for that resume only
        train.main(resume)


def test_a_resume_appends_under_the_header_an_earlier_version_wrote(tmp_path):
    """A run resumed after its objective logs a new column keeps metrics.csv's rows under their header, with a note."""
    (tmp_path / "metrics.csv").write_text("step,epoch,split,lr,loss,nme,grad_norm,skipped,img_per_s,time\n"
                                          "1,0,train,0.001,2.5,,0.4,0,100,1.0\n")
    notes = []
    log = loop.MetricsLog(tmp_path, ("point", "nme"), notes.append, fresh=False)
    log.write_row({"step": 2, "epoch": 0, "split": "train", "lr": 0.001, "loss": 2.0, "point": 2.0, "time": 2.0})
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["loss"] for r in rows] == ["2.5", "2"] and [r["time"] for r in rows] == ["1.0", "2"]
    assert all(None not in r for r in rows)  # no row longer than the header
    assert notes == [f"note: {tmp_path / 'metrics.csv'} has the columns of an earlier version; appending under them "
                     f"(not logged: point)"]


def test_a_new_run_never_writes_over_an_earlier_best_pt(synth_dir, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/best.pt").write_text(EARLIER)
    with pytest.raises(TrainingError, match=r"best\.pt exists from an earlier run: choose another --ckpt-dir"):
        train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1"))  # no last.pt: no --resume to suggest
    (tmp_path / "checkpoints/last.pt").write_text(EARLIER)
    with pytest.raises(TrainingError, match=r"last\.pt exists from an earlier run: continue it with --resume "
                                            r".*checkpoints/last\.pt"):
        train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1"))
    assert (tmp_path / "checkpoints/best.pt").read_text() == EARLIER


def test_a_run_killed_before_its_first_log_row_is_no_earlier_run(synth_dir, tmp_path):
    """SIGKILL after metrics.csv got its header and before any row or checkpoint: the next run in the same folders
    starts without a manual step and writes the header once; a log with rows and no checkpoint is refused in one
    line, left as it was."""
    (tmp_path / "logs").mkdir()
    metrics = tmp_path / "logs" / "metrics.csv"
    metrics.write_text("step,epoch,split,lr,loss\n")
    train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1", "--max-steps", "1"))
    lines = metrics.read_text().splitlines()
    assert lines[0].startswith("step,epoch,split,lr,loss,pixel") and sum(x.startswith("step,") for x in lines) == 1
    empty = tmp_path / "empty"  # killed before even the header was flushed
    (empty / "logs").mkdir(parents=True)
    (empty / "logs" / "metrics.csv").write_text("")
    train.main(tiny_train_args(synth_dir, empty, "--epochs", "1", "--max-steps", "1"))
    assert (empty / "logs" / "metrics.csv").read_text().startswith("step,epoch,split,lr,loss,pixel")
    other = tmp_path / "other"
    (other / "logs").mkdir(parents=True)
    (other / "logs" / "metrics.csv").write_text("step,epoch,split,lr,loss\n25,0,train,0.001,0.5\n")
    with pytest.raises(TrainingError, match=r"metrics\.csv holds the log of an earlier run \(with no checkpoint in "
                                            r".*\): choose another --log-dir, or delete it if that run is of no use"):
        train.main(tiny_train_args(synth_dir, other, "--epochs", "1"))
    assert (other / "logs" / "metrics.csv").read_text().endswith("0.5\n")


@pytest.mark.slow
def test_resume_without_a_checkpoint_never_starts_fresh(synth_dir, tmp_path):
    r = run_cli("train.py", *tiny_train_args(synth_dir, tmp_path, "--resume"))
    assert_one_line_error(r, "last.pt")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b'{"model": {}}'])
def test_a_file_torch_save_did_not_write_is_named_as_such(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: not a PyTorch file \((an empty file|it starts with b)"):
        read_checkpoint(path)


def test_malicious_checkpoint_is_refused_by_every_entry_point(tiny_run, tmp_path):
    bad = bad_checkpoints(tiny_run, tmp_path)["malicious"]
    for script, args in (("eval.py", [str(bad), "--out", str(tmp_path / "e")]),
                         ("eigenears.py", ["--ckpt", str(bad), "--out", str(tmp_path / "g")])):
        assert_one_line_error(run_cli(script, *args), str(bad))
    with pytest.raises(CheckpointError):
        read_checkpoint(bad)
    assert not (tmp_path / "MARKER").exists()


# 6 and 7. unsafe and bad data -------------------------------------------------------------------------------------

def test_pickled_npy_is_refused_by_every_entry_point(tiny_run, tmp_path):
    marker = tmp_path / "MARKER"
    bad = tmp_path / "pickled.npy"
    np.save(bad, np.array([Hostile(marker)], dtype=object), allow_pickle=True)  # hostile
    base = tiny_train_args(tiny_run.data_dir, tmp_path / "run")
    for script, args in (("train.py", [*base, "--train-npy", str(bad)]),
                         ("train.py", [*base, "--val-npy", str(bad)]),
                         ("eval.py", [str(tiny_run.best), "--data", str(bad), "--out", str(tmp_path / "e")]),
                         ("eigenears.py", ["--ckpt", str(tiny_run.best), "--data", str(bad),
                                           "--out", str(tmp_path / "g")]),
                         ("data.py", ["check", str(bad)])):
        assert_one_line_error(run_cli(script, *args), str(bad))
    assert not marker.exists()


@pytest.mark.slow
def test_too_many_bad_samples_stop_the_run_before_step_0_with_counts(synth_dir, tmp_path):
    x = np.load(synth_dir / "train_teacher.npy").astype(np.float32) / 255
    x[:10] = np.nan  # non-finite
    x[10:14] = 0.5  # blank
    x[14:16] *= 3.0  # out of range (and not constant)
    np.save(tmp_path / "bad.npy", x)
    r = run_cli("train.py", *tiny_train_args(synth_dir, tmp_path / "run", "--train-npy", str(tmp_path / "bad.npy")))
    assert_one_line_error(r, "bad.npy", "16", "non-finite 10", "blank 4", "out of range 2")
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.slow
def test_a_few_bad_samples_are_filtered_counted_and_training_goes_on(synth_dir, tmp_path):
    x = np.load(synth_dir / "train_teacher.npy").copy()
    x[5] = 7  # blank
    np.save(tmp_path / "few.npy", x)
    r = run_cli("train.py", *tiny_train_args(synth_dir, tmp_path / "run", "--train-npy", str(tmp_path / "few.npy"),
                                             "--epochs", "1", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr
    assert "Train samples: 63 (filtered 1 invalid" in r.stdout


# 8. non-finite losses ---------------------------------------------------------------------------------------------

class NaNAt(train.VAELoss):
    """VAELoss whose training loss is NaN on the given calls (validation calls pass through)."""
    bad_calls: set[int] = set()
    calls = 0

    def forward(self, recon, target, mu, logvar, **kwargs):
        loss, logs = super().forward(recon, target, mu, logvar, **kwargs)
        if torch.is_grad_enabled():
            NaNAt.calls += 1
            if NaNAt.calls in NaNAt.bad_calls:
                loss = loss * torch.tensor(float("nan"))
        return loss, logs


@pytest.mark.slow
def test_a_nan_loss_skips_the_update_and_leaves_parameters_unchanged(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "VAELoss", NaNAt)
    NaNAt.calls, NaNAt.bad_calls = 0, {3}
    train.main(tiny_train_args(synth_dir, tmp_path / "nan", "--epochs", "1", "--max-steps", "3"))
    NaNAt.calls, NaNAt.bad_calls = 0, set()
    train.main(tiny_train_args(synth_dir, tmp_path / "ok", "--epochs", "1", "--max-steps", "2"))
    a = torch.load(tmp_path / "nan/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "ok/checkpoints/last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # step 3 made no update
    for pid, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
    assert a["skipped"] == 1 and a["step"] == 3


@pytest.mark.slow
def test_nan_losses_in_a_row_stop_the_run_and_keep_the_good_checkpoint(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "VAELoss", NaNAt)
    NaNAt.calls, NaNAt.bad_calls = 0, set(range(5, 100))
    args = tiny_train_args(synth_dir, tmp_path, "--epochs", "1", "--save-every", "2", "--max-nan", "3")
    good = re.escape(f"{tmp_path / 'checkpoints/last.pt'} (step 4) is the last good state")
    with pytest.raises(TrainingError, match=f"3 non-finite losses in a row at step 6; stopped without saving: "
                                                  f"{good}"):
        train.main(args)
    last = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert last["step"] == 4 and last["skipped"] == 0  # saved at step 4, before the first NaN (step 5)


# 8b. diverged weights: what is saved as good is good, and the advice is a command that works ---------------------

def advised_command(message: str) -> list[str]:
    """The train.py flags of the new run a TrainingError advises (`python train.py ...`)."""
    found = re.search(r"`python train\.py ([^`]*)`", message)
    assert found, message
    return shlex.split(found.group(1))


@pytest.mark.slow
def test_a_diverging_run_saves_nothing_and_the_command_it_advises_ends_with_finite_weights(synth_dir, tmp_path):
    """--lr 1e8 without clipping: Adam's first update puts every weight near 1e6 while the loss of that step was
    finite, so a save at step 1 (--save-every 1) is what earlier versions kept as the "last good state". It must be
    refused, and the advised command (a tenth of the lr, at most the default; clipping on; new folders) trains."""
    args = tiny_train_args(synth_dir, tmp_path, "--lr", "1e8", "--grad-clip", "0", "--epochs", "1",
                           "--save-every", "1", "--max-steps", "2")
    with pytest.raises(TrainingError) as e:
        train.main(args)
    message = str(e.value)
    assert re.match(r"the weights diverged \(\S+ reached max \|value\| \S+, more than 1000 x max\(its initial "
                    r"\S+, 1\)\) at step 1; stopped without saving: no checkpoint exists\. Start a new run", message)
    assert "--resume keeps the run's --lr; it may change only --accum-steps, --batch-size" in message
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and not (tmp_path / "checkpoints" / "best.pt").exists()
    advised = advised_command(message)
    value = lambda flag: advised[advised.index(flag) + 1]  # noqa: E731
    assert (value("--lr"), value("--grad-clip"), value("--max-steps")) == ("0.0003", "1.0", "2")
    assert value("--ckpt-dir") == f"{tmp_path / 'checkpoints'}_lr0.0003" and "--resume" not in advised
    train.main(advised)
    last = torch.load(value("--ckpt-dir") + "/last.pt", weights_only=True)
    assert last["step"] == 2
    scales = {k: v.abs().max().item() for k, v in last["model"].items() if v.is_floating_point()}
    assert all(math.isfinite(v) and v < 100 for v in scales.values()), max(scales.values())


def test_resuming_a_diverged_checkpoint_stops_before_step_0_and_changes_nothing(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run.last, weights_only=True)
    ckpt["model"]["head.fc.weight"] *= 1e6  # a finite but blown-up state, as a diverged run of earlier versions saved
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(TrainingError) as e:
        train.main(tiny_train_args(tiny_run.data_dir, tmp_path, "--lr", "5e-4", "--resume"))
    message = str(e.value)
    assert message.startswith(f"{path} (step 16): the weights diverged (head.fc.weight reached max |value| "), message
    assert "it cannot be resumed. Start a new run with a lower learning rate in new folders: `python train.py" \
        in message
    assert path.read_bytes() == before and not (tmp_path / "logs").exists()  # nothing trained, logged or saved
    advised = advised_command(message)  # the run's own flags (the checkpoint's), not this command's --lr 5e-4
    assert advised[advised.index("--lr") + 1] == "0.0001" and advised[advised.index("--epochs") + 1] == "2"


def test_a_sanity_check_with_non_finite_values_stops_the_run_before_step_0(synth_dir, tmp_path, monkeypatch):
    validate = train.validate
    monkeypatch.setattr(train, "validate", lambda *a, **k: {**validate(*a, **k), "kl": math.inf})
    with pytest.raises(TrainingError, match=r"^sanity check before step 0: non-finite validation values "
                       r"\(kl inf\) from the initial model; nothing was trained or saved"):
        train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1"))
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert [r["split"] for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv"))] == []  # no step taken


def test_weights_are_sane_unless_non_finite_or_grown_a_thousandfold():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    scales = loop.weight_scales(model)
    assert scales == {k: pytest.approx(v.abs().max().item()) for k, v in model.state_dict().items()}
    assert loop.weights_problem(scales, scales) is None
    grown = {**scales, "0.bias": 999.0, "1.weight": 999.0}  # floor 1: a zero or unit initialisation may reach 1000
    assert loop.weights_problem(grown, scales) is None
    assert scales["0.weight"] < 1  # Linear's initialisation: the floor of 1 sets its bound at 1000
    assert loop.weights_problem({**scales, "0.weight": 1001.0}, scales) == (
        f"the weights diverged (0.weight reached max |value| 1e+03, more than 1000 x max(its initial "
        f"{scales['0.weight']:.3g}, 1))")
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
    assert loop.weights_problem(loop.weight_scales(model), scales, "EMA weights") == (
        "the EMA weights diverged (0.weight holds non-finite values)")


# 11. another configuration ----------------------------------------------------------------------------------------

def test_resume_into_a_checkpoint_of_another_configuration_fails_loudly(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run.last, weights_only=True)
    ckpt["model_config"]["latent_dim"] = 32  # the weights are for TINY_LATENT
    torch.save(ckpt, tmp_path / "other.pt")
    r = run_cli("train.py", *tiny_train_args(tiny_run.data_dir, tmp_path / "run", "--resume",
                                             str(tmp_path / "other.pt")))
    assert_one_line_error(r, "other.pt", "do not fit")


# 12 and 13. nothing that runs code on load ------------------------------------------------------------------------

UNSAFE = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True")


def test_no_source_file_loads_pickles_or_remote_code():
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if UNSAFE.search(line) and not line.rstrip().endswith("# hostile"):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_backbone_weights_load_only_from_safetensors(tmp_path):
    from transformers import SamVisionConfig, SamVisionModel
    from errors import WeightsUnavailableError
    from model import build_model, tiny_config
    model = SamVisionModel(SamVisionConfig(**tiny_config().encoder_config))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy pickle format only
    with pytest.raises(WeightsUnavailableError, match=str(tmp_path)):
        build_model(tiny_config(pretrained=True, weights=str(tmp_path)))


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(synth_dir, tmp_path):
    """A scheduler (SLURM preemption, `kill -- -PGID`) signals the workers too: they must not die first."""
    args = [sys.executable, str(ROOT / "train.py"), *tiny_train_args(synth_dir, tmp_path, "--epochs", "2")]
    args[args.index("--workers") + 1] = "2"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "logs/metrics.csv").exists() and max(train_losses(tmp_path / "logs"), default=0) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["step"]
    assert 2 <= stopped == max(train_losses(tmp_path / "logs"))  # saved at the step it finished


@pytest.mark.slow
def test_a_finished_run_with_loader_workers_exits(synth_dir, tmp_path):
    """Workers must still end when Python terminates its daemon processes at exit (no hang after 'done')."""
    args = tiny_train_args(synth_dir, tmp_path, "--epochs", "1")
    args[args.index("--workers") + 1] = "2"
    r = run_cli("train.py", *args, timeout=120)
    assert r.returncode == 0 and "done: 8 steps" in r.stdout, r.stderr
