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
    rows = [row for row in rows if len(row) == 12]  # (not the loops' table, of 8 columns)
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


def _loop_rows(report: str, kernel: str):
    """``(variant, loop instructions, MUFU, tensor-core, selects)`` of ``kernel``'s rows in the ``--loops`` table."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines()
            if line.startswith(f"| {kernel} ")]
    return [(row[2], int(row[4]), int(row[5]), int(row[6]), int(row[7])) for row in rows if len(row) == 8]


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
