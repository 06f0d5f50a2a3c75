"""Where the commands write, checked before the work starts so that no run ends unable to save.

``--json PATH`` files and ``--output DIR`` folders are made (with their parents) or refused up
front; a refusal names the option and why. Inside :func:`new_folders`, the folders made that way (or by
:func:`make_folders`) are removed again, while still empty, when the command fails: a refused run leaves
nothing behind. :func:`write_json` writes a file whole or not at all, and :func:`exclusive` keeps a second
writer out of a folder that one is writing.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import warnings
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Callable, Iterator, List, Optional

from .errors import ConfigError

__all__ = ["default_run_dir", "exclusive", "make_folders", "new_folders", "plural", "prepare_output_dir",
           "prepare_output_file", "write_json"]

_MADE: ContextVar[Optional[List[str]]] = ContextVar("tempme_made_folders", default=None)


def plural(count: int, noun: str, many: str = "") -> str:
    """``"1 video"``, ``"2 videos"`` (``many`` for irregular plurals)."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def _missing(folder: str) -> List[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def make_folders(folder: str) -> None:
    """``os.makedirs(folder, exist_ok=True)`` (an ``OSError`` when it cannot), recording for
    :func:`new_folders` the folders it made."""
    missing = _missing(folder)
    os.makedirs(folder, exist_ok=True)
    made = _MADE.get()
    if made is not None:
        made.extend(reversed(missing))  # parents first; removed in the reverse order


def _make_folder(folder: str, option: str) -> None:
    try:
        make_folders(folder)
    except OSError as err:
        raise ConfigError(f"{option}: cannot create the folder {folder} ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: the folder {folder} is not writable")


# What the commands read files through (argument -> how messages name it): an output file may not be one.
INPUT_OPTIONS = {"data": "--data file", "videos": "video list", "source": "frames source", "model": "--model file",
                 "pretrained": "--pretrained file", "checkpoint": "--checkpoint file",
                 "official_checkpoint": "--official-checkpoint file", "resume": "--resume file", "like": "--like video"}


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.abspath(a) == os.path.abspath(b)


def prepare_output_file(path: str, option: str, args=None) -> str:
    """Make ``path``'s folder and check a file can be written there; returns ``path``.

    Args:
        path: the file a command will write at its end.
        option: the option that named it (``--json``), for the message.
        args: the command's parsed options: ``path`` may not be a file one of them reads
            (:data:`INPUT_OPTIONS`), which the write would replace.
    """
    for name, label in INPUT_OPTIONS.items() if args is not None else ():
        given = getattr(args, name, None)
        if isinstance(given, str) and os.path.isfile(given) and _same_file(path, given):
            raise ConfigError(f"{option} {path} is the {label} the command reads; writing it would replace that "
                              f"file: give another path")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a folder; give a file path")
    if _written_in_place(path):
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{option} {path} is not writable")
        return path
    target = os.path.realpath(path)  # replaced by write_json: the folder it lies in must be writable
    _make_folder(os.path.dirname(target), f"{option} {path}")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise ConfigError(f"{option} {path} exists and is not writable")
    return path


def _written_in_place(path: str) -> bool:
    """Whether ``path`` is no plain file to replace but one to write into: ``/dev/stdout`` and the like (whose
    link leads to a pipe or a terminal), a named pipe, a device."""
    if os.path.abspath(path).startswith(("/dev/", "/proc/")):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a new file (or a link to one), or one that cannot be (its folder is a file)
        return False


def write_json(path: str, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path``, whole or not at all.

    The text is made before the file is touched, so a value JSON cannot hold leaves an earlier file as it
    was. A regular file (or a new one) is replaced atomically (:func:`~tempme_fast.checkpoint.atomic_write`
    on the file a link points to), so a kill mid-write leaves the earlier file. ``/dev/stdout`` and the
    like, a named pipe or a device are written into, after what the process printed (appended: with
    ``--json /dev/stdout > file`` the JSON follows the table).
    """
    from .checkpoint import atomic_write

    data = (json.dumps(obj, indent=indent) + "\n").encode()
    if _written_in_place(path):
        sys.stdout.flush()
        sys.stderr.flush()
        with open(path, "ab") as f:
            f.write(data)
    else:
        atomic_write(path, lambda f: f.write(data))  # (which writes through a link to its file)


@contextlib.contextmanager
def exclusive(lock: str, refusal: Callable[[str], str]) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` while the block runs, for one writer at a time.

    A lock another process holds raises :class:`ConfigError` with ``refusal(holder)``, where ``holder``
    is ``"process <pid>"`` (the lock file holds its holder's pid) or ``"another process"``. The lock is
    ``flock``, so it goes with its process however that ends; the file is removed when the block ends. A
    file system that cannot lock, or a system without ``fcntl``, runs the block unlocked, with a warning.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    unlocked = "no fcntl here" if fcntl is None else None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not unlocked:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if unlocked or _still_at(fd, lock):
                break  # else the holder before removed the file after this one opened it: lock the new one
        except OSError as err:
            busy = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = os.read(fd, 32).decode(errors="replace").strip() if busy else ""  # (before the holder ends)
            os.close(fd)
            if not busy:
                unlocked = err.strerror or str(err)
                continue
            raise ConfigError(refusal(f"process {holder}" if holder.isdigit() else "another process")) from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        if unlocked:
            warnings.warn(f"{lock}: not locked ({unlocked}); run one writer at a time", stacklevel=3)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)  # while still holding it: a process that opened it meanwhile sees it gone and retries
        os.close(fd)


def _still_at(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def prepare_output_dir(path: str, option: str) -> str:
    """Make the folder ``path`` (and its parents) or say why not; returns ``path``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file; give a folder")
    _make_folder(path, f"{option} {path}")
    return path


class _Made:
    def __init__(self, folders: List[str]):
        self.folders = folders

    def remove_empty(self) -> None:
        """Remove the folders made so far that are empty, deepest first; one that holds anything (a
        checkpoint, a result) is kept, and so are its parents."""
        for folder in reversed(self.folders):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or gone)
                pass
        self.folders.clear()


@contextlib.contextmanager
def new_folders() -> Iterator[_Made]:
    """Record the folders that :func:`prepare_output_file` and :func:`prepare_output_dir` make in this block.

    An exception in the block removes those still empty; a command that fails by its exit status calls
    ``remove_empty()`` on the yielded object. A folder that existed before is never removed.
    """
    folders: List[str] = []
    token = _MADE.set(folders)
    made = _Made(folders)
    try:
        yield made
    except BaseException:
        made.remove_empty()
        raise
    finally:
        _MADE.reset(token)


def default_run_dir(command: str, root: str = "runs") -> str:
    """``runs/<command>-<UTC date-time>``: a fresh folder name for a run given no ``--output``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(root, f"{command}-{stamp}"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{command}-{stamp}-{n}")
    return path
