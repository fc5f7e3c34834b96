"""crossget on Qwen3-VL (full-attention vision tower, patch merger, deep-stack features added
to the first LM layers, interleaved 3-D M-RoPE): the projector-site reduction (tome, crossget)
with the deep-stack features reduced by the same groups, and FastV, on a tiny random model.

Exactness of the stock path, generation with and without a KV cache (greedy and beams), the
visual and deep-stack tokens the language model receives, M-RoPE positions, batches of images
with different grids, budgets and errors, unpatch / copies."""


import pytest
import torch
from mllm_common import (
    BAD_BUDGETS,
    MLLM,
    LMInputs,
    check_bad_budget,
    check_cache_agreement,
    check_encodes_once,
    check_fastv_prunes,
    check_fastv_refuses,
    check_lm_receives_reduced,
    check_stock_path,
    lm_visual_tokens,
)
from test_qwen_vl import (  # the Qwen-VL test builders: the same tiny shapes, prompts and checks
    END,
    GEN,
    IMG,
    KEEP,
    MERGE,
    PATCH,
    PATCH_DIM,
    SMALL,
    START,
    TALL,
    TEMPORAL,
    VIDEO,
    WIDE,
    WithoutVideos,
    check_adapt_processor,
    check_bare_model,
    check_flops_target,
    check_grids_batch_matches_single_prompts,
    check_keep_above_an_images_count,
    check_kept_positions,
    check_output_capture,
    inputs,
    pixels,
    tiny_processor,
    unpatch_and_copy_tests,
)
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

import crossget
from crossget.families import qwen3_vl
from crossget.families.visual_site import SITE_METHODS, reduce_visual_tokens

LEVELS = [0, 1]  # deep-stack: the outputs of vision blocks 0 and 1, added after LM layers 0 and 1


def make_qwen3(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3, num_position_embeddings=16,
                  deepstack_visual_indexes=LEVELS)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                     mrope_interleaved=True))
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMG, video_token_id=VIDEO,
                        vision_start_token_id=START, vision_end_token_id=END, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def stock_output(model, grids):
    px, grid = pixels(grids)
    with torch.no_grad():
        return hf.Qwen3VLModel.get_image_features(model.model, px, grid)


def stock_features(model, grids):
    return list(stock_output(model, grids).pooler_output)


QWEN3 = MLLM(make_qwen3, inputs, stock_features, GEN, IMG, qwen3_vl.Qwen3VLModel, hf.Qwen3VLModel, (WIDE, TALL))
generate, logits = QWEN3.generate, QWEN3.logits


class DeepStack:
    """What the language model receives for deep-stack injection in each of its calls."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, _args, kwargs):
        self.calls.append((kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")))

    def remove(self):
        self.handle.remove()


# --------------------------------------------------------------------------- the groups
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("keep", [1, 5, 11, 24])
def test_reduce_with_groups_is_reduce_visual_tokens_and_replays_its_groups(method, keep):
    g = torch.Generator().manual_seed(keep)
    x, y = torch.randn(24, 16, generator=g), torch.randn(24, 5, generator=g)
    tokens, first, groups = qwen3_vl.reduce_with_groups(x, keep, method)
    ref_tokens, ref_first = reduce_visual_tokens(x, keep, method)
    assert torch.equal(tokens, ref_tokens) and torch.equal(first, ref_first)
    assert torch.allclose(groups(x), tokens, atol=1e-6)  # replayed on the main tokens: the same
    # the groups as an averaging matrix (replayed on the identity): a partition, uniform weights
    a = groups(torch.eye(24, dtype=torch.float64))  # [keep, 24]
    member = a > 0
    assert member.sum(0).tolist() == [1] * 24  # every token in exactly one group
    assert torch.allclose(a.sum(1), torch.ones(keep, dtype=torch.float64))
    assert torch.allclose(a[member], (1 / member.sum(1, keepdim=True).double()).expand_as(a)[member])
    assert torch.equal(member.double().argmax(1), first)  # first member = first
    assert torch.allclose(a.float() @ x, tokens, atol=1e-5)  # they are the groups of the main tokens
    assert torch.allclose(groups(y), a.float() @ y, atol=1e-5)
    with pytest.raises(ValueError, match=r"reduce \[24, D\]"):
        groups(y[:20])


# --------------------------------------------------------------------------- stock path
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_none_and_unpatched_generate_stock_ids(impl):
    def on_none(model):
        assert crossget.image_tokens(model, WIDE) == 24

    model = check_stock_path(QWEN3, impl, on_none)
    out = stock_output(model, (WIDE, TALL, SMALL))
    assert [f.shape[0] for f in out.pooler_output] == [24, 24, 8]
    assert len(out.deepstack_features) == len(LEVELS)
    assert [qwen3_vl.stock_image_tokens(model, g) for g in (WIDE, TALL, SMALL)] == [24, 24, 8]


def test_output_capture_still_works_on_the_swapped_class():
    check_output_capture(QWEN3, 3)


# --------------------------------------------------------------------------- reduced generation
@pytest.mark.parametrize("method", SITE_METHODS)
def test_reduced_generation_same_with_and_without_cache(method):
    model, stock = check_cache_agreement(QWEN3, method, dict(keep=KEEP), (WIDE, TALL), beams=3)
    assert crossget.config(model).method == method and crossget.config(model).keep == KEEP
    assert logits(model).shape[1] == stock.shape[1] - (24 - KEEP)


def test_generate_encodes_images_once():
    check_encodes_once(QWEN3, lambda model: model.model.visual, KEEP)


@pytest.mark.parametrize("method", SITE_METHODS)
def test_lm_receives_keep_tokens_per_image_which_are_the_reduced_features(method):
    check_lm_receives_reduced(QWEN3, method, KEEP, (WIDE, TALL), [24, 24], lengths=(5, 3), rtol=0, atol=0)


@pytest.mark.parametrize("via", ["forward", "generate"])
@pytest.mark.parametrize("method", SITE_METHODS)  # a selecting method too, where there is one: its indices
def test_deepstack_features_reaching_the_lm_are_reduced_with_the_main_groups(method, via):
    model = make_qwen3()
    grids = (WIDE, SMALL)
    stock = stock_output(model, grids)
    crossget.patch(model, method=method, keep=KEEP)
    x = inputs(model, grids)
    seen = DeepStack(model)
    with torch.no_grad():
        model(**x) if via == "forward" else model.generate(**x, **GEN)
    seen.remove()
    masks, embeds = seen.calls[0]
    assert torch.equal(masks, x["input_ids"] == IMG) and masks.sum(-1).tolist() == [KEEP, KEEP]
    assert len(embeds) == len(LEVELS) and all(e.shape == (2 * KEEP, 64) for e in embeds)
    for i, main in enumerate(stock.pooler_output):
        reduced = reduce_visual_tokens(main, KEEP, method)[0]
        _, _, groups = qwen3_vl.reduce_with_groups(main, KEEP, method)
        a = groups(torch.eye(main.shape[0], dtype=torch.float64)).float()  # [keep, L_i] averaging matrix
        assert torch.allclose(a @ main, reduced, atol=1e-5)  # the main tokens' groups
        for level, e in enumerate(embeds):
            want = a @ stock.deepstack_features[level][i]  # the same groups on the stock deep-stack level
            torch.testing.assert_close(e[i * KEEP:(i + 1) * KEEP], want, rtol=1e-5, atol=1e-5)
    if via == "generate":
        assert all(m is None for m, _ in seen.calls[1:])  # decode steps add nothing


def test_deepstack_features_change_the_output():
    """The deep-stack features matter (a test that ignored them would not notice a wrong reduction)."""
    model = make_qwen3()
    crossget.patch(model, method="crossget", keep=KEEP)
    x = inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
        for m in model.model.visual.deepstack_merger_list:
            m.linear_fc2.bias.add_(1.0)
        out = model(**x).logits
    assert not torch.allclose(out, ref, atol=1e-3)


# --------------------------------------------------------------------------- positions
@pytest.mark.parametrize("via", ["forward", "generate"])
def test_kept_tokens_take_the_stock_position_of_their_first_index(via):
    check_kept_positions(QWEN3, qwen3_vl, via)


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_of_different_grids_gives_keep_each_and_matches_single_prompts(method):
    check_grids_batch_matches_single_prompts(QWEN3, method)


# --------------------------------------------------------------------------- placeholders and processor
class ImageTextProcessor(WithoutVideos, Qwen3VLProcessor):
    """A ``Qwen3VLProcessor`` without its video processor."""


def test_adapt_processor_writes_the_count_the_model_needs():
    # the processor's own resize (its defaults): grids (1, 16, 20) and (1, 24, 16)
    model = check_adapt_processor(QWEN3, tiny_processor(ImageTextProcessor), [80, 96], "Qwen3VLProcessor")
    with pytest.raises(ValueError, match="image_grid_thw"):
        crossget.image_tokens(model)  # the stock count depends on the image


# --------------------------------------------------------------------------- budgets and errors
@pytest.mark.parametrize(
    "kwargs, match",
    BAD_BUDGETS + [
        (dict(method="fastv", keep=8, fastv_layer=1), "deep-stack"),  # prunes before level 1 is added
        (dict(method="fastv", keep=8, fastv_layer=3), "fastv_layer"),  # a 3-layer LM
        (dict(r=4), "not an option of the Qwen3-VL"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    check_bad_budget(QWEN3, kwargs, match)


def test_keep_above_an_images_count_and_mismatched_prompts_raise():
    model = check_keep_above_an_images_count(QWEN3)
    crossget.patch(model, method="crossget", keep=KEEP)
    with pytest.raises(ValueError, match=r"adapt_processor.*image_tokens"):
        model(**inputs(model, counts=[24, 24]))


test_unpatch_restores_stock_outputs_exactly, test_copies_run_and_unpatch_on_their_own = unpatch_and_copy_tests(QWEN3, 2)


# --------------------------------------------------------------------------- fastv
def test_default_fastv_layer_is_refused_with_three_deepstack_levels():
    model = make_qwen3()
    model.model.config.vision_config.deepstack_visual_indexes = [0, 1, 2]  # as the released models: 3 levels
    with pytest.raises(ValueError, match=r"fastv_layer=2 prunes before the deep-stack.*at least 3"):
        crossget.patch(model, method="fastv", keep=KEEP)
    assert not crossget.is_patched(model)


def test_dart_prunes_at_layer_k_after_the_deepstack_levels_and_caches_agree():
    model = make_qwen3()
    with pytest.raises(ValueError, match="deep-stack"):
        crossget.patch(model, method="dart", keep=KEEP, fastv_layer=1)
    crossget.patch(model, method="dart", keep=KEEP, fastv_layer=2)
    x = inputs(model)
    assert lm_visual_tokens(model, x, IMG, 1)[0] == [24, 24]
    assert lm_visual_tokens(model, x, IMG, 2)[0] == [KEEP, KEEP]
    for kw in (dict(), dict(num_beams=3)):
        assert torch.equal(generate(model, use_cache=False, **kw), generate(model, **kw))


def test_fastv_prunes_after_the_deepstack_levels_on_normed_queries_and_caches_agree():
    model = check_fastv_prunes(QWEN3, dict(keep=KEEP, fastv_layer=2), (WIDE, TALL), 24)
    s = qwen3_vl.site(model)
    assert sum(isinstance(h, qwen3_vl.NormedCapture) for x in model.modules() for h in x._forward_hooks.values()) == 2
    attn = model.model.language_model.layers[1].self_attn
    captured = {}
    attn.q_norm.register_forward_hook(lambda m, a, out: captured.update(q=out.flatten(-2)))
    real_prune = s.fastv.prune

    def prune(args, kwargs):
        captured["ranked"] = s.fastv.q
        return real_prune(args, kwargs)

    s.fastv.prune = prune
    logits(model)
    assert torch.equal(captured["ranked"], captured["q"])  # the ranking reads the normed queries
    del s.fastv.prune
    for kw in (dict(), dict(num_beams=3)):
        assert torch.equal(generate(model, use_cache=False, **kw), generate(model, **kw))
    check_fastv_refuses(QWEN3, dict(keep=KEEP, fastv_layer=2), (WIDE, SMALL), r"Qwen3-VL ranks one count")


# --------------------------------------------------------------------------- the bare model, FLOPs
def test_bare_qwen3_vl_model_patches_and_saves_the_stock_architecture(tmp_path):
    assert QWEN3.stock.__name__ == "Qwen3VLModel"
    check_bare_model(QWEN3, tmp_path)


@pytest.mark.parametrize("grid", [WIDE, SMALL], ids=str)
def test_analytic_vision_flops_are_the_measured_ones(grid):
    from crossget.flops import count_flops

    model = make_qwen3()
    px, thw = pixels([grid])
    with torch.no_grad():
        measured = count_flops(model.model.visual, px, grid_thw=thw)
    assert qwen3_vl.vision_tower_flops(model, grid) == measured


def test_flops_target_solves_keep_and_replays():
    # a 256-pixel square (Qwen3-VL's smallest area): grid (1, 64, 64), 1024 merged tokens; the
    # vision tower is 87% of this tiny model's prefill, so 0.8 is out of reach
    check_flops_target(QWEN3, qwen3_vl, 0.95, 256, 1024, 0.8)


# --------------------------------------------------------------------------- videos
VIDEO_GRID = (2, 4, 4)  # two temporal patches (one placeholder run each, after its timestamp), 4 tokens per frame


def image_and_video_prompt(image_count):
    frames = [[90 + f, START] + [VIDEO] * 4 + [END] for f in range(VIDEO_GRID[0])]  # "<t seconds>" then the frame
    ids = torch.tensor([[1, 5, START] + [IMG] * image_count + [END, 6] + sum(frames, []) + [7, 8]])
    types = (ids == IMG).long() + 2 * (ids == VIDEO).long()
    return ids, types


def test_videos_run_unreduced_beside_reduced_images():
    model = make_qwen3()
    grids = (WIDE,)
    px, grid = pixels(grids)
    vid = torch.randn(int(torch.tensor(VIDEO_GRID).prod()), PATCH_DIM, generator=torch.Generator().manual_seed(5))
    vgrid = torch.tensor([VIDEO_GRID])
    first = reduce_visual_tokens(stock_features(model, grids)[0], KEEP, "crossget")[1]
    stock_ids, stock_types = image_and_video_prompt(24)
    stock, _ = hf.Qwen3VLModel.get_rope_index(model.model, stock_ids, stock_types, grid, vgrid.clone())
    with torch.no_grad():
        stock_video = hf.Qwen3VLModel.get_video_features(model.model, vid, vgrid)
    crossget.patch(model, method="crossget", keep=KEEP)
    ids, types = image_and_video_prompt(KEEP)
    x = dict(input_ids=ids, mm_token_type_ids=types, attention_mask=torch.ones_like(ids), pixel_values=px,
             image_grid_thw=grid, pixel_values_videos=vid, video_grid_thw=vgrid)
    seen, deep = LMInputs(model), DeepStack(model)
    with torch.no_grad():
        model(**x)
    seen.remove()
    deep.remove()
    pos = seen.calls[0]["position_ids"][:, 0]
    image, ref_image = ids[0] == IMG, stock_ids[0] == IMG
    assert torch.equal(pos[:, image], stock[:, 0][:, ref_image][:, first])
    assert torch.equal(pos[:, ~image], stock[:, 0][:, ~ref_image])  # text and every video frame: stock
    masks, embeds = deep.calls[0]
    assert torch.equal(masks[0], image | (ids[0] == VIDEO))
    video_rows = (ids[0] == VIDEO)[masks[0]]
    for level, e in enumerate(embeds):  # the video's deep-stack features as upstream's
        assert torch.equal(e[video_rows], torch.cat(stock_video.deepstack_features[level]))
    with pytest.raises(ValueError, match="video_grid_thw"):  # generate drops it once encoded, as for Qwen2.5-VL
        model.generate(**x, **GEN)
    crossget.unpatch(model)
    with torch.no_grad():  # the stock model takes the stock prompt
        model(**{**x, "input_ids": stock_ids, "mm_token_type_ids": stock_types,
                 "attention_mask": torch.ones_like(stock_ids)})
