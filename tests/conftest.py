"""Test setup shared by every test module.

Without a GPU, Triton kernels run in its interpreter, which reads TRITON_INTERPRET when triton is
first imported: set it here, before any test module imports tempme_fast's Triton ops.
"""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_the_language_once_a_launch() -> None:
    """Triton's interpreter patches ``triton.language`` for the interpreter at each launch (and undoes it after),
    and again, undoing nothing, at every call of one ``@triton.jit`` function from another, where the launch's
    patch already covers the modules those functions see: a quarter of the time of the merge kernels, which call
    small jit functions in their loops. Here a nested call whose modules the launch patched skips it; the kernels
    run the same patched language as before. Any other interpreter (no ``_patch_lang``, or one that does not
    return a scope to undo) is left as it is."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    real = getattr(interpreter, "_patch_lang", None)
    if real is None or getattr(real, "once_a_launch", False):
        return
    covered = None  # the modules that the running launch's patch covers (None between launches)

    def langs(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        nonlocal covered
        if covered is not None and langs(fn) <= covered:
            return interpreter._LangPatchScope()  # a nested call: nothing to patch, nothing to undo
        scope = real(fn)
        if covered is not None or not hasattr(scope, "restore"):
            return scope
        covered = langs(fn)  # a launch: undone by the scope's restore at its end (or on its error)
        undo = scope.restore

        def restore():
            nonlocal covered
            covered = None
            undo()
        scope.restore = restore
        return scope
    patch_lang.once_a_launch = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_a_launch()


@pytest.fixture(autouse=True, scope="session")
def _modules_that_bind_create_model_imported():
    """``tempme_fast.retrieval.cli`` binds ``loading.create_model`` by name when it is first imported, which the
    ``tempme`` command does on its first call. Were that call inside a test that patches ``create_model`` (to
    prove a command stops before it builds a model), the module would keep the stand-in for every later test of
    that process: imported here, before any test runs."""
    import tempme_fast.retrieval.cli  # noqa: F401

# ``-n auto`` (pytest-xdist) starts at most this many workers, and at most one per core and per
# GIB_PER_WORKER of available memory: a worker that builds the ViT-B models peaks near 3.1 GiB.
MAX_WORKERS = 8
GIB_PER_WORKER = 4


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _available_gib() -> float:
    """Memory available to new processes (Linux's MemAvailable, page cache included), else unbounded."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return float("inf")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, _cores(), int(_available_gib() // GIB_PER_WORKER)))


# Each of N workers takes its share of the cores: N workers with a torch thread per core each would
# keep every core switching between them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, _cores() // _WORKERS))


@pytest.fixture
def device() -> str:
    """Where kernels run: the GPU if there is one, else the CPU under the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tiny_model_file(tmp_path) -> str:
    """Path of the tiny model's open_clip JSON config (tests/tiny.py), for the command-line tools."""
    from tiny import TINY_JSON

    path = tmp_path / "tiny-vit.json"
    path.write_text(json.dumps(TINY_JSON))
    return str(path)


@pytest.fixture
def one_thread():
    """Tiny matrices: thread start-up costs more than the work on a small shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    # Tests marked ``interpreter`` run Triton kernels on CPU tensors: on a GPU machine they need
    # TRITON_INTERPRET=1 set before the run (the CPU test machines set it above).
    skip_interpreter = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "interpreter" in item.keywords and not interpreting:
            item.add_marker(skip_interpreter)
