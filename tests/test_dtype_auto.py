"""DTYPE=auto by hardware: the rule as a pure function, the detection, and a real load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.engine import LocalEngine, plan_load
from bot.engine.loading import auto_dtype, cpu_native_bf16

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.parametrize(
    ("cuda", "quantization", "cpu_bf16", "gpu_bf16", "want", "why"),
    [
        (False, "none", False, False, "float32", "no native bf16"),
        (False, "none", True, False, "bfloat16", "has native bf16"),
        (False, "4bit", False, False, "float32", "no native bf16"),
        (False, "4bit", True, False, "bfloat16", "has native bf16"),
        (False, "8bit", False, False, "float32", "no native bf16"),
        (False, "8bit", True, False, "float32", "8-bit"),
        (True, "none", False, True, "bfloat16", "GPU has bf16"),
        (True, "none", True, False, "float16", "no bf16"),
        (True, "4bit", False, True, "bfloat16", "GPU has bf16"),
        (True, "8bit", False, False, "float16", "no bf16"),
    ],
)
def test_auto_dtype_rule(cuda, quantization, cpu_bf16, gpu_bf16, want, why):
    dtype, reason = auto_dtype(cuda, quantization, cpu_native_bf16=cpu_bf16, gpu_bf16=gpu_bf16)
    assert dtype == want
    assert why in reason and reason.startswith("auto: ")


def test_cpu_detection_agrees_with_cpuinfo():
    """torch's answer is the kernel's: the avx512_bf16 / amx_bf16 flags in /proc/cpuinfo."""
    if not CPUINFO.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags: set[str] = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_plan_on_this_cpu_follows_the_detection():
    plan = plan_load("auto", "auto", cuda=False)
    want, why = auto_dtype(False, "none", cpu_native_bf16=cpu_native_bf16())
    assert (plan.dtype, plan.why) == (want, why)
    assert plan.kwargs["dtype"] is getattr(torch, want)
    assert plan_load("float32", "none", cuda=False).why == "set by DTYPE"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule")
async def test_auto_load_on_this_cpu(tiny_model: Path):
    """A saved tiny Llama loaded with DTYPE=auto has the dtype the detection picks here, and the
    startup/doctor line says why."""
    want, why = auto_dtype(False, "none", cpu_native_bf16=cpu_native_bf16())
    eng = LocalEngine(tiny_model, dtype="auto", device_map="auto")
    await eng.start()
    try:
        assert next(eng.model.parameters()).dtype is getattr(torch, want)
        assert eng.info.dtype == want and eng.info.device == "cpu"
        assert f"dtype {want} ({why})," in eng.info.describe()
    finally:
        await eng.close()
