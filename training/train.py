"""The training loop: packed batches, FSDP2, AdamW + cosine, checkpoints that resume exactly.

A plain PyTorch loop rather than `transformers.Trainer`: it is the same algorithm (AdamW, cosine
with warmup, gradient accumulation, clipping), but the three things a fine-tune most often gets
wrong are in plain sight here and tested on CPU:

- the loss is a sum over target tokens divided by the target tokens of the whole optimizer step
  (all micro-batches, all ranks), so packing and accumulation never reweight samples;
- the data order is a pure function of (seed, step), so resuming at step k reads exactly the
  batches an uninterrupted run would; checkpoints hold model, optimizer, scheduler, every
  rank's RNG state and that data position;
- with several processes the model is sharded with FSDP2 (`fully_shard` on every
  `LlamaDecoderLayer`, then the root), checkpoints are sharded DCP folders that any world size
  can read, and the export gathers a full state dict to write plain Hugging Face weights.

Launch with `torchrun` (or `accelerate launch`) for several GPUs; one process needs no launcher.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.config import Config
from training.data import read_prepared
from training.packing import collate_rows, pack_lengths, packed_loss_sum
from training.tokenize import Encoder, Example

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # written last: a checkpoint without it was interrupted while saving
STATE_FILE = "trainer_state.json"

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


# --------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> DistInfo:
    """Join the process group torchrun/accelerate set up (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local_rank, device)


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


# --------------------------------------------------------------------------------------------
# Model


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
    """The model training starts from: pretrained weights, or a seeded random `from_config`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn = attn_implementation(cfg)
    if cfg.model.from_config is not None:
        torch.manual_seed(cfg.train.seed)  # the same random base in train and export (LoRA)
        config = LlamaConfig(**cfg.model.from_config)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
        if quantize:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs["device_map"] = {"": device.index if device and device.type == "cuda" else 0}
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kwargs)
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


def shard_model(model: Any, cfg: Config, info: DistInfo) -> Any:
    """FSDP2 full shard: each decoder layer is one unit (gathered just in time), then the root
    (embeddings, norm, lm_head). bf16 compute with fp32 master weights and fp32 reductions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    mesh = init_device_mesh(info.device.type, (info.world,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if cfg.train.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for module in model.modules():
        if isinstance(module, LlamaDecoderLayer):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def check_setup(cfg: Config, info: DistInfo) -> None:
    """Refuse what cannot run here before any tokenizer, data or weights are fetched."""
    if cfg.lora.enabled and info.world > 1:
        raise ValueError("LoRA/QLoRA runs are single-GPU here; use full fine-tuning with FSDP")
    if cfg.lora.load_in_4bit:
        if info.device.type != "cuda":
            raise ValueError("lora.load_in_4bit (QLoRA) needs a CUDA GPU, and none was found")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install 'hermes-discord[gpu]'"
            )


def build_model(cfg: Config, info: DistInfo) -> Any:
    check_setup(cfg, info)
    quantize = cfg.lora.load_in_4bit
    model = load_base_model(
        cfg,
        dtype=torch.bfloat16 if quantize else torch.float32,
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
    if info.world > 1:
        return shard_model(model, cfg, info)
    return model if quantize else model.to(info.device)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Data order


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


# --------------------------------------------------------------------------------------------
# Schedule and checkpoints


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to lr, then cosine down to min_ratio * lr at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_options(cfg: Config) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    lora = cfg.lora.enabled  # LoRA: the adapter only (the frozen base is not saved)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


@contextmanager
def single_process_dcp(active: bool) -> Iterator[None]:
    """DCP warns that it "assumes single process" every time; here that is the plan."""
    with warnings.catch_warnings():
        if active:
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    path: Path,
    *,
    cfg: Config,
    info: DistInfo,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_state_options(cfg))
    with single_process_dcp(info.world == 1):
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path), no_dist=info.world == 1)
    torch.save(rng_state(), path / f"rng-rank{info.rank}.pt")
    info.barrier()
    if info.main:
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
        (path / STATE_FILE).write_text(json.dumps(state, indent=2))
        (path / COMPLETE).write_text("")
        for old in checkpoint_dirs(path.parent.parent)[: -max(1, cfg.train.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    info.barrier()


def load_checkpoint(
    path: Path, *, cfg: Config, info: DistInfo, model: Any, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_state_options(cfg))
    sd = {"model": msd, "optim": osd}
    with single_process_dcp(info.world == 1):
        dcp.load(sd, checkpoint_id=str(path), no_dist=info.world == 1)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=sd["model"],
        optim_state_dict=sd["optim"],
        options=_state_options(cfg),
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    state = json.loads((path / STATE_FILE).read_text())
    rng_file = path / f"rng-rank{info.rank}.pt"
    if state.get("world") == info.world and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning(
            "checkpoint was written by %s processes, now %d: RNG streams start afresh",
            state.get("world"),
            info.world,
        )
    return state


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    step: int
    total_steps: int
    losses: list[float]  # per optimizer step run in this call
    checkpoint: Path | None
    export_dir: Path | None


def _all_sum(value: torch.Tensor, info: DistInfo) -> float:
    if info.world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def _full(x: Any) -> Any:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def train(
    cfg: Config,
    *,
    resume: str | None = "auto",
    stop_after: int | None = None,
    info: DistInfo | None = None,
) -> TrainResult:
    """Train per `cfg`. `resume`: "auto" (latest checkpoint in output_dir, if any), a checkpoint
    path, or None (start fresh). `stop_after`: stop (with a checkpoint) after that many optimizer
    steps in total, as if interrupted there; for tests and time-boxed jobs."""
    from transformers import AutoTokenizer

    info = info or init_distributed()
    check_setup(cfg, info)
    tc = cfg.train
    out = Path(tc.output_dir)
    seed_everything(tc.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    encoder = Encoder(tokenizer)
    examples = load_examples(cfg, encoder)
    packs = pack_lengths([len(e) for e in examples], cfg.data.max_length)
    plan = DataPlan(examples, packs, tc.global_batch_size, tc.seed)
    per_rank = tc.global_batch_size // info.world
    if per_rank * info.world != tc.global_batch_size or per_rank % tc.micro_batch_size:
        raise ValueError(
            f"global_batch_size {tc.global_batch_size} must be a multiple of "
            f"world size {info.world} x micro_batch_size {tc.micro_batch_size}"
        )
    total = tc.max_steps or max(1, math.ceil(tc.epochs * plan.steps_per_epoch))
    warmup = max(1, math.ceil(tc.warmup_ratio * total)) if tc.warmup_ratio > 0 else 0

    model = build_model(cfg, info)
    base = model.get_base_model() if cfg.lora.enabled else model
    n_params = count_params(base) if not cfg.lora.load_in_4bit else 0
    mc = base.config
    fpt = flops_per_token(n_params, mc.num_hidden_layers, mc.hidden_size, cfg.data.max_length)
    peak = peak_flops(cfg, info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=tc.lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_eps,
        weight_decay=tc.weight_decay,
    )
    scheduler = cosine_schedule(optimizer, warmup, total, tc.min_lr_ratio)

    step = 0
    ckpt: Path | None = None
    if resume is not None:
        found = checkpoint_dirs(out) if resume == "auto" else [Path(resume)]
        if found:
            ckpt = found[-1]
            state = load_checkpoint(
                ckpt, cfg=cfg, info=info, model=model, optimizer=optimizer, scheduler=scheduler
            )
            if state["data"] != plan.fingerprint():
                raise ValueError(
                    f"{ckpt} was trained on other data ({state['data']}, now "
                    f"{plan.fingerprint()}); use a new output_dir or resume: none"
                )
            step = state["step"]
            if info.main:
                log.info(
                    "resumed from %s at step %d (epoch %d, step %d in epoch)",
                    ckpt,
                    step,
                    *plan.position(step),
                )

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log.info(
            "%d examples in %d rows of %d tokens; %d steps/epoch, %d steps, warmup %d; "
            "%d processes on %s",
            len(examples),
            len(packs),
            cfg.data.max_length,
            plan.steps_per_epoch,
            total,
            warmup,
            info.world,
            info.device,
        )
    use_autocast = tc.precision == "bf16" and info.world == 1
    autocast = (
        torch.autocast(info.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()
    )
    bar = None
    if info.main and tc.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    losses: list[float] = []
    end = min(total, stop_after) if stop_after is not None else total
    model.train()
    while step < end:
        t0 = time.perf_counter()
        n_targets = plan.step_targets(step)
        loss_sum = torch.zeros((), device=info.device)
        real = 0
        for rows in micro_batches(plan.rank_rows(step, info.rank, info.world), tc.micro_batch_size):
            batch = collate_rows(
                [[examples[i] for i in packs[r]] for r in rows], encoder.pad, cfg.data.max_length
            )
            real += batch.n_real
            with autocast:
                loss = packed_loss_sum(model, _to(batch, info.device))
            # FSDP averages gradients over ranks; * world makes it the step's token-weighted sum.
            (loss * (info.world / max(1, n_targets))).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = _all_sum(loss_sum, info) / max(1, n_targets)
        tokens = _all_sum(torch.tensor(float(real), device=info.device), info)
        losses.append(loss_value)
        dt = time.perf_counter() - t0
        if info.main:
            tps = tokens / dt
            mfu = tps / info.world * fpt / peak if peak and n_params else None
            entry = {
                "step": step,
                "epoch": round(step / plan.steps_per_epoch, 4),
                "loss": round(loss_value, 6),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": round(float(_full(grad_norm)), 4),
                "tokens_per_s": round(tps, 1),
                "tokens_per_s_per_device": round(tps / info.world, 1),
                "mfu": round(mfu, 4) if mfu is not None else None,
            }
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{entry['lr']:.2e}",
                    tok_s=f"{tps:,.0f}",
                    mfu=f"{mfu:.1%}" if mfu is not None else "n/a",
                )
            if step % max(1, tc.log_every) == 0:
                log.info("step %s", json.dumps(entry))
        if step == end or (tc.save_every and step % tc.save_every == 0):
            epoch, in_epoch = plan.position(step)
            ckpt = out / CHECKPOINTS / f"step-{step:08d}"
            save_checkpoint(
                ckpt,
                cfg=cfg,
                info=info,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                state={
                    "step": step,
                    "total_steps": total,
                    "epoch": epoch,
                    "step_in_epoch": in_epoch,
                    "world": info.world,
                    "data": plan.fingerprint(),
                },
            )
    if bar is not None:
        bar.close()
    exported = None
    if step >= total and tc.export_dir:
        from training.export import export_checkpoint, export_live_model

        exported = Path(tc.export_dir)
        if cfg.lora.enabled:
            if info.main and ckpt is not None:
                export_checkpoint(cfg, ckpt, exported)
        else:
            export_live_model(cfg, model, tokenizer, exported, info, step=step)
        info.barrier()
    return TrainResult(step, total, losses, ckpt, exported)


def _to(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    return type(batch)(
        batch.input_ids.to(device),
        batch.labels.to(device),
        batch.position_ids.to(device),
        batch.n_real,
        batch.n_targets,
    )
