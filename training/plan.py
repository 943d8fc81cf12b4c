"""Which examples each optimizer step reads, and how each process packs its share: a pure function
of (seed, step), so a resumed run reads exactly the batches an uninterrupted one would.

The batch is counted in samples, as the recipe states it (stanford_alpaca: 128 samples per
optimizer step): `train.global_batch_size` examples per step over all processes. Packing changes
how those samples are laid out, never how many there are: each process takes its
`global_batch_size / world` samples and packs them (best-fit decreasing) into micro-batches of at
most `micro_batch_size x max_length` tokens, one flat row each with position ids restarting per
sample. Every process runs the same number of micro-batches (FSDP2 collectives must match); one
that needs fewer runs empty ones, which add nothing to the gradients.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import Config
from training.data import read_prepared
from training.packing import pack_lengths
from training.tokenize import Encoder, Example

log = logging.getLogger(__name__)


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Optimizer steps to read every example once (the last step borrows from the start)."""
    return max(1, math.ceil(n_examples / global_batch))


def total_steps(cfg: Config, n_examples: int) -> int:
    """The run's optimizer steps: `train.max_steps`, else `epochs` x steps per epoch."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(
        1, math.ceil(cfg.train.epochs * steps_per_epoch(n_examples, cfg.train.global_batch_size))
    )


def warmup_steps(cfg: Config, total: int) -> int:
    return max(1, math.ceil(cfg.train.warmup_ratio * total)) if cfg.train.warmup_ratio > 0 else 0


@dataclass
class DataPlan:
    """Which examples each optimizer step reads: a pure function of (seed, step).

    Examples are reshuffled every epoch; an epoch that does not fill its last global batch borrows
    examples from its own start (as DistributedSampler does), so every step has a full batch.
    """

    examples: list[Example]
    global_batch: int  # samples per optimizer step, over all processes
    seed: int
    micro_tokens: int = 0  # token capacity of one micro-batch (0: one example per micro-batch)
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(e) for e in self.examples]

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.examples), self.global_batch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch)."""
        return divmod(step, self.steps_per_epoch)

    def samples(self, step: int) -> list[int]:
        """The example indices optimizer step `step` (0-based) reads, over all processes."""
        epoch, i = self.position(step)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        need = self.steps_per_epoch * self.global_batch
        order = (order * math.ceil(need / len(order)))[:need]
        return order[i * self.global_batch : (i + 1) * self.global_batch]

    def rank_samples(self, step: int, rank: int, world: int) -> list[int]:
        rows = self.samples(step)
        per = len(rows) // world
        return rows[rank * per : (rank + 1) * per]

    def _pack(self, samples: list[int]) -> list[list[int]]:
        if not self.micro_tokens:
            return [[i] for i in samples]
        bins = pack_lengths([self.lengths[i] for i in samples], self.micro_tokens)
        return [[samples[j] for j in b] for b in bins]

    def micro_batches(self, step: int, rank: int, world: int) -> list[list[int]]:
        """This process's micro-batches for `step` (example indices each); as many as the busiest
        process needs, so the empty ones at the end keep every process's collectives in step."""
        mine = self._pack(self.rank_samples(step, rank, world))
        most = max(len(self._pack(self.rank_samples(step, r, world))) for r in range(world))
        return mine + [[] for _ in range(most - len(mine))]

    def step_targets(self, step: int) -> int:
        """Target tokens of the whole step: the denominator of its token-weighted loss."""
        return sum(self.examples[i].n_targets for i in self.samples(step))

    def step_lengths(self, step: int) -> list[int]:
        """Token count of each example in the step (for FLOPs under document masking)."""
        return [self.lengths[i] for i in self.samples(step)]

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the data a checkpoint was trained on; resuming on other data is refused."""
        digest = hashlib.sha256(",".join(map(str, self.lengths)).encode()).hexdigest()[:16]
        return {"examples": len(self.examples), "tokens": sum(self.lengths), "sha256": digest}


def load_examples(cfg: Config, encoder: Encoder) -> list[Example]:
    records = read_prepared(Path(cfg.data.prepared_dir))
    examples = [encoder.encode(r) for r in records]
    kept = [ex for ex in examples if len(ex) <= cfg.data.max_length]
    if len(kept) < len(examples):
        log.warning(
            "%d examples longer than %d tokens skipped (prepare with the same max_length)",
            len(examples) - len(kept),
            cfg.data.max_length,
        )
    if not kept:
        raise ValueError(f"no training examples in {cfg.data.prepared_dir}")
    return kept


def schedule_summary(cfg: Config, n_records: int, n_tokens: int) -> str:
    """What `prepare` prints: the batch in samples and tokens, and the optimizer steps it makes."""
    tc = cfg.train
    per_epoch = steps_per_epoch(n_records, tc.global_batch_size)
    total = total_steps(cfg, n_records)
    per_step = n_tokens / max(1, n_records) * tc.global_batch_size
    how = f"train.max_steps={tc.max_steps}" if tc.max_steps else f"{tc.epochs:g} epochs"
    return (
        f"schedule: {n_records} records, {n_tokens} tokens; {tc.global_batch_size} samples "
        f"(~{per_step:,.0f} tokens) per optimizer step; {per_epoch} steps per epoch; "
        f"{total} steps ({how}), warmup {warmup_steps(cfg, total)}"
    )
