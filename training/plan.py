"""Which packed rows each optimizer step reads: a pure function of (seed, step), so a resumed run
reads exactly the batches an uninterrupted one would."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import Config
from training.data import read_prepared
from training.tokenize import Encoder, Example

log = logging.getLogger(__name__)


@dataclass
class DataPlan:
    """Which packed rows each optimizer step reads: a pure function of (seed, step).

    Rows are reshuffled every epoch; an epoch that does not fill its last global batch borrows
    rows from its own start (as DistributedSampler does), so every rank always has work.
    """

    examples: list[Example]
    packs: list[list[int]]  # example indices per row
    global_batch: int
    seed: int
    pack_targets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.pack_targets = [sum(self.examples[i].n_targets for i in p) for p in self.packs]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.packs) / self.global_batch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch)."""
        return divmod(step, self.steps_per_epoch)

    def rows(self, step: int) -> list[int]:
        epoch, i = self.position(step)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.packs), generator=g).tolist()
        need = self.steps_per_epoch * self.global_batch
        order = (order * math.ceil(need / len(order)))[:need]
        return order[i * self.global_batch : (i + 1) * self.global_batch]

    def rank_rows(self, step: int, rank: int, world: int) -> list[int]:
        rows = self.rows(step)
        per = len(rows) // world
        return rows[rank * per : (rank + 1) * per]

    def step_targets(self, step: int) -> int:
        return sum(self.pack_targets[r] for r in self.rows(step))

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the data a checkpoint was trained on; resuming on other data is refused."""
        lengths = [len(self.examples[i]) for p in self.packs for i in p]
        digest = hashlib.sha256(",".join(map(str, lengths)).encode()).hexdigest()[:16]
        return {
            "examples": len(self.examples),
            "rows": len(self.packs),
            "tokens": sum(lengths),
            "sha256": digest,
        }


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


def micro_batches(rows: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]
