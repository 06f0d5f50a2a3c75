"""What a benchmark machine has, written before anything is measured: the card and its driver, Python,
torch, triton, the C compiler and ``Python.h`` (Triton builds its kernel launchers with them), and the
packages the tests and benchmarks import. On a GPU it also compiles and launches one tiny Triton kernel,
so a machine that cannot build launchers is found in seconds, not after the first stage times out, and
launches it through ``tempme_fast.ops.launch`` both ways ("cached launch": the result, and the host
microseconds per launch of Triton's path and of the cached one). When that line does not start with
"ok", ``benchmarks.suite`` runs the later stages with ``TEMPME_FAST_CACHED_LAUNCH=0``. Last, it times the probe
that the benchmarks run after every row (``benchmarks.context``) on the healthy context ("context probe").

    python -m benchmarks.preflight environment.txt
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from typing import Dict, List, Tuple

PACKAGES = ("torch", "triton", "open_clip", "torchvision", "timm", "numpy", "matplotlib", "pytest", "hypothesis",
            "PIL", "ftfy", "wcwidth", "regex", "huggingface_hub", "safetensors", "av")


def _run(argv: List[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__}: {e})"
    text = (done.stdout or done.stderr).strip()
    return text if done.returncode == 0 else f"failed (exit {done.returncode}): {text[:300]}"


def package_versions() -> List[Tuple[str, str]]:
    """(name, "version at path") of each package, or why it does not import."""
    found = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # any import failure is a finding to record, not a reason to stop
            found.append((name, f"missing ({type(e).__name__}: {str(e)[:200]})"))
            continue
        where = os.path.dirname(getattr(module, "__file__", "") or "")
        found.append((name, f"{getattr(module, '__version__', '?')} at {where}"))
    return found


def c_compiler() -> str:
    """The compiler Triton would pick (``$CC``, else the first of cc, gcc, clang on PATH) and its version."""
    path = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if not path:
        return "none found (Triton cannot build its launchers: set CC or install gcc)"
    return f"{path}: {_run([path, '--version']).splitlines()[0]}"


def python_header() -> str:
    include = sysconfig.get_paths()["include"]
    header = os.path.join(include, "Python.h")
    return f"present ({header})" if os.path.exists(header) else f"MISSING ({header}): Triton cannot build launchers"


def gpu_facts() -> Dict[str, str]:
    import torch

    facts = {"cuda available": str(torch.cuda.is_available()), "torch cuda": str(torch.version.cuda),
             "cudnn": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts[f"gpu {i}"] = f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, " \
                                f"{p.multi_processor_count} SMs"
    if shutil.which("nvidia-smi"):
        facts["nvidia-smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                    "clocks.max.mem,power.limit,temperature.gpu", "--format=csv,noheader"])
    else:
        facts["nvidia-smi"] = "not on PATH"
    return facts


def _add_one_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):  # x_ptr: [n] fp32
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)
    return _add_one


def triton_launch() -> str:
    """Compile and run a one-block Triton kernel on the GPU: proves the compiler, ptxas and launcher work."""
    import torch

    if not torch.cuda.is_available():
        return "skipped (no CUDA device)"
    try:
        x = torch.zeros(100, device="cuda")
        _add_one_kernel()[(1,)](x, 100, BLOCK=128)
        torch.cuda.synchronize()
        return "ok" if bool((x == 1).all()) else "WRONG RESULT"
    except Exception as e:  # the point is to record why it fails
        return f"FAILED ({type(e).__name__}: {str(e)[:500]})"


def cached_launch(launches: int = 2000) -> str:
    """``tempme_fast.ops.launch`` on the GPU: the same one-block kernel launched through Triton's path,
    through the cached ``launch`` and through a ``Launcher`` (all but the first launch of the variant
    skip Triton's binding), the result checked, and the host microseconds per launch of each path (a
    kernel this small is bound by them). "ok" starts the line only when every launch added its one."""
    import time

    import torch

    if not torch.cuda.is_available():
        return "skipped (no CUDA device)"
    try:
        from tempme_fast.ops import launch
    except Exception as e:  # the point is to record why it fails
        return f"FAILED ({type(e).__name__}: {str(e)[:500]})"
    previous = launch.CACHED
    try:
        kernel, x = _add_one_kernel(), torch.zeros(100, device="cuda")
        launcher = launch.Launcher(kernel, (1,), (100,), {"BLOCK": 128})
        paths = {"Triton's path": lambda: launch.launch(kernel, (1,), x, 100, BLOCK=128),
                 "cached": lambda: launch.launch(kernel, (1,), x, 100, BLOCK=128),
                 "Launcher": lambda: launcher(x)}
        us = {}
        for _ in range(2):
            for path, call in paths.items():
                launch.CACHED = path != "Triton's path"
                for _ in range(10):
                    call()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(launches):
                    call()
                torch.cuda.synchronize()
                us[path] = min(us.get(path, float("inf")), (time.perf_counter() - t0) / launches * 1e6)
        expected = 2 * len(paths) * (launches + 10)
        if not bool((x == expected).all()):
            return f"WRONG RESULT (x = {x[0].item():.0f}, expected {expected})"
        return "ok (host us per launch: " + ", ".join(f"{path} {t:.1f}" for path, t in us.items()) + ")"
    except Exception as e:  # the point is to record why it fails
        return f"FAILED ({type(e).__name__}: {str(e)[:500]})"
    finally:
        launch.CACHED = previous


def context_probe(probes: int = 200) -> str:
    """``benchmarks.context.context_lost`` on the GPU's healthy context: that it says "not lost", and the host
    microseconds one probe costs (the benchmarks run it after every row, outside the timed calls)."""
    import time

    import torch

    if not torch.cuda.is_available():
        return "skipped (no CUDA device)"
    from .context import context_lost

    try:
        device = torch.device("cuda")
        torch.ones(1, device=device).add_(1).item()  # the context initialised, as after a benchmark's first row
        lost = [context_lost(device) for _ in range(10)]
        t0 = time.perf_counter()
        for _ in range(probes):
            lost.append(context_lost(device))
        us = (time.perf_counter() - t0) / probes * 1e6
    except Exception as e:  # the point is to record why it fails
        return f"FAILED ({type(e).__name__}: {str(e)[:500]})"
    if any(lost):
        return f"WRONG RESULT (a healthy context probed as lost {sum(lost)} of {len(lost)} times)"
    return f"ok (host us per probe: {us:.1f})"


def collect() -> List[Tuple[str, str]]:
    facts = [("python", f"{platform.python_version()} at {sys.executable}"),
             ("platform", platform.platform()), ("cpu count", str(os.cpu_count()))]
    facts += [(k, v) for k, v in gpu_facts().items()]
    facts += package_versions()
    facts += [("C compiler", c_compiler()), ("Python.h", python_header())]
    for var in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "PYTHONPATH"):
        facts.append((f"${var}", os.environ.get(var, "unset")))
    facts.append(("triton launch", triton_launch()))
    facts.append(("cached launch", cached_launch()))
    facts.append(("context probe", context_probe()))
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=None, help="text file to write (default: print only)")
    args = parser.parse_args(argv)
    text = "\n".join(f"{k}: {v}" for k, v in collect()) + "\n"
    print(text, end="", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
