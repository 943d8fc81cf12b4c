"""Model FLOPs utilisation: the FLOPs a training step needs, and the device's peak to divide by.

    step FLOPs = 6 * N * T  +  12 * L * d * sum(n_i ** 2)

- `N` is the parameters that do a matmul per token: every parameter except the input embedding,
  which is a table lookup (its tied twin, when the output projection shares it, does count);
- `T = sum(n_i)` is the real tokens of the step, `n_i` the length of each document (sample);
- `12 * L * d * n` per token is the attention scores and values, forward and backward (PaLM,
  appendix B), with `n` the length the token can attend over. Packed rows use document masking,
  so a token attends within its own sample: the row length (4096) would overstate it. Per token
  that is `12 * L * d * s_eff` with `s_eff = sum(n_i ** 2) / sum(n_i)`, the token-weighted mean
  document length.

MFU = step FLOPs / (seconds x devices x peak FLOP/s per device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.config import Config

#: Dense bf16 peak TFLOP/s per device, for the MFU estimate (first match in the device name).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
}


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: `train.peak_tflops`, else guessed from the CUDA device name."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def matmul_params(model: Any) -> int:
    """Parameters used in a matmul per token: all of them but the input embedding (a lookup),
    unless it is tied to the output projection (then the one matrix is counted, as lm_head)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return total if tied else total - embedding.numel()


def step_flops(n_matmul: int, layers: int, hidden: int, doc_lengths: Sequence[int]) -> float:
    """Training FLOPs (forward + backward) of a step over documents of `doc_lengths` tokens,
    each attending only within itself: 6*N*sum(n) + 12*L*d*sum(n^2)."""
    tokens = sum(doc_lengths)
    return 6.0 * n_matmul * tokens + 12.0 * layers * hidden * sum(n * n for n in doc_lengths)


def mfu(flops: float, seconds: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation: the share of the devices' peak the step's FLOPs used."""
    return flops / (seconds * devices * peak)
