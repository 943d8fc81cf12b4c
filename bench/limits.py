"""The physical limit of single-stream decoding: memory bandwidth against bytes read per token.

One decode step of a dense model reads every weight once (the tied embedding too, as the LM
head), so at batch 1 a step cannot be faster than (weight bytes) / (memory bandwidth). The
bandwidth is measured in this process, with the same torch thread count as the decoding it is
compared with: a sum over a tensor far larger than any cache, best of a few passes (a read, as
the weights are read). Used by `bench/engine.py` S.

A batched decode step is not bound by bandwidth on a CPU but by its matmuls' arithmetic, which
small row counts run well below the CPU's peak (`matmul_seconds`): `bench/engine.py` P1 prints
the burst's floor from it.
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


def matmul_seconds(model: Any, rows: int, passes: int = 5) -> float:
    """Seconds one decode step of `rows` rows spends in its matmuls alone: every linear layer
    of `model` (the LM head too) called on `rows` random rows, as the model holds it
    (`DecodeLinear`'s transposed weight, `nn.Linear`, a quantized subclass), best of `passes`.
    Nothing else of a step (attention, norms, sampling, Python) is in it: no engine's step
    with these weights and kernels is faster."""
    import torch

    from bot.engine.cpu_weights import classes

    kinds = (classes()["DecodeLinear"], torch.nn.Linear)
    layers = [(m, next(m.parameters()).device) for m in model.modules() if isinstance(m, kinds)]
    xs = {  # one input per width and device (a model split over GPUs keeps each layer's own)
        key: torch.randn(rows, key[0], device=key[1], dtype=model.dtype)
        for key in {(m.in_features, device) for m, device in layers}
    }
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            t0 = time.perf_counter()
            for m, device in layers:
                y = m(xs[m.in_features, device])
            float(y[0, 0])  # done (and synced on a GPU) before the clock stops
            best = min(best, time.perf_counter() - t0)
    return best


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
