"""Triton backend of the merge ops: host launchers, the merge autograd function, torch custom ops.

Layering (as Liger-Kernel): the ``@triton.jit`` kernels live in ``tempme_kernels``; this module has
plain launchers (``best_match_forward``, ``match_forward``, ``match_plan_forward``,
``merge_forward``, ``merge_backward``), the custom ops ``tempme::best_match``, ``tempme::match``,
``tempme::merge_fwd``, ``tempme::merge_norm_fwd`` and ``tempme::merge_bwd`` (each with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces through them), the ``MergeFunction`` and
``MergeNormFunction`` autograd functions, and the functions that ``tempme_fast.ops`` dispatches to:
``best_match``, ``match``, ``merge`` and ``merge_norm`` (inputs validated at that boundary), plus
``join_merge``, the ClipMe join and cross-clip merge in one pass.

An eager call runs the launchers directly and uses an autograd function only where a gradient can
flow; the custom ops are taken while ``torch.compile`` traces or a dispatch mode watches
(:mod:`.eager` says why).

A merge step is two launches: the match (best match, plan, and the plan's merged tokens grouped by
destination, ``match_forward``, all in one allocated buffer, the step's one workspace) and the merge
(each output token gathers its grouped sources, ``merge_forward``; the backward reads the B tokens'
merged sizes from the merged sizes it returns, ``merged_b_sizes``); the backward is one launch.
``merge_norm`` is the same two launches, its merge launch also writing the LayerNorm of the merged
tokens (and, given a residual, reading ``x`` and the residual and merging their sum). Tile sizes
and warps come from a fixed table of the shape (``_match_tiles``, ``_merge_tiles``,
``_merge_norm_tiles``), so results repeat bit for bit.

Every launcher takes ``group``: with ``group = g > 1`` its token tensors are the unjoined clips
``[B' * g, N_in, ...]`` and it works on the joined clips ``[B', g * N_in, ...]`` of
``reference.join_clips`` without writing them (``protected`` then counts class tokens per unjoined
clip).

Nothing here reads a value back to the host: output shapes follow from ``N``, ``c`` and ``r``
alone, and every data-dependent loop bound is computed inside a kernel, so a forward made of
these ops can be captured in a CUDA graph.
"""
import os
import threading
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from tempme_kernels.best_match import _best_match_fwd_kernel
from tempme_kernels.match import _match_plan_kernel
from tempme_kernels.merge import _merge_bwd_kernel, _merge_fwd_kernel, _merge_index_kernel

from . import recording
from .eager import cast, custom_op_or, detached, needs_grad, refuse_second_order, use_custom_ops
from .launch import Launcher, launch
from .memo import forget_on_assign, remembered
from .reference import MergePlan, accumulation_dtype, head_mean, split_sizes, split_starts

__all__ = ["MergeFunction", "MergeNormFunction", "best_match", "best_match_forward", "join_merge",
           "join_merge_norm", "layer_norm_backward", "match", "match_buffer_forward", "match_forward",
           "match_plan_forward", "merge",
           "merge_backward", "merge_forward", "merge_index", "merge_norm", "merge_norm_forward"]

# Largest tile (tokens, or channels) one program handles in the interpreter, which pays per
# program and per op, not per lane: there a program takes a whole clip. Tests shrink
# INTERPRETER_BLOCK to walk the multi-tile and multi-program paths that a GPU takes.
INTERPRETER_BLOCK = 1024
# The GPU tiles. A merge program holds a BLOCK_T x BLOCK_D fp32 tile per operand (16 registers a
# thread at 8 warps; fp32 features take 64-wide slices); a match program a 64 x 64 fp32 score tile
# (8 warps: 64 registers a thread).
# benchmarks/codegen.py checks the result: no spills at any shape the schedules launch.
GPU_BLOCK_TOKENS = 32
GPU_BLOCK_MATCH = 64
# Channel chunk of a 16-bit match on a GPU over at least twice as many channels: a join's hidden features, never
# a head's keys. A match program walks the channels in turn (the A norms, then each B block's products), so at the
# joins its time is about its chunks: 128 wide, half the chunks of 64 at 110-128 registers and 80 KB of shared
# memory on sm_90 (64 KB on sm_80), 2 programs an SM as before (benchmarks/codegen.py).
MATCH_BLOCK_C_16 = 128
GPU_BLOCK_CHANNELS = 128
# Elements of a merge-and-LayerNorm program's tile on a GPU (tokens x all features).
NORM_TILE_ELEMENTS = 4096
# Token tile of the merge forward's 16-bit programs on a GPU (_merge_fwd_tiles).
MERGE_FWD_TOKENS = 8
# (destination, merged token) pairs a thread compares in one step of merge_index's grouping on a GPU.
GROUPING_PAIRS_PER_THREAD = 8
# Rows whose plan is sorted in registers (one int64 key a token, kernels/match.py): from
# PLAN_SORT_MIN A tokens, where counting takes (Na / 64)^2 + Na / 64 >= 12 steps that each load and
# reduce a 64 x 64 tile (about 3 us each on an H200 at the end of a ViT-B/16 join's match), against
# Na' (Na' + 1) / 2 register-only compare-exchange stages of one bitonic sort (Na' = log2 of the padded
# row; the kept tokens then take one max and one prefix sum); up to PLAN_SORT_LIMIT. Shorter and
# longer rows, and float64 scores, count.
PLAN_SORT_MIN = 129
PLAN_SORT_LIMIT = 2048
# The plan's grouping by destination sorts the r merged tokens in registers and takes a histogram of
# their Nb destinations, each up to this width (r + Nb + 1 is 918 at ViT-L/14's widest join), and counts
# in 64 x 64 tiles beyond (kernels/group.py).
GROUP_SORT_LIMIT = 2048
# Programs that keep a large GPU busy (2 per SM of an H100): below it, work is split further.
GPU_FILL = 264
# Programs along a CUDA grid's second or third axis (the first holds 2^31 - 1): the kernels put clips (and clips
# x heads) on the first, and the match splits them over the second and third.
GRID_AXIS_LIMIT = 65535
# A merge whose B tokens gather many sources (r >= Nb / MANY_SOURCES_DIVISOR merged tokens: every merge of the
# schedules but the first layers' image merges, where r is 2) runs one token a program on a GPU, its sources
# gathered MERGE_SRC_CHUNK[bytes a feature] a step: a warp waits on each step's loads once (index, then size
# and rows) instead of once a source, and its busiest destination (75 sources at ViT-B/16's last join of one
# video, random weights) sets the merge's time. Compiled for sm_90 and sm_80, a source then costs 0.5-1.75
# waits in turn against 3-9 (benchmarks.codegen --loops); 4 float32 sources a step spilled on sm_80.
MANY_SOURCES_DIVISOR = 8
MERGE_SRC_CHUNK = {2: 4, 4: 2}  # (float64 merges keep their tiles: one token at 8 warps spilled 28-36 B)
# Products of a float32 metric's match on a GPU: "tf32x3" (three TF32 products of the operands' high and
# low parts, on the tensor cores; within about 1e-7 of float32 products on unit vectors) or "ieee"
# (float32 products on the FMA units). With "ieee" the H200 ran the match at the layer-10 join of
# ViT-B/16 (32 videos, 768 channels) at about 5 TFLOP/s, 0.28x the float32 reference's matmul.
FP32_PRODUCTS = "tf32x3"
_FP32_DOT_MODES = {"ieee": 1, "tf32x3": 3}
# A match that averages heads (the keys after attention) loads this many heads' tiles together at most
# (the largest divisor of the head count up to it: 4 of ViT-B's 12), the rest in a loop, one wait on memory
# a step. MATCH_HEADS_MAXNREG caps the registers a thread of its 8-warp programs (16-bit metrics): uncapped,
# ptxas held one variant (ViT-B/32 layer 10, fp16, sm_80) at 80 registers with an 8 B spill; capped at 128,
# none spills (105-127 registers). All 12 heads at once, capped, compile without a spill with triton 3.8's
# ptxas but spill 144-944 B on sm_80 with triton 3.6's; uncapped they spilled 16-24 B there with 3.8's. The
# 4-warp float32 matches are not capped: at 128 they spilled 8 B on sm_90, and they take up to 168 without;
# nor are the 8-warp float32 ones over one chunk (tf32x3 products, _match_tiles): capped at 128, they spilled
# 1.1-1.2 KB on sm_80 (mma.sync takes more registers than Hopper's wgmma); uncapped, 128-131 registers on sm_90
# and 255 on sm_80, no spill.
HEAD_LOADS = 4
# A tokens a step of the match's combine of its B ranges, at most, per warp (the clip's last program, on the
# critical path): a row of up to 512 A tokens in one step at 8 warps, the loads of 8 ranges of it issued
# together, not a step of 64 at a time, each waited on in turn (up to 7 at ViT-B/16's last join, one video).
# 2 values of 8 ranges a token, 64 tokens a warp: 32 registers a thread.
COMBINE_TOKENS_PER_WARP = 64
MATCH_HEADS_MAXNREG = 128
# Whether the match averages the keys over heads as it loads them (True), or torch averages them first and
# the match reads the mean (False: one more kernel and buffer a merge step, as before the match took
# ``heads``; bench_model's ``tempme-triton-mean`` rows time that path against this one).
HEADS_IN_MATCH = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are JIT functions whose
# call from Python costs microseconds each, a measurable share of a merge step's host time.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _axis_tiles(tiles: Dict[str, int], tokens: int) -> Dict[str, int]:
    """``tiles`` with ``BLOCK_T`` doubled until ``tokens`` take at most ``GRID_AXIS_LIMIT`` tiles (a merge's
    third grid axis): only clips of more than 65535 tokens need it."""
    while _cdiv(tokens, tiles["BLOCK_T"]) > GRID_AXIS_LIMIT:
        tiles = dict(tiles, BLOCK_T=2 * tiles["BLOCK_T"])
    return tiles


def _block(n: int, gpu_cap: int, floor: int = 16) -> int:
    cap = INTERPRETER_BLOCK if _interpreting() else gpu_cap
    return max(floor, min(_next_power_of_2(n), max(cap, floor)))


def _new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output and workspace buffer comes from here (tests fill it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


# The match kernel's scratch, one buffer per device and thread. Launches on one stream run one after another, so
# they never use it at the same time; two threads serving one GPU, each on its own stream, would, and would mix
# each other's counters and partials, so each thread has its own. (One thread that launches on two streams without
# making one wait for the other still shares it.) Not per stream: CUDA-graph capture and torch.compile's graphs
# run on streams of their own, and would then make a buffer in their memory pool, which is theirs to reuse.
_THREAD = threading.local()
_COUNTER_BYTES = 4096  # room for 1024 int32 clip counters at the front of the scratch; the partials follow


def scratch_buffers() -> Dict[torch.device, Tuple[torch.Tensor, int]]:
    """This thread's match scratch, ``{device: (buffer, counter bytes)}`` (what a captured graph holds on to)."""
    return _tables()[0]


def _tables() -> Tuple[dict, dict]:
    """This thread's ``(buffers by device, views by (device, rows, partials' shape, dtype))``."""
    try:
        return _THREAD.tables
    except AttributeError:  # the thread's first match
        _THREAD.tables = ({}, {})
        return _THREAD.tables


def _match_scratch(device: torch.device, rows: int, part_shape: Tuple[int, ...], dtype: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(count [>= rows] int32, part [part_shape] dtype)`` for the match kernel, from this thread's buffer
    for ``device``: its counters are zero and every launch leaves them zero, and its partials are written
    before they are read, so a step allocates nothing here once the buffer is large enough."""
    try:  # (attribute access and one look-up: no further call on the common path)
        views = _THREAD.tables[1].get((device, rows, part_shape, dtype))
    except AttributeError:
        views = None
    if views is not None:  # the same views as last time: slicing and viewing are aten ops of host time
        return views
    buffers, cache = _tables()
    part_bytes = dtype.itemsize * int(torch.Size(part_shape).numel())
    buf, counter_bytes = buffers.get(device, (None, 0))
    if buf is None or 4 * rows > counter_bytes or buf.numel() < counter_bytes + part_bytes:
        # The counters stay zero only where no partials were ever written: grow both together.
        counter_bytes = max(_COUNTER_BYTES, _cdiv(4 * rows, 256) * 256)  # partials 256-byte aligned
        buf = torch.zeros(counter_bytes + 2 * part_bytes, dtype=torch.uint8, device=device)
        buffers[device] = buf, counter_bytes
        cache.clear()  # views of the old buffer, whose counters may not be zero any more
    count = buf[:counter_bytes].view(torch.int32)
    part = buf[counter_bytes:counter_bytes + part_bytes].view(dtype).view(part_shape)
    if len(cache) >= 256:  # many shapes (varying batch sizes): keep the cache small
        cache.clear()
    cache[(device, rows, part_shape, dtype)] = count, part
    return count, part


def _positions(tokens: int, protected: int) -> Tuple[int, int, int, int]:
    """``(Na, Nb, A_START, B_START)``: A token ``i`` sits at ``A_START + 2 i``, B token ``j`` at ``B_START + 2 j``."""
    return (*split_sizes(tokens, protected), *split_starts(protected))


def _joined_shape(t: torch.Tensor, protected: int, group: int) -> Tuple[int, int, int]:
    """``(B', N, c)`` of the joined clips that ``t [B' * group, N_in, ...]`` is read as."""
    return t.shape[0] // group, t.shape[1] * group, protected * group


# ---------------------------------------------------------------------------------------------
# Tiles per shape: a fixed table, no autotuning, so the same shape always runs the same code
# ---------------------------------------------------------------------------------------------

def _match_tiles(rows: int, na: int, nb: int, channels: int, dtype: torch.dtype) -> Dict[str, int]:
    """Tiles, B ranges and warps of the match kernel. Few clips (late layers, batch 1) split each
    clip's B tokens into ranges so that about ``GPU_FILL`` programs run."""
    fp32_on_gpu = dtype == torch.float32 and not _interpreting()
    if dtype == torch.float64:
        dot_mode, cap = 2, 16  # no tl.dot: a broadcast-sum over small tiles
    elif fp32_on_gpu:
        if FP32_PRODUCTS not in _FP32_DOT_MODES:
            raise ValueError(f"triton_ops.FP32_PRODUCTS={FP32_PRODUCTS!r} is not one of {sorted(_FP32_DOT_MODES)}")
        dot_mode, cap = _FP32_DOT_MODES[FP32_PRODUCTS], GPU_BLOCK_MATCH
    elif dtype == torch.float32 or _interpreting():
        dot_mode, cap = 1, GPU_BLOCK_MATCH  # the interpreter's bf16 tl.dot is wrong (triton 3.8): fp32
    else:
        dot_mode, cap = 0, GPU_BLOCK_MATCH
    if _interpreting() or dot_mode == 2:
        block_a, block_b = _block(na, cap), _block(nb, cap)
    else:
        # Full 64 x 64 tiles even for short clips: 32- and 16-wide tiles make ptxas spill (sm_90).
        # fp32 takes 64 x 32 tiles at 4 warps: at 8 warps, 64 x 64 spills 20 B on sm_90 with triton
        # 3.6's ptxas and 64 x 32 16-28 B with triton 3.8's (sm_80 and sm_90).
        block_a, block_b = cap, cap // 2 if fp32_on_gpu else cap
    # fp32 products (input_precision="ieee") run on the FMA units, not the tensor cores: 64-wide channel
    # chunks spill on sm_80 (404 B), 16-wide ones fit in 128 registers on sm_80 and sm_90. tf32x3
    # products keep these tiles: 84-188 registers, no spill (sm_80, sm_90; triton 3.6 and 3.8).
    block_c = min(_block(channels, cap), 16 if dot_mode == 2 or fp32_on_gpu else 64)
    if dot_mode == 0 and channels >= 2 * MATCH_BLOCK_C_16:
        block_c = MATCH_BLOCK_C_16
    warps = 4 if fp32_on_gpu else 8
    if fp32_on_gpu and dot_mode == 3 and channels <= cap:
        # tf32x3 products over one chunk of at most 64 channels (the keys averaged over heads after
        # attention, each A tile loaded once): 64 x 64 tiles at 8 warps ran 1.26x the 64 x 32 x 16 ones
        # over the H200's sweep (ViT-B/16, 32 videos), 1.3-1.8x at every such layer; over a join's 768
        # hidden channels they lost (0.83x at layer 8), so those keep the tiles above. The sweep ran them
        # capped at 128 registers; uncapped (MATCH_HEADS_MAXNREG), triton 3.6 gives them 131 on sm_90: one
        # program an SM, not two. The next sweep times them so.
        block_b, block_c, warps = cap, _block(channels, cap), 8
    return dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c, DOT_MODE=dot_mode,
                **_match_split(rows, na, nb, block_a, block_b), num_warps=warps)


def _match_split(rows: int, na: int, nb: int, block_a: int, block_b: int) -> Dict[str, int]:
    """``A_BLOCKS``, and the B ranges (``SPLITS`` of ``B_PER`` tokens) that bring the match's programs
    to about ``GPU_FILL`` when there are few clips."""
    a_blocks = _cdiv(na, block_a)
    splits = max(1, min(_cdiv(nb, block_b), GPU_FILL // (rows * a_blocks)))
    b_per = _cdiv(_cdiv(nb, splits), block_b) * block_b
    return dict(SPLITS=_cdiv(nb, b_per), B_PER=b_per, A_BLOCKS=a_blocks)


def _plan_sort_block(na: int, scores_dtype: torch.dtype) -> int:
    """``SORT_BLOCK`` of the plan: the sort width for float32 scores of ``PLAN_SORT_MIN`` to
    ``PLAN_SORT_LIMIT`` A tokens, 0 (count) otherwise."""
    width = _next_power_of_2(na)
    sort = scores_dtype == torch.float32 and PLAN_SORT_MIN <= na and width <= PLAN_SORT_LIMIT
    return width if sort else 0


def _merge_tiles(rows: int, tokens: int, width: int, itemsize: int) -> Dict[str, int]:
    """Token tile, feature slice and warps of the merge kernels. A program covers one feature slice,
    so its per-token work (indices, sizes, sources) is done once; smaller token tiles when the
    grid would not fill the GPU. 4-byte features take 64-wide slices (the bytes of a 16-bit
    128-wide one): 128-wide fp32 slices spill on sm_90."""
    block_d = _block(width, GPU_BLOCK_CHANNELS if itemsize <= 2 else GPU_BLOCK_CHANNELS // 2, floor=1)
    block_t = _block(tokens, GPU_BLOCK_TOKENS, floor=1)
    if not _interpreting() and rows * _cdiv(tokens, block_t) * _cdiv(width, block_d) < GPU_FILL:
        block_t = max(8, min(block_t, 16))
    # 8 warps for 32-token tiles: at 4, a join's merge (positions, embedding) spills on sm_90.
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if block_t >= 32 else 4)


def _merge_bwd_tiles(rows: int, tokens: int, width: int, itemsize: int) -> Dict[str, int]:
    """The merge backward's tiles (its launcher's and its fake's): :func:`_merge_tiles` within a grid axis."""
    return _axis_tiles(_merge_tiles(rows, tokens, width, itemsize), tokens)


def _many_sources(r: int, nb: int) -> bool:
    """Whether a merge of ``r`` tokens into ``Nb`` B tokens gathers with :func:`_gather_tiles` (never with
    ``MANY_SOURCES_DIVISOR = 0``: every merge on its tiles of one source a step)."""
    return MANY_SOURCES_DIVISOR > 0 and r * MANY_SOURCES_DIVISOR >= nb


def _gather_tiles(width: int, itemsize: int, bits_a_thread: int = 128) -> Dict[str, int]:
    """One token a program, every feature (``next_power_of_2(D)``) at ``bits_a_thread`` a thread (at most 8
    warps), its sources gathered ``MERGE_SRC_CHUNK`` a step."""
    block_d = _next_power_of_2(width)
    threads = block_d * itemsize * 8 // bits_a_thread
    return dict(BLOCK_T=1, BLOCK_D=block_d, num_warps=max(1, min(8, threads // 32)),
                SRC_CHUNK=MERGE_SRC_CHUNK[itemsize])


def _merge_fwd_tiles(rows: int, tokens: int, width: int, itemsize: int, many: bool = False) -> Dict[str, int]:
    """``_merge_tiles`` for the merge forward. A forward program's time is a chain of dependent loads (its
    grouping, then one gather per source of its tile's busiest token), not its bytes, so 16-bit features
    on a GPU take ``MERGE_FWD_TOKENS``-token tiles at 4 warps: more programs, each with a shorter chain,
    have more loads in flight. Their feature slice is twice ``_merge_tiles``' where that still leaves
    ``GPU_FILL`` programs (a wider slice halves the programs that repeat the chain). The H200's sweep at
    ViT-B/16's image merge, 32 videos: 8 x 256 at 4 warps reached 0.84 of the copy bandwidth, against 0.65
    for the 32 x 256 at 8 warps this took before, 0.81 for 16 x 128 and 0.77 for 16 x 256.

    ``many`` (:func:`_many_sources`): the merge's time is its busiest token's sources: one program a token
    over every feature at 128 bits a thread, its sources gathered ``MERGE_SRC_CHUNK`` a step."""
    if _interpreting():
        return _merge_tiles(rows, tokens, width, itemsize)
    if many and itemsize in MERGE_SRC_CHUNK:
        return _gather_tiles(width, itemsize)
    tiles = _merge_tiles(rows, tokens, width, itemsize)
    # 16-bit features only: a 128-wide fp32 slice spills on sm_80 (32 B at the ViT-B/16 joins).
    if itemsize > 2:
        return tiles
    block_t, block_d = min(tiles["BLOCK_T"], MERGE_FWD_TOKENS), tiles["BLOCK_D"]
    if 2 * block_d <= width and rows * _cdiv(tokens, block_t) * _cdiv(width, 2 * block_d) >= GPU_FILL:
        block_d *= 2
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)


def _source_block(r: int, block_j: int) -> int:
    """Merged tokens per step of :func:`merge_index`'s grouping, whose 4-warp programs compare
    ``BLOCK_J x BLOCK_K`` pairs a step: about ``GROUPING_PAIRS_PER_THREAD`` a thread."""
    if _interpreting():
        return _block(r, INTERPRETER_BLOCK)
    return _block(r, max(16, GROUPING_PAIRS_PER_THREAD * 32 * 4 // block_j))


def _merge_norm_tiles(rows: int, tokens: int, width: int, itemsize: int, has_pos: bool,
                      many: bool = False) -> Dict[str, int]:
    """Tiles of the merge forward that also writes the LayerNorm: a program spans every feature of
    its tokens (one slice of ``next_power_of_2(D)``), so its token tile shrinks to keep the tile at
    about 4096 elements (32 fp32 registers a thread per operand at 4 warps, 16 at 8).

    Warps: where these programs spill, ptxas has held them at 4 programs an SM (128 registers a
    thread at 4 warps, 64 at 8) and spilled a few bytes rather than take more. 8 warps for 32-bit
    features (at 4 the image merge spilled 8 B on sm_90) and for joins, which add the position
    embedding (12 B on sm_80 and sm_90 at 4, triton 3.6's ptxas); 4 for the other 16-bit merges
    (at 8 the bf16 ones spilled 10 B on sm_80 with that ptxas).

    16-bit merges without the position embedding take one token a program at 2 warps: on the H200 (ViT-B/16,
    32 videos, layers 0 and 8-10) that ran 1.16x the 4 x 4 tiles over those layers, the fastest of the
    sweep's tiles at each (0.72 of the copy bandwidth at layer 0, against 0.62); its grid is the tokens.

    Merges with ``many`` sources (:func:`_many_sources`) gather ``MERGE_SRC_CHUNK`` of them a step, one token a
    program: 16-bit merges after attention at those 2 warps, joins and 32-bit merges at 128 bits a thread (4
    and 8 warps at ViT-B/16: 80-94 and 48-64 registers on sm_90, where their 4 x 8 tiles took 95-100 and
    113-128 and waited on each source's index three and six times in turn, once for each layout it fed)."""
    block_d = _next_power_of_2(width)
    if not _interpreting():
        if many and itemsize in MERGE_SRC_CHUNK:
            return _gather_tiles(width, itemsize, 256 if itemsize <= 2 and not has_pos else 128)
        if itemsize <= 2 and not has_pos:
            return dict(BLOCK_T=1, BLOCK_D=block_d, num_warps=2)
    cap = INTERPRETER_BLOCK if _interpreting() else max(1, NORM_TILE_ELEMENTS // block_d)
    block_t = max(1, min(_next_power_of_2(tokens), cap))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if itemsize > 2 or has_pos else 4)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------

def _plan_widths(r: int, na: int, nb: int) -> Tuple[int, ...]:
    """Widths of a plan buffer row's parts: merged, dst, kept, src, offsets (:func:`_split_plan`)."""
    return r, r, na - r, r, nb + 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (the kernels take any row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _grouping_widths(r: int, na: int, nb: int) -> Dict[str, int]:
    """``GROUP_BLOCK`` (the sort width of the ``r`` merged tokens) and ``GROUP_BINS`` (the histogram
    width of the ``Nb`` destinations and the end, also above every A token: the sort's keys hold one),
    each up to ``GROUP_SORT_LIMIT``; ``GROUP_BLOCK = 0`` (count) for wider rows (``kernels/group.py``)."""
    block, bins = _next_power_of_2(r), _next_power_of_2(max(nb + 1, na))
    if max(block, bins) <= GROUP_SORT_LIMIT:
        return {"GROUP_BLOCK": block, "GROUP_BINS": bins}
    return {"GROUP_BLOCK": 0, "GROUP_BINS": 0}


class _MatchLaunch(NamedTuple):
    """What a match launch needs beyond its tensors, from the metric's signature (:mod:`.memo`)."""

    rows: int
    na: int
    acc: torch.dtype
    part_shape: Tuple[int, ...]  # the scratch's per-range partial results
    plan_width: int  # columns of the plan buffer (0 without a plan)
    launch: Launcher  # takes the kernel's six tensors


def _match_launch(shape, strides, dtype: torch.dtype, protected: int, group: int, r: int, plan: bool,
                  heads: int) -> _MatchLaunch:
    rows, tokens, c = shape[0] // group, shape[1] * group, protected * group
    channels = shape[2] // heads
    na, nb, a_start, b_start = _positions(tokens, c)
    acc = accumulation_dtype(dtype)
    tiles = _match_tiles(rows, na, nb, channels, dtype)
    splits, a_blocks, b_per = tiles.pop("SPLITS"), tiles.pop("A_BLOCKS"), tiles.pop("B_PER")
    plan_width = sum(_plan_widths(r, na, nb)) if plan else 0
    scalars = (na, nb, r, channels, a_start, b_start, group, protected, shape[1], b_per, splits,
               plan_width if plan else na, rows, *strides)
    # (A sorted plan carries each A token's best B token in its key's 16 low bits: nb <= 2^16.)
    sort_block = _plan_sort_block(na, acc) if plan and nb <= 65536 else 0
    meta = dict(TINY=torch.finfo(acc).tiny, PLAN=plan, SORT_BLOCK=sort_block,
                COMBINE_BLOCK=_block(na, COMBINE_TOKENS_PER_WARP * tiles["num_warps"]),
                **(_grouping_widths(r, na, nb) if plan else {"GROUP_BLOCK": 0, "GROUP_BINS": 0}), **tiles,
                **_head_meta(heads, channels, tiles["BLOCK_C"], tiles["num_warps"], dtype))
    return _MatchLaunch(rows, na, acc, (rows, splits, 2, na), plan_width,
                        Launcher(_best_match_fwd_kernel,
                                 (a_blocks * splits, min(rows, GRID_AXIS_LIMIT), _cdiv(rows, GRID_AXIS_LIMIT)),
                                 scalars, meta))


def _head_meta(heads: int, channels: int, block_c: int, num_warps: int, dtype: torch.dtype) -> Dict[str, object]:
    """The match kernel's ``HEADS``, ``C_STAGES``, ``A_KEPT``, ``HEAD_STEP`` and, averaging heads over a
    16-bit metric at 8 warps, its register cap. For one head the loops over channel chunks are
    software-pipelined over 3 stages (as the kernel's default); averaging heads, each stage would buffer
    ``HEADS`` tiles of A and of B in shared memory (576 KB at ViT-B), so they are not, and where a head's
    channels are one chunk the averaged A tile is kept for every B block rather than averaged again for each."""
    if heads == 1:
        return {"HEADS": 1, "C_STAGES": 3, "A_KEPT": False, "HEAD_STEP": 1}
    step = max(s for s in range(1, min(heads, HEAD_LOADS) + 1) if heads % s == 0)
    meta = {"HEADS": heads, "C_STAGES": 1, "A_KEPT": channels <= block_c, "HEAD_STEP": step}
    if num_warps == 8 and dtype.itemsize <= 2:
        meta["maxnreg"] = MATCH_HEADS_MAXNREG
    return meta


def _launch_match(metric: torch.Tensor, protected: int, group: int, r: int, plan: bool, heads: int = 1):
    shape, strides, dtype = metric.shape, metric.stride(), metric.dtype
    d = remembered(("match", shape, strides, dtype, protected, group, r, plan, heads),
                   lambda: _match_launch(shape, strides, dtype, protected, group, r, plan, heads))
    device = metric.device
    count, part = _match_scratch(device, d.rows, d.part_shape, d.acc)
    if plan:
        out = plan_rows = dst = _new_output((d.rows, d.plan_width), torch.int64, device)
        scores = part  # not written
    else:
        scores, dst = _new_output((d.rows, d.na), d.acc, device), _new_output((d.rows, d.na), torch.int64, device)
        out, plan_rows = (scores, dst), dst  # the plan's rows: not written without a plan
    d.launch(metric, part, scores, dst, plan_rows, count)
    return out


def best_match_forward(metric: torch.Tensor, protected: int, group: int = 1, heads: int = 1
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in B for every A token (one launch).

    Args:
        metric: ``[B' * group, N_in, C]`` float16/bfloat16/float32/float64, any strides.
        protected: class tokens at the front of each of those clips.
        group: clips joined into one before matching (1: no join).
        heads: match on ``reference.head_mean(metric, heads)``, taken as the kernel loads the metric.
    Returns:
        ``scores [B', Na]`` float32 (float64 for float64 input), ``dst [B', Na]`` int64, for the
        joined clips of ``N = group * N_in`` tokens.
    """
    return _launch_match(metric, protected, group, 0, False, heads)


def match_buffer_forward(metric: torch.Tensor, r: int, protected: int, group: int = 1, heads: int = 1
                         ) -> torch.Tensor:
    """Best match, merge plan and the plan's grouping by destination in one launch, written to one
    int64 buffer ``[B', 2 r + Na + Nb + 1]`` (one allocation); :func:`match_forward` gives its parts."""
    return _launch_match(metric, protected, group, r, True, heads)


def _split_plan(buf: torch.Tensor, metric: torch.Tensor, r: int, protected: int, group: int) -> Tuple[torch.Tensor, ...]:
    """``(merged [B', r], dst [B', r], kept [B', Na - r], src [B', r], offsets [B', Nb + 1])``: the
    int64 parts of the rows of the plan buffer ``[B', 2 r + Na + Nb + 1]`` that a match of ``metric``
    wrote (one allocation a merge step, one ``split`` op: rows of unit stride, row stride the buffer's)."""
    tokens_in = metric.shape[1]
    widths = remembered(("plan", tokens_in, protected, group, r),
                        lambda: _plan_widths(r, *split_sizes(tokens_in * group, protected * group)))
    return buf.split_with_sizes(widths, 1)


def match_forward(metric: torch.Tensor, r: int, protected: int, group: int = 1, heads: int = 1
                  ) -> Tuple[torch.Tensor, ...]:
    """Best match and merge plan in one launch: ``merged [B', r]``, ``merged_dst [B', r]``,
    ``kept [B', Na - r]``, as :func:`match_plan_forward` of :func:`best_match_forward`, then the
    merged tokens grouped by destination, ``src [B', r]`` and ``offsets [B', Nb + 1]``
    (``reference.group_sources``); all int64, views of the rows of one buffer."""
    return _split_plan(match_buffer_forward(metric, r, protected, group, heads), metric, r, protected, group)


def match_plan_forward(scores: torch.Tensor, dst: torch.Tensor, r: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge plan from best-match scores (the plan stage of :func:`match_forward`, on its own).

    Args:
        scores: ``[B', Na]`` float32/float64; dst: ``[B', Na]`` int64; r: ``0 <= r <= Na``.
    Returns:
        ``merged [B', r]`` (highest score first, lower index first on ties), ``merged_dst [B', r]``,
        ``kept [B', Na - r]`` (increasing), all int64.
    """
    scores, dst = scores.contiguous(), dst.contiguous()
    rows, na = scores.shape
    merged = _new_output((rows, r), torch.int64, scores.device)
    merged_dst = _new_output((rows, r), torch.int64, scores.device)
    kept = _new_output((rows, na - r), torch.int64, scores.device)
    launch(_match_plan_kernel, (rows,), scores, dst, merged, merged_dst, kept, na, r,
           BLOCK=_block(na, GPU_BLOCK_MATCH), SORT_BLOCK=_plan_sort_block(na, scores.dtype))
    return merged, merged_dst, kept


def merge_index(merged: torch.Tensor, dst: torch.Tensor, nb: int, dtype: torch.dtype = torch.int32
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group merged tokens by destination: ``src [B', r]`` and ``offsets [B', nb + 1]``, both ``dtype``
    (int32 or int64), as ``reference.group_sources``.

    ``src[b, offsets[b, j]:offsets[b, j + 1]]`` are the tokens merging into destination ``j``, in rank
    order. :func:`match_forward` writes this grouping with the plan; this writes it for any plan,
    one program per (destination block, row).
    """
    merged, dst = merged.contiguous(), dst.contiguous()
    rows, r = merged.shape
    src = _new_output((rows, r), dtype, merged.device)
    offsets = _new_output((rows, nb + 1), dtype, merged.device)
    block_j = _block(nb + 1, GPU_BLOCK_TOKENS)
    launch(_merge_index_kernel, (rows, _cdiv(nb + 1, block_j)), merged, dst, src, offsets, r, nb,
           BLOCK_K=_source_block(r, block_j), BLOCK_J=block_j, num_warps=4)
    return src, offsets


def _writes_b_sizes(x: torch.Tensor, size: torch.Tensor) -> bool:
    """Whether the merge forward writes the B tokens' merged sizes apart: only where ``size`` is not
    in the accumulation dtype, in which the merge adds sizes and the backward divides by them."""
    return size.dtype != accumulation_dtype(x.dtype)


def merged_b_sizes(size_out: torch.Tensor, b_size: Optional[torch.Tensor], nb: int) -> torch.Tensor:
    """The merged size of every B token ``[B', Nb]``, as :func:`merge_backward` takes it, from
    :func:`merge_forward`'s ``size`` and ``b_size``: ``b_size`` where the forward wrote it, else (None,
    or the custom op's empty ``[0]``) a view of the last ``Nb`` merged sizes (the B tokens come last in
    the output, and those sizes are in the accumulation dtype, so they are the same numbers)."""
    if b_size is not None and b_size.dim() == 2:
        return b_size
    return size_out.flatten(1)[:, size_out.shape[1] - nb:]


def merge_forward(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor,
                  kept: torch.Tensor, protected: int, group: int = 1, frame_pos: Optional[torch.Tensor] = None,
                  src: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                  norm: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
                  residual: Optional[torch.Tensor] = None, stats: bool = False) -> Tuple[torch.Tensor, ...]:
    """Size-weighted merge (of the joined clips when ``group > 1``), one launch.

    Args:
        x: ``[B' * group, N_in, D]`` any float dtype and strides.
        size: ``[B' * group, N_in]`` or ``[B' * group, N_in, 1]``, any dtype and strides.
        merged, dst: ``[B', r]`` int64; kept: ``[B', Na - r]`` int64 (a plan for the joined clips).
        protected: class tokens per clip of ``x``.
        frame_pos: optional ``[1, F, 1, D]`` temporal position embedding, added to every token of
            clip ``k`` of its video (``F`` clips per video in ``x``) before merging.
        src, offsets: the plan's merged tokens grouped by destination, ``[B', r]`` and
            ``[B', Nb + 1]`` int64 (from :func:`match_forward`); without them a launch of
            :func:`merge_index` groups them first.
        norm: optional ``(weight [D], bias [D], eps)`` of a LayerNorm applied to the merged tokens
            in the same launch (``reference.merge_norm``).
        residual: optional tensor of x's shape and dtype (any strides): the launch merges
            ``x + residual``, read from both, never written.
        stats: with ``norm``, also write the LayerNorm's statistics, for its backward.
    Returns:
        ``x [B', N - r, D]`` (x's dtype), ``size`` (size's layout and dtype) and ``b_size [B', Nb]``
        float32 (float64 for float64 x), the merged size of every B token, for the backward; with
        ``norm``, then ``ln [B', N - r, D]`` in x's dtype, and with ``stats`` the statistics,
        ``[2, B', N - r, 1]`` in the accumulation dtype (means, then reciprocal standard deviations,
        each as ``native_layer_norm`` returns them). Where ``size`` already has that dtype
        (float32 sizes, 16-bit or float32 x: the model's case) the last Nb sizes returned are
        exactly those, and ``b_size`` is None instead of a second buffer (:func:`merged_b_sizes`;
        the custom ops, whose outputs are tensors, return an empty ``[0]`` there).
    """
    if src is None or offsets is None:
        _, tokens, c = _joined_shape(x, protected, group)
        src, offsets = merge_index(merged, dst, split_sizes(tokens, c)[1], torch.int64)
    eps = 0.0 if norm is None else float(norm[2])
    key = ("merge_fwd", x.shape, x.stride(), x.dtype, size.shape, size.stride(), size.dtype, merged.shape[1],
           kept.shape[1], kept.stride(), src.stride(), offsets.stride(),
           None if frame_pos is None else frame_pos.shape, norm is None, eps, stats,
           None if residual is None else residual.stride(), protected, group)
    d = remembered(key, lambda: _merge_fwd_launch(x, size, merged, kept, src, offsets, protected, group, frame_pos,
                                                  norm is not None, eps, stats, residual))
    if not d.unit_rows:
        kept, src, offsets = _rows(kept), _rows(src), _rows(offsets)
    device = x.device
    out = _new_output(d.out_shape, x.dtype, device)
    size_out = _new_output(d.size_shape, size.dtype, device)
    b_size = None if d.b_size_shape is None else _new_output(d.b_size_shape, d.acc, device)
    pos = x if frame_pos is None else frame_pos.reshape(d.pos_shape).contiguous()
    if norm is None:
        ln, ln_w, ln_b, stats_buf = out, out, out, out  # not read, not written
    else:
        ln_w, ln_b = norm[0].contiguous(), norm[1].contiguous()
        ln = _new_output(d.out_shape, x.dtype, device)
        stats_buf = _new_output(d.stats_shape, d.acc, device) if stats else ln  # not written without stats
    d.launch(x, x if residual is None else residual, size, pos, kept, src, offsets, out, size_out,
             size_out if b_size is None else b_size, ln_w, ln_b, ln, stats_buf)
    if norm is None:
        return out, size_out, b_size
    return (out, size_out, b_size, ln, stats_buf) if stats else (out, size_out, b_size, ln)


class _MergeLaunch(NamedTuple):
    """What a merge forward launch needs beyond its tensors, from its inputs' signature (:mod:`.memo`)."""

    unit_rows: bool  # kept, src and offsets have unit stride along their rows
    out_shape: Tuple[int, ...]
    size_shape: Tuple[int, ...]
    b_size_shape: Optional[Tuple[int, ...]]  # None: the B tokens' sizes are read from the merged sizes
    stats_shape: Tuple[int, ...]
    acc: torch.dtype
    pos_shape: Tuple[int, int]  # the position embedding as the kernel reads it, [F, D]
    launch: Launcher  # takes the kernel's fourteen tensors


def _merge_fwd_launch(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, kept: torch.Tensor,
                      src: torch.Tensor, offsets: torch.Tensor, protected: int, group: int,
                      frame_pos: Optional[torch.Tensor], norm: bool, eps: float, stats: bool,
                      residual: Optional[torch.Tensor]) -> _MergeLaunch:
    rows, tokens, c = _joined_shape(x, protected, group)
    width = x.shape[2]
    r, nk = merged.shape[1], kept.shape[1]
    _, nb, a_start, b_start = _positions(tokens, c)
    n_out = tokens - r
    unit_rows = kept.stride(-1) == src.stride(-1) == offsets.stride(-1) == 1
    row_strides = [_rows(t).stride(0) for t in (kept, src, offsets)]
    acc = accumulation_dtype(x.dtype)
    many = _many_sources(r, nb)
    if norm:
        tiles = _merge_norm_tiles(rows, n_out, width, x.dtype.itemsize, frame_pos is not None, many)
    else:
        tiles = _merge_fwd_tiles(rows, n_out, width, x.dtype.itemsize, many)
    tiles = _axis_tiles(tiles, n_out)
    pos_shape = (x.shape[0], width) if frame_pos is None else (frame_pos.shape[1], width)
    pos_row_stride = x.stride(0) if frame_pos is None else width
    res_strides = x.stride() if residual is None else residual.stride()
    scalars = (eps, n_out, c, nk, nb, width, a_start, b_start, group, protected, x.shape[1], pos_shape[0],
               *x.stride(), *res_strides, size.stride(0), size.stride(1), pos_row_stride, *row_strides)
    b_sizes = _writes_b_sizes(x, size)
    meta = dict(HAS_RES=residual is not None, HAS_POS=frame_pos is not None, NORM=norm, B_SIZES=b_sizes, **tiles,
                **({"STATS": True} if norm and stats else {}))
    grid = (rows, _cdiv(width, tiles["BLOCK_D"]), _cdiv(n_out, tiles["BLOCK_T"]))
    return _MergeLaunch(unit_rows, (rows, n_out, width), (rows, n_out) + tuple(size.shape[2:]),
                        (rows, nb) if b_sizes else None, (2, rows, n_out, 1), acc, pos_shape,
                        Launcher(_merge_fwd_kernel, grid, scalars, meta))


def _layer_norm_stats(rows: int, tokens: int, x: torch.Tensor) -> torch.Tensor:
    """The buffer a LayerNorm launch writes its statistics to: ``[2, rows, tokens, 1]`` in the
    accumulation dtype (``stats[0]`` the means, ``stats[1]`` the reciprocal standard deviations,
    each laid out as ``native_layer_norm`` returns them)."""
    return _new_output((2, rows, tokens, 1), accumulation_dtype(x.dtype), x.device)


def _fake_stats(x: torch.Tensor, rows: int, tokens: int, stats: bool) -> torch.Tensor:
    """What a LayerNorm launcher's custom op returns in the statistics' place, for its fake
    implementation: :func:`_layer_norm_stats`'s shape with ``stats``, else :func:`_op_outputs`' empty."""
    return x.new_empty((2, rows, tokens, 1) if stats else (0,), dtype=accumulation_dtype(x.dtype))


def _op_outputs(outputs: Tuple[Optional[torch.Tensor], ...], x: torch.Tensor, stats: bool = True
                ) -> Tuple[torch.Tensor, ...]:
    """A launcher's outputs as its custom op returns them, a fixed number of tensors: an empty ``[0]``
    (in the accumulation dtype) for a merge's ``b_size`` that is None, and in the LayerNorm
    statistics' place where none were asked for (``stats`` False)."""
    def empty():  # one per output: a custom op's outputs may not alias each other
        return x.new_empty((0,), dtype=accumulation_dtype(x.dtype))
    outputs = tuple(empty() if t is None else t for t in outputs)
    return outputs if stats else (*outputs, empty())


def merge_norm_forward(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor,
                       kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, protected: int,
                       group: int = 1, frame_pos: Optional[torch.Tensor] = None,
                       residual: Optional[torch.Tensor] = None, src: Optional[torch.Tensor] = None,
                       offsets: Optional[torch.Tensor] = None, stats: bool = False) -> Tuple[torch.Tensor, ...]:
    """:func:`merge_forward` with ``norm=(weight, bias, eps)``, in the argument order of ``tempme::merge_norm_fwd``."""
    return merge_forward(x, size, merged, dst, kept, protected, group, frame_pos, src, offsets,
                         norm=(weight, bias, eps), residual=residual, stats=stats)


def merge_backward(grad_out: torch.Tensor, size: torch.Tensor, b_size: torch.Tensor, merged: torch.Tensor,
                   dst: torch.Tensor, kept: torch.Tensor, protected: int, tokens_in: int, group: int = 1,
                   pos_grad: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradient of :func:`merge_forward` with respect to ``x``, one launch.

    Returns ``grad_x [B' * group, tokens_in, D]`` in grad_out's dtype and, with ``pos_grad``,
    ``pos_part [B', tiles, group, D]`` (b_size's dtype): grad_x summed over each token tile per source
    clip, whose sum over clips of a video and tiles is the position embedding's gradient (otherwise
    None; the custom op returns an empty tensor there).
    """
    strides = merged.stride(), dst.stride(), kept.stride(), b_size.stride()
    if strides[0][-1] != 1 or strides[1][-1] != 1 or strides[2][-1] != 1 or strides[3][-1] != 1:
        merged, dst, kept, b_size = _rows(merged), _rows(dst), _rows(kept), _rows(b_size)
        strides = merged.stride(), dst.stride(), kept.stride(), b_size.stride()
    key = ("merge_bwd", grad_out.shape, grad_out.stride(), grad_out.dtype, size.stride(), b_size.dtype,
           kept.shape[1], *strides, protected, tokens_in, group, pos_grad)
    d = remembered(key, lambda: _merge_bwd_launch(grad_out, size, b_size, merged, dst, kept, protected, tokens_in,
                                                  group, pos_grad))
    grad_x = _new_output(d.grad_x_shape, grad_out.dtype, grad_out.device)
    pos_part = _new_output(d.pos_part_shape, b_size.dtype, grad_out.device) if pos_grad else None
    d.launch(grad_out, size, merged, dst, kept, b_size, grad_x,
             grad_x if pos_part is None else pos_part)  # (not written)
    return grad_x, pos_part


class _MergeBackwardLaunch(NamedTuple):
    """What a merge backward launch needs beyond its tensors, from their signature (:mod:`.memo`)."""

    grad_x_shape: Tuple[int, int, int]
    pos_part_shape: Tuple[int, int, int, int]
    launch: Launcher  # takes the kernel's eight tensors


def _merge_bwd_launch(grad_out: torch.Tensor, size: torch.Tensor, b_size: torch.Tensor, merged: torch.Tensor,
                      dst: torch.Tensor, kept: torch.Tensor, protected: int, tokens_in: int, group: int,
                      pos_grad: bool) -> _MergeBackwardLaunch:
    rows, _, width = grad_out.shape
    tokens, c = tokens_in * group, protected * group
    nk = kept.shape[1]
    _, nb, a_start, b_start = _positions(tokens, c)
    tiles = _merge_bwd_tiles(rows, tokens, width, grad_out.dtype.itemsize)
    n_tiles = _cdiv(tokens, tiles["BLOCK_T"])
    scalars = (tokens, c, nk, nb, width, a_start, b_start, group, protected, tokens_in, n_tiles, *grad_out.stride(),
               size.stride(0), size.stride(1), b_size.stride(0), merged.stride(0), dst.stride(0), kept.stride(0))
    return _MergeBackwardLaunch((rows * group, tokens_in, width), (rows, n_tiles, group, width),
                                Launcher(_merge_bwd_kernel, (rows, _cdiv(width, tiles["BLOCK_D"]), n_tiles), scalars,
                                         dict(POS_GRAD=pos_grad, **tiles)))


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, described to it by their fake implementations
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tempme::best_match", mutates_args=())
def _best_match_op(metric: torch.Tensor, protected: int, group: int = 1, heads: int = 1
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    return best_match_forward(metric, protected, group, heads)


@_best_match_op.register_fake
def _(metric, protected, group=1, heads=1):
    rows, tokens, c = _joined_shape(metric, protected, group)
    na, _ = split_sizes(tokens, c)
    return (metric.new_empty((rows, na), dtype=accumulation_dtype(metric.dtype)),
            metric.new_empty((rows, na), dtype=torch.int64))


@torch.library.custom_op("tempme::match", mutates_args=())
def _match_op(metric: torch.Tensor, r: int, protected: int, group: int = 1, heads: int = 1) -> torch.Tensor:
    # One buffer: a custom op's outputs may not alias one another, so the parts are taken outside.
    return match_buffer_forward(metric, r, protected, group, heads)


@_match_op.register_fake
def _(metric, r, protected, group=1, heads=1):
    rows, tokens, c = _joined_shape(metric, protected, group)
    return metric.new_empty((rows, sum(_plan_widths(r, *split_sizes(tokens, c)))), dtype=torch.int64)


@torch.library.custom_op("tempme::merge_fwd", mutates_args=())
def _merge_fwd_op(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor,
                  kept: torch.Tensor, protected: int, group: int = 1, frame_pos: Optional[torch.Tensor] = None,
                  src: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _op_outputs(merge_forward(x, size, merged, dst, kept, protected, group, frame_pos, src, offsets), x)


@_merge_fwd_op.register_fake
def _merge_fwd_fake(x, size, merged, dst, kept, protected, group=1, frame_pos=None, src=None, offsets=None):
    rows, tokens, c = _joined_shape(x, protected, group)
    n_out = tokens - merged.shape[1]
    _, nb = split_sizes(tokens, c)
    return (x.new_empty((rows, n_out, x.shape[2])), size.new_empty((rows, n_out) + tuple(size.shape[2:])),
            x.new_empty((rows, nb) if _writes_b_sizes(x, size) else (0,), dtype=accumulation_dtype(x.dtype)))


@torch.library.custom_op("tempme::merge_norm_fwd", mutates_args=())
def _merge_norm_fwd_op(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor,
                       kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, protected: int,
                       group: int = 1, frame_pos: Optional[torch.Tensor] = None,
                       residual: Optional[torch.Tensor] = None, src: Optional[torch.Tensor] = None,
                       offsets: Optional[torch.Tensor] = None, stats: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _op_outputs(merge_norm_forward(x, size, merged, dst, kept, weight, bias, eps, protected, group,
                                          frame_pos, residual, src, offsets, stats), x, stats)


@_merge_norm_fwd_op.register_fake
def _(x, size, merged, dst, kept, weight, bias, eps, protected, group=1, frame_pos=None, residual=None, src=None,
      offsets=None, stats=False):
    out, size_out, b_size = _merge_fwd_fake(x, size, merged, dst, kept, protected, group, frame_pos)
    return out, size_out, b_size, torch.empty_like(out), _fake_stats(x, *out.shape[:2], stats)


@torch.library.custom_op("tempme::merge_bwd", mutates_args=())
def _merge_bwd_op(grad_out: torch.Tensor, size: torch.Tensor, b_size: torch.Tensor, merged: torch.Tensor,
                  dst: torch.Tensor, kept: torch.Tensor, protected: int, tokens_in: int, group: int = 1,
                  pos_grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    return _op_outputs(merge_backward(grad_out, size, b_size, merged, dst, kept, protected, tokens_in, group,
                                      pos_grad), grad_out)


@_merge_bwd_op.register_fake
def _(grad_out, size, b_size, merged, dst, kept, protected, tokens_in, group=1, pos_grad=False):
    rows, _, width = grad_out.shape
    tiles = _merge_bwd_tiles(rows, tokens_in * group, width, grad_out.dtype.itemsize)
    n_tiles = _cdiv(tokens_in * group, tiles["BLOCK_T"])
    return (grad_out.new_empty((rows * group, tokens_in, width)),
            b_size.new_empty((rows, n_tiles, group, width) if pos_grad else (0,)))


# ---------------------------------------------------------------------------------------------
# Autograd and the functions tempme_fast.ops dispatches to
# ---------------------------------------------------------------------------------------------

# Each launcher with its custom op: the launcher in eager calls, the op where torch.compile or a
# dispatch mode must see it (tempme_fast.ops.eager).
_best_match_call = custom_op_or(best_match_forward, "best_match")
_match_call = custom_op_or(match_buffer_forward, "match")
_merge_fwd = custom_op_or(merge_forward, "merge_fwd")
_merge_norm_fwd = custom_op_or(merge_norm_forward, "merge_norm_fwd")
_merge_bwd = custom_op_or(merge_backward, "merge_bwd")


def _match(metric: torch.Tensor, r: int, protected: int, group: int = 1, heads: int = 1) -> MergePlan:
    """The :class:`MergePlan` of the (joined) clips, with its grouping by destination."""
    if heads > 1 and not HEADS_IN_MATCH:
        metric, heads = head_mean(metric, heads), 1
    # The launcher reads a metric that requires grad as it is (its outputs are indices); the custom op,
    # which autograd would otherwise be asked to differentiate, gets it detached.
    buf = _match_call(detached(metric) if use_custom_ops() else metric, r, protected, group, heads)
    merged, dst, kept, src, offsets = _split_plan(buf, metric, r, protected, group)
    return MergePlan(merged, dst, kept, metric.shape[1] * group, protected * group, src, offsets)


def _pos_grad(pos_part: Optional[torch.Tensor], pos_shape) -> Optional[torch.Tensor]:
    """The position embedding's gradient from the merge backward's per-tile partial sums, or None
    when ``pos_shape`` (``(shape, dtype)`` of ``frame_pos``) is None."""
    if pos_shape is None:
        return None
    shape, dtype = pos_shape
    # pos_part [B', tiles, g, D] holds per-tile sums for clip (row * g + k); a video's F / g
    # joined rows are adjacent, so clip k of the video is (row % (F / g)) * g + k.
    rows, tiles, group, width = pos_part.shape
    grad_pos = pos_part.reshape(-1, shape[1] // group, tiles, group, width).sum(dim=(0, 2))
    return grad_pos.reshape(shape).to(dtype)


def _b_tokens(ctx) -> int:
    """Nb of the merge whose clip length, protected tokens and group are saved on ``ctx``."""
    return split_sizes(ctx.tokens_in * ctx.group, ctx.protected * ctx.group)[1]


class MergeFunction(torch.autograd.Function):
    """Size-weighted merge (optionally of joined clips plus a position embedding).

    Differentiable in ``x`` and ``frame_pos``; sizes and the plan carry no gradient.
    """

    @staticmethod
    def forward(ctx, x, size, merged, dst, kept, protected: int, group: int, frame_pos, src, offsets):
        out, size_out, b_size = _merge_fwd(x, size, merged, dst, kept, protected, group, frame_pos, src, offsets)
        ctx.save_for_backward(size, size_out, b_size, merged, dst, kept)
        ctx.protected, ctx.group, ctx.tokens_in = protected, group, x.shape[1]
        ctx.pos_shape = None if frame_pos is None else (frame_pos.shape, frame_pos.dtype)
        ctx.mark_non_differentiable(size_out)
        ctx.set_materialize_grads(False)  # no zeros made for the sizes' (or an unused output's) gradient
        return out, size_out

    @staticmethod
    def backward(ctx, grad_out, grad_size_out):
        if grad_out is None:
            return (None,) * 10
        if torch.is_grad_enabled() and needs_grad(grad_out):  # (the merge is linear: only through grad_out)
            refuse_second_order("merge")
        size, size_out, b_size, merged, dst, kept = ctx.saved_tensors
        pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[7]
        b_size = merged_b_sizes(size_out, b_size, _b_tokens(ctx))
        grad_x, pos_part = _merge_bwd(grad_out, size, b_size, merged, dst, kept, ctx.protected, ctx.tokens_in,
                                      ctx.group, pos_grad)
        return (grad_x, None, None, None, None, None, None, _pos_grad(pos_part, ctx.pos_shape if pos_grad else None),
                None, None)


def layer_norm_backward(grad_ln: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                        weight_grads: Tuple[bool, bool] = (True, True), stats: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``reference.layer_norm(x, weight, bias, eps)`` from ``grad_ln``: aten's LayerNorm
    backward, as autograd runs it for the reference, in one kernel where a composition of
    elementwise ops would make about twenty passes over ``x``'s size.

    ``x`` is the saved LayerNorm input ``[B', N, D]``. ``stats`` are the statistics the forward
    kernel wrote (``[2, B', N, 1]``: means, then reciprocal standard deviations, in the accumulation
    dtype); without them they are recomputed by aten's LayerNorm (one more pass over ``x``, whose
    normalised output is thrown away). On CUDA, aten's LayerNorm takes 16-bit tensors as they are
    and keeps its statistics and sums in float32; elsewhere its 16-bit statistics would be rounded,
    so 16-bit tensors (or a weight of another dtype) are cast to the accumulation dtype first.
    Returns ``(grad_x, grad_weight, grad_bias)``: grad_x in x's dtype on the first path and in the
    accumulation dtype on the second (callers cast), the others in weight's dtype, or None where
    ``weight_grads`` (weight, bias) says they are not needed (frozen LayerNorms, as in LoRA: no
    column sums over the tokens).
    """
    work = accumulation_dtype(x.dtype)
    on_gpu = x.is_cuda or recording.META_AS_GPU and x.is_meta
    if not (x.dtype == grad_ln.dtype == weight.dtype and (x.dtype == work or on_gpu)):
        x, grad_ln = cast(x, work), cast(grad_ln, work)
    w = cast(weight, x.dtype)
    width = [x.shape[-1]]
    if stats is None:
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, width, None, None, eps)
    else:
        mean, rstd = stats.unbind(0)
    # The bias argument only gives grad_bias its shape and dtype, which w has.
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(grad_ln, x, width, mean, rstd, w, w,
                                                                       [True, *weight_grads])
    if grad_w is not None:
        grad_w = cast(grad_w, weight.dtype)
    if grad_b is not None:
        grad_b = cast(grad_b, weight.dtype)
    return grad_x, grad_w, grad_b


class MergeNormFunction(torch.autograd.Function):
    """Size-weighted merge (optionally of joined clips plus a position embedding, or of ``x`` plus a
    residual) and the LayerNorm of its output, forward in one launch.

    The backward composes: the LayerNorm's gradient (aten's, from the saved merged tokens and the
    statistics the forward kernel wrote) is added to the merged tokens' own gradient, which then
    goes through the merge's backward kernel. Differentiable in ``x``, ``frame_pos``, ``weight``,
    ``bias`` and ``residual`` (whose gradient is x's: they are summed before the merge).
    """

    @staticmethod
    def forward(ctx, x, size, merged, dst, kept, protected: int, group: int, frame_pos, weight, bias, eps: float,
                residual, src, offsets):
        out, size_out, b_size, ln, stats = _merge_norm_fwd(x, size, merged, dst, kept, weight, bias, eps, protected,
                                                           group, frame_pos, residual, src, offsets, True)
        ctx.save_for_backward(size, size_out, b_size, merged, dst, kept, out, weight, stats)
        ctx.protected, ctx.group, ctx.tokens_in, ctx.eps = protected, group, x.shape[1], eps
        ctx.pos_shape = None if frame_pos is None else (frame_pos.shape, frame_pos.dtype)
        ctx.mark_non_differentiable(size_out)
        ctx.set_materialize_grads(False)  # no zeros made for the sizes' (or an unused output's) gradient
        return out, size_out, ln

    @staticmethod
    def backward(ctx, grad_out, grad_size_out, grad_ln):
        if grad_out is None and grad_ln is None:
            return (None,) * 14
        size, size_out, b_size, merged, dst, kept, out, weight, stats = ctx.saved_tensors
        if torch.is_grad_enabled() and needs_grad(grad_out, grad_ln, out, weight):
            refuse_second_order("merge_norm")
        b_size = merged_b_sizes(size_out, b_size, _b_tokens(ctx))
        grad_w = grad_b = None
        if grad_ln is not None:
            grad_norm_in, grad_w, grad_b = layer_norm_backward(grad_ln, out, weight, ctx.eps,
                                                               ctx.needs_input_grad[8:10], stats)
            grad_out = grad_norm_in if grad_out is None else grad_out + grad_norm_in
        pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[7]
        grad_x, pos_part = _merge_bwd(cast(grad_out, out.dtype), size, b_size, merged, dst, kept, ctx.protected,
                                      ctx.tokens_in, ctx.group, pos_grad)
        grad_pos = _pos_grad(pos_part, ctx.pos_shape if pos_grad else None)
        grad_res = grad_x if ctx.needs_input_grad[11] else None  # x + residual was merged: the same gradient
        return grad_x, None, None, None, None, None, None, grad_pos, grad_w, grad_b, None, grad_res, None, None


def _merge_autograd(x, size, plan: MergePlan, group: int, frame_pos):
    """:class:`MergeFunction` where a gradient can flow; otherwise its forward alone, without a graph node.
    ``plan`` is on the joined clips; ``group`` clips of ``x`` form one."""
    args = (plan.merged, plan.dst, plan.kept, plan.protected // group, group, frame_pos, plan.src, plan.offsets)
    if needs_grad(x, frame_pos):
        return MergeFunction.apply(x, detached(size), *args)
    return _merge_fwd(x, size, *args)[:2]


def _merge_norm_autograd(x, size, plan: MergePlan, group: int, frame_pos, weight, bias, eps: float, residual=None):
    """:class:`MergeNormFunction` where a gradient can flow; otherwise its forward alone."""
    c = plan.protected // group
    if needs_grad(x, frame_pos, weight, bias, residual):
        return MergeNormFunction.apply(x, detached(size), plan.merged, plan.dst, plan.kept, c, group, frame_pos,
                                       weight, bias, eps, residual, plan.src, plan.offsets)
    out, size_out, _, ln = _merge_norm_fwd(x, size, plan.merged, plan.dst, plan.kept, weight, bias, eps, c, group,
                                           frame_pos, residual, plan.src, plan.offsets)[:4]
    return out, size_out, ln


def best_match(metric: torch.Tensor, protected: int, heads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores [B', Na]`` float32 (float64 for float64 metric), ``dst [B', Na]`` int64."""
    if heads > 1 and not HEADS_IN_MATCH:
        metric, heads = head_mean(metric, heads), 1
    return _best_match_call(metric, protected, 1, heads)


def match(metric: torch.Tensor, r: int, protected: int, heads: int = 1) -> MergePlan:
    """The :class:`MergePlan` that removes ``r`` tokens, index for index equal to ``reference.match``
    (and, in ``src`` and ``offsets``, its grouping by destination, for :func:`merge`)."""
    return _match(metric, r, protected, 1, heads)


def merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x [B', N - r, D], size)`` merged by ``plan``; differentiable in ``x``."""
    return _merge_autograd(x, size, plan, 1, None)


def merge_norm(x: torch.Tensor, size: torch.Tensor, plan: MergePlan, weight: torch.Tensor, bias: torch.Tensor,
               eps: float, residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [B', N - r, D], size, layer_norm(x))`` merged by ``plan`` (``x + residual`` with a
    residual), as ``reference.merge_norm``."""
    return _merge_norm_autograd(x, size, plan, 1, None, weight, bias, float(eps), residual)


def join_merge(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
               frame_pos: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, MergePlan]:
    """ClipMe's join and cross-clip merge in one pass, never writing the joined clips.

    Equal to ``reference.merge(join_clips(x, group, protected, frame_pos), join_clips(size, ...),
    reference.match(join_clips(x.detach(), group, protected), r, group * protected))``.

    Args:
        x: ``[B * F, N, D]`` hidden states, the ``F`` clips of a video adjacent; also the metric
            (detached, without ``frame_pos``), as the spec's cross-clip merge uses.
        size: ``[B * F, N]`` or ``[B * F, N, 1]``.
        group: ``g``, clips per join (``F`` divisible by it); protected: class tokens per clip of ``x``.
        r: tokens removed from each joined clip, ``0 <= r <= (N - protected) * g // 2``.
        frame_pos: optional ``[1, F, 1, D]`` temporal position embedding.
    Returns:
        ``x [B * F / g, g * N - r, D]`` in x's dtype (also when ``frame_pos`` has another dtype),
        ``size`` in its layout and dtype, and the :class:`MergePlan` on the joined clips (as
        ``reference.match`` would give it). Differentiable in ``x`` and ``frame_pos``.
    """
    out, size_out, _, plan = join_merge_norm(x, size, group, protected, r, frame_pos)
    return out, size_out, plan


def join_merge_norm(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
                    frame_pos: Optional[torch.Tensor] = None,
                    norm: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], MergePlan]:
    """:func:`join_merge` and, with ``norm = (weight, bias, eps)``, the LayerNorm of its output
    (the block's ``ln_1``) from the same launch: ``(x, size, ln or None, plan)``."""
    if size.device != x.device:  # the rest is validated by tempme_fast.ops.join_merge
        raise ValueError(f"size is on {size.device} but x is on {x.device}; both must be on one device")
    plan = _match(x, r, protected, group)
    if norm is None:
        out, size_out = _merge_autograd(x, size, plan, group, frame_pos)
        return out, size_out, None, plan
    out, size_out, ln = _merge_norm_autograd(x, size, plan, group, frame_pos, norm[0], norm[1], float(norm[2]))
    return out, size_out, ln, plan


# Assigning a tunable (or a function, as the tests and sweeps do) forgets the launch descriptions.
forget_on_assign(__name__)
