"""Reference implementations the packing tests and `bench/training_data.py` compare against.

Not product code: the trainer uses `training.packing` only. Here are the unpacked baseline
(`collate_padded`: every sample its own row, padded, with an attention mask), the explicit
block-diagonal causal mask that packed attention must equal, and a loss over full logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.packing import PackedBatch
from training.tokenize import IGNORE_INDEX, Example


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    """The unpacked baseline: [B, L] padded to the longest example, with an attention mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    n_real: int
    n_targets: int


def collate_padded(
    examples: Sequence[Example], pad_id: int, length: int | None = None
) -> PaddedBatch:
    width = length or max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return PaddedBatch(ids, labels, mask, int(mask.sum()), n_targets)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the document each token belongs to: a new one wherever positions restart."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask (True = may attend): causal, and only within a document."""
    doc = document_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    same = doc[:, :, None] == doc[:, None, :]
    return (same & causal)[:, None]


def forward_packed(
    model: torch.nn.Module, batch: PackedBatch, *, explicit_mask: bool = False
) -> torch.Tensor:
    """Logits of a packed row. `use_cache=False` matters: with a cache transformers skips the
    packed-sequence detection and the samples would attend to each other."""
    mask = None
    if explicit_mask:  # additive form: eager adds it to the scores, sdpa accepts it as well
        dtype = next(model.parameters()).dtype
        allowed = block_causal_mask(batch.position_ids)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=mask,
        use_cache=False,
    )
    return out.logits


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over target tokens (fp32). Dividing by the step's target-token count,
    not by the micro-batch's, weights every token equally however the batch was cut."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
