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

The loop in `train` is a handful of calls: `setup` builds everything once, `train_step` runs one
optimizer step (or skips its update when the loss or gradient norm is NaN/inf), `validate`
scores the held-out records every `train.eval_every` steps (the chat suite's loss), `log_step`
writes its figures, `check_divergence` stops the run after `train.max_bad_steps` such steps in a
row, `save` writes a checkpoint (of finite weights only; with `train.keep_best` also at each
lowest validation loss, kept from rotation) and `finish` the Hugging Face folder.
Launch with `torchrun` (or `accelerate launch`) for several GPUs; one process needs no launcher.
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
from training.config import Config, save_resolved
from training.distributed import DistInfo, all_sum, all_values, full, init_distributed
from training.evaluate.chat_suite import chat_loss
from training.export import export_checkpoint, export_live_model
from training.flops import matmul_params, mfu, peak_flops, step_flops
from training.hub import load_tokenizer
from training.model import build_model, check_setup, nonfinite_weights, set_grad_sync
from training.packing import collate_packed, packed_loss_sum
from training.plan import DataPlan, load_examples, total_steps, warmup_steps
from training.tokenize import Encoder, Example

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
    best: dict[str, Any] | None = None  # lowest val_loss: step, val_loss, checkpoint (keep_best)


class TrainingDiverged(RuntimeError):
    """`train.max_bad_steps` steps in a row had a non-finite loss or gradient norm."""


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`; `step` is the optimizer steps done."""

    cfg: Config
    info: DistInfo
    out: Path
    tokenizer: Any
    encoder: Encoder
    plan: DataPlan
    val_examples: list[Example]  # held out of `plan` (train.eval_every > 0), else empty
    total: int
    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    n_matmul: int  # parameters in a matmul per token, for FLOPs (0: unknown, no MFU)
    layers: int
    hidden: int
    peak: float | None
    autocast: AbstractContextManager[Any]
    step: int = 0
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)
    bad_in_a_row: int = 0
    skipped: int = 0
    best: dict[str, Any] | None = None  # {"step", "val_loss", "checkpoint": its name or None}
    bar: Any = None


@dataclass
class StepStats:
    """What one optimizer step did, for the log."""

    loss: float
    grad_norm: float
    lr: float  # the learning rate this step's update used (or would have used, when skipped)
    tokens: float  # real tokens over all ranks
    seconds: float
    micro_batches: int
    grad_syncs: int  # micro-batches whose backward reduce-scattered gradients (FSDP2 only)
    val_loss: float | None = None  # at validation steps: the loss on the held-out examples

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


# --------------------------------------------------------------------------------------------
# setup


def setup(cfg: Config, info: DistInfo, resume: str | None) -> Run:
    """Tokenizer, examples and their order, model, optimizer and schedule; then the resume."""
    check_setup(cfg, info)  # refuse QLoRA without CUDA etc. before anything is fetched
    tc = cfg.train
    seed_everything(tc.seed)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    encoder = Encoder(tokenizer)
    examples, val_examples = load_examples(cfg, encoder)
    if tc.global_batch_size % info.world:
        raise ValueError(
            f"global_batch_size {tc.global_batch_size} (samples) must be a multiple of the "
            f"number of processes, {info.world}"
        )
    micro_tokens = tc.micro_batch_size * cfg.data.max_length
    plan = DataPlan(examples, tc.global_batch_size, tc.seed, micro_tokens)
    total = total_steps(cfg, len(examples))
    warmup = warmup_steps(cfg, total)

    model = build_model(cfg, info)
    base = model.get_base_model() if cfg.lora.enabled else model
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
        val_examples=val_examples,
        total=total,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=cosine_schedule(optimizer, warmup, total, tc.min_lr_ratio),
        n_matmul=0 if cfg.lora.load_in_4bit else matmul_params(base),  # 4-bit: numel is packed
        layers=base.config.num_hidden_layers,
        hidden=base.config.hidden_size,
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
        save_resolved(cfg)  # output_dir/config.yaml: every field this run trains with
        log.info(
            "%d examples, %d samples per step (micro-batches of <= %d tokens); %d steps/epoch, "
            "%d steps, warmup %d; %d processes on %s",
            len(examples),
            tc.global_batch_size,
            micro_tokens,
            plan.steps_per_epoch,
            total,
            warmup,
            info.world,
            info.device,
        )
        if tc.eval_every:
            log.info(
                "validation: %d held-out examples every %d steps (val_fraction %g)%s",
                len(val_examples),
                tc.eval_every,
                tc.val_fraction,
                "; the best checkpoint is kept" if tc.keep_best else "",
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
    run.step, run.checkpoint, run.best = state["step"], ckpt, state.get("best")
    if run.info.main:
        pos = run.plan.position(run.step)
        log.info("resumed from %s at step %d (epoch %d, step %d in epoch)", ckpt, run.step, *pos)


# --------------------------------------------------------------------------------------------
# one optimizer step


def micro_loss(run: Run, samples: list[int]) -> tuple[torch.Tensor, int]:
    """Summed loss over the target tokens of one micro-batch (one flat packed row), and its real
    tokens. An empty micro-batch (a process with less to do this step) still runs the model so
    FSDP2's collectives match, with a loss of exactly zero."""
    examples = [run.plan.examples[i] for i in samples]
    batch = collate_packed(examples or [_EMPTY], run.encoder.pad)
    with run.autocast:
        if not examples:
            logits = run.model(input_ids=_on(batch.input_ids, run), use_cache=False).logits
            return logits.sum() * 0.0, 0
        return packed_loss_sum(run.model, _to(batch, run.info.device)), batch.n_real


def train_step(run: Run) -> StepStats:
    """Forward and backward over this process's micro-batches, then clip, update and schedule.

    A step whose loss or gradient norm is not finite updates nothing: the optimizer (and its
    moments) are left as they were, the gradients are dropped. The schedule and the data move on
    (the learning rate is a function of the step number, and a resumed run replays the same
    batches), and `bad_in_a_row` counts it.
    """
    cfg, info, plan = run.cfg, run.info, run.plan
    t0 = time.perf_counter()
    n_targets = plan.step_targets(run.step)  # of the whole step: every micro-batch, every rank
    loss_sum = torch.zeros((), device=info.device)
    real = syncs = 0
    micro = plan.micro_batches(run.step, info.rank, info.world)
    for k, samples in enumerate(micro):
        # FSDP2: reduce-scatter gradients once per step, in the last micro-batch's backward;
        # before that they accumulate unsharded on each rank (no communication)
        last = k == len(micro) - 1
        if set_grad_sync(run.model, last) and last:
            syncs += 1
        loss, n_real = micro_loss(run, samples)
        # FSDP averages gradients over ranks; * world makes it the step's token-weighted sum.
        (loss * (info.world / max(1, n_targets))).backward()
        loss_sum += loss.detach()
        real += n_real
    # clip the whole step's gradient (the norm is over every shard, so every rank agrees)
    grad_norm = float(full(torch.nn.utils.clip_grad_norm_(run.params, cfg.train.max_grad_norm)))
    loss_value = all_sum(loss_sum, info) / max(1, n_targets)  # the same on every rank
    lr = run.optimizer.param_groups[0]["lr"]  # what this step's update uses
    stats = StepStats(
        loss=loss_value,
        grad_norm=grad_norm,
        lr=lr,
        tokens=all_sum(torch.tensor(float(real), device=info.device), info),
        seconds=0.0,
        micro_batches=len(micro),
        grad_syncs=syncs,
    )
    if stats.finite:
        run.optimizer.step()
        run.bad_in_a_row = 0
    else:  # every rank sees the same loss and norm, so every rank skips
        run.bad_in_a_row += 1
        run.skipped += 1
    run.optimizer.zero_grad(set_to_none=True)  # None, not zeros: frees the memory until backward
    run.scheduler.step()  # also after a skip: the LR stays a function of the step number
    run.step += 1
    run.losses.append(loss_value)
    stats.seconds = time.perf_counter() - t0
    return stats


def validate(run: Run) -> float:
    """The chat suite's loss on reply tokens over the held-out examples, at this step.

    Every rank scores the same examples (under FSDP2 each forward is collective) and gets the
    same value; all take rank 0's, so the keep_best save (also collective) is decided alike
    everywhere, and ranks that disagree are reported. The lowest value at a step that updated
    the weights becomes `run.best`.
    """
    with run.autocast:
        mine = chat_loss(
            run.model,
            run.val_examples,
            max_batch_tokens=run.cfg.train.micro_batch_size * run.cfg.data.max_length,
            pad_id=run.encoder.pad,
        )
    values = all_values(mine, run.info)
    loss = values[0]
    if run.info.main and not all(math.isclose(v, loss, rel_tol=1e-3) for v in values):
        log.warning("step %d: validation loss differs across processes: %s", run.step, values)
    best = run.best["val_loss"] if run.best else math.inf
    if math.isfinite(loss) and loss < best and not run.bad_in_a_row:
        run.best = {"step": run.step, "val_loss": loss, "checkpoint": None}
    return loss


def log_step(run: Run, stats: StepStats) -> None:
    """One line of log.jsonl per step, the progress bar, and the console every `log_every`."""
    info = run.info
    if not stats.finite:
        log.warning(
            "step %d skipped: loss %s, grad norm %s (%d in a row; train.max_bad_steps %d)",
            run.step,
            stats.loss,
            stats.grad_norm,
            run.bad_in_a_row,
            run.cfg.train.max_bad_steps,
        )
    if not info.main:
        return
    tps = stats.tokens / stats.seconds
    util = None
    if run.peak and run.n_matmul:
        flops = step_flops(
            run.n_matmul, run.layers, run.hidden, run.plan.step_lengths(run.step - 1)
        )
        util = mfu(flops, stats.seconds, info.world, run.peak)
    entry = {
        "step": run.step,
        "epoch": round(run.step / run.plan.steps_per_epoch, 4),
        "loss": _num(stats.loss, 6),
        "lr": stats.lr,
        "grad_norm": _num(stats.grad_norm, 4),
        "skipped": not stats.finite,
        "micro_batches": stats.micro_batches,
        "grad_syncs": stats.grad_syncs,
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_device": round(tps / info.world, 1),
        "mfu": round(util, 4) if util is not None else None,
    }
    if stats.val_loss is not None:
        entry["val_loss"] = _num(stats.val_loss, 6)
    with (run.out / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(
            loss=f"{stats.loss:.4f}",
            lr=f"{stats.lr:.2e}",
            tok_s=f"{tps:,.0f}",
            mfu=f"{util:.1%}" if util is not None else "n/a",
            **({"val_loss": f"{stats.val_loss:.4f}"} if stats.val_loss is not None else {}),
        )
    if run.step % max(1, run.cfg.train.log_every) == 0 or stats.val_loss is not None:
        log.info("step %s", json.dumps(entry))


def check_divergence(run: Run) -> None:
    """Stop after `train.max_bad_steps` non-finite steps in a row; nothing after the last good
    checkpoint is written, so it is what resume and export use."""
    limit = run.cfg.train.max_bad_steps
    if run.bad_in_a_row < limit:
        return
    if run.bar is not None:
        run.bar.close()
    kept = run.checkpoint or "none was written"
    raise TrainingDiverged(
        f"stopped at step {run.step}: {limit} steps in a row had a non-finite loss or gradient "
        f"norm (train.max_bad_steps={limit}); last good checkpoint: {kept}. Lower train.lr or "
        "check the data; resume from it, or start again with --resume none"
    )


def save(run: Run) -> None:
    """A checkpoint at the current step (with the data position, for an exact resume), written
    only after a step that updated the weights and only if every weight is finite: rotation then
    never removes a good checkpoint to make room for a bad one."""
    if run.bad_in_a_row:
        return
    if bad := nonfinite_weights(run.model, run.info):
        log.warning("step %d: %d weight tensors are not finite; no checkpoint", run.step, bad)
        return
    epoch, in_epoch = run.plan.position(run.step)
    run.checkpoint = run.out / CHECKPOINTS / f"step-{run.step:08d}"
    if run.cfg.train.keep_best and run.best and run.best["step"] == run.step:
        run.best["checkpoint"] = run.checkpoint.name
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
            "skipped_steps": run.skipped,
            "best": run.best,
        },
        keep=kept_best(run),
    )


def best_unsaved(run: Run) -> bool:
    """With keep_best: this step has the lowest validation loss so far and no checkpoint yet."""
    best = run.best
    return (
        run.cfg.train.keep_best
        and best is not None
        and best["step"] == run.step
        and not best["checkpoint"]
    )


def kept_best(run: Run) -> Path | None:
    """The checkpoint of the lowest validation loss (keep_best), once `save` has named it."""
    if not (run.cfg.train.keep_best and run.best and run.best["checkpoint"]):
        return None
    return run.out / CHECKPOINTS / run.best["checkpoint"]


def finish(run: Run) -> Path | None:
    """At the last step, write the Hugging Face folder (`train.export_dir`) if one is set: the
    best checkpoint's weights with keep_best, else the last step's."""
    cfg, info = run.cfg, run.info
    if run.step < run.total or not cfg.train.export_dir:
        return None
    if bad := nonfinite_weights(run.model, info):  # on every rank, so none waits for rank 0
        raise TrainingDiverged(
            f"refusing to export at step {run.step}: {bad} weight tensors are not finite; "
            f"last good checkpoint: {run.checkpoint or 'none was written'}"
        )
    exported = Path(cfg.train.export_dir)
    best = kept_best(run)
    if best or cfg.lora.enabled:  # LoRA: the adapter is merged into a full-precision base
        source = best or run.checkpoint
        if info.main and source is not None:
            export_checkpoint(cfg, source, exported)
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
    save_every, eval_every = cfg.train.save_every, cfg.train.eval_every
    run.model.train()
    while run.step < end:
        stats = train_step(run)  # every micro-batch of this step, then one update (or a skip)
        if eval_every and (run.step % eval_every == 0 or run.step == run.total):
            stats.val_loss = validate(run)  # every rank: the chat loss on held-out records
        log_step(run, stats)  # rank 0: log.jsonl, progress bar, console
        check_divergence(run)  # N non-finite steps in a row: stop with an error, save nothing
        if run.step == end or (save_every and run.step % save_every == 0) or best_unsaved(run):
            save(run)  # the last step always, so a stopped run resumes where it stopped
    if run.bar is not None:
        run.bar.close()
    if run.best and run.info.main:
        kept = kept_best(run)
        log.info(
            "best val_loss %.6f at step %d%s",
            run.best["val_loss"],
            run.best["step"],
            f"; kept in {kept}" if kept else "",
        )
    exported = finish(run)  # only when the whole schedule ran
    return TrainResult(run.step, run.total, run.losses, run.checkpoint, exported, run.best)


def _num(x: float, digits: int) -> float | str:
    """A figure for log.jsonl: rounded, or "nan"/"inf" as text (JSON has no such numbers)."""
    return round(x, digits) if math.isfinite(x) else str(x)


_EMPTY = Example([0], [-100])  # the stand-in row of an empty micro-batch (its loss is zeroed)


def _on(x: torch.Tensor, run: Run) -> torch.Tensor:
    return x if run.info.device.type == "cpu" else x.to(run.info.device)


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
