"""Bad input is refused at the public API with an error that names the argument and the valid range.

Covers the config, ``apply_tempme``, ``encode_video`` and the ops. Also: inputs that are valid but
unusual (non-contiguous, integer masks, float64 videos) give the same answer as the plain ones.
"""
import re

import pytest
import torch

from tempme_fast import TempMeConfig, apply_tempme, ops
from tempme_fast.ops import reference as ref
from tiny import TINY_CONFIG, tiny_clip, video


def _raises(exc, message, call):
    with pytest.raises(exc, match=re.escape(message)):
        call()


@pytest.fixture(scope="module")
def model():
    return apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")


# ---------------------------------------------------------------------------------------------
# TempMeConfig
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(frames=2.0), TypeError, "frames must be an int"),
    (dict(frames=True), TypeError, "frames must be an int"),
    (dict(frames=0), ValueError, "frames=0 must be at least 1"),
    (dict(imgme_r=-2), ValueError, "imgme_r=-2 must be >= 0"),
    (dict(cross_ratio=float("nan")), TypeError, "cross_ratio must be a finite float"),
    (dict(intra_ratio="0.1"), TypeError, "intra_ratio must be a finite float"),
    (dict(cross_ratio=1.5), ValueError, "cross_ratio=1.5 must be in [0, 1)"),
    (dict(clip_layers=8), TypeError, "clip_layers must be a sequence of ints"),
    (dict(clip_groups=(2, 2, 3.0)), TypeError, "clip_groups must hold ints"),
    (dict(clip_layers=(8, 9)), ValueError, "must have the same length"),
    (dict(clip_layers=(-1, 9, 10)), ValueError, "clip_layers=(-1, 9, 10) must be >= 0"),
    (dict(clip_layers=(9, 8, 10)), ValueError, "strictly increasing"),
    (dict(clip_groups=(2, 1, 6)), ValueError, "must all be >= 2"),
    (dict(frames=8), ValueError, "frames=8 is not divisible by the clip groups (2, 2, 3) whose product is 12"),
    (dict(frame_pos=1), TypeError, "frame_pos must be a bool"),
    (dict(prop_attn=None), TypeError, "prop_attn must be a bool"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_errors(kwargs, exc, message):
    _raises(exc, message, lambda: TempMeConfig(**kwargs))


# ---------------------------------------------------------------------------------------------
# apply_tempme
# ---------------------------------------------------------------------------------------------

def test_apply_errors():
    _raises(TypeError, "config must be a TempMeConfig, got dict", lambda: apply_tempme(tiny_clip(), {"frames": 4}))
    _raises(ValueError, "backend='cuda' is not one of", lambda: apply_tempme(tiny_clip(), TINY_CONFIG, backend="cuda"))
    _raises(ValueError, "attention='flash' is not one of", lambda: apply_tempme(tiny_clip(), TINY_CONFIG, attention="flash"))
    _raises(TypeError, "check_finite must be a bool", lambda: apply_tempme(tiny_clip(), TINY_CONFIG, check_finite=1))
    _raises(ValueError, "reaches layer 4, but the model has 4 layers (valid: 0..3)",
            lambda: apply_tempme(tiny_clip(), TINY_CONFIG.replace(clip_layers=(2, 4))))
    _raises(TypeError, "without .visual", lambda: apply_tempme(torch.nn.Linear(2, 2), TINY_CONFIG))
    with pytest.warns(UserWarning):  # torch's note that complex modules are experimental
        complex_model = tiny_clip().to(torch.complex64)
    _raises(TypeError, "model.visual has dtype torch.complex64; valid: float32", lambda: apply_tempme(complex_model, TINY_CONFIG))


def test_an_unpatched_model_is_named_not_an_attribute_error():
    from tempme_fast import encode_video, flops, trace_sources

    unpatched = tiny_clip()
    for call in (lambda: encode_video(unpatched, video(1, 4)), lambda: trace_sources(unpatched, video(1, 4)),
                 lambda: flops.model_flops(unpatched), lambda: flops.measure_flops(unpatched)):
        _raises(TypeError, "model is a CLIP that apply_tempme has not patched; call tempme_fast.apply_tempme(model) "
                           "first", call)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norms_with_hooks_or_a_forward_of_their_own_run_in_encode_video(backend):
    """A LayerNorm subclass was computed as a plain layer norm, and its hooks never ran."""
    class Doubled(torch.nn.LayerNorm):
        def forward(self, x):
            return 2.0 * super().forward(x)

    plain = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend)
    v = video(2, 4)
    with torch.no_grad():
        before = plain.encode_video(v)
    calls = []

    def halve(module, args, out):
        calls.append(module)
        return 0.5 * out

    blocks = plain.visual.transformer.resblocks
    handles = [blocks[1].ln_1.register_forward_hook(halve), blocks[3].ln_2.register_forward_hook(halve)]
    with torch.no_grad():
        hooked = plain.encode_video(v)
    assert calls == [blocks[1].ln_1, blocks[3].ln_2] and (hooked - before).abs().max() > 1e-3
    for handle in handles:
        handle.remove()
    custom = tiny_clip()
    for block in custom.visual.transformer.resblocks:
        norm = Doubled(block.ln_2.normalized_shape)
        norm.load_state_dict(block.ln_2.state_dict())
        block.ln_2 = norm
    apply_tempme(custom, TINY_CONFIG, backend=backend)
    with torch.no_grad():
        doubled = custom.encode_video(v)
    assert (doubled - before).abs().max() > 1e-3


def test_hooks_that_encode_video_cannot_run_are_warned_of():
    model = tiny_clip()
    model.visual.transformer.resblocks[2].attn.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"encode_video does not run the forward hooks of "
                                         r"visual.transformer.resblocks.2.attn: it computes these modules itself"):
        apply_tempme(model, TINY_CONFIG)


def test_imgme_r_that_removes_more_tokens_than_a_frame_has_is_clamped_with_a_warning():
    """The spec clamps every merge to half of the unprotected tokens; a config that hits the clamp warns."""
    import warnings

    from tempme_fast.model import ScheduleClampWarning

    # 17 tokens per frame, 2 image-merging layers: r=5 leaves 12 then 7 tokens, r=6 would need 6 of (11-1)//2=5.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_tempme(tiny_clip(), TINY_CONFIG.replace(imgme_r=5))
    with pytest.warns(ScheduleClampWarning, match=re.escape(
            "imgme_r=6 removes more tokens than the frames have: at layer 1 a frame has 11 tokens (1 class), so "
            "that merge removes only 5; with 2 image-merging layer(s) of 17 tokens per frame, imgme_r <= 5 is "
            "never clamped")):
        model = apply_tempme(tiny_clip(), TINY_CONFIG.replace(imgme_r=6))
    assert [p.r for p in model.tempme.schedule.layers[:2]] == [6, 5]
    with torch.no_grad():
        assert torch.isfinite(model.encode_video(video(1, 4))).all()
    # Without joins every layer merges per frame.
    with pytest.warns(ScheduleClampWarning, match="imgme_r <= 3 is never clamped"):
        apply_tempme(tiny_clip(), TempMeConfig(frames=2, imgme_r=4, clip_layers=(), clip_groups=()))


# ---------------------------------------------------------------------------------------------
# encode_video
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_args, exc, message", [
    (lambda: (video(2, 4)[0],), ValueError, "video must have shape [B, T, 3, H, W] (5 dims), got (4, 3, 32, 32)"),
    (lambda: (video(0, 4),), ValueError, "empty batch (B=0)"),
    (lambda: (video(2, 2),), ValueError, "T=2 frames but the TempMeConfig expects frames=4"),
    (lambda: (video(2, 4, image_size=40),), ValueError, "3x40x40 but the model takes 3x32x32"),
    (lambda: (video(2, 4)[:, :, :1],), ValueError, "1x32x32 but the model takes 3x32x32"),
    (lambda: (video(1, 4).to(torch.int16),), TypeError, "video has dtype torch.int16; give preprocessed float frames"),
    (lambda: (video(1, 4).numpy(),), TypeError, "video must be a torch.Tensor, got ndarray"),
    (lambda: (video(1, 4).to("meta"),), ValueError, "video is on meta but the model is on cpu"),
    (lambda: (video(2, 4), torch.ones(4, 2)), ValueError, "mask must be a tensor of shape [B, T] = [2, 4], got (4, 2)"),
    (lambda: (video(2, 4), [[1, 1, 1, 1]] * 2), ValueError, "mask must be a tensor of shape [B, T] = [2, 4], got list"),
    (lambda: (video(2, 4), torch.ones(2, 4, dtype=torch.complex64)), TypeError, "mask has dtype torch.complex64"),
    (lambda: (video(2, 4), torch.ones(2, 4, device="meta")), ValueError, "mask is on meta but video is on cpu"),
    (lambda: (video(2, 4), torch.full((2, 4), 0.5)), ValueError, "mask holds values other than 0 and 1"),
    (lambda: (video(2, 4), torch.tensor([[1, 2, 1, 1], [1, 1, 1, 1]])), ValueError, "mask holds values other than 0 and 1"),
    (lambda: (video(2, 4), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)), ValueError,
     "mask has a video with no valid frame"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_encode_video_errors(model, make_args, exc, message):
    _raises(exc, message, lambda: model.encode_video(*make_args()))


def test_non_finite_video_is_refused_only_on_request():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    v = video(2, 4)
    v[1, 2, 0, 5, 7] = float("nan")
    v[1, 3, 1, 0, 0] = float("inf")
    with torch.no_grad():
        out = model.encode_video(v)  # off by default: no host sync, NaN flows through
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()
    _raises(ValueError, "video holds 2 non-finite value(s) (NaN or Inf), the first nan at video[1, 2, 0, 5, 7]",
            lambda: model.encode_video(v, check_finite=True))
    strict = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch", check_finite=True)
    _raises(ValueError, "non-finite", lambda: strict.encode_video(v))
    with torch.no_grad():
        strict.encode_video(v, check_finite=False)
        strict.encode_video(video(1, 4))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _raises(ValueError, "backend='triton' got a tensor on cpu", lambda: model.encode_video(video(1, 4)))


def test_unusual_but_valid_inputs_give_the_plain_answer(model):
    v = video(3, 4, seed=5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        want = model.encode_video(v, mask)
        layouts = {
            "channels_last": v.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(3, 4, 3, 32, 32),
            "frame-major": v.transpose(0, 1).contiguous().transpose(0, 1),
            "strided-view": torch.zeros(3, 4, 3, 32, 64).copy_(torch.cat([v, v], dim=-1))[..., :32],
        }
        for name, got in layouts.items():
            assert not got.is_contiguous(), name
            torch.testing.assert_close(model.encode_video(got, mask), want, rtol=1e-5, atol=1e-6, msg=name)
        for name, m in {"int": mask.long(), "float": mask.float(), "uint8": mask.to(torch.uint8)}.items():
            assert torch.equal(model.encode_video(v, m), want), name
        torch.testing.assert_close(model.encode_video(v.double(), mask), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def _plan(b=2, n=10, r=2, c=1):
    return ref.match(torch.randn(b, n, 4, generator=torch.Generator().manual_seed(0)), r, c)


X, SIZE = torch.randn(2, 10, 4), torch.ones(2, 10, 1)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: ops.match([[0.0]], 1, 1), TypeError, "metric must be a torch.Tensor, got list"),
    (lambda: ops.match(torch.randn(10, 4), 1, 1), ValueError, "metric must have shape [B', N, C] (3 dims)"),
    (lambda: ops.match(torch.randn(2, 10, 4).long(), 1, 1), TypeError, "metric has dtype torch.int64; valid: float32"),
    (lambda: ops.match(torch.randn(0, 10, 4), 1, 1), ValueError, "metric is an empty batch"),
    (lambda: ops.match(torch.randn(2, 10, 0), 1, 1), ValueError, "metric has no channels"),
    (lambda: ops.match(torch.randn(2, 10, 4), 1, True), TypeError, "protected must be an int, got True"),
    (lambda: ops.match(torch.randn(2, 10, 4), 1, 9), ValueError, "protected=9 must be in [0, N - 2] = [0, 8]"),
    (lambda: ops.match(torch.randn(2, 10, 4), 1, -1), ValueError, "protected=-1 must be in [0, N - 2]"),
    (lambda: ops.match(torch.randn(2, 10, 4), 5, 1), ValueError, "r=5 must be in [0, (N - protected) // 2] = [0, 4]"),
    (lambda: ops.match(torch.randn(2, 10, 4), 2.0, 1), TypeError, "r must be an int, got 2.0"),
    (lambda: ops.match(torch.randn(2, 10, 4), 1, 1, backend="gpu"), ValueError, "backend='gpu' is not one of"),
    (lambda: ops.best_match(torch.randn(2, 1, 4), 0), ValueError, "protected=0 must be in [0, N - 2] = [0, -1]"),
    (lambda: ops.match(torch.randn(2, 10, 6), 1, 1, heads=4), ValueError, "heads=4 must divide the metric's 6 channels"),
    (lambda: ops.best_match(torch.randn(2, 10, 6), 1, heads=0), ValueError, "heads=0 must be >= 1"),
    (lambda: ops.match(torch.randn(2, 10, 6), 1, 1, heads=2.0), TypeError, "heads must be an int, got 2.0"),
    (lambda: ops.match(torch.randn(2, 10, 6), 1, 1, heads=True), TypeError, "heads must be an int, got True"),
    (lambda: ops.merge(X, SIZE, (1, 2, 3)), TypeError, "plan must be a MergePlan"),
    (lambda: ops.merge(X[:, :9], SIZE[:, :9], _plan()), ValueError, "plan was made for [B'=2, N=10]"),
    (lambda: ops.merge(X[:1], SIZE[:1], _plan()), ValueError, "plan was made for [B'=2, N=10]"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(kept=_plan().kept[:, 1:])), ValueError,
     "plan.kept must be an int64 tensor of shape [2, 2]"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(dst=_plan().dst.int())), ValueError,
     "plan.dst must be an int64 tensor of shape [2, 2]"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(protected=1.0)), TypeError, "protected must be an int"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(src=_plan().merged)), ValueError,
     "plan.src and plan.offsets must both be given"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(src=_plan().merged, offsets=torch.zeros(2, 4, dtype=torch.int64))),
     ValueError, "plan.offsets must be an int64 tensor of shape [2, 6] (B', Nb + 1)"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(src=_plan().merged.int(), offsets=torch.zeros(2, 6, dtype=torch.int64))),
     ValueError, "plan.src must be an int64 tensor of shape [2, 2] (B', r)"),
    (lambda: ops.merge(X, SIZE, _plan()._replace(src=_plan().merged.to("meta"),
                                                 offsets=torch.zeros(2, 6, dtype=torch.int64, device="meta"))),
     ValueError, "must be on one device"),
    (lambda: ops.merge(X, [1.0] * 10, _plan()), TypeError, "size must be a torch.Tensor, got list"),
    (lambda: ops.merge(X, torch.ones(2, 10, 2), _plan()), ValueError, "size must have shape [B', N] or [B', N, 1]"),
    (lambda: ops.merge(X, torch.ones(2, 10, dtype=torch.int32), _plan()), TypeError, "size has dtype torch.int32"),
    (lambda: ops.merge(X, SIZE.to("meta"), _plan()), ValueError, "x (cpu), size (meta) and plan (cpu) must be on one device"),
    (lambda: ops.merge(X, SIZE, ref.MergePlan(*(t.to("meta") for t in _plan()[:3]), 10, 1)), ValueError,
     "must be on one device"),
    (lambda: ops.join_clips("x", 2, 1), TypeError, "x must be a torch.Tensor, got str"),
    (lambda: ops.join_clips(torch.ones(4), 2, 1), ValueError, "at least 2 dims"),
    (lambda: ops.join_clips(torch.ones(0, 5, 3), 2, 1), ValueError, "x is an empty batch"),
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 4, 1), ValueError, "cannot join groups of 4 clips: the batch holds 6 clips"),
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 0, 1), ValueError, "group=0 must be >= 1"),
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 2, 6), ValueError, "protected=6 must be in [0, 5] for x with N=5 tokens"),
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 2, 1, torch.zeros(1, 3, 1, 3)), ValueError,
     "frame_pos must have shape [1, F, 1, D] for x [B * F, N, D] = [6, 5, 3], with F clips per video a multiple of group=2"),
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 2, 1, torch.zeros(1, 2, 1, 4)), ValueError, "frame_pos must have shape"),
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 2, 1, torch.zeros(1, 2, 1, 3, device="meta")), ValueError,
     "frame_pos is on meta but x is on cpu"),
    # A frame_pos of another dtype than x: the torch backend promoted the result, the Triton one did not.
    (lambda: ops.join_clips(torch.ones(6, 5, 3), 2, 1, torch.zeros(1, 2, 1, 3, dtype=torch.float16)), ValueError,
     "frame_pos is torch.float16 but x is torch.float32: pass frame_pos.to(x.dtype)"),
    (lambda: ops.join_merge(torch.ones(6, 5, 3), torch.ones(6, 5), 2, 1, 1, torch.zeros(1, 2, 1, 3, dtype=torch.float64)),
     ValueError, "frame_pos is torch.float64 but x is torch.float32"),
    (lambda: ops.attention(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3, 4)), ValueError,
     "q must have shape [B', H, N, d] (4 dims)"),
    # A v of another head width: "fold" and "triton" cut it to q's width (or read past its rows) without a word.
    (lambda: ops.attention(torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 8)), ValueError,
     "and all three sharing d"),
    (lambda: ops.attention(torch.ones(2, 2, 3, 4), torch.ones(2, 2, 5, 4), torch.ones(2, 2, 3, 4)), ValueError,
     "must agree"),
    (lambda: ops.attention(*[torch.ones(2, 2, 3, 4)] * 3, torch.ones(2, 4)), ValueError,
     "size must have shape [B', N] or [B', N, 1] = [2, 3(, 1)]"),
    (lambda: ops.attention(*[torch.ones(2, 2, 3, 4)] * 3, torch.ones(2, 3, device="meta")), ValueError,
     "q, k, v and size must be on one device"),
    (lambda: ops.attention(*[torch.ones(2, 2, 3, 4)] * 3, None, impl="flash"), ValueError, "impl='flash'"),
])
def test_op_errors(call, exc, message):
    _raises(exc, message, call)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_value_checks_on_request(backend):
    metric = torch.randn(2, 10, 4)
    metric[1, 3, 2] = float("-inf")
    ops.best_match(metric, 1, backend="torch")  # off by default
    _raises(ValueError, "metric holds 1 non-finite value(s) (NaN or Inf), the first -inf at metric[1, 3, 2]",
            lambda: ops.match(metric, 2, 1, backend=backend, check_finite=True))
    _raises(ValueError, "metric holds 1 non-finite", lambda: ops.best_match(metric, 1, backend=backend, check_finite=True))
    plan = _plan()
    x = X.clone()
    x[0, 0, 0] = float("nan")
    _raises(ValueError, "x holds 1 non-finite value(s) (NaN or Inf), the first nan at x[0, 0, 0]",
            lambda: ops.merge(x, SIZE, plan, backend=backend, check_finite=True))
    size = SIZE.clone()
    size[1, 4, 0] = 0.0
    _raises(ValueError, "size holds 1 value(s) <= 0", lambda: ops.merge(X, size, plan, backend=backend, check_finite=True))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["transposed", "channel-stride-3", "expanded-batch"])
def test_non_contiguous_ops_give_the_contiguous_answer(backend, layout):
    g = torch.Generator().manual_seed(3)
    metric, x = torch.randn(3, 21, 8, generator=g), torch.randn(3, 21, 12, generator=g)
    size = torch.randint(1, 4, (3, 21, 1), generator=g).float()
    if layout == "transposed":
        views = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (metric, x, size)]
    elif layout == "channel-stride-3":
        views = [torch.zeros(*t.shape[:2], 3 * t.shape[2]).index_copy_(2, torch.arange(0, 3 * t.shape[2], 3), t)[..., ::3]
                 for t in (metric, x, size)]
    else:  # one clip repeated through a zero batch stride
        metric, x, size = metric[:1].repeat(3, 1, 1), x[:1].repeat(3, 1, 1), size[:1].repeat(3, 1, 1)
        views = [t[:1].expand(3, -1, -1) for t in (metric, x, size)]
    assert not any(v.is_contiguous() for v in views[:2])
    want_plan = ops.match(metric, 7, 1, backend=backend)
    want = ops.merge(x, size, want_plan, backend=backend)
    plan = ops.match(views[0], 7, 1, backend=backend)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name), getattr(want_plan, name)), name
    got = ops.merge(views[1], views[2], plan, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_what_carries_no_gradient_is_the_same_on_both_backends(backend):
    """The reference merged gradients into sizes and kept the scores' graph; the Triton ops dropped both: the same
    call gave two gradients. Sizes that require grad are refused, and scores carry none, on both."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scores, dst = ops.best_match(metric, 1, backend=backend)
    assert not scores.requires_grad and not dst.requires_grad
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.ones(2, 9, dtype=torch.float64, requires_grad=True)
    plan = ops.match(metric.detach(), 2, 1, backend=backend)
    _raises(ValueError, "size requires grad, but a merge carries no gradient to token sizes (counts of tokens): "
                        "pass size.detach()", lambda: ops.merge(x, size, plan, backend=backend))
    with torch.no_grad():
        ops.merge(x, size, plan, backend=backend)  # (nothing is recorded there)
    out, _ = ops.merge(x, size.detach(), plan, backend=backend)
    assert out.requires_grad


def test_second_derivatives_through_the_triton_ops_are_refused():
    """Their backward kernels build no graph: a gradient penalty lost its second-order terms without a word."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.ones(2, 9, dtype=torch.float64)
    plan = ops.match(metric, 2, 1, backend="triton")
    outputs = {"merge": lambda: ops.merge(x, size, plan, backend="triton")[0],
               "merge_norm": lambda: ops.merge_norm(x, size, plan, w, w, 1e-5, backend="triton")[2],
               "attention": lambda: ops.attention(*(x.float().unsqueeze(1),) * 3, size.float(), impl="triton")}
    for name, output in outputs.items():
        loss = (output() * w).sin().sum()
        _raises(RuntimeError, f"{name}: a second derivative through the Triton backend",
                lambda: torch.autograd.grad(loss, x, create_graph=True))
        torch.autograd.grad((output() * w).sin().sum(), x)  # (a first derivative alone: as before)
    torch.autograd.grad((ops.merge(x, size, plan, backend="torch")[0] * w).sin().sum(), x, create_graph=True)


def test_the_triton_backend_refuses_meta_tensors():
    _raises(ValueError, "backend='triton' got a meta tensor, which has no data to run a kernel on",
            lambda: ops.best_match(torch.randn(2, 9, 4, device="meta"), 1, backend="triton"))
    assert ops.best_match(torch.randn(2, 9, 4, device="meta"), 1, backend="auto")[0].shape == (2, 4)
