"""The trainer's validation loss (`train.eval_every`): the chat suite's held-out records are never
trained on, their loss is logged at the expected steps, `keep_best` keeps the checkpoint of the
lowest one through rotation and resume and exports it, and `hermes-train eval --suite chat`
scores exactly those records (the FSDP2 run under torchrun is in test_training_train.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.training_helpers import DATA, llama_tokenizer, need_data, prepare, tiny_config_dict
from training.__main__ import build_parser, main
from training.checkpoint import checkpoint_dirs
from training.config import (
    DEFAULT_VAL_EXAMPLES,
    DEFAULT_VAL_FRACTION,
    ConfigError,
    TrainSettings,
    config_from_dict,
    load_config,
)
from training.data import read_prepared
from training.distributed import DistInfo
from training.evaluate.chat_suite import ChatOptions, split_records
from training.plan import DataPlan, load_examples, schedule_summary
from training.tokenize import Encoder
from training.train import train

CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
FRACTION = 0.25


def entries(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_trainer_and_eval_share_the_split_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["eval", "--model", "m", "--suite", "chat"])
    assert TrainSettings().val_fraction == ChatOptions().val_fraction == args.val_fraction
    assert TrainSettings().val_examples == ChatOptions().max_examples == args.max_examples
    assert TrainSettings().eval_every == 0 and not TrainSettings().keep_best  # off by default
    # the 7B config validates every 200 steps; prepare's step count leaves the held-out out
    big = load_config("hermes-7b-8xa100")
    assert big.train.eval_every == 200 and not big.train.keep_best
    assert (big.train.val_fraction, big.train.val_examples) == (
        DEFAULT_VAL_FRACTION,
        DEFAULT_VAL_EXAMPLES,
    )
    line = schedule_summary(big, 300_000, 10**8, held_out=6_000)
    assert "300000 records (6000 held out for validation)" in line
    assert "2297 steps per epoch; 6891 steps (3 epochs)" in line
    d = tiny_config_dict(tmp_path, [{"name": "a", "path": "a.json"}], keep_best=True)
    with pytest.raises(ConfigError, match="keep_best needs train.eval_every"):
        config_from_dict(d)
    d["train"].update(eval_every=5, val_fraction=1.0)
    with pytest.raises(ConfigError, match="val_fraction must be between 0 and 1"):
        config_from_dict(d)


def test_validation_loss_is_logged_held_out_and_the_best_checkpoint_kept(tmp_path: Path) -> None:
    need_data()
    src = [{"name": "code", "path": str(DATA / "code_alpaca_2k.json"), "limit": 16}]
    # constant lr 3e-2 on 12 training records: the tiny model overfits, so the validation loss
    # falls, then rises while the training loss goes on falling
    d = tiny_config_dict(
        tmp_path,
        src,
        max_steps=11,
        lr=3e-2,
        warmup_ratio=0.0,
        min_lr_ratio=1.0,
        eval_every=2,
        val_fraction=FRACTION,
        keep_best=True,
        keep_last=1,
        export_dir=str(tmp_path / "hf"),
    )
    cfg = config_from_dict(d)
    prepare(cfg)

    # the chat suite's split decides what is held out: its records are never trained on
    records = read_prepared(tmp_path / "data")
    train_recs, val_recs = split_records(records, FRACTION)
    assert len(records) == 16 and 0 < len(val_recs) < 8
    encoder = Encoder(llama_tokenizer())
    train_ex, val_ex = load_examples(cfg, encoder)
    assert [e.input_ids for e in val_ex] == [encoder.encode(r).input_ids for r in val_recs]
    assert [e.input_ids for e in train_ex] == [encoder.encode(r).input_ids for r in train_recs]
    assert not {tuple(e.input_ids) for e in train_ex} & {tuple(e.input_ids) for e in val_ex}

    first = train(cfg, stop_after=7, info=CPU)  # interrupted, then resumed: the best survives
    result = train(cfg, info=CPU)
    log = entries(tmp_path / "run")
    assert [e["step"] for e in log] == list(range(1, 12))
    val = {e["step"]: e["val_loss"] for e in log if "val_loss" in e}
    assert list(val) == [2, 4, 6, 8, 10, 11]  # every eval_every steps and at the last one
    # the run trained on the training records only (the checkpoint's data fingerprint)
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["data"] == DataPlan(train_ex, 4, 7).fingerprint()

    best_step = min(val, key=val.__getitem__)
    assert val[11] > val[best_step] and log[-1]["loss"] < log[best_step - 1]["loss"]  # overfit
    assert first.best is not None and first.best["step"] == best_step < 7
    assert result.best is not None and result.best["step"] == best_step
    assert result.best["val_loss"] == pytest.approx(val[best_step], abs=1e-6)
    # keep_last=1 keeps the last checkpoint, and the best one is never rotated out
    kept = [p.name for p in checkpoint_dirs(tmp_path / "run")]
    assert kept == [f"step-{best_step:08d}", "step-00000011"]
    assert state["best"]["checkpoint"] == kept[0]

    # the run exported the best step, and so does `hermes-train export` by default;
    # `hermes-train eval --suite chat` on it scores exactly the held-out records: its loss is
    # the trainer's val_loss at that step
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "again")]) == 0
    for folder in ("hf", "again"):
        info = json.loads((tmp_path / folder / "hermes_training.json").read_text())
        assert info["step"] == best_step
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "hf"), "--suite", "chat", "--data"]
    argv += [str(tmp_path / "data"), "--val-fraction", str(FRACTION), "--samples", "0"]
    assert main([*argv, "--dtype", "float32", "--no-progress", "--out", str(out)]) == 0
    chat = json.loads((out / "results.json").read_text())["suites"]["chat"]
    figures = chat["models"][str(tmp_path / "hf")]
    assert chat["settings"]["validation_records"] == figures["examples"] == len(val_recs)
    assert math.isclose(figures["loss"], val[best_step], rel_tol=1e-5)
