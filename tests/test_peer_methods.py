"""DivPrune and DART in every multimodal-LLM family (docs/method.md §9): where each runs
(DivPrune on each image's projected features before LM layer 0, the prompt holding ``keep``
placeholders; DART in the LM before layer ``K``, the prompt keeping the stock ones), that
exactly ``keep`` visual tokens per image go on and that they are the ones ``divprune_select``
/ ``dart_select`` pick, generation with and without the KV cache (greedy and beams), the
stock model at ``keep`` = every token, budgets, ``flops=`` and unpatching."""

import copy

import pytest
import torch
from mllm_common import MLLM, check_cache_agreement, check_copies, check_unpatch_restores, lm_visual_tokens, torch_saved
from test_config import clip_model
from test_llava import GEN as LLAVA_GEN
from test_llava import IMG as LLAVA_IMG
from test_llava import PATCHES, make_llava
from test_llava import make_prompts as llava_prompts
from test_llava_next import NEXT
from test_llava_next import WIDE as NEXT_WIDE
from test_llava_onevision import OV
from test_llava_onevision import STOCK as OV_STOCK
from test_llava_onevision import WIDE as OV_WIDE
from test_qwen_vl import QWEN
from test_qwen_vl import WIDE as QWEN_WIDE
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llava import modeling_llava as hf_llava

import crossget
from crossget.families import llava, llava_next, llava_onevision, qwen_vl
from crossget.families.registry import family_of
from crossget.methods.dart import dart_select
from crossget.methods.divprune import divprune_select


# --------------------------------------------------------------------------- LLaVA-1.5 as an MLLM
def llava_pixels(sizes, seed=2):
    """One random 32 px image per entry of ``sizes`` (LLaVA-1.5 resizes: the entries only count)."""
    return torch.randn(len(sizes), 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def llava_inputs(model, sizes=(0, 1), lengths=(5, 3)):
    ids, mask = llava_prompts(crossget.image_tokens(model), lengths)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=llava_pixels(sizes)[: ids.shape[0]])


def llava_features(model, sizes):
    """The unpatched model's projected features per image (``[64, D]``)."""
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=llava_pixels(sizes)).pooler_output)


LLAVA = MLLM(make_llava, llava_inputs, llava_features, LLAVA_GEN, LLAVA_IMG, hf_llava.LlavaModel,
             hf_llava.LlavaModel, (0, 1))

# (family, two images of one count, that count, keep, LM depth the tiny model allows K at)
FAMILIES = {
    "llava": (LLAVA, (0, 1), PATCHES, 20, {}),
    "next": (NEXT, (NEXT_WIDE, NEXT_WIDE), 52, 20, {}),
    "ov": (OV, (OV_WIDE, OV_WIDE), OV_STOCK[OV_WIDE], 12, {"fastv_layer": 1}),
    "qwen": (QWEN, (QWEN_WIDE, QWEN_WIDE), 24, 7, {"fastv_layer": 1}),
}
PREFILL_FLOPS = {"llava": llava.prefill_flops, "next": llava_next.prefill_flops, "ov": llava_onevision.prefill_flops,
                 "qwen": qwen_vl.prefill_flops}


def budget(name, method, keep=None):
    """Patch kwargs of ``method`` at ``keep`` (default the family's) on family ``name``."""
    _, _, _, default, lm = FAMILIES[name]
    return dict(keep=default if keep is None else keep, **(lm if method == "dart" else {}))


# --------------------------------------------------------------------------- DivPrune: before LM layer 0
@pytest.mark.parametrize("name", list(FAMILIES))
def test_divprune_feeds_the_lm_the_tokens_divprune_select_picks(name):
    m, sizes, stock, keep, _ = FAMILIES[name]
    model = m.make()
    features = m.features(model, sizes)
    assert [f.shape[0] for f in features] == [stock] * len(sizes)
    crossget.patch(model, method="divprune", keep=keep)
    assert crossget.image_tokens(model, sizes[0]) == keep  # the prompt holds keep placeholders
    x = m.inputs(model, sizes, (4, 4))
    counts, embeds = lm_visual_tokens(model, x, m.token)
    assert counts == [keep] * len(sizes)  # counted from the LM's input
    for row, f in enumerate(features):
        want = f[divprune_select(f, keep)]  # a direct call on the stock features, in spatial order
        torch.testing.assert_close(embeds[row][x["input_ids"][row] == m.token], want, rtol=1e-5, atol=1e-6)
    crossget.unpatch(model)
    assert lm_visual_tokens(model, m.inputs(model, sizes, (4, 4)), m.token)[0] == [stock] * len(sizes)


def test_divprune_at_the_site_takes_images_of_different_sizes():
    model = NEXT.make()
    crossget.patch(model, method="divprune", keep=20)
    x = NEXT.inputs(model, NEXT.sizes, (4, 4))
    assert lm_visual_tokens(model, x, NEXT.token)[0] == [20, 20]


# --------------------------------------------------------------------------- DART: before LM layer K
def rotated_keys(attn, k, rope):
    """Keys after rotary (upstream's ``apply_rotary_pos_emb``), heads concatenated: ``[B, L, KV * hd]``."""
    b, length, _ = k.shape
    k = k.view(b, length, -1, attn.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, *rope)
    return k.transpose(1, 2).flatten(2)


def stock_layer_inputs(model, x, layer):
    """Layer ``layer - 1``'s output, its key projection and its rotary embedding, for ``x``."""
    lm = model.model.language_model
    seen = {}
    prev = lm.layers[layer - 1]

    def keep(key, value):
        seen.setdefault(key, value)  # the first call (the prefill); a hook returning None changes nothing

    hooks = [
        prev.register_forward_pre_hook(lambda mod, a, k: keep("rope", k["position_embeddings"]), with_kwargs=True),
        prev.self_attn.k_proj.register_forward_hook(lambda mod, a, out: keep("k", out)),
        prev.register_forward_hook(lambda mod, a, out: keep("out", out[0] if isinstance(out, tuple) else out)),
    ]
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    return seen["out"], rotated_keys(prev.self_attn, seen["k"], seen["rope"])


def dart_reference(model, x, token, layer, keep):
    """``[B, L']`` positions layer ``layer`` should see: every text position and, per image,
    ``dart_select`` on layer ``layer - 1``'s output after the final norm, 4 image pivots and
    up to 4 text pivots (the real tokens after the image that are not image tokens) by the L1
    norm of layer ``layer - 1``'s rotated keys; and that layer's output."""
    out, keys = stock_layer_inputs(model, x, layer)
    with torch.no_grad():
        hidden = model.model.language_model.norm(out)
    ids, mask = x["input_ids"], x["attention_mask"].bool()
    rows = []
    for b in range(ids.shape[0]):
        img = (ids[b] == token).nonzero()[:, 0]
        text = ((ids[b] != token) & mask[b]).nonzero()[:, 0]
        after = text[text > img[-1]]
        tp = min(4, len(after))
        sel = dart_select(hidden[b, img][None], keep, min(4, keep), norm_of=keys[b, img][None],
                          text_hidden=hidden[b, after][None], text_pivots=tp, text_norm_of=keys[b, after][None])[0]
        rows.append(torch.cat([(ids[b] != token).nonzero()[:, 0], img[sel]]).sort().values)
    return torch.stack(rows), out


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("small", [False, True])
def test_dart_keeps_at_layer_k_the_tokens_dart_select_picks(name, small):
    m, sizes, stock, keep, _ = FAMILIES[name]
    keep = 3 if small else keep  # 3: fewer than the 4 image pivots, all of them pivots
    model = m.make()
    crossget.patch(model, method="dart", **budget(name, "dart", keep))
    layer = crossget.config(model).fastv_layer
    assert crossget.image_tokens(model, sizes[0]) == stock  # the prompt keeps the stock placeholders
    x = m.inputs(model, sizes, (5, 3))
    assert lm_visual_tokens(model, x, m.token)[0] == [stock] * len(sizes)
    assert lm_visual_tokens(model, x, m.token, layer - 1)[0] == [stock] * len(sizes)
    counts, seen = lm_visual_tokens(model, x, m.token, layer)
    assert counts == [keep] * len(sizes)  # counted at layer K
    positions, out = dart_reference(model, x, m.token, layer, keep)
    want = out.gather(1, positions.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    torch.testing.assert_close(seen, want, rtol=1e-5, atol=1e-6)
    assert crossget.tokens_per_layer(model, text_len=6, image_size=sizes[0])["language"][layer:] == \
        [keep + 6] * (len(model.model.language_model.layers) - layer)


def test_dart_runs_with_sdpa_and_eager_alike():
    """DART reads only the layer's key projection and hidden states: SDPA needs no eager attention."""
    picks = []
    for impl in ("sdpa", "eager"):
        model = make_llava(impl)
        lm = model.model.language_model
        crossget.patch(model, method="dart", keep=20)
        assert lm.config._attn_implementation == impl  # not forced to eager
        x = LLAVA.inputs(model, (0, 1), (4, 4))  # no padding (whose states SDPA and eager leave apart)
        picks.append(lm_visual_tokens(model, x, LLAVA.token, 2)[1])
    torch.testing.assert_close(picks[0], picks[1], rtol=1e-4, atol=1e-5)


def test_dart_refuses_a_batch_with_different_counts():
    model = NEXT.make()
    crossget.patch(model, method="dart", keep=20)
    with pytest.raises(ValueError, match="dart on LLaVA-NeXT ranks one count"):
        NEXT.generate(model, NEXT.sizes)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_greedy_and_beams_agree_with_and_without_the_cache(name, method):
    m, sizes, _, _, _ = FAMILIES[name]
    check_cache_agreement(m, method, budget(name, method), sizes)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_keep_every_token_gives_the_stock_ids(name, method):
    m, sizes, stock, _, _ = FAMILIES[name]
    model = m.make()
    ref_ids, ref_beams = m.generate(model, sizes), m.generate(model, sizes, num_beams=2)
    ref_logits = m.logits(model, sizes)
    crossget.patch(model, method=method, **budget(name, method, stock))
    assert torch.equal(m.generate(model, sizes), ref_ids)
    assert torch.equal(m.generate(model, sizes, num_beams=2), ref_beams)
    torch.testing.assert_close(m.logits(model, sizes), ref_logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["divprune", "dart"])
@pytest.mark.parametrize("keep, match", [(0, "positive"), (-2, "positive"), (2.5, "int"), (True, "int")])
def test_bad_budgets_raise(name, method, keep, match):
    m = FAMILIES[name][0]
    model = m.make()
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, method=method, **budget(name, method, keep))
    assert not crossget.is_patched(model)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_keep_above_what_an_image_gives_raises(name, method):
    m, sizes, stock, _, _ = FAMILIES[name]
    model = m.make()
    if name == "qwen":  # refused at the forward that sees the image
        crossget.patch(model, method=method, **budget(name, method, stock + 1))
        with pytest.raises(ValueError, match=f"more than the {stock}"):
            m.logits(model, sizes)
    else:
        with pytest.raises(ValueError, match="more than the"):
            crossget.patch(model, method=method, **budget(name, method, 10_000))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dart_layer_must_be_inside_the_lm(name):
    m = FAMILIES[name][0]
    model = m.make()
    n = len(model.model.language_model.layers)
    for layer in (0, n, 1.5):
        with pytest.raises(ValueError, match="fastv_layer"):
            crossget.patch(model, method="dart", keep=5, fastv_layer=layer)


@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_encoder_families_refuse_them(method):
    with pytest.raises(ValueError, match="for CLIP models"):
        crossget.patch(clip_model(), method=method, r=2)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_flops_target_solves_the_largest_keep(name, method):
    m, _, _, _, lm = FAMILIES[name]
    model = m.make()
    image = None  # planned for the family's reference image
    target = 0.9
    crossget.patch(model, method=method, flops=target, text_len=8, **(lm if method == "dart" else {}))
    cfg = crossget.config(model)
    assert cfg.flops == target and cfg.flops_estimate <= target
    k = cfg.fastv_layer if method == "dart" else 2
    flops = PREFILL_FLOPS[name]
    base = flops(model, "none", None, image, 8)
    assert flops(model, method, cfg.keep, image, 8, k) / base == pytest.approx(cfg.flops_estimate)
    assert flops(model, method, cfg.keep + 1, image, 8, k) / base > target
    # the selection's own cost is counted: DART costs more than FastV at the same keep, and
    # DivPrune keeping every token more than the stock model (its distance matrix)
    if method == "dart":
        assert flops(model, "dart", cfg.keep, image, 8, k) > flops(model, "fastv", cfg.keep, image, 8, k)
    else:
        assert flops(model, "divprune", reference_stock(model), image, 8) > base
    twin = m.make()
    crossget.patch_from_config(twin, cfg.to_dict())
    assert crossget.config(twin) == cfg


def reference_stock(model):
    """Visual tokens of the image ``flops=`` is planned for, unreduced."""
    fam = family_of(model)
    if fam.name == "LLaVA":
        return llava.stock_image_tokens(model)
    return fam.stock_image_tokens(model, fam.default_image(model, None))


# --------------------------------------------------------------------------- unpatching and copies
def test_unpatch_restores_every_family():
    for name, (m, sizes, _, _, _) in FAMILIES.items():
        check_unpatch_restores(m, {method: budget(name, method) for method in ("divprune", "dart")}, sizes)


@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_copies_run_and_unpatch_on_their_own(method):
    check_copies(NEXT, torch_saved, dict(method=method, **budget("next", method)), NEXT.sizes if method == "divprune"
                 else FAMILIES["next"][1])
    model = make_llava()
    crossget.patch(model, method=method, keep=20)
    twin = copy.deepcopy(model)
    assert torch.equal(LLAVA.generate(twin), LLAVA.generate(model))
