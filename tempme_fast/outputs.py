"""Where the commands write, checked before the work starts so that no run ends unable to save.

``--json PATH`` files and ``--output DIR`` folders are made (with their parents) or refused up
front; a refusal names the option and why.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from .errors import ConfigError

__all__ = ["default_run_dir", "plural", "prepare_output_dir", "prepare_output_file"]


def plural(count: int, noun: str, many: str = "") -> str:
    """``"1 video"``, ``"2 videos"`` (``many`` for irregular plurals)."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def _make_folder(folder: str, option: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option}: cannot create the folder {folder} ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: the folder {folder} is not writable")


def prepare_output_file(path: str, option: str) -> str:
    """Make ``path``'s folder and check a file can be written there; returns ``path``.

    Args:
        path: the file a command will write at its end.
        option: the option that named it (``--json``), for the message.
    """
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a folder; give a file path")
    _make_folder(os.path.dirname(os.path.abspath(path)), f"{option} {path}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path} exists and is not writable")
    return path


def prepare_output_dir(path: str, option: str) -> str:
    """Make the folder ``path`` (and its parents) or say why not; returns ``path``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file; give a folder")
    _make_folder(path, f"{option} {path}")
    return path


def default_run_dir(command: str, root: str = "runs") -> str:
    """``runs/<command>-<UTC date-time>``: a fresh folder name for a run given no ``--output``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(root, f"{command}-{stamp}"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{command}-{stamp}-{n}")
    return path
