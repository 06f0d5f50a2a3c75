"""The merge and attention kernels as compiled for an H100 (sm_90): no spills, 128-bit feature
traffic, at most two forward launches per merge step. No GPU needed: ``benchmarks.codegen``
compiles the launches the ViT-B/32 schedule makes (batch 1 and 32) with Triton's ``GPUTarget`` and
reads ``ptxas -v`` and the PTX. ``python -m benchmarks.codegen`` covers every model, dtype and sm_80 as well.
"""
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kit import ROOT, process_env


def _codegen(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # A process of its own: TRITON_INTERPRET (set by conftest.py) swaps the kernels for the interpreter's.
    return subprocess.run([sys.executable, "-m", "benchmarks.codegen", *args], cwd=ROOT, env=process_env(False),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def vit_b32_report():
    pytest.importorskip("triton")
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
        pytest.skip("this Triton lacks the binder API benchmarks.codegen compiles through")
    return _codegen("--models", "ViT-B-32", "--dtypes", "bf16", "--archs", "90", "--check", "--loops")


def test_no_spills_no_scalar_16bit_access_two_forward_launches(vit_b32_report):
    done = vit_b32_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| _")]
    rows = [row for row in rows if len(row) == 12]  # (not the loops' table, of 9 columns)
    kernels = {row[0].strip() for row in rows}
    assert kernels == {"_best_match_fwd_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel", "_attention_fwd_kernel",
                       "_attention_bwd_kernel", "_add_norm_fwd_kernel", "_embed_norm_fwd_kernel",
                       "_linear_act_fwd_kernel"}, kernels
    assert done.stdout.startswith("Compiled with triton "), done.stdout[:200]
    # The model's merges write the LayerNorm that follows them: those variants are the ones compiled.
    fwd_variants = [row[2] for row in rows if row[0].strip() == "_merge_fwd_kernel"]
    assert fwd_variants and all("NORM=1" in v for v in fwd_variants), fwd_variants
    assert any("GROUP=2" in v and "HAS_POS=1" in v for v in fwd_variants), fwd_variants
    # A merge after attention also adds the attention's residual as it reads x; a join's merge does not.
    assert all(("HAS_RES=1" in v) == ("GROUP=1" in v) for v in fwd_variants), fwd_variants
    # Attention: layer 0 runs without the size bias, every later layer with it; forward, dQ and dK/dV passes.
    attention = {(row[0].strip(), row[2].split("HAS_BIAS=")[1][0], "DKDV=1" in row[2]) for row in rows
                 if row[0].strip().startswith("_attention")}
    assert attention == {(k, b, p) for k, p in (("_attention_fwd_kernel", False), ("_attention_bwd_kernel", False),
                                                 ("_attention_bwd_kernel", True)) for b in "01"}, attention
    # Inference takes log(size) in the kernel; training passes the bias.
    forwards = {row[2].split("LOG_BIAS=")[1][0] for row in rows if row[0].strip() == "_attention_fwd_kernel"}
    assert forwards == {"0", "1"}, forwards
    # Larger ViTs' head dims, 72, 88 and 104 among them: head strides that are multiples of 8, not 16.
    head_dims = {row[3].strip().split()[0] for row in rows if row[3].strip().startswith("d=")}
    assert head_dims == {"d=72", "d=80", "d=88", "d=104"}, head_dims
    for row in rows:
        spill, widest, scalar16 = row[8].strip(), row[10].strip(), row[11].strip()
        assert spill == "0" and scalar16 == "0" and widest == "128 bit", row
    tables = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ViT-B-32")]
    steps = [row for row in tables if len(row) == 8]
    assert {int(s[1]) for s in steps} == {1, 32}
    for s in steps:
        assert int(s[4]) <= 2 and int(s[5]) == 1, s  # forward and backward launches per merge step
        assert int(s[6]) == 4, s  # allocations per forward step: merged tokens, sizes, LayerNorm; the plan
    # The critical path per merge step. ViT-B/32's clips hold at most 84 A tokens: their plans count, in
    # at most 2 x 2 + 2 steps (longer rows sort). The grouping by destination is one sort in the match's
    # last program of a clip, of its r <= 64 merged tokens here (at most 6 x 7 / 2 = 21 stages), and a
    # histogram; the merge programs have no grouping loop left.
    paths = [row for row in tables if len(row) == 10]
    assert len(paths) == 2 * 15, len(paths)
    for p in paths:
        plan, steps = p[7].split("+")[-1].split()[0], int(p[7].split()[-1])
        assert plan == "count" and steps <= 6, p
        grouping, stages = p[9].split()[:2]
        assert grouping == "sort" and 0 < int(stages) <= 21, p


def _loop_rows(report: str, kernel: str, waits: bool = False):
    """``(variant, loop instructions, MUFU, tensor-core, selects)`` of ``kernel``'s rows in the ``--loops`` table;
    with ``waits``, ``(variant, load waits, sources)`` of its rows that count them."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines()
            if line.startswith(f"| {kernel} ")]
    rows = [row for row in rows if len(row) == 9]
    if waits:
        return [(row[2], *map(int, row[8].split(" / "))) for row in rows if row[8] != "-" and " / " in row[8]]
    return [(row[2], int(row[4]), int(row[5]), int(row[6]), int(row[7])) for row in rows]


def test_the_size_bias_costs_the_attention_forward_few_instructions(vit_b32_report):
    """The biased forward's loop over key tiles, in machine code, within 1.5x the instructions of the
    unbiased one's. Each thread holds 16 keys of a 64-key tile, and libdevice's ``log2f`` of their sizes
    (``tl.log2``) made that loop 2.4x as long (888 and 988 instructions against 416 and 410, triton 3.8
    and 3.6): the kernel was bound by issuing it. ``lg2.approx`` is one instruction a key."""
    done = vit_b32_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loops = _loop_rows(done.stdout, "_attention_fwd_kernel")
    forward = {}
    for variant, instructions, mufu, tensor, _ in loops:
        if "HEAD_DIM=64 " in variant and "STORE_LSE=0" in variant:
            forward[variant.split("HAS_BIAS=")[1][0]] = instructions, mufu, tensor
    assert set(forward) == {"0", "1"}, loops
    (plain, plain_mufu, tensor), (biased, biased_mufu, biased_tensor) = forward["0"], forward["1"]
    assert tensor == biased_tensor > 0, forward  # the loop found is the one with the products
    assert biased <= 1.5 * plain, forward
    assert biased_mufu <= plain_mufu + 16, forward  # one log a key the thread holds


def test_the_attention_walks_its_full_tiles_without_masks(vit_b32_report):
    """Each attention pass walks its full key tiles (the dK/dV pass: query tiles) in a loop of their own, whose
    loads and logits take no mask, and the partial last tile in a second loop of at most one trip. One masked
    loop selected ``-inf`` for every key a thread holds (32 ``FSEL`` a 64-key tile) and predicated every load
    of K, V and the sizes: in the biased forward 466 instructions a tile against 388 now (sm_90, triton 3.8;
    556 against 393 under triton 3.6). The loop over full tiles has no select left in any pass."""
    done = vit_b32_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loops = [row for kernel in ("_attention_fwd_kernel", "_attention_bwd_kernel")
             for row in _loop_rows(done.stdout, kernel) if "HEAD_DIM=64 " in row[0]]
    assert len({row[0].split("HAS_BIAS=")[1][0] for row in loops}) == 2, loops  # with and without the sizes
    assert all(tensor > 0 for _, _, _, tensor, _ in loops), loops  # the loops found are those of the products
    assert all(selects == 0 for *_, selects in loops), loops


def test_a_merge_without_a_join_divides_nothing_per_source(vit_b32_report):
    """The merge forward's loop over sources maps each source to its clip and token. Without a join (GROUP 1,
    specialised into the code) that is the identity: no integer division (about 20 instructions, a
    special-function reciprocal among them) in the loop, which was 441-546 instructions a source (16-bit,
    triton 3.8) and is about 225, shorter than a join's (about 320), which still divides."""
    done = vit_b32_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loops = _loop_rows(done.stdout, "_merge_fwd_kernel")
    plain = [(n, mufu) for variant, n, mufu, _, _ in loops if "GROUP=1 " in variant]
    joins = [n for variant, n, _, _, _ in loops if "GROUP=1 " not in variant]
    assert plain and joins, loops
    assert all(mufu == 0 for _, mufu in plain), loops
    assert max(n for n, _ in plain) < min(joins), loops


def test_the_merge_gathers_a_source_in_at_most_two_waits(vit_b32_report):
    """The merge forward's gather as a warp issues it: one token a program gathers its sources as scalars, so a
    source's index is loaded once and the gather waits on at most two loads in turn a source (its index, then
    its size and rows; before, 4 after attention and 3 in a join, on each layout's copy of the index); the
    library's tiles where B tokens gather many sources take 4 a step, each step's indices loaded during the step
    before: at most 3 waits a step (0.75 a source; 4-5 with the indices loaded in the step, and 3 a source for
    the 4 x 8 tiles in a join, whose chunks gained nothing there)."""
    done = vit_b32_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _loop_rows(done.stdout, "_merge_fwd_kernel", waits=True)
    chunked = [(waits, sources) for variant, waits, sources in rows if "SRC_CHUNK=4" in variant]
    single = [(waits, sources) for variant, waits, sources in rows if "SRC_CHUNK" not in variant]
    assert chunked and single, rows
    assert all(sources == 4 and 1 <= waits <= 3 for waits, sources in chunked), rows
    assert all(sources == 1 and 1 <= waits <= 2 for waits, sources in single), rows
    assert any("GROUP=2" in variant for variant, *_ in rows if "SRC_CHUNK=4" in variant), rows  # a join's


def test_the_match_tail_waits_on_memory_five_times_at_most(vit_b32_report):
    """The clip's last match program, after its own B range, as a warp issues it: the clip's counter (an atomic),
    the combine's loads of the ranges' results, the plan's loads of the combined row (scores with their best B
    tokens: a sorted plan carries them in its keys; a counted one loads them with the scores, not after the
    ranks), its counting's loads of the row, and the grouping's of the plan (destinations with their A tokens,
    carried in its sort's keys). Six latencies in turn before the loads that waited on a sort or on the ranks
    were issued with the others (ViT-B/32's plans count, every row below ``PLAN_SORT_MIN``; sorted ones wait 4)."""
    done = vit_b32_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| _best_match_fwd_kernel ")]
    tails = [(row[2], int(row[8].split("tail ")[1])) for row in rows if len(row) == 9 and "PLAN=1" in row[2]]
    assert tails and all(1 <= waits <= 5 for _, waits in tails), tails


def test_chain_waits_count_straight_code_once():
    """``codegen.chain_waits``: each instruction once, an atomic's result waited on as a load's."""
    from benchmarks.codegen import chain_waits

    def code(*body):
        return [f"        /*{16 * k:04x}*/                   {line} ;" for k, line in enumerate(body)]
    # The counter's atomic, a branch on it, then two loads issued together and a store of their sum: two waits.
    assert chain_waits(code("ATOMG.E.ADD.STRONG.GPU PT, R4, desc[UR4][R2.64], R5", "ISETP.NE.AND P0, PT, R4, R6, PT",
                            "LDG.E R8, desc[UR4][R10.64]", "LDG.E R9, desc[UR4][R12.64]", "FADD R14, R8, R9",
                            "STG.E desc[UR4][R16.64], R14")) == 2
    # A load whose address is another load's result: one more.
    assert chain_waits(code("LDG.E R8, desc[UR4][R10.64]", "LEA R12, R8, R20, 0x2", "LDG.E R9, desc[UR4][R12.64]",
                            "STG.E desc[UR4][R16.64], R9")) == 2
    assert chain_waits(code("FADD R14, R8, R9", "STG.E desc[UR4][R16.64], R14")) == 0


def test_load_waits_follow_the_order_a_warp_issues_in():
    """``codegen.load_waits`` on hand-written loops: loads issued before the first wait on one are in flight
    together; a load waited on before the next is issued costs a latency of its own, and so does one whose
    register another instruction still has to read first (a register reused)."""
    from benchmarks.codegen import load_waits, sass_operands

    def loop(*body):
        return [f"        /*{16 * k:04x}*/                   {line} ;" for k, line in enumerate(body)]
    assert sass_operands(loop("@!P0 LDG.E.128 R12, desc[UR20][R40.64+0x400]")[0]) == (
        "LDG.E.128", ["R12", "R13", "R14", "R15"], ["P0", "UR20", "R40", "R41"])
    assert sass_operands(loop("LEA R18, P0, R19, R2, 0x2")[0]) == ("LEA", ["R18", "P0"], ["R19", "R2"])
    assert sass_operands(loop("STG.E.64 desc[UR4][R2.64], R8")[0])[1:] == ([], ["UR4", "R2", "R3", "R8", "R9"])
    # An index, then the row it points at: two waits a trip.
    chain = loop("LDG.E R4, desc[UR4][R2.64]", "LEA R6, R4, R10, 0x1", "LDG.E.128 R8, desc[UR4][R6.64]",
                 "HADD2.F32 R20, -RZ, R8.H0_H0", "FADD R30, R20, R30", "BRA `(.L_x_1)")
    assert load_waits(chain) == 2
    # Two sources, each index and row loaded before any sum waits: still two waits a trip, for both.
    together = loop("LDG.E R4, desc[UR4][R2.64]", "LDG.E R5, desc[UR4][R2.64+0x8]", "LEA R6, R4, R10, 0x1",
                    "LEA R16, R5, R10, 0x1", "LDG.E.128 R8, desc[UR4][R6.64]", "LDG.E.128 R24, desc[UR4][R16.64]",
                    "HADD2.F32 R20, -RZ, R8.H0_H0", "HADD2.F32 R21, -RZ, R24.H0_H0", "FADD R30, R20, R30",
                    "FADD R30, R21, R30", "BRA `(.L_x_1)")
    assert load_waits(together) == 2
    # The second index loaded into the register the first one's use still reads: it waits for that use.
    reused = loop("LDG.E R4, desc[UR4][R2.64]", "LEA R6, R4, R10, 0x1", "LDG.E R4, desc[UR4][R2.64+0x8]",
                  "LEA R16, R4, R10, 0x1", "LDG.E.128 R8, desc[UR4][R6.64]", "LDG.E.128 R24, desc[UR4][R16.64]",
                  "HADD2.F32 R20, -RZ, R8.H0_H0", "HADD2.F32 R21, -RZ, R24.H0_H0", "FADD R30, R20, R30",
                  "FADD R30, R21, R30", "BRA `(.L_x_1)")
    assert load_waits(reused) == 3
    # A loop that loads nothing waits on nothing.
    assert load_waits(loop("FADD R30, R20, R30", "BRA `(.L_x_1)")) == 0


def test_check_fails_on_a_spill(monkeypatch, capsys):
    """``--check`` is not a rubber stamp: a spill reported by ptxas fails it."""
    from benchmarks import codegen

    monkeypatch.setattr(codegen, "collect", lambda *a: ({}, []))
    assert codegen.report(["ViT-B-32"], [1], ["bf16"]) == []

    kernel = SimpleNamespace(fn=SimpleNamespace(__name__="_merge_fwd_kernel"), arg_names=["D"])
    launch = codegen.Launch(kernel, (6, 1, 1), (768,), {})
    variant = {"launch": launch, "dtype": "bf16", "programs": {1: [6]}, "stages": {"B-32 L0 imgme"}}
    step = {"step": codegen.schedule_steps("ViT-B-32", 1)[0], "dtype": "bf16", "fwd_launches": 3,
            "bwd_launches": 1, "allocations": 5}
    monkeypatch.setattr(codegen, "collect", lambda *a: ({("bf16", "k"): variant}, [step]))
    monkeypatch.setattr(codegen, "compile_launch", lambda launch, arch: type(
        "Compiled", (), {"asm": {"ptx": ""}, "metadata": type("M", (), {"shared": 0})}))
    monkeypatch.setattr(codegen, "ptx_stats", lambda ptx, arch: {"regs": 255, "spill": 8, "widest": 16,
                                                                 "scalar16": 3})
    monkeypatch.setattr(codegen, "host_us_per_step", lambda *a: 1.0)
    failures = codegen.report(["ViT-B-32"], [1], ["bf16"], archs=(90,))
    assert any("spills" in f for f in failures)
    assert any("scalar 16-bit" in f for f in failures)
    assert any("3 forward launches" in f for f in failures)
    assert any("5 allocations per forward merge step" in f for f in failures)


def test_access_widths_are_read_from_ptx():
    from benchmarks.codegen import ACCESS

    ptx = ("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n@%p1 st.global.b16 [%rd2], %rs1;\n"
           "ld.global.b64 %rd3, [%rd4];")
    widths = [(int(bits) * int(vec or 1), bool(vec)) for _, vec, _, bits in ACCESS.findall(ptx)]
    assert widths == [(128, True), (16, False), (64, False)]


def test_access_widths_read_plain_and_asynchronous_copies():
    """Software-pipelined loads are ``cp.async`` copies into shared memory: their size counts as an access."""
    from benchmarks.codegen import access_widths

    plain = "ld.global.v2.b32 {%r1, %r2}, [%rd1];\n\tst.global.b16 [%rd2], %rs1;\n"
    assert access_widths(plain) == (64, 1)
    copies = "cp.async.cg.shared.global [ %r81 + 0 ], [ %rd38 + 0 ], 0x10, %r82;\n" \
             "cp.async.ca.shared.global [ %r9 + 0 ], [ %rd4 + 0 ], 2, %r5;\n"
    assert access_widths(plain + copies) == (128, 2)
    assert access_widths("") == (0, 0)
