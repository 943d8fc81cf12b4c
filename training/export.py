"""Checkpoints -> one consolidated Hugging Face folder the bot loads as `MODEL=<folder>`.

The folder holds safetensors weights, config.json, the tokenizer and a generation_config.json
whose EOS is the one training taught the model to emit. Two ways in, one way out:

- at the end of a run: the FSDP shards are gathered into a full state dict (on rank 0, offloaded
  to CPU), so no checkpoint conversion is needed;
- `python -m training export`: any DCP checkpoint (written by any number of processes) is read
  into one process. LoRA/QLoRA checkpoints hold only the adapter: it is applied to the base model
  in full precision (never the 4-bit one) and merged, so the bot needs neither peft nor
  bitsandbytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from training import hub
from training.checkpoint import single_process_dcp, step_of
from training.config import Config
from training.model import add_lora, load_base_model
from training.tokenize import pad_id_for

log = logging.getLogger(__name__)

TRAINING_INFO = "hermes_training.json"


def base_config(cfg: Config) -> Any:
    from transformers import AutoConfig, LlamaConfig

    if cfg.model.from_config is not None:
        return LlamaConfig(**cfg.model.from_config)
    return hub.load("model", str(cfg.model.name_or_path), AutoConfig.from_pretrained)


def model_from_state_dict(cfg: Config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """A model built on the meta device whose parameters are `state` (no 7B random init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config(cfg), dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def generation_config(cfg: Config, tokenizer: Any) -> Any:
    """The base model's generation defaults (if any) with this tokenizer's BOS/EOS/pad.

    With a chat template the EOS list also holds the template's end-of-turn token (Llama-3's
    `<|eot_id|>` is not its EOS), the token training taught the model to end a reply with, so
    any server that reads generation_config.json stops there."""
    from transformers import GenerationConfig

    from bot.prompt_template import TemplateError, choose_format

    gen = None
    if cfg.model.name_or_path:
        try:
            gen = hub.load("model", cfg.model.name_or_path, GenerationConfig.from_pretrained)
        except OSError:  # none published (or no hub): transformers' defaults
            gen = None
    gen = gen or GenerationConfig()
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    try:
        ends = choose_format("auto", tokenizer).end_ids
    except TemplateError:
        ends = ()
    if [i for i in ends if i != tokenizer.eos_token_id]:
        gen.eos_token_id = list(dict.fromkeys([tokenizer.eos_token_id, *ends]))
    gen.pad_token_id = pad_id_for(tokenizer)
    return gen


def check_finite(model: Any, *, step: int | None) -> None:
    """Refuse weights with a NaN or inf: the bot would load them and answer nothing useful."""
    bad = [k for k, v in model.state_dict().items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"refusing to export step {step}: {len(bad)} weight tensors are not finite "
            f"(first: {bad[0]}); export an earlier checkpoint with --checkpoint"
        )


def save_hf_folder(cfg: Config, model: Any, tokenizer: Any, out: Path, *, step: int | None) -> Path:
    check_finite(model, step=step)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.generation_config = generation_config(cfg, tokenizer)
    model.save_pretrained(out, max_shard_size=cfg.export.max_shard_size)
    tokenizer.save_pretrained(out)
    (out / TRAINING_INFO).write_text(json.dumps({"step": step, "config": cfg.to_dict()}, indent=2))
    log.info("exported a Hugging Face folder to %s (use MODEL=%s)", out, out)
    return out


def _dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.export.dtype)


def export_live_model(
    cfg: Config, model: Any, tokenizer: Any, out: Path, info: Any, *, step: int
) -> None:
    """Gather the (possibly sharded) model on rank 0 and write the folder. All ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if info.main:
        save_hf_folder(
            cfg, model_from_state_dict(cfg, state, _dtype(cfg)), tokenizer, out, step=step
        )


def export_checkpoint(cfg: Config, checkpoint: Path, out: Path) -> Path:
    """Read a DCP checkpoint in this one process and write the Hugging Face folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    no_dist = not dist.is_initialized()
    tokenizer = hub.load_tokenizer(cfg.tokenizer_path)
    step = step_of(checkpoint)
    if cfg.lora.enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        # the base in the export dtype (bf16: 14 GB of RAM for 7B), never 4-bit; peft keeps the
        # adapter in fp32 and merges its delta into each weight
        model = add_lora(cfg, load_base_model(cfg, dtype=_dtype(cfg)))
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        adapter = get_model_state_dict(model, options=options)
        with single_process_dcp(no_dist):
            dcp.load({"model": adapter}, checkpoint_id=str(checkpoint), no_dist=no_dist)
        set_model_state_dict(model, adapter, options=options)
        merged = model.merge_and_unload()
        return save_hf_folder(cfg, merged.to(_dtype(cfg)), tokenizer, out, step=step)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config(cfg), dtype=torch.float32)
    state = {k: torch.empty_like(v, device="cpu") for k, v in skeleton.state_dict().items()}
    with single_process_dcp(no_dist):
        dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=no_dist)
    model = model_from_state_dict(cfg, state, _dtype(cfg))
    return save_hf_folder(cfg, model, tokenizer, out, step=step)
