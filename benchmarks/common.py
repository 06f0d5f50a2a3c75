"""What every benchmark here shares: shapes from the token schedule, timing, environment, output files."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tempme_fast import TempMeConfig, token_schedule
from tempme_fast.arguments import config_from_args
from tempme_fast.bench import cpu_name
from tempme_fast.checkpoint import atomic_write
from tempme_fast.errors import ConfigError, TempMeError
from tempme_fast.loading import resolve_device, resolve_model
from tempme_fast.outputs import prepare_output_dir, prepare_output_file, write_json

from .rowlog import RowLog, add_row_log_arguments, read_records, read_rows  # noqa: F401 (the benchmarks' one import)

# (depth, tokens per frame, width, heads) of the CLIP ViTs the op shapes are taken from, at 224 px.
VIT_GEOMETRY = {"ViT-B-32": (12, 50, 768, 12), "ViT-B-16": (12, 197, 768, 12)}


@dataclass(frozen=True)
class MergeShape:
    """One merge as TempMe runs it: ``rows`` clips of ``tokens`` tokens, metric width ``channels``,
    matched on the mean of its ``heads`` channel groups (after attention: every head's keys); a join's
    (``stage == "cross"``) clips each joined ``group`` clips of ``tokens / group`` tokens."""

    model: str
    batch: int
    layer: int
    stage: str  # "imgme" (layer 0), "cross" (after a join) or "intra" (after attention)
    rows: int
    tokens: int
    protected: int
    channels: int
    width: int
    r: int
    heads: int = 1
    group: int = 1

    @property
    def label(self) -> str:
        return f"{self.model} B{self.batch} L{self.layer} {self.stage}"


def parsed_config(parser, args) -> TempMeConfig:
    """The schedule the options of ``add_config_arguments`` give, or the parser's one-line error (exit 2);
    ``args.model``, where the command has one, is checked too."""
    if getattr(args, "model", None) is not None:
        check_models(parser, [args.model], "--model")
    try:
        return config_from_args(args)
    except ConfigError as err:
        parser.error(str(err))


def parsed_configs(parser, args, names: Sequence[str], option: str) -> Dict[str, TempMeConfig]:
    """The schedule of each model of ``names`` (given by ``option``): the one the schedule options give, or with
    ``--budget`` the one derived for that model's depth and patch grid; or the parser's one-line error, before any
    model is built. The models are checked first (:func:`check_models`)."""
    check_models(parser, names, option)
    configs = {}
    for name in dict.fromkeys(names):
        try:
            configs[name] = config_from_args(argparse.Namespace(**{**vars(args), "model": name}))
        except ConfigError as err:
            derived = str(err).startswith(f"--budget {getattr(args, 'budget', None)}:")  # (for this model)
            parser.error(f"{option} {name}: {err}" if derived else str(err))
    return configs


def parsed_device(parser, name: str) -> torch.device:
    """``--device`` (auto, cpu, cuda, cuda:N; a GPU that this machine has), or the parser's one-line error."""
    try:
        return resolve_device(name)
    except ConfigError as err:
        parser.error(str(err))


def check_models(parser, names: Sequence[str], option: str) -> None:
    """Each of ``names`` an open_clip model or JSON model config that TempMe patches, or the parser's
    one-line error naming ``option``, before any model is built."""
    for name in names:
        try:
            resolve_model(name)
        except TempMeError as err:  # (a name open_clip does not know, or a model TempMe cannot patch)
            parser.error(str(err).replace("--model", option, 1))  # (its message names --model)


def check_outputs(parser, args) -> None:
    """The files and folder the script writes (``--json``, ``--jsonl``, ``--out``, where it has them), checked
    before anything is measured, or the parser's one-line error: a path that cannot be written, or one file
    named for both ``--json`` and ``--jsonl`` (the JSON written at the end would replace the rows kept as
    they were measured), would otherwise be found only when the measurements are done."""
    files = [(option, getattr(args, option[2:], None)) for option in ("--json", "--jsonl")]
    files = [(option, path) for option, path in files if isinstance(path, str) and path]
    try:
        if len(files) == 2 and os.path.realpath(files[0][1]) == os.path.realpath(files[1][1]):
            raise ConfigError(f"--json {files[0][1]} is the --jsonl file: the JSON written at the end would replace "
                              f"the rows appended as they were measured; give two paths")
        for option, path in files:
            prepare_output_file(path, option)
        if getattr(args, "out", None):
            prepare_output_dir(args.out, "--out")
    except ConfigError as err:
        parser.error(str(err))


def merge_shapes(model: str, batch: int, config: TempMeConfig = TempMeConfig()) -> List[MergeShape]:
    """The first image-merging layer's merge and every joining layer's two merges, from the schedule."""
    depth, tokens, width, heads = VIT_GEOMETRY[model]
    schedule = token_schedule(config, depth, tokens)
    shapes = []
    for p in schedule.layers:
        if p.layer == 0 and p.r:
            shapes.append(MergeShape(model, batch, p.layer, "imgme", batch * p.clips_out, p.tokens_attn,
                                     p.protected_out, width, width, p.r, heads))
        if p.group > 1:
            if p.r_cross:
                shapes.append(MergeShape(model, batch, p.layer, "cross", batch * p.clips_out, p.tokens_joined,
                                         p.protected_out, width, width, p.r_cross, group=p.group))
            if p.r:
                shapes.append(MergeShape(model, batch, p.layer, "intra", batch * p.clips_out, p.tokens_attn,
                                         p.protected_out, width, width, p.r, heads))
    return shapes


def metric_tensor(rows: int, tokens: int, channels: int, heads: int, dtype: torch.dtype, device,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A merge's metric ``[rows, tokens, channels]`` as the model passes it (random with a
    ``generator``, else uninitialised): after attention (``heads > 1``) every head's keys, a
    token-major view of the ``q | k | v`` projection; a join's hidden states otherwise."""
    shape = (rows, tokens, 3 * channels if heads > 1 else channels)
    t = (torch.randn(shape, device=device, dtype=dtype, generator=generator) if generator is not None
         else torch.empty(shape, device=device, dtype=dtype))
    return t[..., channels:2 * channels] if heads > 1 else t


def source_counts(dst: torch.Tensor, nb: int) -> torch.Tensor:
    """Each clip's merged sources per B token, ``[rows, Nb]`` int64 on the CPU, from a plan's ``dst [rows, r]``."""
    dst = dst.cpu()
    return torch.zeros(dst.shape[0], nb, dtype=torch.int64).scatter_add_(1, dst, torch.ones_like(dst))


@contextlib.contextmanager
def recorded_matches(keep_metric: bool = False):
    """Every plan that the reference's ``match`` makes inside the block (the torch backend's encoder: its merges
    after attention and its joins), appended to the list it yields as a dict: the clips (``rows``), ``tokens``,
    ``protected``, ``r``, ``heads``, each clip's sources per B token (``counts``, :func:`source_counts`) and,
    with ``keep_metric``, the ``metric`` as the caller passed it (a view keeps its layout)."""
    from tempme_fast.ops import reference

    match, plans = reference.match, []

    def recording(metric, r, protected, heads=1):
        plan = match(metric, r, protected, heads)
        _, nb = reference.split_sizes(metric.shape[1], protected)
        plans.append(dict(rows=metric.shape[0], tokens=metric.shape[1], protected=protected, r=r, heads=heads,
                          counts=source_counts(plan.dst, nb), **({"metric": metric} if keep_metric else {})))
        return plan

    reference.match = recording
    try:
        yield plans
    finally:
        reference.match = match


def encoder_metrics(model: str, batch: int, dtype: torch.dtype, device, seed: int = 0,
                    config: TempMeConfig = TempMeConfig()) -> Dict[Tuple[int, str], torch.Tensor]:
    """The metric of each merge of :func:`merge_shapes` as the encoder makes it, by ``(layer, stage)``: open_clip's
    ``model`` with random weights (``seed``) under TempMe on the torch backend, in ``dtype`` on ``device``,
    encoding ``batch`` videos of random frames. Their plans are the encoder's: where random metrics send a B token
    3-6 sources at most, a ViT-B/16 join of these sends one up to 161 (layer 10, 32 videos), so a merge's time
    depends on its busiest tokens' chains of loads as it does in the encoder. (Random weights are not trained
    ones: how skewed a trained model's plans are on real video is not known here.)"""
    from tempme_fast import apply_tempme
    from tempme_fast.loading import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(model).to(device=device, dtype=dtype)
    apply_tempme(net, config, backend="torch")
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, config.frames, 3, *net.visual.image_size, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad(), recorded_matches(keep_metric=True) as plans:
        net.encode_video(video)
    metrics = {}
    for s in merge_shapes(model, batch, config):
        key = (s.rows, s.tokens, s.protected, s.r, s.heads)
        found = next((i for i, p in enumerate(plans) if (p["rows"], p["tokens"], p["protected"], p["r"], p["heads"])
                      == key), None)
        if found is None:
            raise ValueError(f"the {model} encoder made no merge of {s.rows} clips x {s.tokens} tokens, "
                             f"{s.protected} protected, r={s.r}, heads={s.heads} ({s.label})")
        metric = plans.pop(found)["metric"]
        if not torch.isfinite(metric).all():
            raise ValueError(f"the {model} encoder's metric at {s.label} is not finite in {dtype} (seed {seed}): "
                             "its plans would be a non-finite score's, not the encoder's")
        metrics[(s.layer, s.stage)] = metric
    return metrics


def shifted_metric(metric: torch.Tensor, shift: int) -> torch.Tensor:
    """``metric`` with its clips rolled by ``shift`` (the same plans in another order: a fresh input set for device
    timing), in the same layout (strides: a view of a projection stays one); ``metric`` itself for 0."""
    if shift == 0:
        return metric
    out = torch.empty_strided(metric.shape, metric.stride(), dtype=metric.dtype, device=metric.device)
    return out.copy_(metric.roll(shift, 0))


def measure_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
               min_reps: int = 3) -> Dict[str, float]:
    """Median and 20th/80th percentile milliseconds of ``fn`` after warm-up, as called.

    CUDA: ``triton.testing.do_bench`` (CUDA events, cache flushed between runs): the host's work between
    launches is included, so a small op shows its launch path; ``devicetime.device_ms`` gives the GPU's own
    time. CPU: wall clock.
    """
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "ms_p20": p20, "ms_p80": p80}
    fn()  # warm-up: first-call costs (compilation, allocator growth) stay out of the numbers
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    reps = max(min_reps, int(rep_ms / max(first, 1e-3)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[-1]}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure_ms(lambda: dst.copy_(src), device, rep_ms=200)
    return 2 * src.numel() * 4 / (timing["ms"] * 1e-3) / 1e9


def environment(device: torch.device) -> Dict[str, object]:
    """Device, versions and date, for labelling every figure."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import open_clip
        info["open_clip"] = open_clip.__version__
    except (ImportError, AttributeError):
        info["open_clip"] = None
    return info


def write_results(out_dir: str, name: str, env: Dict[str, object], rows: Sequence[Dict[str, object]]) -> None:
    """``<name>.json`` (environment + rows) and ``<name>.csv`` (rows) in ``out_dir``, each whole or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), {"environment": env, "rows": list(rows)}, indent=1)
    if rows:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(os.path.join(out_dir, f"{name}.csv"), lambda f: f.write(text.getvalue().encode()))


def failure(error: BaseException) -> Dict[str, object]:
    """What a row records of a measurement that raised (printed in full to the log), so one failing case
    (out of memory, a failed graph capture or compile) costs its own row, not the rest of the run."""
    traceback.print_exc()
    return {"error": f"{type(error).__name__}: {error}"[:500]}


class Compiled:
    """``torch.compile`` of ``fn`` for one shape, counting the graphs it really compiles.

    Dynamo keys its cache on the code object, so functions made by one ``lambda`` or method share it;
    past the recompile limit (8) it would silently run them eagerly, and from a second shape on it would
    compile a dynamic-shape graph. A reset and ``dynamic=False`` give every shape its own static graph,
    and the graph count tells a row whether it ran compiled (0 graphs: it did not; more than 1: graph
    breaks or recompiles).
    """

    def __init__(self, fn: Callable, backend: str = "inductor"):
        import torch._dynamo

        torch._dynamo.reset()
        self.graphs = 0
        inner = torch._dynamo.lookup_backend(backend)

        def counting(gm, example_inputs):
            self.graphs += 1
            return inner(gm, example_inputs)
        self.backend = backend
        self.fn = torch.compile(fn, backend=counting, dynamic=False)

    def __call__(self, *args):
        return self.fn(*args)

    def record(self) -> Dict[str, object]:
        return {"compiled": self.graphs > 0, "compiled_graphs": self.graphs, "compile_backend": self.backend}


def print_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
