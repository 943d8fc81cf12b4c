"""The training loop's numbers: the LR it logs, the FLOPs it counts, the steps a config makes, how a
step's samples are split into micro-batches, and what it does when a step goes NaN.

NaN/inf runs are real tiny runs, made to fail the ways a user's could, neither touching the
trainer: a base model with garbage in the embedding rows of tokens that only some steps read (those
steps' gradients overflow; which steps they are comes from the run's own data plan), and a
learning rate so large that the first update overflows the weights to inf.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training_helpers import (
    DATA,
    TINY_MODEL,
    llama_tokenizer,
    need_data,
    prepare,
    tiny_config_dict,
)
from training.__main__ import main
from training.checkpoint import checkpoint_dirs
from training.config import config_from_dict, load_config
from training.distributed import DistInfo
from training.flops import matmul_params, step_flops
from training.plan import DataPlan, load_examples, steps_per_epoch, total_steps
from training.tokenize import Encoder, Example
from training.train import train

CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def sources(n: int = 24) -> list[dict[str, Any]]:
    need_data()
    return [{"name": "code", "path": str(DATA / "code_alpaca_2k.json"), "limit": n}]


def log_entries(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def finite_weights(folder: Path) -> bool:
    from safetensors.torch import load_file

    tensors = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    return bool(tensors) and all(bool(torch.isfinite(v).all()) for v in tensors.values())


# --- item 7: the logged LR is the one the step used ---------------------------------------------


def test_logged_lr_is_the_lr_of_that_step(tmp_path: Path) -> None:
    cfg = config_from_dict(
        tiny_config_dict(tmp_path, sources(), max_steps=6, warmup_ratio=0.5, lr=3e-3)
    )
    prepare(cfg)
    train(cfg, info=CPU)
    # warmup ceil(0.5 * 6) = 3 steps: 1/3, 2/3, 1; then cosine over the 3 left: 1, 0.75, 0.25
    want = [3e-3 * f for f in (1 / 3, 2 / 3, 1.0, 1.0, 0.75, 0.25)]
    assert [e["lr"] for e in log_entries(tmp_path / "run")] == pytest.approx(want)


# --- item 8: FLOPs per step, by hand -------------------------------------------------------------


def test_step_flops_count_documents_and_skip_the_input_embedding() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {**TINY_MODEL, "hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 4}
    model = LlamaForCausalLM(LlamaConfig(**dims))
    # per layer: q, k, v, o 4*64*64 = 16,384; MLP 3*64*128 = 24,576; 2 norms 128 -> 41,088;
    # 2 layers 82,176 + final norm 64 + lm_head 64*32,000 = 2,048,000 -> 2,130,240
    # (the 2,048,000 of the input embedding is a lookup, not a matmul)
    assert matmul_params(model) == 2_130_240
    # two documents of 100 and 28 tokens packed in one row, each attending within itself:
    # 6 * 2,130,240 * 128 = 1,636,024,320; 12 * 2 * 64 * (100^2 + 28^2) = 16,564,224
    assert step_flops(2_130_240, 2, 64, [100, 28]) == 1_652_588_544
    # the row length would count 12 * 2 * 64 * 128 per token instead: 25,165,824
    assert step_flops(2_130_240, 2, 64, [128]) == 1_636_024_320 + 25_165_824
    tied = LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=True))
    assert matmul_params(tied) == 2_130_240  # the shared matrix counted once, as lm_head


def test_logged_mfu_uses_the_step_flops(tmp_path: Path) -> None:
    d = tiny_config_dict(tmp_path, sources(), max_steps=2, peak_tflops=1e-4)
    cfg = config_from_dict(d)
    prepare(cfg)
    train(cfg, info=CPU)
    from transformers import LlamaConfig, LlamaForCausalLM

    n = matmul_params(LlamaForCausalLM(LlamaConfig(**TINY_MODEL)))
    from tests.training_helpers import llama_tokenizer
    from training.plan import load_examples
    from training.tokenize import Encoder

    examples, _ = load_examples(cfg, Encoder(llama_tokenizer()))
    plan = DataPlan(examples, 4, cfg.train.seed)
    for step, entry in enumerate(log_entries(tmp_path / "run")):
        lengths = plan.step_lengths(step)
        flops = step_flops(n, 2, TINY_MODEL["hidden_size"], lengths)
        # mfu = flops / (seconds * peak) and tokens_per_s = tokens / seconds
        want = flops / sum(lengths) * entry["tokens_per_s"] / 1e8
        assert entry["mfu"] == pytest.approx(want, rel=0.02)


# --- item 9: the batch in samples, the recipe's step count ---------------------------------------


def test_7b_config_makes_the_recipes_steps_for_300k_records() -> None:
    cfg = load_config("hermes-7b-8xa100")
    assert cfg.train.global_batch_size == 128  # samples per step, as stanford_alpaca
    assert steps_per_epoch(300_000, 128) == 2_344
    recipe = 300_000 * 3 / 128  # 7,031 steps: 3 epochs of 128-sample steps
    assert total_steps(cfg, 300_000) == 7_032
    assert abs(total_steps(cfg, 300_000) - recipe) / recipe < 0.10
    assert total_steps(load_config("tiny-cpu"), 300_000) == 20  # max_steps wins


def test_each_process_packs_its_samples_into_equal_counts_of_micro_batches() -> None:
    lengths = [300, 20, 250, 240, 30, 40, 500, 10, 60, 200, 90, 120]
    examples = [Example(list(range(n)), [-100] * n) for n in lengths]
    plan = DataPlan(examples, global_batch=8, seed=3, micro_tokens=512)
    for step in range(4):
        per_rank = [plan.micro_batches(step, r, 2) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])  # FSDP collectives stay in step
        for r, micro in enumerate(per_rank):
            assert sorted(i for m in micro for i in m) == sorted(plan.rank_samples(step, r, 2))
            assert all(sum(lengths[i] for i in m) <= 512 for m in micro)
        assert sum(len(m) for mbs in per_rank for m in mbs) == 8
    assert plan.steps_per_epoch == 2  # 12 samples, 8 per step


# --- item 2: NaN/inf --------------------------------------------------------------------------------


#: A finite value so large that the gradients of any step that reads it overflow: what garbage
#: left in an embedding row (a vocabulary resized without initialising the new rows) looks like.
GARBAGE = 3e38


def step_tokens(cfg: Any) -> list[set[int]]:
    """The token ids each optimizer step of `cfg` reads, from the trainer's own data plan."""
    tc = cfg.train
    examples, _ = load_examples(cfg, Encoder(llama_tokenizer()))
    plan = DataPlan(examples, tc.global_batch_size, tc.seed)
    steps = [plan.samples(step) for step in range(tc.max_steps)]
    return [{t for i in samples for t in examples[i].input_ids} for samples in steps]


def garbage_base(d: dict[str, Any], tmp_path: Path, bad_steps: set[int]) -> list[bool]:
    """Point `d` at a base model whose embedding rows hold garbage for tokens that only the
    0-based `bad_steps` read (of the steps that run before them); returns which steps read one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config_from_dict(d)
    prepare(cfg)
    reads = step_tokens(cfg)
    last = max(bad_steps)
    clean = set().union(*(reads[i] for i in range(last + 1) if i not in bad_steps))
    rows = {min(reads[i] - clean) for i in bad_steps}  # one token each bad step reads, alone
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**d["model"].pop("from_config")))
    with torch.no_grad():
        for row in rows:
            base.model.embed_tokens.weight[row] = GARBAGE
    base.save_pretrained(tmp_path / "base")
    d["model"]["name_or_path"] = str(tmp_path / "base")
    return [bool(rows & tokens) for tokens in reads]


def test_a_nan_step_is_skipped_and_the_run_recovers(tmp_path: Path) -> None:
    d = tiny_config_dict(
        tmp_path, sources(), max_steps=6, save_every=2, export_dir=str(tmp_path / "hf")
    )
    bad = garbage_base(d, tmp_path, {2})  # the third step reads a token with garbage in its row
    assert bad == [False, False, True, False, False, False]
    cfg = config_from_dict(d)
    result = train(cfg, info=CPU)
    entries = log_entries(tmp_path / "run")
    assert [e["skipped"] for e in entries] == bad
    assert entries[2]["grad_norm"] in ("nan", "inf")
    # the optimizer's moments were not poisoned: every other step is finite
    assert all(math.isfinite(x) for x in result.losses)
    assert all(isinstance(e["grad_norm"], float) for i, e in enumerate(entries) if i != 2)
    assert result.step == 6 and result.export_dir is not None
    assert finite_weights(tmp_path / "hf")
    names = [p.name for p in checkpoint_dirs(tmp_path / "run")]
    assert names == ["step-00000004", "step-00000006"]
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / names[-1] / "trainer_state.json").read_text()
    )
    assert state["skipped_steps"] == 1


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    d = tiny_config_dict(
        tmp_path,
        sources(),
        max_steps=10,
        save_every=2,
        keep_last=1,
        export_dir=str(tmp_path / "hf"),
    )
    d["train"]["max_bad_steps"] = 3
    bad = garbage_base(d, tmp_path, {2, 3, 4})  # steps 3, 4 and 5 each read a garbage row
    assert bad[:5] == [False, False, True, True, True]
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(d))
    capsys.readouterr()  # what making the base printed
    assert main(["train", "--config", str(path)]) == 1
    # one line, besides the progress bar of loading the base model
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "%|" not in ln]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("hermes-train train: stopped at step 5: 3 steps in a row")
    assert "max_bad_steps=3" in err[0] and "step-00000002" in err[0]
    # steps 4 (skipped) and later wrote nothing: the good step-2 checkpoint was never rotated out
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000002"]
    assert not (tmp_path / "hf").exists()
    assert main(["export", "--config", str(path), "--out", str(tmp_path / "kept")]) == 0
    assert finite_weights(tmp_path / "kept")


def test_a_learning_rate_that_blows_up_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    # no fault injection: lr 3e37 makes the first update push the weights to ~1e38, and every
    # forward after it overflows to NaN
    d = tiny_config_dict(tmp_path, sources(), max_steps=6, lr=3e37, save_every=1)
    d["train"]["max_bad_steps"] = 2
    path = tmp_path / "blowup.yaml"
    path.write_text(yaml.safe_dump(d))
    prepare(config_from_dict(d))
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hermes-train train: stopped at step 3: 2 steps")
    assert [e["skipped"] for e in log_entries(tmp_path / "run")] == [False, True, True]
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000001"]


def test_non_finite_weights_are_counted(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.model import nonfinite_weights

    model = LlamaForCausalLM(LlamaConfig(**TINY_MODEL))
    assert nonfinite_weights(model, CPU) == 0
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
        model.lm_head.weight[0, 0] = float("-inf")
    assert nonfinite_weights(model, CPU) == 2  # what `save` checks before writing a checkpoint


def test_export_refuses_non_finite_weights(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.training_helpers import llama_tokenizer
    from training.export import save_hf_folder

    cfg = config_from_dict(tiny_config_dict(tmp_path, sources(2)))
    model = LlamaForCausalLM(LlamaConfig(**TINY_MODEL))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"refusing to export step 7: 1 weight tensors are not "
        r"finite \(first: model.layers.1.mlp.up_proj.weight\)",
    ):
        save_hf_folder(cfg, model, llama_tokenizer(), tmp_path / "out", step=7)
    assert not (tmp_path / "out").exists()


# --- item 10: torch.compile per decoder layer ------------------------------------------------------


@pytest.mark.slow
def test_compile_wraps_each_decoder_layer_and_trains_like_eager(tmp_path: Path) -> None:
    from training.model import build_model, decoder_layers

    def run(name: str, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        d = tiny_config_dict(
            tmp_path / name, sources(8), max_steps=2, export_dir=str(tmp_path / name / "hf")
        )
        d["model"]["compile"] = compiled
        cfg = config_from_dict(d)
        prepare(cfg)
        result = train(cfg, info=CPU)
        from safetensors.torch import load_file

        return result.losses, load_file(next((tmp_path / name / "hf").glob("*.safetensors")))

    cfg = config_from_dict(tiny_config_dict(tmp_path, sources(2)))
    cfg.model.compile = True
    layers = decoder_layers(build_model(cfg, CPU))
    assert len(layers) == 2 and all(type(m).__name__ == "OptimizedModule" for m in layers)
    eager_losses, eager = run("eager", False)
    compiled_losses, compiled = run("compiled", True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled.keys() == eager.keys()  # no `_orig_mod.` in the exported names
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-5)


def test_an_empty_micro_batch_runs_the_model_and_adds_nothing(tmp_path: Path) -> None:
    from training.train import micro_loss, setup

    cfg = config_from_dict(tiny_config_dict(tmp_path, sources(4)))
    prepare(cfg)
    run = setup(cfg, CPU, None)
    loss, real = micro_loss(run, [])
    loss.backward()  # a process with less work still joins every collective of the step
    assert (float(loss.detach()), real) == (0.0, 0)
    grads = [p.grad for p in run.model.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    loss, real = micro_loss(run, [0, 1])
    assert real == len(run.plan.examples[0]) + len(run.plan.examples[1])
    assert float(loss.detach()) > 0
