"""Tests for data.read_identities: identity labels of the kept samples from hand-written CSVs beside the .npy
(X_index.csv column subject, X_factors.csv column identity), and the refusal of CSVs that do not fit the file."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import EarDataset, identity_files, read_identities  # noqa: E402
from errors import DataError  # noqa: E402

BLANK = 2  # the invalid (constant) sample of the file built by `ears`: not kept


@pytest.fixture
def ears(tmp_path) -> tuple[Path, EarDataset]:
    """tmp/x_teacher.npy: 6 random 16x16 images, sample BLANK constant (EarDataset keeps 0, 1, 3, 4, 5)."""
    arr = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    arr[BLANK] = 100
    path = tmp_path / "x_teacher.npy"
    np.save(path, arr)
    ds = EarDataset(path, max_invalid=0.5)
    assert ds.keep.tolist() == [0, 1, 3, 4, 5]
    return path, ds


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def test_subjects_become_codes_in_sorted_order_empty_is_unlabelled_only_kept_rows(ears):
    npy, ds = ears
    write(npy.with_name("x_index.csv"), "index,path,subject\n"
                                        "0,photos/bob/1.jpg,bob\n"
                                        "1,photos/2.jpg,\n"
                                        "2,photos/zoe/3.jpg,zoe\n"       # the blank sample: dropped
                                        "3,photos/alice/4.jpg,alice\n"
                                        "4,photos/bob/5.jpg,bob\n"
                                        "5,\"photos/a, b/6.jpg\",\"a, b\"\n")  # a quoted name with a comma
    labels = read_identities(npy, ds)
    # sorted subjects of the whole file: "a, b" 0, alice 1, bob 2, zoe 3
    assert labels.dtype == np.int64
    assert labels.tolist() == [2, -1, 1, 2, 0]


def test_factors_identity_column_integers_with_minus_one_unlabelled(ears):
    npy, ds = ears
    write(npy.with_name("x_factors.csv"), "helix_width,identity,tilt\n"
                                          "0.5,3,1.0\n0.2,7,0.0\n0.1,9,0.0\n0.3,-1,0.0\n0.4,3.0000,0.0\n0.6,0,0.0\n")
    assert read_identities(npy, ds).tolist() == [3, 7, -1, 3, 0]


def test_no_labels_without_a_csv_or_its_column(ears):
    npy, ds = ears
    assert read_identities(npy, ds) is None
    write(npy.with_name("x_factors.csv"), "helix_width,tilt\n" + "0.5,1.0\n" * 6)  # factors but no identity column
    write(npy.with_name("x_index.csv"), "index,path\n" + "".join(f"{i},p{i}.jpg\n" for i in range(6)))
    assert read_identities(npy, ds) is None
    assert [(p.name, c) for p, c in identity_files(npy)] == [("x_index.csv", "subject"), ("x_factors.csv", "identity")]


def test_index_csv_is_read_before_factors_and_factors_when_index_lacks_subjects(ears):
    npy, ds = ears
    write(npy.with_name("x_factors.csv"), "identity\n" + "".join(f"{10 + i}\n" for i in range(6)))
    write(npy.with_name("x_index.csv"), "index,path\n" + "".join(f"{i},p{i}.jpg\n" for i in range(6)))
    assert read_identities(npy, ds).tolist() == [10, 11, 13, 14, 15]  # index CSV without subject: factors
    write(npy.with_name("x_index.csv"), "index,path,subject\n" + "".join(f"{i},p{i}.jpg,s{i % 2}\n" for i in range(6)))
    assert read_identities(npy, ds).tolist() == [0, 1, 1, 0, 1]


@pytest.mark.parametrize("name, text, reason", [
    ("x_index.csv", "index,path,subject\n" + "".join(f"{i},p.jpg,a\n" for i in range(5)), "5 rows, expected one "
     "per sample of"),
    ("x_factors.csv", "identity\n" + "1\n" * 7, "7 rows, expected one per sample of"),
    ("x_index.csv", "index,path,subject\n0,p.jpg\n" + "1,p.jpg,a\n" * 5, "line 2 has 2 fields, the header 3"),
    ("x_factors.csv", "identity\n1\n2\n2.5\n1\n1\n1\n", "line 4, column identity: '2.5' is not an integer"),
    ("x_factors.csv", "identity\n1\n2\n-2\n1\n1\n1\n", "line 4, column identity: '-2' is not an integer"),
    ("x_factors.csv", "identity\n1\n2\nbob\n1\n1\n1\n", "line 4, column identity: 'bob' is not an integer"),
])
def test_csv_that_does_not_fit_the_file_is_a_data_error_naming_it(ears, name, text, reason):
    npy, ds = ears
    write(npy.with_name(name), text)
    with pytest.raises(DataError) as e:
        read_identities(npy, ds)
    assert str(e.value).startswith(f"{npy.with_name(name)}: ")
    assert reason in str(e.value)
