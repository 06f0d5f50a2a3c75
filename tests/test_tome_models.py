"""apply_tome (open_clip) and patch_timm (timm) against a ToMe block written from the definition."""
import math

import pytest
import torch
import torch.nn.functional as F

import tome_twin as twin
from kit import pickled_afresh
from tempme_fast import apply_tome, remove_tome
from tempme_fast.tome import parse_r, patch_timm, unpatch_timm
from tiny import tiny_clip

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def exact_convolutions(monkeypatch):
    """The twins run in float32 on the CPU: keep TF32 out of the patch embedding on a GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _attend(q, k, v, size):
    """Proportional attention written out: ``softmax(q k^T / sqrt(d) + log size) v`` on ``[B, H, N, d]``."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + size.log().view(size.shape[0], 1, 1, -1)
    return logits.softmax(-1) @ v


def _twin_merge(x, size, metric, r, protected, kept_by_score):
    """ToMe's merge_wavg of one block, built from the token groups of the twin."""
    r = min(r, (x.shape[1] - protected) // 2)
    if r <= 0:
        return x, size
    groups = [twin.bipartite_groups(metric[b], r, protected, kept_by_score) for b in range(x.shape[0])]
    y, s = twin.wavg_groups(x, size, groups)
    return y.to(x.dtype), s.to(size.dtype)


def _twin_open_clip(visual, images, r_list, prop_attn=True):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for block, r in zip(visual.transformer.resblocks, r_list):
        attn = block.attn
        b, n, d = x.shape
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(
            b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        out = _attend(q, k, v, size if prop_attn else torch.ones_like(size)).transpose(1, 2).reshape(b, n, d)
        x = x + block.ls_1(attn.out_proj(out))
        x, size = _twin_merge(x, size, k.mean(1), r, 1, False)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return visual.ln_post(x[:, 0]) @ visual.proj


def _images(batch=2, image_size=32, seed=3):
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [2, [3, 0, 5, 1], (2, -1.0), 100], ids=["int", "list", "decreasing", "clamped"])
def test_apply_tome_open_clip_matches_twin(backend, r, device, one_thread):
    model = tiny_clip()
    images = _images()
    with torch.no_grad():
        want = _twin_open_clip(model.visual, images, parse_r(4, r))
        apply_tome(model.to(device), r, backend=backend)
        got = model.encode_image(images.to(device)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_apply_tome_without_prop_attn_and_with_sources(one_thread):
    model = tiny_clip()
    images = _images()
    with torch.no_grad():
        want = _twin_open_clip(model.visual, images, [4] * 4, prop_attn=False)
        apply_tome(model, 4, prop_attn=False, trace_source=True)
        got = model.encode_image(images)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    source = model.visual.tome_source
    assert tuple(source.shape) == (2, 17 - 4 - 4 - 4 - 2, 17)  # the last r clamps to (5 - 1) // 2
    assert torch.equal(source.sum(1), torch.ones(2, 17)) and source[:, 0, 0].eq(1).all()


def test_apply_tome_is_reversible_and_r_zero_is_open_clip(one_thread):
    model = tiny_clip()
    images = _images()
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model.encode_image(images)
        apply_tome(model, 0)
        torch.testing.assert_close(model.encode_image(images), plain, atol=1e-5, rtol=1e-5)
        apply_tome(model, 3)
        merged = model.encode_image(images)
        assert model.visual.tome.r == (3, 3, 3, 3) and list(model.state_dict()) == keys
        remove_tome(model)
        assert torch.equal(model.encode_image(images), plain)
    assert not (merged - plain).abs().max() < 1e-6  # merging does change the features
    assert type(model.visual).__name__ == "VisionTransformer" and not hasattr(model.visual, "tome")
    with pytest.raises(ValueError, match="not patched"):
        remove_tome(model)


def test_whole_tome_patched_models_pickle(monkeypatch, one_thread):
    model, images = apply_tome(tiny_clip(), 3), _images()
    loaded = pickled_afresh(model, monkeypatch)
    assert type(loaded.visual).__name__ == "ToMeVisionTransformer" and loaded.visual.tome == model.visual.tome
    vit = _tiny_timm()
    patch_timm(vit, r=2)
    loaded_vit = pickled_afresh(vit, monkeypatch)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded_vit(images), vit(images)) and loaded_vit.r == 2
    assert type(remove_tome(loaded).visual).__name__ == "VisionTransformer"
    assert type(unpatch_timm(loaded_vit)) is type(_tiny_timm())


@pytest.mark.parametrize("r,match", [(-1, "r=-1"), ([1] * 5, "at most 4"), ((2, 3.0), "inflection"),
                                     ((1, 2, 3), "tuple"), ("8", "r='8'")])
def test_apply_tome_bad_r(r, match):
    with pytest.raises(ValueError, match=match):
        apply_tome(tiny_clip(), r)


def test_parse_r_follows_tomes_schedules():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(4, [1, 2]) == [1, 2, 0, 0]
    assert parse_r(3, (8, -1.0)) == [16, 8, 0]
    assert parse_r(3, (8, 0.5)) == [4, 8, 12]
    assert parse_r(1, 5) == [5]


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------

def _tiny_timm(**kwargs):
    vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=5)
    args.update(kwargs)
    model = vit.VisionTransformer(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _twin_timm(model, images, r_list, protected, has_cls):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for block, r in zip(model.blocks, r_list):
        attn = block.attn
        b, n, d = x.shape
        q, k, v = attn.qkv(block.norm1(x)).view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = _attend(q, k, v, size).transpose(1, 2).reshape(b, n, d)
        x = x + block.ls1(attn.proj(out))
        x, size = _twin_merge(x, size, k.mean(1), r, protected, kept_by_score=not has_cls)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cls", "avg-no-cls", "registers", "qk-norm"])
def test_patch_timm_matches_twin(backend, kind, device, one_thread):
    # qk-norm: the keys are normalised per head, so they are no longer a view of the projection.
    kwargs = {"cls": {}, "avg-no-cls": dict(class_token=False, global_pool="avg"),
              "registers": dict(reg_tokens=2), "qk-norm": dict(qk_norm=True)}[kind]
    model = _tiny_timm(**kwargs)
    images = _images()
    protected, has_cls = model.num_prefix_tokens, kind != "avg-no-cls"
    with torch.no_grad():
        plain = model(images)
        want = _twin_timm(model, images, [3, 3, 3], protected, has_cls)
        patch_timm(model.to(device), backend=backend)
        model.r = 3
        got = model(images.to(device)).cpu()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.tome_size.sum(1).cpu(), torch.full((2, 1), 16.0 + protected))
        unpatch_timm(model)
        torch.testing.assert_close(model(images.to(device)).cpu(), plain, atol=1e-5, rtol=1e-5)
        assert not hasattr(model, "r")


def test_patch_timm_distilled_and_sources(one_thread):
    deit = pytest.importorskip("timm.models.deit")
    torch.manual_seed(0)
    model = deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                            num_classes=5).eval()
    images = _images()
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        assert x.shape[1] == 18
        patch_timm(model, trace_source=True, r=[4, 4])
        model(images)
    source = model.tome_source
    assert tuple(source.shape) == (2, 10, 18)
    # The class and distillation tokens are never merged and stay first.
    assert torch.equal(source[:, :2, :2], torch.eye(2).expand(2, 2, 2)) and source[:, :2].sum() == 4
    assert torch.equal(source.sum(1), torch.ones(2, 18))


def test_patch_timm_refuses_what_it_cannot_patch():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        patch_timm(torch.nn.Linear(2, 2))
    model = _tiny_timm()
    with pytest.raises(ValueError, match="r=-2"):
        patch_timm(model, r=-2)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_timm(model)


def test_patch_timm_refuses_attention_of_another_layout_and_masks_in_one_line():
    """DiffAttention (two softmaxes a head) passed the check and failed at the first forward in a reshape; a mask
    tensor was compared with == and raised torch's "ambiguous" error instead of the refusal."""
    try:
        diff = _tiny_timm(attn_layer="diff")
    except (TypeError, KeyError, ValueError, AssertionError):
        diff = None  # (a timm without DiffAttention)
    if diff is not None:
        with pytest.raises(TypeError, match="block 0's attention is a DiffAttention whose qkv projection is not "
                                            "3 x heads x head_dim wide"):
            patch_timm(diff)
    model = patch_timm(_tiny_timm(), r=1)
    with pytest.raises(ValueError, match="a ToMe-patched timm model takes no attention mask"):
        model.forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.ones(1, 17, 17, dtype=torch.bool))


def test_hooks_a_tome_patch_cannot_run_are_warned_of():
    model = _tiny_timm()
    model.blocks[1].attn.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="a ToMe-patched timm model does not run the forward hooks of blocks.1.attn"):
        patch_timm(model)
    clip = tiny_clip()
    clip.visual.transformer.resblocks[0].attn.out_proj.register_forward_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="a ToMe-patched tower does not run the forward hooks of "
                                         "transformer.resblocks.0.attn.out_proj"):
        apply_tome(clip, 2)


def test_apply_tome_trains_with_gradient_checkpointing(one_thread):
    model = tiny_clip()
    images = _images()
    apply_tome(model, 3)
    model.encode_image(images).square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.visual.named_parameters()}
    model.zero_grad()
    model.visual.set_grad_checkpointing(True)
    model.encode_image(images).square().sum().backward()
    for name, p in model.visual.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=1e-4, msg=name)
    assert want["conv1.weight"].abs().max() > 0
