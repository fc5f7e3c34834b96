"""Helpers shared by the tests of the multimodal-LLM families reduced at the projector site
(LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL; imported as ``from mllm_common import ...``).

Prompts (:func:`left_padded`, :func:`make_prompts`, anyres :func:`anyres_pixels`), a tiny
word-level tokenizer for the processors, generation (:func:`generated`), what reaches the
language model (:class:`LMInputs`, :func:`lm_visual_tokens`), and the checks whose body is the
same for every family up to its model and inputs (``check_*``, on an :class:`MLLM`: each
family's test module calls them from its own, parametrised tests, and adds what is its own).
"""

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerFast
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import crossget
from crossget.families.visual_site import reduce_visual_tokens


# --------------------------------------------------------------------------- prompts and inputs
def left_padded(rows):
    """Token rows left-padded with 0: ``(input_ids [B, W], attention_mask [B, W])``."""
    seqs = [torch.tensor(row, dtype=torch.long) for row in rows]
    ids = pad_sequence(seqs, batch_first=True, padding_side="left")
    mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_side="left")
    return ids, mask


def make_prompts(counts, lengths, seed=1, *, token):
    """Left-padded prompts: BOS, ``counts[i]`` ``token`` placeholders, then ``lengths[i]`` random text tokens."""
    g = torch.Generator().manual_seed(seed)
    return left_padded([[1] + [token] * c + torch.randint(3, 90, (n,), generator=g).tolist()
                        for c, n in zip(counts, lengths)])


def anyres_pixels(sizes, pinpoints, tile, seed=2, multi=False):
    """Random anyres tiles ``[images, max tiles, 3, tile, tile]`` (unused tiles padded, as the
    processor does; ``multi``: one prompt's images, a base tile each) and ``image_sizes``."""
    tiles = 1 if multi else max(image_size_to_num_patches(list(s), pinpoints, tile) for s in sizes)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(sizes), tiles, 3, tile, tile, generator=g), torch.tensor(sizes)


def word_tokenizer(vocab, special, **kwargs):
    """A whitespace word-level tokenizer of ``vocab`` (with ``<s>``, ``</s>``, ``<pad>``,
    ``<unk>``) whose ``special`` tokens are additional special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


# --------------------------------------------------------------------------- running the model
def generated(model, x, gen, **kw):
    """The tokens ``model.generate(**x, **gen, **kw)`` writes after the prompts."""
    with torch.no_grad():
        out = model.generate(**x, **gen, **kw)
    return out[:, x["input_ids"].shape[1]:]


def torch_saved(model):
    """``model`` through ``torch.save`` / ``torch.load``."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class LMInputs:
    """Forward pre-hook on the language model: what each of its calls receives."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, _args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids")})

    def remove(self):
        self.handle.remove()


def lm_visual_tokens(model, x, token, layer=None):
    """Visual tokens per prompt the LM (or its decoder layer ``layer``) receives in one forward:
    its input length minus the prompt's tokens other than ``token``; and that input."""
    seen = []
    lm = model.model.language_model
    if layer is None:
        hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
    else:
        hook = lm.layers[layer].register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                                          with_kwargs=True)
    with torch.no_grad():
        model(**x)
    hook.remove()
    other = (x["input_ids"] != token).sum(-1)
    return (seen[0].shape[1] - other).tolist(), seen[0]


# --------------------------------------------------------------------------- a family under test
@dataclass(frozen=True)
class MLLM:
    """What the shared checks need of a family's tests.

    Attributes:
        make: ``(impl="sdpa") -> model`` (the tiny random model with the LM head).
        inputs: ``(model, sizes, lengths) -> forward kwargs`` (one image per prompt, as the
            model is patched now).
        features: ``(model, sizes) -> [L_i, D]`` per image, the unpatched model's visual tokens.
        gen: ``generate``'s settings.
        token: the image placeholder id.
        patched, stock: the patched and upstream base-model classes.
        sizes: the images of :meth:`generate` and :meth:`logits` by default.
    """

    make: Callable
    inputs: Callable
    features: Callable
    gen: dict
    token: int
    patched: type
    stock: type
    sizes: tuple

    def generate(self, model, sizes=None, lengths=(5, 3), **kw):
        """The new tokens for prompts with images of ``sizes``."""
        return generated(model, self.inputs(model, self.sizes if sizes is None else sizes, lengths), self.gen, **kw)

    def logits(self, model, sizes=None):
        with torch.no_grad():
            return model(**self.inputs(model, self.sizes if sizes is None else sizes, (5, 3))).logits


# --------------------------------------------------------------------------- the shared checks
def check_stock_path(m, impl, on_none=None):
    """``method="none"`` and unpatching give the stock ids and logits exactly; returns the (unpatched) model."""
    model = m.make(impl)
    ref_ids, ref_logits = m.generate(model), m.logits(model)
    crossget.patch(model, method="none")
    assert type(model.model) is m.patched
    assert crossget.config(model).keep is None
    if on_none is not None:
        on_none(model)
    assert torch.equal(m.generate(model), ref_ids)
    assert torch.equal(m.logits(model), ref_logits)
    crossget.unpatch(model)
    assert type(model.model) is m.stock
    assert torch.equal(m.generate(model), ref_ids)
    return model


def check_cache_agreement(m, method, budget, sizes, beams=2):
    """Greedy and beam generation agree with and without the KV cache, and the reduction
    changes what the LM sees; returns ``(patched model, its stock logits)``."""
    model = m.make()
    ref = m.logits(model, sizes)
    crossget.patch(model, method=method, **budget)
    greedy = m.generate(model, sizes)
    assert torch.equal(greedy, m.generate(model, sizes, use_cache=False))
    beamed = m.generate(model, sizes, num_beams=beams)
    assert torch.equal(beamed, m.generate(model, sizes, num_beams=beams, use_cache=False))
    assert greedy.shape == beamed.shape == (len(sizes), m.gen["max_new_tokens"])
    # the reduction changes what the LM sees (a no-op patch would not)
    assert not torch.allclose(m.logits(model, sizes)[:, -1], ref[:, -1], atol=1e-4)
    return model, ref


def check_encodes_once(m, tower, keep):
    """``generate`` runs the vision tower (``tower(model)``) once, with and without the cache;
    returns the patched model."""
    model = m.make()
    crossget.patch(model, method="crossget", keep=keep)
    calls = []
    tower(model).register_forward_hook(lambda *a: calls.append(1))
    for use_cache in (True, False):
        calls.clear()
        m.generate(model, use_cache=use_cache)
        assert len(calls) == 1
    return model


def check_lm_receives_reduced(m, method, keep, sizes, stock, lengths=(4, 4), rtol=1e-5, atol=1e-6):
    """The LM receives ``keep`` tokens per image, which are the site's reduction of the stock
    visual tokens (``stock`` per image; what the LM receives again after unpatching)."""
    model = m.make()
    features = m.features(model, sizes)
    assert [f.shape[0] for f in features] == stock
    crossget.patch(model, method=method, keep=keep)
    x = m.inputs(model, sizes, lengths)
    counts, embeds = lm_visual_tokens(model, x, m.token)
    assert counts == [keep] * len(sizes)
    for row, f in enumerate(features):
        want = reduce_visual_tokens(f, keep, method)[0]
        torch.testing.assert_close(embeds[row][x["input_ids"][row] == m.token], want, rtol=rtol, atol=atol)
    crossget.unpatch(model)
    assert lm_visual_tokens(model, m.inputs(model, sizes, lengths), m.token)[0] == stock


def check_fastv_prunes(m, budget, sizes, stock):
    """FastV (``budget``: its patch kwargs): the prompt keeps every placeholder (``stock`` per
    image) up to layer ``K``, then ``keep``; returns the patched model."""
    model = m.make()
    keep = budget["keep"]
    crossget.patch(model, method="fastv", **budget)
    layer = crossget.config(model).fastv_layer
    x = m.inputs(model, sizes, (5, 3))
    assert lm_visual_tokens(model, x, m.token)[0] == [stock] * len(sizes)  # the prompt keeps every placeholder
    assert lm_visual_tokens(model, x, m.token, layer - 1)[0] == [stock] * len(sizes)
    # left padding is text here: the pruned sequence keeps every non-image position
    assert lm_visual_tokens(model, x, m.token, layer)[0] == [keep] * len(sizes)
    return model


def check_batch_matches_single(m, method, keep, sizes, tiles, width):
    """A batch of images of different sizes gives ``keep`` tokens each (``[keep, width]``), and
    generates what each prompt does alone (its own ``tiles(size)`` tiles only)."""
    model = m.make()
    crossget.patch(model, method=method, keep=keep)
    assert [crossget.image_tokens(model, s) for s in sizes] == [keep] * len(sizes)
    x = m.inputs(model, sizes, (4, 4))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    assert [f.shape for f in feats] == [(keep, width)] * len(sizes)
    both = generated(model, x, m.gen)
    for i, size in enumerate(sizes):  # each row alone, its own tiles only (no padding tiles)
        alone = {k: v[i : i + 1] for k, v in x.items()}
        alone["pixel_values"] = alone["pixel_values"][:, :tiles(size)]
        assert torch.equal(generated(model, alone, m.gen)[0], both[i])


def check_fastv_refuses(m, budget, sizes, match):
    """FastV refuses a batch whose images give different counts; returns the patched model."""
    model = m.make()
    crossget.patch(model, method="fastv", **budget)
    with pytest.raises(ValueError, match=match):
        m.generate(model, sizes)
    return model


BAD_BUDGETS = [  # (patch kwargs, error) every family refuses (method="crossget" unless given)
    (dict(keep=0), "positive"),
    (dict(keep=-3), "positive"),
    (dict(keep=2.5), "int"),
    (dict(keep=True), "int"),
    (dict(keep=8, flops=0.5), "not both"),
    (dict(method="visionzip", keep=8), "method must be one of"),
    (dict(method="tome"), "keep="),
    (dict(keep=8, towers=("vision",)), "towers"),
    (dict(keep=8, guidance="scaled"), "no importance to guide"),
]


def check_bad_budget(m, kwargs, match):
    """``crossget.patch(model, method="crossget", **kwargs)`` raises ``match`` and leaves the model
    stock (``match=None``: it patches, with ``keep`` as given and no importance)."""
    model = m.make()
    kwargs = {"method": "crossget", **kwargs}
    if match is None:
        crossget.patch(model, **kwargs)
        assert crossget.config(model).keep == kwargs["keep"] and crossget.config(model).importance == "none"
        return
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **kwargs)
    assert not crossget.is_patched(model) and type(model.model) is m.stock


def check_flops_target(m, prefill_flops, stock):
    """``flops=0.6`` solves the largest ``keep`` within the target (below the reference
    image's ``stock``), replays from the config, and refuses an unreachable target; returns
    the patched model."""
    model = m.make()
    crossget.patch(model, method="crossget", flops=0.6, text_len=8)
    cfg = crossget.config(model)
    assert cfg.flops == 0.6 and cfg.flops_estimate <= 0.6 and 0 < cfg.keep < stock
    base = prefill_flops(model, text_len=8)
    assert prefill_flops(model, "crossget", cfg.keep + 1, text_len=8) / base > 0.6
    assert math.isclose(prefill_flops(model, "crossget", cfg.keep, text_len=8) / base, cfg.flops_estimate)
    ids = m.generate(model)
    twin = m.make()
    crossget.patch_from_config(twin, cfg.to_dict())
    assert crossget.config(twin) == cfg
    assert torch.equal(m.generate(twin), ids)
    with pytest.raises(ValueError, match="out of reach"):
        crossget.patch(model, method="crossget", flops=0.01)
    return model


def check_unpatch_restores(m, budgets, sizes):
    """After each ``budgets`` (method -> patch kwargs) patch, a generation and an unpatch, the
    model is stock again: class, no crossget marks, state dict keys, hooks, ids and logits."""
    model = m.make()
    ref_ids, ref_logits = m.generate(model), m.logits(model)
    keys = set(model.state_dict())
    hooks = lambda: [(list(x._forward_pre_hooks.values()), list(x._forward_hooks.values())) for x in model.modules()]
    stock_hooks = hooks()  # transformers' own output capture, installed by the first forward
    for method, budget in budgets.items():
        crossget.patch(model, method=method, **budget)
        m.generate(model, sizes)
        crossget.unpatch(model)
        assert not crossget.is_patched(model) and type(model.model) is m.stock
        assert not any(hasattr(x, "_crossget") for x in model.modules())
        assert set(model.state_dict()) == keys and hooks() == stock_hooks
        assert torch.equal(m.generate(model), ref_ids)
        assert torch.equal(m.logits(model), ref_logits)


def check_copies(m, clone, budget, sizes):
    """A copy (``clone``) of a patched model taken before any forward runs as the original and
    unpatches on its own."""
    model = m.make()
    crossget.patch(model, **budget)
    # before any forward: a stock model that ran one cannot be pickled either
    # (transformers installs a local output-capturing hook)
    twin = clone(model)
    want = m.generate(model, sizes)
    assert crossget.config(twin) == crossget.config(model)
    assert type(twin.model) is m.patched
    assert torch.equal(m.generate(twin, sizes), want)
    crossget.unpatch(twin)
    assert type(twin.model) is m.stock and crossget.is_patched(model)
    assert torch.equal(m.generate(model, sizes), want)
