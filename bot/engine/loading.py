"""How the local engine loads a model: dtype, device map and quantization, then the weights.

`plan_load` decides the `from_pretrained` arguments apart from loading, so the rules (bf16 where
the GPU has it, bitsandbytes where it has a backend, ...) are tested without a model; `load_model` and
`load_tokenizer` turn loading failures into one-line `EngineError`s. torch and transformers are
imported inside the functions, so importing the package stays cheap. A `.gguf` file (MODEL or
TOKENIZER) goes through `bot/gguf.py` in the `load_gguf_*_checked` functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.engine.base import EngineError, first_line
from bot.engine.quantize import (
    QUANTIZATIONS,
    QuantizationError,
    bnb_config,
    check_device,
    config_for_quantizing,
)
from bot.gguf import is_gguf

#: The dtype's reason when DTYPE names one (DTYPE=auto gives its own).
SET_BY_DTYPE = "set by DTYPE"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How `from_pretrained` will be called; decided apart from loading so it can be tested."""

    dtype: str
    device_map: str | None
    quantization: str
    kwargs: dict[str, Any]
    why: str = SET_BY_DTYPE  # why this dtype: said beside it in the startup log and doctor


def plan_load(
    dtype: str = "auto",
    device_map: str = "auto",
    quantization: str = "none",
    *,
    cuda: bool | None = None,
) -> LoadPlan:
    """Pick dtype, device map and quantization config; raise EngineError for what cannot work."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if quantization not in QUANTIZATIONS:
        raise EngineError(f"QUANTIZATION={quantization!r} is not valid; use none, 8bit or 4bit")
    why = SET_BY_DTYPE  # DTYPE names one, unless auto picks it below
    if dtype == "auto":
        dtype, why = _auto_dtype(cuda, quantization)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EngineError(f"DTYPE={dtype!r} is not valid; use auto, bfloat16, float16 or float32")
    dm: str | None = None if device_map in ("", "none") else device_map
    if dm == "auto" and not cuda:
        dm = None  # plain CPU load; accelerate's dispatch buys nothing without a GPU
    if dm is not None and dm.startswith("cuda") and not cuda:
        raise EngineError(f"DEVICE_MAP={device_map} asks for a GPU, but CUDA is not available")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "low_cpu_mem_usage": True}
    if quantization != "none":
        dm = _plan_quantized(quantization, dtype, dm, cuda, kwargs)
    if dm is not None:
        kwargs["device_map"] = dm
    return LoadPlan(dtype, dm, quantization, kwargs, why)


def _auto_dtype(cuda: bool, quantization: str) -> tuple[str, str]:
    """DTYPE=auto on this machine: `auto_dtype` with what the hardware has, asked of torch."""
    import torch

    if cuda:
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return auto_dtype(True, quantization, cpu_native_bf16=False, gpu_bf16=gpu_bf16)
    return auto_dtype(False, quantization, cpu_native_bf16=cpu_native_bf16())


def auto_dtype(
    cuda: bool, quantization: str, *, cpu_native_bf16: bool, gpu_bf16: bool = True
) -> tuple[str, str]:
    """(dtype, why) for DTYPE=auto, from what the hardware has.

    GPUs: bf16 where the GPU has it (Ampere+), fp16 on older ones. CPUs: bf16 only where the CPU
    computes it natively (AVX-512 BF16 or AMX): there it halves the bytes a decode step reads
    (decoding is memory-bound), elsewhere torch emulates bf16 and runs slower than fp32. 8-bit
    stays fp32 on the CPU (LLM.int8() casts activations to fp16 for its matmul whatever the
    dtype); 4-bit computes in bf16 under the same native-bf16 rule.
    """
    if cuda:
        if gpu_bf16:
            return "bfloat16", "auto: this GPU has bf16"
        return "float16", "auto: this GPU has no bf16 (before Ampere)"
    if not cpu_native_bf16:
        return "float32", "auto: this CPU has no native bf16 (AVX-512 BF16 or AMX)"
    if quantization == "8bit":
        return "float32", "auto: 8-bit computes in fp16 whatever the dtype; fp32 on the CPU"
    return "bfloat16", "auto: this CPU has native bf16 (AVX-512 BF16 or AMX)"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), as torch detects it
    (its own cpuinfo, the same test its oneDNN kernels make); not guessed from the CPU's name."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _plan_quantized(
    quantization: str, dtype: str, dm: str | None, cuda: bool, kwargs: dict[str, Any]
) -> str:
    """Add bitsandbytes' config to `kwargs` if bitsandbytes can run on the device the weights go
    to (CUDA when there is one and DEVICE_MAP does not say cpu, else the CPU); the device map."""
    import torch

    device = "cuda" if cuda and not (dm or "").startswith("cpu") else "cpu"
    try:
        check_device(quantization, device)
    except QuantizationError as exc:
        raise EngineError(str(exc)) from None
    kwargs["quantization_config"] = bnb_config(quantization, getattr(torch, dtype))
    return dm or ("auto" if device == "cuda" else "cpu")


def checked_source(path: str, what: str) -> str:
    """`path` as `bot.model_source` resolves it: a missing folder or an unreachable, uncached hub
    id is a one-line EngineError in a second, not a minute of hub retries."""
    from bot.model_source import ModelSourceError, resolve_model_source

    try:
        return resolve_model_source(path, what)
    except ModelSourceError as exc:
        raise EngineError(str(exc)) from None


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    source = checked_source(path, "tokenizer")
    if is_gguf(source):
        return load_gguf_tokenizer_checked(source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise EngineError(f"cannot load a tokenizer from {path!r}: {first_line(exc)}") from None


def load_model(path: str, plan: LoadPlan) -> Any:
    """`AutoModelForCausalLM.from_pretrained` as `plan` says, in eval mode."""
    from transformers import AutoModelForCausalLM

    source = checked_source(path, "model")
    _quiet_progress()
    if is_gguf(source):
        return load_gguf_model_checked(source, plan)
    kwargs = dict(plan.kwargs)
    if "quantization_config" in kwargs:
        kwargs.update(_config_to_quantize(source, path))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot load the model {path!r}: {first_line(exc)}") from None
    model.eval()
    return model


def _quiet_progress() -> None:
    """No "Loading weights" progress bar unless a person watches stderr: piped into a log file or
    the console's transcript it is a wall of carriage returns; the startup line says the load time."""
    import sys

    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def _config_to_quantize(source: str, path: str) -> dict[str, Any]:
    """`from_pretrained` kwargs for a bitsandbytes load (`quantize.config_for_quantizing`)."""
    try:
        config = config_for_quantizing(source)
    except QuantizationError as exc:
        raise EngineError(f"the model {path!r}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot load the model {path!r}: {first_line(exc)}") from None
    return {} if config is None else {"config": config}


def load_gguf_tokenizer_checked(source: str) -> Any:
    """The tokenizer and chat template stored in a `.gguf` file (`bot/gguf.py`)."""
    from bot.gguf import GGUFError, load_gguf_tokenizer

    try:
        return load_gguf_tokenizer(source)
    except GGUFError as exc:
        raise EngineError(str(exc)) from None


def load_gguf_model_checked(source: str, plan: LoadPlan) -> Any:
    """A `.gguf` file's model, dequantized by transformers to `plan`'s dtype, in eval mode.

    bitsandbytes quantization of an already quantized file is refused: dequantize it to a folder
    first (`hermes-bot convert`) and quantize that.
    """
    from bot.gguf import GGUFError, load_gguf_model

    if "quantization_config" in plan.kwargs:
        raise EngineError(
            f"QUANTIZATION={plan.quantization} applies to a model folder, not a .gguf file: "
            "run `hermes-bot convert FILE.gguf FOLDER/` and set MODEL to the folder"
        )
    try:
        model = load_gguf_model(source, **plan.kwargs)
    except GGUFError as exc:
        raise EngineError(str(exc)) from None
    model.eval()
    return model


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every token id that ends a reply: the model's generation config plus the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = list(ids) if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
