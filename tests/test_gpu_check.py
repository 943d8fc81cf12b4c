"""bench/gpu_check.py's parts that need no GPU: model building at a small size, arguments,
per-step time limits (an overrun is reported and the run goes on), CUDA-only steps skipped."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
assert spec is not None and spec.loader is not None
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


@pytest.fixture(autouse=True)
def need_tokenizer() -> None:
    if not (TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"the Llama 2 tokenizer fixture is absent ({TOKENIZER})")


#: The per-step limits are sized for one H100; a loaded 2-core CI box starting torch in a fresh
#: process for every step needs far more, and an overrun here would be a flaky test, not a bug.
ROOMY = ["--limit-scale", "10"]


def check(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--work", str(work)]
        + ROOMY
        + list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def step_lines(out: str) -> dict[str, str]:
    return {ln.split("]")[0][1:]: ln for ln in out.splitlines() if ln.startswith("[")}


@pytest.mark.slow
async def test_builds_a_small_model_once_and_the_engine_answers_with_it(tmp_path: Path):
    run = check(tmp_path, "--only", "build")
    assert run.returncode == 0, run.stdout + run.stderr
    line = step_lines(run.stdout)["build"]
    assert line.startswith("[build] ok ") and "built" in line and "torch.float32" in line
    model = tmp_path / "model-tiny"
    assert {"config.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in model.iterdir()
    }
    again = check(tmp_path, "--only", "build")
    assert "reused" in step_lines(again.stdout)["build"]  # saved once

    from bot.engine import GenerationParams, LocalEngine

    engine = LocalEngine(model, dtype="float32", device_map="none")
    await engine.start()
    try:
        gen = engine.generate("### Instruction:\nhi\n\n### Response:\n", GenerationParams(8))
        await gen.text_all()
    finally:
        await engine.close()
    assert gen.stats.new_tokens > 0 and engine.tokenizer.vocab_size == 32000


@pytest.mark.slow
def test_a_step_over_its_limit_is_reported_and_the_run_goes_on(tmp_path: Path):
    # no Python process imports torch within a millisecond: the build step must overrun
    run = check(tmp_path, "--only", "build,fsdp2,4bit", "--limit", "build=0.001")
    lines = step_lines(run.stdout)
    assert lines["build"].startswith("[build] TIMEOUT ") and "0.001s limit" in lines["build"]
    assert lines["fsdp2"].startswith("[fsdp2] ok "), run.stdout
    assert "FSDP2 over gloo" in lines["fsdp2"] and "DTensors" in lines["fsdp2"]
    assert lines["4bit"].startswith("[4bit] skipped") and "needs CUDA" in lines["4bit"]
    assert run.returncode == 1  # a step failed
    assert "2 of 3 steps without failure" in run.stdout
    assert not (tmp_path / "model-tiny" / "gpu_check.json").exists()  # killed before saving


def test_packed_rows_check_on_the_cpu(tmp_path: Path, capsys):
    args = ["--device", "cpu", "--work", str(tmp_path), "--only", "packed", *ROOMY]
    assert gpu_check.main(args) == 0
    line = step_lines(capsys.readouterr().out)["packed"]
    assert line.startswith("[packed] ok ") and "sdpa torch.float32: packed" in line


def test_cuda_only_steps_are_skipped_on_the_cpu(tmp_path: Path, capsys):
    code = gpu_check.main(["--device", "cpu", "--work", str(tmp_path), "--only", "4bit,8bit,mfu"])
    lines = step_lines(capsys.readouterr().out)
    assert code == 0
    assert set(lines) == {"4bit", "8bit", "mfu"}
    assert all("skipped" in ln and "needs CUDA" in ln for ln in lines.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "build,warp"], "unknown step(s) warp"),
        (["--limit", "p1p2"], "--limit p1p2: '' is not a number"),
        (["--limit", "nope=3"], "unknown step 'nope'"),
        (["--limit", "build=-1"], "the limit must be positive"),
        (["--limit-scale", "0"], "--limit-scale must be positive"),
        (["--wheels", "/nonexistent/wheels"], "no such folder"),
        (["--device", "tpu"], "use cuda, cuda:N or cpu"),
        (["--tokenizer", "/nonexistent"], "no Llama 2 tokenizer"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], message: str, capsys):
    assert gpu_check.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: ") and message in err[0]


def test_limits_and_steps():
    args = gpu_check.parse_args(["--limit-scale", "2", "--limit", "mfu=10", "--only", "mfu,packed"])
    assert args.steps == ["mfu", "packed"]
    assert args.limits["mfu"] == 10 and args.limits["build"] == 2 * gpu_check.LIMITS["build"]
    # by default every step runs, in the order the limits are listed
    assert gpu_check.parse_args([]).steps == gpu_check.STEPS == list(gpu_check.LIMITS)


def test_the_7b_size_is_llama_2_7b():
    from transformers import LlamaConfig

    llama2_7b = LlamaConfig()  # transformers' defaults are Llama-2-7B's shape
    assert gpu_check.SIZES["7b"] == {k: getattr(llama2_7b, k) for k in gpu_check.SIZES["7b"]}


def test_missing_wheels_are_named_by_their_pip_names():
    import os

    found = gpu_check.missing(
        {"yaml": "pyyaml", "no_such_module_x": "x-wheel", "google.no_such": "y-wheel"},
        dict(os.environ),
    )
    assert found == ["x-wheel", "y-wheel"]
