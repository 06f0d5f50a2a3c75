"""The GPU suite's stages, run against one overall deadline, with every result kept as it is made.

``gpu_suite.sh`` prepares the machine (open_clip from wheels, ``PYTHONPATH``) and runs this. After the
preflight, ``warm`` compiles on every core the Triton kernel variants that the benchmarks will launch
(:mod:`benchmarks.warm`), so that they do not compile one at a time inside timed stages. Stages run in
order of importance: the headline figures first (whole encoder at 1 and 16 videos; the merge ops at
the ViT-B/16 32-video shapes, each timed eagerly and from a CUDA graph), the sweeps that choose the
merge's tiles and the plan's path (every row checked against float64 where it is timed), the profile of
where a forward's time goes, the attention candidates, the CUDA tests, then the other sweeps. Each stage gets what
remains of the budget (at most its cap), less the time kept for the stages marked ``final`` (the plots).
The plan printed at the start sets each stage's expected seconds (from the H200 run) against the
budget; a measurement split into two calls runs the first with the default order and the second with ``--skip``
naming the stages the first finished. A stage that
runs out of time is stopped (SIGTERM to its process group, SIGKILL 10 s later); every row it measured
is already on disk, because the benchmarks and the pytest plugin append one JSON line per result. A
benchmark stage whose process lost its CUDA context (exit 75: a kernel faulted) goes on with ``--resume`` in
a fresh process, in what is left of its limit (:mod:`benchmarks.context`); the test shards do the same.

Output folder (few files; ``--archive`` keeps a ``.tar.gz`` of it up to date every ``--every`` seconds,
after each stage and at the end, so the archive is the one file to carry back):

    environment.txt   the preflight: card, driver, Python, torch, triton, C compiler, Python.h, packages,
                      and the cached launch (when not "ok", the later stages run with TEMPME_FAST_CACHED_LAUNCH=0)
    rows.jsonl        every benchmark row (fields ``bench`` and ``tag`` say which script and stage)
    tests.jsonl       one line per finished test
    stages.jsonl      per stage: command, time limit, seconds taken, exit status, outcome, and the entries
                      it added to Triton's on-disk cache (``triton_cache_new``: kernels compiled, launcher stubs)
    suite.log         everything the stages printed
    plots/            PNG figures drawn from rows.jsonl

    python -m benchmarks.suite OUTDIR --budget 420 --archive results.tar.gz
    python -m benchmarks.suite OUTDIR2 --budget 420 --skip preflight model_headline ops_headline attention profile
    python -m benchmarks.suite OUTDIR --budget 60 --device cpu      # the same stages on a CPU, for a dry run
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .context import CONTEXT_LOST_EXIT, MAX_RESTARTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Benchmarks that exit with CONTEXT_LOST_EXIT where a row lost the CUDA context and go on from there with
# --resume (benchmarks.context): such a stage is started again, at most MAX_RESTARTS times, in what is left of
# its limit. (The test stages restart their shards themselves: benchmarks.shards.)
RESUMABLE = ("benchmarks.bench_ops", "benchmarks.bench_attention", "benchmarks.bench_model", "benchmarks.profile",
             "benchmarks.bench_train")
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL of a stage that ran out of time
# One of two calls in a lease of 15 minutes of device time, which also pays for the machine's start.
DEFAULT_BUDGET_S = 420
# The CUDA test that benchmarks.warm compiles what the real launches look up (run with the CUDA tests).
WARM_TEST = "tests/test_warm.py::test_after_warming_the_real_launches_compile_nothing"
# The same for a model compiled ahead by the public tempme_fast.compile_kernels.
PRECOMPILE_TEST = "tests/test_precompile.py::test_after_compiling_ahead_encode_video_and_its_backward_compile_nothing"
# A real kernel fault in a test shard: the test after it runs in a fresh process (benchmarks.context), checked
# with the kernel tests, before the CUDA tests that lean on it.
FAULT_TEST = "tests/test_context.py::test_a_kernel_fault_on_the_gpu_costs_its_shard_one_test"
# Processes per test stage on a GPU machine (16 cores): a test's time there is mostly compiling its
# Triton variants, which takes one core (benchmarks.shards).
TEST_SHARDS = 4
# Merge forward (token tile x feature slice x warps, "-s3": the gather of the merged sources pipelined
# over 3 stages, "-gN": a tile's sources gathered N at a time and summed by a product, "-pN": the tokens
# without sources copied first in their own dtype, the others merged N at a time, "-cN": each token's
# sources gathered N a step, every load of a step issued before a sum waits on one) and float32 match
# (A x B x channel tiles x warps - products; the first is the library's over a join's hidden channels, the
# last its tiles over the keys averaged over heads) candidates. The library's merge forward at 32 videos:
# 8 x 256 x 4 where B tokens gather few sources (the image merges; the fastest at layer 0 in the H200's third
# run, where the sweep stopped at the product gather's crash, mended since), one token a program over all
# 768 features at 4 warps, 4 sources a step, where they gather many: "merge:8x256x4" is the library's tile
# before (one source a step), "-c4" beside it. One token a program at one warp over 256 features (3 programs a
# token, 128-bit accesses) 4 a step, and over 128 features (6 programs, 64-bit) 8 a step: ptxas waits once a
# step in both (sm_90 and sm_80, triton 3.6), a quarter and an eighth of a latency a source, where the library's
# one token waits 2 a step of 4: for the long chains of the encoder's skewed plans. "-p1-c4": a tile's rows
# without sources copied first (many tokens' bytes in flight a program, in their own dtype), then each B token
# with sources alone, 4 a step:
# 8 x 1024 x 4 (64 registers, sm_90, triton 3.6: 8 programs an SM, 12 KB of rows each) and 8 x 256 x 1 (64 at one
# warp: 32 programs an SM, 4 KB each), against one token a program's 48 registers at 4 warps (10 programs an SM,
# 1.5 KB each; its 1024 lanes a row pad 768 features). (Dropped for room: 4 x 512 x 4, 8 x 256 x 2 and
# 8 x 256 x 4 - s3 and - p4, 32 x 256 x 8 (0.65 of the copy at layer 0, third run) and 16 x 256 x 4 (0.77); the
# pipelined gathers lost at layer 0, 0.46x-0.78x; one token at 4 warps 2 a step (2 waits a step: one a source) and
# at 2 warps 4 a step (5 waits a step, and 8 B of spill on sm_90).)
MERGE_TILES = ["merge:8x256x4", "merge:1x1024x4-c4", "merge:1x256x1-c4", "merge:1x128x1-c8", "merge:8x256x4-c4",
               "merge:8x1024x4-p1-c4", "merge:8x256x1-p1-c4", "merge:16x128x4", "merge:8x128x4", "merge:4x256x4",
               "merge:16x128x4-g16", "merge:16x256x4-g16", "merge:32x256x8-p8", "merge:16x256x4-p4"]
MATCH_TILES = ["match:64x64x64x8-native", "match:64x128x64x8-native", "match:128x64x64x8-native",
               "match:128x128x64x8-native", "match:64x64x128x4-native", "match:64x64x64x4-native"]
# Forward tiles of the Triton attention timed by the attention_tiles stage (query tile x key tile x warps
# x stages), beside the library's own (64 x 32, 4 warps, 2 stages at ViT-B/16 since the H200's third run, where
# it beat the 64 x 64 before at every layer), which the stage times too.
ATTENTION_TILES = ["64x64x4x2", "32x32x4x2", "64x32x4x3", "64x16x4x2", "128x32x4x2", "128x64x4x2", "128x32x8x2"]
# Token tile x warps of the merge that also writes the LayerNorm (the model's merge after attention;
# a program spans all 768 features, padded to 1024); the first is the library's at ViT-B/16 before the
# chunked gather (one token at 2 warps since the H200's third run, the fastest there at each layer, one source
# a step), "-c4" the library's since where B tokens gather many sources (every merge of the sweep's shapes but
# layer 0's: 2 warps after attention, 4 at the joins). "-c8": 8 sources a step (SRC_CHUNK = 8), at 4 warps (128-bit
# accesses; sm_90, triton 3.6: 3 waits a step of 8 after attention, 1-2 at the joins, against the library's 3 and
# 1-2 a step of 4) and at 8 warps (64-bit; 2 and 1-2 a step of 8).
# "-p1": the tokens without sources copied (and normalised) first, the others one at a time (SPLIT_T): 4 x 4 - p1
# ran 1.02x the library's one token at 2 warps at layer 0 in the third run, 0.95x at layers 8-10. Its LayerNorm may
# differ from the whole tile's in the last place. "-p1-c4": those alone gathering 4 sources a step, as the library's
# one token does: 4 x 4 - p1 - c4 takes 80 registers (sm_90, triton 3.6; 6 programs an SM, 4 tokens' rows each), the
# library's one token 104 (9 programs, one token each), one token at 2 warps one source a step 64 (16 programs).
# Each at the merges after attention and at the joins (join_norm_fwd: the position embedding added as it merges).
# (Dropped for room: 2 x 4, 4 x 8, 1 x 4 and 4 x 8 - p1, all slower than 1 x 2 at every layer of the third run; 4 x 4,
# the library's tile before that run, 1.12x-1.19x slower than 1 x 2 there; heads:mean, the keys averaged over heads
# by torch before the match, 0.94x-0.98x the library's at each of the four shapes, kept at one video in plan_paths;
# one token at 2 warps 2 a step, and at one warp one a step, for the "-c8" tiles.)
NORM_TILES = ["norm:1x2", "norm:1x2-c4", "norm:1x4-c4", "norm:1x4-c8", "norm:1x8-c8", "norm:2x2", "norm:4x4-p1",
              "norm:4x4-p1-c4"]
# The same merge at one video, where a merge's time is the chain of loads of its busiest token's sources
# (1.35 ms of kernels in one ViT-B/16 forward in the third run, 0.40 ms of them the match and the merge).
NORM1_TILES = ["norm:1x2", "norm:1x2-c4", "norm:1x4-c4", "norm:1x4-c8", "norm:1x8-c8", "norm:4x4", "norm:4x4-p1-c4"]
# The merge's candidates again on the encoder's own plans (bench_ops --plans encoder: the metrics of a ViT-B/16 with
# random weights under TempMe, 32 videos), at the layers whose B tokens gather many sources there (8-10; layer 0
# merges 2 tokens a frame either way): the sweeps above use random metrics, whose busiest B token gathers 3-6
# sources, where the encoder's gather up to 161 (layer 10's join at 32 videos). A tile that wins on random plans
# by copying fast may lose where one token's chain of loads sets the merge's time, and the library's tiles serve
# the encoder. The merge forward: the library's tile before the chunked gather, its chunked twin, one token a
# program at one warp 4 and 8 a step, the two copies-first tiles, and a tile's sources gathered 16 at once by a
# product; the merge with its LayerNorm: one token at 2 warps one source a step, one token at 4 warps 4 and 8 a
# step and at 8 warps 8 a step, and 4-token tiles copies-first, after attention and at the joins (join_norm_fwd:
# the encoder's busiest merges). Each list is part of the random sweep's, which benchmarks.warm compiles.
ENCODER_MERGE_TILES = ["merge:8x256x4", "merge:8x256x4-c4", "merge:1x256x1-c4", "merge:1x128x1-c8",
                       "merge:8x1024x4-p1-c4", "merge:8x256x1-p1-c4", "merge:16x128x4-g16"]
ENCODER_NORM_TILES = ["norm:1x2", "norm:1x4-c4", "norm:1x4-c8", "norm:1x8-c8", "norm:4x4-p1-c4"]
ENCODER_LAYERS = ["8", "9", "10"]
# The match's plan with every row sorted and every row counted, against the library's choice
# (triton_ops.PLAN_SORT_MIN), where the plan is on the critical path: one video, rows of 23-428 A tokens;
# and the keys averaged by torch first (heads:mean), at one video.
PLAN_PATHS = ["plan:sort", "plan:count", "heads:mean"]
# Where each sweep runs (models, batch, dtype) and its candidates; benchmarks.warm compiles them ahead.
TILE_SWEEPS = {"attention": (("ViT-B-16",), 16, "fp16", ATTENTION_TILES),
               "merge": (("ViT-B-16",), 32, "fp16", MERGE_TILES),
               "match": (("ViT-B-16",), 32, "fp16", MATCH_TILES),
               "norm": (("ViT-B-16",), 32, "fp16", NORM_TILES),
               "norm1": (("ViT-B-32", "ViT-B-16"), 1, "fp16", NORM1_TILES),  # (what "norm" sweeps, at one video)
               "plan": (("ViT-B-32", "ViT-B-16"), 1, "fp16", PLAN_PATHS)}


@dataclass
class Stage:
    """One command of the suite: it may run at most ``cap`` seconds, and never past the deadline."""

    name: str
    argv: List[str]
    cap: float
    final: bool = False  # its time is kept back from the stages before it (the plots come out regardless)
    expect: float = 0.0  # seconds it is expected to take, for the plan printed at the start

    @property
    def resumable(self) -> bool:
        """Whether the stage goes on with ``--resume`` after a process that lost the CUDA context."""
        return "-m" in self.argv and self.argv[self.argv.index("-m") + 1] in RESUMABLE


def gpu_stages(out: str, device: str = "cuda", python: str = sys.executable) -> List[Stage]:
    """The suite, most important first. ``device="cpu"`` runs the same scripts on the CPU paths only."""
    rows, tests = os.path.join(out, "rows.jsonl"), os.path.join(out, "tests.jsonl")
    gpu = device == "cuda"
    fast = ["torch", "triton"] if gpu else ["torch"]
    # On a CPU dry run the compiled rows use Dynamo's eager backend: the bookkeeping runs, in seconds.
    compile_backend = "inductor" if gpu else "eager"

    def bench(script, tag, *args):
        return [python, "-m", f"benchmarks.{script}", "--device", device, "--jsonl", rows, "--tag", tag, *args]

    def pytest(*files):
        args = ["-q", "-p", "no:cacheprovider", "-p", "benchmarks.testlog", "--results-jsonl", tests, *files]
        if gpu:  # compiling a test's kernels takes one core: TEST_SHARDS processes share the tests
            return [python, "-m", "benchmarks.shards", str(TEST_SHARDS), "--", *args]
        return [python, "-m", "pytest", *args]

    def sweep(kind):  # --models, --batches and --dtypes of a tile sweep
        models, batch, sweep_dtype, _ = TILE_SWEEPS[kind]
        return ["--models", *models, "--batches", str(batch), "--dtypes", sweep_dtype]

    # tempme-triton-mean+graph: the keys averaged over heads by torch before each match, the path before the
    # match averaged them itself (one kernel fewer a merge), replayed as tempme-triton+graph is.
    # tempme-triton-mlp+graph: each block's c_fc and GELU as one Triton kernel (encoder.FUSED_MLP, off by default).
    # tempme-triton-serial+graph: every merge gathering one source a step on the tiles before the chunked gather
    # (with random weights some B tokens gather up to 75 sources: the chains the chunked gather shortens).
    headline_variants = ["open_clip", "open_clip+graph", "tempme-eager", "tempme-torch", "tempme-triton",
                         "tempme-triton+graph", "tempme-triton-mean+graph", "tempme-triton-mlp+graph",
                         "tempme-triton-serial+graph"]
    dtype = "fp16" if gpu else "fp32"
    # cap: the most a stage may take; expect: what it took in the H200's third run (benchmarks/results/gpu-h200-3,
    # after warm compiled its variants), or an estimate where it never ran or has grown since.
    return [
        Stage("preflight", [python, "-m", "benchmarks.preflight", os.path.join(out, "environment.txt")], 40, expect=15),
        # Every Triton variant the benchmarks below launch, compiled on all cores into Triton's cache first
        # (the stages' expected seconds still include their own compiles: measured before this stage).
        # 33 s for 190 variants on the H200's 16 cores; the norm, plan and pipelined-gather candidates add
        # 74 more (109 -> 183 tile-sweep variants), the training forwards' LayerNorm statistics 33 (361 -> 394
        # in all, sm_90); the third run compiled 444 in 56 s; 495 now (468 before the joins' norm candidates and
        # bench_ops' join, forward and backward, 502 before the 8-a-step candidates took the 2-a-step ones' place).
        *([Stage("warm", [python, "-m", "benchmarks.warm", "--models", "ViT-B-32", "ViT-B-16",
                          "--batches", "1", "16", "32", "4", "64", "8", "128", "--dtypes", "fp16", "bf16", "fp32",
                          "--jsonl", rows, "--tag", "warm"], 90, expect=65)] if gpu else []),  # 56 s in the third run
        # Headline: whole encoder, both models, 1 and 16 videos, fp16 inference, every eager path.
        Stage("model_headline", bench("bench_model", "headline", "--models", "ViT-B-32", "ViT-B-16",
                                      "--batches", "1", "16", "--dtypes", dtype, "--modes", "infer",
                                      "--variants", *headline_variants, "--rep-ms", "100"), 110,
              expect=50),  # 38.5 s with 7 variants in the third run; tempme-triton-mlp+graph and -serial+graph added
        # Headline: every merge op at the ViT-B/16 32-video shapes, reference against Triton, eager and device.
        # 28.8 s in the third run; the join's two ops (forward, and forward with backward, at 3 of the 7 shapes)
        # added since: about +4 s.
        Stage("ops_headline", bench("bench_ops", "headline", "--models", "ViT-B-16", "--batches", "32",
                                    "--dtypes", dtype, "--impls", *fast, "--rep-ms", "30"), 80, expect=33),
        # The merge forward again at 8 videos: with the headline's 32, each shape's time read as a fixed cost and a
        # rate per byte (benchmarks.report's scaling table), which says whether a shortfall against the copy
        # bandwidth is the kernel's per byte or what a kernel of that size pays once. 7 rows; about 10 s.
        *([Stage("merge_scaling", bench("bench_ops", "scaling", "--models", "ViT-B-16", "--batches", "8",
                                        "--dtypes", dtype, "--impls", "triton", "--ops", "merge_fwd",
                                        "--rep-ms", "25"), 40, expect=10)] if gpu else []),
        # The merge forward reached 0.15-0.40 of the copy bandwidth on the H200 (target 0.60): its tiles, with and
        # without the LayerNorm, and the plan's two paths at one video, at the real shapes, right after the
        # headline. Every row is checked against float64 where it is timed (benchmarks.oracle), so these
        # come before the tests that would otherwise vouch for the kernels they launch.
        *([Stage("merge_tiles", bench("bench_ops", "merge_tiles", *sweep("merge"), "--impls", "triton",
                                      "--ops", "merge_fwd", "--tiles", *MERGE_TILES, "--rep-ms", "25"),
                 140, expect=45),  # 14 candidates at 7 shapes; norm_tiles' 13 at 4 took 19.7 s in the third run
           Stage("norm_tiles", bench("bench_ops", "norm_tiles", *sweep("norm"), "--impls", "triton",
                                     "--ops", "step_norm_fwd", "join_norm_fwd", "--tiles", *NORM_TILES,
                                     "--rep-ms", "25"), 100,
                 expect=25),  # 13 candidates at 4 shapes took 19.7 s in the third run (compiled by warm); 8 at 7 now
           # At one video on the encoder's plans: there a merge's time is its busiest token's chain.
           Stage("norm1_tiles", bench("bench_ops", "norm1_tiles", *sweep("norm1"), "--impls", "triton",
                                      "--ops", "step_norm_fwd", "join_norm_fwd", "--tiles", *NORM1_TILES,
                                      "--plans", "encoder", "--rep-ms", "25"), 80,
                 expect=45),  # estimated: 7 candidates at 14 small shapes, compiled by warm, and two encoders' runs
           Stage("encoder_tiles", bench("bench_ops", "encoder_tiles", *sweep("merge"), "--impls", "triton",
                                        "--ops", "merge_fwd", "step_norm_fwd", "join_norm_fwd", "--plans", "encoder",
                                        "--layers", *ENCODER_LAYERS,
                                        "--tiles", *ENCODER_MERGE_TILES, *ENCODER_NORM_TILES, "--rep-ms", "25"), 80,
                 expect=47)]  # estimated: 84 rows (norm_tiles: 13 candidates at 4 shapes in 19.7 s), one encoder run
          if gpu else []),  # Triton's tiles: nothing to sweep in the interpreter
        # Where the forward's time goes: kernels by group against the wall time. At one ViT-B/16 video the
        # graph-replayed encoder was 1.67 ms against open_clip's 1.55: its kernels say where.
        # With the MLP's c_fc and GELU fused (encoder.FUSED_MLP): its kernel against cuBLAS's product and the GELU.
        Stage("profile", bench("profile", "profile", "--cases", "ViT-B-16:16", "ViT-B-32:1", "ViT-B-16:1",
                               "--dtypes", dtype,
                               *(["--variants", "open_clip", "tempme-triton", "tempme-triton-mlp",
                                   "tempme-triton-serial"] if gpu else [])),
              90, expect=30),  # 17.8 s in the third run; the fused MLP's and the serial gather's profiles added
        # The proportional-attention candidates (mask, fold, Triton kernel) at ViT-B/16's shapes.
        Stage("attention", [python, "-m", "benchmarks.bench_attention", "--device", device, "--jsonl", rows,
                            "--tag", "attention", "--models", "ViT-B-16", "--batches", "16", "--dtypes", dtype,
                            "--rep-ms", "25"],
              80, expect=30),  # 25.8 s in the third run
        # The sorted plan and the histogram grouping have not run in a GPU test yet.
        # 6.1 s in the third run; the kernel fault's test (two pytest processes on one shard) about 10 s more.
        Stage("kernel_tests", pytest("tests/test_triton_ops.py", FAULT_TEST), 170, expect=15),
        # With the checks that the warm-up and compile_kernels compiled what the real launches look up.
        Stage("cuda_tests", pytest("tests/test_triton_cuda.py", "tests/test_cuda_determinism.py",
                                   "tests/test_add_norm.py", WARM_TEST, PRECOMPILE_TEST), 130, expect=110),
        # test_bench_profile.py checks this suite's own device timing and profile on the GPU.
        Stage("model_tests", pytest("tests/test_graphs.py", "tests/test_model_triton.py", "tests/test_attention.py",
                                    "tests/test_self_attention.py", "tests/test_bench_profile.py"), 150, expect=60),
        # The 16-bit match over a join's hidden channels (0.15-0.28 of the copy bandwidth at 32 videos in the
        # H200's third run) on its new tiles and the candidates around them; then the plan's two paths, whose
        # last program now waits on memory 4-5 times in turn, not 6-8 (measured in the third run: the sorted
        # plan 1.04x over 14 shapes, not taken); then the attention forward around the 64 x 32 tiles the third
        # run's sweep chose (taken since, the kernel unchanged).
        *([Stage("match_tiles", bench("bench_ops", "match_tiles", *sweep("match"), "--impls", *fast,
                                      "--ops", "best_match", "--tiles", *MATCH_TILES, "--rep-ms", "25"), 90, expect=20),
           Stage("plan_paths", bench("bench_ops", "plan_paths", *sweep("plan"), "--impls", "triton",
                                     "--ops", "match", "--tiles", *PLAN_PATHS, "--rep-ms", "25"), 75, expect=20),
           Stage("attention_tiles", [python, "-m", "benchmarks.bench_attention", "--device", device, "--jsonl", rows,
                                     "--tag", "attention_tiles", *sweep("attention"), "--rep-ms", "25",
                                     "--fwd-tiles", *ATTENTION_TILES],
                 90, expect=20)]
          if gpu else []),
        # Sweeps. The compiled reference, compiled afresh per shape, at the headline shapes.
        Stage("ops_batches", bench("bench_ops", "batches", "--models", "ViT-B-32", "ViT-B-16",
                                   "--batches", "1", "8", "128", "--dtypes", dtype,
                                   "--impls", *fast, "--ops", "step_fwd", "merge_fwd", "merge_bwd", "step_fwdbwd",
                                   "--rep-ms", "25"), 120, expect=90),
        Stage("ops_dtypes", bench("bench_ops", "dtypes", "--models", "ViT-B-16", "--batches", "32",
                                  "--dtypes", "bf16", "fp32", "--impls", *fast, "--rep-ms", "25"), 80, expect=50),
        # tempme-triton-jit: the eager forward with Triton's own launch path, against tempme_fast.ops.launch's.
        Stage("model_sweep", bench("bench_model", "sweep", "--models", "ViT-B-32", "ViT-B-16", "--batches", "4", "64",
                                   "--dtypes", dtype, "--modes", "infer",
                                   "--variants", "open_clip", "tempme-torch", "tempme-triton", "tempme-triton-jit",
                                   "tempme-triton+graph", "--no-layer-times", "--rep-ms", "100"), 75, expect=40),
        # Forward + backward of the vision tower alone (bench_train below times the whole training step).
        Stage("model_train", bench("bench_model", "train", "--models", "ViT-B-32", "ViT-B-16", "--batches", "1", "16",
                                   "--dtypes", dtype, "--modes", "train",
                                   "--variants", "open_clip", "tempme-eager", "tempme-torch", "tempme-triton",
                                   "--no-layer-times", "--rep-ms", "100"), 75, expect=41),
        # The training rows above were 2-2.6x open_clip's at 1 and 16 videos, nearly the same at both: where it goes.
        Stage("profile_train", bench("profile", "profile_train", "--cases", "ViT-B-32:1", "ViT-B-32:16",
                                     "--modes", "train", "--dtypes", dtype), 60, expect=30),
        # The same training call compiled (the forward, and its backward through AOTAutograd): whether compiling
        # takes away the host time the eager rows wait on, against open_clip compiled the same way. Each compiled
        # row compiles afresh (about a minute each, expected; not yet measured).
        Stage("train_compile", bench("bench_model", "train_compile", "--models", "ViT-B-32", "--batches", "16",
                                     "--dtypes", dtype, "--modes", "train",
                                     "--variants", "open_clip", "open_clip+compile", "tempme-triton",
                                     "tempme-triton+compile", "--compile", "--compile-backend", compile_backend,
                                     "--no-layer-times", "--rep-ms", "100"), 200, expect=150),
        Stage("ops_compiled", bench("bench_ops", "compiled", "--models", "ViT-B-16", "--batches", "32",
                                    "--dtypes", dtype, "--impls", "torch", "torch.compile",
                                    "--ops", "step_fwd", "match", "--compile-at", "",
                                    "--compile-backend", compile_backend, "--rep-ms", "25"), 200, expect=180),
        Stage("model_compile", bench("bench_model", "compile", "--models", "ViT-B-16", "--batches", "1", "16",
                                     "--dtypes", dtype, "--modes", "infer",
                                     "--variants", "open_clip", "tempme-triton", "tempme-triton+compile",
                                     "--compile", "--compile-backend", compile_backend, "--no-layer-times",
                                     "--rep-ms", "100"), 150, expect=120),
        Stage("train_step", bench("bench_train", "train", "--model", "ViT-B-16", "--batch", "32" if gpu else "2",
                                  "--precision", "bf16" if gpu else "fp32", "--repeats", "5"), 90, expect=60),
        Stage("other_tests", pytest("tests", *[f"--ignore=tests/{name}.py" for name in
                                               ("test_triton_cuda", "test_cuda_determinism", "test_graphs",
                                                "test_triton_ops", "test_model_triton", "test_attention",
                                                "test_self_attention", "test_bench_profile", "test_add_norm")],
                                    "--deselect", WARM_TEST, "--deselect", PRECOMPILE_TEST, "--deselect", FAULT_TEST),
              240, expect=240),
        Stage("plots", [python, "-m", "benchmarks.plots", out, "--to", os.path.join(out, "plots")], 20, final=True,
              expect=7),
    ]


def plan_text(stages: Sequence[Stage], budget: float) -> str:
    """The stages with their caps and expected seconds, and which are expected to fit in ``budget``."""
    lines = [f"{'stage':15s} {'cap s':>6s} {'expect s':>8s} {'by then':>8s}"]
    reserve = sum(s.expect for s in stages if s.final)
    elapsed = 0.0
    for s in stages:
        if s.final:  # its time is kept back: it runs whatever came before
            lines.append(f"{s.name:15s} {s.cap:6.0f} {s.expect:8.0f} {'':8s}  kept back")
            continue
        elapsed += s.expect
        fits = elapsed + reserve <= budget
        lines.append(f"{s.name:15s} {s.cap:6.0f} {s.expect:8.0f} {elapsed:8.0f}  {'' if fits else 'past the budget'}")
    total, caps = sum(s.expect for s in stages), sum(s.cap for s in stages)
    lines.append(f"plan: {total:.0f} s expected, {caps:.0f} s of caps, against a budget of {budget:.0f} s"
                 + ("" if total <= budget else
                    f": {total - budget:.0f} s over; the stages past the budget are expected not to run"))
    return "\n".join(lines)


def select_stages(stages: Sequence[Stage], only: Optional[Sequence[str]] = None,
                  skip: Optional[Sequence[str]] = None) -> List[Stage]:
    """The stages named by ``only`` (all if None), less those named by ``skip``, in the suite's order."""
    names = [s.name for s in stages]
    for option, given in (("--only", only), ("--skip", skip)):
        unknown = sorted(set(given or ()) - set(names))
        if unknown:
            raise ValueError(f"{option}: unknown stage(s) {unknown}; valid: {names}")
    return [s for s in stages if (only is None or s.name in only) and s.name not in (skip or ())]


class Archiver:
    """Keeps ``path`` a ``.tar.gz`` of ``folder``: every ``every`` seconds in a thread, and on ``snapshot()``.

    Each snapshot is written beside ``path`` and renamed over it, so ``path`` is always a whole archive.
    """

    def __init__(self, folder: str, path: Optional[str], every: float = 15):
        self.folder, self.path, self.every = folder, path, every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def snapshot(self) -> None:
        if not self.path:
            return
        with self._lock:
            part = self.path + ".part"
            try:
                with tarfile.open(part, "w:gz") as tar:
                    tar.add(self.folder, arcname=os.path.basename(os.path.normpath(self.folder)))
                os.replace(part, self.path)
            except OSError as e:  # a file vanishing mid-snapshot: the next snapshot gets it
                print(f"[suite] archive snapshot failed: {e}", flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.snapshot()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.snapshot()


def _copy_output(pipe, log) -> None:
    for line in iter(pipe.readline, b""):
        log.write(line)
        log.flush()
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def run_stage(stage: Stage, limit: float, log) -> dict:
    """Run ``stage`` for at most ``limit`` seconds; its output goes to ``log`` and to stdout."""
    t0 = time.monotonic()
    proc = subprocess.Popen(stage.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    reader = threading.Thread(target=_copy_output, args=(proc.stdout, log), daemon=True)
    reader.start()
    outcome = "ok"
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        outcome = "timeout"
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    except BaseException:  # the suite itself is stopping (SIGTERM, Ctrl-C): its stage stops with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    reader.join(timeout=5)
    if outcome == "ok" and rc != 0:
        outcome = "failed"
    return {"rc": rc, "outcome": outcome, "seconds": round(time.monotonic() - t0, 1)}


def run_resuming(stage: Stage, limit: float, log, min_stage_s: float = 5) -> dict:
    """:func:`run_stage`, and for a :attr:`Stage.resumable` stage whose process exits with ``CONTEXT_LOST_EXIT``
    (a row lost the CUDA context) the same command with ``--resume`` in what is left of ``limit``, up to
    ``MAX_RESTARTS`` times: the rows after the lost one are measured in a fresh process. ``restarts`` counts
    those processes and ``rcs`` holds every exit status; a stage that lost its context is never ``ok``."""
    result = run_stage(stage, limit, log)
    rcs, spent = [result["rc"]], result["seconds"]
    while stage.resumable and result["rc"] == CONTEXT_LOST_EXIT and len(rcs) <= MAX_RESTARTS:
        left = limit - spent
        if left < min_stage_s:
            break
        _say(log, f"=== {stage.name}: the CUDA context is lost (exit {CONTEXT_LOST_EXIT}); again with --resume "
                  f"({left:.0f} s left of its limit)\n")
        result = run_stage(Stage(stage.name, [*stage.argv, "--resume"], stage.cap), left, log)
        rcs.append(result["rc"])
        spent += result["seconds"]
    if len(rcs) == 1:
        return result
    outcome = result["outcome"] if result["outcome"] != "ok" else "failed"
    return {**result, "outcome": outcome, "seconds": round(spent, 1), "restarts": len(rcs) - 1, "rcs": rcs}


def _say(log, line: str) -> None:
    """``line`` into the suite's log and onto stdout, at once."""
    log.write(line.encode())
    log.flush()
    print(line, end="", flush=True)


def _fall_back_from_cached_launch(out: str, log) -> None:
    """After the preflight: unless its "cached launch" line says "ok" (or "skipped", on a CPU), the later
    stages launch every kernel through Triton's own path (``TEMPME_FAST_CACHED_LAUNCH=0``)."""
    path = os.path.join(out, "environment.txt")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    found = next((line.split(": ", 1)[1] for line in lines if line.startswith("cached launch: ")), "")
    if not found.startswith(("ok", "skipped")):
        os.environ["TEMPME_FAST_CACHED_LAUNCH"] = "0"
        _say(log, f"=== cached launch not ok ({found or 'no preflight line'}): TEMPME_FAST_CACHED_LAUNCH=0 from here\n")


def triton_cache_entries() -> Optional[int]:
    """Entries in Triton's on-disk cache (one per compiled kernel variant or launcher stub), or None
    without one. The folder is Triton's default unless ``TRITON_CACHE_DIR`` or ``TRITON_HOME`` moves it."""
    folder = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")
    try:
        return len(os.listdir(folder))
    except OSError:
        return None


def run_suite(out: str, stages: Sequence[Stage], deadline: float, archive: Optional[str] = None,
              every: float = 15, min_stage_s: float = 5) -> int:
    """Run ``stages`` in order until the wall-clock ``deadline`` (``time.time()`` seconds).

    Returns 0 when every stage finished with exit status 0, else 1 (failed, stopped or skipped stages).
    """
    os.makedirs(out, exist_ok=True)
    archiver = Archiver(out, archive, every)
    status = 0
    # Stopped from outside (SIGTERM), the suite still stops its stage and writes the archive a last time.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with open(os.path.join(out, "suite.log"), "ab") as log, \
                open(os.path.join(out, "stages.jsonl"), "a") as stages_file:
            for i, stage in enumerate(stages):
                kept_back = 0 if stage.final else sum(s.cap for s in stages[i + 1:] if s.final)
                remaining = deadline - time.time()
                limit = min(stage.cap, remaining - kept_back)
                record = {"stage": stage.name, "argv": stage.argv, "cap_s": stage.cap,
                          "limit_s": round(limit, 1), "start": round(time.time(), 1)}
                if limit < min_stage_s:
                    record.update(outcome="skipped", rc=None, seconds=0.0,
                                  reason=f"{max(remaining, 0):.0f} s left of the budget")
                else:
                    _say(log, f"=== {stage.name} (limit {limit:.0f} s of {remaining:.0f} s left)\n")
                    cached = triton_cache_entries()
                    record.update(run_resuming(stage, limit, log, min_stage_s))
                    after = triton_cache_entries()
                    record["triton_cache_new"] = None if after is None else after - (cached or 0)
                _say(log, f"=== {stage.name}: {record['outcome']} (exit {record['rc']}) after {record['seconds']} s\n")
                stages_file.write(json.dumps(record) + "\n")
                stages_file.flush()
                status |= record["outcome"] != "ok"
                if stage.name == "preflight":
                    _fall_back_from_cached_launch(out, log)
                archiver.snapshot()
    finally:
        signal.signal(signal.SIGTERM, previous)
        archiver.close()
    return int(status)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (created; rows are appended to what is there)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole suite (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--deadline", type=float, default=None,
                        help="wall-clock end as Unix seconds (overrides --budget; set by gpu_suite.sh at its start)")
    parser.add_argument("--archive", default=None, metavar="PATH", help=".tar.gz of the output folder, kept current")
    parser.add_argument("--every", type=float, default=15, help="seconds between archive snapshots")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run these stages only")
    parser.add_argument("--skip", nargs="+", default=None, metavar="STAGE",
                        help="leave these stages out (e.g. those a first call finished)")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    for option, seconds in (("--budget", args.budget), ("--every", args.every)):
        if not 0 < seconds < float("inf"):  # (argparse types of tempme_fast would import torch here)
            parser.error(f"{option} {seconds} must be > 0 seconds")
    out = os.path.abspath(args.out)
    if args.archive and os.path.abspath(args.archive).startswith(out + os.sep):
        parser.error(f"--archive {args.archive} must be outside the output folder {args.out}")
    try:
        stages = select_stages(gpu_stages(out, args.device), args.only, args.skip)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        for s in stages:
            print(f"{s.name:15s} cap {s.cap:4.0f} s  {' '.join(s.argv)}")
    deadline = args.deadline if args.deadline is not None else time.time() + args.budget
    plan = plan_text(stages, deadline - time.time())
    print(plan, flush=True)
    if args.list:
        return 0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "suite.log"), "a") as log:  # the plan travels with the results
        log.write(plan + "\n")
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # kernels compile for the GPU, never in the interpreter
    return run_suite(out, stages, deadline, args.archive, args.every)


if __name__ == "__main__":
    raise SystemExit(main())
