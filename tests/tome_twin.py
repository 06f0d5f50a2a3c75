"""ToMe's merge definitions written out token by token, as groups of input positions.

An independent twin for the tests of ``tempme_fast.tome``: no gather, no scatter, no sort of
index tensors; each output token is the list of input tokens it stands for, built with Python
lists from the definitions (ToMe, Bolya et al., ICLR 2023; the released TempMe variant).
"""
import torch


def _unit(metric_row):
    m = metric_row.double()
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _best(unit, a_pos, b_pos):
    """For every A position: (best cosine, index into b_pos of the first best)."""
    out = []
    for i in a_pos:
        sims = [float(unit[i] @ unit[j]) for j in b_pos]
        best = max(sims)
        out.append((best, sims.index(best)))
    return out


def bipartite_groups(metric_row, r, protected, kept_by_score):
    """Groups (lists of input positions, the group's own token first) in ToMe's output order."""
    n = metric_row.shape[0]
    unit = _unit(metric_row)
    a_pos = [p for p in range(protected, n) if p % 2 == 0]
    b_pos = [p for p in range(protected, n) if p % 2 == 1]
    best = _best(unit, a_pos, b_pos)
    # Highest score first, lower A index first among equals.
    ranked = sorted(range(len(a_pos)), key=lambda i: (-best[i][0], i))
    merged, kept = ranked[:r], ranked[r:]
    if not kept_by_score:
        kept = sorted(kept)
    b_groups = [[p] for p in b_pos]
    for i in merged:
        b_groups[best[i][1]].append(a_pos[i])
    return [[p] for p in range(protected)] + [[a_pos[i]] for i in kept] + b_groups


def tome_groups(metric_row, r, class_token=False, distill_token=False):
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric_row.shape[0] - protected) // 2)
    if r <= 0:
        return [[p] for p in range(metric_row.shape[0])]
    return bipartite_groups(metric_row, r, protected, kept_by_score=protected == 0)


def kth_groups(metric_row, k):
    n = (metric_row.shape[0] // k) * k
    unit = _unit(metric_row)
    b_pos = [p for p in range(n) if p % k == k - 1]
    a_pos = [p for p in range(n) if p % k != k - 1]
    groups = [[p] for p in b_pos]
    for i, (_, j) in zip(a_pos, _best(unit, a_pos, b_pos)):
        groups[j].append(i)
    return groups


def split_groups(metric_row, a_pos, b_pos):
    unit = _unit(metric_row)
    groups = [[p] for p in b_pos]
    for i, (_, j) in zip(a_pos, _best(unit, a_pos, b_pos)):
        groups[j].append(i)
    return groups


def reduce_groups(x, groups_per_row, mode):
    """``x [B', N, C]`` -> ``[B', len(groups), C]`` in float64."""
    rows = []
    for b, groups in enumerate(groups_per_row):
        toks = []
        for g in groups:
            v = x[b, g].double()
            toks.append({"sum": v.sum(0), "mean": v.mean(0), "amax": v.amax(0), "amin": v.amin(0),
                         "prod": v.prod(0)}[mode])
        rows.append(torch.stack(toks))
    return torch.stack(rows)


def wavg_groups(x, size, groups_per_row):
    xs = reduce_groups(x.double() * size.double(), groups_per_row, "sum")
    s = reduce_groups(size.double(), groups_per_row, "sum")
    return xs / s, s


def unmerge_groups(y, groups_per_row, tokens):
    out = torch.zeros(y.shape[0], tokens, y.shape[2], dtype=torch.float64)
    for b, groups in enumerate(groups_per_row):
        for o, g in enumerate(groups):
            for p in g:
                out[b, p] = y[b, o].double()
    return out


def unmerge_groups_differentiable(y, groups_per_row, tokens):
    """:func:`unmerge_groups` built with ``torch.stack`` so gradients flow."""
    rows = []
    for b, groups in enumerate(groups_per_row):
        where = {p: o for o, g in enumerate(groups) for p in g}
        rows.append(torch.stack([y[b, where[p]] for p in range(tokens)]))
    return torch.stack(rows)
