"""Procedural binary sentiment sequences with token-level ground-truth rationales.

Each sequence is ``[CLS] w_1 ... w_L [SEP] [PAD] ...``: filler words with 1 to ``max_support``
words of the label's polarity planted at random positions (the rationale) and, with
probability ``counter_prob``, one word of the opposite polarity (counter evidence) when at
least two supporting words are present. The supporting words always outnumber the counter
words, so the label is the majority polarity and the task is learnable by counting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "FILLER_WORDS",
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "SPECIAL_TOKENS",
    "TEXT_VOCAB",
    "TextBatch",
    "TextDataset",
    "text_rationales",
]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
POSITIVE_WORDS: tuple[str, ...] = (
    "good",
    "great",
    "excellent",
    "superb",
    "wonderful",
    "brilliant",
    "delightful",
    "fantastic",
)
"""Words of positive polarity (rationale words of label 1, counter words of label 0)."""
NEGATIVE_WORDS: tuple[str, ...] = (
    "bad",
    "awful",
    "terrible",
    "poor",
    "horrible",
    "dreadful",
    "boring",
    "mediocre",
)
"""Words of negative polarity (rationale words of label 0, counter words of label 1)."""
FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "an", "this", "that", "it", "movie", "film", "plot", "story",
    "actor", "actress", "scene", "script", "cast", "director", "music", "ending", "camera",
    "character", "was", "is", "were", "felt", "seemed", "and", "but", "with", "of", "to",
    "in", "on", "at", "for", "very", "quite", "really", "overall", "i", "we",
)  # fmt: skip

TEXT_VOCAB: tuple[str, ...] = SPECIAL_TOKENS + POSITIVE_WORDS + NEGATIVE_WORDS + FILLER_WORDS
"""The id -> token table: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2, ``[SEP]`` = 3,
``[MASK]`` = 4, then positive, negative and filler words."""

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
_POS_IDS = np.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(POSITIVE_WORDS))
_NEG_IDS = _POS_IDS[-1] + 1 + np.arange(len(NEGATIVE_WORDS))
_FILL_IDS = _NEG_IDS[-1] + 1 + np.arange(len(FILLER_WORDS))


@dataclass(frozen=True, eq=False)
class TextBatch:
    """A batch of token sequences with labels and token-level rationales.

    Attributes:
        input_ids: Token ids, shape (N, T), long.
        attention_mask: 1 for real tokens (including ``[CLS]`` and ``[SEP]``), 0 for padding,
            shape (N, T), long.
        labels: 0 for negative, 1 for positive, shape (N,), long.
        rationale: True at the words of the label's polarity, shape (N, T), bool.
        counter: True at the word of the opposite polarity, if any, shape (N, T), bool.
        vocab: The id -> token table (``list(TEXT_VOCAB)``).
        seed: The seed the batch was generated from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rationale: torch.Tensor
    counter: torch.Tensor
    vocab: list[str]
    seed: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def decode(self, index: int) -> list[str]:
        """Tokens of sequence ``index`` without padding."""
        ids = self.input_ids[index][self.attention_mask[index].bool()]
        return [self.vocab[i] for i in ids.tolist()]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def text_rationales(
    n: int,
    seed: int,
    seq_len: int = 16,
    min_words: int = 4,
    max_support: int = 3,
    counter_prob: float = 0.5,
) -> TextBatch:
    """Generate binary sentiment sequences with ground-truth rationales.

    Args:
        n: Number of sequences.
        seed: Non-negative integer seed; the global random state is neither used nor changed.
        seq_len: Total length ``T`` including ``[CLS]``, ``[SEP]`` and padding; at least 6.
        min_words: Smallest number of words between ``[CLS]`` and ``[SEP]``; the number is
            uniform in ``min_words..seq_len - 2``. At least ``max_support + 1``.
        max_support: Largest number of words of the label's polarity (at least 1).
        counter_prob: Probability of one counter word when there are at least two supporting
            words.

    Returns:
        The batch; ``input_ids``, ``attention_mask``, ``rationale`` and ``counter`` (N, T),
        ``labels`` (N,).

    Raises:
        ValueError: If an argument is out of its supported range.
    """
    _check_int("n", n, 0)
    _check_int("seed", seed, 0)
    _check_int("max_support", max_support, 1)
    _check_int("seq_len", seq_len, 6)
    _check_int("min_words", min_words, max_support + 1)
    if min_words > seq_len - 2:
        raise ValueError(
            f"min_words={min_words} does not fit: seq_len={seq_len} leaves room for at most "
            f"{seq_len - 2} words between [CLS] and [SEP]"
        )
    if not 0.0 <= counter_prob <= 1.0:
        raise ValueError(f"counter_prob must lie in [0, 1], got {counter_prob}")

    rng = np.random.Generator(np.random.PCG64(seed))
    labels = rng.integers(0, 2, size=n)
    lengths = rng.integers(min_words, seq_len - 1, size=n)  # words between [CLS] and [SEP]
    supports = rng.integers(1, max_support + 1, size=n)
    counters = ((supports >= 2) & (rng.random(n) < counter_prob)).astype(np.int64)
    fillers = _FILL_IDS[rng.integers(0, _FILL_IDS.size, size=(n, seq_len))]
    own = rng.integers(0, _POS_IDS.size, size=(n, seq_len))  # word choice per slot
    order = rng.random((n, seq_len))

    pos = np.arange(seq_len)[None, :]
    words = (pos >= 1) & (pos <= lengths[:, None])
    # Rank the word positions of each row in random order; the first ranks get planted words.
    order[~words] = np.inf
    rank = np.empty((n, seq_len), dtype=np.int64)
    np.put_along_axis(rank, np.argsort(order, axis=1), np.arange(seq_len)[None, :], axis=1)
    rationale = words & (rank < supports[:, None])
    counter = words & (rank >= supports[:, None]) & (rank < (supports + counters)[:, None])

    positive = labels[:, None] == 1
    support_ids = np.where(positive, _POS_IDS[own], _NEG_IDS[own])
    counter_ids = np.where(positive, _NEG_IDS[own], _POS_IDS[own])
    ids = np.where(words, fillers, PAD_ID)
    ids = np.where(rationale, support_ids, np.where(counter, counter_ids, ids))
    ids[:, 0] = CLS_ID
    ids[np.arange(n), lengths + 1] = SEP_ID
    return TextBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy((ids != PAD_ID).astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        rationale=torch.from_numpy(rationale),
        counter=torch.from_numpy(counter),
        vocab=list(TEXT_VOCAB),
        seed=seed,
    )


class TextDataset(Dataset):
    """Map-style dataset over :func:`text_rationales`, generated eagerly.

    Items are ``(input_ids (T,), attention_mask (T,), label (), rationale (T,))``.

    Args:
        n: Number of sequences.
        seed: Non-negative integer seed.
        **kwargs: Further arguments of :func:`text_rationales`.
    """

    def __init__(self, n: int, seed: int, **kwargs: Any) -> None:
        self.batch = text_rationales(n, seed, **kwargs)
        self.vocab = self.batch.vocab

    def __len__(self) -> int:
        return len(self.batch)

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.batch
        return b.input_ids[index], b.attention_mask[index], b.labels[index], b.rationale[index]
