"""bitsandbytes quantization (QUANTIZATION=8bit|4bit): where it can run, its config, the footprint.

Whether a device can hold bitsandbytes weights is asked of bitsandbytes itself, not guessed from
`torch.cuda.is_available()`: the device type must be in its `supported_torch_devices` and its op
registry must hold a 4-bit and an 8-bit kernel for that device (the CPU backend registers its
kernels only when `libbitsandbytes_cpu` loaded). Releases before `BNB_MIN_VERSION` had no
official CPU backend, so they are refused with the version needed.

On CPUs with AVX512-BF16, importing bitsandbytes asks the model hub for a fused kernel
("kernels-community/quantization-bitsandbytes") and logs "Failed to load CPU gemm_4bit_forward"
when it cannot have it. The bot never downloads at run time, so the first import happens inside
`hub_kernels_local_only()`: the `kernels` package resolves from its local cache only (its
documented `HF_HUB_OFFLINE` behaviour) and the fallback notice becomes one debug line. A kernel
already in the local cache is still used.

Used by the engine's loader (`loading.py`) and by the training package's QLoRA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: The first bitsandbytes release with official CPU support (its installation guide from 0.48
#: on lists CPUs beside NVIDIA GPUs); CUDA worked long before, but one floor keeps it simple.
BNB_MIN_VERSION = "0.48.0"

#: What QUANTIZATION may be; "none" loads plain weights.
QUANTIZATIONS = ("none", "8bit", "4bit")

#: The ops a quantized Linear layer needs, per QUANTIZATION, looked up in bitsandbytes' registry.
_OPS = {
    "4bit": ("bitsandbytes::quantize_4bit", "bitsandbytes::dequantize_4bit"),
    "8bit": ("bitsandbytes::int8_vectorwise_quant", "bitsandbytes::int8_linear_matmul"),
}

#: The hub-kernel notice bitsandbytes logs when the fused CPU kernel is not to be had.
_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
#: Where LLM.int8() warns, on every forward of every layer, that fp32/bf16 activations are cast to
#: fp16 for its matmul: what 8-bit always does, so it is said once at debug level instead.
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"


class QuantizationError(Exception):
    """One line saying why bitsandbytes cannot quantize here (shown to the user as is)."""


class _HubNotice(logging.Filter):
    """Turns bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning into a debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" in record.getMessage():
            log.debug("bitsandbytes: fused CPU 4-bit kernel not in the local cache; using its own")
            return False
        return True


class _CastNotice(logging.Filter):
    """Keeps bitsandbytes' per-forward "MatMul8bitLt: inputs will be cast" warning out of the log
    (a reply would print it once per layer); the first one becomes a debug line."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "inputs will be cast" not in record.getMessage():
            return True
        if not self.said:
            self.said = True
            log.debug("bitsandbytes 8-bit: %s", record.getMessage())
        return False


@contextlib.contextmanager
def hub_kernels_local_only() -> Iterator[None]:
    """While inside, the `kernels` hub client answers from its local cache only (no request),
    and bitsandbytes' notice about a missing hub kernel is a debug line, not a warning."""
    notice = _HubNotice()
    logger = logging.getLogger(_HUB_KERNEL_LOGGER)
    logger.addFilter(notice)
    constants: Any = None
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE if constants is not None else None
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # what `kernels.get_kernel` reads for local_files_only
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = offline
        logger.removeFilter(notice)


def installed_version() -> str | None:
    """The installed bitsandbytes version, without importing it (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def import_bitsandbytes() -> Any:
    """`import bitsandbytes`, the first time with the hub-kernel lookup kept local and quiet."""
    with hub_kernels_local_only():
        import bitsandbytes

    cast_logger = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(f, _CastNotice) for f in cast_logger.filters):
        cast_logger.addFilter(_CastNotice())
    return bitsandbytes


def _too_old(found: str) -> bool:
    from packaging.version import Version

    return Version(found) < Version(BNB_MIN_VERSION)


def registered_devices(quantization: str) -> set[str]:
    """Device types for which bitsandbytes (imported quietly) has the ops `quantization` needs.

    A device counts when bitsandbytes lists it in `supported_torch_devices` and every op has a
    kernel for its dispatch key, or a device-independent one ("default" backend). CUDA also needs
    bitsandbytes' native CUDA library to have loaded."""
    import torch

    bnb = import_bitsandbytes()
    from bitsandbytes import cextension

    native = not isinstance(cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary)
    found = set()
    for device in sorted(getattr(bnb, "supported_torch_devices", ())):
        key = {"cuda": "CUDA", "cpu": "CPU", "xpu": "XPU", "mps": "MPS", "hpu": "HPU"}.get(device)
        if key is None:
            continue
        if device == "cuda" and not (native and torch.cuda.is_available()):
            continue
        if all(_has_kernel(op, key) for op in _OPS[quantization]):
            found.add(device)
    return found


def _has_kernel(op: str, key: str) -> bool:
    import torch

    try:
        return any(
            torch._C._dispatch_has_kernel_for_dispatch_key(op, k)
            for k in (key, "CompositeExplicitAutograd", "CompositeImplicitAutograd")
        )
    except RuntimeError:  # the op is not defined in this bitsandbytes
        return False
    except AttributeError:  # a torch without this registry query: trust the device list
        return True


def refusal(
    quantization: str,
    device: str,
    found: str | None,
    devices: set[str],
    *,
    setting: str = "",
    instead: str = "set QUANTIZATION=none",
) -> str | None:
    """Why `quantization` cannot run on `device`, given what bitsandbytes reports (`found`: its
    version or None; `devices`: its registered device types); None when it can. `setting` names
    what asked (default QUANTIZATION=...), `instead` what to do rather."""
    what = setting or f"QUANTIZATION={quantization}"
    need = f"bitsandbytes>={BNB_MIN_VERSION}"
    if found is None:
        return f"{what} needs bitsandbytes: pip install 'hermes-discord[quant]' ({need}), or {instead}"
    if _too_old(found):
        return (
            f"{what}: bitsandbytes {found} is too old for {device}; {need} has the backend: "
            f"pip install -U '{need}', or {instead}"
        )
    if device not in devices:
        have = ", ".join(sorted(devices)) or "no device"
        return (
            f"{what}: bitsandbytes {found} has no backend for {device} "
            f"(it can run on: {have}); {instead}"
        )
    return None


def check_device(quantization: str, device: str, **wording: str) -> None:
    """Raise QuantizationError (one line) unless bitsandbytes can quantize on `device`;
    `wording` is `refusal`'s setting/instead."""
    found = installed_version()
    devices: set[str] = set()
    if found is not None and not _too_old(found):
        devices = registered_devices(quantization)
    if problem := refusal(quantization, device, found, devices, **wording):
        raise QuantizationError(problem)


def bnb_config(quantization: str, dtype: Any) -> Any:
    """transformers' BitsAndBytesConfig: NF4 with double quantization computing in `dtype` for
    4bit, LLM.int8() for 8bit."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def config_for_quantizing(source: str) -> Any:
    """The model's config to load with bitsandbytes, or None to let transformers read it.

    A folder saved after a GGUF load (before bot.gguf dropped it) keeps a `quantization_config`
    of method "gguf" although its weights are plain tensors; transformers refuses to mix it with
    bitsandbytes, so that leftover is dropped. A model saved quantized by bitsandbytes loads as
    it is; one quantized another way (GPTQ, AWQ, ...) is a QuantizationError."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    existing = getattr(config, "quantization_config", None)
    if existing is None:
        return None
    method = existing.get("quant_method") if isinstance(existing, dict) else existing.quant_method
    method = str(getattr(method, "value", method)).lower()
    if method == "gguf":
        del config.quantization_config
        return config
    if method == "bitsandbytes":
        return None
    raise QuantizationError(f"already quantized ({method}); set QUANTIZATION=none to load it")


def footprint_mb(model: Any) -> float:
    """The model's parameters and buffers in MiB, as transformers measures them (4-bit weights
    count at their packed size)."""
    return float(model.get_memory_footprint()) / 2**20
