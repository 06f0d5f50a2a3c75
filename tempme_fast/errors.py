"""The exceptions that mean "the input was wrong", as opposed to a bug.

Each one says what was wrong and what would be valid. The ``tempme`` command prints them in one
line and exits with status 2; any other exception keeps its traceback, so a real bug is never
disguised as a bad option. All are ``ValueError`` subclasses, so code that caught ``ValueError``
before still catches them.

    try:
        ...
    except TempMeError as err:      # ConfigError, UnsupportedModelError, WeightsUnavailableError
        print(err)
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple, Type

__all__ = ["ConfigError", "TempMeError", "TrainingDiverged", "UnsupportedModelError", "WeightsUnavailableError",
           "as_config_error", "check_int"]


class TempMeError(ValueError):
    """Base class of the input errors this library raises on purpose."""


class ConfigError(TempMeError):
    """An option, a file or a setting that cannot be used (a bad path, device, count, data layout)."""


class UnsupportedModelError(TempMeError, TypeError):
    """A model TempMe cannot patch (not a ViT with a class token, another pooling, patch dropout).

    Also a ``TypeError``: the model object is of a kind the patch does not take.
    """


class WeightsUnavailableError(ConfigError):
    """Pretrained weights that are neither cached nor downloadable from here (offline, unknown tag)."""


class TrainingDiverged(TempMeError):
    """Training made the loss or the weights NaN or Inf: the run's settings (learning rate, precision,
    gradient clipping) let it diverge. No checkpoint is written from such weights."""


@contextlib.contextmanager
def as_config_error(what: str,
                    kinds: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError)) -> Iterator[None]:
    """Turn ``kinds`` raised inside the block into a :class:`ConfigError` prefixed with ``what``
    (no prefix when ``what`` is empty: the message already names the option).

    For steps whose only input is a user's file or option (reading a data layout, loading a
    checkpoint): there a ``ValueError`` means the file is wrong, not the code.
    """
    try:
        yield
    except TempMeError:
        raise
    except kinds as err:
        text = str(err)
        raise ConfigError(text if not what or text.startswith(what) else f"{what}: {text}") from err


def check_int(name: str, value, minimum: int = 1) -> None:
    """Refuse ``value`` unless it is an int (not a bool) ``>= minimum``, in a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")
