"""The matching and ensemble ops against docs/method.md §4, §5 and §8, written out naively here."""

import math

import pytest
import torch

from crossget.merge import Merge, attention_bias, sources_from_token_map
from crossget.methods.crossget import complete_graph_soft_matching
from crossget.methods.tome import bipartite_soft_matching


def naive_guidance(importance, later_best, guidance, scale):
    """docs/method.md §3 "Guidance" for one row: the term each rule adds to the score.
    ``later_best`` holds max_j S'_ij (-inf: not a candidate)."""
    cands = [i for i, v in enumerate(later_best) if v != -math.inf]
    if guidance == "reference":
        return list(importance)
    if guidance == "scaled":
        return [scale * v for v in importance]
    if guidance == "ensemble":
        return [0.0] * len(importance)

    def sd(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    vals = [importance[i] for i in cands]
    if guidance == "rank":  # rank among candidates, ties by index
        order = sorted(cands, key=lambda i: (importance[i], i))
        rank = {t: p for p, t in enumerate(order)}
        vals = [float(rank[i]) for i in cands]
    m, s = sum(vals) / len(vals), sd(vals)
    spread = sd([later_best[i] for i in cands])
    term = [0.0] * len(importance)
    for i, v in zip(cands, vals):
        term[i] = scale * spread * (v - m) / s
    return term


def naive_complete_graph(metric, r, importance=None, protected=(), guidance="reference", scale=1.0):
    """docs/method.md §4 for one row, step by step, with Python loops. Returns a set of groups."""
    n = metric.shape[0]
    k = metric / metric.norm(dim=-1, keepdim=True)
    s = (k @ k.T).tolist()
    for i in range(n):
        s[i][i] = -math.inf
        for j in range(n):
            if i in protected or j in protected:
                s[i][j] = -math.inf
    r = min(r, (n - len(protected)) // 2)
    order = sorted(range(n), key=lambda i: -max(s[i]))
    rank = {t: p for p, t in enumerate(order)}
    later_best = [max((s[i][j] for j in range(n) if rank[j] > rank[i]), default=-math.inf) for i in range(n)]
    imp = [0.0] * n if importance is None else naive_guidance([float(v) for v in importance], later_best, guidance, scale)
    score = [imp[i] - later_best[i] for i in range(n)]
    sources = sorted(range(n), key=lambda i: score[i])[:r]
    groups = {j: {j} for j in range(n) if j not in sources}
    for i in sources:
        dst = max((j for j in range(n) if j not in sources), key=lambda j: s[i][j])
        groups[dst].add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("guidance, scale", [("scaled", 0.25), ("standardised", 0.5), ("rank", 0.5), ("ensemble", 1.0)])
def test_guidance_rules_match_naive_spec(guidance, scale):
    torch.manual_seed(1)
    b, n, c, r = 4, 15, 8, 6
    metric = torch.randn(b, n, c)
    importance = torch.randn(b, n) * 0.3
    importance[2, 3] = importance[2, 5]  # a tie in the importance ranks
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, 0] = True
    merge = complete_graph_soft_matching(metric, r, importance, protected, guidance=guidance, scale=scale)
    for row in range(b):
        expected = naive_complete_graph(metric[row], r, importance[row], {0}, guidance, scale)
        assert groups_of(merge, row) == expected
    # every rule keeps the ensemble weights exp(I) (docs/method.md §5)
    assert torch.allclose(merge.weight[..., 0], importance.exp())


def test_guidance_scale_zero_is_unguided_ranking():
    torch.manual_seed(2)
    metric, importance = torch.randn(3, 12, 8), torch.randn(3, 12)
    unguided = complete_graph_soft_matching(metric, 4)
    for rule in ("scaled", "standardised", "rank"):
        m = complete_graph_soft_matching(metric, 4, importance, guidance=rule, scale=0.0)
        assert torch.equal(m.src, unguided.src) and torch.equal(m.keep, unguided.keep)


def groups_of(merge: Merge, row: int) -> set:
    slots = merge.slots()[row].tolist()
    out = {}
    for tok, slot in enumerate(slots):
        out.setdefault(slot, set()).add(tok)
    return {frozenset(g) for g in out.values()}


@pytest.mark.parametrize("with_importance", [False, True])
def test_complete_graph_matches_naive_spec(with_importance):
    torch.manual_seed(0)
    b, n, c, r = 4, 13, 8, 5
    metric = torch.randn(b, n, c)
    importance = torch.randn(b, n) * 0.3 if with_importance else None
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, 0] = True
    protected[1, 7] = True
    merge = complete_graph_soft_matching(metric, r, importance, protected)
    for row in range(b):
        prot = set(protected[row].nonzero().flatten().tolist())
        imp = None if importance is None else importance[row]
        # row 1 has two protected tokens; docs/method.md §4 clamps r by the batch's most protected row
        expected = naive_complete_graph(metric[row], min(r, (n - 2) // 2), imp, prot)
        assert groups_of(merge, row) == expected


def test_bipartite_matches_tome():
    torch.manual_seed(1)
    b, n, c, r = 3, 11, 6, 4
    metric = torch.randn(b, n, c)
    protected = torch.zeros(n, dtype=torch.bool)
    protected[0] = True
    merge = bipartite_soft_matching(metric, r, protected)
    for row in range(b):
        k = metric[row] / metric[row].norm(dim=-1, keepdim=True)
        a, bb = list(range(0, n, 2)), list(range(1, n, 2))
        scores = k[a] @ k[bb].T
        scores[0] = -math.inf  # CLS is A[0]
        best, partner = scores.max(-1)
        chosen = best.argsort(descending=True)[:r].tolist()
        groups = {j: {j} for j in range(n) if j not in {a[i] for i in chosen}}
        for i in chosen:
            groups[bb[partner[i]]].add(a[i])
        assert groups_of(merge, row) == {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("matcher", ["complete", "bipartite"])
def test_protected_never_merged_and_every_token_in_one_group(matcher):
    torch.manual_seed(2)
    b, n = 5, 20
    metric = torch.randn(b, n, 4)
    protected = torch.rand(b, n) < 0.2
    protected[:, 0] = True
    if matcher == "complete":
        merge = complete_graph_soft_matching(metric, 8, torch.randn(b, n), protected)
    else:
        merge = bipartite_soft_matching(metric, 8, protected)
    assert merge.r > 0
    src_prot = protected.gather(1, merge.src)
    dst_tok = merge.keep.gather(1, merge.dst)
    assert not src_prot.any() and not protected.gather(1, dst_tok).any()
    sources = sources_from_token_map(merge.slots(), merge.keep.shape[1])  # [B, N-r, N]
    assert (sources.sum(1) == 1).all()  # every input token in exactly one output
    assert (merge.keep.diff(dim=1) > 0).all()  # survivors keep their order


def test_groups_never_mix():
    torch.manual_seed(3)
    b, n = 4, 16
    metric = torch.randn(b, n, 4)
    groups = (torch.arange(n) >= 10).long().expand(b, n)  # 10 real tokens then 6 padding
    for merge in (
        complete_graph_soft_matching(metric, 7, None, None, groups),
        bipartite_soft_matching(metric, 7, None, groups),
    ):
        dst_tok = merge.keep.gather(1, merge.dst)
        assert (groups.gather(1, merge.src) == groups.gather(1, dst_tok)).all()


def test_ensemble_weights_follow_spec():
    # tokens 1 and 2 join token 3; token 0 stays. sizes and importance are unequal.
    keep = torch.tensor([[0, 3]])
    src = torch.tensor([[1, 2]])
    dst = torch.tensor([[1, 1]])
    importance = torch.tensor([[0.0, 0.5, -0.2, 0.1]])
    x = torch.tensor([[[1.0, 0.0], [2.0, 4.0], [0.0, -2.0], [3.0, 1.0]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0]]])
    merge = Merge(keep, src, dst, importance.exp().unsqueeze(-1))
    out, out_size = merge(x, size)
    w = [s * math.exp(i) for s, i in zip([2.0, 1.0, 3.0], [0.5, -0.2, 0.1])]
    rows = [[2.0, 4.0], [0.0, -2.0], [3.0, 1.0]]
    expected = [sum(wi * row[d] for wi, row in zip(w, rows)) / sum(w) for d in range(2)]
    assert torch.allclose(out[0, 1], torch.tensor(expected))
    assert torch.equal(out[0, 0], x[0, 0])
    assert out_size.flatten().tolist() == [1.0, 6.0]
    # two size-1 tokens: softmax of importance, the paper's weighting
    equal = torch.zeros(1, 2, 1).exp()
    pair = Merge(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[0]]), equal)
    out, _ = pair(torch.tensor([[[2.0], [4.0]]]))
    assert out.item() == pytest.approx(3.0)
    # no importance: ToMe's size-weighted average
    plain = Merge(keep, src, dst)
    out, _ = plain(x, size)
    assert torch.allclose(out[0, 1], (x[0, 1:] * size[0, 1:]).sum(0) / 6.0)


def test_r_is_clamped_and_validated():
    metric = torch.randn(2, 9, 4)
    protected = torch.zeros(9, dtype=torch.bool)
    protected[0] = True
    assert complete_graph_soft_matching(metric, 100, None, protected).r == 4
    assert bipartite_soft_matching(metric, 100, protected).r == 4
    assert complete_graph_soft_matching(metric, 0).r == 0
    with pytest.raises(ValueError, match="-1"):
        complete_graph_soft_matching(metric, -1)
    with pytest.raises(ValueError, match="metric"):
        complete_graph_soft_matching(metric[0], 2)
    with pytest.raises(ValueError, match="protected"):
        complete_graph_soft_matching(metric, 2, None, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="importance"):
        complete_graph_soft_matching(metric, 2, torch.zeros(2, 8))
    merge = complete_graph_soft_matching(metric, 2)
    with pytest.raises(ValueError, match="merge expects"):
        merge(torch.randn(2, 8, 3))


def test_attention_bias():
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    bias = attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    assert torch.allclose(bias.flatten(), torch.tensor([0.0, math.log(3), math.log(2)]))
    valid = torch.tensor([[True, True, False]])
    pos = torch.tensor([[0, 4, 2]])
    mask = attention_bias(size, valid, pos)
    assert mask.shape == (1, 1, 3, 3)
    low = torch.finfo(torch.float32).min
    # query 0 sees key 0 only; query 1 (pos 4) sees keys 0 and 1; key 2 is padding
    assert mask[0, 0, 0, 1] == low and mask[0, 0, 1, 1] == pytest.approx(math.log(3))
    assert (mask[0, 0, :, 2] == low).all()
    assert attention_bias(None) is None


@pytest.mark.parametrize("guidance", ["reference", None])
def test_patched_model_with_the_reference_rule_picks_the_naive_specs_groups(monkeypatch, guidance):
    """``crossget.patch(..., guidance="reference")`` runs the authors' rule in every merging layer
    (the naive transcription's groups); the default (``None``) runs ``DEFAULT_GUIDANCE``."""
    from conftest import make_clip

    import crossget
    from crossget.config import DEFAULT_GUIDANCE, GUIDANCE_SCALES
    from crossget.methods import crossget as crossget_method

    calls = []
    real = crossget_method.complete_graph_soft_matching

    def spy(metric, r, importance=None, protected=None, groups=None, **rule):
        merge = real(metric, r, importance, protected, groups, **rule)
        calls.append((metric.detach().clone(), r, importance.detach().clone(), protected.clone(), rule, merge))
        return merge

    monkeypatch.setattr(crossget_method, "complete_graph_soft_matching", spy)
    model = make_clip()
    kw = {} if guidance is None else {"guidance": guidance}
    crossget.patch(model, r=3, **kw)
    with torch.no_grad():
        model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    rule = guidance or DEFAULT_GUIDANCE
    assert len(calls) == len(model.vision_model.encoder.layers)
    for metric, r, importance, protected, used, merge in calls:
        assert used == {"guidance": rule, "scale": GUIDANCE_SCALES[rule]}
        for row in range(metric.shape[0]):
            prot = set(protected[row].nonzero().flatten().tolist()) if protected.dim() == 2 else \
                set(protected.nonzero().flatten().tolist())
            want = naive_complete_graph(metric[row], r, importance[row], prot, rule, GUIDANCE_SCALES[rule])
            assert groups_of(merge, row) == want
