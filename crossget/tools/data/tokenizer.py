"""A word-level tokenizer over a caption vocabulary (for models trained from scratch on generated captions)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")  # eos id 3: CLIP pools at the first eos (id 2 is its legacy path)


def _pre_tokenizer():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def caption_words(captions: Iterable[str]) -> list[str]:
    """Sorted distinct words of ``captions`` as the tokenizer splits them (lower-case; punctuation separate)."""
    normalizer, pre = _pre_tokenizer()
    seen: set[str] = set()
    for caption in captions:
        seen.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(caption)))
    return sorted(seen)


def build_word_tokenizer(
    captions: Iterable[str],
    max_length: int = 64,
    specials: Sequence[str] = SPECIALS,
    template: str = "<bos> $A <eos>",
    **token_kwargs: Any,
):
    """A ``transformers.PreTrainedTokenizerFast`` whose vocabulary is the words of ``captions``.

    Ids: ``specials`` first (pad, unk, bos, eos, then any others: ``<pad>`` 0, ``<unk>`` 1,
    ``<bos>`` 2, ``<eos>`` 3 by default), then the words in sorted order (so the vocabulary does
    not depend on caption order). Encodings follow ``template`` (default ``<bos> words <eos>``),
    padded on the right; ``max_length`` becomes ``model_max_length`` (truncation keeps ``<eos>``).
    ``token_kwargs`` go to the tokenizer (e.g. ``extra_special_tokens``). Set the text config's
    ``vocab_size``/``bos_token_id``/``eos_token_id``/``pad_token_id`` from it.
    """
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in caption_words(captions):
        vocab.setdefault(w, len(vocab))
    pad, unk, bos, eos = specials[:4]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer, tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t in template.split()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
        model_max_length=max_length, padding_side="right", **token_kwargs,
    )


def shipped_words(base: str | os.PathLike) -> str:
    """The words (no special tokens) of the word-level tokenizer saved at ``base``, space-joined,
    so a tokenizer built for another model on the shipped data keeps every shipped word."""
    from transformers import AutoTokenizer

    return " ".join(w for w in AutoTokenizer.from_pretrained(base).get_vocab() if w not in SPECIALS)
