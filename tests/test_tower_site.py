"""The tower site of LLaVA-NeXT (CLIP) and LLaVA-OneVision (SigLIP), ``site="tower"``: merging in
the vision tower's layers up to the feature layer, every tile alike, the tiles' tokens laid out
flat (``tiles x keep`` per image), and VisionZip per tile at NeXT's feature layer.

Nothing to reduce gives the stock ids; generation agrees with and without the KV cache; what
reaches the LM is ``crossget.image_tokens(model, size)`` per image (images of different sizes in
one batch, OneVision's multi-image prompts) and equals the vision family's own patch of the same
tower; the processor writes that count; the config reports the site and round-trips; unpatch gives
the stock model; bad sites and budgets are errors; VisionZip matches a naive reference of its
selection on the stock tower's attention."""

import copy
import math

import pytest
import torch
from mllm_common import (
    check_cache_agreement,
    check_copies,
    check_unpatch_restores,
    generated,
    lm_visual_tokens,
    torch_saved,
)
from test_llava import make_llava
from test_llava_next import NEXT, make_next
from test_llava_next import pixels as next_pixels
from test_llava_next import tiny_processor as next_processor
from test_llava_onevision import MULTI, OV, make_ov, multi_inputs, picture, run_generate, video_inputs
from test_llava_onevision import pixels as ov_pixels
from test_llava_onevision import tiny_processor as ov_processor

import crossget
from crossget.config import PatchConfig
from crossget.families import llava_next
from crossget.families import llava_onevision as ov

IMG = 99
# NeXT: 4 x 4 patches + CLS per tile, the feature layer (-2 of 2) reads layer 0's output: one layer
# merges, so 8..16 tokens per tile reach the projector (16: nothing merges). Sizes: 3, 3 and 5 tiles.
N_WIDE, N_TALL, N_BIG = (40, 100), (100, 40), (112, 112)
# OneVision: 4 x 4 patches per tile, no CLS, both layers merge (4..16). Sizes: 17, 17, 17 and 7 tiles.
O_WIDE, O_TALL, O_BIG, O_MID = (40, 100), (100, 40), (128, 128), (64, 96)
TILES = {"next": {N_WIDE: 3, N_TALL: 3, N_BIG: 5}, "ov": {O_WIDE: 17, O_TALL: 17, O_BIG: 17, O_MID: 7}}
FAMILIES = {"next": (NEXT, (N_WIDE, N_TALL, N_BIG), 10), "ov": (OV, (O_WIDE, O_TALL, O_BIG, O_MID), 6)}


def tower_features(model, fam, sizes, multi=False):
    """``[tiles, K, C]`` per image: the feature layer's hidden states of the (patched or not) tower
    on each image's own tiles, after the feature strategy's drop."""
    base = model.model
    px, image_sizes = next_pixels(sizes) if fam == "next" else ov_pixels(sizes, multi=multi)
    cfg = base.config
    drop = cfg.vision_feature_select_strategy == "default"
    out = []
    for i, size in enumerate(image_sizes.tolist()):
        tiles = 1 if multi else TILES[fam][tuple(size)]
        with torch.no_grad():
            hidden = base.vision_tower(px[i, :tiles], output_hidden_states=True).hidden_states
        out.append(hidden[cfg.vision_feature_layer][:, int(drop):])
    return out


# --------------------------------------------------------------------------- nothing to reduce
@pytest.mark.parametrize("fam", ["next", "ov"])
@pytest.mark.parametrize("method, budget", [("none", {}), ("tome", {"r": 0}), ("crossget", {"r": 0}),
                                            ("crossget", {"keep": 16})])
def test_nothing_to_reduce_at_the_tower_gives_the_stock_ids(fam, method, budget):
    m, sizes, _ = FAMILIES[fam]
    model = m.make()
    ref = m.generate(model, sizes[:2])
    stock = [crossget.image_tokens(model, s) for s in sizes]
    crossget.patch(model, method=method, site="tower", **budget)
    cfg = crossget.config(model)
    assert cfg.site == "tower" and cfg.keep == 16
    assert cfg.r == {"vision": (0, 0)}
    assert crossget.states(model)["vision"].settings.r == (0, 0)  # the tower is patched, merging nothing
    assert [crossget.image_tokens(model, s) for s in sizes] == stock
    assert torch.equal(m.generate(model, sizes[:2]), ref)


# --------------------------------------------------------------------------- generation
CASES = [("next", "tome"), ("next", "crossget"), ("next", "visionzip"), ("ov", "tome"), ("ov", "crossget")]


@pytest.mark.parametrize("fam, method", CASES)
def test_reduced_generation_same_with_and_without_cache(fam, method):
    m, sizes, keep = FAMILIES[fam]
    model, _ = check_cache_agreement(m, method, dict(keep=keep, site="tower"), sizes[:2])
    assert crossget.config(model).site == "tower"


# --------------------------------------------------------------------------- what reaches the LM
@pytest.mark.parametrize("fam, method", [c for c in CASES if c[1] != "visionzip"])
def test_the_lm_receives_tiles_times_keep_the_vision_familys_merge(fam, method):
    """Per image ``tiles x keep`` tokens, in a batch of different sizes, each the projection of
    what the CLIP / SigLIP family's own patch of the same tower gives its tiles, base tile first."""
    m, sizes, keep = FAMILIES[fam]
    model = m.make()
    crossget.patch(model, method=method, keep=keep, site="tower")
    cfg = crossget.config(model)
    assert cfg.towers == ("vision",) and cfg.importance == ("attention" if fam == "next" and method == "crossget"
                                                             else "cross")
    want = [TILES[fam][s] * keep for s in sizes]
    assert [crossget.image_tokens(model, s) for s in sizes] == want
    x = m.inputs(model, sizes, tuple(range(3, 3 + len(sizes))))
    counts, embeds = lm_visual_tokens(model, x, IMG)
    assert counts == want

    # the vision family's patch (CLIP / SigLIP) of a copy of the stock tower, with the same schedule
    stock = m.make()
    tower = copy.deepcopy(stock.model.vision_tower)
    crossget.patch(tower, method=method, r=list(cfg.r["vision"]), importance=cfg.importance, guidance="reference",
                   metric=cfg.metric)
    stock.model.vision_tower = tower
    for row, feats in enumerate(tower_features(stock, fam, sizes)):
        assert feats.shape[1] == keep
        with torch.no_grad():
            projected = stock.model.multi_modal_projector(feats).flatten(0, 1)
        torch.testing.assert_close(embeds[row][x["input_ids"][row] == IMG], projected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("fam", ["next", "ov"])
def test_a_batch_of_sizes_generates_what_each_prompt_does_alone(fam, method):
    m, sizes, keep = FAMILIES[fam]
    model = m.make()
    crossget.patch(model, method=method, keep=keep, site="tower")
    x = m.inputs(model, sizes, (4,) * len(sizes))
    both = generated(model, x, m.gen)
    for i, size in enumerate(sizes):
        alone = {k: v[i : i + 1] for k, v in x.items()}
        alone["pixel_values"] = alone["pixel_values"][:, : TILES[fam][size]]  # its own tiles only
        assert torch.equal(generated(model, alone, m.gen)[0], both[i])


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_onevision_multi_image_prompts_give_keep_per_image_and_videos_stay_stock(method):
    model = make_ov()
    vx = video_inputs()
    with torch.no_grad():
        ref_video = model(**vx).logits
    crossget.patch(model, method=method, keep=6, site="tower")
    assert crossget.image_tokens(model, ov.MULTI_IMAGE) == 6
    x = multi_inputs(model)  # one prompt, two images of a tile each
    assert lm_visual_tokens(model, x, IMG)[0] == [12]
    assert torch.equal(run_generate(model, x), run_generate(model, x, use_cache=False))
    with torch.no_grad():  # video frames run the tower unmerged: their pooling needs the grid
        assert torch.equal(model(**vx).logits, ref_video)
    crossget.unpatch(model)
    assert crossget.image_tokens(model, ov.MULTI_IMAGE) == MULTI


# --------------------------------------------------------------------------- processors
def test_adapt_processor_writes_tiles_times_keep():
    model, processor = make_next(), next_processor()
    pictures = [picture(N_WIDE, 0), picture(N_BIG, 1)]
    text = ["<s> USER: <image> what is ASSISTANT:", "<s> USER: <image> is ASSISTANT:"]
    crossget.patch(model, method="tome", keep=10, site="tower")
    x = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
    assert (x["input_ids"] == IMG).sum(-1).tolist() == [30, 50]
    with torch.no_grad():
        model.generate(**x, **NEXT.gen)
    crossget.patch(model, method="tome", r=0, site="tower")  # nothing merges: the stock counts
    x = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
    assert (x["input_ids"] == IMG).sum(-1).tolist() == [52, 88]

    model, processor = make_ov(), ov_processor()
    crossget.patch(model, method="crossget", keep=5, site="tower")
    crossget.adapt_processor(processor, model)
    single = dict(images=[picture(O_WIDE, 0), picture(O_MID, 1)],
                  text=["<s> USER: <image> what is ASSISTANT:", "<s> USER: <image> is ASSISTANT:"])
    multi = dict(images=[[picture(O_WIDE, 0), picture(O_TALL, 2)]], text=["<s> USER: <image> <image> is ASSISTANT:"])
    for prompts, counts in ((single, [85, 35]), (multi, [10])):
        x = processor(**prompts, padding=True, return_tensors="pt")
        assert (x["input_ids"] == IMG).sum(-1).tolist() == counts
        with torch.no_grad():
            model.generate(**x, **OV.gen)


# --------------------------------------------------------------------------- config, budgets, unpatch
def test_config_reports_the_site_and_the_defaults():
    model = make_next()
    for kw, site in ((dict(method="tome", keep=20), "projector"), (dict(method="visionzip", keep=12), "tower"),
                     (dict(method="fastv", keep=20), None), (dict(method="divprune", keep=20), "projector"),
                     (dict(method="none"), "projector"), (dict(method="crossget", r=4, site="tower"), "tower")):
        crossget.patch(model, **kw)
        assert crossget.config(model).site == site
    assert crossget.config(model).r == {"vision": (4, 0)} and crossget.config(model).keep == 12
    assert crossget.tokens_per_layer(model, text_len=8) == {"vision": [13, 13], "language": [68, 68, 68]}
    old = {k: v for k, v in crossget.config(model).to_dict().items() if k != "site"}  # saved before site= existed
    assert PatchConfig.from_dict(old).site is None


def test_flops_target_at_the_tower_is_solved_into_r():
    model = make_next()
    crossget.patch(model, method="crossget", flops=0.7, text_len=8, site="tower")
    cfg = crossget.config(model)
    fam = llava_next.FAMILY
    base = fam.prefill_flops(model, text_len=8)
    assert cfg.flops_estimate <= 0.7 < fam.prefill_flops(model, "crossget", cfg.keep + 1, text_len=8, site="tower") / base
    assert cfg.r == {"vision": (17 - 1 - cfg.keep, 0)}
    # nothing merged costs the stock tower and LM
    assert math.isclose(fam.prefill_flops(model, "tome", 16, text_len=8, site="tower"), base)


@pytest.mark.parametrize(
    "build, kw, match",
    [
        (make_next, dict(keep=10, site="vision"), "site must be one of"),
        (make_next, dict(keep=17, site="tower"), "more than the 16 tokens of a tile"),
        (make_next, dict(keep=7, site="tower"), "out of reach at the tower site"),
        (make_next, dict(r=[2, 2], site="tower"), "r must be 0 from layer 1"),
        (make_next, dict(r=4), "r= is for site='tower'"),
        (make_next, dict(keep=10, contextual=2), "contextual= is for site='tower'"),
        (make_next, dict(keep=10, importance="attention"), "is for site='tower'"),
        (make_next, dict(method="fastv", keep=10, site="tower"), "site= does not apply"),
        (make_next, dict(method="divprune", keep=10, site="tower"), "does not run at LLaVA-NeXT's tower site"),
        (make_next, dict(method="visionzip", keep=17), "more than the 16"),
        (make_next, dict(keep=10, site="tower", towers=("text",)), "towers must be"),
        (make_next, dict(keep=10, site="tower", fastv_layer=1), "fastv_layer= is FastV's"),
        (make_next, dict(keep=10, site="tower", contextual=2), "contextual= is VisionZip's"),
        (make_next, dict(keep=10, fastv_layer=1), "fastv_layer= is FastV's"),  # the projector site too
        (make_ov, dict(method="divprune", keep=10, fastv_layer=1), "fastv_layer= is FastV's"),
        (make_next, dict(flops=0.05, site="tower", text_len=8), "out of reach"),
        (make_ov, dict(keep=3, site="tower"), "out of reach at the tower site"),
        (make_ov, dict(method="visionzip", keep=6), "no CLS token"),
        (make_llava, dict(keep=30, site="tower"), "site= is not an option of the LLaVA family"),
    ],
)
def test_bad_sites_and_budgets_raise(build, kw, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **{"method": "crossget", **kw})
    assert not crossget.is_patched(model)


def test_image_tokens_at_the_tower_need_the_image_size():
    model = make_next()
    crossget.patch(model, method="tome", keep=10, site="tower")
    with pytest.raises(ValueError, match="tiles x keep"):
        crossget.image_tokens(model)


@pytest.mark.parametrize("fam", ["next", "ov"])
def test_unpatch_restores_the_stock_model(fam):
    m, sizes, keep = FAMILIES[fam]
    budgets = {"crossget": dict(keep=keep, site="tower"), "tome": dict(r=2, site="tower")}
    if fam == "next":
        budgets["visionzip"] = dict(keep=12)
    check_unpatch_restores(m, budgets, sizes[:2])


@pytest.mark.parametrize("fam", ["next", "ov"])
@pytest.mark.parametrize("clone", [copy.deepcopy, torch_saved], ids=["deepcopy", "pickle"])
def test_a_copy_runs_as_the_original(fam, clone):
    m, sizes, keep = FAMILIES[fam]
    check_copies(m, clone, dict(method="crossget", keep=keep, site="tower"), sizes[:2])


def test_repatching_moves_between_the_sites():
    model = make_next()
    ref = NEXT.generate(model)
    crossget.patch(model, method="crossget", keep=10, site="tower")
    tower_ids = NEXT.generate(model)
    crossget.patch(model, method="crossget", keep=20)
    assert crossget.states(model) == {} and crossget.config(model).site == "projector"
    assert not torch.equal(NEXT.generate(model), tower_ids)
    crossget.patch(model, method="crossget", keep=10, site="tower")
    assert torch.equal(NEXT.generate(model), tower_ids)
    crossget.unpatch(model)
    assert torch.equal(NEXT.generate(model), ref)


# --------------------------------------------------------------------------- VisionZip at NeXT's tower
def naive_visionzip(hidden, attention, keys, dominant, contextual):
    """VisionZip on one tile, by the paper's description: ``hidden`` ``[N, C]`` (CLS first),
    ``attention`` ``[H, N, N]``, ``keys`` ``[N, d]`` head-mean keys. Returns ``[1 + dominant +
    contextual, C]``: CLS, the patches CLS attends to most in spatial order, the rest merged
    into evenly spaced targets by cosine similarity of their keys."""
    score = attention[:, 0, 1:].sum(0)
    picked = sorted((score.argsort(descending=True)[:dominant] + 1).tolist())
    rest = [i for i in range(1, hidden.shape[0]) if i not in picked]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    groups = {t: [t] for t in targets}
    unit = torch.nn.functional.normalize(keys, dim=-1)
    for i in rest:
        if i not in groups:
            groups[targets[int(torch.stack([unit[i] @ unit[t] for t in targets]).argmax())]].append(i)
    merged = [hidden[groups[t]].mean(0) for t in targets]
    return torch.cat([hidden[[0] + picked], torch.stack(merged)])


def test_visionzip_keeps_its_budget_per_tile_and_matches_a_naive_reference():
    sizes, keep = (N_WIDE, N_BIG), 12
    model = make_next()
    crossget.patch(model, method="visionzip", keep=keep)
    cfg = crossget.config(model)
    assert (cfg.site, cfg.contextual, cfg.towers) == ("tower", 2, ())
    x = NEXT.inputs(model, sizes, (4, 4))
    counts, embeds = lm_visual_tokens(model, x, IMG)
    assert counts == [3 * keep, 5 * keep] == [crossget.image_tokens(model, s) for s in sizes]

    stock = make_next("eager")  # the same weights, attention maps returned
    px, _ = next_pixels(sizes)
    layer = stock.model.vision_tower.encoder.layers[0]  # its output is the feature layer (-2)
    for row, size in enumerate(sizes):
        tiles = px[row, : TILES["next"][size]]
        with torch.no_grad():
            out = stock.model.vision_tower(tiles, output_hidden_states=True, output_attentions=True)
            h0 = out.hidden_states[0]
            keys = layer.self_attn.k_proj(layer.layer_norm1(h0)).view(*h0.shape[:2], 2, -1).mean(2)
            picked = torch.stack([naive_visionzip(out.hidden_states[1][t], out.attentions[0][t], keys[t], 10, 2)
                                  for t in range(len(tiles))])
            want = stock.model.multi_modal_projector(picked[:, 1:]).flatten(0, 1)  # "default": CLS dropped
        torch.testing.assert_close(embeds[row][x["input_ids"][row] == IMG], want, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("method, rel", [("tome", 1e-9), ("crossget", 5e-3)])
def test_tower_site_vision_flops_model_matches_a_measured_count(method, rel):
    """The analytic vision side of ``prefill_flops(site="tower")`` against ``FlopCounterMode`` on the
    patched tiny NeXT (eager). ToMe: exact. CrossGET (NeXT: attention-received importance, which
    recomputes Q K^T in merging layers, counted): within 0.5% (the cross token's own small
    products are not modelled)."""
    from crossget.families.visual_site import site_and_lm_flops
    from crossget.flops import count_flops

    fam = llava_next.FAMILY
    model = make_next("eager")
    size = fam.reference_size(model)
    crossget.patch(model, method=method, keep=10, site="tower")
    px, image_sizes = next_pixels([size])
    with torch.no_grad():
        measured = count_flops(model.model.get_image_features, pixel_values=px, image_sizes=image_sizes)
    visual = fam.tiles(model, size) * 10
    lm = site_and_lm_flops(model.model.config.text_config, "none", visual, visual, 8, 2)
    assert fam.prefill_flops(model, method, 10, size, 8, site="tower") - lm == pytest.approx(measured, rel=rel)
