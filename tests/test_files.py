"""files.py: a write either lands whole or leaves the previous file and no PATH.tmp, whatever way it ends."""
import pytest

import files
from files import atomic_write, tmp_path, write_outputs


class Boom(Exception):
    pass


def test_a_clean_write_replaces_the_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # nothing is visible before the rename
    assert path.read_bytes() == b"new" and not tmp_path_exists(path)


@pytest.mark.parametrize("exc", [OSError("disk full"), Boom("not an OSError"), KeyboardInterrupt()])
def test_every_failure_keeps_the_previous_file_and_removes_the_tmp(tmp_path, exc):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_write(path) as f:
            f.write(b"half")
            raise exc
    assert path.read_bytes() == b"old" and not tmp_path_exists(path)


def test_a_failed_first_write_creates_nothing(tmp_path):
    path = tmp_path / "new.bin"
    with pytest.raises(Boom):
        with atomic_write(path) as f:
            f.write(b"half")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [OSError("disk full"), Boom("not an OSError"), KeyboardInterrupt()])
def test_outputs_are_all_or_nothing(tmp_path, exc):
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    a.write_bytes(b"old a")

    def fail(f):
        f.write(b"half")
        raise exc
    with pytest.raises(type(exc)):
        write_outputs({a: lambda f: f.write(b"new a"), b: fail})
    assert a.read_bytes() == b"old a" and not b.exists()
    assert not tmp_path_exists(a) and not tmp_path_exists(b)
    write_outputs({a: lambda f: f.write(b"new a"), b: lambda f: f.write(b"new b")})
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"
    assert not tmp_path_exists(a) and not tmp_path_exists(b)


def tmp_path_exists(path) -> bool:
    return tmp_path(path).exists()


def test_a_folder_a_live_run_holds_is_refused_as_an_output_of_any_command(tmp_path):
    """check_output_dir, which every command runs on its outputs, refuses a held folder naming the holder, and frees
    it with the holder; what is checked is the nearest existing folder."""
    run = tmp_path / "run"
    with files.hold_folders([run], "train.py --ckpt-dir run"):
        for out in (run, run / "eval"):
            with pytest.raises(ValueError, match=rf"^{run}: in use by train\.py --ckpt-dir run \(pid \d+, since "):
                files.check_output_dir(out)
        files.check_output_dir(tmp_path / "elsewhere")
    files.check_output_dir(run / "eval")
    assert sorted(p.name for p in run.iterdir()) == [files.LOCK]


def test_two_commands_writing_into_one_folder_at_once_never_mix_their_files(tmp_path):
    """write_outputs holds its folders (a lock outside them): a second writer at the same moment is refused and
    writes nothing, so a set of files (images and their labels) always comes from one command."""
    from errors import OutputError
    out = tmp_path / "out"
    with files.writing({out}):
        with pytest.raises(OutputError, match=rf"^{out}: another command is writing its results there"):
            write_outputs({out / "a.txt": lambda f: f.write(b"second")})
        assert not out.exists() or not any(out.iterdir())
    write_outputs({out / "a.txt": lambda f: f.write(b"first")})
    assert (out / "a.txt").read_bytes() == b"first" and [p.name for p in out.iterdir()] == ["a.txt"]


def test_a_command_claims_its_output_folder_from_its_first_check_to_its_write(tmp_path):
    """Two commands side by side into one folder: the second is refused at its start (one line, exit 1) while the
    first holds the folder (claim), instead of replacing the first's results at its end; after the first's write
    the folder is free again."""
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "d"
    cmd = [sys.executable, str(ROOT / "synth.py"), "--out", str(out), "--n-train", "2", "--n-val", "1"]
    files.check_replace(out / "result.json", {"checkpoint": "a.pt"}, force=False)  # this process's command starts
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and not out.exists()
    assert second.stderr.strip().splitlines() == [f"error: {out.resolve()}: another command is writing its results "
                                                  f"there at this moment; run one at a time, or give each its own "
                                                  f"output folder"]
    write_outputs({out / "result.json": files.save_json({"checkpoint": "a.pt"})})  # its results: the claim ends
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0
    assert (out / "train_teacher.npy").exists() and (out / "result.json").exists()


def test_a_folder_of_no_earlier_result_keeps_the_users_files(tmp_path):
    """eval / eigenears / probe into a folder that holds no result of theirs: a file there with the name of one they
    write (or of an earlier figure eval removes) is the user's: refused in one line, nothing written; --force, or the
    command's own earlier result there, lets them replace it."""
    from errors import OutputError
    out = tmp_path / "mine"
    out.mkdir()
    (out / "retrieval.png").write_text("my figure")
    (out / "notes.md").write_text("my notes")
    results = {out / "result.json": files.save_json({"checkpoint": "a.pt"}), out / "per_image.csv": files.save_json([])}
    for also, removes in (({out / "retrieval.png": files.save_json([])}, []), ({}, [out / "retrieval.png"])):
        files.check_replace(out / "result.json", {"checkpoint": "a.pt"}, force=False)
        with pytest.raises(OutputError, match=rf"mine: holds retrieval\.png already, and no result\.json of an "
                                               rf"earlier run of this command: choose another --out, or pass --force"):
            write_outputs({**results, **also}, removes=removes)
        assert sorted(p.name for p in out.iterdir()) == ["notes.md", "retrieval.png"]
    files.check_replace(out / "result.json", {"checkpoint": "a.pt"}, force=True)
    write_outputs({**results, out / "retrieval.png": files.save_json([])})
    assert (out / "retrieval.png").read_text().strip() == "[]" and (out / "notes.md").read_text() == "my notes"
    files.check_replace(out / "result.json", {"checkpoint": "a.pt"}, force=False)  # its own results: rerun replaces
    write_outputs(results, removes=[out / "retrieval.png"])
