"""ENGINE=auto: a `.gguf` MODEL on a machine without CUDA runs on llama.cpp, and says why.

The choice is `bot.engine_choice.choose_engine`; `doctor` (a real subprocess, the real SmolLM2
GGUF) shows it end to end: `MODEL=x.gguf` and nothing else loads on llama.cpp and answers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.engine_choice import INSTALL_HINT, choose_engine, cuda_available, llamacpp_installed
from tests.llamacpp_helpers import need_llamacpp


def test_explicit_engines_are_taken_as_written(settings_factory):
    for engine in ("local", "llamacpp", "openai"):
        kind, why = choose_engine(settings_factory(ENGINE=engine, MODEL="m.gguf"))
        assert (kind, why) == (engine, f"ENGINE={engine}")


def test_auto_serves_a_folder_or_hub_id_locally(settings_factory):
    kind, why = choose_engine(settings_factory(MODEL="NousResearch/Nous-Hermes-llama-2-7b"))
    assert kind == "local" and "not a .gguf" in why


def test_auto_picks_llamacpp_for_a_gguf_without_cuda(settings_factory):
    if cuda_available():
        pytest.skip("this machine has CUDA: auto picks transformers there")
    kind, why = choose_engine(settings_factory(MODEL="models/x.Q4_K_M.GGUF"))
    if llamacpp_installed():
        assert kind == "llamacpp" and "no CUDA GPU" in why
    else:  # the one line saying how to install it
        assert kind == "local" and INSTALL_HINT in why


@pytest.mark.real_model
@pytest.mark.slow
def test_doctor_runs_a_bare_gguf_on_llama_cpp(cli_env, tmp_path: Path, smollm2_gguf: Path):
    need_llamacpp()
    if cuda_available():
        pytest.skip("this machine has CUDA: auto picks transformers there")
    env = dict(cli_env, MODEL=str(smollm2_gguf))
    env.pop("ENGINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "doctor", "--skip-token"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "(engine llamacpp)" in out
    assert "engine llamacpp: ENGINE=auto: a .gguf MODEL and no CUDA GPU" in out
    assert "quantization gguf Q4_1" in out and "test reply in" in out
    assert "Traceback" not in proc.stderr


@pytest.mark.real_model
@pytest.mark.slow
def test_bench_measures_llamacpp_side_by_side(
    cli_env, tmp_path: Path, smollm2_gguf: Path, smollm2_hf: Path
):
    """`hermes-bot bench` on a .gguf measures the llamacpp engine: the side-by-side table."""
    need_llamacpp()
    env = dict(cli_env, MODEL=str(smollm2_gguf), TOKENIZER=str(smollm2_hf), ENGINE="llamacpp",
               MAX_BATCH="2", THREADS="2", CONTEXT_TOKENS="1024")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "bench", "--tokens", "4", "--rounds", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "llamacpp (this bot)" in proc.stdout
    for row in ("single stream decode tok/s", "2 channels aggregate tok/s", "mean TTFT"):
        assert row in proc.stdout
