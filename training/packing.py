"""Packing examples into fixed-length rows with no attention across samples.

Padding a batch of chat examples to its longest member wastes most of the compute (the real
samples' median is ~150 tokens, the longest ~1000). Packing fills each row of `max_length` with
whole examples (best-fit decreasing), and keeps them independent:

- `position_ids` restart at 0 for every example, so RoPE sees each one as a fresh sequence;
- attention is per document. transformers derives that from the restarting `position_ids`
  when `attention_mask` is None: flash-attention 2 runs varlen kernels (GPU), sdpa/eager get a
  block-diagonal causal mask (CPU). It does so only without a KV cache, hence `use_cache=False`
  in `packed_loss_sum`; the tests prove the result equals running the samples one by one (the
  explicit-mask reference and the padded baseline live in `tests/packing_reference.py`).
- the first label of every example is -100, so no token is ever predicted across a boundary.

The tail of a row is padding, laid out as one more "document" (positions from 0, labels -100).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.tokenize import IGNORE_INDEX, Example


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens (best-fit decreasing).

    Deterministic for a given input. Items longer than `capacity` are an error: `prepare` has
    already dropped or truncated them.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the packing length {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    return bins


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """One flat row [1, T]: several examples back to back, each with positions from 0."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    n_real: int  # non-pad tokens
    n_targets: int  # tokens that carry loss


def collate_packed(
    examples: Sequence[Example], pad_id: int, length: int | None = None
) -> PackedBatch:
    """Concatenate `examples` into one row, padded at the end to `length` if given."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]  # never predict a token from the previous sample
        positions += range(len(ex))
    n_real = len(ids)
    if length is not None:
        if n_real > length:
            raise ValueError(f"{n_real} tokens do not fit a row of {length}")
        pad = length - n_real
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)
    n_targets = sum(1 for x in labels if x != IGNORE_INDEX)
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    return PackedBatch(as_row(ids), as_row(labels), as_row(positions), n_real, n_targets)


def collate_rows(rows: Sequence[Sequence[Example]], pad_id: int, length: int) -> PackedBatch:
    """Several packed rows as one flat row of len(rows) * length (flash-attention varlen wants
    batch size 1; the position-id restarts keep rows as separate as the samples in them)."""
    flat = [collate_packed(r, pad_id, length) for r in rows]
    cat = lambda xs: torch.cat(xs, dim=1)  # noqa: E731
    return PackedBatch(
        cat([b.input_ids for b in flat]),
        cat([b.labels for b in flat]),
        cat([b.position_ids for b in flat]),
        sum(b.n_real for b in flat),
        sum(b.n_targets for b in flat),
    )


def packed_loss_sum(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Sum of cross-entropy over the target tokens of a packed row, computing the vocabulary
    projection only where there is a target (`logits_to_keep`): with prompts masked that is a
    third of the positions, and the fp32 logits of a 4096-token row (0.5 GB at 32k vocab) shrink
    with it."""
    labels = batch.labels[0]
    keep = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(-1)  # positions that predict a target
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=keep.to(batch.input_ids.device),
    )
    logits = out.logits[0]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels[1:][keep].to(logits.device), reduction="sum")
