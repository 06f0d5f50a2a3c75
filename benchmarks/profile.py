"""Where a forward's time goes: per-kernel device time, grouped, against the forward's wall time.

``torch.profiler`` (CUDA activity on a GPU) records a few inference forwards of the unmerged open_clip
encoder and of TempMe (Triton merge ops, default attention); with ``--modes train``, training calls
as ``bench_model --modes train`` times them (forward, backward into every weight; row key ``mode``).
Rows, appended as measured (``--jsonl``):

- ``kind: kernel``: one per kernel name (the 30 costliest; the rest in one ``(others)`` row):
  ``calls`` and ``us`` per forward, and its ``group``;
- ``kind: group``: the kernels summed by group: GEMM, attention, merge/match, LayerNorm, elementwise/other;
- ``kind: forward``: ``wall_ms`` (a synchronised forward, median, no profiler), ``kernel_ms`` (the sum of
  the kernels' own time per forward), ``host_ms`` = their difference: the time the GPU waits for the
  host, and ``launches`` per forward.

On a CPU there are no kernels: the rows hold the aten ops' own CPU time (``self`` time, children
excluded) and ``kernel_ms`` is their sum, so the difference is the Python and dispatch time around them.

    python -m benchmarks.profile --jsonl rows.jsonl                              # GPU: ViT-B/16 x16, ViT-B/32 x1
    python -m benchmarks.profile --device cpu --cases ViT-B-32:1 --dtypes fp32
    python -m benchmarks.profile --cases ViT-B-32:1 ViT-B-32:16 --modes train   # GPU: where training goes
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from tempme_fast import TempMeConfig, apply_tempme, remove_tempme
from tempme_fast.arguments import add_config_arguments, positive_int
from tempme_fast.loading import DTYPES, create_model, default_dtype_name

from .bench_model import _setting, train_once, variant_switches
from .common import RowLog, add_row_log_arguments, check_outputs, environment, failure, parsed_configs, parsed_device, \
    print_table
from .context import ContextLost, Resume, add_resume_argument, exit_for_good, log_probed, resume_from, stopped
from .devicetime import kernel_us
from .report import profile_columns, profile_table

# Kernel (or, on a CPU, aten op) name patterns of each group, tried in this order; the last group takes the rest.
# Attention before GEMM (cutlass attention kernels carry GEMM words), GEMM before merge/match (cuBLAS names
# carry "segment").
GROUPS: Tuple[Tuple[str, str], ...] = (
    ("attention", r"attention|attn|flash|fmha|sdpa|softmax"),
    ("GEMM", r"gemm|convolution|cudnn|cutlass|xmma|cublas|nvjet|matmul|addmm|\bmm\b|aten::mm|bmm|linear|sm\d+_"),
    ("merge/match", r"match|merge|segment|scatter|gather|index|sort|topk|argsort|cumsum"),
    ("LayerNorm", r"layer_norm|layernorm|LayerNorm"),
)
OTHER = "elementwise/other"
TOP_KERNELS = 30
# The fields that name a case (a resumed stage skips the cases logged) and a variant (a resumed stage skips one that
# lost the CUDA context, at every later case): benchmarks.context.
ROW_KEYS = ("model", "batch", "dtype", "variant", "mode")
CANDIDATE_KEYS = ("mode", "variant")


def group_of(name: str) -> str:
    """The group a kernel or op name belongs to (``GROUPS``, else ``elementwise/other``)."""
    for group, pattern in GROUPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return OTHER


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of a synchronised call of ``fn`` (host and device together, no profiler)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def op_times_us(fn: Callable[[], object], device: torch.device, forwards: int) -> Dict[str, Tuple[float, float]]:
    """``{name: (calls, us)}`` per forward: kernels' device time on a GPU, aten ops' self CPU time on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            fn()
        _sync(device)
    if device.type == "cuda":
        found = kernel_us(prof.events())
        return {name: (len(us) / forwards, sum(us) / forwards) for name, us in found.items()}
    return {e.key: (e.count / forwards, e.self_cpu_time_total / forwards) for e in prof.key_averages()
            if e.self_cpu_time_total > 0}


def summarise(times: Dict[str, Tuple[float, float]], wall: float, top: int = TOP_KERNELS
              ) -> Tuple[List[Dict[str, object]], List[Dict[str, object]], Dict[str, object]]:
    """Kernel rows (the ``top`` costliest, then ``(others)``), group rows and the forward's summary row."""
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
    kernels = [{"kind": "kernel", "name": n[:160], "group": group_of(n), "calls": c, "us": us}
               for n, (c, us) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        kernels.append({"kind": "kernel", "name": "(others)", "group": OTHER, "calls": sum(c for _, (c, _) in rest),
                        "us": sum(us for _, (_, us) in rest), "names": len(rest)})
    total_us = sum(us for _, (_, us) in ranked)
    groups = []
    for group in [g for g, _ in GROUPS] + [OTHER]:
        members = [(c, us) for n, (c, us) in ranked if group_of(n) == group]
        us = sum(u for _, u in members)
        groups.append({"kind": "group", "group": group, "calls": sum(c for c, _ in members), "us": us,
                       "share": us / total_us if total_us else None})
    kernel_ms = total_us / 1e3
    forward = {"kind": "forward", "wall_ms": wall, "kernel_ms": kernel_ms, "host_ms": wall - kernel_ms,
               "host_share": (wall - kernel_ms) / wall if wall > 0 else None,
               "launches": sum(c for _, (c, _) in ranked)}
    return kernels, groups, forward


def profile_variant(model, config: TempMeConfig, variant: str, video: torch.Tensor, forwards: int,
                    repeats: int, mode: str = "infer"
                    ) -> Tuple[List[Dict[str, object]], List[Dict[str, object]], Dict[str, object]]:
    """Kernel, group and forward rows of ``variant`` (``bench_model``'s names) on ``video``: inference
    forwards (``mode`` "infer") or training calls ("train": ``bench_model.train_once``)."""
    config, backend, attention, trim = _setting(variant, config)
    apply_tempme(model, config, backend=backend, attention=attention, trim_last_block=trim)
    try:
        with variant_switches(variant):
            return _profile_applied(model, video, forwards, repeats, mode)
    finally:
        model.zero_grad(set_to_none=True)
        remove_tempme(model)


def _profile_applied(model, video: torch.Tensor, forwards: int, repeats: int, mode: str):
    """:func:`profile_variant`'s rows, on a model patched for the variant with its switches set."""
    model.train(mode == "train")

    def forward():
        if mode == "train":
            return train_once(model, video)
        with torch.inference_mode():
            return model.encode_video(video)
    for _ in range(3):  # warm-up: compilation, autotuning, allocator growth stay out
        forward()
    wall = wall_ms(forward, video.device, repeats)
    return summarise(op_times_us(forward, video.device, forwards), wall)


def run(device: torch.device, cases: Sequence[Tuple[str, int]], dtypes: Sequence[str], variants: Sequence[str],
        forwards: int = 3, repeats: int = 10,
        config: Union[TempMeConfig, Mapping[str, TempMeConfig]] = TempMeConfig(), log: Optional[RowLog] = None,
        modes: Sequence[str] = ("infer",), resume: Optional[Resume] = None) -> List[Dict[str, object]]:
    """Rows for every (model, batch) of ``cases``, dtype, mode and variant; each goes to ``log`` when measured.
    ``config``: one schedule for every model, or each model's (``--budget``, derived per model).
    After each case the CUDA context is probed (:func:`context.log_probed`): where it is lost, the case's last row
    says so and :class:`context.ContextLost` is raised; ``resume`` skips the cases logged already and every variant
    that lost the context."""
    log = log or RowLog(None, "profile", {})
    start = len(log.rows)
    models, configs = {}, config
    for name, batch in cases:
        if name not in models:
            models[name] = create_model(name)
        config = configs[name] if isinstance(configs, Mapping) else configs
        for dtype_name in dtypes:
            model = models[name].to(device=device, dtype=DTYPES[dtype_name])
            g = torch.Generator().manual_seed(batch)
            video = torch.randn(batch, config.frames, 3, *model.visual.image_size, generator=g)
            video = video.to(device=device, dtype=DTYPES[dtype_name])
            for mode in modes:
                for variant in variants:
                    key = {"model": name, "batch": batch, "dtype": dtype_name, "variant": variant, "mode": mode}
                    if resume and resume.skip(key):
                        continue
                    try:
                        kernels, groups, forward = profile_variant(model, config, variant, video, forwards, repeats,
                                                                   mode)
                        found = [{**key, **row} for row in kernels + groups + [forward]]
                    except Exception as e:  # noqa: BLE001 (recorded in the row; the next case runs)
                        found = [{**key, "kind": "forward", **failure(e)}]
                    log_probed(device, log, found, lambda: f"{mode} {variant} at {name}, {batch} videos, {dtype_name}")
    return log.rows[start:]


DEFAULT_CASES = [("ViT-B-16", 16), ("ViT-B-32", 1)]


def _case(text: str) -> Tuple[str, int]:
    name, _, batch = text.rpartition(":")
    if not name or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"case {text!r}: give MODEL:BATCH with BATCH >= 1, e.g. ViT-B-16:16")
    return name, int(batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", type=_case, default=None, metavar="MODEL:BATCH",
                        help="open_clip model name (or JSON config) and videos; default ViT-B-16:16 ViT-B-32:1")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help="default: fp16 (CUDA), fp32 (CPU)")
    parser.add_argument("--variants", nargs="+", choices=("open_clip", "tempme-torch", "tempme-triton",
                                                          "tempme-triton-mlp", "tempme-triton-serial"), default=None,
                        help="default: open_clip and tempme-triton (CUDA), tempme-torch (CPU); tempme-triton-mlp: "
                             "each block's c_fc and GELU in one kernel; tempme-triton-serial: every merge gathering "
                             "one source a step (bench_model's variants)")
    parser.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer"],
                        help="inference forwards, or training calls (forward and backward); default infer")
    parser.add_argument("--forwards", type=positive_int, default=3, help="forwards under the profiler (default 3)")
    parser.add_argument("--repeats", type=positive_int, default=10, help="synchronised forwards for the wall time")
    add_resume_argument(parser, "cases", "variant")
    add_row_log_arguments(parser)
    add_config_arguments(parser)  # (--budget: each --cases model's own schedule)
    args = parser.parse_args(argv)
    args.cases = args.cases or DEFAULT_CASES
    configs = parsed_configs(parser, args, [name for name, _ in args.cases], "--cases")
    device = parsed_device(parser, args.device)
    check_outputs(parser, args)
    cuda = device.type == "cuda"
    variants = args.variants or ["open_clip", "tempme-triton" if cuda else "tempme-torch"]
    triton = [v for v in variants if v.startswith("tempme-triton")]
    if not cuda and triton:
        parser.error(f"--variants {' '.join(triton)} needs --device cuda (the merge kernels do not run eagerly on a "
                     f"CPU)")
    resume = resume_from(parser, args, "profile", ROW_KEYS, CANDIDATE_KEYS)
    env = environment(device)
    try:
        rows = run(device, args.cases, args.dtypes or [default_dtype_name(device)], variants, args.forwards,
                   args.repeats, configs, RowLog(args.jsonl, "profile", env, args.tag), args.modes, resume)
    except ContextLost as e:
        return stopped(e, args.jsonl)
    print(f"# where the forward's time goes on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"{env['date']} ({'kernel device time' if cuda else 'aten ops, self CPU time'})")
    print_table([r for r in rows if r["kind"] == "kernel"],
                ["model", "batch", "mode", "variant", "name", "group", "calls", "us"])
    print()
    table = profile_table(rows)
    print_table(table, [c for c in profile_columns(table) if c != "run"] + ["error"])
    return int(any("error" in r for r in rows))


if __name__ == "__main__":
    exit_for_good(main())
