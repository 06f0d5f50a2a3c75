"""Whole-encoder benchmarks: unmerged open_clip against TempMe on each path, inference and training.

Variants (those that cannot run on the device are skipped):
  open_clip          per-frame CLIP through open_clip's own forward (its own attention)
  open_clip+graph    the same, captured in a CUDA graph
  tempme-eager       reference TempMe with explicit-softmax attention, as the released code runs it
  tempme-torch       reference TempMe (PyTorch merge ops, SDPA attention)
  tempme-triton      TempMe on the Triton merge ops
  tempme-triton-jit  the same, every kernel launched through Triton's JITFunction.run (no cached launch)
  tempme-triton-mean the same with the keys averaged over heads by torch before each match (one more kernel
                     a merge), where the match otherwise averages them as it loads them (+graph: replayed)
  tempme-triton-mlp  the same with each block's c_fc and GELU as one Triton kernel (encoder.FUSED_MLP; 16-bit
                     weights), where cuBLAS runs the product and a second kernel the activation (+graph: replayed)
  tempme-triton-serial  the same with every merge gathering one source a step on its tiles before the chunked
                     gather (triton_ops.MANY_SOURCES_DIVISOR = 0), where B tokens gather many (+graph: replayed)
  tempme-triton+graph    the same, captured in a CUDA graph
  tempme-triton+compile  the same under torch.compile (opt-in: --compile)

    python -m benchmarks.bench_model --out bench-out                       # GPU
    python -m benchmarks.bench_model --device cpu --models ViT-B-32 --batches 2 --modes infer
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from tempme_fast import TempMeConfig, apply_tempme, encoder, remove_tempme
from tempme_fast.bench import peak_memory_mb
from tempme_fast.arguments import add_config_arguments, positive_float, positive_int
from tempme_fast.encoder import block_forward, class_block_forward, embed_frames
from tempme_fast.flops import model_flops
from tempme_fast.loading import DTYPES, create_model, default_dtype_name
from tempme_fast.model import block_function, encoder_options, layer_steps
from tempme_fast.ops import launch, triton_ops

from .common import Compiled, RowLog, add_row_log_arguments, check_outputs, environment, failure, measure_ms, \
    parsed_configs, parsed_device, print_table, write_results
from .context import Resume, add_resume_argument, exit_for_good, keep_rows, log_probed, resume_from
from .devicetime import device_columns, enqueue_ms, host_columns
from .oracle import check_embedding, check_gradients, check_raised, parameter_grads

VARIANTS = ("open_clip", "open_clip+graph", "open_clip+compile", "tempme-eager", "tempme-torch", "tempme-triton",
            "tempme-triton-jit", "tempme-triton-mean", "tempme-triton-mlp", "tempme-triton-serial",
            "tempme-triton+graph", "tempme-triton-mean+graph", "tempme-triton-mlp+graph", "tempme-triton-serial+graph",
            "tempme-triton+compile")
# The fields that name a row, every bench's (a resumed stage skips the rows logged under them), and a variant (a
# resumed stage skips one that lost the CUDA context, at every later model and batch): benchmarks.context.
ROW_KEYS = ("bench", "model", "dtype", "batch", "mode", "variant")
CANDIDATE_KEYS = ("bench", "mode", "variant")
# The variant whose eager embeddings each inference row's are held against (benchmarks.oracle.check_embedding),
# and whose gradients each training row's are (check_gradients): the Triton paths against the torch backend's,
# a graph replay of open_clip against open_clip.
CHECKED_AGAINST = {"open_clip+graph": "open_clip", "open_clip+compile": "open_clip", "tempme-triton": "tempme-torch",
                   "tempme-triton-jit": "tempme-torch", "tempme-triton-mean": "tempme-torch",
                   "tempme-triton-mean+graph": "tempme-torch", "tempme-triton-mlp": "tempme-torch",
                   "tempme-triton-mlp+graph": "tempme-torch", "tempme-triton-serial": "tempme-torch",
                   "tempme-triton-serial+graph": "tempme-torch",
                   "tempme-triton+graph": "tempme-torch", "tempme-triton+compile": "tempme-torch"}


def _setting(variant: str, config: TempMeConfig):
    """(config, backend, attention, trim_last_block) of a variant. The released-style ``tempme-eager``
    runs every block in full, as the released code does; the others trim the last block (the default)."""
    if variant.startswith("open_clip"):
        return TempMeConfig.unmerged(config.frames), "torch", "sdpa", True
    backend = "triton" if "triton" in variant else "torch"
    # Triton variants take the default attention ("auto": the bias-vector Triton kernel on CUDA).
    attention = "eager" if variant == "tempme-eager" else "auto" if backend == "triton" else "sdpa"
    return config, backend, attention, variant != "tempme-eager"


def runnable(variant: str, mode: str, device: torch.device, compile_: bool) -> bool:
    if ("graph" in variant or "triton" in variant) and device.type != "cuda":
        return False
    if mode == "train" and "graph" in variant:
        return False
    return compile_ or "compile" not in variant


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Capture ``fn`` (fixed inputs) in a CUDA graph after a few warm-up runs on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def layer_times_ms(model: torch.nn.Module, video: torch.Tensor) -> List[float]:
    """Milliseconds of the stem and of each block of a patched model (median of 5 runs, synchronised)."""
    visual, device = model.visual, video.device
    options = encoder_options(model)
    runs = []
    with torch.inference_mode():
        for _ in range(6):
            times = []
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            state = embed_frames(visual, video.flatten(0, 1))
            sync()
            times.append(time.perf_counter() - t0)
            for i, (block, plan, pos) in enumerate(layer_steps(model)):
                t0 = time.perf_counter()
                state = block_function(model, i, state)(block, state, plan, pos, options)
                sync()
                times.append(time.perf_counter() - t0)
            runs.append(times)
    runs = runs[1:]  # the first run warms up
    return [sorted(r[i] for r in runs)[len(runs) // 2] * 1e3 for i in range(len(runs[0]))]


def last_block_ms(model: torch.nn.Module, video: torch.Tensor, rep_ms: float = 100, rounds: int = 3
                  ) -> Dict[str, float]:
    """The last block of a patched model in full (``encoder.block_forward``) and trimmed to its class
    tokens (``encoder.class_block_forward``), on the state a real forward hands it: each timed
    ``rounds`` times in alternation (``measure_ms``), the median of each one's rounds."""
    visual, options, steps = model.visual, encoder_options(model), list(layer_steps(model))
    with torch.inference_mode():
        state = embed_frames(visual, video.flatten(0, 1))
        for block, plan, pos in steps[:-1]:
            state = block_forward(block, state, plan, pos, options)
    block, plan, pos = steps[-1]
    times: Dict[str, List[float]] = {"full": [], "trimmed": []}
    for _ in range(rounds):
        for name, forward in (("full", block_forward), ("trimmed", class_block_forward)):
            def run(forward=forward):
                with torch.inference_mode():
                    return forward(block, state, plan, pos, options)
            times[name].append(measure_ms(run, video.device, rep_ms=rep_ms)["ms"])
    full, trimmed = (statistics.median(times[k]) for k in ("full", "trimmed"))
    return {"layer": len(steps) - 1, "full_ms": full, "trimmed_ms": trimmed, "speedup": full / trimmed}


def layer_device_ms(model: torch.nn.Module, video: torch.Tensor, rep_ms: float = 20) -> List[Dict[str, object]]:
    """The device-time columns of the stem and of each block (``devicetime.device_ms``); empty on a CPU.

    ``layer_times_ms`` synchronises after every block, so a block whose kernels take less than its
    launches shows its host time there. Here each piece is replayed from a CUDA graph on the inputs it
    meets in a real forward of fresh random videos (as many as it takes to exceed the L2 cache).
    """
    if video.device.type != "cuda":
        return []
    visual, options, steps = model.visual, encoder_options(model), list(layer_steps(model))
    frames = video.flatten(0, 1)
    sets: Dict[int, List[object]] = {}  # set -> [frames, state before block 0, state before block 1, ...]

    def inputs(i: int) -> List[object]:
        if i not in sets:
            g = torch.Generator(device=video.device).manual_seed(1000 + i)
            f = torch.randn(frames.shape, device=video.device, generator=g).to(frames.dtype)
            with torch.inference_mode():
                states = [embed_frames(visual, f)]
                for block, plan, pos in steps[:-1]:
                    states.append(block_forward(block, states[-1], plan, pos, options))
            sets[i] = [f] + states
        return sets[i]

    def piece(layer: int, i: int):
        args = inputs(i)

        def run():
            with torch.inference_mode():
                if layer == 0:
                    return embed_frames(visual, args[0])
                block, plan, pos = steps[layer - 1]
                return block_function(model, layer - 1, args[layer])(block, args[layer], plan, pos, options)
        return run
    first = inputs(0)
    columns = []
    for layer in range(len(steps) + 1):
        held = first[layer]  # the frames, or the state the block receives
        nbytes = held.nbytes if layer == 0 else held.x.nbytes + held.size.nbytes
        columns.append(device_columns(lambda i, layer=layer: piece(layer, i), nbytes, video.device, rep_ms))
    return columns


def train_once(model, video: torch.Tensor, encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """One training row's call: forward (``encode``, default ``model.encode_video``), a loss of every
    embedding, backward (gradients set afresh)."""
    model.zero_grad(set_to_none=True)
    (encode or model.encode_video)(video).float().square().sum().backward()


def reference_result(model, config: TempMeConfig, variant: str, mode: str, video: torch.Tensor):
    """What ``variant``'s setting computes from ``video``, untimed: for ``infer`` the embeddings of one eager
    inference forward, for ``train`` the gradients of one :func:`train_once`."""
    config, backend, attention, trim = _setting(variant, config)
    apply_tempme(model, config, backend=backend, attention=attention, trim_last_block=trim)
    try:
        if mode == "train":
            model.train()
            train_once(model, video)
            return parameter_grads(model)
        model.eval()
        with torch.inference_mode():
            return model.encode_video(video).clone()
    finally:
        model.zero_grad(set_to_none=True)
        remove_tempme(model)


def bench_variant(model, config: TempMeConfig, variant: str, mode: str, video: torch.Tensor,
                  rep_ms: float, compile_backend: str = "inductor",
                  reference=None) -> Dict[str, object]:
    """One row: timing, throughput, memory, FLOPs and tokens of ``variant``; ``compiled`` says whether
    a torch.compile variant really ran a compiled graph (compiled afresh for this model and batch). On
    CUDA, ``enqueue_ms`` is the host's own time per call (:func:`benchmarks.devicetime.enqueue_ms`).
    Given ``reference`` (:func:`reference_result` of the variant to agree with), the row also runs
    ``variant`` once more and records ``agrees`` and ``rel_err`` (:func:`benchmarks.oracle.check_embedding`,
    in training :func:`benchmarks.oracle.check_gradients`)."""
    config, backend, attention, trim = _setting(variant, config)
    apply_tempme(model, config, backend=backend, attention=attention, trim_last_block=trim)
    try:
        with variant_switches(variant):
            return _bench_applied(model, variant, mode, video, rep_ms, compile_backend, reference)
    finally:
        model.zero_grad(set_to_none=True)
        remove_tempme(model)


@contextlib.contextmanager
def variant_switches(variant: str):
    """The library's module switches that ``variant`` names set for its duration, then restored: ``-jit`` the
    cached launch off (``launch.CACHED``; off already under ``TEMPME_FAST_CACHED_LAUNCH=0``, the suite's
    fallback), ``-mean`` the keys averaged by torch before the match (``triton_ops.HEADS_IN_MATCH``), ``-mlp``
    each block's ``c_fc`` and GELU fused (``encoder.FUSED_MLP``), ``-serial`` every merge gathering one source a
    step (``triton_ops.MANY_SOURCES_DIVISOR = 0``)."""
    saved = launch.CACHED, triton_ops.HEADS_IN_MATCH, encoder.FUSED_MLP, triton_ops.MANY_SOURCES_DIVISOR
    if variant.endswith("-jit"):
        launch.CACHED = False
    if "-mean" in variant:
        triton_ops.HEADS_IN_MATCH = False
    if "-mlp" in variant:
        encoder.FUSED_MLP = True
    if "-serial" in variant:
        triton_ops.MANY_SOURCES_DIVISOR = 0
    try:
        yield
    finally:
        launch.CACHED, triton_ops.HEADS_IN_MATCH, encoder.FUSED_MLP, triton_ops.MANY_SOURCES_DIVISOR = saved


def _bench_applied(model, variant: str, mode: str, video: torch.Tensor, rep_ms: float, compile_backend: str,
                   reference) -> Dict[str, object]:
    """:func:`bench_variant`'s row, on a model patched for ``variant`` with its switches set."""
    compiled = None
    if mode == "infer":
        model.eval()
        if "compile" in variant:
            compiled = Compiled(model.encode_video, compile_backend)
        encode = compiled or model.encode_video

        def step():
            with torch.inference_mode():
                return encode(video)
        fn = cuda_graph(step) if "graph" in variant else step
    else:
        model.train()
        if "compile" in variant:  # the forward compiled, its backward too (AOTAutograd)
            compiled = Compiled(model.encode_video, compile_backend)

        def fn():
            train_once(model, video, compiled)
    timing = measure_ms(fn, video.device, rep_ms=rep_ms)
    if video.device.type == "cuda":
        timing["enqueue_ms"] = enqueue_ms(fn, video.device)
    if reference is not None:
        try:
            if mode == "train":
                fn()
                timing.update(check_gradients(parameter_grads(model), reference, video.dtype))
            else:
                timing.update(check_embedding(fn(), reference, video.dtype))
        except Exception as e:  # noqa: BLE001 (recorded in the row; the timing stands)
            timing.update(check_raised(e))
    batch = video.shape[0]
    return {"variant": variant, "mode": mode, **timing, "videos_per_s": batch / (timing["ms"] * 1e-3),
            "peak_mib": peak_memory_mb(fn, video.device), "gflops_per_video": model_flops(model).gflops,
            "gflops_executed": model_flops(model, executed=True).gflops,
            "tokens_per_video": model.tempme.schedule.output_tokens,
            **(compiled.record() if compiled else {"compiled": False})}


def unmerged_gflops(model, frames: int) -> float:
    """GFLOPs per video of per-frame CLIP: the numerator of every row's FLOPs bound."""
    apply_tempme(model, TempMeConfig.unmerged(frames))
    try:
        return model_flops(model).gflops
    finally:
        remove_tempme(model)


def run(device, models, batches, dtypes, modes, variants, compile_, rep_ms,
        config: Union[TempMeConfig, Mapping[str, TempMeConfig]] = TempMeConfig(), log: Optional[RowLog] = None,
        compile_backend: str = "inductor", layer_times: bool = True,
        check: bool = True, resume: Optional[Resume] = None):
    """Rows of every (model, dtype, batch, mode, variant), and per-layer times at the largest batch. ``config``:
    one schedule for every model, or each model's (``--budget``, derived per model).

    Every row goes to ``log`` (bench ``bench_model``; per-layer rows ``bench_layers``; the last block in
    full and trimmed, ``bench_last_block``) as soon as it is measured, so a run stopped by a time limit
    keeps it. Beside the measured ``speedup_vs_open_clip``
    each row gives ``flops_bound_speedup``: unmerged FLOPs over the variant's, the most that removing
    tokens alone can gain. With ``check``, the rows of ``CHECKED_AGAINST``'s variants say whether their
    embeddings (inference) or gradients (training) agree with their reference variant's (``agrees``,
    ``rel_err``).

    After each row and each failure the CUDA context is probed (:func:`context.context_lost`): where it is lost,
    the row is kept with ``context_lost`` and :class:`context.ContextLost` is raised. ``resume`` (the rows that
    earlier processes of the stage logged, every bench's: :data:`ROW_KEYS`) skips the rows measured already, every
    variant that lost the context, and the per-layer times logged already.
    """
    log = log or RowLog(None, "bench_model", {})

    def keep(row: Dict[str, object], bench: Optional[str] = None) -> Dict[str, object]:
        """``log(row, bench)``; raises ContextLost after it where the context is gone."""
        kept = []
        log_probed(device, lambda r: kept.append(log(r, bench=bench)), [row],
                   lambda: f"{row.get('mode', 'layer times')} {row['variant']} at {row['model']}, {row['batch']} "
                           f"videos, {row['dtype']}")
        return kept[0]

    variants = sorted(variants, key=VARIANTS.index)  # open_clip first: the other rows' speed-ups need it
    rows, layer_rows = [], []
    configs = config
    for name in models:
        config = configs[name] if isinstance(configs, Mapping) else configs
        frames = config.frames
        base = create_model(name)
        bound_num = unmerged_gflops(base, frames)
        for dtype_name in dtypes:
            model = base.to(device=device, dtype=DTYPES[dtype_name])
            for batch in batches:
                g = torch.Generator().manual_seed(batch)
                try:
                    video = torch.randn(batch, frames, 3, *model.visual.image_size, generator=g)
                    video = video.to(device=device, dtype=DTYPES[dtype_name])
                except Exception as e:  # noqa: BLE001 (a batch too big for memory: each of its rows says so)
                    row = {"model": name, "dtype": dtype_name, "batch": batch, "frames": frames}
                    for mode in modes:
                        for variant in variants:
                            done = {"bench": "bench_model", **row, "mode": mode, "variant": variant}
                            if runnable(variant, mode, device, compile_) and not (resume and resume.skip(done)):
                                rows.append(keep({**row, "variant": variant, "mode": mode, **failure(e)}))
                    continue
                references: Dict[tuple, object] = {}  # per model, dtype, batch and mode, made when first asked
                for mode in modes:
                    base_ms = None
                    for variant in variants:
                        if not runnable(variant, mode, device, compile_):
                            continue
                        row = {"model": name, "dtype": dtype_name, "batch": batch, "frames": frames}
                        done = {"bench": "bench_model", **row, "mode": mode, "variant": variant}
                        if resume and resume.skip(done):
                            found = resume.logged(done) if variant == "open_clip" else None
                            base_ms = found["ms"] if found and "ms" in found else base_ms
                            continue
                        against = (CHECKED_AGAINST.get(variant), mode) if check else (None, mode)
                        try:
                            if against[0] and against not in references:
                                references[against] = reference_result(model, config, against[0], mode, video)
                            row.update(bench_variant(model, config, variant, mode, video, rep_ms, compile_backend,
                                                     references.get(against)))
                        except Exception as e:  # noqa: BLE001 (recorded in the row; the next variant runs)
                            rows.append(keep({**row, "variant": variant, "mode": mode, **failure(e)}))
                            continue
                        if variant == "open_clip":
                            base_ms = row["ms"]
                        row["speedup_vs_open_clip"] = base_ms / row["ms"] if base_ms else None
                        row["flops_bound_speedup"] = bound_num / row["gflops_per_video"]
                        rows.append(keep(row))
                # Time per layer, at the largest batch only: unmerged through the block loop vs TempMe.
                if layer_times and batch == max(batches):
                    for label, layer_config, backend in (("unmerged", TempMeConfig.unmerged(frames), "torch"),
                                                         ("tempme", config,
                                                          "triton" if device.type == "cuda" else "torch")):
                        if resume and resume.has(bench="bench_layers", model=name, dtype=dtype_name, batch=batch,
                                                 variant=label):
                            continue
                        apply_tempme(model, layer_config, backend=backend)
                        try:
                            times = layer_times_ms(model, video)
                            device_cols = layer_device_ms(model, video)
                            if layer_config.merges:  # one more row: the last block in full and trimmed
                                log({"model": name, "dtype": dtype_name, "batch": batch,
                                     **last_block_ms(model, video)}, bench="bench_last_block")
                        except Exception as e:  # noqa: BLE001 (recorded; the next batch runs)
                            layer_rows.append(keep({"model": name, "dtype": dtype_name, "batch": batch,
                                                    "variant": label, **failure(e)}, bench="bench_layers"))
                            times = []
                        finally:
                            remove_tempme(model)
                        for layer, ms in enumerate(times):
                            extra = device_cols[layer] if device_cols else {}
                            layer_rows.append(log({"model": name, "dtype": dtype_name, "batch": batch,
                                                   "variant": label, "layer": "stem" if layer == 0 else layer - 1,
                                                   "ms": ms, **extra, **host_columns(ms, extra)},
                                                  bench="bench_layers"))
        del base
    return rows, layer_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"],
                        help="open_clip model names or JSON model configs")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=None, help="default: 1 16 (CUDA), 2 (CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help="default: fp16 (CUDA), fp32 (CPU)")
    parser.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--no-layer-times", action="store_true", help="skip the per-layer times")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not hold the Triton and graph-replayed embeddings (and the Triton gradients) to "
                             "the torch backend's (columns agrees, rel_err)")
    parser.add_argument("--rep-ms", type=positive_float, default=200)
    parser.add_argument("--out", default=None,
                        help="folder for bench_model.json/.csv and bench_layers.json/.csv, written at the end")
    add_resume_argument(parser, "rows (and per-layer times)", "variant")
    add_row_log_arguments(parser)
    add_config_arguments(parser)  # (--budget: each --models entry's own schedule)
    args = parser.parse_args(argv)
    configs = parsed_configs(parser, args, args.models, "--models")
    device = parsed_device(parser, args.device)
    check_outputs(parser, args)
    cuda = device.type == "cuda"
    batches = args.batches or ([1, 16] if cuda else [2])
    dtypes = args.dtypes or [default_dtype_name(device)]
    resume = resume_from(parser, args, None, ROW_KEYS, CANDIDATE_KEYS)
    env = environment(device)
    log = RowLog(args.jsonl, "bench_model", env, args.tag)

    def write(rows, layer_rows) -> Optional[str]:
        if not args.out:
            return None
        write_results(args.out, "bench_model", env, rows)
        write_results(args.out, "bench_layers", env, layer_rows)
        return f"--out {args.out}"
    try:
        rows, layer_rows = run(device, args.models, batches, dtypes, args.modes, args.variants, args.compile,
                               args.rep_ms, configs, log, args.compile_backend, not args.no_layer_times, args.check,
                               resume)
    except BaseException as e:  # (Ctrl-C too: the rows measured are written before it ends the run)
        return keep_rows(e, args.jsonl, lambda: write(log.rows_of(), log.rows_of("bench_layers")))
    write(rows, layer_rows)
    print(f"# video encoders on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print_table(rows, ["model", "dtype", "batch", "mode", "variant", "ms", "ms_p20", "ms_p80", "enqueue_ms",
                       "videos_per_s", "peak_mib", "gflops_per_video", "tokens_per_video", "speedup_vs_open_clip",
                       "flops_bound_speedup", "compiled", "agrees", "rel_err", "error", "disagreement"])
    return int(any("error" in r or r.get("agrees") is False for r in rows + layer_rows))


if __name__ == "__main__":
    exit_for_good(main())
