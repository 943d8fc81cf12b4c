"""The training loop: packed batches, FSDP2, AdamW + cosine, checkpoints that resume exactly.

A plain PyTorch loop rather than `transformers.Trainer`: it is the same algorithm (AdamW, cosine
with warmup, gradient accumulation, clipping), but the three things a fine-tune most often gets
wrong are in plain sight here and tested on CPU:

- the loss is a sum over target tokens divided by the target tokens of the whole optimizer step
  (all micro-batches, all ranks), so packing and accumulation never reweight samples;
- the data order is a pure function of (seed, step) (`training.plan`), so resuming at step k
  reads exactly the batches an uninterrupted run would; checkpoints (`training.checkpoint`) hold
  model, optimizer, scheduler, every rank's RNG state and that data position;
- with several processes the model is sharded with FSDP2 (`training.model.shard_model`),
  checkpoints are sharded DCP folders that any world size can read, and the export gathers a
  full state dict to write plain Hugging Face weights.

The loop in `train` is four calls: `setup` builds everything once, `train_step` runs one
optimizer step, `log_step` writes its figures, `save` writes a checkpoint. Launch with `torchrun`
(or `accelerate launch`) for several GPUs; one process needs no launcher.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import (
    CHECKPOINTS,
    checkpoint_dirs,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from training.config import Config
from training.distributed import DistInfo, all_sum, full, init_distributed
from training.export import export_checkpoint, export_live_model
from training.flops import flops_per_token, peak_flops
from training.model import build_model, check_setup, count_params
from training.packing import collate_rows, pack_lengths, packed_loss_sum
from training.plan import DataPlan, load_examples, micro_batches
from training.tokenize import Encoder

log = logging.getLogger(__name__)


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


@dataclass
class TrainResult:
    step: int
    total_steps: int
    losses: list[float]  # per optimizer step run in this call
    checkpoint: Path | None
    export_dir: Path | None


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`; `step` is the optimizer steps done."""

    cfg: Config
    info: DistInfo
    out: Path
    tokenizer: Any
    encoder: Encoder
    plan: DataPlan
    total: int
    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    flops_per_token: float
    peak: float | None
    autocast: AbstractContextManager[Any]
    step: int = 0
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)
    bar: Any = None


@dataclass
class StepStats:
    """What one optimizer step did, for the log."""

    loss: float
    grad_norm: float
    lr: float
    tokens: float  # real (non-pad) tokens over all ranks
    seconds: float


# --------------------------------------------------------------------------------------------
# setup


def setup(cfg: Config, info: DistInfo, resume: str | None) -> Run:
    """Tokenizer, examples and their order, model, optimizer and schedule; then the resume."""
    check_setup(cfg, info)  # refuse QLoRA without CUDA etc. before anything is fetched
    from transformers import AutoTokenizer

    tc = cfg.train
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=tc.lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_eps,
        weight_decay=tc.weight_decay,
    )
    bf16_autocast = tc.precision == "bf16" and info.world == 1  # FSDP2 casts by its own policy
    run = Run(
        cfg=cfg,
        info=info,
        out=Path(tc.output_dir),
        tokenizer=tokenizer,
        encoder=encoder,
        plan=plan,
        total=total,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=cosine_schedule(optimizer, warmup, total, tc.min_lr_ratio),
        flops_per_token=fpt if n_params else 0.0,
        peak=peak_flops(cfg, info.device),
        autocast=(
            torch.autocast(info.device.type, dtype=torch.bfloat16)
            if bf16_autocast
            else nullcontext()
        ),
    )
    if resume is not None:
        resume_from(run, checkpoint_dirs(run.out) if resume == "auto" else [Path(resume)])
    if info.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
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
        if tc.progress_bar:
            from tqdm.auto import tqdm

            run.bar = tqdm(total=total, initial=run.step, desc="train", dynamic_ncols=True)
    return run


def resume_from(run: Run, found: list[Path]) -> None:
    """Load the latest of `found` (if any), refusing a checkpoint trained on other data."""
    if not found:
        return
    ckpt = found[-1]
    state = load_checkpoint(
        ckpt,
        cfg=run.cfg,
        info=run.info,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
    )
    if state["data"] != run.plan.fingerprint():
        raise ValueError(
            f"{ckpt} was trained on other data ({state['data']}, now "
            f"{run.plan.fingerprint()}); use a new output_dir or resume: none"
        )
    run.step, run.checkpoint = state["step"], ckpt
    if run.info.main:
        pos = run.plan.position(run.step)
        log.info("resumed from %s at step %d (epoch %d, step %d in epoch)", ckpt, run.step, *pos)


# --------------------------------------------------------------------------------------------
# one optimizer step


def train_step(run: Run) -> StepStats:
    """Forward and backward over this rank's micro-batches, then clip, update and schedule."""
    cfg, info, plan = run.cfg, run.info, run.plan
    t0 = time.perf_counter()
    n_targets = plan.step_targets(run.step)  # of the whole step: every micro-batch, every rank
    loss_sum = torch.zeros((), device=info.device)
    real = 0
    rows = plan.rank_rows(run.step, info.rank, info.world)
    for micro in micro_batches(rows, cfg.train.micro_batch_size):
        batch = collate_rows(
            [[plan.examples[i] for i in plan.packs[r]] for r in micro],
            run.encoder.pad,
            cfg.data.max_length,
        )
        real += batch.n_real
        with run.autocast:
            loss = packed_loss_sum(run.model, _to(batch, info.device))
        # FSDP averages gradients over ranks; * world makes it the step's token-weighted sum.
        (loss * (info.world / max(1, n_targets))).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.train.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss_value = all_sum(loss_sum, info) / max(1, n_targets)
    run.losses.append(loss_value)
    return StepStats(
        loss=loss_value,
        grad_norm=float(full(grad_norm)),
        lr=run.scheduler.get_last_lr()[0],
        tokens=all_sum(torch.tensor(float(real), device=info.device), info),
        seconds=time.perf_counter() - t0,
    )


def log_step(run: Run, stats: StepStats) -> None:
    """One line of log.jsonl per step, the progress bar, and the console every `log_every`."""
    info = run.info
    if not info.main:
        return
    tps = stats.tokens / stats.seconds
    mfu = tps / info.world * run.flops_per_token / run.peak if run.peak else None
    if not run.flops_per_token:
        mfu = None
    entry = {
        "step": run.step,
        "epoch": round(run.step / run.plan.steps_per_epoch, 4),
        "loss": round(stats.loss, 6),
        "lr": stats.lr,
        "grad_norm": round(stats.grad_norm, 4),
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_device": round(tps / info.world, 1),
        "mfu": round(mfu, 4) if mfu is not None else None,
    }
    with (run.out / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(
            loss=f"{stats.loss:.4f}",
            lr=f"{stats.lr:.2e}",
            tok_s=f"{tps:,.0f}",
            mfu=f"{mfu:.1%}" if mfu is not None else "n/a",
        )
    if run.step % max(1, run.cfg.train.log_every) == 0:
        log.info("step %s", json.dumps(entry))


def save(run: Run) -> None:
    """A checkpoint at the current step (with the data position, for an exact resume)."""
    epoch, in_epoch = run.plan.position(run.step)
    run.checkpoint = run.out / CHECKPOINTS / f"step-{run.step:08d}"
    save_checkpoint(
        run.checkpoint,
        cfg=run.cfg,
        info=run.info,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        state={
            "step": run.step,
            "total_steps": run.total,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "world": run.info.world,
            "data": run.plan.fingerprint(),
        },
    )


def finish(run: Run) -> Path | None:
    """At the last step, write the Hugging Face folder (`train.export_dir`) if one is set."""
    cfg, info = run.cfg, run.info
    if run.step < run.total or not cfg.train.export_dir:
        return None
    exported = Path(cfg.train.export_dir)
    if cfg.lora.enabled:  # the adapter is merged into a full-precision base, from the checkpoint
        if info.main and run.checkpoint is not None:
            export_checkpoint(cfg, run.checkpoint, exported)
    else:
        export_live_model(cfg, run.model, run.tokenizer, exported, info, step=run.step)
    info.barrier()
    return exported


# --------------------------------------------------------------------------------------------
# the loop


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
    run = setup(cfg, info or init_distributed(), resume)
    end = min(run.total, stop_after) if stop_after is not None else run.total
    save_every = cfg.train.save_every
    run.model.train()
    while run.step < end:
        stats = train_step(run)  # every micro-batch of this step, then one optimizer update
        log_step(run, stats)  # rank 0: log.jsonl, progress bar, console
        if run.step == end or (save_every and run.step % save_every == 0):
            save(run)  # the last step always, so a stopped run resumes where it stopped
    if run.bar is not None:
        run.bar.close()
    exported = finish(run)  # only when the whole schedule ran
    return TrainResult(run.step, run.total, run.losses, run.checkpoint, exported)


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
