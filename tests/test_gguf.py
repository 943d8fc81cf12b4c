"""GGUF files as MODEL: checked, loaded through transformers, converted once (`bot/gguf.py`).

Tiny GGUF files are written here with the `gguf` package's writer (tests/tiny_gguf.py): a
2-layer Llama with a ChatML template, and the same file with an architecture or a quantization
transformers cannot load. The real SmolLM2 `.gguf` is checked against its converted folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.engine import EngineError, GenerationParams, LocalEngine, load_model, plan_load
from bot.gguf import GGUFError, check_gguf, convert_gguf
from tests.conftest import subprocess_env
from tests.real_model import RealModel
from tests.tiny_gguf import CHATML, make_gguf

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", quant="Q8_0")


def bot(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = subprocess_env(cwd)
    # ENGINE=local: the transformers path (ENGINE=auto serves a .gguf through llama.cpp on a CPU)
    env.update(MAX_NEW_TOKENS="4", TEMPERATURE="0", LOG_LEVEL="WARNING", ENGINE="local")
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    file = make_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(GGUFError) as caught:
        check_gguf(file)
    message = str(caught.value)
    assert "\n" not in message
    assert "architecture 'rwkv6' cannot be loaded" in message and "llama" in message


def test_a_checked_file_is_read_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model source, the tokenizer and the model each check a .gguf: the file is read once;
    replaced in place by one that cannot load, it is read again and refused."""
    import gguf

    reads: list[str] = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda p, *a: reads.append(p) or reader(p, *a))
    file = make_gguf(tmp_path / "model.gguf", quant="Q8_0")
    assert [check_gguf(file), check_gguf(str(file)), check_gguf(file)] == ["llama"] * 3
    assert reads == [str(file.resolve())]
    make_gguf(file, arch="rwkv6", quant="F32")  # the same path, new contents (and size)
    for _ in range(2):  # a refusal is not kept either
        with pytest.raises(GGUFError, match="architecture 'rwkv6' cannot be loaded"):
            check_gguf(file)
    assert len(reads) == 3


def test_unsupported_quantization_is_one_line(tmp_path: Path) -> None:
    file = make_gguf(tmp_path / "q81.gguf", quant="Q8_1")
    with pytest.raises(GGUFError, match=r"quantization Q8_1 \(tensor token_embd.weight\)"):
        check_gguf(file)


def test_console_refuses_an_unloadable_gguf_in_one_line(tmp_path: Path) -> None:
    make_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    run = bot(["console", "--model", "rwkv.gguf"], tmp_path)
    assert run.returncode == 1
    assert one_line(run).startswith("hermes-bot: rwkv.gguf: the architecture 'rwkv6' cannot")
    run = bot(["console", "--model", "gone.Q4_K_M.gguf"], tmp_path)  # never taken for a hub id
    assert run.returncode == 1
    assert one_line(run) == f"hermes-bot: model GGUF file not found: {tmp_path}/gone.Q4_K_M.gguf"


def test_console_serves_a_gguf_file(tiny_gguf: Path, tmp_path: Path) -> None:
    run = bot(["console", "--model", str(tiny_gguf)], tmp_path, stdin="Hello there\n")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr


async def test_gguf_and_its_converted_folder_answer_alike(tiny_gguf: Path, tmp_path: Path):
    """The engine on the .gguf file and on `convert`'s folder: same weights, same tokens."""
    folder = convert_gguf(tiny_gguf, tmp_path / "converted")
    plan = plan_load("float32", "none")
    direct, converted = load_model(str(tiny_gguf), plan), load_model(str(folder), plan)
    assert direct.state_dict().keys() == converted.state_dict().keys()
    for name, weight in direct.state_dict().items():
        assert weight.equal(converted.state_dict()[name]), name
    replies = []
    for source in (tiny_gguf, folder):
        engine = LocalEngine(source, dtype="float32", device_map="none")
        await engine.start()
        try:
            assert engine.tokenizer.chat_template == CHATML  # the template came with it
            replies.append(await engine.complete("Hello there, how are you?", GREEDY))
        finally:
            await engine.close()
    assert replies[0] == replies[1]


def test_convert_command(tiny_gguf: Path, tmp_path: Path) -> None:
    run = bot(["convert", str(tiny_gguf), "out"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {tmp_path}/out; set MODEL={tmp_path}/out"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHATML
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no leftovers
    again = bot(["convert", str(tiny_gguf), "out"], tmp_path)  # never over an existing folder
    assert again.returncode == 1
    assert one_line(again) == f"hermes-bot: {tmp_path}/out already exists; remove it or name a new folder"
    wrong = bot(["convert", "out", "elsewhere"], tmp_path)
    assert wrong.returncode == 2
    assert one_line(wrong) == "hermes-bot: convert reads a .gguf file, not 'out'"


def test_bitsandbytes_on_a_gguf_is_refused(tiny_gguf: Path) -> None:
    """A quantized file is not quantized again: the line says to convert it first."""
    from bot.engine.loading import LoadPlan

    plan = LoadPlan("float16", "auto", "4bit", {"quantization_config": object()})
    with pytest.raises(EngineError, match="hermes-bot convert"):
        load_model(str(tiny_gguf), plan)


@pytest.mark.real_model
@pytest.mark.slow
async def test_smollm2_gguf_serves_what_its_folder_serves(smollm2: RealModel) -> None:
    """MODEL=SmolLM2's .gguf: the file's tokenizer carries the ChatML template, and greedy
    tokens for a templated question equal those of the converted fp32 folder."""
    replies, templates = [], []
    for source in (smollm2.gguf, smollm2.hf):
        engine = LocalEngine(source, dtype="float32", device_map="none")
        await engine.start()
        try:
            tokenizer = engine.tokenizer
            templates.append(tokenizer.chat_template)
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": "What is the capital of France?"}],
                add_generation_prompt=True,
                tokenize=False,
            )
            replies.append(await engine.complete(prompt, GREEDY))
        finally:
            await engine.close()
    assert templates[0] == templates[1] and "<|im_start|>" in templates[0]
    assert replies[0] == replies[1]
    assert "Paris" in replies[0]
