"""Files (checkpoints, index shards) that survive a crash, what reads them back, and the random-number
states a resumed run restores.

They serve every writer and reader of checkpoints (the trainer, :func:`tempme_fast.lora.save_lora`,
``tempme train`` and ``tempme eval``) without importing any of them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import random
import stat
import struct

import torch

from .errors import ConfigError

__all__ = ["atomic_save", "atomic_write", "file_sha256", "load_file", "rng_state", "set_rng_state"]


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the target's folder, fsync, then ``os.replace``.

    A crash at any point leaves the previous file or the new one, never a truncated one.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def load_file(path, what: str):
    """``torch.load`` of an existing file ``path``, tensors only, onto the CPU.

    A file that ``torch.load`` cannot read (not a torch file, truncated, or holding objects other than
    tensors and plain values) raises :class:`tempme_fast.errors.ConfigError` that begins ``"{what} {path}:"``,
    the option or argument that named it.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # (the unpickler of other bytes, such as the text a failed download leaves, raises IndexError or KeyError)
    except (RuntimeError, EOFError, pickle.UnpicklingError, IndexError, KeyError, ValueError, UnicodeDecodeError,
            struct.error) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "weights only" in reason.lower():  # torch's paragraph that suggests weights_only=False
            reason = "with weights_only=True it reads tensors and plain values only; this file holds something else"
        raise ConfigError(f"{what} {path}: not a file torch.load can read ({reason})") from err


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's content: weights and checkpoints are recognised by it, not by their name or
    place. Kept per (real path, size, modification time), so a file asked about again is not read again."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write) -> None:
    """Call ``write(file)`` on ``.<name>.<pid>.tmp`` beside ``path``, fsync, then ``os.replace`` it to ``path``.

    A ``path`` that is a link is written where it leads (the link stays a link), and a file that is replaced keeps
    its permission bits (a private 0600 checkpoint is not made world-readable by the umask)."""
    path = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:  # (a new file: the umask's mode)
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict:
    """The torch, CUDA (when present), Python and numpy RNG states, as plain values and tensors."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but its state is optional here
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain Python values, so checkpoints load with torch.load(weights_only=True).
    state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
