"""LoRA on the fused q/k/v projection: start point, both towers, merge, save/load, trainable counts."""
import copy
import dataclasses

import open_clip
import pytest
import torch

from tempme_fast import TempMeConfig, apply_tempme
from tempme_fast.errors import ConfigError
from tempme_fast.lora import (add_lora, count_parameters, has_lora, load_lora, lora_config, lora_layers,
                              lora_state_dict, mark_trainable, merge_lora, remove_lora, save_lora)
from tiny import TINY_CONFIG, tiny_clip, video


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (batch, 16), generator=g)


def _randomise(model, seed=7, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in lora_layers(model).values():
            lora.lora_b.copy_(std * torch.randn(lora.lora_b.shape, generator=g))
        for p in getattr(model.visual, "tempme_frame_pos", {}).values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _embed(model, v, t):
    with torch.no_grad():
        return model.encode_video(v), model.encode_text(t)


def _lora_model(rank=4, scale=1.0, seed=0):
    model = apply_tempme(tiny_clip(seed=seed), TINY_CONFIG, backend="torch")
    add_lora(model, rank=rank, scale=scale)
    return model


def test_lora_starts_at_the_pretrained_model():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    v, t = video(2, 4), _tokens()
    before = _embed(model, v, t)
    added = add_lora(model, rank=4)
    assert len(added) == 4 + 1  # 4 vision blocks, 1 text block
    for lora in added.values():
        assert lora.lora_b.abs().sum() == 0 and lora.lora_a.abs().sum() > 0
        assert lora.lora_a.shape[0] == 4 and lora.lora_b.shape[1] == 4
    after = _embed(model, v, t)
    # Equal values; only open_clip's text attention may take another kernel for a parametrized weight.
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lora_acts_on_both_towers_as_a_weight_delta():
    """The LoRA model equals a plain model whose in_proj_weight is W + scale * B @ A, computed here."""
    model = _lora_model(rank=3, scale=0.5)
    _randomise(model)
    plain = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    layers = lora_layers(model)
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name in layers:
                module.in_proj_weight.add_(0.5 * layers[name].lora_b @ layers[name].lora_a)
        for k, p in plain.visual.tempme_frame_pos.items():
            p.copy_(model.visual.tempme_frame_pos[k])
    v, t = video(2, 4), _tokens()
    got, want = _embed(model, v, t), _embed(plain, v, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and LoRA really changed both towers
    base = _embed(apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch"), v, t)
    assert (got[0] - base[0]).abs().max() > 1e-3 and (got[1] - base[1]).abs().max() > 1e-3


def test_merge_gives_the_same_embeddings_and_original_keys():
    model = _lora_model()
    _randomise(model)
    plain_keys = list(apply_tempme(tiny_clip(), TINY_CONFIG).state_dict())
    v, t = video(2, 4), _tokens()
    before = _embed(model, v, t)
    image_before = model.encode_image(v[0]).detach()
    merge_lora(model)
    assert not has_lora(model) and lora_config(model) is None
    assert list(model.state_dict()) == plain_keys
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert type(model.visual.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention
    after = _embed(model, v, t)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_image(v[0]).detach(), image_before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remove", [merge_lora, remove_lora], ids=["merge", "remove"])
def test_merging_a_copy_leaves_the_original_lora_as_it_was(remove):
    """A deepcopy shares torch's parametrized class with the original, and removing the copy's LoRA deleted
    the weight from that class: the original's attention failed on every forward."""
    model = _lora_model()
    _randomise(model)
    v, t = video(2, 4), _tokens()
    before = _embed(model, v, t)
    copied = copy.deepcopy(model)
    remove(copied)
    assert not has_lora(copied) and lora_config(model)["rank"] == 4
    for a, b in zip(_embed(model, v, t), before):
        assert torch.equal(a, b)
    merge_lora(model)
    for a, b in zip(_embed(model, v, t), before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_remove_restores_the_base_weights():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    state = copy.deepcopy(model.state_dict())
    add_lora(model)
    _randomise(model)
    remove_lora(model)
    restored = model.state_dict()
    assert list(restored) == list(state)
    for k in state:
        if "tempme_frame_pos" not in k:
            torch.testing.assert_close(restored[k], state[k], rtol=0, atol=0)


def test_trainable_counts_and_freezing():
    model = _lora_model(rank=4)
    n = mark_trainable(model, "lora")
    # vision: 4 x (4*64 + 192*4); text: 1 x (4*32 + 96*4); frame_pos: (4 + 2) clips x 64
    assert n == 4 * 1024 + 512 + 6 * 64 == 4992
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.endswith(("lora_a", "lora_b")) or "tempme_frame_pos" in name for name in trainable)
    assert "logit_scale" not in trainable and len(trainable) == 2 * 5 + 2
    trainable_total, total = count_parameters(model)
    assert mark_trainable(model, "full") == total and trainable_total == n
    state = lora_state_dict(model)
    assert sum(v.numel() for v in state.values()) == 4992


def test_lora_mode_gradients_reach_only_lora_and_frame_pos():
    model = _lora_model()
    _randomise(model)
    mark_trainable(model, "lora")
    model.train()
    (model.encode_video(video(2, 4)).square().sum() + model.encode_text(_tokens()).square().sum()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n


def test_vit_b32_rank_8_trainable_count():
    # Meta tensors: the parameter count without allocating 150M weights.
    model = open_clip.create_model("ViT-B-32-quickgelu", device="meta")
    apply_tempme(model, TempMeConfig())
    add_lora(model, rank=8)
    # 12 x (8*768 + 2304*8) vision + 12 x (8*512 + 1536*8) text + (12 + 6 + 3) x 768 frame_pos
    assert mark_trainable(model, "lora") == 294_912 + 196_608 + 16_128 == 507_648


def test_save_and_load_lora_file(tmp_path):
    model = _lora_model(rank=2, scale=2.0)
    _randomise(model)
    path = tmp_path / "adapter.pt"
    save_lora(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]
    fresh = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    load_lora(fresh, path)
    assert lora_config(fresh) == {"rank": 2, "scale": 2.0, "towers": ["visual", "text"]}
    v, t = video(2, 4), _tokens()
    for a, b in zip(_embed(fresh, v, t), _embed(model, v, t)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _lora_model(rank=3)
    with pytest.raises(ValueError, match="rank=3 scale=1.0 but the file holds rank=2 scale=2.0"):
        load_lora(other, path)
    # Another schedule (other joining layers): counted, with two keys and what to check, not every key.
    elsewhere = apply_tempme(tiny_clip(), dataclasses.replace(TINY_CONFIG, clip_layers=(1, 3)), backend="torch")
    with pytest.raises(ConfigError) as info:
        load_lora(elsewhere, path)
    assert str(info.value) == ("LoRA state does not fit the model: 1 missing, e.g. ['visual.tempme_frame_pos.1']; "
                               "1 unexpected, e.g. ['visual.tempme_frame_pos.2'] (the --model, LoRA towers and "
                               "TempMe schedule of the run that saved it?)")


def test_alpha_and_single_tower():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    add_lora(model, rank=4, alpha=8, towers=("visual",))
    assert lora_config(model) == {"rank": 4, "scale": 2.0, "towers": ["visual"]}
    assert all(name.startswith("visual.") for name in lora_layers(model))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank=0 must be a positive int"),
    (dict(rank=2.5), "rank=2.5 must be a positive int"),
    (dict(scale=1.0, alpha=4), "not both"),
    (dict(scale=float("nan")), "scale=nan must be a finite non-zero number"),
    (dict(alpha="16"), r"alpha='16' must be a finite non-zero number \(scale = alpha / rank\)"),
    (dict(alpha=float("inf")), "alpha=inf must be a finite"),
    (dict(alpha=0), "alpha=0 must be"),
    (dict(towers=("vision",)), r"towers=\('vision',\) must be a non-empty subset of \('visual', 'text'\)"),
])
def test_add_lora_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(tiny_clip(), **kwargs)


def test_state_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="call add_lora"):
        mark_trainable(model, "lora")
    with pytest.raises(ValueError, match="mode='half' is not one of"):
        mark_trainable(model, "half")
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(model)
    add_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
