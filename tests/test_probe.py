"""probe.py: the heads and the correspondence on features that hold the answer, and on noise; the command on a tiny
teacher."""
import math

import pytest
import torch
import torch.nn.functional as F

import probe
from errors import DataError, OutputError
from probe import (GRID, PCK_AT, box_side, box_size, correspondence_pck, fit_head, landmark_scores, mask_iou,
                   mean_baseline, soft_argmax, standardise)

K = 4


def ears(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random landmark sets (n, K, 2) in pixels, inside [24, 104], and disk masks (n, 128, 128) around them."""
    g = torch.Generator().manual_seed(seed)
    centre = 54 + 20 * torch.rand(n, 1, 2, generator=g)  # (n, 1, 2)
    points = centre + 60 * (torch.rand(n, K, 2, generator=g) - 0.5)
    yy, xx = torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    r = 18 + 10 * torch.rand(n, 1, 1, generator=g)
    masks = (xx - centre[:, :, 0, None]) ** 2 + (yy - centre[:, :, 1, None]) ** 2 < r ** 2  # (n, 128, 128)
    return points, masks


def answer_maps(points: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Maps that hold the answer: per landmark, minus the squared distance (in cells) of each cell centre to it;
    and the mask's coverage of each cell. -> (n, K + 1, GRID, GRID)."""
    c = (torch.arange(GRID) + 0.5) * (128 / GRID)
    yy, xx = torch.meshgrid(c, c, indexing="ij")  # (G, G)
    d2 = ((xx - points[..., 0, None, None]) ** 2 + (yy - points[..., 1, None, None]) ** 2) / (128 / GRID) ** 2
    cover = F.adaptive_avg_pool2d(masks[:, None].float(), GRID)  # (n, 1, G, G)
    return torch.cat([-d2, cover], 1)


def test_soft_argmax_of_a_peaked_heatmap_is_the_cell_centre():
    logits = torch.full((1, 2, GRID, GRID), -1e4)
    logits[0, 0, 3, 10] = 0.0  # row 3, column 10
    logits[0, 1, 0, 0] = 0.0
    pos = soft_argmax(logits)
    cell = 128 / GRID
    assert torch.allclose(pos[0, 0], torch.tensor([10.5 * cell, 3.5 * cell]))
    assert torch.allclose(pos[0, 1], torch.tensor([0.5 * cell, 0.5 * cell]))


def test_scores_against_a_hand_computation():
    true = torch.tensor([[[10.0, 10.0], [30.0, 50.0]]])  # box 20 x 40: size sqrt(800)
    pred = true + torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # errors 5 and 0
    s = landmark_scores(pred, true)
    assert abs(s["error_px"] - 2.5) < 1e-6
    assert abs(s["nme"] - 2.5 / 800 ** 0.5) < 1e-6
    assert s["pck"] == 0.5  # 5 px > 0.1 x the longer side, 40 px
    assert torch.allclose(box_size(true), torch.tensor([800 ** 0.5]))
    assert torch.allclose(box_side(true), torch.tensor([40.0]))
    a = torch.zeros(2, 128, 128, dtype=torch.bool)
    b = a.clone()
    a[0, :64], b[0, :32] = True, True  # IoU 0.5; image 1: both empty, 1
    assert abs(mask_iou(a, b) - 0.75) < 1e-6


def test_heads_on_maps_that_hold_the_answer_are_near_exact_and_on_noise_near_the_mean():
    fit_pts, fit_masks = ears(300, 0)
    test_pts, test_masks = ears(100, 1)
    fit, test = standardise(answer_maps(fit_pts, fit_masks), answer_maps(test_pts, test_masks))
    pts, masks = fit_head(fit, fit_pts, fit_masks, test, steps=300, batch_size=64, seed=0)
    good = landmark_scores(pts, test_pts)
    data = {"fit_points": fit_pts, "fit_masks": fit_masks, "test_points": test_pts, "test_masks": test_masks}
    mean = mean_baseline(data)
    assert good["error_px"] < 2.0 and good["pck"] > 0.95, good  # 2 px: a quarter of a cell
    assert mask_iou(masks, test_masks) > 0.85

    noise_fit, noise_test = standardise(torch.randn(300, 8, GRID, GRID), torch.randn(100, 8, GRID, GRID))
    pts, masks = fit_head(noise_fit, fit_pts, fit_masks, noise_test, steps=300, batch_size=64, seed=0)
    bad = landmark_scores(pts, test_pts)
    assert bad["nme"] > 0.8 * mean["nme"], (bad, mean)  # noise teaches no more than the mean shape
    assert good["nme"] < 0.1 * mean["nme"]


def canonical_maps(offsets: torch.Tensor) -> torch.Tensor:
    """Features that name each point of a shape moved by `offsets` (n, 2) pixels: Fourier features of the cell
    centre's position relative to the offset (periods 128, 64 and 32 px) -> (n, 12, GRID, GRID)."""
    c = (torch.arange(GRID) + 0.5) * (128 / GRID)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    u = torch.stack([xx, yy])[None] - offsets[:, :, None, None]  # (n, 2, G, G)
    f = torch.tensor([1 / 128, 1 / 64, 1 / 32]).view(1, 1, 3, 1, 1) * 2 * torch.pi
    phase = (u[:, :, None] * f).flatten(1, 2)  # (n, 6, G, G)
    return torch.cat([phase.sin(), phase.cos()], 1)


def test_correspondence_finds_the_landmarks_only_in_features_that_name_them():
    g = torch.Generator().manual_seed(2)
    shape = 60 * (torch.rand(1, K, 2, generator=g) - 0.5)  # one template, box side ~50 px: PCK threshold ~5 px
    offsets = 40 + 48 * torch.rand(64, 2, generator=g)
    pts = shape + offsets[:, None]  # (64, K, 2), translated copies inside [10, 118]
    assert correspondence_pck(canonical_maps(offsets), pts, seed=0) > 0.95
    assert correspondence_pck(torch.randn(64, 12, GRID, GRID, generator=g), pts, seed=0) < 0.2


def test_the_probe_of_a_tiny_teacher_writes_its_table_beside_the_baselines_and_refuses_other_inputs(tiny_run,
                                                                                                     tmp_path, capsys):
    """The whole command on the run's splits: every source and head scored with finite figures, the table printed
    and written; the folder then refuses a probe of other data (no --force) and bad landmarks are one line."""
    out = tmp_path / "probe"
    args = [str(tiny_run.best), "--fit-images", "48", "--images", "16", "--steps", "30", "--probe-batch", "16"]
    result = probe.main([*args, "--out", str(out)])
    assert list(result["rows"]) == ["mean of the fit split", "teacher", "random-init encoder", "pixels"]
    assert [r["head"] for r in result["rows"]["teacher"]] == ["linear", "multi-scale"]
    assert [r["head"] for r in result["rows"]["pixels"]] == ["linear"]
    for rows in result["rows"].values():
        for r in rows:
            assert all(math.isfinite(r[k]) for k in ("nme", "error_px", "pck", "mask_iou")), r
            assert 0 <= r["pck"] <= 1 and 0 <= r["mask_iou"] <= 1
    assert result["n_fit"] == 48 and result["n_test"] == 16 and result["landmarks"] == 8
    printed = capsys.readouterr().out
    assert (out / "probe.md").read_text().strip() in printed and "| pixels | linear |" in printed
    before = (out / "probe.json").read_bytes()
    with pytest.raises(OutputError, match="probe.json: holds the results of checkpoint"):
        probe.main([*args, "--out", str(out), "--data", str(tiny_run.data_dir / "train_teacher.npy")])
    with pytest.raises(OutputError, match="probe.json: holds the results of .* steps 30"):  # other settings
        probe.main([*args[:-4], "--steps", "31", "--probe-batch", "16", "--out", str(out)])
    assert (out / "probe.json").read_bytes() == before
    spoiled = tmp_path / "spoiled"
    spoiled.mkdir()
    for name in ("val_teacher.npy", "val_masks.npy"):
        (spoiled / name).write_bytes((tiny_run.data_dir / name).read_bytes())
    lines = (tiny_run.data_dir / "val_landmarks.csv").read_text().splitlines()
    (spoiled / "val_landmarks.csv").write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # image 4 has no row
    with pytest.raises(DataError, match=r"val_landmarks.csv: no row for image 4"):
        probe.main([*args, "--out", str(tmp_path / "p2"), "--data", str(spoiled / "val_teacher.npy")])
    assert not (tmp_path / "p2").exists()
