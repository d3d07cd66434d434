"""A BERT-style WordPiece tokenizer built from captions, for decoders that start from random weights.

The vocabulary is deterministic (the `tokenizers` WordPiece trainer orders ties differently from run to run, which
would make two identical training runs differ): the special tokens, every character seen (alone and as a
'##' continuation), then the most frequent whole words, ties broken alphabetically. Rare words fall back to
WordPiece pieces of characters, so nothing becomes [UNK] unless it has an unseen character.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4


def train_wordpiece_tokenizer(captions: Iterable[str], vocab_size: int = 8000) -> BertTokenizerFast:
    """Build an uncased WordPiece vocabulary of at most `vocab_size` from `captions` -> BertTokenizerFast
    that encodes a caption as [CLS] caption [SEP]."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    if not counts:
        raise ValueError("expected at least one non-empty caption to build a vocabulary from, got none")
    characters = sorted({char for word in counts for char in word})
    vocab = SPECIAL_TOKENS + characters + ["##" + char for char in characters]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small: the captions need {len(vocab)} tokens for their "
                         f"special tokens and {len(characters)} characters alone")
    known = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)

    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        do_lower_case=True,
    )
