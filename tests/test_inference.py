"""inference.run_dataset, the one loop that runs a model over a dataset (eval.py, eigenears.py, encode_dataset): every
kept sample once, in file order, in batches of batch_size, and fn's outputs concatenated as it returned them; data_file, which names the run's data files."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data import EarDataset
from errors import CheckpointError, DataError
from inference import checkpoint_info, data_file, run_dataset


def test_run_dataset_gives_fn_every_kept_sample_in_file_order(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (10, 128, 128, 3), dtype=np.uint8)
    arr[3] = 128  # blank: EarDataset drops it, so kept indices and file indices differ
    np.save(tmp_path / "x.npy", arr)
    ds = EarDataset(tmp_path / "x.npy", max_invalid=0.1)
    keep = [i for i in range(10) if i != 3]
    sizes = []

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes.append(len(x))
        return {"pixels": x, "mean": x.mean(dim=(1, 2, 3))}

    out = run_dataset(fn, ds, 4, torch.device("cpu"), 0, "test")
    assert list(out) == ["index", "pixels", "mean"] and sizes == [4, 4, 1]
    assert out["index"].dtype == torch.int64 and out["index"].tolist() == keep
    expected = torch.from_numpy(arr[keep]).permute(0, 3, 1, 2).float() / 255  # (9, 3, 128, 128) in [0, 1]
    torch.testing.assert_close(out["pixels"], expected, rtol=0, atol=0)
    assert out["mean"].shape == (9,)


def test_run_dataset_refuses_an_output_named_index(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="'index'"):
        run_dataset(lambda x: {"index": x}, EarDataset(tmp_path / "x.npy"), 2, torch.device("cpu"), 0, "test")


def test_data_file_is_the_runs_file_and_one_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "val_teacher.npy").write_bytes(b"")
    info = checkpoint_info({"run_config": {"data_dir": "d", "val_npy": None}})
    assert data_file(None, info, "val", "run/best.pt", "--data") == Path("d/val_teacher.npy")
    assert data_file("x.npy", info, "val", "run/best.pt", "--data") == Path("x.npy")  # given: taken as it is
    monkeypatch.chdir(tmp_path / "d")  # elsewhere: the run's relative path names nothing here
    with pytest.raises(DataError, match=re.escape(f"d/val_teacher.npy: file not found, the val file of the run that "
                                                  f"wrote run/best.pt (from {tmp_path / 'd'}: run this where the run "
                                                  f"started, or give the file with --data)")):
        data_file(None, info, "val", "run/best.pt", "--data")
    with pytest.raises(CheckpointError, match="holds no run config naming its train file; give it with --fit-data"):
        data_file(None, checkpoint_info({}), "train", "run/best.pt", "--fit-data")
