"""`bench/engine.py` S and P1 on a tiny saved Llama (CPU): the lines it prints, never the figures.

S with `--model` prints, beside ours and HF `generate` in the engine's dtype: the HF column in
another dtype (`--hf-dtype`), greedy agreement bf16 vs fp32 on `bench/agreement.py`'s prompts,
the memory bandwidth measured in the process, and each column's bytes/s against it. P1 prints
the burst's floor (`bench/limits.matmul_seconds`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.agreement import QUESTIONS
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

AGREE_TOKENS = 4
NUMBER = r"(\d+(?:\.\d+)?)"


def test_single_stream_prints_dtype_columns_agreement_and_the_bandwidth_limit(
    tiny_model: Path, cli_env, tmp_path: Path
):
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "engine.py"), "--model", str(tiny_model),
            "--only", "s1", "--greedy", "--rounds", "1", "--new-tokens", "8", "--p1-prompt", "40",
            "--channels", "3",
            "--hf-dtype", "bfloat16", "--agree-tokens", str(AGREE_TOKENS),
        ],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(rf"^S = {NUMBER} tokens/s, HF generate {NUMBER}: ours / HF = ", out, re.M)

    column = re.search(rf"HF generate in bfloat16 \(set by --hf-dtype\): best {NUMBER}", out)
    assert column and float(column[1]) > 0, out

    agreement = re.search(
        r"greedy agreement bf16 vs fp32: (\d+) of (\d+) prompts identical for (\d+) tokens, "
        r"(no divergence|first divergence at token (\d+))",
        out,
    )
    assert agreement, out
    assert int(agreement[2]) == len(QUESTIONS) and int(agreement[3]) == AGREE_TOKENS
    assert 0 <= int(agreement[1]) <= len(QUESTIONS)
    assert (agreement[4] == "no divergence") == (int(agreement[1]) == len(QUESTIONS))

    bandwidth = re.search(rf"memory bandwidth: {NUMBER} GB/s \(torch sum over", out)
    assert bandwidth and float(bandwidth[1]) > 0, out
    limits = re.findall(
        rf"^  (.+): {NUMBER} tokens/s x {NUMBER} MB/token = {NUMBER} GB/s, "
        rf"{NUMBER}% of the measured bandwidth$",
        out,
        re.M,
    )
    labels = [row[0] for row in limits]
    assert labels == ["ours, float32", "HF generate, float32", "HF generate, bfloat16"], out
    sizes = {label: float(mb) for label, _, mb, _, _ in limits}
    assert sizes["HF generate, bfloat16"] < sizes["HF generate, float32"]  # half the bytes
    assert all(float(rate) > 0 and float(gbs) > 0 for _, rate, _, gbs, _ in limits)

    floor = re.search(
        rf"^  floor: HF's prefill of the batch {NUMBER} s \+ (\d+) steps x the matmuls alone at "
        rf"3 rows {NUMBER} ms \(engine's layout {NUMBER}, transformers' {NUMBER}\) = {NUMBER} s; "
        rf"HF's whole batch {NUMBER} s: no engine with these "
        rf"kernels runs more than {NUMBER}x HF$",
        out,
        re.M,
    )
    assert floor and int(floor[2]) > 0 and all(float(x) > 0 for x in floor.groups()), out
    assert float(floor[3]) == min(float(floor[4]), float(floor[5]))  # the faster layout


@pytest.mark.parametrize("prepared", [False, True])
def test_matmul_floor_runs_every_linear_on_the_batch_rows(tiny_model: Path, prepared: bool):
    """`matmul_seconds` calls every linear layer (LM head too) on `rows` rows, as the model
    holds it: transformers' `nn.Linear`s, or the engine's CPU layout."""
    import torch

    from bench.limits import matmul_seconds
    from bot.engine.cpu_weights import classes, prepare_for_cpu_decoding
    from bot.engine.loading import load_model, plan_load

    model = load_model(str(tiny_model), plan_load("float32", "none", cuda=False))
    if prepared:
        prepare_for_cpu_decoding(model)
    kinds = (classes()["DecodeLinear"], torch.nn.Linear)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    assert any(isinstance(m, classes()["DecodeLinear"]) for m in layers) == prepared
    seen: dict[int, list[tuple[int, ...]]] = {}
    for m in layers:
        m.register_forward_pre_hook(lambda mod, a: seen.setdefault(id(mod), []).append(a[0].shape))
    assert matmul_seconds(model, rows=5, passes=2) > 0
    assert model.get_output_embeddings() in layers
    assert {id(m) for m in layers} == set(seen)
    assert all(shapes == [(5, m.in_features)] * 2 for m in layers for shapes in [seen[id(m)]])


def test_decode_step_profile_prints_its_shares(tiny_model: Path, cli_env, tmp_path: Path):
    """`bench/profile_decode.py` drives the batcher on this thread and splits a decode step:
    the model's forward and sampling among `_decode_step`'s callees, aten op groups."""
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "profile_decode.py"), "--model", str(tiny_model),
            "--rows", "2", "--tokens", "8", "--prompt-tokens", "40",
        ],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    plain = re.search(rf"^plain: {NUMBER} ms per decode step \((\d+) steps; prefill", out, re.M)
    assert plain and float(plain[1]) > 0 and int(plain[2]) > 0, out
    shares = {name: float(pct) for pct, name in re.findall(rf"^ +{NUMBER}%  (.+)$", out, re.M)}
    assert "module.py:_wrapped_call_impl" in shares and "sampling.py:sample_rows" in shares, out
    assert "matmuls (linear, mm, addmm, bmm)" in shares and "other ops" in shares, out
    assert re.search(r"aten ops' self time \d+% of it", out), out
