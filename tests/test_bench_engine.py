"""`bench/engine.py` S on a tiny saved Llama (CPU): the lines it prints, never the figures.

S with `--model` prints, beside ours and HF `generate` in the engine's dtype: the HF column in
another dtype (`--hf-dtype`), greedy agreement bf16 vs fp32 on `bench/agreement.py`'s prompts,
the memory bandwidth measured in the process, and each column's bytes/s against it.
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
            "--only", "s", "--greedy", "--rounds", "1", "--new-tokens", "8", "--p1-prompt", "40",
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
