"""Training-step benchmark: unmerged per-frame CLIP against TempMe, LoRA and full fine-tuning.

One step = forward of both towers, symmetric InfoNCE, backward, AdamW step (``tempme_fast.train.train_step``),
on random videos and captions. Memory is the peak above what was allocated before (weights and optimiser
state; gradients freed), from ``tempme_fast.bench.peak_memory_mb`` (CUDA allocator stats; on the CPU,
live tensors): for the whole step, and for forward + backward alone (activations and gradients, without
the optimiser's parameter-sized temporaries, which dominate a full fine-tuning step at small batches).

With ``--compile BACKEND`` every variant also runs compiled (row ``<variant>+compile``): both towers' forward
under ``torch.compile`` and, through AOTAutograd, its backward, as ``TrainConfig(compile=BACKEND)`` trains;
the compiling happens in the warm-up steps, and ``compiled_graphs`` says how many graphs ran.

Each Triton row is checked: before any timed step changes the weights, one forward and backward on each
backend gives every trainable parameter's gradient, and the Triton ones are held to the torch backend's with
``tempme_fast.ops.accuracy.GRADIENT_TOL`` of the autocast dtype (columns ``agrees``, ``rel_err``; a row that
does not agree makes the run exit 1; ``--no-check`` leaves it out).

A variant whose step raises costs its own row (``error``). After each row and each check that raised, the CUDA
context is probed: where it is lost (a kernel faulted), the row is kept with ``context_lost`` and the process
exits 75; ``--resume`` goes on from the rows logged, without the variant that lost it (``benchmarks.context``).

    python -m benchmarks.bench_train --device cpu --threads 2 --json bench-train-cpu.json
    python -m benchmarks.bench_train --precision bf16 --batch 32 --json bench-train-gpu.json      # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch

from tempme_fast import TempMeConfig, apply_tempme, remove_tempme
from tempme_fast.bench import default_backends, peak_memory_mb, time_calls
from tempme_fast.arguments import add_config_arguments, config_from_args, non_negative_int, positive_int
from tempme_fast.lora import add_lora, mark_trainable
from tempme_fast.loading import text_context_length
from tempme_fast.outputs import write_json
from tempme_fast.train import (PRECISIONS, VideoTextForward, _unwrapped, contrastive_loss, make_optimizer,
                               set_grad_checkpointing, train_step)

from . import context
from .common import Compiled, RowLog, add_row_log_arguments, check_outputs, environment, failure, parsed_config, \
    parsed_device
from .context import Resume, add_resume_argument, exit_for_good, keep_rows, log_probed, resume_from
from .oracle import check_gradients, check_raised, parameter_grads

# The fields that name a row (a resumed stage skips the rows logged under them), and a variant (a resumed stage
# skips one that lost the CUDA context, in every later mode): benchmarks.context.
ROW_KEYS = ("model", "batch", "precision", "mode", "variant", "backend")
CANDIDATE_KEYS = ("variant", "backend")


def _batch(model, batch: int, frames: int, context: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size[0]
    video = torch.randn(batch, frames, 3, size, size, generator=g)
    vocab = model.token_embedding.num_embeddings
    tokens = torch.randint(1, vocab - 1, (batch, context), generator=g)
    tokens[:, context - 1] = vocab - 1  # EOT
    return video.to(device), tokens.to(device), torch.ones(batch, frames, dtype=torch.bool, device=device)


def forward_backward(model, batch, autocast: Optional[torch.dtype], device: torch.device) -> None:
    """Both towers forward (under ``autocast``), the contrastive loss, backward: a step without the optimiser.
    ``model``: a CLIP, or a (compiled) :class:`VideoTextForward` of one."""
    amp = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with amp:
        outputs = model(*batch) if isinstance(_unwrapped(model), VideoTextForward) \
            else VideoTextForward.encode(model, *batch)
    contrastive_loss(*outputs).backward()


def gradient_check(model, mode: str, config: TempMeConfig, batch, autocast: Optional[torch.dtype],
                   device: torch.device, grad_checkpointing: bool = False) -> Dict[str, object]:
    """The Triton backend's gradients against the torch backend's (``benchmarks.oracle.check_gradients``),
    from one :func:`forward_backward` of each at the model's current weights."""
    grads = {}
    for backend in ("torch", "triton"):
        apply_tempme(model, config, backend=backend)
        try:
            mark_trainable(model, mode)
            set_grad_checkpointing(model, grad_checkpointing)
            model.zero_grad(set_to_none=True)
            forward_backward(model, batch, autocast, device)
            grads[backend] = parameter_grads(model)
        finally:
            model.zero_grad(set_to_none=True)
            remove_tempme(model)
    return check_gradients(grads["triton"], grads["torch"], autocast or torch.float32)


def bench(args, log: Optional[RowLog] = None, resume: Optional[Resume] = None) -> List[dict]:
    """One row per (mode, variant), each handed to ``log`` as soon as it is measured. A variant whose step raises
    gets a row with ``error``; where the CUDA context is lost after a row (or a check), that row is kept with
    ``context_lost`` and :class:`context.ContextLost` is raised. ``resume`` skips the rows that earlier processes
    of the stage logged (:data:`ROW_KEYS`) and every variant that lost the context."""
    from tempme_fast.loading import create_model

    log = log or RowLog(None, "bench_train", {})

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    backends = args.backends or default_backends(device)
    variants = [("unmerged", TempMeConfig.unmerged(args.frames), "torch")]
    variants += [("TempMe", config_from_args(args), b) for b in backends]
    compile_backend = getattr(args, "compile", None)
    runs = [(name, config, backend, False) for name, config, backend in variants]
    if compile_backend:
        runs += [(name + "+compile", config, backend, True) for name, config, backend in variants]

    def named(mode: str, name: str, config: TempMeConfig, backend: str) -> Dict[str, object]:
        """The fields that name a row (:data:`ROW_KEYS`)."""
        return {"mode": mode, "variant": name, "backend": backend if config.merges else "-",
                "precision": args.precision, "batch": args.batch, "model": args.model}

    def keep(row: Dict[str, object]) -> Dict[str, object]:
        """``log(row)``; raises ContextLost after it where the context is gone."""
        kept = []
        log_probed(device, lambda r: kept.append(log(r)), [row],
                   lambda: f"{row['mode']} {row['variant']} ({row['backend']}) at {args.model}, batch {args.batch}")
        return kept[0]

    rows = []
    for mode in args.modes:
        todo = [r for r in runs if not (resume and resume.skip(named(mode, r[0], r[1], r[2])))]
        if not todo:
            continue
        torch.manual_seed(0)
        model = create_model(args.model, None, device=str(device), dtype=torch.float32).train()
        if mode == "lora":
            add_lora(model, rank=8)
        batch = _batch(model, args.batch, args.frames, args.context_length, device)
        checks = {}  # per TempMe config on the Triton backend, at the weights before any timed step
        if getattr(args, "check", True):
            for name, config, backend in variants:
                # (not for a variant that lost the context in an earlier process: its check may be what faulted)
                if backend == "triton" and config.merges and any(r[0].startswith(name) and r[2] == backend
                                                                 for r in todo) \
                        and not (resume and resume.lost_by(named(mode, name, config, backend))):
                    try:
                        checks[name] = gradient_check(model, mode, config, batch, autocast, device,
                                                      args.grad_checkpointing)
                    except Exception as e:  # noqa: BLE001 (recorded in the row; the timing still runs)
                        checks[name] = check_raised(e)
                        if context.context_lost(device):  # the check's variant faulted: its row says so
                            keep({**named(mode, name, config, backend), **failure(e), **checks[name]})
        for name, config, backend, compiled in todo:
            row = named(mode, name, config, backend)
            apply_tempme(model, config, backend=backend)
            try:
                trainable = mark_trainable(model, mode)
                set_grad_checkpointing(model, args.grad_checkpointing)
                opt = make_optimizer(model, lr=1e-5)
                # As TrainConfig(compile=...) trains: both towers' forward compiled, for this batch shape.
                compiler = Compiled(VideoTextForward(model), compile_backend) if compiled else None
                forward = compiler.fn if compiled else model

                def step():
                    return train_step(forward, batch, opt, scaler=scaler, autocast_dtype=autocast)

                times = time_calls(step, device, args.repeats, max(args.warmup, int(compiled)))
                opt.zero_grad(set_to_none=True)
                memory = peak_memory_mb(step, device)
                opt.zero_grad(set_to_none=True)
                activations = peak_memory_mb(lambda: forward_backward(forward, batch, autocast, device), device)
                opt.zero_grad(set_to_none=True)
            except Exception as e:  # noqa: BLE001 (recorded in the row; the next variant runs)
                rows.append(keep({**row, **failure(e), **checks.get(name, {})}))
                continue
            finally:
                remove_tempme(model)
            median = statistics.median(times)
            row.update({"trainable_params": trainable, "step_ms": median, "step_min_ms": min(times),
                        "step_max_ms": max(times), "videos_per_s": args.batch / (median / 1e3),
                        "peak_mem_mb": memory, "fwd_bwd_mem_mb": activations,
                        **(compiler.record() if compiled else {})})
            base = _base_row(rows + [row], mode, resume and resume.logged(named(mode, *variants[0])))
            if base:
                row["speedup"] = base["step_ms"] / row["step_ms"]
                row["memory_ratio"] = row["peak_mem_mb"] / base["peak_mem_mb"]
                row["fwd_bwd_memory_ratio"] = row["fwd_bwd_mem_mb"] / base["fwd_bwd_mem_mb"]
            if backend == "triton" and name in checks:
                row.update(checks[name])
            rows.append(keep(row))
            print(f"  {mode:4s} {name:15s} {rows[-1]['backend']:6s} {median:9.1f} ms  {memory:8.0f} MiB step  "
                  f"{activations:8.0f} MiB fwd+bwd", flush=True)
    return rows


def _base_row(rows: List[dict], mode: str, logged: Optional[dict]) -> Optional[dict]:
    """The unmerged row of ``mode`` that was measured (in ``rows``, else ``logged`` by an earlier process of the
    stage), the base of the speed-up and memory columns; None if it failed."""
    found = [r for r in rows if r["mode"] == mode and r["variant"] == "unmerged"] + ([logged] if logged else [])
    return next((r for r in found if "step_ms" in r), None)


def _check_cell(row: dict) -> str:
    """The gradient check of a row: ``-`` where none ran, else the largest relative error and the verdict."""
    if "agrees" not in row:
        return "-"
    err = row.get("rel_err")
    return ("agree" if row["agrees"] else "DISAGREE") + (f" ({err:.1e})" if err is not None else "")


def _ratio(row: dict, column: str, form: str) -> str:
    """A column against the unmerged row, ``-`` where that row failed."""
    return form.format(row[column]) if column in row else "-"


def format_table(rows: List[dict]) -> str:
    header = ("mode", "variant", "backend", "trainable", "step ms (min-max)", "videos/s", "speed-up",
              "step peak MiB", "vs unmerged", "fwd+bwd MiB", "vs unmerged", "gradients")
    lines = [header]
    for r in rows:
        if "error" in r:  # a step that raised: its row names the error
            lines.append((r["mode"], r["variant"], r["backend"], f"error: {r['error']}"[:60], *[""] * 8))
            continue
        lines.append((r["mode"], r["variant"], r["backend"], f"{r['trainable_params']:,}",
                      f"{r['step_ms']:.0f} ({r['step_min_ms']:.0f}-{r['step_max_ms']:.0f})",
                      f"{r['videos_per_s']:.2f}", _ratio(r, "speedup", "{:.2f}x"), f"{r['peak_mem_mb']:.0f}",
                      _ratio(r, "memory_ratio", "{:.0%}"), f"{r['fwd_bwd_mem_mb']:.0f}",
                      _ratio(r, "fwd_bwd_memory_ratio", "{:.0%}"), _check_cell(r)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32-quickgelu",
                        help="open_clip model name or JSON model config (random weights)")
    parser.add_argument("--batch", type=positive_int, default=2, help="videos (and captions) per step")
    parser.add_argument("--context-length", type=positive_int, default=32,
                        help="caption tokens (zero-padded to the text tower's positions, 77 for OpenAI CLIP)")
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--backends", nargs="+", choices=("torch", "triton"), default=None,
                        help="TempMe backends (default: torch, plus triton on CUDA)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast precision")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time every variant with both towers compiled by this torch.compile backend "
                             "(rows <variant>+compile; the warm-up compiles)")
    parser.add_argument("--json", default=None, metavar="PATH", help="all rows in one JSON file, at the end")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not hold the Triton backend's gradients to the torch backend's (columns agrees, "
                             "rel_err)")
    add_resume_argument(parser, candidate="variant")
    add_row_log_arguments(parser)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    parsed_config(parser, args)  # refused in one line here, before any model is built
    positions = text_context_length(args.model)
    if args.context_length > positions:
        parser.error(f"--context-length {args.context_length} exceeds the {positions} token positions of "
                     f"{args.model}'s text tower")
    device = parsed_device(parser, args.device)
    check_outputs(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"{args.model}, {args.frames} frames, batch {args.batch}, {args.precision}, {name} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    resume = resume_from(parser, args, "bench_train", ROW_KEYS, CANDIDATE_KEYS)
    log = RowLog(args.jsonl, "bench_train", environment(device), args.tag)

    def write(rows) -> Optional[str]:
        if not args.json:
            return None
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args), "rows": rows}
        write_json(args.json, record)
        return f"--json {args.json}"
    try:
        rows = bench(args, log, resume)
    except BaseException as e:  # (Ctrl-C too: the rows measured are written before it ends the run)
        return keep_rows(e, args.jsonl, lambda: write(log.rows_of()))
    print(format_table(rows))
    for r in rows:
        if r.get("agrees") is False:
            print(f"  {r['mode']} {r['variant']} ({r['backend']}): {r['disagreement']}")
    write(rows)
    return int(any("error" in r or r.get("agrees") is False for r in rows))


if __name__ == "__main__":
    exit_for_good(main())
