"""inference.run_dataset, the one loop that runs a model over a dataset (eval.py, eigenears.py, encode_dataset): every
kept sample once, in file order, in batches of batch_size, and fn's outputs concatenated as it returned them."""
import numpy as np
import pytest
import torch

from data import EarDataset
from inference import run_dataset


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
