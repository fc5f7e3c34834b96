"""DivPrune's and DART's selection rules (crossget/methods/divprune.py, dart.py) against naive
references written out here from the papers' rules with plain Python loops, on random inputs
drawn by hypothesis and on adversarial ones (exact duplicates, ties)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossget.methods.dart import dart_select
from crossget.methods.divprune import divprune_select

SETTINGS = settings(max_examples=30, deadline=None)


def cos(a, b):
    """Cosine of two lists of floats; a zero vector has cosine 0 with everything."""
    na = max(math.sqrt(sum(v * v for v in a)), 1e-12)
    nb = max(math.sqrt(sum(v * v for v in b)), 1e-12)
    return sum(u * v for u, v in zip(a, b)) / (na * nb)


def first_max(cands, key):
    """The candidate with the largest key, the lowest one on ties (``cands`` ascending)."""
    best = None
    for c in cands:
        if best is None or key(c) > key(best):
            best = c
    return best


def naive_divprune(x, keep, valid):
    """Per row: first the token whose nearest other token is farthest (cosine distance), then
    repeatedly the token whose nearest chosen token is farthest; ties to the lower index."""
    return [naive_divprune_row(x[row], keep, valid[row]) for row in range(len(x))]


def naive_divprune_row(x, keep, valid):
    toks = [i for i in range(len(x)) if valid[i]]
    dist = [[1.0 - cos(a, b) for b in x] for a in x]
    chosen = [first_max(toks, lambda j: min((dist[k][j] for k in toks if k != j), default=math.inf))]
    while len(chosen) < keep:
        rest = [j for j in toks if j not in chosen]
        chosen.append(first_max(rest, lambda j: min(dist[s][j] for s in chosen)))
    return sorted(chosen)


def naive_dart(h, keep, pivots, valid, norm_of, th, text_pivots, tvalid, tnorm):
    """Per row: image pivots = the ``pivots`` valid image tokens with the largest L1 norm of
    ``norm_of`` (kept), text pivots likewise among text tokens; then each pivot in turn (image
    pivots by position, then text pivots by position) takes its share of the ``keep - pivots``
    remaining slots (the first ``rest % n`` one more) as the untaken image tokens least
    cosine-similar to it. Ties to the lower position."""
    out = []
    for row in range(len(h)):
        def top(feats, ok, count):
            cands = [i for i in range(len(feats)) if ok[i]]
            ranked = sorted(cands, key=lambda i: (-sum(abs(v) for v in feats[i]), i))
            return sorted(ranked[:count])

        img = top(norm_of[row], valid[row], pivots)
        piv = [h[row][i] for i in img]
        if text_pivots:
            piv += [th[row][i] for i in top(tnorm[row], tvalid[row], text_pivots)]
        kept = list(img)
        rest = keep - pivots
        for j, p in enumerate(piv):
            quota = rest // len(piv) + (1 if j < rest % len(piv) else 0)
            pool = [i for i in range(len(h[row])) if valid[row][i] and i not in kept]
            kept += sorted(pool, key=lambda i: (cos(p, h[row][i]), i))[:quota]
        out.append(sorted(kept))
    return out


def check_index(idx, keep, valid):
    assert idx.dtype == torch.long and idx.shape == (valid.shape[0], keep)
    for row in range(idx.shape[0]):
        r = idx[row].tolist()
        assert r == sorted(set(r)), "ascending and distinct"
        assert all(valid[row, i] for i in r), "padding selected"


def features(g, b, n, d, kind):
    """``[B, n, d]`` float64: gaussian, or adversarial (scaled signed one-hot vectors from a
    few directions, so duplicates and exact ties abound and every cosine is exactly 0 or ±1)."""
    if kind == "gauss":
        return torch.randn(b, n, d, generator=g, dtype=torch.float64)
    axis = torch.randint(0, min(d, 3), (b, n), generator=g)
    sign = torch.randint(0, 2, (b, n), generator=g) * 2 - 1
    scales = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    scale = scales[torch.randint(0, 3 if kind == "scaled" else 1, (b, n), generator=g)]
    return torch.nn.functional.one_hot(axis, d).to(torch.float64) * (sign * scale).unsqueeze(-1)


@st.composite
def peer_inputs(draw, text=False):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    d = draw(st.integers(2, 6))
    kind = draw(st.sampled_from(["gauss", "dup", "scaled"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = features(g, b, n, d, kind)
    valid = torch.ones(b, n, dtype=torch.bool)
    if draw(st.booleans()):
        valid = torch.rand(b, n, generator=g) < 0.7
        valid[:, 0] = True  # at least one valid token per row
    keep = draw(st.integers(1, int(valid.sum(1).min())))
    if not text:
        return x, keep, valid
    norm_of = features(g, b, n, d + 1, kind) if draw(st.booleans()) else None
    t = draw(st.integers(0, 5))
    th = features(g, b, t, d, kind) if t else None
    tvalid = torch.ones(b, t, dtype=torch.bool)
    if t and draw(st.booleans()):
        tvalid = torch.rand(b, t, generator=g) < 0.7
        tvalid[:, -1] = True
    tnorm = features(g, b, t, d + 1, kind) if t and draw(st.booleans()) else None
    text_pivots = draw(st.integers(0, int(tvalid.sum(1).min()))) if t else 0
    pivots = draw(st.integers(0 if text_pivots else 1, keep))
    return x, keep, pivots, valid, norm_of, th, text_pivots, tvalid, tnorm


@SETTINGS
@given(peer_inputs())
def test_divprune_matches_naive(inp):
    x, keep, valid = inp
    idx = divprune_select(x, keep, valid)
    check_index(idx, keep, valid)
    assert idx.tolist() == naive_divprune(x.tolist(), keep, valid.tolist())


@SETTINGS
@given(peer_inputs(text=True))
def test_dart_matches_naive(inp):
    x, keep, pivots, valid, norm_of, th, text_pivots, tvalid, tnorm = inp
    idx = dart_select(x, keep, pivots, valid, norm_of, th, text_pivots, tvalid if th is not None else None, tnorm)
    check_index(idx, keep, valid)
    ref = naive_dart(
        x.tolist(), keep, pivots, valid.tolist(), (x if norm_of is None else norm_of).tolist(),
        None if th is None else th.tolist(), text_pivots, tvalid.tolist(),
        None if th is None else (th if tnorm is None else tnorm).tolist(),
    )
    assert idx.tolist() == ref


def test_divprune_spreads_over_duplicates():
    # three distinct directions, each repeated: the first three picks cover all three, and a
    # float32 input gives the same answer as float64
    base = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0]])
    x = base[torch.tensor([0, 0, 1, 0, 1, 2, 2, 1])]
    idx = divprune_select(x, 3)
    assert idx.shape == (3,)
    assert sorted({tuple(x[i].tolist()) for i in idx.tolist()}) == sorted(tuple(r) for r in base.tolist())
    # every token has a duplicate (nearest distance 0 for all): index 0 (e0) goes first; then
    # the farthest from it, -e0 (distance 2), lowest index 5; then e1 (distance 1), index 2
    assert idx.tolist() == [0, 2, 5]
    assert divprune_select(x.double(), 3).tolist() == idx.tolist()


def test_divprune_first_pick_is_most_isolated():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.98, -0.2]])
    assert divprune_select(x, 1).tolist() == [2]


def test_dart_drops_duplicates_of_pivots():
    # token 0 has the largest norm (pivot); its copies 1, 2 go, the orthogonal ones stay
    x = torch.tensor([[[3.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 1.0]]])
    assert dart_select(x, 3, 1).tolist() == [[0, 3, 4]]  # cos 0 ties: lower positions
    assert dart_select(x, 4, 1).tolist() == [[0, 3, 4, 5]]
    # a text pivot alone: its duplicates (tokens along e0) go
    assert dart_select(x, 3, 0, text_hidden=torch.tensor([[[5.0, 0, 0]]]), text_pivots=1).tolist() == [[3, 4, 5]]
    # image pivot 0 takes its one slot first (3), then the text pivot e1 its one (1: cos 0, lowest)
    assert dart_select(x, 3, 1, text_hidden=torch.tensor([[[0, 5.0, 0]]]), text_pivots=1).tolist() == [[0, 1, 3]]


@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_keep_all_returns_everything(method):
    x = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(0))
    idx = divprune_select(x, 7) if method == "divprune" else dart_select(x, 7, 3)
    assert idx.tolist() == [list(range(7))] * 2
    valid = torch.tensor([[True] * 5 + [False] * 2, [False, True, True, True, True, True, False]])
    idx = divprune_select(x, 5, valid) if method == "divprune" else dart_select(x, 5, 2, valid)
    assert idx.tolist() == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("method", ["divprune", "dart"])
@pytest.mark.parametrize("keep", [0, -1, 6, 2.0, True, "2", None])
def test_bad_keep(method, keep):
    x = torch.randn(2, 6, 4)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5] = False  # row 1 has 5 valid tokens, so keep=6 is too many
    with pytest.raises(ValueError, match="keep must be"):
        divprune_select(x, keep, valid) if method == "divprune" else dart_select(x, keep, 1, valid)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pivots": 4}, "pivots must be in"),
        ({"pivots": -1}, "pivots must be in"),
        ({"pivots": 1.0}, "pivots must be an int"),
        ({"pivots": 0}, "needs at least one pivot"),
        ({"pivots": 1, "text_pivots": 1}, "no text_hidden"),
        ({"pivots": 1, "text_pivots": 3, "text_hidden": torch.randn(1, 2, 4)}, "text_pivots must be in"),
    ],
)
def test_dart_bad_pivots(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dart_select(torch.randn(1, 6, 4), 3, **kwargs)


def test_dart_authors_budget():
    # the authors' LLaVA-1.5 setting: 4 image + 4 text pivots, 16 tokens each -> 132 of 576
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 576, 32, generator=g), torch.randn(1, 20, 32, generator=g)
    idx = dart_select(x, 132, 4, text_hidden=text, text_pivots=4)
    check_index(idx, 132, torch.ones(1, 576, dtype=torch.bool))


def test_divprune_mutual_nearest_tie_goes_to_lower_index():
    # tokens 1 and 3 are each other's nearest neighbour and the most isolated pair, so they
    # tie exactly on the first pick whatever rounding the batched matmul does: 1 wins
    g = torch.Generator().manual_seed(3)
    row = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [1.0, 0.01, 0, 0], [0, 0, 1.0, 0.3]], dtype=torch.float64)
    x = torch.stack([row, torch.randn(4, 4, generator=g, dtype=torch.float64)])
    assert divprune_select(x, 1)[0].tolist() == [1]
    assert divprune_select(x, 1).tolist() == naive_divprune(x.tolist(), 1, [[True] * 4] * 2)
