"""A word-level tokenizer over a caption vocabulary (for models trained from scratch on generated captions)."""

from __future__ import annotations

from collections.abc import Iterable

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


def build_word_tokenizer(captions: Iterable[str], max_length: int = 64):
    """A ``transformers.PreTrainedTokenizerFast`` whose vocabulary is the words of ``captions``.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the words in sorted order (so the
    vocabulary does not depend on caption order). Encodings are ``<bos> words <eos>``, padded on the
    right with ``<pad>``; ``max_length`` becomes ``model_max_length`` (truncation keeps ``<eos>``).
    Set the text config's ``vocab_size``/``bos_token_id``/``eos_token_id``/``pad_token_id`` from it.
    """
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in caption_words(captions):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
        padding_side="right",
    )
