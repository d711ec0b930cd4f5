"""An offline word-level tokenizer for from-scratch text towers, built from a dataset's captions.

The vocabulary is WordPiece-compatible: `[PAD] [UNK] [CLS] [SEP] [MASK]`, then every word seen at least
`min_count` times (after BERT's lower-casing and punctuation splitting), then single characters and
their `##` continuations, so an unseen word still tokenizes (into characters) instead of becoming
`[UNK]`. The result is an ordinary `BertTokenizer(Fast)` that saves and reloads with `AutoTokenizer`.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections import Counter
from collections.abc import Iterable

from tokenizers import normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase

__all__ = ["SPECIAL_TOKENS", "build_caption_tokenizer", "caption_word_counts"]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def caption_word_counts(captions: Iterable[str]) -> Counter[str]:
    """Counts of the words BERT's normaliser and pre-tokenizer produce from `captions`."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption)))
    return counts


def build_caption_tokenizer(captions: Iterable[str], min_count: int = 1) -> PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer whose vocabulary is the words of `captions` (see the module docstring).

    Deterministic: words are ordered by descending count, then alphabetically.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count!r}")
    counts = caption_word_counts(captions)
    if not counts:
        raise ValueError("cannot build a tokenizer: the captions contain no words")
    words = [w for w, c in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if c >= min_count]
    chars = sorted({ch for word in counts for ch in word})
    vocab: list[str] = list(SPECIAL_TOKENS)
    for token in [*words, *chars, *(f"##{ch}" for ch in chars)]:
        if token not in vocab:
            vocab.append(token)
    return _bert_tokenizer(vocab)


def _bert_tokenizer(vocab: list[str]) -> PreTrainedTokenizerBase:
    try:
        from transformers import BertTokenizerFast as tokenizer_class
    except ImportError:  # pragma: no cover - a transformers without the alias
        from transformers import BertTokenizer as tokenizer_class
    if "vocab" in inspect.signature(tokenizer_class.__init__).parameters:  # transformers >= 5
        return tokenizer_class(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    with tempfile.TemporaryDirectory() as folder:  # pragma: no cover - transformers 4.x
        path = os.path.join(folder, "vocab.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(vocab) + "\n")
        return tokenizer_class(vocab_file=path, do_lower_case=True)
