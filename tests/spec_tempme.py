"""A second, deliberately naive TempMe written from TEMPME_SPEC.md alone, to check the library against.

One video and one clip at a time, Python lists for token sets, explicit softmax, float64. It shares
no code with tempme_fast beyond open_clip's weights, so a misreading of the spec in one of the two
shows up as a mismatch.
"""
import math

import torch


def _merge_clip(x, size, metric, r, c):
    """One bipartite merge of a single clip: ``x [N, D]``, ``size [N]``, ``metric [N, C]``."""
    n = x.shape[0]
    if r <= 0:
        return x, size
    a = [p for p in range(c, n) if p % 2 == 0]
    b = [p for p in range(c, n) if p % 2 == 1]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = unit[a] @ unit[b].T
    best, dst = [], []
    for i in range(len(a)):
        row = sim[i].tolist()
        top = max(row)
        best.append(top)
        dst.append(row.index(top))
    ranking = sorted(range(len(a)), key=lambda i: (-best[i], i))
    merged = set(ranking[:r])
    rows, sizes = [x[p] for p in range(c)], [size[p] for p in range(c)]
    for i in range(len(a)):
        if i not in merged:
            rows.append(x[a[i]])
            sizes.append(size[a[i]])
    for j, p in enumerate(b):
        total, weight = size[p] * x[p], size[p]
        for i in merged:
            if dst[i] == j:
                total = total + size[a[i]] * x[a[i]]
                weight = weight + size[a[i]]
        rows.append(total / weight)
        sizes.append(weight)
    return torch.stack(rows), torch.stack(sizes)


def _attention(block, x, size, prop_attn):
    """Self-attention of one clip with explicit softmax; returns (output, keys averaged over heads)."""
    attn = block.attn
    n, d = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.reshape(n, h, d // h).transpose(0, 1) for t in (q, k, v))
    logits = q @ k.transpose(1, 2) / math.sqrt(d // h)
    if prop_attn:
        logits = logits + size.log()[None, None, :]
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, d)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias, k.mean(0)


def _mlp(block, x):
    return block.ls_2(block.mlp(block.ln_2(x)))


def encode_video_spec(model, video, config, mask=None):
    """The spec's video feature for ``video [B, T, 3, H, W]`` with ``model`` in float64."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    depth = len(blocks)
    joins = dict(zip(config.clip_layers, config.clip_groups))
    first_join = config.clip_layers[0] if config.clip_layers else depth
    frame_pos = getattr(visual, "tempme_frame_pos", {})
    out = []
    for vi in range(video.shape[0]):
        frames = video[vi].double()
        emb = visual.conv1(frames).flatten(2).transpose(1, 2)
        clips = []
        for f in range(frames.shape[0]):
            x = torch.cat([visual.class_embedding[None], emb[f]]) + visual.positional_embedding
            x = visual.ln_pre(x)
            clips.append({"x": x, "size": torch.ones(x.shape[0], dtype=x.dtype), "c": 1})
        for layer, block in enumerate(blocks):
            if layer in joins:
                g = joins[layer]
                joined = []
                for start in range(0, len(clips), g):
                    group = clips[start:start + g]
                    c = group[0]["c"]
                    n_before = group[0]["x"].shape[0]
                    xs = []
                    for k, clip in enumerate(group):
                        pos = frame_pos[str(layer)][0, start + k, 0] if str(layer) in frame_pos else 0
                        xs.append(clip["x"] + pos)
                    order = lambda ts: torch.cat([t[:c] for t in ts] + [t[c:] for t in ts])  # noqa: E731
                    x = order(xs)
                    metric = order([clip["x"] for clip in group])
                    size = order([clip["size"] for clip in group])
                    r0 = min(int(n_before * g * config.cross_ratio), ((n_before - c) * g) // 2)
                    x, size = _merge_clip(x, size, metric, r0, c * g)
                    joined.append({"x": x, "size": size, "c": c * g, "r1": (n_before * g - r0, (n_before - c) * g - r0)})
                clips = joined
            for clip in clips:
                x, size, c = clip["x"], clip["size"], clip["c"]
                a, keys = _attention(block, block.ln_1(x), size, config.prop_attn)
                x = x + block.ls_1(a)
                if layer < first_join:
                    asked = config.imgme_r if isinstance(config.imgme_r, int) else config.imgme_r[layer]
                    r = min(asked, (x.shape[0] - c) // 2)
                elif "r1" in clip:
                    total, limit = clip.pop("r1")
                    r = min(int(total * config.intra_ratio), limit // 2)
                else:
                    r = min(int(x.shape[0] * config.intra_ratio), (x.shape[0] - c) // 2)
                x, size = _merge_clip(x, size, keys, r, c)
                clip["x"], clip["size"] = x + _mlp(block, x), size
        cls = torch.cat([clip["x"][:clip["c"]] for clip in clips])
        feats = visual.ln_post(cls) @ visual.proj
        feats = feats / feats.norm(dim=-1, keepdim=True)
        valid = mask[vi].bool() if mask is not None else torch.ones(feats.shape[0], dtype=torch.bool)
        out.append(feats[valid].mean(0))
    return torch.stack(out)
