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
