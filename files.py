"""Writing files so that a crash never leaves a half-written or lost one: every writer of the project goes through
`atomic_write` (one file) or `write_outputs` (several files that belong together). `torch_file_problem` tells a file
that torch.save did not write before torch.load reads it.

    with atomic_write(path) as f:      # f: an open binary file at PATH.tmp
        torch.save(state, f)           # on success PATH.tmp is fsynced and renamed over PATH; on any exception
                                       # (KeyboardInterrupt included) it is removed and PATH is untouched
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock, Timeout

from errors import OutputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Writer = Callable[[io.BufferedWriter], None]  # writes one file's content to an open binary file
LOCK = ".lock"  # in a folder a live run owns (hold_folders): the OS lock, and the text naming its holder


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` (an existing file) is not something torch.save wrote, from its first bytes, or None when it may be:
    torch.save writes a zip archive (PK...), and before torch 1.6 a pickle (protocol 2+: 0x80). On any other file
    torch.load's weights-only unpickler fails with a long message that advises unsafe loading."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return None
    what = "an empty file" if not head else f"it starts with {head!r}"
    return f"not a PyTorch file ({what}; torch.save writes a zip archive)"


def tmp_path(path: Path) -> Path:
    """Where `path` is written before the rename: PATH.tmp, in the same folder (so the rename is atomic)."""
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Open PATH.tmp for binary writing; on a clean exit flush, fsync and rename it to PATH. On any exception
    (BaseException: Ctrl-C too) PATH.tmp is removed, PATH keeps its previous content, and the exception goes on."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_outputs(files: dict[Path, Writer], removes: list[Path] = ()) -> None:
    """Write every file to PATH.tmp first, then rename them all: a failure while writing any of them leaves every
    earlier file intact (none is replaced). files: final path -> function writing the content to an open file. The
    folders are held while writing (`writing`): a second command writing into one at that moment is an OutputError.
    The command's claims on them (claim) end with it: its results are written. A file of a folder that held no
    earlier result of the command is never written over, nor one of `removes` (the earlier results the caller
    deletes next) removed (check_taken)."""
    folders = {Path(p).parent for p in files}
    try:
        check_taken([*files, *removes])
        with writing(folders):
            _write_all(files)
    finally:
        release(folders)


@contextmanager
def writing(folders: set[Path]) -> Iterator[None]:
    """Hold, while the block writes, an OS lock per folder kept outside it (in the temp folder, named by a hash of
    the folder's path: nothing is added to the user's folder): a second writer into one of them at the same moment
    is an OutputError, never a mix of the two commands' files. Folders this process claimed are held already."""
    with ExitStack() as stack:
        for folder in sorted({f.resolve() for f in folders} - set(_CLAIMED)):
            stack.callback(_lock_folder(folder).release)
        yield


_CLAIMED: dict[Path, FileLock] = {}  # output folders this process holds until it ends (claim)
_FRESH: dict[Path, Path] = {}  # claimed folders that held no result of this command -> that result (check_replace)


def check_taken(paths) -> None:
    """OutputError naming them where any of `paths` exists in a folder that held no earlier result of this command
    (check_replace without force): such files are the user's, never written over or removed."""
    taken: dict[Path, list[str]] = {}
    for path in map(Path, paths):
        if (folder := path.parent.resolve()) in _FRESH and path.exists():
            taken.setdefault(folder, []).append(path.name)
    for folder, names in taken.items():
        raise OutputError(f"{folder}: holds {', '.join(sorted(names))} already, and no {_FRESH[folder].name} of an "
                          f"earlier run of this command: choose another --out, or pass --force to replace them")


def claim(folder: str | os.PathLike) -> None:
    """Hold the output folder `folder` (the lock of `writing`) from a command's first check of it until its results
    are written there (write_outputs, release) or the process ends (the OS releases it then, however it ends): a
    second command into it meanwhile is an OutputError at its start, instead of replacing the first's results at
    its end. Claiming a folder again is a no-op."""
    folder = Path(folder).resolve()
    if folder not in _CLAIMED:
        _CLAIMED[folder] = _lock_folder(folder)


def release(folders: set[Path] | list[Path]) -> None:
    """End this process's claims on `folders` (those it holds; others are ignored)."""
    for folder in {Path(f).resolve() for f in folders}:
        _FRESH.pop(folder, None)
        if (lock := _CLAIMED.pop(folder, None)) is not None:
            lock.release()


def _lock_folder(folder: Path) -> FileLock:
    """The OS lock of an output folder (`writing`, `claim`), acquired without waiting; OutputError when another
    command holds it."""
    locks = Path(tempfile.gettempdir()) / "ear-teacher-locks"
    locks.mkdir(exist_ok=True)
    lock = try_lock(locks / (hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".lock"))
    if lock is None:
        raise OutputError(f"{folder}: another command is writing its results there at this moment; run one at a "
                          f"time, or give each its own output folder")
    return lock


def _write_all(files: dict[Path, Writer]) -> None:
    tmps = {}
    try:
        for path, write in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps[path] = tmp_path(path)
            with open(tmps[path], "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in tmps.items():
        os.replace(tmp, path)



@contextmanager
def hold_folders(paths: list[str | os.PathLike], holder: str) -> Iterator[None]:
    """Own the folders `paths` (created where missing) while the block runs: an OS lock on each one's LOCK file
    (filelock; the OS releases it when the process ends in any way, SIGKILL included), the file naming `holder` and
    this process. A folder that another live process (or another lock of this one) holds -> ValueError 'PATH: in
    use by HOLDER', and no folder is held."""
    with ExitStack() as stack:
        for path in dict.fromkeys(Path(p).resolve() for p in paths):  # a folder given twice is held once
            path.mkdir(parents=True, exist_ok=True)
            lock = try_lock(path / LOCK)
            if lock is None:
                raise ValueError(in_use(path))
            stack.callback(lock.release)
            (path / LOCK).write_text(f"{holder} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        yield


def check_not_held(path: str | os.PathLike) -> None:
    """ValueError 'PATH: in use by HOLDER' when a live process holds the folder `path` (hold_folders); creates
    nothing."""
    lock_file = Path(path) / LOCK
    if not lock_file.is_file():
        return
    lock = try_lock(lock_file)
    if lock is None:
        raise ValueError(in_use(path))
    lock.release()


def try_lock(lock_file: Path) -> FileLock | None:
    """The OS lock on `lock_file` (filelock), acquired without waiting; None when another holds it."""
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def in_use(path: str | os.PathLike) -> str:
    """'PATH: in use by HOLDER; ...': the refusal of a folder a live process holds, naming the holder."""
    holder = (Path(path) / LOCK).read_text().strip() or "another process"
    return f"{path}: in use by {holder}; wait for it to end or choose another folder"


def check_replace(result: str | os.PathLike, inputs: dict[str, str], force: bool) -> None:
    """The one rule of every command that writes results into a folder: ValueError where `result` (a JSON file the
    command writes, holding its inputs under the same keys) exists from other inputs, naming them, unless `force`.
    The same inputs again (the command rerun) may replace their own results. The folder is claimed first (claim):
    OutputError while another command works on results there. Where `result` does not exist, the folder's files are
    the user's: write_outputs refuses to write over them (check_taken)."""
    result = Path(result)
    claim(result.parent)
    try:
        _check_replace(result, inputs, force)
    except ValueError:
        release([result.parent])
        raise
    if not force and not result.exists():  # its files there are the user's (check_taken)
        _FRESH[result.parent.resolve()] = result


def _check_replace(result: Path, inputs: dict[str, str], force: bool) -> None:
    if force or not result.exists():
        return
    try:
        saved = json.loads(result.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = {}
    same = lambda a, b: a == b or (isinstance(a, str) and Path(a).resolve() == Path(b).resolve())  # noqa: E731
    if not isinstance(saved, dict) or not all(same(saved.get(k), v) for k, v in inputs.items()):
        was = ", ".join(f"{k} {saved.get(k)}" for k in inputs) if isinstance(saved, dict) else "something else"
        raise ValueError(f"{result}: holds the results of {was}: pass --force to replace them, or choose another "
                         f"--out")


def check_output_dir(path: str | os.PathLike) -> None:
    """Before the long work of a command: ValueError 'PATH: reason' if `path` cannot become or be the folder its
    outputs go to: it, or a folder above it, exists and is not a folder, or the nearest existing folder is not
    writable, or a live run holds it (hold_folders). Creates nothing."""
    path = Path(path)
    for p in (path, *path.absolute().parents):
        if p.is_dir():
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{path}: {'it' if p == path else p} is not writable")
            check_not_held(p)
            return
        if p.exists() or p.is_symlink():
            raise ValueError(f"{path}: {'exists and is not a folder' if p == path else f'{p} is not a folder'}")


def check_output_file(path: str | os.PathLike) -> None:
    """check_output_dir for the folder of an output file, and ValueError if `path` itself is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a file name")
    check_output_dir(path.parent)


# -----------------------------------------------------------------------------
# writers for write_outputs

def save_json(obj) -> Writer:
    """Indented JSON."""
    return lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode())


def save_text(text: str) -> Writer:
    """UTF-8 text, with a final newline."""
    return lambda f: f.write((text.rstrip("\n") + "\n").encode())


def save_npy(arr: np.ndarray) -> Writer:
    """A plain .npy (no pickle)."""
    return lambda f: np.save(f, arr, allow_pickle=False)


def save_figure(fig: Figure) -> Writer:
    """`fig` as PNG (dpi 100); the figure is closed once written."""
    def write(f: io.BufferedWriter) -> None:
        import matplotlib.pyplot as plt  # here: only the scripts that draw figures pay for importing pyplot
        fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
    return write
