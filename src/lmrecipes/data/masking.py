"""Masked-LM masking: BERT token masking, whole-word masking, and a fixed evaluation mask.

All functions are pure (inputs are never modified) and vectorised over the batch; every random draw comes from
an explicit `torch.Generator` (training) or from a counter-based hash (evaluation), never from global state.

Conventions
-----------
- `labels` hold the original token id at every masked position and -100 (`IGNORE_INDEX`, what
  `torch.nn.functional.cross_entropy` ignores) everywhere else.
- Special tokens ([CLS], [SEP], [PAD], [UNK], ...) are never masked: `special_mask` is True there for token
  masking, `word_ids` is -1 there for whole-word masking.
- A masked position is then replaced per token: with `mask_replace_prob` by `[MASK]`, with `random_replace_prob`
  by a token id drawn uniformly from `range(vocab_size)`, otherwise left unchanged (the model must still predict
  it). BERT uses 0.8 / 0.1 (/ 0.1 unchanged).

Two selection schemes
---------------------
- `mask_tokens`: each non-special token is chosen independently with `probability` (BERT, the course's
  `DataCollatorForLanguageModeling(mlm_probability=0.15)`).
- `whole_word_mask`: each word is chosen with `probability` and all its tokens are masked together. The
  defaults (1.0 / 0.0) are the course's `whole_word_masking_data_collator`: every token of a chosen word becomes
  `[MASK]`. With (0.8, 0.1) the 80/10/10 choice is made *per token* inside chosen words, as Google's original
  whole-word-masking BERT (`create_pretraining_data.py`) and transformers 4's `DataCollatorForWholeWordMask` did.
  (transformers 5's `DataCollatorForLanguageModeling(whole_word_mask=True)` cannot do this at all: it warns and
  forces `mask_replace_prob=1`, `random_replace_prob=0`.)

Reproducibility
---------------
Training masks use `batch_generator(seed, rank, batch_index)`: a generator seeded by a stable hash of those
counters, so a resumed or re-run job masks batch k exactly as before. (CPU and CUDA generators give different
streams, so the same seed masks differently on the two devices.) The evaluation set is masked once by
`mask_eval_set`, whose random numbers are a splitmix64 hash of (seed, row id, position or word id): row i's mask
depends only on the seed, i and the row's content, not on batch size, processing order or number of processes.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from lmrecipes.losses import IGNORE_INDEX

# splitmix64 constants (Steele, Lea & Flood 2014) as signed int64: torch int64 arithmetic wraps modulo 2**64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
# hash streams, so the selection, replacement and random-token draws of one position are independent
_SELECT, _REPLACE, _RANDOM_ID = 1, 2, 3


def _check_probabilities(probability: float, mask_replace_prob: float, random_replace_prob: float) -> None:
    for name, value in (
        ("probability", probability),
        ("mask_replace_prob", mask_replace_prob),
        ("random_replace_prob", random_replace_prob),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r}: expected a probability in [0, 1]")
    if mask_replace_prob + random_replace_prob > 1.0 + 1e-9:
        raise ValueError(
            f"mask_replace_prob + random_replace_prob = {mask_replace_prob} + {random_replace_prob} > 1: "
            "the rest (1 - both) is the share of masked tokens left unchanged, so it cannot be negative"
        )


def _check_same_shape(input_ids: Tensor, other: Tensor, name: str) -> None:
    if input_ids.dim() != 2 or other.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and {name} {tuple(other.shape)}: expected two (B, T) tensors"
        )


def _replace(
    input_ids: Tensor,
    chosen: Tensor,
    u_replace: Tensor | None,
    random_ids: Tensor | None,
    *,
    mask_token_id: int,
    mask_replace_prob: float,
    random_replace_prob: float,
) -> tuple[Tensor, Tensor]:
    """Labels for the `chosen` positions and the 80/10/10-style replacement; one uniform per token decides."""
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)  # (B, T)
    if u_replace is None:  # mask_replace_prob == 1: every chosen token becomes [MASK]
        return torch.where(chosen, mask_token_id, input_ids), labels
    to_mask = chosen & (u_replace < mask_replace_prob)  # (B, T)
    masked = torch.where(to_mask, mask_token_id, input_ids)
    if random_ids is not None:
        to_random = chosen & ~to_mask & (u_replace < mask_replace_prob + random_replace_prob)  # (B, T)
        masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    return masked, labels


def _draw_replacements(
    shape: torch.Size,
    device: torch.device,
    vocab_size: int,
    mask_replace_prob: float,
    random_replace_prob: float,
    generator: torch.Generator | None,
) -> tuple[Tensor | None, Tensor | None]:
    # skip draws that cannot change the outcome (the course's all-[MASK] whole-word scheme needs none)
    u_replace = None if mask_replace_prob >= 1.0 else torch.rand(shape, device=device, generator=generator)
    random_ids = None
    if random_replace_prob > 0.0:
        random_ids = torch.randint(vocab_size, shape, device=device, generator=generator)  # (B, T)
    return u_replace, random_ids


def mask_tokens(
    input_ids: Tensor,
    *,
    special_mask: Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT token masking of a (B, T) batch; returns `(masked_input_ids, labels)`.

    `special_mask` (B, T) bool is True at positions never to mask. Each other token is chosen with `probability`.
    """
    _check_same_shape(input_ids, special_mask, "special_mask")
    _check_probabilities(probability, mask_replace_prob, random_replace_prob)
    u_select = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)  # (B, T)
    chosen = (u_select < probability) & ~special_mask.bool()  # (B, T)
    u_replace, random_ids = _draw_replacements(
        input_ids.shape, input_ids.device, vocab_size, mask_replace_prob, random_replace_prob, generator
    )
    return _replace(
        input_ids,
        chosen,
        u_replace,
        random_ids,
        mask_token_id=mask_token_id,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
    )


def _dense_word_ranks(word_ids: Tensor) -> Tensor:
    """(B, T) word ids -> (B, T) int64 ranks, distinct for every (row, word) pair, all in [0, B * T).

    Sorting each row puts a word's tokens next to each other; a running count of "new word" flags over the
    flattened rows numbers the words densely across the batch. No host sync, so it stays cheap on CUDA.
    """
    sorted_ids, order = torch.sort(word_ids, dim=1)  # (B, T)
    is_new = torch.ones_like(sorted_ids, dtype=torch.bool)  # (B, T); column 0 starts a word in every row
    is_new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    rank_sorted = is_new.flatten().cumsum(0).view_as(word_ids) - 1  # (B, T)
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)  # (B, T) back in token order


def whole_word_mask(
    input_ids: Tensor,
    word_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.2,
    mask_replace_prob: float = 1.0,
    random_replace_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Whole-word masking of a (B, T) batch; returns `(masked_input_ids, labels)`.

    `word_ids` (B, T) int: one non-negative id shared by all tokens of a word within a row (any values; the same
    id in two rows is two words), -1 at special tokens and padding (never masked). Each word is chosen with
    `probability`; the replacement of its tokens is then decided per token (see the module docstring).
    """
    _check_same_shape(input_ids, word_ids, "word_ids")
    _check_probabilities(probability, mask_replace_prob, random_replace_prob)
    ranks = _dense_word_ranks(word_ids)  # (B, T)
    # one uniform per (row, word); B * T is an upper bound on their number, so no host sync for the count
    u_word = torch.rand(ranks.numel(), device=input_ids.device, generator=generator)  # (B * T,)
    # index_select, not u_word[ranks]: on a busy 2-core CPU torch's advanced indexing was ~100x slower here
    u_token = u_word.index_select(0, ranks.flatten()).view_as(ranks)  # (B, T)
    chosen = (u_token < probability) & (word_ids >= 0)  # (B, T)
    u_replace, random_ids = _draw_replacements(
        input_ids.shape, input_ids.device, vocab_size, mask_replace_prob, random_replace_prob, generator
    )
    return _replace(
        input_ids,
        chosen,
        u_replace,
        random_ids,
        mask_token_id=mask_token_id,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
    )


def special_tokens_mask(input_ids: Tensor, tokenizer) -> Tensor:
    """(B, T) bool: True where the id is one of `tokenizer.all_special_ids` ([CLS], [SEP], [PAD], [UNK], ...)."""
    special = torch.tensor(
        sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype, device=input_ids.device
    )
    return torch.isin(input_ids, special)


def stable_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed derived from (seed, *counters) by SHA-256: the same on every run, machine and Python."""
    values = (seed, *counters)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"seed and counters must be ints, got {values!r}")
    digest = hashlib.sha256(",".join(str(v) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_generator(seed: int, *counters: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from (seed, *counters), e.g. (seed, rank, batch_index), for resumable training masks."""
    return torch.Generator(device=device).manual_seed(stable_seed(seed, *counters))


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic: it would copy the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """The splitmix64 output function on int64 tensors (bit-identical to the uint64 reference, as int64)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _hash_bits(seed: int, stream: int, row_ids: Tensor, keys: Tensor) -> Tensor:
    """(B, T) non-negative 53-bit ints from hash(seed, stream, row id, key); row_ids (B, 1), keys (B, T)."""
    seed64 = (seed ^ (stream << 56)) & ((1 << 64) - 1)
    seed64 -= (1 << 64) if seed64 >= (1 << 63) else 0
    base = splitmix64(torch.tensor(seed64, dtype=torch.int64, device=keys.device))  # ()
    return _shift_right(splitmix64(splitmix64(base ^ row_ids) ^ keys), 11)  # (B, T)


def _hash_uniform(seed: int, stream: int, row_ids: Tensor, keys: Tensor) -> Tensor:
    return _hash_bits(seed, stream, row_ids, keys).double() * 2.0**-53  # (B, T) in [0, 1)


def _mask_rows_hashed(
    input_ids: Tensor,
    never_mask: Tensor,
    select_keys: Tensor,
    row_ids: Tensor,
    *,
    seed: int,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    mask_replace_prob: float,
    random_replace_prob: float,
) -> tuple[Tensor, Tensor]:
    """Mask rows with hashed uniforms; `select_keys` (B, T) are positions (token level) or word ids (whole word)."""
    rows = row_ids.view(-1, 1)  # (B, 1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, T)
    chosen = (_hash_uniform(seed, _SELECT, rows, select_keys) < probability) & ~never_mask  # (B, T)
    u_replace = None if mask_replace_prob >= 1.0 else _hash_uniform(seed, _REPLACE, rows, positions)
    random_ids = None
    if random_replace_prob > 0.0:
        random_ids = _hash_bits(seed, _RANDOM_ID, rows, positions) % vocab_size  # (B, T)
    return _replace(
        input_ids,
        chosen,
        u_replace,
        random_ids,
        mask_token_id=mask_token_id,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
    )


def mask_eval_set(
    input_ids: Tensor,
    word_ids: Tensor | None = None,
    *,
    seed: int,
    mask_token_id: int,
    vocab_size: int,
    special_mask: Tensor | None = None,
    whole_word: bool = False,
    probability: float | None = None,
    mask_replace_prob: float | None = None,
    random_replace_prob: float | None = None,
    row_ids: Tensor | None = None,
    chunk_rows: int = 4096,
) -> tuple[Tensor, Tensor]:
    """Mask a whole (N, T) evaluation set once, deterministically (the course's `insert_random_mask`).

    Row i's mask is a pure function of (seed, row_ids[i], the row's content): no generator, so it does not depend
    on batch size, processing order or the number of processes. `row_ids` (N,) defaults to `arange(N)`; pass
    the rows' global indices when masking a slice. Token masking never masks `special_mask` (default:
    `word_ids < 0`); whole-word masking needs `word_ids` and never masks -1. Probabilities left at None take the
    defaults of `mask_tokens` (0.15, 0.8, 0.1) or `whole_word_mask` (0.2, 1.0, 0.0). Rows are processed
    `chunk_rows` at a time only to bound memory; the result is the same for any chunking.
    """
    defaults = (0.2, 1.0, 0.0) if whole_word else (0.15, 0.8, 0.1)
    given = (probability, mask_replace_prob, random_replace_prob)
    probability, mask_replace_prob, random_replace_prob = (
        d if v is None else v for v, d in zip(given, defaults)
    )
    _check_probabilities(probability, mask_replace_prob, random_replace_prob)
    if whole_word and word_ids is None:
        raise ValueError("whole_word=True needs word_ids (-1 at special tokens), got None")
    if special_mask is None and word_ids is None:
        raise ValueError("token masking needs special_mask or word_ids to know which positions are special")
    if word_ids is not None:
        _check_same_shape(input_ids, word_ids, "word_ids")
    if special_mask is not None:
        _check_same_shape(input_ids, special_mask, "special_mask")
    never_mask = special_mask.bool() if special_mask is not None else word_ids < 0  # (N, T)
    if whole_word:
        never_mask = never_mask | (word_ids < 0)
    if row_ids is None:
        row_ids = torch.arange(input_ids.shape[0], device=input_ids.device)
    if row_ids.shape != input_ids.shape[:1]:
        raise ValueError(f"row_ids {tuple(row_ids.shape)}: expected one id per row, ({input_ids.shape[0]},)")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: expected a positive int")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (N, T)
    select_keys = word_ids if whole_word else positions  # (N, T)
    outputs = [
        _mask_rows_hashed(
            input_ids[i : i + chunk_rows],
            never_mask[i : i + chunk_rows],
            select_keys[i : i + chunk_rows].long(),
            row_ids[i : i + chunk_rows].long(),
            seed=seed,
            mask_token_id=mask_token_id,
            vocab_size=vocab_size,
            probability=probability,
            mask_replace_prob=mask_replace_prob,
            random_replace_prob=random_replace_prob,
        )
        for i in range(0, input_ids.shape[0], chunk_rows)
    ]
    if not outputs:
        return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    return torch.cat([m for m, _ in outputs]), torch.cat([lab for _, lab in outputs])
