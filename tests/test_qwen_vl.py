"""crossget on Qwen2.5-VL (windowed vision tower, patch merger, 3-D M-RoPE): the projector-site
reduction (tome, crossget) on a tiny random model built from its config.

Exactness of the stock path, generation with and without a KV cache (greedy and beams), the
visual tokens and M-RoPE positions the language model receives, batches of images with
different grids, placeholders and the processor, budgets and errors, unpatch / copies."""

import copy

import numpy as np
import pytest
import torch
from mllm_common import (
    BAD_BUDGETS,
    MLLM,
    LMInputs,
    check_bad_budget,
    check_cache_agreement,
    check_copies,
    check_encodes_once,
    check_fastv_refuses,
    check_lm_receives_reduced,
    check_stock_path,
    check_unpatch_restores,
    left_padded,
    torch_saved,
    word_tokenizer,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.processing_utils import ProcessorMixin

import crossget
from crossget.families import qwen_vl
from crossget.families.visual_site import reduce_visual_tokens

IMG, VIDEO, START, END = 120, 121, 122, 123  # <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>
PATCH, MERGE, TEMPORAL = 4, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH  # one row of pixel_values
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG, VIDEO, START, END])
WIDE, TALL, SMALL = (1, 8, 12), (1, 12, 8), (1, 4, 8)  # image_grid_thw rows: 24, 24 and 8 merged tokens
KEEP = 7


def make_qwen(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3,
                  window_size=16, fullatt_block_indexes=[1])  # windows of 2 x 2 merged tokens, then full attention
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))  # head_dim 16
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMG, video_token_id=VIDEO,
                           vision_start_token_id=START, vision_end_token_id=END)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def pixels(grids, seed=2):
    """Random patches ``[sum(t h w), 3 * 2 * 4 * 4]`` and ``image_grid_thw`` ``[images, 3]``."""
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g), grid


def make_prompts(counts, lengths, seed=1):
    """Left-padded prompts as the processor writes them: text, one image per prompt
    (``<|vision_start|>``, ``counts[i]`` ``<|image_pad|>``, ``<|vision_end|>``), text; and
    their ``mm_token_type_ids`` (1 on the image placeholders)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c, n in zip(counts, lengths):
        text = torch.randint(3, 100, (n + 2,), generator=g).tolist()
        rows.append([1] + text[:2] + [START] + [IMG] * c + [END] + text[2:])
    ids, mask = left_padded(rows)
    return ids, mask, (ids == IMG).long()


def inputs(model, grids=(WIDE, TALL), lengths=(5, 3), counts=None):
    counts = [crossget.image_tokens(model, g) for g in grids] if counts is None else counts
    ids, mask, types = make_prompts(counts, lengths)
    px, grid = pixels(grids)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, pixel_values=px, image_grid_thw=grid)


def stock_features(model, grids):
    """The unpatched model's merger output per image (``[t h w / 4, D]``)."""
    px, grid = pixels(grids)
    with torch.no_grad():
        return list(hf.Qwen2_5_VLModel.get_image_features(model.model, px, grid).pooler_output)


QWEN = MLLM(make_qwen, inputs, stock_features, GEN, IMG, qwen_vl.Qwen2_5_VLModel, hf.Qwen2_5_VLModel, (WIDE, TALL))
generate, logits = QWEN.generate, QWEN.logits


# --------------------------------------------------------------------------- stock path
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_none_and_unpatched_generate_stock_ids(impl):
    def on_none(model):
        assert crossget.image_tokens(model, WIDE) == 24

    model = check_stock_path(QWEN, impl, on_none)
    assert [f.shape[0] for f in stock_features(model, (WIDE, TALL, SMALL))] == [24, 24, 8]
    assert [qwen_vl.stock_image_tokens(model, g) for g in (WIDE, TALL, SMALL)] == [24, 24, 8]


def check_output_capture(m, layers):
    """``output_hidden_states`` / ``output_attentions`` on the swapped class: with ``none`` as
    the stock model's (``layers`` LM layers), with ``crossget`` over the reduced sequence."""
    model = m.make("eager")
    with torch.no_grad():
        ref = model(**m.inputs(model), output_hidden_states=True, output_attentions=True)
    crossget.patch(model, method="none")
    with torch.no_grad():
        out = model(**m.inputs(model), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
    crossget.patch(model, method="crossget", keep=KEEP)
    with torch.no_grad():
        out = model(**m.inputs(model), output_hidden_states=True)
    assert len(out.hidden_states) == layers + 1 and out.hidden_states[0].shape[1] == out.logits.shape[1]


def test_output_capture_still_works_on_the_swapped_class():
    check_output_capture(QWEN, 2)


# --------------------------------------------------------------------------- reduced generation
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_reduced_generation_same_with_and_without_cache(method):
    model, stock = check_cache_agreement(QWEN, method, dict(keep=KEEP), (WIDE, TALL), beams=3)
    assert crossget.config(model).method == method and crossget.config(model).keep == KEEP
    assert crossget.config(model).towers == ()
    assert logits(model).shape[1] == stock.shape[1] - (24 - KEEP)  # both images: 24 tokens -> KEEP


def test_generate_encodes_images_once_and_no_state_stays_on_the_model():
    # generate encodes before the prefill; positions are placed from that output
    model = check_encodes_once(QWEN, lambda model: model.model.visual, KEEP)
    s = qwen_vl.site(model)
    assert (s.method, s.keep, s.fastv, s.handles) == ("crossget", KEEP, None, [])
    assert set(vars(s)) == {"method", "keep", "family", "counts", "fastv", "handles"}  # settings only


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_lm_receives_keep_tokens_per_image_which_are_the_reduced_features(method):
    check_lm_receives_reduced(QWEN, method, KEEP, (WIDE, TALL), [24, 24], lengths=(5, 3), rtol=0, atol=0)


def stock_positions(model, grids, lengths, m=QWEN, family=qwen_vl):
    """Upstream get_rope_index (``m.stock``'s) on the stock prompts: positions [3, B, S], ids,
    mask, deltas."""
    counts = [family.stock_image_tokens(model, g) for g in grids]
    ids, mask, types = make_prompts(counts, lengths)
    pos, deltas = m.stock.get_rope_index(model.model, ids, types, torch.tensor(grids), attention_mask=mask)
    return pos, ids, mask, deltas


def check_kept_positions(m, family, via):
    """Each kept token takes the stock (t, h, w) of its smallest covered index, text the stock
    positions, the rope deltas the stock ones plus the tokens fewer (``via`` a forward or generate)."""
    model = m.make()
    grids, lengths = (WIDE, SMALL), (5, 3)
    firsts = [reduce_visual_tokens(f, KEEP, "tome")[1] for f in m.features(model, grids)]
    stock, stock_ids, stock_mask, stock_deltas = stock_positions(model, grids, lengths, m, family)
    crossget.patch(model, method="tome", keep=KEEP)
    x = m.inputs(model, grids, lengths)
    seen = LMInputs(model)
    with torch.no_grad():
        if via == "forward":
            model(**x)
        else:
            model.generate(**x, **m.gen)
    seen.remove()
    pos = seen.calls[0]["position_ids"]
    pos = pos[1:] if pos.shape[0] == 4 else pos  # generate adds a text row
    if via == "generate":
        assert torch.equal(seen.calls[0]["position_ids"][0], (x["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    for row in range(2):
        real, stock_real = x["attention_mask"][row].bool(), stock_mask[row].bool()
        ids, got = x["input_ids"][row][real], pos[:, row][:, real]
        ref_ids, ref = stock_ids[row][stock_real], stock[:, row][:, stock_real]
        image, ref_image = ids == IMG, ref_ids == IMG
        # visual: the stock (t, h, w) of each kept token's smallest covered index
        assert torch.equal(got[:, image], ref[:, ref_image][:, firsts[row]])
        # text: before and after the image as in the stock model
        assert torch.equal(got[:, ~image], ref[:, ~ref_image])
    assert torch.equal(model.model.rope_deltas, stock_deltas + torch.tensor([[24 - KEEP], [8 - KEEP]]))
    if via == "generate":  # the decode steps continue the stock text positions
        last = seen.calls[1]["position_ids"]
        assert torch.equal(last[1:, :, -1], (stock[:, :, -1] + 1))


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_kept_tokens_take_the_stock_position_of_their_first_index(via):
    check_kept_positions(QWEN, qwen_vl, via)


def check_grids_batch_matches_single_prompts(m, method):
    """A batch of images with different grids: each prompt generates as it does alone."""
    model = m.make()
    crossget.patch(model, method=method, keep=KEEP)
    grids, lengths = (WIDE, SMALL), (2, 6)
    both = m.generate(model, grids, lengths)
    x = m.inputs(model, grids, lengths)
    px, grid = pixels(grids)
    for row in range(2):
        keep_rows = x["attention_mask"][row].bool()
        start = int(grid[:row].prod(-1).sum())
        single = {k: x[k][row:row + 1, keep_rows] for k in ("input_ids", "mm_token_type_ids", "attention_mask")}
        single.update(pixel_values=px[start:start + int(grid[row].prod())], image_grid_thw=grid[row:row + 1])
        with torch.no_grad():
            alone = model.generate(**single, **m.gen)[:, single["input_ids"].shape[1]:]
        assert torch.equal(alone[0], both[row])


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_of_different_grids_gives_keep_each_and_matches_single_prompts(method):
    check_grids_batch_matches_single_prompts(QWEN, method)


# --------------------------------------------------------------------------- placeholders and processor
class WithoutVideos:
    """A Qwen-VL processor's ``__init__`` without its video processor (which needs torchvision,
    not installed here; put first among the bases): images and text are processed by upstream's code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageTextProcessor(WithoutVideos, Qwen2_5_VLProcessor):
    """A ``Qwen2_5_VLProcessor`` without its video processor."""


def tiny_processor(cls=ImageTextProcessor):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = {"<|image_pad|>": IMG, "<|video_pad|>": VIDEO, "<|vision_start|>": START, "<|vision_end|>": END}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "what": 6, "is": 7, **special}
    tokenizer = word_tokenizer(vocab, special, padding_side="left")
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return cls(image_processor=images, tokenizer=tokenizer)


def check_adapt_processor(m, processor, stock, name):
    """The processor writes ``keep`` placeholders when reduced, the stock counts ``stock`` of
    two images otherwise (and after unpatch); refuses another processor (``name`` in the
    error). Returns the unpatched model."""
    model = m.make()
    sizes = [(64, 80), (96, 64)]  # resized to multiples of 8: grids (1, 16, 20) and (1, 24, 16)
    pictures = [(np.random.default_rng(i).random((*s, 3)) * 255).astype("uint8") for i, s in enumerate(sizes)]
    text = ["<s> what <|vision_start|><|image_pad|><|vision_end|> is", "<s> <|vision_start|><|image_pad|><|vision_end|> is"]
    for budget, want in ((dict(method="crossget", keep=KEEP), [KEEP] * 2), (dict(method="tome", keep=9), [9] * 2),
                         (dict(method="none"), stock)):
        crossget.patch(model, **budget)
        x = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
        assert (x["input_ids"] == IMG).sum(-1).tolist() == want
        assert torch.equal(torch.as_tensor(x["mm_token_type_ids"]), (x["input_ids"] == IMG).long())
        assert [crossget.image_tokens(model, g) for g in x["image_grid_thw"]] == want
        with torch.no_grad():
            model.generate(**x, **m.gen)
    crossget.unpatch(model)
    x = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
    assert (x["input_ids"] == IMG).sum(-1).tolist() == stock
    assert "replace_image_token" not in vars(processor)
    with pytest.raises(TypeError, match=name):
        crossget.adapt_processor(object(), model)
    return model


def test_adapt_processor_writes_the_count_the_model_needs():
    stock = [qwen_vl.stock_image_tokens(make_qwen(), s) for s in [(64, 80), (96, 64)]]
    assert stock == [80, 96]
    check_adapt_processor(QWEN, tiny_processor(), stock, "Qwen2_5_VLProcessor")


def test_mismatched_prompt_says_what_to_call():
    model = make_qwen()
    crossget.patch(model, method="crossget", keep=KEEP)
    x = inputs(model, counts=[24, 24])  # the stock counts
    with pytest.raises(ValueError, match=r"adapt_processor.*image_tokens"):
        model(**x)
    with pytest.raises(ValueError, match=r"adapt_processor.*image_tokens"):
        model.generate(**x, **GEN)
    crossget.unpatch(model)
    with pytest.raises(ValueError, match="image_grid_thw"):
        crossget.image_tokens(model)  # the stock count depends on the image


# --------------------------------------------------------------------------- budgets and errors
@pytest.mark.parametrize(
    "kwargs, match",
    BAD_BUDGETS + [
        (dict(method="fastv", keep=8, fastv_layer=2), "fastv_layer"),
        (dict(r=4), "not an option of the Qwen2.5-VL"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    check_bad_budget(QWEN, kwargs, match)


def check_keep_above_an_images_count(m):
    """``keep=9`` refused for an 8-token image, by ``image_tokens`` and at the forward; returns the model."""
    model = m.make()
    crossget.patch(model, method="tome", keep=9)
    with pytest.raises(ValueError, match=r"keep=9 is more than the 8 tokens"):
        crossget.image_tokens(model, SMALL)
    with pytest.raises(ValueError, match=r"keep=9 is more than the 8 visual tokens image 1"):
        model(**m.inputs(model, (WIDE, SMALL), counts=[9, 9]))
    return model


def test_keep_above_an_images_count_raises_at_the_image():
    check_keep_above_an_images_count(QWEN)


# --------------------------------------------------------------------------- unpatch and copies
def unpatch_and_copy_tests(m, fastv_layer):
    """A Qwen-VL family's two tests (bind them to module names ``test_...``): unpatch restores
    the stock outputs exactly; copies (deepcopy, torch.save) run and unpatch on their own,
    patched at the projector site or with FastV at ``fastv_layer``."""

    def test_unpatch_restores_stock_outputs_exactly():
        check_unpatch_restores(m, {method: dict(keep=KEEP) for method in ("crossget", "tome")}, (WIDE, TALL))

    @pytest.mark.parametrize("budget", [dict(method="crossget", keep=KEEP),
                                        dict(method="fastv", keep=KEEP, fastv_layer=fastv_layer)])
    @pytest.mark.parametrize("clone", [copy.deepcopy, torch_saved], ids=["deepcopy", "torch.save"])
    def test_copies_run_and_unpatch_on_their_own(clone, budget):
        check_copies(m, clone, budget, (WIDE, TALL))

    return test_unpatch_restores_stock_outputs_exactly, test_copies_run_and_unpatch_on_their_own


test_unpatch_restores_stock_outputs_exactly, test_copies_run_and_unpatch_on_their_own = unpatch_and_copy_tests(QWEN, 1)


# --------------------------------------------------------------------------- fastv
def test_fastv_prunes_to_keep_per_image_inside_the_lm_and_caches_agree():
    model = make_qwen()
    stock = logits(model)
    crossget.patch(model, method="fastv", keep=KEEP, fastv_layer=1)
    assert crossget.config(model).fastv_layer == 1
    assert crossget.image_tokens(model, WIDE) == 24  # the prompt keeps the stock placeholders
    lengths = []
    handle = model.model.language_model.layers[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    reduced = logits(model)
    handle.remove()
    assert lengths == [stock.shape[1] - (24 - KEEP)]  # after layer K: KEEP of each prompt image's 24 tokens
    assert reduced.shape == stock.shape and not torch.allclose(reduced[:, -1], stock[:, -1], atol=1e-4)
    for kw in (dict(), dict(num_beams=3)):
        assert torch.equal(generate(model, use_cache=False, **kw), generate(model, **kw))


def test_fastv_refuses_a_batch_with_different_counts():
    match = r"Qwen2.5-VL ranks one count.*same size.*tome"
    model = check_fastv_refuses(QWEN, dict(keep=KEEP, fastv_layer=1), (WIDE, SMALL), match)
    with pytest.raises(ValueError, match="fastv_layer"):
        crossget.patch(model, method="fastv", keep=KEEP)  # K=2 needs a deeper LM than 2 layers


# --------------------------------------------------------------------------- configs and the bare model
@pytest.mark.parametrize("budget", [dict(method="crossget", keep=KEEP), dict(method="tome", keep=5),
                                    dict(method="tome", flops=0.75, image_size=64, text_len=8),
                                    dict(method="fastv", keep=KEEP, fastv_layer=1), dict(method="none")])
def test_config_round_trips_through_dict_and_apply(budget):
    model, other = make_qwen(), make_qwen()
    crossget.patch(model, **budget)
    saved = crossget.config(model).to_dict()
    assert crossget.PatchConfig.from_dict(saved) == crossget.config(model)
    crossget.patch_from_config(other, saved)
    assert crossget.config(other) == crossget.config(model)
    assert torch.equal(generate(other), generate(model))
    crossget.apply(other, saved)
    assert torch.equal(generate(other), generate(model))


def check_bare_model(m, tmp_path):
    """The base model alone patches (reduced sequence), saves the stock architecture and unpatches."""
    bare = m.make().model
    with torch.no_grad():
        ref = bare(**m.inputs(bare)).last_hidden_state
    crossget.patch(bare, method="crossget", keep=KEEP)
    with torch.no_grad():
        out = bare(**m.inputs(bare)).last_hidden_state
    assert out.shape[1] == ref.shape[1] - (24 - KEEP)
    bare.save_pretrained(tmp_path)
    saved = m.stock.from_pretrained(tmp_path)
    assert saved.config.architectures == [m.stock.__name__] and type(saved) is m.stock
    assert set(saved.state_dict()) == set(bare.state_dict())
    crossget.unpatch(bare)
    with torch.no_grad():
        assert torch.equal(bare(**m.inputs(bare)).last_hidden_state, ref)


def test_bare_qwen2_5_vl_model_patches_and_saves_the_stock_architecture(tmp_path):
    assert QWEN.stock.__name__ == "Qwen2_5_VLModel"
    check_bare_model(QWEN, tmp_path)


def test_two_images_in_one_prompt_are_placed_in_order():
    model = make_qwen()
    grids = (SMALL, WIDE)
    firsts = [reduce_visual_tokens(f, KEEP, "crossget")[1] for f in stock_features(model, grids)]

    def prompt(counts):
        ids = torch.tensor([[1, 5, START] + [IMG] * counts[0] + [END, 6, 7, START] + [IMG] * counts[1] + [END, 8, 9]])
        return ids, (ids == IMG).long()

    ids, types = prompt([8, 24])
    stock, _ = hf.Qwen2_5_VLModel.get_rope_index(model.model, ids, types, torch.tensor(grids))
    crossget.patch(model, method="crossget", keep=KEEP)
    ids, types = prompt([KEEP, KEEP])
    px, grid = pixels(grids)
    x = dict(input_ids=ids, mm_token_type_ids=types, attention_mask=torch.ones_like(ids), pixel_values=px,
             image_grid_thw=grid)
    seen = LMInputs(model)
    with torch.no_grad():
        cached = model.generate(**x, **GEN)
        assert torch.equal(model.generate(**x, **GEN, use_cache=False), cached)
    seen.remove()
    pos = seen.calls[0]["position_ids"][1:, 0]
    ref = stock[:, 0]
    ref_img = torch.nonzero(prompt([8, 24])[0][0] == IMG)[:, 0]
    got_img = torch.nonzero(ids[0] == IMG)[:, 0]
    want = torch.cat([ref[:, ref_img[:8]][:, firsts[0]], ref[:, ref_img[8:]][:, firsts[1]]], 1)
    assert torch.equal(pos[:, got_img], want)
    text, ref_text = ids[0] != IMG, prompt([8, 24])[0][0] != IMG
    assert torch.equal(pos[:, text], ref[:, ref_text])


# --------------------------------------------------------------------------- FLOPs model
@pytest.mark.parametrize("grid", [WIDE, SMALL, (1, 10, 6)], ids=str)
def test_analytic_flops_are_the_measured_ones(grid):
    from crossget.flops import count_flops
    from crossget.schedule import decoder_layer_flops

    model = make_qwen()
    px, thw = pixels([grid])
    with torch.no_grad():
        measured = count_flops(model.model.visual, px, grid_thw=thw)
        assert qwen_vl.vision_tower_flops(model, grid) == measured  # windows, full blocks, merger
        tokens = qwen_vl.stock_image_tokens(model, grid) + 8
        lm = count_flops(model.model.language_model, inputs_embeds=torch.randn(1, tokens, 64))
    assert lm == 2 * decoder_layer_flops(model.config.text_config, tokens)
    assert qwen_vl.prefill_flops(model, image=grid, text_len=8) == measured + lm


def check_flops_target(m, family, target, side, stock, unreachable):
    """``flops=target`` for a ``side``-pixel square (``stock`` tokens) solves the largest keep
    within it, replays from the config, and ``unreachable`` is refused."""
    model = m.make()
    crossget.patch(model, method="tome", flops=target, image_size=side, text_len=8)
    cfg = crossget.config(model)
    assert family.stock_image_tokens(model, (side, side)) == stock and 1 <= cfg.keep < stock
    ratio = lambda keep: (family.prefill_flops(model, "tome", keep, (side, side), 8)
                          / family.prefill_flops(model, image=(side, side), text_len=8))
    assert cfg.flops_estimate == pytest.approx(ratio(cfg.keep)) and ratio(cfg.keep) <= target < ratio(cfg.keep + 1)
    other = m.make()
    crossget.patch_from_config(other, cfg.to_dict())
    assert crossget.config(other) == cfg
    with pytest.raises(ValueError, match="out of reach"):
        crossget.patch(model, method="crossget", flops=unreachable, image_size=side)


def test_flops_target_solves_keep_and_replays():
    check_flops_target(QWEN, qwen_vl, 0.8, 64, 64, 0.01)  # a 64 x 64 image: grid (1, 16, 16)
