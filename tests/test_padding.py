"""A reduced text tower spends each row's merges on that row's own tokens: a caption in a
padded batch gives what it gives alone (issue: merges used to go to padding), for CrossGET
and ToMe, CLIP and BLIP; the matchers' padding rule against the unpadded rows."""

import pytest
import torch
from conftest import make_clip, make_texts
from hypothesis import given, settings
from hypothesis import strategies as st
from test_blip import make_blip, texts
from transformers import BlipForImageTextRetrieval

import crossget
from crossget.merge import padding_room
from crossget.methods.crossget import complete_graph_soft_matching
from crossget.methods.tome import bipartite_soft_matching


@pytest.mark.parametrize("method, guidance", [("crossget", "reference"), ("tome", "reference"),
                                              # row statistics of docs/method.md §3 "Guidance": the row's real tokens
                                              ("crossget", "standardised"), ("crossget", "rank")])
@pytest.mark.parametrize("layers, r, lengths", [
    (3, 1, (16, 9, 5, 12)), (3, 3, (16, 9, 5, 12)), (3, 5, (16, 9, 5, 12)),
    # deep layers: padding used up by earlier merges, rows one token apart
    (6, 2, (16, 11, 7, 3)), (6, 3, (16, 15, 14, 13)), (8, 2, (16, 9, 5, 12)),
])
def test_clip_text_row_alone_equals_row_in_padded_batch(method, guidance, layers, r, lengths):
    model = make_clip(layers=layers)
    scale = 1.0 if guidance == "reference" else 0.5
    crossget.patch(model, r=r, method=method, towers=("text",),
                   **({} if method == "tome" else {"guidance": guidance, "guidance_scale": scale}))
    ids, mask = make_texts(lengths, total=16)
    with torch.no_grad():
        batch = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        for i in range(len(ids)):
            n = int(mask[i].sum())
            alone = model.get_text_features(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n])
            assert torch.allclose(alone.pooler_output, batch[i : i + 1], atol=1e-5), (i, n)


@pytest.mark.parametrize("method", ["crossget", "tome"])
def test_blip_text_encoder_row_alone_equals_row_in_padded_batch(method):
    model = make_blip(BlipForImageTextRetrieval)
    crossget.patch(model, r=2, method=method, towers=("vision", "text"))
    ids, mask = texts((12, 8, 5), total=12)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
        for i in range(len(ids)):
            n = int(mask[i].sum())
            alone = model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n],
                          pixel_values=pixels[i : i + 1]).itm_score
            assert torch.allclose(alone, batch[i : i + 1], atol=1e-5), (i, n)


@st.composite
def padded_rows(draw):
    """A batch of rows: real tokens first (token 0 protected), then padding; and r."""
    b, n, c = draw(st.integers(2, 4)), draw(st.integers(4, 14)), draw(st.integers(2, 5))
    lengths = [n] + [draw(st.integers(2, n)) for _ in range(b - 1)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    metric = torch.randn(b, n, c, generator=g)
    pad = torch.randn(c, generator=g)
    groups = torch.zeros(b, n, dtype=torch.long)
    for i, k in enumerate(lengths):
        groups[i, :k] = 1
        metric[i, k:] = pad + 0.01 * torch.randn(n - k, c, generator=g)  # near-identical padding
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, 0] = True
    return metric, groups, protected, lengths, draw(st.integers(0, n // 2))


def real_groups(merge, row, k):
    """The groups of real tokens (< k) a merge makes in one row: {destination: {sources}}."""
    keep = merge.keep[row].tolist()
    out = {t: {t} for t in keep if t < k}
    for s, d in zip(merge.src[row].tolist(), merge.dst[row].tolist()):
        if s < k:
            out[keep[d]].add(s)
    return {frozenset(g) for g in out.values()}


@settings(max_examples=40, deadline=None)
@given(padded_rows())
def test_matchers_merge_real_tokens_as_the_unpadded_row_does(args):
    metric, groups, protected, lengths, r = args
    cases = [(lambda m, r, p, g: complete_graph_soft_matching(m, r, None, p, g), False), (bipartite_soft_matching, True)]
    for match, bipartite in cases:
        # as TowerState does: first append the padding a row may lack (usually none)
        r_batch, k = padding_room(r, groups != 0, protected, bipartite)
        b, _, c = metric.shape
        m = torch.cat([metric, torch.ones(b, k, c)], 1)
        g = torch.cat([groups, groups.new_zeros(b, k)], 1)
        p = torch.cat([protected, protected.new_zeros(b, k)], 1)
        batch = match(m, r_batch, p, g)
        assert batch.r == r_batch
        for row, k in enumerate(lengths):
            alone = match(metric[row : row + 1, :k], r, protected[row : row + 1, :k], None)
            assert real_groups(batch, row, k) == real_groups(alone, 0, k)
            # padding never merges into a real token and the other way round
            dst_tok = batch.keep[row][batch.dst[row]]
            assert ((batch.src[row] < k) == (dst_tok < k)).all()
