"""What the compiler makes of the merge and attention kernels on Hopper and Ampere, without a GPU.

``python -m benchmarks.codegen`` runs every merge step of the ViT-B/32, ViT-B/16 and ViT-L/14
schedules (batch 1 and 32; fp16, bf16, fp32; forward and backward), and every layer's attention,
through the Triton launchers with the launches recorded instead of run (meta tensors: no memory,
no device), compiles each distinct kernel variant for sm_90 and sm_80 with Triton's ``GPUTarget``,
runs ``ptxas -v`` on the PTX, and prints the toolchain, then per variant: programs at batch 1 and
32, registers, spill bytes, shared memory, the widest global load/store and the count of scalar
16-bit global accesses; then, per merge step, kernel launches and buffer allocations, and the
launchers' host time. Every merge runs as the model runs it, with the LayerNorm that follows it in
its merge launch (``NORM=1``); attention runs on token-major views of the packed projection, with
the size bias from the first merge on, at every layer of the schedules and at the head dims of
larger open_clip ViTs (``OTHER_HEAD_DIMS``); every residual add that takes the LayerNorm after it
(``ops.add_norm``) runs at its shape and layout, and so does the embedding's ``ops.embed_norm``; every block's
``c_fc`` and GELU run as one 16-bit ``ops.linear_act`` (what the encoder launches with ``encoder.FUSED_MLP``).
``--kernels merge``, ``attention``, ``norm`` or ``mlp`` narrows it.
``--loops`` adds each variant's main loop in machine code (``nvdisasm``, bundled with Triton): the
instructions a warp issues per trip, the special-function, tensor-core and select (``FSEL``, ``SEL``: a
mask applied to values) ones among them (for the attention kernels, the loop over full tiles), and for the
merge forward's gather the global-load latencies a trip waits out in turn against the sources it gathers
(:func:`load_waits`: the chain that sets a merge's time where one B token gathers many sources); for the match
with its plan, those its clip's last program waits out in turn after its own B range (:func:`chain_waits` of
:func:`tail_lines`: the clip's counter, the combine, the plan and the grouping, each loop counted once).

``--check`` exits non-zero on a spill, on a scalar 16-bit global access in a kernel that moves
16-bit features, on more than 2 forward launches per merge step, or on more than one allocation
per forward merge step besides its outputs (``tests/test_codegen.py`` runs it on a subset). Run
it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tempme_fast import TempMeConfig, token_schedule
from tempme_fast.arguments import positive_int
from tempme_fast.loading import DTYPES
# Recording and compiling launches (re-exported: benchmarks.warm and the tests use them from here).
from tempme_fast.ops.recording import KERNELS, Launch, Recorder, compile_launch, variant_key  # noqa: F401

from .bench_attention import AttentionShape, layer_attentions
from .common import VIT_GEOMETRY, metric_tensor

# The benchmarks' (depth, tokens per frame, width, heads), plus ViT-L/14: compiling needs no model.
GEOMETRY = {**VIT_GEOMETRY, "ViT-L-14": (24, 257, 1024, 16)}
ARCHS = (90, 80)
# What a forward merge step returns (merged tokens, their sizes, the LayerNorm after them): every other
# allocation of the step is workspace, of which --check allows one (the plan).
STEP_OUTPUTS = 3
# ld/st.global with an optional vector width and an element type: the access width in bits.
ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.([bfsu])(8|16|32|64)\b")
# An asynchronous copy from global into shared memory (software-pipelined loads), with its size in bytes.
ASYNC_COPY = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


@dataclass(frozen=True)
class Step:
    """One merge of a schedule: ``rows`` clips of ``tokens`` tokens (``group`` unjoined clips each
    for a cross-clip merge, which reads ``x`` as its metric and adds the frame embedding)."""

    model: str
    batch: int
    layer: int
    stage: str
    rows: int
    tokens: int
    protected: int
    group: int
    channels: int
    width: int
    r: int
    heads: int = 1  # the metric is averaged over this many channel groups (after attention: every head's keys)


def schedule_steps(model: str, batch: int, config: TempMeConfig = TempMeConfig()) -> List[Step]:
    """Every merge the schedule runs, in order, with the shapes the model passes to the ops."""
    depth, tokens, width, heads = GEOMETRY[model]
    steps = []
    for p in token_schedule(config, depth, tokens).layers:
        if p.group > 1 and p.r_cross:
            steps.append(Step(model, batch, p.layer, "cross", batch * p.clips_in, p.tokens_in, p.protected_in,
                              p.group, width, width, p.r_cross))
        if p.r:
            steps.append(Step(model, batch, p.layer, p.kind, batch * p.clips_out, p.tokens_attn, p.protected_out,
                              1, width, width, p.r, heads))
    return steps


def step_inputs(step: Step, dtype: torch.dtype, device: str = "meta"):
    """``(metric, x, size, frame_pos)`` as the model passes them (frame_pos only for a join)."""
    clips = step.rows * step.group
    x = torch.empty(clips, step.tokens, step.width, dtype=dtype, device=device)
    size = torch.empty(clips, step.tokens, 1, dtype=torch.float32, device=device)
    if step.group > 1:
        frame_pos = torch.empty(1, clips // step.batch, 1, step.width, dtype=dtype, device=device)
        return x, x, size, frame_pos
    return metric_tensor(clips, step.tokens, step.channels, step.heads, dtype, device), x, size, None


def forward_step(step: Step, inputs, stats: bool = False):
    """The forward launcher calls of one merge step as the model makes them: the match, then the
    merge, which also writes the LayerNorm that follows it (``ln_2`` after a merge after attention,
    ``ln_1`` after a cross-clip merge) and, in training (``stats``), that LayerNorm's statistics; a
    merge after attention also adds the attention's residual as it reads ``x``. Returns
    ``(out, b_size, plan)``."""
    from tempme_fast.ops import triton_ops

    metric, x, size, frame_pos = inputs
    merged, dst, kept, src, offsets = triton_ops.match_forward(metric, step.r, step.protected, step.group, step.heads)
    norm = (torch.empty(step.width, dtype=x.dtype, device=x.device),) * 2 + (1e-5,)
    residual = torch.empty_like(x) if step.group == 1 else None
    out, size_out, b_size = triton_ops.merge_forward(x, size, merged, dst, kept, step.protected, step.group,
                                                     frame_pos, src, offsets, norm, residual, stats)[:3]
    return out, triton_ops.merged_b_sizes(size_out, b_size, offsets.shape[1] - 1), (merged, dst, kept)


def run_step(step: Step, dtype: torch.dtype, device: str = "meta", backward: bool = True):
    """The launcher calls of one merge step (match, merge and, optionally, the merge's backward, after
    the training forward's merge, which also writes the LayerNorm's statistics)."""
    from tempme_fast.ops import triton_ops

    inputs = step_inputs(step, dtype, device)
    out, b_size, (merged, dst, kept) = forward_step(step, inputs, stats=backward)
    _, _, size, frame_pos = inputs
    if backward:
        triton_ops.merge_backward(torch.empty_like(out), size, b_size, merged, dst, kept, step.protected,
                                  step.tokens, step.group, pos_grad=frame_pos is not None)


# Head dims of other open_clip ViTs (ViT-B and ViT-L have 64): each compiled at one layer of a 224 px
# frame at patch 14, 16 heads, with the size bias.
OTHER_HEAD_DIMS = {72: "SO400M", 80: "ViT-H", 88: "ViT-g", 104: "ViT-bigG"}


# An attention layer as the launchers see it, and whether it has the size bias.
AttentionStep = Tuple[AttentionShape, bool]


def head_dim_steps(batch: int, frames: int = 12) -> List[AttentionStep]:
    """One biased attention per head dim of ``OTHER_HEAD_DIMS``, ``batch`` videos of ``frames`` frames."""
    return [(AttentionShape(f"d={d} ({name})", batch, 0, batch * frames, 257, 16, d), True)
            for d, name in OTHER_HEAD_DIMS.items()]


def attention_steps(model: str, batch: int, config: TempMeConfig = TempMeConfig()) -> List[AttentionStep]:
    """Every layer's attention as the encoder runs it (``encoder.block_forward``): after the
    layer's join and cross-clip merge, with the bias from the first merge on; and the last layer's
    again as a trimmed last block runs it (``encoder.class_block_forward``: the class tokens query)."""
    layers = layer_attentions(model, batch, config, GEOMETRY)
    steps = [(shape, config.prop_attn and merged) for _, shape, merged in layers]
    plan, shape, merged = layers[-1]
    return steps + [(replace(shape, queries=plan.protected_out), config.prop_attn and merged)]


def run_attention(step: AttentionStep, dtype: torch.dtype, device: str = "meta", backward: bool = True):
    """The attention launcher calls of one layer: the inference forward on token-major views of the
    packed q | k | v projection (``ops.self_attention``: the kernel reads the sizes and takes their
    log, and writes no log-sum-exp) and, optionally, the training forward and backward as the
    autograd functions call them (no bias gradient: size needs none): on the packed projection, whose
    gradient the backward writes packed, the kernels taking the sizes' log (``SelfAttentionFunction``).
    A class-token step (``queries``) reads q from its own projection and k, v from the packed k | v
    one (``ops.query_attention``, as ``encoder.class_block_forward`` calls it); in training the
    backward writes q's gradient and the packed k | v one's (``QueryAttentionFunction``)."""
    from tempme_fast.ops import triton_attention

    s, biased = step
    bias = torch.empty(s.rows, s.tokens, 1, dtype=torch.float32, device=device) if biased else None
    if s.queries:
        q_packed = torch.empty(s.rows, s.queries, s.heads * s.head_dim, dtype=dtype, device=device)
        q = q_packed.view(s.rows, s.queries, s.heads, s.head_dim)
        kv = torch.empty(s.rows, s.tokens, 2 * s.heads * s.head_dim, dtype=dtype, device=device)
        k, v = kv.view(s.rows, s.tokens, 2, s.heads, s.head_dim).unbind(2)
    else:
        qkv = torch.empty(s.rows, s.tokens, 3 * s.heads * s.head_dim, dtype=dtype, device=device)
        q, k, v = qkv.view(s.rows, s.tokens, 3, s.heads, s.head_dim).unbind(2)
    triton_attention.attention_forward(q, k, v, bias, token_major=True, log_bias=biased, keep_lse=False)
    if backward and not s.queries:
        out, lse = triton_attention.self_attention_forward(qkv, s.heads, bias, log_bias=biased)
        triton_attention.self_attention_backward(torch.empty_like(out), qkv, s.heads, bias, out, lse, bias_grad=False,
                                                 log_bias=biased)
    elif backward:
        out, lse = triton_attention.query_attention_forward(q_packed, kv, s.heads, bias, log_bias=biased)
        triton_attention.query_attention_backward(torch.empty_like(out), q_packed, kv, s.heads, bias, out, lse,
                                                  bias_grad=False, log_bias=biased)


@dataclass(frozen=True)
class NormStep:
    """One residual add with the LayerNorm after it (``ops.add_norm``) as the encoder runs it: ``rows``
    clips of ``tokens`` tokens; ``view_of`` tokens per clip when ``x`` is the first ``tokens`` of a
    longer clip (the trimmed last block's class tokens), else 0."""

    model: str
    batch: int
    layer: int
    what: str
    rows: int
    tokens: int
    width: int
    view_of: int = 0


# The norm step of the embedding's ops.embed_norm (class token, position embedding and ln_pre), at layer -1.
EMBED_STEP = "embed+ln_pre"


def norm_steps(model: str, batch: int, config: TempMeConfig = TempMeConfig()) -> List[NormStep]:
    """The embedding's ``ops.embed_norm`` (class token, position embedding and ``ln_pre``, layer -1) and every
    ``ops.add_norm`` of a forward (``model.run_blocks``): each block's MLP residual with the next block's
    ``ln_1`` unless that block joins clips, and in the trimmed last block the class tokens' attention residual
    with ``ln_2`` and their MLP residual with ``ln_post``."""
    depth, tokens, width, heads = GEOMETRY[model]
    layers = token_schedule(config, depth, tokens).layers
    steps = [NormStep(model, batch, -1, EMBED_STEP, batch * config.frames, tokens, width)]
    steps += [NormStep(model, batch, p.layer, "mlp+ln_1", batch * p.clips_out, p.tokens_out, width)
              for p, after in zip(layers, layers[1:]) if after.group == 1]
    last = layers[-1]
    c = last.protected_out
    return steps + [NormStep(model, batch, last.layer, "attn+ln_2", batch * last.clips_out, c, width, last.tokens_attn),
                    NormStep(model, batch, last.layer, "mlp+ln_post", batch * last.clips_out, c, width)]


def run_norm(step: NormStep, dtype: torch.dtype, device: str = "meta", stats: bool = False) -> None:
    """The launcher call of one fused residual add and LayerNorm, on the layouts the encoder passes;
    in training (``stats``) it also writes the LayerNorm's statistics. The embedding's step is the
    inference call of ``embed_norm`` (class token, position embedding and ``ln_pre``)."""
    from tempme_fast.ops import triton_norm

    if step.what == EMBED_STEP:  # inference only: training runs the torch ops
        if not stats:
            # The patch embedding as the encoder makes it on CUDA: a matrix product's contiguous output.
            patches = torch.empty(step.rows, step.tokens - 1, step.width, dtype=dtype, device=device)
            table = torch.empty(step.tokens, step.width, dtype=dtype, device=device)
            # with the first block's ln_1 (model.first_norm), as encode_video runs it
            triton_norm.embed_norm_forward(patches, table[0], table, table[0], table[0], 1e-5, table[0], table[0],
                                           1e-5)
        return
    x = torch.empty(step.rows, step.view_of or step.tokens, step.width, dtype=dtype, device=device)[:, :step.tokens]
    residual = torch.empty(step.rows, step.tokens, step.width, dtype=dtype, device=device)
    weight = torch.empty(step.width, dtype=dtype, device=device)
    triton_norm.add_norm_forward(x, residual, weight, weight, 1e-5, stats)


def norm_launches(step: NormStep, dname: str) -> List["Launch"]:
    rec = Recorder("triton_norm")
    with rec.active():
        run_norm(step, DTYPES[dname])
        run_norm(step, DTYPES[dname], stats=True)
    return rec.launches


@dataclass(frozen=True)
class MlpStep:
    """One block's ``c_fc`` and activation as ``ops.linear_act`` runs them (``encoder.FUSED_MLP``): ``rows``
    tokens of ``width`` features into ``hidden``."""

    model: str
    batch: int
    layer: int
    rows: int
    width: int
    hidden: int


def mlp_steps(model: str, batch: int, config: TempMeConfig = TempMeConfig()) -> List[MlpStep]:
    """Every block's MLP input: the tokens after its merge, and the trimmed last block's class tokens."""
    depth, tokens, width, heads = GEOMETRY[model]
    layers = token_schedule(config, depth, tokens).layers
    steps = [MlpStep(model, batch, p.layer, batch * p.clips_out * p.tokens_out, width, 4 * width) for p in layers[:-1]]
    last = layers[-1]
    return steps + [MlpStep(model, batch, last.layer, batch * last.clips_out * last.protected_out, width, 4 * width)]


def run_mlp(step: MlpStep, dtype: torch.dtype, device: str = "meta") -> None:
    """The launcher call of one block's fused ``c_fc`` and GELU, as the encoder makes it (16-bit weights only:
    other dtypes run torch's ops)."""
    from tempme_fast.ops import triton_linear

    if dtype.itemsize != 2:
        return
    x = torch.empty(step.rows, step.width, dtype=dtype, device=device)
    weight = torch.empty(step.hidden, step.width, dtype=dtype, device=device)
    triton_linear.linear_act_forward(x, weight, weight[:, 0].contiguous(), "gelu")


def mlp_launches(step: MlpStep, dname: str) -> List["Launch"]:
    rec = Recorder("triton_linear")
    with rec.active():
        run_mlp(step, DTYPES[dname])
    return rec.launches


def _bundled(tool: str) -> str:
    """A CUDA tool shipped with Triton (``ptxas``, ``nvdisasm``), else the one on the PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return bundled if os.path.exists(bundled) else tool


def _ptxas() -> str:
    return _bundled("ptxas")


# One SASS instruction as nvdisasm prints it: its address, an optional predicate, the opcode; and a label.
SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;")
SASS_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
# Tensor-core products: Hopper's warpgroup MMA, Ampere's warp MMA.
TENSOR_OPS = ("HGMMA", "HMMA")
SASS_BRANCH = re.compile(r"\bBRA\b.*?\.?(L_x_\d+)")


def sass_text(cubin: bytes) -> str:
    """A kernel's machine code as ``nvdisasm`` (bundled with Triton) prints it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([_bundled("nvdisasm"), "-c", path], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvdisasm failed: {done.stderr[-2000:]}")
    return done.stdout


def sass_loop_lines(cubin: bytes, first: bool = False) -> List[str]:
    """The instructions of the longest loop in a kernel's machine code (:func:`sass_text`), or with
    ``first`` of the first one, as nvdisasm prints them: from a label to the branch back to it, once, as
    one trip of the loop runs them (a kernel without a loop has 1: the branch to itself that follows its
    exit). For the attention kernels that is the walk over key (or query) tiles: the first loop, over the
    full tiles, whose loads take no mask (a second loop of at most one trip takes the partial last tile).
    For the merge forward it is the gather of a token's sources (``SRC_CHUNK`` of them a trip); for the
    match, a tile of B tokens."""
    lines, labels, best = [], {}, []
    for line in sass_text(cubin).splitlines():
        label = SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = len(lines)
        instruction = SASS_LINE.match(line)
        if not instruction:
            continue
        lines.append(line)
        branch = SASS_BRANCH.search(line)
        if branch and instruction.group(1) == "BRA" and branch.group(1) in labels:
            body = lines[labels[branch.group(1)]:]
            if first:
                return body
            best = body if len(body) > len(best) else best
    return best


# One instruction's guard predicate, opcode (with its modifiers) and operands.
SASS_OPERANDS = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
SASS_REGISTER = re.compile(r"\b(U?R\d+|U?P\d)(\.64|\.128)?\b")
SASS_PREDICATE = re.compile(r"!?U?P[T0-9]")
# Opcodes whose first operand is read, not written (stores, branches, barriers).
SASS_NO_DEST = ("BRA", "EXIT", "BAR", "RED", "MEMBAR", "DEPBAR", "NOP", "CALL", "RET", "WARPSYNC", "BSYNC", "BSSY",
                "YIELD")


def _registers(name: str, width: int) -> List[str]:
    """``name`` (``R12``) and the ``width - 1`` registers after it: a 64- or 128-bit operand's."""
    match = re.fullmatch(r"(U?R)(\d+)", name)
    return [f"{match.group(1)}{int(match.group(2)) + k}" for k in range(width)] if match else [name]


def sass_operands(line: str) -> Optional[Tuple[str, List[str], List[str]]]:
    """``(opcode, registers written, registers read)`` of one instruction line, the guard predicate read."""
    match = SASS_OPERANDS.match(line)
    if not match:
        return None
    guard, opcode, rest = match.groups()
    base = opcode.split(".")[0]
    width = 4 if ".128" in opcode else 2 if (".64" in opcode or opcode.startswith("IMAD.WIDE") or base in (
        "DADD", "DFMA", "DMUL") or base == "CS2R" and ".32" not in opcode) else 1
    operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
    written, read = [], [guard.strip().lstrip("@!")] if guard else []
    writes = not (base.startswith("ST") or base in SASS_NO_DEST)
    # A predicate, then the register written (an atomic's "PT, R7, [address], R7", SHFL's "PT, R0, R7, ..."):
    # both written.
    lead = 1 if len(operands) > 1 and SASS_PREDICATE.fullmatch(operands[0]) and re.fullmatch(r"U?R\d+", operands[1]) \
        else 0
    if writes and lead:
        written += [] if operands[0].endswith("PT") else [operands[0]]
    for k, operand in enumerate(operands):
        found = SASS_REGISTER.findall(operand)
        if writes and k < lead:
            continue
        if writes and k == lead and found and re.fullmatch(r"U?[RP]\d+", operand):
            written += _registers(found[0][0], width)
            continue
        if writes and 0 < k <= 2 and written and SASS_PREDICATE.fullmatch(operand) and all(
                SASS_PREDICATE.fullmatch(o) for o in operands[1:k]):  # carry-out or second predicate
            written += [] if operand.endswith("PT") else [operand]
            continue
        for name, suffix in found:
            size = 4 if suffix == ".128" else 2 if suffix == ".64" else 1
            read += _registers(name, width if base.startswith("ST") and k == len(operands) - 1 else size)
    return opcode, written, read


def tail_lines(cubin: bytes) -> List[str]:
    """The instructions of a match kernel from its clip counter's atomic on, in the order nvdisasm prints
    them: what the clip's last program runs after its own B range (the combine, the plan, the grouping)."""
    lines = [line for line in sass_text(cubin).splitlines() if SASS_LINE.match(line)]
    start = next((i for i, line in enumerate(lines) if SASS_LINE.match(line).group(1) == "ATOMG"), len(lines))
    return lines[start:]


def chain_waits(lines: Sequence[str]) -> int:
    """Global-load latencies straight-line code waits out in turn, as :func:`load_waits` counts them, each
    instruction run once (a loop's body as one trip); an atomic's result counts as a load's. For a match's
    :func:`tail_lines`, the latencies between its last B range and its plan written, where the combine runs
    one step (up to ``COMBINE_BLOCK`` A tokens) and the plan sorts."""
    body = [parsed for parsed in map(sass_operands, lines) if parsed]
    return _in_order(body, 1)[-1]


def _in_order(body, trips: int) -> List[int]:
    """Where each of ``trips`` back-to-back runs of ``body`` (parsed instructions) ends, in load latencies
    (:func:`load_waits`): global loads and atomics take one, every other result none."""
    ready: Dict[str, int] = {}
    last_read: Dict[str, int] = {}
    now, ends = 0, []
    for _ in range(trips):
        for opcode, written, read in body:
            now = max([now] + [ready.get(r, 0) for r in read] + [last_read.get(r, 0) for r in written]
                      + [ready.get(r, 0) for r in written])
            for r in read:
                last_read[r] = max(last_read.get(r, 0), now)
            for r in written:
                ready[r] = now + (1 if opcode.startswith(("LDG", "ATOMG")) else 0)
        ends.append(now)
    return ends


def load_waits(lines: Sequence[str], trips: int = 4) -> int:
    """Global-load latencies one trip of a loop waits out in turn, as a warp issues it: in order, an
    instruction issuing once the registers it reads are written and those it writes are free (read by
    the instructions before it, and written by any load still in flight). A global load's result comes
    one latency after it issues; every other result at once. Counted over the last of ``trips`` trips
    run back to back, so that loads issued for the next trip count where they are waited on.

    A load issued before the instruction that waits on another one is in flight with it: a gather whose
    index, size and row loads are each waited on before the next is issued costs three latencies a
    source; one that issues every load of a step before its first wait costs two a step (the index, then
    the rows). Shared-memory loads and asynchronous copies are not counted."""
    body = [parsed for parsed in map(sass_operands, lines) if parsed]
    ends = _in_order(body, trips)
    return ends[-1] - ends[-2]


def ptx_stats(ptx: str, arch: int) -> Dict[str, int]:
    """Registers and spill bytes (``ptxas -v``), widest global access in bits and scalar 16-bit accesses
    (loads, stores, and the asynchronous copies into shared memory of software-pipelined loops)."""
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([_ptxas(), "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {done.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)]
    widest, scalar16 = access_widths(ptx)
    return {"regs": int(regs.group(1)) if regs else 0, "spill": sum(spills), "widest": widest,
            "scalar16": scalar16}


def access_widths(ptx: str) -> Tuple[int, int]:
    """``(widest, scalar16)``: the widest global access in bits and the count of scalar 16-bit ones,
    over plain loads and stores and the asynchronous copies into shared memory."""
    widest, scalar16 = 0, 0
    for _, vec, _, bits in ACCESS.findall(ptx):
        width = int(bits) * int(vec or 1)
        widest = max(widest, width)
        scalar16 += int(bits) == 16 and not vec
    for size in ASYNC_COPY.findall(ptx):
        width = 8 * int(size, 0)
        widest = max(widest, width)
        scalar16 += width == 16
    return widest, scalar16


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def collect(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[str],
            kernels: Sequence[str] = ("merge", "attention", "norm", "mlp")):
    """``(variants, steps)``: each distinct launch with the programs it runs per batch, and per
    merge step its forward/backward launches and allocations. ``kernels``: any of the merge steps'
    kernels, the attention's (every layer, forward and backward), the fused residual adds' and the fused
    ``c_fc`` and GELU's (``mlp``)."""
    variants: Dict[tuple, dict] = {}
    steps = []

    def add(launches, batch, dname, stage):
        for launch in launches:
            key = (dname,) + variant_key(launch, ARCHS[0])
            v = variants.setdefault(key, {"launch": launch, "dtype": dname, "programs": defaultdict(list),
                                          "stages": set()})
            v["programs"][batch].append(launch.grid[0] * launch.grid[1] * launch.grid[2])
            v["stages"].add(stage)

    for model in models:
        short = model.replace("ViT-", "")
        for batch in batches:
            for dname in dtypes:
                for step in schedule_steps(model, batch) if "merge" in kernels else ():
                    fwd = Recorder()
                    with fwd.active():
                        run_step(step, DTYPES[dname], backward=False)
                    rec = Recorder()
                    with rec.active():
                        run_step(step, DTYPES[dname])
                    steps.append({"step": step, "dtype": dname, "launches": fwd.launches,
                                  "fwd_launches": len(fwd.launches),
                                  "bwd_launches": len(rec.launches) - len(fwd.launches),
                                  "allocations": fwd.allocations})
                    # Inference and training forward differ in the merge's LayerNorm statistics.
                    add(fwd.launches + rec.launches, batch, dname, f"{short} L{step.layer} {step.stage}")
                for att in attention_steps(model, batch) if "attention" in kernels else ():
                    kind = "class attn" if att[0].queries else "attn"
                    add(attention_launches(att, dname), batch, dname, f"{short} L{att[0].layer} {kind}")
                for norm in norm_steps(model, batch) if "norm" in kernels else ():
                    add(norm_launches(norm, dname), batch, dname, f"{short} L{norm.layer} {norm.what}")
                for mlp in mlp_steps(model, batch) if "mlp" in kernels else ():
                    add(mlp_launches(mlp, dname), batch, dname, f"{short} L{mlp.layer} c_fc+gelu")
    for batch in batches:
        for dname in dtypes:
            for att in head_dim_steps(batch) if "attention" in kernels else ():
                add(attention_launches(att, dname), batch, dname, att[0].model)
    return variants, steps


def attention_launches(step: AttentionStep, dname: str) -> List[Launch]:
    rec = Recorder("triton_attention")
    with rec.active():
        run_attention(step, DTYPES[dname])
    return rec.launches


def bound_args(launch: Launch) -> dict:
    """The launch's arguments by name, constexprs and launch options included."""
    return dict(zip(launch.kernel.arg_names, launch.args)) | launch.kwargs


def describe(launch: Launch) -> str:
    """The constexprs and specialised sizes that tell variants apart."""
    bound = bound_args(launch)
    keys = [k for k in ("C", "HEADS", "D", "GROUP", "HAS_RES", "HAS_POS", "NORM", "STATS", "NEXT", "ACT", "POS_GRAD",
                        "PLAN", "DOT_MODE", "HEAD_DIM", "HAS_BIAS", "LOG_BIAS", "STORE_LSE", "BIAS_GRAD", "DKDV",
                        "BLOCK_A", "BLOCK_B", "BLOCK_C", "BLOCK_M", "BLOCK_N", "BLOCK_T", "BLOCK_D", "SRC_CHUNK",
                        "num_warps")
            if k in bound and not (k == "HEADS" and bound[k] == 1)  # (HEADS: a match averaging heads)
            and not (k == "SRC_CHUNK" and bound[k] == 1)]  # (SRC_CHUNK: a merge gathering sources in steps)
    return " ".join(f"{k}={int(bound[k]) if isinstance(bound[k], bool) else bound[k]}" for k in keys)


def serial_steps(launch: Launch) -> Dict[str, int]:
    """The loop trips on the longest path through one program of the match launch, read off the
    kernel's loops: the critical-path model of ``BENCHMARKS.md``.

    ``main`` steps of every program (channel chunks for the A norms, then B blocks x channel
    chunks), then in the last program of each clip ``combine`` (blocks of ``COMBINE_BLOCK`` A tokens x B
    ranges / ``RANGES_PER_STEP``) and the plan: ``sort_stages`` compare-exchange stages of one bitonic sort
    held in registers (the kept tokens then take one max and one prefix sum, not counted), or
    ``count`` steps (A blocks squared) when the plan counts; then the
    grouping by destination: ``group_stages`` of one sort of the ``r`` merged tokens (then one
    histogram of their destinations and one prefix sum, not counted), or
    ``group_count`` steps (destination blocks x two passes over the r merged tokens). A merge
    program has no loop but its gather, whose trips (the most sources of one B token in its
    tile) depend on the plan.
    """
    from tempme_fast.ops.triton_ops import _cdiv
    from tempme_kernels.best_match import RANGES_PER_STEP

    bound = bound_args(launch)
    if launch.kernel.fn.__name__ != "_best_match_fwd_kernel":
        return {}
    plan = bound["PLAN"]
    a_blocks = _cdiv(bound["NA"], bound["BLOCK_A"])
    main = _cdiv(bound["C"], bound["BLOCK_C"]) * (1 + _cdiv(bound["B_PER"], bound["BLOCK_B"]))
    combine = _cdiv(bound["NA"], bound.get("COMBINE_BLOCK", bound["BLOCK_A"])) * _cdiv(bound["SPLITS"],
                                                                                    int(RANGES_PER_STEP))
    out = {"main": main, "combine": combine if plan else 0}
    levels = bound["SORT_BLOCK"].bit_length() - 1
    out["sort_stages"] = levels * (levels + 1) // 2 if plan and bound["SORT_BLOCK"] else 0
    out["count"] = a_blocks * a_blocks if plan and not bound["SORT_BLOCK"] else 0
    levels = bound["GROUP_BLOCK"].bit_length() - 1
    out["group_stages"] = levels * (levels + 1) // 2 if plan and bound["GROUP_BLOCK"] else 0
    out["group_count"] = (_cdiv(bound["NB"] + 1, bound["BLOCK_A"]) * 2 * _cdiv(bound["R"], bound["BLOCK_A"])
                          if plan and not bound["GROUP_BLOCK"] else 0)
    return out


def critical_path_table(steps, out=sys.stdout) -> None:
    """Per merge step: programs of the match and merge launches, and the serial steps of the match."""
    print("| model | batch | dtype | layer | stage | rows x tokens, r | match programs | match steps (main + combine "
          "+ plan) | merge programs | grouping (in the match) |", file=out)
    print("|---" * 10 + "|", file=out)
    for s in steps:
        if len(s.get("launches", ())) < 2:
            continue  # a step recorded without its match and merge launches has no path to show
        step = s["step"]
        match, merge = s["launches"][0], s["launches"][-1]
        m = serial_steps(match)
        plan = f"sort {m['sort_stages']} stages" if m["sort_stages"] else f"count {m['count']}"
        grouping = f"count {m['group_count']}" if m["group_count"] else f"sort {m['group_stages']} stages"
        programs = [launch.grid[0] * launch.grid[1] * launch.grid[2] for launch in (match, merge)]
        print(f"| {step.model} | {step.batch} | {s['dtype']} | {step.layer} | {step.stage} "
              f"| {step.rows // step.group} x {step.tokens * step.group}, {step.r} | {programs[0]} "
              f"| {m['main']} + {m['combine']} + {plan} | {programs[1]} | {grouping} |", file=out)


def host_us_per_step(step: Step, dtype: torch.dtype, repeats: int = 200) -> float:
    """Microseconds of launcher Python per forward step (match + merge) with the launches stubbed
    out: the host cost this library adds on top of Triton's own launch path."""
    rec = Recorder()
    with rec.active():
        inputs = step_inputs(step, dtype, "cpu" if step.rows * step.tokens * step.width < 1 << 24 else "meta")

        def fwd():
            forward_step(step, inputs)

        fwd()
        best = float("inf")
        for _ in range(5):  # the fastest of 5 rounds: other processes on the host only add time
            t0 = time.perf_counter()
            for _ in range(repeats):
                fwd()
            best = min(best, (time.perf_counter() - t0) / repeats * 1e6)
        return best


def toolchain() -> str:
    """The versions that decide the code: Triton, its ptxas, torch."""
    import triton

    path = _ptxas()
    done = subprocess.run([path, "--version"], capture_output=True, text=True)
    ptxas = re.search(r"release ([\d.]+)", done.stdout)
    where = "bundled with triton" if path.startswith(os.path.dirname(triton.__file__)) else path
    return (f"triton {triton.__version__}, ptxas {ptxas.group(1) if ptxas else 'unknown'} ({where}), "
            f"torch {torch.__version__}")


def report(models, batches, dtypes, archs=ARCHS, out=sys.stdout, kernels=("merge", "attention", "norm", "mlp"),
           loops: bool = False) -> List[str]:
    """Print the tables; return the failures that ``--check`` exits on. With ``loops``, also each
    variant's main loop in machine code (:func:`sass_loop_lines`) and its opcodes."""
    print(f"Compiled with {toolchain()}", file=out)
    print(file=out)
    variants, steps = collect(models, batches, dtypes, kernels)
    failures, loop_rows = [], []
    print("| kernel | dtype | variant | used at | programs B1 | programs B32 | sm | regs | spill B | smem B "
          "| widest access | scalar 16-bit |", file=out)
    print("|---" * 12 + "|", file=out)
    for key, v in sorted(variants.items(), key=lambda kv: (kv[0][1], kv[0][0], describe(kv[1]["launch"]))):
        launch = v["launch"]
        name = launch.kernel.fn.__name__
        progs = {b: (f"{min(p)}-{max(p)}" if min(p) != max(p) else str(p[0])) for b, p in v["programs"].items()}
        stages = sorted(v["stages"])
        used = stages[0] + (f" +{len(stages) - 1}" if len(stages) > 1 else "")
        for arch in archs:
            compiled = compile_launch(launch, arch)
            stats = ptx_stats(compiled.asm["ptx"], arch)
            smem = compiled.metadata.shared
            print(f"| {name} | {v['dtype']} | {describe(launch)} | {used} | {progs.get(1, '-')} | {progs.get(32, '-')} "
                  f"| sm_{arch} | {stats['regs']} | {stats['spill']} | {smem} | {stats['widest']} bit "
                  f"| {stats['scalar16']} |", file=out, flush=True)
            label = f"{name} {v['dtype']} [{describe(launch)}] sm_{arch}"
            if loops:
                body = sass_loop_lines(compiled.asm["cubin"], first=name.startswith("_attention"))
                ops = Counter(SASS_LINE.match(line).group(1) for line in body)
                waits = "-"
                bound = bound_args(launch)
                if name == "_merge_fwd_kernel" and not bound.get("SRC_BLOCK") and bound.get("SRC_STAGES", 1) == 1:
                    waits = f"{load_waits(body)} / {bound.get('SRC_CHUNK', 1)}"  # (pipelined: copies, not loads)
                if name == "_best_match_fwd_kernel" and bound["PLAN"]:
                    waits = f"tail {chain_waits(tail_lines(compiled.asm['cubin']))}"
                loop_rows.append(f"| {name} | {v['dtype']} | {describe(launch)} | sm_{arch} | {sum(ops.values())} "
                                 f"| {ops['MUFU']} | {sum(n for op, n in ops.items() if op in TENSOR_OPS)} "
                                 f"| {ops['FSEL'] + ops['SEL']} | {waits} |")
            if stats["spill"]:
                failures.append(f"{label}: {stats['spill']} bytes of spills")
            if v["dtype"] in ("fp16", "bf16") and stats["scalar16"]:
                failures.append(f"{label}: {stats['scalar16']} scalar 16-bit global accesses")
    print(file=out)
    if loop_rows:
        print("| kernel | dtype | variant | sm | loop instructions | of them MUFU | tensor-core | selects "
              "| load waits / sources a trip (match: its clip's tail) |", file=out)
        print("|---" * 9 + "|", file=out)
        print("\n".join(loop_rows), file=out)
        print(file=out)
    if not steps:
        return failures
    print("| model | batch | dtype | merges | fwd launches / step | bwd launches / step | fwd allocations / step "
          "| host us / fwd step |", file=out)
    print("|---" * 8 + "|", file=out)
    grouped = defaultdict(list)
    for s in steps:
        grouped[(s["step"].model, s["step"].batch, s["dtype"])].append(s)
    for (model, batch, dname), rows in grouped.items():
        fwd = max(s["fwd_launches"] for s in rows)
        bwd = max(s["bwd_launches"] for s in rows)
        allocs = max(s["allocations"] for s in rows)
        host = sum(host_us_per_step(s["step"], DTYPES[dname], 50) for s in rows) / len(rows)
        print(f"| {model} | {batch} | {dname} | {len(rows)} | {fwd} | {bwd} | {allocs} | {host:.0f} |", file=out)
        if fwd > 2:
            failures.append(f"{model} batch {batch} {dname}: {fwd} forward launches per merge step (at most 2)")
        if allocs > STEP_OUTPUTS + 1:
            failures.append(f"{model} batch {batch} {dname}: {allocs} allocations per forward merge step (at most "
                            f"{STEP_OUTPUTS + 1}: its {STEP_OUTPUTS} outputs and one workspace)")
    print(file=out)
    critical_path_table(steps, out)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codegen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(GEOMETRY), choices=list(GEOMETRY))
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 32])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--archs", nargs="+", type=int, default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--kernels", nargs="+", default=["merge", "attention", "norm", "mlp"],
                        choices=["merge", "attention", "norm", "mlp"],
                        help="the merge steps' kernels, the attention kernels (every layer's), the residual adds "
                             "fused with the LayerNorm after them, each block's c_fc fused with its GELU "
                             "(16-bit; encoder.FUSED_MLP); default: all")
    parser.add_argument("--loops", action="store_true",
                        help="also print each variant's main loop in machine code (nvdisasm): the instructions a "
                             "warp issues per trip (an attention tile, a merge source, a match tile), the "
                             "special-function (MUFU) and tensor-core ones among them")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on spills, scalar 16-bit global accesses or > 2 forward launches per step")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    failures = report(args.models, args.batches, args.dtypes, args.archs, kernels=args.kernels, loops=args.loops)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
