"""Model FLOPs utilisation: the FLOPs a training step needs, and the device's peak to divide by."""

from __future__ import annotations

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
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus 12*L*d*s for
    attention scores (PaLM appendix B). Llama-2-7B at 4096: ~46.9 GFLOP."""
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len
