"""Each method's pure selection/merging rule against a naive reference written out here, on
random inputs drawn by hypothesis (ToMe's and CrossGET's matchers are in test_merge.py,
VisionZip's selection in test_llava.py; these add FastV and properties of the matchers)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossget.methods.crossget import attention_importance, complete_graph_soft_matching, cross_importance
from crossget.methods.fastv import fastv_keep_indices
from crossget.methods.tome import bipartite_soft_matching
from crossget.methods.visionzip import split_budget

SETTINGS = settings(max_examples=40, deadline=None)


def naive_fastv(scores, image_mask, per_image, keep):
    """FastV per row: every text position, and per image the ``keep`` visual positions with the
    highest scores; ascending."""
    out = []
    for row in range(scores.shape[0]):
        pos = [i for i in range(scores.shape[1]) if image_mask[row, i]]
        kept = [i for i in range(scores.shape[1]) if not image_mask[row, i]]
        for start in range(0, len(pos), per_image):
            image = pos[start : start + per_image]
            kept += sorted(image, key=lambda i: -float(scores[row, i]))[:keep]
        out.append(sorted(kept))
    return torch.tensor(out)


@st.composite
def fastv_inputs(draw):
    b = draw(st.integers(1, 3))
    per_image = draw(st.integers(1, 6))
    n_images = draw(st.integers(1, 2))
    text = draw(st.integers(0, 5))
    keep = draw(st.integers(1, per_image))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    length = text + n_images * per_image
    mask = torch.zeros(b, length, dtype=torch.bool)
    for row in range(b):  # images contiguous, anywhere among the text
        start = int(torch.randint(0, text + 1, (1,), generator=g))
        for k in range(n_images):
            mask[row, start + k * per_image : start + (k + 1) * per_image] = True
    return torch.rand(b, length, generator=g), mask, per_image, keep


@SETTINGS
@given(fastv_inputs())
def test_fastv_keeps_what_the_naive_rule_keeps(args):
    scores, mask, per_image, keep = args
    got = fastv_keep_indices(scores, mask, per_image, keep)
    assert torch.equal(got, naive_fastv(scores, mask, per_image, keep))


@st.composite
def tokens(draw):
    b, n, c = draw(st.integers(1, 3)), draw(st.integers(3, 12)), draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(b, n, c, generator=g), draw(st.integers(0, n))


@SETTINGS
@given(tokens())
def test_both_matchers_remove_r_and_conserve_size(args):
    x, r = args
    protected = torch.zeros(x.shape[:2], dtype=torch.bool)
    protected[:, 0] = True
    for merge in (bipartite_soft_matching(x, r, protected), complete_graph_soft_matching(x, r, None, protected)):
        assert merge.r == min(r, (x.shape[1] - 1) // 2)
        assert not protected.gather(1, merge.src).any()  # the CLS token is never a source
        assert len(set(merge.src[0].tolist())) == merge.r  # r distinct sources


def test_importance_rules_read_their_inputs():
    g = torch.Generator().manual_seed(0)
    keys, query = torch.randn(2, 5, 4, generator=g), torch.randn(2, 1, 4, generator=g)
    want = torch.nn.functional.cosine_similarity(keys, query, dim=-1)
    assert torch.allclose(cross_importance(keys, query), want, atol=1e-6)
    attention = torch.rand(2, 6, 6, generator=g).softmax(-1)  # cross token last
    assert torch.allclose(attention_importance(attention, 5, True), attention[:, :5, :5].mean(1) + attention[:, 5, :5])


@given(st.integers(1, 576), st.one_of(st.none(), st.integers(0, 576)))
def test_visionzip_budget_splits_the_room(room, contextual):
    if contextual is not None and contextual > room:
        with pytest.raises(ValueError, match="contextual must be an int"):
            split_budget(room, 576, contextual)
        return
    dominant, ctx = split_budget(room, 576, contextual)
    want = round(room * 10 / 64) if contextual is None else contextual
    if room >= 576:  # every patch is kept: nothing left to merge into contextual tokens
        want = 0
    assert (dominant, ctx) == (room - want, want)
