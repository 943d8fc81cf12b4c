"""The physical limit of single-stream decoding: memory bandwidth against bytes read per token.

One decode step of a dense model reads every weight once (the tied embedding too, as the LM
head), so at batch 1 a step cannot be faster than (weight bytes) / (memory bandwidth). The
bandwidth is measured in this process, with the same torch thread count as the decoding it is
compared with: a sum over a tensor far larger than any cache, best of a few passes (a read, as
the weights are read). Used by `bench/engine.py` S.
"""

from __future__ import annotations

import math
import time
from typing import Any

#: Size of the tensor summed to measure bandwidth: well beyond any CPU's last-level cache.
BANDWIDTH_MIB = 1024


def memory_bandwidth_gbs(device: Any = "cpu", mib: int = BANDWIDTH_MIB, passes: int = 5) -> float:
    """Read bandwidth in GB/s (10^9 bytes/s): `torch.sum` over `mib` MiB of fp32, best pass."""
    import torch

    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        float(x.sum())  # .item(): the sum is done (and synced on a GPU) before the clock stops
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones counted once),
    but not an input embedding the LM head does not share (a step looks up one row of it)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    shared = getattr(head, "weight", None) is embedding
    return sum(
        p.numel() * p.element_size() for p in model.parameters() if shared or p is not embedding
    )


def limit_line(label: str, tokens_per_s: float, nbytes: int, bandwidth_gbs: float) -> str:
    """"label: T tokens/s x M MB/token = G GB/s, P% of the measured bandwidth"."""
    gbs = tokens_per_s * nbytes / 1e9
    return (
        f"  {label}: {tokens_per_s:.1f} tokens/s x {significant(nbytes / 1e6)} MB/token = "
        f"{significant(gbs)} GB/s, {100 * gbs / bandwidth_gbs:.0f}% of the measured bandwidth"
    )


def significant(x: float, digits: int = 3) -> str:
    """`x` in fixed point with at least two decimals and `digits` significant ones: a small
    test model's MB and GB/s do not round to 0.00 (nor turn into 1e-05)."""
    decimals = 2 if x >= 1 or x <= 0 else max(2, digits - 1 - math.floor(math.log10(x)))
    return f"{x:.{decimals}f}"
