"""Checkpoints that resume exactly: sharded DCP model + optimizer, scheduler, every rank's RNG
state and the data position, written so that an interrupted save is never mistaken for a good one.

A checkpoint folder is `output_dir/checkpoints/step-XXXXXXXX`; `COMPLETE` is written last, and
only folders that have it count. `export.py` reads the same folders into one process.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from training.config import Config
from training.distributed import DistInfo

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # written last: a checkpoint without it was interrupted while saving
STATE_FILE = "trainer_state.json"


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


def step_of(checkpoint: Path) -> int | None:
    """The optimizer step a checkpoint was written at (None when its state file is unreadable)."""
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


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
