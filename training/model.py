"""The model a run trains: base weights (or a seeded random `from_config`), LoRA/QLoRA, activation
checkpointing and FSDP2 sharding.

Both `train.py` (to build what it trains) and `export.py` (to rebuild the base a LoRA adapter is
merged into) use this module; it imports neither of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from bot.gguf import is_gguf, plain_model
from training import hub
from training.config import Config
from training.distributed import DistInfo


def attn_implementation(cfg: Config) -> str:
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"  # varlen kernels for packed rows
    return "sdpa"


def load_base_model(
    cfg: Config,
    *,
    dtype: torch.dtype = torch.float32,
    quantize: bool = False,
    device: torch.device | None = None,
) -> Any:
    """The model training starts from: pretrained weights (a folder, a hub id or a `.gguf`
    file, dequantized), or a seeded random `from_config`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn = attn_implementation(cfg)
    if cfg.model.from_config is not None:
        torch.manual_seed(cfg.train.seed)  # the same random base in train and export (LoRA)
        config = LlamaConfig(**cfg.model.from_config)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
        name = str(cfg.model.name_or_path)
        if quantize and is_gguf(name):
            raise ValueError(
                f"lora.load_in_4bit needs a model folder, not {name}: run `hermes-bot convert "
                f"{name} FOLDER/` and train from the folder"
            )
        if quantize:
            kwargs.update(_qlora_kwargs(name, dtype, device))
        model = hub.load("model", name, AutoModelForCausalLM.from_pretrained, **kwargs)
        if is_gguf(name):  # a plain model: trainable, saveable, no GGUF quantizer attached
            model = plain_model(model)
    model.config.use_cache = False
    return model


def add_lora(cfg: Config, model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (the only kind FSDP2 and LoRA both like)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """Each decoder layer once: the `torch.compile` wrapper where there is one, else the layer."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    found: list[torch.nn.Module] = []
    wrapped: set[int] = set()
    for module in model.modules():  # pre-order: a wrapper comes before the layer it wraps
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, LlamaDecoderLayer):
            found.append(module)
            wrapped.add(id(inner))
        elif isinstance(module, LlamaDecoderLayer) and id(module) not in wrapped:
            found.append(module)
    return found


def compile_layers(model: Any) -> int:
    """Replace each decoder layer by its `torch.compile` wrapper (as torchtitan does, before
    FSDP2 wraps it, so FSDP's hooks stay outside the compiled graph). Returns how many."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LlamaDecoderLayer):
                parent.register_module(name, torch.compile(child))
                count += 1
    return count


def set_grad_sync(model: Any, on: bool) -> bool:
    """FSDP2: whether the next backward reduce-scatters gradients (off: they accumulate locally
    until the last micro-batch of the step). False when the model is not sharded."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:
        return False
    setter(on)
    return True


def shard_model(model: Any, cfg: Config, info: DistInfo) -> Any:
    """FSDP2 full shard: each decoder layer is one unit (gathered just in time), then the root
    (embeddings, norm, lm_head). bf16 compute with fp32 master weights and fp32 reductions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if cfg.train.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _qlora_kwargs(name: str, dtype: torch.dtype, device: torch.device | None) -> dict[str, Any]:
    """`from_pretrained` kwargs for QLoRA's base: NF4 with double quantization computing in
    `dtype`, placed on the training device (a GPU, or the CPU through bitsandbytes' CPU backend).
    A local folder's leftover GGUF `quantization_config` is dropped (`config_for_quantizing`)."""
    from bot.engine.quantize import bnb_config, config_for_quantizing, import_bitsandbytes

    import_bitsandbytes()  # the first import keeps bitsandbytes' hub-kernel lookup local
    kwargs: dict[str, Any] = {"quantization_config": bnb_config("4bit", dtype)}
    if device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    elif device is None and torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    else:
        kwargs["device_map"] = {"": "cpu"}
    path = Path(name).expanduser()
    if path.is_dir() and (config := config_for_quantizing(str(path))) is not None:
        kwargs["config"] = config
    return kwargs


def qlora_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype of QLoRA's 4-bit base: bf16 on a GPU and on CPUs with native bf16,
    else fp32 (emulated bf16 on the CPU is slower than fp32)."""
    from bot.engine.loading import cpu_native_bf16

    return torch.bfloat16 if device.type != "cpu" or cpu_native_bf16() else torch.float32


def check_setup(cfg: Config, info: DistInfo) -> None:
    """Refuse what cannot run here before any tokenizer, data or weights are fetched."""
    if cfg.lora.enabled and info.world > 1:
        raise ValueError("LoRA/QLoRA runs are single-GPU here; use full fine-tuning with FSDP")
    if cfg.lora.load_in_4bit:
        from bot.engine.quantize import QuantizationError, check_device

        try:
            check_device(
                "4bit", info.device.type, setting="lora.load_in_4bit (QLoRA)",
                instead="set lora.load_in_4bit: false (plain LoRA)",
            )
        except QuantizationError as exc:
            raise ValueError(str(exc)) from None


def build_model(cfg: Config, info: DistInfo) -> Any:
    """The model as the loop trains it: on the device, adapted, checkpointed and sharded."""
    check_setup(cfg, info)
    quantize = cfg.lora.load_in_4bit
    model = load_base_model(
        cfg,
        dtype=qlora_dtype(info.device) if quantize else torch.float32,
        quantize=quantize,
        device=info.device,
    )
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if cfg.lora.enabled:
        model = add_lora(cfg, model)
    if cfg.model.gradient_checkpointing and not quantize:
        enable_checkpointing(model)
    if cfg.model.compile:
        compile_layers(model)
    if info.world > 1:
        return shard_model(model, cfg, info)
    return model if quantize else model.to(info.device)


def nonfinite_weights(model: Any, info: DistInfo) -> int:
    """How many parameter tensors hold a NaN or inf, over every process's shards."""
    import torch.distributed as dist

    local = sum(
        1
        for p in model.parameters()
        if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
    )
    count = torch.tensor(local, device=info.device)
    if info.world > 1:
        dist.all_reduce(count)
    return int(count)
