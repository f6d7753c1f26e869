"""Tokenizers built locally (no hub): CLIP-style BPE and T5-style unigram, each making every word of a given
vocabulary one token; any other text still tokenizes, character by character."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&+#%*=_"


def clip_tokenizer(words: Sequence[str], max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer (byte-level alphabet, ``</w>`` word ends) whose merges, learned with ``tokenizers``'
    BPE trainer on ``words``, make each of them one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        [" ".join(words)], trainers.BpeTrainer(vocab_size=10_000, show_progress=False, end_of_word_suffix="</w>")
    )
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(words: Sequence[str], max_length: int = 512) -> Any:
    """A T5 (sentencepiece-unigram) tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, each of ``words`` one piece
    (``▁word``), single characters for anything else; ``</s>`` closes every sequence, as T5's does."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words))] + [("\u2581", -5.0)]
    pieces += [(c, -10.0) for c in CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
