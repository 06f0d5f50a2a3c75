"""Checkpoints in the released TempMe code's layout load into a patched open_clip model exactly."""
import pytest
import torch

from tempme_fast import apply_tempme
from tempme_fast.lora import add_lora, has_lora, lora_config
from tempme_fast.official import load_official_checkpoint, official_key_map
from tiny import TINY_CONFIG, tiny_clip, video

RANK = 3
FRAME_POS = {2: 4, 3: 2}  # TINY_CONFIG joins at layers 2 (4 clips before) and 3 (2 clips before)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _released_state(prefix="module.clip."):
    """A state dict laid out as the released code saves it, and its parts, built without our mapping."""
    g = torch.Generator().manual_seed(4)
    base = tiny_clip(seed=0).state_dict()
    state = {prefix + k: v.clone() for k, v in base.items()}
    lora = {}
    for tower, layers, width in (("visual.", 4, 64), ("", 1, 32)):
        for i in range(layers):
            a = torch.randn(RANK, width, generator=g) / width ** 0.5
            b = 0.2 * torch.randn(3 * width, RANK, generator=g)
            name = f"{tower}transformer.resblocks.{i}.attn."
            state[prefix + name + "TVPt_LoRA_a"], state[prefix + name + "TVPt_LoRA_b"] = a, b
            lora[name + "in_proj_weight"] = (a, b)
    pos = {}
    for layer, clips in FRAME_POS.items():
        pos[layer] = 0.5 * torch.randn(clips, 64, generator=g)  # stored [F, D]; read as [1, F, 1, D]
        state[f"{prefix}visual.transformer.resblocks.{layer}.TVPt_Video_Positional_embedding"] = pos[layer]
    return state, lora, pos


def _expected_model(lora, pos):
    """What the released model computes: qkv = x W^T + b + (x A^T) B^T, i.e. weight W + B @ A."""
    model = tiny_clip(seed=0)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, (a, b) in lora.items():
            params[name].add_(b @ a)
    apply_tempme(model, TINY_CONFIG, backend="torch")
    with torch.no_grad():
        for layer, e in pos.items():
            model.visual.tempme_frame_pos[str(layer)].copy_(e.view(1, -1, 1, 64))
    return model


def _embed(model):
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(1, 1000, (3, 16), generator=g)
    with torch.no_grad():
        return model.encode_video(video(2, 4)), model.encode_text(tokens)


def _assert_same_embeddings(model, want):
    for a, b in zip(_embed(model), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["module.clip.", "clip."], ids=["ddp-prefix", "plain"])
def test_released_layout_gives_the_same_embeddings(prefix):
    state, lora, pos = _released_state(prefix)
    want = _embed(_expected_model(lora, pos))
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG, backend="torch")
    result = load_official_checkpoint(model, state)
    assert result.missing == [] and result.unexpected == [] and result.added_lora and result.lora_rank == RANK
    assert result.loaded == len(state)
    assert lora_config(model) == {"rank": RANK, "scale": 1.0, "towers": ["visual", "text"]}
    _assert_same_embeddings(model, want)


def test_loads_from_a_file_and_into_existing_lora(tmp_path):
    state, lora, pos = _released_state()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG, backend="torch")
    add_lora(model, rank=RANK)
    result = load_official_checkpoint(model, str(path))
    assert not result.added_lora and result.loaded == len(state)
    _assert_same_embeddings(model, _embed(_expected_model(lora, pos)))


def test_unknown_keys_are_reported():
    state, lora, pos = _released_state()
    extra = {"module.frame_position_embeddings.weight": torch.zeros(12, 24),        # a DRL/CLIP4Clip head
             "module.clip.visual.transformer.resblocks.0.attn.TVPt_down_weight": torch.zeros(3, 64)}  # adapter
    state.update(extra)
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG, backend="torch")
    with pytest.raises(ValueError, match="unexpected") as err:
        load_official_checkpoint(model, state)
    reported = sorted(k[len("module."):] for k in extra)  # named without DDP's prefix
    assert all(k in str(err.value) for k in reported) and "heads of the released training code" in str(err.value)
    assert not has_lora(model)  # an error leaves the model as it was
    result = load_official_checkpoint(model, state, strict=False)
    assert sorted(result.unexpected) == reported and result.missing == []
    _assert_same_embeddings(model, _embed(_expected_model(lora, pos)))


def test_missing_keys_are_reported():
    state, _, _ = _released_state()
    del state["module.clip.ln_final.weight"]
    del state["module.clip.visual.transformer.resblocks.2.TVPt_Video_Positional_embedding"]
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG)
    with pytest.raises(ValueError, match=r"missing \['clip.visual.transformer.resblocks.2.TVPt_Video_Positional_"
                                         r"embedding', 'clip.ln_final.weight'\]"):
        load_official_checkpoint(model, state)
    result = load_official_checkpoint(model, state, strict=False)
    assert sorted(result.missing) == ["clip.ln_final.weight",
                                      "clip.visual.transformer.resblocks.2.TVPt_Video_Positional_embedding"]


def test_an_open_clip_state_dict_is_named_for_what_it_is_in_one_short_line():
    """tempme_fast's own model.pt given as an official checkpoint listed every key of both sides (7 KB for
    the tiny model, tens of KB for a ViT-B)."""
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG)
    with pytest.raises(ValueError, match=r"holds no 'clip.' key, so it is not a checkpoint of the released TempMe "
                                         r"code: an open_clip state dict .* loads with --checkpoint") as err:
        load_official_checkpoint(model, tiny_clip(seed=0).state_dict())
    assert len(str(err.value)) < 300 and not has_lora(model)
    state, _, _ = _released_state()
    state.update({f"module.clip.extra{i}": torch.zeros(1) for i in range(40)})
    with pytest.raises(ValueError, match=r"unexpected 40 \(clip.extra0, clip.extra1, clip.extra2, clip.extra3, "
                                         r"clip.extra4, ...\)") as err:
        load_official_checkpoint(model, state)
    assert len(str(err.value)) < 500


def test_a_model_without_quick_gelu_is_refused():
    """The released models are OpenAI CLIP (QuickGELU): loaded into a GELU model they computed something else."""
    state, _, _ = _released_state()
    model = apply_tempme(tiny_clip(seed=5, quick_gelu=False), TINY_CONFIG)
    with pytest.raises(ValueError, match="the model's visual tower runs GELU, but the released TempMe models are "
                                         "OpenAI CLIP, trained with QuickGELU: build it as the -quickgelu model"):
        load_official_checkpoint(model, state)
    assert not has_lora(model)


def test_a_released_checkpoint_given_as_a_tempme_checkpoint_is_named(tmp_path):
    from tempme_fast.errors import ConfigError
    from tempme_fast.loading import load_checkpoint

    state, _, _ = _released_state(prefix="clip.")
    path = str(tmp_path / "released.pth")
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"a checkpoint of the released TempMe code: tempme train "
                                          r"--official-checkpoint and tempme_fast.load_official_checkpoint read it"):
        load_checkpoint(apply_tempme(tiny_clip(seed=5), TINY_CONFIG), path)


def test_metadata_is_listed_as_ignored():
    state, _, _ = _released_state()
    state["module.clip.input_resolution"] = torch.tensor(32)
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG)
    assert load_official_checkpoint(model, state).ignored == ["clip.input_resolution"]


def test_frame_pos_of_another_schedule_is_reported():
    state, _, _ = _released_state()
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG.replace(clip_layers=(1, 3)))
    with pytest.raises(ValueError, match=r"joins at \[1, 3\]"):
        load_official_checkpoint(model, state)


@pytest.mark.parametrize("break_it, message", [
    (lambda s: s.update({"module.clip.visual.transformer.resblocks.3.TVPt_Video_Positional_embedding":
                         torch.zeros(3, 64)}), r"shape mismatch.*resblocks.3.TVPt_Video_Positional_embedding"),
    (lambda s: s.update({"module.clip.transformer.resblocks.0.attn.TVPt_LoRA_a": torch.zeros(2, 32)}),
     r"LoRA of several ranks \[2, 3\]"),
    (lambda s: s.update({"module.clip.token_embedding.weight": torch.zeros(10, 32)}), "shape mismatch"),
])
def test_bad_checkpoints_raise_and_leave_the_model(break_it, message):
    state, _, _ = _released_state()
    break_it(state)
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_official_checkpoint(model, state, strict=False)
    after = model.state_dict()
    assert not has_lora(model) and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_lora_of_another_rank_or_scale_is_refused():
    state, _, _ = _released_state()
    model = apply_tempme(tiny_clip(seed=5), TINY_CONFIG)
    add_lora(model, rank=RANK, scale=2.0)
    with pytest.raises(ValueError, match="rank=3 scale=2.0 but state dict holds rank=3 applied with scale 1"):
        load_official_checkpoint(model, state)


def test_key_map_uses_openai_names():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    add_lora(model, rank=2)
    mapping = official_key_map(model)
    assert mapping["clip.visual.transformer.resblocks.0.attn.in_proj_weight"] == \
        "visual.transformer.resblocks.0.attn.parametrizations.in_proj_weight.original"
    assert mapping["clip.transformer.resblocks.0.attn.TVPt_LoRA_b"] == \
        "transformer.resblocks.0.attn.parametrizations.in_proj_weight.0.lora_b"
    assert mapping["clip.visual.transformer.resblocks.3.TVPt_Video_Positional_embedding"] == "visual.tempme_frame_pos.3"
    assert {"clip.token_embedding.weight", "clip.positional_embedding", "clip.ln_final.weight", "clip.text_projection",
            "clip.logit_scale", "clip.visual.conv1.weight", "clip.visual.proj"} <= set(mapping)
