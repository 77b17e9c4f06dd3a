"""landmarker.py: a landmark student trained through the loop on synthetic ears learns (its loss falls), writes
best.pt and last.pt, resumes bit-exactly, starts from a distilled student's trunk, augments its images and their
landmarks alike unless --no-augment, adds equivariance consistency on unlabelled images, and refuses what it cannot
use."""
import csv
import re
import shutil
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import landmarker
from data import AugConfig
from errors import ConfigError, DataError
from probe import soft_argmax
from student import Student, StudentConfig


def lm_args(data_dir, run_dir, *extra: str) -> list[str]:
    """A CPU-sized run: a random mobilenet_v3_small at input 64, epochs of 32 images (4 steps of 8), 2 epochs."""
    return ["--scratch", "--student-input-size", "64", "--data-dir", str(data_dir), "--ckpt-dir",
            str(run_dir / "checkpoints"), "--log-dir", str(run_dir / "logs"), "--batch-size", "8", "--workers", "0",
            "--warmup-steps", "2", "--log-every", "1", "--lr", "3e-3", "--encoder-lr-scale", "1", "--epochs", "2",
            "--epoch-images", "32", "--labels", "16", *extra]


def test_a_landmark_run_learns_writes_best_and_last_and_resumes_bit_exactly(synth_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    landmarker.main(lm_args(synth_dir, whole))
    rows = list(csv.DictReader(open(whole / "logs" / "metrics.csv")))
    loss = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert len(loss) == 8 and np.mean(loss[-2:]) < 0.8 * loss[0], loss
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 2 and float(val[0]["neg_nme"]) == -float(val[0]["nme"])
    best = torch.load(whole / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_neg_nme"] == pytest.approx(max(float(r["neg_nme"]) for r in val), rel=1e-5)  # csv: 6 digits
    assert best["landmark_config"]["init"] == "scratch"

    shutil.copytree(synth_dir, data := tmp_path / "data")  # the same data in a folder of the test's own
    landmarker.main(lm_args(data, cut, "--max-steps", "3"))
    landmarker.main(["--resume", "--ckpt-dir", str(cut / "checkpoints"), "--log-dir", str(cut / "logs"),
                    "--max-steps", "8"])
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (whole, cut))
    assert a["step"] == b["step"] == 8 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    rows = (data / "train_landmarks.csv").read_text().splitlines()  # one point moved: a resume says so
    cells = rows[1].split(",")
    (data / "train_landmarks.csv").write_text("\n".join([rows[0], ",".join([*cells[:-1], "1.5"]), *rows[2:]]) + "\n")
    with pytest.raises(DataError, match=re.escape("its landmarks train_landmarks.csv changed")):
        landmarker.main(["--resume", "--ckpt-dir", str(cut / "checkpoints"), "--log-dir", str(cut / "logs"),
                         "--max-steps", "9"])


def test_a_landmarker_starts_from_a_students_trunk(tmp_path):
    torch.manual_seed(0)
    cfg = StudentConfig(pretrained=False, embed_dim=8, latent_dim=8, head_dim=8, input_size=64)
    path = tmp_path / "student.pt"
    torch.save({"model": Student(cfg).state_dict(), "student_config": asdict(cfg)}, path)
    run = landmarker.loop.Run(landmarker.get_parser().parse_args(["--student", str(path)]), None, "landmarker.py")
    lm_cfg, trunk = landmarker.landmark_config(run)
    model = landmarker.Landmarker(lm_cfg, trunk)
    assert (lm_cfg.arch, lm_cfg.input_size, lm_cfg.init) == (cfg.arch, 64, str(path))
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(v, saved[f"trunk.{k}"]) for k, v in model.trunk.state_dict().items())
    assert model(torch.rand(2, 3, 128, 128)).shape == (2, 8, 2)


def test_a_landmark_run_refuses_a_missing_csv_a_flip_no_start_and_scratch_flags_on_a_student(synth_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    (data / "train_landmarks.csv").unlink()
    with pytest.raises(DataError, match=re.escape(f"{data / 'train_landmarks.csv'}: no landmarks")):
        landmarker.main(lm_args(data, tmp_path / "a"))
    with pytest.raises(ConfigError, match="--hflip: a flip turns a left ear into a right one"):
        landmarker.main(lm_args(synth_dir, tmp_path / "b", "--hflip"))
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "last.pt").write_bytes(b"an earlier run's")  # the flags are checked first
    with pytest.raises(ConfigError, match=re.escape("--student PATH (a distill.py checkpoint) or --scratch")):
        landmarker.main(lm_args(synth_dir, tmp_path / "c")[1:])
    with pytest.raises(ConfigError, match=re.escape("--student-arch / --student-input-size are for --scratch")):
        landmarker.main([*lm_args(synth_dir, tmp_path / "d")[1:], "--student", str(tmp_path / "student.pt")])


def test_a_landmark_model_has_a_heatmap_per_landmark_of_its_data_and_other_commands_name_its_checkpoint(synth_dir,
                                                                                                       tmp_path):
    """The model takes K from the training CSV (iBUG's 55 points as synth's 8; here the first 3), and a landmark
    checkpoint given to the teacher's or a student's loader is one CheckpointError naming it."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    for split in ("train", "val"):
        with open(data / f"{split}_landmarks.csv", newline="") as f:
            rows = list(csv.reader(f))
        with open(data / f"{split}_landmarks.csv", "w", newline="") as f:
            csv.writer(f).writerows([r[:7] for r in rows])  # index and 3 (x, y) pairs
    landmarker.main(lm_args(data, tmp_path / "run", "--max-steps", "1", "--epochs", "1"))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    model = landmarker.load_landmarker(best)
    assert model.cfg.landmarks == 3 and model(torch.rand(2, 3, 128, 128)).shape == (2, 3, 2)
    from checkpoints import load_model
    from errors import CheckpointError
    from student import load_student
    with pytest.raises(CheckpointError, match=re.escape(f"{best}: a landmark model's checkpoint (landmarker.py)")):
        load_model(best)
    with pytest.raises(CheckpointError, match=re.escape(f"{best}: a landmark model's checkpoint (landmarker.py)")):
        load_student(best)
    import eval as evaluate
    with pytest.raises(CheckpointError, match=re.escape(f"{best}: a landmark model's checkpoint (landmarker.py); "
                                                        f"eval.py measures teachers and students")):
        evaluate.main([str(best), "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("no_augment", [False, True])
def test_a_landmark_run_augments_images_and_landmarks_alike_unless_told_not_to(synth_dir, tmp_path, monkeypatch,
                                                                               no_augment):
    """Every training batch goes through augment and its landmarks through augment_points with the same keys, seed
    and epoch (data.augment_points's test checks that the two agree); --no-augment calls neither."""
    images, points = [], []
    monkeypatch.setattr(landmarker, "augment", lambda x, keys, seed, epoch, cfg: images.append(
        (keys.tolist(), seed, epoch, cfg)) or landmarker.to_float(x))
    monkeypatch.setattr(landmarker, "augment_points", lambda p, size, keys, seed, epoch, cfg: points.append(
        (keys.tolist(), seed, epoch, cfg)) or p)
    landmarker.main(lm_args(synth_dir, tmp_path, "--max-steps", "2", "--seed", "5",
                            *(["--no-augment"] if no_augment else [])))
    if no_augment:
        assert images == points == []
    else:
        assert len(images) == 2 and images == points
        assert all(seed == 5 and epoch == 0 and cfg == landmarker.AugConfig() for _, seed, epoch, cfg in images)


def test_point_loss_leaves_out_landmarks_outside_the_crop():
    """The mean distance over the landmarks that are not NaN, with a finite gradient; with none NaN, the plain mean
    (bit for bit: the --no-augment loss is the one before augmentation came in)."""
    torch.manual_seed(0)
    pred, true = torch.rand(4, 8, 2) * 128, torch.rand(4, 8, 2) * 128
    assert torch.equal(landmarker.point_loss(pred, true), (pred - true).norm(dim=-1).mean())
    cut = true.clone()
    cut[1, 3] = cut[2, :5] = float("nan")
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[1, 3] = keep[2, :5] = False
    pred.requires_grad_(True)
    loss = landmarker.point_loss(pred, cut)
    torch.testing.assert_close(loss, (pred - true).norm(dim=-1)[keep].sum() / 26)
    loss.backward()  # the landmarks left out get no gradient, and their NaN reach no other
    assert pred.grad.isfinite().all() and (pred.grad[~keep] == 0).all() and (pred.grad[keep] != 0).all()


def test_consistency_is_near_zero_for_an_equivariant_model_and_the_warps_displacement_for_a_fixed_one():
    """A 'model' that finds the one bright spot of each image follows every warp: ~0 px. One that answers the same
    points whatever the image pays the distance the warp moves them (zoom, shift, rotation: several px)."""
    images = []
    for i, (r, c) in enumerate([(40, 50), (64, 64), (80, 30), (30, 90)]):
        x = torch.zeros(3, 128, 128, dtype=torch.uint8)
        x[:, r - 2:r + 3, c - 2:c + 3] = 255  # a 5 x 5 white spot on black
        images.append((x, i))
    objective = SimpleNamespace(pool=images, warp=AugConfig(), args=SimpleNamespace(seed=0),
                                setup=SimpleNamespace(device=torch.device("cpu")))
    finds_the_spot = lambda x: soft_argmax(200.0 * x.mean(1, keepdim=True))  # noqa: E731  (B, 1, 2)
    fixed = lambda x: torch.full((len(x), 1, 2), 64.0) + 0 * x.mean()  # noqa: E731
    keys = torch.arange(16)
    assert landmarker.LandmarkObjective.consistency(objective, finds_the_spot, keys, 0) < 0.5  # 0.23 measured
    assert landmarker.LandmarkObjective.consistency(objective, fixed, keys, 0) > 2.0
    a, b = (landmarker.LandmarkObjective.consistency(objective, fixed, k, 0) for k in (keys, keys + 1))
    assert a != b and a == landmarker.LandmarkObjective.consistency(objective, fixed, keys, 0)  # drawn from the keys


def test_a_run_with_consistency_logs_both_terms_and_resumes_bit_exactly(synth_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    flags = ("--consistency-weight", "1", "--epochs", "1", "--labels", "8")
    landmarker.main(lm_args(synth_dir, whole, *flags))
    rows = [r for r in csv.DictReader(open(whole / "logs" / "metrics.csv")) if r["split"] == "train"]
    assert len(rows) == 4 and all(float(r["consistency"]) > 0 for r in rows)
    assert all(float(r["loss"]) == pytest.approx(float(r["point"]) + float(r["consistency"]), rel=1e-4) for r in rows)
    landmarker.main(lm_args(synth_dir, cut, *flags, "--max-steps", "2"))
    landmarker.main(["--resume", "--ckpt-dir", str(cut / "checkpoints"), "--log-dir", str(cut / "logs"), "--max-steps",
                     "4"])
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (whole, cut))
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_landmarks_are_matched_by_name_and_the_model_keeps_their_names(synth_dir, tmp_path):
    """Points are matched by column position: a val CSV with the same landmarks in another order is refused, not
    scored against the wrong ones; a new model keeps the training CSV's names (its output order)."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    rows = list(csv.reader(open(data / "val_landmarks.csv", newline="")))
    swapped = [[r[0], r[3], r[4], r[1], r[2], *r[5:]] for r in rows]  # the first two landmarks' columns swapped
    with open(data / "val_landmarks.csv", "w", newline="") as f:
        csv.writer(f).writerows(swapped)
    with pytest.raises(DataError, match=re.escape(f"{data / 'val_landmarks.csv'}: landmarks tragus, ear_canal")):
        landmarker.main(lm_args(data, tmp_path / "a", "--max-steps", "1", "--epochs", "1"))
    assert not (tmp_path / "a").exists()
    landmarker.main(lm_args(synth_dir, tmp_path / "b", "--max-steps", "1", "--epochs", "1"))
    model = landmarker.load_landmarker(tmp_path / "b" / "checkpoints" / "best.pt")
    assert model.cfg.names == tuple(h.removesuffix("_x") for h in rows[0][1::2])  # ear_canal, tragus, ... (synth's)
    assert len(model.cfg.names) == 8 and model.cfg.names[:2] == ("ear_canal", "tragus")
