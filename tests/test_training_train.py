"""training.train / export / CLI: configs, exact resume, LoRA merge, FSDP2 under torchrun, and the
end-to-end path from records to an answer through the bot's own engine and prompt."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.training_helpers import (
    DATA,
    QA_ANSWERS,
    ROOT,
    need_data,
    need_tokenizer_path,
    prepare,
    qa_records,
    tiny_config_dict,
    write_json,
)
from training.__main__ import main
from training.checkpoint import load_checkpoint
from training.config import CONFIG_DIR, ConfigError, config_from_dict, load_config
from training.distributed import DistInfo
from training.model import build_model
from training.plan import DataPlan
from training.train import cosine_schedule, train

CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def real_sources(code: int = 40, chat: int = 12) -> list[dict[str, Any]]:
    need_data()
    return [
        {"name": "code", "path": str(DATA / "code_alpaca_2k.json"), "limit": code},
        {"name": "chat", "path": str(DATA / "sharegpt-dummy_conversation.json"), "limit": chat},
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hermes-7b-8xa100", "qlora-1gpu", "tiny-cpu"])
def test_bundled_configs_load(name: str) -> None:
    cfg = load_config(name)
    assert cfg.data.sources
    if name == "hermes-7b-8xa100":
        assert (cfg.data.max_length, cfg.train.lr, cfg.train.epochs) == (4096, 2e-5, 3)
        assert (cfg.train.warmup_ratio, cfg.train.global_batch_size) == (0.03, 128)
        assert cfg.train.precision == "bf16" and cfg.model.gradient_checkpointing
    if name == "qlora-1gpu":
        assert cfg.lora.enabled and cfg.lora.load_in_4bit
    assert (CONFIG_DIR / f"{name}.yaml").exists()


def test_config_errors_and_overrides(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", ["train.max_steps=3", "data.sources=[{name: a, path: x.json}]"])
    assert cfg.train.max_steps == 3 and cfg.data.sources[0].path == "x.json"
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['learning_rate'\]"):
        load_config("tiny-cpu", ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config("tiny-cpu", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="exactly one of path or hf"):
        load_config("tiny-cpu", ["data.sources=[{name: a}]"])
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
    assert main(["train", "--config", "tiny-cpu", "--set", "train.bogus=1"]) == 2


def test_cosine_schedule_with_warmup() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, warmup=3, total=13, min_ratio=0.1)
    lrs = []
    for _ in range(13):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] > 0.1


def test_data_plan_covers_each_sample_once_per_epoch() -> None:
    from training.tokenize import Example

    examples = [Example([1, 2], [-100, 2]) for _ in range(10)]
    plan = DataPlan(examples, global_batch=4, seed=1)
    assert plan.steps_per_epoch == 3
    epoch0 = [r for s in range(3) for r in plan.samples(s)]
    assert sorted(set(epoch0)) == list(range(10)) and len(epoch0) == 12  # 2 borrowed to fill
    assert plan.samples(3) != plan.samples(0)  # reshuffled next epoch
    assert plan.rank_samples(4, 0, 2) + plan.rank_samples(4, 1, 2) == plan.samples(4)
    assert plan.step_targets(0) == 4


# --- single process: exact resume, LoRA merged on export ---------------------------------------


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    def config(run: str) -> Any:
        d = tiny_config_dict(
            tmp_path,
            real_sources(),
            max_steps=6,
            save_every=2,
            export_dir=str(tmp_path / run / "hf"),
        )
        d["train"]["output_dir"] = str(tmp_path / run)
        d["model"]["from_config"]["attention_dropout"] = 0.1  # so the RNG state matters too
        return config_from_dict(d)

    straight = config("straight")
    prepare(straight)
    full = train(straight, info=CPU)
    assert full.step == 6 and full.export_dir is not None

    resumed = config("resumed")
    first = train(resumed, stop_after=3, info=CPU)
    assert (first.step, first.export_dir) == (3, None)
    ckpt = first.checkpoint
    assert ckpt is not None and ckpt.name == "step-00000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["world"]) == (3, 1) and state["data"]["examples"] == 52
    assert {"scheduler.pt", "rng-rank0.pt", ".metadata", "COMPLETE"} <= {
        p.name for p in ckpt.iterdir()
    }
    second = train(resumed, info=CPU)  # resume="auto": latest checkpoint
    assert second.step == 6
    assert first.losses + second.losses == full.losses
    a, b = weights(tmp_path / "straight" / "hf"), weights(tmp_path / "resumed" / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2: older checkpoints are pruned
    names = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]


def test_lora_is_merged_on_export(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    d = tiny_config_dict(
        tmp_path,
        real_sources(code=16, chat=4),
        max_steps=3,
        lr=1e-2,
        export_dir=str(tmp_path / "hf"),
    )
    d["lora"] = {
        "enabled": True,
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
    }
    cfg = config_from_dict(d)
    prepare(cfg)
    result = train(cfg, info=CPU)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in k for k in exported.state_dict())
    # the adapter as training left it (read back by the resume path), unmerged, gives the same
    peft_model = build_model(cfg, CPU)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    load_checkpoint(
        result.checkpoint,
        cfg=cfg,
        info=CPU,
        model=peft_model,
        optimizer=opt,
        scheduler=cosine_schedule(opt, 1, 3, 0.0),
    )
    ids = torch.tensor([[1, 835, 2799, 4080, 29901, 13, 10994, 29889]])
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        got = exported.eval()(input_ids=ids).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapter did change the model


# --- FSDP2 under torchrun -----------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    d = tiny_config_dict(
        tmp_path,
        real_sources(),
        max_steps=4,
        global_batch_size=8,  # 4 samples per process: several micro-batches of <= 256 tokens
        export_dir=str(tmp_path / "fsdp" / "hf"),
        eval_every=2,  # the validation loss on the sharded model, every rank scoring alike
        val_fraction=0.1,
    )
    d["train"]["output_dir"] = str(tmp_path / "fsdp")
    d["model"]["gradient_checkpointing"] = True  # as on GPUs: checkpointed layers inside FSDP
    cfg_path = tmp_path / "fsdp.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["prepare", "--config", str(cfg_path)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        "train",
        "--config",
        str(cfg_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes on cpu" in proc.stderr
    # gradients are reduce-scattered once per step, in the last micro-batch's backward; the
    # weights below equal one process's, so the skipped syncs lost nothing
    log = [json.loads(x) for x in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert [e["grad_syncs"] for e in log] == [1, 1, 1, 1]
    assert all(e["micro_batches"] >= 2 for e in log)
    # both ranks scored the held-out records alike (a disagreement is reported on stderr)
    assert [e["step"] for e in log if "val_loss" in e] == [2, 4]
    assert "differs across processes" not in proc.stderr
    assert "validation: 8 held-out examples every 2 steps" in proc.stderr

    single = str(tmp_path / "single")
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg_path),
                "--set",
                f"train.output_dir={single}",
                "--set",
                f"train.export_dir={single}/hf",
            ]
        )
        == 0
    )
    # the sharded validation loss is the one process's
    single_log = [json.loads(x) for x in (Path(single) / "log.jsonl").read_text().splitlines()]
    fsdp_val = [e["val_loss"] for e in log if "val_loss" in e]
    assert [e["val_loss"] for e in single_log if "val_loss" in e] == pytest.approx(fsdp_val, 1e-4)
    fsdp_w, single_w = weights(tmp_path / "fsdp" / "hf"), weights(Path(single) / "hf")
    assert fsdp_w.keys() == single_w.keys()
    for k in fsdp_w:
        torch.testing.assert_close(fsdp_w[k], single_w[k], rtol=1e-4, atol=2e-5, msg=k)
    base = build_model(config_from_dict(d), CPU).state_dict()
    assert any(not torch.equal(base[k], fsdp_w[k]) for k in fsdp_w)  # it did train

    # the sharded DCP checkpoint converts offline to the same folder the run exported
    assert main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "offline")]) == 0
    offline = weights(tmp_path / "offline")
    assert all(torch.equal(offline[k], fsdp_w[k]) for k in fsdp_w)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "hf")
    assert model.generation_config.eos_token_id == 2
    assert {"tokenizer.json", "config.json", "generation_config.json"} <= {
        p.name for p in (tmp_path / "fsdp" / "hf").iterdir()
    }


# --- end to end: records -> train -> export -> the bot's engine and prompt ------------------


@pytest.mark.slow
async def test_end_to_end_bot_answers_what_it_was_trained_on(tmp_path: Path) -> None:
    pytest.importorskip("bot.engine")
    from bot.engine import GenerationParams, LocalEngine
    from bot.prompt import clean_reply, format_single

    need_tokenizer_path()
    records = qa_records(30)
    src = [{"name": "qa", "path": str(write_json(tmp_path / "qa.json", records))}]
    d = tiny_config_dict(
        tmp_path,
        src,
        max_steps=45,
        lr=1e-2,
        warmup_ratio=0.0,
        min_lr_ratio=0.3,
        global_batch_size=30,  # samples per step: the whole set, as 10 packed rows were before
        micro_batch_size=5,
    )
    d["data"]["max_length"] = 128
    d["model"]["from_config"].update(hidden_size=64, intermediate_size=128)
    cfg_path = tmp_path / "e2e.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["prepare", "--config", str(cfg_path)]) == 0
    assert main(["train", "--config", str(cfg_path)]) == 0
    folder = tmp_path / "model"
    assert main(["export", "--config", str(cfg_path), "--out", str(folder)]) == 0

    engine = LocalEngine(str(folder), dtype="float32", device_map="none", quantization="none")
    await engine.start()
    try:
        for record in records[:3]:  # one question of each kind, as a Discord user would ask
            raw = await engine.complete(
                format_single(record["instruction"]),
                GenerationParams(max_new_tokens=32, temperature=0.0),
            )
            assert clean_reply(raw) == record["output"]
            assert raw.strip() == record["output"]  # it stopped at EOS, not at max_new_tokens
        assert set(QA_ANSWERS.values()) == {r["output"] for r in records[:3]}
    finally:
        await engine.close()


def test_cli_failure_is_one_line_not_a_traceback(tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-tokenizer"
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "hi", "input": "", "output": "hello"}]')
    args = [
        "--set",
        f"model.tokenizer={missing}",
        "--set",
        f"data.sources=[{{name: a, path: {data}, format: alpaca}}]",
        "--set",
        f"data.prepared_dir={tmp_path / 'prep'}",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    assert main(["prepare", "--config", "tiny-cpu", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hermes-train prepare: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_qlora_runs_wherever_bitsandbytes_does() -> None:
    """QLoRA is no longer CUDA-only: the check asks bitsandbytes about the training device (the
    CPU here); a real QLoRA run on the CPU is in tests/test_real_quantized.py."""
    from bot.engine.quantize import registered_devices
    from training.model import check_setup

    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (dev extra)")
    cfg = load_config("qlora-1gpu")
    assert "cpu" in registered_devices("4bit")
    check_setup(cfg, CPU)  # no refusal
    two = DistInfo(rank=0, world=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="single-GPU"):
        check_setup(cfg, two)
